"""Sampling: the part of a step outside the model, and whole sampling loops.

Step: fastguide's one op vs the diffusers way on the same tensors (chunk the 2B model
output, combine, DDIMScheduler.step with clipping, torch.cat the next 2B input).
End to end: fastguide.sample vs the same loop written the diffusers way (cat, forward,
chunk, combine, scheduler step) on the same model and noise; on a GPU also with the
loop captured as CUDA graphs (a GuidedSampler held across calls, cuda_graph=True).
"""

import importlib.util
import math

import pytest
import torch

from benchmarks.conftest import DEVICE, difference_from_peer, seeded_weights
from fastguide import CFG, GuidedSampler, NoiseSchedule, ops, sample
from fastguide.models.configs import create_model, unet_config

W = 4.0
# DDIMScheduler's linear betas; its grid (steps_offset=0) is the "leading" spacing. fastguide's
# rows take them from here, so they run where diffusers is not installed (the GPU image).
SCHEDULE = NoiseSchedule.linear()


def _ddim_timesteps(steps: int) -> list[int]:
    return [int(t) for t in SCHEDULE.spaced_timesteps(steps, "leading")]


def _ddim_scheduler(steps):
    """diffusers' DDIMScheduler on those betas and grid (None without diffusers)."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    import diffusers

    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True, steps_offset=0
    )
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == _ddim_timesteps(steps)
    return scheduler


def _step_cases(shape, dtype, record, impl):
    g = torch.Generator().manual_seed(0)
    batch = shape[0]
    model_output = torch.randn((2 * batch, *shape[1:]), generator=g).to(DEVICE, dtype)
    model_input = torch.randn((2 * batch, *shape[1:]), generator=g).to(DEVICE, dtype)
    scheduler = _ddim_scheduler(25) if impl == "diffusers" else None
    if impl == "diffusers" and scheduler is None:
        pytest.skip("diffusers not installed (pip install diffusers)")
    t = _ddim_timesteps(25)[5]
    t_prev = t - 1000 // 25
    abar, abar_prev = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_prev)

    def diffusers_way():
        cond, uncond = model_output.chunk(2)
        eps = uncond + W * (cond - uncond)
        latents = scheduler.step(eps, t, model_input[:batch], eta=0.0, use_clipped_model_output=True).prev_sample
        return torch.cat([latents] * 2)

    step = ops.StepCoefficients(
        alpha=math.sqrt(abar),
        sigma=math.sqrt(1 - abar),
        clip_denoised=True,
        k_x0=math.sqrt(abar_prev),
        k_eps=math.sqrt(1 - abar_prev),
    )

    def fastguide_way():
        return ops.guided_step(model_output, model_input[:batch], step, ops.GuidanceCombine(W), out=model_input)

    fn = {"fastguide": fastguide_way, "diffusers": diffusers_way}[impl]
    record(fn, bytes_moved=5 * model_input[:batch].numel() * model_input.element_size())


@pytest.mark.parametrize("impl", ["fastguide", "diffusers"])
def test_step_outside_model_cpu(record, impl):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    _step_cases((8, 3, 64, 64), torch.float32, record, impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastguide", "diffusers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_step_outside_model_gpu(record, impl, dtype):
    _step_cases((64, 3, 64, 64), dtype, record, impl)


def end_to_end_loops(device: torch.device, pairs: int, steps: int) -> dict:
    """The compact UNet's CFG + DDIM loops on ``device``, each a callable returning the
    samples: fastguide's ``sample``, the same loop written the diffusers way (cat, forward,
    chunk, combine, scheduler step), and on CUDA a GuidedSampler whose loop is captured as
    CUDA graphs on its first call. Shared with loop_profile.py."""
    flags = unet_config("compact")
    with torch.device(device):
        torch.manual_seed(0)
        model = seeded_weights(create_model(**flags)).eval()
    batch = pairs
    shape = (batch, model.in_channels, model.image_size, model.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(batch) % model.num_classes).to(device)
    timesteps = _ddim_timesteps(steps)
    scheduler = _ddim_scheduler(steps)

    @torch.no_grad()
    def diffusers_loop():
        latents = noise.clone()
        null = torch.full_like(labels, model.null_label)
        for t in scheduler.timesteps:
            t_in = torch.full((2 * batch,), int(t), device=device)
            cond, uncond = model(torch.cat([latents] * 2), t_in, torch.cat([labels, null])).chunk(2)
            eps = uncond + W * (cond - uncond)
            latents = scheduler.step(eps, t, latents, eta=0.0, use_clipped_model_output=True).prev_sample
        return latents

    def fastguide_loop():
        return sample(
            model,
            shape,
            labels=labels,
            sampler="ddim",
            steps=timesteps,
            guidance=CFG(W),
            noise=noise,
        )

    loops = {"fastguide": fastguide_loop}
    if scheduler is not None:  # (without diffusers, fastguide's loops alone)
        loops["diffusers"] = diffusers_loop
    if device.type == "cuda":
        graphed = GuidedSampler(model, sampler="ddim", steps=timesteps, guidance=CFG(W), cuda_graph=True)
        loops["fastguide-cuda_graph"] = lambda: graphed(shape, labels=labels, noise=noise)
    return loops


def _end_to_end(benchmark, impl, pairs, steps):
    loops = end_to_end_loops(DEVICE, pairs, steps)
    if impl not in loops:
        pytest.skip("diffusers not installed (pip install diffusers)")
    fn = loops[impl]

    def timed():  # until the samples exist: the H200 run of 2026-12-04 timed a graphed loop's
        out = fn()  # enqueueing (19 ms) in its first round and its execution (83 ms) after
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    samples = timed()  # warm-up (and the graphs' capture)
    benchmark.pedantic(timed, rounds=3, warmup_rounds=0)
    if "diffusers" in loops and impl != "diffusers" and not benchmark.disabled:
        benchmark.extra_info["difference_from_peer"] = difference_from_peer(samples, loops["diffusers"]())


@pytest.mark.parametrize("impl", ["fastguide", "diffusers"])
def test_sampling_end_to_end_cpu(benchmark, impl):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    _end_to_end(benchmark, impl, pairs=8, steps=10)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastguide", "fastguide-cuda_graph", "diffusers"])
def test_sampling_end_to_end_gpu(benchmark, impl):
    _end_to_end(benchmark, impl, pairs=64, steps=25)

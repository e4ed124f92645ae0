"""End to end at the sizes people sample at: 25 guided DDIM steps (CFG at w = 4, or ADM's
classifier guidance) of models with random weights in their published configurations.

Models (GPU; the CPU set runs tiny versions of each as a smoke test):
  DiT-XL/2 at 256 px (32×32 latents) and 512 px (64×64), batch 1, 8, 64 (512 px: 1, 8)
  ADM-256 (class-conditional) with its noisy classifier, classifier guidance, batch 1, 8
  a Stable-Diffusion-1.5-size UNet2DConditionModel (64×64 latents, 77 text tokens of 768),
  batch 1, 8

Rows, each the whole loop (x_T to x_0, no VAE), median of a few runs, with its rate against
the FLOP floor: the matrix products, convolutions and attention of the loop's forwards
(and, under classifier guidance, the classifier's forward and backward), counted once per
model and batch over the peer row with torch's FLOP formulas and fastguide's attention
(FlopCount), as TFLOP/s and % of the measured matmul rate, and its samples' largest
difference from the peer row's, relative to their largest magnitude (the JSON's
difference_from_peer):
  fastguide              fastguide.sample, fused ops (the DiT is fastguide.DiT; the
                         diffusers UNet is accelerate()d)
  fastguide-cuda_graph   a held GuidedSampler(cuda_graph=True): the loop replayed as graphs
  official               the official DiT loop's semantics written out ([z; z] with
                         [y; null], forward_with_cfg's guided eps, the scheduler's step)
                         over DiT's own forward (tools/dit_baseline.py: the official
                         models.py in torch.nn.functional, SDPA attention) on the same
                         weights; for ADM, fastguide's loop (its step on the torch
                         backend) over ADM's own forwards (tools/adm_baseline.py)
  diffusers              diffusers' own model (DiTTransformer2DModel; UNet2DConditionModel)
                         with DDIMScheduler: for SD the pipeline's denoising loop, for DiT
                         the official loop written out (its step on B rows; DiTPipeline
                         steps on all 2B, a little more elementwise work)
  diffusers-max-autotune the same with torch.compile(model, mode="max-autotune")

fastguide's loop calls a text-conditioned UNet through ``PromptTable`` (label 0 the prompt,
label 1 the negative prompt) until the loop takes conditioning keyword arguments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import fastguide
from benchmarks.conftest import DEVICE, compiled, difference_from_peer, no_recompiles, seeded_weights
from fastguide import CFG, ClassifierGuidance, GuidedSampler, NoiseSchedule, sample
from fastguide.models.diffusers_dit import to_diffusers
from tools.adm_baseline import plain_classifier, plain_unet
from tools.dit_baseline import plain_dit

W = 4.0
STEPS = {"cuda": 25, "cpu": 3}[DEVICE.type]
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
NULL_CLASS = 1000


@dataclass(frozen=True)
class Setup:
    """One model of the table: its family and its settings at each size."""

    name: str
    family: str  # "dit", "adm" or "sd"
    gpu: dict  # constructor settings at the published size
    cpu: dict  # the same family at a smoke-test size


SETUPS = {
    "DiT-XL/2-256": Setup(
        "DiT-XL/2-256", "dit", dict(preset="DiT-XL/2", input_size=32), dict(preset="DiT-S/8", input_size=16)
    ),
    "DiT-XL/2-512": Setup(
        "DiT-XL/2-512", "dit", dict(preset="DiT-XL/2", input_size=64), dict(preset="DiT-S/8", input_size=16)
    ),
    "ADM-256": Setup("ADM-256", "adm", dict(preset="adm256"), dict(preset="compact")),
    "SD-1.5-UNet": Setup(
        "SD-1.5-UNet",
        "sd",
        dict(channels=(320, 640, 1280, 1280), size=64, heads=8),
        dict(channels=(32, 64), size=8, heads=2),
    ),
}
GPU_CASES = (
    [("DiT-XL/2-256", b) for b in (1, 8, 64)]
    + [("DiT-XL/2-512", b) for b in (1, 8)]
    + [("ADM-256", b) for b in (1, 8)]
    + [("SD-1.5-UNet", b) for b in (1, 8)]
)
IMPLS = {
    "dit": ["fastguide", "fastguide-cuda_graph", "official", "diffusers", "diffusers-max-autotune"],
    "adm": ["fastguide", "official"],
    "sd": ["fastguide", "fastguide-cuda_graph", "diffusers", "diffusers-max-autotune"],
}
TEXT_TOKENS, TEXT_WIDTH = 77, 768


class PromptTable(nn.Module):
    """A text-conditioned diffusers UNet as ``model(x_t, t, y)``: y = 0 takes the prompt's
    embeddings, y = 1 the negative prompt's (the null label)."""

    null_class = True
    num_classes = 1

    def __init__(self, unet: nn.Module, prompt: torch.Tensor, negative: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("table", torch.stack([prompt, negative]))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.table[y]).sample


def _ddim(schedule: str, beta_start: float = 1e-4, beta_end: float = 0.02, device: torch.device | None = None):
    """diffusers' DDIMScheduler, its timesteps set on ``device`` as the pipeline sets them
    (StableDiffusionPipeline: the execution device; DiTPipeline: none, the CPU)."""
    import diffusers

    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
    scheduler.set_timesteps(STEPS, device=device)
    return scheduler


SD_BETAS = (0.00085, 0.012)  # Stable Diffusion's "scaled_linear" range


def _sd_schedule() -> NoiseSchedule:
    return NoiseSchedule(torch.linspace(SD_BETAS[0] ** 0.5, SD_BETAS[1] ** 0.5, 1000, dtype=torch.float64) ** 2)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _dit_rows(setup: dict, batch: int) -> dict:
    # its rows are built side by side with diffusers' (the same weights): without diffusers, skipped
    pytest.importorskip("diffusers", reason="diffusers not installed (pip install diffusers)")

    config = fastguide.dit_config(setup["preset"]) | {"input_size": setup["input_size"]}
    with torch.device(DEVICE):
        torch.manual_seed(0)  # the same weights in each case of a model
        model = seeded_weights(fastguide.DiT(**config)).to(DTYPE).eval()
        # diffusers' port holding the same weights, with the official math (its two
        # defaults that differ set to it: fastguide.models.diffusers_dit), so every row
        # samples the same thing
        theirs = to_diffusers(model)
    shape = (batch, 4, config["input_size"], config["input_size"])
    noise, labels = _noise_and_labels(shape, 1000)
    scheduler = _ddim("linear")
    timesteps = scheduler.timesteps.tolist()
    settings = dict(sampler="ddim", steps=timesteps, guidance=CFG(W), clip_denoised=False)

    @torch.no_grad()
    def written_out(forward):
        """DiT's sample.py loop: one forward of [z; z] with [y; null], CFG on eps."""
        z, y = noise.clone(), torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        for t in scheduler.timesteps:
            out = forward(torch.cat([z, z]), torch.full((2 * batch,), int(t), device=DEVICE), y)
            cond, uncond = out[:, :4].chunk(2)
            z = scheduler.step(uncond + W * (cond - uncond), t, z).prev_sample
        return z

    diffusers_forward = lambda net: lambda x, t, y: net(x, timestep=t, class_labels=y).sample  # noqa: E731
    graphed = GuidedSampler(model, cuda_graph=True, **settings) if DEVICE.type == "cuda" else None
    # GPU rows only; static shapes, dynamo's caches emptied (a second batch size would
    # otherwise compile for dynamic shapes: conftest.compiled)
    autotuned = compiled(theirs, mode="max-autotune") if DEVICE.type == "cuda" else None
    return {
        "fastguide": lambda: sample(model, shape, labels=labels, noise=noise, **settings),
        "fastguide-cuda_graph": lambda: graphed(shape, labels=labels, noise=noise),
        "official": lambda: written_out(lambda x, t, y: plain_dit(model, x, t, y)),
        "diffusers": lambda: written_out(diffusers_forward(theirs)),
        "diffusers-max-autotune": lambda: written_out(diffusers_forward(autotuned)),
    }


def _adm_rows(setup: dict, batch: int) -> dict:
    # In fp16, ADM's own use_fp16 (its convolutions fp16; norms, linears and x float32), the
    # only half precision ADM's code runs: a model cast whole fails in its float32 time MLP
    # input and norms.
    fp16 = DTYPE == torch.float16
    flags = fastguide.unet_config(setup["preset"]) | {"use_fp16": fp16}
    classifier_flags = fastguide.classifier_config(setup["preset"]) | {"classifier_use_fp16": fp16}
    with torch.device(DEVICE):
        torch.manual_seed(0)
        model = seeded_weights(fastguide.create_model(**flags)).eval()
        classifier = seeded_weights(fastguide.create_classifier(**classifier_flags)).eval()
    shape = (batch, model.in_channels, model.image_size, model.image_size)
    noise, labels = _noise_and_labels(shape, model.num_classes)
    noise = noise.float()

    def run(model, classifier):
        return sample(
            model,
            shape,
            labels=labels,
            noise=noise,
            sampler="ddim",
            steps=STEPS,
            guidance=ClassifierGuidance(classifier, 1.0),
        )

    def official():
        # ADM's own forwards (guided-diffusion's ops, einsum attention in the model's dtype)
        # over the same weights; the step on the torch backend
        with fastguide.backend("torch"):
            return run(PlainADM(model, plain_unet), PlainADM(classifier, plain_classifier))

    return {"fastguide": lambda: run(model, classifier), "official": official}


class PlainADM(nn.Module):
    """An ADM network's forward as guided-diffusion writes it (tools/adm_baseline.py), over
    the network's own weights."""

    def __init__(self, network: nn.Module, forward):
        super().__init__()
        self.network, self.plain_forward = network, forward
        self.num_classes = getattr(network, "num_classes", None)

    def forward(self, *args):
        return self.plain_forward(self.network, *args)


def _sd_rows(setup: dict, batch: int) -> dict:
    # its rows are built side by side with diffusers' (the same weights): without diffusers, skipped
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install diffusers)")

    channels = setup["channels"]
    down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1)
    width = TEXT_WIDTH if DEVICE.type == "cuda" else 32
    with torch.device(DEVICE):
        torch.manual_seed(0)
        theirs = (
            diffusers.UNet2DConditionModel(
                sample_size=setup["size"],
                in_channels=4,
                out_channels=4,
                block_out_channels=channels,
                down_block_types=down,
                up_block_types=up,
                layers_per_block=2,
                cross_attention_dim=width,
                attention_head_dim=setup["heads"],
                norm_num_groups=min(32, channels[0]),
            )
            .to(DTYPE)
            .eval()
        )
        ours = diffusers.UNet2DConditionModel.from_config(theirs.config).to(DTYPE).eval()
    ours.load_state_dict(theirs.state_dict())
    fastguide.accelerate(ours)
    prompt, negative = (
        torch.randn(TEXT_TOKENS, width, generator=torch.Generator().manual_seed(s)).to(DEVICE, DTYPE) for s in (1, 2)
    )
    model = PromptTable(ours, prompt, negative)
    shape = (batch, 4, setup["size"], setup["size"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    labels = torch.zeros(batch, dtype=torch.long, device=DEVICE)
    scheduler = _ddim("scaled_linear", *SD_BETAS, device=DEVICE)
    settings = dict(
        sampler="ddim",
        steps=scheduler.timesteps.tolist(),
        guidance=CFG(W),
        clip_denoised=False,
        schedule=_sd_schedule(),
    )
    text = torch.cat([prompt.expand(batch, -1, -1), negative.expand(batch, -1, -1)])

    @torch.no_grad()
    def pipeline_loop(unet):
        """StableDiffusionPipeline's denoising loop (without the VAE)."""
        latents = noise.clone()
        for t in scheduler.timesteps:
            cond, uncond = unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample.chunk(2)
            latents = scheduler.step(uncond + W * (cond - uncond), t, latents).prev_sample
        return latents

    graphed = GuidedSampler(model, cuda_graph=True, **settings) if DEVICE.type == "cuda" else None
    # GPU rows only; static shapes, dynamo's caches emptied (a second batch size would
    # otherwise compile for dynamic shapes: conftest.compiled)
    autotuned = compiled(theirs, mode="max-autotune") if DEVICE.type == "cuda" else None
    return {
        "fastguide": lambda: sample(model, shape, labels=labels, noise=noise, **settings),
        "fastguide-cuda_graph": lambda: graphed(shape, labels=labels, noise=noise),
        "diffusers": lambda: pipeline_loop(theirs),
        "diffusers-max-autotune": lambda: pipeline_loop(autotuned),
    }


def _noise_and_labels(shape: tuple[int, ...], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g).to(DEVICE, DTYPE)
    return noise, torch.randint(0, classes, (shape[0],), generator=g).to(DEVICE)


ROWS = {"dit": _dit_rows, "adm": _adm_rows, "sd": _sd_rows}
# The row whose FLOPs are the floor: each family's written-out peer loop, plain torch ops.
PEER = {"dit": "official", "adm": "official", "sd": "diffusers"}
# (FLOPs, samples) of the peer row's run, once per model and batch
_PEER_RUN: dict[tuple[str, int], tuple[int, torch.Tensor]] = {}


def attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool = False) -> int:
    """The matrix products of attention over (..., L, D) q, k, v, 2·Lq·Lk·D each a head: S = QKᵀ
    and O = PV; its backward's five, S recomputed, dV, dP, dQ and dK (torch's counts of its
    fused SDPA kernels and their backward: 2.5× the forward at one head dim)."""
    heads = q.numel() // (q.shape[-2] * q.shape[-1])
    lengths, d, dv = heads * q.shape[-2] * k.shape[-2], q.shape[-1], v.shape[-1]
    return 2 * lengths * (3 * d + 2 * dv) if backward else 2 * lengths * (d + dv)


class FlopCount(TorchDispatchMode):
    """The FLOPs of the ops run under it: those in torch's FLOP formulas (flop_registry:
    matrix products, convolutions, the SDPA kernels, their backwards) and fastguide's own
    attention ops, which the mode sees whole. Other ops count 0 (FlopCounterMode would
    decompose them). Not FlopCounterMode itself: its module hooks refuse
    torch.autograd.grad (classifier guidance's)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet is torch.ops.fastguide.attention:
            self.total += attention_flops(*args[:3])
        elif packet is torch.ops.fastguide.attention_backward:
            self.total += attention_flops(*args[1:4], backward=True)
        elif packet in flop_registry:
            self.total += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def loop_flops(rows: dict, family: str) -> tuple[int, torch.Tensor]:
    """The FLOPs of one run of the family's peer row, and that run's samples. On CPU, SDPA
    on its math path (its fused CPU kernel is not in the registry); CUDA's flash and
    efficient kernels are."""
    math_path = sdpa_kernel(SDPBackend.MATH) if DEVICE.type == "cpu" else contextlib.nullcontext()
    with FlopCount() as counter, math_path:
        samples = rows[PEER[family]]()
    return counter.total, samples


def _run(benchmark, name: str, batch: int, impl: str, matmul_rate: float) -> None:
    setup = SETUPS[name]
    rows = ROWS[setup.family](setup.gpu if DEVICE.type == "cuda" else setup.cpu, batch)
    fn = rows[impl]
    # the same work in every row of a model and batch; not counted where nothing is timed
    # (pytest's default --benchmark-disable runs each case once as a smoke test)
    if (name, batch) not in _PEER_RUN and not benchmark.disabled:
        _PEER_RUN[name, batch] = loop_flops(rows, setup.family)

    def timed():
        out = fn()
        _sync()
        return out

    samples = timed()  # warm-up: compile, autotune, capture
    with no_recompiles():
        benchmark.pedantic(timed, rounds=3, warmup_rounds=0)
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"  # the table's title names it
    benchmark.extra_info.update(model=name, batch=batch, steps=STEPS, device=device)
    if benchmark.disabled:
        return
    (flops, peer_samples), seconds = _PEER_RUN[name, batch], benchmark.stats.stats.median
    benchmark.extra_info.update(
        median_ms=seconds * 1e3,
        difference_from_peer=difference_from_peer(samples, peer_samples),
        flops_floor=flops,
        **{"TFLOP/s": flops / seconds / 1e12, "pct_of_matmul_rate": 100 * flops / seconds / matmul_rate},
    )


# The rows each model has; on CPU, without graphs (CUDA only) and max-autotune (minutes).
GPU_ONLY = ("fastguide-cuda_graph", "diffusers-max-autotune")
CPU_ROWS = [(name, impl) for name, setup in SETUPS.items() for impl in IMPLS[setup.family] if impl not in GPU_ONLY]
GPU_ROWS = [(name, batch, impl) for name, batch in GPU_CASES for impl in IMPLS[SETUPS[name].family]]


@pytest.mark.parametrize("name, impl", CPU_ROWS, ids=[f"{n}-{i}" for n, i in CPU_ROWS])
def test_end_to_end_cpu(benchmark, matmul_rate, name, impl):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    _run(benchmark, name, 1, impl, matmul_rate)


@pytest.mark.gpu
@pytest.mark.parametrize("name, batch, impl", GPU_ROWS, ids=[f"{n}-b{b}-{i}" for n, b, i in GPU_ROWS])
def test_end_to_end_gpu(benchmark, matmul_rate, name, batch, impl):
    _run(benchmark, name, batch, impl, matmul_rate)

"""Host overhead of one sampler step on tiny tensors, split into its parts, beside diffusers.

    python benchmarks/sampling/step_overhead.py [--repeat 2000] [--json PATH]

On a GPU the fused step is one kernel of a few µs, so for a small model without CUDA
graphs the host work around it decides the step's speed. This measures that work on CPU,
on one thread, with a 1×3×8×8 batch (CFG on a 2×3×8×8 model output, x0 clipping, one
DPM-Solver++(2M) history tensor): every part is timed on its own, interleaved, as the
median of ``--repeat`` calls.

  validation   the op's argument checks (constants cached per value, tensors per call)
  dispatch     the rest of the call: backend choice, and the custom op's round trip
               where the call takes it (total − validation − math)
  math         the reference backend's own work
  total        one ops.guided_step call under no_grad, as the sampler makes it (the call
               goes straight to the backend)
  total, op    one call with autograd on, through the torch.library custom op (as
               under torch.compile)
  loop/call    one model call of GuidedSampler with a model that returns a fixed tensor,
               minus that model's own time: everything the loop does around the model
  diffusers    the same step as a diffusers pipeline does it: torch.chunk, the CFG
               combine and DDIMScheduler.step (clip, use_clipped_model_output)
  sample()/call          fastguide.sample as users call it, anew each time (CFG + DDIM,
                         25 calls): per model call, minus the model's own time
  diffusers loop/call    diffusers' loop for the same (set_timesteps, torch.cat of the
                         2B input, the model, chunk, combine, DDIMScheduler.step)
The two whole loops alternate, one run of each a round (``--repeat`` / 25 rounds), so
that drift in the machine's speed stays out of their ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from fastguide import CFG, GuidedSampler, ops, sample
from fastguide.ops import reference
from fastguide.ops.contract import GuidanceCombine, StepCoefficients, StepTensors


def median_us(fn, repeat: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def interleaved_medians_us(fns: dict, repeat: int) -> dict[str, float]:
    """The median µs of each function over ``repeat`` rounds that call every function once,
    in turn: drift in the machine's speed (±20% over a run here) hits all of them alike,
    where timing one function's calls after another's put it into their ratio."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter_ns()
            fn()
            times[name].append(time.perf_counter_ns() - start)
    return {name: statistics.median(values) / 1000 for name, values in times.items()}


def measure(repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=g)
    model_output = torch.randn(2, 3, 8, 8, generator=g)
    prev, out, x0_out = torch.randn(1, 3, 8, 8, generator=g), torch.empty(2, 3, 8, 8), torch.empty(1, 3, 8, 8)
    step = StepCoefficients(alpha=0.8, sigma=0.6, k_x=0.7, k_x0=0.5, k_history=(-0.1,), clip_denoised=True)
    combine = GuidanceCombine(3.0)
    tensors = StepTensors(model_output, x, history=(prev,), out=out, x0_out=x0_out)

    def validate():
        ops.check_step(step)
        ops.check_combine(combine)
        ops.check_step_tensors(tensors, step, combine)

    def call():
        ops.guided_step(model_output, x, step, combine, history=(prev,), out=out, x0_out=x0_out)

    # name -> (function, autograd on while it is timed)
    parts = {
        "total": (call, False),
        "total, op": (call, True),
        "validation": (validate, False),
        "math": (lambda: reference.guided_step(tensors, step, combine), False),
    }
    results = {name: [] for name in parts}
    for _ in range(5):  # interleaved rounds: drift hits every part alike
        for name, (fn, grad) in parts.items():
            with torch.set_grad_enabled(grad):
                results[name].append(median_us(fn, repeat // 5))
    split = {name: statistics.median(values) for name, values in results.items()}
    split["dispatch"] = split["total"] - split["validation"] - split["math"]
    split["dispatch, op"] = split["total, op"] - split["validation"] - split["math"]
    split["loop/call"] = loop_overhead(repeat)
    split["diffusers"] = diffusers_step(repeat)
    split.update(whole_loops(repeat))
    return split


def whole_loops(repeat: int, calls: int = 25) -> dict[str, float]:
    """Per model call: fastguide.sample and diffusers' DDIM + CFG loop, each minus the model."""
    fixed = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.1

    def model(x, t, y):
        return fixed[: len(x)]

    labels, null = torch.tensor([1]), torch.tensor([10])
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model_alone = median_us(lambda: model(fixed, None, None), repeat)

    def fastguide_loop():
        return sample(
            model,
            (1, 3, 8, 8),
            labels=labels,
            sampler="ddim",
            steps=calls,
            guidance=CFG(3.0),
            noise=noise,
            null_label=10,
            num_classes=10,
        )

    loops = {"sample()/call": fastguide_loop}
    try:
        import diffusers
    except ImportError:
        diffusers = None
    if diffusers is not None:
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

        @torch.no_grad()
        def diffusers_loop():
            scheduler.set_timesteps(calls)
            latents, labels_in = noise.clone(), torch.cat([labels, null])
            for t in scheduler.timesteps:
                cond, uncond = model(torch.cat([latents] * 2), t, labels_in).chunk(2)
                eps = uncond + 3.0 * (cond - uncond)
                latents = scheduler.step(eps, t, latents, eta=0.0, use_clipped_model_output=True).prev_sample
            return latents

        loops["diffusers loop/call"] = diffusers_loop
    # Whole loops alternate, one each a round, so that their ratio sees the same machine.
    medians = interleaved_medians_us(loops, max(5, repeat // calls))
    found = {name: median / calls - model_alone for name, median in medians.items()}
    return found | ({} if diffusers is not None else {"diffusers loop/call": math.nan})


def loop_overhead(repeat: int) -> float:
    """Per-call time of GuidedSampler's loop around a model that returns a fixed tensor."""
    fixed = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.1

    def model(x, t, y):
        return fixed[: len(x)]

    calls = 25
    sampler = GuidedSampler(model, sampler="dpm++2m", steps=calls, guidance=CFG(3.0), null_label=10, num_classes=10)
    labels = torch.tensor([1])
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    run = median_us(lambda: sampler((1, 3, 8, 8), labels=labels, noise=noise), max(1, repeat // calls))
    model_alone = median_us(lambda: model(fixed, None, None), repeat)
    return run / calls - model_alone


def diffusers_step(repeat: int) -> float:
    try:
        import diffusers
    except ImportError:
        return math.nan
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    scheduler.set_timesteps(25)
    t = int(scheduler.timesteps[5])
    g = torch.Generator().manual_seed(0)
    x, model_output = torch.randn(1, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)

    def step():
        cond, uncond = model_output.chunk(2)
        eps = uncond + 3.0 * (cond - uncond)
        return scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample

    return median_us(step, repeat)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", help="also write the numbers (µs) as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    split = measure(args.repeat)
    print("| part | µs per step |\n|---|---|")
    for name, value in split.items():
        print(f"| {name} | {value:.1f} |")
    print(f"| validation + dispatch | {split['validation'] + split['dispatch']:.1f} |")
    print(f"\nsample() per model call / diffusers' loop's: {split['sample()/call'] / split['diffusers loop/call']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(split, f, indent=2)


if __name__ == "__main__":
    main()

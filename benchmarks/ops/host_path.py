"""The ops' own host path per call: a call's time minus its reference math's, on tiny
tensors under no_grad, where the math is a few µs and the rest is validation, backend
resolution and dispatch (what a launch-bound GPU loop pays per op on top of the launch).

    OMP_NUM_THREADS=1 python benchmarks/ops/host_path.py [--calls 2000] [--rounds 7]

Prints, per op, the medians over the rounds of µs per call. Run two checkouts back to
back (PYTHONPATH=<other checkout>) to compare them; absolute CPU times vary ±20%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastguide import ops
from fastguide.ops import reference
from fastguide.ops.contract import GuidanceCombine, StepCoefficients, StepTensors


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def cases() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 4, 8, generator=g)
    scale, shift = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    image, weight, bias = torch.randn(2, 8, 4, 4, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    q = torch.randn(1, 2, 5, 8, generator=g)
    x, model_output = torch.randn(1, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    out = torch.empty(2, 3, 8, 8)
    step = StepCoefficients(alpha=0.8, sigma=0.6, k_x0=0.7, k_eps=0.5, clip_denoised=True)
    combine = GuidanceCombine(3.0)
    return {
        "guided_step (CFG + DDIM, 2B out)": (
            lambda: ops.guided_step(model_output, x, step, combine, out=out),
            lambda: reference.guided_step(StepTensors(model_output, x, out=out), step, combine)),
        "layer_norm (+ adaLN scale, shift)": (
            lambda: ops.layer_norm(tokens, (8,), scale=scale, shift=shift),
            lambda: reference.layer_norm_forward(tokens, None, None, scale[:, None], shift[:, None], 1e-6)),
        "group_norm (+ scale-shift, SiLU)": (
            lambda: ops.group_norm(image, 4, weight, bias, scale=scale, shift=shift, activation="silu"),
            lambda: reference.group_norm_forward(image, weight, bias, scale, shift, 4, 1e-5, "silu")),
        "attention": (lambda: ops.attention(q, q, q), lambda: reference.attention_forward(q, q, q, 8 ** -0.5)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| op | µs per call | reference math | host path |\n|---|---|---|---|")
    with torch.no_grad():
        for name, (call, math) in cases().items():
            for fn in (call, math):  # warm-up
                per_call_us(fn, 300)
            rounds = [(per_call_us(call, args.calls), per_call_us(math, args.calls)) for _ in range(args.rounds)]
            whole, math_only = (statistics.median(r[i] for r in rounds) for i in (0, 1))
            print(f"| {name} | {whole:.1f} | {math_only:.1f} | {whole - math_only:.1f} |")


if __name__ == "__main__":
    main()

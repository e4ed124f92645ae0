"""Where an eager sampling loop's time goes: fastguide's ``sample`` against the same CFG +
DDIM loop written the diffusers way (bench_sample.py's end-to-end loops, compact UNet),
each run once under torch.profiler.

    python -m benchmarks.sampling.loop_profile [--pairs N] [--steps N] [--top N] [--out DIR]

On the H200 (2026-12-04) fastguide's eager loop took 950 ms against the diffusers-style
loop's 613 ms on the same model, while its captured graphs ran in 83 ms: both eager loops
are host-bound, and this says per step how many kernels each launches, how often the host
waits for the device, and which operators hold the host's time. Runs on the GPU when one
is visible, else on the CPU (small defaults there; no launches to count).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.sampling.bench_sample import end_to_end_loops
from benchmarks.timing import DEVICE

# The host-side calls the CUDA activity records for a kernel launch (runtime and driver
# API: PyTorch's own kernels, Triton's) and for a wait on the device.
# (a replayed CUDA graph is one launch: cudaGraphLaunch)
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_run(fn, rounds: int) -> float:
    """The median over ``rounds`` runs of fn, each until its samples exist."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profiled(fn, steps: int, top: int) -> tuple[dict, str]:
    """One run of fn under the profiler: per-step counts of launches and waits, and the
    operators with the most self CPU time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize()
    events = prof.key_averages()
    launches = sum(event.count for event in events if event.key in LAUNCHES)
    waits = {event.key: event.count for event in events if event.key in WAITS}
    counts = {"launches per step": launches / steps, "waits per step": sum(waits.values()) / steps, "waits": waits}
    return counts, events.table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv: list[str] | None = None) -> str:
    on_gpu = DEVICE.type == "cuda"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64 if on_gpu else 2, help="samples (CFG doubles the rows)")
    parser.add_argument("--steps", type=int, default=25 if on_gpu else 4)
    parser.add_argument("--rounds", type=int, default=5 if on_gpu else 1, help="timed runs per loop (median)")
    parser.add_argument("--top", type=int, default=15, help="operators listed per loop")
    parser.add_argument("--out", type=Path, help="also write loop_profile.md there")
    args = parser.parse_args(argv)

    loops = end_to_end_loops(DEVICE, args.pairs, args.steps)
    summary = [
        f"Eager sampling loops on {torch.cuda.get_device_name() if on_gpu else 'CPU'}: compact UNet, "
        f"{args.pairs} pairs, {args.steps} CFG + DDIM steps; median of {args.rounds} runs.",
        "",
        "| loop | ms per step | kernel launches per step | host waits per step |",
        "|---|---|---|---|",
    ]
    report = "\n".join(summary)
    print(report)
    tables: list[str] = []
    for name, fn in loops.items():
        fn()  # warm-up: autotuning, the graphs' capture
        synchronize()
        per_step_ms = seconds_per_run(fn, args.rounds) / args.steps * 1e3
        counts, table = profiled(fn, args.steps, args.top)
        row = (
            f"| {name} | {per_step_ms:.2f} | {counts['launches per step']:.1f} | "
            f"{counts['waits per step']:.1f} {counts['waits'] or ''} |"
        )
        print(row)
        summary.append(row)
        tables += [f"### {name}", "", "```", table, "```", ""]
        # Written after every loop: a run that gpu.sh stops on its time limit keeps the
        # loops it finished.
        report = "\n".join(summary + [""] + tables)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "loop_profile.md").write_text(report)
    print("\n" + "\n".join(tables))
    return report


if __name__ == "__main__":
    main()

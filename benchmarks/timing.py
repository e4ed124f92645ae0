"""How the benchmarks time a case: three numbers per case on a GPU, one on CPU.

- ``call_seconds``: the median time of one call as a user makes it, host work included
  (GPU: CUDA events around each call, which starts with the device idle after an L2
  flush; CPU: the median of a few wall-clock calls).
- ``back_to_back_seconds`` (GPU): calls issued back to back with no flush and no sync
  between them, total time / calls. Where the host is slower than the kernels this is the
  host's time per call; where it is faster, the kernels' steady rate with warm caches.
- ``device_seconds`` (GPU): the device work alone: the case captured once in a CUDA
  graph, each replay timed with CUDA events after an L2 flush, the median.

Side by side they tell host cost from kernel time: a call time far above the device time
is host-bound. Every case runs the way the sampler calls it (``torch.no_grad()``) unless
it measures a backward (``grad=True`` in the recorder).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Bigger than any GPU's L2 (H100/H200: 50 MB), zeroed before each timed replay.
L2_FLUSH_BYTES = 256 << 20


def call_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds of one call of fn on the current device, host work included."""
    if DEVICE.type == "cuda":
        return _cuda_call_seconds(fn)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def _cuda_call_seconds(fn: Callable[[], object], budget: float = 0.1) -> float:
    """One call between CUDA events, each started with the device idle: an L2 flush, then a
    sync, so the host work before and between fn's launches is in the time. (triton's
    do_bench records its start event right behind its flush, with no sync: the host's work
    for the call overlapped the flush, up to its ~60-85 µs on an H200/H100, unseen.) Repeated
    for about ``budget`` seconds of calls (10 to 1000 times) after three warm-up calls; the
    median."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> float:
        flush.zero_()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3

    first = sorted(once() for _ in range(3))[1]
    repeats = min(1000, max(10, int(budget / max(first, 1e-6))))
    samples = sorted(once() for _ in range(repeats))
    return samples[repeats // 2]


def back_to_back_seconds(fn: Callable[[], object], calls: int = 20, batches: int = 5) -> float:
    """Seconds per call of ``calls`` calls issued back to back (no flush, no sync between
    them), after a warm-up: the throughput a loop of such calls gets. The median of
    ``batches`` such runs (a host hiccup in one moves a mean)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) * 1e-3 / calls)
    return sorted(per_call)[batches // 2]


@functools.cache
def capture_stream() -> torch.cuda.Stream:
    """The side stream ``device_seconds`` warms up and captures on (capture needs a stream
    other than the default one)."""
    return torch.cuda.Stream()


@contextlib.contextmanager
def forward_for_capture() -> Iterator[None]:
    """Around the forward of a case that times its backward: the forward runs on
    ``capture_stream()``. Autograd runs each backward op on its forward op's stream, so a
    forward left on the default stream puts the backward's kernels outside the capture:
    the capture fails and the case has no device time. No-op on the CPU."""
    if DEVICE.type != "cuda":
        yield
        return
    stream, caller = capture_stream(), torch.cuda.current_stream()
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        yield
    caller.wait_stream(stream)


def device_seconds(fn: Callable[[], object], repeats: int = 50, why_not: list[str] | None = None) -> float | None:
    """Median seconds of fn's device work without its host work: fn captured once in a
    CUDA graph, each replay timed with CUDA events after an L2 flush (as do_bench does).
    None when fn cannot be captured or replayed (a host sync inside it, no memory left),
    the reason then appended to ``why_not``. Warm-up and capture run on ``capture_stream()``."""
    stream, side = torch.cuda.current_stream(), capture_stream()
    try:
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            fn()
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            flush.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        milliseconds = sorted(start.elapsed_time(end) for start, end in events)
    except Exception as error:  # whatever stops a capture or a replay only loses this column
        # a capture that fails inside torch.cuda.graph's exit leaves its side stream current
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
        if why_not is not None:
            why_not.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300])
        return None
    return milliseconds[repeats // 2] * 1e-3

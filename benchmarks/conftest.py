"""Shared benchmark machinery: the device, its measured copy bandwidth and matrix rate, and
a recorder that puts time, GB/s or TFLOP/s, % of the floor and peak memory into
pytest-benchmark's extra_info.

Run:  python -m pytest benchmarks --benchmark-enable [--benchmark-json out.json]
GPU cases (marker ``gpu``) skip without CUDA. On a GPU each case is also timed with
triton.testing.do_bench (CUDA events, L2 flushed), which is what the % columns use: the
time of a call, host work included. Beside it, the device time alone: the case captured
in a CUDA graph and its replays timed the same way (the H200 run found the small cases
bound by the host, which only the two side by side tell apart).
"""

from __future__ import annotations

import resource
import time

import pytest
import torch

import fastguide
from fastguide.ops import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fastguide's rows on a GPU: one per backend with kernels for the op ("fastguide" = auto).
GPU_FASTGUIDE_IMPLS = ["fastguide-triton", "fastguide-cuda"]


def on_backend(impl: str, fn):
    """fn run on the backend named by impl ("fastguide-cuda" -> cuda, "fastguide" -> auto);
    skips the case when that backend cannot run here (e.g. no CUDA toolkit to build csrc/)."""
    name = impl.split("-", 1)[1] if "-" in impl else "auto"
    reason = None if name == "auto" else backends.why_not(name, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {name}: {reason}")

    def pinned(*args, **kwargs):
        with fastguide.backend(name):
            return fn(*args, **kwargs)

    return pinned

def _time_once(fn, repeats: int = 5) -> float:
    """Median seconds of fn on the current device."""
    if DEVICE.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e-3
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def _device_seconds(fn, repeats: int = 50) -> float | None:
    """Median seconds of fn's device work without its host work: fn captured once in a
    CUDA graph, each replay timed with CUDA events after an L2 flush (as do_bench does).
    None when fn cannot be captured or replayed (a host sync inside it, no memory left)."""
    stream = torch.cuda.current_stream()
    try:
        warmup = torch.cuda.Stream()  # capture wants fn warmed up on a side stream first
        warmup.wait_stream(stream)
        with torch.cuda.stream(warmup):
            for _ in range(3):
                fn()
        stream.wait_stream(warmup)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            flush.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        milliseconds = sorted(start.elapsed_time(end) for start, end in events)
    except Exception:  # whatever stops a capture or a replay only loses this column
        # a capture that fails inside torch.cuda.graph's exit leaves its side stream current
        torch.cuda.set_stream(stream)
        torch.cuda.synchronize()
        return None
    return milliseconds[repeats // 2] * 1e-3


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a large buffer)."""
    n = 1 << 28  # 256 MiB: past every cache, on CPU too
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    seconds = _time_once(lambda: dst.copy_(src), repeats=9)
    return 2 * n / seconds


@pytest.fixture(scope="session")
def matmul_rate() -> float:
    """Measured dense matmul rate in FLOP/s (fp16 8192³ on GPU, fp32 1024³ on CPU)."""
    n, dtype = (8192, torch.float16) if DEVICE.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    return 2 * n**3 / _time_once(lambda: a @ b, repeats=5)


def _peak_memory_bytes() -> int:
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS (Linux: KiB)


class Recorder:
    def __init__(self, benchmark, copy_bandwidth: float, matmul_rate: float):
        self.benchmark = benchmark
        self.copy_bandwidth = copy_bandwidth
        self.matmul_rate = matmul_rate

    def __call__(self, fn, *, bytes_moved: int | None = None, flops: int | None = None) -> None:
        """Time fn with pytest-benchmark (and do_bench on GPU); record rates, floors, memory."""
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else _peak_memory_bytes()
        if DEVICE.type == "cuda":
            self.benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            self.benchmark(fn)
        info = self.benchmark.extra_info
        # GPU: the case's peak above what it held before; CPU: growth of the process's peak RSS.
        info["peak_memory_MB"] = max(0, _peak_memory_bytes() - baseline) / 2**20
        seconds = _time_once(fn)
        info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
        info["median_ms"] = seconds * 1e3
        device_seconds = _device_seconds(fn) if DEVICE.type == "cuda" else None
        if device_seconds is not None:
            info["device_ms"] = device_seconds * 1e3
        if bytes_moved is not None:
            info["bytes_floor"] = bytes_moved
            info["GB/s"] = bytes_moved / seconds / 1e9
            info["copy_GB/s"] = self.copy_bandwidth / 1e9
            info["pct_of_copy_bandwidth"] = 100 * bytes_moved / seconds / self.copy_bandwidth
            if device_seconds is not None:
                info["device_pct_of_copy_bandwidth"] = 100 * bytes_moved / device_seconds / self.copy_bandwidth
        if flops is not None:
            info["TFLOP/s"] = flops / seconds / 1e12
            info["matmul_TFLOP/s"] = self.matmul_rate / 1e12
            info["pct_of_matmul_rate"] = 100 * flops / seconds / self.matmul_rate
            if device_seconds is not None:
                info["device_pct_of_matmul_rate"] = 100 * flops / device_seconds / self.matmul_rate


@pytest.fixture
def record(benchmark, copy_bandwidth, matmul_rate) -> Recorder:
    return Recorder(benchmark, copy_bandwidth, matmul_rate)

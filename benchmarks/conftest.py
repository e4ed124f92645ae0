"""Shared benchmark machinery: the device, its measured copy bandwidth, and a recorder that
puts time, GB/s and % of the floor into pytest-benchmark's extra_info.

Run:  python -m pytest benchmarks --benchmark-enable [--benchmark-json out.json]
GPU cases (marker ``gpu``) skip without CUDA. On a GPU each case is also timed with
triton.testing.do_bench (CUDA events, L2 flushed), which is what the % columns use.
"""

from __future__ import annotations

import time

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


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


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a large buffer)."""
    n = (1 << 28) if DEVICE.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    seconds = _time_once(lambda: dst.copy_(src), repeats=9)
    return 2 * n / seconds


class Recorder:
    def __init__(self, benchmark, copy_bandwidth: float):
        self.benchmark = benchmark
        self.copy_bandwidth = copy_bandwidth

    def __call__(self, fn, *, bytes_moved: int | None = None, flops: int | None = None) -> None:
        """Time fn with pytest-benchmark (and do_bench on GPU); record the rates and floors."""
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            self.benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            self.benchmark(fn)
        seconds = _time_once(fn)
        info = self.benchmark.extra_info
        info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
        info["median_ms"] = seconds * 1e3
        if bytes_moved is not None:
            info["bytes_floor"] = bytes_moved
            info["GB/s"] = bytes_moved / seconds / 1e9
            info["copy_GB/s"] = self.copy_bandwidth / 1e9
            info["pct_of_copy_bandwidth"] = 100 * bytes_moved / seconds / self.copy_bandwidth
        if flops is not None:
            info["TFLOP/s"] = flops / seconds / 1e12


@pytest.fixture
def record(benchmark, copy_bandwidth) -> Recorder:
    return Recorder(benchmark, copy_bandwidth)

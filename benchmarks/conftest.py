"""Shared benchmark machinery: the device, its measured copy bandwidth and matrix rate, and
a recorder that puts time, GB/s or TFLOP/s, % of the floor and peak memory into
pytest-benchmark's extra_info.

Run:  python -m pytest benchmarks --benchmark-enable [--benchmark-json out.json]
GPU cases (marker ``gpu``) skip without CUDA. How a case is timed (the median call time,
back-to-back calls, device time alone) is benchmarks/timing.py's; every case runs under
``torch.no_grad()``, as the sampler calls the ops, unless it times a backward.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource

import pytest
import torch

import fastguide
from benchmarks.timing import DEVICE, back_to_back_seconds, call_seconds, device_seconds
from fastguide.apps.bench import PARTIAL_RESULTS
from fastguide.ops import backends

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


def row_function(impl: str, fastguide_fn, peer, eager_fn):
    """The function a benchmark row times: ``fastguide_fn`` on the backend ``impl`` names
    (``on_backend``), ``peer()`` for "peer" (built only there: it may import or skip),
    ``eager_fn`` for "eager", else its torch.compile (``compiled``)."""
    if impl.startswith("fastguide"):
        return on_backend(impl, fastguide_fn)
    if impl == "peer":
        return peer()
    return eager_fn if impl == "eager" else compiled(eager_fn)


def compiled(fn, **options):
    """torch.compile of ``fn`` for one case, as a user compiling for one shape gets it:
    dynamo's caches emptied first, static shapes. (A compiled function shared by a module's
    cases compiles again for each shape and grad mode, compiles its second shape for dynamic
    shapes, and past dynamo's recompile limit runs eager with only a log line.)"""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, **options)


def no_recompiles():
    """Around a timing: a torch.compile'd function that would compile again raises instead
    of being timed compiling, or falling back to eager (torch >= 2.6; earlier, nothing)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("fail_on_recompile") if set_stance is not None else contextlib.nullcontext()


def pytest_configure(config):
    if os.environ.get("FASTGUIDE_AUTOTUNE") == "off":
        raise pytest.UsageError(
            "FASTGUIDE_AUTOTUNE=off narrows the attention kernel's autotuning to one config, "
            "which benchmarks must not time: unset it"
        )


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a large buffer)."""
    n = 1 << 28  # 256 MiB: past every cache, on CPU too
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / _rate_seconds(lambda: dst.copy_(src), repeats=9)


@pytest.fixture(scope="session")
def matmul_rate() -> float:
    """Measured dense matmul rate in FLOP/s (fp16 8192³ on GPU, fp32 1024³ on CPU)."""
    n, dtype = (8192, torch.float16) if DEVICE.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    return 2 * n**3 / _rate_seconds(lambda: a @ b, repeats=5)


def _rate_seconds(fn, repeats: int) -> float:
    """Seconds of fn for a device rate: on a GPU its device time alone (the one launch's host
    work is no part of the device's rate, and the % columns divide by device times too),
    its call time where it cannot be captured; on the CPU, the wall clock."""
    seconds = device_seconds(fn) if DEVICE.type == "cuda" else None
    return seconds if seconds is not None else call_seconds(fn, repeats=repeats)


def _peak_memory_bytes() -> int:
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS (Linux: KiB)


def check_agrees(got, want) -> None:
    """A row's result (a tensor or a tuple of them) against eager PyTorch's on the same
    inputs, before the row is timed: a row that skipped work would time something else.
    Each tensor within 1e-3 (float32) or 3e-2 (16-bit) of its largest magnitude: the kernels
    and torch.compile sum in other orders, and 16-bit results round at ~4e-3."""
    got, want = (t if isinstance(t, (tuple, list)) else (t,) for t in (got, want))
    if len(got) != len(want) or not all(isinstance(t, torch.Tensor) for t in (*got, *want)):
        pytest.fail(f"the row returned {len(got)} results, eager {len(want)}, each a tensor expected")
    for index, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            pytest.fail(f"result {index}: shape {tuple(a.shape)}, eager's {tuple(b.shape)}")
        wide = all(t.dtype in (torch.float32, torch.float64) for t in (a, b))  # else either rounds at 16 bits
        tolerance = 1e-3 if wide else 3e-2
        scale = max(1.0, b.detach().abs().max().item())
        error = (a.detach().double() - b.detach().double()).abs().max().item()
        if not error <= tolerance * scale:  # (NaN fails too)
            pytest.fail(f"result {index} differs from eager PyTorch's by {error:.3g} (allowed {tolerance * scale:.3g})")


def seeded_weights(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` with its zero-initialised weight matrices drawn from N(0, 0.02²) (the
    global generator, seeded by the caller). DiT's adaLN modulation and final layer and
    ADM's output convolutions start at zero, so a freshly built model outputs zero (or its
    blocks are the identity), and every row would agree whatever its forward computed."""
    with torch.no_grad():
        for weight in network.parameters():
            if weight.dim() > 1 and not weight.any():
                weight.normal_(0.0, 0.02)
    return network


def difference_from_peer(samples: torch.Tensor, peer: torch.Tensor) -> float:
    """max|samples − peer| / max|peer|: each row's samples beside the peer row's on the same
    weights and noise, recorded (not asserted: 25 steps in float16 amplify rounding) so a
    row that skipped work, or returned a stale buffer, shows in its results (extra_info)."""
    return ((samples.double() - peer.double()).abs().max() / peer.double().abs().max()).item()


class Recorder:
    def __init__(self, benchmark, copy_bandwidth: float, matmul_rate: float):
        self.benchmark = benchmark
        self.copy_bandwidth = copy_bandwidth
        self.matmul_rate = matmul_rate

    def __call__(
        self,
        fn,
        *,
        bytes_moved: int | None = None,
        flops: int | None = None,
        grad: bool = False,
        expected=None,
    ) -> None:
        """Time fn with pytest-benchmark (and, on GPU, its device time alone and back-to-back
        calls); record rates, floors, memory. fn runs under no_grad unless ``grad``: a case
        timing a backward. One call first, in the same grad mode, warms up (compiles,
        autotunes) and, given ``expected`` (eager PyTorch's result on the same inputs, a
        function), must agree with it (``check_agrees``); a compiled fn that would compile
        again while timed fails the case."""
        with torch.set_grad_enabled(grad):
            result = fn()
            if expected is not None:
                check_agrees(result, expected())
            with no_recompiles():
                self._measure(fn, bytes_moved, flops)

    def _measure(self, fn, bytes_moved: int | None, flops: int | None) -> None:
        # Until the last measurement is in: a case that fails after pytest-benchmark's rounds
        # (out of memory in device_seconds, say) keeps those rounds' record, which the table
        # would show as the case's time (fastguide.apps.bench.group_results leaves it out).
        self.benchmark.extra_info["incomplete"] = True
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else _peak_memory_bytes()
        if DEVICE.type == "cuda":
            # a few rounds for pytest-benchmark's record and the peak memory: the row's
            # time is call_seconds' (its default of ~1 s a case cost minutes of a GPU run)
            self.benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, iterations=1, warmup_rounds=0)
        else:
            self.benchmark(fn)
        info = self.benchmark.extra_info
        # GPU: the case's peak above what it held before; CPU: growth of the process's peak RSS.
        info["peak_memory_MB"] = max(0, _peak_memory_bytes() - baseline) / 1e6
        # On the CPU, pytest-benchmark's median of its many rounds (a few calls of a noisy
        # host swapped the order of close rows); on a GPU, call_seconds' (timing.py).
        measured = self.benchmark.stats if DEVICE.type == "cpu" else None
        seconds = measured.stats.median if measured else call_seconds(fn)
        info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
        info["median_ms"] = seconds * 1e3
        why_not: list[str] = []
        device = device_seconds(fn, why_not=why_not) if DEVICE.type == "cuda" else None
        if why_not:  # (the table's device column is empty: the JSON says why)
            info["device_error"] = why_not[0]
        if DEVICE.type == "cuda":
            info["back_to_back_ms"] = back_to_back_seconds(fn) * 1e3
        if device is not None:
            info["device_ms"] = device * 1e3
        if bytes_moved is not None:
            info["bytes_floor"] = bytes_moved
            info["GB/s"] = bytes_moved / seconds / 1e9
            info["copy_GB/s"] = self.copy_bandwidth / 1e9
            info["pct_of_copy_bandwidth"] = 100 * bytes_moved / seconds / self.copy_bandwidth
            if device is not None:
                info["device_pct_of_copy_bandwidth"] = 100 * bytes_moved / device / self.copy_bandwidth
        if flops is not None:
            info["TFLOP/s"] = flops / seconds / 1e12
            info["matmul_TFLOP/s"] = self.matmul_rate / 1e12
            info["pct_of_matmul_rate"] = 100 * flops / seconds / self.matmul_rate
            if device is not None:
                info["device_pct_of_matmul_rate"] = 100 * flops / device / self.matmul_rate
        del info["incomplete"]


@pytest.fixture(autouse=True)
def _append_finished_case(request):
    """Each timed case appended, as it finishes, to the JSON-lines file that ``fastguide
    bench`` names in FASTGUIDE_BENCH_PARTIAL: pytest-benchmark writes its JSON only when the
    session ends, which a run stopped by a time limit never reaches."""
    yield
    path = os.environ.get(PARTIAL_RESULTS)
    stats = getattr(request.node.funcargs.get("benchmark"), "stats", None)
    if path and stats is not None:
        with open(path, "a") as partial:
            partial.write(json.dumps(stats.as_dict(include_data=False), default=str) + "\n")


@pytest.fixture
def record(benchmark, copy_bandwidth, matmul_rate) -> Recorder:
    return Recorder(benchmark, copy_bandwidth, matmul_rate)

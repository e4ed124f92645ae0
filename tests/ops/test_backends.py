"""The backend switch: set_backend, the context manager, FASTGUIDE_BACKEND, availability."""

import contextlib
import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest
import torch

import fastguide
from fastguide import ops
from fastguide.ops import _attention, _group_norm, _layer_norm, backends, extension


@pytest.fixture(autouse=True)
def cuda_device_of_sm90_where_none(monkeypatch):
    """Resolving for CUDA tensors on a machine without CUDA: device 0 reads as sm_90 (the
    cuda backend asks for the compute capability)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(backends, "_SM80_REASONS", {None: None, 0: None})


def test_the_cuda_backend_needs_sm80_and_auto_passes_it_over_on_older_gpus(monkeypatch):
    from types import SimpleNamespace

    _kernels_present(monkeypatch, triton=True, cuda=True)
    monkeypatch.setattr(extension, "prebuilt_path", lambda: "/site-packages/fastguide/_C.so")
    monkeypatch.setattr(extension, "prebuilt_loads", lambda: True)  # (a fake path: nothing to load)
    for capability, picked in (((7, 5), "triton"), ((8, 0), "cuda"), ((9, 0), "cuda")):
        monkeypatch.setattr(backends, "_SM80_REASONS", {})
        properties = SimpleNamespace(major=capability[0], minor=capability[1])
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: properties)
        with fastguide.backend("auto"):
            assert backends.resolve("guided_step", torch.device("cuda", 0), torch.float16) == picked
        assert backends._SM80_REASONS.keys() == {0}  # asked once per device
        cuda = backends.IMPLEMENTATIONS["cuda"]  # its own why_not (the helper above stubs the instance's)
        reason = type(cuda).why_not(cuda, torch.device("cuda", 0))
        assert (reason is not None and "compute capability 8.0 or newer, this GPU has 7.5" in reason) == (
            picked == "triton"
        )


def test_default_is_auto_and_cpu_resolves_to_torch(monkeypatch):
    monkeypatch.delenv("FASTGUIDE_BACKEND", raising=False)
    assert fastguide.get_backend() == "auto"
    assert backends.resolve("attention", torch.device("cpu"), torch.float32) == "torch"


def test_set_backend_and_context_manager_nest():
    fastguide.set_backend("torch")
    assert fastguide.get_backend() == "torch"
    with fastguide.backend("triton"):
        assert fastguide.get_backend() == "triton"
        with fastguide.backend("auto"):
            assert fastguide.get_backend() == "auto"
        assert fastguide.get_backend() == "triton"
    assert fastguide.get_backend() == "torch"


def test_backend_blocks_that_interleave_each_remove_their_own(monkeypatch):
    # Two generators on one thread, each in its own block: the first to leave takes its
    # entry away, not the other's.
    monkeypatch.delenv("FASTGUIDE_BACKEND", raising=False)

    def inside(name):
        with fastguide.backend(name):
            yield
            yield fastguide.get_backend()

    a, b = inside("torch"), inside("triton")
    next(a), next(b)
    assert next(a) == "triton"  # (the innermost block entered is the one in force)
    next(a, None)  # a leaves its block
    assert next(b) == "triton"
    next(b, None)
    assert fastguide.get_backend() == "auto"


def test_environment_variable_chooses_backend(monkeypatch):
    monkeypatch.setenv("FASTGUIDE_BACKEND", "torch")
    assert fastguide.get_backend() == "torch"
    monkeypatch.setenv("FASTGUIDE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTGUIDE_BACKEND"):
        fastguide.get_backend()


@pytest.mark.parametrize("bad", ["gpu", "", None, 3])
def test_unknown_backend_names_raise(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        fastguide.set_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastguide.backend(bad):
            pass


def test_available_backends_reports_reasons():
    report = fastguide.available_backends()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"] is None
    if not torch.cuda.is_available():
        assert "CUDA" in report["cuda"]


def test_requested_backend_that_cannot_run_raises_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", True)  # a Triton the kernels take
    monkeypatch.setattr(backends, "_TRITON_RELEASE", backends.OLDEST_TRITON)
    x = torch.randn(1, 3, 4, 4)
    with (
        fastguide.backend("triton"),
        pytest.raises(RuntimeError, match="backend 'triton'.*cannot run group_norm.*TRITON_INTERPRET"),
    ):
        ops.group_norm(x, 1)
    with fastguide.backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda'.*CUDA tensors"):
        ops.group_norm(x, 1)


def _kernels_present(monkeypatch, triton: bool, cuda: bool, op: str = "guided_step") -> None:
    """Make the triton and cuda backends have, or lack, their kernel for ``op``, and run anywhere."""
    for name, present in (("triton", triton), ("cuda", cuda)):
        implementation = backends.IMPLEMENTATIONS[name]
        monkeypatch.setitem(implementation._present, op, present)
        monkeypatch.setattr(implementation, "why_not", lambda device: None)


def test_auto_never_raises_and_falls_back(monkeypatch):
    with fastguide.backend("auto"):
        assert backends.resolve("guided_step", torch.device("cpu"), torch.float32) == "torch"
        _kernels_present(monkeypatch, triton=False, cuda=False)
        assert backends.resolve("guided_step", torch.device("cuda"), torch.float32) == "torch"


def test_explicit_backend_without_kernel_for_op_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(backends.IMPLEMENTATIONS["triton"]._present, "guided_step", False)
    with fastguide.backend("triton"), pytest.raises(RuntimeError, match="triton backend has no kernel for guided_step"):
        backends.resolve("guided_step", torch.device("cpu"), torch.float32)


def test_not_supported_reasons_give_every_reason():
    cuda = backends.IMPLEMENTATIONS["cuda"]
    reasons = cuda.not_supported_reasons("attention", torch.device("cpu"), torch.float64)
    assert len(reasons) == 2 and "no kernel for attention" in reasons[0] and "CUDA tensors" in reasons[1]
    reasons = cuda.not_supported_reasons("group_norm", torch.device("cpu"), torch.float64)
    assert "on torch.float64 tensors" in reasons[0] and "CUDA tensors" in reasons[1]
    assert (
        backends.IMPLEMENTATIONS["torch"].not_supported_reasons("group_norm", torch.device("cpu"), torch.float64) == []
    )


def test_import_touches_neither_cuda_nor_triton():
    code = (
        "import sys, torch\n"
        "import fastguide\n"
        "assert 'triton' not in sys.modules, 'import fastguide imported triton'\n"
        "assert not torch.cuda.is_initialized(), 'import fastguide initialised CUDA'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float64_never_routes_to_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    with fastguide.backend("triton"), pytest.raises(RuntimeError, match="no kernel for group_norm on torch.float64"):
        ops.group_norm(x, 2)
    with fastguide.backend("auto"):
        assert backends.resolve("group_norm", torch.device("cuda"), torch.float64) == "torch"
    with fastguide.backend("cuda"):  # the cuda backend's ops and dtypes only; the rest as under auto
        assert backends.resolve("group_norm", torch.device("cuda"), torch.float64) == "torch"
        assert backends.resolve("guided_step", torch.device("cpu"), torch.float64) == "torch"
        assert ops.group_norm(x, 2).dtype == torch.float64


def test_missing_kernel_package_means_no_kernel():
    # A module under a package that is not importable counts as absent, not as an error.
    assert backends._module_exists("fastguide_no_such_package.kernels.attention") is False
    assert backends._module_exists("fastguide.kernels.guided_step") is True


def test_cuda_backend_covers_step_and_norm_and_leaves_attention_to_auto(monkeypatch):
    for name in ("triton", "cuda"):
        monkeypatch.setattr(backends.IMPLEMENTATIONS[name], "why_not", lambda device: None)
    cuda = backends.IMPLEMENTATIONS["cuda"]
    assert cuda.has_kernel("guided_step") and cuda.has_kernel("group_norm") and cuda.has_kernel("layer_norm")
    assert not cuda.has_kernel("attention")
    with fastguide.backend("cuda"):
        assert backends.resolve("group_norm", torch.device("cuda"), torch.float16) == "cuda"
        assert backends.resolve("guided_step", torch.device("cuda"), torch.float32) == "cuda"
        assert backends.resolve("attention", torch.device("cuda"), torch.float16) == "triton"


def test_auto_uses_cuda_only_when_prebuilt(monkeypatch):
    # auto never starts a just-in-time build; a prebuilt fastguide._C it does use.
    _kernels_present(monkeypatch, triton=False, cuda=True)
    monkeypatch.setattr(extension, "prebuilt_path", lambda: None)
    with fastguide.backend("auto"):
        assert backends.resolve("guided_step", torch.device("cuda"), torch.float16) == "torch"
    monkeypatch.setattr(extension, "prebuilt_path", lambda: "/site-packages/fastguide/_C.so")
    monkeypatch.setattr(extension, "prebuilt_loads", lambda: True)  # (a fake path: nothing to load)
    with fastguide.backend("auto"):
        assert backends.resolve("guided_step", torch.device("cuda"), torch.float16) == "cuda"


def test_auto_on_cuda_prefers_the_extension_in_eager_and_triton_for_graphs(monkeypatch):
    # Eager, a cuda-extension call has the shorter host path; in a captured graph Triton's
    # kernels have the shorter device time (the H200 run of 2026-12-04, BENCHMARKS.md).
    monkeypatch.setattr(extension, "prebuilt_path", lambda: "/site-packages/fastguide/_C.so")
    monkeypatch.setattr(extension, "prebuilt_loads", lambda: True)  # (a fake path: nothing to load)
    cuda = torch.device("cuda")

    def resolve(triton: bool = True, cuda_kernel: bool = True) -> str:
        _kernels_present(monkeypatch, triton, cuda_kernel)
        return backends.resolve("guided_step", cuda, torch.float16)

    with fastguide.backend("auto"):
        assert resolve() == "cuda"
        assert resolve(cuda_kernel=False) == "triton"
        with backends.graph_capture():
            assert resolve() == "triton"
            assert resolve(triton=False) == "cuda"
            with backends.graph_capture():
                assert resolve() == "triton"
            assert resolve() == "triton"
        assert resolve() == "cuda"
        assert backends.resolve("guided_step", torch.device("cpu"), torch.float16) == "torch"
    with fastguide.backend("cuda"), backends.graph_capture():  # an explicit choice stands
        assert resolve() == "cuda"
    monkeypatch.setattr(extension, "prebuilt_path", lambda: None)  # never a just-in-time build
    with fastguide.backend("auto"):
        assert resolve() == "triton"


def test_a_triton_older_than_the_kernels_need_is_declined_with_its_version(monkeypatch):
    # torch 2.5 pins Triton 3.1, whose frontend rejects the kernels: auto falls back to the
    # torch backend and an explicit choice says which Triton is there and which is needed.
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", True)
    monkeypatch.setattr(extension, "prebuilt_path", lambda: None)
    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "_TRITON_RELEASE", (3, 1))
    assert backends.why_not("triton", cuda) == (
        "triton 3.1 is installed; the kernels need triton 3.2 or newer (pip install 'triton>=3.2')"
    )
    with fastguide.backend("auto"):
        assert backends.resolve("guided_step", cuda, torch.float16) == "torch"
    with fastguide.backend("triton"), pytest.raises(RuntimeError, match=r"triton 3\.1 is installed; the kernels need"):
        backends.resolve("guided_step", cuda, torch.float16)
    for release in ((3, 2), (4, 0), None):  # None: a build that names no release
        monkeypatch.setattr(backends, "_TRITON_RELEASE", release)
        assert backends.why_not("triton", cuda) is None
        with fastguide.backend("auto"):
            assert backends.resolve("guided_step", cuda, torch.float16) == "triton"


def test_attention_on_the_interpreter_needs_triton_3_4(monkeypatch):
    # Triton's autotuner before 3.4 asks the GPU driver for its benchmarker when an autotuned
    # kernel is defined: attention's module cannot import on a CPU-only machine there.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    triton = backends.IMPLEMENTATIONS["triton"]
    monkeypatch.setattr(backends, "_TRITON_RELEASE", (3, 3))
    assert triton.not_supported_reasons("attention", cpu, torch.float32) == [
        "triton 3.3's autotuner needs a GPU: attention runs on the interpreter (CPU tensors) from triton 3.4 on"
    ]
    assert triton.not_supported_reasons("attention", cuda, torch.float32) == []
    assert triton.not_supported_reasons("group_norm", cpu, torch.float32) == []
    for release in ((3, 4), None):
        monkeypatch.setattr(backends, "_TRITON_RELEASE", release)
        assert triton.not_supported_reasons("attention", cpu, torch.float32) == []


@pytest.mark.parametrize(
    "version, release", [("3.1.0", (3, 1)), ("3.6.0+git9f2a", (3, 6)), ("10.12", (10, 12)), ("nightly", None)]
)
def test_triton_release_read_from_its_metadata(monkeypatch, version, release):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert backends._triton_release() == release


def test_triton_release_is_unknown_without_a_triton_distribution(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert backends._triton_release() is None


def test_resolution_traces_under_fullgraph_compile_without_import_lookups(monkeypatch):
    # resolve() runs while torch.compile traces an op call; torch 2.11's dynamo refuses to
    # trace importlib.util.find_spec (seen on an H200: every fullgraph compile failed under
    # auto). The lookups happen at import, so resolving calls none.
    def no_lookup(*args, **kwargs):
        raise AssertionError("find_spec called while resolving a backend")

    import torch._dynamo  # noqa: F401  (before the patch: torch 2.5 imports it lazily, and it calls find_spec)

    monkeypatch.setattr(importlib.util, "find_spec", no_lookup)
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", True)
    monkeypatch.setattr(backends, "_TRITON_RELEASE", backends.OLDEST_TRITON)
    monkeypatch.setattr(extension, "prebuilt_path", lambda: None)  # as on a machine without the build
    cuda = torch.device("cuda")

    def resolved_length(x):
        return x + len(backends.resolve("guided_step", cuda, torch.float32))

    x = torch.randn(3)
    with fastguide.backend("auto"):
        assert backends.resolve("guided_step", cuda, torch.float32) == "triton"
        compiled = torch.compile(resolved_length, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), x + len("triton"))


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU build of torch")
def test_cuda_extension_on_cpu_torch_says_why(monkeypatch, request):
    monkeypatch.setattr(extension, "prebuilt_path", lambda: None)
    monkeypatch.setattr(extension, "_loaded", False)
    extension._why_not_at_start.cache_clear()
    request.addfinalizer(extension._why_not_at_start.cache_clear)
    assert "CPU build" in extension.why_not_available()
    assert "CPU build" in backends.why_not("cuda", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="cuda backend needs the extension fastguide._C: .*CPU build"):
        extension.load()


@pytest.fixture
def fresh_extension(monkeypatch):
    """extension's per-process state as before any load, restored after the test."""
    monkeypatch.setattr(extension, "_loaded", False)
    monkeypatch.setattr(extension, "_failure", None)
    extension._why_not_at_start.cache_clear()
    yield
    extension._why_not_at_start.cache_clear()


def test_a_prebuilt_extension_that_does_not_load_is_skipped_by_auto_and_named(fresh_extension, monkeypatch, tmp_path):
    # A fastguide._C built against another torch: auto picked the cuda backend on every
    # call, and every call failed in torch.ops.load_library with no word of fastguide._C
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(extension, "_PREBUILT_PATH", str(broken))
    monkeypatch.setitem(backends._SM80_REASONS, 0, None)
    cuda_backend = backends.IMPLEMENTATIONS["cuda"]
    with pytest.warns(RuntimeWarning, match=r"fastguide._C \(.*_C\.so\) does not load: .*the auto backend runs"):
        assert not cuda_backend.runs_under_auto("guided_step", torch.device("cuda", 0), torch.float32)
    assert not cuda_backend.runs_under_auto("guided_step", torch.device("cuda", 0), torch.float32)  # not again
    assert "does not load" in extension.why_not_available()
    with pytest.raises(RuntimeError, match="rebuild it against this torch"):
        extension.load()


def test_a_failed_build_is_not_retried_and_names_the_extension(fresh_extension, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(extension, "_PREBUILT_PATH", None)
    monkeypatch.setattr(extension, "why_not_buildable", lambda: None)
    monkeypatch.setattr(extension, "_build_directory", lambda name: None)
    builds = []

    def failing_build(**options):
        builds.append(options["name"])
        raise RuntimeError("Error building extension 'fastguide_cuda_x': nvcc fatal")

    monkeypatch.setattr(cpp_extension, "load", failing_build)
    for _ in range(3):
        with pytest.raises(RuntimeError, match=r"fastguide._C failed to build just in time: Error building"):
            extension.load()
    assert len(builds) == 1
    assert "failed to build" in backends.why_not("cuda", torch.device("cuda"))


def test_a_build_stopped_midway_does_not_hang_the_next(fresh_extension, monkeypatch, tmp_path):
    # torch's build lock is a file, which a builder killed midway leaves behind: every
    # later build waited on it forever
    from torch.utils import cpp_extension

    pytest.importorskip("fcntl")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(extension, "_PREBUILT_PATH", None)
    monkeypatch.setattr(extension, "why_not_buildable", lambda: None)
    name = extension.build_name(extension.OPS_NAMESPACE, [extension.source_dir()])
    folder = tmp_path / name
    folder.mkdir()
    (folder / "lock").write_text("")  # the stopped build's
    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda **options: built.append((folder / "lock").exists()))
    with pytest.warns(RuntimeWarning, match="left by a build of the cuda extension that was stopped midway"):
        extension.load()
    assert built == [False]


def test_the_build_lock_waits_for_a_live_builder(tmp_path):
    # The flock is the kernel's: while another process holds it, a second builder waits,
    # and says so; it goes on once the holder lets go
    pytest.importorskip("fcntl")
    hold = (
        "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()"  # until the test closes its stdin
    )
    build = (
        "import sys; from pathlib import Path; from fastguide.ops import extension\n"
        "with extension._build_lock(Path(sys.argv[1])): print('built')"
    )
    with subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "fastguide.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout.readline().strip() == "held"
        with subprocess.Popen(
            [sys.executable, "-c", build, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as builder:
            assert "waiting for another process's build" in builder.stderr.readline()  # ('' had it not waited)
            holder.stdin.close()
            out, _ = builder.communicate(timeout=60)
    assert builder.returncode == 0 and out.strip() == "built"


def test_cuda_sources_ship_with_the_package():
    names = {p.name for p in extension.source_dir().iterdir()}
    assert set(extension.KERNEL_SOURCES + extension.BINDING_SOURCES) <= names
    assert {"common.cuh", "guided_step.cuh", "group_norm.cuh"} <= names


@pytest.mark.parametrize("op_name", ["attention", "group_norm", "layer_norm", "gated_residual_layer_norm"])
def test_ops_skip_the_custom_op_only_where_nothing_needs_it(op_name, monkeypatch):
    # Without tracing or the profiler a call goes straight to the backend (the custom
    # op's round trip costs host time and does nothing there), through the op's autograd
    # formula as a torch.autograd.Function where an input requires grad; with either it
    # goes through the registered op. All give the same numbers, and the same gradients.
    calls = []
    module = {"attention": _attention, "group_norm": _group_norm}.get(op_name, _layer_norm)
    registered = getattr(module, f"{op_name}_op")

    def counted(*args):
        calls.append(op_name)
        return registered(*args)

    monkeypatch.setattr(module, f"{op_name}_op", counted)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    x, branch = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    image, scale = torch.randn(2, 8, 3, 3, generator=g), torch.randn(2, 8, generator=g)
    run = {
        "attention": lambda: ops.attention(q, k, v),
        "group_norm": lambda: ops.group_norm(image, 4, scale=scale, activation="silu"),
        "layer_norm": lambda: ops.layer_norm(x, 8, scale=scale),
        "gated_residual_layer_norm": lambda: ops.gated_residual_layer_norm(x, branch, scale, 8)[1],
    }[op_name]

    with torch.no_grad():
        direct = run()
    assert calls == []
    through_op = run()  # grad mode on, but no input requires grad: still direct
    assert calls == []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        profiled = run()
    assert calls == [op_name]
    leaves = [t.requires_grad_() for t in ((q, k, v) if op_name == "attention" else (scale, x, branch, image))]
    with_grad = run()
    node = with_grad.grad_fn
    while type(node).__name__ == "ViewBackward0":  # the norms' reshape back to x's shape
        node = node.next_functions[0][0]
    name = "".join(word.title() for word in op_name.split("_")) + "Backward"  # group_norm: GroupNormBackward
    assert calls == [op_name] and type(node).__name__ == name
    for result in (through_op, profiled, with_grad):
        torch.testing.assert_close(result, direct, rtol=0, atol=0)
    # the op's own autograd (under the profiler) against the Function's, on one output grad
    dy = torch.randn(with_grad.shape, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with_op = run()
    assert calls == [op_name] * 2
    used = [t for t in leaves if t.requires_grad]
    eager_grads = torch.autograd.grad(with_grad, used, dy, allow_unused=True)
    op_grads = torch.autograd.grad(with_op, used, dy, allow_unused=True)
    assert sum(grad is not None for grad in op_grads) >= 1
    for eager_grad, op_grad in zip(eager_grads, op_grads):
        assert (eager_grad is None) == (op_grad is None)
        if op_grad is not None:
            torch.testing.assert_close(eager_grad, op_grad, rtol=0, atol=0)


def test_transforms_and_traces_go_through_the_custom_op():
    # vmap hands the op batched tensors and jit.trace records ops: a kernel called directly
    # would see neither (vmap failed outright, the trace lost the op).
    x = torch.randn(4, 3, 8)
    batched = torch.func.vmap(lambda t: ops.layer_norm(t, 8))(x)
    torch.testing.assert_close(batched, torch.nn.functional.layer_norm(x, (8,), eps=1e-6))
    images = torch.randn(3, 2, 8, 4, 4)
    batched = torch.func.vmap(lambda t: ops.group_norm(t, 4))(images)
    torch.testing.assert_close(batched, torch.stack([torch.nn.functional.group_norm(i, 4) for i in images]))
    with pytest.warns(torch.jit.TracerWarning):  # validation reads x's shape as constants
        traced = torch.jit.trace(lambda t: ops.layer_norm(t, 8), (x,))
    assert "fastguide::layer_norm" in str(traced.graph)


def test_tensor_subclasses_go_through_the_custom_op(monkeypatch):
    class Tagged(torch.Tensor):
        pass

    calls = []
    registered = _layer_norm.layer_norm_op
    monkeypatch.setattr(_layer_norm, "layer_norm_op", lambda *args: calls.append(1) or registered(*args))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        ops.layer_norm(x.as_subclass(Tagged), 8)
    assert calls == [1]


def test_guided_step_goes_through_its_op_under_the_profiler_only_when_profiled():
    # A sampler's no_grad step skips the op's packing round trip, but a profiled one shows
    # fastguide::guided_step, the same rule as the other ops (ops.dispatch.needs_op).
    g = torch.Generator().manual_seed(0)
    model_output, x = torch.randn(4, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    step = ops.StepCoefficients(alpha=0.8, sigma=0.6, k_x0=0.9, k_eps=0.4)

    def names(profile):
        return {event.name for event in profile.events()}

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.no_grad():
        with torch.profiler.profile(activities=activities) as profiled:
            traced = ops.guided_step(model_output, x, step, ops.GuidanceCombine(2.0))
        direct = ops.guided_step(model_output, x, step, ops.GuidanceCombine(2.0))
    assert "fastguide::guided_step" in names(profiled)
    torch.testing.assert_close(traced, direct, rtol=0, atol=0)


def test_the_reference_branches_on_no_device_data_off_the_cpu():
    # On a device, a branch on tensor data waits for the device (and a CUDA graph capture
    # refuses it): the reference's NaN policy masks unconditionally there. Meta tensors
    # have no data at all, so any read raises.
    from fastguide.ops import reference
    from fastguide.ops.contract import NormParameters

    x = torch.empty(2, 8, 3, 3, device="meta")
    y, mean, rstd = reference.group_norm_forward(x, NormParameters(None, None, None, None), 4, 1e-5, "silu")
    assert y.shape == x.shape and rstd.shape == (2, 4)
    tokens = torch.empty(2, 5, 8, device="meta")
    y, mean, rstd = reference.layer_norm_forward(tokens, NormParameters(None, None, None, None), 1e-6)
    assert y.shape == tokens.shape and rstd.shape == (2, 5)
    q = torch.empty(2, 3, 5, 8, device="meta")
    o, lse = reference.attention_forward(q, q, q, 0.3)
    assert o.shape == q.shape and lse.shape == (2, 3, 5)
    assert reference.attention(q, q, q).shape == q.shape


def test_triton_launches_with_its_tensors_device_current(monkeypatch):
    # Triton launches on the current CUDA device, whatever device its tensors are on; the
    # CUDA extension guards its own device and ATen ops follow their tensors.
    from fastguide.ops import dispatch

    made_current = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: made_current.append(device) or contextlib.nullcontext())
    with dispatch.launching_on("triton", torch.device("cuda", 1)):
        pass
    assert made_current == [torch.device("cuda", 1)]
    for backend, device in [
        ("triton", "cuda:0"),
        ("triton", "cuda"),
        ("triton", "cpu"),
        ("cuda", "cuda:1"),
        ("torch", "cuda:1"),
    ]:
        with dispatch.launching_on(backend, torch.device(device)):
            pass
    assert made_current == [torch.device("cuda", 1)]
    # every op's launch goes through it, with its tensors' device
    seen = []
    monkeypatch.setattr(
        dispatch, "launching_on", lambda backend, device: seen.append((backend, device)) or contextlib.nullcontext()
    )
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with fastguide.backend("torch"):
        ops.group_norm(x, 2).sum().backward()
    assert seen == [("torch", x.device)] * 2

"""Which implementation runs an op: the backend objects and the switch among them.

Each concrete backend is a ``Backend`` object (``IMPLEMENTATIONS``): the module with each
op's functions, the dtypes it computes in, why it cannot run on a device, and every reason
it declines a call (``not_supported_reasons``).

Backends:
  ``torch``   fastguide.ops.reference, plain PyTorch. Runs anywhere; the oracle.
  ``triton``  fastguide.kernels. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  ``cuda``    the compiled extension fastguide._C (csrc/), CUDA tensors only; built just
              in time on first use when not installed prebuilt. It covers guided_step,
              group_norm and layer_norm; other ops run under it as they would under
              ``auto``.
  ``auto``    (default) CUDA tensor -> a prebuilt cuda extension where it has the op
              (on a GPU of compute capability 8.0 or newer, what it is built for),
              else triton, else torch; inside ``graph_capture()`` (a sampling loop
              capturing CUDA graphs) triton first; CPU -> torch. ``auto`` never raises
              and never starts a build.

Why that order (the H200 run of 2026-12-04, BENCHMARKS.md): the Triton kernels had the
shortest device time in every case measured (the guided step at 85-93% of the copy floor,
the cuda backend's at 40-87%), but a Triton call costs 45-190 µs of host path more than
its kernel and a cuda-extension call 0-50 µs, so every eager call was faster on the cuda
backend. A captured graph pays the host path once and then only device time.

The choice comes from, in order: the innermost ``with fastguide.backend(name):``,
``fastguide.set_backend(name)``, the environment variable ``FASTGUIDE_BACKEND``, ``auto``.
Nothing here touches the CUDA driver at import time: availability is probed lazily.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

from . import extension

BACKENDS = ("auto", "torch", "triton", "cuda")
CONCRETE_BACKENDS = ("torch", "triton", "cuda")

_state = threading.local()
_global_choice: str | None = None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


# (the raw FASTGUIDE_BACKEND value, its backend name): read at every op call, parsed once per value
_env_parsed: tuple[str | None, str] = (None, "auto")


def _env_choice() -> str:
    global _env_parsed
    raw = os.environ.get("FASTGUIDE_BACKEND")
    if raw == _env_parsed[0]:
        return _env_parsed[1]
    name = (raw or "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"environment variable FASTGUIDE_BACKEND must be one of {BACKENDS}, got {name!r}")
    _env_parsed = (raw, name)
    return name


def get_backend() -> str:
    """The backend name in force here: ``auto``, ``torch``, ``triton`` or ``cuda``."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1][0]
    if _global_choice is not None:
        return _global_choice
    return _env_choice()


def set_backend(name: str) -> None:
    """Choose the backend for every later op call (overrides FASTGUIDE_BACKEND)."""
    global _global_choice
    _global_choice = _check_name(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (thread-local)."""
    _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    entry = [name]  # this block's own: removed by identity, so that blocks that interleave
    stack.append(entry)  # (generators, tasks on one thread) each remove their own
    try:
        yield
    finally:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is entry:
                del stack[i]
                break


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _module_exists(name: str) -> bool:
    """Whether module ``name`` can be imported, without importing it (a package that is
    not importable counts as absent: find_spec raises there rather than returning None)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# The oldest Triton the kernels compile under (pyproject.toml's triton>=3.2; CI compiles
# every kernel under 3.2). torch 2.5 pins Triton 3.1, whose frontend rejects them.
OLDEST_TRITON = (3, 2)


def _triton_release() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton from its distribution's metadata, without
    importing it; None when no distribution named triton says (a source build, or the
    nightlies' pytorch-triton), which is then taken as new enough."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


# Looked up once, at import: finding a spec or a version imports nothing, and resolve()
# runs while torch.compile traces an op call, where torch 2.11's dynamo refuses to trace
# find_spec.
_TRITON_INSTALLED = _module_exists("triton")
_TRITON_RELEASE = _triton_release() if _TRITON_INSTALLED else None

OPS = ("attention", "group_norm", "guided_step", "layer_norm")
# The dtypes the kernels compute in; float64 runs on the reference only.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Backend:
    """One implementation of the ops: which ops it has (each in a module with the op's
    backend functions, see fastguide.ops), the dtypes and devices they take, and why it
    declines a call (``not_supported_reasons``). Layouts decline nothing: every backend
    takes any strides, and the glue makes dense copies where a kernel needs them
    (fastguide.ops.layout)."""

    name: str
    modules: dict[str, str]  # op -> the module implementing it
    dtypes: tuple[torch.dtype, ...]

    def __init__(self) -> None:
        # A kernel counts as present once its module exists; finding it imports neither
        # triton nor the extension.
        self._present = {op: _module_exists(module) for op, module in self.modules.items()}

    def has_kernel(self, op: str) -> bool:
        return self._present.get(op, False)

    def why_not(self, device: torch.device) -> str | None:
        """Why this backend cannot run on tensors of ``device`` at all; None when it can."""
        return None

    def not_supported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Every reason this backend declines ``op`` on ``dtype`` tensors of ``device``;
        empty when it runs it."""
        reasons = []
        if not self.has_kernel(op):
            reasons.append(f"the {self.name} backend has no kernel for {op}")
        elif dtype not in self.dtypes:
            reasons.append(
                f"the {self.name} backend has no kernel for {op} on {dtype} tensors "
                f"(it computes in {', '.join(str(d) for d in self.dtypes)})"
            )
        device_reason = self.why_not(device)
        return reasons + ([device_reason] if device_reason is not None else [])

    def runs_under_auto(self, op: str, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether ``auto`` may pick this backend for the call: it runs it as things stand."""
        return not self.not_supported_reasons(op, device, dtype)

    def implementation(self, op: str) -> ModuleType:
        """The module with ``op``'s functions on this backend."""
        name = self.modules[op]
        module = sys.modules.get(name)  # once imported, no import machinery per op call
        return module if module is not None else importlib.import_module(name)


class TorchBackend(Backend):
    """fastguide.ops.reference: plain PyTorch, any device and floating dtype; the oracle."""

    name = "torch"
    modules = dict.fromkeys(OPS, "fastguide.ops.reference")
    dtypes = (*KERNEL_DTYPES, torch.float64)


class TritonBackend(Backend):
    """fastguide.kernels: one module per op; CUDA tensors, or CPU tensors under the
    interpreter (TRITON_INTERPRET=1)."""

    name = "triton"
    modules = {op: f"fastguide.kernels.{op}" for op in OPS}
    dtypes = KERNEL_DTYPES

    def why_not(self, device: torch.device) -> str | None:
        if not _TRITON_INSTALLED:
            return "triton is not installed (pip install triton)"
        if _TRITON_RELEASE is not None and _TRITON_RELEASE < OLDEST_TRITON:
            found, oldest = (".".join(map(str, v)) for v in (_TRITON_RELEASE, OLDEST_TRITON))
            return (
                f"triton {found} is installed; the kernels need triton {oldest} or newer "
                f"(pip install 'triton>={oldest}')"
            )
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if _triton_interpreter_on():
                return None
            return "triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
        return f"triton does not run on {device.type} tensors"

    def not_supported_reasons(self, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
        reasons = super().not_supported_reasons(op, device, dtype)
        if op == "attention" and dtype == torch.bfloat16 and device.type == "cpu":
            # (the interpreter's bf16 tl.dot returns garbage: 8e8 off on unit inputs)
            reasons.append("the Triton interpreter computes bf16 tl.dot wrongly: bf16 attention runs on a GPU only")
        if op == "attention" and device.type == "cpu" and _TRITON_RELEASE is not None and _TRITON_RELEASE < (3, 4):
            # (attention's kernels are autotuned, and Triton's autotuner before 3.4 asks the
            # GPU driver for its benchmarker when the kernel is defined, which fails on CPU)
            reasons.append(
                f"triton {'.'.join(map(str, _TRITON_RELEASE))}'s autotuner needs a GPU: attention runs on the "
                "interpreter (CPU tensors) from triton 3.4 on"
            )
        return reasons


class CudaBackend(Backend):
    """The extension fastguide._C (csrc/) through fastguide.ops.cuda_backend: CUDA tensors
    only; guided_step and the two norms."""

    name = "cuda"
    modules = dict.fromkeys(("group_norm", "guided_step", "layer_norm"), "fastguide.ops.cuda_backend")
    dtypes = KERNEL_DTYPES

    def why_not(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, got a {device.type} tensor"
        return _older_than_sm80(device.index) or extension.why_not_available()

    def runs_under_auto(self, op: str, device: torch.device, dtype: torch.dtype) -> bool:
        """Only with the extension installed prebuilt (``auto`` never starts a build), loading
        (``extension.prebuilt_loads``), and a GPU it is built for."""
        return (
            self.has_kernel(op)
            and dtype in self.dtypes
            and extension.prebuilt_path() is not None
            and _older_than_sm80(device.index) is None
            and extension.prebuilt_loads()
        )


_SM80_REASONS: dict[int | None, str | None] = {}  # device index -> _older_than_sm80's answer


def _older_than_sm80(index: int | None) -> str | None:
    """Why CUDA device ``index`` (None: the current one) cannot run the extension's
    kernels: they are built for sm_80 and newer (bfloat16 arithmetic, cp.async; setup.py);
    None when it can. Kept per device after the first eager call; torch.compile, which
    resolves the backend while it traces, folds get_device_properties to a constant."""
    if index in _SM80_REASONS:
        return _SM80_REASONS[index]
    properties = torch.cuda.get_device_properties(index)
    reason = (
        f"the cuda backend's kernels need compute capability 8.0 or newer, this GPU has "
        f"{properties.major}.{properties.minor}"
        if properties.major < 8
        else None
    )
    if not torch.compiler.is_compiling():  # (no side effect in a traced function)
        _SM80_REASONS[index] = reason
    return reason


IMPLEMENTATIONS: dict[str, Backend] = {b.name: b for b in (TorchBackend(), TritonBackend(), CudaBackend())}


def why_not(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on tensors of ``device``; None when it can."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"backend must be one of {CONCRETE_BACKENDS}, got {name!r}")
    return IMPLEMENTATIONS[name].why_not(device)


def available_backends() -> dict[str, str | None]:
    """Each concrete backend mapped to None when it can run here, else the reason why not.

    "Here" means on this machine's default device: CUDA when a GPU is visible, else CPU.
    This call (unlike ``import fastguide``) may initialise CUDA to find out.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {name: why_not(name, device) for name in CONCRETE_BACKENDS}


@contextlib.contextmanager
def graph_capture() -> Iterator[None]:
    """Inside the ``with`` block (thread-local), ``auto`` orders the CUDA backends for a
    graph captured once and replayed: by device time alone, triton first. The sampling
    loop holds it over its warm-up run and its capture, so that both use the same kernels
    (a kernel first compiled during a capture would load its module there)."""
    depth = getattr(_state, "graph_capture", 0)
    _state.graph_capture = depth + 1
    try:
        yield
    finally:
        _state.graph_capture = depth


def _auto_on_cuda(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``'s pick for CUDA tensors: the first of the two accelerated backends, in the
    order the module docstring explains, that runs the op without a build."""
    order = ("triton", "cuda") if getattr(_state, "graph_capture", 0) else ("cuda", "triton")
    for name in order:
        if IMPLEMENTATIONS[name].runs_under_auto(op, device, dtype):
            return name
    return "torch"


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend that runs ``op`` on ``dtype`` tensors of ``device``.

    An explicit choice that cannot run raises RuntimeError with every reason the backend
    gives; ``auto`` falls back to ``torch``. The cuda backend covers some ops and dtypes:
    the others (attention, float64) run under it as under ``auto``.
    """
    choice = get_backend()
    cuda = IMPLEMENTATIONS["cuda"]
    if choice == "cuda" and (not cuda.has_kernel(op) or dtype not in cuda.dtypes):
        choice = "auto"
    if choice == "auto":
        return _auto_on_cuda(op, device, dtype) if device.type == "cuda" else "torch"
    reasons = IMPLEMENTATIONS[choice].not_supported_reasons(op, device, dtype)
    if reasons:
        raise RuntimeError(f"backend {choice!r} was requested but cannot run {op} here: {'; '.join(reasons)}")
    return choice

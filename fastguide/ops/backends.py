"""Which implementation runs an op: the backend switch.

Backends:
  ``torch``   fastguide.ops.reference, plain PyTorch. Runs anywhere; the oracle.
  ``triton``  fastguide.kernels. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
  ``cuda``    the compiled extension fastguide._C (csrc/), CUDA tensors only; built just
              in time on first use when not installed prebuilt. It covers guided_step,
              group_norm and layer_norm; other ops run under it as they would under
              ``auto``.
  ``auto``    (default) CUDA tensor -> a prebuilt cuda extension where it has the op,
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
import importlib.util
import os
import threading
from collections.abc import Iterator

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
        raise ValueError(
            f"environment variable FASTGUIDE_BACKEND must be one of {BACKENDS}, got {name!r}"
        )
    _env_parsed = (raw, name)
    return name


def get_backend() -> str:
    """The backend name in force here: ``auto``, ``torch``, ``triton`` or ``cuda``."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
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
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, at import: finding a spec imports nothing, and resolve() runs while
# torch.compile traces an op call, where torch 2.11's dynamo refuses to trace find_spec.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _why_not_triton(device: torch.device) -> str | None:
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _triton_interpreter_on():
            return None
        return "triton runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
    return f"triton does not run on {device.type} tensors"


def _why_not_cuda(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, got a {device.type} tensor"
    return extension.why_not_available()


def why_not(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on tensors of ``device``; None when it can."""
    if name == "torch":
        return None
    if name == "triton":
        return _why_not_triton(device)
    if name == "cuda":
        return _why_not_cuda(device)
    raise ValueError(f"backend must be one of {CONCRETE_BACKENDS}, got {name!r}")


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


def _auto_on_cuda(device: torch.device, has_kernel: dict[str, bool]) -> str:
    """``auto``'s pick for CUDA tensors: the first of the two accelerated backends, in the
    order the module docstring explains, that has the kernel and can run."""
    order = ("triton", "cuda") if getattr(_state, "graph_capture", 0) else ("cuda", "triton")
    for name in order:
        if not has_kernel.get(name, False):
            continue
        if name == "triton" and why_not("triton", device) is None:
            return "triton"
        if name == "cuda" and extension.prebuilt_path() is not None:
            return "cuda"
    return "torch"


def resolve(device: torch.device, has_kernel: dict[str, bool], what: str = "this op") -> str:
    """The concrete backend that runs an op on ``device``.

    ``has_kernel`` says, per non-reference backend, whether it has a kernel for ``what``
    (the op, and the dtype at hand: kernels land op by op). An explicit choice that cannot
    run raises RuntimeError naming what is missing; ``auto`` falls back to ``torch``.
    """
    choice = get_backend()
    if choice == "cuda" and not has_kernel.get("cuda", False):
        choice = "auto"  # the cuda backend covers some ops; the rest run as under auto
    if choice == "auto":
        return _auto_on_cuda(device, has_kernel) if device.type == "cuda" else "torch"
    if choice == "torch":
        return "torch"
    reason = why_not(choice, device)
    if reason is None and not has_kernel.get(choice, False):
        reason = f"the {choice} backend has no kernel for {what}"
    if reason is not None:
        raise RuntimeError(f"backend {choice!r} was requested but cannot run: {reason}")
    return choice


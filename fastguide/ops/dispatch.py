"""How a public op call reaches a backend: the backend for the tensors at hand
(fastguide.ops.backends), and whether the call goes through its registered custom op or
runs the op's body directly (``call``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from . import backends


def backend_for(op: str, device: torch.device, dtype: torch.dtype, empty: bool = False) -> str:
    """The concrete backend that runs ``op`` on ``device`` computing in ``dtype`` (the
    tensors' dtype; for guided_step the compute dtype of its inputs, float32 for fp16
    ones); "torch" for an empty call or meta tensors."""
    # Under torch.compile this runs at trace time: the backend is fixed per compiled graph.
    if empty or device.type == "meta":
        return "torch"  # nothing to launch: the reference returns the empty result, the fakes the meta one
    return backends.resolve(op, device, dtype)


def implementation(backend: str, op: str) -> ModuleType:
    """The module with ``op``'s functions on the concrete ``backend``."""
    return backends.IMPLEMENTATIONS[backend].implementation(op)


def empty_like(t: Tensor) -> Tensor:
    """A dense uninitialised tensor of t's shape, dtype and device (the fakes' results)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def needs_op(tensors: Sequence[Tensor]) -> bool:
    """Whether a call on ``tensors`` must go through its registered custom op whatever
    autograd needs: a trace or transform (``tracing``), the profiler (which names ops by
    it), a tensor subclass (its dispatch sees ops, not kernels) or a meta tensor (it has no
    values for a body to read; the op's fake gives the result's shape and dtype, as models
    built on the meta device need). Otherwise the op's body may run directly: the op's
    dispatch round trip would do nothing else, and it costs more host time (about 10 µs a
    call on the development CPU) than a small kernel takes on a GPU."""
    return (
        tracing()
        or torch._C._autograd._profiler_enabled()
        or any(type(t) not in _PLAIN_TENSOR_TYPES or t.is_meta for t in tensors)
    )


def call(op: Callable[..., Any], forward: Callable[..., Any], *args: Any) -> Any:
    """``op(*args)`` where ``needs_op`` says so or an input requires grad, else
    ``forward(*args)``, the op's body."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if needs_op(tensors) or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return op(*args)
    return forward(*args)


def tracing() -> bool:
    """Whether the tensors are being traced or transformed (torch.compile, a dispatch mode
    such as fake tensors, torch.jit.trace, or a torch.func transform such as vmap): then
    they have no plain memory to hand a kernel, and a call must go through the custom op,
    which those machineries know (see ``needs_op``; for guided_step, packing the contract
    into the op's arguments and back is what a direct call saves)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
        or _python_dispatch._get_current_dispatch_mode() is not None
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
    )

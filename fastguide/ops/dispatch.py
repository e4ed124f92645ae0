"""How a public op call reaches a backend: the backend for the tensors at hand
(fastguide.ops.backends), and whether the call goes through its registered custom op,
through the same autograd formula as a torch.autograd.Function, or runs the op's body
directly (``call``)."""

from __future__ import annotations

import contextlib
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


def launching_on(backend: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Around a backend's launch: for Triton, ``device`` made current where it is not.
    Triton launches on the current CUDA device whatever device its tensors are on (a
    pipeline moved to cuda:1 would launch on cuda:0 with cuda:1's pointers); the CUDA
    extension sets its own device guard, and the torch backend's ops follow their tensors."""
    if backend != "triton" or device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


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


def call(
    op: Callable[..., Any], forward: Callable[..., Any], autograd: type[torch.autograd.Function] | None, *args: Any
) -> Any:
    """``op(*args)`` where ``needs_op`` says so; else, where an input requires grad,
    ``autograd.apply(*args)`` (the op's own autograd formula as a torch.autograd.Function,
    from ``register_autograd``; the op itself when None); else ``forward(*args)``, the
    op's body."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if needs_op(tensors):
        return op(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return op(*args) if autograd is None else autograd.apply(*args)
    return forward(*args)


def register_autograd(
    op: Any, forward: Callable[..., Any], backward: Callable[..., Any], setup_context: Callable[..., None]
) -> type[torch.autograd.Function]:
    """Registers ``backward`` (with ``setup_context``) as ``op``'s autograd formula, and
    returns the same formula over ``forward``, the op's body, as a torch.autograd.Function
    for ``call``'s eager route: the same saved tensors and gradients, without the custom
    op's dispatch on the way in (about half the forward's host time in grad mode on the
    development CPU) and its autograd wrapper on the way back."""
    op.register_autograd(backward, setup_context=setup_context)

    def function_forward(ctx: Any, *args: Any) -> Any:
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    # named after the op (_group_norm_forward: GroupNorm), so a graph's node reads GroupNormBackward
    name = "".join(word.title() for word in forward.__name__.strip("_").removesuffix("_forward").split("_"))
    methods = {"forward": staticmethod(function_forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


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

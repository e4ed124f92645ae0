"""The public ops and the only door to the kernels.

Each op is a ``torch.library`` custom op in the ``fastguide`` namespace with a fake
(meta) implementation and, where differentiable, a registered autograd formula, so
``torch.compile(fullgraph=True)`` sees one node per call. The public functions below
validate their arguments (fastguide.ops.validation), pick the backend for the tensors'
device (fastguide.ops.backends), and call the custom op with that backend's name, so the
backward runs on the same backend as the forward. Where nothing needs the op (no tracing,
transform, profiler or autograd: ``_call``, ``_tracing``) they run its body directly.

Every backend module exposes the same functions: ``attention_forward``,
``attention_backward``, ``group_norm_forward``, ``group_norm_backward``,
``layer_norm_forward``, ``gated_residual_layer_norm_forward``, ``layer_norm_backward``
and ``guided_step(tensors, step, combine)``, which takes the contract's types
(fastguide.ops.contract). The torch backend is fastguide.ops.reference; Triton kernels
live in fastguide.kernels, one module per op; the cuda backend's glue is
fastguide.ops.cuda_backend (guided_step, group_norm and layer_norm; attention runs as
under ``auto`` when cuda is chosen).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from . import backends, contract, reference, validation
from .contract import GuidanceCombine, StepCoefficients, StepTensors
from .reference import compute_dtype, like_memory_format

# Op name -> module implementing it, per accelerated backend. A kernel counts as present
# once its module file exists; finding it imports neither triton nor the extension.
_KERNEL_MODULES = {
    "triton": {
        "attention": "fastguide.kernels.attention",
        "group_norm": "fastguide.kernels.group_norm",
        "guided_step": "fastguide.kernels.guided_step",
        "layer_norm": "fastguide.kernels.layer_norm",
    },
    "cuda": {
        "group_norm": "fastguide.ops.cuda_backend",
        "guided_step": "fastguide.ops.cuda_backend",
        "layer_norm": "fastguide.ops.cuda_backend",
    },
}


def _module_exists(name: str) -> bool:
    # find_spec raises, rather than returning None, when the parent package is missing
    # (e.g. a source tree without fastguide.kernels mapped in shadows the install).
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


_HAS_KERNEL = {
    op: {backend: op in modules and _module_exists(modules[op]) for backend, modules in _KERNEL_MODULES.items()}
    for op in ("attention", "group_norm", "guided_step", "layer_norm")
}


# Dtypes the accelerated backends compute in; float64 runs on the reference only.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _resolve(op: str, device: torch.device, dtype: torch.dtype, empty: bool = False) -> str:
    # Under torch.compile this runs at trace time: the backend is fixed per compiled graph.
    if empty or device.type == "meta":
        return "torch"  # nothing to launch: the reference returns the empty result, the fakes the meta one
    if dtype not in _KERNEL_DTYPES:
        has_kernel = {name: False for name in _KERNEL_MODULES}
        return backends.resolve(device, has_kernel, f"{op} on {dtype} tensors")
    return backends.resolve(device, _HAS_KERNEL[op], op)


def _module(backend: str, op: str) -> ModuleType:
    name = "fastguide.ops.reference" if backend == "torch" else _KERNEL_MODULES[backend][op]
    module = sys.modules.get(name)  # once imported, no import machinery per op call
    return module if module is not None else importlib.import_module(name)


def _empty_like(t: Tensor) -> Tensor:
    """A dense uninitialised tensor of t's shape, dtype and device (the fakes' results)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _needs_op(tensors: Sequence[Tensor]) -> bool:
    """Whether a call on ``tensors`` must go through its registered custom op whatever
    autograd needs: a trace or transform (``_tracing``), the profiler (which names ops by
    it), a tensor subclass (its dispatch sees ops, not kernels) or a meta tensor (it has no
    values for a body to read; the op's fake gives the result's shape and dtype, as models
    built on the meta device need). Otherwise the op's body may run directly: the op's
    dispatch round trip would do nothing else, and it costs more host time (about 10 µs a
    call on the development CPU) than a small kernel takes on a GPU."""
    return (
        _tracing()
        or torch._C._autograd._profiler_enabled()
        or any(type(t) not in _PLAIN_TENSOR_TYPES or t.is_meta for t in tensors)
    )


def _call(op: Callable[..., Any], forward: Callable[..., Any], *args: Any) -> Any:
    """``op(*args)`` where ``_needs_op`` says so or an input requires grad, else
    ``forward(*args)``, the op's body."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if _needs_op(tensors) or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return op(*args)
    return forward(*args)


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return _module(backend, "attention").attention_forward(q, k, v, scale)


_attention = torch.library.custom_op("fastguide::attention", mutates_args=())(_attention_forward)


@_attention.register_fake
def _(q, k, v, scale, backend):
    return _empty_like(q), torch.empty(q.shape[:-1], dtype=compute_dtype(q), device=q.device)


@torch.library.custom_op("fastguide::attention_backward", mutates_args=())
def _attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _module(backend, "attention").attention_backward(grad_out, q, k, v, out, lse, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend):
    return tuple(_empty_like(t) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


_attention.register_autograd(_attention_grad, setup_context=_attention_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Scaled dot-product attention: softmax(q·kᵀ·scale)·v.

    Args:
        q: (B, H, Lq, D) queries; k, v: (B, H, Lk, D). Any strides; D a multiple of 8 up
            to 256; float16, bfloat16, float32 (float64 on the torch backend).
        scale: softmax scale, D^-1/2 by default.

    Returns (B, H, Lq, D) in q's dtype. Accumulation and softmax run in float32.
    Differentiable in q, k and v.
    """
    scale = validation.check_attention(q, k, v, scale)
    backend = _resolve("attention", q.device, q.dtype, empty=q.numel() == 0)
    out, _ = _call(_attention, _attention_forward, q, k, v, scale, backend)
    return out


# --------------------------------------------------------------------------------------
# The backward glue of the norms (group_norm, layer_norm): their backward ops take
# (grad_y, x, weight, bias, scale, shift, mean, rstd, *options) and return
# (dx, dweight, dbias, dscale, dshift)
# --------------------------------------------------------------------------------------


def _norm_backward_outputs(x: Tensor, dx: Tensor, *param_grads: Tensor | None) -> tuple[Tensor, ...]:
    """A norm backward op's results: dx laid out like x, and an empty tensor for each
    parameter gradient that is None (an op returns tensors)."""
    return (like_memory_format(dx, x),) + tuple(x.new_empty(0) if g is None else g.contiguous() for g in param_grads)


def _norm_backward_fake(x: Tensor, *params: Tensor | None) -> tuple[Tensor, ...]:
    """The fake of a norm backward op's results (as ``_norm_backward_outputs``)."""
    return (like_memory_format(_empty_like(x), x),) + tuple(
        x.new_empty(0) if t is None else _empty_like(t) for t in params
    )


def _norm_grads(backward_op, grad_y: Tensor, saved: Sequence[Tensor | None], *options) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias, dscale, dshift) by a norm's backward op from the saved
    (x, weight, bias, scale, shift, mean, rstd); None for each parameter that was None."""
    dx, *param_grads = backward_op(grad_y, *saved, *options)
    return (dx, *(None if t is None else g for t, g in zip(saved[1:5], param_grads)))


# --------------------------------------------------------------------------------------
# group_norm
# --------------------------------------------------------------------------------------


def _group_norm_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _module(backend, "group_norm").group_norm_forward(
        x, weight, bias, scale, shift, num_groups, eps, None if activation == "none" else activation
    )
    return like_memory_format(y, x), mean.contiguous(), rstd.contiguous()


_group_norm = torch.library.custom_op("fastguide::group_norm", mutates_args=())(_group_norm_forward)


@_group_norm.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, activation, backend):
    y = like_memory_format(_empty_like(x), x)
    stats = torch.empty((x.shape[0], num_groups), dtype=compute_dtype(x), device=x.device)
    return y, stats, torch.empty_like(stats)


@torch.library.custom_op("fastguide::group_norm_backward", mutates_args=())
def _group_norm_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    eps: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dscale, dshift); an input that was None gets an empty tensor."""
    return _norm_backward_outputs(x, *_module(backend, "group_norm").group_norm_backward(
        grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, eps,
        None if activation == "none" else activation,
    ))


@_group_norm_backward.register_fake
def _(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, activation, backend):
    return _norm_backward_fake(x, weight, bias, scale, shift)


def _group_norm_setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, activation, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.activation, ctx.backend = num_groups, eps, activation, backend


def _group_norm_grad(ctx, grad_y, grad_mean, grad_rstd):
    grads = _norm_grads(_group_norm_backward, grad_y, ctx.saved_tensors,
                        ctx.num_groups, ctx.eps, ctx.activation, ctx.backend)
    return (*grads, None, None, None, None)


_group_norm.register_autograd(_group_norm_grad, setup_context=_group_norm_setup_context)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """GroupNorm, then ADM's scale-shift, then an optional SiLU, in one op.

    y = silu?((x − mean)/√(var + eps)·weight + bias)·(1 + scale) + shift), statistics per
    (sample, group) in float32 whatever x's dtype (ADM's GroupNorm32).

    Args:
        x: (N, C, *spatial), contiguous or channels_last.
        num_groups: G, dividing C.
        weight, bias: (C,) affine parameters, or None.
        scale, shift: (N, C) or (N, C, 1, ...) per-sample modulation, or None.
        activation: None or "silu".

    Returns y in x's dtype and memory format. Differentiable in x, weight, bias, scale
    and shift.
    """
    validation.check_group_norm(x, num_groups, weight, bias, eps, scale, shift, activation)
    # The kernels index the per-channel and per-sample parameters densely.
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    per_sample = [None if t is None else t.reshape(x.shape[0], x.shape[1]).contiguous() for t in (scale, shift)]
    y, _, _ = _call(
        _group_norm, _group_norm_forward, x, weight, bias, *per_sample, num_groups, float(eps),
        activation or "none", _resolve("group_norm", x.device, x.dtype, empty=x.numel() == 0),
    )
    return y


# --------------------------------------------------------------------------------------
# layer_norm, gated_residual, gated_residual_layer_norm (DiT blocks)
# --------------------------------------------------------------------------------------


def _layer_norm_stats_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    stats = torch.empty(x.shape[:-1], dtype=compute_dtype(x), device=x.device)
    return stats, torch.empty_like(stats)


def _layer_norm_forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _module(backend, "layer_norm").layer_norm_forward(x, weight, bias, scale, shift, eps)
    return y.contiguous(), mean.contiguous(), rstd.contiguous()


_layer_norm = torch.library.custom_op("fastguide::layer_norm", mutates_args=())(_layer_norm_forward)


@_layer_norm.register_fake
def _(x, weight, bias, scale, shift, eps, backend):
    return (_empty_like(x), *_layer_norm_stats_fake(x))


@torch.library.custom_op("fastguide::layer_norm_backward", mutates_args=())
def _layer_norm_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dscale, dshift); an input that was None gets an empty tensor."""
    return _norm_backward_outputs(x, *_module(backend, "layer_norm").layer_norm_backward(
        grad_y, x, weight, bias, scale, shift, mean, rstd
    ))


@_layer_norm_backward.register_fake
def _(grad_y, x, weight, bias, scale, shift, mean, rstd, backend):
    return _norm_backward_fake(x, weight, bias, scale, shift)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.backend = backend


def _layer_norm_grad(ctx, grad_y, grad_mean, grad_rstd):
    return (*_norm_grads(_layer_norm_backward, grad_y, ctx.saved_tensors, ctx.backend), None, None)


_layer_norm.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup_context)


def _gated_residual_layer_norm_forward(
    h: Tensor,
    branch: Tensor,
    gate: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    h_new, y, mean, rstd = _module(backend, "layer_norm").gated_residual_layer_norm_forward(
        h, branch, gate, weight, bias, scale, shift, eps
    )
    return h_new.contiguous(), y.contiguous(), mean.contiguous(), rstd.contiguous()


_gated_residual_layer_norm = torch.library.custom_op(
    "fastguide::gated_residual_layer_norm", mutates_args=())(_gated_residual_layer_norm_forward)


@_gated_residual_layer_norm.register_fake
def _(h, branch, gate, weight, bias, scale, shift, eps, backend):
    return (_empty_like(h), _empty_like(h), *_layer_norm_stats_fake(h))


def _gated_residual_layer_norm_setup_context(ctx, inputs, output):
    h, branch, gate, weight, bias, scale, shift, eps, backend = inputs
    h_new, _, mean, rstd = output
    ctx.save_for_backward(h_new, branch, gate, weight, bias, scale, shift, mean, rstd)
    ctx.backend = backend


def _gated_residual_layer_norm_grad(ctx, grad_h_new, grad_y, grad_mean, grad_rstd):
    # The norm's backward runs on the saved h_new; the residual's is elementwise:
    # g = grad_h_new + dx, then dh = g, dbranch = gate·g, dgate = Σ_tokens g·branch.
    h_new, branch, gate, *norm_saved = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(h_new)
    dx, *param_grads = _norm_grads(_layer_norm_backward, grad_y, (h_new, *norm_saved), ctx.backend)
    dtype = compute_dtype(h_new)
    total = dx.to(dtype) if grad_h_new is None else dx.to(dtype) + grad_h_new.to(dtype)
    dbranch = (total * gate.to(dtype)).to(branch.dtype)
    dgate = (total * branch.to(dtype)).sum_to_size(gate.shape).to(gate.dtype)
    return (total.to(h_new.dtype), dbranch, dgate, *param_grads, None, None)


_gated_residual_layer_norm.register_autograd(
    _gated_residual_layer_norm_grad, setup_context=_gated_residual_layer_norm_setup_context
)


def _as_tokens(t: Tensor | None) -> Tensor | None:
    """A (N, D), (N, 1, D) or (N, L, D) tensor as (N, 1, D) or (N, L, D), dense: the
    kernels see (N, L, D) (an (N, D) x is N samples of one token) and index a per-sample
    row or one row per token."""
    return None if t is None else (t.unsqueeze(1) if t.dim() == 2 else t).contiguous()


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> Tensor:
    """LayerNorm over the last dim, then DiT's adaLN modulation, in one op.

    y = ((x − mean)/√(var + eps)·weight + bias)·(1 + scale) + shift, statistics per row
    of D elements in float32 (float64 for float64 x), biased variance as torch's.

    Args:
        x: (N, L, D) tokens or (N, D), any strides.
        normalized_shape: (D,), the last dim of x (torch's signature; only the last dim
            is normalised).
        weight, bias: (D,) elementwise affine, or None (DiT: None).
        scale, shift: independent optionals, each (N, D) or (N, 1, D) per sample
            (broadcast over tokens), or (N, L, D) per token.

    Returns y shaped and typed like x, contiguous. Differentiable in x, weight, bias,
    scale and shift.
    """
    validation.check_layer_norm(x, normalized_shape, weight, bias, eps, scale, shift)
    tokens = x.unsqueeze(1) if x.dim() == 2 else x
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    y, _, _ = _call(
        _layer_norm, _layer_norm_forward, tokens, weight, bias, _as_tokens(scale), _as_tokens(shift), float(eps),
        _resolve("layer_norm", x.device, x.dtype, empty=x.numel() == 0),
    )
    return y.reshape(x.shape)


def gated_residual(h: Tensor, branch: Tensor, gate: Tensor) -> Tensor:
    """DiT's gated residual h + gate·branch, one pass (torch.addcmul).

    h, branch: (N, L, D) or (N, D); gate (N, D) or (N, 1, D) per sample, or h's shape per
    token. Computed in float32 (float64 for float64 inputs) and rounded once to h's
    dtype. This is already one read of h and branch and one write, the copy-bandwidth
    floor, so it has no kernel of its own; where a LayerNorm follows,
    ``gated_residual_layer_norm`` fuses the two. Differentiable.

    Mixed dtypes (autocast: a float32 residual stream, a bfloat16 branch from an autocast
    Linear): the residual stream keeps its dtype and a branch of another floating dtype
    is cast to it first, which is exact where h is the wider, as under autocast, and
    there gives what torch's promotion of h + gate·branch gives. gate may be of any
    floating dtype (read in the compute dtype).
    """
    validation.check_gated_residual(h, branch, gate)
    # A per-sample gate, (N, D) or (N, 1, D), as (N, 1, D) for (N, L, D) h, (N, D) for (N, D) h.
    gate = gate.reshape(h.shape[0], *(1,) * (h.dim() - 2), h.shape[-1]) if gate.shape != h.shape else gate
    return reference.gated_residual(h, branch.to(h.dtype), gate)


def gated_residual_layer_norm(
    h: Tensor,
    branch: Tensor,
    gate: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A DiT block's seam in one pass: h_new = h + gate·branch, then the next
    sub-block's y = layer_norm(h_new)·(1 + scale) + shift. Returns (h_new, y).

    h_new is rounded to h's dtype and the norm reads that rounded value, so the pair
    equals ``gated_residual`` followed by ``layer_norm``; the fused kernels read h and
    branch once and write h_new and y once (the unfused pair reads h_new back). Shapes
    and dtypes as ``gated_residual`` (a branch of another dtype is cast to h's) and
    ``layer_norm``. Differentiable in every tensor.
    """
    validation.check_gated_residual(h, branch, gate)
    validation.check_layer_norm(h, normalized_shape, weight, bias, eps, scale, shift, x_name="h")
    tokens = [t.unsqueeze(1) if t.dim() == 2 else t for t in (h, branch.to(h.dtype))]
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    h_new, y, _, _ = _call(
        _gated_residual_layer_norm, _gated_residual_layer_norm_forward,
        *tokens, _as_tokens(gate), weight, bias, _as_tokens(scale), _as_tokens(shift), float(eps),
        _resolve("layer_norm", h.device, h.dtype, empty=h.numel() == 0),
    )
    return h_new.reshape(h.shape), y.reshape(h.shape)


# --------------------------------------------------------------------------------------
# guided_step
# --------------------------------------------------------------------------------------


# guided_step is registered with torch.library.define rather than custom_op: custom_op's
# eager path for mutating ops rebuilds the schema's argument list per argument (~200 µs
# per call on CPU); define + impl costs a few µs. The schema is derived from the contract's
# types. The implementation bumps the version counters of what it writes, as custom_op
# would, so autograd still detects use of a tensor overwritten here.
torch.library.define("fastguide::guided_step", contract.guided_step_schema())


@torch.library.impl("fastguide::guided_step", "default")
def _guided_step(*arguments):
    _guided_step_impl(*contract.unpack(arguments[:-1]), arguments[-1])


@torch.library.register_fake("fastguide::guided_step")
def _(*arguments):
    return None


def guided_step(
    model_output: Tensor,
    x: Tensor,
    step: StepCoefficients,
    combine: GuidanceCombine | None = None,
    *,
    guide: Tensor | None = None,
    history: Sequence[Tensor] = (),
    noise: Tensor | None = None,
    grad: Tensor | None = None,
    apg_buffer: Tensor | None = None,
    out: Tensor | None = None,
    x0_out: Tensor | None = None,
    similarity: Tensor | None = None,
) -> Tensor:
    """Guidance combine and one sampler update in one op; returns x_next.

    ``step`` holds the update's scalars and ``combine`` the guidance (None: unguided);
    the tensors are those of ``StepTensors`` (fastguide.ops.contract). With
    x = alpha·x0 + sigma·eps the step computes

        m  = u + w·(c − u) + s·(c − p)  (or CFG-Zero* / APG / tangential, then CFG rescale)
        x0, eps from m by step.prediction_type ("epsilon", "v_prediction", "sample")
        x0 ← clamp(x0, −1, 1), eps re-derived           if step.clip_denoised
        eps ← eps − grad_eps_scale·grad, x0 re-derived  if step.grad_eps_scale ≠ 0
        x_next = k_x·x + k_x0·x0 + k_eps·eps + Σᵢ k_history[i]·history[i]
                 + k_noise·noise + k_grad·grad

    where c is the first B rows of model_output and u its second B rows ([cond; uncond],
    batched CFG) or ``guide`` (a second network's output), and, when
    combine.perturbed_scale = s ≠ 0 (PAG, skip-layer guidance), p its third B rows
    ([cond; uncond; perturbed], no ``guide``), all read in place; with
    step.log_variance_range the noise and grad coefficients are scaled per element by
    ADM's learned variance. fastguide.ops.contract.GuidanceCombine states the combine and
    fastguide.ops.reference.guided_step each step in full.

    x_next goes to ``out`` (shaped like x, or (2B, ...) or (3B, ...) for each B-row block
    of the next [cond; uncond] or [cond; uncond; perturbed] input; x itself, or its first
    B rows, is allowed), x0 to ``x0_out`` when given, and APG's momentum state to
    ``apg_buffer`` (updated in place). Not differentiable.

    ``similarity``, an out tensor of shape (B,), float32, contiguous, on x's device,
    receives per sample b the cosine similarity of the two branches' x0 predictions,

        cos(x̂0_c, x̂0_u) = ⟨x̂0_c, x̂0_u⟩ / (‖x̂0_c‖·‖x̂0_u‖),

    where x̂0_c and x̂0_u are derived elementwise from x and the conditional prediction c,
    resp. the guiding prediction u, alone by the step's prediction-type map (the one the
    step applies to the guided prediction: epsilon x0 = (x − σ·c)/α, v_prediction
    x0 = α·x − σ·c, flow_prediction x0 = x − σ·c, sample x0 = c), over the sample's C
    prediction channels (never the learned-variance ones), of c and u as the model gave
    them (before CFG-Zero*, tangential CFG, APG or its momentum touch u) and without
    clip_denoised or the classifier shift. (Not of c and u themselves: an eps model's two
    predictions are both ≈ x/σ at high noise; this cosine rises towards 1 as sampling
    proceeds (measured on the digits eps and flow models), adaptive guidance's criterion,
    and it is the same whatever the parameterisation.) It is
    accumulated in float64 (the kernels: each element's x̂0_c and x̂0_u in float32, then
    float32 sums of their products per program or block of the elementwise pass, which
    reads c, u and x anyway, merged in float64: no extra pass). It is 0 where
    ‖x̂0_c‖·‖x̂0_u‖ = 0, and NaN where x̂0_c or x̂0_u holds a NaN or ±inf (a NaN or ±inf in
    c, u or, unless prediction_type is "sample", x; design.md's NaN policy: the
    dependency is the whole sample), and on the kernels also where an x0 value's float32
    square overflows (|value| ≳ 1.8e19; squares that underflow, |value| ≲ 1e-19, lose
    precision there). Only for a guided step (combine given) with
    combine.perturbed_scale = 0; otherwise a ValueError.
    """
    validation.check_step(step)
    validation.check_combine(combine)
    if not isinstance(history, (tuple, list)):
        raise TypeError(f"history must be a tuple or list of tensors, got {type(history).__name__}")
    tensors = StepTensors(model_output, x, guide, tuple(history), noise, grad, apg_buffer, out, x0_out, similarity)
    validation.check_step_tensors(tensors, step, combine, check_memory=not _tracing())
    if out is None:
        out = torch.empty_like(x)
        tensors = tensors._replace(out=out)
    guided_step_prechecked(tensors, step, combine)
    return out


def guided_step_prechecked(tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None) -> None:
    """``guided_step`` without its per-call checks, for a caller that checked ``step`` and
    ``combine`` once (validation.check_step / check_combine) and owns every tensor: the
    sampling loop, whose buffers are its own and whose model output it checks itself.
    ``tensors.out`` must be given."""
    x = tensors.x
    backend = _resolve("guided_step", x.device, compute_dtype(tensors.model_output, x, tensors.guide),
                       empty=x.numel() == 0)
    # Under grad mode at all (not only when an input requires grad) the call goes through
    # the op, whose declared in-place writes are what autograd checks.
    given = [t for t in (tensors.model_output, x, tensors.guide, *tensors.history, tensors.noise, tensors.grad)
             if t is not None]
    if torch.is_grad_enabled() or _needs_op(given):
        torch.ops.fastguide.guided_step(*contract.pack(tensors, step, combine), backend)
    else:
        _guided_step_impl(tensors, step, combine, backend)


def _guided_step_impl(
    tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None, backend: str
) -> None:
    _module(backend, "guided_step").guided_step(tensors, step, combine)
    for name in contract.WRITTEN:
        written = getattr(tensors, name)
        if written is not None:
            torch.autograd.graph.increment_version(written)


def _tracing() -> bool:
    """Whether the tensors are being traced or transformed (torch.compile, a dispatch mode
    such as fake tensors, torch.jit.trace, or a torch.func transform such as vmap): then
    they have no plain memory to hand a kernel, and a call must go through the custom op,
    which those machineries know (see ``_needs_op``; for guided_step, packing the contract
    into the op's arguments and back is what a direct call saves)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
        or _python_dispatch._get_current_dispatch_mode() is not None
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
    )

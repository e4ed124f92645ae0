"""layer_norm and its DiT companions gated_residual and gated_residual_layer_norm: the
public functions, their checks and their registration as the custom ops
``fastguide::layer_norm`` and ``fastguide::gated_residual_layer_norm`` (with the norm's
backward op and both autograd formulas). The references are in fastguide.ops.reference
(layer_norm_forward, gated_residual_layer_norm_forward, layer_norm_backward); the kernels
are fastguide.kernels.layer_norm (Triton) and csrc/layer_norm.cu (through
fastguide.ops.cuda_backend)."""

# (custom_op reads these string annotations: torch 2.5 and 2.6 resolve them in torch's own
# namespace, so the signatures spell Optional[Tensor], never Tensor | None or a local name)
from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, norms, reference
from .contract import NormParameters
from .reference import compute_dtype
from .validation import check_norm_parameters, check_same_device, check_shape, check_tensor


def check_token_tensor(name: str, t: Tensor, x: Tensor, what: str, x_name: str = "x") -> None:
    """A per-sample or per-token tensor of (N, L, D) or (N, D) x (the argument ``x_name``):
    shape (N, D), (N, 1, D) or x's own shape (the adaLN modulation and the residual gate);
    for an (N, D) x, each sample being one token, all three say the same."""
    check_tensor(name, t)
    n, d = x.shape[0], x.shape[-1]
    # Compared with ==, not hashed: under torch.jit.trace, sizes are traced values.
    if not any(tuple(t.shape) == allowed for allowed in ((n, d), (n, 1, d), tuple(x.shape))):
        per_token = "" if x.dim() == 2 else f" or {tuple(x.shape)} per token"
        raise ValueError(
            f"{name} ({what}) must have shape ({n}, {d}) or ({n}, 1, {d}) per sample{per_token} "
            f"for {x_name} of shape {tuple(x.shape)}, got {tuple(t.shape)}"
        )


def check_layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    scale: Tensor | None,
    shift: Tensor | None,
    x_name: str = "x",
) -> None:
    check_tensor(x_name, x)
    if x.dim() not in (2, 3):
        raise ValueError(f"{x_name} must be (N, L, D) or (N, D), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"the last dim of {x_name} (D) must be at least 1, got shape {tuple(x.shape)}")
    if (
        isinstance(normalized_shape, bool)
        or not isinstance(normalized_shape, (Integral, Sequence))
        or isinstance(normalized_shape, str)
    ):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {type(normalized_shape).__name__}")
    shape = (normalized_shape,) if isinstance(normalized_shape, Integral) else tuple(normalized_shape)
    if shape != (d,) or not all(isinstance(s, Integral) and not isinstance(s, bool) for s in shape):
        raise ValueError(
            f"normalized_shape must be ({d},), the last dim of {x_name} {tuple(x.shape)} (LayerNorm over the "
            f"last dim only), got {normalized_shape!r}"
        )
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_token_tensor(name, t, x, "adaLN modulation", x_name)
    check_norm_parameters(x_name, x, d, weight, bias, scale, shift, eps)


def check_gated_residual(h: Tensor, branch: Tensor, gate: Tensor) -> None:
    """h (N, L, D) or (N, D); branch of h's shape, any floating dtype (the ops cast it to
    h's); gate per sample or per token (``check_token_tensor``); one device."""
    check_tensor("h", h)
    if h.dim() not in (2, 3):
        raise ValueError(f"h must be (N, L, D) or (N, D), got shape {tuple(h.shape)}")
    check_tensor("branch", branch)
    check_shape("branch", branch, tuple(h.shape))
    check_token_tensor("gate", gate, h, "residual gate", "h")
    check_same_device([("h", h), ("branch", branch), ("gate", gate)])


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
    with dispatch.launching_on(backend, x.device):
        y, mean, rstd = dispatch.implementation(backend, "layer_norm").layer_norm_forward(
            x, NormParameters(weight, bias, scale, shift), eps
        )
    return y.contiguous(), mean.contiguous(), rstd.contiguous()


layer_norm_op = torch.library.custom_op("fastguide::layer_norm", mutates_args=())(_layer_norm_forward)


@layer_norm_op.register_fake
def _(x, weight, bias, scale, shift, eps, backend):
    return (dispatch.empty_like(x), *_layer_norm_stats_fake(x))


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
    with dispatch.launching_on(backend, x.device):
        gradients = dispatch.implementation(backend, "layer_norm").layer_norm_backward(
            grad_y, x, NormParameters(weight, bias, scale, shift), mean, rstd
        )
    return norms.backward_outputs(x, *gradients)


layer_norm_backward_op = torch.library.custom_op("fastguide::layer_norm_backward", mutates_args=())(
    _layer_norm_backward
)


@layer_norm_backward_op.register_fake
def _(grad_y, x, weight, bias, scale, shift, mean, rstd, backend):
    return norms.backward_fake(x, weight, bias, scale, shift)


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.backend = backend


def _layer_norm_grad(ctx, grad_y, grad_mean, grad_rstd):
    grads = norms.grads(layer_norm_backward_op, _layer_norm_backward, grad_y, ctx.saved_tensors, ctx.backend)
    return (*grads, None, None)


_layer_norm_autograd = dispatch.register_autograd(
    layer_norm_op, _layer_norm_forward, _layer_norm_grad, _layer_norm_setup_context
)


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
    with dispatch.launching_on(backend, h.device):
        h_new, y, mean, rstd = dispatch.implementation(backend, "layer_norm").gated_residual_layer_norm_forward(
            h, branch, gate, NormParameters(weight, bias, scale, shift), eps
        )
    return h_new.contiguous(), y.contiguous(), mean.contiguous(), rstd.contiguous()


gated_residual_layer_norm_op = torch.library.custom_op("fastguide::gated_residual_layer_norm", mutates_args=())(
    _gated_residual_layer_norm_forward
)


@gated_residual_layer_norm_op.register_fake
def _(h, branch, gate, weight, bias, scale, shift, eps, backend):
    return (dispatch.empty_like(h), dispatch.empty_like(h), *_layer_norm_stats_fake(h))


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
    dx, *param_grads = norms.grads(
        layer_norm_backward_op, _layer_norm_backward, grad_y, (h_new, *norm_saved), ctx.backend
    )
    dtype = compute_dtype(h_new)
    total = dx.to(dtype) if grad_h_new is None else dx.to(dtype) + grad_h_new.to(dtype)
    dbranch = (total * gate.to(dtype)).to(branch.dtype)
    dgate = (total * branch.to(dtype)).sum_to_size(gate.shape).to(gate.dtype)
    return (total.to(h_new.dtype), dbranch, dgate, *param_grads, None, None)


_gated_residual_layer_norm_autograd = dispatch.register_autograd(
    gated_residual_layer_norm_op,
    _gated_residual_layer_norm_forward,
    _gated_residual_layer_norm_grad,
    _gated_residual_layer_norm_setup_context,
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
    check_layer_norm(x, normalized_shape, weight, bias, eps, scale, shift)
    tokens = x.unsqueeze(1) if x.dim() == 2 else x
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    y, _, _ = dispatch.call(
        layer_norm_op,
        _layer_norm_forward,
        _layer_norm_autograd,
        tokens,
        weight,
        bias,
        _as_tokens(scale),
        _as_tokens(shift),
        float(eps),
        dispatch.backend_for("layer_norm", x.device, x.dtype, empty=x.numel() == 0),
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
    check_gated_residual(h, branch, gate)
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
    check_gated_residual(h, branch, gate)
    check_layer_norm(h, normalized_shape, weight, bias, eps, scale, shift, x_name="h")
    tokens = [t.unsqueeze(1) if t.dim() == 2 else t for t in (h, branch.to(h.dtype))]
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    h_new, y, _, _ = dispatch.call(
        gated_residual_layer_norm_op,
        _gated_residual_layer_norm_forward,
        _gated_residual_layer_norm_autograd,
        *tokens,
        _as_tokens(gate),
        weight,
        bias,
        _as_tokens(scale),
        _as_tokens(shift),
        float(eps),
        dispatch.backend_for("layer_norm", h.device, h.dtype, empty=h.numel() == 0),
    )
    return h_new.reshape(h.shape), y.reshape(h.shape)

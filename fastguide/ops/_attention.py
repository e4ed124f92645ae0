"""attention: softmax(q·kᵀ·scale)·v, the op's public function, its checks and its
registration as the custom op ``fastguide::attention`` (with its backward op and autograd
formula). The reference is fastguide.ops.reference.attention_forward; the kernels are
fastguide.kernels.attention (the cuda backend has none: attention runs there as under
``auto``)."""

# (custom_op reads these string annotations: torch 2.5 and 2.6 resolve them in torch's own
# namespace, so the signatures name only Tensor, builtins and typing's Optional)
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import dispatch
from .reference import compute_dtype
from .validation import FLOAT32_MAX, check_kernel_scalar, check_same_device, check_tensor

SCALE_MAX = FLOAT32_MAX / math.log2(math.e)  # the kernels' exponent is q·k·scale·log2 e, in float32


def check_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> float:
    """Checks the attention contract; returns the scale (D^-1/2 when None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, length, head_dim), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    check_same_device([("q", q), ("k", k), ("v", v)])
    batch, heads, _, head_dim = q.shape
    if tuple(k.shape[:2]) != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(
            f"k must have shape ({batch}, {heads}, Lk, {head_dim}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"sequence lengths must be at least 1, got Lq={q.shape[2]}, Lk={k.shape[2]}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= 256:
        raise ValueError(f"head_dim (last dim of q, k, v) must be a multiple of 8 from 8 to 256, got {head_dim}")
    if scale is None:
        return head_dim**-0.5
    scale = check_kernel_scalar("scale", scale)
    if abs(scale) > SCALE_MAX:  # (the kernels fold log2 e into the scale: past this it overflows to inf)
        raise ValueError(f"scale must lie within ±{SCALE_MAX:.4g} (float32's range over log2 e), got {scale!r}")
    return scale


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    with dispatch.launching_on(backend, q.device):
        return dispatch.implementation(backend, "attention").attention_forward(q, k, v, scale)


attention_op = torch.library.custom_op("fastguide::attention", mutates_args=())(_attention_forward)


@attention_op.register_fake
def _(q, k, v, scale, backend):
    return dispatch.empty_like(q), torch.empty(q.shape[:-1], dtype=compute_dtype(q), device=q.device)


def _attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    with dispatch.launching_on(backend, q.device):
        dq, dk, dv = dispatch.implementation(backend, "attention").attention_backward(
            grad_out, q, k, v, out, lse, scale
        )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


attention_backward_op = torch.library.custom_op("fastguide::attention_backward", mutates_args=())(_attention_backward)


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend):
    return tuple(dispatch.empty_like(t) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = dispatch.call(
        attention_backward_op, _attention_backward, None, grad_out, q, k, v, out, lse, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None


_attention_autograd = dispatch.register_autograd(
    attention_op, _attention_forward, _attention_grad, _attention_setup_context
)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Scaled dot-product attention: softmax(q·kᵀ·scale)·v.

    Args:
        q: (B, H, Lq, D) queries; k, v: (B, H, Lk, D). Any strides; D a multiple of 8 up
            to 256; float16, bfloat16, float32 (float64 on the torch backend).
        scale: softmax scale, D^-1/2 by default.

    Returns (B, H, Lq, D) in q's dtype. Accumulation and softmax run in float32.
    Differentiable in q, k and v.
    """
    scale = check_attention(q, k, v, scale)
    backend = dispatch.backend_for("attention", q.device, q.dtype, empty=q.numel() == 0)
    out, _ = dispatch.call(attention_op, _attention_forward, _attention_autograd, q, k, v, scale, backend)
    return out

"""group_norm: GroupNorm + ADM's scale-shift + SiLU, the op's public function, its checks
and its registration as the custom op ``fastguide::group_norm`` (with its backward op and
autograd formula). The reference is fastguide.ops.reference.group_norm_forward and
group_norm_backward; the kernels are fastguide.kernels.group_norm (Triton) and
csrc/group_norm.cu (through fastguide.ops.cuda_backend)."""

# (custom_op reads these string annotations: torch 2.5 and 2.6 resolve them in torch's own
# namespace, so the signatures spell Optional[Tensor], never Tensor | None or a local name)
from __future__ import annotations

from numbers import Integral
from typing import Optional

import torch
from torch import Tensor

from . import backends, dispatch, norms
from .contract import NormParameters
from .reference import ACTIVATIONS, compute_dtype, like_memory_format
from .validation import check_norm_parameters, check_tensor


def check_group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    scale: Tensor | None,
    shift: Tensor | None,
    activation: str | None,
) -> None:
    check_tensor("x", x, ndim_at_least=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, Integral) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    batch, channels = x.shape[0], x.shape[1]
    if channels % num_groups != 0:
        raise ValueError(
            f"channels of x ({channels}, dim 1 of shape {tuple(x.shape)}) must be divisible "
            f"by num_groups ({num_groups})"
        )
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(name, t)
            if t.dim() < 2 or tuple(t.shape[:2]) != (batch, channels) or any(s != 1 for s in t.shape[2:]):
                raise ValueError(
                    f"{name} must have shape ({batch}, {channels}) or ({batch}, {channels}, 1, ...) "
                    f"for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
                )
    check_norm_parameters("x", x, channels, weight, bias, scale, shift, eps)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


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
    with dispatch.launching_on(backend, x.device):
        y, mean, rstd = dispatch.implementation(backend, "group_norm").group_norm_forward(
            x, NormParameters(weight, bias, scale, shift), num_groups, eps, None if activation == "none" else activation
        )
    return like_memory_format(y, x), mean.contiguous(), rstd.contiguous()


# Elements a group may hold on the Triton backend (its kernels count them in int32): past
# it, auto runs the reference and an explicit 'triton' refuses.
TRITON_GROUP_LIMIT = 2**31

group_norm_op = torch.library.custom_op("fastguide::group_norm", mutates_args=())(_group_norm_forward)


@group_norm_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, activation, backend):
    y = like_memory_format(dispatch.empty_like(x), x)
    stats = torch.empty((x.shape[0], num_groups), dtype=compute_dtype(x), device=x.device)
    return y, stats, torch.empty_like(stats)


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
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dscale, dshift); an input that was None gets an empty tensor."""
    with dispatch.launching_on(backend, x.device):
        gradients = dispatch.implementation(backend, "group_norm").group_norm_backward(
            grad_y,
            x,
            NormParameters(weight, bias, scale, shift),
            mean,
            rstd,
            num_groups,
            None if activation == "none" else activation,
        )
    return norms.backward_outputs(x, *gradients)


group_norm_backward_op = torch.library.custom_op("fastguide::group_norm_backward", mutates_args=())(
    _group_norm_backward
)


@group_norm_backward_op.register_fake
def _(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, activation, backend):
    return norms.backward_fake(x, weight, bias, scale, shift)


def _group_norm_setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, activation, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.activation, ctx.backend = num_groups, activation, backend


def _group_norm_grad(ctx, grad_y, grad_mean, grad_rstd):
    grads = norms.grads(
        group_norm_backward_op,
        _group_norm_backward,
        grad_y,
        ctx.saved_tensors,
        ctx.num_groups,
        ctx.activation,
        ctx.backend,
    )
    return (*grads, None, None, None, None)


_group_norm_autograd = dispatch.register_autograd(
    group_norm_op, _group_norm_forward, _group_norm_grad, _group_norm_setup_context
)


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

    y = silu?(((x − mean)/√(var + eps)·weight + bias)·(1 + scale) + shift), statistics per
    (sample, group) in float32 for float16, bfloat16 and float32 x (ADM's GroupNorm32), in
    float64 for float64 x (which the torch backend alone takes).

    Args:
        x: (N, C, *spatial), contiguous or channels_last.
        num_groups: G, dividing C.
        weight, bias: (C,) affine parameters, or None.
        scale, shift: (N, C) or (N, C, 1, ...) per-sample modulation, or None.
        activation: None or "silu".

    Returns y in x's dtype and memory format. Differentiable in x, weight, bias, scale
    and shift.
    """
    check_group_norm(x, num_groups, weight, bias, eps, scale, shift, activation)
    num_groups = int(num_groups)  # (a NumPy integer too, as torch's group_norm takes)
    # The kernels index the per-channel and per-sample parameters densely.
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    per_sample = [None if t is None else t.reshape(x.shape[0], x.shape[1]).contiguous() for t in (scale, shift)]
    backend = dispatch.backend_for("group_norm", x.device, x.dtype, empty=x.numel() == 0)
    if backend == "triton" and x.numel() // (x.shape[0] * num_groups) >= TRITON_GROUP_LIMIT:
        # The Triton kernels count a group's elements in int32.
        if backends.get_backend() != "auto":
            raise RuntimeError(
                f"backend 'triton' cannot run group_norm on groups of {x.numel() // (x.shape[0] * num_groups)} "
                f"elements (it counts them in int32, below {TRITON_GROUP_LIMIT}): use backend 'torch' or 'cuda'"
            )
        backend = "torch"
    y, _, _ = dispatch.call(
        group_norm_op,
        _group_norm_forward,
        _group_norm_autograd,
        x,
        weight,
        bias,
        *per_sample,
        num_groups,
        float(eps),
        activation or "none",
        backend,
    )
    return y

"""The backward glue the two norms share (fastguide.ops._group_norm, _layer_norm): their
backward ops take (grad_y, x, weight, bias, scale, shift, mean, rstd, *options) and return
(dx, dweight, dbias, dscale, dshift), an empty tensor for each parameter that was None
(an op returns tensors)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from . import dispatch
from .reference import like_memory_format


def backward_outputs(
    x: Tensor, dx: Tensor, *param_grads: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A norm backward op's results: dx laid out like x, and an empty tensor for each of
    the four parameter gradients that is None (an op returns tensors)."""
    dweight, dbias, dscale, dshift = (x.new_empty(0) if g is None else g.contiguous() for g in param_grads)
    return like_memory_format(dx, x), dweight, dbias, dscale, dshift


def backward_fake(x: Tensor, *params: Tensor | None) -> tuple[Tensor, ...]:
    """The fake of a norm backward op's results (as ``backward_outputs``)."""
    return (like_memory_format(dispatch.empty_like(x), x),) + tuple(
        x.new_empty(0) if t is None else dispatch.empty_like(t) for t in params
    )


def grads(
    backward_op, backward: Callable[..., Any], grad_y: Tensor, saved: Sequence[Tensor | None], *options
) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias, dscale, dshift) by a norm's backward op (or ``backward``, its
    body, where ``dispatch.call`` says nothing needs the op) from the saved (x, weight,
    bias, scale, shift, mean, rstd); None for each parameter that was None."""
    dx, *param_grads = dispatch.call(backward_op, backward, None, grad_y, *saved, *options)
    return (dx, *(None if t is None else g for t, g in zip(saved[1:5], param_grads)))

"""The ``cuda`` backend: guided_step and group_norm on the hand-written kernels of csrc/.

Same functions as every backend module (fastguide.ops calls them). Each makes the
tensors what the kernels read (dense in one layout, x's storage dtype for every
x-shaped tensor, fp32 parameters and APG state: copies only where a tensor differs,
results written back into the caller's tensors), then calls the ``fastguide_cuda`` ops
that the extension registers (fastguide.extension loads or builds it on first use).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import extension
from .layout import (
    dense,
    guidance_stats,
    norm_format,
    prediction_maps,
    step_format,
    write_back,
)
from .reference import group_norm_parameter_grads


def _ops():
    """The op namespace of the extension (tests swap in the CPU harness's)."""
    extension.load()
    return getattr(torch.ops, extension.OPS_NAMESPACE)


def guided_step(
    model_output: Tensor,
    x: Tensor,
    *,
    alpha: float,
    sigma: float,
    prediction_type: str,
    guidance_scale: float | None,
    guidance_rescale: float,
    cfg_zero_star: bool,
    apg: bool,
    apg_eta: float,
    apg_norm_threshold: float,
    apg_momentum: float,
    apg_buffer: Tensor | None,
    clip_denoised: bool,
    grad: Tensor | None,
    grad_eps_scale: float,
    prev: Tensor | None,
    noise: Tensor | None,
    k_x: float,
    k_x0: float,
    k_eps: float,
    k_prev: float,
    k_noise: float,
    k_grad: float,
    log_variance_range: tuple[float, float] | None,
    out: Tensor,
    x0_out: Tensor | None,
) -> None:
    guided = guidance_scale is not None
    learned = log_variance_range is not None
    fmt = step_format(x, model_output.shape[1] != x.shape[1])
    dtype = x.dtype
    # Inputs the step does not use stay behind: the kernel reads only what it is given.
    prev = dense(prev if k_prev != 0.0 else None, fmt, dtype)
    noise = dense(noise if k_noise != 0.0 else None, fmt, dtype)
    grad = dense(grad if grad_eps_scale != 0.0 or k_grad != 0.0 else None, fmt, dtype)
    momentum = guided and apg and apg_momentum != 0.0
    targets = {"out": out, "x0_out": x0_out, "apg_buffer": apg_buffer if momentum else None}
    work = {
        name: dense(t, fmt, torch.float32 if name == "apg_buffer" else dtype) for name, t in targets.items()
    }
    log_min, log_max = log_variance_range if learned else (0.0, 0.0)
    # The order bindings.cpp reads them in.
    scalars = [
        guidance_scale if guided else 1.0, guidance_rescale, apg_eta, apg_norm_threshold, apg_momentum,
        *prediction_maps(prediction_type, alpha, sigma),
        alpha, sigma, 1.0 / alpha, 1.0 / sigma if sigma > 0 else 0.0, grad_eps_scale,
        k_x, k_x0, k_eps, k_prev, k_noise, k_grad, log_min, log_max,
    ]
    _ops().guided_step(
        dense(model_output, fmt, dtype), dense(x, fmt), prev, noise, grad,
        work["apg_buffer"], work["out"], work["x0_out"], [float(s) for s in scalars],
        guidance_stats(guided, cfg_zero_star, apg, guidance_rescale), guided, bool(clip_denoised), learned,
    )
    write_back(targets, work)


def _fp32_parameters(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.float().contiguous() for t in tensors]


def group_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    num_groups: int,
    eps: float,
    activation: str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    x = dense(x, norm_format(x))
    return _ops().group_norm_forward(
        x, *_fp32_parameters(weight, bias, scale, shift), num_groups, float(eps), activation == "silu"
    )


def group_norm_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    eps: float,
    activation: str | None,
) -> tuple[Tensor | None, ...]:
    fmt = norm_format(x)
    x = dense(x, fmt)
    dx, sums = _ops().group_norm_backward(
        dense(grad_y, fmt, x.dtype), x, *_fp32_parameters(weight, bias, scale, shift),
        mean.float().contiguous(), rstd.float().contiguous(), num_groups, activation == "silu",
    )
    return (dx, *group_norm_parameter_grads(sums, weight, bias, scale, shift))

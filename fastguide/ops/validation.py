"""Argument checks at the op boundary (``fastguide.ops``), so kernels can trust their inputs.

Every failure is a standard exception whose message names the argument, what was
expected and what was given. The checks read only shapes, dtypes, devices and Python
scalars: no tensor data, so no host-device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .reference import ACTIVATIONS, PREDICTION_TYPES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, ndim_at_least: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    if ndim_at_least is not None and t.dim() < ndim_at_least:
        raise ValueError(
            f"{name} must have at least {ndim_at_least} dims, got shape {tuple(t.shape)}"
        )
    return t


def check_same_device(named: Sequence[tuple[str, Tensor | None]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def check_shape(name: str, t: Tensor | None, expected: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_attention(q: object, k: object, v: object, scale: object) -> float:
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
            f"k must have shape ({batch}, {heads}, Lk, {head_dim}) to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"sequence lengths must be at least 1, got Lq={q.shape[2]}, Lk={k.shape[2]}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= 256:
        raise ValueError(f"head_dim (last dim of q, k, v) must be a multiple of 8 from 8 to 256, got {head_dim}")
    if scale is None:
        return head_dim**-0.5
    return check_finite("scale", scale)


def check_group_norm(
    x: object,
    num_groups: object,
    weight: object,
    bias: object,
    eps: object,
    scale: object,
    shift: object,
    activation: object,
) -> None:
    check_tensor("x", x, ndim_at_least=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    batch, channels = x.shape[0], x.shape[1]
    if channels % num_groups != 0:
        raise ValueError(
            f"channels of x ({channels}, dim 1 of shape {tuple(x.shape)}) must be divisible "
            f"by num_groups ({num_groups})"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t)
            check_shape(name, t, (channels,))
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(name, t)
            if t.dim() < 2 or tuple(t.shape[:2]) != (batch, channels) or any(s != 1 for s in t.shape[2:]):
                raise ValueError(
                    f"{name} must have shape ({batch}, {channels}) or ({batch}, {channels}, 1, ...) "
                    f"for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
                )
    check_same_device([("x", x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)])
    if check_finite("eps", eps) <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_guided_step(
    model_output: object,
    x: object,
    tensors: dict[str, object],
    scalars: dict[str, object],
    *,
    prediction_type: object,
    guidance_scale: object,
    cfg_zero_star: bool,
    apg: bool,
    clip_denoised: bool,
    log_variance_range: object,
) -> None:
    """Checks the guided_step contract (see reference.guided_step for the math).

    ``tensors`` holds the optional same-shape-as-x inputs (prev, noise, grad, apg_buffer,
    x0_out) and ``out``; ``scalars`` every float coefficient.
    """
    check_tensor("model_output", model_output, ndim_at_least=2)
    check_tensor("x", x, ndim_at_least=2)
    for name, value in scalars.items():
        check_finite(name, value)
    if guidance_scale is not None:
        check_finite("guidance_scale", guidance_scale)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    batch, channels, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    rows = model_output.shape[0]
    if guidance_scale is not None:
        if rows % 2 != 0:
            raise ValueError(
                "model_output must hold an even batch [cond; uncond] when guidance_scale is "
                f"given, got batch {rows}"
            )
        if rows != 2 * batch:
            raise ValueError(
                f"model_output must have batch 2·{batch} = {2 * batch} ([cond; uncond] for x of "
                f"batch {batch}) when guidance_scale is given, got {rows}"
            )
    elif rows != batch:
        raise ValueError(
            f"model_output must have batch {batch} (that of x) without guidance_scale, got {rows}; "
            "pass guidance_scale for a [cond; uncond] output"
        )
    if model_output.shape[1] not in (channels, 2 * channels) or tuple(model_output.shape[2:]) != spatial:
        raise ValueError(
            f"model_output must have {channels} or {2 * channels} channels and spatial shape "
            f"{spatial} to match x {tuple(x.shape)}, got {tuple(model_output.shape)}"
        )
    if log_variance_range is not None:
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"log_variance_range needs a model_output with 2·{channels} channels "
                f"(prediction then variance), got {model_output.shape[1]}"
            )
        if len(log_variance_range) != 2:
            raise ValueError(f"log_variance_range must be (min_log, max_log), got {log_variance_range!r}")
        for part, value in zip(("min", "max"), log_variance_range):
            check_finite(f"log_variance_range {part}", value)

    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(name, t)
        if name == "out":
            if tuple(t.shape) not in (tuple(x.shape), (2 * batch, channels) + spatial):
                raise ValueError(
                    f"out must have shape {tuple(x.shape)} or {(2 * batch, channels) + spatial} "
                    f"(both halves of the next [cond; uncond] input), got {tuple(t.shape)}"
                )
        else:
            check_shape(name, t, tuple(x.shape))
    check_same_device([("model_output", model_output), ("x", x), *tensors.items()])

    if scalars["alpha"] <= 0:
        raise ValueError(f"alpha must be positive, got {scalars['alpha']}")
    if scalars["sigma"] < 0:
        raise ValueError(f"sigma must be non-negative, got {scalars['sigma']}")
    if scalars["sigma"] == 0 and (clip_denoised or prediction_type == "sample"):
        raise ValueError("sigma must be positive to derive eps from x0 (clip_denoised or prediction_type='sample')")

    needs = (
        ("k_prev", "prev"),
        ("k_noise", "noise"),
        ("k_grad", "grad"),
        ("grad_eps_scale", "grad"),
        ("apg_momentum", "apg_buffer"),
    )
    for coefficient, tensor_name in needs:
        if scalars[coefficient] != 0 and tensors[tensor_name] is None:
            raise ValueError(f"{coefficient} is {scalars[coefficient]} but {tensor_name} was not given")

    guidance_rescale = scalars["guidance_rescale"]
    variants = {"guidance_rescale": guidance_rescale != 0, "cfg_zero_star": cfg_zero_star, "apg": apg}
    for variant, on in variants.items():
        if on and guidance_scale is None:
            raise ValueError(f"{variant} needs guidance_scale (a [cond; uncond] model_output)")
    if apg and cfg_zero_star:
        raise ValueError("apg and cfg_zero_star are alternative combines; choose one")
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if scalars["apg_norm_threshold"] < 0:
        raise ValueError(f"apg_norm_threshold must be non-negative (0 turns it off), got {scalars['apg_norm_threshold']}")

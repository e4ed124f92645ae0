"""Argument checks at the op boundary (``fastguide.ops``), so kernels can trust their inputs.

Every failure is a standard exception whose message names the argument, what was
expected and what was given. The checks read only shapes, dtypes, devices and Python
scalars: no tensor data, so no host-device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# guided_step's kernels take their scalars (and 1/alpha, 1/sigma) as float32.
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # its smallest normal number


def check_tensor(name: str, t: object, ndim_at_least: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype {t.dtype}"
        )
    if ndim_at_least is not None and t.dim() < ndim_at_least:
        raise ValueError(f"{name} must have at least {ndim_at_least} dims, got shape {tuple(t.shape)}")
    return t


def check_same_device(named: Sequence[tuple[str, Tensor | None]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    device = first.device
    for name, t in present[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one device"
            )


def check_shape(name: str, t: Tensor | None, expected: tuple[int, ...]) -> None:
    if t is not None and t.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_finite(name: str, value: object) -> float:
    """A finite real number (a NumPy scalar too, not a bool), as a Python float."""
    if type(value) is float:  # the common case, without the abstract class's check
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_kernel_scalar(name: str, value: object) -> float:
    """A finite real number within float32's range, the kernels' scalar type."""
    value = check_finite(name, value)
    if abs(value) > FLOAT32_MAX:
        raise ValueError(
            f"{name} must lie within float32's range (|value| <= {FLOAT32_MAX:.4g}, the kernels' "
            f"scalar type), got {value!r}"
        )
    return value


def check_norm_parameters(
    x_name: str,
    x: Tensor,
    size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
) -> None:
    """The checks the norms share, after each checked its own scale and shift: weight and
    bias None or (size,) tensors, every tensor on x's device, eps within float32's normal
    range (the statistics' type on every backend but float64's reference)."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t)
            check_shape(name, t, (size,))
    check_same_device([(x_name, x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)])
    if not norm_eps_in_range(check_finite("eps", eps)):
        raise ValueError(
            f"eps must be positive and within float32's normal range [{torch.finfo(torch.float32).tiny:.4g}, "
            f"{torch.finfo(torch.float32).max:.4g}] (the statistics' type), got {eps}"
        )


def norm_eps_in_range(eps: float) -> bool:
    """Whether the norms take ``eps``: within float32's normal range (below its smallest
    normal number eps rounds to 0 or a subnormal there, and a constant group's variance +
    eps to 0: NaN from finite input)."""
    return FLOAT32_TINY <= eps <= FLOAT32_MAX

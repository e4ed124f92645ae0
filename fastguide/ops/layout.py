"""Tensor layouts the compiled kernels read, shared by the Triton and CUDA launchers.

A kernel indexes every x-shaped tensor with one dense layout (NCHW-contiguous, or
channels_last for 4-D tensors): these helpers give a launcher that layout, making
copies only for tensors that are not already dense in it, and write results computed
in such a copy back into the caller's tensor afterwards (the ops' in-place contract).
They also say which per-sample reduction a guidance variant needs (both guided_step
launchers ask), and merge the per-program sums of guided_step's similarity output.
"""

from __future__ import annotations

from typing import overload

import torch
from torch import Tensor

from .contract import GuidanceCombine
from .reference import cosine_from_sums

# Per-sample reduction a guided_step variant needs before its elementwise pass.
STATS_NONE, STATS_ZERO_STAR, STATS_APG, STATS_PLAIN, STATS_TANGENTIAL = 0, 1, 2, 3, 4


def guidance_stats(combine: GuidanceCombine | None) -> int:
    """STATS_* for a combine: CFG-Zero* and APG need their sums; plain CFG only for rescale."""
    if combine is None:
        return STATS_NONE
    if combine.variant == "zero_star":
        return STATS_ZERO_STAR
    if combine.variant == "apg":
        return STATS_APG
    if combine.variant == "tangential":
        return STATS_TANGENTIAL
    return STATS_PLAIN if combine.rescale > 0 else STATS_NONE


def step_format(x: Tensor, learned_variance: bool) -> torch.memory_format:
    """guided_step's layout: x's own when every kernel offset can follow it, else contiguous
    (a learned-variance model output splits channels, which only NCHW keeps per sample)."""
    if not learned_variance and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def norm_format(x: Tensor) -> torch.memory_format:
    """GroupNorm's layout: channels_last for a 4-D channels_last x, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@overload
def dense(t: Tensor, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> Tensor: ...
@overload
def dense(t: None, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> None: ...
@overload
def dense(t: Tensor | None, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> Tensor | None: ...


def dense(t: Tensor | None, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> Tensor | None:
    """t itself when dense in fmt (and of dtype, when given), else such a copy."""
    if t is None:
        return None
    if t.is_contiguous(memory_format=fmt) and (dtype is None or t.dtype == dtype):
        return t
    return t.to(dtype=dtype or t.dtype).contiguous(memory_format=fmt)


def write_back(targets: dict[str, Tensor | None], work: dict[str, Tensor | None]) -> None:
    """Copy each result computed in a stand-in (work[name] is not targets[name]) back."""
    for name, target in targets.items():
        result = work[name]
        if target is not None and result is not None and result is not target:
            target.copy_(result)


def merge_similarity(partials: Tensor, similarity: Tensor) -> None:
    """similarity[b] = cos(x̂0_c, x̂0_u) of sample b from the elementwise pass's partial
    sums: partials[b, i] = (Σx̂0_c·x̂0_u, Σx̂0_c·x̂0_c, Σx̂0_u·x̂0_u) over the elements of
    program (or block) i of sample b, in float32 (x̂0_c, x̂0_u: the x0 predictions of c and
    u alone, fastguide.ops.reference.x0_similarity). They are summed in float64, in a fixed order (deterministic),
    and the cosine taken there (fastguide.ops.reference.cosine_from_sums); a few small ops
    on B·programs·3 values, next to the pass's B·C·HW elements."""
    similarity.copy_(cosine_from_sums(*partials.sum(dim=1, dtype=torch.float64).unbind(dim=-1)))

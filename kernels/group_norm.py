"""Triton GroupNorm with fused affine, ADM scale-shift and SiLU: forward and backward.

Forward, for x (N, C, S) grouped into G groups of Cg = C/G channels:
  mean, var per (n, g) over Cg·S elements (fp32);  x̂ = (x − mean)·rstd
  z = (x̂·w[c] + b[c])·(1 + scale[n, c]) + shift[n, c];  y = silu(z) or z.
Two launches, each on a grid of (N·G) × SPLIT programs, every program owning one
spatial chunk of one group, so that batch 1–2 still fills the GPU:
  1. `_stats_kernel`: shifted sums Σ(x − K), Σ(x − K)² of the chunk, K = the group's
     first element (the shift keeps E[x²] − E[x]² from cancelling when |mean| ≫ std);
  2. `_apply_kernel`: merges the group's SPLIT partials in a fixed order, writes mean
     and rstd (chunk 0 only, saved for backward), normalises and writes y.
Bytes: read x twice, write y: 3·E·s_x, plus O(N·C) parameters (E = N·C·S).
FLOPs ~10 per element (+4 with SiLU): memory-bound.

Backward, with dz = dy·silu'(z) (silu'(z) = σ(z)·(1 + z·(1 − σ(z))), taken at the
pre-activation z, which the kernel recomputes from x), A[n, c] = Σ_s dz and
B[n, c] = Σ_s dz·x̂:
  dshift = A;  dscale = w·B + b·A;  dbias = Σ_n (1 + scale)·A;  dweight = Σ_n (1 + scale)·B
  dx = rstd·(dx̂ − mean_g(dx̂) − x̂·mean_g(dx̂·x̂)),  dx̂ = dz·(1 + scale)·w, where
  Σ_g dx̂ = Σ_{c∈g} w(1 + scale)·A and Σ_g dx̂·x̂ = Σ_{c∈g} w(1 + scale)·B.
Two launches on the same grid: `_backward_sums_kernel` writes per-chunk (A, B);
`_backward_dx_kernel` merges them, writes dx and (chunk 0) the merged (A, B), from
which the (N, C)-sized parameter gradients follow in a few tiny torch ops.
Bytes: read x and dy twice, write dx: 5·E·s_x.

Layouts: NCHW (stride_c = S, stride_s = 1) and channels_last (stride_c = 1,
stride_s = C) through the same kernels; Triton specialises the stride that is 1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastguide.ops.contract import NormParameters
from fastguide.ops.layout import norm_format
from fastguide.ops.reference import group_norm_parameter_grads

NUM_WARPS = 4
TILE = 2048  # elements per (channel-block × spatial-block) tile


@triton.jit
def _program_group(G, Cg):
    """(group = n·G + g, spatial chunk, n, first channel) of this program."""
    group = tl.program_id(0)
    n = group // G
    return group, tl.program_id(1), n, (group % G) * Cg


@triton.jit
def _tile_offsets(
    c_start, s_start, group_start_c, Cg, S, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
):
    cc = c_start + tl.arange(0, BLOCK_C)
    ss = s_start + tl.arange(0, BLOCK_S)
    mask = (cc < Cg)[:, None] & (ss < S)[None, :]
    offsets = (group_start_c + cc).to(tl.int64)[:, None] * stride_c + ss.to(tl.int64)[None, :] * stride_s
    return cc, offsets, mask


@triton.jit
def _stats_kernel(
    x_ptr,
    partial_ptr,
    C,
    S,
    G,
    Cg,
    stride_c,
    stride_s,
    s_per_chunk,
    SPLIT_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    group, chunk, n, group_start_c = _program_group(G, Cg)
    base = x_ptr + n.to(tl.int64) * C * S
    shift = tl.load(base + group_start_c.to(tl.int64) * stride_c).to(tl.float32)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    s_begin = chunk * s_per_chunk
    for c_start in range(0, Cg, BLOCK_C):
        for s_off in range(0, s_per_chunk, BLOCK_S):
            _, offsets, mask = _tile_offsets(
                c_start, s_begin + s_off, group_start_c, Cg, S, stride_c, stride_s, BLOCK_C, BLOCK_S
            )
            d = tl.where(mask, tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
            acc1 += d
            acc2 += d * d
    out = partial_ptr + (group * SPLIT_POW2 + chunk) * 2
    tl.store(out, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit
def _group_mean_rstd(
    x_ptr, partial_ptr, group, n, group_start_c, C, S, Cg, stride_c, eps, SPLIT, SPLIT_POW2: tl.constexpr
):
    """Merge a group's partial shifted sums, in a fixed order, into (mean, rstd)."""
    chunks = tl.arange(0, SPLIT_POW2)
    valid = chunks < SPLIT
    rows = partial_ptr + (group * SPLIT_POW2 + chunks) * 2
    s1 = tl.sum(tl.load(rows, mask=valid, other=0.0), axis=0)
    s2 = tl.sum(tl.load(rows + 1, mask=valid, other=0.0), axis=0)
    count = (Cg * S).to(tl.float32)
    shift = tl.load(x_ptr + n.to(tl.int64) * C * S + group_start_c.to(tl.int64) * stride_c).to(tl.float32)
    mean_shifted = s1 / count
    var = s2 / count - mean_shifted * mean_shifted
    # Statistics that overflowed float32 (or met a NaN) give NaN, on every backend.
    rstd = tl.where(var < float("inf"), 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps), float("nan"))
    return shift + mean_shifted, rstd


@triton.jit
def _channel_params(
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    n,
    channel,
    c_mask,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    one_plus_scale = tl.full([BLOCK_C], 1.0, tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + channel, mask=c_mask, other=1.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + channel, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        one_plus_scale += tl.load(scale_ptr + n * scale_stride_n + channel * scale_stride_c, mask=c_mask, other=0.0).to(
            tl.float32
        )
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + n * shift_stride_n + channel * shift_stride_c, mask=c_mask, other=0.0).to(
            tl.float32
        )
    return w, b, one_plus_scale, shift


@triton.jit
def _apply_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    partial_ptr,
    mean_ptr,
    rstd_ptr,
    C,
    S,
    G,
    Cg,
    stride_c,
    stride_s,
    s_per_chunk,
    SPLIT,
    eps,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    SPLIT_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    group, chunk, n, group_start_c = _program_group(G, Cg)
    mean, rstd = _group_mean_rstd(
        x_ptr, partial_ptr, group, n, group_start_c, C, S, Cg, stride_c, eps, SPLIT, SPLIT_POW2
    )
    if chunk == 0:
        tl.store(mean_ptr + group, mean)
        tl.store(rstd_ptr + group, rstd)
    sample = n.to(tl.int64) * C * S
    s_begin = chunk * s_per_chunk
    for c_start in range(0, Cg, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        c_mask = cc < Cg
        channel = group_start_c + cc
        w, b, one_plus_scale, shift = _channel_params(
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            n,
            channel,
            c_mask,
            scale_stride_n,
            scale_stride_c,
            shift_stride_n,
            shift_stride_c,
            HAS_W,
            HAS_B,
            HAS_SCALE,
            HAS_SHIFT,
            BLOCK_C,
        )
        # Fold normalisation, affine and scale-shift into y = x·gain + offset per channel.
        gain = w * one_plus_scale
        offset = b * one_plus_scale + shift
        gain = gain * rstd
        offset = offset - mean * gain
        for s_off in range(0, s_per_chunk, BLOCK_S):
            _, offsets, mask = _tile_offsets(
                c_start, s_begin + s_off, group_start_c, Cg, S, stride_c, stride_s, BLOCK_C, BLOCK_S
            )
            x = tl.load(x_ptr + sample + offsets, mask=mask, other=0.0).to(tl.float32)
            z = x * gain[:, None] + offset[:, None]
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(y_ptr + sample + offsets, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz_and_xhat(x, dy, mean, rstd, w, b, one_plus_scale, shift, SILU: tl.constexpr):
    """(dz, x̂) of a tile; per-channel vectors are already broadcast to the tile."""
    x_hat = (x - mean) * rstd
    dz = dy
    if SILU:
        z = (x_hat * w + b) * one_plus_scale + shift
        sig = tl.sigmoid(z)
        dz = dy * sig * (1.0 + z * (1.0 - sig))
    return dz, x_hat


@triton.jit
def _backward_sums_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    partial_ptr,
    C,
    S,
    G,
    Cg,
    stride_c,
    stride_s,
    s_per_chunk,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    SPLIT_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per-chunk A = Σ_s dz and B = Σ_s dz·x̂ for each channel of one group."""
    group, chunk, n, group_start_c = _program_group(G, Cg)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    sample = n.to(tl.int64) * C * S
    s_begin = chunk * s_per_chunk
    for c_start in range(0, Cg, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        c_mask = cc < Cg
        channel = group_start_c + cc
        w, b, one_plus_scale, shift = _channel_params(
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            n,
            channel,
            c_mask,
            scale_stride_n,
            scale_stride_c,
            shift_stride_n,
            shift_stride_c,
            HAS_W,
            HAS_B,
            HAS_SCALE,
            HAS_SHIFT,
            BLOCK_C,
        )
        acc_a = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for s_off in range(0, s_per_chunk, BLOCK_S):
            _, offsets, mask = _tile_offsets(
                c_start, s_begin + s_off, group_start_c, Cg, S, stride_c, stride_s, BLOCK_C, BLOCK_S
            )
            x = tl.load(x_ptr + sample + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + sample + offsets, mask=mask, other=0.0).to(tl.float32)
            dz, x_hat = _dz_and_xhat(
                x, dy, mean, rstd, w[:, None], b[:, None], one_plus_scale[:, None], shift[:, None], SILU
            )
            acc_a += tl.where(mask, dz, 0.0)
            acc_b += tl.where(mask, dz * x_hat, 0.0)
        out = partial_ptr + ((n * C + channel) * SPLIT_POW2 + chunk) * 2
        tl.store(out, tl.sum(acc_a, axis=1), mask=c_mask)
        tl.store(out + 1, tl.sum(acc_b, axis=1), mask=c_mask)


@triton.jit
def _backward_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    partial_ptr,
    sums_ptr,
    C,
    S,
    G,
    Cg,
    stride_c,
    stride_s,
    s_per_chunk,
    SPLIT,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    SPLIT_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    group, chunk, n, group_start_c = _program_group(G, Cg)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    chunks = tl.arange(0, SPLIT_POW2)
    # Group sums Σ dx̂ and Σ dx̂·x̂ from the merged per-channel (A, B).
    sum_dxhat = tl.full([], 0.0, tl.float32)
    sum_dxhat_xhat = tl.full([], 0.0, tl.float32)
    for c_start in range(0, Cg, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        c_mask = cc < Cg
        channel = group_start_c + cc
        w, b, one_plus_scale, shift = _channel_params(
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            n,
            channel,
            c_mask,
            scale_stride_n,
            scale_stride_c,
            shift_stride_n,
            shift_stride_c,
            HAS_W,
            HAS_B,
            HAS_SCALE,
            HAS_SHIFT,
            BLOCK_C,
        )
        rows = partial_ptr + ((n * C + channel)[:, None] * SPLIT_POW2 + chunks[None, :]) * 2
        valid = c_mask[:, None] & (chunks < SPLIT)[None, :]
        a_sum = tl.sum(tl.load(rows, mask=valid, other=0.0), axis=1)
        b_sum = tl.sum(tl.load(rows + 1, mask=valid, other=0.0), axis=1)
        if chunk == 0:
            tl.store(sums_ptr + (n * C + channel) * 2, a_sum, mask=c_mask)
            tl.store(sums_ptr + (n * C + channel) * 2 + 1, b_sum, mask=c_mask)
        factor = tl.where(c_mask, w * one_plus_scale, 0.0)
        sum_dxhat += tl.sum(factor * a_sum, axis=0)
        sum_dxhat_xhat += tl.sum(factor * b_sum, axis=0)
    count = (Cg * S).to(tl.float32)
    mean_dxhat = sum_dxhat / count
    mean_dxhat_xhat = sum_dxhat_xhat / count

    sample = n.to(tl.int64) * C * S
    s_begin = chunk * s_per_chunk
    for c_start in range(0, Cg, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        c_mask = cc < Cg
        channel = group_start_c + cc
        w, b, one_plus_scale, shift = _channel_params(
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            n,
            channel,
            c_mask,
            scale_stride_n,
            scale_stride_c,
            shift_stride_n,
            shift_stride_c,
            HAS_W,
            HAS_B,
            HAS_SCALE,
            HAS_SHIFT,
            BLOCK_C,
        )
        for s_off in range(0, s_per_chunk, BLOCK_S):
            _, offsets, mask = _tile_offsets(
                c_start, s_begin + s_off, group_start_c, Cg, S, stride_c, stride_s, BLOCK_C, BLOCK_S
            )
            x = tl.load(x_ptr + sample + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + sample + offsets, mask=mask, other=0.0).to(tl.float32)
            dz, x_hat = _dz_and_xhat(
                x, dy, mean, rstd, w[:, None], b[:, None], one_plus_scale[:, None], shift[:, None], SILU
            )
            dx_hat = dz * (one_plus_scale * w)[:, None]
            dx = rstd * (dx_hat - mean_dxhat - x_hat * mean_dxhat_xhat)
            tl.store(dx_ptr + sample + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _layout(x: Tensor) -> tuple[Tensor, int, int]:
    """(x dense in NCHW or channels_last, stride_c, stride_s) in elements."""
    if norm_format(x) == torch.channels_last:
        return x, 1, x.shape[1]
    return x.contiguous(), math.prod(x.shape[2:]), 1


def _grid(x: Tensor, groups: int, channels_per_group: int, spatial: int) -> dict:
    """Tile shape and the split of each (n, group) over spatial chunks."""
    block_c = min(triton.next_power_of_2(channels_per_group), 16)
    block_s = max(16, min(TILE // block_c, triton.next_power_of_2(spatial)))
    programs_wanted = 4 * _multiprocessors(x.device)
    split = max(1, min(triton.cdiv(programs_wanted, x.shape[0] * groups), triton.cdiv(spatial, block_s), 64))
    s_per_chunk = triton.cdiv(triton.cdiv(spatial, split), block_s) * block_s
    split = triton.cdiv(spatial, s_per_chunk)
    return dict(
        block_c=block_c, block_s=block_s, split=split, split_pow2=triton.next_power_of_2(split), s_per_chunk=s_per_chunk
    )


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: small, but enough to exercise the split


def _strides(t: Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def group_norm_forward(
    x: Tensor, params: NormParameters, num_groups: int, eps: float, activation: str | None
) -> tuple[Tensor, Tensor, Tensor]:
    weight, bias, scale, shift = params
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    x, stride_c, stride_s = _layout(x)
    cfg = _grid(x, num_groups, c // num_groups, spatial)
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    partials = torch.empty((n * num_groups, cfg["split_pow2"], 2), dtype=torch.float32, device=x.device)
    grid = (n * num_groups, cfg["split"])
    _stats_kernel[grid](
        x,
        partials,
        c,
        spatial,
        num_groups,
        c // num_groups,
        stride_c,
        stride_s,
        cfg["s_per_chunk"],
        SPLIT_POW2=cfg["split_pow2"],
        BLOCK_C=cfg["block_c"],
        BLOCK_S=cfg["block_s"],
        num_warps=NUM_WARPS,
    )
    _apply_kernel[grid](
        x,
        y,
        weight,
        bias,
        scale,
        shift,
        partials,
        mean,
        rstd,
        c,
        spatial,
        num_groups,
        c // num_groups,
        stride_c,
        stride_s,
        cfg["s_per_chunk"],
        cfg["split"],
        eps,
        *_strides(scale),
        *_strides(shift),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        SILU=activation == "silu",
        SPLIT_POW2=cfg["split_pow2"],
        BLOCK_C=cfg["block_c"],
        BLOCK_S=cfg["block_s"],
        num_warps=NUM_WARPS,
    )
    return y, mean, rstd


def group_norm_backward(
    dy: Tensor, x: Tensor, params: NormParameters, mean: Tensor, rstd: Tensor, num_groups: int, activation: str | None
) -> tuple[Tensor | None, ...]:
    weight, bias, scale, shift = params
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    x, stride_c, stride_s = _layout(x)
    dy = dy.contiguous(memory_format=torch.channels_last if stride_c == 1 and x.dim() == 4 else torch.contiguous_format)
    cfg = _grid(x, num_groups, c // num_groups, spatial)
    dx = torch.empty_like(x)
    partials = torch.empty((n * c, cfg["split_pow2"], 2), dtype=torch.float32, device=x.device)
    sums = torch.empty((n, c, 2), dtype=torch.float32, device=x.device)
    grid = (n * num_groups, cfg["split"])
    flags = dict(
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        SILU=activation == "silu",
        SPLIT_POW2=cfg["split_pow2"],
        BLOCK_C=cfg["block_c"],
        BLOCK_S=cfg["block_s"],
        num_warps=NUM_WARPS,
    )
    _backward_sums_kernel[grid](
        x,
        dy,
        weight,
        bias,
        scale,
        shift,
        mean,
        rstd,
        partials,
        c,
        spatial,
        num_groups,
        c // num_groups,
        stride_c,
        stride_s,
        cfg["s_per_chunk"],
        *_strides(scale),
        *_strides(shift),
        **flags,
    )
    _backward_dx_kernel[grid](
        x,
        dy,
        dx,
        weight,
        bias,
        scale,
        shift,
        mean,
        rstd,
        partials,
        sums,
        c,
        spatial,
        num_groups,
        c // num_groups,
        stride_c,
        stride_s,
        cfg["s_per_chunk"],
        cfg["split"],
        *_strides(scale),
        *_strides(shift),
        **flags,
    )
    # Parameter gradients from the (N, C) sums: O(N·C) work.
    return (dx, *group_norm_parameter_grads(sums, params))

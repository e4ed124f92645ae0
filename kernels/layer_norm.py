"""Triton LayerNorm over the last dim with DiT's adaLN modulation and the fused gated
residual: forward and backward.

Forward, for x (N, L, D) seen as R = N·L rows of D elements:
  (residual form: x = round(h + gate·branch), stored as h_new, then normalised)
  mean, var per row (fp32, two passes over the row held in registers: Σx, then Σ(x − mean)²,
  so nothing cancels when |mean| ≫ std; each a sum per segment, then per row);
  x̂ = (x − mean)·rstd
  y = (x̂·w + b)·(1 + scale[n, l]) + shift[n, l]
with scale/shift rows indexed by (n, l)·(stride_n, stride_l): stride_l = 0 broadcasts a
per-sample (N, 1, D) row over the tokens. One launch; each program owns whole rows, laid
out as power-of-two segments of a [SEGMENTS, SEGMENT] tile (forward_tile), so that a width
like DiT's 1152 = 9·128 fills the tile instead of padding each row to 2048.
Bytes: read x, write y: 2·E·s_x (residual form: read h, branch; write h_new, y: 4·E·s_x),
plus O(N·L·D) for per-token modulation. ~8 FLOPs per element: memory-bound.

Backward, with dy the gradient of y, da = dy·(1 + scale), dx̂ = da·w:
  dx = rstd·(dx̂ − mean_D(dx̂) − x̂·mean_D(dx̂·x̂))
  per-token dshift = dy, dscale = dy·(x̂·w + b) (written elementwise);
  per-sample sums over each chunk of a sample's tokens A = Σdy, B = Σdy·x̂, C = Σda,
  E = Σda·x̂, from which reference.layer_norm_parameter_grads forms dweight, dbias and the
  per-sample dscale, dshift in a few (N, D)-sized torch ops (merged in a fixed order:
  deterministic; the same formulas as group_norm's, reference.norm_parameter_grads).
Two launches, as the cuda backend's: _layer_norm_dx_kernel on the forward's tile (whole
rows in registers, the row sums gathered per row), and _layer_norm_column_sums_kernel on
(column block, token chunk, sample) programs, so the sums never mix samples.
Bytes: read x and dy twice, write dx: 5·E·s_x. One launch could read them once (3·E), but
then every thread holds its columns' running sums beside the row: at DiT's width that took
128 registers and a row padded to 2048, ~27 KB really in flight an SM where the floor asks
64 (tools/occupancy.py); apart, the dx holds 80-96 KB there and the column sums 100-120
(Triton 3.9; BENCHMARKS.md has 3.6's).

Rows are held whole in registers: D ≤ MAX_D. Wider rows (no DiT has them) run on the
reference formulas.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastguide.ops import reference
from fastguide.ops.contract import NormParameters

MAX_D = 16384
# The plain forward's one-warp programs (rows up to 512 wide) at most this many registers
# where x is 16-bit and there is no weight or bias (DiT's adaLN form): all 32 blocks an SM
# holds fit (at D=72 the compiler took 72, 28 blocks, 56 KB in flight; capped, 64 KB, no
# spill under Triton 3.6 or 3.9, nor at 8-512 columns under 3.9). fp32, or a weight and
# bias, spill 8-128 bytes capped; the residual form (4 more loads a thread) holds 72-96 KB
# uncapped and spills capped.
NARROW_FORWARD_MAX_REGISTERS = 64
# The 8-warp dx launch's register cap: two blocks an SM. Triton 3.6 (the GPU image's) takes
# 140-145 unbounded at DiT's width on sm_90, one block: 32 KB in flight, not 64.
DX_MAX_REGISTERS = 128
COLUMN_TOKENS = 8  # tokens a step of the column sums (column_tile)
# The column sums' one-warp programs the grid aims at an SM: what one holds of them is 16-20
# under Triton 3.9, which issues 10-14 of a lane's 16-byte loads together, and 24-28 under
# the GPU image's 3.6, which issues 6-7 (24 of those: 72 KB in flight, 16: 48). Each
# writes its 4 sums of COLUMNS columns (4 KB), so more programs add partials: DiT's
# 16 × 1024 × 1152 on 132 SMs takes 32 chunks of 32 tokens (chunks are whole multiples
# of 16), 9.4 MB beside the 75 MB of x and dy (16 a SM: 22 of 48 tokens, 6.5 MB).
COLUMN_PROGRAMS_PER_SM = 24


@triton.jit
def _row_input(h_ptr, branch_ptr, gate_ptr, offsets, gate_offsets, mask, RESIDUAL: tl.constexpr):
    """The fp32 row tile that is normalised: x, or h + gate·branch rounded to h's dtype."""
    x = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        branch = tl.load(branch_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + gate_offsets, mask=mask, other=0.0).to(tl.float32)
        # Rounded as stored: the norm sees the h_new the caller gets (the unfused pair's input).
        x = (x + gate * branch).to(h_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _param_offsets(n, l, cols, stride_n, stride_l):
    """Offsets of an (N, 1 | L, D) parameter at rows (n, l) ([R]) and columns cols (2-D,
    [R or 1, C]): an [R, C] tile."""
    return (n * stride_n + l * stride_l)[:, None] + cols


@triton.jit
def _segments_to_row(belongs, per_segment):
    """[ROWS_POW2] sums over each row's segments of a [SEGMENTS] value (belongs[r, j]:
    segment j is row r's)."""
    return tl.sum(tl.where(belongs, per_segment[None, :], 0.0), axis=1)


@triton.jit
def _row_to_segments(belongs, per_row):
    """The [SEGMENTS] value each segment takes from its row's entry of a [ROWS_POW2] one."""
    return tl.sum(tl.where(belongs, per_row[:, None], 0.0), axis=0)


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr,
    branch_ptr,
    gate_ptr,
    h_new_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    R,
    L,
    eps,
    gate_stride_n,
    gate_stride_l,
    scale_stride_n,
    scale_stride_l,
    shift_stride_n,
    shift_stride_l,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    RESIDUAL: tl.constexpr,
    D: tl.constexpr,
    SEGMENT: tl.constexpr,
    SEGMENTS: tl.constexpr,
    ROWS_POW2: tl.constexpr,
):
    """A program's rows as a [SEGMENTS, SEGMENT] tile: each row is K = ⌈D/SEGMENT⌉
    consecutive segments (row r of the program: segments r·K .. r·K + K − 1), so a width
    such as DiT's 1152 = 9·128 fills the tile (63 of 64 segments) where a power-of-two row
    of 2048 would leave 44% of the lanes idle. Row sums are segment sums gathered per row
    (a [ROWS_POW2, SEGMENTS] select), and each row's mean and rstd go back to its segments
    the same way."""
    K: tl.constexpr = (D + SEGMENT - 1) // SEGMENT
    ROWS: tl.constexpr = SEGMENTS // K
    segment = tl.arange(0, SEGMENTS)
    segment_row = segment // K
    rows = tl.program_id(0).to(tl.int64) * ROWS + segment_row  # (R may pass 2^31 at a small D)
    cols = (segment % K)[:, None] * SEGMENT + tl.arange(0, SEGMENT)[None, :]
    row_mask = (segment_row < ROWS) & (rows < R)
    mask = row_mask[:, None] & (cols < D)
    rows64 = rows.to(tl.int64)
    n, l = rows64 // L, rows64 % L
    offsets = rows64[:, None] * D + cols
    x = _row_input(
        x_ptr, branch_ptr, gate_ptr, offsets, _param_offsets(n, l, cols, gate_stride_n, gate_stride_l), mask, RESIDUAL
    )
    # The modulation's loads go out with x's, before the reductions wait on x.
    if HAS_SCALE:
        scale = tl.load(scale_ptr + _param_offsets(n, l, cols, scale_stride_n, scale_stride_l), mask=mask, other=0.0)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + _param_offsets(n, l, cols, shift_stride_n, shift_stride_l), mask=mask, other=0.0)
    if RESIDUAL:
        tl.store(h_new_ptr + offsets, x.to(h_new_ptr.dtype.element_ty), mask=mask)
    # Segment j belongs to the program's row j // K.
    row = tl.arange(0, ROWS_POW2)
    belongs = segment_row[None, :] == row[:, None]
    mean = _segments_to_row(belongs, tl.sum(x, axis=1)) / D
    centred = tl.where(mask, x - _row_to_segments(belongs, mean)[:, None], 0.0)
    var = _segments_to_row(belongs, tl.sum(centred * centred, axis=1)) / D
    # Statistics that overflowed float32 (or met a NaN or ±inf) give a NaN row, on every backend.
    rstd = tl.where(var < float("inf"), 1.0 / tl.sqrt(var + eps), float("nan"))
    out_rows = tl.program_id(0).to(tl.int64) * ROWS + row
    out_mask = (row < ROWS) & (out_rows < R)
    tl.store(mean_ptr + out_rows, mean, mask=out_mask)
    tl.store(rstd_ptr + out_rows, rstd, mask=out_mask)
    y = centred * _row_to_segments(belongs, rstd)[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        y = y * (1.0 + scale.to(tl.float32))
    if HAS_SHIFT:
        y = y + shift.to(tl.float32)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    mean_ptr,
    rstd_ptr,
    dscale_ptr,
    dshift_ptr,
    R,
    L,
    scale_stride_n,
    scale_stride_l,
    shift_stride_n,
    shift_stride_l,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SCALE_PER_TOKEN: tl.constexpr,
    SHIFT_PER_TOKEN: tl.constexpr,
    D: tl.constexpr,
    SEGMENT: tl.constexpr,
    SEGMENTS: tl.constexpr,
    ROWS_POW2: tl.constexpr,
):
    """dx (and the per-token dscale, dshift) of a program's rows, laid out as the
    forward's [SEGMENTS, SEGMENT] tile (row r: segments r·K .. r·K + K − 1). Each segment
    loads its row's mean and rstd itself; the two row sums (Σdx̂, Σdx̂·x̂) are segment sums
    gathered per row and sent back to the segments."""
    K: tl.constexpr = (D + SEGMENT - 1) // SEGMENT
    ROWS: tl.constexpr = SEGMENTS // K
    segment = tl.arange(0, SEGMENTS)
    segment_row = segment // K
    rows = tl.program_id(0).to(tl.int64) * ROWS + segment_row
    cols = (segment % K)[:, None] * SEGMENT + tl.arange(0, SEGMENT)[None, :]
    row_mask = (segment_row < ROWS) & (rows < R)
    if D % SEGMENT == 0:  # no partial segment: a row's mask is its segments' (fewer predicates)
        mask = row_mask[:, None] & (cols >= 0)
    else:
        mask = row_mask[:, None] & (cols < D)
    n, l = rows // L, rows % L
    offsets = rows[:, None] * D + cols
    # Every load of the tile goes out before the first reduction waits on one.
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + _param_offsets(n, l, cols, scale_stride_n, scale_stride_l), mask=mask, other=0.0)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    # Off the rows, x, mean and rstd load as 0, so x̂ = 0; a partial segment's columns past D
    # would take −mean·rstd.
    x_hat = (x - mean[:, None]) * rstd[:, None]
    if D % SEGMENT != 0:
        x_hat = tl.where(mask, x_hat, 0.0)
    if SHIFT_PER_TOKEN:
        tl.store(
            dshift_ptr + _param_offsets(n, l, cols, shift_stride_n, shift_stride_l),
            dy.to(dshift_ptr.dtype.element_ty),
            mask=mask,
        )
    if SCALE_PER_TOKEN:
        affine = x_hat
        if HAS_W:
            affine = affine * w
        if HAS_B:
            affine = affine + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dscale = dy * affine
        tl.store(
            dscale_ptr + _param_offsets(n, l, cols, scale_stride_n, scale_stride_l),
            dscale.to(dscale_ptr.dtype.element_ty),
            mask=mask,
        )
    dx_hat = dy
    if HAS_SCALE:
        dx_hat = dx_hat * (1.0 + scale.to(tl.float32))
    if HAS_W:
        dx_hat = dx_hat * w
    # Segment j belongs to the program's row j // K.
    row = tl.arange(0, ROWS_POW2)
    belongs = segment_row[None, :] == row[:, None]
    mean_dx_hat = _row_to_segments(belongs, _segments_to_row(belongs, tl.sum(dx_hat, axis=1)) / D)
    mean_dx_hat_x_hat = _row_to_segments(belongs, _segments_to_row(belongs, tl.sum(dx_hat * x_hat, axis=1)) / D)
    dx = rstd[:, None] * (dx_hat - mean_dx_hat[:, None] - x_hat * mean_dx_hat_x_hat[:, None])
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_column_sums_kernel(
    x_ptr,
    dy_ptr,
    scale_ptr,
    mean_ptr,
    rstd_ptr,
    partial_ptr,
    L,
    tokens_per_chunk,
    chunks,
    scale_stride_n,
    scale_stride_l,
    HAS_SCALE: tl.constexpr,
    SCALE_PER_TOKEN: tl.constexpr,
    D: tl.constexpr,
    TOKENS: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    """The per-sample partial sums A = Σdy, B = Σdy·x̂, C = Σda, E = Σda·x̂ (da =
    dy·(1 + scale)) over one chunk of a sample's tokens, for COLUMNS columns: program
    (column block, chunk, sample), flattened with the column block fastest. A step reads a
    [TOKENS, COLUMNS] tile of x and dy (a warp's lanes across the columns, so each lane sums
    its tokens itself) with the tokens' mean and rstd. Under a per-sample scale C and E are
    (1 + scale)·A and (1 + scale)·B, formed once at the end: two sums a column, not four."""
    column_blocks = tl.cdiv(D, COLUMNS)
    program = tl.program_id(0).to(tl.int64)
    block = program % column_blocks
    chunk = (program // column_blocks) % chunks
    n = program // (column_blocks * chunks)
    cols = block * COLUMNS + tl.arange(0, COLUMNS)
    col_mask = cols < D
    acc_dy = tl.zeros([COLUMNS], dtype=tl.float32)
    acc_dy_x_hat = tl.zeros([COLUMNS], dtype=tl.float32)
    if SCALE_PER_TOKEN:
        acc_da = tl.zeros([COLUMNS], dtype=tl.float32)
        acc_da_x_hat = tl.zeros([COLUMNS], dtype=tl.float32)
    first = chunk * tokens_per_chunk
    end = tl.minimum(first + tokens_per_chunk, L)
    for start in range(first, end, TOKENS):
        l = start + tl.arange(0, TOKENS)
        token_mask = l < end
        mask = token_mask[:, None] & col_mask[None, :]
        rows = n * L + l
        offsets = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=token_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=token_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        acc_dy += tl.sum(dy, axis=0)
        acc_dy_x_hat += tl.sum(dy * x_hat, axis=0)
        if SCALE_PER_TOKEN:
            scale = tl.load(
                scale_ptr + _param_offsets(n, l, cols[None, :], scale_stride_n, scale_stride_l), mask=mask, other=0.0
            )
            da = dy * (1.0 + scale.to(tl.float32))
            acc_da += tl.sum(da, axis=0)
            acc_da_x_hat += tl.sum(da * x_hat, axis=0)
    if not SCALE_PER_TOKEN:
        gain = tl.full([COLUMNS], 1.0, tl.float32)
        if HAS_SCALE:
            gain += tl.load(scale_ptr + n * scale_stride_n + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_da = gain * acc_dy
        acc_da_x_hat = gain * acc_dy_x_hat
    out = partial_ptr + (n * chunks + chunk) * 4 * D + cols
    tl.store(out, acc_dy, mask=col_mask)
    tl.store(out + D, acc_dy_x_hat, mask=col_mask)
    tl.store(out + 2 * D, acc_da, mask=col_mask)
    tl.store(out + 3 * D, acc_da_x_hat, mask=col_mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


# The forward tile: at most this many segments (the row gather is a [rows, segments]
# select) and about FORWARD_TILE elements, 512 a warp (16 a thread). The gather's select
# holds ROWS_POW2·SEGMENTS / threads values a thread: at most MAX_GATHER_PER_THREAD, and
# among equal tiles of at least a warp's 512 elements the fewest (the digits
# transformer's D = 96 as 21 rows of 3 segments of 32 held 16 a thread, 90 registers and
# 40 KB in flight an SM on sm_90; as 5 rows on one warp, 4: 64 registers, 64 KB; D = 112
# as 64 rows of 128 on 16 warps held 8, one program an SM, 32 KB; as 4 rows on one warp,
# 64 KB).
MAX_SEGMENTS = 64
FORWARD_TILE = 8192
MAX_GATHER_PER_THREAD = 8


def forward_tile(d: int) -> tuple[int, int, int, int]:
    """(SEGMENT, SEGMENTS, ROWS_POW2, num_warps) of the forward's [SEGMENTS, SEGMENT] tile
    for rows of d: of the power-of-two segments (K = ⌈d/SEGMENT⌉ a row, K ≤ MAX_SEGMENTS)
    and tiles up to FORWARD_TILE elements, the one with the most real elements among
    those whose row gather is light (MAX_GATHER_PER_THREAD), then 16-byte vectors (8
    elements of a 16-bit type), then a warp's 512 elements at least, then the lighter
    gather, then the larger tile. d = 1152: segments
    of 128, 9 a row, 7 rows in 64 segments (98% of the tile; a power-of-two row of 2048
    holds 56%)."""
    candidates = []
    segment = 1
    while segment <= triton.next_power_of_2(d):
        k = triton.cdiv(d, segment)
        segments = triton.next_power_of_2(k)  # one row
        largest = max(segments, min(MAX_SEGMENTS, FORWARD_TILE // segment))
        while k <= MAX_SEGMENTS and segments <= largest:
            rows_pow2 = triton.next_power_of_2(segments // k)
            warps = min(16, max(1, segments * segment // 512))
            used = (segments // k) * d / (segments * segment)
            gather = rows_pow2 * segments / (warps * 32)  # the gather's values a thread
            light = gather <= MAX_GATHER_PER_THREAD or segments == k
            tile = segments * segment
            key = (light, round(used, 3), min(segment, 8), min(tile, 512), -gather, tile)
            candidates.append((key, segment, segments, rows_pow2, warps))
            segments *= 2
        segment *= 2
    _, segment, segments, rows_pow2, warps = max(candidates)
    return segment, segments, rows_pow2, warps


def forward_register_cap(warps: int, residual: bool, element_bytes: int, affine: bool) -> int | None:
    """The forward launch's maxnreg, or None: NARROW_FORWARD_MAX_REGISTERS for the plain
    form's one-warp programs in 16 bits without weight or bias, the form it was checked on."""
    checked = warps == 1 and not residual and element_bytes == 2 and not affine
    return NARROW_FORWARD_MAX_REGISTERS if checked else None


def dx_launch(d: int, element_bytes: int, forward_warps: int) -> tuple[int, int | None]:
    """(num_warps, maxnreg) of the backward's dx program on the forward's tile: at most 8
    warps. dx holds two float32 values an element (x̂ and dx̂) where the forward holds one,
    so at the forward's 16 warps for DiT-XL's width 1152 (16 elements a thread) it takes 74
    registers and one block fits an SM, 48 KB in flight; at 8 (32 elements a thread),
    capped at DX_MAX_REGISTERS, two blocks: 80-96 KB (Triton 3.9), 64 KB (3.6). The cap is
    held to what was checked, that width in 16 bits: elsewhere it spilled (D=384: 8-64
    bytes; D=12288 and up) or cost bytes in flight (D=768 under 3.9: 60-72 KB to 48)."""
    return min(forward_warps, 8), DX_MAX_REGISTERS if (d, element_bytes) == (1152, 2) else None


def column_tile(element_bytes: int) -> tuple[int, int]:
    """(TOKENS, COLUMNS) of the column sums' one-warp programs: each of a warp's 32 lanes
    takes a 16-byte vector of columns (COLUMNS = 32·16/element_bytes: 256 in 16-bit, 128
    in fp32) over COLUMN_TOKENS tokens a step, so its tokens' mean and rstd are 16-byte
    loads too, and its 8 vectors each of x and dy a step go out together. A row narrower
    than COLUMNS leaves lanes idle (the digits transformer's 96 in 16-bit: 12 of 32; the
    static report counts every lane); tokens spread over lanes instead would read the
    statistics a float at a time. DiT's 1152 columns are 4.5 blocks."""
    return COLUMN_TOKENS, 32 * 16 // element_bytes


def _strides(t: Tensor | None) -> tuple[int, int]:
    """(stride_n, stride_l) of an (N, 1 | L, D) parameter; stride_l = 0 broadcasts a
    per-sample row over the tokens."""
    if t is None:
        return 0, 0
    return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: small, but enough to exercise the split


def _launch_forward(
    x: Tensor,
    branch: Tensor | None,
    gate: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    eps: float,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    n, length, d = x.shape
    x = x.contiguous()
    residual = branch is not None
    branch = branch.contiguous() if residual else None
    y = torch.empty_like(x)
    h_new = torch.empty_like(x) if residual else None
    mean = torch.empty((n, length), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    segment, segments, rows_pow2, warps = forward_tile(d)
    rows = segments // triton.cdiv(d, segment)
    cap = forward_register_cap(warps, residual, x.element_size(), affine=weight is not None or bias is not None)
    _layer_norm_forward_kernel[(triton.cdiv(n * length, rows),)](
        x,
        branch,
        gate,
        h_new,
        y,
        weight,
        bias,
        scale,
        shift,
        mean,
        rstd,
        n * length,
        length,
        eps,
        *_strides(gate),
        *_strides(scale),
        *_strides(shift),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        RESIDUAL=residual,
        D=d,
        SEGMENT=segment,
        SEGMENTS=segments,
        ROWS_POW2=rows_pow2,
        num_warps=warps,
        **({"maxnreg": cap} if cap is not None and torch.version.hip is None else {}),
    )
    return h_new, y, mean, rstd


def layer_norm_forward(x: Tensor, params: NormParameters, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    weight, bias, scale, shift = params
    if x.shape[-1] > MAX_D:
        return reference.layer_norm_forward(x, params, eps)
    _, y, mean, rstd = _launch_forward(x, None, None, weight, bias, scale, shift, eps)
    return y, mean, rstd


def gated_residual_layer_norm_forward(
    h: Tensor, branch: Tensor, gate: Tensor, params: NormParameters, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    weight, bias, scale, shift = params
    if h.shape[-1] > MAX_D:
        return reference.gated_residual_layer_norm_forward(h, branch, gate, params, eps)
    return _launch_forward(h, branch, gate, weight, bias, scale, shift, eps)


def layer_norm_backward(
    grad_y: Tensor, x: Tensor, params: NormParameters, mean: Tensor, rstd: Tensor
) -> tuple[Tensor | None, ...]:
    weight, bias, scale, shift = params
    n, length, d = x.shape
    if d > MAX_D:
        return reference.layer_norm_backward(grad_y, x, params, mean, rstd)
    x, grad_y = x.contiguous(), grad_y.contiguous()
    scale_per_token = scale is not None and scale.shape[1] > 1
    shift_per_token = shift is not None and shift.shape[1] > 1
    dx = torch.empty_like(x)
    dscale = torch.empty_like(scale) if scale_per_token else None
    dshift = torch.empty_like(shift) if shift_per_token else None
    segment, segments, rows_pow2, warps = forward_tile(d)
    rows = segments // triton.cdiv(d, segment)
    dx_warps, dx_registers = dx_launch(d, x.element_size(), warps)
    _layer_norm_dx_kernel[(triton.cdiv(n * length, rows),)](
        x,
        grad_y,
        dx,
        weight,
        bias,
        scale,
        mean,
        rstd,
        dscale,
        dshift,
        n * length,
        length,
        *_strides(scale),
        *_strides(shift),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_SCALE=scale is not None,
        SCALE_PER_TOKEN=scale_per_token,
        SHIFT_PER_TOKEN=shift_per_token,
        D=d,
        SEGMENT=segment,
        SEGMENTS=segments,
        ROWS_POW2=rows_pow2,
        num_warps=dx_warps,
        **({"maxnreg": dx_registers} if dx_registers is not None and torch.version.hip is None else {}),
    )
    tokens, columns = column_tile(x.element_size())
    column_blocks = triton.cdiv(d, columns)
    # Split each sample's tokens until ~COLUMN_PROGRAMS_PER_SM one-warp programs an SM.
    wanted = triton.cdiv(COLUMN_PROGRAMS_PER_SM * _multiprocessors(x.device), n * column_blocks)
    chunks = max(1, min(wanted, triton.cdiv(length, tokens)))
    # Chunks of a multiple of 16 tokens: Triton specialises an int argument divisible by 16,
    # so (with L a multiple of 16, as DiT's are) it knows each step's 8 tokens start 8-aligned
    # and reads their mean and rstd as 16-byte vectors.
    per_chunk = max(1, triton.cdiv(triton.cdiv(length, chunks), 16)) * 16
    chunks = triton.cdiv(length, per_chunk)
    partials = torch.empty((n, chunks, 4, d), dtype=torch.float32, device=x.device)
    _layer_norm_column_sums_kernel[(column_blocks * chunks * n,)](
        x,
        grad_y,
        scale,
        mean,
        rstd,
        partials,
        length,
        per_chunk,
        chunks,
        *_strides(scale),
        HAS_SCALE=scale is not None,
        SCALE_PER_TOKEN=scale_per_token,
        D=d,
        TOKENS=tokens,
        COLUMNS=columns,
        num_warps=1,
    )
    return (dx, *reference.layer_norm_parameter_grads(partials, params, dscale, dshift))

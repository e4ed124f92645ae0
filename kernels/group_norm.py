"""Triton GroupNorm with fused affine, ADM scale-shift and SiLU: forward and backward.

Forward, for x (N, C, S) grouped into G groups of Cg = C/G channels:
  mean, var per (n, g) over Cg·S elements (fp32);  x̂ = (x − mean)·rstd
  z = (x̂·w[c] + b[c])·(1 + scale[n, c]) + shift[n, c];  y = silu(z) or z.
NCHW with many groups of moderate size (`fused_config`): one launch, `_group_kernel`,
whose programs each take whole groups one at a time, read a group once for its statistics
and again, from L2, to normalise it: HBM sees x once (2·E·s_x). A persistent grid of a
few programs an SM bounds the groups in flight, so that a group is still in L2 when its
program reads it the second time.
channels_last where a window of samples fits L2 (`rows_fused_config`): one launch too,
`_rows_group_kernel`, whose programs take the statistics and normalising tiles of the
three-launch path below by ticket, a sample's normalising after all its statistics; HBM
sees x once there as well.
Otherwise two launches (channels_last: three), each program owning one chunk of the data,
so that batch 1–2 still fills the GPU (`launch_config` sizes the chunks):
  1. statistics: the moments (count, mean, M2 = Σ(d − mean)²) of d = x − K over a piece
     of each group, K = the median of its first channel's first, middle and last
     elements (`_group_shift`: small means where |mean| ≫ std, and no single outlier).
     Each lane keeps a running mean and M2, merged step by step with the
     step's own (Chan et al.), and the lanes, channels and pieces merge the same way: no
     sum of squares cancels, whatever K is (an outlier too). NCHW,
     `_stats_contiguous_kernel`: a group is one contiguous run of Cg·S elements, read
     as a flat array in chunks. channels_last, `_stats_rows_kernel`: a group's channels
     are a sliver of Cg elements every C (16–32 bytes in SD's UNets), so a program reads
     whole rows of ROW_CHANNELS consecutive channels (128 B of fp16) over a spatial chunk
     instead, whatever groups they belong to, and merges each channel's moments into its
     group's; a group whose channels straddle programs gets one part from each.
  2. NCHW, `_apply_kernel`: merges the group's partials (chunks × parts) in a fixed
     order, writes mean and rstd (the group's first program only, saved for backward),
     normalises and writes y. Its programs own a spatial chunk of some of one group's
     channels, in tiles of channel rows (up to SLAB contiguous elements).
     channels_last, two launches: `_channel_maps_kernel` (a program per group) merges the
     partials, writes mean and rstd, and folds them with each channel's affine and
     scale-shift into its map z = x·gain[n, c] + offset[n, c]; `_apply_rows_kernel` then
     reads the statistics' whole rows of ROW_CHANNELS channels over a spatial chunk, so
     its loads are 16-byte vectors whatever the group size (the channels of one group in
     SD's UNets, 10-40, are a 20-80-byte sliver every C).
Bytes: read x twice, write y: 3·E·s_x (the second read from L2 when x is smaller than it,
or in the one-pass kernel), plus O(N·C) parameters (E = N·C·S).
FLOPs ~10 per element (+4 with SiLU): memory-bound.

Backward, with dz = dy·silu'(z) (silu'(z) = σ(z)·(1 + z·(1 − σ(z))), taken at the
pre-activation z, which the kernel recomputes from x), A[n, c] = Σ_s dz and
B[n, c] = Σ_s dz·x̂:
  dshift = A;  dscale = w·B + b·A;  dbias = Σ_n (1 + scale)·A;  dweight = Σ_n (1 + scale)·B
  dx = rstd·(dx̂ − mean_g(dx̂) − x̂·mean_g(dx̂·x̂)),  dx̂ = dz·(1 + scale)·w, where
  Σ_g dx̂ = Σ_{c∈g} w(1 + scale)·A and Σ_g dx̂·x̂ = Σ_{c∈g} w(1 + scale)·B.
Three launches, as the CUDA backend's: per-chunk (A, B) of each channel
(`_backward_sums_kernel`, NCHW, on apply's grid; `_rows_backward_sums_kernel`,
channels_last, over whole rows of 64 channels); `_backward_maps_kernel`, a program per
group, merges them in a fixed order and folds dx into dz·α + x·β + γ (per-channel α, per-
group β and γ); dx from those maps (`_backward_dx_kernel`, NCHW; `_rows_backward_dx_kernel`,
channels_last, whole rows). The (N, C)-sized parameter gradients follow from the merged
(A, B) in a few tiny torch ops.
Bytes: read x and dy twice, write dx: 5·E·s_x. NCHW with many groups of moderate size
(`backward_fused_config`) runs one launch instead, `_group_backward_kernel`, whose
programs take whole groups as the forward's `_group_kernel` does: (A, B) of each channel
from a first read of the group's x and dy, then dx from a second read, from L2: HBM sees
3·E·s_x.

Loads in flight: a memory-bound kernel needs ~64 KB of loads in flight per SM on an
H200 (Little's law; tools/occupancy.py, checked by tools/kernel_report.py). Each loop
step therefore issues all its loads, several slabs (SLAB elements, one 16-byte vector per
thread) of each input, before any arithmetic on them. Written plainly, the compiler
issues each 16-byte load just before the arithmetic that needs it. The statistics and
backward sums add a step's slabs together first, which needs all their loads. Apply and
dx have nothing to add: their step branches between its loads and its arithmetic (a full
step stores under the channel mask alone, the chunk's last step may be partial), and the
compiler keeps arithmetic below a branch whose two arms begin differently. Loading a step
ahead of its arithmetic would hold two steps of data in registers: with channels_last's
per-channel terms (8 channels a thread), too many for enough resident blocks.

Layouts: the NCHW apply and backward kernels take the layout's strides (stride_c = S,
stride_s = 1; Triton specialises the 1); the channels_last ones (stride_c = 1,
stride_s = C) are kernels of their own, whose tiles are whole rows.
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
# Elements of one slab, the unit of every tile: one 16-byte vector per thread of fp16/bf16
# (two of fp32) at NUM_WARPS warps. A step of a loop loads several slabs before it uses
# any, so that each thread has several 16-byte loads in flight (Little's law: an H200
# needs ~64 KB of loads in flight per SM; tools/occupancy.py).
SLAB = 1024
STATS_UNROLL = 4  # slabs a statistics step loads
APPLY_UNROLL = 4  # slabs an apply step loads; a dx step loads as many of x and of dy
BACKWARD_UNROLL = 2  # slabs a backward-sums step loads, each of x and dy
ROW_CHANNELS = 64  # channels_last statistics: channels a program reads (128 B of fp16)
MAX_SPLIT = 64  # chunks a group's reduction is split into, at most
# NCHW in one pass over HBM (_group_kernel): programs of FUSED_WARPS warps, tiles of
# FUSED_SLAB elements (one 16-byte vector a thread of fp16). Its statistics read HBM,
# FUSED_STATS_UNROLL slabs a step: 2 programs an SM keep 2·256·8·16 B = 64 KB of loads in
# flight. Its normalising pass reads L2, FUSED_APPLY_UNROLL slabs a step: 16 KB an SM
# against L2's shorter latency. (More slabs there cost the statistics' loads: at 4, sm_90's
# compiler issues only 5 of their 8 together; at 8, 8 warps' 128 registers spill.)
# It runs where every program has a group and the groups in flight, FUSED_PROGRAMS_PER_SM
# ·SMs of them, fit in FUSED_L2_BYTES, half the 50 MB L2 of an H100/H200 (half the device's
# L2 where that is less: `_l2_budget`): between a
# program's two reads of its group, the others bring in about that many bytes (the groups
# that programs in their statistics read, the y that those normalising write).
FUSED_WARPS = 8
FUSED_SLAB = 2048
FUSED_STATS_UNROLL = 8
FUSED_APPLY_UNROLL = 2
FUSED_PROGRAMS_PER_SM = 2
FUSED_L2_BYTES = 24 * 2**20
# The NCHW backward in one pass over HBM (_group_backward_kernel): one program of
# BACKWARD_FUSED_WARPS warps an SM, tiles of BACKWARD_FUSED_SLAB_BYTES (a 16-byte vector
# a thread, whatever the dtype: two in fp32 spilled at 128 registers), BACKWARD_FUSED_
# UNROLL slabs each of x and dy a step: 512·8·16 B = 64 KB of loads in flight an SM. One
# program an SM, not two, because each keeps two tensors of its group in L2: at
# 64×256×64×64 fp16, 132 groups' x and dy are 17 MB, within FUSED_L2_BYTES.
BACKWARD_FUSED_WARPS = 16
BACKWARD_FUSED_SLAB_BYTES = 16 * 32 * BACKWARD_FUSED_WARPS
BACKWARD_FUSED_UNROLL = 4
BACKWARD_FUSED_PROGRAMS_PER_SM = 1
# channels_last in one pass (_rows_group_kernel): a program per tile of the statistics
# and normalising passes, taken by ticket, each step ROWS_FUSED_VECTORS 16-byte vectors a
# thread in either pass (8 slabs of a 16-bit type, 4 of fp32, whose slab is two vectors a
# thread: 8 slabs of it spilled under the cap on sm_90), at most ROWS_FUSED_MAX_REGISTERS
# registers a thread (uncapped, ptxas takes 139 on sm_90), so 4 programs fit an SM's 64K
# registers: 4·128 threads × 8 vectors × 16 B = 64 KB in flight in either pass. (At 4
# slabs and 72 registers, 7 programs kept 56 KB; the statistics issue all 8 loads of a
# whole step together only since whole steps read without a position mask.)
# The NCHW apply kernel at most APPLY_MAX_REGISTERS registers a thread, so 8 programs fit
# an SM: 8·128 threads × 4 16-byte vectors (fp16; fp32: 8) = 64 KB in flight. (Uncapped,
# Triton 3.6's ptxas took 72 on sm_90 once the kernel read the shift from the partials:
# 7 programs, 56 KB; 3.9 took 60. Capped, neither spills, fp32 included.)
APPLY_MAX_REGISTERS = 64
ROWS_FUSED_VECTORS = 8
ROWS_FUSED_MAX_REGISTERS = 128
ROWS_FUSED_PROGRAMS_PER_SM = 2**16 // (NUM_WARPS * 32 * ROWS_FUSED_MAX_REGISTERS)
# A statistics partial, the kernels'
# `* 4`: the (count, mean, M2 = Σ(d − mean)²) of its elements' d = x − K at 0, 1, 2, and
# the group's shift K at 3 (the mergers read it from the group's first partial, rather
# than load and take the median of three elements of x again).
PARTIAL_FIELDS = 4
COUNTER_LINE = 32  # int32s of a 128-byte line: the ticket counter's, apart from the samples'.


@triton.jit
def _program_group(G, Cg, channels_per_program):
    """(group = n·G + g, spatial chunk, n, the group's first channel, and the range
    [c_first, c_last) of the group's channels this program owns)."""
    programs_per_group = tl.cdiv(Cg, channels_per_program)
    group = tl.program_id(0) // programs_per_group
    c_first = (tl.program_id(0) % programs_per_group) * channels_per_program
    c_last = tl.minimum(c_first + channels_per_program, Cg)
    return group, tl.program_id(1), group // G, (group % G) * Cg, c_first, c_last


@triton.jit
def _half_row_sum(a, COLS: tl.constexpr, ROWS: tl.constexpr):
    """a ([COLS, ROWS]) with each pair of rows (2i, 2i + 1) added: [COLS, ROWS // 2]."""
    a0, a1 = tl.split(tl.reshape(a, [COLS, ROWS // 2, 2]))
    return a0 + a1


@triton.jit
def _pairwise_row_sum(a, COLS: tl.constexpr, ROWS: tl.constexpr):
    """Σ over the last axis of a ([COLS, ROWS], ROWS a power of two up to 16 held in each
    thread's registers), added as a tree of pairs. tl.sum there is a chain on Triton 3.6
    (an FMA into one accumulator row after row), which lets its ptxas issue only the first
    5 of 8 rows' loads before the math (GroupNorm's one-pass stats: 40 of 64 KB in flight
    an SM); with the tree, Triton 3.6 and 3.9 both issue all 8 first. The split pairs are
    a thread's own registers: no data moves. (Level by level, not recursive: Triton 3.2
    cannot hash a JIT function that calls itself.)"""
    tl.static_assert(ROWS <= 16, "ROWS: a power of two up to 16")
    if ROWS >= 16:
        a = _half_row_sum(a, COLS, 16)
    if ROWS >= 8:
        a = _half_row_sum(a, COLS, 8)
    if ROWS >= 4:
        a = _half_row_sum(a, COLS, 4)
    if ROWS >= 2:
        a = _half_row_sum(a, COLS, 2)
    return tl.reshape(a, [COLS])


@triton.jit
def _merge_two(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """(count, mean, M2) of the union of two sets given by theirs, M2 = Σ(x − mean)² (Chan,
    Golub and LeVeque): n = na + nb, δ = mean_b − mean_a, mean = mean_a + δ·nb/n,
    M2 = M2a + M2b + δ²·na·nb/n. Every term is ≥ 0: nothing cancels. An empty set (count 0)
    changes nothing while δ is finite."""
    count = count_a + count_b
    share_b = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    # δ·(δ·(na·nb/n)): δ² alone overflows float past |δ| = 1.8e19 where the term is finite or 0.
    return count, mean_a + delta * share_b, m2_a + m2_b + delta * (delta * (count_a * share_b))


@triton.jit
def _merge_moments(count, mean, m2, AXIS: tl.constexpr):
    """(count, mean, M2) of the union of the sets along AXIS, each given by its count, mean
    and M2 = Σ(x − mean)²: n = Σ nk, mean = Σ (nk/n)·mean_k, M2 = Σ [M2k + nk·(mean_k − mean)²]
    (every term ≥ 0; the weights nk/n ≤ 1 keep Σ nk·mean_k from overflowing). Sets of count
    0 add nothing, whatever their mean."""
    total = tl.sum(count, axis=AXIS)
    weight = count / tl.maximum(tl.expand_dims(total, AXIS), 1.0)
    merged_mean = tl.sum(tl.where(count > 0, weight * mean, 0.0), axis=AXIS)
    deviation = mean - tl.expand_dims(merged_mean, AXIS)
    merged_m2 = tl.sum(tl.where(count > 0, m2 + count * deviation * deviation, 0.0), axis=AXIS)
    return total, merged_mean, merged_m2


@triton.jit
def _merge_step(mean, m2, steps, step_mean, step_m2, STEP_COUNT: tl.constexpr):
    """_merge_two of a thread's running lanes (steps·STEP_COUNT elements each so far) and
    one whole step's (STEP_COUNT more): the shares are scalars, the same for every lane."""
    k = tl.cast(steps, tl.float32)
    share = 1.0 / (k + 1.0)
    delta = step_mean - mean
    return mean + delta * share, m2 + step_m2 + delta * (delta * (STEP_COUNT * k * share))


@triton.jit
def _group_shift(first_channel, S, stride_s):
    """K of a group: the median of its first channel's first, middle and last elements
    (first_channel points at x[n, c0, s = 0]; positions stride_s apart), so that one outlier
    among them is not K. The moments of x − K merge their means with a rounding of
    2⁻²⁴·|mean of x − K| each: with an outlier at K that is up to 2⁻²⁴·√n·σ a merge; a
    shift of 0 would give 2⁻²⁴·|mean|, past the input's own rounding when |mean| ≫ σ."""
    a = tl.load(first_channel).to(tl.float32)
    b = tl.load(first_channel + tl.cast(S // 2, tl.int64) * stride_s).to(tl.float32)
    c = tl.load(first_channel + tl.cast(S - 1, tl.int64) * stride_s).to(tl.float32)
    return tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), c))


@triton.jit
def _contiguous_moments(base, begin, end, shift, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """(count, mean, M2 = Σ(d − mean)²) of d = x − K over the contiguous elements
    [begin, end) of base, K = shift, UNROLL × BLOCK elements a step: whole steps unmasked,
    then the partial one. Each lane (one of BLOCK) keeps the running mean and M2 of its
    elements; a step's UNROLL values of a lane, in its thread's registers, give their own
    mean and then Σ(d − that mean)², merged into the lane's (_merge_step). M2 never cancels
    (a sum of squares of deviations from a shift, Σd² − (Σd)²/n, loses (|K − mean|/σ)²·2⁻²⁴
    of var: 100× float32 error at an outlier K); the shift keeps the means small, so that
    their rounding in each merge (2⁻²⁴·|mean of d|) stays within float32's error of x itself
    at a large mean and small spread."""
    STEP: tl.constexpr = BLOCK * UNROLL
    step = tl.arange(0, UNROLL)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    whole_steps = (end - begin) // STEP
    whole_end = begin + whole_steps * STEP
    for start in range(begin, whole_end, STEP):
        x = tl.trans(tl.load(base + start + step).to(tl.float32) - shift)
        # The UNROLL values of a lane sit in its thread's registers (BLOCK ≥ its threads'
        # vectors); a pairwise sum of them needs every load of the step, so all are issued first.
        step_mean = _pairwise_row_sum(x, BLOCK, UNROLL) * (1.0 / UNROLL)
        deviation = x - step_mean[:, None]
        step_m2 = _pairwise_row_sum(deviation * deviation, BLOCK, UNROLL)
        mean, m2 = _merge_step(mean, m2, (start - begin) // STEP, step_mean, step_m2, UNROLL)
    # The lanes, of whole_steps·UNROLL elements each, merged (_merge_moments at equal counts).
    lane_count = tl.cast(whole_steps * UNROLL, tl.float32)
    merged_mean = tl.sum(mean, axis=0) * (1.0 / BLOCK)
    lane_deviation = mean - merged_mean
    merged_m2 = tl.sum(m2 + lane_count * lane_deviation * lane_deviation, axis=0)
    count = lane_count * BLOCK
    if whole_end < end:
        # The partial step's own moments, in two passes over its values in registers.
        mask = whole_end + step < end
        x = tl.where(mask, tl.load(base + whole_end + step, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        valid = tl.cast(end - whole_end, tl.float32)
        tail_mean = tl.sum(tl.sum(x, axis=1), axis=0) / valid
        tail_deviation = tl.where(mask, x - tail_mean, 0.0)
        tail_m2 = tl.sum(tl.sum(tail_deviation * tail_deviation, axis=1), axis=0)
        count, merged_mean, merged_m2 = _merge_two(count, merged_mean, merged_m2, valid, tail_mean, tail_m2)
    return count, merged_mean, merged_m2


@triton.jit
def _stats_contiguous_kernel(
    x_ptr,
    partial_ptr,
    Cg,
    S,
    e_per_chunk,
    SPLIT_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """NCHW: a group's Cg·S elements are one contiguous run, read as a flat array in
    chunks of e_per_chunk elements, UNROLL × BLOCK of them a step; a program writes its
    chunk's (count, mean, M2) of x − K and K, K = _group_shift of the group."""
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    count = Cg * S
    base = x_ptr + group.to(tl.int64) * count
    begin = chunk * e_per_chunk
    shift = _group_shift(base, S, 1)
    partial_count, partial_mean, partial_m2 = _contiguous_moments(
        base, begin, tl.minimum(begin + e_per_chunk, count), shift, BLOCK, UNROLL
    )
    out = partial_ptr + (group * SPLIT_POW2 + chunk) * 4
    tl.store(out, partial_count)
    tl.store(out + 1, partial_mean)
    tl.store(out + 2, partial_m2)
    tl.store(out + 3, shift)


@triton.jit
def _slab(slab, rows_left, C, channel, c_mask, shift, BLOCK_S: tl.constexpr, FULL: tl.constexpr):
    """x − K of one slab in float32 (K = shift, per channel): BLOCK_S positions from slab ×
    the channels, one 2-D load (the positions from rows_left on, and channels past C, read
    as 0 − K; with FULL every position is read and rows_left is not)."""
    rows = tl.arange(0, BLOCK_S)
    if FULL:
        mask = c_mask[None, :]
    else:
        mask = (rows < rows_left)[:, None] & c_mask[None, :]
    return tl.load(slab + rows[:, None] * C + channel[None, :], mask=mask, other=0.0).to(tl.float32) - shift[None, :]


@triton.jit
def _halves_merged(mean_a, m2_a, mean_b, m2_b, EACH: tl.constexpr):
    """_merge_two of two sets of EACH elements each: mean = (mean_a + mean_b)/2,
    M2 = M2a + M2b + δ²·EACH/2."""
    delta = mean_b - mean_a
    return (mean_a + mean_b) * 0.5, m2_a + m2_b + delta * (delta * (0.5 * EACH))


@triton.jit
def _slab_pair_moments(slab, C, channel, c_mask, shift, BLOCK_S: tl.constexpr):
    """Each lane's (mean, M2) over the slabs at slab and slab + BLOCK_S·C."""
    a = _slab(slab, 0, C, channel, c_mask, shift, BLOCK_S, True)
    b = _slab(slab + BLOCK_S * C, 0, C, channel, c_mask, shift, BLOCK_S, True)
    delta = b - a
    return (a + b) * 0.5, delta * (delta * 0.5)


@triton.jit
def _slab_quad_moments(slab, C, channel, c_mask, shift, BLOCK_S: tl.constexpr):
    """Each lane's (mean, M2) over the 4 slabs from slab: two pairs, merged."""
    mean_a, m2_a = _slab_pair_moments(slab, C, channel, c_mask, shift, BLOCK_S)
    mean_b, m2_b = _slab_pair_moments(slab + 2 * BLOCK_S * C, C, channel, c_mask, shift, BLOCK_S)
    return _halves_merged(mean_a, m2_a, mean_b, m2_b, 2)


@triton.jit
def _step_slab_moments(slab, C, channel, c_mask, shift, BLOCK_S: tl.constexpr, COUNT: tl.constexpr):
    """Each lane's (mean, M2) of x − K (K = shift, per channel) over a whole step's COUNT
    (1, 2, 4 or 8) slabs of BLOCK_S
    positions × the channels, the slabs at slab, slab + BLOCK_S·C, ..., merged as a tree
    of pairs of equal counts. Each slab is its own load of a 2-D tile, one 16-byte vector
    a thread: as one 3-D [COUNT, BLOCK_S, BLOCK_C] load, Triton 3.6 and 3.9 disagreed on
    which axis stays in a thread (one of them spread the COUNT axis over lanes: 126-128
    registers, 16 KB in flight an SM); this way both keep every slab in registers and
    issue all COUNT loads before the arithmetic. (Spelled out by level, not recursive:
    Triton 3.2 cannot hash a JIT function that calls itself.)"""
    tl.static_assert((COUNT == 1 or COUNT == 2) or (COUNT == 4 or COUNT == 8), "COUNT: 1, 2, 4 or 8")
    if COUNT == 1:
        x = _slab(slab, 0, C, channel, c_mask, shift, BLOCK_S, True)
        return x, tl.zeros_like(x)
    elif COUNT == 2:
        return _slab_pair_moments(slab, C, channel, c_mask, shift, BLOCK_S)
    elif COUNT == 4:
        return _slab_quad_moments(slab, C, channel, c_mask, shift, BLOCK_S)
    else:
        mean_a, m2_a = _slab_quad_moments(slab, C, channel, c_mask, shift, BLOCK_S)
        mean_b, m2_b = _slab_quad_moments(slab + 4 * BLOCK_S * C, C, channel, c_mask, shift, BLOCK_S)
        return _halves_merged(mean_a, m2_a, mean_b, m2_b, 4)


@triton.jit
def _tail_slab_sums(
    slab,
    rows_left,
    C,
    channel,
    c_mask,
    shift,
    center,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    COUNT: tl.constexpr,
):
    """A partial step's lanes, d = x − K (K = shift, per channel): Σ(d − center) and
    Σ(d − center)² over the positions of its COUNT slabs below rows_left."""
    rows = tl.arange(0, BLOCK_S)
    sum1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    # A loop, not unrolled: the slabs one at a time keep the registers of the whole steps'
    # loop the kernel's peak (unrolled, the 4 slabs' loads together took 16 more: 56 KB in
    # flight an SM instead of 64).
    for j in range(COUNT):
        x = _slab(slab + j * BLOCK_S * C, rows_left - j * BLOCK_S, C, channel, c_mask, shift, BLOCK_S, False)
        deviation = tl.where((rows + j * BLOCK_S < rows_left)[:, None], x - center, 0.0)
        sum1 += deviation
        sum2 += deviation * deviation
    return sum1, sum2


@triton.jit
def _rows_stats_task(
    x_ptr,
    partial_ptr,
    n,
    block,
    chunk,
    C,
    S,
    G,
    Cg,
    s_per_chunk,
    SPLIT_POW2: tl.constexpr,
    PARTS: tl.constexpr,
    GROUP_SLOTS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """channels_last statistics of one tile: channels [block·BLOCK_C, (block + 1)·BLOCK_C)
    (whole rows, not one group's few channels) of sample n over spatial chunk `chunk`,
    UNROLL × BLOCK_S positions a step, whatever groups the channels belong to; writes the
    (count, mean, M2) of x − K of each group's share, and K, as one of that group's PARTS."""
    c0 = block * BLOCK_C
    channel = c0 + tl.arange(0, BLOCK_C)
    c_mask = channel < C
    group_of_c = channel // Cg
    sample = x_ptr + tl.cast(n, tl.int64) * C * S
    # Each channel is shifted by its group's K (_group_shift; the channels past C, whose
    # terms the fold below drops, by the last group's, read within the sample).
    shift = _group_shift(sample + tl.minimum(group_of_c, G - 1) * Cg, S, C)
    s_begin = chunk * s_per_chunk
    s_end = tl.minimum(s_begin + s_per_chunk, S)
    # Each lane, a (position row, channel) of the slab, keeps the running mean and M2 of its
    # elements, merged step by step (_merge_step).
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    STEP: tl.constexpr = BLOCK_S * UNROLL
    whole_steps = (s_end - s_begin) // STEP
    whole_end = s_begin + whole_steps * STEP
    # Whole steps read without a position mask: under one, ptxas issued only 4 of a step's 8
    # predicated loads before the math.
    for start in range(s_begin, whole_end, STEP):
        step_mean, step_m2 = _step_slab_moments(
            sample + tl.cast(start, tl.int64) * C, C, channel, c_mask, shift, BLOCK_S, UNROLL
        )
        mean, m2 = _merge_step(mean, m2, (start - s_begin) // STEP, step_mean, step_m2, UNROLL)
    # Each channel's lanes, of whole_steps·UNROLL elements each, merged (_merge_moments at
    # equal counts).
    lane_count = tl.cast(whole_steps * UNROLL, tl.float32)
    channel_mean = tl.sum(mean, axis=0) * (1.0 / BLOCK_S)
    lane_deviation = mean - channel_mean[None, :]
    channel_m2 = tl.sum(m2 + lane_count * lane_deviation * lane_deviation, axis=0)
    channel_count = tl.zeros([BLOCK_C], dtype=tl.float32) + lane_count * BLOCK_S
    if whole_end < s_end:
        # The partial step's own moments of each channel in two passes (its mean, then the
        # deviations from it): once a program, so its second read (from L1) costs nothing
        # that matters.
        tail = sample + tl.cast(whole_end, tl.int64) * C
        positions = tl.cast(s_end - whole_end, tl.float32)
        sums, _ = _tail_slab_sums(tail, s_end - whole_end, C, channel, c_mask, shift, 0.0, BLOCK_S, BLOCK_C, UNROLL)
        tail_mean = tl.sum(sums, axis=0) / positions
        # (The rounding δ of m adds n·δ² to Σ(d − m)², relatively (δ/σ)²: nothing to correct.)
        _, squares = _tail_slab_sums(
            tail, s_end - whole_end, C, channel, c_mask, shift, tail_mean[None, :], BLOCK_S, BLOCK_C, UNROLL
        )
        tail_m2 = tl.sum(squares, axis=0)
        channel_count, channel_mean, channel_m2 = _merge_two(
            channel_count, channel_mean, channel_m2, positions, tail_mean, tail_m2
        )
    # Fold the channels into the (at most GROUP_SLOTS) groups they belong to.
    first_group = c0 // Cg
    slot = tl.arange(0, GROUP_SLOTS)
    hit = ((group_of_c - first_group)[:, None] == slot[None, :]) & c_mask[:, None]
    group_count, group_mean, group_m2 = _merge_moments(
        tl.where(hit, channel_count[:, None], 0.0),
        tl.where(hit, channel_mean[:, None], 0.0),
        tl.where(hit, channel_m2[:, None], 0.0),
        0,
    )
    g = first_group + slot
    in_tile = (g < G) & (g * Cg < c0 + BLOCK_C)
    part = block - (g * Cg) // BLOCK_C
    out = partial_ptr + (((n * G + g) * PARTS + part) * SPLIT_POW2 + chunk) * 4
    tl.store(out, group_count, mask=in_tile)
    tl.store(out + 1, group_mean, mask=in_tile)
    tl.store(out + 2, group_m2, mask=in_tile)
    tl.store(out + 3, _group_shift(sample + tl.minimum(g, G - 1) * Cg, S, C), mask=in_tile)


@triton.jit
def _stats_rows_kernel(
    x_ptr,
    partial_ptr,
    C,
    S,
    G,
    Cg,
    s_per_chunk,
    SPLIT_POW2: tl.constexpr,
    PARTS: tl.constexpr,
    GROUP_SLOTS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """channels_last: a program per tile of _rows_stats_task (channel block, sample) ×
    spatial chunk."""
    blocks = tl.cdiv(C, BLOCK_C)
    _rows_stats_task(
        x_ptr,
        partial_ptr,
        tl.program_id(0) // blocks,
        tl.program_id(0) % blocks,
        tl.program_id(1),
        C,
        S,
        G,
        Cg,
        s_per_chunk,
        SPLIT_POW2,
        PARTS,
        GROUP_SLOTS,
        BLOCK_C,
        BLOCK_S,
        UNROLL,
    )


@triton.jit
def _group_mean_rstd(
    partial_ptr,
    group,
    group_start_c,
    Cg,
    eps,
    SPLIT,
    stats_block_c,
    SPLIT_POW2: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Merge a group's partial (count, mean, M2) of x − K (its SPLIT chunks × the parts of
    its channels that different stats programs read), in a fixed order, into (mean, rstd);
    K from the group's first partial."""
    chunks = tl.arange(0, SPLIT_POW2)
    parts = tl.arange(0, PARTS)
    group_parts = (group_start_c + Cg - 1) // stats_block_c - group_start_c // stats_block_c + 1
    valid = (parts < group_parts)[:, None] & (chunks < SPLIT)[None, :]
    rows = partial_ptr + ((group * PARTS + parts)[:, None] * SPLIT_POW2 + chunks[None, :]) * 4
    count, mean, m2 = _merge_moments(
        tl.load(rows, mask=valid, other=0.0),
        tl.load(rows + 1, mask=valid, other=0.0),
        tl.load(rows + 2, mask=valid, other=0.0),
        1,
    )
    count, mean, m2 = _merge_moments(count, mean, m2, 0)
    return _mean_rstd(tl.load(partial_ptr + group * (PARTS * SPLIT_POW2 * 4) + 3), mean, m2, count, eps)


@triton.jit
def _mean_rstd(shift, mean, m2, count, eps):
    """(mean, rstd) of a group from the mean and M2 = Σ(d − mean)² of d = x − K over count
    elements, K = shift: mean of x = K + mean, var = M2/count, rstd = 1/√(var + eps)."""
    var = m2 / count
    # Statistics that overflowed float32 (or met a NaN) give NaN, on every backend.
    rstd = tl.where(var < float("inf"), 1.0 / tl.sqrt(var + eps), float("nan"))
    return shift + mean, rstd


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
    """w[c], b[c], 1 + scale[n, c] and shift[n, c] of the given channels (1, 0, 1, 0 where absent)."""
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
def _folded_maps(
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean,
    rstd,
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
    """(gain, offset) of the given channels of sample n: normalisation (its group's mean and
    rstd), affine and scale-shift folded into z = x·gain + offset,
    gain = w·(1 + scale)·rstd, offset = b·(1 + scale) + shift − mean·gain."""
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
    gain = w * one_plus_scale * rstd
    return gain, b * one_plus_scale + shift - mean * gain


@triton.jit
def _step_offsets(stride_c, stride_s, BLOCK_C: tl.constexpr, STEP: tl.constexpr):
    """int32 offsets of a BLOCK_C × STEP tile from its first element: channel c, position s
    at c·stride_c + s·stride_s (a step's start, added to a 64-bit pointer, moves)."""
    return tl.arange(0, BLOCK_C)[:, None] * stride_c + tl.arange(0, STEP)[None, :] * stride_s


@triton.jit
def _program_start(n, C, S, group_start_c, c_start, s_begin, stride_c, stride_s):
    """Offset (int64) of the program's first element of channel group_start_c + c_start."""
    first = tl.cast(n, tl.int64) * C * S + tl.cast(group_start_c + c_start, tl.int64) * stride_c
    return first + tl.cast(s_begin, tl.int64) * stride_s


@triton.jit
def _normalize(x, gain, offset, SILU: tl.constexpr):
    """y = x·gain + offset (normalisation, affine and scale-shift folded per channel), then
    SiLU, y·σ(y), written y / (1 + e^−y)."""
    y = x.to(tl.float32) * gain[:, None] + offset[:, None]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _apply_channels(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean,
    rstd,
    n,
    C,
    S,
    group_start_c,
    c_first,
    c_last,
    s_begin,
    s_len,
    stride_c,
    stride_s,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """y = act(x·gain + offset) on channels [c_first, c_last) of the group that starts at
    channel group_start_c of sample n, positions [s_begin, s_begin + s_len), in tiles of
    BLOCK_C channel rows × UNROLL·BLOCK_S positions."""
    STEP: tl.constexpr = BLOCK_S * UNROLL
    cc = tl.arange(0, BLOCK_C)
    ss = tl.arange(0, STEP)
    tile = _step_offsets(stride_c, stride_s, BLOCK_C, STEP)
    for c_start in range(c_first, c_last, BLOCK_C):
        c_mask = cc < c_last - c_start
        gain, offset = _folded_maps(
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            mean,
            rstd,
            n,
            group_start_c + c_start + cc,
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
        start = _program_start(n, C, S, group_start_c, c_start, s_begin, stride_c, stride_s)
        xs = x_ptr + start
        ys = y_ptr + start
        for s_off in range(0, s_len, STEP):
            step_start = tl.cast(s_off, tl.int64) * stride_s  # from the program's first element
            mask = c_mask[:, None] & (ss < s_len - s_off)[None, :]
            x = tl.load(xs + step_start + tile, mask=mask, other=0.0)
            # A full step stores under the channel mask alone; the chunk's last step may be
            # partial. The branch also keeps the step's UNROLL loads ahead of the arithmetic:
            # its arms begin differently (the tl.where changes no value, masked lanes load
            # 0), so the compiler cannot merge them and move the arithmetic up between loads.
            if s_len - s_off >= STEP:
                y = _normalize(x, gain, offset, SILU)
                tl.store(ys + step_start + tile, y.to(y_ptr.dtype.element_ty), mask=c_mask[:, None])
            else:
                y = _normalize(tl.where(mask, x, 0.0), gain, offset, SILU)
                tl.store(ys + step_start + tile, y.to(y_ptr.dtype.element_ty), mask=mask)


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
    channels_per_program,
    s_per_chunk,
    STATS_SPLIT,
    stats_block_c,
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
    STATS_SPLIT_POW2: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """NCHW, the second pass: a program merges its group's partial moments into (mean, rstd)
    (the group's first program writes them) and normalises its channels of the group over
    its spatial chunk."""
    group, chunk, n, group_start_c, c_first, c_last = _program_group(G, Cg, channels_per_program)
    mean, rstd = _group_mean_rstd(
        partial_ptr, group, group_start_c, Cg, eps, STATS_SPLIT, stats_block_c, STATS_SPLIT_POW2, PARTS
    )
    if (chunk == 0) & (c_first == 0):
        tl.store(mean_ptr + group, mean)
        tl.store(rstd_ptr + group, rstd)
    s_begin = chunk * s_per_chunk
    _apply_channels(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        mean,
        rstd,
        n,
        C,
        S,
        group_start_c,
        c_first,
        c_last,
        s_begin,
        tl.minimum(s_per_chunk, S - s_begin),
        stride_c,
        stride_s,
        scale_stride_n,
        scale_stride_c,
        shift_stride_n,
        shift_stride_c,
        HAS_W,
        HAS_B,
        HAS_SCALE,
        HAS_SHIFT,
        SILU,
        BLOCK_C,
        BLOCK_S,
        UNROLL,
    )


@triton.jit
def _group_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    C,
    S,
    G,
    Cg,
    groups,
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
    STATS_BLOCK: tl.constexpr,
    STATS_UNROLL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """NCHW in one pass over HBM: program p of P takes the groups p, p + P, ... of the N·G,
    one at a time: it reads a group's Cg·S contiguous elements for its moments (HBM),
    writes its mean and rstd, then reads the group again to normalise it (L2). The grid,
    FUSED_PROGRAMS_PER_SM programs an SM, bounds the groups in flight, so that between a
    program's two reads of an element the GPU brings about P groups' bytes into L2."""
    for group in range(tl.program_id(0), groups, tl.num_programs(0)):
        n = group // G
        base = x_ptr + tl.cast(group, tl.int64) * Cg * S
        shift = _group_shift(base, S, 1)
        count, mean, m2 = _contiguous_moments(base, 0, Cg * S, shift, STATS_BLOCK, STATS_UNROLL)
        mean, rstd = _mean_rstd(shift, mean, m2, count, eps)
        tl.store(mean_ptr + group, mean)
        tl.store(rstd_ptr + group, rstd)
        _apply_channels(
            x_ptr,
            y_ptr,
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            mean,
            rstd,
            n,
            C,
            S,
            (group % G) * Cg,
            0,
            Cg,
            0,
            S,
            S,
            1,
            scale_stride_n,
            scale_stride_c,
            shift_stride_n,
            shift_stride_c,
            HAS_W,
            HAS_B,
            HAS_SCALE,
            HAS_SHIFT,
            SILU,
            BLOCK_C,
            BLOCK_S,
            UNROLL,
        )


@triton.jit
def _channel_maps_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    partial_ptr,
    mean_ptr,
    rstd_ptr,
    gain_ptr,
    offset_ptr,
    C,
    S,
    G,
    Cg,
    STATS_SPLIT,
    stats_block_c,
    eps,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    STATS_SPLIT_POW2: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """channels_last: a program per (n, g) merges the group's partials into (mean, rstd),
    writes them, and folds them with each of the group's channels' affine and scale-shift
    into that channel's map z = x·gain[n, c] + offset[n, c]:
    gain = w·(1 + scale)·rstd, offset = b·(1 + scale) + shift − mean·gain."""
    group = tl.program_id(0)
    n = group // G
    group_start_c = (group % G) * Cg
    mean, rstd = _group_mean_rstd(
        partial_ptr, group, group_start_c, Cg, eps, STATS_SPLIT, stats_block_c, STATS_SPLIT_POW2, PARTS
    )
    tl.store(mean_ptr + group, mean)
    tl.store(rstd_ptr + group, rstd)
    for c_start in range(0, Cg, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        c_mask = cc < Cg
        channel = group_start_c + cc
        gain, offset = _folded_maps(
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            mean,
            rstd,
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
        tl.store(gain_ptr + n * C + channel, gain, mask=c_mask)
        tl.store(offset_ptr + n * C + channel, offset, mask=c_mask)


@triton.jit
def _rows_apply_task(
    x_ptr,
    y_ptr,
    gain,
    offset,
    n,
    c0,
    C,
    S,
    s_begin,
    s_len,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """channels_last: y = act(x·gain[c] + offset[c]) over channels [c0, c0 + BLOCK_C) of
    sample n (whole rows, whatever groups they belong to), positions [s_begin, s_begin +
    s_len), UNROLL × BLOCK_S positions a step."""
    c_mask = tl.arange(0, BLOCK_C) < C - c0
    STEP: tl.constexpr = BLOCK_S * UNROLL
    ss = tl.arange(0, STEP)
    tile = _step_offsets(1, C, BLOCK_C, STEP)
    start = _program_start(n, C, S, c0, 0, s_begin, 1, C)
    for s_off in range(0, s_len, STEP):
        here = start + tl.cast(s_off, tl.int64) * C  # the step's first element
        mask = c_mask[:, None] & (ss < s_len - s_off)[None, :]
        x = tl.load(x_ptr + here + tile, mask=mask, other=0.0)
        # As in _apply_kernel: the branch keeps the step's loads ahead of its arithmetic.
        if s_len - s_off >= STEP:
            y = _normalize(x, gain, offset, SILU)
            tl.store(y_ptr + here + tile, y.to(y_ptr.dtype.element_ty), mask=c_mask[:, None])
        else:
            y = _normalize(tl.where(mask, x, 0.0), gain, offset, SILU)
            tl.store(y_ptr + here + tile, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_rows_kernel(
    x_ptr,
    y_ptr,
    gain_ptr,
    offset_ptr,
    C,
    S,
    s_per_chunk,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """channels_last: y = act(x·gain[n, c] + offset[n, c]) over whole rows of BLOCK_C
    consecutive channels (whatever groups they belong to) of one sample, over one spatial
    chunk (_rows_apply_task). Rows, not a group's few channels, so that a thread's loads
    are 16-byte vectors whatever the group size (SD's groups of 10, 20 or 40 channels are
    20-80 bytes)."""
    blocks = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // blocks
    c0 = (tl.program_id(0) % blocks) * BLOCK_C
    c_mask = tl.arange(0, BLOCK_C) < C - c0
    gain = tl.load(gain_ptr + n * C + c0 + tl.arange(0, BLOCK_C), mask=c_mask, other=0.0)
    offset = tl.load(offset_ptr + n * C + c0 + tl.arange(0, BLOCK_C), mask=c_mask, other=0.0)
    s_begin = tl.program_id(1) * s_per_chunk
    s_len = tl.minimum(s_per_chunk, S - s_begin)
    _rows_apply_task(x_ptr, y_ptr, gain, offset, n, c0, C, S, s_begin, s_len, SILU, BLOCK_C, BLOCK_S, UNROLL)


@triton.jit
def _ticket_task(ticket, N, tasks, lag):
    """(is a statistics task, sample n, task index in [0, tasks)) of a ticket of
    _rows_group_kernel. A sample has `tasks` statistics tasks and as many normalising
    ones; the tickets run the statistics of samples 0 .. lag − 1, then slot by slot the
    statistics of sample k and the normalising of sample k − lag (k = lag .. N − 1), then
    the normalising of the last `lag` samples. So every statistics task of a sample comes
    before its normalising tasks, 2·lag·tasks tickets apart."""
    head = lag * tasks
    middle = (N - lag) * 2 * tasks
    u = ticket - head  # in the slots (past the head)
    slot = lag + u // (2 * tasks)
    r = u % (2 * tasks)
    v = u - middle  # in the tail
    in_head = ticket < head
    in_middle = (u >= 0) & (u < middle)
    stats_half = r < tasks
    is_stats = in_head | (in_middle & stats_half)
    n = tl.where(
        in_head, ticket // tasks, tl.where(in_middle, tl.where(stats_half, slot, slot - lag), N - lag + v // tasks)
    )
    task = tl.where(in_head, ticket % tasks, tl.where(in_middle, tl.where(stats_half, r, r - tasks), v % tasks))
    return is_stats, n, task


@triton.jit
def _sample_mean_rstd(
    partial_ptr,
    mean_ptr,
    rstd_ptr,
    n,
    G,
    Cg,
    split,
    eps,
    SPLIT_POW2: tl.constexpr,
    PARTS: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge the partial (count, mean, M2) of x − K of every group of sample n (K from the
    group's first partial; its `split` chunks × the PARTS of its channels that different
    BLOCK_C-channel tiles read), in a fixed order, into its mean and rstd, and store them:
    GROUP_BLOCK groups at a time. The loads bypass L1 (.cg): other programs wrote the
    partials during this launch."""
    parts = tl.arange(0, PARTS)[None, :, None]
    chunks = tl.arange(0, SPLIT_POW2)[None, None, :]
    for g0 in range(0, G, GROUP_BLOCK):
        g = g0 + tl.arange(0, GROUP_BLOCK)
        g_mask = g < G
        first_c = g * Cg
        group_parts = (first_c + Cg - 1) // BLOCK_C - first_c // BLOCK_C + 1
        valid = g_mask[:, None, None] & (parts < group_parts[:, None, None]) & (chunks < split)
        rows = partial_ptr + (((n * G + g)[:, None, None] * PARTS + parts) * SPLIT_POW2 + chunks) * 4
        count, mean, m2 = _merge_moments(
            tl.load(rows, mask=valid, other=0.0, cache_modifier=".cg"),
            tl.load(rows + 1, mask=valid, other=0.0, cache_modifier=".cg"),
            tl.load(rows + 2, mask=valid, other=0.0, cache_modifier=".cg"),
            2,
        )
        count, mean, m2 = _merge_moments(count, mean, m2, 1)
        first_partial = partial_ptr + (n * G + g) * PARTS * SPLIT_POW2 * 4
        shift = tl.load(first_partial + 3, mask=g_mask, other=0.0, cache_modifier=".cg")
        # A group past G merges nothing (count 0): its var is 0/0, and its store is masked.
        mean, rstd = _mean_rstd(shift, mean, m2, count, eps)
        tl.store(mean_ptr + n * G + g, mean, mask=g_mask)
        tl.store(rstd_ptr + n * G + g, rstd, mask=g_mask)


@triton.jit
def _sample_channel_maps(
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    maps_ptr,
    n,
    N,
    C,
    G,
    Cg,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    MAP_BLOCK: tl.constexpr,
):
    """Every channel's map of sample n, z = x·gain + offset (as _channel_maps_kernel's),
    into maps_ptr[0, n] (gain) and maps_ptr[1, n] (offset), MAP_BLOCK channels at a time,
    from the mean and rstd this program has just stored (read past L1: .cg)."""
    for c_start in range(0, C, MAP_BLOCK):
        channel = c_start + tl.arange(0, MAP_BLOCK)
        c_mask = channel < C
        group = n * G + channel // Cg
        mean = tl.load(mean_ptr + group, mask=c_mask, other=0.0, cache_modifier=".cg")
        rstd = tl.load(rstd_ptr + group, mask=c_mask, other=0.0, cache_modifier=".cg")
        gain, offset = _folded_maps(
            w_ptr,
            b_ptr,
            scale_ptr,
            shift_ptr,
            mean,
            rstd,
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
            MAP_BLOCK,
        )
        tl.store(maps_ptr + n * C + channel, gain, mask=c_mask)
        tl.store(maps_ptr + (N + n) * C + channel, offset, mask=c_mask)


@triton.jit
def _rows_group_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    partial_ptr,
    mean_ptr,
    rstd_ptr,
    maps_ptr,
    ticket_ptr,
    done_ptr,
    N,
    C,
    S,
    G,
    Cg,
    s_per_chunk,
    split,
    lag,
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
    PARTS: tl.constexpr,
    GROUP_SLOTS: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,
    MAP_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    STATS_UNROLL: tl.constexpr,
    APPLY_UNROLL: tl.constexpr,
):
    """channels_last in one pass over HBM. A sample's rows hold every group's channels, so
    no program can own a group; its tiles (BLOCK_C channels × a spatial chunk) are shared
    out instead, each twice: a statistics task (_rows_stats_task), then, once every
    statistics task of the sample is done, a normalising task (_rows_apply_task) that reads
    the tile again, from L2.

    The programs draw tickets (ticket_ptr) in the order of _ticket_task, so a sample's
    normalising waits only for statistics tasks drawn before it by running programs, which
    wait for nothing: no deadlock, however many programs are resident. done_ptr[n] counts
    sample n's finished statistics tasks (release: a task's partials are visible to
    whoever sees its count); the last one merges the sample's mean, rstd and maps and adds
    one more; its normalising tasks wait (acquire) for tasks + 1."""
    blocks = tl.cdiv(C, BLOCK_C)
    tasks = blocks * split
    # The launch order of programs is not their ticket order: a ticket is drawn at the start.
    # Relaxed: the ticket orders work, it publishes no data (and acq_rel would cost an
    # invalidation of the SM's L1 at every program's start).
    ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed")
    is_stats, n, task = _ticket_task(ticket, N, tasks, lag)
    block = task % blocks
    chunk = task // blocks
    if is_stats:
        _rows_stats_task(
            x_ptr,
            partial_ptr,
            n,
            block,
            chunk,
            C,
            S,
            G,
            Cg,
            s_per_chunk,
            SPLIT_POW2,
            PARTS,
            GROUP_SLOTS,
            BLOCK_C,
            BLOCK_S,
            STATS_UNROLL,
        )
        tl.debug_barrier()  # every thread's partials stored before the release
        if tl.atomic_add(done_ptr + n, 1, sem="acq_rel") == tasks - 1:
            _sample_mean_rstd(
                partial_ptr,
                mean_ptr,
                rstd_ptr,
                n,
                G,
                Cg,
                split,
                eps,
                SPLIT_POW2,
                PARTS,
                GROUP_BLOCK,
                BLOCK_C,
            )
            tl.debug_barrier()  # the mean and rstd stored before the maps read them
            _sample_channel_maps(
                w_ptr,
                b_ptr,
                scale_ptr,
                shift_ptr,
                mean_ptr,
                rstd_ptr,
                maps_ptr,
                n,
                N,
                C,
                G,
                Cg,
                scale_stride_n,
                scale_stride_c,
                shift_stride_n,
                shift_stride_c,
                HAS_W,
                HAS_B,
                HAS_SCALE,
                HAS_SHIFT,
                MAP_BLOCK,
            )
            tl.debug_barrier()  # every thread's maps stored before the release
            tl.atomic_add(done_ptr + n, 1, sem="release")
    else:
        while tl.atomic_add(done_ptr + n, 0, sem="acquire") <= tasks:
            pass
        s_begin = chunk * s_per_chunk
        c0 = block * BLOCK_C
        channel = c0 + tl.arange(0, BLOCK_C)
        c_mask = channel < C
        gain = tl.load(maps_ptr + n * C + channel, mask=c_mask, other=0.0, cache_modifier=".cg")
        offset = tl.load(maps_ptr + (N + n) * C + channel, mask=c_mask, other=0.0, cache_modifier=".cg")
        _rows_apply_task(
            x_ptr,
            y_ptr,
            gain,
            offset,
            n,
            c0,
            C,
            S,
            s_begin,
            tl.minimum(s_per_chunk, S - s_begin),
            SILU,
            BLOCK_C,
            BLOCK_S,
            APPLY_UNROLL,
        )


@triton.jit
def _silu_grad(dy, z):
    """dy·silu'(z), silu'(z) = σ(z)·(1 + z·(1 − σ(z)))."""
    sig = tl.sigmoid(z)
    return dy * sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _backward_slab_terms(
    x_ptr,
    dy_ptr,
    rows,
    c_mask,
    s_start,
    s_end,
    stride_s,
    mean,
    rstd,
    w,
    b,
    one_plus_scale,
    shift,
    SILU: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """dz and dz·x̂ of one slab, 0 where masked: the channels whose rows start at `rows`
    (int64 offsets, those in c_mask) × positions s_start + [0, BLOCK_S) (those below s_end);
    one 2-D load each of x and dy."""
    ss = s_start + tl.arange(0, BLOCK_S)
    mask = c_mask[:, None] & (ss < s_end)[None, :]
    offsets = rows[:, None] + ss.to(tl.int64)[None, :] * stride_s
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x_hat = (x - mean) * rstd
    dz = dy
    if SILU:
        # z as written, not folded into x·α + o as in dx: folded, the compiler issues the
        # three-launch sums' sm_80 loads as three, then one.
        z = (x_hat * w[:, None] + b[:, None]) * one_plus_scale[:, None] + shift[:, None]
        dz = _silu_grad(dy, z)
    return tl.where(mask, dz, 0.0), tl.where(mask, dz * x_hat, 0.0)


@triton.jit
def _channel_block_sums(
    x_ptr,
    dy_ptr,
    mean,
    rstd,
    w,
    b,
    one_plus_scale,
    shift,
    c_start,
    group_start_c,
    c_last,
    s_begin,
    s_end,
    stride_c,
    stride_s,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """A = Σ_s dz and B = Σ_s dz·x̂ over positions [s_begin, s_end) of the group's channels
    [c_start, c_start + BLOCK_C) (those below c_last), x̂ = (x − mean)·rstd, dz = dy
    (times silu'(z) with SiLU): [BLOCK_C] each. x_ptr and dy_ptr point at the sample.
    A step loads UNROLL (1, 2 or 4) slabs, each its own 2-D load of x and of dy, and adds
    them as a tree of pairs: as one 3-D [UNROLL, BLOCK_C, BLOCK_S] load, Triton 3.6 spread
    the UNROLL axis over the warps of a 16-warp program and summed it through 64 KB of
    shared memory (200 B of spills); this way every slab stays in its threads' registers,
    and the sum needs every load of the step, so all are issued before the arithmetic."""
    tl.static_assert((UNROLL == 1 or UNROLL == 2) or UNROLL == 4, "UNROLL: 1, 2 or 4")
    cc = c_start + tl.arange(0, BLOCK_C)
    c_mask = cc < c_last
    rows = (group_start_c + cc).to(tl.int64) * stride_c
    acc_a = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for s_off in range(s_begin, s_end, BLOCK_S * UNROLL):
        a, q = _backward_slab_terms(
            x_ptr, dy_ptr, rows, c_mask, s_off, s_end, stride_s, mean, rstd, w, b, one_plus_scale, shift, SILU, BLOCK_S
        )
        if UNROLL >= 2:
            a1, q1 = _backward_slab_terms(
                x_ptr,
                dy_ptr,
                rows,
                c_mask,
                s_off + BLOCK_S,
                s_end,
                stride_s,
                mean,
                rstd,
                w,
                b,
                one_plus_scale,
                shift,
                SILU,
                BLOCK_S,
            )
            if UNROLL == 4:
                a2, q2 = _backward_slab_terms(
                    x_ptr,
                    dy_ptr,
                    rows,
                    c_mask,
                    s_off + 2 * BLOCK_S,
                    s_end,
                    stride_s,
                    mean,
                    rstd,
                    w,
                    b,
                    one_plus_scale,
                    shift,
                    SILU,
                    BLOCK_S,
                )
                a3, q3 = _backward_slab_terms(
                    x_ptr,
                    dy_ptr,
                    rows,
                    c_mask,
                    s_off + 3 * BLOCK_S,
                    s_end,
                    stride_s,
                    mean,
                    rstd,
                    w,
                    b,
                    one_plus_scale,
                    shift,
                    SILU,
                    BLOCK_S,
                )
                a, q = (a + a1) + (a2 + a3), (q + q1) + (q2 + q3)
            else:
                a, q = a + a1, q + q1
        acc_a += a
        acc_b += q
    return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1)


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
    channels_per_program,
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
    UNROLL: tl.constexpr,
):
    """Per-chunk A = Σ_s dz and B = Σ_s dz·x̂ for each of the program's channels."""
    group, chunk, n, group_start_c, c_first, c_last = _program_group(G, Cg, channels_per_program)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    sample = n.to(tl.int64) * C * S
    s_begin = chunk * s_per_chunk
    s_end = tl.minimum(s_begin + s_per_chunk, S)
    for c_start in range(c_first, c_last, BLOCK_C):
        cc = c_start + tl.arange(0, BLOCK_C)
        c_mask = cc < c_last
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
        a_sum, b_sum = _channel_block_sums(
            x_ptr + sample,
            dy_ptr + sample,
            mean,
            rstd,
            w,
            b,
            one_plus_scale,
            shift,
            c_start,
            group_start_c,
            c_last,
            s_begin,
            s_end,
            stride_c,
            stride_s,
            SILU,
            BLOCK_C,
            BLOCK_S,
            UNROLL,
        )
        out = partial_ptr + ((n * C + channel) * SPLIT_POW2 + chunk) * 2
        tl.store(out, a_sum, mask=c_mask)
        tl.store(out + 1, b_sum, mask=c_mask)


@triton.jit
def _merged_channel_sums(partial_ptr, n, C, channel, c_mask, SPLIT, SPLIT_POW2: tl.constexpr):
    """(A, B) of the given channels of sample n: their SPLIT per-chunk partials, added in
    chunk order (deterministic)."""
    chunks = tl.arange(0, SPLIT_POW2)
    rows = partial_ptr + ((n * C + channel)[:, None] * SPLIT_POW2 + chunks[None, :]) * 2
    valid = c_mask[:, None] & (chunks < SPLIT)[None, :]
    return tl.sum(tl.load(rows, mask=valid, other=0.0), axis=1), tl.sum(
        tl.load(rows + 1, mask=valid, other=0.0), axis=1
    )


@triton.jit
def _dx_from_maps(x, dy, alpha, offset, beta, gamma, SILU: tl.constexpr):
    """dx = dz·α + x·β + γ, dz = dy·silu'(x·α + o) (dz = dy without SiLU), per channel (axis 0)."""
    x = x.to(tl.float32)
    dz = dy.to(tl.float32)
    if SILU:
        dz = _silu_grad(dz, x * alpha[:, None] + offset[:, None])
    return dz * alpha[:, None] + x * beta[:, None] + gamma[:, None]


@triton.jit
def _channel_block_dx(
    xs,
    dys,
    dxs,
    alpha,
    offset,
    beta,
    gamma,
    c_mask,
    s_len,
    stride_c,
    stride_s,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STEP: tl.constexpr,
):
    """dx = dz·α + x·β + γ (_dx_from_maps) of BLOCK_C channels (those in c_mask) over s_len
    positions from xs, dys and dxs (each the block's first element), STEP positions a step."""
    ss = tl.arange(0, STEP)
    tile = _step_offsets(stride_c, stride_s, BLOCK_C, STEP)
    for s_off in range(0, s_len, STEP):
        step_start = tl.cast(s_off, tl.int64) * stride_s  # from the block's first element
        mask = c_mask[:, None] & (ss < s_len - s_off)[None, :]
        x = tl.load(xs + step_start + tile, mask=mask, other=0.0)
        dy = tl.load(dys + step_start + tile, mask=mask, other=0.0)
        # As in apply: full steps store under the channel mask, and the branch keeps the
        # step's loads (the slabs of x and of dy) ahead of its arithmetic.
        if s_len - s_off >= STEP:
            dx = _dx_from_maps(x, dy, alpha, offset, beta, gamma, SILU)
            tl.store(dxs + step_start + tile, dx.to(dxs.dtype.element_ty), mask=c_mask[:, None])
        else:
            dx = _dx_from_maps(tl.where(mask, x, 0.0), dy, alpha, offset, beta, gamma, SILU)
            tl.store(dxs + step_start + tile, dx.to(dxs.dtype.element_ty), mask=mask)


@triton.jit
def _backward_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    maps_ptr,
    group_terms_ptr,
    N,
    C,
    S,
    G,
    Cg,
    stride_c,
    stride_s,
    channels_per_program,
    s_per_chunk,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """NCHW: dx of the program's channels of one group over a spatial chunk, from each
    channel's maps and the group's terms (_backward_maps_kernel)."""
    group, chunk, n, group_start_c, c_first, c_last = _program_group(G, Cg, channels_per_program)
    cc = tl.arange(0, BLOCK_C)
    beta = tl.full([BLOCK_C], 0.0, tl.float32) + tl.load(group_terms_ptr + group)
    gamma = tl.full([BLOCK_C], 0.0, tl.float32) + tl.load(group_terms_ptr + N * G + group)
    STEP: tl.constexpr = BLOCK_S * UNROLL
    s_begin = chunk * s_per_chunk
    s_len = tl.minimum(s_per_chunk, S - s_begin)
    for c_start in range(c_first, c_last, BLOCK_C):
        c_mask = cc < c_last - c_start
        maps = maps_ptr + n * C + group_start_c + c_start + cc
        alpha = tl.load(maps, mask=c_mask, other=0.0)
        offset = tl.load(maps + N * C, mask=c_mask, other=0.0)
        start = _program_start(n, C, S, group_start_c, c_start, s_begin, stride_c, stride_s)
        _channel_block_dx(
            x_ptr + start,
            dy_ptr + start,
            dx_ptr + start,
            alpha,
            offset,
            beta,
            gamma,
            c_mask,
            s_len,
            stride_c,
            stride_s,
            SILU,
            BLOCK_C,
            STEP,
        )


@triton.jit
def _rows_backward_sums_kernel(
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
    UNROLL: tl.constexpr,
):
    """channels_last: per-chunk A = Σ_s dz and B = Σ_s dz·x̂ of BLOCK_C consecutive channels
    (whole rows, as the statistics read them) of one sample, UNROLL × BLOCK_S positions a
    step, with x̂ = (x − mean)·rstd and z = x̂·w(1 + scale) + b(1 + scale) + shift of each
    channel's own group."""
    blocks = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // blocks
    chunk = tl.program_id(1)
    channel = (tl.program_id(0) % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channel < C
    group_of_c = n * G + channel // Cg
    mean = tl.load(mean_ptr + group_of_c, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + group_of_c, mask=c_mask, other=0.0)
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
    gain = w * one_plus_scale
    offset = b * one_plus_scale + shift
    sample = x_ptr + n.to(tl.int64) * C * S
    dy_sample = dy_ptr + n.to(tl.int64) * C * S
    s_begin = chunk * s_per_chunk
    s_end = tl.minimum(s_begin + s_per_chunk, S)
    acc_a = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    rows = tl.arange(0, UNROLL)[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    tile = rows[:, :, None] * C + channel[None, None, :]
    for start in range(s_begin, s_end, BLOCK_S * UNROLL):
        mask = (start + rows < s_end)[:, :, None] & c_mask[None, None, :]
        step = tl.cast(start, tl.int64) * C
        x = tl.load(sample + step + tile, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_sample + step + tile, mask=mask, other=0.0).to(tl.float32)
        x_hat = (x - mean[None, None, :]) * rstd[None, None, :]
        dz = dy
        if SILU:
            dz = _silu_grad(dy, x_hat * gain[None, None, :] + offset[None, None, :])
        # As in the statistics: the UNROLL slabs' sum needs every load of the step first.
        acc_a += tl.sum(tl.where(mask, dz, 0.0), axis=0)
        acc_b += tl.sum(tl.where(mask, dz * x_hat, 0.0), axis=0)
    out = partial_ptr + ((n * C + channel) * SPLIT_POW2 + chunk) * 2
    tl.store(out, tl.sum(acc_a, axis=0), mask=c_mask)
    tl.store(out + 1, tl.sum(acc_b, axis=0), mask=c_mask)


@triton.jit
def _stored_channel_sums(sums_ptr, n, C, channel, c_mask, a_sum, b_sum, w, one_plus_scale):
    """Store the channels' (A, B) at sums_ptr[n, c] (the parameter gradients read them) and
    return gain = w·(1 + scale) (0 off c_mask; dx̂ = dz·gain) with the channels' shares of
    the group's Σ dx̂ = Σ gain·A and Σ dx̂·x̂ = Σ gain·B."""
    tl.store(sums_ptr + (n * C + channel) * 2, a_sum, mask=c_mask)
    tl.store(sums_ptr + (n * C + channel) * 2 + 1, b_sum, mask=c_mask)
    gain = tl.where(c_mask, w * one_plus_scale, 0.0)
    return gain, tl.sum(gain * a_sum, axis=0), tl.sum(gain * b_sum, axis=0)


@triton.jit
def _group_terms(sum_dxhat, sum_dxhat_xhat, mean, rstd, count):
    """A group's (β, γ) of dx = dz·α + x·β + γ (_backward_maps_kernel) from its Σ dx̂ and
    Σ dx̂·x̂ over its count elements."""
    m1 = sum_dxhat / count.to(tl.float32)
    m2 = sum_dxhat_xhat / count.to(tl.float32)
    return -rstd * rstd * m2, rstd * (rstd * m2 * mean - m1)


@triton.jit
def _backward_maps_kernel(
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    partial_ptr,
    sums_ptr,
    maps_ptr,
    group_terms_ptr,
    N,
    C,
    S,
    G,
    Cg,
    SPLIT,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SPLIT_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """A program per (n, g) merges its channels' per-chunk (A, B) in a fixed order and
    writes them (for the parameter gradients), with the maps that turn dx into
    one fused multiply-add per term,
        z = x·α + o,  dx = rstd·(dz·gain − m1 − x̂·m2) = dz·α + x·β + γ,
    gain = w(1 + scale), α = rstd·gain and o = b(1 + scale) + shift − mean·α per channel
    (maps, (2, N, C)); β = −rstd²·m2 and γ = rstd·(rstd·m2·mean − m1) per group (group
    terms, (2, N·G)), from m1 = mean_g(dx̂) = Σ_c gain·A / (Cg·S), m2 = mean_g(dx̂·x̂) =
    Σ_c gain·B / (Cg·S)."""
    group = tl.program_id(0)
    n = group // G
    group_start_c = (group % G) * Cg
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    cc = tl.arange(0, BLOCK_C)
    sum_dxhat = tl.full([], 0.0, tl.float32)
    sum_dxhat_xhat = tl.full([], 0.0, tl.float32)
    for c_start in range(0, Cg, BLOCK_C):
        c_mask = cc < Cg - c_start
        channel = group_start_c + c_start + cc
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
        a_sum, b_sum = _merged_channel_sums(partial_ptr, n, C, channel, c_mask, SPLIT, SPLIT_POW2)
        gain, dxhat, dxhat_xhat = _stored_channel_sums(sums_ptr, n, C, channel, c_mask, a_sum, b_sum, w, one_plus_scale)
        sum_dxhat += dxhat
        sum_dxhat_xhat += dxhat_xhat
        alpha = rstd * gain
        tl.store(maps_ptr + n * C + channel, alpha, mask=c_mask)
        tl.store(maps_ptr + N * C + n * C + channel, b * one_plus_scale + shift - mean * alpha, mask=c_mask)
    beta, gamma = _group_terms(sum_dxhat, sum_dxhat_xhat, mean, rstd, Cg * S)
    tl.store(group_terms_ptr + group, beta)
    tl.store(group_terms_ptr + N * G + group, gamma)


@triton.jit
def _rows_backward_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    maps_ptr,
    group_terms_ptr,
    N,
    C,
    S,
    G,
    Cg,
    s_per_chunk,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """channels_last: dx over whole rows of BLOCK_C channels of one sample and one spatial
    chunk, from each channel's maps and its group's terms (_backward_maps_kernel), as
    _apply_rows_kernel writes y."""
    blocks = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // blocks
    c0 = (tl.program_id(0) % blocks) * BLOCK_C
    cc = tl.arange(0, BLOCK_C)
    c_mask = cc < C - c0
    maps = maps_ptr + n * C + c0 + cc
    alpha = tl.load(maps, mask=c_mask, other=0.0)
    offset = tl.load(maps + N * C, mask=c_mask, other=0.0)
    group_terms = group_terms_ptr + n * G + (c0 + cc) // Cg
    beta = tl.load(group_terms, mask=c_mask, other=0.0)
    gamma = tl.load(group_terms + N * G, mask=c_mask, other=0.0)
    STEP: tl.constexpr = BLOCK_S * UNROLL
    s_begin = tl.program_id(1) * s_per_chunk
    s_len = tl.minimum(s_per_chunk, S - s_begin)
    start = _program_start(n, C, S, c0, 0, s_begin, 1, C)
    _channel_block_dx(
        x_ptr + start,
        dy_ptr + start,
        dx_ptr + start,
        alpha,
        offset,
        beta,
        gamma,
        c_mask,
        s_len,
        1,
        C,
        SILU,
        BLOCK_C,
        STEP,
    )


@triton.jit
def _group_backward_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    sums_ptr,
    C,
    S,
    G,
    Cg,
    groups,
    scale_stride_n,
    scale_stride_c,
    shift_stride_n,
    shift_stride_c,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """NCHW backward in one pass over HBM, as _group_kernel is the forward: program p of P
    takes the groups p, p + P, ... of the N·G, one at a time. It reads the group's x and dy
    (HBM) for each channel's A = Σ dz and B = Σ dz·x̂, which it stores (the parameter
    gradients' sums) and folds into the group's (β, γ) as _backward_maps_kernel does; then
    it reads x and dy again (L2) to write dx = dz·α + x·β + γ. The grid (one program an
    SM: BACKWARD_FUSED_PROGRAMS_PER_SM) bounds the groups in flight so that their x and dy
    stay in L2 between the two reads: 2·E of HBM reads where the three launches read 4·E."""
    cc = tl.arange(0, BLOCK_C)
    for group in range(tl.program_id(0), groups, tl.num_programs(0)):
        n = group // G
        group_start_c = (group % G) * Cg
        mean = tl.load(mean_ptr + group)
        rstd = tl.load(rstd_ptr + group)
        sample = tl.cast(n, tl.int64) * C * S
        sum_dxhat = tl.full([], 0.0, tl.float32)
        sum_dxhat_xhat = tl.full([], 0.0, tl.float32)
        for c_start in range(0, Cg, BLOCK_C):
            c_mask = cc < Cg - c_start
            channel = group_start_c + c_start + cc
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
            a_sum, b_sum = _channel_block_sums(
                x_ptr + sample,
                dy_ptr + sample,
                mean,
                rstd,
                w,
                b,
                one_plus_scale,
                shift,
                c_start,
                group_start_c,
                Cg,
                0,
                S,
                S,
                1,
                SILU,
                BLOCK_C,
                BLOCK_S,
                UNROLL,
            )
            _, dxhat, dxhat_xhat = _stored_channel_sums(
                sums_ptr, n, C, channel, c_mask, a_sum, b_sum, w, one_plus_scale
            )
            sum_dxhat += dxhat
            sum_dxhat_xhat += dxhat_xhat
        beta, gamma = _group_terms(sum_dxhat, sum_dxhat_xhat, mean, rstd, Cg * S)
        for c_start in range(0, Cg, BLOCK_C):
            c_mask = cc < Cg - c_start
            w, b, one_plus_scale, shift = _channel_params(
                w_ptr,
                b_ptr,
                scale_ptr,
                shift_ptr,
                n,
                group_start_c + c_start + cc,
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
            alpha = rstd * (w * one_plus_scale)
            start = _program_start(n, C, S, group_start_c, c_start, 0, S, 1)
            _channel_block_dx(
                x_ptr + start,
                dy_ptr + start,
                dx_ptr + start,
                alpha,
                b * one_plus_scale + shift - mean * alpha,
                tl.full([BLOCK_C], 0.0, tl.float32) + beta,
                tl.full([BLOCK_C], 0.0, tl.float32) + gamma,
                c_mask,
                S,
                S,
                1,
                SILU,
                BLOCK_C,
                BLOCK_S * UNROLL,
            )


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _layout(x: Tensor) -> tuple[Tensor, int, int]:
    """(x dense in NCHW or channels_last, stride_c, stride_s) in elements."""
    if norm_format(x) == torch.channels_last:
        return x, 1, x.shape[1]
    return x.contiguous(), math.prod(x.shape[2:]), 1


def launch_config(
    batch: int, channels: int, groups: int, spatial: int, channels_last: bool, multiprocessors: int
) -> dict:
    """Tiles and grids of the two- and three-launch passes for x of (batch, channels,
    spatial) in groups (tools/kernel_report.py compiles what this picks for its
    representative shape; the NCHW forward runs `fused_config`'s one launch instead where
    that fits).

    Each launch aims at 4 programs per SM, so that batch 1–2 still fills the GPU, and splits
    the spatial extent into chunks of whole loop steps, so that only the last chunk can end
    in a partial step."""
    if channels_last:
        return _rows_config(batch, channels, groups, spatial, 4 * multiprocessors)
    return _nchw_config(batch, channels, groups, spatial, 4 * multiprocessors)


def fused_config(
    batch: int, channels: int, groups: int, spatial: int, multiprocessors: int, element_size: int, l2_budget: int
) -> dict | None:
    """The NCHW one-pass launch (_group_kernel), or None where it does not fit: groups that
    leave its FUSED_PROGRAMS_PER_SM·SMs programs idle (`_rounds_pay`, against the two
    launches' 3·E of traffic to its 2·E), or groups too large for that many to stay in
    l2_budget bytes of L2 between a group's two reads."""
    cg = channels // groups
    programs = FUSED_PROGRAMS_PER_SM * multiprocessors
    if not _rounds_pay(batch * groups, programs, 3 / 2) or programs * cg * spatial * element_size > l2_budget:
        return None
    # The normalising pass's tiles: a step (UNROLL tiles along s) of the channel's row
    # rounded up to a power of two, where a slab allows, so short rows (S = 1024: 32×32)
    # fill it with more channels instead of masking most of its lanes.
    block_s = min(max(1, triton.next_power_of_2(spatial) // FUSED_APPLY_UNROLL), FUSED_SLAB)
    block_c = min(triton.next_power_of_2(cg), FUSED_SLAB // block_s)
    return dict(
        grid=(programs,),
        meta=dict(
            STATS_BLOCK=FUSED_SLAB,
            STATS_UNROLL=FUSED_STATS_UNROLL,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            UNROLL=FUSED_APPLY_UNROLL,
        ),
    )


def backward_fused_config(
    batch: int, channels: int, groups: int, spatial: int, multiprocessors: int, element_size: int, l2_budget: int
) -> dict | None:
    """The NCHW backward's one launch (_group_backward_kernel), or None where it does not
    fit: groups that leave its programs idle (`_rounds_pay`, against the three launches' 5·E
    of traffic to its 3·E), groups whose x and dy, for every program at once, exceed
    l2_budget bytes (fused_config's rule, with two tensors read twice), or rows too short
    for a slab's row to be a whole 16-byte vector (S < 4 vectors: a tile of many channels
    of a few positions each spills)."""
    cg = channels // groups
    programs = BACKWARD_FUSED_PROGRAMS_PER_SM * multiprocessors
    if not _rounds_pay(batch * groups, programs, 5 / 3) or programs * 2 * cg * spatial * element_size > l2_budget:
        return None
    slab = BACKWARD_FUSED_SLAB_BYTES // element_size
    # A step (UNROLL slabs along s) of the row rounded up to a power of two, as fused_config's.
    block_s = min(triton.next_power_of_2(spatial) // BACKWARD_FUSED_UNROLL, slab)
    if block_s * element_size < 16:
        return None
    block_c = min(triton.next_power_of_2(cg), slab // block_s)
    return dict(grid=(programs,), meta=dict(BLOCK_C=block_c, BLOCK_S=block_s, UNROLL=BACKWARD_FUSED_UNROLL))


def _rounds_pay(groups: int, programs: int, traffic_ratio: float) -> bool:
    """Whether a persistent grid that takes whole groups, a round of `programs` at a time,
    beats launches that split the groups evenly over the GPU but move traffic_ratio times
    its bytes: there is a full round, and the rounds keep more than 1 / traffic_ratio of the
    programs busy (133 groups on 132 programs take two rounds, the second nearly idle).
    A model of bandwidth-bound time, not a measurement."""
    rounds = -(-groups // programs)
    return groups >= programs and groups * traffic_ratio > rounds * programs


def rows_fused_config(
    batch: int, channels: int, groups: int, spatial: int, multiprocessors: int, element_size: int, l2_budget: int
) -> dict | None:
    """The channels_last one-pass launch (_rows_group_kernel), or None where it does not
    fit: channels not a multiple of 16 (rows that are not whole 16-byte vectors take
    scalar loads, which spill under its register cap), or a sample too large. Between a
    tile's statistics read (slot k of _ticket_task) and its normalising read (slot
    k + lag), L2 holds the x of about 2·lag samples (those read for statistics and not yet
    normalised) and the y of lag − 1: 3·lag − 1 samples, which must fit in l2_budget bytes
    (lag ≥ 1: two samples).

    Tiles as _rows_config's (whole rows of up to ROW_CHANNELS channels); a sample's rows
    are cut into chunks of whole steps so that the 2·lag·tasks tickets between a sample's
    statistics and its normalising keep every resident program busy, which is when its
    statistics are done before its normalising starts."""
    sample_bytes = channels * spatial * element_size
    lag = min(batch, (l2_budget // max(sample_bytes, 1) + 1) // 3)
    if channels % 16 or lag < 1:
        return None
    programs = ROWS_FUSED_PROGRAMS_PER_SM * multiprocessors
    row_c = min(ROW_CHANNELS, triton.next_power_of_2(channels))
    row_s = max(1, SLAB // row_c)
    blocks = triton.cdiv(channels, row_c)
    # slabs a step: ROWS_FUSED_VECTORS vectors a thread, a slab being SLAB elements over the program's threads
    unroll = max(1, ROWS_FUSED_VECTORS * NUM_WARPS * 32 * 16 // (SLAB * element_size))
    step = row_s * unroll  # whole steps of both passes
    chunk = _chunk(spatial, step, triton.cdiv(programs, 2 * lag * blocks))
    split = triton.cdiv(spatial, chunk)
    cg = channels // groups
    split_pow2 = triton.next_power_of_2(split)
    parts = triton.next_power_of_2(min(blocks, (cg + row_c - 2) // row_c + 1))
    return dict(
        grid=(2 * batch * blocks * split,),  # a program per ticket
        lag=lag,
        chunk=chunk,
        split=split,
        meta=dict(
            SPLIT_POW2=split_pow2,
            PARTS=parts,
            GROUP_SLOTS=triton.next_power_of_2(min(groups, (row_c + cg - 2) // cg + 1)),
            # a merge step's [groups, parts, chunks] tile at most SLAB / 2 partials
            GROUP_BLOCK=max(1, min(triton.next_power_of_2(groups), SLAB // 2 // (parts * split_pow2))),
            MAP_BLOCK=min(triton.next_power_of_2(channels), SLAB),
            BLOCK_C=row_c,
            BLOCK_S=row_s,
            STATS_UNROLL=unroll,
            APPLY_UNROLL=unroll,
        ),
    )


def _nchw_config(batch: int, channels: int, groups: int, spatial: int, wanted: int) -> dict:
    """NCHW: the statistics read each group as a flat array in chunks; apply and backward
    programs own a spatial chunk of a group's channel rows (split among programs too, if
    the chunks are not enough)."""
    cg = channels // groups
    n_groups = max(batch * groups, 1)
    e_chunk = _chunk(cg * spatial, SLAB * STATS_UNROLL, wanted // n_groups)
    stats_split = triton.cdiv(cg * spatial, e_chunk)
    stats = dict(
        grid=(n_groups, stats_split),
        chunk=e_chunk,
        split=stats_split,
        block_c=channels,  # every group in one part
        meta=dict(BLOCK=SLAB, UNROLL=STATS_UNROLL, SPLIT_POW2=triton.next_power_of_2(stats_split)),
    )
    # Channel rows, as long as the spatial extent allows.
    block_s = min(triton.next_power_of_2(spatial), SLAB)
    block_c = min(triton.next_power_of_2(cg), SLAB // block_s)
    s_chunk = _chunk(spatial, block_s * APPLY_UNROLL, wanted // n_groups)
    split = triton.cdiv(spatial, s_chunk)
    channel_blocks = triton.cdiv(cg, block_c)
    per_group = max(1, min(channel_blocks, wanted // (n_groups * split)))
    channels_per_program = channel_blocks // per_group * block_c
    split_pow2 = triton.next_power_of_2(split)
    return dict(
        stats=stats,
        grid=(n_groups * triton.cdiv(cg, channels_per_program), split),
        split=split,
        s_per_chunk=s_chunk,
        channels_per_program=channels_per_program,
        apply=dict(
            STATS_SPLIT_POW2=stats["meta"]["SPLIT_POW2"],
            PARTS=1,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            UNROLL=APPLY_UNROLL,
        ),
        backward_sums=dict(SPLIT_POW2=split_pow2, BLOCK_C=block_c, BLOCK_S=block_s, UNROLL=BACKWARD_UNROLL),
        backward_maps=dict(
            grid=(n_groups,),
            split=split,
            meta=dict(SPLIT_POW2=split_pow2, BLOCK_C=_merge_block(cg, split_pow2)),
        ),
        backward_dx=dict(BLOCK_C=block_c, BLOCK_S=block_s, UNROLL=APPLY_UNROLL),
    )


def _rows_config(batch: int, channels: int, groups: int, spatial: int, wanted: int) -> dict:
    """channels_last: the passes over x read whole rows of up to ROW_CHANNELS channels,
    whatever groups they belong to, over spatial chunks ("stats", "rows": apply and dx;
    "backward_sums"); between them, a program per (n, g) folds its group's sums into
    per-channel maps ("maps", "backward_maps")."""
    cg = channels // groups
    n_groups = max(batch * groups, 1)
    row_c = min(ROW_CHANNELS, triton.next_power_of_2(channels))
    row_s = max(1, SLAB // row_c)
    blocks = triton.cdiv(channels, row_c)
    per_block = wanted // max(batch * blocks, 1)

    def chunked(unroll: int, meta: dict) -> dict:
        chunk = _chunk(spatial, row_s * unroll, per_block)
        split = triton.cdiv(spatial, chunk)
        meta = dict(meta, BLOCK_C=row_c, BLOCK_S=row_s, UNROLL=unroll)
        return dict(grid=(batch * blocks, split), chunk=chunk, split=split, meta=meta)

    stats = chunked(STATS_UNROLL, {})
    split_pow2 = triton.next_power_of_2(stats["split"])
    stats["block_c"] = row_c  # a group's channels span at most PARTS of these blocks
    parts = triton.next_power_of_2(min(blocks, (cg + row_c - 2) // row_c + 1))
    stats["meta"].update(
        SPLIT_POW2=split_pow2,
        PARTS=parts,
        GROUP_SLOTS=triton.next_power_of_2(min(groups, (row_c + cg - 2) // cg + 1)),
    )
    sums = chunked(BACKWARD_UNROLL, {})
    sums["meta"]["SPLIT_POW2"] = triton.next_power_of_2(sums["split"])
    return dict(
        stats=stats,
        maps=dict(
            grid=(n_groups,),
            meta=dict(STATS_SPLIT_POW2=split_pow2, PARTS=parts, BLOCK_C=min(triton.next_power_of_2(cg), SLAB)),
        ),
        rows=chunked(APPLY_UNROLL, {}),
        backward_sums=sums,
        backward_maps=dict(
            grid=(n_groups,),
            split=sums["split"],
            meta=dict(SPLIT_POW2=sums["meta"]["SPLIT_POW2"], BLOCK_C=_merge_block(cg, sums["meta"]["SPLIT_POW2"])),
        ),
    )


def _merge_block(cg: int, split_pow2: int) -> int:
    """Channels a step of _backward_maps_kernel merges: its [channels, chunks] tile of
    partials at most SLAB elements (8 a thread), so a group of many channels split into
    many chunks (G = 1) does not spill."""
    return max(1, min(triton.next_power_of_2(cg), SLAB // split_pow2))


def _chunk(extent: int, step: int, wanted: int) -> int:
    """A chunk of whole steps: about extent / wanted, at least one step, at most MAX_SPLIT chunks."""
    most = triton.cdiv(triton.cdiv(extent, MAX_SPLIT), step) * step
    return max(step, most, extent // max(wanted, 1) // step * step)


def _l2_budget(device: torch.device) -> int:
    """The L2 bytes the one-pass kernel may fill: FUSED_L2_BYTES, or half the device's L2
    where that is smaller (an A10's 6 MB, a T4's 4 MB)."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if l2 > 0:
            return min(FUSED_L2_BYTES, l2 // 2)
    return FUSED_L2_BYTES


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
    multiprocessors = _multiprocessors(x.device)
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    fused = rows = None
    if stride_c != 1:  # NCHW: in one pass where it fits
        fused = fused_config(n, c, num_groups, spatial, multiprocessors, x.element_size(), _l2_budget(x.device))
    else:  # channels_last: likewise
        rows = rows_fused_config(n, c, num_groups, spatial, multiprocessors, x.element_size(), _l2_budget(x.device))
    if rows is not None:
        _rows_in_one_pass(x, y, params, mean, rstd, rows, num_groups, eps, activation)
        return y, mean, rstd
    if fused is not None:
        _group_kernel[fused["grid"]](
            x,
            y,
            weight,
            bias,
            scale,
            shift,
            mean,
            rstd,
            c,
            spatial,
            num_groups,
            c // num_groups,
            n * num_groups,
            eps,
            *_strides(scale),
            *_strides(shift),
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None,
            SILU=activation == "silu",
            **fused["meta"],
            num_warps=FUSED_WARPS,
        )
        return y, mean, rstd
    cfg = launch_config(n, c, num_groups, spatial, stride_c == 1, multiprocessors)
    stats = cfg["stats"]
    partials = torch.empty(
        (n * num_groups, stats["meta"].get("PARTS", 1), stats["meta"]["SPLIT_POW2"], PARTIAL_FIELDS),
        dtype=torch.float32,
        device=x.device,
    )
    if stride_c == 1:
        _stats_rows_kernel[stats["grid"]](
            x, partials, c, spatial, num_groups, c // num_groups, stats["chunk"], **stats["meta"], num_warps=NUM_WARPS
        )
        _apply_rows(x, y, params, partials, mean, rstd, cfg, num_groups, eps, activation)
    else:
        _stats_contiguous_kernel[stats["grid"]](
            x, partials, c // num_groups, spatial, stats["chunk"], **stats["meta"], num_warps=NUM_WARPS
        )
        _apply_kernel[cfg["grid"]](
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
            cfg["channels_per_program"],
            cfg["s_per_chunk"],
            stats["split"],
            stats["block_c"],
            eps,
            *_strides(scale),
            *_strides(shift),
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None,
            SILU=activation == "silu",
            **cfg["apply"],
            num_warps=NUM_WARPS,
            # The register cap is an NVIDIA option (AMD's Triton rejects it).
            **({"maxnreg": APPLY_MAX_REGISTERS} if torch.version.hip is None else {}),
        )
    return y, mean, rstd


def _rows_in_one_pass(
    x: Tensor,
    y: Tensor,
    params: NormParameters,
    mean: Tensor,
    rstd: Tensor,
    cfg: dict,
    num_groups: int,
    eps: float,
    activation: str | None,
) -> None:
    """channels_last's forward as one launch of _rows_group_kernel (rows_fused_config)."""
    weight, bias, scale, shift = params
    n, c = x.shape[0], x.shape[1]
    meta = cfg["meta"]
    partials = torch.empty(
        (n * num_groups, meta["PARTS"], meta["SPLIT_POW2"], PARTIAL_FIELDS), dtype=torch.float32, device=x.device
    )
    maps = torch.empty((2, n, c), dtype=torch.float32, device=x.device)  # gain, offset
    # The ticket counter, then a line on (many programs draw tickets while others poll
    # their sample's count) each sample's finished statistics tasks.
    counters = torch.zeros(COUNTER_LINE + n, dtype=torch.int32, device=x.device)
    assert 1 <= cfg["lag"] <= n, "_ticket_task's order needs 1 <= lag <= batch"
    # The register cap is an NVIDIA option (AMD's Triton rejects it).
    cap = {"maxnreg": ROWS_FUSED_MAX_REGISTERS} if torch.version.hip is None else {}
    _rows_group_kernel[cfg["grid"]](
        x,
        y,
        weight,
        bias,
        scale,
        shift,
        partials,
        mean,
        rstd,
        maps,
        counters,
        counters[COUNTER_LINE:],
        n,
        c,
        math.prod(x.shape[2:]),
        num_groups,
        c // num_groups,
        cfg["chunk"],
        cfg["split"],
        cfg["lag"],
        eps,
        *_strides(scale),
        *_strides(shift),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        SILU=activation == "silu",
        **meta,
        num_warps=NUM_WARPS,
        **cap,
    )


def _apply_rows(
    x: Tensor,
    y: Tensor,
    params: NormParameters,
    partials: Tensor,
    mean: Tensor,
    rstd: Tensor,
    cfg: dict,
    num_groups: int,
    eps: float,
    activation: str | None,
) -> None:
    """channels_last's apply: per-channel maps of each group (writing mean and rstd), then
    y over whole rows of channels."""
    weight, bias, scale, shift = params
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    maps = torch.empty((2, n, c), dtype=torch.float32, device=x.device)  # gain, offset
    _channel_maps_kernel[cfg["maps"]["grid"]](
        x,
        weight,
        bias,
        scale,
        shift,
        partials,
        mean,
        rstd,
        maps[0],
        maps[1],
        c,
        spatial,
        num_groups,
        c // num_groups,
        cfg["stats"]["split"],
        cfg["stats"]["block_c"],
        eps,
        *_strides(scale),
        *_strides(shift),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        **cfg["maps"]["meta"],
        num_warps=NUM_WARPS,
    )
    rows = cfg["rows"]
    _apply_rows_kernel[rows["grid"]](
        x,
        y,
        maps[0],
        maps[1],
        c,
        spatial,
        rows["chunk"],
        SILU=activation == "silu",
        **rows["meta"],
        num_warps=NUM_WARPS,
    )


def group_norm_backward(
    dy: Tensor, x: Tensor, params: NormParameters, mean: Tensor, rstd: Tensor, num_groups: int, activation: str | None
) -> tuple[Tensor | None, ...]:
    """NCHW where its groups fit L2: one launch (_group_backward_kernel). Otherwise three:
    per-chunk (A, B) of each channel; a program per group that merges them and folds dx
    into per-channel maps; dx. channels_last's passes over x read whole rows of channels,
    NCHW's the channel rows of one group."""
    weight, bias, scale, shift = params
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    x, stride_c, stride_s = _layout(x)
    channels_last = stride_c == 1  # (or a spatial size of 1, where the two layouts coincide)
    dy = dy.contiguous(memory_format=torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format)
    flags = dict(
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
    )
    silu = activation == "silu"
    sums = torch.empty((n, c, 2), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    fused = None
    if not channels_last:
        fused = backward_fused_config(
            n, c, num_groups, spatial, _multiprocessors(x.device), x.element_size(), _l2_budget(x.device)
        )
    if fused is not None:
        _group_backward_kernel[fused["grid"]](
            x,
            dy,
            dx,
            weight,
            bias,
            scale,
            shift,
            mean,
            rstd,
            sums,
            c,
            spatial,
            num_groups,
            c // num_groups,
            n * num_groups,
            *_strides(scale),
            *_strides(shift),
            **flags,
            SILU=silu,
            **fused["meta"],
            num_warps=BACKWARD_FUSED_WARPS,
        )
        return (dx, *group_norm_parameter_grads(sums, params))
    cfg = launch_config(n, c, num_groups, spatial, channels_last, _multiprocessors(x.device))
    sums_meta = cfg["backward_sums"]["meta"] if channels_last else cfg["backward_sums"]
    partials = torch.empty((n * c, sums_meta["SPLIT_POW2"], 2), dtype=torch.float32, device=x.device)
    tensors = (x, dy, weight, bias, scale, shift, mean, rstd, partials)
    if channels_last:
        _rows_backward_sums_kernel[cfg["backward_sums"]["grid"]](
            *tensors,
            c,
            spatial,
            num_groups,
            c // num_groups,
            cfg["backward_sums"]["chunk"],
            *_strides(scale),
            *_strides(shift),
            **flags,
            SILU=silu,
            **sums_meta,
            num_warps=NUM_WARPS,
        )
    else:
        _backward_sums_kernel[cfg["grid"]](
            *tensors,
            c,
            spatial,
            num_groups,
            c // num_groups,
            stride_c,
            stride_s,
            cfg["channels_per_program"],
            cfg["s_per_chunk"],
            *_strides(scale),
            *_strides(shift),
            **flags,
            SILU=silu,
            **sums_meta,
            num_warps=NUM_WARPS,
        )
    maps = torch.empty((2, n, c), dtype=torch.float32, device=x.device)  # α, o
    group_terms = torch.empty((2, n * num_groups), dtype=torch.float32, device=x.device)  # β, γ
    _backward_maps_kernel[cfg["backward_maps"]["grid"]](
        weight,
        bias,
        scale,
        shift,
        mean,
        rstd,
        partials,
        sums,
        maps,
        group_terms,
        n,
        c,
        spatial,
        num_groups,
        c // num_groups,
        cfg["backward_maps"]["split"],
        *_strides(scale),
        *_strides(shift),
        **flags,
        **cfg["backward_maps"]["meta"],
        num_warps=NUM_WARPS,
    )
    if channels_last:
        rows = cfg["rows"]
        _rows_backward_dx_kernel[rows["grid"]](
            x,
            dy,
            dx,
            maps,
            group_terms,
            n,
            c,
            spatial,
            num_groups,
            c // num_groups,
            rows["chunk"],
            SILU=silu,
            **rows["meta"],
            num_warps=NUM_WARPS,
        )
    else:
        _backward_dx_kernel[cfg["grid"]](
            x,
            dy,
            dx,
            maps,
            group_terms,
            n,
            c,
            spatial,
            num_groups,
            c // num_groups,
            stride_c,
            stride_s,
            cfg["channels_per_program"],
            cfg["s_per_chunk"],
            SILU=silu,
            **cfg["backward_dx"],
            num_warps=NUM_WARPS,
        )
    # Parameter gradients from the (N, C) sums: O(N·C) work.
    return (dx, *group_norm_parameter_grads(sums, params))

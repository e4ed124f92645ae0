"""Triton flash attention (FlashAttention-2 algorithm): forward and backward.

Forward, per (batch·head, block of BLOCK_M queries): stream blocks of BLOCK_N keys and
values through an online softmax in base 2,
    s = q·kᵀ;  m' = max(m, c·rowmax s);  p = 2^(c·s − m')   (c = scale·log2 e ≥ 0)
    l = l·2^(m − m') + rowsum p;  acc = acc·2^(m − m') + p·v
then o = acc / l and the row log-sum-exp lse = (m + log2 l)·ln 2 (natural log) is saved.
(A negative scale runs as (−q)·kᵀ·|scale|.)
Backward, from lse and Δ = rowsum(dO ∘ O) (no Lq×Lk matrix in memory):
    p = exp(q·kᵀ·scale − lse);  dv = Σ pᵀ·dO;  dp = dO·vᵀ;  ds = p∘(dp − Δ)
    dk = Σ dsᵀ·q·scale  (one program per key block: no atomics)
    dq = Σ ds·k·scale   (one program per query block)
FLOPs: forward 4·B·H·Lq·Lk·D; backward 10·B·H·Lq·Lk·D (dq recomputes q·kᵀ and dO·vᵀ).
Bytes: q, k, v, o (and dO, dq, dk, dv) once each, plus K/V re-reads per query block.

Precision: fp16 and bf16 run on the tensor cores with fp32 accumulation and softmax.
fp32 inputs are multiplied in full fp32 (input_precision "ieee") by default, accurate
to about 1e-6 relative; TF32 (about 1e-3) only when the user opts in, as for torch.matmul:
torch.backends.cuda.matmul.fp32_precision = "tf32" (or torch.backends.fp32_precision; torch
2.9 on), or torch.backends.cuda.matmul.allow_tf32 = True.

Any Lq, Lk ≥ 1 (masked tails); head dims up to 256 (ADM-128 uses 192 and 256), padded
inside to a power of two. The forward specialises on Lk being a multiple of the key block
(EVEN_N, every self-attention shape of the models here) and on D filling its padded width
(EVEN_D): its main loop then loads k and v without masks and skips the −inf select; the
backward's loops likewise (dk, dv on Lq in whole query blocks, EVEN_M; dq on EVEN_N);
q, k, v, dO with arbitrary strides (views of a packed qkv projection are read in place).

On Hopper (sm_90 and newer, Triton ≥ 3.4) the fp16/bf16 forward up to D = 128 reads q, k
and v through tensor descriptors of their [B, H, L, D] views instead (TMA: a tile an
instruction, zero-filled past L and D, so no load needs a mask), its key loop over whole
blocks and the block that crosses Lk peeled off, o stored by TMA too:
``_forward_tma_kernel``, chosen by
``tma_not_supported_reasons`` and the FASTGUIDE_ATTENTION_TMA setting.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # host-side tensor descriptors (TMA on Hopper) arrived in Triton 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LOG2E = 1.4426950408889634
# "off": autotune over one config (tests, where the tuning time would dominate); read once,
# when this module is imported.
AUTOTUNE_SETTING = "FASTGUIDE_AUTOTUNE"
# Whether the forward reads q, k, v through tensor descriptors (_forward_tma_kernel):
# "auto" where they reach TMA hardware (sm_90 and newer), "off" never, "on" wherever Triton
# has them (on older GPUs and the interpreter Triton lowers them to plain loads: for tests
# and A/B runs). Read once, when this module is imported.
TMA_SETTING = "FASTGUIDE_ATTENTION_TMA"
tma_mode = os.environ.get(TMA_SETTING, "auto").strip().lower()
_TMA_MODES = ("auto", "on", "off")
_TMA_DTYPES = (torch.float16, torch.bfloat16)


def _configs(for_backward: bool = False) -> list[triton.Config]:
    """A small set that suits Ampere and Hopper (pruned per dtype by ``_prune``); one
    config under the interpreter or with ``FASTGUIDE_AUTOTUNE=off`` (the test suite's
    setting on a GPU, never the benchmarks'). fp32 runs exact FMA dots, whose tiles live in
    registers: it gets smaller tiles, chosen with the static report so that none spills."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get(AUTOTUNE_SETTING) == "off":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if for_backward:
        fp32 = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
        return fp32 + [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        ]
    fp32 = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)]
    return fp32 + [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """fp32 and head dims above 128 keep the small-tile configs (their tiles would not fit
    registers and shared memory otherwise); fp16/bf16 up to 128 the tensor-core ones."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0))
    small = named_args["q_ptr"].dtype == torch.float32 or block_d > 128
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048) == small]
    return kept or configs


# The alignments are in the key because the heuristics' EVEN_M / EVEN_N (a length that is a
# multiple of the config's block) change the kernel: a config tuned on whole blocks is not
# the best for a ragged length of the same bucket, nor the other way round.
_TUNING_KEY = ["LQ_BUCKET", "LK_BUCKET", "LQ_ALIGN", "LK_ALIGN", "BLOCK_D", "PRECISION"]
_TUNING = dict(key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune})


def _bucket(length: int) -> int:
    """Autotune key for a sequence length: powers of two up to 4096, so new lengths
    reuse a tuned config instead of re-tuning."""
    return min(triton.next_power_of_2(length), 4096)


def _alignment(length: int) -> int:
    """Autotune key for a length's block alignment: its largest power-of-two divisor up to
    128, the largest block, so that every config's "length % BLOCK == 0" is fixed by it."""
    return min(length & -length, 128)


@triton.jit
def _tile(L, H, BLOCK: tl.constexpr, LARGE: tl.constexpr):
    """(first index along L, b·H + h, b, h) of this program's tile, BLOCK rows of one (b, h)
    (b and h in int64, as the offsets they start). The grid is (tiles, batch·heads), but
    for a LARGE launch one axis, a head's tiles next to each other (they share its K and V
    in L2): axis 1 stops at 65535 programs, which batch·heads can pass (AnimateDiff's
    temporal attention at 512²: 8192 sequences × 8 heads)."""
    if LARGE:
        tiles = tl.cdiv(L, BLOCK)
        bh = tl.program_id(0) // tiles
        start = (tl.program_id(0) % tiles) * BLOCK
    else:
        bh = tl.program_id(1)
        start = tl.program_id(0) * BLOCK
    return start, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _at(index, stride, LARGE: tl.constexpr):
    """index·stride, an element offset: in int64 for a LARGE launch (a tensor whose offsets
    pass 2^31, e.g. a packed (B, L, 3, H, D) view, stride 3·H·D, from L ≈ 140k tokens at
    H·D = 5120), else in int32 (registers: the backward's tiles are at the limit on sm_80)."""
    if LARGE:
        return tl.cast(index, tl.int64) * stride
    else:
        return index * stride


@triton.jit
def _rows_block(ptrs, rows_left, d_ok, BLOCK: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """The BLOCK × BLOCK_D block of q, k, v or dO at ptrs, its rows from `rows_left` on
    (unless EVEN_ROWS, which promises none) and its columns from D on (unless EVEN_D: the
    head dim fills BLOCK_D) read as 0."""
    if not EVEN_ROWS:
        block = tl.load(ptrs, mask=(tl.arange(0, BLOCK) < rows_left)[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        block = tl.load(ptrs)
    else:
        block = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return block


# The running max's start (see _softmax_update).
LOWEST_FLOAT32: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _softmax_update(
    q,
    k,
    v,
    keys,
    m,
    l,
    acc,
    qk_scale_log2,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
):
    """One key block of the online softmax, k and v already loaded, over its first `keys`
    keys (MASK_KEYS: the rest are left out of the max and get p = 0; otherwise every key
    of the block is one), with c = scale·log2 e ≥ 0:
        s = q·kᵀ;  m' = max(m, c·rowmax s);  p = 2^(c·s − m')
        l' = l·2^(m − m') + rowsum p;  acc' = acc·2^(m − m') + p·v.
    c ≥ 0 lets the scale leave the max (c·rowmax s = rowmax c·s) and join the exponent's
    subtraction in one FMA a score. (The masked keys' p is set to 0 rather than their s to
    −inf: at c = 0, −inf·c would be NaN.) m starts at the lowest finite float32, not −inf:
    a row whose keys so far all score −inf keeps it, so its p = 2^(−inf − m) = 0 and
    correction 1, where m = −inf would make them 2^(−inf + inf) = NaN (a later finite key
    then makes the row finite, as softmax is; with none, l = 0 gives 0/0 = NaN)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASK_KEYS:
        is_key = (tl.arange(0, BLOCK_N) < keys)[None, :]
        s_max = tl.max(tl.where(is_key, s, float("-inf")), axis=1)
    else:
        s_max = tl.max(s, axis=1)
    m_new = tl.maximum(m, s_max * qk_scale_log2)
    p = tl.exp2(s * qk_scale_log2 - m_new[:, None])
    if MASK_KEYS:
        p = tl.where(is_key, p, 0.0)
    correction = tl.exp2(m - m_new)
    l = l * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _store_output(
    o_ptr,
    lse_ptr,
    so_b,
    so_h,
    so_l,
    so_d,
    b,
    h,
    bh,
    row0,
    Lq,
    D,
    m,
    l,
    acc,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LARGE: tl.constexpr,
):
    """o = acc / l for the block's rows below Lq and its columns below D; the natural-log
    row log-sum-exp lse = (m + log2 l)·ln 2."""
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    o = acc / l[:, None]
    tl.store(
        o_ptr + b * so_b + h * so_h + _at(rows, so_l, LARGE)[:, None] + _at(dims, so_d, LARGE)[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dims < D)[None, :],
    )
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + rows, (m + tl.log2(l)) * 0.6931471805599453, mask=row_ok)


@triton.autotune(configs=_configs(), **_TUNING)
@triton.heuristics({"EVEN_N": lambda args: args["Lk"] % args["BLOCK_N"] == 0})
@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    sq_b,
    sq_h,
    sq_l,
    sq_d,
    sk_b,
    sk_h,
    sk_l,
    sk_d,
    sv_b,
    sv_h,
    sv_l,
    sv_d,
    so_b,
    so_h,
    so_l,
    so_d,
    H,
    Lq,
    Lk,
    D,
    qk_scale_log2,
    LQ_BUCKET,
    LK_BUCKET,
    LQ_ALIGN,
    LK_ALIGN,
    PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LARGE: tl.constexpr,
):
    row0, bh, b, h = _tile(Lq, H, BLOCK_M, LARGE)
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = dims < D
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + _at(rows, sq_l, LARGE)[:, None] + _at(dims, sq_d, LARGE)[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_M], LOWEST_FLOAT32, tl.float32)  # (see _softmax_update)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_block = (
        k_ptr + b * sk_b + h * sk_h + _at(tl.arange(0, BLOCK_N), sk_l, LARGE)[:, None] + _at(dims, sk_d, LARGE)[None, :]
    )
    v_block = (
        v_ptr + b * sv_b + h * sv_h + _at(tl.arange(0, BLOCK_N), sv_l, LARGE)[:, None] + _at(dims, sv_d, LARGE)[None, :]
    )
    # With EVEN_N (Lk a multiple of BLOCK_N: every self-attention shape of the models here)
    # no key block takes a column mask or a −inf select, and with EVEN_D too their loads
    # are plain, which the pipeliner issues stages ahead. (Peeling the one block that
    # crosses Lk instead doubles the loop body: the fp32 and D = 256 tiles then spill.)
    for start in range(0, Lk, BLOCK_N):
        k = _rows_block(k_block + _at(start, sk_l, LARGE), Lk - start, d_ok, BLOCK_N, EVEN_N, EVEN_D)
        v = _rows_block(v_block + _at(start, sv_l, LARGE), Lk - start, d_ok, BLOCK_N, EVEN_N, EVEN_D)
        m, l, acc = _softmax_update(q, k, v, Lk - start, m, l, acc, qk_scale_log2, PRECISION, BLOCK_N, not EVEN_N)
    _store_output(o_ptr, lse_ptr, so_b, so_h, so_l, so_d, b, h, bh, row0, Lq, D, m, l, acc, BLOCK_M, BLOCK_D, LARGE)


def _set_block_shapes(args: dict) -> None:
    """Autotuner pre-hook of the TMA forward: a descriptor's box is the tile the config
    loads ([1, 1, BLOCK_M or BLOCK_N, BLOCK_D] of the [B, H, L, D] tensor). The hook sees
    the call's arguments through the autotuner object, where Triton keeps them for the
    length of a call: like every autotuned Triton kernel, this one is not to be launched
    from several Python threads at once."""
    for name in ("q_desc", "o_desc"):
        args[name].block_shape = [1, 1, args["BLOCK_M"], args["BLOCK_D"]]
    for name in ("k_desc", "v_desc"):
        args[name].block_shape = [1, 1, args["BLOCK_N"], args["BLOCK_D"]]


def _tma_configs() -> list[triton.Config]:
    """The tensor-core tiles of ``_configs`` (fp16/bf16 and D ≤ 128 only take this path),
    each setting its descriptors' boxes; one small tile under the interpreter or with
    autotuning off."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get(AUTOTUNE_SETTING) == "off":
        tiles = [(32, 32, 4, 1)]
    else:
        tiles = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 2)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
        for m, n, w, s in tiles
    ]


# No early prune: every TMA config is a tensor-core tile, and _prune reads q_ptr, which this
# kernel does not take.
@triton.autotune(configs=_tma_configs(), key=_TUNING_KEY)
@triton.jit
def _forward_tma_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    H,
    Lq,
    Lk,
    D,
    qk_scale_log2,
    LQ_BUCKET,
    LK_BUCKET,
    LQ_ALIGN,
    LK_ALIGN,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LARGE: tl.constexpr,
):
    """The forward with q, k and v read through tensor descriptors of their [B, H, L, D]
    views (on Hopper, TMA: one instruction a tile, into shared memory in the layout the
    tensor cores read, pipelined num_stages deep). The hardware fills rows past L and
    columns past D with zeros, so no load has a mask. The key loop runs over whole blocks
    with no −inf select; the one block that crosses Lk (Lk not a multiple of BLOCK_N) is
    peeled off after it and takes the select. o goes back through its own descriptor (one
    TMA store from shared memory; the hardware drops rows past Lq and columns past D)."""
    row0, bh, b64, h64 = _tile(Lq, H, BLOCK_M, LARGE)
    b, h = b64.to(tl.int32), h64.to(tl.int32)  # (a descriptor takes int32 coordinates)
    q = q_desc.load([b, h, row0, 0]).reshape(BLOCK_M, BLOCK_D)
    m = tl.full([BLOCK_M], LOWEST_FLOAT32, tl.float32)  # (see _softmax_update)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    whole = Lk - Lk % BLOCK_N
    for start in range(0, whole, BLOCK_N):
        k = k_desc.load([b, h, start, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([b, h, start, 0]).reshape(BLOCK_N, BLOCK_D)
        m, l, acc = _softmax_update(q, k, v, BLOCK_N, m, l, acc, qk_scale_log2, PRECISION, BLOCK_N, False)
    if whole < Lk:
        k = k_desc.load([b, h, whole, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([b, h, whole, 0]).reshape(BLOCK_N, BLOCK_D)
        m, l, acc = _softmax_update(q, k, v, Lk - whole, m, l, acc, qk_scale_log2, PRECISION, BLOCK_N, True)
    o = acc / l[:, None]
    o_desc.store([b, h, row0, 0], o.to(o_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    rows = row0 + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + rows, (m + tl.log2(l)) * 0.6931471805599453, mask=rows < Lq)


@triton.jit
def _backward_delta_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    so_b,
    so_h,
    so_l,
    so_d,
    sdo_b,
    sdo_h,
    sdo_l,
    sdo_d,
    H,
    Lq,
    D,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LARGE: tl.constexpr,
):
    """Δ = rowsum(dO ∘ O) per query row, in fp32."""
    row0, bh, b, h = _tile(Lq, H, BLOCK_M, LARGE)
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < Lq)[:, None] & (dims < D)[None, :]
    o_rows, do_rows = _at(rows, so_l, LARGE)[:, None], _at(rows, sdo_l, LARGE)[:, None]
    o = tl.load(o_ptr + b * so_b + h * so_h + o_rows + _at(dims, so_d, LARGE)[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + do_rows + _at(dims, sdo_d, LARGE)[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _probabilities(q, k, lse, qk_scale_log2, col_ok, PRECISION: tl.constexpr, EVEN_N: tl.constexpr):
    """p = exp(q·kᵀ·scale − lse), as 2^(s·log2 e − lse·log2 e); masked columns give 0
    (EVEN_N: every column is a key)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
    p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
    if not EVEN_N:
        p = tl.where(col_ok[None, :], p, 0.0)
    return p


@triton.autotune(configs=_configs(for_backward=True), **_TUNING)
@triton.heuristics({"EVEN_M": lambda args: args["Lq"] % args["BLOCK_M"] == 0})
@triton.jit
def _backward_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    sq_b,
    sq_h,
    sq_l,
    sq_d,
    sk_b,
    sk_h,
    sk_l,
    sk_d,
    sv_b,
    sv_h,
    sv_l,
    sv_d,
    sdo_b,
    sdo_h,
    sdo_l,
    sdo_d,
    H,
    Lq,
    Lk,
    D,
    scale,
    qk_scale_log2,
    LQ_BUCKET,
    LK_BUCKET,
    LQ_ALIGN,
    LK_ALIGN,
    PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LARGE: tl.constexpr,
):
    """dk, dv for one block of BLOCK_N keys, streaming every query block (with EVEN_M, Lq
    a multiple of BLOCK_M, and EVEN_D, without masks in the loop)."""
    col0, bh, b, h = _tile(Lk, H, BLOCK_N, LARGE)
    cols = col0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < Lk
    d_ok = dims < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k_rows, v_rows = _at(cols, sk_l, LARGE)[:, None], _at(cols, sv_l, LARGE)[:, None]
    k = tl.load(k_ptr + b * sk_b + h * sk_h + k_rows + _at(dims, sk_d, LARGE)[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + v_rows + _at(dims, sv_d, LARGE)[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_block = (
        q_ptr + b * sq_b + h * sq_h + _at(tl.arange(0, BLOCK_M), sq_l, LARGE)[:, None] + _at(dims, sq_d, LARGE)[None, :]
    )
    do_block = (
        do_ptr
        + b * sdo_b
        + h * sdo_h
        + _at(tl.arange(0, BLOCK_M), sdo_l, LARGE)[:, None]
        + _at(dims, sdo_d, LARGE)[None, :]
    )
    for start in range(0, Lq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q = _rows_block(q_block + _at(start, sq_l, LARGE), Lq - start, d_ok, BLOCK_M, EVEN_M, EVEN_D)
        do = _rows_block(do_block + _at(start, sdo_l, LARGE), Lq - start, d_ok, BLOCK_M, EVEN_M, EVEN_D)
        if EVEN_M:
            lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + rows)
            delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + rows)
        else:
            lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        # Rows past Lq get p = 0. Columns of keys past Lk (k read as 0: p finite) are left
        # as they are: they feed only the rows of dk and dv that are never stored.
        p = _probabilities(q, k, lse, qk_scale_log2, col_ok, PRECISION, True)
        if not EVEN_M:
            p = tl.where(row_ok[:, None], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    tl.store(
        dk_ptr + bh.to(tl.int64) * Lk * D + _at(cols, D, LARGE)[:, None] + dims[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        dv_ptr + bh.to(tl.int64) * Lk * D + _at(cols, D, LARGE)[:, None] + dims[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=kv_mask,
    )


@triton.autotune(configs=_configs(for_backward=True), **_TUNING)
@triton.heuristics({"EVEN_N": lambda args: args["Lk"] % args["BLOCK_N"] == 0})
@triton.jit
def _backward_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    sq_b,
    sq_h,
    sq_l,
    sq_d,
    sk_b,
    sk_h,
    sk_l,
    sk_d,
    sv_b,
    sv_h,
    sv_l,
    sv_d,
    sdo_b,
    sdo_h,
    sdo_l,
    sdo_d,
    H,
    Lq,
    Lk,
    D,
    scale,
    qk_scale_log2,
    LQ_BUCKET,
    LK_BUCKET,
    LQ_ALIGN,
    LK_ALIGN,
    PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LARGE: tl.constexpr,
):
    """dq for one block of BLOCK_M queries, streaming every key block (with EVEN_N and
    EVEN_D, without masks in the loop)."""
    row0, bh, b, h = _tile(Lq, H, BLOCK_M, LARGE)
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = dims < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_rows, do_rows = _at(rows, sq_l, LARGE)[:, None], _at(rows, sdo_l, LARGE)[:, None]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + q_rows + _at(dims, sq_d, LARGE)[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + do_rows + _at(dims, sdo_d, LARGE)[None, :], mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_block = (
        k_ptr + b * sk_b + h * sk_h + _at(tl.arange(0, BLOCK_N), sk_l, LARGE)[:, None] + _at(dims, sk_d, LARGE)[None, :]
    )
    v_block = (
        v_ptr + b * sv_b + h * sv_h + _at(tl.arange(0, BLOCK_N), sv_l, LARGE)[:, None] + _at(dims, sv_d, LARGE)[None, :]
    )
    for start in range(0, Lk, BLOCK_N):
        col_ok = start + tl.arange(0, BLOCK_N) < Lk
        k = _rows_block(k_block + _at(start, sk_l, LARGE), Lk - start, d_ok, BLOCK_N, EVEN_N, EVEN_D)
        v = _rows_block(v_block + _at(start, sv_l, LARGE), Lk - start, d_ok, BLOCK_N, EVEN_N, EVEN_D)
        p = _probabilities(q, k, lse, qk_scale_log2, col_ok, PRECISION, EVEN_N)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * scale
    tl.store(
        dq_ptr + bh.to(tl.int64) * Lq * D + _at(rows, D, LARGE)[:, None] + dims[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=q_mask,
    )


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if _tf32_allowed() else "ieee"
    return "ieee"  # fp16/bf16 dots run on the tensor cores whatever this says


def _tf32_allowed() -> bool:
    """Whether the user lets float32 matmuls run in TF32: torch's fp32_precision setting
    where it exists (2.9 on; "none" inherits the global one, by default not TF32), else
    allow_tf32 (reading allow_tf32 raises once the newer setting was used)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision == "none":  # inherits the global setting (a release may not resolve it here)
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision is not None:
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def _has_descriptors() -> bool:
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    return TensorDescriptor is not None and version >= (3, 4)


def _check_tma_mode() -> None:
    if tma_mode not in _TMA_MODES:
        raise ValueError(f"{TMA_SETTING} must be 'auto', 'on' or 'off', got {tma_mode!r}")


def _descriptor_layout(t: Tensor) -> bool:
    """Whether a [B, H, L, D] descriptor can describe t: a unit last stride, a 16-byte
    aligned start, and the other strides positive multiples of 16 bytes (a size-1 dim's
    stride is never used: _descriptor replaces it; a 0 stride, an expanded dim, TMA does
    not take)."""
    (s0, s1, s2, s3), (n0, n1, n2, _), unit = t.stride(), t.shape, 16 // t.element_size()
    return (
        s3 == 1
        and t.data_ptr() % 16 == 0
        and (n0 == 1 or (s0 > 0 and s0 % unit == 0))
        and (n1 == 1 or (s1 > 0 and s1 % unit == 0))
        and (n2 == 1 or (s2 > 0 and s2 % unit == 0))
    )


def tma_not_supported_reasons(q: Tensor, k: Tensor, v: Tensor) -> list[str]:
    """Why the forward reads q, k and v through pointers rather than tensor descriptors
    (an empty list: it takes ``_forward_tma_kernel``)."""
    _check_tma_mode()
    reasons = []
    if tma_mode == "off":
        reasons.append(f"{TMA_SETTING}=off")
    if not _has_descriptors():
        reasons.append(f"Triton {triton.__version__} has no host tensor descriptors (3.4 and newer)")
    if tma_mode == "auto" and (q.device.type != "cuda" or _capability(q.device) < (9, 0)):
        reasons.append("TMA needs an sm_90 (Hopper) or newer GPU")
    if q.dtype not in _TMA_DTYPES:
        reasons.append(f"{q.dtype} runs the pointer kernel's FMA tiles (TMA serves the tensor-core tiles)")
    if q.shape[-1] > 128:
        reasons.append(f"head dim {q.shape[-1]} > 128 takes the pointer kernel's small tiles")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _descriptor_layout(t):
            reasons.append(f"{name} is not a descriptor's layout (unit last stride, 16-byte aligned start and strides)")
    if not _dense_rows_align(q):
        reasons.append(
            f"the output's rows ({q.shape[-1]} elements of {q.element_size()} bytes) are not 16-byte multiples"
        )
    return reasons


def _dense_rows_align(q: Tensor) -> bool:
    """Whether the dense output o (q's shape) has 16-byte row strides, as its descriptor
    needs: q, k and v may be padded views whose strides align where o's would not."""
    return q.shape[-1] * q.element_size() % 16 == 0


def _takes_tma(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """``not tma_not_supported_reasons(q, k, v)``, as the launcher asks it on every call:
    without building the messages, the cheap tests first."""
    _check_tma_mode()
    if tma_mode == "off" or q.dtype not in _TMA_DTYPES or q.shape[3] > 128 or not _has_descriptors():
        return False
    if tma_mode == "auto" and (q.device.type != "cuda" or _capability(q.device) < (9, 0)):
        return False
    return _descriptor_layout(q) and _descriptor_layout(k) and _descriptor_layout(v) and _dense_rows_align(q)


def _descriptor(t: Tensor, block_d: int) -> TensorDescriptor:
    """A [B, H, L, D] descriptor of t (q, k, v or o); the autotuner's pre-hook sets the box
    per config.
    A size-1 dim, whose stride is never stepped, gets the stride of a dense one over the
    dims inside it (its own may be anything, unaligned or 0); aligned, since they are."""
    strides = [1]
    for size, stride, inner_size in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1]), reversed(t.shape[1:])):
        strides.insert(0, stride if size > 1 else strides[0] * inner_size)
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, 16, block_d])


# CUDA's limit on a grid's y axis, and the largest element offset int32 holds.
_MAX_GRID_Y = 65535
_MAX_INT32_OFFSET = 2**31 - 1


def _large(heads_total: int, *tensors: Tensor) -> bool:
    """Whether a launch takes the kernels' LARGE form (see _tile, _at): batch·heads past the
    grid's y axis, or a tensor whose last element lies past int32's offsets."""
    reach = max(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) for t in tensors)
    return heads_total > _MAX_GRID_Y or reach > _MAX_INT32_OFFSET


def _grid(tiles: int, heads_total: int, large: bool) -> tuple[int, ...]:
    """(tiles, batch·heads), or all on axis 0 for a LARGE launch (see _tile)."""
    return (tiles * heads_total,) if large else (tiles, heads_total)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    if scale < 0:  # the kernels take scale ≥ 0 (_softmax_update); (−q)·kᵀ·|scale| is exact
        q, scale = -q, -scale
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    o = torch.empty((batch, heads, lq, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, lq), dtype=torch.float32, device=q.device)
    large = _large(batch * heads, q, k, v, o)
    grid = lambda meta: _grid(triton.cdiv(lq, meta["BLOCK_M"]), batch * heads, large)  # noqa: E731
    block_d = _block_d(head_dim)
    sizes = (heads, lq, lk, head_dim, scale * LOG2E, _bucket(lq), _bucket(lk), _alignment(lq), _alignment(lk))
    if _takes_tma(q, k, v):
        descriptors = (_descriptor(t, block_d) for t in (q, k, v, o))
        _forward_tma_kernel[grid](
            *descriptors, lse, *sizes, PRECISION=_precision(q.dtype), BLOCK_D=block_d, LARGE=large
        )
    else:
        strides = (*q.stride(), *k.stride(), *v.stride(), *o.stride())
        _forward_kernel[grid](
            q,
            k,
            v,
            o,
            lse,
            *strides,
            *sizes,
            PRECISION=_precision(q.dtype),
            EVEN_D=head_dim == block_d,
            BLOCK_D=block_d,
            LARGE=large,
        )
    return o, lse


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    block_d = _block_d(head_dim)
    delta = torch.empty((batch, heads, lq), dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    large = _large(batch * heads, q, k, v, out, grad_out, dq, dk, dv)
    _backward_delta_kernel[_grid(triton.cdiv(lq, 64), batch * heads, large)](
        out,
        grad_out,
        delta,
        *out.stride(),
        *grad_out.stride(),
        heads,
        lq,
        head_dim,
        BLOCK_D=block_d,
        BLOCK_M=64,
        LARGE=large,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    common = (heads, lq, lk, head_dim, scale, scale * LOG2E, _bucket(lq), _bucket(lk), _alignment(lq), _alignment(lk))
    constexprs = dict(PRECISION=_precision(q.dtype), EVEN_D=head_dim == block_d, BLOCK_D=block_d, LARGE=large)
    _backward_dkdv_kernel[lambda meta: _grid(triton.cdiv(lk, meta["BLOCK_N"]), batch * heads, large)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        *strides,
        *common,
        **constexprs,
    )
    _backward_dq_kernel[lambda meta: _grid(triton.cdiv(lq, meta["BLOCK_M"]), batch * heads, large)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        *strides,
        *common,
        **constexprs,
    )
    return dq, dk, dv

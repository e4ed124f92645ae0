"""Triton guided_step: the guidance combine and the sampler update in one elementwise pass.

Algorithm. With c the model's prediction and u the guiding one (the uncond half of the
model output, or a separate guide tensor) and v = c − u (or,
for APG, the running difference r = c − u + momentum·buffer), every guidance variant
(fastguide.ops.contract.GuidanceCombine states them) is m = f·(α_c·c + α_v·v) with
per-sample scalars:
  CFG            α_c = 1, α_v = w − 1, f = 1
  PAG / SLG      with the perturbed prediction p (the model output's third B rows), v is
                 the whole guidance term g = (w − 1)·(c − u) + s·(c − p), m = c + g:
                 α_c = 1, α_v = 1 ("cfg" only; a compile-time branch: without p the
                 launcher passes perturbed_ptr=None, which Triton specialises as a constant)
  CFG-Zero*      s* = ⟨c, u⟩/(‖u‖² + 1e-8),  α_c = w + s*(1 − w),  α_v = s*(w − 1); here
                 (alone) the moments are of (c, u) rather than (c, v), as ‖u‖² =
                 Mcc − 2Mcv + Mvv keeps no digit of a ‖u‖ ≪ ‖c‖
  tangential     u ← (u·v₁)v₁ = β(a₀c + a₁u), (a₀, a₁) the top eigenvector of the Gram matrix
                 [[c·c, c·u], [c·u, u·u]] (eigenvalue λ), β = (a₀ c·u + a₁ u·u)/(λ‖a‖²):
                 α_c = w + (1 − w)β(a₀ + a₁),  α_v = −(1 − w)β·a₁
  APG            k = min(1, τ/‖r‖),  α_c = 1 + (w − 1)·k·(η − 1)·⟨r, c⟩/‖c‖²,  α_v = (w − 1)·k
  CFG rescale    f = φ·std(c)/std(m₀) + 1 − φ, with m₀ = α_c·c + α_v·v
The per-sample scalars need only the moments of (c, v) (CFG-Zero*'s: of (c, u)): the
means μc, μv and the centred co-moment sums Mcc = Σ(c − μc)², Mvv, Mcv. Then std(m₀)² =
(α_c²Mcc + 2α_cα_vMcv + α_v²Mvv)/(n − 1), and with u = c − v the Gram entries are
Σxy = Mxy + n·μx·μy (⟨c, u⟩ = Mcc − Mcv + n·μc·μu, ‖u‖² = Mcc − 2Mcv + Mvv + n·μu²).
Centred sums keep the
variances from cancelling when |mean| ≫ std (a single pass over E[x²] − E[x]² in float32
keeps no digit of std at mean 1e4, spread 1e-2) and give exact zeros for a constant
prediction; working on the difference v rather than u keeps the expansions free of
cancellation when c ≈ u, as it is for trained models. CFG-Zero* gives that up for its s*:
from (c, u), its rescale's std(m₀) of m₀ = w·c + (1 − w)s*·u sums w²-sized terms when
c ≈ u (test_zero_star_at_a_large_scale_when_cond_is_close_to_uncond bounds the error).
Then, per element: x0 and eps from m and x by the prediction type's linear map, the
optional clip (eps re-derived), the classifier eps shift (x0 re-derived), and x_next,
the linear combination fastguide.ops.contract.StepCoefficients writes out (up to
MAX_HISTORY = 4 history tensors, in four pointer slots).

Passes. Plain CFG: one launch, `_guided_step_kernel`. Variants with reductions: first
`_guided_stats_kernel` (grid: B samples × PARTS chunks) writes each chunk's fp32 moments
(sums shifted by a value near the chunk's mean, accumulated in float32), then
`_coefficients_kernel` (one program per sample) merges a sample's ≤ 32 partials in
float64 by Chan's formula, in a fixed order (deterministic: no atomics), into its
(α_c, α_v, f), which the elementwise kernel reads. Three launches.
Similarity (the per-sample cosine of the two branches' x0 predictions, asked for with a
partials pointer; without one Triton specialises it away): the elementwise pass, which
reads c, u and x anyway, also derives each element's x̂0_c and x̂0_u from x and c, resp.
u, alone by the step's prediction-type map (`_predicted_x0`, the map it applies to the
guided prediction m; before any guidance transform, clip or classifier shift), in float32
and elementwise, before forming the products (expanding them into sums of x·x, x·c, ...
would cancel catastrophically at high noise), and writes each program's float32
Σx̂0_c·x̂0_u, Σx̂0_c², Σx̂0_u² to a (B, programs, 3) buffer, which the launcher merges in
float64 with torch (fastguide.ops.layout.merge_similarity): a few small ops, no pass over
the data.

Bytes it must move (E = B·C·HW elements of x, s_t the size of tensor t's dtype):
  elementwise: read 2E of model output (E when unguided, 3E with a perturbed prediction;
  +E for learned variance), E of x, E of each history tensor and of noise / grad used
  (E of a separate guide in place of the uncond half); write E (2E or 3E for a 2B or 3B
  out) of x_next, E of x0 when asked; APG with momentum reads and writes E of its buffer.
  stats pass: reads c and u again (2E, +E APG buffer or perturbed prediction).
  similarity: no extra read (x is read for the step); ~10 FLOPs more per element; the
  elementwise pass writes 12 bytes per program of BLOCK
  elements (B·⌈C·HW/BLOCK⌉·12 bytes in all), which the merge reads back.
FLOPs: ~20 per element, far under any GPU's ratio of FLOPs to bytes: memory-bound.

Layout: every x-shaped tensor shares x's dense layout (contiguous or channels_last) and
the model output's cond block for a sample is laid out like x's sample; the launcher
makes copies only when that does not hold (and always keeps ops' in-place semantics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastguide.ops.contract import (
    COMBINE_SCALARS,
    MAX_HISTORY,
    PREDICTION_TYPES,
    STEP_SCALARS,
    GuidanceCombine,
    StepCoefficients,
    StepTensors,
)
from fastguide.ops.layout import (
    STATS_APG,
    STATS_NONE,
    STATS_TANGENTIAL,
    STATS_ZERO_STAR,
    dense,
    guidance_stats,
    merge_similarity,
    step_format,
    write_back,
)

BLOCK = 2048  # elements per program of the elementwise pass (8 per thread at 8 warps)
NUM_WARPS = 8
# The elementwise pass with the similarity sums: 16 elements a thread (two 16-byte vectors
# of each fp16 input in flight). Its x0 predictions and sums take 48 registers at 8 warps,
# 5 blocks an SM and 60 KB in flight; at 4 warps 71 registers, 7 blocks and 84 KB
# (tools/kernel_report.py, sm_90). BLOCK stays, so the rows of sums per sample do too.
SIMILARITY_WARPS = 4
MAX_PARTS = 32  # partial moments per sample in the stats pass
# Offsets within a sample are int32 (fewer registers) unless they could pass 2³¹ − 1: a
# sample of LARGE_SAMPLE elements or more compiles the kernels' LARGE variant, with int64
# offsets. The margin: the stats pass's parts, each rounded up to whole blocks, reach up to
# MAX_PARTS blocks past the sample's end, and each reads one block beyond its chunk.
LARGE_SAMPLE = 2**31 - 1 - (MAX_PARTS + 2) * BLOCK
# The ids the kernels branch on, from their one definition (ops/layout.py, ops/contract.py).
NO_STATS, ZERO_STAR, APG, TANGENTIAL = (
    tl.constexpr(i) for i in (STATS_NONE, STATS_ZERO_STAR, STATS_APG, STATS_TANGENTIAL)
)
EPSILON, V_PREDICTION, FLOW_PREDICTION = (
    tl.constexpr(PREDICTION_TYPES.index(name)) for name in ("epsilon", "v_prediction", "flow_prediction")
)
STATS_FIELDS = tl.constexpr(8)  # a partial: count, reference (c, v), mean offsets (c, v), co-moments cc, vv, cv


@triton.jit
def _load_c_v(
    c_row,
    u_row,
    p_row,
    r_row,
    j,
    mask,
    apg_momentum,
    scale,
    perturbed_scale,
    APG_MOMENTUM: tl.constexpr,
    PAIR_U: tl.constexpr,
):
    """c and v = c − u (+ momentum·buffer; or, given a row p of the perturbed prediction,
    the whole guidance term (w − 1)·(c − u) + s·(c − p)) at offsets j of one sample's rows
    of c, u, p and the APG buffer r, in fp32; with PAIR_U, c and u itself."""
    PERTURBED: tl.constexpr = p_row is not None
    c = tl.load(c_row + j, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_row + j, mask=mask, other=0.0).to(tl.float32)
    v = c - u
    if APG_MOMENTUM:
        v += apg_momentum * tl.load(r_row + j, mask=mask, other=0.0).to(tl.float32)
    if PERTURBED:
        p = tl.load(p_row + j, mask=mask, other=0.0).to(tl.float32)
        v = (scale - 1.0) * v + perturbed_scale * (c - p)
    if PAIR_U:  # u as loaded: u = c − v would round away a u much smaller than c
        v = u
    return c, v


@triton.jit
def _fold(x, BLOCK: tl.constexpr):
    """x's sums over runs of 8 consecutive lanes ([BLOCK // 8]). Where a thread holds 8
    consecutive elements (16-bit inputs in 16-byte vectors) the sums stay in the thread;
    otherwise the compiler moves lanes between threads, with the same result."""
    return tl.sum(tl.reshape(x, [BLOCK // 8, 8]), axis=1)


@triton.jit
def _guided_stats_kernel(
    mo_ptr,
    uncond_ptr,
    perturbed_ptr,
    buf_ptr,
    partial_ptr,
    sample_elems,
    mo_sample_stride,
    uncond_sample_stride,
    elems_per_part,
    apg_momentum,
    scale,
    perturbed_scale,
    APG_MOMENTUM: tl.constexpr,
    PAIR_U: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK: tl.constexpr,
    LARGE: tl.constexpr,
):
    """The moments of (c, v) over one chunk of one sample: its count n, a reference value
    k, the mean offsets μ − k and the centred co-moment sums Σ(c − μc)², Σ(v − μv)²,
    Σ(c − μc)(v − μv). With PAIR_U (CFG-Zero*) the pair is (c, u) instead.

    k is the mean of the chunk's first block (n₀ elements), formed as r + mean(x − r)
    about the block's first element r, so that a constant block gives k = r exactly. Every
    element is summed shifted by k (differences of nearby values are exact):
    S1 = Σ(x − k), S2 = Σ(x − k)(y − k) for x, y ∈ {c, v}, and M = S2 − S1·S1'/n. As
    S2 = M + n(μ − k)² and n(μ − k)² ≤ (n/n₀ − 1)·M (the first block's share of the
    spread), M loses at most a factor n/n₀ to cancellation: none for a chunk of one block
    (up to 64k-element samples), where E[x²] − E[x]² loses (μ/σ)²; a constant chunk gives
    exact zeros.
    """
    PERTURBED: tl.constexpr = perturbed_ptr is not None
    # Samples on grid axis 0, the ≤ PARTS parts on axis 1 (which stops at 65535).
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    start = part.to(tl.int64) * elems_per_part if LARGE else part * elems_per_part
    lanes = tl.arange(0, BLOCK)
    # The sample's rows of c, u, p and the APG buffer (absent ones stay None).
    c_row = mo_ptr + b * mo_sample_stride
    u_row = uncond_ptr + b * uncond_sample_stride
    p_row = perturbed_ptr
    if PERTURBED:
        p_row += b * mo_sample_stride
    r_row = buf_ptr
    if APG_MOMENTUM:
        r_row += b * sample_elems
    mask = start + lanes < sample_elems
    c, v = _load_c_v(
        c_row, u_row, p_row, r_row, start + lanes, mask, apg_momentum, scale, perturbed_scale, APG_MOMENTUM, PAIR_U
    )
    ref_c = tl.sum(tl.where(lanes == 0, c, 0.0), axis=0)
    ref_v = tl.sum(tl.where(lanes == 0, v, 0.0), axis=0)
    first_count = tl.maximum(tl.sum(mask.to(tl.float32), axis=0), 1.0)
    k_c = ref_c + tl.sum(tl.where(mask, c - ref_c, 0.0), axis=0) / first_count
    k_v = ref_v + tl.sum(tl.where(mask, v - ref_v, 0.0), axis=0) / first_count
    dc = tl.where(mask, c - k_c, 0.0)
    dv = tl.where(mask, v - k_v, 0.0)
    acc_c = _fold(dc, BLOCK)
    acc_v = _fold(dv, BLOCK)
    acc_cc = _fold(dc * dc, BLOCK)
    acc_vv = _fold(dv * dv, BLOCK)
    acc_cv = _fold(dc * dv, BLOCK)
    # Two blocks an iteration, both loaded before either is summed: twice the bytes in
    # flight per thread. The second may lie past the chunk's end (masked off).
    chunk_end = tl.minimum(start + elems_per_part, sample_elems)
    for offset in range(BLOCK, elems_per_part, 2 * BLOCK):
        j = start + offset + lanes
        mask = j < chunk_end
        mask_next = j + BLOCK < chunk_end
        c, v = _load_c_v(
            c_row, u_row, p_row, r_row, j, mask, apg_momentum, scale, perturbed_scale, APG_MOMENTUM, PAIR_U
        )
        c_next, v_next = _load_c_v(
            c_row, u_row, p_row, r_row, j + BLOCK, mask_next, apg_momentum, scale, perturbed_scale, APG_MOMENTUM, PAIR_U
        )
        dc = tl.where(mask, c - k_c, 0.0)
        dv = tl.where(mask, v - k_v, 0.0)
        dc_next = tl.where(mask_next, c_next - k_c, 0.0)
        dv_next = tl.where(mask_next, v_next - k_v, 0.0)
        acc_c += _fold(dc + dc_next, BLOCK)
        acc_v += _fold(dv + dv_next, BLOCK)
        acc_cc += _fold(dc * dc + dc_next * dc_next, BLOCK)
        acc_vv += _fold(dv * dv + dv_next * dv_next, BLOCK)
        acc_cv += _fold(dc * dv + dc_next * dv_next, BLOCK)
    n = tl.minimum(tl.maximum(sample_elems - start, 0), elems_per_part).to(tl.float32)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    s_c = tl.sum(acc_c, axis=0)
    s_v = tl.sum(acc_v, axis=0)
    out = partial_ptr + (b * PARTS + part) * STATS_FIELDS
    tl.store(out + 0, n)
    tl.store(out + 1, k_c)
    tl.store(out + 2, k_v)
    tl.store(out + 3, s_c * inv_n)
    tl.store(out + 4, s_v * inv_n)
    tl.store(out + 5, tl.sum(acc_cc, axis=0) - s_c * s_c * inv_n)
    tl.store(out + 6, tl.sum(acc_vv, axis=0) - s_v * s_v * inv_n)
    tl.store(out + 7, tl.sum(acc_cv, axis=0) - s_c * s_v * inv_n)


@triton.jit
def _coefficients_kernel(
    partial_ptr,
    coefficient_ptr,
    scale,
    rescale,
    apg_eta,
    apg_norm_threshold,
    STATS: tl.constexpr,
    RESCALE: tl.constexpr,
    PERTURBED: tl.constexpr,
    PARTS: tl.constexpr,
):
    """One program per sample b: its (α_c, α_v, f) from its chunks' moments, merged in
    float64 by Chan's formula in a fixed order: μ = Σ n_p μ_p / n, M = Σ M_p +
    Σ n_p (μ_p − μ)(μ_p − μ)'. The Gram entries follow without cancelling: Σxy = M_xy +
    n·μx·μy, with u = c − v (CFG-Zero*'s pair is (c, u) itself: see the module's table).
    Written to coefficient_ptr[b, 0:3] for the elementwise pass, which reads three floats
    where merging 32 partials in float64 in each of its programs would hold the registers
    its loads need."""
    b = tl.program_id(0).to(tl.int64)
    row = partial_ptr + (b * PARTS + tl.arange(0, PARTS)) * STATS_FIELDS
    counts = tl.load(row + 0).to(tl.float64)  # 0 in the rows of the unused parts
    part_c = tl.load(row + 1).to(tl.float64) + tl.load(row + 3).to(tl.float64)
    part_v = tl.load(row + 2).to(tl.float64) + tl.load(row + 4).to(tl.float64)
    n = tl.sum(counts, axis=0)
    mean_c = tl.sum(counts * part_c, axis=0) / n
    mean_v = tl.sum(counts * part_v, axis=0) / n
    dc = part_c - mean_c
    dv = part_v - mean_v
    m_cc = tl.sum(tl.load(row + 5).to(tl.float64) + counts * dc * dc, axis=0)
    m_vv = tl.sum(tl.load(row + 6).to(tl.float64) + counts * dv * dv, axis=0)
    m_cv = tl.sum(tl.load(row + 7).to(tl.float64) + counts * dc * dv, axis=0)
    mean_u = mean_c - mean_v
    w64 = tl.cast(scale, tl.float64)
    if STATS == ZERO_STAR:  # the pair is (c, u): the "v" moments are u's
        cu = m_cv + n * mean_c * mean_v
        uu = m_vv + n * mean_v * mean_v
        s_star = cu / (uu + 1e-8)
        # m₀ = w·c + (1 − w)s*·u, first in the pair (c, u) of the moments (for the rescale)
        alpha_c = w64
        alpha_v = (1.0 - w64) * s_star
    elif STATS == APG:
        cc = m_cc + n * mean_c * mean_c
        vv = m_vv + n * mean_v * mean_v
        cv = m_cv + n * mean_c * mean_v
        clip = tl.full([], 1.0, tl.float64)
        if apg_norm_threshold > 0:
            clip = tl.minimum(clip, tl.cast(apg_norm_threshold, tl.float64) / tl.sqrt(vv))
        alpha_c = 1.0 + (w64 - 1.0) * clip * (tl.cast(apg_eta, tl.float64) - 1.0) * cv / tl.maximum(cc, 1e-24)
        alpha_v = (w64 - 1.0) * clip
    elif STATS == TANGENTIAL:  # u ← (u·v₁)v₁ = β·(a₀c + a₁u), a the top eigenvector of [c; u]'s Gram
        cc = m_cc + n * mean_c * mean_c
        cu = (m_cc - m_cv) + n * mean_c * mean_u
        uu = (m_cc - 2.0 * m_cv + m_vv) + n * mean_u * mean_u
        half_gap = (m_cv + n * mean_c * mean_v) - 0.5 * (m_vv + n * mean_v * mean_v)  # (c·c − u·u)/2 = c·v − v·v/2
        root = tl.sqrt(half_gap * half_gap + cu * cu)
        top = 0.5 * (cc + uu) + root
        a0 = tl.where(half_gap >= 0.0, root + half_gap, cu)  # top − u·u or c·u: the form that does not cancel
        a1 = tl.where(half_gap >= 0.0, cu, root - half_gap)  # c·u or top − c·c
        denominator = top * (a0 * a0 + a1 * a1)
        beta = tl.where(denominator > 0.0, (a0 * cu + a1 * uu) / denominator, 0.0)
        alpha_c = w64 + (1.0 - w64) * beta * (a0 + a1)
        alpha_v = -(1.0 - w64) * beta * a1
    else:  # plain CFG, here only for CFG rescale
        alpha_c = tl.full([], 1.0, tl.float64)
        if PERTURBED:  # v is the whole guidance term: m₀ = c + v
            alpha_v = tl.full([], 1.0, tl.float64)
        else:
            alpha_v = w64 - 1.0
    f = tl.full([], 1.0, tl.float64)
    if RESCALE:
        # var(m₀) of m₀ = α_c·c + α_v·v from the centred co-moments; the 1/(n − 1) cancels.
        m_mm = alpha_c * alpha_c * m_cc + 2.0 * alpha_c * alpha_v * m_cv + alpha_v * alpha_v * m_vv
        # A constant guided prediction (std 0) is left as it is (no 0/0 formed); NaN still propagates.
        constant = m_mm <= 0.0
        rescaled = (
            tl.cast(rescale, tl.float64) * tl.sqrt(m_cc / tl.where(constant, 1.0, m_mm))
            + 1.0
            - tl.cast(rescale, tl.float64)
        )
        f = tl.where(constant, 1.0, rescaled)
    if STATS == ZERO_STAR:  # then as the elementwise pass forms it, from c and v
        alpha_c = w64 + (1.0 - w64) * s_star
        alpha_v = (w64 - 1.0) * s_star
    tl.store(coefficient_ptr + b * 3 + 0, alpha_c.to(tl.float32))
    tl.store(coefficient_ptr + b * 3 + 1, alpha_v.to(tl.float32))
    tl.store(coefficient_ptr + b * 3 + 2, f.to(tl.float32))


@triton.jit
def _predicted_x0(m, x, alpha, sigma, inv_alpha, PREDICTION: tl.constexpr):
    """x0 from a prediction m of x = alpha·x0 + sigma·eps by the prediction type's linear
    map, as the reference writes it (no term with a zero coefficient, so an infinite x
    gives what the reference gives): the step's x0 of the guided prediction, and the
    similarity output's x0 of c and of u."""
    # Explicit fmas: with the similarity asked for, products are shared by three x0s and
    # the compiler's own contraction then rounded the step's x0 differently (v-prediction on
    # the H200 run of 2026-12-04: out not bit-identical with and without the similarity);
    # written out, every specialisation rounds alike.
    if PREDICTION == EPSILON:
        x0 = tl.fma(-sigma, m, x) * inv_alpha
    elif PREDICTION == V_PREDICTION:
        x0 = tl.fma(alpha, x, -(sigma * m))
    elif PREDICTION == FLOW_PREDICTION:  # alpha + sigma = 1
        x0 = tl.fma(-sigma, m, x)
    else:  # sample
        x0 = m
    return x0


@triton.jit
def _guided_step_kernel(
    mo_ptr,
    uncond_ptr,
    perturbed_ptr,
    x_ptr,
    h0_ptr,
    h1_ptr,
    h2_ptr,
    h3_ptr,
    noise_ptr,
    grad_ptr,
    buf_ptr,
    out_ptr,
    out_third_ptr,
    x0_ptr,
    coefficient_ptr,
    similarity_partial_ptr,
    sample_elems,
    mo_sample_stride,
    uncond_sample_stride,
    var_offset,
    out_block_offset,
    # GuidanceCombine's scalars, by name
    scale,
    rescale,
    apg_eta,
    apg_norm_threshold,
    apg_momentum,
    perturbed_scale,
    # StepCoefficients' scalars, by name, and the prediction type's linear maps
    alpha,
    sigma,
    k_x,
    k_x0,
    k_eps,
    k_noise,
    k_grad,
    grad_eps_scale,
    k_guide_eps,
    inv_alpha,
    inv_sigma,
    k_h0,
    k_h1,
    k_h2,
    k_h3,
    log_var_min,
    log_var_max,
    GUIDED: tl.constexpr,
    STATS: tl.constexpr,
    RESCALE: tl.constexpr,
    APG_MOMENTUM: tl.constexpr,
    PREDICTION: tl.constexpr,
    CLIP: tl.constexpr,
    GRAD_EPS: tl.constexpr,
    LEARNED_VAR: tl.constexpr,
    NUM_HISTORY: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_GRAD_TERM: tl.constexpr,
    OUT_2B: tl.constexpr,
    HAS_X0_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
    LARGE: tl.constexpr,
):
    # Three branches specialised on a None pointer (Triton makes a None argument a constant)
    # rather than on flags of their own, so that every other specialisation, the kernel
    # report's included, stays as it was: a perturbed prediction p, a 3B out's third block,
    # and the similarity output's partial sums.
    PERTURBED: tl.constexpr = perturbed_ptr is not None
    SIMILARITY: tl.constexpr = similarity_partial_ptr is not None
    # One grid axis of blocks × samples (axis 1 would stop at 65535 samples): program
    # b·blocks + i moves the sample's i-th block.
    # (LARGE: the block count in int64 too, as cdiv's sample_elems + BLOCK − 1 would wrap)
    blocks = tl.cdiv(sample_elems.to(tl.int64) if LARGE else sample_elems, BLOCK)
    program = tl.program_id(0)
    b = (program // blocks).to(tl.int64)
    j = (program % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = j < sample_elems
    here = b * sample_elems + j  # offset of this element in every x-shaped tensor

    m = tl.load(mo_ptr + b * mo_sample_stride + j, mask=mask, other=0.0).to(tl.float32)
    # x first where something comes between the model outputs and the step: the similarity's
    # x0 predictions of c and u need it, and a reduction's use of its coefficients would
    # otherwise stand before its load (without either, x loads as it always did).
    X_FIRST: tl.constexpr = SIMILARITY or STATS != NO_STATS
    if X_FIRST:
        x = tl.load(x_ptr + here, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        u = tl.load(uncond_ptr + b * uncond_sample_stride + j, mask=mask, other=0.0).to(tl.float32)
        if SIMILARITY:
            # This program's sums for cos(x̂0_c, x̂0_u): the x0 predictions of c and u as
            # loaded, each by the step's own map, formed elementwise before the products
            # (masked lanes: c = u = x = 0, so x0 = 0 and they add nothing).
            x0_c = _predicted_x0(m, x, alpha, sigma, inv_alpha, PREDICTION)
            x0_u = _predicted_x0(u, x, alpha, sigma, inv_alpha, PREDICTION)
            sums = similarity_partial_ptr + program.to(tl.int64) * 3
            tl.store(sums + 0, tl.sum(x0_c * x0_u, axis=0))
            tl.store(sums + 1, tl.sum(x0_c * x0_c, axis=0))
            tl.store(sums + 2, tl.sum(x0_u * x0_u, axis=0))
        v = m - u
        if APG_MOMENTUM:
            v += apg_momentum * tl.load(buf_ptr + here, mask=mask, other=0.0).to(tl.float32)
            tl.store(buf_ptr + here, v.to(buf_ptr.dtype.element_ty), mask=mask)
        if PERTURBED:
            p = tl.load(perturbed_ptr + b * mo_sample_stride + j, mask=mask, other=0.0).to(tl.float32)
        if STATS == NO_STATS:
            if PERTURBED:  # as the reference writes it, so that infinities agree
                m = u + scale * v + perturbed_scale * (m - p)
            else:
                m = u + scale * v
        else:
            if PERTURBED:  # the stats pass's v: the whole guidance term
                v = (scale - 1.0) * v + perturbed_scale * (m - p)
            # The sample's (α_c, α_v, f), from `_coefficients_kernel`.
            alpha_c = tl.load(coefficient_ptr + b * 3 + 0)
            alpha_v = tl.load(coefficient_ptr + b * 3 + 1)
            f = tl.load(coefficient_ptr + b * 3 + 2)
            m = f * (alpha_c * m + alpha_v * v)

    if not X_FIRST:
        x = tl.load(x_ptr + here, mask=mask, other=0.0).to(tl.float32)
    # x0 and eps from m as the reference writes them (no term with a zero coefficient,
    # so an infinite x gives what the reference gives).
    x0 = _predicted_x0(m, x, alpha, sigma, inv_alpha, PREDICTION)
    if PREDICTION == EPSILON:
        eps = m
    elif PREDICTION == V_PREDICTION:
        eps = sigma * x + alpha * m
    elif PREDICTION == FLOW_PREDICTION:  # alpha + sigma = 1
        eps = x + alpha * m
    else:  # sample
        eps = (x - alpha * m) * inv_sigma
    if CLIP:
        # Finite x0 only: a NaN or ±inf x0 stays so (|NaN| < inf is false).
        x0 = tl.where(tl.abs(x0) < float("inf"), tl.minimum(tl.maximum(x0, -1.0), 1.0), x0)
        eps = (x - alpha * x0) * inv_sigma
    if GRAD_EPS or HAS_GRAD_TERM:
        g = tl.load(grad_ptr + here, mask=mask, other=0.0).to(tl.float32)
    if GRAD_EPS:
        eps = eps - grad_eps_scale * g
        x0 = (x - sigma * eps) * inv_alpha

    # Terms with a zero coefficient are absent (0·inf would be NaN), as in the reference.
    x_next = tl.zeros([BLOCK], dtype=tl.float32)
    if k_x != 0.0:
        x_next += k_x * x
    if k_x0 != 0.0:
        x_next += k_x0 * x0
    if k_eps != 0.0:
        x_next += k_eps * eps
    if GUIDED:
        if k_guide_eps != 0.0:  # CFG++: renoise with the guiding prediction's own eps
            if PREDICTION == EPSILON:
                x_next += k_guide_eps * u
            elif PREDICTION == V_PREDICTION:
                x_next += k_guide_eps * (sigma * x + alpha * u)
            elif PREDICTION == FLOW_PREDICTION:
                x_next += k_guide_eps * (x + alpha * u)
            else:
                x_next += k_guide_eps * ((x - alpha * u) * inv_sigma)
    if LEARNED_VAR:
        var_values = tl.load(mo_ptr + var_offset + b * mo_sample_stride + j, mask=mask, other=0.0).to(tl.float32)
        frac = (var_values + 1.0) * 0.5
        log_var = frac * log_var_max + (1.0 - frac) * log_var_min
    # The solver history: NUM_HISTORY of the four pointer slots are in use.
    if NUM_HISTORY > 0:
        if k_h0 != 0.0:
            x_next += k_h0 * tl.load(h0_ptr + here, mask=mask, other=0.0).to(tl.float32)
    if NUM_HISTORY > 1:
        if k_h1 != 0.0:
            x_next += k_h1 * tl.load(h1_ptr + here, mask=mask, other=0.0).to(tl.float32)
    if NUM_HISTORY > 2:
        if k_h2 != 0.0:
            x_next += k_h2 * tl.load(h2_ptr + here, mask=mask, other=0.0).to(tl.float32)
    if NUM_HISTORY > 3:
        if k_h3 != 0.0:
            x_next += k_h3 * tl.load(h3_ptr + here, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        noise = tl.load(noise_ptr + here, mask=mask, other=0.0).to(tl.float32)
        if LEARNED_VAR:
            x_next += k_noise * tl.exp(0.5 * log_var) * noise
        else:
            x_next += k_noise * noise
    if HAS_GRAD_TERM:
        if LEARNED_VAR:
            x_next += k_grad * tl.exp(log_var) * g
        else:
            x_next += k_grad * g

    tl.store(out_ptr + here, x_next.to(out_ptr.dtype.element_ty), mask=mask)
    # The other B-row blocks of a 2B or 3B out (the next [c; u] or [c; u; p] input).
    if OUT_2B:
        tl.store(out_ptr + out_block_offset + here, x_next.to(out_ptr.dtype.element_ty), mask=mask)
    if out_third_ptr is not None:
        tl.store(out_third_ptr + here, x_next.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_X0_OUT:
        tl.store(x0_ptr + here, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def guided_step(tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None) -> None:
    """Launch the stats pass (when a variant needs it) and the elementwise pass, then merge
    the similarity's per-program sums (when asked)."""
    x, model_output = tensors.x, tensors.model_output
    batch, channels = x.shape[0], x.shape[1]
    sample_elems = x[0].numel()
    learned = step.log_variance_range is not None
    fmt = step_format(x, model_output.shape[1] != channels)
    x_in, model_output_in = dense(x, fmt), dense(model_output, fmt)
    history = [dense(h, fmt) for h in tensors.history]
    noise, grad = dense(tensors.noise, fmt), dense(tensors.grad, fmt)
    # Outputs that are not dense in fmt are computed into a dense copy and copied back.
    targets = {"out": tensors.out, "x0_out": tensors.x0_out, "apg_buffer": tensors.apg_buffer}
    work = {name: dense(t, fmt) for name, t in targets.items()}

    guided = combine is not None
    stats = guidance_stats(combine)
    apg_with_momentum = guided and combine.variant == "apg" and combine.apg_momentum != 0.0
    perturbed = guided and combine.perturbed_scale != 0.0
    mo_sample_stride = model_output[0].numel()
    # The guiding prediction u: the model output's second B rows, or its own tensor; the
    # perturbed one p: its third B rows.
    if guided and tensors.guide is not None:
        uncond = dense(tensors.guide, fmt)
        uncond_sample_stride = uncond[0].numel()
    else:
        uncond = model_output_in[batch : 2 * batch] if guided else model_output_in
        uncond_sample_stride = mo_sample_stride
    perturbed_in = model_output_in[2 * batch :] if perturbed else None
    combine_scalars = {name: float(getattr(combine or _UNGUIDED, name)) for name in COMBINE_SCALARS}

    parts = min(MAX_PARTS, triton.cdiv(sample_elems, BLOCK))
    parts_pow2 = triton.next_power_of_2(parts)
    partials = coefficients = None
    if stats != STATS_NONE:
        # Unused rows (parts..parts_pow2) have count 0: they add nothing to the merge.
        partials = torch.zeros((batch, parts_pow2, STATS_FIELDS), dtype=torch.float32, device=x.device)
        elems_per_part = triton.cdiv(triton.cdiv(sample_elems, parts), BLOCK) * BLOCK
        _guided_stats_kernel[(batch, parts)](
            model_output_in,
            uncond,
            perturbed_in,
            work["apg_buffer"],
            partials,
            sample_elems,
            mo_sample_stride,
            uncond_sample_stride,
            elems_per_part,
            combine_scalars["apg_momentum"],
            combine_scalars["scale"],
            combine_scalars["perturbed_scale"],
            APG_MOMENTUM=apg_with_momentum,
            PAIR_U=stats == STATS_ZERO_STAR,
            PARTS=parts_pow2,
            BLOCK=BLOCK,
            LARGE=sample_elems >= LARGE_SAMPLE,
            num_warps=NUM_WARPS,
        )
        coefficients = torch.empty((batch, 3), dtype=torch.float32, device=x.device)
        _coefficients_kernel[(batch,)](
            partials,
            coefficients,
            combine_scalars["scale"],
            combine_scalars["rescale"],
            combine_scalars["apg_eta"],
            combine_scalars["apg_norm_threshold"],
            STATS=stats,
            RESCALE=combine.rescale > 0,
            PERTURBED=perturbed,
            PARTS=parts_pow2,
            num_warps=1,
        )

    programs = triton.cdiv(sample_elems, BLOCK)
    # Every program writes its row: no initialisation needed.
    similarity_partials = (
        None if tensors.similarity is None else torch.empty((batch, programs, 3), dtype=torch.float32, device=x.device)
    )
    history_slots = history + [None] * (MAX_HISTORY - len(history))
    # Python floats: Triton's launcher refuses a NumPy scalar, which the op's checks accept
    k_history = [float(k) for k in step.k_history] + [0.0] * (MAX_HISTORY - len(history))
    log_min, log_max = (float(v) for v in step.log_variance_range) if learned else (0.0, 0.0)
    alpha, sigma = float(step.alpha), float(step.sigma)
    _guided_step_kernel[(programs * batch,)](
        model_output_in,
        uncond,
        perturbed_in,
        x_in,
        *history_slots,
        noise,
        grad,
        work["apg_buffer"],
        work["out"],
        work["out"][2 * batch :] if tensors.out.shape[0] == 3 * batch else None,
        work["x0_out"],
        coefficients,
        similarity_partials,
        sample_elems,
        mo_sample_stride,
        uncond_sample_stride,
        channels * (mo_sample_stride // model_output.shape[1]),
        batch * sample_elems,
        **combine_scalars,
        **{name: float(getattr(step, name)) for name in STEP_SCALARS},
        inv_alpha=1.0 / alpha if alpha > 0 else 0.0,
        inv_sigma=1.0 / sigma if sigma > 0 else 0.0,
        k_h0=k_history[0],
        k_h1=k_history[1],
        k_h2=k_history[2],
        k_h3=k_history[3],
        log_var_min=log_min,
        log_var_max=log_max,
        GUIDED=guided,
        STATS=stats,
        RESCALE=guided and combine.rescale > 0,
        APG_MOMENTUM=apg_with_momentum,
        PREDICTION=PREDICTION_TYPES.index(step.prediction_type),
        CLIP=step.clip_denoised,
        GRAD_EPS=grad is not None and step.grad_eps_scale != 0.0,
        LEARNED_VAR=learned,
        NUM_HISTORY=len(history),
        HAS_NOISE=noise is not None and step.k_noise != 0.0,
        HAS_GRAD_TERM=grad is not None and step.k_grad != 0.0,
        OUT_2B=tensors.out.shape[0] >= 2 * batch,
        HAS_X0_OUT=tensors.x0_out is not None,
        BLOCK=BLOCK,
        LARGE=sample_elems >= LARGE_SAMPLE,
        num_warps=NUM_WARPS if similarity_partials is None else SIMILARITY_WARPS,
    )
    write_back(targets, work)
    if similarity_partials is not None:
        merge_similarity(similarity_partials, tensors.similarity)


# The combine scalars of an unguided step (unused by the kernel; the launch needs values).
_UNGUIDED = GuidanceCombine(scale=1.0)

"""Pure-PyTorch reference ops: the specification, the oracle of every test, the CPU path.

Each function computes one op contract of docs/design.md in plain PyTorch, differentiable by
autograd and exact in float64. Low-precision inputs (fp16, bf16) are computed in float32
and cast back, as the contracts require; float64 inputs stay in float64.

The second half of the module is this backend's side of the interface that
``fastguide.ops`` calls on every backend (``attention_forward``/``_backward``,
``group_norm_forward``/``_backward``, ``layer_norm_forward``/``_backward``,
``gated_residual_layer_norm_forward``, ``guided_step``): forwards that also return the
statistics a fused backward would save, and backwards: the norms' from the saved
statistics, the modulation and activation written out and the normalisation through aten's
native backward; attention's through aten's flash-attention backward on CPU, elsewhere by
recomputing the forward under torch.func.vjp.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .contract import PREDICTION_TYPES, GuidanceCombine, NormParameters, StepCoefficients, StepTensors

ACTIVATIONS = (None, "silu")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (the contracts' accumulation type)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype``; t itself when it already is (a ``.to`` that changes nothing still
    costs a dispatcher round trip, which the CPU path pays on every op call)."""
    return t if t.dtype == dtype else t.to(dtype)


def like_memory_format(y: Tensor, x: Tensor) -> Tensor:
    """``y`` laid out like ``x`` (channels_last stays channels_last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y.contiguous()


def _per_sample(t: Tensor, ndim: int) -> Tensor:
    """A (N,) or (N, C) tensor viewed to broadcast over ``ndim``-dimensional (N, C, ...)."""
    return t.reshape(t.shape + (1,) * (ndim - t.dim()))


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """o = softmax(q·kᵀ·scale)·v over the last two dims; scale defaults to D^-1/2.

    q (B, H, Lq, D), k and v (B, H, Lk, D). Computed through PyTorch's SDPA, which on CPU
    streams over keys (no Lq×Lk matrix), in float32 for fp16/bf16 inputs (``_sdpa``).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(q)
    if q.numel() == 0 or k.numel() == 0:  # aten's CPU kernel divides by zero on empty heads
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qc, kc = in_dtype(q, dtype), in_dtype(k, dtype)
    o = _sdpa(qc, kc, in_dtype(v, dtype), scale)
    (o,) = _nan_rows([o], qc, kc, scale)
    return in_dtype(o, q.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """SDPA of q, k, v as they are. On a CUDA device in float32, its math kernel (float32
    matmuls, IEEE with TF32 off, PyTorch's default): the memory-efficient kernel SDPA picks
    there multiplies float32 as three TF32 products on sm_80 and newer, each operand split
    in a TF32 part and a remainder, and the remainder of an infinite key is inf − inf =
    NaN, so a score that IEEE makes −inf (weight 0) came out NaN. The math kernel holds
    the Lq×Lk scores: memory the reference pays on a GPU, where the kernels run instead."""
    if q.device.type == "cuda" and q.dtype == torch.float32:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _may_hold_nonfinite(t: Tensor) -> bool:
    """False only where t holds no NaN or ±inf, decided on the host for a CPU tensor: its
    sum is finite (one NaN or infinity makes it NaN or infinite; a sum that overflows only
    sends the caller down its exact path). Elsewhere True without reading t: a branch on
    device data would wait for the device, which a CUDA graph capture refuses."""
    return t.device.type != "cpu" or not math.isfinite(float(t.sum(dtype=compute_dtype(t))))


def _nan_rows(outputs: list[Tensor], q: Tensor, k: Tensor, scale: float) -> list[Tensor]:
    """The attention outputs ((..., Lq, D) or (..., Lq)) with NaN in every row that IEEE
    softmax makes NaN and aten's SDPA kernels may not (the three rules below), one fill
    per output."""
    rules = (_rows_of_bad_queries(q), _rows_scoring_bad_keys(q, k, scale), _rows_of_one_nan_score(q, k))
    masks = [mask for mask in rules if mask is not None]
    if not masks:
        return outputs
    bad_rows = functools.reduce(torch.logical_or, masks)  # (..., Lq)
    return [t.masked_fill(bad_rows if t.dim() < q.dim() else bad_rows[..., None], float("nan")) for t in outputs]


def _rows_of_bad_queries(q: Tensor) -> Tensor | None:
    """The rows of queries holding a NaN or ±inf (None where none can): such a row's scores
    are NaN or infinities of both signs, so IEEE softmax gives NaN (aten's CPU kernel
    returns a finite row there)."""
    if not _may_hold_nonfinite(q):
        return None
    return ~torch.isfinite(q).all(dim=-1)


def _rows_scoring_bad_keys(q: Tensor, k: Tensor, scale: float, rows_per_chunk: int = 256) -> Tensor | None:
    """The rows whose score q·k·scale against a key holding a NaN or ±inf is NaN or +inf
    (torch 2.5's CPU kernel returns a zero row there in float64), and those whose every
    score is −inf (every key such a key: IEEE softmax is 0/0 there, and aten's CPU flash
    kernel returns a zero row). Only on the CPU, when k's
    sum is not finite (the rare case pays a second q·kᵀ, with the finite keys zeroed, over
    query chunks). Left to SDPA's kernels on a device (None), where the check cannot branch
    on the data and every call would pay that q·kᵀ."""
    if k.device.type != "cpu" or not _may_hold_nonfinite(k):
        return None
    k_bad = k.masked_fill(torch.isfinite(k).all(dim=-1, keepdim=True), 0.0)  # finite keys score 0
    chunks = []
    for q_chunk in q.split(rows_per_chunk, dim=-2):
        scores = torch.matmul(q_chunk, k_bad.transpose(-1, -2)) * scale
        chunks.append((scores.isnan() | (scores == math.inf)).any(dim=-1) | (scores == -math.inf).all(dim=-1))
    return torch.cat(chunks, dim=-1)


def _rows_of_one_nan_score(q: Tensor, k: Tensor) -> Tensor | None:
    """With a single key, the rows whose one score q·k is NaN (None with more keys): IEEE
    softmax of one NaN is NaN (aten's CPU flash kernel returns a zero row there; with two
    or more keys it returns NaN itself)."""
    if k.shape[-2] != 1:
        return None
    return torch.isnan((q * k).sum(-1))  # (..., Lq): each row's one score


def _attention_lse(q: Tensor, k: Tensor, scale: float, rows_per_chunk: int = 256) -> Tensor:
    """Row log-sum-exp of q·kᵀ·scale, over query chunks so memory stays O(chunk·Lk)."""
    chunks = [
        torch.logsumexp(torch.matmul(q_chunk, k.transpose(-1, -2)) * scale, dim=-1)
        for q_chunk in q.split(rows_per_chunk, dim=-2)
    ]
    return torch.cat(chunks, dim=-1)


# --------------------------------------------------------------------------------------
# group_norm
# --------------------------------------------------------------------------------------


def _scale_shift_act(y: Tensor, scale: Tensor | None, shift: Tensor | None, activation: str | None) -> Tensor:
    """act(y·(1 + scale) + shift), scale and shift (or None) broadcast per sample."""
    # (in the peers' order, a product then a sum: DiT's and diffusers' own rounding)
    if scale is not None:
        y = y * (1 + _per_sample(in_dtype(scale, y.dtype), y.dim()))
    if shift is not None:
        y = y + _per_sample(in_dtype(shift, y.dtype), y.dim())
    if activation == "silu":
        y = F.silu(y)
    return y


def _nan_where_overflowed(y: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(y, rstd) with every normalised row of y whose rstd is 0 set to NaN: y viewed as
    rows (rstd's shape, k), a row a GroupNorm group or a LayerNorm row.

    Statistics that overflow the compute dtype give rstd = 0 in aten (1/√inf): the
    contract makes such a row or group NaN, as the kernels do (docs/design.md, NaN and Inf).
    """
    # On CPU the host reads the count (one reduction, and no fill in the common case);
    # elsewhere the fill is unconditional: a branch on device data would wait for the
    # device, which a CUDA graph capture refuses.
    if rstd.numel() == 0 or (rstd.device.type == "cpu" and int(torch.count_nonzero(rstd)) == rstd.numel()):
        return y, rstd
    overflowed = rstd == 0
    y_rows = y.reshape(*rstd.shape, -1).masked_fill(overflowed.unsqueeze(-1), float("nan"))
    return y_rows.reshape(y.shape), rstd.masked_fill(overflowed, float("nan"))


def _normalized(x_rows: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """x̂ = (x − mean)·rstd of rows (…, k) with per-row mean and rstd (…)."""
    return (x_rows - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)


def _affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """a = x̂·w + b, weight and bias (or None) viewed to broadcast against x̂."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias, x_hat, weight)
    a = x_hat if weight is None else x_hat * weight
    return a if bias is None else a + bias


def _modulation_backward(
    dy: Tensor, a: Tensor | None, scale: Tensor | None, shift: Tensor | None, activation: str | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(da, dscale, dshift) of y = act(z), z = a·(1 + s) + h, the part of the backward both
    norms share; the normalisation's own backward (aten's) takes da from there. a = x̂·w + b
    is needed for ds and the activation's derivative (None where neither is asked for).
    scale and shift (or None) come in the compute dtype, viewed to broadcast against dy;
    each gradient is summed to its view's shape:
      dz = dy·act'(z);  dh = Σ dz;  ds = Σ dz·a;  da = dz·(1 + s)
    """
    dz = dy
    if activation == "silu":
        assert a is not None, "the activation's derivative needs a"
        z = a if scale is None else a * (1 + scale)
        dz = torch.ops.aten.silu_backward(dz, z if shift is None else z + shift)
    dshift = None if shift is None else dz.sum_to_size(shift.shape)
    dscale = None
    if scale is not None:
        assert a is not None, "the scale's gradient needs a"
        dscale = (dz * a).sum_to_size(scale.shape)
    da = dz if scale is None else dz * (1 + scale)
    return da, dscale, dshift


def _as_parameter_grads(grads, params) -> tuple[Tensor | None, ...]:
    """Each gradient in its parameter's shape and dtype, as a new tensor (an op may not
    return an input: a per-token shift's gradient is dy itself); None for a None parameter."""
    return tuple(None if t is None else g.reshape(t.shape).to(t.dtype, copy=True) for g, t in zip(grads, params))


def norm_parameter_grads(
    dy_sum: Tensor,
    dy_xhat_sum: Tensor,
    da_sum: Tensor,
    da_xhat_sum: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dweight, dbias, dscale, dshift) from the kernels' per-sample sums over each
    channel's (or column's) elements: A = Σ dz, B = Σ dz·x̂, C = Σ da, E = Σ da·x̂ with
    da = dz·(1 + scale) (see ``_modulation_backward``), each (N, …) like scale:
    dshift = A, dscale = w·B + b·A, dbias = Σ_n C, dweight = Σ_n E. None for inputs that
    were None."""
    dshift = None if shift is None else dy_sum.to(shift.dtype)
    dscale = None
    if scale is not None:
        w = 1.0 if weight is None else weight.float()
        dscale = (w * dy_xhat_sum + (0.0 if bias is None else bias.float()) * dy_sum).to(scale.dtype)
    dbias = None if bias is None else da_sum.sum(0).reshape(bias.shape).to(bias.dtype)
    dweight = None if weight is None else da_xhat_sum.sum(0).reshape(weight.shape).to(weight.dtype)
    return dweight, dbias, dscale, dshift


# --------------------------------------------------------------------------------------
# guided_step
# --------------------------------------------------------------------------------------


def _sum_over_sample(t: Tensor) -> Tensor:
    """Per-sample sums over every non-batch dim, kept broadcastable."""
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True)


def _cfg_zero_star_uncond(cond: Tensor, uncond: Tensor) -> Tensor:
    """CFG-Zero* (Fan et al. 2025): uncond scaled by s* = ⟨c, u⟩ / (‖u‖² + 1e-8) per sample."""
    s_star = _sum_over_sample(cond * uncond) / (_sum_over_sample(uncond * uncond) + 1e-8)
    return s_star * uncond


def _tangential_uncond(cond: Tensor, uncond: Tensor) -> Tensor:
    """TCFG (Kwon et al. 2025): u projected onto v₁, the top right-singular vector of the
    per-sample matrix [c; u] (2 × every non-batch element), u ← (u·v₁)·v₁ (as diffusers'
    ``TangentialClassifierFreeGuidance``)."""
    # In float64: a float32 SVD of a nearly rank-1 [c; u] loses more than the kernels do.
    stacked = torch.stack([cond, uncond], dim=1).flatten(2).double()
    # A sample holding NaN or ±inf has no singular vectors (LAPACK may not converge): it
    # is NaN, as the whole-sample reductions of the kernels give.
    finite = torch.isfinite(stacked).all(dim=2).all(dim=1).reshape(-1, 1, 1)
    _, _, vh = torch.linalg.svd(torch.where(finite, stacked, 0.0), full_matrices=False)
    top = vh[:, :1]  # (N, 1, D)
    along = (stacked[:, 1:] * top).sum(-1, keepdim=True)
    projected = torch.where(finite, along * top, float("nan"))
    return projected.reshape(uncond.shape).to(uncond.dtype)


def _apg_guided(cond: Tensor, diff: Tensor, combine: GuidanceCombine, buffer: Tensor | None) -> Tensor:
    """Adaptive projected guidance (Sadat et al. 2024, Algorithm 1).

    diff ← diff + momentum·buffer (buffer keeps the running value);
    diff ← diff·min(1, norm_threshold/‖diff‖) when norm_threshold > 0;
    split diff into parts parallel and orthogonal to cond (per sample);
    m = cond + (scale − 1)·(orthogonal + eta·parallel).
    """
    if combine.apg_momentum != 0.0:
        assert buffer is not None, "APG with momentum keeps its state in apg_buffer (checked at the op)"
        diff = diff + combine.apg_momentum * buffer.to(diff.dtype)
        buffer.copy_(diff)
    if combine.apg_norm_threshold > 0.0:
        norm = _sum_over_sample(diff * diff).sqrt()
        diff = diff * torch.clamp(combine.apg_norm_threshold / norm, max=1.0)
    cond_norm = _sum_over_sample(cond * cond).sqrt().clamp_min(1e-12)
    cond_unit = cond / cond_norm
    parallel = _sum_over_sample(diff * cond_unit) * cond_unit
    orthogonal = diff - parallel
    return cond + (combine.scale - 1.0) * (orthogonal + combine.apg_eta * parallel)


def _cfg_rescale(cond: Tensor, guided: Tensor, rescale: float) -> Tensor:
    """CFG rescale (Lin et al. 2023): blend guided·std(cond)/std(guided) with guided.

    std is the unbiased per-sample standard deviation over every non-batch dim (as
    diffusers' ``rescale_noise_cfg``); where std(guided) = 0 the ratio is 1.
    """
    dims = tuple(range(1, cond.dim()))
    std_guided = guided.std(dim=dims, keepdim=True)
    # A constant guided prediction (std 0, e.g. a freshly built model's zero output) is
    # left as it is rather than divided by zero; NaN still propagates. "Constant" allows
    # float64 rounding: tangential CFG's SVD projection of a constant u is constant only
    # to ~√n·ε₆₄ (9e-15 at n = 5760), which would otherwise scale m by std(c)/9e-15. A
    # float32 input differing by one ulp anywhere stays far above this.
    elements = math.prod(guided.shape[1:])
    rounding = 8 * math.sqrt(elements) * torch.finfo(torch.float64).eps * guided.abs().amax(dim=dims, keepdim=True)
    ratio = torch.where(std_guided <= rounding, 1.0, cond.std(dim=dims, keepdim=True) / std_guided)
    return rescale * guided * ratio + (1.0 - rescale) * guided


def guided_prediction(
    cond: Tensor,
    uncond: Tensor,
    combine: GuidanceCombine,
    apg_buffer: Tensor | None = None,
    perturbed: Tensor | None = None,
) -> Tensor:
    """The guided model prediction m from the cond, uncond and (when
    combine.perturbed_scale ≠ 0) perturbed predictions, all of one dtype
    (fastguide.ops.contract.GuidanceCombine states the math).

    Plain CFG: m = u + w·(c − u), plus s·(c − p) for PAG and skip-layer guidance.
    CFG-Zero* replaces u by s*·u, tangential CFG by its projection onto the top singular
    direction of [c; u], first; APG replaces the combine by its projected form; CFG
    rescale is applied last to whichever m results. Variants with per-sample reductions
    run in float64 (and round once at the end): in float32 the reductions cancel at large
    mean and small spread, where the kernels' shifted sums do not.
    """
    if (combine.rescale > 0.0 or combine.variant != "cfg") and cond.dtype != torch.float64:
        perturbed = None if perturbed is None else perturbed.double()
        return guided_prediction(cond.double(), uncond.double(), combine, apg_buffer, perturbed).to(cond.dtype)
    if combine.variant == "zero_star":
        uncond = _cfg_zero_star_uncond(cond, uncond)
    elif combine.variant == "tangential":
        uncond = _tangential_uncond(cond, uncond)
    diff = cond - uncond
    if combine.variant == "apg":
        guided = _apg_guided(cond, diff, combine, apg_buffer)
    else:
        guided = uncond + combine.scale * diff
    if combine.perturbed_scale != 0.0:
        assert perturbed is not None, "a perturbed scale reads the third B rows (checked at the op)"
        guided = guided + combine.perturbed_scale * (cond - perturbed)
    if combine.rescale > 0.0:
        guided = _cfg_rescale(cond, guided, combine.rescale)
    return guided


def cosine_from_sums(cu: Tensor, cc: Tensor, uu: Tensor) -> Tensor:
    """Per-sample cos(a, b) = Σa·b / (√Σa·a · √Σb·b) from the sums (cu = Σa·b, cc = Σa·a,
    uu = Σb·b), in their dtype (float64 on every backend): 0 where ‖a‖·‖b‖ = 0, NaN where a
    sum is not finite. A NaN or ±inf in a or b makes a sum non-finite, and so does a
    float32 partial sum that overflowed on the kernels (|value| ≳ 1.8e19), where a finite
    Σa·b over an infinite norm would otherwise read as 0."""
    norms = cc.sqrt() * uu.sqrt()
    cosine = torch.where(norms == 0, 0.0, cu / norms)
    return torch.where(cu.isfinite() & cc.isfinite() & uu.isfinite(), cosine, math.nan)


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_i) of each sample i over every non-batch element, summed in float64
    (``cosine_from_sums`` states the zero-norm and NaN cases)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return cosine_from_sums((a * b).sum(1), (a * a).sum(1), (b * b).sum(1))


def x0_similarity(cond: Tensor, uncond: Tensor, x: Tensor, step: StepCoefficients) -> Tensor:
    """guided_step's similarity output: per sample b, cos(x̂0_c, x̂0_u) of the x0 predictions
    of the conditional prediction c and the guiding one u, each alone, derived from x by
    the step's prediction-type map (``denoised_and_eps`` with step.alpha, step.sigma,
    step.prediction_type; no guidance transform, clip or classifier shift), elementwise in
    float64 and then the cosine (``cosine_similarity``). cond, uncond: the first C
    channels, shaped like x.

    The x0 predictions rather than c and u themselves: an eps model's c and u are both
    ≈ x/σ at high noise (raw cosine ≈ 1 from the first step), its x0 predictions are not;
    the cosine of the x0 predictions is also the same whichever the parameterisation."""
    x = x.double()
    x0_cond, _ = denoised_and_eps(cond.double(), x, step.alpha, step.sigma, step.prediction_type)
    x0_uncond, _ = denoised_and_eps(uncond.double(), x, step.alpha, step.sigma, step.prediction_type)
    return cosine_similarity(x0_cond, x0_uncond)


def denoised_and_eps(m: Tensor, x: Tensor, alpha: float, sigma: float, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the model prediction m of x = alpha·x0 + sigma·eps."""
    if prediction_type == "epsilon":
        return (x - sigma * m) / alpha, m
    if prediction_type == "v_prediction":
        return alpha * x - sigma * m, sigma * x + alpha * m
    if prediction_type == "sample":
        return m, (x - alpha * m) / sigma
    if prediction_type == "flow_prediction":  # m = eps − x0 on a path with alpha + sigma = 1
        return x - sigma * m, x + alpha * m
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _linear_combination(terms: list[tuple[float | Tensor, Tensor | None]], like: Tensor) -> Tensor:
    """Σ coef·tensor over the terms whose coefficient is not the scalar 0 (skipping a pass
    each); a coefficient may be a tensor (per-element)."""
    result = None
    for coef, tensor in terms:
        if tensor is None or (not isinstance(coef, Tensor) and coef == 0):
            continue
        if isinstance(coef, Tensor):
            result = coef * tensor if result is None else result.addcmul(coef, tensor)
        else:
            result = coef * tensor if result is None else result.add(tensor, alpha=coef)
    return torch.zeros_like(like) if result is None else result


def guided_step(tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None = None) -> Tensor:
    """Guidance combine and one sampler update: the guided_step contract
    (fastguide.ops.contract states the types).

    1. m = guided_prediction(c, u, p) with c the first B rows of model_output, u its
       second B rows or ``guide``, p its third B rows when combine.perturbed_scale ≠ 0
       (or m = c when ``combine`` is None); with learned variance (2C channels) guidance
       acts on the first C channels only.
    2. x0, eps from m and x (``denoised_and_eps``).
    3. clip_denoised: x0 ← clamp(x0, −1, 1) where x0 is finite (a NaN or ±inf x0 stays
       non-finite, NaN here: clipping must not hide it), eps ← (x − alpha·x0)/sigma.
    4. grad_eps_scale ≠ 0: eps ← eps − grad_eps_scale·grad, x0 ← (x − sigma·eps)/alpha
       (ADM's classifier guidance for DDIM-like samplers; x0 is not clipped again).
    5. x_next = k_x·x + k_x0·x0 + k_eps·eps + Σᵢ k_history[i]·history[i] + k_noise'·noise
       + k_grad'·grad + k_guide_eps·eps_u (eps_u: the eps of u by the prediction type's
       map, CFG++'s renoising), where k_noise' = k_noise·exp(ℓ/2) and k_grad' = k_grad·exp(ℓ) with
       the learned log variance ℓ = frac·max + (1 − frac)·min, frac = (v + 1)/2, v the
       variance channels of the first B rows, when log_variance_range = (min, max) is
       given; otherwise k_noise' = k_noise and k_grad' = k_grad.

    x_next is written to ``out`` (each B-row block when it has 2B or 3B rows; a new
    tensor like x when not given), x0 to ``x0_out`` when given; ``apg_buffer`` is updated
    in place; ``similarity`` (a guided step only) receives x0_similarity(c, u, x, step) per
    sample: the cosine of the x0 predictions of c and u as read in step 1 (before any
    variant transforms u), each by step 2's map alone (no clip, no classifier shift).
    Returns ``out``.
    """
    model_output, x = tensors.model_output, tensors.x
    batch, channels = x.shape[0], x.shape[1]
    if combine is not None:
        uncond_rows = (model_output[batch : 2 * batch] if tensors.guide is None else tensors.guide)[:, :channels]
        if tensors.similarity is not None:  # first: samples of no element still get their 0
            tensors.similarity.copy_(x0_similarity(model_output[:batch, :channels], uncond_rows, x, step))
    if x.numel() == 0:  # nothing to compute (and no per-sample statistics of nothing)
        return torch.empty_like(x) if tensors.out is None else tensors.out
    dtype = compute_dtype(model_output, x, tensors.guide)
    x_c = in_dtype(x, dtype)

    m = in_dtype(model_output[:batch, :channels], dtype)
    guide_eps = None
    if combine is not None:
        uncond = in_dtype(uncond_rows, dtype)
        perturbed = None
        if combine.perturbed_scale != 0.0:
            perturbed = in_dtype(model_output[2 * batch : 3 * batch, :channels], dtype)
        if step.k_guide_eps != 0.0:
            _, guide_eps = denoised_and_eps(uncond, x_c, step.alpha, step.sigma, step.prediction_type)
        m = guided_prediction(m, uncond, combine, tensors.apg_buffer, perturbed)

    alpha, sigma = step.alpha, step.sigma
    x0, eps = denoised_and_eps(m, x_c, alpha, sigma, step.prediction_type)
    if step.clip_denoised:
        # x0 − x0 is 0 where x0 is finite and NaN where not, so a NaN or ±inf x0 stays
        # non-finite (NaN) where clamp alone would make ±inf ±1 (two cheap ops: the where of
        # an isfinite mask cost ~8 µs a call on tiny tensors)
        x0 = x0.clamp(-1.0, 1.0).add_(x0 - x0)
        eps = (x_c - alpha * x0) / sigma
    grad = None if tensors.grad is None else in_dtype(tensors.grad, dtype)
    if grad is not None and step.grad_eps_scale != 0.0:
        eps = eps - step.grad_eps_scale * grad
        x0 = (x_c - sigma * eps) / alpha

    noise_coef: float | Tensor = step.k_noise
    grad_coef: float | Tensor = step.k_grad
    if step.log_variance_range is not None and (step.k_noise != 0.0 or step.k_grad != 0.0):
        log_min, log_max = step.log_variance_range
        frac = (in_dtype(model_output[:batch, channels:], dtype) + 1.0) / 2.0
        log_variance = frac * log_max + (1.0 - frac) * log_min
        if step.k_noise != 0.0:
            noise_coef = step.k_noise * torch.exp(0.5 * log_variance)
        if step.k_grad != 0.0:
            grad_coef = step.k_grad * torch.exp(log_variance)

    history_terms = [(k, in_dtype(h, dtype)) for k, h in zip(step.k_history, tensors.history)]
    x_next = _linear_combination(
        [
            (step.k_x, x_c),
            (step.k_x0, x0),
            (step.k_eps, eps),
            *history_terms,
            (noise_coef, None if tensors.noise is None else in_dtype(tensors.noise, dtype)),
            (grad_coef, grad),
            (step.k_guide_eps, guide_eps),
        ],
        like=x_c,
    )

    out = torch.empty_like(x) if tensors.out is None else tensors.out
    out.unflatten(0, (-1, batch)).copy_(x_next)  # x_next into each B-row block: one copy, broadcast
    if tensors.x0_out is not None:
        tensors.x0_out.copy_(x0)
    return out


# --------------------------------------------------------------------------------------
# Backend interface used by fastguide.ops (same names in every backend module)
# --------------------------------------------------------------------------------------


def _flash_readable(t: Tensor) -> Tensor:
    """t itself when its last dim, and only it, has stride 1, else a contiguous copy.
    aten's private CPU flash-attention kernels read a strided head dim wrongly (NaN; ADM's
    q, k, v views of a (B, 3·C, T) projection have head-dim stride T), and a q with stride
    1 in another dim too (an overlapping view, e.g. unfold's) as garbage (1e33)."""
    if t.stride(-1) == 1 and all(stride != 1 or size == 1 for stride, size in zip(t.stride()[:-1], t.shape[:-1])):
        return t
    return t.contiguous()


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(o, lse): the attention output and the row log-sum-exp of q·kᵀ·scale (natural log)."""
    dtype = compute_dtype(q)
    if q.numel() == 0 or k.numel() == 0:  # aten's CPU kernel divides by zero on empty heads
        return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[:-1], dtype=dtype)
    qc, kc, vc = (in_dtype(t, dtype) for t in (q, k, v))
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if q.device.type == "cpu" and cpu_flash is not None:
        # aten's CPU flash kernel returns the log-sum-exp it already computed.
        o, lse = cpu_flash(*(_flash_readable(t) for t in (qc, kc, vc)), 0.0, False, scale=scale)
    else:
        o = _sdpa(qc, kc, vc, scale)
        lse = _attention_lse(qc, kc, scale)
    o, lse = _nan_rows([o, lse], qc, kc, scale)
    return in_dtype(o, q.dtype).contiguous(), in_dtype(lse, dtype).contiguous()


def _vjp_recompute(fn, inputs: list[Tensor | None], grad_output: Tensor) -> list[Tensor | None]:
    """Gradients of fn(*inputs) against grad_output, recomputing fn under torch.func.vjp.

    (torch.func rather than torch.autograd: a custom op's implementation runs below the
    autograd dispatch key, where autograd records nothing.)
    """
    present = [t for t in inputs if t is not None]

    def over_present(*tensors):
        it = iter(tensors)
        return fn(*(None if t is None else next(it) for t in inputs))

    vjp = torch.func.vjp(over_present, *present)[1]
    grads = iter(vjp(grad_output))
    return [None if t is None else next(grads) for t in inputs]


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv). On CPU through aten's flash-attention backward, which uses the saved
    out and lse; elsewhere by differentiating ``attention`` (recomputing the forward)."""
    cpu_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if q.device.type == "cpu" and cpu_flash_backward is not None:
        dtype = compute_dtype(q)
        inputs = (_flash_readable(t.to(dtype)) for t in (grad_out, q, k, v, out))
        grads = cpu_flash_backward(*inputs, lse, 0.0, False, scale=scale)
        dq, dk, dv = (g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
        return dq, dk, dv
    return attention_backward_by_recompute(grad_out, q, k, v, scale)


def attention_backward_by_recompute(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) by differentiating ``attention`` under torch.func (any device)."""
    dq, dk, dv = _vjp_recompute(lambda q_, k_, v_: attention(q_, k_, v_, scale), [q, k, v], grad_out)
    assert dq is not None and dk is not None and dv is not None  # every input was given
    return dq, dk, dv


def group_norm_forward(
    x: Tensor, params: NormParameters, num_groups: int, eps: float, activation: str | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): GroupNorm with ADM's scale-shift and an optional SiLU, statistics in
    float32 (float64 for float64 inputs).

    norm = (x − mean[n, g]) / √(var[n, g] + eps) over the C/G channels of group g and all
    spatial positions; y = norm·weight[c] + bias[c]; y = y·(1 + scale[n, c]) + shift[n, c];
    y = silu(y) when activation == "silu". Output in x's dtype and memory format; mean and rstd
    per (n, group), shape (N, G).
    """
    weight, bias, scale, shift = params
    dtype = compute_dtype(x)
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    # aten's kernels take x contiguous: its CUDA kernel takes no other layout, and its CPU
    # channels_last kernel forms E[x²] − E[x]², which cancels (mean 10, spread 0.01: 0.68 off).
    y, mean, rstd = torch.ops.aten.native_group_norm(
        in_dtype(x, dtype).contiguous(),
        None if weight is None else in_dtype(weight, dtype),
        None if bias is None else in_dtype(bias, dtype),
        n,
        c,
        spatial,
        num_groups,
        eps,
    )
    y, rstd = _nan_where_overflowed(y, rstd)
    y = like_memory_format(_scale_shift_act(y, scale, shift, activation), x)
    return in_dtype(y, x.dtype), mean, rstd


def group_norm_backward(
    dy: Tensor, x: Tensor, params: NormParameters, mean: Tensor, rstd: Tensor, num_groups: int, activation: str | None
) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias, dscale, dshift) from the saved (N, G) mean and rstd.

    With x̂ = (x − mean)·rstd, a = x̂·w + b, z = a·(1 + s) + h, y = act(z):
      dz = dy·act'(z);  dh = Σ_hw dz;  ds = Σ_hw dz·a;  da = dz·(1 + s)
      db = Σ_{n,hw} da;  dw = Σ_{n,hw} da·x̂;  dx̂ = da·w
      dx = rstd·(dx̂ − mean_group(dx̂) − x̂·mean_group(dx̂·x̂))
    The last two lines are aten's native_group_norm_backward (one pass on the CPU; the
    kernels' split is the same math), handed x̂ with mean 0 and rstd 1 and its dx scaled
    by rstd after: aten forms them from uncentred sums of its input, which for float32 x
    whose mean is 1e4–1e5 times its spread doubled dx's error. Gradients come back None
    for inputs that were None.
    """
    weight, bias, scale, shift = params
    dtype = compute_dtype(x)
    n, c, spatial = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    x_rows = in_dtype(x, dtype).contiguous().reshape(n, c, spatial)

    def view(t: Tensor | None, rows: int) -> Tensor | None:  # (C,) or (N, C) against (N, C, HW)
        return None if t is None else in_dtype(t, dtype).reshape(rows, c, 1)

    groups = (n, num_groups, c // num_groups * spatial)
    x_hat = _normalized(x_rows.reshape(groups), mean, rstd).reshape(n, c, spatial)
    a = None if scale is None and activation is None else _affine(x_hat, view(weight, 1), view(bias, 1))
    dy_rows = in_dtype(dy, dtype).contiguous().reshape(n, c, spatial)
    da, dscale, dshift = _modulation_backward(dy_rows, a, view(scale, n), view(shift, n), activation)
    dx_hat_units, dweight, dbias = torch.ops.aten.native_group_norm_backward(
        da.contiguous(),
        x_hat,
        torch.zeros_like(mean),
        torch.ones_like(rstd),
        None if weight is None else in_dtype(weight, dtype),
        n,
        c,
        spatial,
        num_groups,
        # (aten's CPU kernel cannot form dbias without a weight: "tensor does not have a device")
        [True, weight is not None, weight is not None and bias is not None],
    )
    if bias is not None and weight is None:
        dbias = da.sum((0, 2))
    dx = (dx_hat_units.reshape(groups) * rstd.unsqueeze(-1)).reshape(x.shape)
    dx = in_dtype(like_memory_format(dx, x), x.dtype)
    return (dx, *_as_parameter_grads((dweight, dbias, dscale, dshift), params))


def group_norm_parameter_grads(
    sums: Tensor, params: NormParameters
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dweight, dbias, dscale, dshift) from the kernels' per-channel backward sums
    (N, C, 2) = (A, B), A = Σ_s dz and B = Σ_s dz·x̂ (``norm_parameter_grads`` with
    C = (1 + scale)·A, E = (1 + scale)·B: a per-sample scale is constant over s)."""
    a, b_sums = sums[..., 0], sums[..., 1]
    one_plus_scale = 1.0 if params.scale is None else 1.0 + params.scale.float()
    return norm_parameter_grads(a, b_sums, one_plus_scale * a, one_plus_scale * b_sums, *params)


# --------------------------------------------------------------------------------------
# layer_norm (DiT's adaLN) and the gated residual
# --------------------------------------------------------------------------------------


def gated_residual(h: Tensor, branch: Tensor, gate: Tensor) -> Tensor:
    """h + gate·branch (DiT's gated residual), gate broadcast against h, computed in
    float32 (float64 for float64 inputs) and rounded once to h's dtype."""
    dtype = compute_dtype(h, branch, gate)
    return torch.addcmul(h.to(dtype), gate.to(dtype), branch.to(dtype)).to(h.dtype)


def layer_norm_forward(x: Tensor, params: NormParameters, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): LayerNorm over the last dim with DiT's adaLN modulation, statistics in
    float32 (float64 for float64 inputs).

    x̂ = (x − mean)/√(var + eps) over the D elements of each row (biased variance);
    a = x̂·weight + bias; y = a·(1 + scale) + shift. scale and shift broadcast against
    x: (N, 1, D) per sample, or x's own shape per token. Output in x's dtype; mean and rstd per row,
    shape x.shape[:-1].
    """
    weight, bias, scale, shift = params
    dtype = compute_dtype(x)
    d = x.shape[-1]
    y, mean, rstd = torch.ops.aten.native_layer_norm(
        in_dtype(x, dtype).contiguous(),
        [d],
        None if weight is None else in_dtype(weight, dtype),
        None if bias is None else in_dtype(bias, dtype),
        eps,
    )
    y, rstd = _nan_where_overflowed(y, rstd.reshape(x.shape[:-1]))
    y = _scale_shift_act(y, scale, shift, None)
    return in_dtype(y, x.dtype).contiguous(), mean.reshape(x.shape[:-1]), rstd


def gated_residual_layer_norm_forward(
    h: Tensor, branch: Tensor, gate: Tensor, params: NormParameters, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h_new, y, mean, rstd): h_new = gated_residual(h, branch, gate) in h's dtype, then
    ``layer_norm_forward`` of that rounded h_new (as the unfused pair computes it)."""
    h_new = gated_residual(h, branch, gate).contiguous()
    return (h_new, *layer_norm_forward(h_new, params, eps))


def layer_norm_backward(
    grad_y: Tensor, x: Tensor, params: NormParameters, mean: Tensor, rstd: Tensor
) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias, dscale, dshift) from the saved per-row mean and rstd.

    With x̂ = (x − mean)·rstd, a = x̂·w + b, y = a·(1 + s) + h:
      dh = Σ dy and ds = Σ dy·a over the dims h and s broadcast over (tokens for a
      per-sample modulation); da = dy·(1 + s); db = Σ_rows da; dw = Σ_rows da·x̂;
      dx̂ = da·w;  dx = rstd·(dx̂ − mean_D(dx̂) − x̂·mean_D(dx̂·x̂)).
    From da on, aten's native_layer_norm_backward, handed x̂ with mean 0 and rstd 1 (as
    ``group_norm_backward`` says why). Gradients come back None for inputs that were None.
    """
    dtype = compute_dtype(x)
    weight, bias, scale, shift = (None if t is None else in_dtype(t, dtype) for t in params)
    x_hat = _normalized(in_dtype(x, dtype), mean, rstd)
    a = None if scale is None else _affine(x_hat, weight, bias)
    da, dscale, dshift = _modulation_backward(in_dtype(grad_y, dtype), a, scale, shift)
    stats = rstd.unsqueeze(-1)  # aten's (..., 1)
    dx_hat_units, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
        da.contiguous(),
        x_hat.contiguous(),
        [x.shape[-1]],
        torch.zeros_like(stats),
        torch.ones_like(stats),
        weight,
        bias,
        [True, weight is not None, bias is not None],
    )
    return (
        in_dtype(dx_hat_units * stats, x.dtype).contiguous(),
        *_as_parameter_grads((dweight, dbias, dscale, dshift), params),
    )


def layer_norm_parameter_grads(
    partials: Tensor, params: NormParameters, dscale_tokens: Tensor | None = None, dshift_tokens: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dweight, dbias, dscale, dshift) from the kernels' per-sample partial sums
    (N, chunks, 4, D) of (A, B, C, E) over each chunk of a sample's tokens, merged in a
    fixed order (deterministic), by ``norm_parameter_grads``. A per-token scale or shift
    (N, L > 1, D) takes the gradient the kernels wrote element by element
    (dscale_tokens, dshift_tokens). None for inputs that were None."""
    weight, bias, scale, shift = params
    sums = partials.sum(1)
    per_token = lambda t: t is not None and t.shape[-2] > 1  # noqa: E731
    dweight, dbias, dscale, dshift = norm_parameter_grads(
        sums[:, 0:1],
        sums[:, 1:2],
        sums[:, 2],
        sums[:, 3],
        weight,
        bias,
        None if per_token(scale) else scale,
        None if per_token(shift) else shift,
    )
    if scale is not None and per_token(scale):
        assert dscale_tokens is not None, "a per-token scale's gradient comes from the kernel"
        dscale = dscale_tokens.to(scale.dtype)
    if shift is not None and per_token(shift):
        assert dshift_tokens is not None, "a per-token shift's gradient comes from the kernel"
        dshift = dshift_tokens.to(shift.dtype)
    return dweight, dbias, dscale, dshift

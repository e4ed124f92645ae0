"""Argument checks at the op boundary (``fastguide.ops``), so kernels can trust their inputs.

Every failure is a standard exception whose message names the argument, what was
expected and what was given. The checks read only shapes, dtypes, devices and Python
scalars: no tensor data, so no host-device synchronisation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .contract import (
    COMBINE_SCALARS,
    COMBINE_VARIANTS,
    MAX_HISTORY,
    PREDICTION_TYPES,
    STEP_SCALARS,
    WRITTEN,
    GuidanceCombine,
    StepCoefficients,
    StepTensors,
)
from .reference import ACTIVATIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# guided_step's kernels take their scalars (and 1/alpha, 1/sigma) as float32.
FLOAT32_MAX = torch.finfo(torch.float32).max
# The path each prediction type's map to x0 and eps assumes (None: any alpha and sigma):
# v = alpha·eps − sigma·x0 gives x0 = alpha·x − sigma·v only where alpha² + sigma² = 1, a
# flow velocity eps − x0 gives x0 = x − sigma·v only where alpha + sigma = 1. check_step
# holds a step's alpha and sigma to it, a sampler its schedule (NoiseSchedule.path).
PREDICTION_PATHS = {"epsilon": None, "v_prediction": "variance-preserving", "sample": None, "flow_prediction": "flow"}
PATH_RELATIONS = {"variance-preserving": "alpha² + sigma² = 1", "flow": "alpha + sigma = 1"}


def check_tensor(name: str, t: object, ndim_at_least: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
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


def check_kernel_scalar(name: str, value: object) -> float:
    """A finite real number within float32's range, the kernels' scalar type."""
    value = check_finite(name, value)
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must lie within float32's range (|value| <= {FLOAT32_MAX:.4g}, the kernels' "
                         f"scalar type), got {value!r}")
    return value


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


def check_norm_parameters(
    x_name: str, x: Tensor, size: int, weight: object, bias: object, scale: object, shift: object, eps: object
) -> None:
    """The checks the norms share, after each checked its own scale and shift: weight and
    bias None or (size,) tensors, every tensor on x's device, eps positive and within
    float32's range (the statistics' type on every backend but float64's reference)."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t)
            check_shape(name, t, (size,))
    check_same_device([(x_name, x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)])
    if not 0 < check_finite("eps", eps) <= torch.finfo(torch.float32).max:
        raise ValueError(f"eps must be positive and within float32's range (the statistics' type), got {eps}")


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
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(name, t)
            if t.dim() < 2 or tuple(t.shape[:2]) != (batch, channels) or any(s != 1 for s in t.shape[2:]):
                raise ValueError(
                    f"{name} must have shape ({batch}, {channels}) or ({batch}, {channels}, 1, ...) "
                    f"for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
                )
    check_norm_parameters("x", x, channels, weight, bias, scale, shift, eps)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_token_tensor(name: str, t: object, x: Tensor, what: str) -> None:
    """A per-sample or per-token tensor of (N, L, D) or (N, D) x: shape (N, D),
    (N, 1, D) or x's own shape (the adaLN modulation and the residual gate); for an
    (N, D) x, each sample being one token, all three say the same."""
    check_tensor(name, t)
    n, d = x.shape[0], x.shape[-1]
    # Compared with ==, not hashed: under torch.jit.trace, sizes are traced values.
    if not any(tuple(t.shape) == allowed for allowed in ((n, d), (n, 1, d), tuple(x.shape))):
        per_token = "" if x.dim() == 2 else f" or {tuple(x.shape)} per token"
        raise ValueError(
            f"{name} ({what}) must have shape ({n}, {d}) or ({n}, 1, {d}) per sample{per_token} "
            f"for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
        )


def check_layer_norm(
    x: object,
    normalized_shape: object,
    weight: object,
    bias: object,
    eps: object,
    scale: object,
    shift: object,
    x_name: str = "x",
) -> None:
    check_tensor(x_name, x)
    if x.dim() not in (2, 3):
        raise ValueError(f"{x_name} must be (N, L, D) or (N, D), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d < 1:
        raise ValueError(f"the last dim of {x_name} (D) must be at least 1, got shape {tuple(x.shape)}")
    if isinstance(normalized_shape, bool) or not isinstance(normalized_shape, (int, Sequence)) \
            or isinstance(normalized_shape, str):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {type(normalized_shape).__name__}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if shape != (d,) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ValueError(
            f"normalized_shape must be ({d},), the last dim of {x_name} {tuple(x.shape)} (LayerNorm over the "
            f"last dim only), got {normalized_shape!r}"
        )
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            check_token_tensor(name, t, x, "adaLN modulation")
    check_norm_parameters(x_name, x, d, weight, bias, scale, shift, eps)


def check_gated_residual(h: object, branch: object, gate: object) -> None:
    """h (N, L, D) or (N, D); branch of h's shape, any floating dtype (the ops cast it to
    h's); gate per sample or per token (``check_token_tensor``); one device."""
    check_tensor("h", h)
    if h.dim() not in (2, 3):
        raise ValueError(f"h must be (N, L, D) or (N, D), got shape {tuple(h.shape)}")
    check_tensor("branch", branch)
    check_shape("branch", branch, tuple(h.shape))
    check_token_tensor("gate", gate, h, "residual gate")
    check_same_device([("h", h), ("branch", branch), ("gate", gate)])


# The contract's constant parts are checked once per object (the types are immutable): a
# sampler's plan repeats the same objects every run. Only the tensors are checked on
# every call.
def _once_per_object(check):
    """``check`` run once per object: the contract's types are immutable, and a sampler's
    plan hands the same objects to every call, so a repeat costs a dictionary lookup. An
    equal but different object (a plain tuple, True for 1.0) is checked on its own."""
    checked: dict[int, object] = {}

    @functools.wraps(check)
    def run(value: object) -> None:
        if torch.compiler.is_compiling():  # traced once per graph; ids mean nothing there
            check(value)
            return
        if checked.get(id(value)) is value:
            return
        check(value)
        if len(checked) >= 4096:
            checked.clear()
        checked[id(value)] = value  # held, so its id cannot be reused while it is here

    return run


@_once_per_object
def check_step(step: object) -> None:
    """Checks a StepCoefficients on its own (fastguide.ops.contract): every scalar finite
    and within float32's range; alpha and sigma non-negative, on the path the prediction
    type assumes (PREDICTION_PATHS), and, where the step divides by one (alpha to derive
    x0 from eps, sigma to derive eps from x0), with a reciprocal finite in float32."""
    if not isinstance(step, StepCoefficients):
        raise TypeError(f"step must be a fastguide.ops.StepCoefficients, got {type(step).__name__}")
    for name in STEP_SCALARS:
        check_kernel_scalar(f"step.{name}", getattr(step, name))
    if not isinstance(step.k_history, tuple):
        raise TypeError(f"step.k_history must be a tuple of floats, got {type(step.k_history).__name__}")
    if len(step.k_history) > MAX_HISTORY:
        raise ValueError(f"step.k_history may hold at most {MAX_HISTORY} coefficients, got {len(step.k_history)}")
    for i, value in enumerate(step.k_history):
        check_kernel_scalar(f"step.k_history[{i}]", value)
    if step.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"step.prediction_type must be one of {PREDICTION_TYPES}, got {step.prediction_type!r}")
    if not isinstance(step.clip_denoised, bool):
        raise TypeError(f"step.clip_denoised must be a bool, got {type(step.clip_denoised).__name__}")
    if step.alpha < 0:
        raise ValueError(f"step.alpha must be non-negative, got {step.alpha}")
    # alpha = 0 (pure noise, a flow path's start) is fine unless x0 is derived by dividing by it.
    if step.alpha * FLOAT32_MAX < 1 and (step.prediction_type == "epsilon" or step.grad_eps_scale != 0):
        raise ValueError(f"step.alpha must be positive to derive x0 from eps (prediction_type='epsilon' or "
                         f"grad_eps_scale != 0), with 1/alpha finite in float32, got {step.alpha!r}")
    path = PREDICTION_PATHS[step.prediction_type]
    if path is not None:
        residual = (step.alpha**2 + step.sigma**2 if path == "variance-preserving" else step.alpha + step.sigma) - 1
        if abs(residual) > 1e-6:
            raise ValueError(f"prediction_type={step.prediction_type!r} needs a {path} path, {PATH_RELATIONS[path]}; "
                             f"got alpha = {step.alpha}, sigma = {step.sigma}")
    if step.sigma < 0:
        raise ValueError(f"step.sigma must be non-negative, got {step.sigma}")
    if step.sigma * FLOAT32_MAX < 1 and (step.clip_denoised or step.prediction_type == "sample"):
        raise ValueError(f"step.sigma must be positive to derive eps from x0 (clip_denoised or "
                         f"prediction_type='sample'), with 1/sigma finite in float32, got {step.sigma!r}")
    if step.log_variance_range is not None:
        if not isinstance(step.log_variance_range, tuple) or len(step.log_variance_range) != 2:
            raise ValueError(f"step.log_variance_range must be (min_log, max_log), got {step.log_variance_range!r}")
        for part, value in zip(("min", "max"), step.log_variance_range):
            check_kernel_scalar(f"step.log_variance_range {part}", value)


@_once_per_object
def check_combine(combine: object) -> None:
    """Checks a GuidanceCombine on its own (None, an unguided step, passes): every scalar
    finite and within float32's range, a known variant, rescale in [0, 1],
    apg_norm_threshold non-negative, the APG settings set only for the "apg" variant and
    perturbed_scale only for "cfg"."""
    if combine is None:
        return
    if not isinstance(combine, GuidanceCombine):
        raise TypeError(f"combine must be a fastguide.ops.GuidanceCombine or None, got {type(combine).__name__}")
    for name in COMBINE_SCALARS:
        check_kernel_scalar(f"combine.{name}", getattr(combine, name))
    if combine.variant not in COMBINE_VARIANTS:
        raise ValueError(f"combine.variant must be one of {COMBINE_VARIANTS}, got {combine.variant!r}")
    if not 0 <= combine.rescale <= 1:
        raise ValueError(f"combine.rescale must be in [0, 1], got {combine.rescale}")
    if combine.apg_norm_threshold < 0:
        raise ValueError(
            f"combine.apg_norm_threshold must be non-negative (0 turns it off), got {combine.apg_norm_threshold}"
        )
    if combine.variant != "apg":
        for name in ("apg_eta", "apg_norm_threshold", "apg_momentum"):
            if getattr(combine, name) != 0:
                raise ValueError(f"combine.{name} is set but combine.variant is {combine.variant!r}, not 'apg'")
    if combine.perturbed_scale != 0 and combine.variant != "cfg":
        raise ValueError(f"combine.perturbed_scale is {combine.perturbed_scale} but combine.variant is "
                         f"{combine.variant!r}: a perturbed branch (PAG, skip-layer guidance) combines with 'cfg' only")


def check_step_layout(tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None) -> None:
    """Checks that the tensors of one step have the layout guided_step's kernels read,
    against the (already checked) step and combine, from shapes, dtypes and devices alone:
    no tensor data, no host-device sync, and an error message built only on a mismatch,
    so it costs a few µs (``guided_step_prechecked``'s caller, the sampling loop, runs it
    every model call; ``check_step_tensors`` runs it first). Checked:

    - x of (B, C, *spatial) and model_output of (3B, …) ([c; u; p]) with
      combine.perturbed_scale ≠ 0, of (2B, …) when guiding without a guide tensor, else
      (B, …), with C or 2C channels (2C with step.log_variance_range) and x's spatial
      shape; a guide only with a combine and without a perturbed branch, of (B, C or
      model_output's channels, *spatial);
    - history a tuple of one tensor per step.k_history coefficient; history, noise, grad,
      apg_buffer and x0_out (when given) of x's shape; out (when given) of x's shape,
      (2B, C, *spatial) or (3B, C, *spatial), each B-row block of the next [c; u] or
      [c; u; p] input;
    - every tensor dense (strided), floating (float16, bfloat16, float32 or float64) and
      on x's device;
    - a tensor given for each nonzero coefficient that reads one (noise, grad,
      apg_buffer, a guiding prediction for k_guide_eps); combine.rescale at least two
      elements per sample;
    - similarity (when given) only for a guided step without a perturbed prediction,
      a contiguous float32 (B,) tensor on x's device (``check_similarity``)."""
    model_output, x, guide, out = tensors.model_output, tensors.x, tensors.guide, tensors.out
    check_tensor("model_output", model_output, ndim_at_least=2)
    check_tensor("x", x, ndim_at_least=2)
    size, device = x.shape, x.device
    batch, channels, spatial = size[0], size[1], size[2:]
    rows, predicted = model_output.shape[0], model_output.shape[1]
    if combine is not None and combine.perturbed_scale != 0:
        if guide is not None:
            raise ValueError(
                f"guide must be None when combine.perturbed_scale is {combine.perturbed_scale}: u and the perturbed "
                f"prediction p are read from model_output, laid out [c; u; p]"
            )
        if rows != 3 * batch:
            raise ValueError(
                f"model_output must have batch 3·{batch} = {3 * batch} ([cond; uncond; perturbed] for x of batch "
                f"{batch}) when combine.perturbed_scale is {combine.perturbed_scale}, got {rows}"
            )
    elif combine is not None and guide is None:
        if rows != 2 * batch:
            raise ValueError(
                f"model_output must have batch 2·{batch} = {2 * batch} ([cond; uncond] for x of batch {batch}) "
                f"when guiding without a separate guide tensor, got {rows}"
            )
    elif rows != batch:
        reason = "with a separate guide tensor" if combine is not None else "without guidance (combine=None)"
        raise ValueError(f"model_output must have batch {batch} (that of x) {reason}, got {rows}")
    if (predicted != channels and predicted != 2 * channels) or model_output.shape[2:] != spatial:
        raise ValueError(
            f"model_output must have {channels} or {2 * channels} channels and spatial shape "
            f"{tuple(spatial)} to match x {tuple(size)}, got {tuple(model_output.shape)}"
        )
    if guide is not None:
        if combine is None:
            raise ValueError("guide was given but combine is None: a guide prediction needs a GuidanceCombine")
        check_tensor("guide", guide)
        if guide.dim() != x.dim() or guide.shape[0] != batch \
                or (guide.shape[1] != channels and guide.shape[1] != predicted) or guide.shape[2:] != spatial:
            raise ValueError(
                f"guide must have shape ({batch}, {channels}, ...) or that of model_output "
                f"{tuple(model_output.shape)}, got {tuple(guide.shape)}"
            )
    if combine is not None and combine.rescale > 0 and math.prod(size[1:]) == 1:
        raise ValueError(
            f"combine.rescale needs at least 2 elements per sample (a standard deviation), got x of shape "
            f"{tuple(size)}"
        )
    if step.log_variance_range is not None and predicted != 2 * channels:
        raise ValueError(
            f"step.log_variance_range needs a model_output with 2·{channels} channels "
            f"(prediction then variance), got {predicted}"
        )

    history = tensors.history
    if not isinstance(history, tuple):
        raise TypeError(f"history must be a tuple of tensors, got {type(history).__name__}")
    if len(history) != len(step.k_history):
        raise ValueError(f"history holds {len(history)} tensors but step.k_history {len(step.k_history)} coefficients")
    # x-shaped tensors: what check_tensor, check_shape and the device check refuse, tested
    # inline (no call, no message) on the fast path.
    for i, t in enumerate(history):
        if not (isinstance(t, Tensor) and t.layout == torch.strided and t.dtype in FLOAT_DTYPES and t.shape == size
                and t.device == device):
            _refuse_x_shaped(f"history[{i}]", t, x)
    for name in ("noise", "grad", "apg_buffer", "x0_out"):
        t = getattr(tensors, name)
        if t is not None and not (isinstance(t, Tensor) and t.layout == torch.strided and t.dtype in FLOAT_DTYPES
                                  and t.shape == size and t.device == device):
            _refuse_x_shaped(name, t, x)
    if out is not None:
        check_tensor("out", out)
        if out.shape[1:] != size[1:] or out.shape[0] not in (batch, 2 * batch, 3 * batch):
            raise ValueError(
                f"out must have shape {tuple(size)}, {(2 * batch, channels) + tuple(spatial)} or "
                f"{(3 * batch, channels) + tuple(spatial)} (x_next in each B-row block of the next [cond; uncond] "
                f"or [cond; uncond; perturbed] input), got {tuple(out.shape)}"
            )
    for name, t in (("model_output", model_output), ("guide", guide), ("out", out)):
        if t is not None and t.device != device:
            _refuse_device(name, t, x)

    if step.k_guide_eps != 0 and combine is None:
        raise ValueError(f"step.k_guide_eps is {step.k_guide_eps} but there is no guiding prediction (combine is None)")
    for coefficient, value, tensor_name in (("step.k_noise", step.k_noise, "noise"),
                                            ("step.k_grad", step.k_grad, "grad"),
                                            ("step.grad_eps_scale", step.grad_eps_scale, "grad")):
        if value != 0 and getattr(tensors, tensor_name) is None:
            raise ValueError(f"{coefficient} is {value} but {tensor_name} was not given")
    if combine is not None and combine.apg_momentum != 0 and tensors.apg_buffer is None:
        raise ValueError(f"combine.apg_momentum is {combine.apg_momentum} but apg_buffer was not given")
    if tensors.similarity is not None:
        check_similarity(tensors.similarity, x, combine)


def check_similarity(similarity: object, x: Tensor, combine: GuidanceCombine | None) -> None:
    """similarity, the per-sample cos(x̂0_c, x̂0_u) of the two branches' x0 predictions that
    guided_step writes: only with a combine (there is no u otherwise) whose perturbed_scale
    is 0 (the kernels that read p do not take the sums), and a contiguous float32 tensor
    of shape (B,) on x's device (the kernels' merge writes it as it is, with no stand-in
    copy)."""
    if combine is None:
        raise ValueError("similarity was given but combine is None: cos(x0_c, x0_u) needs a guided step, with a "
                         "guiding prediction u")
    if combine.perturbed_scale != 0:
        raise ValueError(f"similarity is not available with combine.perturbed_scale = {combine.perturbed_scale} "
                         "(a perturbed prediction p): give it only when perturbed_scale is 0")
    if not isinstance(similarity, Tensor):
        raise TypeError(f"similarity must be a torch.Tensor, got {type(similarity).__name__}")
    if similarity.layout != torch.strided:
        raise TypeError(f"similarity must be a dense (strided) tensor, got layout {similarity.layout}")
    if similarity.dtype != torch.float32:
        raise TypeError(f"similarity must have dtype torch.float32, got {similarity.dtype}")
    batch = x.shape[0]
    if tuple(similarity.shape) != (batch,):
        raise ValueError(f"similarity must have shape ({batch},), one value per sample of x {tuple(x.shape)}, "
                         f"got {tuple(similarity.shape)}")
    if not similarity.is_contiguous():
        raise ValueError(f"similarity must be contiguous, got strides {similarity.stride()}")
    if similarity.device != x.device:
        _refuse_device("similarity", similarity, x)


def _refuse_x_shaped(name: str, t: object, x: Tensor) -> None:
    """The error for an x-shaped tensor of the wrong type, dtype, shape or device."""
    check_tensor(name, t)
    check_shape(name, t, tuple(x.shape))
    _refuse_device(name, t, x)


def _refuse_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")


def check_step_tensors(
    tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None, *, check_memory: bool = True
) -> None:
    """Checks the tensors of one step against the (already checked) step and combine: their
    layout (``check_step_layout``), that the tensors the step writes do not require grad,
    and with ``check_memory`` how they alias (not possible on traced tensors)."""
    check_step_layout(tensors, step, combine)
    for name in WRITTEN:
        written = getattr(tensors, name)
        if written is None:
            continue
        if written.requires_grad:
            raise ValueError(f"{name} must not require grad: guided_step writes it in place and is not differentiable")
        if check_memory and written.numel() > 1 and torch._debug_has_internal_overlap(written) == 1:
            raise ValueError(f"{name} has elements that share memory (an expanded view?): it must be writable "
                             "element by element")
    if check_memory:
        x_shaped = [(f"history[{i}]", h) for i, h in enumerate(tensors.history)]
        x_shaped += [(name, getattr(tensors, name)) for name in ("noise", "grad", "apg_buffer", "x0_out")]
        _check_aliasing(tensors, x_shaped)


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _same_view(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def _share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether a and b (views of one storage) have an element in common."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def byte_range(t: Tensor) -> tuple[int, int]:
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()

    (a_start, a_end), (b_start, b_end) = byte_range(a), byte_range(b)
    if a_end <= b_start or b_end <= a_start:
        return False
    if a.element_size() != b.element_size() or (a.data_ptr() - b.data_ptr()) % a.element_size():
        return True  # interleaved views of different element sizes: assume they touch
    # Same element size: compare the element indices each view covers in the storage.
    base = min(a.data_ptr(), b.data_ptr())
    indices = []
    for t in (a, b):
        offset = (t.data_ptr() - base) // t.element_size()
        span = torch.arange(offset + 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
        indices.append(span.as_strided(t.shape, t.stride(), offset).flatten())
    return bool(torch.isin(indices[0], indices[1]).any())


def _extent(t: Tensor) -> int:
    """Elements from a view's first to its last element, inclusive."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _x_is_first_block(out: Tensor, x: Tensor) -> bool:
    """out is (2B, ...) or (3B, ...) laid out like x, x its first B rows, the other
    blocks past x's end."""
    return (out.data_ptr() == x.data_ptr() and out.dtype == x.dtype and out.stride() == x.stride()
            and out.shape[0] in (2 * x.shape[0], 3 * x.shape[0]) and out.shape[1:] == x.shape[1:]
            and out.stride(0) * x.shape[0] >= _extent(x))


def _check_aliasing(tensors: StepTensors, x_shaped: list[tuple[str, Tensor | None]]) -> None:
    """The tensors the step writes may be x-shaped inputs themselves (``out`` may be x, or
    hold x as its first B-row block), but must not overlap any input in any other way, nor each
    other: the kernels read and write in parallel, so a partial overlap would give wrong
    values on one backend and right ones on another. Runs per call: one storage lookup
    per tensor, and the element check only for views of one storage."""
    written = [(name, t, _storage(t)) for name in ("out", "x0_out", "apg_buffer", "similarity")
               if (t := getattr(tensors, name)) is not None]
    read = [(name, t, _storage(t)) for name, t in
            (("model_output", tensors.model_output), ("guide", tensors.guide), ("x", tensors.x), *x_shaped)
            if t is not None and name not in ("apg_buffer", "x0_out")]
    for i, (w_name, w, w_storage) in enumerate(written):
        for name, t, storage in written[i + 1:] + read:
            if storage != w_storage:
                continue
            # An x-shaped input is read and written by the same thread, element by element.
            # (Not the APG buffer: the reference updates it before it reads x and the rest;
            # nor similarity, a per-sample value.)
            elementwise = w_name in ("out", "x0_out") and name not in ("model_output", "guide", "out", "x0_out",
                                                                       "apg_buffer", "similarity")
            if elementwise and (_same_view(w, t) or (w_name == "out" and name == "x" and _x_is_first_block(w, t))):
                continue
            if _share_memory(w, t) and w_name == "apg_buffer":
                raise ValueError(f"apg_buffer overlaps {name} in memory: APG's state must have memory of its own")
            if _share_memory(w, t) and w_name == "similarity":
                raise ValueError(f"similarity overlaps {name} in memory: it must have memory of its own")
            if _share_memory(w, t):
                raise ValueError(
                    f"{w_name} overlaps {name} in memory: a written tensor may be an input itself "
                    f"(out=x, or x as the first block of a 2B or 3B out) but must not overlap any other input "
                    f"or written tensor partially"
                )

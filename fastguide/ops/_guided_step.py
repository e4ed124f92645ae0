"""guided_step: the guidance combine and one sampler update in one pass. The op's public
function, its checks (the step's scalars and the combine once per object, the tensors
every call) and its registration as the custom op ``fastguide::guided_step``, whose
schema fastguide.ops.contract derives from the contract's types. The reference is
fastguide.ops.reference.guided_step; the kernels are fastguide.kernels.guided_step
(Triton) and csrc/guided_step.cu (through fastguide.ops.cuda_backend)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import contract, dispatch
from .contract import (
    COMBINE_SCALARS,
    COMBINE_VARIANTS,
    MAX_HISTORY,
    PATH_RELATIONS,
    PREDICTION_PATHS,
    PREDICTION_TYPES,
    STEP_SCALARS,
    WRITTEN,
    GuidanceCombine,
    StepCoefficients,
    StepTensors,
)
from .reference import compute_dtype
from .validation import FLOAT32_MAX, FLOAT_DTYPES, check_kernel_scalar, check_shape, check_tensor


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
        raise ValueError(
            f"step.alpha must be positive to derive x0 from eps (prediction_type='epsilon' or "
            f"grad_eps_scale != 0), with 1/alpha finite in float32, got {step.alpha!r}"
        )
    path = PREDICTION_PATHS[step.prediction_type]
    if path is not None:
        residual = (step.alpha**2 + step.sigma**2 if path == "variance-preserving" else step.alpha + step.sigma) - 1
        if abs(residual) > 1e-6:
            raise ValueError(
                f"prediction_type={step.prediction_type!r} needs a {path} path, {PATH_RELATIONS[path]}; "
                f"got alpha = {step.alpha}, sigma = {step.sigma}"
            )
    if step.sigma < 0:
        raise ValueError(f"step.sigma must be non-negative, got {step.sigma}")
    if step.sigma * FLOAT32_MAX < 1 and (step.clip_denoised or step.prediction_type == "sample"):
        raise ValueError(
            f"step.sigma must be positive to derive eps from x0 (clip_denoised or "
            f"prediction_type='sample'), with 1/sigma finite in float32, got {step.sigma!r}"
        )
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
        raise ValueError(
            f"combine.perturbed_scale is {combine.perturbed_scale} but combine.variant is "
            f"{combine.variant!r}: a perturbed branch (PAG, skip-layer guidance) combines with 'cfg' only"
        )


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
        if (
            guide.dim() != x.dim()
            or guide.shape[0] != batch
            or (guide.shape[1] != channels and guide.shape[1] != predicted)
            or guide.shape[2:] != spatial
        ):
            raise ValueError(
                f"guide must have shape ({batch}, {channels}, ...) or that of model_output "
                f"{tuple(model_output.shape)}, got {tuple(guide.shape)}"
            )
    if combine is not None and combine.rescale > 0 and math.prod(size[1:]) == 1:
        raise ValueError(
            f"combine.rescale needs at least 2 elements per sample (a standard deviation), got x of shape {tuple(size)}"
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
        if not (
            isinstance(t, Tensor)
            and t.layout == torch.strided
            and t.dtype in FLOAT_DTYPES
            and t.shape == size
            and t.device == device
        ):
            _refuse_x_shaped(f"history[{i}]", t, x)
    for name in ("noise", "grad", "apg_buffer", "x0_out"):
        t = getattr(tensors, name)
        if t is not None and not (
            isinstance(t, Tensor)
            and t.layout == torch.strided
            and t.dtype in FLOAT_DTYPES
            and t.shape == size
            and t.device == device
        ):
            _refuse_x_shaped(name, t, x)
    if out is not None:
        check_tensor("out", out)
        if out.shape[1:] != size[1:] or out.shape[0] not in (batch, 2 * batch, 3 * batch):
            raise ValueError(
                f"out must have shape {tuple(size)}, {(2 * batch, channels) + tuple(spatial)} or "
                f"{(3 * batch, channels) + tuple(spatial)} (x_next in each B-row block of the next [cond; uncond] "
                f"or [cond; uncond; perturbed] input), got {tuple(out.shape)}"
            )
    given: tuple[tuple[str, Tensor | None], ...] = (("model_output", model_output), ("guide", guide), ("out", out))
    for name, tensor in given:
        if tensor is not None and tensor.device != device:
            _refuse_device(name, tensor, x)

    if step.k_guide_eps != 0 and combine is None:
        raise ValueError(f"step.k_guide_eps is {step.k_guide_eps} but there is no guiding prediction (combine is None)")
    for coefficient, value, tensor_name in (
        ("step.k_noise", step.k_noise, "noise"),
        ("step.k_grad", step.k_grad, "grad"),
        ("step.grad_eps_scale", step.grad_eps_scale, "grad"),
    ):
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
        raise ValueError(
            "similarity was given but combine is None: cos(x0_c, x0_u) needs a guided step, with a guiding prediction u"
        )
    if combine.perturbed_scale != 0:
        raise ValueError(
            f"similarity is not available with combine.perturbed_scale = {combine.perturbed_scale} "
            "(a perturbed prediction p): give it only when perturbed_scale is 0"
        )
    if not isinstance(similarity, Tensor):
        raise TypeError(f"similarity must be a torch.Tensor, got {type(similarity).__name__}")
    if similarity.layout != torch.strided:
        raise TypeError(f"similarity must be a dense (strided) tensor, got layout {similarity.layout}")
    if similarity.dtype != torch.float32:
        raise TypeError(f"similarity must have dtype torch.float32, got {similarity.dtype}")
    batch = x.shape[0]
    if tuple(similarity.shape) != (batch,):
        raise ValueError(
            f"similarity must have shape ({batch},), one value per sample of x {tuple(x.shape)}, "
            f"got {tuple(similarity.shape)}"
        )
    if not similarity.is_contiguous():
        raise ValueError(f"similarity must be contiguous, got strides {similarity.stride()}")
    if similarity.device != x.device:
        _refuse_device("similarity", similarity, x)


def _refuse_x_shaped(name: str, t: object, x: Tensor) -> None:
    """The error for an x-shaped tensor of the wrong type, dtype, shape or device."""
    t = check_tensor(name, t)
    check_shape(name, t, tuple(x.shape))
    _refuse_device(name, t, x)


def _refuse_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")


def check_step_tensors(
    tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None, *, check_memory: bool = True
) -> None:
    """Checks the tensors of one step against the (already checked) step and combine: their
    layout (``check_step_layout``), that under grad mode none it reads requires grad and
    the tensors it writes do not, and with ``check_memory`` how they alias (not possible on
    traced tensors)."""
    check_step_layout(tensors, step, combine)
    if torch.is_grad_enabled():  # (the backends' kernels record no graph: none may take a gradient through it)
        for name, t in (
            ("model_output", tensors.model_output),
            ("x", tensors.x),
            ("guide", tensors.guide),
            *((f"history[{i}]", h) for i, h in enumerate(tensors.history)),
            ("noise", tensors.noise),
            ("grad", tensors.grad),
        ):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, and guided_step is not differentiable: call it under "
                    "torch.no_grad() or pass a detached tensor"
                )
    for name in WRITTEN:
        written = getattr(tensors, name)
        if written is None:
            continue
        if written.requires_grad:
            raise ValueError(f"{name} must not require grad: guided_step writes it in place and is not differentiable")
        if check_memory and written.numel() > 1 and torch._debug_has_internal_overlap(written) == 1:
            raise ValueError(
                f"{name} has elements that share memory (an expanded view?): it must be writable element by element"
            )
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
    return (
        out.data_ptr() == x.data_ptr()
        and out.dtype == x.dtype
        and out.stride() == x.stride()
        and out.shape[0] in (2 * x.shape[0], 3 * x.shape[0])
        and out.shape[1:] == x.shape[1:]
        and out.stride(0) * x.shape[0] >= _extent(x)
    )


def _check_aliasing(tensors: StepTensors, x_shaped: Sequence[tuple[str, Tensor | None]]) -> None:
    """The tensors the step writes may be x-shaped inputs themselves (``out`` may be x, or
    hold x as its first B-row block), but must not overlap any input in any other way, nor each
    other: the kernels read and write in parallel, so a partial overlap would give wrong
    values on one backend and right ones on another. Runs per call: one storage lookup
    per tensor, and the element check only for views of one storage."""
    written = [
        (name, t, _storage(t))
        for name in ("out", "x0_out", "apg_buffer", "similarity")
        if (t := getattr(tensors, name)) is not None
    ]
    read = [
        (name, t, _storage(t))
        for name, t in (("model_output", tensors.model_output), ("guide", tensors.guide), ("x", tensors.x), *x_shaped)
        if t is not None and name not in ("apg_buffer", "x0_out")
    ]
    for i, (w_name, w, w_storage) in enumerate(written):
        for name, t, storage in written[i + 1 :] + read:
            if storage != w_storage:
                continue
            # An x-shaped input is read and written by the same thread, element by element.
            # (Not the APG buffer: the reference updates it before it reads x and the rest;
            # nor similarity, a per-sample value.)
            elementwise = w_name in ("out", "x0_out") and name not in (
                "model_output",
                "guide",
                "out",
                "x0_out",
                "apg_buffer",
                "similarity",
            )
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


# guided_step is registered with torch.library.define rather than custom_op: custom_op's
# eager path for mutating ops rebuilds the schema's argument list per argument (~200 µs
# per call on CPU); define + impl costs a few µs. The schema is derived from the contract's
# types. The implementation bumps the version counters of what it writes, as custom_op
# would, so autograd still detects use of a tensor overwritten here.
torch.library.define("fastguide::guided_step", contract.guided_step_schema())


@torch.library.impl("fastguide::guided_step", "default")
def _guided_step_default(*arguments):
    _guided_step_impl(*contract.unpack(arguments[:-1]), arguments[-1])


@torch.library.register_fake("fastguide::guided_step")
def _(*arguments):
    return None


def guided_step(
    model_output: Tensor,
    x: Tensor,
    step: StepCoefficients,
    combine: GuidanceCombine | None = None,
    *,
    guide: Tensor | None = None,
    history: Sequence[Tensor] = (),
    noise: Tensor | None = None,
    grad: Tensor | None = None,
    apg_buffer: Tensor | None = None,
    out: Tensor | None = None,
    x0_out: Tensor | None = None,
    similarity: Tensor | None = None,
) -> Tensor:
    """Guidance combine and one sampler update in one op; returns x_next.

    ``step`` holds the update's scalars and ``combine`` the guidance (None: unguided);
    the tensors are those of ``StepTensors`` (fastguide.ops.contract). With
    x = alpha·x0 + sigma·eps the step computes

        m  = u + w·(c − u) + s·(c − p)  (or CFG-Zero* / APG / tangential, then CFG rescale)
        x0, eps from m by step.prediction_type ("epsilon", "v_prediction", "sample")
        x0 ← clamp(x0, −1, 1) (finite x0), eps re-derived   if step.clip_denoised
        eps ← eps − grad_eps_scale·grad, x0 re-derived  if step.grad_eps_scale ≠ 0
        x_next = k_x·x + k_x0·x0 + k_eps·eps + Σᵢ k_history[i]·history[i]
                 + k_noise·noise + k_grad·grad

    where c is the first B rows of model_output and u its second B rows ([cond; uncond],
    batched CFG) or ``guide`` (a second network's output), and, when
    combine.perturbed_scale = s ≠ 0 (PAG, skip-layer guidance), p its third B rows
    ([cond; uncond; perturbed], no ``guide``), all read in place; with
    step.log_variance_range the noise and grad coefficients are scaled per element by
    ADM's learned variance. fastguide.ops.contract.GuidanceCombine states the combine and
    fastguide.ops.reference.guided_step each step in full.

    x_next goes to ``out`` (shaped like x, or (2B, ...) or (3B, ...) for each B-row block
    of the next [cond; uncond] or [cond; uncond; perturbed] input; x itself, or its first
    B rows, is allowed), x0 to ``x0_out`` when given, and APG's momentum state to
    ``apg_buffer`` (updated in place). Not differentiable.

    ``similarity``, an out tensor of shape (B,), float32, contiguous, on x's device,
    receives per sample b the cosine similarity of the two branches' x0 predictions,

        cos(x̂0_c, x̂0_u) = ⟨x̂0_c, x̂0_u⟩ / (‖x̂0_c‖·‖x̂0_u‖),

    where x̂0_c and x̂0_u are derived elementwise from x and the conditional prediction c,
    resp. the guiding prediction u, alone by the step's prediction-type map (the one the
    step applies to the guided prediction: epsilon x0 = (x − σ·c)/α, v_prediction
    x0 = α·x − σ·c, flow_prediction x0 = x − σ·c, sample x0 = c), over the sample's C
    prediction channels (never the learned-variance ones), of c and u as the model gave
    them (before CFG-Zero*, tangential CFG, APG or its momentum touch u) and without
    clip_denoised or the classifier shift. (Not of c and u themselves: an eps model's two
    predictions are both ≈ x/σ at high noise; this cosine rises towards 1 as sampling
    proceeds (measured on the digits eps and flow models), adaptive guidance's criterion,
    and it is the same whatever the parameterisation.) It is
    accumulated in float64 (the kernels: each element's x̂0_c and x̂0_u in float32, then
    float32 sums of their products per program or block of the elementwise pass, which
    reads c, u and x anyway, merged in float64: no extra pass). It is 0 where
    ‖x̂0_c‖·‖x̂0_u‖ = 0, and NaN where x̂0_c or x̂0_u holds a NaN or ±inf (a NaN or ±inf in
    c, u or, unless prediction_type is "sample", x; design.md's NaN policy: the
    dependency is the whole sample), and on the kernels also where an x0 value's float32
    square overflows (|value| ≳ 1.8e19; squares that underflow, |value| ≲ 1e-19, lose
    precision there). Only for a guided step (combine given) with
    combine.perturbed_scale = 0; otherwise a ValueError.
    """
    check_step(step)
    check_combine(combine)
    if not isinstance(history, (tuple, list)):
        raise TypeError(f"history must be a tuple or list of tensors, got {type(history).__name__}")
    past = tuple(history)
    tensors = StepTensors(model_output, x, guide, past, noise, grad, apg_buffer, out, x0_out, similarity)
    check_step_tensors(tensors, step, combine, check_memory=not dispatch.tracing())
    if out is None:
        out = torch.empty_like(x)
        # a new tuple, not tensors._replace(out=out): torch 2.5's dynamo cannot trace _replace
        tensors = StepTensors(model_output, x, guide, past, noise, grad, apg_buffer, out, x0_out, similarity)
    guided_step_prechecked(tensors, step, combine)
    return out


def guided_step_prechecked(tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None) -> None:
    """``guided_step`` without its per-call checks, for a caller that checked ``step`` and
    ``combine`` once (check_step, check_combine) and owns every tensor: the
    sampling loop, whose buffers are its own and whose model output it checks itself.
    ``tensors.out`` must be given."""
    x = tensors.x
    backend = dispatch.backend_for(
        "guided_step", x.device, compute_dtype(tensors.model_output, x, tensors.guide), empty=x.numel() == 0
    )
    # Under grad mode at all (not only when an input requires grad) the call goes through
    # the op, whose declared in-place writes are what autograd checks.
    given = [
        t
        for t in (tensors.model_output, x, tensors.guide, *tensors.history, tensors.noise, tensors.grad)
        if t is not None
    ]
    if torch.is_grad_enabled() or dispatch.needs_op(given):
        torch.ops.fastguide.guided_step(*contract.pack(tensors, step, combine), backend)
    else:
        _guided_step_impl(tensors, step, combine, backend)


def _guided_step_impl(
    tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None, backend: str
) -> None:
    with dispatch.launching_on(backend, tensors.x.device):
        dispatch.implementation(backend, "guided_step").guided_step(tensors, step, combine)
    for name in contract.WRITTEN:
        written = getattr(tensors, name)
        if written is not None:
            torch.autograd.graph.increment_version(written)

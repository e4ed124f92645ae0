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
    GuidanceCombine,
    StepCoefficients,
    StepTensors,
)
from .reference import ACTIVATIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, ndim_at_least: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
    bias None or (size,) tensors, every tensor on x's device, eps positive."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t)
            check_shape(name, t, (size,))
    check_same_device([(x_name, x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)])
    if check_finite("eps", eps) <= 0:
        raise ValueError(f"eps must be positive, got {eps}")


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
    group_size = channels // num_groups * math.prod(x.shape[2:])
    if group_size == 1 and batch > 0:
        raise ValueError(
            f"x of shape {tuple(x.shape)} has 1 value per group with num_groups={num_groups}: "
            "normalising needs more than one (as torch's group_norm)"
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
    (N, 1, D) or x's own shape (the adaLN modulation and the residual gate)."""
    check_tensor(name, t)
    n, d = x.shape[0], x.shape[-1]
    allowed = {(n, d), tuple(x.shape)} | ({(n, 1, d)} if x.dim() == 3 else set())
    if tuple(t.shape) not in allowed:
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
    check_tensor("h", h)
    if h.dim() not in (2, 3):
        raise ValueError(f"h must be (N, L, D) or (N, D), got shape {tuple(h.shape)}")
    check_tensor("branch", branch)
    check_shape("branch", branch, tuple(h.shape))
    if branch.dtype != h.dtype:
        raise TypeError(f"branch must have h's dtype {h.dtype}, got {branch.dtype}")
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
    """Checks a StepCoefficients on its own (fastguide.ops.contract)."""
    if not isinstance(step, StepCoefficients):
        raise TypeError(f"step must be a fastguide.ops.StepCoefficients, got {type(step).__name__}")
    for name in STEP_SCALARS:
        check_finite(f"step.{name}", getattr(step, name))
    if not isinstance(step.k_history, tuple):
        raise TypeError(f"step.k_history must be a tuple of floats, got {type(step.k_history).__name__}")
    if len(step.k_history) > MAX_HISTORY:
        raise ValueError(f"step.k_history may hold at most {MAX_HISTORY} coefficients, got {len(step.k_history)}")
    for i, value in enumerate(step.k_history):
        check_finite(f"step.k_history[{i}]", value)
    if step.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"step.prediction_type must be one of {PREDICTION_TYPES}, got {step.prediction_type!r}")
    if not isinstance(step.clip_denoised, bool):
        raise TypeError(f"step.clip_denoised must be a bool, got {type(step.clip_denoised).__name__}")
    if step.alpha < 0:
        raise ValueError(f"step.alpha must be non-negative, got {step.alpha}")
    # alpha = 0 (pure noise, a flow path's start) is fine unless x0 is derived by dividing by it.
    if step.alpha == 0 and (step.prediction_type == "epsilon" or step.grad_eps_scale != 0):
        raise ValueError("step.alpha must be positive to derive x0 from eps (prediction_type='epsilon' or "
                         "grad_eps_scale != 0)")
    if step.prediction_type == "flow_prediction" and abs(step.alpha + step.sigma - 1) > 1e-6:
        raise ValueError(f"prediction_type='flow_prediction' needs a flow path, alpha + sigma = 1; got alpha = "
                         f"{step.alpha}, sigma = {step.sigma} (a variance-preserving schedule?)")
    if step.sigma < 0:
        raise ValueError(f"step.sigma must be non-negative, got {step.sigma}")
    if step.sigma == 0 and (step.clip_denoised or step.prediction_type == "sample"):
        raise ValueError(
            "step.sigma must be positive to derive eps from x0 (clip_denoised or prediction_type='sample')"
        )
    if step.log_variance_range is not None:
        if not isinstance(step.log_variance_range, tuple) or len(step.log_variance_range) != 2:
            raise ValueError(f"step.log_variance_range must be (min_log, max_log), got {step.log_variance_range!r}")
        for part, value in zip(("min", "max"), step.log_variance_range):
            check_finite(f"step.log_variance_range {part}", value)


@_once_per_object
def check_combine(combine: object) -> None:
    """Checks a GuidanceCombine on its own (None, an unguided step, passes)."""
    if combine is None:
        return
    if not isinstance(combine, GuidanceCombine):
        raise TypeError(f"combine must be a fastguide.ops.GuidanceCombine or None, got {type(combine).__name__}")
    for name in COMBINE_SCALARS:
        check_finite(f"combine.{name}", getattr(combine, name))
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


def check_step_tensors(
    tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None, *, check_memory: bool = True
) -> None:
    """Checks the tensors of one step against the (already checked) step and combine;
    ``check_memory`` also checks how they alias (not possible on traced tensors)."""
    model_output, x = tensors.model_output, tensors.x
    check_tensor("model_output", model_output, ndim_at_least=2)
    check_tensor("x", x, ndim_at_least=2)
    batch, channels, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    rows = model_output.shape[0]
    if combine is not None and tensors.guide is None:
        if rows != 2 * batch:
            raise ValueError(
                f"model_output must have batch 2·{batch} = {2 * batch} ([cond; uncond] for x of batch {batch}) "
                f"when guiding without a separate guide tensor, got {rows}"
            )
    elif rows != batch:
        reason = "with a separate guide tensor" if combine is not None else "without guidance (combine=None)"
        raise ValueError(f"model_output must have batch {batch} (that of x) {reason}, got {rows}")
    if model_output.shape[1] not in (channels, 2 * channels) or tuple(model_output.shape[2:]) != spatial:
        raise ValueError(
            f"model_output must have {channels} or {2 * channels} channels and spatial shape "
            f"{spatial} to match x {tuple(x.shape)}, got {tuple(model_output.shape)}"
        )
    if tensors.guide is not None:
        if combine is None:
            raise ValueError("guide was given but combine is None: a guide prediction needs a GuidanceCombine")
        check_tensor("guide", tensors.guide)
        if tensors.guide.shape[0] != batch or tensors.guide.shape[1] not in (channels, model_output.shape[1]) \
                or tuple(tensors.guide.shape[2:]) != spatial:
            raise ValueError(
                f"guide must have shape ({batch}, {channels}, ...) or that of model_output "
                f"{tuple(model_output.shape)}, got {tuple(tensors.guide.shape)}"
            )
    if combine is not None and combine.rescale > 0 and math.prod(x.shape[1:]) == 1:
        raise ValueError(
            f"combine.rescale needs at least 2 elements per sample (a standard deviation), got x of shape "
            f"{tuple(x.shape)}"
        )
    if step.log_variance_range is not None and model_output.shape[1] != 2 * channels:
        raise ValueError(
            f"step.log_variance_range needs a model_output with 2·{channels} channels "
            f"(prediction then variance), got {model_output.shape[1]}"
        )

    if not isinstance(tensors.history, tuple):
        raise TypeError(f"history must be a tuple of tensors, got {type(tensors.history).__name__}")
    if len(tensors.history) != len(step.k_history):
        raise ValueError(
            f"history holds {len(tensors.history)} tensors but step.k_history {len(step.k_history)} coefficients"
        )
    x_shaped = [(f"history[{i}]", h) for i, h in enumerate(tensors.history)]
    x_shaped += [(name, getattr(tensors, name)) for name in ("noise", "grad", "apg_buffer", "x0_out")]
    for name, t in x_shaped:
        if t is not None or name.startswith("history"):
            check_tensor(name, t)
            check_shape(name, t, tuple(x.shape))
    for name in ("out", "x0_out", "apg_buffer"):
        written = getattr(tensors, name)
        if written is None:
            continue
        check_tensor(name, written)
        if written.requires_grad:
            raise ValueError(f"{name} must not require grad: guided_step writes it in place and is not differentiable")
        if check_memory and written.numel() > 1 and torch._debug_has_internal_overlap(written) == 1:
            raise ValueError(f"{name} has elements that share memory (an expanded view?): it must be writable "
                             "element by element")
    if tensors.out is not None:
        check_tensor("out", tensors.out)
        if tuple(tensors.out.shape) not in (tuple(x.shape), (2 * batch, channels) + spatial):
            raise ValueError(
                f"out must have shape {tuple(x.shape)} or {(2 * batch, channels) + spatial} "
                f"(both halves of the next [cond; uncond] input), got {tuple(tensors.out.shape)}"
            )
    check_same_device([("model_output", model_output), ("x", x), ("guide", tensors.guide), *x_shaped,
                       ("out", tensors.out)])

    if check_memory:
        _check_aliasing(tensors, x_shaped)

    if step.k_guide_eps != 0 and combine is None:
        raise ValueError(f"step.k_guide_eps is {step.k_guide_eps} but there is no guiding prediction (combine is None)")
    needs = [("step.k_noise", step.k_noise, "noise"), ("step.k_grad", step.k_grad, "grad"),
             ("step.grad_eps_scale", step.grad_eps_scale, "grad")]
    if combine is not None:
        needs.append(("combine.apg_momentum", combine.apg_momentum, "apg_buffer"))
    for coefficient, value, tensor_name in needs:
        if value != 0 and getattr(tensors, tensor_name) is None:
            raise ValueError(f"{coefficient} is {value} but {tensor_name} was not given")


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


def _x_is_first_half(out: Tensor, x: Tensor) -> bool:
    """out is (2B, ...) laid out like x, x its first B rows, the second half past x's end."""
    return (out.data_ptr() == x.data_ptr() and out.dtype == x.dtype and out.stride() == x.stride()
            and out.shape[0] == 2 * x.shape[0] and out.shape[1:] == x.shape[1:]
            and out.stride(0) * x.shape[0] >= _extent(x))


def _check_aliasing(tensors: StepTensors, x_shaped: list[tuple[str, Tensor | None]]) -> None:
    """The tensors the step writes may be x-shaped inputs themselves (``out`` may be x, or
    hold x as its first half), but must not overlap any input in any other way, nor each
    other: the kernels read and write in parallel, so a partial overlap would give wrong
    values on one backend and right ones on another. Runs per call: one storage lookup
    per tensor, and the element check only for views of one storage."""
    written = [(name, t, _storage(t)) for name in ("out", "x0_out", "apg_buffer")
               if (t := getattr(tensors, name)) is not None]
    read = [(name, t, _storage(t)) for name, t in
            (("model_output", tensors.model_output), ("guide", tensors.guide), ("x", tensors.x), *x_shaped)
            if t is not None and name not in ("apg_buffer", "x0_out")]
    for i, (w_name, w, w_storage) in enumerate(written):
        for name, t, storage in written[i + 1:] + read:
            if storage != w_storage:
                continue
            # An x-shaped input is read and written by the same thread, element by element.
            # (Not the APG buffer: the reference updates it before it reads x and the rest.)
            elementwise = w_name != "apg_buffer" and name not in ("model_output", "guide", "out", "x0_out",
                                                                  "apg_buffer")
            if elementwise and (_same_view(w, t) or (w_name == "out" and name == "x" and _x_is_first_half(w, t))):
                continue
            if _share_memory(w, t) and w_name == "apg_buffer":
                raise ValueError(f"apg_buffer overlaps {name} in memory: APG's state must have memory of its own")
            if _share_memory(w, t):
                raise ValueError(
                    f"{w_name} overlaps {name} in memory: a written tensor may be an input itself "
                    f"(out=x, or x as the first half of a 2B out) but must not overlap any other input "
                    f"or written tensor partially"
                )

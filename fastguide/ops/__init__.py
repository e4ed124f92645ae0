"""The public ops and the only door to the kernels.

Each op is a ``torch.library`` custom op in the ``fastguide`` namespace with a fake
(meta) implementation and, where differentiable, a registered autograd formula, so
``torch.compile(fullgraph=True)`` sees one node per call. The public functions below
validate their arguments (fastguide.validation), pick the backend for the tensors'
device (fastguide.backends), and call the custom op with that backend's name, so the
backward runs on the same backend as the forward.

Every backend module exposes the same functions: ``attention_forward``,
``attention_backward``, ``group_norm_forward``, ``group_norm_backward`` and
``guided_step``. The torch backend is fastguide.reference; Triton kernels live in
fastguide.kernels, one module per op; the cuda backend's glue is fastguide.cuda_backend
(guided_step and group_norm; attention runs as under ``auto`` when cuda is chosen).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import backends, validation
from .reference import compute_dtype, like_memory_format

# Op name -> module implementing it, per accelerated backend. A kernel counts as present
# once its module file exists; finding it imports neither triton nor the extension.
_KERNEL_MODULES = {
    "triton": {
        "attention": "fastguide.kernels.attention",
        "group_norm": "fastguide.kernels.group_norm",
        "guided_step": "fastguide.kernels.guided_step",
    },
    "cuda": {
        "group_norm": "fastguide.ops.cuda_backend",
        "guided_step": "fastguide.ops.cuda_backend",
    },
}


def _module_exists(name: str) -> bool:
    # find_spec raises, rather than returning None, when the parent package is missing
    # (e.g. a source tree without fastguide.kernels mapped in shadows the install).
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


_HAS_KERNEL = {
    op: {backend: op in modules and _module_exists(modules[op]) for backend, modules in _KERNEL_MODULES.items()}
    for op in ("attention", "group_norm", "guided_step")
}


# Dtypes the accelerated backends compute in; float64 runs on the reference only.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _resolve(op: str, device: torch.device, dtype: torch.dtype) -> str:
    # Under torch.compile this runs at trace time: the backend is fixed per compiled graph.
    if dtype not in _KERNEL_DTYPES:
        has_kernel = {name: False for name in _KERNEL_MODULES}
        return backends.resolve(device, has_kernel, f"{op} on {dtype} tensors")
    return backends.resolve(device, _HAS_KERNEL[op], op)


def _module(backend: str, op: str) -> ModuleType:
    if backend == "torch":
        return importlib.import_module("fastguide.ops.reference")
    return importlib.import_module(_KERNEL_MODULES[backend][op])


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


@torch.library.custom_op("fastguide::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return _module(backend, "attention").attention_forward(q, k, v, scale)


@_attention.register_fake
def _(q, k, v, scale, backend):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=compute_dtype(q), device=q.device)
    return out, lse


@torch.library.custom_op("fastguide::attention_backward", mutates_args=())
def _attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _module(backend, "attention").attention_backward(grad_out, q, k, v, out, lse, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


_attention.register_autograd(_attention_grad, setup_context=_attention_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Scaled dot-product attention: softmax(q·kᵀ·scale)·v.

    Args:
        q: (B, H, Lq, D) queries; k, v: (B, H, Lk, D). Any strides; D a multiple of 8 up
            to 256; float16, bfloat16, float32 (float64 on the torch backend).
        scale: softmax scale, D^-1/2 by default.

    Returns (B, H, Lq, D) in q's dtype. Accumulation and softmax run in float32.
    Differentiable in q, k and v.
    """
    scale = validation.check_attention(q, k, v, scale)
    out, _ = _attention(q, k, v, scale, _resolve("attention", q.device, q.dtype))
    return out


# --------------------------------------------------------------------------------------
# group_norm
# --------------------------------------------------------------------------------------


@torch.library.custom_op("fastguide::group_norm", mutates_args=())
def _group_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _module(backend, "group_norm").group_norm_forward(
        x, weight, bias, scale, shift, num_groups, eps, None if activation == "none" else activation
    )
    return like_memory_format(y, x), mean.contiguous(), rstd.contiguous()


@_group_norm.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, activation, backend):
    y = like_memory_format(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)
    stats = torch.empty((x.shape[0], num_groups), dtype=compute_dtype(x), device=x.device)
    return y, stats, torch.empty_like(stats)


@torch.library.custom_op("fastguide::group_norm_backward", mutates_args=())
def _group_norm_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    eps: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dscale, dshift); an input that was None gets an empty tensor."""
    grads = _module(backend, "group_norm").group_norm_backward(
        grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, eps,
        None if activation == "none" else activation,
    )
    dx, *param_grads = grads
    return (like_memory_format(dx, x),) + tuple(
        x.new_empty(0) if g is None else g.contiguous() for g in param_grads
    )


@_group_norm_backward.register_fake
def _(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, activation, backend):
    dx = like_memory_format(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)
    return (dx,) + tuple(
        x.new_empty(0) if t is None else torch.empty(t.shape, dtype=t.dtype, device=t.device)
        for t in (weight, bias, scale, shift)
    )


def _group_norm_setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, activation, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.activation, ctx.backend = num_groups, eps, activation, backend


def _group_norm_grad(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, *param_grads = _group_norm_backward(
        grad_y, x, weight, bias, scale, shift, mean, rstd,
        ctx.num_groups, ctx.eps, ctx.activation, ctx.backend,
    )
    param_grads = [None if t is None else g for t, g in zip((weight, bias, scale, shift), param_grads)]
    return (dx, *param_grads, None, None, None, None)


_group_norm.register_autograd(_group_norm_grad, setup_context=_group_norm_setup_context)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """GroupNorm, then ADM's scale-shift, then an optional SiLU, in one op.

    y = silu?((x − mean)/√(var + eps)·weight + bias)·(1 + scale) + shift), statistics per
    (sample, group) in float32 whatever x's dtype (ADM's GroupNorm32).

    Args:
        x: (N, C, *spatial), contiguous or channels_last.
        num_groups: G, dividing C.
        weight, bias: (C,) affine parameters, or None.
        scale, shift: (N, C) or (N, C, 1, ...) per-sample modulation, or None.
        activation: None or "silu".

    Returns y in x's dtype and memory format. Differentiable in x, weight, bias, scale
    and shift.
    """
    validation.check_group_norm(x, num_groups, weight, bias, eps, scale, shift, activation)
    per_sample = [None if t is None else t.reshape(x.shape[0], x.shape[1]) for t in (scale, shift)]
    y, _, _ = _group_norm(
        x, weight, bias, *per_sample, num_groups, float(eps),
        activation or "none", _resolve("group_norm", x.device, x.dtype),
    )
    return y


# --------------------------------------------------------------------------------------
# guided_step
# --------------------------------------------------------------------------------------


# guided_step is registered with torch.library.define rather than custom_op: custom_op's
# eager path for mutating ops rebuilds the schema's argument list per argument
# (quadratic in the ~30 arguments here, ~200 µs per call on CPU); define + impl costs a
# few µs. The implementation bumps the version counters of what it writes, as
# custom_op would, so autograd still detects use of a tensor overwritten here.
_GUIDED_STEP_SCALARS = (
    "alpha", "sigma", "guidance_rescale", "apg_eta", "apg_norm_threshold", "apg_momentum",
    "grad_eps_scale", "k_x", "k_x0", "k_eps", "k_prev", "k_noise", "k_grad",
)
torch.library.define(
    "fastguide::guided_step",
    "(Tensor model_output, Tensor x, Tensor? prev, Tensor? noise, Tensor? grad, "
    "Tensor(a!)? apg_buffer, Tensor(b!) out, Tensor(c!)? x0_out, "
    + "".join(f"float {name}, " for name in _GUIDED_STEP_SCALARS)
    + "str prediction_type, float? guidance_scale, bool cfg_zero_star, bool apg, "
    "bool clip_denoised, float? log_variance_min, float? log_variance_max, str backend) -> ()",
)


@torch.library.impl("fastguide::guided_step", "default")
def _guided_step(model_output, x, prev, noise, grad, apg_buffer, out, x0_out, *args):
    scalars = dict(zip(_GUIDED_STEP_SCALARS, args))
    prediction_type, guidance_scale, cfg_zero_star, apg, clip_denoised, log_min, log_max, backend = (
        args[len(_GUIDED_STEP_SCALARS):]
    )
    _module(backend, "guided_step").guided_step(
        model_output, x, prev=prev, noise=noise, grad=grad, apg_buffer=apg_buffer, out=out, x0_out=x0_out,
        prediction_type=prediction_type, guidance_scale=guidance_scale, cfg_zero_star=cfg_zero_star,
        apg=apg, clip_denoised=clip_denoised,
        log_variance_range=None if log_min is None else (log_min, log_max),
        **scalars,
    )
    for written in (out, x0_out, apg_buffer):
        if written is not None:
            torch.autograd.graph.increment_version(written)


@torch.library.register_fake("fastguide::guided_step")
def _(*args):
    return None


def guided_step(
    model_output: Tensor,
    x: Tensor,
    *,
    alpha: float,
    sigma: float,
    prediction_type: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    cfg_zero_star: bool = False,
    apg: bool = False,
    apg_eta: float = 0.0,
    apg_norm_threshold: float = 0.0,
    apg_momentum: float = 0.0,
    apg_buffer: Tensor | None = None,
    clip_denoised: bool = False,
    grad: Tensor | None = None,
    grad_eps_scale: float = 0.0,
    prev: Tensor | None = None,
    noise: Tensor | None = None,
    k_x: float = 0.0,
    k_x0: float = 0.0,
    k_eps: float = 0.0,
    k_prev: float = 0.0,
    k_noise: float = 0.0,
    k_grad: float = 0.0,
    log_variance_range: tuple[float, float] | None = None,
    out: Tensor | None = None,
    x0_out: Tensor | None = None,
) -> Tensor:
    """Guidance combine and one sampler update in one op; returns x_next.

    Reads model_output in place: (2B, C', ...) laid out [cond; uncond] when
    guidance_scale is given, else (B, C', ...), with C' = C or 2C (learned variance).
    With x = alpha·x0 + sigma·eps the step computes

        m  = u + w·(c − u)              (or CFG-Zero* / APG, then CFG rescale)
        x0, eps from m by prediction_type ("epsilon", "v_prediction", "sample")
        x0 ← clamp(x0, −1, 1), eps re-derived           if clip_denoised
        eps ← eps − grad_eps_scale·grad, x0 re-derived  if grad_eps_scale ≠ 0
        x_next = k_x·x + k_x0·x0 + k_eps·eps + k_prev·prev + k_noise·noise + k_grad·grad

    where with log_variance_range=(min, max) the noise and grad coefficients are
    multiplied per element by exp(ℓ/2) and exp(ℓ), ℓ the learned log variance.
    fastguide.reference.guided_step states each step in full.

    x_next goes to ``out`` (shaped like x, or (2B, ...) for both halves of the next
    [cond; uncond] input; x itself is allowed), x0 to ``x0_out`` when given, and APG's
    momentum state to ``apg_buffer`` (updated in place). Not differentiable.
    """
    scalars = {
        "alpha": alpha, "sigma": sigma, "guidance_rescale": guidance_rescale,
        "apg_eta": apg_eta, "apg_norm_threshold": apg_norm_threshold, "apg_momentum": apg_momentum,
        "grad_eps_scale": grad_eps_scale, "k_x": k_x, "k_x0": k_x0, "k_eps": k_eps,
        "k_prev": k_prev, "k_noise": k_noise, "k_grad": k_grad,
    }
    tensors = {"prev": prev, "noise": noise, "grad": grad, "apg_buffer": apg_buffer, "x0_out": x0_out, "out": out}
    validation.check_guided_step(
        model_output, x, tensors, scalars,
        prediction_type=prediction_type, guidance_scale=guidance_scale,
        cfg_zero_star=cfg_zero_star, apg=apg, clip_denoised=clip_denoised,
        log_variance_range=log_variance_range,
    )
    if out is None:
        out = torch.empty_like(x)
    log_min, log_max = (None, None) if log_variance_range is None else map(float, log_variance_range)
    torch.ops.fastguide.guided_step(
        model_output, x, prev, noise, grad, apg_buffer, out, x0_out,
        *(float(scalars[name]) for name in _GUIDED_STEP_SCALARS),
        prediction_type, None if guidance_scale is None else float(guidance_scale),
        bool(cfg_zero_star), bool(apg), bool(clip_denoised), log_min, log_max,
        _resolve("guided_step", x.device, compute_dtype(model_output, x)),
    )
    return out

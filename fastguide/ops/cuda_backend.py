"""The ``cuda`` backend: guided_step, group_norm and layer_norm on the hand-written kernels
of csrc/.

Same functions as every backend module (fastguide.ops calls them). Each makes the
tensors what the kernels read (dense in one layout, one dtype for every x-shaped
tensor (``_step_dtype``), fp32 APG state and norm statistics: copies only where a tensor differs,
results written back into the caller's tensors), then calls the ``fastguide_cuda`` ops
that the extension registers (fastguide.ops.extension loads or builds it on first use).
The norms' parameters (weight, bias, scale, shift, gate) pass in their own dtype, each
independently of x's: the kernels read float32, float16 and bfloat16 and convert as they
load, so an fp16/bf16 model costs no cast per call (a float64 parameter alone is copied
to float32).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import extension
from .contract import (
    COMBINE_ARGUMENTS,
    STEP_ARGUMENTS,
    GuidanceCombine,
    NormParameters,
    StepCoefficients,
    StepTensors,
)
from .layout import dense, guidance_stats, merge_similarity, norm_format, step_format, write_back
from .reference import group_norm_parameter_grads, layer_norm_parameter_grads


def _ops():
    """The op namespace of the extension (tests swap in the CPU harness's)."""
    extension.load()
    return getattr(torch.ops, extension.OPS_NAMESPACE)


def _step_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The one dtype the kernel reads and writes every x-shaped tensor in: the widest of
    theirs (float16 beside bfloat16: float32), float32 at most (the kernels' widest). So no
    input is rounded below its own precision and no output is computed below its own (an
    fp32 model output beside bf16 x, an fp32 ``out``), as the other backends compute; one
    dtype throughout costs no copy."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))
    return torch.float32 if dtype == torch.float64 else dtype


def guided_step(tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None) -> None:
    x, model_output = tensors.x, tensors.model_output
    fmt = step_format(x, model_output.shape[1] != x.shape[1])
    # Inputs the step does not use stay behind: the kernel reads only what it is given.
    noise = tensors.noise if step.k_noise != 0.0 else None
    grad = tensors.grad if step.grad_eps_scale != 0.0 or step.k_grad != 0.0 else None
    guide = tensors.guide if combine is not None else None
    dtype = _step_dtype(x, model_output, guide, noise, grad, tensors.out, tensors.x0_out, *tensors.history)
    noise, grad, guide = (dense(t, fmt, dtype) for t in (noise, grad, guide))
    momentum = combine is not None and combine.variant == "apg" and combine.apg_momentum != 0.0
    targets = {"out": tensors.out, "x0_out": tensors.x0_out, "apg_buffer": tensors.apg_buffer if momentum else None}
    work = {name: dense(t, fmt, torch.float32 if name == "apg_buffer" else dtype) for name, t in targets.items()}
    # With similarity the kernel returns its blocks' sums of x̂0_c·x̂0_u, x̂0_c², x̂0_u²: merged here.
    similarity_partials = _ops().guided_step(
        dense(model_output, fmt, dtype),
        guide,
        dense(x, fmt, dtype),
        [dense(h, fmt, dtype) for h in tensors.history],
        noise,
        grad,
        work["apg_buffer"],
        work["out"],
        work["x0_out"],
        *STEP_ARGUMENTS.pack(step),
        *COMBINE_ARGUMENTS.pack(combine)[:1],
        guidance_stats(combine),
        tensors.similarity is not None,
    )
    write_back(targets, work)
    if similarity_partials is not None:
        assert tensors.similarity is not None  # the kernel returns partials only when asked
        merge_similarity(similarity_partials, tensors.similarity)


# The dtypes the kernels read a norm's parameters in (their own, whatever x's).
_PARAMETER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _parameters(*tensors: Tensor | None) -> list[Tensor | None]:
    """The norm parameters as the kernels read them: dense, in their own dtype (a float64
    one as a float32 copy); no copy for the usual dense float32/float16/bfloat16 ones."""
    return [None if t is None else (t if t.dtype in _PARAMETER_DTYPES else t.float()).contiguous() for t in tensors]


def _statistics(mean: Tensor, rstd: Tensor) -> list[Tensor]:
    """mean and rstd as the backward kernels read them: dense fp32 (the forward's own)."""
    return [t.float().contiguous() for t in (mean, rstd)]


def group_norm_forward(
    x: Tensor, params: NormParameters, num_groups: int, eps: float, activation: str | None
) -> tuple[Tensor, Tensor, Tensor]:
    x = dense(x, norm_format(x))
    return _ops().group_norm_forward(x, *_parameters(*params), num_groups, float(eps), activation == "silu")


def group_norm_backward(
    dy: Tensor, x: Tensor, params: NormParameters, mean: Tensor, rstd: Tensor, num_groups: int, activation: str | None
) -> tuple[Tensor | None, ...]:
    fmt = norm_format(x)
    x = dense(x, fmt)
    dx, sums = _ops().group_norm_backward(
        dense(dy, fmt, x.dtype),
        x,
        *_parameters(*params),
        *_statistics(mean, rstd),
        num_groups,
        activation == "silu",
    )
    return (dx, *group_norm_parameter_grads(sums, params))


def layer_norm_forward(x: Tensor, params: NormParameters, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _ops().layer_norm_forward(x.contiguous(), *_parameters(*params), float(eps))


def gated_residual_layer_norm_forward(
    h: Tensor, branch: Tensor, gate: Tensor, params: NormParameters, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ops().gated_residual_layer_norm_forward(
        h.contiguous(), branch.contiguous(), *_parameters(gate, *params), float(eps)
    )


def layer_norm_backward(
    grad_y: Tensor, x: Tensor, params: NormParameters, mean: Tensor, rstd: Tensor
) -> tuple[Tensor | None, ...]:
    x = x.contiguous()
    dx, partials, dscale_tokens, dshift_tokens = _ops().layer_norm_backward(
        grad_y.to(x.dtype).contiguous(), x, *_parameters(*params), *_statistics(mean, rstd)
    )
    # Per-token modulation: the kernel wrote its gradients (fp32) element by element.
    return (dx, *layer_norm_parameter_grads(partials, params, dscale_tokens, dshift_tokens))

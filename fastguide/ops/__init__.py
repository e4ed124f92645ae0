"""The public ops and the only door to the kernels.

One module per op holds its public function, its argument checks and its registration as
a ``torch.library`` custom op in the ``fastguide`` namespace (a fake (meta) implementation
and, where differentiable, an autograd formula, so ``torch.compile(fullgraph=True)`` sees
one node per call). The modules are private (``_attention``, ``_group_norm``,
``_layer_norm``, ``_guided_step``) because ``fastguide.ops.<op>`` is the function:

    public function    checks its arguments, asks fastguide.ops.dispatch for the backend
                       of the tensors' device and dtype, and calls the custom op with that
                       backend's name, so the backward runs on the same backend;
    dispatch           the backend choice per call, and whether the call needs the custom
                       op (tracing, a transform, the profiler, autograd) or may run the
                       op's body directly;
    backends           the backend objects (torch, triton, cuda): the ops, dtypes and
                       devices each supports and its reasons for declining a call, and the
                       choice (``fastguide.backend``, ``set_backend``, FASTGUIDE_BACKEND);
    reference          the torch backend: every op in plain PyTorch, the specification;
    cuda_backend       the cuda backend's glue to fastguide._C (csrc/);
    contract           guided_step's types (StepCoefficients, GuidanceCombine,
                       StepTensors) and their packing into the op's arguments;
    validation, layout the checks and the layout helpers the ops share.

The Triton kernels live in fastguide.kernels, one module per op, and are the triton
backend's implementation. Every backend implementation has the same functions:
``attention_forward``, ``attention_backward``, ``group_norm_forward``,
``group_norm_backward``, ``layer_norm_forward``, ``gated_residual_layer_norm_forward``,
``layer_norm_backward`` and ``guided_step(tensors, step, combine)``.
"""

from ._attention import attention
from ._group_norm import group_norm
from ._guided_step import (
    check_combine,
    check_step,
    check_step_layout,
    check_step_tensors,
    guided_step,
    guided_step_prechecked,
)
from ._layer_norm import gated_residual, gated_residual_layer_norm, layer_norm
from .contract import GuidanceCombine, StepCoefficients, StepTensors

__all__ = [
    "GuidanceCombine",
    "StepCoefficients",
    "StepTensors",
    "attention",
    "check_combine",
    "check_step",
    "check_step_layout",
    "check_step_tensors",
    "gated_residual",
    "gated_residual_layer_norm",
    "group_norm",
    "guided_step",
    "guided_step_prechecked",
    "layer_norm",
]

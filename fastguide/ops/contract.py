"""The guided_step contract as three small frozen types, and the op schema derived from them.

    StepCoefficients   one sampler update's scalars; its docstring writes out the update
                       (the one place it is written out: the kernels' headers refer to it)
    GuidanceCombine    how the guided prediction m comes from c, u and (PAG, SLG) p:
                       m = u + w·(c − u) + s·(c − p), or a variant (CFG rescale,
                       CFG-Zero*, APG, tangential CFG)
    StepTensors        the step's tensors: the model output, x, the guiding prediction
                       when it is a separate tensor, the solver history, noise, the
                       classifier gradient, and the buffers the step writes (x_next, x0,
                       APG's state, and on request each sample's cosine of the two
                       branches' x0 predictions)

NormParameters bundles the norms' optional parameters (weight, bias, scale, shift), so
that every backend's norm functions take them as one argument.

fastguide.ops.reference.guided_step states the math. Every backend receives these objects
(``guided_step(tensors, step, combine)``); samplers and guidance specs build them.

The custom op's schema is derived from the types' fields, so adding a field to a type is
the whole change on the op's side: each type's ``float`` fields travel as one
``float[]`` in declaration order; ``tuple[float, ...]`` fields as ``float[]``; an
optional pair as ``float[]?``; bools and strings as themselves; tensors as ``Tensor``,
``Tensor?`` or ``Tensor[]``, with the fields named in WRITTEN declared as mutated. A None
GuidanceCombine (an unguided step) travels as None in each of its arguments.
"""

from __future__ import annotations

import string
import typing
from typing import Any, NamedTuple, Optional

from torch import Tensor


class NormParameters(NamedTuple):
    """A norm's optional parameters, each None or a tensor: the elementwise affine
    (weight, bias), then the modulation (scale, shift): y = (x̂·weight + bias)·(1 + scale)
    + shift. group_norm's are (C,) and (N, C); layer_norm's (D,) and (N, 1, D) or (N, L, D)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    scale: Optional[Tensor]
    shift: Optional[Tensor]


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
# The path each prediction type's map to x0 and eps assumes (None: any alpha and sigma):
# v = alpha·eps − sigma·x0 gives x0 = alpha·x − sigma·v only where alpha² + sigma² = 1, a
# flow velocity eps − x0 gives x0 = x − sigma·v only where alpha + sigma = 1. check_step
# holds a step's alpha and sigma to it, a sampler its schedule (NoiseSchedule.path).
PREDICTION_PATHS = {"epsilon": None, "v_prediction": "variance-preserving", "sample": None, "flow_prediction": "flow"}
PATH_RELATIONS = {"variance-preserving": "alpha² + sigma² = 1", "flow": "alpha + sigma = 1"}
COMBINE_VARIANTS = ("cfg", "zero_star", "apg", "tangential")
# The fused kernels read the history through this many pointer slots (a solver of order
# 3 needs 2 or 3); the reference has no limit, the contract has this one for all backends.
MAX_HISTORY = 4
# The StepTensors fields that the step writes (declared mutated in the schema).
WRITTEN = ("apg_buffer", "out", "x0_out", "similarity")


class StepCoefficients(NamedTuple):
    """The per-step scalars of one sampler update (the sampler's whole job is these).

    With x = alpha·x0 + sigma·eps at this step:
      x0, eps from the model prediction m by ``prediction_type`` ("epsilon": m = eps,
          "v_prediction": m = alpha·eps − sigma·x0, "sample": m = x0, "flow_prediction":
          m = eps − x0, the velocity of a flow path with alpha + sigma = 1);
      clip_denoised: x0 ← clamp(x0, −1, 1) where finite (a NaN or ±inf x0 stays non-finite),
          eps re-derived from it;
      grad_eps_scale ≠ 0: eps ← eps − grad_eps_scale·grad, x0 re-derived (ADM's order);
      x_next = k_x·x + k_x0·x0 + k_eps·eps + Σᵢ k_history[i]·history[i]
               + k_noise'·noise + k_grad'·grad + k_guide_eps·eps_u,
    where eps_u is the eps of the guiding prediction u itself (CFG++'s renoising, Chung et
    al. 2024), by the same prediction-type map;
    with k_noise' = k_noise·exp(ℓ/2) and k_grad' = k_grad·exp(ℓ) for ADM's learned log
    variance ℓ when log_variance_range = (min, max) is given, else k_noise and k_grad.
    """

    alpha: float
    sigma: float
    k_x: float = 0.0
    k_x0: float = 0.0
    k_eps: float = 0.0
    k_noise: float = 0.0
    k_grad: float = 0.0
    grad_eps_scale: float = 0.0
    k_guide_eps: float = 0.0
    k_history: tuple[float, ...] = ()
    prediction_type: str = "epsilon"
    clip_denoised: bool = False
    log_variance_range: Optional[tuple[float, float]] = None


class GuidanceCombine(NamedTuple):
    """The guided prediction m from the model's prediction c, the guiding one u and, for
    perturbed-attention or skip-layer guidance, the perturbed one p (the same model run
    with some layers perturbed).

      "cfg":        m = u + w·(c − u) + s·(c − p) with s = perturbed_scale (as diffusers' PAG
                    pipelines and SkipLayerGuidance); s = 0, plain CFG, reads no p.
                    Only "cfg" takes s ≠ 0
      "zero_star":  CFG-Zero* (Fan et al. 2025): u ← s*·u first, s* = ⟨c, u⟩/(‖u‖² + 1e-8)
      "apg":        adaptive projected guidance (Sadat et al. 2024) with apg_eta,
                    apg_norm_threshold (0 = off) and apg_momentum (state in apg_buffer)
      "tangential": tangential damping CFG (TCFG, Kwon et al. 2025): u ← (u·v₁)·v₁ first,
                    v₁ the top right-singular vector of the per-sample 2×D matrix [c; u]
    then, when rescale = φ > 0, CFG rescale (Lin et al. 2023), of the whole m:
      m ← φ·m·std(c)/std(m) + (1 − φ)·m.
    """

    scale: float
    rescale: float = 0.0
    apg_eta: float = 0.0
    apg_norm_threshold: float = 0.0
    apg_momentum: float = 0.0
    perturbed_scale: float = 0.0
    variant: str = "cfg"


class StepTensors(NamedTuple):
    """The tensors of one step. x is (B, C, *spatial).

    model_output: (B, C', ...) or, for batched CFG, (2B, C', ...) laid out [c; u], or with
        combine.perturbed_scale ≠ 0, (3B, C', ...) laid out [c; u; p]; C' is C, or 2C when
        the model also outputs ADM's variance interpolation (read from the first B rows).
        The guiding prediction u is its second B rows, or ``guide`` (not with p).
    guide: (B, C or C', ...): u as a separate tensor (a second network's output).
    history: solver state (earlier x0 or model outputs), each shaped like x.
    out: x_next, shaped like x or (2B, ...) or (3B, ...), x_next in each B-row block (the
        next [c; u] or [c; u; p] input); may be x itself. x0_out: x0. apg_buffer: APG's
        momentum state, updated in place.
    similarity: (B,) float32, contiguous, on x's device: receives, per sample b, the
        cosine of the two branches' x0 predictions,
        cos(x̂0_c, x̂0_u) = ⟨x̂0_c, x̂0_u⟩/(‖x̂0_c‖·‖x̂0_u‖), where x̂0_c and x̂0_u are derived
        elementwise from x and c, resp. u, alone by the step's prediction-type map (the
        one StepCoefficients states for m, with its alpha and sigma), over the C prediction
        channels (never the variance channels) of the predictions as the model gave them
        (before CFG-Zero*, tangential CFG, APG or momentum, and without clip_denoised or
        the classifier shift); 0 where ‖x̂0_c‖·‖x̂0_u‖ = 0, NaN where x̂0_c or x̂0_u holds a
        NaN or ±inf (from c, u or x). Only for a guided step (combine given) without a
        perturbed prediction (combine.perturbed_scale = 0).
    """

    model_output: Tensor
    x: Tensor
    guide: Optional[Tensor] = None
    history: tuple[Tensor, ...] = ()
    noise: Optional[Tensor] = None
    grad: Optional[Tensor] = None
    apg_buffer: Optional[Tensor] = None
    out: Optional[Tensor] = None
    x0_out: Optional[Tensor] = None
    similarity: Optional[Tensor] = None


def float_fields(cls: Any) -> tuple[str, ...]:
    """Names of the ``float`` fields of a contract type, in declaration order (the order
    of its packed ``float[]``, and of the matching C++ struct in csrc/guided_step.cuh)."""
    hints = typing.get_type_hints(cls)
    return tuple(name for name in cls._fields if hints[name] is float)


# The types' float fields, resolved once (a type hint lookup per call would cost, and
# torch.compile cannot trace it).
STEP_SCALARS = float_fields(StepCoefficients)
COMBINE_SCALARS = float_fields(GuidanceCombine)

# Field annotation -> schema type; float fields are packed separately.
_SCHEMA_TYPES = {
    tuple[float, ...]: "float[]",
    Optional[tuple[float, float]]: "float[]?",
    bool: "bool",
    str: "str",
    Tensor: "Tensor",
    Optional[Tensor]: "Tensor?",
    tuple[Tensor, ...]: "Tensor[]",
}


class _OpArguments:
    """How one contract type travels through the op: its schema arguments, and the
    packing of an object into them and back. This runs on every call, so the types are
    NamedTuples (construction and hashing cost a fifth of a frozen dataclass's) that
    declare their float fields first: packing slices them off, unpacking is positional."""

    def __init__(self, cls: Any, prefix: str, optional: bool = False):
        hints = typing.get_type_hints(cls)
        self.cls, self.optional = cls, optional
        self.scalars = float_fields(cls)
        self.n_scalars = len(self.scalars)
        if cls._fields[: self.n_scalars] != self.scalars:
            raise TypeError(f"{cls.__name__} must declare its float fields before the others")
        others = cls._fields[self.n_scalars :]
        self.schema: list[str] = [f"float[]{'?' if optional else ''} {prefix}_scalars"] if self.scalars else []
        written = 0
        for name in others:
            kind = _SCHEMA_TYPES[hints[name]]
            if name in WRITTEN:
                kind = kind.replace("Tensor", f"Tensor({string.ascii_lowercase[written]}!)")
                written += 1
            if optional and not kind.endswith("?"):
                kind += "?"
            self.schema.append(f"{kind} {name}")
        self.count = len(self.schema)
        # Tuple fields travel as lists (the schema's float[] and Tensor[]).
        self._sequences = tuple(
            hints[name] in (tuple[float, ...], tuple[Tensor, ...], Optional[tuple[float, float]]) for name in others
        )

    def pack(self, obj: Any) -> list:
        if obj is None:
            return [None] * self.count
        others = [
            list(v) if sequence and v is not None else v for v, sequence in zip(obj[self.n_scalars :], self._sequences)
        ]
        return [list(obj[: self.n_scalars]), *others] if self.n_scalars else others

    def unpack(self, values: typing.Sequence) -> Any:
        if self.optional and values[0] is None:
            return None
        others = values[1:] if self.n_scalars else values
        others = [tuple(v) if sequence and v is not None else v for v, sequence in zip(others, self._sequences)]
        return self.cls(*values[0], *others) if self.n_scalars else self.cls(*others)


TENSOR_ARGUMENTS = _OpArguments(StepTensors, "tensors")
STEP_ARGUMENTS = _OpArguments(StepCoefficients, "step")
COMBINE_ARGUMENTS = _OpArguments(GuidanceCombine, "combine", optional=True)


def guided_step_schema() -> str:
    """The custom op's schema: the three types' arguments, then the backend's name."""
    arguments = TENSOR_ARGUMENTS.schema + STEP_ARGUMENTS.schema + COMBINE_ARGUMENTS.schema + ["str backend"]
    return "(" + ", ".join(arguments) + ") -> ()"


def pack(tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None) -> list:
    """The op's arguments (without the backend) for three contract objects."""
    return TENSOR_ARGUMENTS.pack(tensors) + STEP_ARGUMENTS.pack(step) + COMBINE_ARGUMENTS.pack(combine)


def unpack(arguments: typing.Sequence) -> tuple[StepTensors, StepCoefficients, GuidanceCombine | None]:
    """The three contract objects back from the op's arguments (without the backend)."""
    n_tensors, n_step = TENSOR_ARGUMENTS.count, STEP_ARGUMENTS.count
    return (
        TENSOR_ARGUMENTS.unpack(arguments[:n_tensors]),
        STEP_ARGUMENTS.unpack(arguments[n_tensors : n_tensors + n_step]),
        COMBINE_ARGUMENTS.unpack(arguments[n_tensors + n_step :]),
    )

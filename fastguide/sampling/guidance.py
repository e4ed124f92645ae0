"""Guidance specifications: what the sampler feeds the combine step of ops.guided_step.

- ``CFG(scale, rescale=0, interval=None, apg=None, zero_star=False, tangential=False)``:
  classifier-free guidance on one batched forward of [cond; uncond], m = u + w·(c − u)
  (diffusers' w, so w = 1 is the conditional prediction; Ho & Salimans write
  (1 + w')·c − w'·u, their w' this w − 1), with CFG rescale (Lin et al. 2023), a
  guidance interval in EDM's σ̃ (Kynkäänniemi et al. 2024: outside it the forward runs
  on the conditional half only), and one of
  adaptive projected guidance (Sadat et al. 2024), CFG-Zero*'s optimised unconditional
  scale (Fan et al. 2025; with ``zero_init_steps=K`` also its zero-init: the first K model
  calls take a zero prediction and run no forward) or tangential damping (TCFG, Kwon et al. 2025: u projected onto
  the top singular direction of [c; u], computed in the fused step's reduction pass);
  ``schedule`` varies the weight over the steps ("linear", "cosine": Wang et al. 2024, or
  a callable of σ̃), evaluated per step on the host as a scalar into the op;
  ``guided_channels=k`` guides only the first k channels and keeps the conditional
  prediction in the others, as the official DiT sample.py does with k = 3 of its 4 latent
  channels (diffusers' DiTPipeline guides all 4).
- Guidance at less than two forwards, both CFG options: ``truncate=γ`` (adaptive guidance,
  Castillo et al. 2023): from the call after the one where every sample's cosine
  similarity of the x0 predictions of c and u reaches γ, the forward runs the conditional
  rows alone and the step is unguided (the similarity comes out of the fused step:
  ``StepTensors.similarity``). The x0 predictions, whatever the model outputs: a γ tuned
  on the cosine of raw ε outputs does not carry over, since those start near 1 at high
  noise (docs/design.md);
  ``reuse=DeltaReuse(every=k, order)`` (FasterCache-style, Lv et al. 2024: the plain Δ
  reuse of its CFG cache, without its frequency weighting or timestep range; and
  LinearAG-style estimates): the unconditional rows run at every k-th guided call, and at
  the others u = c − Δ̂, Δ̂ the last computed Δ = c − u or its linear extrapolation.
- ``CFGPlusPlus(scale)``: CFG++ (Chung et al. 2024), λ ∈ [0, 1]: x0 from the guided
  prediction, the renoising from the unconditional one (``k_guide_eps`` of the step).
- ``AutoGuidance(guide_model, scale)``: Karras et al. 2024, the guide network's output
  as the fused step's separate guide tensor.
- ``PAG(scale, layers, cfg_scale=1)``: perturbed-attention guidance (Ahn et al. 2024), and
  ``SkipLayerGuidance(scale, layers, cfg_scale=1)`` (SD3.5's skip-layer guidance): a third
  branch p, the conditional input through the model perturbed at ``layers`` (identity
  self-attention; skipped blocks), in the same batched forward as [c; u]:
  m = u + w·(c − u) + s·(c − p) with CFG, m = c + s·(c − p) without (a model without a null
  class works).
- ``ClassifierGuidance(classifier, scale)``: the gradient of log p(y | x_t) through a
  noisy classifier, applied as ADM does: a mean shift Σ·s·∇ for ancestral sampling, an
  eps shift −σ_t·s·∇ for the others.
Both may be given together.

Each is a ``Guidance``: the strategy the sampling loop calls (which branches a model call
runs, the fused step's combine, any change to the step), so the loop never asks a guidance
its class and a new method is one class here.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from ..models.blocks import perturbation_target
from ..models.perturbation import Perturbation, attention_patterns, block_indices, perturb_attention, skip_blocks
from ..ops.contract import GuidanceCombine, StepCoefficients
from ..ops.validation import FLOAT32_MAX

SCHEDULES = ("constant", "linear", "cosine")
# The row blocks a batched forward may hold: the conditional and unconditional inputs, and
# the conditional input through a perturbed network (PAG, skip-layer guidance).
BRANCHES = ("cond", "uncond", "perturbed")


def default_sampler(cfg_plus_plus: bool = False, interval: bool = False) -> str:
    """The sampler used when none is named: "unipc", the most accurate per model call in
    the NFE benchmark (benchmarks/sampling/nfe.py); under CFG++, whose renoising is built
    for ddim, euler and dpm++2m, "dpm++2m" (the best CFG++ rows of `fastguide sweep`), or
    "ddim" with a guidance interval (2M's unconditional history needs every call guided)."""
    if not cfg_plus_plus:
        return "unipc"
    return "ddim" if interval else "dpm++2m"


class Guidance(abc.ABC):
    """What the sampling loop asks of a guidance method, with the defaults of plain
    conditional sampling. A subclass defines ``combine`` (and ``scale_at``, which the
    default ``combine_at`` reads, or overrides ``combine_at`` itself). For each model
    call the loop asks:

    - ``active_at(σ̃)``: whether guidance applies at this call's noise level (EDM's σ̃);
      where it does not, the forward runs the conditional rows alone;
    - ``branches_at(σ̃)``: where it does, the conditioning of each B-row block of the
      model's one batched forward, in order (names from BRANCHES), a prefix of
      ``branches`` (the most it ever runs, which the loop's buffers hold); the fused step
      reads the model's output in that layout;
    - ``perturb(model)``: a handle perturbing the "perturbed" block's rows of the model's
      forward (PAG, skip-layer guidance), installed for a run and removed after, or None;
    - ``guide_network()``: a second network run on the conditional rows, whose output
      enters the fused step as its separate guide tensor, or None;
    - ``combine_at(σ̃, τ)``: the fused step's combine at this call (τ = t/(T − 1));
    - ``step(coefficients)``: its change to the sampler's update (CFG++'s renoising);
    - ``unconditional_history(sampler)``: whether the solver's history holds the
      unconditional x0 instead of the guided one (CFG++ on DPM-Solver++(2M));
    - ``guided_output(output, batch, channels)``: its edit of the model's output before
      the combine (the official DiT's guidance of some channels).
    - ``truncate`` and ``reuse``: whether, and how, calls run without the unconditional
      rows (see the module docstring; None: never).

    and, once, checks its pairing with the sampler (``check_sampler``), the batch
    (``check_shape``) and the labels (``check_labels``). ``default_sampler`` names the
    sampler used when none is named.
    """

    branches: tuple[str, ...] = ("cond",)
    interval: tuple[float, float] | None = None
    # Guidance at less than two forwards (CFG's options): the cosine similarity of the x0
    # predictions of c and u from which the unconditional rows stop, and the reuse of
    # Δ = c − u between calls.
    truncate: float | None = None
    reuse: DeltaReuse | None = None
    # CFG-Zero*'s zero-init: the first calls whose prediction is zero (no forward runs).
    zero_init_steps: int = 0

    def guide_network(self) -> nn.Module | None:
        return None

    def branches_at(self, edm_sigma: float) -> tuple[str, ...]:
        return self.branches

    def perturb(self, model: Callable[..., Tensor]) -> Perturbation | None:
        return None

    def active_at(self, edm_sigma: float) -> bool:
        """Whether guidance applies at noise level σ̃: always without an interval, else for
        σ̃ in (low, high], half-open as Kynkäänniemi et al. define it."""
        return self.interval is None or self.interval[0] < edm_sigma <= self.interval[1]

    def combine_at(self, edm_sigma: float, progress: float) -> GuidanceCombine:
        """The fused step's combine at noise level σ̃ and normalised time τ."""
        return self.combine(self.scale_at(edm_sigma, progress))

    def scale_at(self, edm_sigma: float, progress: float) -> float:
        """The guidance weight at noise level σ̃ and normalised time τ."""
        raise NotImplementedError(f"{type(self).__name__} defines no scale_at(σ̃, τ): define it, or override combine_at")

    @abc.abstractmethod
    def combine(self, scale: float | None = None) -> GuidanceCombine:
        """The fused step's combine at weight ``scale`` (None: the method's own)."""

    def step(self, step: StepCoefficients) -> StepCoefficients:
        """The sampler's update at a guided call (unchanged by default)."""
        return step

    def default_sampler(self) -> str:
        """The sampler used when none is named (see the module function)."""
        return default_sampler()

    def check_sampler(self, sampler: str, dynamic_threshold: float | None) -> None:
        """Refuse a sampler (or dynamic thresholding) this guidance cannot be paired with."""

    def unconditional_history(self, sampler: str) -> bool:
        return False

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse a batch shape this guidance cannot guide."""

    def check_labels(self, labels: Tensor) -> None:
        """Refuse labels a network of this guidance cannot take (before any forward)."""

    def guided_output(self, model_output: Tensor, batch: int, channels: int) -> Tensor:
        return model_output


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance settings (Sadat et al. 2024; eta=0 drops the part of
    the update parallel to the conditional prediction; momentum < 0 as in the paper).
    The defaults differ from diffusers' AdaptiveProjectedGuidance: eta 0 here (the parallel
    part dropped; theirs 1.0, all of it kept) and norm_threshold 0 here (no clipping; their
    adaptive_projected_guidance_rescale is 15.0): pass eta=1.0, norm_threshold=15.0 to port
    diffusers settings. eta outside [0, 1] is taken as given (the paper uses [0, 1]; a
    negative eta reverses the parallel part).
    Checked when built: each a finite number within float32's range (the kernels'
    scalars), norm_threshold non-negative, momentum in [−1, 1] (beyond, the running
    average grows geometrically with the steps).

    The guided prediction is the paper's formula, m = c + (w − 1)·(Δ⊥ + η·Δ∥), on the model's
    output as it comes (ε, v or a velocity), as diffusers' AdaptiveProjectedGuidance reads it.
    That guider's default (use_original_formulation=False) is u + w·(Δ⊥ + η·Δ∥), another
    prediction at the same w: its use_original_formulation=True at scale w − 1 is this one.
    The paper writes the update for the denoiser's x0 prediction D; on an ε-model the two
    differ: ε_c ≈ x/σ is mostly the noise, so a Δ along x0_c (the oversaturating part) is
    nearly orthogonal to ε_c and η = 0 removes little of it (a synthetic check at w = 7.5
    kept 91–99.7% of CFG's x0 saturation). The paper's effect needs an x0-predicting
    ("sample") model."""

    eta: float = 0.0
    norm_threshold: float = 0.0
    momentum: float = 0.0

    def __post_init__(self):
        for name in ("eta", "norm_threshold", "momentum"):
            _set_real(self, name, f"APG {name}")
        if self.norm_threshold < 0:
            raise ValueError(f"APG norm_threshold must be non-negative (0 turns it off), got {self.norm_threshold}")
        if not -1 <= self.momentum <= 1:
            raise ValueError(
                f"APG momentum must be in [-1, 1] (beyond, its running average grows geometrically), "
                f"got {self.momentum}"
            )


@dataclass(frozen=True)
class DeltaReuse:
    """Reuse of the guidance delta Δ = c − u across calls (FasterCache-style, Lv et al. 2024:
    the plain Δ reuse of its CFG cache, without its split of Δ into weighted low and high
    frequencies or its timestep range, so reuse starts at the second guided call;
    LinearAG-style linear estimates). The unconditional rows run at the guided calls
    j = 0, k, 2k, ... (j counting guided calls, k = ``every``); at a call j between, the
    forward runs the conditional rows alone and the combine reads u = c − Δ̂ with
    - order 0: Δ̂ = Δ_a, the last computed delta (at guided call a);
    - order 1: Δ̂ = Δ_a + (p_j − p_a)/(p_a − p_b)·(Δ_a − Δ_b), linear in p through the last
      two computed deltas (Δ_a alone until two exist, or where p_a = p_b), p counting the
      distinct model times before the call's: the step index for heun, whose two
      consecutive calls at one t (a step's second, the next step's first) share a p, the
      half-step for dpm++2s, whose midpoint calls have times of their own.
    Checked when built: every an int >= 2, order 0 or 1."""

    every: int = 2
    order: int = 0

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, Integral) or self.every < 2:
            raise ValueError(f"DeltaReuse every must be an int >= 2 (1 would run every call), got {self.every!r}")
        if not isinstance(self.order, Integral) or isinstance(self.order, bool) or self.order not in (0, 1):
            raise ValueError(
                f"DeltaReuse order must be 0 (the last delta) or 1 (linear extrapolation), got {self.order!r}"
            )
        object.__setattr__(self, "every", int(self.every))  # (a NumPy integer too; frozen dataclass)
        object.__setattr__(self, "order", int(self.order))

    def estimate(
        self, guided_index: int, computed: list[int], positions: Sequence[int]
    ) -> tuple[tuple[int, float], ...] | None:
        """At guided call ``guided_index``: None when its unconditional rows run, else Δ̂ as
        ((k-th last computed delta, weight), ...), ``computed`` the guided calls so far that
        ran them (in order), ``positions[g]`` guided call g's p (see the class docstring)."""
        if guided_index % self.every == 0 or not computed:
            return None
        now, last = positions[guided_index], positions[computed[-1]]
        if self.order == 0 or len(computed) < 2 or last == positions[computed[-2]]:
            return ((0, 1.0),)
        slope = (now - last) / (last - positions[computed[-2]])
        return ((0, 1.0 + slope), (1, -slope))


@dataclass(frozen=True)
class CFG(Guidance):
    """Classifier-free guidance settings (the module docstring has each). Checked when
    built: scale and rescale finite numbers within float32's range (the kernels' scalars),
    rescale in [0, 1], interval a pair 0 <= low < high, schedule a known name or a
    callable, apg an APG, zero_star and tangential bools (at most one variant),
    guided_channels a positive int that takes plain CFG, truncate a number in (−1, 1],
    reuse a DeltaReuse, zero_init_steps an int >= 0 that takes zero_star; each scheduled
    weight is checked when the sampler evaluates it.
    zero_star's scale s* = ⟨c, u⟩/‖u‖² (per sample) is on the model's output, as diffusers'
    guider computes it; the paper derives it for flow velocities. On ε outputs c and u
    share the x/σ part, so s* ≈ 1 and it is close to plain CFG.
    rescale and tangential act on the model's output as it comes (ε, v, x0 or a flow
    velocity), as diffusers' rescale_noise_cfg and TCFG guider do: the same φ is a
    different blend on another parameterisation.
    zero_init_steps = K is CFG-Zero*'s zero-init (Fan et al. 2025, §4.2; diffusers'
    ClassifierFreeZeroStarGuidance, whose default is K = 1): the first K model calls take
    the prediction 0 in place of the guided one, as diffusers' guider returns it, and skip
    the forward. K counts model calls, as diffusers' guider does, where the paper counts
    solver steps: the same for Euler, but on a two-call step (heun, dpm++2s) K = 1 zeroes
    only the first step's first call; the solver steps from it as from any prediction, with no rescale. The
    paper sets the velocity of a flow model to zero there, so the sample stays x_T through
    Euler steps (without clip_denoised or dynamic thresholding, which would clip the x0 = x
    it implies). On a VP schedule ε̂ = 0 implies x0 = x/α, which clip_denoised (VP's
    default) clips before the step re-derives ε̂ from it, as for any prediction
    (diffusers' DDIM with clip_sample keeps ε̂ = 0 instead: use clip_denoised=False to
    match its unclipped schedulers). A ForecastCache's warmup counts the zeroed calls.
    Refused beside classifier guidance (its gradient would move the zero prediction) and
    with sampler='ddpm' unless variance_type is fixed (a skipped forward gives no learned
    variance).
    truncate reads the similarity of the u the combine gets: at a delta-reuse call the
    estimate c − Δ̂, and with guided_channels u = c in the unguided channels (which raises
    the similarity)."""

    scale: float
    rescale: float = 0.0
    interval: tuple[float, float] | None = None
    apg: APG | None = None
    zero_star: bool = False
    tangential: bool = False
    schedule: str | Callable[[float], float] = "constant"
    guided_channels: int | None = None
    truncate: float | None = None
    reuse: DeltaReuse | None = None
    zero_init_steps: int = 0

    def __post_init__(self):
        _set_real(self, "scale", "CFG scale")
        if (
            isinstance(self.zero_init_steps, bool)
            or not isinstance(self.zero_init_steps, Integral)
            or self.zero_init_steps < 0
        ):
            raise ValueError(f"CFG zero_init_steps must be an int >= 0, got {self.zero_init_steps!r}")
        object.__setattr__(self, "zero_init_steps", int(self.zero_init_steps))
        if self.zero_init_steps and not self.zero_star:
            raise ValueError(
                "CFG zero_init_steps is CFG-Zero*'s zero-init (Fan et al. 2025): set zero_star=True with it"
            )
        if self.truncate is not None:
            _set_real(self, "truncate", "CFG truncate")
            if not -1 < self.truncate <= 1:
                raise ValueError(f"CFG truncate must be a cosine similarity in (-1, 1], got {self.truncate}")
        if self.reuse is not None and not isinstance(self.reuse, DeltaReuse):
            raise TypeError(f"CFG reuse must be a fastguide.DeltaReuse or None, got {type(self.reuse).__name__}")
        if self.guided_channels is not None:
            if (
                isinstance(self.guided_channels, bool)
                or not isinstance(self.guided_channels, Integral)
                or self.guided_channels < 1
            ):
                raise ValueError(f"CFG guided_channels must be a positive int or None, got {self.guided_channels!r}")
            object.__setattr__(self, "guided_channels", int(self.guided_channels))
            if self.rescale or self.apg is not None or self.zero_star or self.tangential:
                raise ValueError(
                    "CFG guided_channels (the official DiT's guidance of some channels) takes plain CFG: "
                    "rescale, apg, zero_star and tangential reduce over all channels"
                )
        _set_real(self, "rescale", "CFG rescale")
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"CFG rescale must be in [0, 1], got {self.rescale}")
        _set_interval(self, "CFG")
        if not callable(self.schedule) and self.schedule not in SCHEDULES:
            raise ValueError(f"CFG schedule must be one of {SCHEDULES} or a callable of σ̃, got {self.schedule!r}")
        if self.apg is not None and not isinstance(self.apg, APG):
            raise TypeError(f"CFG apg must be a fastguide.APG or None, got {type(self.apg).__name__}")
        for name in ("zero_star", "tangential"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CFG {name} must be a bool, got {type(getattr(self, name)).__name__}")
        if (self.apg is not None) + self.zero_star + self.tangential > 1:
            raise ValueError("CFG takes at most one of apg, zero_star and tangential: they are alternative combines")

    # One forward of 2B rows, [cond; uncond]; the step reads u from its second half.
    branches = ("cond", "uncond")

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if self.guided_channels is not None and self.guided_channels > shape[1]:
            raise ValueError(
                f"CFG guided_channels must be at most the {shape[1]} channels of shape {shape}, "
                f"got {self.guided_channels}"
            )

    def guided_output(self, model_output: Tensor, batch: int, channels: int) -> Tensor:
        """With ``guided_channels = k``, the official DiT's CFG: the unguided channels take the
        conditional prediction, u = c there, so u + w·(c − u) = c exactly (on a copy: the
        model's output may be a tensor it keeps). A call of the conditional rows alone (delta
        reuse) has no u rows to set: its u estimate c − Δ inherits u = c there from Δ."""
        if self.guided_channels is None or model_output.shape[0] <= batch:
            return model_output
        model_output = model_output.clone()
        model_output[batch:, self.guided_channels : channels] = model_output[:batch, self.guided_channels : channels]
        return model_output

    def scale_at(self, edm_sigma: float, progress: float) -> float:
        """The guidance weight at noise level σ̃, ``progress`` being the normalised diffusion
        time τ = t/(T − 1) (on a flow path σ = t/T; 1 at pure noise). Wang et al. 2024's schedules act on w − 1 and
        average to the constant one over τ: "linear" 1 + (w − 1)·2(1 − τ), "cosine"
        1 + (w − 1)·(cos πτ + 1); a callable gets σ̃ and returns the weight itself.
        Each weight must be a finite number within float32's range (the kernels' scalar)."""
        if callable(self.schedule):
            returned = self.schedule(edm_sigma)
            try:
                weight = float(returned)  # numpy and 0-d torch scalars too
            except (TypeError, ValueError, RuntimeError):
                weight = math.nan
            if not math.isfinite(weight) or abs(weight) > FLOAT32_MAX or isinstance(returned, bool):
                raise ValueError(
                    f"CFG schedule must return a finite number within float32's range, got "
                    f"{returned!r} at σ̃ = {edm_sigma:.4g}"
                )
            return weight
        if self.schedule == "linear":
            weight = 1.0 + (self.scale - 1.0) * 2.0 * (1.0 - progress)
        elif self.schedule == "cosine":
            weight = 1.0 + (self.scale - 1.0) * (math.cos(math.pi * progress) + 1.0)
        else:
            return self.scale
        if not (math.isfinite(weight) and abs(weight) <= FLOAT32_MAX):
            raise ValueError(
                f"CFG scale={self.scale!r} with schedule={self.schedule!r} gives the weight {weight!r} "
                f"at σ̃ = {edm_sigma:.4g}: it must stay a finite number within float32's range"
            )
        return weight

    def combine(self, scale: float | None = None) -> GuidanceCombine:
        """The combine settings of ops.guided_step for this spec (at weight ``scale``, by
        default the spec's own)."""
        scale = self.scale if scale is None else scale
        if self.apg is not None:
            return GuidanceCombine(
                scale,
                self.rescale,
                apg_eta=self.apg.eta,
                apg_norm_threshold=self.apg.norm_threshold,
                apg_momentum=self.apg.momentum,
                variant="apg",
            )
        variant = "zero_star" if self.zero_star else "tangential" if self.tangential else "cfg"
        return GuidanceCombine(scale, self.rescale, variant=variant)


@dataclass(frozen=True)
class CFGPlusPlus(CFG):
    """CFG++ (Chung et al. 2024) at λ = ``scale`` ∈ [0, 1]: x0 from the guided prediction
    u + λ·(c − u), the renoising from the unconditional prediction alone. For DDIM
    (the paper's Algorithm 1) x' = √ᾱ'·x̂0_λ + √(1 − ᾱ')·ε_∅; Euler's VP form is the same
    update; DPM-Solver++(2M) extrapolates from the unconditional x0 of the previous call
    (``step``). Built for the samplers in SAMPLERS. Of the other CFG options, interval,
    rescale and guided_channels apply; apg, zero_star and tangential are refused: each
    replaces the combine with one the paper does not define at λ ≤ 1 (APG's
    c + (λ − 1)·(Δ⊥ + η·Δ∥) is neither u at λ = 0 nor c at λ = 1), while the renoising would
    still read the untransformed u."""

    SAMPLERS = ("ddim", "euler", "dpm++2m")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.scale <= 1:
            raise ValueError(f"CFGPlusPlus scale λ must be in [0, 1], got {self.scale}")
        if self.schedule != "constant":
            raise ValueError("CFGPlusPlus takes a constant λ: a schedule would leave [0, 1]")
        if self.truncate is not None:
            raise ValueError(
                "CFGPlusPlus does not take truncate: its renoising reads the unconditional prediction at every call"
            )
        if self.zero_init_steps:
            raise ValueError(
                "CFGPlusPlus does not take zero_init_steps: its renoising reads the unconditional prediction "
                "at every call"
            )
        for name in ("apg", "zero_star", "tangential"):
            if getattr(self, name) not in (None, False):
                raise ValueError(
                    f"CFGPlusPlus does not take {name}: CFG++ interpolates u + λ·(c − u) and renoises with u, "
                    f"and {name} would replace the one but not the other"
                )

    def step(self, step: StepCoefficients) -> StepCoefficients:
        """The update as if x were α·x̂0_λ + σ·ε_∅, x0 from the guided prediction and the
        noise the unconditional prediction's: x' = (k_x0 + α·k_x)·x̂0_λ + (σ·k_x + k_eps)·ε_∅
        + the rest. For DDIM that is the paper's x' = α'·x̂0_λ + σ'·ε_∅; Euler (VP or flow)
        gives the same; DPM-Solver++(2M) gives x' = α'·(1 + φ/2r)·x̂0_λ + σ'·ε_∅
        − α'·φ/2r·x̂0_∅,prev with φ = 1 − e^{−h}, r = h₋₁/h (its history then holds the
        unconditional x0), the paper's 2M form."""
        return step._replace(
            k_x=0.0, k_eps=0.0, k_x0=step.k_x0 + step.alpha * step.k_x, k_guide_eps=step.sigma * step.k_x + step.k_eps
        )

    def default_sampler(self) -> str:
        return default_sampler(cfg_plus_plus=True, interval=self.interval is not None)

    def check_sampler(self, sampler: str, dynamic_threshold: float | None) -> None:
        if dynamic_threshold is not None:
            raise ValueError(
                "dynamic_threshold does not combine with CFGPlusPlus: CFG++ renoises with the "
                "unconditional prediction, which the thresholded x0 replaces"
            )
        if sampler not in self.SAMPLERS:
            raise ValueError(f"CFGPlusPlus is built for the samplers {self.SAMPLERS}, got sampler={sampler!r}")
        if self.unconditional_history(sampler) and self.interval is not None:
            raise ValueError(
                "CFGPlusPlus with sampler='dpm++2m' reads the previous call's unconditional x0, which "
                "calls outside a guidance interval do not compute: drop the interval or use 'ddim'"
            )

    def unconditional_history(self, sampler: str) -> bool:
        return sampler == "dpm++2m"


@dataclass(frozen=True)
class AutoGuidance(Guidance):
    """Autoguidance (Karras et al. 2024): D = D_guide + w·(D_main − D_guide), the guide a
    weaker version of the model (smaller, or trained for fewer steps), both called with the
    conditional labels. The guide's output enters the fused step as its separate guide
    tensor: no concatenation; outside ``interval`` (EDM's σ̃) only the main model runs.
    A guide that learns its variance (2C output channels) guides with its first C; a guide
    whose parameters share another dtype than the model's runs on its input cast to it
    (outside autocast). Checked when built: guide_model callable, scale a finite number within float32's
    range, interval a pair 0 <= low < high; the sampler checks the labels against the
    guide's label table (its num_classes, else label_emb's rows) before any forward."""

    guide_model: nn.Module
    scale: float
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        if not callable(self.guide_model):
            raise TypeError(f"AutoGuidance guide_model must be callable, got {type(self.guide_model).__name__}")
        _set_real(self, "scale", "AutoGuidance scale")
        _set_interval(self, "AutoGuidance")

    def guide_network(self) -> nn.Module:
        return self.guide_model

    def check_labels(self, labels: Tensor) -> None:
        """The guide gets the same labels: its label table must hold them."""
        guide_classes = label_rows(self.guide_model)
        if guide_classes is not None and labels.numel() and labels.max() >= guide_classes:
            raise ValueError(
                f"labels must lie in [0, {guide_classes}) for AutoGuidance's guide_model (its "
                f"label table), got {labels.max().item()}"
            )

    def scale_at(self, edm_sigma: float, progress: float) -> float:
        return self.scale

    def combine(self, scale: float | None = None) -> GuidanceCombine:
        return GuidanceCombine(self.scale if scale is None else scale)


@dataclass(frozen=True)
class PerturbedGuidance(Guidance):
    """Guidance by a perturbed branch (PAG, skip-layer guidance), with or without CFG. The
    model's one forward runs [c; u; p] (cfg_scale > 1) or [c; p], p the conditional input
    through the model perturbed at ``layers`` on those rows only (``perturb``), and
    m = u + w·(c − u) + s·(c − p), or m = c + s·(c − p) = p + (1 + s)·(c − p) without CFG
    (the fused step's CFG combine with p as the guide), as diffusers' PAG pipelines compute
    it (diffusers' PAG and skip-layer guiders at guidance_scale 1 return p + s·(c − p):
    their s is this s + 1). ``interval``: the σ̃ window (EDM's)
    where the perturbed branch runs (always, without one); outside it the forward runs
    [c; u] for CFG, or c alone. ``rescale``: CFG rescale of m against std(c), also without
    CFG (the pipelines rescale only with it: their recipes pass it so). Checked when
    built: scale, cfg_scale and rescale finite numbers within float32's range, scale
    non-zero, cfg_scale >= 1 (1 turns CFG off, as diffusers' pipelines do at guidance_scale
    <= 1), rescale in [0, 1], interval a pair 0 <= low < high."""

    scale: float
    layers: str | int | Sequence[str] | Sequence[int]  # each subclass's (PAG: names, skip-layer: indices)
    cfg_scale: float = 1.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        name = type(self).__name__
        for field_name in ("scale", "cfg_scale", "rescale"):
            _set_real(self, field_name, f"{name} {field_name}")
        if self.scale == 0:
            raise ValueError(f"{name} scale must be non-zero (0 turns the perturbed branch off: use CFG)")
        if self.cfg_scale < 1:
            raise ValueError(f"{name} cfg_scale must be >= 1 (1: no CFG branch), got {self.cfg_scale}")
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"{name} rescale must be in [0, 1], got {self.rescale}")
        _set_interval(self, name)
        # Checked now rather than at the first forward; a sequence becomes a tuple, as
        # settings are compared and hashed by value.
        object.__setattr__(self, "layers", self._checked_layers())

    @abc.abstractmethod
    def _checked_layers(self) -> str | int | tuple[str, ...] | tuple[int, ...]:
        """``layers`` checked: one layer as given, a sequence as a tuple (TypeError else)."""

    @property
    def cfg(self) -> bool:
        return self.cfg_scale > 1

    # (the type: ignore: Guidance's class attribute, computed here from cfg_scale; nothing assigns it)
    @property
    def branches(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cond", "uncond", "perturbed") if self.cfg else ("cond", "perturbed")

    def perturbing_at(self, edm_sigma: float) -> bool:
        return self.interval is None or self.interval[0] < edm_sigma <= self.interval[1]

    def active_at(self, edm_sigma: float) -> bool:
        return self.cfg or self.perturbing_at(edm_sigma)

    def branches_at(self, edm_sigma: float) -> tuple[str, ...]:
        return self.branches if self.perturbing_at(edm_sigma) else ("cond", "uncond")

    def combine_at(self, edm_sigma: float, progress: float) -> GuidanceCombine:
        if not self.perturbing_at(edm_sigma):
            return GuidanceCombine(self.cfg_scale, self.rescale)
        return self.combine()

    def combine(self, scale: float | None = None) -> GuidanceCombine:
        """The combine at CFG weight ``scale`` (None: cfg_scale); without CFG there is no
        CFG weight to set, and a scale is refused rather than ignored."""
        if self.cfg:
            return GuidanceCombine(self.cfg_scale if scale is None else scale, self.rescale, perturbed_scale=self.scale)
        if scale is not None:
            raise ValueError(
                f"{type(self).__name__} without CFG (cfg_scale 1) has no CFG weight: combine() takes no scale, "
                f"got {scale}"
            )
        return GuidanceCombine(1.0 + self.scale, self.rescale)


@dataclass(frozen=True)
class PAG(PerturbedGuidance):
    """Perturbed-attention guidance (Ahn et al. 2024): p with self-attention made the
    identity (each token attends only to itself: the output is to_out(to_v(x))) at the
    self-attention modules whose names ``layers`` (a regular expression or a sequence of
    them, as diffusers' ``pag_applied_layers``: "mid", "blocks.1", "down_blocks.1") picks.
    ``scale`` is diffusers' pag_scale, ``cfg_scale`` its guidance_scale."""

    layers: str | Sequence[str]

    def _checked_layers(self) -> str | tuple[str, ...]:
        patterns = attention_patterns(self.layers)
        return self.layers if isinstance(self.layers, str) else patterns

    def perturb(self, model: Callable[..., Tensor]) -> Perturbation:
        return perturb_attention(perturbation_target(model), self.layers)


@dataclass(frozen=True)
class SkipLayerGuidance(PerturbedGuidance):
    """Skip-layer guidance (Stable Diffusion 3.5): p with the transformer blocks ``layers``
    (indices, as SD3's ``skip_guidance_layers``) passing their input through. ``scale``
    is diffusers' skip_layer_guidance_scale; its start/stop fractions of the steps become
    ``interval`` in σ̃ (the pipeline recipe converts them)."""

    layers: int | Sequence[int]

    def _checked_layers(self) -> int | tuple[int, ...]:
        indices = block_indices(self.layers)
        return indices[0] if isinstance(self.layers, Integral) else indices

    def perturb(self, model: Callable[..., Tensor]) -> Perturbation:
        return skip_blocks(perturbation_target(model), self.layers)


@dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance (ADM): the gradient of log p(y | x_t) of a noisy classifier at
    ``scale``. Checked when built: classifier callable, scale a finite number within
    float32's range; the labels against its logits when it runs."""

    classifier: nn.Module
    scale: float

    def __post_init__(self):
        if not callable(self.classifier):
            raise TypeError(f"ClassifierGuidance classifier must be callable, got {type(self.classifier).__name__}")
        _set_real(self, "scale", "ClassifierGuidance scale")

    def gradient(self, x: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
        """∇ₓ log softmax(classifier(x_t, t))[y], unscaled (the sampler applies the scale)."""
        with torch.enable_grad():
            # in the classifier's own dtype where its weights share one (an fp32 classifier
            # guiding an fp16 model), the gradient back in x's
            x_in = x.detach().to(parameter_dtype(self.classifier) or x.dtype).requires_grad_(True)
            logits = self.classifier(x_in, timesteps)
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != len(labels):
                raise ValueError(
                    f"the classifier must return logits (batch {len(labels)}, classes), got "
                    f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
                )
            if labels.max() >= logits.shape[1]:
                raise ValueError(
                    f"labels must lie in [0, {logits.shape[1]}) for the classifier's "
                    f"{logits.shape[1]} classes, got {labels.max().item()}"
                )
            log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            selected = log_probs[torch.arange(len(labels), device=labels.device), labels]
            gradient = None
            if selected.requires_grad:
                (gradient,) = torch.autograd.grad(selected.sum(), x_in, allow_unused=True)
            if gradient is None:
                raise ValueError("the classifier's output does not depend on x: there is no gradient to guide with")
            return gradient.to(x.dtype)


def parameter_dtype(model: object) -> torch.dtype | None:
    """The dtype all of a module's floating parameters share (None when they do not share
    one, e.g. ADM's use_fp16, or for a plain function)."""
    if isinstance(model, nn.Module):
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if len(dtypes) == 1:
            return dtypes.pop()
    return None


def split_guidance(guidance: object) -> tuple[Guidance | None, ClassifierGuidance | None]:
    """(combining guidance, classifier) from None, one of them, or a tuple/list of a
    Guidance (CFG, CFGPlusPlus, AutoGuidance, ...) and a ClassifierGuidance."""
    items = [] if guidance is None else list(guidance) if isinstance(guidance, (tuple, list)) else [guidance]
    cfg = [g for g in items if isinstance(g, Guidance)]
    classifier = [g for g in items if isinstance(g, ClassifierGuidance)]
    if len(cfg) > 1 or len(classifier) > 1 or len(cfg) + len(classifier) != len(items):
        raise TypeError(
            "guidance must be None, a CFG, CFGPlusPlus or AutoGuidance, a ClassifierGuidance, or a tuple of "
            "one of each; "
            f"got {guidance!r}"
        )
    return (cfg[0] if cfg else None), (classifier[0] if classifier else None)


def label_rows(model: object) -> int | None:
    """How many labels a network takes, where it says: its ``num_classes``, else the rows of
    its label table (``label_emb``, an ADM UNet's nn.Embedding); None when it says neither."""
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and not isinstance(classes, bool):
        return classes
    return getattr(getattr(model, "label_emb", None), "num_embeddings", None)


def _is_real(value: object) -> bool:
    """A finite real number: a Python int or float, or another Real (NumPy's scalars), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _set_real(settings: object, field: str, name: str) -> None:
    """Check that the field is a finite number within float32's range (it reaches the
    kernels as a float32 scalar) and hold it as a Python float (a NumPy scalar too)."""
    value = getattr(settings, field)
    if not _is_real(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    number = float(value)
    if abs(number) > FLOAT32_MAX:
        raise ValueError(f"{name} must lie within float32's range (|value| <= {FLOAT32_MAX:.4g}), got {value!r}")
    object.__setattr__(settings, field, number)  # (the settings are frozen dataclasses)


def _set_interval(settings: object, spec: str) -> None:
    """Check ``settings.interval`` (None, or a pair 0 <= low < high, high may be +inf: the
    guided σ̃ are those in (low, high]) and hold it as a tuple of floats: a list given would
    stay the caller's to change, unchecked, and unhashable."""
    interval = getattr(settings, "interval")
    if interval is None:
        return
    pair = tuple(interval) if isinstance(interval, (tuple, list)) else None
    if (
        pair is None
        or len(pair) != 2
        or not _is_real(pair[0])
        or not (_is_real(pair[1]) or pair[1] == math.inf)
        or not 0 <= pair[0] < pair[1]
    ):
        raise ValueError(
            f"{spec} interval must be a pair (sigma_low, sigma_high) of numbers with 0 <= low < high "
            f"(low finite, high finite or inf), got {interval!r}"
        )
    object.__setattr__(settings, "interval", (float(pair[0]), float(pair[1])))

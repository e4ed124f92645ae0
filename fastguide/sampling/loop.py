"""The guided sampling loop: one model forward and one ``ops.guided_step`` per model call.

Three concerns, three places: the plan (solvers.py: per-call scalars, turned here into
each call's ``StepCoefficients`` once per sampler), the loop (``GuidedSampler``: buffers,
the model call, the fused step), and CUDA-graph capture (cuda_graphs.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from .. import ops
from ..models.adapters import SiTVelocity
from ..models.block_cache import (
    BlockCacheSettings,
    BlockCacheState,
    FirstBlockCache,
    ForecastCache,
    check_cacheable,
)
from ..models.blocks import perturbation_target
from ..models.perturbation import Perturbation
from ..models.unet import UNet
from ..ops import backends
from ..ops.contract import GuidanceCombine, StepCoefficients, StepTensors
from ..ops.validation import FLOAT_DTYPES
from . import cuda_graphs
from .conditioning import Conditioning, RowConditioning, check_pair
from .guidance import BRANCHES, ClassifierGuidance, Guidance, default_sampler, parameter_dtype, split_guidance
from .schedule import FlowSchedule, NoiseSchedule
from .solvers import FLOAT32_NOISE_SAMPLERS, TWO_CALL_SAMPLERS, VARIANCE_TYPES, StepPlan, check_sampler, plan_steps

Model = Callable[..., Tensor]
# What ``guidance=`` takes: None, a Guidance, a ClassifierGuidance, or a tuple or list of one
# Guidance and one ClassifierGuidance (guidance.split_guidance checks the combination).
GuidanceSpec = (
    Guidance
    | ClassifierGuidance
    | tuple[Guidance | ClassifierGuidance, ...]
    | list[Guidance | ClassifierGuidance]
    | None
)
# callback({"i", "t", "x", "denoised"}) after each model call, k-diffusion-like but not its
# convention: i the call's index (Heun's two calls a step are two), t its original
# timestep (not k-diffusion's sigma), x the new x (after the update, where k-diffusion's
# is before it), denoised the call's x0.
Callback = Callable[[dict], None]


@dataclass(frozen=True)
class _Call:
    """Everything one model call of a run needs besides tensors."""

    t: float
    step: StepCoefficients
    # The guidance at this call (its weight may be scheduled); None outside the guidance
    # interval, where batched CFG's forward runs on B rows instead of 2B.
    combine: GuidanceCombine | None
    # Imagen's dynamic thresholding: the first pass, computing the guided x0 only.
    x0_only: StepCoefficients | None = None
    # The B-row blocks the forward runs (a prefix of the guidance's branches; 0 at a call of
    # CFG-Zero*'s zero-init, whose prediction is zero and which runs no forward) and which of
    # them is the perturbed one (PAG, skip-layer guidance), if any.
    blocks: int = 1
    perturbed_block: int | None = None
    # Delta reuse (DeltaReuse): the ring slot that keeps this call's Δ = c − u for later
    # calls, and at a call that skips the unconditional rows, u = c − Σ weight·Δ[slot].
    delta_out: int | None = None
    delta_in: tuple[tuple[int, float], ...] = ()
    # Where the call stands along the run: the number of distinct model times before its own,
    # so a step index that two calls at one t (heun's) share; what the caches' and delta
    # reuse's order-1 estimates are linear in.
    position: int = 0
    # The step's last history slot is the previous call's x (x_previous), after its x0 slots.
    reads_x_previous: bool = False


@dataclass
class _Buffers:
    """The tensors one sampling run works in; a captured CUDA graph reads and writes only these."""

    model_input: Tensor  # (rows, C, ...): x_t in each B-row block of the guidance's branches
    conditioning: RowConditioning  # each row's labels and keyword arguments
    x0: list[Tensor]  # a ring of the calls' x0: the solver history (and the callback's denoised)
    x_previous: Tensor | None  # a call's x kept for the next call, which reads it (heun's second)
    x0_unconditional: list[Tensor]  # CFG++ on dpm++2m: the last two calls' unconditional x0
    apg: Tensor | None  # APG's momentum state
    noise: Tensor  # the noise of a graph replay's step, drawn before the replay or inside it
    # Each call's model times (rows,): views of one table made with the buffers, so a call
    # launches no fill (a flow model, or a grid with fractional times, takes float32 times,
    # diffusers' convention; integer timesteps int64: schedule.model_time_dtype).
    times: list[Tensor]
    deltas: list[Tensor]  # DeltaReuse: the last two computed Δ = c − u (B, C, ...)
    uncond_estimate: Tensor | None  # DeltaReuse: u = c − Δ̂ at a call that skips the unconditional rows
    zero_prediction: Tensor | None  # CFG-Zero*'s zero-init: the prediction of its calls (B, C, ...), zeros
    similarity: Tensor | None  # truncated CFG: each sample's cos(x̂0_c, x̂0_u) at the last guided call (B,)
    # rows -> the model's (labels, keyword arguments) for the first rows: views, made once per run
    arguments: dict[int, tuple[Tensor | None, dict]] = dataclasses.field(default_factory=dict)
    # Decided during the run: the first call after truncation (truncated CFG), the block
    # cache's state, each call's rows; with ``calibrated`` (a captured run) the decisions of
    # the warm-up run are kept and no call reads a tensor on the host.
    truncated_from: int | None = None
    block_cache: BlockCacheState | None = None
    rows: dict[int, int] = dataclasses.field(default_factory=dict)
    guide_rows: dict[int, int] = dataclasses.field(default_factory=dict)  # the guide network's (autoguidance)
    calibrated: bool = False
    # A captured run that draws its noise inside its graphs draws it from this generator, on
    # the sample's device, loaded with the caller's generator's state before each replay.
    noise_generator: torch.Generator | None = None

    def model_arguments(self, rows: int) -> tuple[Tensor | None, dict]:
        if rows not in self.arguments:
            self.arguments[rows] = self.conditioning.arguments(rows)
        return self.arguments[rows]


class GuidedSampler:
    """A guided sampling loop that holds its plan and buffers across calls.

    One model forward per call of the plan: with guidance, on one batch of a B-row block
    per branch of the guidance (``Guidance.branches``: [cond; uncond] for CFG), each
    block's conditioning laid out once per run (``RowConditioning``: the labels, the null
    label in the unconditional block, the ``cond``/``uncond`` keyword arguments);
    ops.guided_step writes x_next into every block of that input, so no torch.cat ever
    runs. The guidance is asked, never inspected: which branches and networks a call
    runs, its combine, its change to the step. Multistep solvers keep each call's x0 in a
    ring of buffers, read back as the next calls' history.

    With ``cuda_graph=True`` (CUDA only) the first call for a batch shape runs the loop
    once eagerly on a side stream (warm-up: lazy initialisation, autotuning), then
    captures the model calls with their guided_steps as CUDA graphs sharing one memory
    pool: one graph for the whole loop of a deterministic sampler, else one per stretch
    of calls between two that draw noise (see ``_segments``); with a callback, one per
    call, so that the callback sees every call. Every call then only copies x_T and the
    labels in, draws the noise and replays the graphs. The same generator gives the same
    samples with or without graphs. The captures of the ``MAX_CAPTURES`` most recently used
    shapes are kept (each holds its buffers and its graphs' memory); an older one is
    released and captured again when next asked for; weights given new storage (e.g.
    ``model.half().float()``) drop every capture, as does ``clear_cuda_graphs()``, which
    a change that leaves the weights in place but changes the forward (fused LoRA,
    another attention processor, hooks) needs. Classifier guidance (autograd through
    the classifier) and networks with a hook that acts at each forward (offloading, a
    diffusers cache: ``per_forward_hook``) are not captured.
    See ``fastguide.sample`` for the arguments.
    """

    MAX_CAPTURES = 4
    # Its settings, fixed when it is built: its plan of calls is made from them then, so a
    # later assignment would be ignored; it is refused instead (build another GuidedSampler:
    # equal settings share their plans, so that costs little).
    SETTINGS = frozenset(
        {
            "model", "schedule", "guidance", "classifier", "sampler", "timesteps", "eta", "variance_type",
            "solver_order", "final_timestep", "clip_denoised", "prediction_type", "dynamic_threshold", "combine",
            "branches", "null_label", "num_classes", "unconditional_history", "cuda_graph", "cache",
            "steps", "spacing", "rho",  # arguments only (the plan holds them), refused as the rest
        }
    )  # fmt: skip

    def __setattr__(self, name: str, value: object) -> None:
        if name in self.SETTINGS and getattr(self, "_built", False):
            raise AttributeError(
                f"GuidedSampler.{name} is fixed when the sampler is built (its plan is made from it): "
                f"build a new GuidedSampler with {name}=..."
            )
        super().__setattr__(name, value)

    def __init__(
        self,
        model: Model,
        *,
        sampler: str | None = None,
        steps: int | str | Sequence[float] = 25,
        spacing: str | None = None,
        rho: float | None = None,
        schedule: NoiseSchedule | None = None,
        guidance: GuidanceSpec = None,
        eta: float = 0.0,
        solver_order: int | None = None,
        final_timestep: int = -1,
        clip_denoised: bool | None = None,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        null_label: int | None = None,
        num_classes: int | None = None,
        dynamic_threshold: float | None = None,
        cache: BlockCacheSettings | None = None,
        cuda_graph: bool = False,
    ):
        if cache is not None and not isinstance(cache, (FirstBlockCache, ForecastCache)):
            raise TypeError(
                f"cache must be a fastguide.FirstBlockCache, a fastguide.ForecastCache or None, got "
                f"{type(cache).__name__}"
            )
        self.cache = cache
        if variance_type is not None and variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES} or None, got {variance_type!r}")
        if dynamic_threshold is not None and not (_is_real(dynamic_threshold) and 0 < dynamic_threshold < 1):
            raise ValueError(f"dynamic_threshold must be a percentile in (0, 1) or None, got {dynamic_threshold!r}")
        if dynamic_threshold is not None and clip_denoised:
            raise ValueError(
                "clip_denoised=True and dynamic_threshold both clip x0 (the threshold replaces the static "
                "clip to [-1, 1]): pass one of them"
            )
        if not _is_real(eta) or eta < 0:
            raise ValueError(f"eta must be a finite non-negative number, got {eta!r}")
        eta = float(eta)  # (a NumPy scalar too)
        if isinstance(clip_denoised, np.bool_):
            clip_denoised = bool(clip_denoised)  # (a NumPy bool names its type "bool" too)
        if clip_denoised is not None and not isinstance(clip_denoised, bool):
            raise TypeError(f"clip_denoised must be a bool or None, got {clip_denoised!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fastguide.NoiseSchedule or None, got {type(schedule).__name__}")
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t[, y]), got {type(model).__name__}")
        self.model = model
        if cache is not None:  # (refused here, not at the first run, which has drawn x_T by then)
            check_cacheable(perturbation_target(model), type(cache).__name__)
        self.schedule = schedule or _default_schedule()
        if isinstance(model, SiTVelocity) and model.num_timesteps != self.schedule.num_timesteps:
            raise ValueError(
                f"SiTVelocity(num_timesteps={model.num_timesteps}) divides the time by the T of the schedule it "
                f"is sampled on, which has T = {self.schedule.num_timesteps}: build it with that T"
            )
        if isinstance(steps, Integral) and not isinstance(steps, bool):
            steps = int(steps)  # a NumPy integer counts steps as an int does
        elif isinstance(steps, np.ndarray):
            steps = steps.tolist()  # timesteps in a NumPy array, read as a tensor of them is
        _check_steps(steps)
        self.guidance: Guidance | None
        self.guidance, self.classifier = split_guidance(guidance)
        chosen = sampler is None
        if sampler is None:
            sampler = self.guidance.default_sampler() if self.guidance is not None else default_sampler()
        try:
            check_sampler(sampler, self.schedule, eta, solver_order)
        except ValueError as error:
            if chosen:  # the user never named this sampler: say where it came from
                raise ValueError(f"{error} (sampler=None chose {sampler!r} for this guidance; name one)") from None
            raise
        if variance_type is not None and sampler != "ddpm":
            raise ValueError(
                f"variance_type applies to sampler='ddpm' (the others set their own noise), got sampler={sampler!r}"
            )
        if spacing is not None and not isinstance(steps, int):
            raise ValueError(f"spacing={spacing!r} places a step count; steps={steps!r} already names the timesteps")
        counted = isinstance(steps, int) and not isinstance(steps, bool)
        grid = (spacing or self.schedule.default_spacing) if counted else None
        if rho is not None and grid != "karras":
            raise ValueError(f"rho={rho!r} shapes spacing='karras' only; this grid is {grid or steps!r}")
        if grid is not None:
            self.timesteps = list(
                _PLANS.get_or_make(
                    ("timesteps", self.schedule.cache_key, steps, grid, rho),
                    lambda: tuple(self.schedule.spaced_timesteps(cast(int, steps), grid, rho)),
                )
            )
        else:
            self.timesteps = self.schedule.timesteps(steps)
        self.schedule.check_grid(self.timesteps)
        self.sampler, self.eta, self.variance_type = sampler, eta, variance_type
        self.solver_order = _as_int(solver_order)
        self.final_timestep = final_timestep
        self._time_dtype = self.schedule.model_time_dtype(self.timesteps)
        # None: clip on VP schedules (guided-diffusion's default, for [−1, 1] pixel data), not
        # on flow paths (latent models: SD3, SiT, whose references never clip)
        if clip_denoised is None:
            clip_denoised = not isinstance(self.schedule, FlowSchedule)
        self.clip_denoised, self.prediction_type = clip_denoised, prediction_type
        self.dynamic_threshold = float(dynamic_threshold) if dynamic_threshold is not None else None
        self.combine: GuidanceCombine | None = self.guidance.combine() if self.guidance is not None else None
        # The row blocks of a guided forward ([cond; uncond] for CFG; autoguidance runs B rows
        # through each of two networks).
        self.branches: tuple[str, ...] = tuple(self.guidance.branches) if self.guidance is not None else ("cond",)
        if (
            self.branches[:1] != ("cond",)
            or len(set(self.branches)) != len(self.branches)
            or set(self.branches) - set(BRANCHES)
        ):
            # (a guidance of one's own: each name keys its rows' conditioning and block cache)
            raise ValueError(
                f"{type(self.guidance).__name__}.branches must be distinct names from {BRANCHES}, "
                f"'cond' first, got {self.branches!r}"
            )
        ops.check_combine(self.combine)
        self.null_label = _as_int(null_label) if null_label is not None else _model_null_label(model)
        self.num_classes = _as_int(num_classes) if num_classes is not None else getattr(model, "num_classes", None)
        if self.num_classes is not None and not _is_count(self.num_classes):
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        own_classes = getattr(model, "num_classes", None)
        if self.num_classes is not None and _is_count(own_classes) and self.num_classes > own_classes:
            raise ValueError(
                f"num_classes must be at most the model's num_classes ({own_classes}), got {self.num_classes}: "
                "a label past the model's classes is its null class or past its table"
            )
        if self.null_label is not None:
            _check_null_label(self.null_label, model, self.num_classes)
        self.schedule.check_prediction_type(prediction_type)
        if self.guidance is not None:
            self.guidance.check_sampler(sampler, dynamic_threshold)
            if self.guidance.zero_init_steps:
                _check_zero_init(sampler, variance_type, self.classifier)
            if self.guidance.truncate is not None and sampler in TWO_CALL_SAMPLERS:
                raise ValueError(
                    f"CFG truncate stops guiding between steps, and sampler={sampler!r} makes two model "
                    "calls per step: use a one-call sampler (unipc, dpm++2m, ddim, ...)"
                )
        # CFG++ on DPM-Solver++(2M) extrapolates from the previous call's unconditional x0.
        self.unconditional_history = self.guidance is not None and self.guidance.unconditional_history(sampler)
        if cuda_graph and self.classifier is not None:
            raise ValueError(
                "cuda_graph=True cannot capture classifier guidance (its gradient runs autograd "
                "through the classifier); use cuda_graph=False"
            )
        self.cuda_graph = cuda_graph
        self._perturbation: Perturbation | None = None  # a run's perturbed layers (see __call__)
        self._guide_network = self.guidance.guide_network() if self.guidance is not None else None
        self._guide_input_dtype: torch.dtype | None = None  # a run's (_guide_dtype_for)
        # (shape, device, dtype, conditioning signature, keep_x0, callback, noise inside,
        # autocast, backend) ->
        # (buffers, graphs) of the captured runs.
        self._graphs: collections.OrderedDict[tuple, tuple[_Buffers, list]] = collections.OrderedDict()
        self._graph_weights: tuple = ()  # where the captures' weights live (cuda_graphs.weights_fingerprint)
        self._warned_opaque = False  # that a network's weights cannot be seen (_graphed_modules)
        self._call_cache: dict[tuple[bool, bool], tuple[_Call, ...]] = {}
        self._calls(learned_variance=False)  # every call's scalars checked here, once
        # The compute of the last run (see ``last_compute``).
        self.last_compute: dict[str, int | None] = {}
        self._built = True  # SETTINGS fixed from here on

    # ----------------------------------------------------------------------------------
    # The plan: each call's scalars, computed once per sampler
    # ----------------------------------------------------------------------------------

    def _calls(self, learned_variance: bool, guided: bool = True) -> tuple[_Call, ...]:
        """Each model call's scalars, for a model with or without learned variance (the
        model's output says which; the two plans differ only in ADM's learned-range DDPM
        variances), guided or not (after truncated CFG stops guiding), each computed once."""
        key = (learned_variance, guided)
        if key in self._call_cache:
            return self._call_cache[key]
        calls = _PLANS.get_or_make(
            (*self._plan_key(learned_variance), guided), lambda: self._planned_calls(learned_variance, guided)
        )
        self._call_cache[key] = calls
        return calls

    def _plan_key(self, learned_variance: bool) -> tuple:
        """Everything a plan depends on, by value: two samplers with equal keys (e.g. one
        ``sample`` call after another) share one plan. Guidance enters by its settings,
        not its networks (a plan holds scalars only)."""
        return (
            self.sampler,
            self.schedule.cache_key,
            tuple(self.timesteps),
            self.final_timestep,
            self.eta,
            self.variance_type,
            self.solver_order,
            self.clip_denoised,
            self.prediction_type,
            self.dynamic_threshold,
            _settings(self.guidance),
            _settings(self.classifier),
            learned_variance,
        )

    def _planned_calls(self, learned_variance: bool, guided: bool) -> tuple[_Call, ...]:
        # (a variance type is ddpm's alone: the others set their own noise)
        learned = learned_variance and self.sampler == "ddpm"
        variance_type = self.variance_type or ("learned_range" if learned else "fixed_small")
        plans = plan_steps(
            self.sampler,
            self.schedule,
            self.timesteps,
            eta=self.eta,
            variance_type=variance_type,
            solver_order=self.solver_order,
            final_timestep=self.final_timestep,
        )
        zeroed = self.guidance.zero_init_steps if self.guidance is not None else 0
        if zeroed >= len(plans):
            raise ValueError(
                f"CFG zero_init_steps={zeroed} zeroes every one of the {len(plans)} model calls of "
                f"sampler={self.sampler!r} on these timesteps: it must be fewer"
            )
        calls = tuple(
            dataclasses.replace(self._call(plan, learned_variance, False), blocks=0)  # no forward
            if k < zeroed
            else self._call(plan, learned_variance, guided)
            for k, plan in enumerate(plans)
        )
        positions: dict[float, int] = {}
        calls = tuple(
            dataclasses.replace(call, position=positions.setdefault(call.t, len(positions))) for call in calls
        )
        interval = None if self.guidance is None else self.guidance.interval
        if guided and interval is not None:
            # σ̃ in (low, high], as every guidance's interval reads it (a PAG or skip-layer
            # guidance with CFG guides every call, its perturbation only within the interval)
            levels = [self.schedule.edm_sigma(call.t) for call in calls]
            if not any(interval[0] < level <= interval[1] for level in levels[zeroed:]):
                warnings.warn(
                    f"the guidance interval {interval} (EDM's σ̃, low < σ̃ ≤ high) holds none of the {len(calls)} "
                    f"model calls of sampler={self.sampler!r} here (their σ̃ run from {min(levels):.4g} to "
                    f"{max(levels):.4g}): what it bounds applies at no call",
                    UserWarning,
                    stacklevel=2,
                )
        if guided and self.guidance is not None and self.guidance.reuse is not None:
            calls = self._reusing_deltas(calls)
        for call in calls:
            try:
                ops.check_step(call.step)
            except ValueError as error:  # say which call of which plan cannot be computed
                hint = (
                    " (a flow path's noise end has no x0 for an eps prediction: a velocity model takes "
                    "prediction_type='flow_prediction')"
                    if isinstance(self.schedule, FlowSchedule) and self.prediction_type == "epsilon"
                    else ""
                )
                raise ValueError(
                    f"{error}, at the model call at t = {call.t!r} of sampler={self.sampler!r} on "
                    f"{self.schedule!r}{hint}"
                ) from None
        return calls

    def _call(self, plan: StepPlan, learned_variance: bool, guided: bool) -> _Call:
        scale = self.classifier.scale if self.classifier is not None else 0.0
        step = plan.coefficients(
            self.schedule,
            prediction_type=self.prediction_type,
            clip_denoised=self.clip_denoised,
            learned_variance=learned_variance,
            classifier_scale=scale,
        )
        edm_sigma = self.schedule.edm_sigma(plan.t)
        combine, blocks, perturbed, reads_x = None, 1, None, plan.k_x_previous != 0
        if guided and self.guidance is not None and self.guidance.active_at(edm_sigma):
            step = self.guidance.step(step)
            # τ = 1 at pure noise: t = T − 1 on a VP schedule, t = T (σ = 1) on a flow path
            last_time = self.schedule.num_timesteps if self.schedule.is_flow else self.schedule.num_timesteps - 1
            progress = min(1.0, plan.t / max(1, last_time))
            combine = self.guidance.combine_at(edm_sigma, progress)
            ops.check_combine(combine)
            branches = self.guidance.branches_at(edm_sigma)
            if branches != self.branches[: len(branches)]:
                raise ValueError(
                    f"{type(self.guidance).__name__}.branches_at must give a prefix of its branches "
                    f"{self.branches}, got {branches} at σ̃ = {edm_sigma:.4g}"
                )
            blocks = len(branches)
            perturbed = branches.index("perturbed") if "perturbed" in branches else None
        if self.dynamic_threshold is None:
            return _Call(plan.t, step, combine, blocks=blocks, perturbed_block=perturbed, reads_x_previous=reads_x)
        # The thresholded x0 replaces the prediction: the step then reads it as "sample".
        x0_only = StepCoefficients(step.alpha, step.sigma, k_x0=1.0, prediction_type=self.prediction_type)
        return _Call(
            plan.t,
            step._replace(prediction_type="sample", clip_denoised=False),
            combine,
            x0_only,
            blocks,
            perturbed,
            reads_x_previous=reads_x,
        )

    def _reusing_deltas(self, calls: Sequence[_Call]) -> tuple[_Call, ...]:
        """The guided calls' roles under DeltaReuse: those that run the unconditional rows
        keep Δ = c − u in a ring of two slots (when a later call reads it); the others run
        the conditional rows alone, u = c − Δ̂ from the kept deltas."""
        assert self.guidance is not None and self.guidance.reuse is not None  # (the caller's condition)
        reuse = self.guidance.reuse
        computed: list[int] = []  # guided indices of the calls that ran the unconditional rows
        positions: list[int] = []  # each guided call's position, by guided index
        roles: list[tuple[int, tuple[tuple[int, float], ...] | None]] = []  # (call, estimate)
        guided_index = 0
        for i, call in enumerate(calls):
            if call.combine is None or call.blocks < 2:
                continue
            positions.append(call.position)
            estimate = reuse.estimate(guided_index, computed, positions)
            if estimate is None:
                computed.append(guided_index)
                roles.append((i, None))
            else:  # "k-th last computed" -> its ring slot
                roles.append((i, tuple(((len(computed) - 1 - back) % 2, weight) for back, weight in estimate)))
            guided_index += 1
        calls = list(calls)
        slots_read = {i: estimate for i, estimate in roles if estimate is not None}
        computed_calls = [i for i, estimate in roles if estimate is None]
        for n, i in enumerate(computed_calls):
            read_later = any(j > i for j in slots_read)
            calls[i] = dataclasses.replace(calls[i], delta_out=n % 2 if read_later else None)
        for i, estimate in slots_read.items():
            calls[i] = dataclasses.replace(calls[i], blocks=1, perturbed_block=None, delta_in=estimate)
        return tuple(calls)

    @property
    def num_calls(self) -> int:
        return len(self._calls(False))

    @property
    def noise_draws(self) -> int:
        """The N(0, I) tensors of the sample's shape a run draws from its generator: one for
        each call whose step adds noise (a last step onto clean data adds none)."""
        return sum(1 for call in self._calls(False) if call.step.k_noise)

    @functools.cached_property
    def history_length(self) -> int:
        """The most earlier x0s any call reads."""
        return max(len(call.step.k_history) - call.reads_x_previous for call in self._calls(False))

    @functools.cached_property
    def _keeps_x(self) -> frozenset[int]:
        """The calls whose x the next call reads (``x_previous``)."""
        calls = self._calls(False)
        kept = frozenset(i for i in range(len(calls) - 1) if calls[i + 1].reads_x_previous)
        # one buffer: a call that kept its x for the next one would overwrite what it reads
        assert not any(calls[i].reads_x_previous for i in kept)
        return kept

    # ----------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------

    def _conditioning(
        self,
        labels: Tensor | None,
        cond: Conditioning | None,
        uncond: Conditioning | None,
        batch: int,
        device: torch.device,
    ) -> RowConditioning:
        """The run's conditioning checked (before any forward) and laid out once: a block per
        branch of the guidance, the conditional labels and ``cond`` in "cond" and "perturbed"
        blocks, the null label and ``uncond`` in "uncond" blocks."""
        uses_uncond = "uncond" in self.branches
        if uncond is not None and not uses_uncond:
            raise ValueError(
                "uncond= is the unconditional branch's conditioning, and this guidance has none "
                f"({type(self.guidance).__name__ if self.guidance is not None else 'no guidance'}): "
                "guidance=CFG(scale) guides with it"
            )
        cond_leaves, uncond_leaves = check_pair(cond, uncond, batch, uses_uncond)
        labels = self._check_labels(labels, batch, device)
        if labels is None and self.classifier is not None:
            raise ValueError("classifier guidance needs labels (one class index per sample)")
        if labels is not None and not _takes_labels(self.model) and self.classifier is None:
            raise ValueError(
                "labels: the model is unconditional (num_classes None) and no classifier guidance reads them"
            )
        if uses_uncond and labels is None and not cond_leaves:
            raise ValueError(
                "guidance needs labels (one class index per sample) or cond=/uncond= (the model's "
                "keyword arguments) to tell its conditional branch from its unconditional one"
            )
        if uses_uncond and labels is not None and not cond_leaves and not _takes_labels(self.model):
            raise ValueError(
                "guidance with an unconditional branch (CFG) needs a model that takes labels: this one is "
                "unconditional (num_classes None), so both branches would be the same forward; classifier "
                "guidance alone guides it"
            )
        if uses_uncond and labels is not None and self.null_label is None:
            raise ValueError("CFG needs a null label: use a model built with null_class=True, or pass null_label=")
        null_labels = None if labels is None else torch.full_like(labels, self.null_label or 0)
        blocks = [
            (null_labels, uncond_leaves if uncond_leaves is not None else cond_leaves)
            if branch == "uncond"
            else (labels, cond_leaves)
            for branch in self.branches
        ]
        return RowConditioning.lay_out(blocks, batch, device)

    def _check_labels(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if labels is None:
            return None
        try:
            labels = torch.as_tensor(labels, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"labels must be integer class indices, got {labels!r}") from None
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if labels.is_inference():  # made under torch.inference_mode(): autograd (classifier guidance) refuses it
            labels = labels.clone()
        if labels.dim() > 1:
            raise ValueError(f"labels must have shape ({batch},): one class per sample, got {tuple(labels.shape)}")
        labels = labels.long().flatten()
        if labels.numel() != batch:
            raise ValueError(f"labels must hold one class per sample ({batch}), got {labels.numel()}")
        if labels.numel() and labels.min() < 0:
            raise ValueError(f"labels must be non-negative class indices, got {labels.min().item()}")
        if self.num_classes is not None and (labels.min() < 0 or labels.max() >= self.num_classes):
            low, high = labels.min().item(), labels.max().item()
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {low}..{high}")
        # A label table the model shows (an ADM UNet's label_emb) bounds them too, also
        # without num_classes: an index past it would fail inside the embedding (on CUDA, a
        # device-side assert).
        rows = getattr(getattr(self.model, "label_emb", None), "num_embeddings", None)
        if isinstance(rows, int) and labels.numel() and labels.max() >= rows:
            raise ValueError(f"labels must index the model's label table of {rows} rows, got {labels.max().item()}")
        if self.guidance is not None:
            self.guidance.check_labels(labels)
        return labels

    @torch.no_grad()
    def __call__(
        self,
        shape: Sequence[int],
        *,
        labels: Tensor | None = None,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        callback: Callback | None = None,
    ) -> Tensor:
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"shape must be a sequence (batch, channels, ...), got {shape!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        shape = tuple(_as_int(n) for n in shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be (batch, channels, ...), got {shape}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {progress!r}")
        if not all(_is_count(n) for n in shape):
            raise ValueError(f"shape must hold positive ints (batch, channels, ...), got {shape}")
        if device is not None:
            device = _parse_device(device)
        else:
            device = noise.device if isinstance(noise, Tensor) else _model_device(self.model)
        if device.type == "meta":
            raise ValueError("device must hold data (cpu, cuda, ...): sampling on 'meta' tensors computes nothing")
        if noise is not None:
            if not isinstance(noise, Tensor):
                raise TypeError(f"noise must be a torch.Tensor (x_T), got {type(noise).__name__}")
            if not noise.is_floating_point():
                raise TypeError(f"noise must be a floating tensor (x_T), got dtype {noise.dtype}")
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        if self.cuda_graph and device.type not in cuda_graphs.GRAPH_DEVICE_TYPES:
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
        self._check_networks_on(device)
        self._warn_if_training()
        if self.classifier is not None and torch.is_inference_mode_enabled():
            raise RuntimeError(
                "guidance=ClassifierGuidance differentiates the classifier, which torch.inference_mode() forbids: "
                "sample under torch.no_grad() instead, or in neither mode (sample() turns grad off itself)"
            )
        conditioning = self._conditioning(labels, cond, uncond, shape[0], device)
        if self.guidance is not None:
            self.guidance.check_shape(shape)
        # The loop works in the model's dtype when all its floating parameters share one,
        # else in the noise's, else in float32; the noise is cast to it.
        dtype = parameter_dtype(self.model) or (noise.dtype if noise is not None else torch.float32)
        if noise is not None:
            noise = noise.to(dtype)
        self._guide_input_dtype = self._guide_dtype_for(dtype, device)
        x_T = noise if noise is not None else _randn(shape, generator, device, dtype)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.num_calls, desc=f"{self.sampler} sampling")
        # x0 is written only when read: as history, or as the callback's denoised.
        keep_x0 = self.history_length > 0 or callback is not None
        try:
            # PAG's and skip-layer guidance's perturbed layers, installed for this run only.
            # (a module keeps its wrapper across handles: a compiled model compiles once)
            self._perturbation = self.guidance.perturb(self.model) if self.guidance is not None else None
            if self.cuda_graph:
                return self._replay(shape, device, x_T, conditioning, generator, bar, callback, keep_x0)
            return self._run(shape, device, x_T, conditioning, generator, bar, callback, keep_x0)
        finally:
            if self._perturbation is not None:
                self._perturbation.remove()
                self._perturbation = None
            if bar is not None:
                bar.close()

    def _networks(self) -> tuple[tuple[str, object], ...]:
        """(argument name, network) of every network a run calls (None where absent)."""
        classifier = self.classifier.classifier if self.classifier is not None else None
        return (("model", self.model), ("guide_model", self._guide_network), ("classifier", classifier))

    def _check_networks_on(self, device: torch.device) -> None:
        """Refuses, before any work, a network whose weights sit on another device than the
        samples (a torch error from inside its first layer otherwise). Networks whose weights
        an offloading hook moves at each forward (accelerate's, diffusers') are not checked."""
        for who, network in self._networks():
            where = _weights_device(network)
            if where is not None and not _same_device(where, device) and not _offloaded(network):
                raise ValueError(
                    f"{who}'s weights are on {where} but the samples are on {device} (the device of noise=, "
                    f"else device=): move the {who} there, or pass noise or device= on {where}"
                )

    def _guide_dtype_for(self, dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
        """The dtype the guide_model's input and floating keyword conditioning are cast to:
        its parameters' one dtype where it differs from the loop's state's (``dtype``) and
        autocast is off (a bf16 guide beside a float32 model; its first layer would fail on
        the state); None to call it on the state itself. Its output enters the step as it
        is (the step reads mixed dtypes)."""
        guide_dtype = parameter_dtype(self._guide_network)
        if guide_dtype is None or guide_dtype == dtype or cuda_graphs.autocast_state(device)[0]:
            return None
        return guide_dtype

    def _warn_if_training(self) -> None:
        """Warns about a network left in training mode where that randomises its output
        (dropout, label dropout): the samples would change from run to run, whatever the
        generator. (A module is in training mode when built; from_pretrained and fastguide's
        CLI put theirs in eval mode.)"""
        for who, network in self._networks():
            random_layers = _random_in_training(network)
            if random_layers:
                warnings.warn(
                    f"{who} is in training mode, where its output is random ({random_layers}): the same "
                    f"generator gives other samples each run; call {who}.eval() before sampling",
                    UserWarning,
                    stacklevel=4,
                )

    def _drawn_in(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a loop in ``dtype`` draws its noise in (see FLOAT32_NOISE_SAMPLERS)."""
        return torch.float32 if self.sampler in FLOAT32_NOISE_SAMPLERS else dtype

    def _run(self, shape, device, x_T, conditioning, generator, bar, callback, keep_x0) -> Tensor:
        """The loop, eagerly."""
        x_T = x_T.to(device)
        buffers = self._new_buffers(x_T, conditioning)
        self._load(buffers, x_T, conditioning)
        drawn_in = self._drawn_in(x_T.dtype)
        fresh_noise = lambda: _randn(shape, generator, device, x_T.dtype, drawn_in=drawn_in)  # noqa: E731
        with self._caching(buffers):
            for i in range(self.num_calls):
                self._model_call(i, buffers, shape, fresh_noise, keep_x0)
                self._report(callback, i, buffers, shape[0])
                if bar is not None:
                    bar.update()
        self._count(buffers)
        return buffers.model_input[: shape[0]].clone()

    @contextlib.contextmanager
    def _caching(self, buffers: _Buffers) -> Iterator[None]:
        """The block cache installed on the model for a run, on the buffers' state (a fresh
        one for an eager run; a captured run's own, kept with its graphs)."""
        if self.cache is None:
            yield
            return
        handle = self.cache.install(perturbation_target(self.model), buffers.block_cache)
        buffers.block_cache = handle.state
        handle.state.begin_run()
        try:
            yield
        finally:
            handle.remove()

    def _count(self, buffers: _Buffers) -> None:
        """``last_compute`` from the run's calls: the model's rows, the guide network's
        (autoguidance; a classifier's gradients are not counted), with a block cache the
        model's rows × blocks evaluated (None without one), the calls that reused the cache,
        the first call after truncated CFG stopped guiding (None: it did not)."""
        cache = buffers.block_cache
        self.last_compute = {
            "model_rows": sum(buffers.rows.values()),
            "guide_rows": sum(buffers.guide_rows.values()),
            "block_rows": cache.block_rows(buffers.rows) if cache is not None else None,
            "reused_calls": sum(cache.recorded.get(i, False) for i in buffers.rows) if cache is not None else 0,
            "truncated_from": buffers.truncated_from,
        }

    def _new_buffers(self, x_T: Tensor, conditioning: RowConditioning) -> _Buffers:
        """A run's buffers; ``conditioning`` is used as it is (an eager run's own), or cloned
        by the caller for a graph that outlives the run."""
        shape, device, dtype = tuple(x_T.shape), x_T.device, x_T.dtype
        rows = len(self.branches) * shape[0]
        momentum = self.combine is not None and self.combine.apg_momentum != 0
        # APG's running state in float32, as the kernels keep it, but in float64 for a
        # float64 run (the reference's, exact to float64 rounding: a float32 state moved
        # such runs by 4e-7 to 2e-6)
        momentum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        calls = self._calls(False)
        reuse = any(call.delta_in for call in calls)
        zeroed = any(call.blocks == 0 for call in calls)
        truncate = self.guidance is not None and self.guidance.truncate is not None
        table = torch.tensor([call.t for call in calls], dtype=self._time_dtype, device=device)
        table = table[:, None].expand(-1, rows).contiguous()
        return _Buffers(
            model_input=torch.empty((rows, *shape[1:]), device=device, dtype=dtype),
            conditioning=conditioning,
            x0=[torch.empty(shape, device=device, dtype=dtype) for _ in range(self.history_length + 1)],
            x_previous=torch.empty(shape, device=device, dtype=dtype) if self._keeps_x else None,
            x0_unconditional=[
                torch.empty(shape, device=device, dtype=dtype) for _ in range(2 if self.unconditional_history else 0)
            ],
            apg=torch.empty(shape, device=device, dtype=momentum_dtype) if momentum else None,
            noise=torch.zeros(shape, device=device, dtype=dtype),
            times=[table[i, : call.blocks * shape[0]] for i, call in enumerate(calls)],
            deltas=[torch.empty(shape, device=device, dtype=dtype) for _ in range(2 if reuse else 0)],
            uncond_estimate=torch.empty(shape, device=device, dtype=dtype) if reuse else None,
            zero_prediction=torch.zeros(shape, device=device, dtype=dtype) if zeroed else None,
            similarity=torch.empty(shape[0], device=device, dtype=torch.float32) if truncate else None,
        )

    def _load(self, buffers: _Buffers, x_T: Tensor, conditioning: RowConditioning) -> None:
        """Start a run: x_T in every block of the model input, the conditioning (into a graph's
        own tensors), a fresh APG state."""
        buffers.model_input.view(len(self.branches), *x_T.shape).copy_(x_T)
        if buffers.conditioning is not conditioning:
            buffers.conditioning.copy_from(conditioning)
        if buffers.apg is not None:
            buffers.apg.zero_()

    def _model_call(
        self, i: int, buffers: _Buffers, shape: tuple[int, ...], draw_noise: Callable[[], Tensor], keep_x0: bool
    ) -> None:
        """Model call i and its guided_step, in the buffers."""
        batch, channels = shape[0], shape[1]
        model_input = buffers.model_input
        x = model_input[:batch]
        guiding = buffers.truncated_from is None or i < buffers.truncated_from  # truncated CFG stops guiding
        planned = self._calls(False, guiding)[i]
        guided = planned.combine is not None
        rows = planned.blocks * batch
        buffers.rows[i] = rows
        t_in = buffers.times[i]
        if t_in.shape[0] != rows:  # a call that skips rows its plan has (truncated CFG, delta reuse)
            t_in = t_in[:rows]
        if rows:
            model_output = self._model_output(i, planned, buffers, t_in, shape)
        else:  # CFG-Zero*'s zero-init: the prediction is zero, no forward runs
            assert buffers.zero_prediction is not None  # made with the buffers of a plan that zeroes calls
            model_output = buffers.zero_prediction
        guide = None
        if guided:
            assert self.guidance is not None  # a call with a combine is a guided one
            model_output = self.guidance.guided_output(model_output, batch, shape[1])
        guide_network = self._guide_network if guided else None
        if guide_network is not None:  # a second network on the conditional rows
            buffers.guide_rows[i] = batch
            if self._guide_input_dtype is None:
                guide_input, guide_arguments = x, buffers.model_arguments(batch)
            else:  # its floating conditioning cast as its input is (an fp32 text embedding for a bf16 guide)
                guide_input = x.to(self._guide_input_dtype)
                guide_arguments = buffers.conditioning.arguments(batch, self._guide_input_dtype)
            guide = self._checked_output(
                self._forward(guide_network, guide_input, t_in[:batch], *guide_arguments),
                model_input,
                batch,
                shape,
                f"{type(self.guidance).__name__}'s guide_model",
            )
            if guide.shape[1] > model_output.shape[1]:
                # A guide that learns its variance beside a model that does not: its
                # prediction is its first C channels (as ADM reads a 2C output).
                guide = guide[:, : shape[1]]
        if planned.delta_out is not None:  # Δ = c − u, kept for the calls that skip u
            torch.sub(
                model_output[:batch, :channels],
                model_output[batch : 2 * batch, :channels],
                out=buffers.deltas[planned.delta_out],
            )
        if planned.delta_in:  # u = c − Σ weight·Δ[slot], the fused step's guide
            guide = buffers.uncond_estimate
            assert guide is not None  # made with the buffers of a plan that reuses deltas
            (slot, weight), *others = planned.delta_in
            torch.sub(model_output[:batch, :channels], buffers.deltas[slot], alpha=weight, out=guide)
            for slot, weight in others:
                guide.sub_(buffers.deltas[slot], alpha=weight)
        learned = model_output.shape[1] == 2 * shape[1]
        if self.variance_type == "learned_range" and not learned:
            raise ValueError(
                f"variance_type='learned_range' needs a model that outputs 2·{shape[1]} channels "
                f"(prediction then variance), got {model_output.shape[1]}"
            )
        call = self._calls(learned, guiding)[i]

        ring = buffers.x0
        x0_slots = len(call.step.k_history) - call.reads_x_previous
        history = tuple(ring[(i - 1 - j) % len(ring)] for j in range(x0_slots))
        if self.unconditional_history:
            history = self._unconditional_x0(i, model_output, x, guide, call, buffers)
        if call.reads_x_previous:
            assert buffers.x_previous is not None  # made with the buffers of a plan that keeps an x
            history += (buffers.x_previous,)
        if i in self._keeps_x:  # before the step writes the next x over this one
            assert buffers.x_previous is not None
            buffers.x_previous.copy_(x)
        combine = call.combine
        grad = None
        if call.step.k_grad or call.step.grad_eps_scale:
            # (a step takes a gradient under classifier guidance only, which needs labels)
            assert self.classifier is not None and buffers.conditioning.labels is not None
            grad = self.classifier.gradient(x, t_in[:batch], buffers.conditioning.labels[:batch])
        # Truncated CFG: each sample's cos(x̂0_c, x̂0_u) out of the fused step (out of its first pass
        # under dynamic thresholding), read on the host until it stops guiding. A captured run
        # computes it too, so that its graphs launch the kernels its warm-up compiled and
        # loaded, but follows its warm-up run's call instead of reading it.
        similarity = buffers.similarity if combine is not None else None
        if call.x0_only is not None:
            model_output = self._dynamic_threshold(
                model_output, x, call, combine, guide, buffers, ring[i % len(ring)], similarity
            )
            combine = guide = None
        self._step(
            StepTensors(
                model_output,
                x,
                guide,
                history,
                draw_noise() if call.step.k_noise else None,
                grad,
                buffers.apg if combine is not None else None,
                model_input,
                ring[i % len(ring)] if keep_x0 else None,
                similarity if combine is not None else None,
            ),
            call.step,
            combine,
        )
        if similarity is not None and not buffers.calibrated:
            # (the buffers hold a similarity under truncated CFG only)
            assert self.guidance is not None and self.guidance.truncate is not None
            # NaN keeps guiding; at the last call there is no later one to stop guiding
            if i + 1 < self.num_calls and bool(similarity.min() >= self.guidance.truncate):
                buffers.truncated_from = i + 1

    def _model_output(self, i: int, planned: _Call, buffers: _Buffers, t_in: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Model call i's forward on the first ``t_in.shape[0]`` rows of the model input, with the
        perturbed rows and the block cache told which rows are which branch's."""
        batch, rows = shape[0], t_in.shape[0]
        if self._perturbation is not None:  # the perturbed block's rows, read by the model's perturbed layers
            block = planned.perturbed_block
            self._perturbation.rows = None if block is None else slice(block * batch, (block + 1) * batch)
        cache = buffers.block_cache
        if cache is not None:  # which rows are which branch's, for the cache's per-branch state
            cache.call, cache.branches, cache.active = i, self.branches[: planned.blocks], True
            cache.positions[i] = planned.position  # what an extrapolated residual is linear in
        model_input = buffers.model_input
        model_output = self._checked_output(
            self._forward(self.model, model_input[:rows], t_in, *buffers.model_arguments(rows)),
            model_input,
            rows,
            shape,
            "model",
        )
        # Between the sampler's forwards (a callback's own model call) the model is the plain one.
        if cache is not None:
            cache.active = False
        if self._perturbation is not None:
            self._perturbation.rows = None
        return model_output

    @staticmethod
    def _step(tensors: StepTensors, step: StepCoefficients, combine: GuidanceCombine | None) -> None:
        """The loop's one door to the fused step. The step and combine were checked when the
        plan was made and the loop owns the buffers, so the op's per-call validation is
        skipped (``ops.guided_step_prechecked``); what the loop hands over is checked here
        for the layout the kernels read (``check_step_layout``: shapes, dtypes,
        devices, no tensor data), so a loop path that builds a tensor the op does not
        expect fails with the tensor's name instead of a kernel misreading it."""
        ops.check_step_layout(tensors, step, combine)
        ops.guided_step_prechecked(tensors, step, combine)

    def _unconditional_x0(
        self, i: int, model_output: Tensor, x: Tensor, guide: Tensor | None, call: _Call, buffers: _Buffers
    ) -> tuple[Tensor, ...]:
        """CFG++ on DPM-Solver++(2M): this call's unconditional x0 into its buffer (one unguided
        x0-only pass over the B unconditional rows), and the previous call's as the history."""
        block = self.branches.index("uncond") if guide is None else 0
        unconditional = guide if guide is not None else model_output[block * len(x) : (block + 1) * len(x)]
        x0_only = StepCoefficients(call.step.alpha, call.step.sigma, k_x0=1.0, prediction_type=self.prediction_type)
        ring = buffers.x0_unconditional
        self._step(StepTensors(unconditional, x, None, (), None, None, None, ring[i % 2], None), x0_only, None)
        return (ring[(i - 1) % 2],) if call.step.k_history else ()

    @staticmethod
    def _forward(model: Model, model_input: Tensor, t_in: Tensor, labels: Tensor | None, kwargs: dict) -> object:
        """model(x_t, t, labels, **kwargs); the labels left out where there are none or the
        model takes none (``_takes_labels``: ADM's unconditional models, whose labels are
        the classifier's)."""
        if labels is not None and _takes_labels(model):
            return model(model_input, t_in, labels, **kwargs)
        return model(model_input, t_in, **kwargs)

    def _checked_output(
        self, model_output: object, model_input: Tensor, rows: int, shape: tuple[int, ...], who: str
    ) -> Tensor:
        """The output of ``who`` (the model, or the guidance's guide_model), checked: a floating
        tensor on the input's device of (rows, C or 2C, *spatial), with memory of its own (a
        network that returns its input would be overwritten by the step)."""
        if not isinstance(model_output, Tensor):
            raise TypeError(
                f"{who} must return a tensor (batch, channels, ...), got {type(model_output).__name__}; "
                "wrap a diffusers UNet in fastguide.DiffusersUNet"
            )
        if not model_output.is_floating_point() or model_output.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{who} must return a floating tensor, got dtype {model_output.dtype}")
        if model_output.device != model_input.device:
            raise ValueError(f"{who} must return a tensor on {model_input.device}, got {model_output.device}")
        channels, spatial = shape[1], tuple(shape[2:])
        if (
            model_output.dim() != len(shape)
            or model_output.shape[0] != rows
            or model_output.shape[1] not in (channels, 2 * channels)
            or tuple(model_output.shape[2:]) != spatial
        ):
            raise ValueError(
                f"{who} must return ({rows}, {channels} or {2 * channels}, *{spatial}) for an input of "
                f"{rows} rows, got {tuple(model_output.shape)}"
            )
        if model_output.untyped_storage().data_ptr() == model_input.untyped_storage().data_ptr():
            model_output = model_output.clone()
        return model_output

    def _report(self, callback: Callback | None, i: int, buffers: _Buffers, batch: int) -> None:
        """The callback after call i. Its x is the next call's input itself: an in-place edit
        (an inpainting blend, as k-diffusion's callbacks make) carries into every row block
        of that call's forward. Its denoised is the solver's history: an edit is refused."""
        if callback is None:
            return
        x, x0 = buffers.model_input[:batch], buffers.x0[i % len(buffers.x0)]
        if x0.is_inference():  # (a run under inference_mode: no version counter) a copy that has one
            with torch.inference_mode(False):
                x0 = x0.clone()
        x_version, x0_version = _version(x), _version(x0)
        callback({"i": i, "t": self._calls(False)[i].t, "x": x, "denoised": x0})
        if x0._version != x0_version:
            raise RuntimeError(
                "callback changed its 'denoised' in place, which the solver reads again (its history): "
                "change a copy (d['denoised'].clone())"
            )
        if len(buffers.model_input) > batch and (x_version is None or x._version != x_version):
            blocks = buffers.model_input.unflatten(0, (-1, batch))
            blocks[1:].copy_(x.expand_as(blocks[1:]))

    def _dynamic_threshold(
        self,
        model_output: Tensor,
        x: Tensor,
        call: _Call,
        combine: GuidanceCombine | None,
        guide: Tensor | None,
        buffers: _Buffers,
        scratch: Tensor,
        similarity: Tensor | None,
    ) -> Tensor:
        """Imagen's dynamic thresholding: x0 ← clamp(x0, −s, s)/s with s = max(1, the
        per-sample percentile of |x0|). One extra pass computes the guided x0 (no clip);
        the step then runs on that thresholded x0 as a "sample" prediction, so eps is
        re-derived from it and the rest of the step (classifier shift, update) follows."""
        assert call.x0_only is not None and self.dynamic_threshold is not None  # the caller's condition
        x0 = ops.guided_step(
            model_output,
            x,
            call.x0_only,
            combine,
            guide=guide,
            apg_buffer=buffers.apg if combine is not None else None,
            out=scratch,
            similarity=similarity,
        )
        # s: the percentile of |x0| per sample, linearly interpolated between order
        # statistics as Imagen's np.percentile and diffusers' torch.quantile take it (two
        # kthvalue calls: torch.quantile refuses more than 2^24 elements)
        flat = x0.abs().flatten(1)
        position = self.dynamic_threshold * (flat.shape[1] - 1)
        below = math.floor(position)
        low = flat.kthvalue(below + 1, dim=1).values
        high = flat.kthvalue(min(below + 2, flat.shape[1]), dim=1).values
        s = torch.lerp(low, high, position - below).clamp_min(1.0).reshape(-1, *([1] * (x0.dim() - 1)))
        thresholded = torch.maximum(torch.minimum(x0, s), -s) / s
        if model_output.shape[1] == 2 * x.shape[1]:  # keep the learned variance channels
            thresholded = torch.cat([thresholded, model_output[: len(x), x.shape[1] :]], dim=1)
        return thresholded

    # ----------------------------------------------------------------------------------
    # CUDA graphs
    # ----------------------------------------------------------------------------------

    def clear_cuda_graphs(self) -> None:
        """Drops every capture (its buffers and graph memory): the next call captures anew.
        Needed after a change to what the networks' forwards do that leaves their weights
        where they were: fused or unfused LoRA, other adapter weights, another attention
        processor, hooks added or removed, a submodule put in training mode. (Weights
        given new storage or dtype are seen, and drop the captures themselves.)"""
        self._graphs.clear()
        self._graph_weights = ()

    def _graphed_modules(self) -> list[nn.Module]:
        """The modules whose weights the captures read (cuda_graphs.modules_called), once
        warned where a network hides them."""
        modules: dict[int, nn.Module] = {}  # (a module named twice is fingerprinted once)
        for who, network in (("model", self.model), ("guide_model", self._guide_network)):
            found, opaque = cuda_graphs.modules_called(network)
            modules.update((id(module), module) for module in found)
            if opaque and not self._warned_opaque:
                self._warned_opaque = True
                warnings.warn(
                    f"cuda_graph=True: {who} is a {type(network).__name__}, whose weights fastguide cannot see "
                    "all (modules are followed through methods, partials, functions' closures and globals, lists "
                    "and dicts, not through other objects): a replay reads them where they were at capture; after "
                    "moving or replacing them, call clear_cuda_graphs()",
                    stacklevel=4,
                )
        return list(modules.values())

    def _segments(self, per_call: bool, noise_inside: bool) -> list[range]:
        """The model calls captured as one graph each: consecutive calls, up to where the
        host must act between two of them: with a callback (``per_call``), after every
        call; with noise from a host-side generator (not ``noise_inside``), before each
        call that draws noise (drawn outside the graph, as eager sampling draws it). Else
        the whole loop is one graph."""
        calls = self._calls(False)
        starts = [0] + [i for i in range(1, len(calls)) if per_call or (calls[i].step.k_noise and not noise_inside)]
        return [range(start, end) for start, end in zip(starts, starts[1:] + [len(calls)])]

    def _replay(self, shape, device, x_T, conditioning, generator, bar, callback, keep_x0) -> Tensor:
        """The loop as CUDA graphs: captured on the first call for this shape and conditioning
        layout, then replayed."""
        per_call, inside = callback is not None, cuda_graphs.draws_inside(generator, device)
        # x_T's dtype is the buffers' (a model without one parameter dtype samples in the noise's)
        autocast = cuda_graphs.autocast_state(device)
        # (the backend chosen is baked into the launches, as autocast's precision is)
        chosen = backends.get_backend()
        key = (shape, device, x_T.dtype, conditioning.signature, keep_x0, per_call, inside, autocast, chosen)
        modules = self._graphed_modules()
        weights = cuda_graphs.weights_fingerprint(modules)
        if weights != self._graph_weights:  # weights moved: every capture reads the old addresses
            self._graphs.clear()
            self._graph_weights = weights
        caller = generator if generator is not None else cuda_graphs.default_generator(device)
        if key not in self._graphs:
            hooked = next(filter(None, map(per_forward_hook, modules)), None)
            if hooked:
                raise ValueError(
                    f"cuda_graph=True cannot replay {hooked}: it runs at each forward (offloading weights, a cache's "
                    "decision, a cast), which a replay does not: use cuda_graph=False, or remove the hook"
                )
            if len(self._graphs) >= self.MAX_CAPTURES:
                # the least recently used goes (its buffers and graph memory) before a new one is made
                self._graphs.popitem(last=False)
            # Outside inference mode, so that the static tensors serve calls outside it too.
            with torch.inference_mode(False), torch.no_grad(), cuda_graphs.capturing_on(device):
                self._graphs[key] = self._capture(shape, device, x_T, conditioning, caller, keep_x0, per_call, inside)
        self._graphs.move_to_end(key)
        buffers, graphs = self._graphs[key]
        self._load(buffers, x_T, conditioning)
        # (a CUDA replay runs no Python; a CPU stand-in does)
        with self._caching(buffers), cuda_graphs.capturing_on(device):
            for segment, graph in zip(self._segments(per_call, inside), graphs):
                if buffers.noise_generator is not None:
                    # The graph draws from its own generator: the caller's state in, and
                    # back out advanced, as eager draws would leave it.
                    buffers.noise_generator.set_state(caller.get_state())
                elif self._calls(False)[segment[0]].step.k_noise:  # only a segment's first call draws
                    _randn(
                        shape,
                        generator,
                        device,
                        buffers.noise.dtype,
                        buffers.noise,
                        self._drawn_in(buffers.noise.dtype),
                    )
                graph.replay()
                if buffers.noise_generator is not None:
                    caller.set_state(buffers.noise_generator.get_state())
                self._report(callback, segment[-1], buffers, shape[0])
                if bar is not None:
                    bar.update(len(segment))
        self._count(buffers)
        return buffers.model_input[: shape[0]].clone()

    def _capture(
        self, shape, device, x_T, conditioning, caller: torch.Generator, keep_x0, per_call: bool, noise_inside: bool
    ) -> tuple[_Buffers, list]:
        """A warm-up run, which draws from a copy of the ``caller`` generator's state the noise
        an eager run would (its data-dependent decisions are the graphs'), then the graphs."""
        buffers = self._new_buffers(x_T.to(device), conditioning.clone())
        self._load(buffers, x_T, buffers.conditioning)  # the clone is the graph's copy already
        drawn_in = self._drawn_in(buffers.noise.dtype)
        if noise_inside:  # each noisy call draws into the static buffer, inside the graph
            buffers.noise_generator = torch.Generator(device)
            noise_generator = buffers.noise_generator
            noise_generator.set_state(caller.get_state())

            def noise() -> Tensor:
                return _randn(shape, noise_generator, device, buffers.noise.dtype, buffers.noise, drawn_in)

            warm_up_noise = noise
        else:  # drawn before each replay
            noise = lambda: buffers.noise  # noqa: E731
            warm_up_generator = torch.Generator(caller.device)
            warm_up_generator.set_state(caller.get_state())

            def warm_up_noise() -> Tensor:
                return _randn(shape, warm_up_generator, device, buffers.noise.dtype, buffers.noise, drawn_in)

        # Warm up on a side stream, as torch.cuda.graph asks (lazy initialisation, cuDNN and
        # Triton autotuning, allocator). Its data-dependent decisions (truncated CFG's call,
        # the block cache's reuses) are kept: the captured graphs follow them.
        # auto's backends by device time (ops.backends.graph_capture), the same in both.
        with self._caching(buffers), backends.graph_capture():
            with cuda_graphs.side_stream(device):
                for i in range(self.num_calls):
                    self._model_call(i, buffers, shape, warm_up_noise, keep_x0)
            buffers.calibrated = True
            if buffers.block_cache is not None:  # the capture starts, as the warm-up did, from no residuals
                buffers.block_cache.replaying = True
                buffers.block_cache.begin_run()
            pool = cuda_graphs.graph_pool()

            def run(segment: range) -> None:
                for i in segment:
                    self._model_call(i, buffers, shape, noise, keep_x0)

            graphs = [
                cuda_graphs.capture_graph(functools.partial(run, segment), pool, buffers.noise_generator)
                for segment in self._segments(per_call, noise_inside)
            ]
        return buffers, graphs


class _PlanCache:
    """The most recently made plans (timestep grids, each call's scalars), by the value of
    what made them: building a GuidedSampler (each ``sample`` call does) costs the plan
    and its checks once per distinct setting, not per call. Holds scalars only, never a
    model. An unhashable key (e.g. a setting that cannot be compared by value) is made
    afresh each time."""

    def __init__(self, size: int = 64):
        self.size = size
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()  # samplers may be built on several threads

    def get_or_make(self, key: tuple, make: Callable[[], object]):
        try:
            hash(key)
        except TypeError:
            return make()
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = make()  # outside the lock: a plan's checks may raise, and take a while
        with self._lock:
            self._plans[key] = plan
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan


_PLANS = _PlanCache()


@functools.lru_cache(maxsize=1)
def _default_schedule() -> NoiseSchedule:
    """ADM's linear schedule, built once (its checks cost more than a short loop's host work)."""
    return NoiseSchedule.linear()


def _settings(guidance: object) -> tuple | list | None:
    """A guidance spec's type and settings, its networks left out (the plan never calls
    them); a list, which no cache takes, when a setting is a function (a CFG schedule may
    keep state, so its values cannot be reused) or the spec is not a dataclass (its
    settings are not known by value)."""
    if guidance is None:
        return None
    if not dataclasses.is_dataclass(guidance):
        return [guidance]
    settings = tuple(
        (field.name, getattr(guidance, field.name))
        for field in dataclasses.fields(guidance)
        if field.name not in ("guide_model", "classifier")
    )
    if any(callable(value) for _, value in settings):
        return list(settings)
    return (type(guidance), *settings)


def _check_zero_init(sampler: str, variance_type: str | None, classifier: ClassifierGuidance | None) -> None:
    """Refuse what a zeroed call (no forward, the prediction 0) cannot serve: a classifier's
    gradient would shift the zero prediction, and DDPM's learned variance comes from a
    forward."""
    if classifier is not None:
        raise ValueError(
            "CFG zero_init_steps takes the prediction 0 at its first calls, which ClassifierGuidance's "
            "gradient would shift: drop one of them"
        )
    if sampler == "ddpm" and variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(
            "CFG zero_init_steps skips the first calls' forwards, and sampler='ddpm' may read a variance the "
            "model learns beside its prediction: pass variance_type='fixed_small' or 'fixed_large', or use "
            "another sampler (ddim, euler, ...)"
        )


def _version(t: Tensor) -> int | None:
    """t's version counter (a view shares its base's), which every in-place change bumps;
    None for an inference tensor (a run under torch.inference_mode), which keeps none."""
    return None if t.is_inference() else t._version


def _is_real(value: object) -> bool:
    """A finite real number (NumPy's scalars included), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _as_int(value: Any) -> Any:
    """A NumPy integer as the Python int it is (what the checks and the plan keys take);
    anything else as it is, for the checks to judge."""
    return int(value) if isinstance(value, Integral) and not isinstance(value, bool) else value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_steps(steps: object) -> None:
    """steps: a positive int, ADM's "ddimN" string, or a sequence of timesteps (numbers: a
    VP schedule's fractional ones lie between its timesteps, a flow schedule's time is
    continuous; a tensor or NumPy array of them is read as its list)."""
    if isinstance(steps, (bool, float)):
        raise TypeError(f"steps must be an int, 'ddimN' or a sequence of timesteps, got {steps!r}")
    if isinstance(steps, (str, int)):
        return  # the schedule checks the count and the string's form
    values = steps.tolist() if isinstance(steps, Tensor) else steps
    if not isinstance(values, Sequence) or not all(isinstance(t, Real) and not isinstance(t, bool) for t in values):
        raise TypeError(f"steps given as timesteps must be a sequence of numbers, got {steps!r}")
    if not values:
        raise ValueError("steps given as timesteps must name at least one, got an empty sequence")


def _check_null_label(null_label: object, model: object, num_classes: int | None) -> None:
    """The null label must index the model's label table, or, for a model without one
    that fastguide can see, be a class or the one extra row after num_classes."""
    if not isinstance(null_label, int) or isinstance(null_label, bool) or null_label < 0:
        raise ValueError(f"null_label must be a non-negative int, got {null_label!r}")
    table = getattr(model, "label_emb", None)
    rows = getattr(table, "num_embeddings", None)
    if rows is not None and null_label >= rows:
        raise ValueError(f"null_label must index the model's label table of {rows} rows, got {null_label}")
    if rows is None and num_classes is not None and null_label > num_classes:
        raise ValueError(
            f"null_label must index the model's label table: at most num_classes = {num_classes}, got {null_label}"
        )


def _takes_labels(model: object) -> bool:
    """Whether ``model`` takes labels: every model but an unconditional ADM UNet
    (``class_cond=False``: num_classes None), whose labels, given, are the classifier's."""
    return not (isinstance(model, UNet) and model.num_classes is None)


def _model_null_label(model: Any) -> int | None:
    """The model's unconditional label, when it has one (fastguide UNet with null_class)."""
    return model.num_classes if getattr(model, "null_class", False) else None


def _randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
    out: Tensor | None = None,
    drawn_in: torch.dtype | None = None,
) -> Tensor:
    """N(0, I) of ``dtype`` on ``device`` (into ``out`` when given), drawn on the generator's
    device (a CPU generator for CUDA samples, as diffusers' randn_tensor draws), in
    ``drawn_in`` (default: ``dtype``) then cast: the same generator gives the same noise
    whichever device samples."""
    draw_device = device if generator is None else generator.device
    drawn_in = drawn_in or dtype
    if draw_device.type == device.type and drawn_in == dtype:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype, out=out)
    drawn = torch.randn(shape, generator=generator, device=draw_device, dtype=drawn_in)
    return drawn.to(device, dtype) if out is None else out.copy_(drawn)


def _parse_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"device must be a torch device or a name such as 'cpu' or 'cuda:0', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but no CUDA device is available here")
    return device


def _model_device(model: object) -> torch.device:
    return _weights_device(model) or torch.device("cpu")


def _weights_device(network: object) -> torch.device | None:
    """Where ``network``'s weights are (its first parameter's device), or None for what is
    no module or has no parameters."""
    if not isinstance(network, nn.Module):
        return None
    parameter = next(network.parameters(), None)
    return None if parameter is None else parameter.device


def _offloaded(network: object) -> bool:
    """An offloading hook moves some of ``network``'s weights at each forward: accelerate's
    ``_hf_hook`` or diffusers' ``_diffusers_hook`` on it or on any submodule (diffusers'
    leaf-level group offloading hooks the leaves alone). Walked only when the devices differ."""
    modules = network.modules() if isinstance(network, nn.Module) else ()
    return any(hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook") for module in modules)


# diffusers hooks that do the same at every forward (layer skipping), which a replay
# repeats as captured
GRAPH_SAFE_HOOKS = frozenset({"AttentionProcessorSkipHook", "FeedForwardSkipHook", "TransformerBlockSkipHook"})


def per_forward_hook(network: object) -> str | None:
    """The first hook in ``network`` that acts at each forward on what it finds (accelerate's
    offloading hooks; diffusers' offloading, caching and casting hooks), as "<hook> on
    <module>", or None. Such a hook runs in Python, which a CUDA-graph replay does not."""
    if not isinstance(network, nn.Module):
        return None
    for name, module in network.named_modules():
        where = f"{name or 'the network'} ({type(module).__name__})"
        if hasattr(module, "_hf_hook"):
            return f"accelerate's {type(module._hf_hook).__name__} on {where}"
        for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).values():
            if type(hook).__name__ not in GRAPH_SAFE_HOOKS:
                return f"diffusers' {type(hook).__name__} on {where}"
    return None


def _random_in_training(network: object) -> str:
    """What makes ``network``'s forward random in training mode ("dropout", "label dropout"),
    or "" (in eval mode, or nothing random: checked through the modules only then)."""
    if not isinstance(network, nn.Module) or not perturbation_target(network).training:
        return ""
    found = []
    for module in network.modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append("dropout")
        elif getattr(module, "label_dropout", 0) or getattr(module, "dropout_prob", 0):  # ADM's UNet, DiT
            found.append("label dropout")
    return " and ".join(sorted(set(found)))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """a and b name one device (a type without an index stands for its current one)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def sample(
    model: Model,
    shape: Sequence[int],
    *,
    labels: Tensor | None = None,
    cond: Conditioning | None = None,
    uncond: Conditioning | None = None,
    sampler: str | None = None,
    steps: int | str | Sequence[float] = 25,
    spacing: str | None = None,
    rho: float | None = None,
    schedule: NoiseSchedule | None = None,
    guidance: GuidanceSpec = None,
    eta: float = 0.0,
    solver_order: int | None = None,
    final_timestep: int = -1,
    clip_denoised: bool | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    prediction_type: str = "epsilon",
    variance_type: str | None = None,
    null_label: int | None = None,
    num_classes: int | None = None,
    dynamic_threshold: float | None = None,
    cache: BlockCacheSettings | None = None,
    device: torch.device | str | None = None,
    cuda_graph: bool = False,
) -> Tensor:
    """Draw samples of ``shape`` from ``model(x_t, t[, labels], **cond) -> prediction``.

    Args:
        labels: (B,) class indices, passed as the model's third argument (ADM's and DiT's
            signature); the unconditional rows of CFG get ``null_label``. Required by
            classifier guidance.
        cond, uncond: keyword arguments of the model for its conditional and unconditional
            rows (e.g. a text encoder's ``encoder_hidden_states`` for a prompt and a negative
            prompt): dicts of tensors batched on dim 0 (one row broadcasts), or of nested
            dicts of them (SDXL's ``added_cond_kwargs``), with the same keys. Laid out once
            per run in the batched forward's blocks. CFG needs labels or cond/uncond.
        sampler: one of fastguide.sampling.solvers.SAMPLERS (its docstring has each one's
            update): "unipc" (UniPC-2 with its corrector), "dpm++2m", "dpm++3m", "dpm++2s",
            "ddim", "euler", "heun" (two model calls per step, as dpm++2s), and with noise
            "ddpm", "euler-ancestral", "dpm++2m-sde" (VP) or "euler-maruyama" (SiT's SDE,
            flow schedules). Default (None): "unipc", chosen by the NFE benchmark, or
            "dpm++2m" under CFGPlusPlus (see ``default_sampler``).
        steps: a count, ADM's "ddimN", or an explicit list of original timesteps (of
            float times T·σ on a flow schedule). On a VP schedule a fractional timestep
            lies between two integer ones, its σ̃ = σ_t/α_t linearly interpolated in t
            (diffusers' Euler-type schedulers' "linspace" grids), and the model then gets
            float32 times; see NoiseSchedule.
        spacing: where a count of steps lies: "adm" (ADM's respacing), diffusers'
            "leading", "trailing" and "linspace", "logsnr" (uniform in log-SNR) or
            "karras" (ρ = ``rho``); see NoiseSchedule.spaced_timesteps. Default: the
            schedule's own ("logsnr"; "linspace" in σ, shifted, on a flow schedule).
        schedule: the training schedule (default ADM's linear schedule over 1000 steps),
            or a flow path, ``NoiseSchedule.flow(shift)``.
        guidance: None, a ``Guidance`` (``CFG(...)``, ``CFGPlusPlus``, ``AutoGuidance``, ...),
            ``ClassifierGuidance(...)`` or a tuple of a Guidance and a ClassifierGuidance.
            CFG at less than two forwards: ``CFG(scale, truncate=γ)`` stops guiding once
            every sample's cos(x̂0_c, x̂0_u) reaches γ; ``CFG(scale, reuse=DeltaReuse(every=k))``
            runs the unconditional rows at every k-th guided call only.
        eta: DDIM's stochasticity (0 = deterministic).
        solver_order: UniPC's order p (1, 2 or 3; default 2).
        final_timestep: where the last step lands: -1 (default) the clean data, or an
            original timestep below the grid's last (VP schedules, every sampler): the
            samples are then x_t there, α_t·x0 + σ_t·ε (diffusers' DDIM with
            set_alpha_to_one=False and final_sigmas_type="sigma_min" are 0). See
            solvers.plan_steps.
        clip_denoised: clip the predicted x0 to [−1, 1] at every step; None (default): on a
            VP schedule (guided-diffusion's default, for pixel data in [−1, 1]), not on a
            flow path (latent models). Pass False for a latent model on a VP schedule
            (DiT, SD), as their own samplers do.
        generator, noise: the random stream; ``noise`` is x_T. Same generator, same samples.
            A run draws x_T (without ``noise``) and then one tensor per step that adds noise
            (``GuidedSampler.noise_draws``): not a last step onto clean data, where
            diffusers' DDIM (eta > 0), DDPM, Euler ancestral and SDE-DPM++ schedulers draw
            one more, unused; so a generator reused for a second run matches diffusers'
            second run only in an accelerated pipeline, which makes that draw too.
            The loop's state (x, the solver's x0 history) is in the model's dtype where its
            floating parameters share one (a bf16 model: bf16 state; ``model.float()`` under
            autocast keeps it in float32), else in the noise's, else float32; the noise is
            cast to it.
        progress: a progress bar over the model calls.
        callback: called after each model call with a dict {"i", "t", "x", "denoised"}
            (k-diffusion-like, not its convention: i counts model calls, two a step for
            Heun; t is the original timestep, where k-diffusion passes sigma; x is after
            the update; the tensors are the loop's buffers: copy to keep). x is the next
            call's input: an in-place edit (an inpainting blend) carries into it; denoised
            is the solver's history and must not be changed.
        prediction_type: "epsilon", "v_prediction", "sample" or "flow_prediction"
            (the velocity ε − x0 of a flow path; diffusers' name).
        variance_type: for "ddpm": "fixed_small", "fixed_large" or "learned_range"
            (default: learned_range when the model outputs 2C channels).
        null_label: the unconditional label (default: the model's ``null_label``).
        num_classes: labels must lie in [0, num_classes) (default: the model's).
        dynamic_threshold: Imagen's dynamic thresholding percentile (e.g. 0.995) instead of
            static clipping: x0 ← clamp(x0, −s, s)/s, s = max(1, that percentile of |x0|).
        cache: ``FirstBlockCache(threshold)``: skip the model's blocks after its first on
            calls where the first block's residual changed by less than ``threshold``; or
            ``ForecastCache(every)``: skip them on a fixed schedule, extrapolating their
            residual (fastguide's DiT and UNet, diffusers' DiT, PixArt and SD3
            transformers and SD/SDXL UNets; see fastguide.models.block_cache). ``GuidedSampler.last_compute``
            counts the rows and blocks a run evaluated.
        device: where to sample (default: the noise's, else the model's).
        cuda_graph: capture the loop as CUDA graphs and replay them (CUDA only; not with
            classifier guidance). Capture costs a warm-up run: hold a ``GuidedSampler`` to
            reuse the graphs across calls. The warm-up run's data-dependent decisions
            (truncated CFG's last guided call, the block cache's reuses) are captured and
            replayed as they were. The whole loop is one graph, its noise drawn inside from
            the generator's state (a CPU generator draws before each noisy call instead,
            one graph per stretch between two; a callback, one graph per call).

    Returns x_0 of ``shape`` (x at ``final_timestep`` when that is not -1).
    """
    guided_sampler = GuidedSampler(
        model,
        sampler=sampler,
        steps=steps,
        spacing=spacing,
        rho=rho,
        schedule=schedule,
        guidance=guidance,
        eta=eta,
        solver_order=solver_order,
        final_timestep=final_timestep,
        clip_denoised=clip_denoised,
        prediction_type=prediction_type,
        variance_type=variance_type,
        null_label=null_label,
        num_classes=num_classes,
        dynamic_threshold=dynamic_threshold,
        cache=cache,
        cuda_graph=cuda_graph,
    )
    return guided_sampler(
        shape,
        labels=labels,
        cond=cond,
        uncond=uncond,
        generator=generator,
        noise=noise,
        device=device,
        progress=progress,
        callback=callback,
    )

"""The fastguide sampler settings that reproduce a diffusers scheduler, step for step.

A diffusers pipeline denoises with ``scheduler.set_timesteps(...)``, then per timestep
``scale_model_input``, the model and ``scheduler.step``. ``settings_for(scheduler, steps)``
returns the ``SamplerSettings`` under which ``fastguide.sample`` gives the same latents from
the same model, embeddings and starting latents, to float rounding, or raises
``UnsupportedScheduler`` naming the option (with its value) that fastguide cannot follow,
and why; the pipeline then keeps diffusers' loop.

The grid is diffusers' own: a fresh scheduler of the same class and config runs
``set_timesteps`` with the call's arguments as the pipelines' ``retrieve_timesteps`` does (custom timesteps, sigmas and
mu included), and its timesteps and σ's are checked to be points fastguide's schedule steps
between: integer timesteps, or the Euler types' fractional ones, at which diffusers
interpolates σ̃ linearly in t as fastguide's NoiseSchedule does. The noise schedule is built
from the betas diffusers built (``trained_betas`` or ``beta_schedule``: linear,
scaled_linear, squaredcos_cap_v2, ...; float32 as there), held in float64. diffusers is
never imported here: the scheduler object brings its class and config.

Where the last step lands is ``final_timestep``: −1 (the clean data) but for DDIM with
set_alpha_to_one=False (timestep 0's ᾱ = alphas_cumprod[0]; or t − T // N where that is a
timestep) and DPMSolverMultistep/UniPC with final_sigmas_type="sigma_min" (timestep 0's σ̃).

What maps to what (each mapper lists the options it refuses, and why):
  DDIMScheduler                     "ddim", with the call's eta; set_alpha_to_one → final_timestep
  DDPMScheduler                     "ddpm", with its variance_type; clip_sample → clip_denoised
  DPMSolverMultistepScheduler       dpmsolver++: "dpm++2m" (order 2), "dpm++3m" (order 3),
                                    "ddim" (order 1, whose update is DDIM's);
                                    sde-dpmsolver++ of order 2: "dpm++2m-sde";
                                    final_sigmas_type → final_timestep
  UniPCMultistepScheduler           "unipc" (bh2, data prediction), with its solver_order;
                                    final_sigmas_type → final_timestep
  EulerDiscreteScheduler            "euler" (any spacing: "linspace" at fractional times)
  EulerAncestralDiscreteScheduler   "euler-ancestral" (likewise)
  HeunDiscreteScheduler             "heun" (likewise); clip_sample → clip_denoised
  FlowMatchEulerDiscreteScheduler   "euler" on NoiseSchedule.flow(shift), at diffusers' times T·σ
  FlowMatchHeunDiscreteScheduler    "heun" on NoiseSchedule.flow(shift), at diffusers' times T·σ

The three Euler-type VP schedulers integrate x̃ = x/α_t in σ̃ = σ_t/α_t (k-diffusion's form),
which fastguide's "euler", "euler-ancestral" and "heun" write in x. The pipelines multiply
their N(0, I) latents by ``init_noise_sigma``, and the model sees
``scale_model_input(x̃) = x̃/√(σ̃² + 1) = α_t·x̃ = x``: fastguide starts from x_T =
``latent_scale`` × the latents diffusers' loop starts from (α of the first timestep for those
three, 1 for the others), and both loops end on the clean latents (α = 1 there).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from torch import Tensor

from ..sampling.schedule import NoiseSchedule
from ..sampling.solvers import LOWER_ORDER_SECOND_BELOW, check_final_timestep, check_sampler

# Samplers that draw fresh noise at every step but a last one onto the clean data.
STOCHASTIC_SAMPLERS = ("ddpm", "euler-ancestral", "dpm++2m-sde")
# diffusers' σ's are float32: a σ lies on a timestep when it matches that timestep's σ̃ to
# float32 rounding; a flow time T·σ matches its σ to float32 rounding of the product.
FLOAT32_RTOL = 1e-6


class UnsupportedScheduler(ValueError):
    """A diffusers scheduler, or one of its options, that fastguide cannot reproduce to float
    rounding. ``scheduler`` is its class name, ``option`` the option and value at fault
    (e.g. "set_alpha_to_one=False"; None when the class itself has no counterpart), and
    ``reason`` what diffusers does that fastguide does not."""

    def __init__(self, scheduler: str, option: str | None, reason: str):
        self.scheduler, self.option, self.reason = scheduler, option, reason
        super().__init__(f"{scheduler}: {option}: {reason}" if option else f"{scheduler}: {reason}")


@dataclass(frozen=True)
class SamplerSettings:
    """What ``fastguide.sample`` / ``GuidedSampler`` take to reproduce a diffusers scheduler
    (``sample_kwargs()``), and how to start from diffusers' latents.

    sampler, steps, schedule, prediction_type, clip_denoised, solver_order, eta, variance_type,
    final_timestep:
        fastguide.sample's arguments; ``steps`` is diffusers' grid, explicit (on a VP schedule
        ints, and floats where diffusers' Euler types call the model between timesteps; the
        float times T·σ on a flow path); ``final_timestep`` where the last step lands (−1
        the clean data, 0 timestep 0's noise level).
    init_noise_sigma: what the pipelines multiply their N(0, I) latents by
        (``scheduler.init_noise_sigma`` once the timesteps are set; DiTPipeline does not).
    latent_scale: fastguide's x_T = latent_scale × the latents diffusers' loop starts from
        (``initial_noise``): 1/√(σ̃₀² + 1), the α of the first timestep, for the Euler-type
        VP schedulers, whose first scale_model_input multiplies by it; 1 for the others.
    """

    sampler: str
    steps: tuple[float, ...]
    schedule: NoiseSchedule
    prediction_type: str
    clip_denoised: bool = False
    solver_order: int | None = None
    eta: float = 0.0
    variance_type: str | None = None
    final_timestep: int = -1
    init_noise_sigma: float = 1.0
    latent_scale: float = 1.0

    @property
    def draws_noise(self) -> bool:
        """Whether the sampler draws noise. Both loops then draw one N(0, I) tensor of the
        latents' shape per noisy step, in the same order: the same generator, handed to
        ``scheduler.step`` by the pipeline and to ``fastguide.sample``, gives the same
        samples (both draw in the latents' dtype, but DPM-Solver SDE's noise, which both
        draw in float32 for half-precision latents; float64 latents, rare in a pipeline,
        draw float64 in fastguide, as k-diffusion does, and float32 in diffusers)."""
        return self.sampler in STOCHASTIC_SAMPLERS or self.eta > 0

    @property
    def diffusers_draws(self) -> int:
        """The N(0, I) tensors diffusers' loop draws from the generator in the call: one a
        step for DDIM with eta, Euler ancestral and DPM-Solver SDE (also at a last step whose
        noise is multiplied by 0, which fastguide does not draw); DDPM's one a step from
        t > 0; none for the others."""
        if not self.draws_noise:
            return 0
        if self.sampler == "ddpm":
            return sum(1 for t in self.steps if t > 0)
        return len(self.steps)

    def sample_kwargs(self) -> dict[str, object]:
        """The keyword arguments of ``fastguide.sample`` / ``GuidedSampler`` these settings fix."""
        return dict(
            sampler=self.sampler,
            steps=list(self.steps),
            schedule=self.schedule,
            prediction_type=self.prediction_type,
            clip_denoised=self.clip_denoised,
            solver_order=self.solver_order,
            eta=self.eta,
            variance_type=self.variance_type,
            final_timestep=self.final_timestep,
        )

    def initial_noise(self, latents: Tensor) -> Tensor:
        """fastguide's x_T from the latents diffusers' loop starts from (after the pipeline's
        own ``init_noise_sigma`` scaling)."""
        return latents * self.latent_scale


@dataclass(frozen=True)
class _Call:
    """The pipeline call's arguments that reach the scheduler."""

    num_inference_steps: int | None
    timesteps: Sequence[float] | None
    sigmas: Sequence[float] | None
    mu: float | None
    eta: float


def settings_for(
    scheduler: object,
    num_inference_steps: int | None,
    *,
    eta: float = 0.0,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    mu: float | None = None,
    generator_in_step: bool = True,
) -> SamplerSettings:
    """The settings under which ``fastguide.sample`` reproduces ``scheduler`` as a pipeline
    runs it, or ``UnsupportedScheduler`` with the option and the reason.

    The call's arguments are the pipeline's: ``num_inference_steps``, or custom ``timesteps``
    or ``sigmas`` (what ``retrieve_timesteps`` hands to ``set_timesteps``), ``mu`` (dynamic
    shifting), and ``eta``, which the pipelines hand only to a step that takes it (DDIM's; the
    other schedulers ignore it). ``generator_in_step``: whether the pipeline hands its
    generator to ``scheduler.step`` (StableDiffusion, SDXL and PixArt do; DiTPipeline and SD3
    do not, so a scheduler that draws noise there draws it from the global RNG, in DiT's case
    for both CFG halves, which fastguide cannot follow). The scheduler is not modified.
    """
    kind = type(scheduler)
    name = kind.__name__
    mapper = _MAPPERS.get(name)
    if mapper is None or not kind.__module__.startswith("diffusers."):
        why = UNMAPPED.get(name, "") if kind.__module__.startswith("diffusers.") else ""
        raise UnsupportedScheduler(
            name,
            None,
            f"no fastguide sampler reproduces {kind.__module__}.{name}"
            f"{': ' + why if why else ''}; the supported ones are {SUPPORTED_SCHEDULERS}",
        )
    if timesteps is not None and sigmas is not None:
        raise UnsupportedScheduler(name, "timesteps= and sigmas=", "diffusers' retrieve_timesteps takes one of them")
    settings = mapper(scheduler, _Call(num_inference_steps, timesteps, sigmas, mu, eta))
    try:
        check_sampler(settings.sampler, settings.schedule, settings.eta, settings.solver_order)
        settings.schedule.check_prediction_type(settings.prediction_type)
        settings.schedule.check_grid(settings.steps, f"{name}'s timesteps")
        check_final_timestep(settings.sampler, settings.schedule, settings.steps, settings.final_timestep)
    except ValueError as error:
        raise UnsupportedScheduler(name, None, f"fastguide refuses the settings it maps to: {error}") from None
    if settings.draws_noise and not generator_in_step:
        raise UnsupportedScheduler(
            name,
            "generator_in_step=False",
            f"sampler {settings.sampler!r} draws noise at "
            "every step, which diffusers then draws from the global RNG (for DiTPipeline, for "
            "both CFG halves): fastguide cannot draw the same",
        )
    return settings


# --------------------------------------------------------------------------------------
# What every mapper shares
# --------------------------------------------------------------------------------------


def _options(scheduler):
    """The scheduler's config as its class reads it: the options its ``__init__`` takes.
    ``from_config`` keeps every other key of the config it was given (a DDIM config's
    clip_sample, say, on an EulerDiscreteScheduler), which that class never reads: read
    as options, such a key clipped where diffusers does not, or refused what diffusers
    runs. (A class whose ``__init__`` took ``**kwargs`` would keep them all.)"""
    config = scheduler.config
    parameters = inspect.signature(type(scheduler).__init__).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return config
    return type(config)({key: value for key, value in config.items() if key in parameters})


def _refuse(name: str, option: str, value: object, reason: str) -> UnsupportedScheduler:
    return UnsupportedScheduler(name, f"{option}={value!r}", reason)


def _check_variance_preserving(name: str, config, prediction_types: tuple[str, ...]) -> None:
    """Options every VP scheduler may carry: dynamic thresholding, zero-terminal-SNR betas,
    and prediction types fastguide's VP path has no map for (or diffusers' step has none)."""
    if config.get("thresholding", False):
        raise _refuse(
            name,
            "thresholding",
            True,
            "diffusers' dynamic thresholding (x0 clamped to the "
            f"{config.get('dynamic_thresholding_ratio')!r} quantile s, s in [1, sample_max_value]) is "
            "not fastguide's dynamic_threshold (no upper bound, kthvalue not interpolated quantile)",
        )
    if config.get("rescale_betas_zero_snr", False):
        raise _refuse(
            name,
            "rescale_betas_zero_snr",
            True,
            "the rescaled betas reach ᾱ = 0 at the last timestep "
            "(diffusers patches it to 2⁻²⁴ where it steps from there); a NoiseSchedule needs ᾱ > 0",
        )
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in prediction_types:
        raise _refuse(name, "prediction_type", prediction_type, f"{name} maps to fastguide for {prediction_types}")


def _check_sigma_spacing(name: str, config) -> None:
    """Karras, exponential, beta and Lu-lambda σ grids fall between the schedule's timesteps."""
    for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
        if config.get(option, False):
            raise _refuse(
                name,
                option,
                True,
                "the σ's fall between the schedule's integer timesteps (diffusers "
                "calls the model at interpolated or rounded times); fastguide steps between timesteps",
            )


def _check_flow_sigmas(name: str, config) -> None:
    """The multistep schedulers' flow mode (SANA, Wan): diffusers steps by σ but calls the model
    at the int64-truncated time ⌊T·σ⌋; fastguide calls a flow model at T·σ."""
    if config.get("use_flow_sigmas", False):
        raise _refuse(
            name,
            "use_flow_sigmas",
            True,
            "diffusers steps by σ but calls the model at the int64-truncated "
            "time ⌊T·σ⌋; fastguide calls a flow model at T·σ",
        )


def _final_timestep(config) -> int:
    """final_sigmas_type as fastguide's final_timestep: "zero" ends on the clean data (−1),
    "sigma_min" at timestep 0's σ̃ = √((1 − ᾱ_0)/ᾱ_0) (0)."""
    return -1 if config.get("final_sigmas_type", "zero") == "zero" else 0


def _check_clip(name: str, config) -> bool:
    """clip_sample as fastguide's clip_denoised, which clips to [−1, 1] only."""
    clip = bool(config.get("clip_sample", False))
    limit = config.get("clip_sample_range", 1.0)
    if clip and limit != 1.0:
        raise _refuse(name, "clip_sample_range", limit, "fastguide's clip_denoised clips x0 to [−1, 1]")
    return clip


def _placed(scheduler, call: _Call):
    """A copy of ``scheduler`` (the original keeps its state) after ``set_timesteps`` with
    the call's arguments, as the pipelines' ``retrieve_timesteps`` calls it: diffusers' own
    grid, its σ's and init_noise_sigma. A copy, not ``from_config``: that rebuilds from the
    options given at construction and drops later changes of the others (the steps_offset a
    StableDiffusionPipeline sets on its scheduler, a register_to_config)."""
    name = type(scheduler).__name__
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    arguments: dict[str, object] = {}
    for option, value in (("timesteps", call.timesteps), ("sigmas", call.sigmas), ("mu", call.mu)):
        if value is None:
            continue
        if option not in accepted:
            raise _refuse(name, option, value, f"{name}.set_timesteps takes no {option} (diffusers refuses it too)")
        arguments[option] = list(cast("Sequence[float]", value)) if option != "mu" else value
    if call.timesteps is None and call.sigmas is None:
        arguments["num_inference_steps"] = call.num_inference_steps
    placed = copy.deepcopy(scheduler)
    try:
        placed.set_timesteps(**arguments, device="cpu")
    except Exception as error:  # diffusers' own refusal, whatever its type
        raise UnsupportedScheduler(
            name, None, f"diffusers' set_timesteps({arguments}) fails: {type(error).__name__}: {error}"
        ) from None
    betas = getattr(placed, "betas", None)  # (the VP schedulers')
    if betas is not None and len(betas) != placed.config.num_train_timesteps:
        raise _refuse(
            name,
            "trained_betas",
            f"<{len(betas)} values>",
            f"a table of {len(betas)} betas where num_train_timesteps is {placed.config.num_train_timesteps}: "
            "diffusers places its timesteps by the one and clamps its σ's to the other",
        )
    return placed


def _grid_option(call: _Call, config) -> tuple[str, object]:
    """The option that placed the grid, to name in a refusal."""
    if call.timesteps is not None:
        return "timesteps", list(call.timesteps)
    if call.sigmas is not None:
        return "sigmas", list(call.sigmas)
    return "timestep_spacing", config.get("timestep_spacing")


def _heun_points(values: list) -> list:
    """The grid of a Heun scheduler, whose timesteps [t₀, t₁, t₁, t₂, t₂, …] and σ's
    [σ₀, σ₁, σ₁, …, σ_{N−1}, σ_{N−1}, 0] visit each inner point twice (once per stage)."""
    return values[:1] + values[1::2]


def _vp_schedule(placed) -> NoiseSchedule:
    """The schedule of diffusers' betas (float32 there), in float64; refused where fastguide
    cannot hold them (a β of 0 or 1: beta_start=0, a trained table ending in 1)."""
    try:
        return NoiseSchedule(placed.betas.double())
    except ValueError as error:
        reason = f"fastguide's VP schedule refuses its betas: {error}"
        raise UnsupportedScheduler(type(placed).__name__, None, reason) from None


def _timesteps(name: str, placed, call: _Call, times: list[float]) -> tuple[float, ...]:
    """diffusers' timesteps, checked to be distinct, descending and in [0, T − 1]: ints where
    they are integers, floats where they are fractional (the Euler types' "linspace")."""
    option, value = _grid_option(call, placed.config)
    grid = [int(t) if float(t).is_integer() else float(t) for t in times]
    total = placed.config.num_train_timesteps
    if not grid:  # (timesteps=[], or one σ for an Euler type: the final one)
        raise _refuse(name, option, value, "no steps: diffusers' loop returns the starting latents")
    if grid != sorted(set(grid), reverse=True) or grid[-1] < 0 or grid[0] > total - 1:
        raise _refuse(
            name,
            option,
            value,
            f"the timesteps {grid} are not distinct, descending and in "
            f"[0, {total - 1}]; fastguide steps a strictly decreasing grid",
        )
    return tuple(grid)


def _check_sigmas_on_grid(
    name: str, placed, call: _Call, steps: tuple[float, ...], sigmas: list[float], final_timestep: int = -1
) -> None:
    """diffusers steps by its σ's: each must be σ̃ = √((1 − ᾱ)/ᾱ) at its time (as diffusers
    computes it, float32; linearly interpolated in t at a fractional time, as fastguide's
    NoiseSchedule does) and the last one 0 (the clean data) or, with ``final_timestep`` 0,
    timestep 0's σ̃, for fastguide's grid to be the same."""
    alphas_cumprod = placed.alphas_cumprod.float()
    table = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).tolist()

    def at(t: float) -> float:
        k = math.floor(t)
        return table[k] if t == k else (table[k + 1] - table[k]) * (t - k) + table[k]

    option, value = _grid_option(call, placed.config)
    for t, sigma in zip(steps, sigmas):
        if not math.isclose(sigma, at(t), rel_tol=FLOAT32_RTOL):
            raise _refuse(
                name,
                option,
                value,
                f"the σ̃ diffusers steps from at t = {t!r} is {sigma!r}, not the "
                f"schedule's σ̃ there, {at(t)!r} (interpolated linearly in t between timesteps), at "
                "which fastguide steps",
            )
    last = 0.0 if final_timestep < 0 else table[final_timestep]
    if len(sigmas) != len(steps) + 1 or not math.isclose(sigmas[-1], last, rel_tol=FLOAT32_RTOL):
        raise _refuse(
            name,
            option,
            value,
            f"diffusers' σ's end at {sigmas[-1]!r}, not at {last!r}, where "
            f"fastguide's last step lands (final_timestep={final_timestep})",
        )


# --------------------------------------------------------------------------------------
# One mapper per scheduler class
# --------------------------------------------------------------------------------------


def _ddim(scheduler, call: _Call) -> SamplerSettings:
    """DDIMScheduler → "ddim". Its last step goes from the grid's last t to t − T // N where
    that is a timestep (final_timestep = t − T // N), else to ᾱ = 1 (set_alpha_to_one=True:
    final_timestep = −1, the clean data) or ᾱ = alphas_cumprod[0] (set_alpha_to_one=False,
    SD 1.5's: final_timestep = 0). Refused: clip_sample (diffusers clips x0 but, as the
    pipelines call step with use_clipped_model_output=False, moves along the unclipped eps;
    fastguide re-derives eps from the clipped x0), a spacing whose step is not T // N
    (diffusers steps from t to t − T // N whatever the grid: "linspace", or "trailing" when N
    does not divide T, leaves the next timestep's noise level), set_alpha_to_one=False on a
    grid ending at t = 0 (a last step from timestep 0 to its own noise level), eta outside
    [0, 1]."""
    name, config = type(scheduler).__name__, _options(scheduler)
    _check_variance_preserving(name, config, ("epsilon", "v_prediction", "sample"))
    if config.clip_sample:
        raise _refuse(
            name,
            "clip_sample",
            True,
            "diffusers clips x0 but steps along the model's unclipped eps (the "
            "pipelines call step with use_clipped_model_output=False); fastguide's clip_denoised re-derives "
            "eps from the clipped x0",
        )
    if not 0 <= call.eta <= 1:
        raise _refuse(name, "eta", call.eta, "fastguide's DDIM takes η in [0, 1] (above 1 the noise exceeds σ_t')")
    placed = _placed(scheduler, call)
    steps = _timesteps(name, placed, call, placed.timesteps.tolist())
    stride = config.num_train_timesteps // placed.num_inference_steps
    for t, t_next in zip(steps, steps[1:]):
        if t - stride != t_next:
            raise _refuse(
                name,
                "timestep_spacing",
                config.timestep_spacing,
                f"diffusers steps from t = {t} to "
                f"t − T // N = {t - stride}, but calls the model next at t = {t_next}; fastguide steps from "
                "grid point to grid point",
            )
    final_timestep = steps[-1] - stride
    if final_timestep < 0:
        final_timestep = -1 if config.set_alpha_to_one else 0
    if final_timestep == steps[-1]:
        raise _refuse(
            name,
            "set_alpha_to_one",
            False,
            "the grid ends at t = 0, and diffusers' last step goes from "
            f"there to ᾱ = alphas_cumprod[0] = {float(placed.alphas_cumprod[0]):.6g}, its own noise level; "
            "fastguide's last step must lower the noise",
        )
    return SamplerSettings(
        "ddim", steps, _vp_schedule(placed), config.prediction_type, eta=float(call.eta), final_timestep=final_timestep
    )


def _ddpm(scheduler, call: _Call) -> SamplerSettings:
    """DDPMScheduler → "ddpm" (whose posterior follows the grid, as diffusers'
    previous_timestep does). fixed_small_log is fixed_small's σ written as exp(½·log σ²).
    Refused: variance_type "learned" (the raw output as the variance) and "fixed_large_log"
    (NaN in diffusers); "fixed_large" and "learned_range" when the grid ends above t = 0,
    since diffusers then adds noise at the last step (β there is 1 − ᾱ_t) and fastguide's
    last step is noiseless."""
    name, config = type(scheduler).__name__, _options(scheduler)
    _check_variance_preserving(name, config, ("epsilon", "v_prediction", "sample"))
    clip = _check_clip(name, config)
    variance_type = config.variance_type
    if variance_type in ("learned", "fixed_large_log"):
        raise _refuse(
            name,
            "variance_type",
            variance_type,
            "fastguide's DDPM variances are fixed_small, fixed_large "
            "and learned_range (diffusers takes 'learned' as the raw variance, and its 'fixed_large_log' "
            "takes the square root of a log)",
        )
    placed = _placed(scheduler, call)
    steps = _timesteps(name, placed, call, placed.timesteps.tolist())
    if variance_type in ("fixed_large", "learned_range") and steps[-1] != 0:
        raise _refuse(
            name,
            "variance_type",
            variance_type,
            f"the grid ends at t = {steps[-1]} > 0, where diffusers' "
            "last step adds noise of variance up to β = 1 − ᾱ_t; fastguide's last step is noiseless",
        )
    variance = "fixed_small" if variance_type == "fixed_small_log" else variance_type
    return SamplerSettings(
        "ddpm", steps, _vp_schedule(placed), config.prediction_type, clip_denoised=clip, variance_type=variance
    )


def _dpm_solver_multistep(scheduler, call: _Call) -> SamplerSettings:
    """DPMSolverMultistepScheduler → "dpm++2m", "dpm++3m", "ddim" (order 1) or "dpm++2m-sde",
    final_sigmas_type "zero" → final_timestep −1, "sigma_min" → 0. fastguide's multistep
    solvers lower the order as diffusers does with lower_order_final: the last step first
    order when it lands on x0 (so euler_at_final changes nothing there) or, landing at
    timestep 0, below 15 steps; the one before second order below 15 steps. Refused: the
    noise-prediction algorithms "dpmsolver"/"sde-dpmsolver", sde-dpmsolver++ of order 1 or 3,
    solver_type "heun" (fastguide's second-order update is the midpoint one),
    lower_order_final=False with order 3 below 15 steps (diffusers keeps the third order at the
    step before the last), and with final_sigmas_type="sigma_min" the last step's order where
    it differs from fastguide's: lower_order_final=False below 15 steps (diffusers keeps the
    solver's order) or euler_at_final=True from 15 (diffusers lowers it to first); σ grids off
    the timesteps, use_flow_sigmas (diffusers calls the model at ⌊T·σ⌋), variance_type
    learned/learned_range with an eps model (diffusers keeps model_output[:, :3]; it reads
    variance_type nowhere else)."""
    name, config = type(scheduler).__name__, _options(scheduler)
    _check_flow_sigmas(name, config)
    _check_variance_preserving(name, config, ("epsilon", "v_prediction", "sample"))
    _check_sigma_spacing(name, config)
    algorithm, order = config.algorithm_type, config.solver_order
    if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
        raise _refuse(
            name,
            "algorithm_type",
            algorithm,
            "fastguide's DPM-Solvers are the data-prediction ones, 'dpmsolver++' and 'sde-dpmsolver++'",
        )
    if algorithm == "sde-dpmsolver++" and order != 2:
        raise _refuse(
            name,
            "solver_order",
            order,
            "fastguide's SDE DPM-Solver++ is the second-order multistep one ('dpm++2m-sde')",
        )
    if order not in (1, 2, 3):
        raise _refuse(name, "solver_order", order, "fastguide's DPM-Solver++ orders are 1 (DDIM), 2 and 3")
    if order > 1 and config.solver_type != "midpoint":
        raise _refuse(
            name, "solver_type", config.solver_type, "fastguide's second-order DPM-Solver++ update is the midpoint one"
        )
    if config.get("variance_type") in ("learned", "learned_range") and config.prediction_type == "epsilon":
        raise _refuse(
            name,
            "variance_type",
            config.variance_type,
            "diffusers keeps model_output[:, :3] as the prediction, three channels whatever the latents have",
        )
    placed = _placed(scheduler, call)
    steps = _timesteps(name, placed, call, placed.timesteps.tolist())
    final_timestep = _final_timestep(config)
    _check_sigmas_on_grid(name, placed, call, steps, placed.sigmas.tolist(), final_timestep)
    few = len(steps) < LOWER_ORDER_SECOND_BELOW
    if order == 3 and not config.lower_order_final and few:
        raise _refuse(
            name,
            "lower_order_final",
            False,
            f"below {LOWER_ORDER_SECOND_BELOW} steps ({len(steps)} here) "
            "diffusers then keeps the third order at the step before the last; fastguide lowers it to the "
            "second",
        )
    if order > 1 and final_timestep >= 0:
        # diffusers' last step to σ̃_0 is first order with euler_at_final or (lower_order_final
        # and below 15 steps); fastguide's below 15 steps.
        if few and not (config.lower_order_final or config.euler_at_final):
            raise _refuse(
                name,
                "lower_order_final",
                False,
                f"with final_sigmas_type='sigma_min' below "
                f"{LOWER_ORDER_SECOND_BELOW} steps ({len(steps)} here) diffusers keeps order {order} at the "
                "last step; fastguide lowers it to the first",
            )
        if not few and config.euler_at_final:
            raise _refuse(
                name,
                "euler_at_final",
                True,
                f"with final_sigmas_type='sigma_min' from "
                f"{LOWER_ORDER_SECOND_BELOW} steps ({len(steps)} here) diffusers lowers the last step to the "
                f"first order; fastguide keeps order {order}",
            )
    sampler = {1: "ddim", 2: "dpm++2m", 3: "dpm++3m"}[order] if algorithm == "dpmsolver++" else "dpm++2m-sde"
    return SamplerSettings(sampler, steps, _vp_schedule(placed), config.prediction_type, final_timestep=final_timestep)


def _unipc(scheduler, call: _Call) -> SamplerSettings:
    """UniPCMultistepScheduler → "unipc" with its solver_order (1–3), final_sigmas_type
    "zero" → final_timestep −1, "sigma_min" → 0. fastguide's UniPC is diffusers' default:
    B(h) = e^h − 1 ("bh2"), data prediction, the corrector after every step, the order
    lowered at the last steps (lower_order_final). Refused: solver_type "bh1",
    predict_x0=False, disable_corrector, solver_p, lower_order_final=False (with order ≥ 2),
    σ grids off the timesteps, use_flow_sigmas."""
    name, config = type(scheduler).__name__, _options(scheduler)
    _check_flow_sigmas(name, config)
    _check_variance_preserving(name, config, ("epsilon", "v_prediction", "sample"))
    _check_sigma_spacing(name, config)
    order, disabled, predictor = config.solver_order, config.get("disable_corrector"), config.get("solver_p")
    refusals = (
        (
            "solver_type",
            config.solver_type,
            config.solver_type != "bh2",
            "fastguide's UniPC is the B(h) = e^h − 1 variant ('bh2')",
        ),
        ("predict_x0", config.predict_x0, not config.predict_x0, "fastguide's UniPC is the data-prediction one"),
        ("disable_corrector", disabled, bool(disabled), "fastguide applies the corrector after every step"),
        ("solver_p", predictor, predictor is not None, "fastguide's predictor is UniP itself"),
        ("solver_order", order, order not in (1, 2, 3), "fastguide's UniPC orders are 1, 2 and 3"),
        (
            "lower_order_final",
            False,
            not config.lower_order_final and order > 1,
            "diffusers then keeps order p at the last steps (which, stepping to σ = 0, gives NaN or a singular solve "
            "in diffusers itself); fastguide lowers it to the steps left",
        ),
    )
    for option, value, refused, reason in refusals:
        if refused:
            raise _refuse(name, option, value, reason)
    placed = _placed(scheduler, call)
    steps = _timesteps(name, placed, call, placed.timesteps.tolist())
    final_timestep = _final_timestep(config)
    _check_sigmas_on_grid(name, placed, call, steps, placed.sigmas.tolist(), final_timestep)
    return SamplerSettings(
        "unipc", steps, _vp_schedule(placed), config.prediction_type, solver_order=order, final_timestep=final_timestep
    )


def _sigma_space(sampler: str, prediction_types: tuple[str, ...]) -> Callable[[object, _Call], SamplerSettings]:
    """EulerDiscrete/EulerAncestralDiscrete/HeunDiscrete → "euler"/"euler-ancestral"/"heun"
    on their grid, from x_T = α₀·(diffusers' latents) (see the module docstring); the
    "linspace" spacing's fractional times (and custom fractional timesteps) as fractional
    steps, at which both interpolate σ̃ linearly in t. Refused: σ grids off the schedule's
    σ̃(t) (Karras, exponential, beta, interpolation_type "log_linear", custom sigmas placed
    by log-σ interpolation), timestep_type "continuous" with v_prediction (the model's time
    is ¼·log σ̃),
    final_sigmas_type "sigma_min" (the returned latents are in σ̃-space there), and, for
    Heun, a clip range other than 1."""

    def mapper(scheduler, call: _Call) -> SamplerSettings:
        name, config = type(scheduler).__name__, _options(scheduler)
        _check_variance_preserving(name, config, prediction_types)
        _check_sigma_spacing(name, config)
        if _final_timestep(config) >= 0:
            raise _refuse(
                name,
                "final_sigmas_type",
                config.final_sigmas_type,
                "the last step stops at timestep 0's "
                "σ̃, where diffusers returns its σ̃-space latents x̃ = x/α_0 (k-diffusion's form): fastguide "
                "returns x itself there (final_timestep=0), α_0 = √alphas_cumprod[0] times them",
            )
        if config.get("interpolation_type", "linear") != "linear":
            raise _refuse(
                name,
                "interpolation_type",
                config.interpolation_type,
                "the σ's lie log-uniformly between the schedule's timesteps; fastguide steps between timesteps",
            )
        # (diffusers reads it with v_prediction only: other prediction types take the timestep)
        if config.get("timestep_type", "discrete") != "discrete" and config.prediction_type == "v_prediction":
            raise _refuse(
                name,
                "timestep_type",
                config.timestep_type,
                "diffusers calls the model at ¼·log σ̃; fastguide calls it at the timestep",
            )
        clip = _check_clip(name, config)
        placed = _placed(scheduler, call)
        times, sigmas = placed.timesteps.tolist(), placed.sigmas.tolist()
        if sampler == "heun":
            times, sigmas = _heun_points(times), _heun_points(sigmas)
        steps = _timesteps(name, placed, call, times)
        _check_sigmas_on_grid(name, placed, call, steps, sigmas)
        prediction_type = "sample" if config.prediction_type == "original_sample" else config.prediction_type
        return SamplerSettings(
            sampler,
            steps,
            _vp_schedule(placed),
            prediction_type,
            clip_denoised=clip,
            init_noise_sigma=float(placed.init_noise_sigma),
            latent_scale=1 / math.sqrt(sigmas[0] ** 2 + 1),
        )

    return mapper


def _flow_match(sampler: str) -> Callable[[object, _Call], SamplerSettings]:
    """FlowMatchEulerDiscrete/FlowMatchHeunDiscrete → "euler"/"heun" on a flow path at
    diffusers' times T·σ (any σ grid: shift, dynamic shifting with mu, shift_terminal,
    Karras/exponential/beta σ's, custom sigmas). Refused: use_dynamic_shifting without mu,
    invert_sigmas, stochastic_sampling (x' = (1 − σ')·x0 + σ'·z: no fastguide flow sampler
    renoises so), custom timesteps apart from the σ's (the model's time is then not T·σ)."""

    def mapper(scheduler, call: _Call) -> SamplerSettings:
        name, config = type(scheduler).__name__, _options(scheduler)
        if config.get("use_dynamic_shifting", False) and call.mu is None:
            raise _refuse(
                name,
                "use_dynamic_shifting",
                True,
                "the shift is exp(mu) of the image size: pass the mu the pipeline computes",
            )
        for option, reason in (
            ("invert_sigmas", "diffusers runs σ from 0 to 1"),
            (
                "stochastic_sampling",
                "diffusers renoises x' = (1 − σ')·x0 + σ'·z at every step; no fastguide flow sampler does",
            ),
        ):
            if config.get(option, False):
                raise _refuse(name, option, True, reason)
        placed = _placed(scheduler, call)
        times, sigmas = placed.timesteps.tolist(), placed.sigmas.tolist()
        if sampler == "heun":
            times, sigmas = _heun_points(times), _heun_points(sigmas)
        total = config.num_train_timesteps
        option, value = _grid_option(call, config)
        for t, sigma in zip(times, sigmas):
            if not math.isclose(t, total * sigma, rel_tol=FLOAT32_RTOL):
                raise _refuse(
                    name,
                    option,
                    value,
                    f"diffusers calls the model at t = {t!r} but steps from σ = "
                    f"{sigma!r}; fastguide's flow time is T·σ = {total * sigma!r}",
                )
        if not times:  # (num_inference_steps=0, timesteps=[] or sigmas=[])
            raise _refuse(name, option, value, "no steps: diffusers' loop returns the starting latents")
        if len(sigmas) != len(times) + 1 or sigmas[-1] != 0:
            raise _refuse(
                name,
                option,
                value,
                f"diffusers' σ's end at {sigmas[-1]!r}, not 0 (the clean data), where fastguide's last step lands",
            )
        shift = config.shift
        if call.mu is not None and config.get("use_dynamic_shifting", False):
            shift = math.exp(call.mu) if config.get("time_shift_type", "exponential") == "exponential" else call.mu
        try:
            schedule = NoiseSchedule.flow(shift, total)
        except ValueError as error:
            raise _refuse(name, "shift", shift, str(error)) from None
        return SamplerSettings(sampler, tuple(times), schedule, "flow_prediction")

    return mapper


# The diffusers schedulers (KarrasDiffusionSchedulers and the distilled-model ones) that no
# fastguide sampler reproduces, with why.
UNMAPPED = {
    "PNDMScheduler": "its pseudo linear multistep (PLMS: 4th-order Adams–Bashforth on eps, after Runge–Kutta steps "
    "unless skip_prk_steps) is not a fastguide sampler, and with set_alpha_to_one=False its last step "
    "lands at ᾱ = alphas_cumprod[0], not on the clean data",
    "LMSDiscreteScheduler": "its linear multistep in σ̃ (k-diffusion's LMS, order 4) is not a fastguide sampler",
    "DPMSolverSinglestepScheduler": "its singlestep DPM-Solver takes its intermediate model calls at the grid's own "
    "timesteps, grouped by order; fastguide's dpm++2s puts each step's second call "
    "at the timestep nearest the λ-midpoint",
    "KDPM2DiscreteScheduler": "DPM-Solver-2 calls the model at the geometric mean of two σ̃'s, a fractional time",
    "KDPM2AncestralDiscreteScheduler": "DPM-Solver-2 calls the model at the geometric mean of two σ̃'s, a fractional "
    "time",
    "DEISMultistepScheduler": "DEIS (an exponential integrator with polynomial extrapolation of eps) is not a "
    "fastguide sampler",
    "DPMSolverSDEScheduler": "its noise comes from a Brownian tree (torchsde) at σ̃ midpoints; fastguide draws "
    "i.i.d. N(0, I) per step",
    "EDMEulerScheduler": "EDM's preconditioned σ parametrisation (sigma_data, Karras σ's) is not a discrete VP "
    "schedule",
    "LCMScheduler": "consistency-model steps (boundary-condition skips, renoising) are not a fastguide sampler",
    "TCDScheduler": "consistency-model steps (boundary-condition skips, renoising) are not a fastguide sampler",
}

_MAPPERS: dict[str, Callable[[object, _Call], SamplerSettings]] = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "DPMSolverMultistepScheduler": _dpm_solver_multistep,
    "UniPCMultistepScheduler": _unipc,
    "EulerDiscreteScheduler": _sigma_space("euler", ("epsilon", "v_prediction", "sample", "original_sample")),
    "EulerAncestralDiscreteScheduler": _sigma_space("euler-ancestral", ("epsilon", "v_prediction")),
    "HeunDiscreteScheduler": _sigma_space("heun", ("epsilon", "v_prediction", "sample")),
    "FlowMatchEulerDiscreteScheduler": _flow_match("euler"),
    "FlowMatchHeunDiscreteScheduler": _flow_match("heun"),
}
# The diffusers scheduler classes settings_for maps.
SUPPORTED_SCHEDULERS = tuple(_MAPPERS)

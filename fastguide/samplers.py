"""Guided samplers. A sampler's whole job is per-step scalars; ops.guided_step moves bytes.

Each step goes from original timestep t to t_next (−1 = clean data) and is one call of
    x_next = k_x·x + k_x0·x0 + k_eps·eps + k_prev·prev + k_noise·z (+ ADM's mean shift)
with, writing a = √ᾱ, s = √(1 − ᾱ) and primes for t_next:
  ddim (Song et al.):   k_x0 = a', k_eps = √(1 − ᾱ' − σ_η²), k_noise = σ_η,
                        σ_η = η·√((1 − ᾱ')/(1 − ᾱ))·√(1 − ᾱ/ᾱ')
  ddpm (Ho et al.; ADM's variances): β = 1 − ᾱ/ᾱ', k_x0 = β·a'/(1 − ᾱ),
                        k_x = (1 − ᾱ')·√(1 − β)/(1 − ᾱ), k_noise = √Σ, Σ fixed small
                        (posterior), fixed large (β) or learned (ADM's learned range)
  euler (VP form of the probability-flow ODE in σ̃ = s/a):
                        k_x = a'/a, k_eps = a'·(σ̃' − σ̃)
  dpm++2m (Lu et al. 2022, DPM-Solver++(2M)): h = λ' − λ, φ = −a'·(e^{−h} − 1),
                        k_x = s'/s, k_x0 = φ·(1 + 1/2r), k_prev = −φ/2r, r = h_prev/h;
                        first order (k_prev = 0) at the first and the last step.
A sampler is a choice of these numbers; nothing else differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops
from .guidance import split_guidance
from .schedule import NoiseSchedule

SAMPLERS = ("ddim", "ddpm", "euler", "dpm++2m")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


@dataclass(frozen=True)
class StepPlan:
    """The scalars of one step (see the module docstring)."""

    t: int
    t_next: int
    k_x: float = 0.0
    k_x0: float = 0.0
    k_eps: float = 0.0
    k_prev: float = 0.0
    k_noise: float = 0.0
    variance: float = 0.0  # Σ of an ancestral step: ADM's classifier mean shift is Σ·s·∇
    log_variance_range: tuple[float, float] | None = None  # learned Σ (ADM's learned range)
    ancestral: bool = False


def _ddim(schedule: NoiseSchedule, t: int, t_next: int, eta: float) -> StepPlan:
    abar, abar_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
    sigma_eta = eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
    return StepPlan(t, t_next, k_x0=math.sqrt(abar_next),
                    k_eps=math.sqrt(max(0.0, 1 - abar_next - sigma_eta**2)), k_noise=sigma_eta)


def _posterior_variance(schedule: NoiseSchedule, t: int, t_next: int) -> float:
    abar, abar_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
    return (1 - abar / abar_next) * (1 - abar_next) / (1 - abar)


def _ddpm(schedule: NoiseSchedule, t: int, t_next: int, variance_type: str, clipped_variance: float) -> StepPlan:
    abar, abar_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
    beta = 1 - abar / abar_next
    posterior = _posterior_variance(schedule, t, t_next)
    # ADM clips the posterior variance of the last step (zero) to that of the one before.
    small = posterior if t_next >= 0 else clipped_variance
    plan = dict(t=t, t_next=t_next, ancestral=True,
                k_x0=beta * math.sqrt(abar_next) / (1 - abar), k_x=(1 - abar_next) * math.sqrt(1 - beta) / (1 - abar))
    if variance_type == "learned_range":
        return StepPlan(**plan, k_noise=1.0 if t_next >= 0 else 0.0, variance=1.0,
                        log_variance_range=(math.log(small), math.log(beta)))
    variance = small if variance_type == "fixed_small" or t_next < 0 else beta
    return StepPlan(**plan, k_noise=math.sqrt(variance) if t_next >= 0 else 0.0, variance=variance)


def _euler(schedule: NoiseSchedule, t: int, t_next: int) -> StepPlan:
    (alpha, _), (alpha_next, _) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
    edm, edm_next = schedule.edm_sigma(t), (schedule.edm_sigma(t_next) if t_next >= 0 else 0.0)
    return StepPlan(t, t_next, k_x=alpha_next / alpha, k_eps=alpha_next * (edm_next - edm))


def _dpm_pp_2m(schedule: NoiseSchedule, t: int, t_next: int, h_prev: float | None) -> tuple[StepPlan, float | None]:
    (_, sigma), (alpha_next, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
    if sigma_next == 0:  # the last step lands on the clean data: first order gives x0
        return StepPlan(t, t_next, k_x0=1.0), None
    h = schedule.log_snr(t_next) - schedule.log_snr(t)
    phi = -alpha_next * math.expm1(-h)
    if h_prev is None:
        return StepPlan(t, t_next, k_x=sigma_next / sigma, k_x0=phi), h
    r = h_prev / h
    return StepPlan(t, t_next, k_x=sigma_next / sigma, k_x0=phi * (1 + 1 / (2 * r)), k_prev=-phi / (2 * r)), h


def plan_steps(
    sampler: str,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    variance_type: str = "fixed_small",
) -> list[StepPlan]:
    """The per-step scalars of ``sampler`` over ``timesteps`` (descending original t)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    pairs = list(zip(timesteps, list(timesteps[1:]) + [-1]))
    if sampler == "ddim":
        return [_ddim(schedule, t, t_next, eta) for t, t_next in pairs]
    if sampler == "euler":
        return [_euler(schedule, t, t_next) for t, t_next in pairs]
    if sampler == "ddpm":
        clipped = _posterior_variance(schedule, *pairs[-2]) if len(pairs) > 1 else schedule.betas[0].item()
        return [_ddpm(schedule, t, t_next, variance_type, clipped) for t, t_next in pairs]
    plans, h_prev = [], None
    for t, t_next in pairs:
        plan, h_prev = _dpm_pp_2m(schedule, t, t_next, h_prev)
        plans.append(plan)
    return plans


Model = Callable[..., Tensor]


class GuidedSampler:
    """A guided sampling loop that holds its buffers across calls.

    One model forward per step: with CFG, on a 2B batch laid out [cond; uncond] with the
    null label in the second half; ops.guided_step writes x_next into both halves of that
    input, so no torch.cat ever runs. DPM-Solver++ keeps the previous x0 in a second
    buffer (ping-pong). See ``fastguide.sample`` for the arguments.
    """

    def __init__(
        self,
        model: Model,
        *,
        sampler: str = "dpm++2m",
        steps: int | str | Sequence[int] = 25,
        schedule: NoiseSchedule | None = None,
        guidance=None,
        eta: float = 0.0,
        clip_denoised: bool = True,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        null_label: int | None = None,
        num_classes: int | None = None,
        dynamic_threshold: float | None = None,
    ):
        if dynamic_threshold is not None and not 0 < dynamic_threshold < 1:
            raise ValueError(f"dynamic_threshold must be a percentile in (0, 1), got {dynamic_threshold}")
        self.dynamic_threshold = dynamic_threshold
        self.model = model
        self.schedule = schedule or NoiseSchedule.linear()
        self.timesteps = self.schedule.timesteps(steps)
        self.sampler = sampler
        self.cfg, self.classifier = split_guidance(guidance)
        self.clip_denoised, self.prediction_type, self.eta = clip_denoised, prediction_type, eta
        self.variance_type = variance_type
        self.null_label = null_label if null_label is not None else _model_null_label(model)
        self.num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        if self.cfg is not None and self.null_label is None:
            raise ValueError(
                "CFG needs a null label: use a model built with null_class=True, or pass null_label="
            )
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")

    def _plans(self, learned_variance: bool) -> list[StepPlan]:
        variance_type = self.variance_type or ("learned_range" if learned_variance else "fixed_small")
        return plan_steps(self.sampler, self.schedule, self.timesteps, eta=self.eta, variance_type=variance_type)

    def _check_labels(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if labels is None:
            if self.cfg is not None or self.classifier is not None:
                raise ValueError("guidance needs labels (one class index per sample)")
            return None
        labels = torch.as_tensor(labels, device=device).long().flatten()
        if labels.numel() != batch:
            raise ValueError(f"labels must hold one class per sample ({batch}), got {labels.numel()}")
        if self.num_classes is not None and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        shape: Sequence[int],
        *,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> Tensor:
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be (batch, channels, ...), got {shape}")
        device = torch.device(device) if device is not None else (noise.device if noise is not None else _model_device(self.model))
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        batch = shape[0]
        labels = self._check_labels(labels, batch, device)
        guided = self.cfg is not None
        rows = 2 * batch if guided else batch
        # The model input buffer: x_t lives in its first half; each step rewrites all of it.
        model_input = torch.empty((rows, *shape[1:]), device=device)
        model_input[:batch] = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        if guided:
            model_input[batch:] = model_input[:batch]
            labels_in = torch.cat([labels, torch.full_like(labels, self.null_label)])
        else:
            labels_in = labels
        x = model_input[:batch]
        x0_buffers = [torch.empty(shape, device=device), torch.empty(shape, device=device)]
        apg = self.cfg.apg if guided else None
        apg_buffer = torch.zeros(shape, device=device) if apg is not None and apg.momentum else None

        steps = enumerate(self.timesteps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=len(self.timesteps), desc=f"{self.sampler} sampling")
        plans = None
        for i, t in steps:
            use_cfg = guided and self.cfg.active_at(self.schedule.edm_sigma(t))
            n = rows if use_cfg else batch
            t_in = torch.full((n,), t, device=device, dtype=torch.long)
            y_in = None if labels_in is None else labels_in[:n]
            model_output = self.model(model_input[:n], t_in, y_in) if y_in is not None else self.model(model_input[:n], t_in)
            if plans is None:
                plans = self._plans(learned_variance=model_output.shape[1] == 2 * shape[1])
            plan = plans[i]
            x0_out, prev = x0_buffers[i % 2], x0_buffers[(i + 1) % 2]
            alpha, sigma = self.schedule.alpha_sigma(t)
            kwargs = dict(
                alpha=alpha, sigma=sigma, prediction_type=self.prediction_type,
                clip_denoised=self.clip_denoised, k_x=plan.k_x, k_x0=plan.k_x0, k_eps=plan.k_eps,
                log_variance_range=plan.log_variance_range if model_output.shape[1] == 2 * shape[1] else None,
                out=model_input, x0_out=x0_out if self.sampler == "dpm++2m" else None,
            )
            if use_cfg:
                kwargs.update(self.cfg.step_kwargs(), apg_buffer=apg_buffer)
            if plan.k_prev:
                kwargs.update(prev=prev, k_prev=plan.k_prev)
            if plan.k_noise:
                kwargs.update(noise=torch.randn(shape, generator=generator, device=device), k_noise=plan.k_noise)
            if self.classifier is not None and self.classifier.scale:
                grad = self.classifier.gradient(x, t_in[:batch], labels)
                if plan.ancestral:
                    kwargs.update(grad=grad, k_grad=self.classifier.scale * plan.variance)
                else:
                    kwargs.update(grad=grad, grad_eps_scale=self.classifier.scale * sigma)
            if self.dynamic_threshold is not None:
                model_output, kwargs = self._dynamic_threshold(model_output, x, kwargs, x0_buffers[i % 2])
            ops.guided_step(model_output, x, **kwargs)
        return x.clone()

    def _dynamic_threshold(self, model_output: Tensor, x: Tensor, kwargs: dict, scratch: Tensor) -> tuple[Tensor, dict]:
        """Imagen's dynamic thresholding: x0 ← clamp(x0, −s, s)/s with s = max(1, the
        per-sample percentile of |x0|). One extra pass computes the guided x0 (no clip);
        then the step runs on that thresholded x0 as a "sample" prediction, so eps is
        re-derived from it and the rest of the step (classifier shift, update) follows."""
        combine = {k: kwargs[k] for k in ("alpha", "sigma", "prediction_type") if k in kwargs}
        combine.update({k: v for k, v in kwargs.items()
                        if k.startswith(("guidance_", "apg", "cfg_")) or k == "log_variance_range"})
        x0 = ops.guided_step(model_output, x, **combine, k_x0=1.0, out=scratch)
        flat = x0.abs().flatten(1)
        k = max(1, min(flat.shape[1], math.ceil(self.dynamic_threshold * flat.shape[1])))
        s = flat.kthvalue(k, dim=1).values.clamp_min(1.0).reshape(-1, *([1] * (x0.dim() - 1)))
        thresholded = torch.maximum(torch.minimum(x0, s), -s) / s
        if model_output.shape[1] == 2 * x.shape[1]:  # keep the learned variance channels
            thresholded = torch.cat([thresholded, model_output[: len(x), x.shape[1]:]], dim=1)
        step = {k: v for k, v in kwargs.items()
                if not k.startswith(("guidance_", "apg", "cfg_")) and k not in ("prediction_type", "clip_denoised")}
        return thresholded, dict(step, prediction_type="sample", clip_denoised=False)


def _model_null_label(model) -> int | None:
    """The model's unconditional label, when it has one (fastguide UNet with null_class)."""
    return model.num_classes if getattr(model, "null_class", False) else None


def _model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def sample(
    model: Model,
    shape: Sequence[int],
    *,
    labels: Tensor | None = None,
    sampler: str = "dpm++2m",
    steps: int | str | Sequence[int] = 25,
    schedule: NoiseSchedule | None = None,
    guidance=None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    progress: bool = False,
    prediction_type: str = "epsilon",
    variance_type: str | None = None,
    null_label: int | None = None,
    dynamic_threshold: float | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw samples of ``shape`` from ``model(x_t, t, y) -> prediction`` (ADM's signature).

    Args:
        labels: (B,) class indices; required by CFG and classifier guidance.
        sampler: "ddim", "ddpm", "euler" or "dpm++2m".
        steps: a count, ADM's "ddimN", or an explicit list of original timesteps.
        schedule: the training schedule (default ADM's linear schedule over 1000 steps).
        guidance: None, ``CFG(...)``, ``ClassifierGuidance(...)`` or a tuple of both.
        eta: DDIM's stochasticity (0 = deterministic).
        clip_denoised: clip the predicted x0 to [−1, 1] at every step.
        generator, noise: the random stream; ``noise`` is x_T. Same generator, same samples.
        prediction_type: "epsilon", "v_prediction" or "sample".
        variance_type: for "ddpm": "fixed_small", "fixed_large" or "learned_range"
            (default: learned_range when the model outputs 2C channels).
        null_label: the unconditional label (default: the model's ``null_label``).
        dynamic_threshold: Imagen's dynamic thresholding percentile (e.g. 0.995) instead of
            static clipping: x0 ← clamp(x0, −s, s)/s, s = max(1, that percentile of |x0|).

    Returns x_0 of ``shape``.
    """
    sampler_ = GuidedSampler(
        model, sampler=sampler, steps=steps, schedule=schedule, guidance=guidance, eta=eta,
        clip_denoised=clip_denoised, prediction_type=prediction_type, variance_type=variance_type,
        null_label=null_label, dynamic_threshold=dynamic_threshold,
    )
    return sampler_(shape, labels=labels, generator=generator, noise=noise, device=device, progress=progress)

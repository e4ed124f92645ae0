"""Solvers: a sampler's whole job is per-step scalars; ops.guided_step moves the bytes.

Each step goes from original timestep t to t_next (−1 = clean data) and is one call of
    x_next = k_x·x + k_x0·x0 + k_eps·eps + Σⱼ k_history[j]·x0₍ᵢ₋₁₋ⱼ₎ + k_noise·z (+ ADM's mean shift)
where x0₍ᵢ₋₁₋ⱼ₎ is the x0 of the model call j + 1 calls back (the solver history),
with, writing a = √ᾱ, s = √(1 − ᾱ) and primes for t_next:
  ddim (Song et al.):   k_x0 = a', k_eps = √(1 − ᾱ' − σ_η²), k_noise = σ_η,
                        σ_η = η·√((1 − ᾱ')/(1 − ᾱ))·√(1 − ᾱ/ᾱ')
  ddpm (Ho et al.; ADM's variances): β = 1 − ᾱ/ᾱ', k_x0 = β·a'/(1 − ᾱ),
                        k_x = (1 − ᾱ')·√(1 − β)/(1 − ᾱ), k_noise = √Σ, Σ fixed small
                        (posterior), fixed large (β) or learned (ADM's learned range)
  euler (VP form of the probability-flow ODE in σ̃ = s/a):
                        k_x = a'/a, k_eps = a'·(σ̃' − σ̃)
  dpm++2m (Lu et al. 2022, DPM-Solver++(2M)): h = λ' − λ, φ = −a'·(e^{−h} − 1),
                        k_x = s'/s, k_x0 = φ·(1 + 1/2r), k_history = (−φ/2r,), r = h_prev/h;
                        first order (no history) at the first and the last step.
  dpm++2s (Lu et al. 2022, DPM-Solver++(2S)): two model calls per step, the second at
                        the grid timestep s whose λ is closest to the midpoint (r = (λ_s − λ)/h):
                        u = (s_s/s)·x − a_s·(e^{−rh} − 1)·D,  then from D_s at (u, s)
                        x' = (s'/s)·x + φ·(1 − 1/2r)·D + φ/2r·D_s. The second call holds u as x
                        and D as its history, so x = (s/s_s)·(u + a_s·(e^{−rh} − 1)·D) turns that into
                        k_x = s'/s_s, k_x0 = φ/2r, k_history = ((s'/s_s)·a_s·(e^{−rh} − 1) + φ·(1 − 1/2r),).
                        First order where no grid timestep lies between t and t', and at the last step.
A sampler is a choice of these numbers; nothing else differs. A plan holds one entry per
model call: dpm++2s has two per step (2·steps − 1 calls in all).
"""


from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..ops.contract import StepCoefficients
from .schedule import NoiseSchedule

SAMPLERS = ("ddim", "ddpm", "euler", "dpm++2m", "dpm++2s")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


@dataclass(frozen=True)
class StepPlan:
    """The scalars of one model call from original timestep t to t_next (−1 = clean data)."""

    t: int
    t_next: int
    k_x: float = 0.0
    k_x0: float = 0.0
    k_eps: float = 0.0
    k_history: tuple[float, ...] = ()  # the earlier calls' x0, most recent first
    k_noise: float = 0.0
    variance: float = 0.0  # Σ of an ancestral step: ADM's classifier mean shift is Σ·s·∇
    log_variance_range: tuple[float, float] | None = None  # learned Σ (ADM's learned range)
    ancestral: bool = False

    def coefficients(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str,
        clip_denoised: bool,
        learned_variance: bool,
        classifier_scale: float = 0.0,
    ) -> StepCoefficients:
        """This call's ``StepCoefficients``. Classifier guidance at scale s enters as ADM
        applies it: the mean shift Σ·s·∇ (k_grad) of an ancestral step, else the eps
        shift σ_t·s·∇ (grad_eps_scale)."""
        alpha, sigma = schedule.alpha_sigma(self.t)
        k_grad = classifier_scale * self.variance if self.ancestral else 0.0
        grad_eps_scale = 0.0 if self.ancestral else classifier_scale * sigma
        return StepCoefficients(
            alpha=alpha, sigma=sigma, k_x=self.k_x, k_x0=self.k_x0, k_eps=self.k_eps, k_noise=self.k_noise,
            k_grad=k_grad, grad_eps_scale=grad_eps_scale, k_history=self.k_history,
            prediction_type=prediction_type, clip_denoised=clip_denoised,
            log_variance_range=self.log_variance_range if learned_variance else None,
        )


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
    return StepPlan(t, t_next, k_x=sigma_next / sigma, k_x0=phi * (1 + 1 / (2 * r)), k_history=(-phi / (2 * r),)), h


def _log_snr_midpoint(schedule: NoiseSchedule, t: int, t_next: int) -> int | None:
    """The grid timestep strictly between t_next and t whose λ is closest to the midpoint
    of λ_t and λ_t_next; None when no timestep lies between them."""
    if t - t_next < 2:
        return None
    target = 0.5 * (schedule.log_snr(t) + schedule.log_snr(t_next))
    low, high = t_next + 1, t - 1  # λ falls as t grows: find the first t with λ_t ≤ target
    while low < high:
        middle = (low + high) // 2
        if schedule.log_snr(middle) <= target:
            high = middle
        else:
            low = middle + 1
    candidates = [c for c in (low - 1, low) if t_next < c < t]
    return min(candidates, key=lambda c: abs(schedule.log_snr(c) - target))


def _dpm_pp_2s(schedule: NoiseSchedule, t: int, t_next: int) -> list[StepPlan]:
    (_, sigma), (alpha_next, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
    if sigma_next == 0:  # the last step lands on the clean data: first order gives x0
        return [StepPlan(t, t_next, k_x0=1.0)]
    h = schedule.log_snr(t_next) - schedule.log_snr(t)
    phi = -alpha_next * math.expm1(-h)
    mid = _log_snr_midpoint(schedule, t, t_next)
    if mid is None:
        return [StepPlan(t, t_next, k_x=sigma_next / sigma, k_x0=phi)]
    alpha_mid, sigma_mid = schedule.alpha_sigma(mid)
    rh = schedule.log_snr(mid) - schedule.log_snr(t)
    r = rh / h
    to_mid = StepPlan(t, mid, k_x=sigma_mid / sigma, k_x0=-alpha_mid * math.expm1(-rh))
    from_mid = StepPlan(
        mid, t_next, k_x=sigma_next / sigma_mid, k_x0=phi / (2 * r),
        k_history=(sigma_next / sigma_mid * alpha_mid * math.expm1(-rh) + phi * (1 - 1 / (2 * r)),),
    )
    return [to_mid, from_mid]


def plan_steps(
    sampler: str,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    variance_type: str = "fixed_small",
) -> list[StepPlan]:
    """The scalars of each model call of ``sampler`` over ``timesteps`` (descending
    original t): one plan per step, two per step for dpm++2s."""
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
    if sampler == "dpm++2s":
        return [plan for t, t_next in pairs for plan in _dpm_pp_2s(schedule, t, t_next)]
    plans, h_prev = [], None
    for t, t_next in pairs:
        plan, h_prev = _dpm_pp_2m(schedule, t, t_next, h_prev)
        plans.append(plan)
    return plans

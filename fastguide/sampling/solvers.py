"""Solvers: a sampler's whole job is per-step scalars; ops.guided_step moves the bytes.

Each model call goes from time t to t_next (−1 = clean data; the last step's t_next is
``final_timestep``, see ``plan_steps``) and is one call of
    x_next = k_x·x + k_x0·x0 + k_eps·eps + Σⱼ k_history[j]·x0₍ᵢ₋₁₋ⱼ₎ + k_x_previous·x₍ᵢ₋₁₎ + k_noise·z
(+ ADM's mean shift) where x0₍ᵢ₋₁₋ⱼ₎ is the x0 of the model call j + 1 calls back (the solver
history) and x₍ᵢ₋₁₎ the previous call's x (heun's second call reads it). Writing
a, s for α_t, σ_t (x = a·x0 + s·eps), primes for t_next, λ = log(a/s), h = λ' − λ,
σ̃ = s/a (EDM's noise level) and mᵢ for call i's x0:
  ddim (Song et al.):   k_x0 = a', k_eps = √(s'² − σ_η²), k_noise = σ_η,
                        σ_η = η·√((1 − ᾱ')/(1 − ᾱ))·√(1 − ᾱ/ᾱ') (η > 0 on VP schedules only)
  ddpm (Ho et al.; ADM's variances): β = 1 − ᾱ/ᾱ', k_x0 = β·a'/(1 − ᾱ),
                        k_x = (1 − ᾱ')·√(1 − β)/(1 − ᾱ), k_noise = √Σ, Σ fixed small
                        (posterior), fixed large (β) or learned (ADM's learned range)
  euler:                the probability-flow ODE dx̃/dσ̃ = eps in x̃ = x/a (VP):
                        k_x = a'/a, k_eps = a'·(σ̃' − σ̃); on a flow path dx/dσ = v = eps − x0:
                        k_x = 1, k_eps = −k_x0 = σ' − σ (diffusers' FlowMatchEuler)
  euler-ancestral (k-diffusion, η = 1; VP): σ_up = σ̃'·√(1 − σ̃'²/σ̃²), σ_down = √(σ̃'² − σ_up²),
                        k_x = a'/a, k_eps = a'·(σ_down − σ̃), k_noise = a'·σ_up
  heun (EDM's second order, two calls per step, Euler on a last one to x0): the first call,
                        at x_A, is an Euler step to x_E at t'; the second, at (x_E, t'),
                        averages the two slopes. With h = σ̃' − σ̃, x̃_E = x̃_A + h·d_A, so
                        x̃' = x̃_A + (h/2)·(d_A + d_B) = (x̃_A + x̃_E)/2 + (h/2)·eps_B:
                        k_x_previous = a'/(2a), k_x = ½, k_eps = a'·h/2 (VP; on a flow path
                        x' = (x_A + x_E)/2 + ((σ' − σ)/2)·(eps_B − m_B), the velocity).
  dpm++2m, dpm++3m (Lu et al. 2022, DPM-Solver++ multistep; diffusers' formulas):
                        x' = (s'/s)·x + a'·φ₁·m₀ + a'·φ₂·D₁ − a'·φ₃·D₂ with φ₁ = 1 − e^{−h},
                        φ₂ = (e^{−h} − 1)/h + 1, φ₃ = (e^{−h} − 1 + h)/h² − ½, rₖ = hₖ/h the
                        earlier steps' λ-lengths over this one's, D₁ = (m₀ − m₁)/r₀ + r₀/(r₀ + r₁)·
                        ((m₀ − m₁)/r₀ − (m₁ − m₂)/r₁), D₂ = ((m₀ − m₁)/r₀ − (m₁ − m₂)/r₁)/(r₀ + r₁);
                        2M uses ½·a'φ₁·(m₀ − m₁)/r₀ in place of both (the midpoint form).
  dpm++2m-sde (the SDE variant, η = 1, midpoint; VP): k_x = (s'/s)·e^{−h},
                        φ = 1 − e^{−2h} in place of φ₁ above, k_noise = s'·√φ
  dpm++2s (DPM-Solver++(2S)): two model calls per step, the second at the time s whose λ
                        is closest to the midpoint (on a discrete schedule, a grid timestep):
                        u = (s_s/s)·x − a_s·(e^{−rh} − 1)·D,  then from D_s at (u, s)
                        x' = (s'/s)·x + φ·(1 − 1/2r)·D + φ/2r·D_s, φ = a'·φ₁. The second call
                        holds u as x and D as its history, so x = (s/s_s)·(u + a_s·(e^{−rh} − 1)·D)
                        gives k_x = s'/s_s, k_x0 = φ/2r, k_history = ((s'/s_s)·a_s·(e^{−rh} − 1) + φ·(1 − 1/2r),).
  unipc (Zhao et al. 2023, UniPC with B(h) = e^{−h} − 1, "bh2"; diffusers' formulas):
                        the predictor UniP-p, x' = (s'/s)·x_c + a'·φ₁·m₀ − a'·B(h)·Σₖ ρₖ·(mₖ − m₀)/rₖ,
                        runs from the corrected x_c = x − a·B(h₋)·(Σₖ (ρᶜₖ − ρᵖₖ)·Dₖ + ρᶜ_p·(m₀ − m₁))
                        (UniC-p of the step that led here: the same slopes Dₖ plus the new
                        model output at no extra call), so both fold into one update of x.
                        Here rₖ = (λ₍ᵢ₋ₖ₎ − λᵢ)/h < 0 (call k back, over this step's h)
                        and the ρ solve Σₖ ρₖ·rₖ^(j−1) = j!·(−h)·φ_{j+1}(−h)/B(h), j = 1 …
                        order (the corrector adds r = 1, this call's point), with the
                        exponential-integrator φ₁(z) = (e^z − 1)/z, φ_{j+1}(z) =
                        (φ_j(z) − 1/j!)/z; ρ = ½ for UniP-2 and UniC-1.
  euler-maruyama (SiT's SDE on a flow path, diffusion w = σ, last step its mean):
                        Δ = σ − σ', k_x = 1, k_x0 = Δ, k_eps = −2Δ, k_noise = √(2σΔ);
                        the last step, to σ = 0, is the same mean without noise.
The multistep solvers drop to lower orders where the history is short (the first steps),
across a step from pure noise (λ = −∞, a flow path's start), at the last step, which is
first order and lands on the final x0 (when it lands on a timestep instead, ``final_timestep``
≥ 0: first order below 15 steps for the dpm++ family, always for unipc, as diffusers'
lower_order_final with final_sigmas_type="sigma_min"), and, for dpm++3m on fewer than 15
steps and unipc always, at the step before it (diffusers' lower_order_final).
A sampler is a choice of these numbers; nothing else differs. Each one below writes its
update as the formula above reads, a ``Combination`` (combination.py) of X (x), EPS, NOISE
(z) and mₖ = x0(k), whose coefficients are the plan's k_* (``Combination.kernel_coefficients``).
A plan holds one entry per model call: dpm++2s and heun have up to two per step (one
where the last lands on the clean data; dpm++2s also where no timestep lies strictly
inside the step, or it starts from a flow path's pure noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from ..ops.contract import StepCoefficients
from .combination import EPS, NOISE, ZERO, Combination, X, x0
from .schedule import FlowSchedule, NoiseSchedule

SAMPLERS = (
    "ddim",
    "ddpm",
    "euler",
    "euler-ancestral",
    "heun",
    "dpm++2m",
    "dpm++2m-sde",
    "dpm++2s",
    "dpm++3m",
    "unipc",
    "euler-maruyama",
)
# Samplers that need a variance-preserving schedule (ᾱ, or its σ̃ noise model), and the one
# that needs a flow path.
VP_ONLY = ("ddpm", "euler-ancestral", "dpm++2m-sde")
FLOW_ONLY = ("euler-maruyama",)
# Samplers that make two model calls per step (the second a corrector or a midpoint).
TWO_CALL_SAMPLERS = ("heun", "dpm++2s")
# Samplers whose noise is drawn in float32 (then cast to the loop's dtype), as diffusers'
# DPM-Solver SDE draws it whatever the latents' dtype: the same generator then gives a
# float16 or float64 loop diffusers' noise. The others draw in the loop's dtype, as
# diffusers' DDPM, DDIM and Euler ancestral do.
FLOAT32_NOISE_SAMPLERS = ("dpm++2m-sde",)
# The global order of accuracy of each deterministic sampler on the probability-flow ODE, as
# built (and as in diffusers): UniPC-p with its corrector is of order p + 1, but both
# multistep families warm up with lower orders, and one first-order step (DPM-Solver++(3M)'s
# first) or one UniP-1 + UniC-1 step (UniPC's first) caps the global order at 2 and 3.
ORDERS = {
    "ddim": 1,
    "euler": 1,
    "heun": 2,
    "dpm++2m": 2,
    "dpm++2s": 2,
    "dpm++3m": 2,
    "unipc-1": 2,
    "unipc-2": 3,
    "unipc-3": 3,
}
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
# Below this many steps diffusers lowers DPM-Solver++(3M)'s step before the last to second
# order, and a DPM-Solver++ last step that lands on a timestep (final_timestep ≥ 0) to first.
LOWER_ORDER_SECOND_BELOW = 15


@dataclass(frozen=True)
class StepPlan:
    """The scalars of one model call from time t to t_next (−1 = clean data, else a time
    of the schedule)."""

    t: float
    t_next: float
    k_x: float = 0.0
    k_x0: float = 0.0
    k_eps: float = 0.0
    k_history: tuple[float, ...] = ()  # the earlier calls' x0, most recent first
    k_x_previous: float = 0.0  # the previous call's x, which the loop keeps (heun's second call)
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
        shift eps ← eps − σ_t·s·∇ (grad_eps_scale = s·σ_t), x0 re-derived from it, not clipped again."""
        alpha, sigma = schedule.alpha_sigma(self.t)
        k_grad = classifier_scale * self.variance if self.ancestral else 0.0
        grad_eps_scale = 0.0 if self.ancestral else classifier_scale * sigma
        return StepCoefficients(
            alpha=alpha,
            sigma=sigma,
            k_x=self.k_x,
            k_x0=self.k_x0,
            k_eps=self.k_eps,
            k_noise=self.k_noise,
            k_grad=k_grad,
            grad_eps_scale=grad_eps_scale,
            # the kept previous x is read as one more history slot, after the x0s
            k_history=self.k_history + ((self.k_x_previous,) if self.k_x_previous else ()),
            prediction_type=prediction_type,
            clip_denoised=clip_denoised,
            log_variance_range=self.log_variance_range if learned_variance else None,
        )


# The x0 of this model call and of the two before it, as the papers name them (mₖ = x0(k)).
m0, m1, m2 = x0(0), x0(1), x0(2)


def _plan(t: float, t_next: float, x_next: Combination) -> StepPlan:
    """The plan of the call from t to t_next whose update is ``x_next``."""
    return StepPlan(t, t_next, **x_next.kernel_coefficients())


# --------------------------------------------------------------------------------------
# One-step samplers
# --------------------------------------------------------------------------------------


def _ddim(schedule: NoiseSchedule, t: float, t_next: float, eta: float) -> StepPlan:
    """DDIM (Song et al., eq. 12): x' = a'·m₀ + √(s'² − σ_η²)·eps + σ_η·z."""
    alpha_next, sigma_next = schedule.alpha_sigma(t_next)
    sigma_eta = 0.0
    if eta:
        abar, abar_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        sigma_eta = eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
    x_next = alpha_next * m0 + math.sqrt(max(0.0, sigma_next**2 - sigma_eta**2)) * EPS + sigma_eta * NOISE
    return _plan(t, t_next, x_next)


def _posterior_variance(schedule: NoiseSchedule, t: float, t_next: float) -> float:
    abar, abar_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
    return (1 - abar / abar_next) * (1 - abar_next) / (1 - abar)


def _ddpm(schedule: NoiseSchedule, t: float, t_next: float, variance_type: str, clipped_variance: float) -> StepPlan:
    """DDPM's ancestral step (Ho et al., eq. 7): the posterior mean
    μ̃ = β·√ᾱ'/(1 − ᾱ)·m₀ + (1 − ᾱ')·√(1 − β)/(1 − ᾱ)·x, plus √Σ·z."""
    abar, abar_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
    beta = 1 - abar / abar_next
    posterior = _posterior_variance(schedule, t, t_next)
    # ADM clips the posterior log-variance of the last step (log 0) to that of the one before
    # (learned_range interpolates from it); its fixed_large variance there is that clipped
    # one, its fixed_small variance the unclipped 0, so classifier guidance's mean shift
    # Σ·s·∇ is zero at that step.
    small = posterior if t_next >= 0 else clipped_variance
    mean = beta * math.sqrt(abar_next) / (1 - abar) * m0 + (1 - abar_next) * math.sqrt(1 - beta) / (1 - abar) * X
    if variance_type == "learned_range":  # the kernel scales z by exp(ℓ/2), ℓ the learned log Σ
        x_next = mean + NOISE if t_next >= 0 else mean
        return StepPlan(
            t,
            t_next,
            **x_next.kernel_coefficients(),
            ancestral=True,
            variance=1.0,
            log_variance_range=(math.log(small), math.log(beta)),
        )
    if variance_type == "fixed_small":
        variance = posterior  # (0 at the last step)
    else:
        variance = beta if t_next >= 0 else clipped_variance
    x_next = mean + math.sqrt(variance) * NOISE if t_next >= 0 else mean
    return StepPlan(t, t_next, **x_next.kernel_coefficients(), ancestral=True, variance=variance)


def _euler(schedule: NoiseSchedule, t: float, t_next: float) -> StepPlan:
    """An Euler step of the probability-flow ODE: in x̃ = x/a and σ̃ on a VP schedule
    (k-diffusion's sample_euler), in x and σ on a flow path (diffusers' FlowMatchEuler)."""
    (alpha, sigma), (alpha_next, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
    if schedule.is_flow:  # dx/dσ = v = eps − x0: x' = x + (σ' − σ)·v
        return _plan(t, t_next, X + (sigma_next - sigma) * (EPS - m0))
    # dx̃/dσ̃ = eps: x̃' = x̃ + (σ̃' − σ̃)·eps, and x' = a'·x̃'
    edm, edm_next = sigma / alpha, sigma_next / alpha_next
    return _plan(t, t_next, (alpha_next / alpha) * X + alpha_next * (edm_next - edm) * EPS)


def _euler_ancestral(schedule: NoiseSchedule, t: float, t_next: float) -> StepPlan:
    """k-diffusion's sample_euler_ancestral (η = 1) in x̃ = x/a: down to σ_down by Euler,
    then up to σ̃' with fresh noise σ_up·z."""
    (alpha, sigma), (alpha_next, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
    edm, edm_next = sigma / alpha, sigma_next / alpha_next
    up = edm_next * math.sqrt(max(0.0, 1 - edm_next**2 / edm**2))
    down = math.sqrt(max(0.0, edm_next**2 - up**2))
    # x̃' = x̃ + (σ_down − σ̃)·eps + σ_up·z, and x' = a'·x̃'
    return _plan(t, t_next, (alpha_next / alpha) * X + alpha_next * (down - edm) * EPS + alpha_next * up * NOISE)


def _euler_maruyama(schedule: NoiseSchedule, t: float, t_next: float) -> StepPlan:
    """SiT's Euler–Maruyama step in its time τ = 1 − σ (dτ = Δ = σ − σ'), diffusion w = σ:
    drift v + σ·score = (x0 − eps) − eps, noise √(2σ)·√Δ·z (none on the last step)."""
    (_, sigma), (_, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
    delta = sigma - sigma_next
    drift = m0 - 2 * EPS
    noise = math.sqrt(2 * sigma * delta) if t_next >= 0 else 0.0
    return _plan(t, t_next, X + delta * drift + noise * NOISE)


def _heun(schedule: NoiseSchedule, t: float, t_next: float) -> list[StepPlan]:
    """EDM's Heun step (Karras et al., Alg. 1): an Euler call to x_E at t', then a second
    call at (x_E, t') that averages the two slopes."""
    euler = _euler(schedule, t, t_next)
    if t_next < 0:  # the last step lands on the clean data: Euler there
        return [euler]
    (alpha, sigma), (alpha_next, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
    x_A, x_E = X.shift(), X  # the second call runs at x_E and reads the first call's x, x_A
    # x̃' = x̃_A + (h/2)·(d_A + d_B) with h = σ̃' − σ̃ in x̃ = x/a; the Euler call made
    # x̃_E = x̃_A + h·d_A, so x̃' = (x̃_A + x̃_E)/2 + (h/2)·d_B, d_B this call's slope: eps in
    # x̃ (v = eps − x0 on a flow path, in x and σ). (Written in m_A − m_B, the slope
    # difference divides by σ̃', and x_E's and m_A's rounding grew by 1/σ̃' near the data.)
    if schedule.is_flow:
        return [euler, _plan(t_next, t_next, (x_A + x_E) / 2 + (sigma_next - sigma) / 2 * (EPS - m0))]
    edm, edm_next = sigma / alpha, sigma_next / alpha_next
    x_next = alpha_next * ((x_A / alpha + x_E / alpha_next) / 2 + (edm_next - edm) / 2 * EPS)
    return [euler, _plan(t_next, t_next, x_next)]


# --------------------------------------------------------------------------------------
# Multistep samplers: the grid's log-SNRs, how much history each step can use
# --------------------------------------------------------------------------------------


def _usable_history(log_snrs: Sequence[float], i: int) -> int:
    """How many calls before call i a multistep formula may read: those after the last
    point of infinite λ (pure noise), whose slopes would enter with an infinite ratio."""
    count = 0
    while count < i and math.isfinite(log_snrs[i - 1 - count]):
        count += 1
    return count if math.isfinite(log_snrs[i]) else 0


def _dpm_multistep(
    schedule: NoiseSchedule, timesteps: Sequence[float], final_timestep: int, order: int, noise: bool = False
) -> list[StepPlan]:
    """DPM-Solver++(2M) or (3M) over the grid (order 2 or 3), its last step to
    ``final_timestep``; with ``noise`` the 2M SDE variant (η = 1): φ₁ = 1 − e^{−2h}, x
    scaled by e^{−h} more, and noise s'·√φ₁. As diffusers' DPMSolverMultistepScheduler
    (its dpm_solver_first_order_update and multistep_dpm_solver_{second,third}_order_update,
    "midpoint")."""
    points = list(timesteps) + [final_timestep]
    log_snrs = [schedule.log_snr(t) for t in points]
    steps = len(timesteps)
    plans = []
    for i, (t, t_next) in enumerate(zip(points, points[1:])):
        if t_next < 0:  # the last step lands on the clean data: first order gives x0
            plans.append(_plan(t, t_next, m0))
            continue
        (_, sigma), (alpha_next, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
        h = log_snrs[i + 1] - log_snrs[i]
        used = min(order, 1 + _usable_history(log_snrs, i))
        if i >= steps - 2 and steps < LOWER_ORDER_SECOND_BELOW:
            # the step before the last at most second order; the last (here only when it
            # lands on a timestep, final_timestep ≥ 0) first order
            used = min(used, steps - i)
        phi_1 = -math.expm1(-2 * h if noise else -h)  # 1 − e^{−h}; the SDE's 1 − e^{−2h}
        ratio = sigma_next / sigma * (math.exp(-h) if noise else 1.0)  # s'/s; the SDE's (s'/s)·e^{−h}
        if used == 1:  # DPM-Solver++(1): x' = (s'/s)·x + a'·φ₁·m₀
            x_next = ratio * X + alpha_next * phi_1 * m0
        elif used == 2:  # (2M), the midpoint form
            r0 = (log_snrs[i] - log_snrs[i - 1]) / h
            d1 = (m0 - m1) / r0
            x_next = ratio * X + alpha_next * phi_1 * m0 + 0.5 * alpha_next * phi_1 * d1
        else:  # (3M)
            r0, r1 = (log_snrs[i] - log_snrs[i - 1]) / h, (log_snrs[i - 1] - log_snrs[i - 2]) / h
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = math.expm1(-h) / h + 1
            phi_3 = (math.expm1(-h) + h) / h**2 - 0.5
            x_next = ratio * X + alpha_next * phi_1 * m0 + alpha_next * phi_2 * d1 - alpha_next * phi_3 * d2
        if noise:
            x_next = x_next + sigma_next * math.sqrt(phi_1) * NOISE
        plans.append(_plan(t, t_next, x_next))
    return plans


def _unipc_rhos(rks: Sequence[float], hh: float, order: int, corrector: bool) -> list[float]:
    """UniPC's ρ (bh2): solve Σₖ ρₖ·rₖ^(j−1) = b_j for j = 1 … order, over the earlier
    points' r (and r = 1, this call's, for the corrector), with b_j = j!·hh·φ_{j+1}(hh)/B(h),
    hh = −h and φ_{j+1} the exponential integrator's (φ₁(z) = (e^z − 1)/z)."""
    if order == 1:
        return [0.5] if corrector else []
    if order == 2 and not corrector:
        return [0.5]
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    rows, rhs = [], []
    points = np.array(list(rks) + [1.0])
    for j in range(1, order + 1):
        rows.append(points ** (j - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    matrix, vector = np.array(rows), np.array(rhs)
    if corrector:
        return [float(rho) for rho in np.linalg.solve(matrix, vector)]
    return [float(rho) for rho in np.linalg.solve(matrix[:-1, :-1], vector[:-1])]


def _unipc(schedule: NoiseSchedule, timesteps: Sequence[float], final_timestep: int, order: int) -> list[StepPlan]:
    """UniPC-p (bh2) with its corrector folded into each next update, its last step to
    ``final_timestep``. As diffusers' UniPCMultistepScheduler (multistep_uni_p_bh_update
    and multistep_uni_c_bh_update, predict_x0)."""
    points = list(timesteps) + [final_timestep]
    log_snrs = [schedule.log_snr(t) for t in points]
    steps = len(timesteps)
    plans = []
    correction = ZERO  # UniC − UniP of the step that led here, in its own call's symbols
    for i, (t, t_next) in enumerate(zip(points, points[1:])):
        # The step that led here predicted this call's x by UniP; its UniC, which reads this
        # call's x0 too (at no extra model call), corrects it: x_c = x + (UniC − UniP), in this
        # call's symbols (the previous call's m₀ is this one's m₁, its x0(−1) this one's m₀).
        x_c = X + correction.shift()
        if t_next < 0:  # the last step lands on the clean data: x' = m₀, no corrector term survives
            plans.append(_plan(t, t_next, m0))
            continue
        (_, sigma), (alpha_next, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
        h = log_snrs[i + 1] - log_snrs[i]
        used = min(order, steps - i, 1 + _usable_history(log_snrs, i))
        hh = -h
        h_phi_1 = math.expm1(hh)  # e^{−h} − 1
        b_h = math.expm1(hh)  # B(h) of "bh2"
        rks = [(log_snrs[i - k] - log_snrs[i]) / h for k in range(1, used)]
        slopes = [(x0(k) - m0) / r_k for k, r_k in enumerate(rks, start=1)]  # Dₖ = (mₖ − m₀)/rₖ
        rhos_p = _unipc_rhos(rks, hh, used, corrector=False)
        rhos_c = _unipc_rhos(rks, hh, used, corrector=True)
        x_first = (sigma_next / sigma) * x_c - alpha_next * h_phi_1 * m0  # the first-order update
        # UniP-p: x' = (s'/s)·x_c + a'·φ₁·m₀ − a'·B(h)·Σₖ ρᵖₖ·Dₖ
        uni_p = x_first - alpha_next * b_h * sum((rho * d for rho, d in zip(rhos_p, slopes)), ZERO)
        # UniC-p: the same with ρᶜ, plus the slope to the next call's x0, D_p = m₋₁ − m₀
        d_next = x0(-1) - m0
        uni_c = x_first - alpha_next * b_h * (
            sum((rho * d for rho, d in zip(rhos_c, slopes)), ZERO) + rhos_c[-1] * d_next
        )
        plans.append(_plan(t, t_next, uni_p))
        correction = uni_c - uni_p
    return plans


# --------------------------------------------------------------------------------------
# DPM-Solver++(2S)
# --------------------------------------------------------------------------------------


def _log_snr_midpoint(schedule: NoiseSchedule, t: float, t_next: float) -> float | None:
    """The time strictly between t_next and t whose λ is closest to the midpoint of λ_t and
    λ_t_next: exact on a flow path, the nearest integer timestep on a discrete schedule (t
    and t_next may be fractional); None when there is none (no integer strictly between,
    or a step from pure noise)."""
    target = 0.5 * (schedule.log_snr(t) + schedule.log_snr(t_next))
    if not math.isfinite(target):
        return None
    if isinstance(schedule, FlowSchedule):
        return schedule.time_of_log_snr(target)
    low, high = math.floor(t_next) + 1, math.ceil(t) - 1  # λ falls as t grows: find the first t with λ_t ≤ target
    if low > high:
        return None
    while low < high:
        middle = (low + high) // 2
        if schedule.log_snr(middle) <= target:
            high = middle
        else:
            low = middle + 1
    candidates = [c for c in (low - 1, low) if t_next < c < t]
    return min(candidates, key=lambda c: abs(schedule.log_snr(c) - target))


def _dpm_pp_2s(schedule: NoiseSchedule, t: float, t_next: float) -> list[StepPlan]:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1 with r = the midpoint's λ-fraction): a call
    at (x, t) giving D, one at (u, s) giving D_s."""
    (_, sigma), (alpha_next, sigma_next) = schedule.alpha_sigma(t), schedule.alpha_sigma(t_next)
    if sigma_next == 0:  # the last step lands on the clean data: first order gives x0
        return [_plan(t, t_next, m0)]
    h = schedule.log_snr(t_next) - schedule.log_snr(t)
    phi = -alpha_next * math.expm1(-h)  # a'·φ₁
    mid = _log_snr_midpoint(schedule, t, t_next)
    if mid is None:  # DPM-Solver++(1)
        return [_plan(t, t_next, (sigma_next / sigma) * X + phi * m0)]
    alpha_mid, sigma_mid = schedule.alpha_sigma(mid)
    rh = schedule.log_snr(mid) - schedule.log_snr(t)
    r = rh / h
    # The first call, at (x, t), its x0 D = m₀: u = (s_s/s)·x − a_s·(e^{−rh} − 1)·D
    u = (sigma_mid / sigma) * X - alpha_mid * math.expm1(-rh) * m0
    # The second call runs at (u, s): X is u, m₀ is D_s and m₁ is D, so the step's start is
    # x = (s/s_s)·(u + a_s·(e^{−rh} − 1)·D), and x' = (s'/s)·x + φ·(1 − 1/2r)·D + φ/2r·D_s
    D, D_s = m1, m0
    x = (sigma / sigma_mid) * (X + alpha_mid * math.expm1(-rh) * D)
    x_next = (sigma_next / sigma) * x + phi * (1 - 1 / (2 * r)) * D + phi / (2 * r) * D_s
    return [_plan(t, mid, u), _plan(mid, t_next, x_next)]


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def check_sampler(sampler: str, schedule: NoiseSchedule, eta: float = 0.0, solver_order: int | None = None) -> None:
    """Refuses a sampler the schedule cannot run, or a setting it does not take, with the
    reason: ``sampler`` one of SAMPLERS and meant for the schedule's kind (VP_ONLY,
    FLOW_ONLY); ``eta`` a number in [0, 1] (0 deterministic, 1 DDPM's posterior variance;
    beyond, DDIM's noise would exceed σ_t'), nonzero only for "ddim" on a VP schedule;
    ``solver_order`` None or an int (not a bool) 1, 2 or 3, for "unipc" only."""
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta (DDIM's stochasticity) must be a number in [0, 1], got {eta!r}")
    if schedule.is_flow and sampler in VP_ONLY:
        raise ValueError(
            f"sampler={sampler!r} needs a variance-preserving schedule; on a flow schedule use one of "
            f"{tuple(s for s in SAMPLERS if s not in VP_ONLY)}"
        )
    if not schedule.is_flow and sampler in FLOW_ONLY:
        raise ValueError(f"sampler={sampler!r} (SiT's SDE) needs a flow schedule, NoiseSchedule.flow()")
    if schedule.is_flow and eta:
        raise ValueError(
            "eta (DDIM's stochasticity) is defined on variance-preserving schedules; on a flow "
            "schedule use sampler='euler-maruyama' for a stochastic sampler"
        )
    if eta and sampler != "ddim":
        raise ValueError(f"eta (DDIM's stochasticity) applies to sampler='ddim', got sampler={sampler!r}")
    if solver_order is not None:
        if isinstance(solver_order, bool) or not isinstance(solver_order, Integral):
            raise TypeError(f"solver_order must be an int (1, 2 or 3) or None, got {solver_order!r}")
        if sampler != "unipc":
            raise ValueError(
                f"solver_order applies to sampler='unipc' (the others name their order), got sampler={sampler!r}"
            )
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")


def check_final_timestep(
    sampler: str, schedule: NoiseSchedule, timesteps: Sequence[float], final_timestep: int
) -> None:
    """Refuses a ``final_timestep`` the last step cannot land on: it must be an int (not a
    bool), −1 (the clean data, every sampler) or, for every sampler on a variance-preserving
    schedule (none on a flow path), an original timestep t_f with 0 ≤ t_f < the grid's last
    time and a larger log-SNR there (a step of nonzero λ-length)."""
    if isinstance(final_timestep, bool) or not isinstance(final_timestep, Integral):
        raise TypeError(
            f"final_timestep must be an int (-1, the clean data, or an original timestep), got {final_timestep!r}"
        )
    if final_timestep == -1:
        return
    if schedule.is_flow:
        raise ValueError(
            f"final_timestep={final_timestep!r} applies to variance-preserving schedules; on "
            f"{schedule!r} sampler={sampler!r} lands on the clean data (final_timestep=-1)"
        )
    last = timesteps[-1]
    if not 0 <= final_timestep < last:
        raise ValueError(
            f"final_timestep must be -1 (the clean data) or an original timestep in [0, {last!r}) "
            f"(below the grid's last time), got {final_timestep!r}"
        )
    schedule.check_grid([last, final_timestep], f"final_timestep={final_timestep!r} after the grid's last time")


def plan_steps(
    sampler: str,
    schedule: NoiseSchedule,
    timesteps: Sequence[float],
    *,
    eta: float = 0.0,
    variance_type: str = "fixed_small",
    solver_order: int | None = None,
    final_timestep: int = -1,
) -> list[StepPlan]:
    """The scalars of each model call of ``sampler`` over ``timesteps`` (descending): one
    plan per step, two per step for dpm++2s and heun but a last one onto the clean data.
    ``solver_order`` is UniPC's p (default 2, diffusers' default).

    ``final_timestep`` is where the last step lands: −1 (default) the clean data, α = 1,
    σ = 0, so the samples are the final x0; an original timestep t_f ≥ 0 below the grid
    (variance-preserving schedules, every sampler; ``check_final_timestep``) makes the last
    step an ordinary step of the sampler from the grid's last time to t_f, and the samples
    x_{t_f} = α_{t_f}·x0 + σ_{t_f}·ε: diffusers' DDIM with set_alpha_to_one=False (t_f = 0,
    ᾱ = alphas_cumprod[0]) and final_sigmas_type="sigma_min" (t_f = 0, σ̃ = σ̃_0). DDIM's
    last step is then x' = √ᾱ_{t_f}·x0 + √(1 − ᾱ_{t_f} − σ_η²)·eps + σ_η·z."""
    check_sampler(sampler, schedule, eta, solver_order)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    if variance_type != "fixed_small" and sampler != "ddpm":
        raise ValueError(
            f"variance_type applies to sampler='ddpm' (the others set their own noise), got sampler={sampler!r}"
        )
    check_final_timestep(sampler, schedule, timesteps, final_timestep)
    pairs = list(zip(timesteps, list(timesteps[1:]) + [final_timestep]))
    if sampler == "ddim":
        return [_ddim(schedule, t, t_next, eta) for t, t_next in pairs]
    if sampler == "euler":
        return [_euler(schedule, t, t_next) for t, t_next in pairs]
    if sampler == "euler-ancestral":
        return [_euler_ancestral(schedule, t, t_next) for t, t_next in pairs]
    if sampler == "euler-maruyama":
        return [_euler_maruyama(schedule, t, t_next) for t, t_next in pairs]
    if sampler == "ddpm":
        clipped = _posterior_variance(schedule, *pairs[-2]) if len(pairs) > 1 else schedule.betas[0].item()
        return [_ddpm(schedule, t, t_next, variance_type, clipped) for t, t_next in pairs]
    if sampler == "heun":
        return [plan for t, t_next in pairs for plan in _heun(schedule, t, t_next)]
    if sampler == "dpm++2s":
        return [plan for t, t_next in pairs for plan in _dpm_pp_2s(schedule, t, t_next)]
    if sampler == "dpm++2m-sde":
        return _dpm_multistep(schedule, timesteps, final_timestep, 2, noise=True)
    if sampler == "unipc":
        return _unipc(schedule, timesteps, final_timestep, solver_order or 2)
    return _dpm_multistep(schedule, timesteps, final_timestep, 2 if sampler == "dpm++2m" else 3)

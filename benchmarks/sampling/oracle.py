"""An exact oracle for guided sampling: Gaussian classes whose predictions and guided
probability-flow ODE are known in closed form.

Each element of x0 is N(μ_c, s_c²) under the class and N(μ_u, s_u²) unconditionally. For
x = α·x0 + σ·ε the posterior means are, per element,
    E[x0 | x] = μ + α·s²·(x − α·μ)/(α²s² + σ²),   E[ε | x] = σ·(x − α·μ)/(α²s² + σ²),
exact at every noise level (α = 0 included). CFG at weight w combines the two linearly, so
the guided velocity of a flow path, v = ε̂ − x̂0, and the guided eps of a VP path are affine
in x: the guided ODE's solution is x_end = Φ·x_start + ψ, with Φ and ψ integrated to 1e-12
by scipy. The ODE is solved to σ = 0 (the clean data): in σ on a flow path (dx/dσ = v),
in EDM's σ̃ = σ/α with x̃ = x/α on a VP one (dx̃/dσ̃ = ε̂, which holds to σ̃ = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from fastguide.sampling.schedule import NoiseSchedule


@dataclass(frozen=True)
class GaussianClasses:
    """The conditional and unconditional Gaussians, and the guidance weight."""

    w: float
    mean_c: float = 0.6
    std_c: float = 0.5
    mean_u: float = 0.0
    std_u: float = 0.8

    def posterior(self, x: Tensor, alpha: float, sigma: float, conditional: bool) -> tuple[Tensor, Tensor]:
        """(E[x0 | x], E[ε | x]) of one of the two Gaussians."""
        mean, std = (self.mean_c, self.std_c) if conditional else (self.mean_u, self.std_u)
        residual = (x - alpha * mean) / (alpha**2 * std**2 + sigma**2)
        return mean + alpha * std**2 * residual, sigma * residual

    def guided_posterior(self, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """(x̂0, ε̂) of CFG at weight w: u + w·(c − u) of each."""
        (x0_c, eps_c), (x0_u, eps_u) = (self.posterior(x, alpha, sigma, c) for c in (True, False))
        return x0_u + self.w * (x0_c - x0_u), eps_u + self.w * (eps_c - eps_u)

    def edm_denoise(self, x: Tensor, edm_sigma: float) -> Tensor:
        """The guided x̂0 as EDM's and k-diffusion's denoiser D(x, σ̃) sees it: x = x0 + σ̃·ε
        (VE coordinates), the VP input α·x at α = 1/√(1 + σ̃²), σ = σ̃·α."""
        alpha = 1.0 / math.sqrt(1.0 + edm_sigma**2)
        return self.guided_posterior(x * alpha, alpha, edm_sigma * alpha)[0]

    def model(self, schedule: NoiseSchedule, prediction_type: str):
        """model(x, t, y) for a batch [cond; uncond] (label 0, then the null label 1):
        eps on a VP schedule, the velocity ε − x0 on a flow path."""

        def predict(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            alpha, sigma = schedule.alpha_sigma(t[0].item() if schedule.is_flow else int(t[0]))
            out = torch.empty_like(x)
            for rows, conditional in ((y == 0, True), (y != 0, False)):
                x0, eps = self.posterior(x[rows].double(), alpha, sigma, conditional)
                out[rows] = (eps - x0 if prediction_type == "flow_prediction" else eps).to(x.dtype)
            return out

        return predict

    def _affine(self, alpha: float, sigma: float, flow: bool) -> tuple[float, float]:
        """(a, b) of the guided ODE's right-hand side a·x + b: v on a flow path (in x, σ),
        ε̂ on a VP one (in x̃, σ̃ with alpha = 1 and sigma = σ̃)."""

        def coefficients(mean: float, std: float) -> tuple[float, float, float, float]:
            scale = 1.0 / (alpha**2 * std**2 + sigma**2)
            # x0 = mean + alpha·std²·scale·(x − alpha·mean), eps = sigma·scale·(x − alpha·mean)
            return (
                alpha * std**2 * scale,
                mean - alpha**2 * std**2 * scale * mean,
                sigma * scale,
                -sigma * scale * alpha * mean,
            )

        x0c, x0c_0, epc, epc_0 = coefficients(self.mean_c, self.std_c)
        x0u, x0u_0, epu, epu_0 = coefficients(self.mean_u, self.std_u)
        guide = lambda c, u: u + self.w * (c - u)  # noqa: E731
        if flow:
            return guide(epc, epu) - guide(x0c, x0u), guide(epc_0, epu_0) - guide(x0c_0, x0u_0)
        return guide(epc, epu), guide(epc_0, epu_0)

    def exact(self, x_start: Tensor, schedule: NoiseSchedule, t_start: float, t_end: float = -1) -> Tensor:
        """The guided probability-flow ODE from x_start at time t_start to time t_end
        (default −1: σ = 0, the clean data)."""
        (alpha, sigma), (alpha_end, sigma_end) = schedule.alpha_sigma(t_start), schedule.alpha_sigma(t_end)
        if schedule.is_flow:
            rhs_at = lambda s: self._affine(1.0 - s, s, flow=True)  # noqa: E731
            start, end, scale_in, scale_out = sigma, sigma_end, 1.0, 1.0
        else:
            rhs_at = lambda s: self._affine(1.0, s, flow=False)  # noqa: E731
            start, end, scale_in, scale_out = sigma / alpha, sigma_end / alpha_end, 1.0 / alpha, alpha_end

        def rhs(s: float, state: np.ndarray) -> list[float]:
            a, b = rhs_at(s)
            return [a * state[0], a * state[1] + b]

        solution = solve_ivp(rhs, (start, end), [1.0, 0.0], rtol=1e-12, atol=1e-12, method="DOP853")
        phi, psi = solution.y[:, -1]
        return scale_out * (phi * scale_in * x_start.double() + psi)

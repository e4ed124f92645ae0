"""Noise schedules: discrete variance-preserving ones, and flow-matching paths.

Every schedule says where x_t = α_t·x_0 + σ_t·ε lies for the time t a model is called
with; log-SNR λ_t = log(α_t/σ_t), EDM's σ̃_t = σ_t/α_t, and t = −1 stands for the clean
data (α = 1, σ = 0) after the last step.
- ``NoiseSchedule``: α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), ᾱ_t = Π_{s≤t}(1 − β_s), for integer
  t = 0 … T−1. Models and classifiers always receive the ORIGINAL t, whatever the number
  of sampling steps.
- ``FlowSchedule`` (``NoiseSchedule.flow``): the rectified-flow path α = 1 − σ, with the
  model called at the float time t = T·σ (diffusers' FlowMatchEulerDiscreteScheduler).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor

SPACINGS = ("adm", "leading", "trailing", "linspace", "logsnr", "karras")
# The "logsnr" grid's last call is at σ̃ ≈ this / steps (or the schedule's σ̃_0 if larger):
# chosen by the NFE benchmark (benchmarks/sampling/nfe.py), where it beat ending at t = 0
# from 8 to 25 calls and cost little at 50.
LOGSNR_FINAL_EDM_SIGMA = 0.3
LOGSNR_MAX_EDM_SIGMA = 160.0


class NoiseSchedule:
    """ᾱ_t of a discrete VP schedule, held in float64."""

    is_flow = False
    # Where a count of steps lies when no spacing is named (chosen by the NFE benchmark).
    default_spacing = "logsnr"

    def __init__(self, betas: Sequence[float] | Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @classmethod
    def linear(cls, num_timesteps: int = 1000) -> NoiseSchedule:
        """ADM's linear schedule: β from 1e-4 to 0.02, scaled to keep the same range at T steps."""
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 21:
            raise ValueError(f"num_timesteps must be an int of at least 21 (β reaches 20/T), got {num_timesteps!r}")
        scale = 1000 / num_timesteps
        return cls(torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule, ᾱ(u) = cos²((u + s)/(1 + s)·π/2), β capped."""
        def alpha_bar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                 for i in range(num_timesteps)]
        return cls(betas)

    @staticmethod
    def flow(shift: float = 1.0, num_timesteps: int = 1000) -> FlowSchedule:
        """The rectified-flow path x = (1 − σ)·x0 + σ·ε (SD3, SiT, LightningDiT); see ``FlowSchedule``."""
        return FlowSchedule(shift, num_timesteps)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def cache_key(self) -> tuple:
        """Equal for two schedules with the same ᾱ_t (``sample`` reuses a plan by it)."""
        return ("vp", self.betas.numpy().tobytes())

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t; 1.0 for t < 0 (the clean data after the last step)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t))."""
        abar = self.alpha_bar(t)
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def log_snr(self, t: int) -> float:
        """λ_t = log(α_t/σ_t) (+inf for t < 0)."""
        alpha, sigma = self.alpha_sigma(t)
        return math.inf if sigma == 0 else math.log(alpha / sigma)

    def edm_sigma(self, t: int) -> float:
        """σ̃_t = σ_t/α_t, the noise level of EDM and of guidance intervals."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def strided_timesteps(self, steps: int) -> list[int]:
        """ADM's "ddimN" grid (stride ⌈T/N⌉ from t = 0) where one of exactly ``steps`` exists,
        else ``steps`` timesteps evenly spaced over [0, T − ⌈T/N⌉]. Either way the grid
        stops a stride short of t = T − 1, whose ᾱ can be degenerate (2.4e-9 for the cosine
        schedule: a step from there divides by α ≈ 5e-5, and ADM's eps-form classifier
        guidance, which re-derives x0 unclipped, then saturates every sample)."""
        try:
            return self.timesteps(f"ddim{steps}")
        except ValueError:
            if not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps // 2:
                raise ValueError(f"steps must be between 1 and {self.num_timesteps // 2}, got {steps}") from None
            top = self.num_timesteps - math.ceil(self.num_timesteps / steps)
            return self.timesteps([round(i * top / max(steps - 1, 1)) for i in range(steps)])

    def spaced_timesteps(self, steps: int, spacing: str = "adm", rho: float = 7.0) -> list[int]:
        """``steps`` original timesteps, descending, placed by ``spacing``:

          "adm"       ADM's respacing (``timesteps(steps)``)
          "leading"   diffusers': i·⌊T/N⌋ for i < N
          "trailing"  diffusers': round(T − i·T/N) − 1 for i < N (starts at T − 1)
          "linspace"  diffusers': round of N points evenly spaced over [0, T − 1]
          "logsnr"    uniform in log-SNR λ from λ_{T−1} (or from σ̃ = 160 where the schedule
                      goes beyond: the cosine's σ̃_{T−1} = 2·10⁴, where a data-prediction step
                      divides by α ≈ 5·10⁻⁵; ADM's linear one ends at 157) down to the λ of
                      σ̃ = max(σ̃_0, 0.3/N)
                      (fewer steps stop short of the last, nearly clean timesteps, whose
                      final denoising step costs O(σ̃²); see BENCHMARKS.md's NFE table)
          "karras"    Karras et al.'s σ̃ grid with ``rho`` between σ̃_{T−1} and σ̃_0
        The last two pick, for each target, the timestep of nearest λ (or σ̃); where targets
        crowd onto one timestep (the schedule's steep ends), they move to the nearest free
        timesteps, keeping the order.
        """
        total = self.num_timesteps
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
            raise ValueError(f"steps must be an int from 1 to {total} with spacing={spacing!r}, got {steps!r}")
        if spacing == "adm":
            return self.timesteps(steps)
        if spacing == "leading":
            return [i * (total // steps) for i in range(steps)][::-1]
        if spacing == "trailing":
            return [round(total - i * total / steps) - 1 for i in range(steps)]
        if spacing == "linspace":
            return [round(v) for v in torch.linspace(0, total - 1, steps, dtype=torch.float64).tolist()][::-1]
        ts = torch.arange(total, dtype=torch.float64)
        abar = self.alphas_cumprod
        if spacing == "logsnr":
            levels = 0.5 * torch.log(abar / (1 - abar))  # λ_t, decreasing in t
            high_end = max(float(levels[-1]), -math.log(LOGSNR_MAX_EDM_SIGMA))
            low_end = min(float(levels[0]), -math.log(LOGSNR_FINAL_EDM_SIGMA / steps))
            targets = torch.linspace(high_end, low_end, steps, dtype=torch.float64)
        else:  # karras
            if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho) and rho > 0):
                raise ValueError(f"rho must be a positive number, got {rho!r}")
            levels = torch.sqrt((1 - abar) / abar)  # σ̃_t, increasing in t
            ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
            low, high = float(levels[0]) ** (1 / rho), float(levels[-1]) ** (1 / rho)
            targets = (high + ramp * (low - high)) ** rho
        nearest = sorted(int(ts[(levels - target).abs().argmin()]) for target in targets.tolist())
        # Distinct and within [0, T − 1]: push crowded ones up, then back down from the top.
        chosen = []
        for t in nearest:
            chosen.append(max(t, chosen[-1] + 1) if chosen else t)
        for k in range(steps - 1, -1, -1):
            chosen[k] = min(chosen[k], total - 1 if k == steps - 1 else chosen[k + 1] - 1)
        return chosen[::-1]

    def timesteps(self, steps: int | str | Sequence[int]) -> list[int]:
        """Original timesteps to visit, descending, ending at 0.

        ``steps`` is a count (evenly spaced over [0, T−1]: ADM's respacing with one
        section, exactly), ADM's "ddimN" (the smallest integer stride s with exactly N
        timesteps in range(0, T, s)), or an explicit list.

        ADM's grid is reproduced step for step: it accumulates the float stride
        (T − 1)/(N − 1) and rounds each running sum with Python's round(), half to even, so
        where i·(T − 1)/(N − 1) lands on k + ½ the accumulated sum decides, not the product.
        A count of 1 is ADM's {0} (its one section takes the section's first timestep).
        """
        total = self.num_timesteps
        if isinstance(steps, str):
            if not steps.startswith("ddim") or not steps[4:].isdigit():
                raise ValueError(f"steps must be an int, 'ddimN' or a list of timesteps, got {steps!r}")
            count = int(steps[4:])
            stride = next((s for s in range(1, total) if len(range(0, total, s)) == count), None)
            if stride is None:
                raise ValueError(f"cannot make exactly {count} DDIM steps out of {total}")
            chosen = list(range(0, total, stride))
        elif isinstance(steps, int) and not isinstance(steps, bool):
            if not 1 <= steps <= total:
                raise ValueError(f"steps must be between 1 and {total}, got {steps}")
            chosen = _adm_section(total, steps)
        else:
            values = steps.tolist() if isinstance(steps, Tensor) else list(steps)
            if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in values):
                raise TypeError(f"timesteps must be ints (original timesteps), got {values!r}")
            chosen = sorted({int(t) for t in values})
            if not chosen or chosen[0] < 0 or chosen[-1] >= total:
                raise ValueError(f"timesteps must lie in [0, {total - 1}], got {list(steps)}")
        return chosen[::-1]


def _adm_section(size: int, count: int) -> list[int]:
    """guided-diffusion's ``space_timesteps`` for one section of ``size`` timesteps:
    ``count`` timesteps from 0, a float stride accumulated and rounded half to even."""
    stride = (size - 1) / (count - 1) if count > 1 else 1
    position, taken = 0.0, []
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


class FlowSchedule(NoiseSchedule):
    """The rectified-flow path x_σ = (1 − σ)·x0 + σ·ε, σ ∈ [0, 1], whose velocity is
    v = ε − x0 (``prediction_type="flow_prediction"``). The model is called with the float
    time t = T·σ (T = ``num_timesteps``), as diffusers' FlowMatchEulerDiscreteScheduler does.

    A count of steps lies uniformly in σ from 1 down to 1/N ("linspace"), each then moved by
    SD3's time shift σ ← shift·σ/(1 + (shift − 1)·σ) (shift > 1 spends more steps at high
    noise); the step after the last goes to σ = 0.
    """

    is_flow = True
    default_spacing = "linspace"

    def __init__(self, shift: float = 1.0, num_timesteps: int = 1000):
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int (the model's time scale), got {num_timesteps!r}")
        self.shift = float(shift)
        self._scale = num_timesteps

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift}, num_timesteps={self._scale})"

    @property
    def cache_key(self) -> tuple:
        return ("flow", self.shift, self._scale)

    @property
    def num_timesteps(self) -> int:
        return self._scale

    def alpha_bar(self, t: float) -> float:
        raise ValueError("a flow schedule has no ᾱ (ddpm's posterior): use alpha_sigma")

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(1 − σ, σ) with σ = t/T; (1, 0) for t < 0."""
        if t < 0:
            return 1.0, 0.0
        sigma = t / self._scale
        return 1.0 - sigma, sigma

    def edm_sigma(self, t: float) -> float:
        alpha, sigma = self.alpha_sigma(t)
        return math.inf if alpha == 0 else sigma / alpha

    def log_snr(self, t: float) -> float:
        alpha, sigma = self.alpha_sigma(t)
        if sigma == 0:
            return math.inf
        return -math.inf if alpha == 0 else math.log(alpha / sigma)

    def time_of_log_snr(self, level: float) -> float:
        """The t whose λ is ``level``: σ = 1/(1 + e^λ)."""
        return self._scale / (1.0 + math.exp(level))

    def shifted(self, sigma: float) -> float:
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def spaced_timesteps(self, steps: int, spacing: str = "linspace", rho: float = 7.0) -> list[float]:
        """``steps`` times T·σ, descending: σ uniform from 1 to 1/N, then shifted."""
        if spacing != "linspace":
            raise ValueError(f"spacing must be 'linspace' for a flow schedule (uniform in σ, then shifted), "
                             f"got {spacing!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return [self._scale * self.shifted(1 - i / steps) for i in range(steps)]

    def timesteps(self, steps: int | Sequence[float]) -> list[float]:
        """A count (``spaced_timesteps``) or explicit times in (0, T], visited descending."""
        if isinstance(steps, int) and not isinstance(steps, bool):
            return self.spaced_timesteps(steps)
        if isinstance(steps, str):
            raise ValueError(f"steps must be a count or a list of times for a flow schedule, got {steps!r}")
        values = steps.tolist() if isinstance(steps, Tensor) else list(steps)
        if not values or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= self._scale
                                  for t in values):
            raise ValueError(f"timesteps of a flow schedule must be numbers in (0, {self._scale}], got {values!r}")
        return sorted({float(t) for t in values}, reverse=True)

    def strided_timesteps(self, steps: int) -> list[float]:
        """A flow path has no strided grid: its own (checks a step count as the VP one does)."""
        return self.spaced_timesteps(steps)

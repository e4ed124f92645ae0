"""Noise schedules: discrete variance-preserving ones, and flow-matching paths.

Every schedule says where x_t = α_t·x_0 + σ_t·ε lies for the time t a model is called
with; log-SNR λ_t = log(α_t/σ_t), EDM's σ̃_t = σ_t/α_t, and t = −1 stands for the clean
data (α = 1, σ = 0) after the last step.
- ``NoiseSchedule``: α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), ᾱ_t = Π_{s≤t}(1 − β_s), for integer
  t = 0 … T−1; between them (a fractional t in (0, T − 1), given as an explicit grid),
  σ̃_t linearly interpolated in t, as diffusers' Euler-type schedulers do. Models and
  classifiers always receive the ORIGINAL t, whatever the number of sampling steps.
- ``FlowSchedule`` (``NoiseSchedule.flow``): the rectified-flow path α = 1 − σ, with the
  model called at the float time t = T·σ (diffusers' FlowMatchEulerDiscreteScheduler).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import TypeGuard, cast

import numpy as np
import torch
from torch import Tensor

from ..ops.contract import PATH_RELATIONS, PREDICTION_PATHS, PREDICTION_TYPES

SPACINGS = ("adm", "leading", "trailing", "linspace", "logsnr", "karras")
KARRAS_RHO = 7.0  # Karras et al.'s ρ, the default of spacing="karras"
# The "logsnr" grid's last call is at σ̃ ≈ this / steps (or the schedule's σ̃_0 if larger):
# chosen by the NFE benchmark (benchmarks/sampling/nfe.py), where it beat ending at t = 0
# from 8 to 25 calls and cost little at 50.
LOGSNR_FINAL_EDM_SIGMA = 0.3
LOGSNR_MAX_EDM_SIGMA = 160.0


class NoiseSchedule:
    """ᾱ_t of a discrete VP schedule, held in float64.

    At an integer timestep t, α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t). At a fractional t in
    (k, k + 1), k = ⌊t⌋, EDM's noise level is interpolated linearly in t,
        σ̃_t = σ̃_k + (t − k)·(σ̃_{k+1} − σ̃_k),  σ̃_k = √((1 − ᾱ_k)/ᾱ_k),
    (diffusers' ``np.interp(timesteps, arange(T), sigmas)`` in the Euler, Euler-ancestral
    and Heun schedulers with their "linspace" spacing), and α_t = 1/√(1 + σ̃_t²),
    σ_t = σ̃_t·α_t, ᾱ_t = α_t². Integer timesteps never go through the interpolation.
    """

    is_flow = False
    # The relation of α and σ on this path (contract.PATH_RELATIONS): α² + σ² = 1.
    path = "variance-preserving"
    # Where a count of steps lies when no spacing is named (chosen by the NFE benchmark).
    default_spacing = "logsnr"

    def __init__(self, betas: Sequence[float] | Tensor):
        """Checks that betas is a non-empty sequence of numbers in (0, 1) whose ᾱ_t is
        computable in float64: strictly decreasing from below 1 (1 − β rounds to 1 for β
        below ~1.1e-16, and then σ_t would be 0 or two timesteps one noise level) and above
        0 at the last timestep (the product underflows)."""
        try:
            # a copy of the values on the CPU: no autograd history, no device of the caller's
            betas = torch.as_tensor(betas, dtype=torch.float64).detach().to("cpu", copy=True)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"betas must be a sequence of numbers, got {type(betas).__name__}") from None
        if betas.dim() != 1:  # (flattening a (T, 1) or a batch of schedules would guess)
            raise ValueError(f"betas must be 1-D, one β a timestep, got shape {tuple(betas.shape)}")
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values in (0, 1)")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        levels = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod])
        if not (bool((levels[1:] < levels[:-1]).all()) and alphas_cumprod[-1] > 0):
            raise ValueError(
                "betas must give a computable ᾱ_t = Π(1 − β_s) in float64, strictly decreasing from below 1 "
                "(1 − β rounds to 1 for β below ~1.1e-16) and above 0 at the last timestep (no underflow); got ᾱ "
                f"from {float(alphas_cumprod[0])!r} to {float(alphas_cumprod[-1])!r}"
            )
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self._alpha_bars = alphas_cumprod.tolist()  # read per call by the solvers and grid checks
        self._edm_sigmas = torch.sqrt((1 - alphas_cumprod) / alphas_cumprod).tolist()  # σ̃_k, interpolated between

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps})"

    @classmethod
    def linear(cls, num_timesteps: int = 1000) -> NoiseSchedule:
        """ADM's linear schedule: β from 1e-4 to 0.02, scaled to keep the same range at T steps."""
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 21:
            raise ValueError(f"num_timesteps must be an int of at least 21 (β reaches 20/T), got {num_timesteps!r}")
        num_timesteps = int(num_timesteps)  # (a NumPy integer too)
        scale = 1000 / num_timesteps
        return cls(torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule, ᾱ(u) = cos²((u + s)/(1 + s)·π/2), β capped at
        ``max_beta``. Checks num_timesteps a positive int, s a finite non-negative number
        (the offset), max_beta in (0, 1)."""
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        num_timesteps = int(num_timesteps)  # (a NumPy integer too)
        if not _is_real(s) or s < 0:
            raise ValueError(f"s (the cosine schedule's offset) must be a finite non-negative number, got {s!r}")
        if not _is_real(max_beta) or not 0 < max_beta < 1:
            raise ValueError(f"max_beta must be a number in (0, 1), got {max_beta!r}")

        def alpha_bar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ]
        return cls(betas)

    @staticmethod
    def flow(shift: float = 1.0, num_timesteps: int = 1000) -> FlowSchedule:
        """The rectified-flow path x = (1 − σ)·x0 + σ·ε (SD3, SiT, LightningDiT); see ``FlowSchedule``."""
        return FlowSchedule(shift, num_timesteps)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def check_prediction_type(self, prediction_type: object) -> None:
        """Refuses a prediction type this schedule cannot convert to x0 and eps, by the one
        table of what each needs (contract.PREDICTION_PATHS): "v_prediction" assumes
        α² + σ² = 1 (a variance-preserving schedule), "flow_prediction" α + σ = 1 (a flow
        path), "epsilon" and "sample" convert on either."""
        if not isinstance(prediction_type, str) or prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        needed = PREDICTION_PATHS[prediction_type]
        if needed is not None and needed != self.path:
            usable = tuple(name for name, path in PREDICTION_PATHS.items() if path in (None, self.path))
            raise ValueError(
                f"prediction_type={prediction_type!r} converts to x0 and eps only on a {needed} schedule "
                f"({PATH_RELATIONS[needed]}); {self!r} is a {self.path} path: use one of {usable}"
            )

    def check_grid(self, timesteps: Sequence[float], source: str = "timesteps") -> None:
        """Refuses a grid of times (descending, as visited) that the solvers cannot step
        through: each point's log-SNR λ must be finite (but for a first point of pure
        noise, λ = −∞, a flow path's t = T) and larger than the one before, so that every
        step has a nonzero λ-length. ``source`` names where the grid came from."""
        previous = None
        for t in timesteps:
            level = self.log_snr(t)
            if math.isnan(level) or level == math.inf:
                raise ValueError(
                    f"{source} must lie at noise levels of finite log-SNR on {self!r}, got t = {t!r} (log-SNR {level})"
                )
            if previous is not None and not level > previous[1]:  # a later λ = −∞ included
                raise ValueError(
                    f"{source} must lower the noise at every step, but t = {previous[0]!r} and "
                    f"t = {t!r} lie at one noise level (log-SNR {level!r}) on {self!r} in float64"
                )
            previous = (t, level)
        times = list(timesteps)
        if self.model_time_dtype(times) == torch.float32:  # fractional times reach the model as float32
            _check_float32_times(times, source, self, positive=self.is_flow)  # (a flow's t = 0: pure data)

    @property
    def cache_key(self) -> tuple:
        """Equal for two schedules with the same ᾱ_t (``sample`` reuses a plan by it)."""
        return ("vp", self.betas.numpy().tobytes())

    def _interpolated_edm_sigma(self, t: float) -> float:
        """σ̃_t = σ̃_k + (t − k)·(σ̃_{k+1} − σ̃_k), k = ⌊t⌋, at a fractional t (np.interp's form)."""
        k = math.floor(t)
        low = self._edm_sigmas[k]
        return (self._edm_sigmas[k + 1] - low) * (t - k) + low

    def _check_time(self, t: float, last: float) -> None:
        """t is a number at most ``last`` (the schedule's pure-noise end; any t < 0 is the
        clean data), named when not: past the end there is no ᾱ to read."""
        value = t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else t  # (a 0-d tensor too)
        if not (isinstance(value, Real) and value <= last):  # (NaN compares false)
            raise ValueError(f"t must be a number at most {last} on {self!r} (t < 0: the clean data), got {t!r}")

    def alpha_bar(self, t: float) -> float:
        """ᾱ_t; 1.0 for t < 0 (the clean data after the last step); 1/(1 + σ̃_t²) at a
        fractional t (σ̃_t interpolated, see the class docstring)."""
        self._check_time(t, self.num_timesteps - 1)
        if t < 0:
            return 1.0
        if t == math.floor(t):
            return self._alpha_bars[int(t)]
        return 1.0 / (1.0 + self._interpolated_edm_sigma(t) ** 2)

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) at an integer t (or t < 0, the clean data);
        (1/√(1 + σ̃_t²), σ̃_t/√(1 + σ̃_t²)) of the interpolated σ̃_t at a fractional t."""
        if t >= 0 and t != math.floor(t):
            self._check_time(t, self.num_timesteps - 1)
            edm = self._interpolated_edm_sigma(t)
            alpha = 1.0 / math.sqrt(1.0 + edm * edm)
            return alpha, edm * alpha
        abar = self.alpha_bar(t)
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def log_snr(self, t: float) -> float:
        """λ_t = log(α_t/σ_t) (+inf for t < 0)."""
        alpha, sigma = self.alpha_sigma(t)
        return math.inf if sigma == 0 else math.log(alpha / sigma)

    def edm_sigma(self, t: float) -> float:
        """σ̃_t = σ_t/α_t, the noise level of EDM and of guidance intervals."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def model_time_dtype(self, timesteps: Sequence[float]) -> torch.dtype:
        """The dtype of the time tensor the model is called with over ``timesteps``: int64 on
        a grid of integer timesteps, float32 where the grid holds a fractional time (what
        diffusers' Euler-type schedulers hand the UNet: their float32 timesteps)."""
        return torch.float32 if any(isinstance(t, float) for t in timesteps) else torch.int64

    def strided_timesteps(self, steps: int) -> list[float]:
        """ADM's "ddimN" grid (stride ⌈T/N⌉ from t = 0) where one of exactly ``steps`` exists,
        else ``steps`` timesteps evenly spaced over [0, T − ⌈T/N⌉]. Either way the grid
        stops a stride short of t = T − 1, whose ᾱ can be degenerate (2.4e-9 for the cosine
        schedule: a step from there divides by α ≈ 5e-5, and ADM's eps-form classifier
        guidance, which re-derives x0 unclipped, then saturates every sample)."""
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"steps must be an int, got {steps!r}")
        try:
            return self.timesteps(f"ddim{steps}")
        except ValueError:
            if not 1 <= steps <= self.num_timesteps // 2:
                raise ValueError(
                    f"steps must be between 1 and {self.num_timesteps // 2}, or a count with a ddimN grid "
                    f"(ADM's stride; {self.num_timesteps} is one), got {steps}"
                ) from None
            top = self.num_timesteps - math.ceil(self.num_timesteps / steps)
            return self.timesteps([round(i * top / max(steps - 1, 1)) for i in range(steps)])

    def spaced_timesteps(self, steps: int, spacing: str = "adm", rho: float | None = None) -> list[float]:
        """``steps`` original timesteps, descending, placed by ``spacing``:

          "adm"       ADM's respacing (``timesteps(steps)``)
          "leading"   diffusers': i·⌊T/N⌋ for i < N (with steps_offset = 0: Stable
                      Diffusion's scheduler config adds 1 to each, which explicit steps give)
          "trailing"  diffusers': round(T − i·T/N) − 1 for i < N (starts at T − 1)
          "linspace"  diffusers': round of N points evenly spaced over [0, T − 1]
        (these three as DDIMScheduler and DDPMScheduler place them: under the same names
        DPMSolverMultistep and UniPC place N + 1 points and drop the last, t = 0, and Euler's
        "linspace" keeps fractional times; give such a scheduler's ``timesteps`` as an
        explicit list to reproduce its grid)
          "logsnr"    uniform in log-SNR λ from λ_{T−1} (or from σ̃ = 160 where the schedule
                      goes beyond: the cosine's σ̃_{T−1} = 2·10⁴, where a data-prediction step
                      divides by α ≈ 5·10⁻⁵; ADM's linear one ends at 157; crowded steps
                      stay at or below its timestep) down to the λ of σ̃ = max(σ̃_0, 0.3/N)
                      (σ̃_0 where the schedule never reaches 0.3/N)
                      (fewer steps stop short of the last, nearly clean timesteps, whose
                      final denoising step costs O(σ̃²); measured by benchmarks/sampling/nfe.py)
          "karras"    Karras et al.'s σ̃ grid with ``rho`` (default 7) between σ̃_{T−1} and σ̃_0
                      (``rho`` with another spacing is refused, not ignored)
        The last two pick, for each target, the timestep of nearest λ (or σ̃); where targets
        crowd onto one timestep (the schedule's steep ends), they move to the nearest free
        timesteps, keeping the order.
        """
        total = self.num_timesteps
        if not isinstance(spacing, str) or spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
            raise ValueError(f"steps must be an int from 1 to {total} with spacing={spacing!r}, got {steps!r}")
        rho = _karras_rho(rho, spacing)
        if spacing == "adm":
            return self.timesteps(steps)
        if spacing == "leading":
            leading: list[float] = [i * (total // steps) for i in range(steps)]
            return leading[::-1]
        # trailing and linspace with numpy's arange and linspace, as diffusers computes them:
        # their float roundings decide ties (linspace(0, 999, 27)[13] = 499.4999... there,
        # 499.5000... in torch; arange's step is taken from its first two values)
        if spacing == "trailing":
            trailing = np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
            return [int(t) for t in trailing[:steps]]  # (diffusers' own grid gains a −1 at some N)
        if spacing == "linspace":
            return [int(t) for t in np.linspace(0, total - 1, steps).round()[::-1]]
        ts = torch.arange(total, dtype=torch.float64)
        abar = self.alphas_cumprod
        top = total - 1  # the highest timestep the grid may take
        if spacing == "logsnr":
            levels = 0.5 * torch.log(abar / (1 - abar))  # λ_t, decreasing in t
            high_end = max(float(levels[-1]), -math.log(LOGSNR_MAX_EDM_SIGMA))
            low_end = min(float(levels[0]), -math.log(LOGSNR_FINAL_EDM_SIGMA / steps))
            if low_end <= high_end:  # the schedule never reaches σ̃ = 0.3/N: down to its σ̃_0
                low_end = float(levels[0])
            if high_end > float(levels[-1]):
                # capped at σ̃ = 160: crowded targets may not climb past its timestep (where
                # there is room below it), onto the σ̃ the cap keeps out
                capped = int(ts[(levels - high_end).abs().argmin()])
                top = capped if capped + 1 >= steps else top
            targets = torch.linspace(high_end, low_end, steps, dtype=torch.float64)
        else:  # karras
            levels = torch.sqrt((1 - abar) / abar)  # σ̃_t, increasing in t
            ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
            targets = _karras_targets(float(levels[0]), float(levels[-1]), ramp, rho)
        nearest = sorted(int(ts[(levels - target).abs().argmin()]) for target in targets.tolist())
        # Distinct and within [0, top]: push crowded ones up, then back down from the top.
        chosen: list[float] = []
        for t in nearest:
            chosen.append(max(t, chosen[-1] + 1) if chosen else t)
        for k in range(steps - 1, -1, -1):
            chosen[k] = min(chosen[k], top if k == steps - 1 else chosen[k + 1] - 1)
        return chosen[::-1]

    def timesteps(self, steps: int | str | Sequence[float]) -> list[float]:
        """Original timesteps to visit, descending.

        ``steps`` is a count (evenly spaced over [0, T−1]: ADM's respacing with one
        section, exactly, ending at 0), ADM's "ddimN" (the smallest integer stride s with
        exactly N timesteps in range(0, T, s)), or an explicit list of numbers in [0, T − 1]:
        those of integer value come back as ints, the fractional ones as floats (their σ̃
        interpolated between the timesteps around them, see the class docstring).

        ADM's grid is reproduced step for step: it accumulates the float stride
        (T − 1)/(N − 1) and rounds each running sum with Python's round(), half to even, so
        where i·(T − 1)/(N − 1) lands on k + ½ the accumulated sum decides, not the product.
        A count of 1 is ADM's {0} (its one section takes the section's first timestep).
        """
        total = self.num_timesteps
        chosen: list[float]
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
            chosen = cast("list[float]", _adm_section(total, steps))  # (ints: floats to the type checker)
        else:
            if isinstance(steps, Tensor) and steps.dim() != 1:
                raise TypeError(
                    f"timesteps as a tensor must be 1-D (the times to visit), got shape {tuple(steps.shape)}"
                )
            steps = cast("Sequence[float]", steps)  # (a bool, not iterable, fails in list())
            values = steps.tolist() if isinstance(steps, Tensor) else list(steps)
            if not all(isinstance(t, Real) and not isinstance(t, bool) for t in values):
                raise TypeError(
                    f"timesteps must be numbers (original timesteps, fractional ones between them), got {values!r}"
                )
            if not values or not all(0 <= t <= total - 1 for t in values):  # NaN fails too
                raise ValueError(f"timesteps must lie in [0, {total - 1}], got {list(steps)}")
            chosen = sorted({int(t) if isinstance(t, Integral) or float(t).is_integer() else float(t) for t in values})
            if len(chosen) < len(values):
                raise ValueError(f"timesteps must be distinct (a step between equal times is none), got {list(steps)}")
        return chosen[::-1]


def _check_float32_times(times: list[float], source: str, schedule: object, positive: bool) -> None:
    """The model's float32 times strictly decreasing (two calls at one model time would not
    be the noise levels the solver steps between), and positive where ``positive`` (a flow
    path's t = 0 is pure data)."""
    model_times = torch.tensor(times, dtype=torch.float64).float().tolist()
    for i, (t, model_time) in enumerate(zip(times, model_times)):
        if (positive and not model_time > 0) or (i > 0 and not model_time < model_times[i - 1]):
            what = "distinct and positive" if positive else "distinct"
            raise ValueError(
                f"{source} must stay {what} as the model's float32 times, but t = {t!r} is {model_time!r} "
                f"there (after {times[i - 1] if i else None!r}) on {schedule!r}"
            )


def _is_real(value: object) -> TypeGuard[int | float]:
    """A finite real number, a NumPy scalar included (not a bool)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _karras_rho(rho: object, spacing: str) -> float:
    """The Karras grid's ρ (KARRAS_RHO for None); a bad ρ is refused with any spacing, a ρ
    given with a spacing other than "karras", which has none, too."""
    if rho is None:
        return KARRAS_RHO
    if not _is_real(rho) or rho <= 0:
        raise ValueError(f"rho must be a positive number, got {rho!r}")
    if spacing != "karras":
        raise ValueError(f"rho={rho!r} shapes spacing='karras' only, got spacing={spacing!r}")
    return float(rho)


def _karras_targets(low: float, high: float, ramp: Tensor, rho: float) -> Tensor:
    """Karras et al.'s σ̃ targets from ``high`` down to ``low``, uniform in σ̃^(1/ρ); refuses
    a ρ for which that is not computable in float64: σ̃^(1/ρ) overflowing (ρ too small) or
    equal at both ends (ρ too large, every target one σ̃)."""
    try:
        low_root, high_root = low ** (1 / rho), high ** (1 / rho)
        targets = (high_root + ramp * (low_root - high_root)) ** rho
    except OverflowError:
        targets = None
    if targets is None or not bool(torch.isfinite(targets).all()) or (len(ramp) > 1 and not high_root > low_root):
        raise ValueError(
            f"rho={rho!r} cannot place a Karras grid in float64 between σ̃ = {low:.4g} and {high:.4g}: "
            "σ̃^(1/ρ) must stay finite and differ at the two ends"
        )
    return targets


def _adm_section(size: int, count: int) -> list[int]:
    """guided-diffusion's ``space_timesteps`` for one section of ``size`` timesteps:
    ``count`` timesteps from 0, a float stride accumulated and rounded half to even."""
    stride = (size - 1) / (count - 1) if count > 1 else 1
    position, taken = 0.0, []
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


# The most steps of a flow grid: uniform σ steps of 1/N near σ = 1 are distinct float32
# numbers (24-bit significand) only while N ≤ 2^24, and a shift > 1 crowds them further.
MAX_FLOW_STEPS = 2**24


class FlowSchedule(NoiseSchedule):
    """The rectified-flow path x_σ = (1 − σ)·x0 + σ·ε, σ ∈ [0, 1], whose velocity is
    v = ε − x0 (``prediction_type="flow_prediction"``). The model is called with the float
    time t = T·σ (T = ``num_timesteps``), as diffusers' FlowMatchEulerDiscreteScheduler does.

    A count of steps lies uniformly in σ from 1 down to 1/N ("linspace"), each then moved by
    SD3's time shift σ ← shift·σ/(1 + (shift − 1)·σ) (shift > 1 spends more steps at high
    noise); the step after the last goes to σ = 0. That is the grid Flux's pipeline hands
    its scheduler, not FlowMatchEulerDiscreteScheduler's own default (SD3's: from 1 to the
    shifted 1/T, shifted again), which a diffusers pipeline accelerated keeps as its own.

    The model gets its time in float32 (the sampling loop's), so a grid must also stay
    strictly decreasing and positive there: ``check_grid``.
    """

    is_flow = True
    # The relation of α and σ on this path (contract.PATH_RELATIONS): α + σ = 1.
    path = "flow"
    default_spacing = "linspace"

    def __init__(self, shift: float = 1.0, num_timesteps: int = 1000):
        """Checks num_timesteps a positive int and shift a positive number that can place a
        grid: the shifted 2-step grid (σ = 1, ½) must be two distinct times of finite,
        increasing log-SNR, in float64 and in the model's float32 time (with T = 1000, a
        shift above ~3e7 or below ~1e-48 puts σ = ½ at t = T or at t = 0 there). Each
        sampler's own grid is checked when it is built."""
        if not _is_real(shift) or shift <= 0:
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int (the model's time scale), got {num_timesteps!r}")
        self.shift = float(shift)
        self._scale = int(num_timesteps)  # (a NumPy integer too)
        self.check_grid([self._scale * self.shifted(sigma) for sigma in (1.0, 0.5)], f"shift={shift!r}'s 2-step grid")

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
        self._check_time(t, self._scale)
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
        """shift·σ/(1 + (shift − 1)·σ), written shift·σ/(shift·σ + 1 − σ): the same map, but
        exactly 1 at σ = 1 and at most 1 for every shift (1 + (shift − 1) rounds away from
        shift when shift is far from 1)."""
        return self.shift * sigma / (self.shift * sigma + (1 - sigma))

    def spaced_timesteps(self, steps: int, spacing: str = "linspace", rho: float | None = None) -> list[float]:
        """``steps`` times T·σ, descending: σ uniform from 1 to 1/N, then shifted; refused
        where the shift collapses them (``check_grid``)."""
        if spacing != "linspace":
            raise ValueError(
                f"spacing must be 'linspace' for a flow schedule (uniform in σ, then shifted), got {spacing!r}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if steps > MAX_FLOW_STEPS:  # refused before a grid of that many floats is built and checked
            raise ValueError(
                f"steps must be at most {MAX_FLOW_STEPS} on a flow schedule (finer, the model's float32 "
                f"times T·σ near σ = 1 are no longer distinct), got {steps}"
            )
        _karras_rho(rho, spacing)
        source = f"the {steps}-step grid of shift={self.shift!r}"
        # its first gaps first, the narrowest in float32 for a shift ≥ 1: a grid too fine is
        # refused before all of it is built
        self.check_grid([self._scale * self.shifted(1 - i / steps) for i in range(min(steps, 64))], source)
        grid = [self._scale * self.shifted(1 - i / steps) for i in range(steps)]
        self.check_grid(grid, source)
        return grid

    def model_time_dtype(self, timesteps: Sequence[float]) -> torch.dtype:
        """float32: a flow model takes the float time T·σ (diffusers' convention)."""
        return torch.float32

    def check_grid(self, timesteps: Sequence[float], source: str = "timesteps") -> None:
        """NoiseSchedule.check_grid, and the model's float32 times strictly decreasing and
        positive (two calls at one model time, or at t = 0, would not be the noise levels
        the solver steps between)."""
        super().check_grid(timesteps, source)  # (its float32 model times, which must be positive)

    def timesteps(self, steps: int | str | Sequence[float]) -> list[float]:
        """A count (``spaced_timesteps``) or explicit times in (0, T], visited descending."""
        if isinstance(steps, int) and not isinstance(steps, bool):
            return self.spaced_timesteps(steps)
        if isinstance(steps, str):
            raise ValueError(f"steps must be a count or a list of times for a flow schedule, got {steps!r}")
        steps = cast("Sequence[float]", steps)  # (a bool, not iterable, fails in list())
        values = steps.tolist() if isinstance(steps, Tensor) else list(steps)
        if not values or not all(
            isinstance(t, Real) and not isinstance(t, bool) and 0 < t <= self._scale for t in values
        ):  # (a NumPy scalar is a number too)
            raise ValueError(f"timesteps of a flow schedule must be numbers in (0, {self._scale}], got {values!r}")
        if len({float(t) for t in values}) < len(values):
            raise ValueError(f"timesteps must be distinct (a step between equal times is none), got {values!r}")
        return sorted({float(t) for t in values}, reverse=True)

    def strided_timesteps(self, steps: int) -> list[float]:
        """A flow path has no strided grid: its own (checks a step count as the VP one does)."""
        return self.spaced_timesteps(steps)

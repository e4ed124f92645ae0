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
  dpm++2s (Lu et al. 2022, DPM-Solver++(2S)): two model calls per step, the second at
                        the grid timestep s whose λ is closest to the midpoint (r = (λ_s − λ)/h):
                        u = (s_s/s)·x − a_s·(e^{−rh} − 1)·D,  then from D_s at (u, s)
                        x' = (s'/s)·x + φ·(1 − 1/2r)·D + φ/2r·D_s. The second call holds u as x
                        and D as prev, so x = (s/s_s)·(u + a_s·(e^{−rh} − 1)·D) turns that into
                        k_x = s'/s_s, k_x0 = φ/2r, k_prev = (s'/s_s)·a_s·(e^{−rh} − 1) + φ·(1 − 1/2r).
                        First order where no grid timestep lies between t and t', and at the last step.
A sampler is a choice of these numbers; nothing else differs. A plan holds one entry per
model call: dpm++2s has two per step (2·steps − 1 calls in all).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from .guidance import split_guidance
from .schedule import NoiseSchedule

SAMPLERS = ("ddim", "ddpm", "euler", "dpm++2m", "dpm++2s")
# Samplers whose next model call reads this call's x0 as prev.
_KEEPS_X0 = ("dpm++2m", "dpm++2s")
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
        k_prev=sigma_next / sigma_mid * alpha_mid * math.expm1(-rh) + phi * (1 - 1 / (2 * r)),
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


Model = Callable[..., Tensor]


@dataclass
class _Buffers:
    """The tensors one sampling run works in; a captured CUDA graph reads and writes only these."""

    model_input: Tensor  # (rows, C, ...): x_t in its first B rows, [cond; uncond] with CFG
    labels_in: Tensor | None  # (rows,): the labels, then the null label with CFG
    x0: tuple[Tensor, Tensor]  # ping-pong x0 of the solvers that read the previous one
    apg: Tensor | None  # APG's momentum state
    noise: Tensor  # the noise of a graph replay's step, drawn before the replay


class GuidedSampler:
    """A guided sampling loop that holds its buffers across calls.

    One model forward per call of the plan: with CFG, on a 2B batch laid out
    [cond; uncond] with the null label in the second half; ops.guided_step writes x_next
    into both halves of that input, so no torch.cat ever runs. DPM-Solver++ keeps the
    previous x0 in a second buffer (ping-pong): the call after reads it as prev.

    With ``cuda_graph=True`` (CUDA only) the first call for a batch shape runs the loop
    once eagerly on a side stream (warm-up: lazy initialisation, autotuning), then
    captures each model call with its guided_step as one CUDA graph, sharing one memory
    pool; every call then only copies x_T and the labels in, draws the noise and replays
    the graphs. The same generator gives the same samples with or without graphs.
    Classifier guidance (autograd through the classifier) is not captured.
    See ``fastguide.sample`` for the other arguments.
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
        cuda_graph: bool = False,
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
        if cuda_graph and self.classifier is not None:
            raise ValueError(
                "cuda_graph=True cannot capture classifier guidance (its gradient runs autograd "
                "through the classifier); use cuda_graph=False"
            )
        self.cuda_graph = cuda_graph
        # (shape, device, labelled) -> (buffers, plans, graphs) of the captured runs.
        self._graphs: dict[tuple, tuple[_Buffers, list[StepPlan], list]] = {}
        self._plan_cache: dict[bool, list[StepPlan]] = {}
        self._plans(learned_variance=False)  # an unknown sampler or variance type fails here

    def _plans(self, learned_variance: bool) -> list[StepPlan]:
        """The plan for a model with or without learned variance (computed once each)."""
        if learned_variance not in self._plan_cache:
            variance_type = self.variance_type or ("learned_range" if learned_variance else "fixed_small")
            self._plan_cache[learned_variance] = plan_steps(
                self.sampler, self.schedule, self.timesteps, eta=self.eta, variance_type=variance_type
            )
        return self._plan_cache[learned_variance]

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
        if self.cuda_graph and device.type not in _GRAPH_DEVICE_TYPES:
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
        labels = self._check_labels(labels, shape[0], device)
        x_T = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        calls = range(len(self._plans(learned_variance=False)))
        if progress:
            from tqdm.auto import tqdm

            calls = tqdm(calls, desc=f"{self.sampler} sampling")
        if self.cuda_graph:
            return self._replay(shape, device, x_T, labels, generator, calls)

        buffers = self._new_buffers(shape, device, labels is not None)
        self._load(buffers, x_T, labels)
        plans = self._plans(learned_variance=False)
        fresh_noise = lambda: torch.randn(shape, generator=generator, device=device)  # noqa: E731
        for i in calls:
            plans = self._step(i, plans, buffers, shape, fresh_noise)
        return buffers.model_input[: shape[0]].clone()

    def _new_buffers(self, shape: tuple[int, ...], device: torch.device, labelled: bool) -> _Buffers:
        rows = 2 * shape[0] if self.cfg is not None else shape[0]
        apg = self.cfg.apg if self.cfg is not None else None
        return _Buffers(
            model_input=torch.empty((rows, *shape[1:]), device=device),
            labels_in=torch.empty(rows, dtype=torch.long, device=device) if labelled else None,
            x0=(torch.empty(shape, device=device), torch.empty(shape, device=device)),
            apg=torch.empty(shape, device=device) if apg is not None and apg.momentum else None,
            noise=torch.zeros(shape, device=device),
        )

    def _load(self, buffers: _Buffers, x_T: Tensor, labels: Tensor | None) -> None:
        """Start a run: x_T in every half of the model input, the labels, a fresh APG state."""
        batch = x_T.shape[0]
        buffers.model_input[:batch] = x_T
        if self.cfg is not None:
            buffers.model_input[batch:] = x_T
        if labels is not None:
            buffers.labels_in[:batch] = labels
            if self.cfg is not None:
                buffers.labels_in[batch:] = self.null_label
        if buffers.apg is not None:
            buffers.apg.zero_()

    def _step(
        self, i: int, plans: list[StepPlan], buffers: _Buffers, shape: tuple[int, ...], draw_noise: Callable[[], Tensor]
    ) -> list[StepPlan]:
        """Model call i of the plan and its guided_step, in the buffers. Returns the plans,
        replanned after the first call when the model turns out to learn its variance."""
        batch = shape[0]
        model_input, labels_in = buffers.model_input, buffers.labels_in
        x = model_input[:batch]
        t = plans[i].t
        use_cfg = self.cfg is not None and self.cfg.active_at(self.schedule.edm_sigma(t))
        n = model_input.shape[0] if use_cfg else batch
        t_in = torch.full((n,), t, device=x.device, dtype=torch.long)
        if labels_in is not None:
            model_output = self.model(model_input[:n], t_in, labels_in[:n])
        else:
            model_output = self.model(model_input[:n], t_in)
        learned_variance = model_output.shape[1] == 2 * shape[1]
        if i == 0 and learned_variance:
            plans = self._plans(learned_variance=True)
        plan = plans[i]
        x0_out, prev = buffers.x0[i % 2], buffers.x0[(i + 1) % 2]
        alpha, sigma = self.schedule.alpha_sigma(t)
        kwargs = dict(
            alpha=alpha, sigma=sigma, prediction_type=self.prediction_type,
            clip_denoised=self.clip_denoised, k_x=plan.k_x, k_x0=plan.k_x0, k_eps=plan.k_eps,
            log_variance_range=plan.log_variance_range if learned_variance else None,
            out=model_input, x0_out=x0_out if self.sampler in _KEEPS_X0 else None,
        )
        if use_cfg:
            kwargs.update(self.cfg.step_kwargs(), apg_buffer=buffers.apg)
        if plan.k_prev:
            kwargs.update(prev=prev, k_prev=plan.k_prev)
        if plan.k_noise:
            kwargs.update(noise=draw_noise(), k_noise=plan.k_noise)
        if self.classifier is not None and self.classifier.scale:
            grad = self.classifier.gradient(x, t_in[:batch], labels_in[:batch])
            if plan.ancestral:
                kwargs.update(grad=grad, k_grad=self.classifier.scale * plan.variance)
            else:
                kwargs.update(grad=grad, grad_eps_scale=self.classifier.scale * sigma)
        if self.dynamic_threshold is not None:
            model_output, kwargs = self._dynamic_threshold(model_output, x, kwargs, x0_out)
        ops.guided_step(model_output, x, **kwargs)
        return plans

    def _replay(self, shape, device, x_T, labels, generator, calls) -> Tensor:
        """The loop as CUDA graphs: captured on the first call for this shape, then replayed."""
        key = (shape, device, labels is not None)
        if key not in self._graphs:
            self._graphs[key] = self._capture(shape, device, x_T, labels)
        buffers, plans, graphs = self._graphs[key]
        self._load(buffers, x_T, labels)
        for i in calls:
            if plans[i].k_noise:  # drawn outside the graph: the same stream as without graphs
                torch.randn(shape, generator=generator, device=device, out=buffers.noise)
            graphs[i].replay()
        return buffers.model_input[: shape[0]].clone()

    def _capture(self, shape, device, x_T, labels) -> tuple[_Buffers, list[StepPlan], list]:
        buffers = self._new_buffers(shape, device, labels is not None)
        self._load(buffers, x_T, labels)
        plans = self._plans(learned_variance=False)
        static_noise = lambda: buffers.noise  # noqa: E731
        # Warm up on a side stream, as torch.cuda.graph asks (lazy initialisation, cuDNN and
        # Triton autotuning, allocator); this also settles the plan (learned variance).
        with _side_stream(device):
            for i in range(len(plans)):
                plans = self._step(i, plans, buffers, shape, static_noise)
        # One graph per model call (each has its own scalars), all in one memory pool:
        # safe because they always replay in capture order, one at a time.
        pool = _graph_pool()
        graphs = [
            _capture_graph(functools.partial(self._step, i, plans, buffers, shape, static_noise), pool)
            for i in range(len(plans))
        ]
        return buffers, plans, graphs

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


# The CUDA-graph machinery, in three functions so that a CPU test can stand in for it.
_GRAPH_DEVICE_TYPES = ("cuda",)


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a fresh stream that waits for, and is then waited on by, the current one."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _graph_pool():
    return torch.cuda.graph_pool_handle()


def _capture_graph(fn: Callable[[], object], pool) -> "torch.cuda.CUDAGraph":
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


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
    cuda_graph: bool = False,
) -> Tensor:
    """Draw samples of ``shape`` from ``model(x_t, t, y) -> prediction`` (ADM's signature).

    Args:
        labels: (B,) class indices; required by CFG and classifier guidance.
        sampler: "ddim", "ddpm", "euler", "dpm++2m" or "dpm++2s" (two model calls per step).
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
        cuda_graph: capture the loop as CUDA graphs and replay them (CUDA only; not with
            classifier guidance). Capture costs a warm-up run: hold a ``GuidedSampler`` to
            reuse the graphs across calls.

    Returns x_0 of ``shape``.
    """
    sampler_ = GuidedSampler(
        model, sampler=sampler, steps=steps, schedule=schedule, guidance=guidance, eta=eta,
        clip_denoised=clip_denoised, prediction_type=prediction_type, variance_type=variance_type,
        null_label=null_label, dynamic_threshold=dynamic_threshold, cuda_graph=cuda_graph,
    )
    return sampler_(shape, labels=labels, generator=generator, noise=noise, device=device, progress=progress)

"""Samplers against exact oracles (Gaussian data, whose noisy scores are known in closed
form), against diffusers' schedulers on the same model and noise, and on a tiny UNet."""

import copy
import functools
import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import fastguide
from fastguide import APG, CFG, AutoGuidance, CFGPlusPlus, ClassifierGuidance, GuidedSampler, NoiseSchedule, ops, sample
from fastguide.ops import backends
from fastguide.ops.contract import GuidanceCombine, StepCoefficients, StepTensors
from fastguide.sampling import cuda_graphs
from fastguide.sampling.guidance import default_sampler
from fastguide.sampling.solvers import FLOW_ONLY, SAMPLERS, VP_ONLY, plan_steps
from tests.helpers import backends_for, randomize, tiny_cfg_unet, tiny_classifier, tiny_unet

SCHEDULE = NoiseSchedule.linear()


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


def test_linear_and_cosine_schedules_match_adm():
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(SCHEDULE.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    cosine = NoiseSchedule.cosine(1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine.alpha_bar(499) == pytest.approx(f(500 / 1000) / f(0), rel=1e-9)
    assert float(cosine.betas.max()) <= 0.999


def test_timestep_respacing():
    assert SCHEDULE.timesteps(4) == [999, 666, 333, 0]
    assert SCHEDULE.timesteps("ddim25") == list(range(0, 1000, 40))[::-1]
    assert SCHEDULE.timesteps([10, 500, 3]) == [500, 10, 3]
    for bad in (0, 1001, "fast", [1000]):
        with pytest.raises(ValueError):
            SCHEDULE.timesteps(bad)


@pytest.mark.parametrize("steps", [1, 6, 25, 45, 333])
def test_strided_timesteps_keep_the_count_and_skip_the_last_timestep(steps):
    grid = SCHEDULE.strided_timesteps(steps)
    assert len(grid) == steps and grid[-1] == 0 and grid == sorted(set(grid), reverse=True)
    assert 999 - grid[0] >= 0.5 * 999 / steps  # at least half a stride short of t = 999
    if steps == 25:
        assert grid == SCHEDULE.timesteps("ddim25")


# --------------------------------------------------------------------------------------
# Exact oracle: Gaussian mixtures in image-shaped tensors
# --------------------------------------------------------------------------------------


class GaussianMixture:
    """x0 ~ Σ_k π_k N(μ_k, s_k² I) over (C, H, W); at t, x_t ~ Σ π_k N(α μ_k, (α² s_k² + σ²) I)."""

    def __init__(self, means, stds, weights):
        self.means = torch.tensor(np.array(means), dtype=torch.float64)  # (K, C, H, W)
        self.stds = torch.tensor(stds, dtype=torch.float64)
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def log_components(self, x, t):
        alpha, sigma = SCHEDULE.alpha_sigma(int(t))
        var = alpha**2 * self.stds**2 + sigma**2  # (K,)
        diff = x[:, None].double() - alpha * self.means[None]
        d = x[0].numel()
        return (
            torch.log(self.weights)
            - 0.5 * d * torch.log(2 * math.pi * var)
            - 0.5 * diff.flatten(2).square().sum(-1) / var
        )  # (B, K)

    def eps(self, x, t, component=None):
        """E[ε | x_t] = −σ ∇ log p_t, of the mixture or of one component."""
        alpha, sigma = SCHEDULE.alpha_sigma(int(t))
        var = alpha**2 * self.stds**2 + sigma**2
        diff = x[:, None].double() - alpha * self.means[None]
        scaled = diff / var.reshape(1, -1, 1, 1, 1)
        if component is not None:
            return (sigma * scaled[torch.arange(len(x)), component]).to(x.dtype)
        w = torch.softmax(self.log_components(x, t), dim=-1).reshape(len(x), -1, 1, 1, 1)
        return (sigma * (w * scaled).sum(1)).to(x.dtype)


class MixtureModel(torch.nn.Module):
    """model(x, t, y): the exact eps of class y (= component y), or of the whole mixture for
    the null label K."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture
        self.num_classes = len(mixture.weights)
        self.null_class = True

    def forward(self, x, t, y=None):
        out = torch.empty_like(x)
        for i in range(len(x)):
            label = None if y is None or int(y[i]) == self.num_classes else int(y[i])
            comp = None if label is None else torch.tensor([label])
            out[i] = self.mixture.eps(x[i : i + 1], t[i], comp)[0]
        return out


class ExactClassifier(torch.nn.Module):
    """log p(y | x_t) of the mixture, exactly: its gradient is ∇ log p_y − ∇ log p."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, t):
        return torch.stack([self.mixture.log_components(x[i : i + 1], t[i])[0] for i in range(len(x))]).to(x.dtype)


MIXTURE = GaussianMixture(
    means=[np.full((1, 2, 2), -0.5), np.full((1, 2, 2), 0.4) * np.array([[1, -1], [1, 1]])],
    stds=[0.15, 0.25],
    weights=[0.3, 0.7],
)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "dpm++2m", "dpm++2s"])
def test_many_steps_sample_the_true_mixture(sampler):
    n = 3000
    model = MixtureModel(MIXTURE)
    batched = lambda x, t, y=None: torch.cat([MIXTURE.eps(x[i : i + 500], t[0]) for i in range(0, len(x), 500)])  # noqa: E731
    samples = sample(
        batched,
        (n, 1, 2, 2),
        sampler=sampler,
        steps=200 if sampler != "ddpm" else 1000,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(0),
    ).double()
    assert model.num_classes == 2
    component = MIXTURE.log_components(samples, 0).argmax(-1)
    weight = (component == 1).double().mean()
    assert abs(weight - 0.7) < 4 * math.sqrt(0.21 / n)
    for k in range(2):
        members = samples[component == k]
        mean_error = (members.mean(0) - MIXTURE.means[k]).abs().max()
        assert mean_error < 4 * MIXTURE.stds[k] / math.sqrt(len(members)) + 0.01
        std = members.flatten(1).std(0)
        assert (std - MIXTURE.stds[k]).abs().max() < 4 * MIXTURE.stds[k] / math.sqrt(2 * len(members)) + 0.01


def gaussian_cfg_exact(x_T, w, t_max, mean_c, std_c, mean_u, std_u):
    """Exact end point of guided sampling for Gaussian cond/uncond models.

    In σ̃ = σ/α and x̃ = x/α the probability-flow ODE is dx̃/dσ̃ = eps(x̃) with
    eps = σ̃·[(1 − w)(x̃ − μ_u)/(s_u² + σ̃²) + w(x̃ − μ_c)/(s_c² + σ̃²)] = A(σ̃)x̃ − B(σ̃):
    x̃(σ̃₀) = Φ·x̃(σ̃_T) + ψ with dΦ/dσ̃ = AΦ, dψ/dσ̃ = Aψ − B, Φ = 1 and ψ = 0 at σ̃_T.
    Every sampler's last step is the same exact denoiser at t = 0 (x0 = x̃ − σ̃·eps), so
    the ODE runs to σ̃₀ = σ̃(t=0) and the denoiser is applied there.
    """

    def coefficients(s):
        a = s * ((1 - w) / (std_u**2 + s**2) + w / (std_c**2 + s**2))
        b = s * ((1 - w) * mean_u / (std_u**2 + s**2) + w * mean_c / (std_c**2 + s**2))
        return a, b

    def rhs(s, state):
        a, b = coefficients(s)
        return [a * state[0], a * state[1] - b]

    start, end = SCHEDULE.edm_sigma(t_max), SCHEDULE.edm_sigma(0)
    solution = solve_ivp(rhs, (start, end), [1.0, 0.0], rtol=1e-12, atol=1e-12, method="DOP853")
    phi, psi = solution.y[:, -1]
    x_end = phi * x_T / SCHEDULE.alpha_sigma(t_max)[0] + psi
    a, b = coefficients(end)
    return x_end - end * (a * x_end - b)


def gaussian_cfg_error(sampler, steps, w=3.0, mean_c=0.6, std_c=0.5, mean_u=0.0, std_u=0.8):
    c = GaussianMixture([np.full((1, 1, 1), mean_c)], [std_c], [1.0])
    u = GaussianMixture([np.full((1, 1, 1), mean_u)], [std_u], [1.0])

    def model(x, t, y):
        batch = len(x) // 2
        return torch.cat([c.eps(x[:batch], t[0]), u.eps(x[batch:], t[0])])

    x_T = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1, 1, 1)
    # ADM's time-uniform grid, which ends with a model call at t = 0 (as these tests measured).
    runner = GuidedSampler(
        model,
        sampler=sampler,
        steps=steps,
        spacing="adm",
        guidance=CFG(w),
        clip_denoised=False,
        null_label=1,
        num_classes=1,
    )
    got = runner(x_T.shape, labels=torch.zeros(11, dtype=torch.long), noise=x_T.float())
    exact = gaussian_cfg_exact(x_T, w, runner.timesteps[0], mean_c, std_c, mean_u, std_u)
    return (got.double() - exact).abs().max().item()


def test_cfg_converges_to_the_exact_guided_ode_at_each_solver_order():
    # Measured here (ADM's time-uniform grid, w = 3): DDIM 0.36, 0.17, 0.084, 0.042 and
    # DPM-Solver++(2M) 1.09, 0.40, 0.14, 0.037 at 10, 20, 40, 80 steps. The second-order
    # solver wins only from ~80 steps on this grid because of the grid, not the solver: its
    # last steps, near t = 0, are each far longer in log-SNR than the ones before. On the
    # default "logsnr" grid it wins at every count (tests/sampling/test_solvers.py).
    steps = (20, 40, 80, 160)
    ddim = [gaussian_cfg_error("ddim", n) for n in steps]
    dpm = [gaussian_cfg_error("dpm++2m", n) for n in steps]
    for coarse, fine in zip(ddim, ddim[1:]):
        assert 1.7 < coarse / fine < 2.3  # first order
    assert dpm[2] / dpm[3] > 3.5  # second order once steps are small
    assert dpm[3] < ddim[3] / 2
    assert gaussian_cfg_error("dpm++2m", 600) < 2e-3


def test_dpm_solver_pp_2s_matches_written_out_steps():
    # DPM-Solver++(2S), Lu et al. 2022 (Algorithm 1 with a general r), its intermediate point
    # the grid timestep whose λ is nearest the midpoint; first order (x0) at the last step.
    timesteps = [999, 600, 300]
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = SCHEDULE.log_snr

    def denoised(x, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        return (x - sigma * toy_eps(x, torch.full((len(x),), t))) / alpha

    x = x_T.clone()
    for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
        d = denoised(x, t)
        if t_next < 0:
            x = d
            break
        mid = min(range(t_next + 1, t), key=lambda c: abs(lam(c) - (lam(t) + lam(t_next)) / 2))
        h, rh = lam(t_next) - lam(t), lam(mid) - lam(t)
        r = rh / h
        (_, sigma), (alpha_mid, sigma_mid) = SCHEDULE.alpha_sigma(t), SCHEDULE.alpha_sigma(mid)
        alpha_next, sigma_next = SCHEDULE.alpha_sigma(t_next)
        u = sigma_mid / sigma * x - alpha_mid * math.expm1(-rh) * d
        d_mid = denoised(u, mid)
        x = sigma_next / sigma * x - alpha_next * math.expm1(-h) * ((1 - 1 / (2 * r)) * d + d_mid / (2 * r))

    calls = []

    def model(x_, t_):
        calls.append(int(t_[0]))
        return toy_eps(x_, t_)

    got = sample(model, x_T.shape, sampler="dpm++2s", steps=timesteps, noise=x_T.float(), clip_denoised=False)
    assert len(calls) == 2 * len(timesteps) - 1 and calls[::2] == timesteps
    torch.testing.assert_close(got.double(), x, atol=2e-5, rtol=1e-5)


def test_dpm_solver_pp_2s_is_second_order_and_beats_ddim_at_equal_model_calls():
    # Measured here (w = 3): DPM-Solver++(2S) 0.234, 0.066, 0.018, 0.0051, 0.0012 at 10, 20,
    # 40, 80, 160 steps (2·steps − 1 model calls); DDIM 0.169, 0.084, 0.042, 0.021 at 20, 40,
    # 80, 160. Unlike 2M, the singlestep solver needs no extrapolation over the large late
    # log-SNR steps, so it wins from ~40 model calls on.
    steps = (20, 40, 80)
    errors = [gaussian_cfg_error("dpm++2s", n) for n in steps]
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine > 3.2  # second order
    for n, error in zip(steps, errors):
        assert error < gaussian_cfg_error("ddim", 2 * n)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_classifier_guidance_equals_cfg_at_one_plus_s_step_for_step(dtype, tolerance):
    # (in float64 the classifier's log-softmax and gradient stay in float64 too)
    model, s = MixtureModel(MIXTURE), 2.5
    labels = torch.tensor([0, 1, 1, 0])
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=dtype)
    common = dict(sampler="ddim", steps=8, clip_denoised=False, noise=noise, labels=labels)

    conditional = lambda x, t, y: model(x, t, y)  # noqa: E731
    classifier = sample(
        conditional, noise.shape, guidance=ClassifierGuidance(ExactClassifier(MIXTURE), s), null_label=2, **common
    )
    cfg = sample(model, noise.shape, guidance=CFG(1 + s), **common)
    torch.testing.assert_close(classifier, cfg, atol=tolerance, rtol=tolerance)


# --------------------------------------------------------------------------------------
# Cross-checks against diffusers' schedulers
# --------------------------------------------------------------------------------------


@pytest.fixture
def diffusers():
    """diffusers, for the tests that compare with it: they skip without it, the rest of the
    module (the CUDA-graph tests among them, on a GPU machine without it) still runs."""
    return pytest.importorskip("diffusers")


def toy_eps(x, t):
    """A smooth deterministic "model" of x and t."""
    return torch.tanh(0.7 * x + 0.3) * (0.5 + t.float().reshape(-1, 1, 1, 1) / 2000)


def _run_diffusers(scheduler, x_T, timesteps, extra_step_kwargs=None, learned=False):
    x = x_T.clone()
    for t in timesteps:
        t_batch = torch.full((len(x),), int(t))
        out = toy_eps(x, t_batch)
        if learned:
            out = torch.cat([out, torch.tanh(x - 0.2)], dim=1)
        x = scheduler.step(out, int(t), x, **(extra_step_kwargs or {})).prev_sample
    return x


def test_ddim_matches_diffusers(diffusers):
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True, steps_offset=0
    )
    scheduler.set_timesteps(20)
    timesteps = scheduler.timesteps.tolist()
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _run_diffusers(scheduler, x_T, timesteps, dict(eta=0.0, use_clipped_model_output=True))
    got = sample(lambda x, t: toy_eps(x, t), x_T.shape, sampler="ddim", steps=timesteps, noise=x_T)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_dpm_solver_pp_2m_matches_diffusers(diffusers):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2
    )
    scheduler.set_timesteps(15)
    timesteps = scheduler.timesteps.tolist()
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = _run_diffusers(scheduler, x_T, timesteps)
    got = sample(
        lambda x, t: toy_eps(x, t), x_T.shape, sampler="dpm++2m", steps=timesteps, noise=x_T, clip_denoised=False
    )
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-5)


def test_ddpm_learned_range_matches_diffusers(diffusers):
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range", clip_sample=True
    )
    scheduler.set_timesteps(25)
    timesteps = scheduler.timesteps.tolist()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = _run_diffusers(scheduler, x_T, timesteps, dict(generator=torch.Generator().manual_seed(7)), learned=True)

    def model(x, t):
        return torch.cat([toy_eps(x, t), torch.tanh(x - 0.2)], dim=1)

    got = sample(
        model, x_T.shape, sampler="ddpm", steps=timesteps, noise=x_T, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# On a tiny UNet
# --------------------------------------------------------------------------------------


def test_batched_cfg_equals_two_separate_forwards():
    model = tiny_cfg_unet()
    labels = torch.tensor([0, 3])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    got = sample(model, noise.shape, labels=labels, sampler="ddim", steps=3, guidance=CFG(4.0), noise=noise)
    # The same DDIM loop written out with two forwards per step and torch.chunk-free formulas.
    x, w, timesteps = noise.clone(), 4.0, SCHEDULE.spaced_timesteps(3, SCHEDULE.default_spacing)
    with torch.no_grad():
        for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
            t_b = torch.full((2,), t)
            eps_c = model(x, t_b, labels)[:, :3]
            eps_u = model(x, t_b, torch.full_like(labels, 4))[:, :3]
            eps = eps_u + w * (eps_c - eps_u)
            abar, abar_next = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_next)
            x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
            eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            x = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps
    # Batched and separate forwards differ by fp32 rounding (~5e-6 here), which the first
    # step's x0 = (x − σ·eps)/α amplifies by 1/α_T ≈ 157.
    torch.testing.assert_close(got, x, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", sorted(set(backends_for("guided_step")) - {"torch"}))
def test_samples_agree_between_backends(backend):
    # A DiT with learned sigma: its layer norms, attention and the guided step on the
    # backend (the UNet's forward across backends is tests/models/test_unet.py's; under the
    # interpreter its 25 group norms a forward take ~100 s for these three steps, the DiT 1 s).
    model = randomize(
        fastguide.DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4),
        seed=5,
    ).eval()
    # Starting at t = 600 (α ≈ 0.5) keeps fp32 differences between the backends' DiT
    # forwards from being amplified by 1/α_T ≈ 157; three steps run DPM-Solver++'s
    # second-order (prev) path.
    kwargs = dict(
        labels=torch.tensor([1]),
        sampler="dpm++2m",
        steps=[600, 300, 100],
        noise=torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(6)),
        guidance=CFG(3.0, rescale=0.5),
    )
    with fastguide.backend("torch"):
        expected = sample(model, (1, 3, 8, 8), **kwargs)
    with fastguide.backend(backend):
        got = sample(model, (1, 3, 8, 8), **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(
    "guidance",
    [
        None,
        CFG(2.0),
        CFG(5.0, rescale=0.7, interval=(0.3, 5.0)),
        CFG(4.0, apg=APG(eta=0.0, norm_threshold=2.0, momentum=-0.5)),
        CFG(3.0, zero_star=True),
        CFG(4.0, rescale=0.5, tangential=True),
    ],
    ids=str,
)
def test_every_sampler_and_guidance_runs_and_is_reproducible(sampler, guidance):
    model = tiny_cfg_unet()
    # SiT's SDE runs on a flow path (the tiny UNet stands in for a velocity model); the rest on
    # ADM's, DDIM with noise (eta applies to it alone).
    path = (
        dict(schedule=NoiseSchedule.flow(), prediction_type="flow_prediction")
        if sampler in FLOW_ONLY
        else dict(eta=0.5)
        if sampler == "ddim"
        else {}
    )
    run = lambda: sample(
        model,
        (2, 3, 8, 8),
        labels=torch.tensor([0, 2]),
        sampler=sampler,
        steps=3,  # noqa: E731
        guidance=guidance,
        generator=torch.Generator().manual_seed(9),
        **path,
    )
    first, second = run(), run()
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_plans_end_on_clean_data():
    flow = NoiseSchedule.flow(shift=3.0)
    for sampler in SAMPLERS:
        for schedule in [s for s in (SCHEDULE, flow) if sampler not in (FLOW_ONLY if s is SCHEDULE else VP_ONLY)]:
            last = plan_steps(sampler, schedule, schedule.timesteps(10))[-1]
            assert last.t_next == -1 and last.k_noise == 0


def test_sampler_errors():
    model = tiny_cfg_unet()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        sample(model, (2, 3, 8, 8), labels=torch.tensor([0, 4]), steps=2)
    with pytest.raises(ValueError, match="one class per sample"):
        sample(model, (2, 3, 8, 8), labels=torch.tensor([0]), steps=2)
    with pytest.raises(ValueError, match="steps must be an int from 1 to 1000"):
        sample(model, (2, 3, 8, 8), labels=torch.tensor([0, 1]), steps=0)
    with pytest.raises(ValueError, match="CFG needs a null label"):
        sample(lambda x, t, y: x, (2, 3, 8, 8), labels=torch.tensor([0, 1]), guidance=CFG(2.0), steps=2)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(model, (2, 3, 8, 8), labels=torch.tensor([0, 1]), sampler="plms", steps=2)


def test_sample_takes_every_argument_of_guided_sampler():
    sampler_args = set(inspect.signature(GuidedSampler.__init__).parameters) - {"self"}
    call_args = set(inspect.signature(GuidedSampler.__call__).parameters) - {"self"}
    assert sampler_args | call_args <= set(inspect.signature(sample).parameters)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_callback_sees_every_model_call(sampler):
    model = tiny_cfg_unet()
    seen = []

    def callback(info):
        seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in info.items()})

    kwargs = dict(
        labels=torch.tensor([0, 3]),
        sampler=sampler,
        steps=4,
        guidance=CFG(3.0),
        noise=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
    )
    final = sample(model, (2, 3, 8, 8), callback=callback, **kwargs)
    assert [info["i"] for info in seen] == list(range(4))
    assert [info["t"] for info in seen] == SCHEDULE.spaced_timesteps(4, SCHEDULE.default_spacing)
    torch.testing.assert_close(seen[-1]["x"], final, rtol=0, atol=0)
    # The last step of both samplers lands on its x0 (first order onto clean data).
    torch.testing.assert_close(seen[-1]["denoised"], final, rtol=0, atol=0)
    # The callback only watches: the samples are those of a run without it.
    torch.testing.assert_close(sample(model, (2, 3, 8, 8), **kwargs), final, rtol=0, atol=0)


def test_a_callbacks_in_place_edit_of_x_reaches_every_row_block_of_the_next_forward():
    """An inpainting-style blend of x in the callback: the next forward's conditional and
    unconditional rows both see it."""
    inputs = []

    def model(x, t, y):
        inputs.append(x.clone())
        return 0.1 * x + 0.01 * y.float().reshape(-1, 1, 1, 1)

    def blend(d):
        if d["i"] == 0:
            d["x"][..., :2] = 0.5  # the known region

    kwargs = dict(labels=torch.tensor([0, 2]), sampler="ddim", steps=3, guidance=CFG(3.0), null_label=4)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for mode in (torch.no_grad, torch.inference_mode):  # inference tensors keep no version counter
        inputs.clear()
        with mode():
            sample(model, noise.shape, noise=noise, callback=blend, **kwargs)
        second = inputs[1]  # [cond; uncond] rows of the call after the edit
        assert torch.equal(second[:2], second[2:])
        assert (second[..., :2] == 0.5).all()


def test_a_callback_may_not_change_the_solvers_history():
    def scribble(d):
        d["denoised"].zero_()

    for mode in (torch.no_grad, torch.inference_mode):  # inference tensors keep no version counter
        with mode(), pytest.raises(RuntimeError, match="changed its 'denoised' in place"):
            sample(lambda x, t: 0.1 * x, (1, 3, 4, 4), sampler="dpm++2m", steps=3, callback=scribble)
    # a callback that only reads gets the same samples as none
    seen = []
    with torch.inference_mode():
        noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        plain = sample(lambda x, t: 0.1 * x, noise.shape, noise=noise, sampler="dpm++2m", steps=3)
        read = sample(
            lambda x, t: 0.1 * x,
            noise.shape,
            noise=noise,
            sampler="dpm++2m",
            steps=3,
            callback=lambda d: seen.append(d),
        )
    assert torch.equal(plain, read) and len(seen) == 3


def test_labels_are_checked_against_a_label_table_without_num_classes():
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.label_emb = torch.nn.Embedding(5, 3)

        def forward(self, x, t, y):
            return x * self.label_emb(y).sum(1).reshape(-1, 1, 1, 1)

    with pytest.raises(ValueError, match="labels must index the model's label table of 5 rows, got 9"):
        sample(Table(), (2, 3, 4, 4), steps=2, labels=torch.tensor([0, 9]))


def test_numpy_scalars_are_numbers():
    """A NumPy scalar where a number is asked (a scale, eta, a step count) is taken as one."""
    guidance = CFG(np.float32(3.0), rescale=np.float64(0.5), interval=[np.float32(0.5), 5])
    assert guidance == CFG(3.0, rescale=0.5, interval=(0.5, 5.0)) and type(guidance.scale) is float
    assert type(CFG(2.0, zero_star=True, zero_init_steps=np.int64(1)).zero_init_steps) is int
    assert type(CFG(2.0, guided_channels=np.int32(3)).guided_channels) is int
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: 0.1 * x  # noqa: E731
    got = sample(model, noise.shape, noise=noise, sampler="ddim", steps=np.int64(4), eta=np.float32(0.0))
    torch.testing.assert_close(got, sample(model, noise.shape, noise=noise, sampler="ddim", steps=4), rtol=0, atol=0)
    # integer counts and labels too: shape, solver_order, null_label, num_classes
    shape = tuple(np.array([1, 3, 4, 4]))
    got = sample(model, shape, noise=noise, sampler="unipc", steps=4, solver_order=np.int64(2))
    torch.testing.assert_close(got, sample(model, noise.shape, noise=noise, sampler="unipc", steps=4, solver_order=2))
    guided = GuidedSampler(
        lambda x, t, y: 0.1 * x, steps=3, guidance=CFG(2.0), null_label=np.int64(10), num_classes=np.int64(10)
    )
    assert type(guided.null_label) is int and type(guided.num_classes) is int
    with pytest.raises(TypeError, match="progress must be a bool, got 'no'"):
        sample(model, noise.shape, noise=noise, steps=2, progress="no")


def test_an_interval_given_as_a_list_is_the_guidances_own():
    interval = [0.5, 5.0]
    guidance = CFG(3.0, interval=interval)
    interval[0] = 7.0  # the caller's list: no longer the guidance's
    assert guidance.interval == (0.5, 5.0)
    hash(guidance)  # a setting is a key (accelerate's kept samplers)


def test_an_interval_that_holds_no_call_warns():
    # --interval 0 0.0001 sampled without guidance, exactly as --guidance none, without a word
    import warnings

    model = lambda x, t, y: 0.1 * x  # noqa: E731
    options = dict(sampler="ddim", steps=3, null_label=10, num_classes=10)
    with pytest.warns(UserWarning, match=r"the guidance interval \(0.0, 0.0001\) .* holds none of the 3 model calls"):
        GuidedSampler(model, guidance=CFG(3.0, interval=(0.0, 1e-4)), **options)((1, 3, 4, 4), labels=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuidedSampler(model, guidance=CFG(3.0, interval=(0.3, 5.0)), **options)((1, 3, 4, 4), labels=[1])


def test_learned_variance_is_planned_once():
    # A model with learned sigma under ADM's learned-range DDPM: one plan, computed once.
    model = tiny_cfg_unet()
    guided = GuidedSampler(model, sampler="ddpm", steps=3, guidance=CFG(2.0))
    guided((1, 3, 8, 8), labels=torch.tensor([1]), generator=torch.Generator().manual_seed(0))
    plan = guided._calls(True)
    guided((1, 3, 8, 8), labels=torch.tensor([2]), generator=torch.Generator().manual_seed(1))
    assert guided._calls(True) is plan
    assert all(call.step.log_variance_range is not None for call in plan[:-1])


BAD_SAMPLER_ARGUMENTS = {
    "float labels": (dict(labels=torch.tensor([0.5, 1.7])), TypeError, "labels must be integer class indices"),
    "timesteps beyond the schedule": (dict(steps=[999.5, 100.0]), ValueError, r"timesteps must lie in \[0, 999\]"),
    "string timesteps": (dict(steps=["500", 100]), TypeError, "sequence of numbers"),
    "steps=True": (dict(steps=True), TypeError, "steps must be an int"),
    "steps=2.5": (dict(steps=2.5), TypeError, "steps must be an int"),
    "string dynamic_threshold": (dict(dynamic_threshold="0.9"), ValueError, "dynamic_threshold must be"),
    "eta=nan": (dict(eta=math.nan), ValueError, "eta must be a finite"),
    "null_label outside the table": (dict(guidance=CFG(2.0), null_label=7), ValueError, "null_label must index"),
    "meta device": (dict(device="meta"), ValueError, "device must hold data"),
    "zero batch in shape": (dict(shape=(0, 3, 8, 8)), ValueError, "shape must hold positive ints"),
    "shape not a sequence": (dict(shape=2), TypeError, "shape must be a sequence"),
    "string labels": (dict(labels="cat"), TypeError, "labels must be integer class indices"),
    "negative labels": (dict(labels=[-1, 0]), ValueError, "labels must be non-negative"),
    "schedule by name": (dict(schedule="cosine"), TypeError, "schedule must be a fastguide.NoiseSchedule"),
    "numpy noise": (dict(noise=__import__("numpy").zeros((2, 3, 8, 8))), TypeError, "noise must be a torch.Tensor"),
    "integer noise": (dict(noise=torch.zeros(2, 3, 8, 8, dtype=torch.int64)), TypeError, "noise must be a floating"),
    "labels of two dims": (dict(labels=torch.tensor([[0], [1]])), ValueError, r"labels must have shape \(2,\)"),
    "empty timesteps": (dict(steps=[]), ValueError, "must name at least one"),
    # the threshold replaces the static clip: both given, one would be ignored
    "clip_denoised with dynamic_threshold": (
        dict(clip_denoised=True, dynamic_threshold=0.9),
        ValueError,
        "clip_denoised=True and dynamic_threshold both clip x0",
    ),
    "int generator": (dict(generator=42), TypeError, "generator must be a torch.Generator"),
    "clip_denoised a string": (dict(clip_denoised="no"), TypeError, "clip_denoised must be a bool or None, got 'no'"),
    "prediction type typo": (dict(prediction_type="x0"), ValueError, "prediction_type must be one of"),
    "spacing with explicit timesteps": (dict(steps=[900, 100], spacing="trailing"), ValueError, "places a step count"),
    # v → x0 assumes α² + σ² = 1: on a flow path the samples ended 8% off.
    "v_prediction on a flow path": (
        dict(schedule=NoiseSchedule.flow(), prediction_type="v_prediction"),
        ValueError,
        "'v_prediction' converts to x0 and eps only on a variance-preserving schedule",
    ),
    "epsilon at a flow path's pure noise": (
        dict(schedule=NoiseSchedule.flow(), prediction_type="epsilon"),
        ValueError,
        r"step.alpha must be positive to derive x0 from eps.*at the model call "
        r"at t = 1000.0 of sampler='unipc' on FlowSchedule.*takes prediction_type='flow_prediction'",
    ),
    "a grid the shift collapses": (
        dict(schedule=NoiseSchedule.flow(1e6), prediction_type="flow_prediction", steps=300),
        ValueError,
        r"the 300-step grid of shift=1000000.0 must stay distinct",
    ),
    "flow times one in float32": (
        dict(
            schedule=NoiseSchedule.flow(),
            prediction_type="flow_prediction",
            steps=[999.9999999999999, 999.9999999999998],
        ),
        ValueError,
        "float32 times",
    ),
    "solver_order=2.0": (dict(solver_order=2.0), TypeError, "solver_order must be an int"),
    "eta with a sampler that ignores it": (
        dict(eta=0.5),
        ValueError,
        r"eta .* applies to sampler='ddim'.*sampler=None",
    ),
    "variance_type with ddim": (
        dict(sampler="ddim", variance_type="fixed_large"),
        ValueError,
        "variance_type applies to sampler='ddpm'",
    ),
    "rho a string": (dict(rho="7", spacing="karras"), ValueError, "rho must be a positive number"),
    "rho without karras": (dict(rho=3.0, spacing="logsnr"), ValueError, "rho=3.0 shapes spacing='karras' only"),
    "rho with explicit timesteps": (dict(rho=3.0, steps=[999, 500]), ValueError, "shapes spacing='karras' only"),
    "repeated timesteps": (dict(steps=[999, 500, 500, 0]), ValueError, "timesteps must be distinct"),
    "repeated flow times": (
        dict(schedule=NoiseSchedule.flow(), prediction_type="flow_prediction", steps=[1000.0, 500.0, 500.0]),
        ValueError,
        "timesteps must be distinct",
    ),
    "uncond without guidance": (
        dict(labels=None, cond={"c": torch.ones(2, 1)}, uncond={"c": torch.zeros(2, 1)}),
        ValueError,
        "uncond= is the unconditional branch's conditioning",
    ),
    "weight schedule beyond float32": (
        dict(guidance=CFG(3e38, schedule="linear")),
        ValueError,
        r"CFG scale=3e\+38 with schedule='linear' gives the weight",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLER_ARGUMENTS), ids=str)
def test_bad_sampler_arguments_are_refused_before_any_forward(case):
    kwargs, error, message = BAD_SAMPLER_ARGUMENTS[case]
    calls = []

    def model(x, t, y):
        calls.append(1)
        return torch.zeros_like(x)

    model.num_classes, model.null_class = 4, True
    kwargs = {"shape": (2, 3, 8, 8), "labels": torch.tensor([0, 1]), "steps": 2, **kwargs}
    with pytest.raises(error, match=message):
        sample(model, kwargs.pop("shape"), **kwargs)
    assert not calls


@pytest.mark.parametrize("who", ["model", "guide_model", "classifier"])
def test_a_network_on_another_device_is_refused_by_name(who):
    # Weights on meta stand in for another device (CUDA weights, CPU noise): refused
    # before any forward, naming the network, rather than failing inside its first layer.
    networks = {"model": tiny_cfg_unet(), "guide_model": tiny_cfg_unet(), "classifier": tiny_classifier()}
    networks[who] = networks[who].to("meta")
    guidance = {
        "model": CFG(2.0),
        "guide_model": AutoGuidance(networks["guide_model"], 2.0),
        "classifier": [CFG(2.0), ClassifierGuidance(networks["classifier"], 1.0)],
    }[who]
    arguments = dict(labels=torch.tensor([1]), steps=2, guidance=guidance, noise=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=f"{who}'s weights are on meta but the samples are on cpu"):
        sample(networks["model"], (1, 3, 8, 8), **arguments)
    # an offloading hook moves the weights: not refused here, also on a leaf alone (diffusers'
    # leaf-level group offloading)
    list(networks[who].modules())[-1]._diffusers_hook = object()
    with pytest.raises(Exception) as raised:
        sample(networks["model"], (1, 3, 8, 8), **arguments)
    assert "weights are on" not in str(raised.value)


def test_a_numpy_bool_is_a_bool():
    # (its type's name is "bool" too: the refusal read "must be a bool ..., got bool")
    common = dict(labels=torch.tensor([1]), steps=2, guidance=CFG(2.0), noise=torch.randn(1, 3, 8, 8))
    for flag in (False, True):
        expected = sample(tiny_cfg_unet(), (1, 3, 8, 8), clip_denoised=flag, **common)
        assert torch.equal(sample(tiny_cfg_unet(), (1, 3, 8, 8), clip_denoised=np.bool_(flag), **common), expected)


def test_classifier_guidance_under_inference_mode_is_refused_clearly():
    # autograd through the classifier cannot run there; labels made there are taken
    guidance = [CFG(2.0), ClassifierGuidance(tiny_classifier(), 1.0)]
    with torch.inference_mode():
        labels = torch.tensor([1])
        with pytest.raises(RuntimeError, match=r"ClassifierGuidance .* torch.inference_mode\(\) forbids"):
            sample(tiny_cfg_unet(), (1, 3, 8, 8), labels=labels, steps=2, guidance=guidance)
    samples = sample(tiny_cfg_unet(), (1, 3, 8, 8), labels=labels, steps=2, guidance=guidance)
    assert samples.isfinite().all()


def test_a_network_in_training_mode_is_warned_about():
    # label dropout (and dropout) would randomise every sample whatever the generator
    model = tiny_unet(num_classes=4, null_class=True, label_dropout=0.5).train()
    with pytest.warns(UserWarning, match=r"model is in training mode, where its output is random \(label dropout\)"):
        sample(model, (1, 3, 8, 8), labels=torch.tensor([1]), steps=2, guidance=CFG(2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(model.eval(), (1, 3, 8, 8), labels=torch.tensor([1]), steps=2, guidance=CFG(2.0))
        sample(tiny_cfg_unet().train(), (1, 3, 8, 8), labels=torch.tensor([1]), steps=2)  # nothing random


@pytest.mark.parametrize(
    "model, kwargs, error, message",
    [
        (lambda x, t: (x,), {}, TypeError, "model must return a tensor"),
        (lambda x, t: x[:, :2], {}, ValueError, "model must return"),
        (
            lambda x, t: torch.tanh(x),
            dict(sampler="ddpm", variance_type="learned_range"),
            ValueError,
            "variance_type='learned_range' needs a model that outputs 2·3 channels",
        ),
    ],
)
def test_bad_model_outputs_are_named(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        sample(model, (1, 3, 8, 8), steps=3, **kwargs)


def test_a_model_returning_its_input_does_not_alias_the_step():
    # The step writes the next input into the buffer the model read; an output that is that
    # buffer is copied first, so the result equals that of a model returning a copy.
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    same = sample(lambda x, t: x, (1, 3, 8, 8), steps=3, noise=noise, clip_denoised=False)
    copy = sample(lambda x, t: x.clone(), (1, 3, 8, 8), steps=3, noise=noise, clip_denoised=False)
    torch.testing.assert_close(same, copy, rtol=0, atol=0)


def test_loop_dtype_follows_the_model():
    model = tiny_cfg_unet().double()
    got = sample(model, (1, 3, 8, 8), labels=[0], steps=2, noise=torch.randn(1, 3, 8, 8))
    assert got.dtype == torch.float64


class LinearClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = randomize(torch.nn.Linear(48, 4), seed=1)

    def forward(self, x, t):
        return self.linear(x.flatten(1))


class PointwiseModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = randomize(torch.nn.Conv2d(3, 3, 1), seed=2)

    def forward(self, x, t, y):
        return self.conv(x)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_classifier_guided_ddpm_is_adms_condition_mean_on_a_respaced_grid(variance_type):
    # guided-diffusion: mean + Σ·s·∇log p(y|x_t), Σ its model variance: fixed_small's is the
    # posterior variance, 0 at the last step; fixed_large's is β, posterior_variance[1] there.
    schedule, steps, scale = NoiseSchedule.linear(), [999, 666, 333, 0], 3.0

    def eps_model(x, t, y=None):
        return torch.tanh(0.7 * x + 0.3) * 0.8

    class Classifier(torch.nn.Module):
        def forward(self, x, t):
            return torch.stack([x.flatten(1).sum(1), -0.5 * x.flatten(1).sum(1)], 1)

    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 1])
    got = sample(
        eps_model,
        x_T.shape,
        sampler="ddpm",
        variance_type=variance_type,
        steps=steps,
        schedule=schedule,
        clip_denoised=False,
        guidance=ClassifierGuidance(Classifier(), scale),
        labels=labels,
        noise=x_T,
        generator=torch.Generator().manual_seed(9),
    )
    abar = [schedule.alpha_bar(t) for t in steps[::-1]]  # the respaced process, index 0 at t = 0
    abar_prev = [1.0, *abar[:-1]]
    betas = [1 - a / p for a, p in zip(abar, abar_prev)]
    posterior = [b * (1 - p) / (1 - a) for b, a, p in zip(betas, abar, abar_prev)]
    if variance_type == "fixed_small":
        variance = posterior
        log_variance = [math.log(posterior[1]), *map(math.log, posterior[1:])]  # ADM's clipped log
    else:
        variance = [posterior[1], *betas[1:]]
        log_variance = list(map(math.log, variance))
    g, x = torch.Generator().manual_seed(9), x_T.clone()
    for i in range(len(steps) - 1, -1, -1):
        a, p, b = abar[i], abar_prev[i], betas[i]
        x0 = (x - math.sqrt(1 - a) * eps_model(x, None)) / math.sqrt(a)
        mean = b * math.sqrt(p) / (1 - a) * x0 + (1 - p) * math.sqrt(1 - b) / (1 - a) * x
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            log_p = torch.log_softmax(Classifier()(leaf, None), -1)[torch.arange(2), labels].sum()
            grad = torch.autograd.grad(log_p, leaf)[0]
        mean = mean + variance[i] * scale * grad
        x = mean + math.exp(0.5 * log_variance[i]) * torch.randn(x.shape, generator=g, dtype=x.dtype) if i else mean
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


def test_a_float32_classifier_guides_a_float16_model():
    """The classifier sees x in its own weights' dtype; its gradient steps the model's x in
    the model's dtype, as with a float32 model (to fp16 rounding)."""
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        noise=noise,
        labels=torch.tensor([1, 3]),
        steps=3,
        sampler="ddim",
        guidance=ClassifierGuidance(LinearClassifier(), 2.0),
    )
    model = PointwiseModel()
    expected = sample(model, noise.shape, **kwargs)
    got = sample(copy.deepcopy(model).half(), noise.shape, **kwargs)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_classifier_guidance_errors_name_the_classifier():
    model = tiny_cfg_unet()
    flat = ClassifierGuidance(lambda x, t: torch.zeros(len(x), 4), 1.0)
    with pytest.raises(ValueError, match="does not depend on x"):
        sample(model, (2, 3, 8, 8), labels=[0, 1], steps=2, guidance=flat)
    few = ClassifierGuidance(lambda x, t: x.flatten(1)[:, :2], 1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\) for the classifier's 2 classes"):
        sample(model, (2, 3, 8, 8), labels=[0, 3], steps=2, guidance=few)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CFG(math.nan), "CFG scale must be a finite number"),
        (lambda: CFG(2.0, rescale=1.5), r"CFG rescale must be in \[0, 1\]"),
        (lambda: CFG(2.0, interval=(1.0, 2.0, 3.0)), "CFG interval must be a pair"),
        (lambda: CFG(2.0, interval="ab"), "CFG interval must be a pair"),
        (lambda: CFG(2.0, zero_star=True, tangential=True), "at most one of apg, zero_star and tangential"),
        (lambda: APG(norm_threshold=-1.0), "APG norm_threshold must be non-negative"),
        (lambda: ClassifierGuidance(torch.nn.Identity(), math.nan), "ClassifierGuidance scale must be a finite"),
        # The scales reach the kernels as float32 scalars.
        (lambda: CFG(1e300), "CFG scale must lie within float32's range"),
        (lambda: AutoGuidance(torch.nn.Identity(), -1e39), "AutoGuidance scale must lie within float32's range"),
        (lambda: APG(eta=1e39), "APG eta must lie within float32's range"),
        (lambda: APG(momentum=1.5), r"APG momentum must be in \[-1, 1\]"),
        # CFG++ interpolates u + λ·(c − u) and renoises with u: a combine that replaces the
        # interpolation would leave the renoising on the untransformed u
        (lambda: fastguide.CFGPlusPlus(0.5, apg=APG()), "CFGPlusPlus does not take apg"),
        (lambda: fastguide.CFGPlusPlus(0.5, zero_star=True), "CFGPlusPlus does not take zero_star"),
        (lambda: fastguide.CFGPlusPlus(0.5, tangential=True), "CFGPlusPlus does not take tangential"),
        # without CFG a perturbed guidance has no CFG weight to set
        (lambda: fastguide.SkipLayerGuidance(2.0, [7]).combine(9.0), "without CFG .* takes no scale"),
    ],
)
def test_bad_guidance_specs_are_refused_when_built(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_fresh_model_with_rescale_samples_without_nan():
    # A freshly built ADM model outputs zeros (zero-initialised output layer): CFG rescale's
    # std ratio is 0/0 there; the guard leaves the prediction as it is.
    model = fastguide.UNet(
        image_size=8,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(),
        channel_mult=(1,),
        num_classes=4,
        null_class=True,
    ).eval()
    got = sample(
        model,
        (2, 3, 8, 8),
        labels=torch.tensor([0, 1]),
        steps=3,
        guidance=CFG(3.0, rescale=0.7),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(got).all()


def label_dependent_model(x, t, y):
    """A smooth float64 model of x, t and the label, for loops written out against sample()."""
    y, t = (v.double().reshape(-1, 1, 1, 1) for v in (y, t))
    return torch.tanh(0.5 * x + 0.1 * y) * (0.3 + t / 2000)


@pytest.mark.parametrize("schedule", ["linear", "cosine", lambda sigma: 1.0 + 2.0 / (1.0 + sigma)])
def test_guidance_weight_schedules_equal_a_written_out_ddim_loop(schedule):
    # The weight is evaluated per step on the host (Wang et al. 2024 act on w − 1, τ = t/(T − 1)).
    w, timesteps = 4.0, [999, 700, 400, 100]
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    got = sample(
        label_dependent_model,
        noise.shape,
        labels=torch.tensor([1, 2]),
        sampler="ddim",
        steps=timesteps,
        noise=noise,
        guidance=CFG(w, schedule=schedule),
        null_label=0,
    )
    x = noise.clone()
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        abar, abar_prev = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_prev)
        sigma_edm, tau = math.sqrt((1 - abar) / abar), t / 999
        weight = (
            {"linear": 1 + (w - 1) * 2 * (1 - tau), "cosine": 1 + (w - 1) * (math.cos(math.pi * tau) + 1)}.get(
                schedule, None
            )
            if isinstance(schedule, str)
            else schedule(sigma_edm)
        )
        out = label_dependent_model(torch.cat([x, x]), torch.full((4,), t), torch.tensor([1, 2, 0, 0]))
        eps = out[2:] + weight * (out[:2] - out[2:])
        x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
    torch.testing.assert_close(got, x)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_guidance_weight_schedules_on_a_flow_path_take_tau_as_sigma(schedule):
    # On a flow path τ = σ = t/T (T = 1000 is pure noise there), not t/(T − 1).
    w, sigmas = 4.0, [1.0, 0.75, 0.5, 0.25]
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    got = sample(
        label_dependent_model,
        noise.shape,
        labels=torch.tensor([1, 2]),
        sampler="euler",
        schedule=NoiseSchedule.flow(),
        prediction_type="flow_prediction",
        steps=[1000 * sigma for sigma in sigmas],
        noise=noise,
        guidance=CFG(w, schedule=schedule),
        null_label=0,
    )
    x = noise.clone()
    for sigma, sigma_next in zip(sigmas, sigmas[1:] + [0.0]):
        weight = {"linear": 1 + (w - 1) * 2 * (1 - sigma), "cosine": 1 + (w - 1) * (math.cos(math.pi * sigma) + 1)}
        out = label_dependent_model(torch.cat([x, x]), torch.full((4,), 1000 * sigma), torch.tensor([1, 2, 0, 0]))
        velocity = out[2:] + weight[schedule] * (out[:2] - out[2:])
        x = x + (sigma_next - sigma) * velocity
    torch.testing.assert_close(got, x)


def test_cfg_plus_plus_on_ddim_is_the_papers_algorithm_and_euler_is_the_same_update():
    # Chung et al. 2024, Algorithm 1: x̂_λ = (x − √(1−ᾱ)·ε_λ)/√ᾱ, x' = √ᾱ'·x̂_λ + √(1−ᾱ')·ε_∅.
    lam, timesteps = 0.6, [999, 650, 300, 50]
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def model(x, t, y):
        y, t = (v.double().reshape(-1, 1, 1, 1) for v in (y, t))
        return torch.tanh(0.5 * x - 0.2 * y) * (0.4 + t / 1500)

    kwargs = dict(
        labels=torch.tensor([1, 2]),
        steps=timesteps,
        noise=noise,
        guidance=fastguide.CFGPlusPlus(lam),
        null_label=0,
        clip_denoised=False,
    )
    ddim = sample(model, noise.shape, sampler="ddim", **kwargs)
    x = noise.clone()
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        abar, abar_prev = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_prev)
        out = model(torch.cat([x, x]), torch.full((4,), t), torch.tensor([1, 2, 0, 0]))
        eps_c, eps_u = out[:2], out[2:]
        x0 = (x - math.sqrt(1 - abar) * (eps_u + lam * (eps_c - eps_u))) / math.sqrt(abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps_u
    torch.testing.assert_close(ddim, x)
    torch.testing.assert_close(sample(model, noise.shape, sampler="euler", **kwargs), ddim)
    with pytest.raises(ValueError, match="CFGPlusPlus is built for the samplers"):
        sample(model, noise.shape, sampler="unipc", **kwargs)
    with pytest.raises(ValueError, match=r"CFGPlusPlus scale λ must be in \[0, 1\]"):
        fastguide.CFGPlusPlus(3.0)
    with pytest.raises(ValueError, match="CFGPlusPlus takes a constant λ"):
        fastguide.CFGPlusPlus(0.2, schedule="cosine")
    with pytest.raises(ValueError, match="dynamic_threshold does not combine with CFGPlusPlus"):
        sample(model, noise.shape, sampler="ddim", dynamic_threshold=0.9, **kwargs)


def test_cfg_plus_plus_on_dpm_solver_pp_2m_is_the_written_out_algorithm():
    # CFG++'s DPM-Solver++(2M), in EDM's x̃ = x/α and λ = −log σ̃ (as k-diffusion writes it):
    # x̃' = x̂_λ − e^{−h}·x̂_∅ + e^{−h}·x̃ − (e^{−h} − 1)/(2r)·(x̂_λ − x̂_∅,prev), first order at the
    # first step and onto the clean data.
    lam, timesteps = 0.7, [999, 700, 420, 200, 60, 5]
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def model(x, t, y):
        y, t = (v.double().reshape(-1, 1, 1, 1) for v in (y, t))
        return torch.tanh(0.5 * x - 0.2 * y) * (0.4 + t / 1500)

    got = sample(
        model,
        noise.shape,
        sampler="dpm++2m",
        labels=torch.tensor([1, 2]),
        steps=timesteps,
        noise=noise,
        guidance=fastguide.CFGPlusPlus(lam),
        null_label=0,
        clip_denoised=False,
    )
    edm = [SCHEDULE.edm_sigma(t) for t in timesteps] + [0.0]
    x_tilde = noise / SCHEDULE.alpha_sigma(timesteps[0])[0]
    previous_uncond = None
    for i, t in enumerate(timesteps):
        alpha = SCHEDULE.alpha_sigma(t)[0]
        out = model(torch.cat([x_tilde * alpha] * 2), torch.full((4,), t), torch.tensor([1, 2, 0, 0]))
        eps_c, eps_u = out[:2], out[2:]
        guided = x_tilde - edm[i] * (eps_u + lam * (eps_c - eps_u))
        uncond = x_tilde - edm[i] * eps_u
        if edm[i + 1] == 0:
            x_tilde = guided
            break
        h = math.log(edm[i] / edm[i + 1])
        mix = -math.exp(-h) * uncond
        if previous_uncond is not None:
            r = math.log(edm[i - 1] / edm[i]) / h
            mix = mix - math.expm1(-h) / (2 * r) * (guided - previous_uncond)
        x_tilde = guided + mix + math.exp(-h) * x_tilde
        previous_uncond = uncond
    torch.testing.assert_close(got, x_tilde)
    with pytest.raises(ValueError, match="drop the interval"):
        sample(
            model,
            noise.shape,
            sampler="dpm++2m",
            labels=torch.tensor([1, 2]),
            steps=timesteps,
            guidance=fastguide.CFGPlusPlus(lam, interval=(0.5, 5.0)),
            null_label=0,
        )


def test_guided_channels_is_the_official_dit_forward_with_cfg():
    # DiT's sample.py: the first 3 of 4 eps channels guided, the 4th and the learned
    # variance channels from the conditional half; here on ADM's learned-range DDPM.
    scale, timesteps = 4.0, [999, 600, 250, 40]
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def model(x, t, y):
        y, t = (v.double().reshape(-1, 1, 1, 1) for v in (y, t))
        return torch.cat([torch.tanh(0.5 * x - 0.2 * y) * (0.4 + t / 1500), torch.tanh(x + 0.1 * y)], dim=1)

    def forward_with_cfg(x, t, y):  # facebookresearch/DiT models.py, written out
        out = model(torch.cat([x, x]), t.repeat(2), torch.cat([y, torch.zeros_like(y)]))
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps.chunk(2)
        half = uncond + scale * (cond - uncond)
        return torch.cat([torch.cat([half, half]), rest], dim=1)[: len(x)]

    def run(model, **guidance):
        return sample(
            model,
            noise.shape,
            labels=torch.tensor([1, 2]),
            sampler="ddpm",
            steps=timesteps,
            noise=noise,
            clip_denoised=False,
            generator=torch.Generator().manual_seed(2),
            **guidance,
        )

    got = run(model, guidance=CFG(scale, guided_channels=3), null_label=0)
    torch.testing.assert_close(got, run(forward_with_cfg))
    assert not torch.allclose(got, run(model, guidance=CFG(scale), null_label=0))
    kwargs = dict(labels=torch.tensor([1, 2]), steps=timesteps)
    with pytest.raises(ValueError, match="takes plain CFG"):
        CFG(scale, guided_channels=3, rescale=0.5)
    with pytest.raises(ValueError, match="at most the 4 channels"):
        sample(model, noise.shape, guidance=CFG(scale, guided_channels=5), null_label=0, **kwargs)


def test_autoguidance_with_a_blurrier_guide_is_the_written_out_ddim_loop():
    # Karras et al. 2024 on the exact Gaussian oracle: the guide is the same mixture with
    # wider classes; D = D_guide + w·(D_main − D_guide), both called with the labels.
    blurry = GaussianMixture(means=MIXTURE.means.numpy(), stds=[0.45, 0.6], weights=[0.3, 0.7])
    main, guide, w, timesteps = MixtureModel(MIXTURE), MixtureModel(blurry), 2.5, [999, 700, 400, 150, 20]
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    got = sample(
        main,
        noise.shape,
        labels=labels,
        sampler="ddim",
        steps=timesteps,
        noise=noise,
        guidance=fastguide.AutoGuidance(guide, w),
        clip_denoised=False,
    )
    x = noise.clone()
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        abar, abar_prev = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_prev)
        t_in = torch.full((3,), t)
        eps_guide = guide(x, t_in, labels)
        eps = eps_guide + w * (main(x, t_in, labels) - eps_guide)  # ε is linear in D at fixed x_t
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
    torch.testing.assert_close(got, x)


def test_autoguidance_runs_b_rows_through_each_network_and_refuses_a_second_combine():
    calls = []

    def model(name):
        def forward(x, t, y):
            calls.append((name, len(x)))
            return torch.tanh(x)

        return forward

    sample(model("main"), (2, 3, 4, 4), labels=[0, 1], steps=3, guidance=fastguide.AutoGuidance(model("guide"), 2.0))
    assert calls == [("main", 2), ("guide", 2)] * 3
    with pytest.raises(TypeError, match="a tuple of one of each"):
        sample(
            model("main"),
            (2, 3, 4, 4),
            labels=[0, 1],
            steps=3,
            guidance=(fastguide.AutoGuidance(model("guide"), 2.0), CFG(2.0)),
        )


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("backend", backends_for("guided_step"))
def test_a_guide_that_learns_its_variance_guides_with_its_first_channels_on_every_backend(backend, layout):
    # A (B, 2C) guide beside a (B, C) model (learned variance on the weaker network only): its
    # prediction is its first C channels, as ADM reads a 2C output, on every backend.
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))

    def main(x, t, y):
        return torch.tanh(x)

    def learned_guide(x, t, y):
        both = torch.cat([0.5 * torch.tanh(x) + 0.1, torch.full_like(x, 5.0)], dim=1)
        return both.contiguous(memory_format=layout)

    def guide(x, t, y):
        return learned_guide(x, t, y)[:, :3].contiguous()

    def run(g):
        return sample(
            main,
            noise.shape,
            labels=[0, 1],
            sampler="dpm++2m",
            steps=4,
            noise=noise,
            clip_denoised=False,
            guidance=AutoGuidance(g, 2.5),
        )

    with fastguide.backend("torch"):
        expected = run(guide)
    with fastguide.backend(backend):
        got = run(learned_guide)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_autoguidance_errors_name_the_guide_and_its_labels_are_checked_before_any_forward():
    calls = []

    def main(x, t, y):
        calls.append("main")
        return torch.tanh(x)

    main.num_classes = 5

    def guide(output):
        def forward(x, t, y):
            calls.append("guide")
            return output(x)

        return forward

    run = lambda g, labels=(0, 1): sample(
        main,
        (2, 3, 4, 4),
        labels=list(labels),
        steps=2,  # noqa: E731
        guidance=AutoGuidance(g, 2.0),
    )
    with pytest.raises(ValueError, match=r"AutoGuidance's guide_model must return \(2, 3 or 6, \*\(4, 4\)\)"):
        run(guide(lambda x: x[:, :2]))
    with pytest.raises(TypeError, match="AutoGuidance's guide_model must return a tensor"):
        run(guide(lambda x: (x,)))
    with pytest.raises(TypeError, match="AutoGuidance's guide_model must return a floating tensor"):
        run(guide(lambda x: x.long()))

    class TableOnly(torch.nn.Module):  # an ADM-style guide that says its classes by its label table
        def __init__(self):
            super().__init__()
            self.label_emb = torch.nn.Embedding(2, 4)

        def forward(self, x, t, y):
            calls.append("guide")
            return x * self.label_emb(y).sum(1).view(-1, 1, 1, 1)

    by_count = guide(torch.tanh)
    by_count.num_classes = 2
    calls.clear()
    for small in (TableOnly(), by_count):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\) for AutoGuidance's guide_model"):
            run(small, labels=(0, 3))
    assert calls == []  # refused before the main model ran
    run(by_count, labels=(0, 1))
    assert calls == ["main", "guide"] * 2


def test_autoguidance_runs_a_guide_of_another_dtype_in_its_dtype():
    # The guide is called on the loop's state (the model's dtype): a guide in another dtype
    # failed inside its first layer with "x must have the model's input dtype", read as the
    # model's. Its input is now cast to its dtype (its output enters the step as it is).
    main, guide = tiny_cfg_unet(), tiny_cfg_unet()
    run = lambda guide: sample(  # noqa: E731
        main,
        (2, 3, 8, 8),
        labels=[0, 1],
        steps=2,
        guidance=AutoGuidance(guide, 2.0),
        generator=torch.Generator().manual_seed(0),
    )
    expected = run(guide)
    # (float32 against float64 rounding in the guide, grown by two steps)
    torch.testing.assert_close(run(copy.deepcopy(guide).double()), expected, rtol=1e-3, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs a bf16 guide on float32 state
        assert torch.isfinite(run(copy.deepcopy(guide).bfloat16())).all()


def test_autoguidance_casts_the_keyword_conditioning_for_a_guide_of_another_dtype():
    # Its input was cast and its keyword conditioning was not: an fp32 embedding reached a
    # float64 (or bf16) guide's Linear, which failed with "mat1 and mat2 must have the same dtype"
    class Embedded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.embed = torch.nn.Linear(5, 3)

        def forward(self, x, t, *, emb):
            return self.conv(x) * (t.to(x.dtype) / 1000).view(-1, 1, 1, 1) + self.embed(emb)[:, :, None, None]

    main, guide = Embedded(), Embedded()
    embedding = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    original = embedding.clone()
    run = lambda guide: sample(  # noqa: E731
        main,
        (2, 3, 8, 8),
        cond={"emb": embedding},
        steps=2,
        guidance=AutoGuidance(guide, 2.0),
        generator=torch.Generator().manual_seed(0),
    )
    expected = run(guide)
    torch.testing.assert_close(run(copy.deepcopy(guide).double()), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(run(copy.deepcopy(guide).bfloat16())).all()
    assert torch.equal(embedding, original) and embedding.dtype == torch.float32


def test_adapter_arguments_are_checked():
    # SiTVelocity divides the time by num_timesteps: 0 made every output NaN.
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ValueError, match="num_timesteps must be a positive int"):
            fastguide.SiTVelocity(torch.nn.Identity(), num_timesteps=bad)
    with pytest.raises(TypeError, match="sit must be a callable SiT model"):
        fastguide.SiTVelocity(3)
    # its T must be the schedule's, or τ = 1 − t/T is wrong everywhere
    sit = fastguide.SiTVelocity(lambda x, tau, y: x, num_timesteps=1000)
    with pytest.raises(ValueError, match=r"SiTVelocity\(num_timesteps=1000\).*T = 500"):
        fastguide.GuidedSampler(sit, schedule=fastguide.NoiseSchedule.flow(num_timesteps=500), sampler="euler")
    # τ in the model's precision: float64 for float64 x
    seen = {}
    fastguide.SiTVelocity(lambda x, tau, y: seen.update(tau=tau) or x)(
        torch.zeros(1, 2, dtype=torch.float64), torch.tensor([333]), None
    )
    assert seen["tau"].dtype == torch.float64 and seen["tau"].item() == 1 - 333 / 1000

    class FakeUNet(torch.nn.Module):
        config = type("Config", (), {"num_class_embeds": 5})()

    for bad in (True, 4.0, 5, -1):
        with pytest.raises(ValueError, match="null_label must be an int indexing the model's 5 class embeddings"):
            fastguide.DiffusersUNet(FakeUNet(), null_label=bad)
    assert fastguide.DiffusersUNet(FakeUNet(), null_label=4).num_classes == 4
    assert fastguide.DiffusersUNet(FakeUNet(), null_label=4).null_label == 4
    assert fastguide.DiffusersUNet(FakeUNet()).null_label is None  # (not a row past the table)
    with pytest.raises(TypeError, match="unet must be a diffusers UNet2DModel"):
        fastguide.DiffusersUNet(torch.nn.Identity())


def classifier_logits(x, t):
    return x.flatten(1)[:, :4]


def small_main(x, t, y):
    """The tiny learned-variance UNet's prediction channels only: a C-channel model."""
    return LOOP_UNET(x, t, y)[:, :3]


LOOP_UNET = tiny_cfg_unet()
small_main.num_classes, small_main.null_class = 4, True
LOOP_CASES = {
    "unipc rescale": (LOOP_UNET, dict(sampler="unipc", guidance=CFG(3.0, rescale=0.5))),
    "ddpm learned variance": (LOOP_UNET, dict(sampler="ddpm", guidance=CFG(3.0))),
    "cfg++ unconditional history": (LOOP_UNET, dict(sampler="dpm++2m", guidance=CFGPlusPlus(0.6))),
    "dpm++3m apg interval": (
        LOOP_UNET,
        dict(sampler="dpm++3m", guidance=CFG(4.0, apg=APG(momentum=-0.5), interval=(0.3, 5.0))),
    ),
    "ddim eta classifier": (
        LOOP_UNET,
        dict(sampler="ddim", eta=0.5, guidance=(CFG(2.0), ClassifierGuidance(classifier_logits, 1.0))),
    ),
    "heun autoguidance": (LOOP_UNET, dict(sampler="heun", guidance=AutoGuidance(tiny_cfg_unet(), 2.0))),
    "learned guide beside a plain model": (small_main, dict(sampler="ddim", guidance=AutoGuidance(LOOP_UNET, 2.0))),
    "dpm++2s dynamic threshold channels": (
        LOOP_UNET,
        dict(sampler="dpm++2s", dynamic_threshold=0.9, guidance=CFG(3.0, guided_channels=2)),
    ),
}


@pytest.mark.parametrize("case", list(LOOP_CASES), ids=str)
def test_every_step_the_loop_hands_the_op_passes_the_ops_full_validation(monkeypatch, case):
    # The loop skips the op's per-call checks (guided_step_prechecked); here each call it
    # makes runs them, aliasing included: what the loop builds is what the op expects.
    model, kwargs = LOOP_CASES[case]
    prechecked, seen = ops.guided_step_prechecked, []

    def checked(tensors, step, combine):
        ops.check_step(step)
        ops.check_combine(combine)
        ops.check_step_tensors(tensors, step, combine)
        seen.append(tensors.guide is not None)
        prechecked(tensors, step, combine)

    monkeypatch.setattr(ops, "guided_step_prechecked", checked)
    got = sample(model, (2, 3, 8, 8), labels=[0, 3], steps=4, generator=torch.Generator().manual_seed(0), **kwargs)
    assert seen and torch.isfinite(got).all()
    assert any(seen) == isinstance(kwargs["guidance"], AutoGuidance)


def test_the_loop_refuses_a_step_layout_the_op_would_misread_before_it_runs():
    x, out = torch.randn(2, 3, 4, 4), torch.full((2, 3, 4, 4), math.nan)
    step = StepCoefficients(alpha=0.8, sigma=0.6, k_x0=0.8, k_eps=0.6)
    with pytest.raises(ValueError, match=r"guide must have shape \(2, 3, ...\) or that of model_output"):
        GuidedSampler._step(
            StepTensors(torch.randn(2, 3, 4, 4), x, torch.randn(2, 6, 4, 4), out=out), step, GuidanceCombine(2.0)
        )
    with pytest.raises(ValueError, match=r"history\[0\] must have shape \(2, 3, 4, 4\)"):
        GuidedSampler._step(
            StepTensors(torch.randn(2, 3, 4, 4), x, history=(torch.randn(2, 3, 4),), out=out),
            step._replace(k_history=(0.5,)),
            None,
        )
    assert out.isnan().all()  # nothing was written


def test_bad_guidance_schedules_are_refused():
    with pytest.raises(ValueError, match="CFG schedule must be one of"):
        CFG(2.0, schedule="exponential")
    with pytest.raises(ValueError, match="CFG schedule must return a finite number"):
        GuidedSampler(lambda x, t, y: x, guidance=CFG(2.0, schedule=lambda sigma: math.nan), null_label=0, steps=3)


def test_cuda_graph_errors():
    model = tiny_cfg_unet()
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device, got cpu"):
        sample(model, (2, 3, 8, 8), labels=torch.tensor([0, 1]), guidance=CFG(2.0), steps=2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True cannot capture classifier guidance"):
        GuidedSampler(model, guidance=ClassifierGuidance(ExactClassifier(MIXTURE), 1.0), cuda_graph=True)


GRAPH_CASES = [
    ("dpm++2m", CFG(4.0, rescale=0.5), 0.0),
    ("ddim", CFG(3.0, interval=(0.3, 5.0), apg=APG(eta=0.0, norm_threshold=2.0, momentum=-0.5)), 0.7),
    ("ddpm", None, 0.0),
    ("dpm++2s", CFG(3.0, zero_star=True), 0.0),
    # (intervals that guide 2 of the 5 calls, the middle ones: (0.5, 3.0) held none, which
    # the loop now warns about, so these cases checked no guided call)
    ("dpm++2m", CFG(3.0, tangential=True, interval=(1.0, 30.0)), 0.0),
    ("ddim", fastguide.AutoGuidance(tiny_cfg_unet(), 2.0, interval=(1.0, 30.0)), 0.0),
    ("heun", CFG(3.0), 0.0),  # its second call reads the first call's x, kept in a buffer
]


def assert_graph_replays_match_eager(device, sampler, guidance, eta):
    model = tiny_cfg_unet().to(device)
    kwargs = dict(sampler=sampler, steps=5, guidance=guidance, eta=eta)
    graphed = GuidedSampler(model, cuda_graph=True, **kwargs)
    eager = GuidedSampler(model, **kwargs)
    for seed, labels in ((0, [0, 3]), (1, [2, 1])):  # the second call replays the captured graphs
        labels = torch.tensor(labels, device=device)
        generators = [torch.Generator(device).manual_seed(seed) for _ in range(2)]
        results = [s((2, 3, 8, 8), labels=labels, generator=g) for s, g in zip((graphed, eager), generators)]
        torch.testing.assert_close(*results, atol=1e-5, rtol=1e-5)
        # The noise drawn inside the graphs left the caller's generator where eager draws leave it.
        assert torch.equal(generators[0].get_state(), generators[1].get_state())
    assert len(graphed._graphs) == 1


@pytest.mark.parametrize("sampler, guidance, eta", GRAPH_CASES, ids=str)
def test_graph_replay_logic_matches_eager_on_cpu(cpu_graphs, sampler, guidance, eta):
    # The capture/replay bookkeeping (static buffers, noise drawn outside, labels and x_T
    # copied in per call, graphs reused) with the CUDA parts stood in for: a step that
    # read anything but the static buffers would give the second call wrong samples.
    assert_graph_replays_match_eager("cpu", sampler, guidance, eta)


def test_graphs_are_captured_per_autocast_state_with_autocasts_cache_off(cpu_graphs):
    # autocast caches its casts of the weights until the caller's autocast block ends: a graph
    # that captured a cached cast would read freed memory after it. The capture runs with the
    # cache off, and a run under autocast never replays a capture made without it (or back).
    model = tiny_cfg_unet()
    cache_on = []
    model.register_forward_pre_hook(lambda module, args: cache_on.append(torch.is_autocast_cache_enabled()))
    kwargs = dict(sampler="ddim", steps=3, guidance=CFG(3.0))
    graphed, eager = GuidedSampler(model, cuda_graph=True, **kwargs), GuidedSampler(model, **kwargs)
    noise, labels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3])
    for autocast in (True, False, True):  # capture, capture, replay
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            cache_on.clear()
            got = graphed(noise.shape, labels=labels, noise=noise)
            assert cache_on and not (autocast and any(cache_on))
            expected = eager(noise.shape, labels=labels, noise=noise)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(graphed._graphs) == 2


def test_a_graphed_loop_draws_from_the_default_generator_as_eager_sampling_does(cpu_graphs):
    model = tiny_cfg_unet()
    kwargs = dict(sampler="ddpm", steps=4, guidance=CFG(3.0))
    graphed, eager = GuidedSampler(model, cuda_graph=True, **kwargs), GuidedSampler(model, **kwargs)
    for seed in (0, 1):  # capture, then replay
        results, states = [], []
        for sampler in (graphed, eager):
            torch.manual_seed(seed)
            results.append(sampler((2, 3, 8, 8), labels=torch.tensor([0, 3])))
            states.append(torch.get_rng_state())
        torch.testing.assert_close(*results, atol=1e-5, rtol=1e-5)
        assert torch.equal(*states)


def test_graphs_outside_the_guidance_interval_run_the_model_on_b_rows(cpu_graphs):
    # Each call is its own graph, captured with the rows it runs on: outside the interval
    # the replayed forward sees B rows, inside it 2B, as in eager sampling.
    unet, rows = tiny_cfg_unet(), []

    def model(x, t, y):
        rows.append(len(x))
        return unet(x, t, y)

    kwargs = dict(sampler="ddim", steps=6, guidance=CFG(3.0, interval=(0.5, 3.0)), null_label=4, num_classes=4)
    eager = GuidedSampler(model, **kwargs)
    eager((2, 3, 8, 8), labels=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    eager_rows, rows[:] = list(rows), []
    graphed = GuidedSampler(model, cuda_graph=True, **kwargs)
    for _ in range(2):  # the capture run (warm-up + capture), then a pure replay
        graphed((2, 3, 8, 8), labels=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    replay_rows = rows[-len(eager_rows) :]
    assert replay_rows == eager_rows and set(eager_rows) == {2, 4}


@pytest.mark.parametrize(
    "sampler, eta, callback, inside, graphs",
    [
        ("unipc", 0.0, False, True, 1),  # deterministic: the whole loop is one graph
        ("ddim", 0.0, True, True, 6),  # a callback sees every call: one graph each
        ("ddpm", 0.0, False, True, 1),  # noise drawn inside the graph: still one
        ("ddim", 0.5, False, True, 1),
        # Graphs that cannot hold a generator: the noise is drawn before each noisy call
        # (every call but the first), so a graph from each on.
        ("ddpm", 0.0, False, False, 5),
        ("ddim", 0.5, False, False, 5),
    ],
)
def test_graphs_cover_the_loop_in_as_few_pieces_as_the_host_allows(
    cpu_graphs, monkeypatch, sampler, eta, callback, inside, graphs
):
    monkeypatch.setattr(cuda_graphs, "GRAPH_SAFE_GENERATORS", inside)
    captured = cpu_graphs
    model = tiny_cfg_unet()
    kwargs = dict(sampler=sampler, steps=6, guidance=CFG(3.0), eta=eta)
    seen = {"graphed": [], "eager": []}
    results, states = {}, {}
    for name, sampler_ in (
        ("graphed", GuidedSampler(model, cuda_graph=True, **kwargs)),
        ("eager", GuidedSampler(model, **kwargs)),
    ):
        report = (
            (
                lambda info, name=name: seen[name].append(
                    (info["i"], info["t"], info["x"].clone(), info["denoised"].clone())
                )
            )
            if callback
            else None
        )
        for _ in range(2):  # capture, then replay
            seen[name].clear()
            generator = torch.Generator().manual_seed(4)
            results[name] = sampler_((2, 3, 8, 8), labels=torch.tensor([0, 3]), callback=report, generator=generator)
            states[name] = generator.get_state()
    assert len(captured) == graphs
    torch.testing.assert_close(results["graphed"], results["eager"], atol=1e-5, rtol=1e-5)
    # The caller's generator is left where eager sampling leaves it.
    assert torch.equal(states["graphed"], states["eager"])
    assert len(seen["graphed"]) == len(seen["eager"]) == (6 if callback else 0)
    for (i, t, x, x0), (i_, t_, x_, x0_) in zip(seen["graphed"], seen["eager"]):
        assert (i, t) == (i_, t_)
        torch.testing.assert_close((x, x0), (x_, x0_), atol=1e-5, rtol=1e-5)


def test_a_graphed_loop_warms_up_and_captures_with_auto_ordered_for_graphs(cpu_graphs, monkeypatch):
    # ops.backends.graph_capture over the warm-up run and the capture (the same kernels in
    # both), and never over an eager run.
    depths, resolve = [], backends.resolve

    def recording(*args, **kwargs):
        depths.append(getattr(backends._state, "graph_capture", 0))
        return resolve(*args, **kwargs)

    monkeypatch.setattr(backends, "resolve", recording)
    capture = cuda_graphs.capture_graph

    def recording_capture(step, pool, generator=None):
        depths.append(("capture", backends._state.graph_capture))
        return capture(step, pool, generator)

    monkeypatch.setattr(cuda_graphs, "capture_graph", recording_capture)
    model, kwargs = tiny_cfg_unet(), dict(sampler="ddim", steps=3, guidance=CFG(3.0))
    GuidedSampler(model, cuda_graph=True, **kwargs)((2, 3, 8, 8), labels=torch.tensor([0, 3]))
    warm_up = depths[: depths.index(("capture", 1))]
    assert warm_up and set(warm_up) == {1} and ("capture", 1) in depths
    depths.clear()
    sample(model, (2, 3, 8, 8), labels=torch.tensor([0, 3]), **kwargs)
    assert depths and set(depths) == {0}


def test_a_graphed_sampler_captures_again_for_noise_of_another_dtype(cpu_graphs):
    """A model without one parameter dtype samples in the noise's: a float64 call after a
    float32 capture is not squeezed through the float32 buffers."""
    model = lambda x, t: 0.1 * x + 0.001 * x**2  # noqa: E731
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    graphed = GuidedSampler(model, steps=5, cuda_graph=True)
    graphed(noise.shape, noise=noise.float())
    got = graphed(noise.shape, noise=noise)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, sample(model, noise.shape, steps=5, noise=noise), rtol=0, atol=0)


def test_a_sampler_keeps_the_captures_of_its_most_recently_used_shapes(cpu_graphs):
    model = tiny_cfg_unet()
    sampler = GuidedSampler(model, sampler="ddim", steps=2, guidance=CFG(3.0), cuda_graph=True)

    def draw(batch):
        return sampler((batch, 3, 8, 8), labels=torch.arange(batch) % 4, generator=torch.Generator().manual_seed(0))

    for batch in range(1, GuidedSampler.MAX_CAPTURES + 1):
        draw(batch)
    draw(1)  # a hit: batch 1 becomes the most recent
    assert len(cpu_graphs) == GuidedSampler.MAX_CAPTURES
    draw(GuidedSampler.MAX_CAPTURES + 1)  # one more shape: batch 2, the least recent, goes
    kept = [key[0][0] for key in sampler._graphs]
    assert kept == [3, 4, 1, GuidedSampler.MAX_CAPTURES + 1]
    captures = len(cpu_graphs)
    draw(2)  # released, so captured again
    assert len(cpu_graphs) == captures + 1 and len(sampler._graphs) == GuidedSampler.MAX_CAPTURES


def test_a_graphed_sampler_captures_again_when_the_weights_move(cpu_graphs):
    # A graph reads each weight at its captured address: weights given new storage (a dtype
    # round trip, load_state_dict(assign=True)) drop the captures; an in-place update does not.
    model = tiny_cfg_unet()
    sampler = GuidedSampler(model, sampler="ddim", steps=2, guidance=CFG(3.0), cuda_graph=True)

    def draw():
        return sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]), generator=torch.Generator().manual_seed(0))

    draw()
    captures = len(cpu_graphs)
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    draw()
    assert len(cpu_graphs) == captures
    model.double().float()
    draw()
    assert len(cpu_graphs) == 2 * captures and len(sampler._graphs) == 1
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    draw()
    assert len(cpu_graphs) == 3 * captures
    model.train()
    draw()
    assert len(cpu_graphs) == 4 * captures


def test_a_graphed_wrapper_function_tracks_the_module_it_calls(cpu_graphs):
    # A function or method calling a module (the usual lambda) had no weights tracked: a
    # dtype round trip of the wrapped model replayed the old addresses.
    model = tiny_cfg_unet()

    def helper(x, t, y):
        return model(x, t, y)

    def calls_helper(x, t, y):  # (a module two calls deep)
        return helper(x, t, y)

    for wrapped in (lambda x, t, y: model(x, t, y), model.forward, functools.partial(model.forward), calls_helper):
        sampler = GuidedSampler(wrapped, sampler="ddim", steps=2, guidance=CFG(3.0), null_label=4, cuda_graph=True)
        sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]))
        captures = len(cpu_graphs)
        model.double().float()
        sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]))
        assert len(cpu_graphs) == 2 * captures
        cpu_graphs.clear()


def test_a_graphed_opaque_callable_is_warned_about_and_captures_drop_on_request(cpu_graphs):
    class Wrapper:  # a callable that is no module: its weights cannot be seen
        def __init__(self, network):
            self.network = network

        def __call__(self, x, t, y):
            return self.network(x, t, y)

    sampler = GuidedSampler(
        Wrapper(tiny_cfg_unet()), sampler="ddim", steps=2, guidance=CFG(3.0), null_label=4, cuda_graph=True
    )
    with pytest.warns(UserWarning, match="model is a Wrapper, whose weights fastguide cannot see"):
        sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]))
    captures = len(cpu_graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a sampler
        sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]))
    assert len(cpu_graphs) == captures
    sampler.clear_cuda_graphs()
    sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]))
    assert len(cpu_graphs) == 2 * captures
    holder = Wrapper(tiny_cfg_unet())  # a function reaching a module through such an object
    settings = dict(sampler="ddim", steps=2, guidance=CFG(3.0), null_label=4, cuda_graph=True)
    reaching = GuidedSampler(lambda x, t, y: holder.network(x, t, y), **settings)
    with pytest.warns(UserWarning, match="model is a function, whose weights fastguide cannot see"):
        reaching((2, 3, 8, 8), labels=torch.tensor([0, 3]))
    assert cuda_graphs.modules_called(reaching.model) == ([], True)


def test_a_graphed_loop_is_captured_per_backend_and_never_with_per_forward_hooks(cpu_graphs):
    model = tiny_cfg_unet()
    sampler = GuidedSampler(model, sampler="ddim", steps=2, guidance=CFG(3.0), cuda_graph=True)
    draw = lambda: sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]))  # noqa: E731
    draw()
    with fastguide.backend("torch"):  # the kernels chosen are baked into a capture
        draw()
    assert len(sampler._graphs) == 2
    # A replay runs no Python, so an offloading hook never moves the weights back, and a
    # cache's decisions stay the capture's: refused. Layer skipping does the same at every
    # forward: captured.
    hooks = pytest.importorskip("diffusers.hooks")

    class Offloading(hooks.ModelHook):
        pass

    class AttentionProcessorSkipHook(hooks.ModelHook):  # (named as diffusers' layer-skip hook)
        pass

    block = model.input_blocks[1]
    hooks.HookRegistry.check_if_exists_or_initialize(block).register_hook(AttentionProcessorSkipHook(), "skip")
    sampler.clear_cuda_graphs()
    draw()
    hooks.HookRegistry.check_if_exists_or_initialize(block).register_hook(Offloading(), "offload")
    sampler.clear_cuda_graphs()
    with pytest.raises(ValueError, match=r"cuda_graph=True cannot replay diffusers' Offloading on input_blocks.1"):
        draw()
    sampler = GuidedSampler(tiny_cfg_unet(), sampler="ddim", steps=2, guidance=CFG(3.0), cuda_graph=True)
    sampler.model.input_blocks[0]._hf_hook = object()
    with pytest.raises(ValueError, match="cuda_graph=True cannot replay accelerate's object on input_blocks.0"):
        sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]))


def test_a_loop_captured_under_inference_mode_replays_outside_it(cpu_graphs):
    model = tiny_cfg_unet()
    kwargs = dict(sampler="ddim", steps=3, guidance=CFG(3.0))
    graphed, eager = GuidedSampler(model, cuda_graph=True, **kwargs), GuidedSampler(model, **kwargs)

    def draw(sampler):
        return sampler((2, 3, 8, 8), labels=torch.tensor([0, 3]), generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        inside = draw(graphed)
    torch.testing.assert_close(draw(graphed), draw(eager), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inside, draw(eager), rtol=1e-5, atol=1e-5)
    assert len(graphed._graphs) == 1


def _sample_compiled(device, **compile_options):
    model = tiny_cfg_unet().to(device)
    kwargs = dict(
        labels=torch.tensor([0, 3], device=device),
        steps=4,
        guidance=CFG(3.0),
        noise=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device),
    )
    eager = sample(model, (2, 3, 8, 8), **kwargs)
    compiled = torch.compile(model, **compile_options)
    for run in ("compiling", "replaying"):  # the second run replays what the first compiled (and, on CUDA, recorded)
        torch.testing.assert_close(
            sample(compiled, (2, 3, 8, 8), **kwargs),
            eager,
            atol=1e-3,
            rtol=1e-3,
            msg=lambda message, run=run: f"the {run} run: {message}",
        )


def test_a_compiled_model_with_fastguide_ops_inside_samples_as_eager():
    # aot_eager on CPU (inductor's CPU compile of the UNet takes over a minute here): the
    # ops trace as custom ops inside the model's graph and the loop runs it.
    _sample_compiled("cpu", backend="aot_eager", fullgraph=True)


@pytest.mark.gpu
def test_reduce_overhead_compile_with_fastguide_ops_inside_samples_as_eager():
    _sample_compiled("cuda", mode="reduce-overhead")


@pytest.mark.gpu
@pytest.mark.parametrize("sampler, guidance, eta", GRAPH_CASES, ids=str)
def test_cuda_graph_replays_match_eager_sampling(sampler, guidance, eta):
    assert_graph_replays_match_eager("cuda", sampler, guidance, eta)


def test_diffusers_class_conditional_unet_through_the_adapter(diffusers):
    torch.manual_seed(0)  # the UNet's random weights, whatever ran before
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        num_class_embeds=5,
    ).eval()
    model = fastguide.DiffusersUNet(unet, null_label=4)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([0, 3])
    got = sample(model, noise.shape, labels=labels, sampler="ddim", steps=[999, 0], guidance=CFG(2.0), noise=noise)
    # One guided DDIM step from t = 999 and one from t = 0, written out on the unet itself.
    x = noise.clone()
    with torch.no_grad():
        for t, t_next in ((999, 0), (0, -1)):
            tb = torch.full((2,), t)
            cond = unet(x, tb, class_labels=labels).sample
            uncond = unet(x, tb, class_labels=torch.full_like(labels, 4)).sample
            eps = uncond + 2.0 * (cond - uncond)
            abar, abar_next = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_next)
            x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
            eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            x = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps
    # float32 rounding of eps (~1e-6) reaches x0 = (x − σ·eps)/α amplified by 1/α ≈ 160 at
    # t = 999, and lands in x after the last step: up to a few 1e-4 per element.
    torch.testing.assert_close(got, x, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="labels must lie in"):
        sample(model, noise.shape, labels=torch.tensor([0, 4]), guidance=CFG(2.0), steps=2)


def test_dynamic_thresholding_matches_imagen():
    model, p, w = tiny_cfg_unet(), 0.9, 6.0
    labels = torch.tensor([1, 2])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    got = sample(
        model, noise.shape, labels=labels, sampler="ddim", steps=3, guidance=CFG(w), noise=noise, dynamic_threshold=p
    )
    x, timesteps = noise.clone(), SCHEDULE.spaced_timesteps(3, SCHEDULE.default_spacing)
    with torch.no_grad():
        for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
            out = model(torch.cat([x, x]), torch.full((4,), t), torch.cat([labels, torch.full_like(labels, 4)]))[:, :3]
            eps = out[2:] + w * (out[:2] - out[2:])
            abar, abar_next = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_next)
            x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
            s = torch.quantile(x0.abs().flatten(1), p, dim=1).clamp_min(1).reshape(-1, 1, 1, 1)
            x0 = x0.clamp(-s, s) / s
            eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            x = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps
    torch.testing.assert_close(got, x, atol=2e-4, rtol=1e-4)
    assert got.abs().max() <= 1.0 + 1e-5


def test_defaults_are_the_measured_ones():
    # unipc and the schedule's own grid: BENCHMARKS.md's NFE table; CFG++ is built for
    # ddim, euler and dpm++2m, so under it the default is dpm++2m (ddim with an interval).
    assert GuidedSampler.__init__.__kwdefaults__["sampler"] is None
    assert GuidedSampler.__init__.__kwdefaults__["spacing"] is None
    assert NoiseSchedule.linear().default_spacing == "logsnr"
    assert NoiseSchedule.flow().default_spacing == "linspace"
    assert (default_sampler(), default_sampler(cfg_plus_plus=True)) == ("unipc", "dpm++2m")
    assert default_sampler(cfg_plus_plus=True, interval=True) == "ddim"

    def model(x, t, y=None):
        return x

    def default_for(guidance, **options):
        return GuidedSampler(model, guidance=guidance, null_label=3, num_classes=4, **options).sampler

    assert default_for(None) == default_for(CFG(2.0)) == "unipc"
    assert default_for(CFGPlusPlus(0.4)) == "dpm++2m"
    assert default_for(CFGPlusPlus(0.4, interval=(0.3, 5.0))) == "ddim"
    with pytest.raises(ValueError, match="sampler=None chose 'dpm\\+\\+2m' for this guidance"):
        default_for(CFGPlusPlus(0.4), solver_order=2)


# --------------------------------------------------------------------------------------
# The plan cache: sample() called again with the same settings reuses its plan
# --------------------------------------------------------------------------------------


def _label_model(x, t, y):
    return 0.1 * x + 0.01 * y.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def test_sample_plans_once_per_setting_and_again_for_new_settings(monkeypatch):
    from fastguide.sampling import loop

    made = []
    real_plan_steps = loop.plan_steps
    monkeypatch.setattr(loop, "_PLANS", loop._PlanCache())
    monkeypatch.setattr(loop, "plan_steps", lambda *a, **k: made.append(a[0]) or real_plan_steps(*a, **k))
    noise, labels = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    run = lambda **kw: sample(
        _label_model,
        (2, 3, 4, 4),
        labels=labels,
        noise=noise,
        null_label=10,  # noqa: E731
        num_classes=10,
        **{"guidance": CFG(3.0), "steps": 6, **kw},
    )
    first = run()
    assert made == ["unipc"]
    torch.testing.assert_close(run(), first, rtol=0, atol=0)
    assert made == ["unipc"]  # the same settings, equal by value: planned once
    # Every setting the plan depends on makes a new one, with its own result.
    for changed in (
        dict(guidance=CFG(4.0)),
        dict(guidance=CFG(3.0, interval=(0.5, 5.0))),
        dict(steps=7),
        dict(sampler="ddim"),
        dict(schedule=NoiseSchedule.cosine()),
        dict(spacing="trailing"),
        dict(prediction_type="v_prediction"),
        dict(clip_denoised=False),
    ):
        before = len(made)
        assert not torch.equal(run(**changed), first), changed
        assert len(made) == before + 1, changed
    # A schedule function may keep state: its plan is never reused.
    scheduled = CFG(3.0, schedule=lambda sigma: 2.0)
    before = len(made)
    run(guidance=scheduled), run(guidance=scheduled)
    assert len(made) == before + 2


def test_the_plan_cache_holds_no_model():
    import gc
    import weakref

    class Model(torch.nn.Module):
        def forward(self, x, t, y):
            return 0.1 * x

    guide = Model()
    model = Model()
    refs = weakref.ref(model), weakref.ref(guide)
    sample(
        model,
        (1, 3, 4, 4),
        labels=torch.tensor([0]),
        guidance=fastguide.AutoGuidance(guide, 2.0),
        steps=3,
        num_classes=10,
    )
    del model, guide
    gc.collect()
    assert all(ref() is None for ref in refs)


class LinearWithClassOffsets(torch.nn.Module):
    """eps = x + 0.1 · a per-class offset (class 4 the null label): an elementwise multiply
    and add, rounded alike on every device; few samples end clipped at ±1, so a different
    noise shows in most elements."""

    num_classes, null_class = 4, True

    def __init__(self):
        super().__init__()
        self.offsets = torch.nn.Parameter(torch.randn(5, 3, 1, 1, generator=torch.Generator().manual_seed(2)))

    def forward(self, x, t, y):
        return x + 0.1 * self.offsets[y]


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_cpu_generator_draws_the_same_noise_for_cuda_samples(cuda_graph):
    # diffusers' randn_tensor draws on the generator's device and moves the noise: so does
    # the loop, for x_T and every step's noise, eager or replayed. The model computes alike
    # on both devices (a UNet did not: cuDNN's TF32 convolutions, amplified ~160x by 1/alpha
    # at t = 999, moved the H200's result by 0.036), so only the noise could differ here.
    model = LinearWithClassOffsets()
    kwargs = dict(sampler="ddpm", steps=5, guidance=CFG(3.0), labels=torch.tensor([0, 3]))
    on_cpu = sample(model, (2, 3, 8, 8), generator=torch.Generator().manual_seed(5), **kwargs)
    on_cuda = GuidedSampler(model.cuda(), cuda_graph=cuda_graph, **{k: v for k, v in kwargs.items() if k != "labels"})
    for _ in range(2):
        got = on_cuda((2, 3, 8, 8), labels=kwargs["labels"], generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_a_built_samplers_settings_are_fixed():
    # its plan is made from them when it is built: an assignment would be ignored
    guided = GuidedSampler(tiny_cfg_unet(), sampler="ddim", steps=3, guidance=CFG(2.0))
    for name, value in (
        *(("guidance", CFG(7.0)), ("timesteps", [999, 0]), ("sampler", "unipc"), ("eta", 1.0)),
        *(("steps", 50), ("spacing", "karras"), ("rho", 3.0)),  # arguments only: would be ignored silently
    ):
        with pytest.raises(AttributeError, match=f"GuidedSampler.{name} is fixed when the sampler is built"):
            setattr(guided, name, value)
    guided.last_compute = {}  # its state, not a setting, stays assignable


def test_timesteps_as_a_numpy_array_are_their_list():
    model = tiny_cfg_unet()
    kwargs = dict(sampler="ddim", labels=torch.tensor([1]), generator=None, noise=torch.randn(1, 3, 8, 8))
    got = sample(model, (1, 3, 8, 8), steps=np.array([999, 500, 0]), **kwargs)
    torch.testing.assert_close(got, sample(model, (1, 3, 8, 8), steps=[999, 500, 0], **kwargs), atol=0, rtol=0)


def test_an_unconditional_adm_unet_takes_classifier_guidance_without_labels():
    # ADM's 256x256_diffusion_uncond with the 256 classifier: the labels are the
    # classifier's; the UNet (class_cond=False) takes none
    unet, classifier = tiny_unet(seed=5), tiny_classifier()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(labels=torch.tensor([1, 3]), noise=noise, sampler="ddim", steps=3)
    guided = sample(unet, noise.shape, guidance=ClassifierGuidance(classifier, 2.0), **kwargs)
    written_out = sample(
        lambda x, t, y: unet(x, t), noise.shape, guidance=ClassifierGuidance(classifier, 2.0), **kwargs
    )
    torch.testing.assert_close(guided, written_out, atol=0, rtol=0)
    assert not torch.equal(guided, sample(unet, noise.shape, noise=noise, sampler="ddim", steps=3))
    with pytest.raises(ValueError, match="the model is unconditional .* no classifier guidance reads them"):
        sample(unet, noise.shape, **kwargs)


def test_apg_momentum_in_a_float64_run_equals_diffusers_apg_to_float64_rounding():
    # APG with momentum (diffusers' MomentumBuffer and normalized_guidance, the original
    # formulation: c + (w − 1)·(Δ⊥ + η·Δ∥)) on a DDIM loop written out, in float64: the
    # loop's momentum state is float64 too (a float32 one moved this run by ~2e-6).
    from tests.helpers import diffusers_feature

    apg = diffusers_feature("diffusers.guiders.adaptive_projected_guidance", since=(0, 35))
    model = tiny_cfg_unet().double()
    schedule, steps, w = NoiseSchedule.linear(), [999, 700, 400, 150], 4.0
    labels = torch.tensor([0, 2])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    null = torch.full_like(labels, model.null_label)
    for eta, threshold, beta in [(0.0, 0.0, -0.5), (0.3, 2.0, -0.75)]:
        momentum, x = apg.MomentumBuffer(beta), noise.clone()
        with torch.no_grad():
            for t, t_next in zip(steps, [*steps[1:], -1]):
                times = torch.full((2,), t)
                c, u = model(x, times, labels)[:, :3], model(x, times, null)[:, :3]
                eps = apg.normalized_guidance(c, u, w - 1, momentum, eta, threshold, use_original_formulation=True)
                alpha, sigma = schedule.alpha_sigma(t)
                x0 = (x - sigma * eps) / alpha
                alpha_next, sigma_next = schedule.alpha_sigma(t_next) if t_next >= 0 else (1.0, 0.0)
                x = alpha_next * x0 + sigma_next * eps
        got = sample(
            model,
            noise.shape,
            labels=labels,
            sampler="ddim",
            steps=steps,
            schedule=schedule,
            guidance=CFG(w, apg=APG(eta, threshold, beta)),
            noise=noise,
            clip_denoised=False,
        )
        torch.testing.assert_close(got, x, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "guidance",
    [CFG(7.5), fastguide.PAG(2.0, ("input_blocks.1",), cfg_scale=3.0)],
    ids=["cfg", "pag-with-cfg"],
)
def test_an_unconditional_branch_on_an_unconditional_model_is_refused_beside_a_classifier(guidance):
    # The labels go to the classifier alone: the two branches would be one forward twice,
    # and CFG (or PAG's CFG) a silent no-op at twice the cost.
    with pytest.raises(ValueError, match="needs a model that takes labels"):
        sample(
            tiny_unet(),
            (2, 3, 8, 8),
            labels=torch.tensor([0, 3]),
            null_label=0,
            guidance=(guidance, ClassifierGuidance(tiny_classifier(), 2.0)),
            sampler="ddim",
            steps=2,
        )


def test_num_classes_past_the_models_own_is_refused():
    # Label 4 of tiny_cfg_unet is its null class: num_classes=5 would let it pass as a class.
    with pytest.raises(ValueError, match=r"num_classes must be at most the model's num_classes \(4\), got 5"):
        sample(tiny_cfg_unet(), (2, 3, 8, 8), labels=torch.tensor([4, 4]), guidance=CFG(7.5), num_classes=5, steps=2)
    got = sample(tiny_cfg_unet(), (2, 3, 8, 8), labels=torch.tensor([1, 2]), num_classes=3, steps=2)
    assert torch.isfinite(got).all()  # fewer classes than the model's: a narrower check

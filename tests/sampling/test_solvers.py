"""The solvers against their peers (diffusers' schedulers, SiT's Euler–Maruyama) on the same
grid and model, their orders of convergence on the exact Gaussian-class oracle, and the
default sampler's accuracy against diffusers' default."""

import importlib.util
import inspect
import math

import pytest
import torch

import fastguide
from benchmarks.sampling.nfe import diffusers_error, fastguide_error, fastguide_steps, kdiffusion_sampling
from benchmarks.sampling.oracle import GaussianClasses
from fastguide import CFG, GuidedSampler, NoiseSchedule, sample
from fastguide.sampling.solvers import ORDERS, plan_steps

diffusers = pytest.importorskip("diffusers")
ADM_BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def toy_eps(x, t):
    """A smooth deterministic "model" of x and t, in x's dtype."""
    return (torch.tanh(0.7 * x + 0.3) * (0.5 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 2000)).to(x.dtype)


def run_diffusers(scheduler, x_T, model, generator=None):
    """diffusers' loop: scale the input where the scheduler asks, step with the generator
    where the scheduler draws noise."""
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at x_T
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = model(model_input, t.reshape(1).expand(len(x)))
        x = scheduler.step(out, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
    return x


CASES = {  # name: (scheduler, our sampler and options, noise)
    "dpm++3m": (lambda: diffusers.DPMSolverMultistepScheduler(**ADM_BETAS, solver_order=3), dict(sampler="dpm++3m")),
    "unipc-1": (
        lambda: diffusers.UniPCMultistepScheduler(**ADM_BETAS, solver_order=1),
        dict(sampler="unipc", solver_order=1),
    ),
    "unipc-2": (lambda: diffusers.UniPCMultistepScheduler(**ADM_BETAS), dict(sampler="unipc")),
    "unipc-3": (
        lambda: diffusers.UniPCMultistepScheduler(**ADM_BETAS, solver_order=3),
        dict(sampler="unipc", solver_order=3),
    ),
    "dpm++2m-sde": (
        lambda: diffusers.DPMSolverMultistepScheduler(**ADM_BETAS, algorithm_type="sde-dpmsolver++"),
        dict(sampler="dpm++2m-sde"),
    ),
    # Karras-style schedulers on integer timesteps ("leading"), where the grids coincide.
    "heun": (lambda: diffusers.HeunDiscreteScheduler(**ADM_BETAS, timestep_spacing="leading"), dict(sampler="heun")),
    "euler-ancestral": (
        lambda: diffusers.EulerAncestralDiscreteScheduler(**ADM_BETAS, timestep_spacing="leading"),
        dict(sampler="euler-ancestral"),
    ),
}


@pytest.mark.parametrize(
    "sampler, flow, budget, steps",
    [
        ("euler", False, 6, 6),
        ("heun", False, 6, 3),
        ("heun", True, 7, 4),
        ("dpm++2s", False, 6, 3),
        ("dpm++2s", True, 6, 4),
    ],
)
def test_the_nfe_table_gives_each_solver_the_most_steps_its_budget_holds(sampler, flow, budget, steps):
    # A two-call solver's last step makes one call, and dpm++2s's first step from a flow
    # path's pure noise one more: 2·steps − 2 calls there, so budget 6 holds 4 steps.
    schedule = NoiseSchedule.flow() if flow else NoiseSchedule.linear()
    assert fastguide_steps(budget, schedule, sampler, None, "linspace" if flow else "leading") == steps


@pytest.mark.parametrize("steps", [6, 13, 20])
@pytest.mark.parametrize("case", CASES)
def test_vp_solvers_match_diffusers(case, steps):
    make, options = CASES[case]
    scheduler = make()
    scheduler.set_timesteps(steps)
    # UniPC of order 3 in diffusers mixes float32 and float64 unless its sigmas are float64.
    scheduler.sigmas = scheduler.sigmas.double() if case == "unipc-3" else scheduler.sigmas
    # (the SDE in float64 too: diffusers draws its noise in float32 whatever the dtype)
    dtype = torch.float64 if case in ("unipc-3", "dpm++2m-sde") else torch.float32
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    expected = run_diffusers(scheduler, x_T, toy_eps, torch.Generator().manual_seed(7))
    timesteps = sorted({int(t) for t in scheduler.timesteps.tolist()}, reverse=True)
    got = sample(
        toy_eps,
        x_T.shape,
        steps=timesteps,
        noise=x_T,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(7),
        **options,
    )
    # diffusers' alphas_cumprod are float32 and its multistep update runs in float32
    torch.testing.assert_close(got, expected, atol=2e-4 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_euler_and_heun_match_diffusers_flow_match_schedulers(sampler, shift):
    make = diffusers.FlowMatchEulerDiscreteScheduler if sampler == "euler" else diffusers.FlowMatchHeunDiscreteScheduler
    scheduler = make(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(9)

    def velocity(x, t):
        return toy_eps(x, t) - 0.3 * x

    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = run_diffusers(scheduler, x_T, velocity)
    times = sorted(set(scheduler.timesteps.tolist()), reverse=True)
    got = sample(
        velocity,
        x_T.shape,
        sampler=sampler,
        steps=times,
        noise=x_T,
        clip_denoised=False,
        schedule=NoiseSchedule.flow(shift),
        prediction_type="flow_prediction",
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps", [3, 10])
def test_flow_heun_in_half_precision_rounds_as_diffusers_does(steps, dtype):
    # Heun's second call lands on diffusers' last σ, 0.001. Written in the slope difference
    # (x0_A − x0_B)/σ', its update multiplied x_E's and x0_A's rounding by ~1/(2σ'): in bf16,
    # 1.7 (3 steps) and 0.2 (10) of the sample's scale off where diffusers is 4e-3 and 1e-2.
    def velocity(x, t):
        return torch.tanh(0.7 * x + 0.3) * 0.5 - 0.3 * x

    def make():
        scheduler = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(steps)
        return scheduler

    x_T = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    options = dict(
        sampler="heun",
        steps=sorted(set(make().timesteps.tolist()), reverse=True),
        schedule=NoiseSchedule.flow(),
        prediction_type="flow_prediction",
        clip_denoised=False,
    )
    exact = sample(velocity, x_T.shape, noise=x_T, **options)
    got = sample(lambda x, t: velocity(x, t).to(dtype), x_T.shape, noise=x_T.to(dtype), **options)
    theirs = run_diffusers(make(), x_T.to(dtype), lambda x, t: velocity(x, t).to(dtype))
    scale = exact.abs().max()
    error, their_error = ((y.double() - exact).abs().max() / scale for y in (got, theirs))
    assert error <= 3 * their_error, (error, their_error)


@pytest.mark.skipif(
    importlib.util.find_spec("k_diffusion") is None,
    reason="k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq trampoline)",
)
@pytest.mark.parametrize(
    "ours, theirs, steps",
    [
        ("euler", "sample_euler", 12),
        ("ddim", "sample_euler", 12),
        ("heun", "sample_heun", 8),
        ("dpm++2m", "sample_dpmpp_2m", 12),
    ],
)
@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_vp_solvers_match_kdiffusion_on_the_same_grid(ours, theirs, steps, spacing):
    # k-diffusion integrates x/α in σ̃ = σ/α with a denoiser D(x, σ̃); on fastguide's grid's
    # σ̃ (then 0), from the same start, the samples agree to float64 rounding. (Its
    # dpmpp_3m_sde at eta = 0 differs from dpm++3m by ~1e-7: its warm-up second-order step
    # is the φ₂ form, diffusers' and ours the midpoint one; its 2S is another midpoint rule.)
    sampling = kdiffusion_sampling()
    oracle, schedule = GaussianClasses(3.0), NoiseSchedule.linear()
    x_T = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    runner = GuidedSampler(
        oracle.model(schedule, "epsilon"),
        sampler=ours,
        steps=steps,
        spacing=spacing,
        schedule=schedule,
        guidance=CFG(3.0),
        clip_denoised=False,
        null_label=1,
        num_classes=1,
    )
    ours_x = runner(x_T.shape, labels=torch.zeros(64, dtype=torch.long), noise=x_T)
    edm = [sigma / alpha for alpha, sigma in (schedule.alpha_sigma(int(t)) for t in runner.timesteps)]
    sigmas = torch.tensor([*edm, 0.0], dtype=torch.float64)
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma)
        return oracle.edm_denoise(x, float(sigma[0]))

    theirs_x = getattr(sampling, theirs)(
        denoiser, x_T / schedule.alpha_sigma(int(runner.timesteps[0]))[0], sigmas, disable=True
    )
    assert len(calls) == runner.num_calls
    torch.testing.assert_close(ours_x, theirs_x, rtol=0, atol=1e-12)


def test_flow_schedule_calls_the_model_at_float_times_and_shifts_its_grid():
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sample(
        velocity,
        (2, 1, 2, 2),
        sampler="euler",
        steps=4,
        schedule=NoiseSchedule.flow(3.0),
        prediction_type="flow_prediction",
        clip_denoised=False,
    )
    sigmas = [1 - i / 4 for i in range(4)]
    expected = [1000 * 3 * s / (1 + 2 * s) for s in sigmas]
    assert all(t.dtype == torch.float32 for t in seen)
    assert [t[0].item() for t in seen] == pytest.approx(expected, rel=1e-6)


def test_euler_maruyama_is_sits_sde_with_its_mean_last_step():
    """SiT's sample_sde (Euler, diffusion "sigma", norm 1, last step "Mean" of size 1/N),
    written out in SiT's time τ = 1 − σ, where its model predicts x0 − ε."""
    steps, flow = 6, NoiseSchedule.flow()

    def velocity(x, t):  # ours: ε − x0 at σ = t/1000
        return toy_eps(x, t) - 0.3 * x

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    generator = torch.Generator().manual_seed(11)
    x, dt = x_T.clone(), 1.0 / steps
    for i in range(steps):
        tau = i * dt
        sigma = 1 - tau
        v_sit = -velocity(x, torch.full((len(x),), 1000 * sigma, dtype=torch.float64))
        score = -(x + (1 - sigma) * -v_sit) / sigma  # −ε/σ, ε = x + α·v
        drift = v_sit + sigma * score
        x = x + drift * dt
        if i < steps - 1:
            x = x + math.sqrt(2 * sigma) * torch.randn(x.shape, generator=generator, dtype=x.dtype) * math.sqrt(dt)
    got = sample(
        velocity,
        x_T.shape,
        sampler="euler-maruyama",
        steps=steps,
        schedule=flow,
        noise=x_T,
        prediction_type="flow_prediction",
        clip_denoised=False,
        generator=torch.Generator().manual_seed(11),
    )
    # The loop hands the model its time as float32 (diffusers' convention): 1e-7 relative in t.
    torch.testing.assert_close(got, x, atol=1e-7, rtol=1e-7)


def _flow_error_at_last_time(sampler, solver_order, count, oracle):
    """Error of x at the grid's last time (before the final denoising step, whose own
    first-order error would cap every solver), on λ-uniform float times of a flow path."""
    flow = NoiseSchedule.flow()
    times = [flow.time_of_log_snr(level) for level in torch.linspace(-2.0, 2.0, count).tolist()]
    x_T = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1, 1, 1)
    seen = []
    runner = GuidedSampler(
        oracle.model(flow, "flow_prediction"),
        sampler=sampler,
        solver_order=solver_order,
        steps=times,
        schedule=flow,
        guidance=CFG(oracle.w),
        clip_denoised=False,
        prediction_type="flow_prediction",
        null_label=1,
        num_classes=1,
    )
    runner(
        x_T.shape,
        labels=torch.zeros(11, dtype=torch.long),
        noise=x_T,
        callback=lambda info: seen.append(info["x"].clone()),
    )
    return (seen[-2].double() - oracle.exact(x_T, flow, times[0], times[-1])).abs().max().item()


@pytest.mark.parametrize("name", ORDERS)
def test_observed_order_of_convergence_is_the_theory(name):
    sampler, _, order = name.partition("-")
    oracle = GaussianClasses(3.0)
    counts = (21, 41, 81)
    errors = [_flow_error_at_last_time(sampler, int(order) if order else None, n, oracle) for n in counts]
    observed = [math.log2(coarse / fine) for coarse, fine in zip(errors, errors[1:])]
    assert abs(observed[-1] - ORDERS[name]) < 0.3, (errors, observed)


@pytest.mark.parametrize("budget, fraction", [(25, 0.25), (10, 0.5)])
def test_default_sampler_beats_diffusers_default_per_model_call(budget, fraction):
    """The issue's yardstick: CFG w = 3 on the exact oracle, 256 starting points."""
    oracle, schedule = GaussianClasses(3.0), NoiseSchedule.linear()
    x_T = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, calls = fastguide_error(oracle, schedule, x_T, "unipc", None, budget, schedule.default_spacing)
    theirs, their_calls = diffusers_error(oracle, "DPMSolverMultistepScheduler", budget, x_T)
    assert calls == their_calls == budget
    assert ours <= fraction * theirs, (ours, theirs)


def test_sampler_and_schedule_mismatches_are_refused():
    flow = NoiseSchedule.flow()
    with pytest.raises(ValueError, match="needs a variance-preserving schedule"):
        plan_steps("ddpm", flow, flow.timesteps(4))
    with pytest.raises(ValueError, match="needs a flow schedule"):
        plan_steps("euler-maruyama", NoiseSchedule.linear(), [999, 500])
    with pytest.raises(ValueError, match="solver_order applies to sampler='unipc'"):
        plan_steps("dpm++2m", NoiseSchedule.linear(), [999, 500], solver_order=3)
    with pytest.raises(ValueError, match="flow_prediction' converts to x0 and eps only on a flow schedule"):
        sample(toy_eps, (1, 1, 2, 2), steps=3, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="spacing must be 'linspace' for a flow schedule"):
        sample(toy_eps, (1, 1, 2, 2), steps=3, spacing="karras", schedule=flow, prediction_type="flow_prediction")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        # 2.0 == 2 passed the old membership test, then broke UniPC's range() with a TypeError.
        (dict(sampler="unipc", solver_order=2.0), TypeError, "solver_order must be an int"),
        (dict(sampler="unipc", solver_order=True), TypeError, "solver_order must be an int"),
        (dict(sampler="unipc", solver_order=4), ValueError, "solver_order must be 1, 2 or 3"),
        # DDIM's η only: the other samplers ignored it; above 1 its noise exceeds σ_t'.
        (dict(sampler="dpm++2m", eta=0.5), ValueError, r"eta .* applies to sampler='ddim', got sampler='dpm\+\+2m'"),
        (dict(sampler="ddim", eta=1.5), ValueError, r"eta .* must be a number in \[0, 1\]"),
        (dict(sampler="ddim", eta=True), ValueError, r"eta .* must be a number in \[0, 1\]"),
        (dict(sampler=["ddim"]), ValueError, "sampler must be one of"),
    ],
)
def test_sampler_settings_are_checked_with_the_sampler(kwargs, error, message):
    sampler = kwargs.pop("sampler")
    with pytest.raises(error, match=message):
        plan_steps(sampler, NoiseSchedule.linear(), [999, 500, 100], **kwargs)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_cfg_plus_plus_carries_over_to_a_flow_path(sampler):
    """CFG++ on a flow path: x' = α'·x̂0_λ + σ'·ε_∅ with α = 1 − σ, from the velocity model's
    guided x0 and unconditional eps (x0 = x − σ·v, ε = x + α·v)."""
    flow, lam, times = NoiseSchedule.flow(), 0.6, [1000.0, 700.0, 350.0, 90.0]
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def velocity(x, t, y):
        y, t = (v.double().reshape(-1, 1, 1, 1) for v in (y, t))
        return torch.tanh(0.5 * x - 0.2 * y) * (0.4 + t / 1500) - 0.3 * x

    got = sample(
        velocity,
        x_T.shape,
        sampler=sampler,
        labels=torch.tensor([1, 2]),
        steps=times,
        noise=x_T,
        schedule=flow,
        prediction_type="flow_prediction",
        guidance=fastguide.CFGPlusPlus(lam),
        null_label=0,
        clip_denoised=False,
    )
    x = x_T.clone()
    for t, t_next in zip(times, times[1:] + [0.0]):
        sigma, sigma_next = t / 1000, t_next / 1000
        out = velocity(torch.cat([x, x]), torch.full((4,), t), torch.tensor([1, 2, 0, 0]))
        v_c, v_u = out[:2], out[2:]
        x0 = x - sigma * (v_u + lam * (v_c - v_u))
        eps_u = x + (1 - sigma) * v_u
        x = (1 - sigma_next) * x0 + sigma_next * eps_u
    # float32 times in the model call (1e-7 relative), as elsewhere
    torch.testing.assert_close(got, x, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------
# final_timestep: where the last step lands
# --------------------------------------------------------------------------------------

GRID = [999, 700, 400, 150, 20]
ONE_STEP = ("ddim", "ddpm", "euler", "euler-ancestral", "heun", "dpm++2s")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_last_step_to_a_timestep_written_out(eta):
    """DDIM's last step from t = 20 to t_f = 0 (diffusers' set_alpha_to_one=False):
    x' = √ᾱ_0·x0 + √(1 − ᾱ_0 − σ_η²)·eps + σ_η·z, σ_η = η·√((1 − ᾱ_0)/(1 − ᾱ_20)·(1 − ᾱ_20/ᾱ_0))."""
    schedule = NoiseSchedule.linear()
    last = plan_steps("ddim", schedule, GRID, eta=eta, final_timestep=0)[-1]
    abar, abar_final = schedule.alphas_cumprod[20].item(), schedule.alphas_cumprod[0].item()
    sigma_eta = eta * math.sqrt((1 - abar_final) / (1 - abar) * (1 - abar / abar_final))
    assert (last.t, last.t_next) == (20, 0)
    assert last.k_x0 == pytest.approx(math.sqrt(abar_final), rel=1e-15)
    assert last.k_eps == pytest.approx(math.sqrt(1 - abar_final - sigma_eta**2), rel=1e-12)
    assert last.k_noise == pytest.approx(sigma_eta, rel=1e-15) and last.k_x == 0.0
    # the default lands on the clean data: x' = x0
    clean = plan_steps("ddim", schedule, GRID, eta=eta)[-1]
    assert (clean.t_next, clean.k_x0, clean.k_eps, clean.k_noise) == (-1, 1.0, 0.0, 0.0)


def test_ddim_sampling_to_timestep_0_matches_the_loop_written_out():
    schedule, x_T = (
        NoiseSchedule.linear(),
        torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
    )
    got = sample(toy_eps, x_T.shape, sampler="ddim", steps=GRID, final_timestep=0, noise=x_T, clip_denoised=False)
    x = x_T
    for t, t_next in zip(GRID, GRID[1:] + [0]):
        abar, abar_next = schedule.alphas_cumprod[t].item(), schedule.alphas_cumprod[t_next].item()
        eps = toy_eps(x, torch.full((2,), t))
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        x = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler", ONE_STEP)
def test_a_one_step_sampler_lands_on_a_timestep_as_on_any_grid_point(sampler):
    # The step to t_f is the sampler's ordinary step: the plan over the grid and t_f, less its step onto x0.
    schedule = NoiseSchedule.linear()
    assert plan_steps(sampler, schedule, GRID, final_timestep=3) == plan_steps(sampler, schedule, GRID + [3])[:-1]


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++3m", "dpm++2m-sde"])
def test_a_multistep_last_step_to_a_timestep_is_first_order_below_15_steps(sampler):
    """diffusers' lower_order_final with final_sigmas_type="sigma_min": below 15 steps the
    last step is DPM-Solver++'s first-order one, x' = (σ'/σ)·x + α'·(1 − e^{−h})·m₀ (the SDE
    variant: (σ'/σ)·e^{−h}·x + α'·(1 − e^{−2h})·m₀ + σ'·√(1 − e^{−2h})·z); from 15 steps it
    keeps the solver's order, as at any grid point."""
    schedule, noise = NoiseSchedule.linear(), sampler == "dpm++2m-sde"
    last = plan_steps(sampler, schedule, GRID, final_timestep=0)[-1]
    (_, sigma), (alpha_f, sigma_f) = schedule.alpha_sigma(20), schedule.alpha_sigma(0)
    h = schedule.log_snr(0) - schedule.log_snr(20)
    phi = -math.expm1(-2 * h if noise else -h)
    assert last.k_history == () and last.k_x0 == pytest.approx(alpha_f * phi, rel=1e-12)
    assert last.k_x == pytest.approx(sigma_f / sigma * (math.exp(-h) if noise else 1.0), rel=1e-12)
    assert last.k_noise == pytest.approx(sigma_f * math.sqrt(phi) if noise else 0.0, rel=1e-12)
    long_grid = schedule.spaced_timesteps(20, "leading")[:-1] + [10]  # 20 steps, from 950 to 10
    assert len(plan_steps(sampler, schedule, long_grid, final_timestep=3)[-1].k_history) > 0
    assert (
        plan_steps(sampler, schedule, long_grid, final_timestep=3)
        == plan_steps(sampler, schedule, long_grid + [3])[:-1]
    )


@pytest.mark.parametrize(
    "final_timestep, error, message",
    [
        (20, ValueError, r"final_timestep must be -1 \(the clean data\) or an original timestep in \[0, 20\)"),
        (500, ValueError, r"in \[0, 20\)"),
        (-2, ValueError, r"in \[0, 20\)"),
        (0.0, TypeError, "final_timestep must be an int"),
        (True, TypeError, "final_timestep must be an int"),
    ],
)
def test_a_final_timestep_the_last_step_cannot_land_on_is_refused(final_timestep, error, message):
    with pytest.raises(error, match=message):
        plan_steps("ddim", NoiseSchedule.linear(), GRID, final_timestep=final_timestep)
    with pytest.raises(error, match=message):
        sample(toy_eps, (1, 1, 2, 2), sampler="ddim", steps=GRID, final_timestep=final_timestep)


def test_final_timestep_applies_to_variance_preserving_schedules_only():
    flow = NoiseSchedule.flow()
    with pytest.raises(
        ValueError,
        match=r"final_timestep=0 applies to variance-preserving schedules.*"
        r"sampler='euler' lands on the clean data",
    ):
        plan_steps("euler", flow, flow.timesteps(4), final_timestep=0)
    assert plan_steps("euler", flow, flow.timesteps(4), final_timestep=-1)[-1].t_next == -1


def test_final_timestep_is_part_of_the_plan():
    model = toy_eps
    to_zero = GuidedSampler(model, sampler="ddim", steps=GRID, final_timestep=0)
    clean = GuidedSampler(model, sampler="ddim", steps=GRID)
    assert to_zero._calls(False) is not clean._calls(False)
    assert to_zero._calls(False)[-1].step.k_eps > 0 and clean._calls(False)[-1].step.k_eps == 0


def test_fractional_grids_run_every_sampler_and_the_model_gets_float32_times():
    schedule, grid = NoiseSchedule.linear(), [999, 957.375, 915.75, 500.5, 40.25, 0.5]
    for sampler in (
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
    ):
        times = []
        x = sample(
            lambda x, t: times.append(t) or toy_eps(x, t),
            (1, 1, 2, 2),
            sampler=sampler,
            steps=grid,
            schedule=schedule,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.isfinite(x).all() and all(t.dtype == torch.float32 for t in times)
        calls = [t[0].item() for t in times]
        assert calls[0] == 999.0 and 957.375 in calls and 0.5 in calls  # the float32 times as given
    # dpm++2s's second call lies at the integer timestep of λ nearest the midpoint, strictly inside the step
    to_mid = plan_steps("dpm++2s", schedule, grid)[0]
    target = 0.5 * (schedule.log_snr(999) + schedule.log_snr(957.375))
    assert isinstance(to_mid.t_next, int) and 957.375 < to_mid.t_next < 999
    assert all(
        abs(schedule.log_snr(to_mid.t_next) - target) <= abs(schedule.log_snr(k) - target) for k in range(958, 999)
    )
    assert len(plan_steps("dpm++2s", schedule, [1.75, 0.5])) == 3  # the second call at t = 1
    assert len(plan_steps("dpm++2s", schedule, [1.75, 1.25])) == 2  # no timestep strictly between: one call

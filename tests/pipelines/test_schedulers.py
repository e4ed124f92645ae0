"""settings_for against diffusers: for each scheduler config the pipelines ship (or users swap
in with ``from_config``), diffusers' own loop (set_timesteps, init_noise_sigma,
scale_model_input, step, as the pipelines run it) and fastguide.sample under the mapped
settings give the same latents from the same start, to float rounding; every refusal names
its option and reason."""

import dataclasses
import inspect
import math
import subprocess
import sys

import pytest
import torch

import fastguide
from fastguide.pipelines.schedulers import SamplerSettings, UnsupportedScheduler, settings_for
from tests.helpers import release

diffusers = pytest.importorskip("diffusers")
# diffusers' set_timesteps hands torch tensors to numpy 2 (its deprecations, not ours)
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context"),
]

# The schedulers' configs as the pipelines' hub repositories ship them (no downloads), read
# with from_config as from_pretrained reads them (keys the class does not take are ignored).
# runwayml/stable-diffusion-v1-5: PNDM; users swap in others with X.from_config(its config).
SD15 = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    clip_sample=False,
)
# stabilityai/stable-diffusion-xl-base-1.0
SDXL = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    interpolation_type="linear",
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)
# stabilityai/stable-diffusion-3-medium-diffusers
SD3 = dict(num_train_timesteps=1000, shift=3.0)
# PixArt-alpha/PixArt-XL-2-1024-MS and PixArt-Sigma: DPMSolverMultistepScheduler() (the conversion scripts')
PIXART = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    timestep_spacing="linspace",
    steps_offset=0,
    prediction_type="epsilon",
)
# facebook/DiT-XL-2-256 (scripts/convert_dit_to_diffusers.py); its docs swap in DPMSolverMultistep
DIT = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon", clip_sample=False)


def sd15(kind, **overrides):
    """``kind.from_config`` of SD 1.5's PNDM config, as users swap schedulers in."""
    return getattr(diffusers, kind).from_config(diffusers.PNDMScheduler.from_config(SD15).config, **overrides)


def sdxl(kind="EulerDiscreteScheduler", **overrides):
    return getattr(diffusers, kind).from_config(diffusers.EulerDiscreteScheduler.from_config(SDXL).config, **overrides)


def dit(kind="DDIMScheduler", **overrides):
    return getattr(diffusers, kind).from_config(diffusers.DDIMScheduler(**DIT).config, **overrides)


def pixart(**overrides):
    return diffusers.DPMSolverMultistepScheduler(**{**PIXART, **overrides})


def sd3(kind="FlowMatchEulerDiscreteScheduler", **overrides):
    return getattr(diffusers, kind).from_config(diffusers.FlowMatchEulerDiscreteScheduler(**SD3).config, **overrides)


# Keys a scheduler class does not take, which from_config keeps in its config all the same
# (a DDPM config's clipping and thresholding, a DPM-Solver's σ options): the class never
# reads them, and neither may settings_for.
LEFTOVERS = dict(
    clip_sample=True,
    clip_sample_range=1.5,
    thresholding=True,
    use_karras_sigmas=True,
    final_sigmas_type="sigma_min",
)


def with_leftovers(kind, **overrides):
    """``kind.from_config`` of SD 1.5's config plus LEFTOVERS that ``kind`` does not take."""
    cls = getattr(diffusers, kind)
    taken = inspect.signature(cls.__init__).parameters
    scheduler = cls.from_config({**SD15, **{k: v for k, v in LEFTOVERS.items() if k not in taken}}, **overrides)
    assert any(k not in taken and k in scheduler.config for k in LEFTOVERS)  # kept, unread
    return scheduler


def toy(x, t):
    """A smooth deterministic "model" of (x, t), in x's dtype: any prediction type's output."""
    return (torch.tanh(0.7 * x + 0.3) * (0.5 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 2000) - 0.2 * x).to(x.dtype)


def toy_learned(x, t):
    """toy and ADM's variance interpolation channels in [−1, 1]."""
    return torch.cat([toy(x, t), torch.tanh(x - 0.2)], dim=1)


def run_pipeline_loop(scheduler, noise, model, generator, eta, num_inference_steps, **grid):
    """The pipelines' loop: set_timesteps as retrieve_timesteps calls it (a count, or custom
    timesteps or sigmas; mu), latents = noise·init_noise_sigma, then per timestep
    scale_model_input, the model at t and step, with eta and the generator where step takes
    them. Returns the starting latents and the last ones."""
    if "timesteps" in grid or "sigmas" in grid:
        scheduler.set_timesteps(**grid)
    else:
        scheduler.set_timesteps(num_inference_steps, **grid)
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    accepted = inspect.signature(scheduler.step).parameters
    extra = {key: value for key, value in (("eta", eta), ("generator", generator)) if key in accepted}
    x = latents
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(model_input, t.reshape(1).expand(len(x))), t, x, **extra).prev_sample
    return latents, x


# name: (scheduler factory, settings_for's keyword arguments, the sampler it maps to, model)
CASES = {
    # DiT: its DDIM (leading, set_alpha_to_one=True), with η, and the DPM-Solver++ its docs swap in
    "dit-ddim": (dit, {}, "ddim", toy),
    "dit-ddim-eta": (dit, dict(eta=1.0), "ddim", toy),
    "dit-ddim-eta-half": (dit, dict(eta=0.5), "ddim", toy),
    "dit-dpm++2m": (lambda: dit("DPMSolverMultistepScheduler"), {}, "dpm++2m", toy),
    # SD 1.5 with the schedulers users swap in (leading, steps_offset 1)
    # DDIM from SD 1.5's config: set_alpha_to_one=False, its last step lands at ᾱ = alphas_cumprod[0]
    "sd15-ddim": (lambda: sd15("DDIMScheduler"), {}, "ddim", toy),
    "sd15-ddim-eta": (lambda: sd15("DDIMScheduler"), dict(eta=1.0), "ddim", toy),
    "sd15-ddim-v": (lambda: sd15("DDIMScheduler", prediction_type="v_prediction"), {}, "ddim", toy),
    "sd15-dpm++2m": (lambda: sd15("DPMSolverMultistepScheduler"), {}, "dpm++2m", toy),
    "sd15-dpm++3m": (lambda: sd15("DPMSolverMultistepScheduler", solver_order=3), {}, "dpm++3m", toy),
    "sd15-dpm++1": (lambda: sd15("DPMSolverMultistepScheduler", solver_order=1), {}, "ddim", toy),
    "sd15-dpm++2m-sde": (
        lambda: sd15("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"),
        {},
        "dpm++2m-sde",
        toy,
    ),
    "sd15-dpm++2m-euler-at-final": (
        lambda: sd15("DPMSolverMultistepScheduler", euler_at_final=True),
        {},
        "dpm++2m",
        toy,
    ),
    "sd15-unipc-1": (lambda: sd15("UniPCMultistepScheduler", solver_order=1), {}, "unipc", toy),
    "sd15-unipc-2": (lambda: sd15("UniPCMultistepScheduler"), {}, "unipc", toy),
    "sd15-unipc-3": (lambda: sd15("UniPCMultistepScheduler", solver_order=3), {}, "unipc", toy),
    # final_sigmas_type="sigma_min": the last step lands at timestep 0's σ̃ (final_timestep=0)
    "sd15-dpm++2m-sigma-min": (
        lambda: sd15("DPMSolverMultistepScheduler", final_sigmas_type="sigma_min"),
        {},
        "dpm++2m",
        toy,
    ),
    "sd15-dpm++3m-sigma-min": (
        lambda: sd15("DPMSolverMultistepScheduler", solver_order=3, final_sigmas_type="sigma_min"),
        {},
        "dpm++3m",
        toy,
    ),
    "sd15-dpm++1-sigma-min": (
        lambda: sd15("DPMSolverMultistepScheduler", solver_order=1, final_sigmas_type="sigma_min"),
        {},
        "ddim",
        toy,
    ),
    "sd15-dpm++2m-sde-sigma-min": (
        lambda: sd15("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min"),
        {},
        "dpm++2m-sde",
        toy,
    ),
    # below 15 steps diffusers' last step to σ̃_0 is first order anyway: euler_at_final changes nothing
    "sd15-dpm++2m-sigma-min-euler-at-final": (
        lambda: sd15("DPMSolverMultistepScheduler", euler_at_final=True, final_sigmas_type="sigma_min"),
        {},
        "dpm++2m",
        toy,
    ),
    "sd15-unipc-2-sigma-min": (
        lambda: sd15("UniPCMultistepScheduler", final_sigmas_type="sigma_min"),
        {},
        "unipc",
        toy,
    ),
    "sd15-unipc-3-sigma-min": (
        lambda: sd15("UniPCMultistepScheduler", solver_order=3, final_sigmas_type="sigma_min"),
        {},
        "unipc",
        toy,
    ),
    # from SD 1.5's config as shipped (no timestep_spacing key) the Euler types take their own
    # default, "linspace", which calls the model at fractional times (σ̃ interpolated in t)
    "sd15-euler-linspace": (lambda: sd15("EulerDiscreteScheduler"), {}, "euler", toy),
    "sd15-euler-linspace-v": (lambda: sd15("EulerDiscreteScheduler", prediction_type="v_prediction"), {}, "euler", toy),
    "sd15-euler-ancestral-linspace": (lambda: sd15("EulerAncestralDiscreteScheduler"), {}, "euler-ancestral", toy),
    "sd15-heun-linspace": (lambda: sd15("HeunDiscreteScheduler"), {}, "heun", toy),
    # and on SD's "leading" spacing:
    "sd15-euler": (lambda: sd15("EulerDiscreteScheduler", timestep_spacing="leading"), {}, "euler", toy),
    "sd15-euler-ancestral": (
        lambda: sd15("EulerAncestralDiscreteScheduler", timestep_spacing="leading"),
        {},
        "euler-ancestral",
        toy,
    ),
    "sd15-heun": (lambda: sd15("HeunDiscreteScheduler", timestep_spacing="leading"), {}, "heun", toy),
    "sd15-ddpm": (lambda: sd15("DDPMScheduler"), {}, "ddpm", toy),
    # SDXL's Euler (leading, steps_offset 1), and DPM-Solver++ from its config
    "sdxl-euler": (sdxl, {}, "euler", toy),
    # diffusers reads timestep_type="continuous" with v_prediction only
    "sdxl-euler-continuous-eps": (lambda: sdxl(timestep_type="continuous"), {}, "euler", toy),
    "sdxl-euler-ancestral": (lambda: sdxl("EulerAncestralDiscreteScheduler"), {}, "euler-ancestral", toy),
    "sdxl-dpm++2m": (lambda: sdxl("DPMSolverMultistepScheduler"), {}, "dpm++2m", toy),
    "sdxl-euler-v": (lambda: sdxl(prediction_type="v_prediction"), {}, "euler", toy),
    "sdxl-euler-trailing": (lambda: sdxl(timestep_spacing="trailing"), {}, "euler", toy),
    "sdxl-euler-custom-timesteps": (sdxl, dict(timesteps=[999, 850, 700, 500, 301, 150, 40, 3]), "euler", toy),
    "sdxl-heun-custom-fractional-timesteps": (
        lambda: sdxl("HeunDiscreteScheduler"),
        dict(timesteps=[998.5, 850.25, 700.0, 421.75, 130.5, 0.5]),
        "heun",
        toy,
    ),
    "sdxl-dpm++2m-custom-timesteps": (
        lambda: sdxl("DPMSolverMultistepScheduler"),
        dict(timesteps=[999, 800, 600, 400, 200, 5]),
        "dpm++2m",
        toy,
    ),
    # PixArt's DPM-Solver++ (linspace), and its SDE variant
    "pixart-dpm++2m": (pixart, {}, "dpm++2m", toy),
    "pixart-dpm++2m-sde": (lambda: pixart(algorithm_type="sde-dpmsolver++"), {}, "dpm++2m-sde", toy),
    "pixart-dpm++3m-v": (lambda: pixart(solver_order=3, prediction_type="v_prediction"), {}, "dpm++3m", toy),
    # lower_order_final=False changes nothing for order 2 (the last step is first order with
    # final_sigmas_type="zero"), nor for order 3 from 15 steps
    "pixart-dpm++2m-no-lower-order-final": (lambda: pixart(lower_order_final=False), {}, "dpm++2m", toy),
    "pixart-dpm++3m-no-lower-order-final": (
        lambda: pixart(solver_order=3, lower_order_final=False),
        {},
        "dpm++3m",
        toy,
    ),
    "pixart-dpm++2m-trailing-sample": (
        lambda: pixart(timestep_spacing="trailing", prediction_type="sample"),
        {},
        "dpm++2m",
        toy,
    ),
    # SD3's flow matching (shift 3), Heun on it, dynamic shifting with mu, custom σ's
    "sd3-euler": (sd3, {}, "euler", toy),
    "sd3-heun": (lambda: sd3("FlowMatchHeunDiscreteScheduler"), {}, "heun", toy),
    "sd3-euler-mu": (lambda: sd3(use_dynamic_shifting=True), dict(mu=0.8), "euler", toy),
    "sd3-euler-sigmas": (sd3, dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1]), "euler", toy),
    "sd3-euler-karras": (lambda: sd3(use_karras_sigmas=True), {}, "euler", toy),
    "sd3-euler-shift-terminal": (lambda: sd3(shift_terminal=0.02), {}, "euler", toy),
    # DDIM whose last step t − T // N is a timestep: it lands there (t = 2 for 30 steps)
    "dit-ddim-steps-offset": (lambda: dit(steps_offset=35), {}, "ddim", toy),
    # other configs: v-prediction DDIM on trailing (SD 2.x style), DDPM's options, Heun's clip
    "ddim-trailing-v": (
        lambda: sd15(
            "DDIMScheduler", timestep_spacing="trailing", set_alpha_to_one=True, prediction_type="v_prediction"
        ),
        {},
        "ddim",
        toy,
    ),
    "ddpm-clip-cosine": (lambda: diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"), {}, "ddpm", toy),
    "ddpm-fixed-large": (
        lambda: diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False),
        {},
        "ddpm",
        toy,
    ),
    "ddpm-fixed-small-log": (lambda: diffusers.DDPMScheduler(variance_type="fixed_small_log"), {}, "ddpm", toy),
    "ddpm-learned-range": (lambda: diffusers.DDPMScheduler(variance_type="learned_range"), {}, "ddpm", toy_learned),
    "ddpm-custom-timesteps": (
        lambda: diffusers.DDPMScheduler(),
        dict(timesteps=[990, 700, 420, 200, 60, 0]),
        "ddpm",
        toy,
    ),
    "heun-clip": (
        lambda: sd15("HeunDiscreteScheduler", clip_sample=True, timestep_spacing="trailing"),
        {},
        "heun",
        toy,
    ),
    "euler-linspace-integral": (lambda: sd15("EulerDiscreteScheduler", timestep_spacing="linspace"), {}, "euler", toy),
    # a DDIM or DDPM config's clip_sample=True left in an Euler scheduler's config (from_config
    # keeps it): Euler never clips
    "euler-clip-sample-leftover": (
        lambda: diffusers.EulerDiscreteScheduler.from_config({**SD15, "clip_sample": True}),
        {},
        "euler",
        toy,
    ),
    # DPM-Solver reads variance_type only for a learned variance of an eps model
    "dpm++2m-learned-range-v": (
        lambda: pixart(variance_type="learned_range", prediction_type="v_prediction"),
        {},
        "dpm++2m",
        toy,
    ),
    "dpm++2m-fixed-small": (
        lambda: sd15("DPMSolverMultistepScheduler", variance_type="fixed_small"),
        {},
        "dpm++2m",
        toy,
    ),
    "unipc-trained-betas": (
        lambda: diffusers.UniPCMultistepScheduler(
            trained_betas=torch.linspace(2e-4, 0.03, 500).tolist(), num_train_timesteps=500
        ),
        {},
        "unipc",
        toy,
    ),
}
# where linspace lands on integer timesteps; where DDIM's trailing grid steps by T // N
# and DiT's default 250 steps, and order 3 without lower_order_final from 15 steps; SD 1.5's
# DDIM and the Euler types' fractional linspace grids at odd and even counts; σ̃_0 as the
# last point with and without the last step's order lowered (below and from 15 steps)
LINSPACE_COUNTS = (7, 13, 25, 50)
SIGMA_MIN_COUNTS = (7, 14, 15, 25)
STEPS = {
    "euler-linspace-integral": (10, 28),
    "ddim-trailing-v": (8, 25),
    "dit-ddim": (7, 250),
    "pixart-dpm++3m-no-lower-order-final": (15, 25),
    "dit-ddim-steps-offset": (30,),
    "sd15-ddim": (7, 25, 50),
    "sd15-ddim-eta": (7, 50),
    "sd15-euler-linspace": LINSPACE_COUNTS,
    "sd15-euler-ancestral-linspace": LINSPACE_COUNTS,
    "sd15-heun-linspace": LINSPACE_COUNTS,
    "sd15-dpm++2m-sigma-min": SIGMA_MIN_COUNTS,
    "sd15-dpm++3m-sigma-min": SIGMA_MIN_COUNTS,
    "sd15-dpm++2m-sigma-min-euler-at-final": (7, 14),
    "sd15-unipc-2-sigma-min": SIGMA_MIN_COUNTS,
    "sd15-unipc-3-sigma-min": SIGMA_MIN_COUNTS,
}
STOCHASTIC = (
    "dit-ddim-eta",
    "dit-ddim-eta-half",
    "sd15-dpm++2m-sde",
    "sd15-euler-ancestral",
    "sd15-ddpm",
    "sdxl-euler-ancestral",
    "pixart-dpm++2m-sde",
    "ddpm-clip-cosine",
    "ddpm-fixed-large",
    "ddpm-fixed-small-log",
    "ddpm-learned-range",
    "ddpm-custom-timesteps",
    "sd15-ddim-eta",
    "sd15-dpm++2m-sde-sigma-min",
    "sd15-euler-ancestral-linspace",
)


def _step_counts(case: str) -> tuple:
    """The step counts each case runs at: two, or none (None) where a custom grid fixes it."""
    options = CASES[case][1]
    return (None,) if "timesteps" in options or "sigmas" in options else STEPS.get(case, (7, 25))


@pytest.mark.parametrize("case, steps", [(case, steps) for case in CASES for steps in _step_counts(case)])
def test_fastguide_reproduces_the_pipeline_loop(case, steps):
    make, options, sampler, model = CASES[case]
    scheduler = make()
    settings = settings_for(scheduler, steps, **options)
    assert isinstance(settings, SamplerSettings) and settings.sampler == sampler
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    generator_seed = 7
    grid = {key: value for key, value in options.items() if key in ("timesteps", "sigmas", "mu")}
    latents, expected = run_pipeline_loop(
        scheduler, noise, model, torch.Generator().manual_seed(generator_seed), options.get("eta", 0.0), steps, **grid
    )
    assert settings.init_noise_sigma == pytest.approx(float(getattr(scheduler, "init_noise_sigma", 1.0)), rel=1e-7)
    got = fastguide.sample(
        model,
        noise.shape,
        noise=settings.initial_noise(latents),
        generator=torch.Generator().manual_seed(generator_seed),
        **settings.sample_kwargs(),
    )
    assert settings.draws_noise == (case in STOCHASTIC)
    # diffusers' ᾱ are float32 (σ̃ near t = 0 to ~1e-4 relative) and its updates run in float32:
    # the largest difference seen is 1.6e-5·max|x| (DDPM's learned range), most are ~1e-6
    torch.testing.assert_close(got, expected, atol=5e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("case", STOCHASTIC)
def test_stochastic_half_precision_loops_draw_the_pipelines_noise(case):
    # Each library's draws in float16: DPM-Solver SDE's in float32 (then cast), the others
    # in the latents' dtype. 75 elements: CPU randn gives float16 the float32 numbers only
    # at counts that are multiples of 16.
    make, options, _, model = CASES[case]
    scheduler = make()
    steps = 7
    settings = settings_for(scheduler, steps, **options)
    noise = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(3)).half()
    grid = {key: value for key, value in options.items() if key in ("timesteps", "sigmas", "mu")}
    latents, expected = run_pipeline_loop(
        scheduler, noise, model, torch.Generator().manual_seed(7), options.get("eta", 0.0), steps, **grid
    )
    got = fastguide.sample(
        model,
        noise.shape,
        noise=settings.initial_noise(latents),
        generator=torch.Generator().manual_seed(7),
        **settings.sample_kwargs(),
    )
    assert got.dtype == expected.dtype == torch.float16
    # float16 rounding of every step's update: ~3e-3·max|x| at most where the noise agrees
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-2 * expected.abs().max().item(), rtol=0)


def test_settings_for_leaves_the_scheduler_as_it_was():
    scheduler = sdxl()
    scheduler.set_timesteps(4)
    before = scheduler.timesteps.clone()
    settings_for(scheduler, 30)
    assert torch.equal(scheduler.timesteps, before) and scheduler.num_inference_steps == 4


def test_settings_name_diffusers_grid_and_schedule():
    settings = settings_for(sdxl(), 30)
    scheduler = sdxl()
    scheduler.set_timesteps(30)
    assert settings.steps == tuple(int(t) for t in scheduler.timesteps.tolist())
    assert torch.equal(settings.schedule.betas.float(), scheduler.betas)  # diffusers' own, held in float64
    # the σ̃-space latents: x_T = α₀·x̃_T, the α of the first timestep (958 for 30 leading steps, offset 1)
    assert settings.steps[0] == 958
    assert settings.latent_scale == pytest.approx(math.sqrt(settings.schedule.alpha_bar(958)), rel=1e-6)
    flow = settings_for(sd3(), 28)
    assert flow.schedule.is_flow and flow.schedule.shift == 3.0 and flow.steps[0] == 1000.0
    assert flow.latent_scale == 1.0 and flow.prediction_type == "flow_prediction"


def test_the_module_does_not_import_diffusers():
    code = "import sys, fastguide.pipelines.schedulers; print('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# scheduler factory, settings_for's keyword arguments, the option named, a phrase of the reason
REFUSALS = [
    (lambda: diffusers.PNDMScheduler.from_config(SD15), {}, None, "pseudo linear multistep"),
    (lambda: sd15("LMSDiscreteScheduler"), {}, None, "no fastguide sampler reproduces"),
    (lambda: sd15("KDPM2DiscreteScheduler"), {}, None, "fractional time"),
    (lambda: dit(set_alpha_to_one=False), {}, "set_alpha_to_one=False", "alphas_cumprod[0] = 0.9999, its own noise"),
    (lambda: dit(clip_sample=True), {}, "clip_sample=True", "unclipped eps"),
    (lambda: dit(timestep_spacing="linspace"), {}, "timestep_spacing='linspace'", "t − T // N"),
    (
        lambda: dit(timestep_spacing="trailing"),
        dict(num_inference_steps=30),
        "timestep_spacing='trailing'",
        "t − T // N",
    ),
    (dit, dict(eta=1.5), "eta=1.5", "η in [0, 1]"),
    (lambda: dit(thresholding=True), {}, "thresholding=True", "dynamic thresholding"),
    (lambda: dit(rescale_betas_zero_snr=True), {}, "rescale_betas_zero_snr=True", "ᾱ = 0"),
    (dit, dict(timesteps=[999, 500, 0]), "timesteps=[999, 500, 0]", "takes no timesteps"),
    (lambda: diffusers.DDPMScheduler(variance_type="learned"), {}, "variance_type='learned'", "raw variance"),
    (
        lambda: sd15("DDPMScheduler", variance_type="fixed_large"),
        {},
        "variance_type='fixed_large'",
        "ends at t = 1 > 0",
    ),
    (lambda: diffusers.DDPMScheduler(clip_sample_range=2.0), {}, "clip_sample_range=2.0", "[−1, 1]"),
    (
        lambda: sd15("EulerDiscreteScheduler", trained_betas=torch.linspace(2e-4, 0.03, 500).tolist()),
        {},
        "trained_betas='<500 values>'",
        "num_train_timesteps is 1000",
    ),
    (
        lambda: sd15("DPMSolverMultistepScheduler", use_karras_sigmas=True),
        {},
        "use_karras_sigmas=True",
        "between the schedule's integer timesteps",
    ),
    (lambda: sd15("DPMSolverMultistepScheduler", use_lu_lambdas=True), {}, "use_lu_lambdas=True", "between"),
    (
        lambda: pixart(final_sigmas_type="sigma_min", lower_order_final=False),
        dict(num_inference_steps=10),
        "lower_order_final=False",
        "keeps order 2 at the last step",
    ),
    (
        lambda: pixart(final_sigmas_type="sigma_min", euler_at_final=True),
        {},
        "euler_at_final=True",
        "lowers the last step to the first order",
    ),
    (lambda: pixart(solver_type="heun"), {}, "solver_type='heun'", "midpoint"),
    (lambda: pixart(algorithm_type="sde-dpmsolver++", solver_order=3), {}, "solver_order=3", "dpm++2m-sde"),
    (lambda: pixart(algorithm_type="sde-dpmsolver++", solver_order=1), {}, "solver_order=1", "dpm++2m-sde"),
    (
        lambda: pixart(solver_order=3, lower_order_final=False),
        dict(num_inference_steps=10),
        "lower_order_final=False",
        "third order at the step before the last",
    ),
    (lambda: pixart(use_flow_sigmas=True, prediction_type="flow_prediction"), {}, "use_flow_sigmas=True", "⌊T·σ⌋"),
    (lambda: pixart(variance_type="learned_range"), {}, "variance_type='learned_range'", "model_output[:, :3]"),
    (lambda: pixart(prediction_type="flow_prediction"), {}, "prediction_type='flow_prediction'", "maps to fastguide"),
    (lambda: sd15("UniPCMultistepScheduler", solver_type="bh1"), {}, "solver_type='bh1'", "bh2"),
    (lambda: sd15("UniPCMultistepScheduler", predict_x0=False), {}, "predict_x0=False", "data-prediction"),
    (lambda: sd15("UniPCMultistepScheduler", disable_corrector=[0]), {}, "disable_corrector=[0]", "every step"),
    (lambda: sd15("UniPCMultistepScheduler", lower_order_final=False), {}, "lower_order_final=False", "keeps order p"),
    (lambda: sd15("UniPCMultistepScheduler", solver_order=4), {}, "solver_order=4", "1, 2 and 3"),
    (
        lambda: sd15("EulerDiscreteScheduler", final_sigmas_type="sigma_min"),
        dict(num_inference_steps=25),
        "final_sigmas_type='sigma_min'",
        "σ̃-space latents",
    ),
    (lambda: sdxl(use_karras_sigmas=True), {}, "use_karras_sigmas=True", "between"),
    (lambda: sdxl(use_exponential_sigmas=True), {}, "use_exponential_sigmas=True", "between"),
    (lambda: sdxl(interpolation_type="log_linear"), {}, "interpolation_type='log_linear'", "log-uniformly"),
    (lambda: sdxl(final_sigmas_type="sigma_min"), {}, "final_sigmas_type='sigma_min'", "σ̃-space latents"),
    (
        lambda: sdxl(timestep_type="continuous", prediction_type="v_prediction"),
        {},
        "timestep_type='continuous'",
        "¼·log σ̃",
    ),
    # diffusers places custom σ's at times of log-linearly interpolated log σ̃
    (sdxl, dict(sigmas=[14.6, 5.0, 1.0, 0.1, 0.0]), "sigmas=[14.6, 5.0, 1.0, 0.1, 0.0]", "interpolated linearly in t"),
    (
        lambda: sdxl("EulerAncestralDiscreteScheduler", prediction_type="sample"),
        {},
        "prediction_type='sample'",
        "maps to fastguide",
    ),
    (
        lambda: sd15("HeunDiscreteScheduler", clip_sample=True, clip_sample_range=3.0),
        {},
        "clip_sample_range=3.0",
        "[−1, 1]",
    ),
    (
        lambda: sdxl("EulerAncestralDiscreteScheduler"),
        dict(generator_in_step=False),
        "generator_in_step=False",
        "global RNG",
    ),
    (lambda: sd3(use_dynamic_shifting=True), {}, "use_dynamic_shifting=True", "pass the mu"),
    (lambda: sd3(stochastic_sampling=True), {}, "stochastic_sampling=True", "renoises"),
    (lambda: sd3(invert_sigmas=True), {}, "invert_sigmas=True", "from 0 to 1"),
    (sd3, dict(sigmas=[1.0, 0.5, 0.2], timesteps=[900.0, 500.0, 100.0]), "timesteps= and sigmas=", "one of them"),
    (sd3, dict(timesteps=[900.0, 500.0, 100.0]), "timesteps=[900.0, 500.0, 100.0]", "fastguide's flow time is T·σ"),
    (lambda: sd3("FlowMatchHeunDiscreteScheduler"), dict(mu=0.5), "mu=0.5", "takes no mu"),
    (sd3, dict(sigmas=[]), "sigmas=[]", "no steps"),
    # a β of 0 (or a trained table ending in 1): diffusers runs it, fastguide's schedule cannot hold it
    (lambda: sd15("DPMSolverMultistepScheduler", beta_start=0.0), {}, None, "refuses its betas"),
]


@pytest.mark.parametrize(
    "make, options, option, reason", REFUSALS, ids=[f"{i}-{r[2] or 'class'}" for i, r in enumerate(REFUSALS)]
)
def test_unreproducible_schedulers_are_refused_with_the_option_and_reason(make, options, option, reason):
    scheduler = make()
    # An older diffusers (before 0.35) may lack the option: a config option it does not know
    # sets nothing to refuse; a set_timesteps argument it does not take is refused as such.
    name = (option or "").split("=")[0]
    older = release("diffusers") < (0, 35)
    passed_alone = set(options) == {name} and name in ("timesteps", "sigmas", "mu")  # set_timesteps' own
    if older and passed_alone and name not in inspect.signature(scheduler.set_timesteps).parameters:
        reason = f"takes no {name}"
    elif older and "=" in (option or "") and name not in options and name not in scheduler.config:
        pytest.skip(f"{type(scheduler).__name__} of diffusers {diffusers.__version__} has no option {name}")
    options = {"num_inference_steps": 20, **options}
    steps = None if "timesteps" in options or "sigmas" in options else options["num_inference_steps"]
    options.pop("num_inference_steps")
    with pytest.raises(UnsupportedScheduler) as raised:
        settings_for(scheduler, steps, **options)
    assert raised.value.option == option
    assert reason in raised.value.reason and isinstance(raised.value, ValueError)
    assert type(scheduler).__name__ in str(raised.value)


@pytest.mark.parametrize("kind", ["EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"])
def test_options_a_scheduler_does_not_take_are_not_refused(kind):
    # from_config keeps them (a DPM-Solver's use_karras_sigmas and final_sigmas_type, a DDPM's
    # thresholding), the class never reads them: the same settings as without them.
    plain = settings_for(getattr(diffusers, kind).from_config(SD15), 20)
    got = settings_for(with_leftovers(kind), 20)
    assert got.schedule.cache_key == plain.schedule.cache_key
    assert dataclasses.replace(got, schedule=None) == dataclasses.replace(plain, schedule=None)


def test_dpm_solver_3m_lower_order_final_is_irrelevant_from_15_steps():
    # diffusers lowers the step before the last only below 15 steps: above, the flag changes nothing
    settings = settings_for(pixart(solver_order=3, lower_order_final=False), 15)
    assert settings.sampler == "dpm++3m"


def test_refusals_of_diffusers_own_errors_say_so():
    with pytest.raises(UnsupportedScheduler, match="set_timesteps.*fails"):
        settings_for(dit(), 2000)


def test_sd15_swaps_name_their_last_step_and_fractional_times():
    # DDIM from SD 1.5's config: leading + steps_offset 1 ends at t = 1, then lands at timestep 0's ᾱ
    ddim = settings_for(sd15("DDIMScheduler"), 50)
    assert ddim.steps[-1] == 1 and ddim.final_timestep == 0 and ddim.sample_kwargs()["final_timestep"] == 0
    assert settings_for(sd15("DDIMScheduler", set_alpha_to_one=True), 50).final_timestep == -1
    assert settings_for(dit(steps_offset=35), 30).final_timestep == 2  # t − T // N = 35 − 33
    assert settings_for(sd15("UniPCMultistepScheduler", final_sigmas_type="sigma_min"), 20).final_timestep == 0
    # the Euler types' linspace: diffusers' float32 times, fractional ones as floats, integral ones as ints
    euler = settings_for(sd15("EulerDiscreteScheduler"), 25)
    scheduler = sd15("EulerDiscreteScheduler")
    scheduler.set_timesteps(25)
    assert list(euler.steps) == scheduler.timesteps.tolist() and euler.final_timestep == -1
    assert euler.steps[:3] == (999, 957.375, 915.75) and type(euler.steps[0]) is int and euler.steps[-1] == 0
    assert euler.schedule.model_time_dtype(euler.steps) == torch.float32
    assert settings_for(sd15("EulerDiscreteScheduler"), 10).steps == (999, 888, 777, 666, 555, 444, 333, 222, 111, 0)


@pytest.mark.parametrize("kind", ["EulerDiscreteScheduler", "HeunDiscreteScheduler"])
def test_the_model_gets_diffusers_float32_times_on_a_linspace_grid(kind):
    scheduler = sd15(kind)
    settings = settings_for(scheduler, 13)
    theirs, ours = [], []
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run_pipeline_loop(scheduler, noise, lambda x, t: theirs.append(t) or toy(x, t), None, 0.0, 13)
    fastguide.sample(lambda x, t: ours.append(t) or toy(x, t), noise.shape, noise=noise, **settings.sample_kwargs())
    assert len(ours) == len(theirs) == (25 if kind == "HeunDiscreteScheduler" else 13)
    assert all(t.dtype == torch.float32 for t in ours + theirs)
    assert torch.equal(torch.cat(ours), torch.cat(theirs))


def test_euler_sigma_min_is_refused_for_its_sigma_space_latents():
    """Why final_sigmas_type="sigma_min" stays refused for the Euler types: the trajectory is
    fastguide's with final_timestep=0, but diffusers returns x̃ = x/α_0 there."""
    scheduler = sd15("EulerDiscreteScheduler", timestep_spacing="leading", final_sigmas_type="sigma_min")
    settings = settings_for(sd15("EulerDiscreteScheduler", timestep_spacing="leading"), 9)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    latents, expected = run_pipeline_loop(scheduler, noise, toy, None, 0.0, 9)
    kwargs = {**settings.sample_kwargs(), "final_timestep": 0}
    got = fastguide.sample(toy, noise.shape, noise=settings.initial_noise(latents), **kwargs)
    alpha_0 = math.sqrt(settings.schedule.alpha_bar(0))
    torch.testing.assert_close(got / alpha_0, expected, atol=5e-5 * expected.abs().max().item(), rtol=0)
    assert (got - expected).abs().max() > 1e-4 * expected.abs().max()
    with pytest.raises(UnsupportedScheduler, match="σ̃-space"):
        settings_for(scheduler, 9)

"""fastguide.accelerate(pipe) on diffusers pipelines built tiny from configs with random
weights (no downloads; prompt embeddings passed directly, as the pipelines accept): the
same latents as the original pipeline to float rounding, with the fused step running;
diffusers' own loop, with the reason kept, where fastguide cannot reproduce a call."""

from __future__ import annotations

import copy
import logging
import pickle
import warnings

import pytest
import torch

import fastguide

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # the pipelines' modules import their text encoders' classes

LATENT = (2, 4, 8, 8)  # two images of 16×16 pixels through a VAE that halves the size


def _vae():
    return diffusers.AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=32,
    ).eval()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SD_SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing="leading"),
    "dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(**SD_BETAS),
    "euler": lambda: diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading"),
}


def stable_diffusion(scheduler, cls_name="StableDiffusionPipeline", **options):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
        attention_head_dim=8,
    ).eval()
    pipe = getattr(diffusers, cls_name)(
        vae=_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **options,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_CALL = dict(
    prompt_embeds=_randn(2, 7, 32, seed=1),
    negative_prompt_embeds=_randn(2, 7, 32, seed=2),
    latents=_randn(*LATENT, seed=3),
    num_inference_steps=8,
    guidance_scale=5.0,
    output_type="latent",
)


def stable_diffusion_xl(cls_name="StableDiffusionXLPipeline", **options):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ).eval()
    pipe = getattr(diffusers, cls_name)(
        vae=_vae(),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=False,
        **options,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_CALL = dict(
    prompt_embeds=_randn(2, 7, 64, seed=1),
    negative_prompt_embeds=_randn(2, 7, 64, seed=2),
    pooled_prompt_embeds=_randn(2, 32, seed=4),
    negative_pooled_prompt_embeds=_randn(2, 32, seed=5),
    latents=_randn(*LATENT, seed=3),
    num_inference_steps=8,
    guidance_scale=5.0,
    height=16,
    width=16,
    guidance_rescale=0.5,
    output_type="latent",
)


def stable_diffusion_3(cls_name="StableDiffusion3Pipeline", **options):
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
    ).eval()
    pipe = getattr(diffusers, cls_name)(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        **options,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD3_CALL = dict(
    prompt_embeds=_randn(2, 7, 32, seed=1),
    negative_prompt_embeds=_randn(2, 7, 32, seed=2),
    pooled_prompt_embeds=_randn(2, 64, seed=4),
    negative_pooled_prompt_embeds=_randn(2, 64, seed=5),
    latents=_randn(*LATENT, seed=3),
    num_inference_steps=8,
    guidance_scale=5.0,
    height=16,
    width=16,
    output_type="latent",
)


def pixart(cls_name):
    torch.manual_seed(0)
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    pipe = getattr(diffusers, cls_name)(
        tokenizer=None,
        text_encoder=None,
        vae=_vae(),
        transformer=transformer,
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIXART_CALL = dict(
    prompt_embeds=_randn(2, 7, 32, seed=1),
    negative_prompt_embeds=_randn(2, 7, 32, seed=2),
    prompt_attention_mask=torch.ones(2, 7),
    negative_prompt_attention_mask=torch.ones(2, 7),
    negative_prompt=None,
    latents=_randn(*LATENT, seed=3),
    num_inference_steps=8,
    guidance_scale=4.5,
    height=16,
    width=16,
    use_resolution_binning=False,
    output_type="latent",
)


def dit(scheduler):
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        num_embeds_ada_norm=1000,
    ).eval()  # eval: training drops labels at random
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_vae(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {  # name: (build the pipeline, its call) — the call's images are latents, or DiT's decoded images
    **{f"sd-{name}": (lambda make=make: stable_diffusion(make()), SD_CALL) for name, make in SD_SCHEDULERS.items()},
    "sd-rescale-no-negative-cfg": (
        lambda: stable_diffusion(SD_SCHEDULERS["unipc"]()),
        {**SD_CALL, "guidance_rescale": 0.7},
    ),
    "sd-unguided": (lambda: stable_diffusion(SD_SCHEDULERS["dpm++2m"]()), {**SD_CALL, "guidance_scale": 1.0}),
    "sdxl-euler": (stable_diffusion_xl, SDXL_CALL),
    "sd3-flow-euler": (stable_diffusion_3, SD3_CALL),
    "pixart-alpha": (lambda: pixart("PixArtAlphaPipeline"), PIXART_CALL),
    "pixart-sigma": (lambda: pixart("PixArtSigmaPipeline"), PIXART_CALL),
    "sd-pag": (
        lambda: stable_diffusion(
            SD_SCHEDULERS["dpm++2m"](), "StableDiffusionPAGPipeline", pag_applied_layers=["mid", "up_blocks.1"]
        ),
        {**SD_CALL, "pag_scale": 2.0, "guidance_rescale": 0.3},
    ),
    "sd-pag-no-cfg": (
        lambda: stable_diffusion(SD_SCHEDULERS["ddim"](), "StableDiffusionPAGPipeline"),
        {**SD_CALL, "pag_scale": 1.5, "guidance_scale": 1.0},
    ),
    "sdxl-pag": (
        lambda: stable_diffusion_xl("StableDiffusionXLPAGPipeline", pag_applied_layers=["down_blocks.1"]),
        {**SDXL_CALL, "pag_scale": 2.5},
    ),
    "sd3-pag": (
        lambda: stable_diffusion_3("StableDiffusion3PAGPipeline", pag_applied_layers=["blocks.1"]),
        {**SD3_CALL, "pag_scale": 2.0},
    ),
    "sd3-skip-layer-guidance": (
        stable_diffusion_3,
        {**SD3_CALL, "skip_guidance_layers": [1, 2], "skip_layer_guidance_start": 0.1, "skip_layer_guidance_stop": 0.6},
    ),
    # diffusers skips the listed blocks the transformer has and ignores the others (7, -1)
    "sd3-skip-layer-guidance-missing-blocks": (
        stable_diffusion_3,
        {**SD3_CALL, "skip_guidance_layers": [1, 7, -1], "skip_layer_guidance_start": 0.1},
    ),
    "dit-ddim": (
        lambda: dit(diffusers.DDIMScheduler(clip_sample=False)),
        dict(class_labels=[1, 7], num_inference_steps=8, guidance_scale=4.0, output_type="pt"),
    ),
    "dit-dpm++2m": (
        lambda: dit(diffusers.DPMSolverMultistepScheduler()),
        dict(class_labels=[3, 999], num_inference_steps=8, guidance_scale=4.0, output_type="pt"),
    ),
}


def _images(pipe, call: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)  # DiT draws its latents from it
    # (DiT's output_type="pt" images come as a numpy (B, H, W, C) before diffusers 0.41)
    return torch.as_tensor(pipe(**call, generator=generator).images)


@pytest.mark.parametrize("version, tensors", [("0.40.1", False), ("0.41.0", True), ("1.2.0.dev0", True)])
def test_dit_images_come_in_the_form_the_installed_diffusers_gives(monkeypatch, version, tensors):
    # DiTPipeline returns output_type="pt" as a (B, C, H, W) tensor from diffusers 0.41 and
    # as a numpy (B, H, W, C) before: the accelerated pipeline follows the installed release.
    make, call = CASES["dit-ddim"]
    monkeypatch.setattr(diffusers, "__version__", version)
    images = fastguide.accelerate(make())(**call, generator=torch.Generator().manual_seed(11)).images
    assert isinstance(images, torch.Tensor) == tensors
    assert images.shape == ((2, 3, 16, 16) if tensors else (2, 16, 16, 3))


@pytest.mark.parametrize("case", CASES)
def test_accelerated_pipeline_gives_the_originals_latents(case):
    make, call = CASES[case]
    original = make()
    expected = _images(original, call)
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    assert type(accelerated).__name__ == type(original).__name__ and isinstance(accelerated, type(original))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        got = _images(accelerated, call)
    assert accelerated.fastguide_fallback is None
    assert any(event.key == "fastguide::guided_step" for event in profile.key_averages())
    for state in ("num_timesteps", "pag_scale"):  # the pipeline's state after a call, as diffusers leaves it
        if hasattr(type(original), state):
            assert getattr(accelerated, state) == getattr(original, state)
    # float rounding relative to the latents' size (random weights grow them to O(100))
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


def _close(got, expected):
    """float rounding relative to the latents' size (random weights grow them to O(100))"""
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


def _changed_after_construction(name):
    if name == "steps_offset set by the pipeline":  # StableDiffusionPipeline sets it to 1 in its config
        return stable_diffusion(
            diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        )
    pipe = stable_diffusion(diffusers.EulerDiscreteScheduler(**SD_BETAS))
    pipe.scheduler.register_to_config(timestep_spacing="trailing")  # an option left at its default ("linspace")
    return pipe


@pytest.mark.parametrize("name", ["steps_offset set by the pipeline", "register_to_config"])
def test_a_scheduler_config_changed_after_construction_is_followed(name):
    original = _changed_after_construction(name)
    expected = _images(original, SD_CALL)
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    got = _images(accelerated, SD_CALL)
    assert accelerated.fastguide_fallback is None
    _close(got, expected)


STOCHASTIC = {
    "ddim-eta": (lambda: SD_SCHEDULERS["ddim"](), {"eta": 0.7}),
    "euler-ancestral": (lambda: diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS), {}),
    "dpm++2m-sde": (lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="sde-dpmsolver++"), {}),
    # "leading" with steps_offset ends at t = 1, where diffusers' DDPM still draws
    "ddpm-ends-above-0": (lambda: diffusers.DDPMScheduler(**SD_BETAS, timestep_spacing="leading"), {}),
}


@pytest.mark.parametrize("global_rng", [False, True], ids=["generator", "no generator"])
@pytest.mark.parametrize("case", STOCHASTIC)
def test_a_stochastic_call_leaves_the_generator_where_diffusers_does(case, global_rng):
    """diffusers also draws the noise its last step multiplies by 0: a second call from the
    same generator (its latents drawn from it), or without one from the global RNG, starts
    where diffusers' would."""
    make, extra = STOCHASTIC[case]
    original = stable_diffusion(make())
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    call = {**SD_CALL, **extra, "latents": None, "num_inference_steps": 4}
    results = {}
    for name, pipe in (("diffusers", original), ("fastguide", accelerated)):
        if global_rng:
            torch.manual_seed(0)
            results[name] = [pipe(**call).images for _ in range(2)], torch.get_rng_state()
            continue
        generator = torch.Generator().manual_seed(0)
        results[name] = [pipe(**call, generator=generator).images for _ in range(2)], generator.get_state()
    assert accelerated.fastguide_fallback is None
    (expected, state), (got, got_state) = results["diffusers"], results["fastguide"]
    for a, b in zip(got, expected):
        _close(a, b)
    assert torch.equal(got_state, state)


def test_float64_latents_with_the_sde_solver_run_diffusers_loop():
    # diffusers' DPM-Solver SDE draws its noise in float32 whatever the latents; fastguide's
    # loop draws float64 noise for float64 latents (as k-diffusion): other noise, other images
    make, extra = STOCHASTIC["dpm++2m-sde"]
    original = stable_diffusion(make()).to(torch.float64)
    call = {**SD_CALL, **extra, "latents": None, "num_inference_steps": 4}
    call = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    expected = _images(original, call)
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    got = _images(accelerated, call)
    assert "draws its noise in float32" in accelerated.fastguide_fallback
    _close(got, expected)


def test_outputs_keep_the_pipelines_types():
    pipe = fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["dpm++2m"]()))
    call = {**SD_CALL, "num_inference_steps": 3}
    images = pipe(**{**call, "output_type": "pil"}).images
    assert len(images) == 2 and type(images[0]).__name__ == "Image"
    image, nsfw = pipe(**{**call, "output_type": "np"}, return_dict=False)
    assert image.shape == (2, 16, 16, 3) and nsfw is None


def test_pag_attention_processors_a_user_set_run_diffusers_loop():
    # set_pag_applied_layers(..., pag_attn_processors=...) perturbs the way those processors
    # do, not by fastguide's identity map: the call falls back, and equals diffusers'.
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Unperturbed(AttnProcessor2_0):
        pass

    make, call = CASES["sd-pag"]
    original = make()
    original.set_pag_applied_layers(["mid"], pag_attn_processors=(Unperturbed(), Unperturbed()))
    expected = _images(original, call)
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    got = _images(accelerated, call)
    assert "PAG attention processors other than diffusers' PAGCFGIdentitySelfAttnProcessor2_0" in (
        accelerated.fastguide_fallback
    )
    assert "Unperturbed, Unperturbed" in accelerated.fastguide_fallback
    _close(got, expected)
    # The pipeline's own processors again: fastguide runs the call.
    accelerated.set_pag_applied_layers(["mid"])
    _images(accelerated, call)
    assert accelerated.fastguide_fallback is None


def test_what_fastguide_cannot_reproduce_runs_diffusers_loop_and_says_why(caplog):
    pndm = stable_diffusion(diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True))
    expected = _images(pndm, SD_CALL)
    accelerated = fastguide.accelerate(copy.deepcopy(pndm))
    with caplog.at_level(logging.INFO, logger="fastguide.pipelines"):
        got = _images(accelerated, SD_CALL)
    assert "PNDMScheduler" in accelerated.fastguide_fallback and "PNDMScheduler" in caplog.text
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)

    pipe = fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["ddim"]()))
    seen = []
    pipe(**SD_CALL, callback_on_step_end=lambda p, i, t, kwargs: seen.append(i) or kwargs)
    assert "callback_on_step_end=" in pipe.fastguide_fallback and seen == list(range(8))
    _images(pipe, SD_CALL)
    assert pipe.fastguide_fallback is None  # the next call that fastguide can run, it runs
    # An empty custom schedule: diffusers' loop runs no step; fastguide's refusal says so.
    euler = fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["euler"]()))
    call = {key: value for key, value in SD_CALL.items() if key != "num_inference_steps"}
    got = _images(euler, {**call, "sigmas": [14.6]})
    assert "no steps" in euler.fastguide_fallback and torch.isfinite(got).all()


def test_fastguides_own_sampler_and_guidance_are_options():
    original = stable_diffusion(SD_SCHEDULERS["ddim"]())
    reproduced = _images(fastguide.accelerate(copy.deepcopy(original)), SD_CALL)
    own = fastguide.accelerate(
        copy.deepcopy(original),
        sampler="dpm++2m",
        spacing="karras",
        guidance=fastguide.CFG(5.0, apg=fastguide.APG(eta=0.0)),
    )
    with pytest.warns(UserWarning, match=r"guidance_scale= of this StableDiffusionPipeline call have no effect"):
        got = _images(own, SD_CALL)
    assert own.fastguide_fallback is None and not torch.allclose(got, reproduced)
    # the same as fastguide.sample on the pipeline's UNet, its schedule's betas and its embeddings
    expected = fastguide.sample(
        lambda x, t, **kwargs: own.unet(x, t, return_dict=False, **kwargs)[0],
        LATENT,
        noise=SD_CALL["latents"],
        cond={"encoder_hidden_states": SD_CALL["prompt_embeds"]},
        uncond={"encoder_hidden_states": SD_CALL["negative_prompt_embeds"]},
        guidance=fastguide.CFG(5.0, apg=fastguide.APG(eta=0.0)),
        sampler="dpm++2m",
        spacing="karras",
        steps=8,
        schedule=fastguide.NoiseSchedule(original.scheduler.betas.double()),
        clip_denoised=False,
    )
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["pixart-alpha", "dit-dpm++2m", "sd3-flow-euler"])
def test_a_block_cache_reaches_an_accelerated_pipelines_transformer(case, monkeypatch):
    """cache=FirstBlockCache(t): exact where it never reuses; where it does, the transformer's
    blocks run fewer rows, and the loop's count says how many."""
    make, call = CASES[case]
    plain = _images(fastguide.accelerate(make()), call)
    never = fastguide.accelerate(make(), cache=fastguide.FirstBlockCache(threshold=1e-30))
    assert torch.equal(_images(never, call), plain)
    rows = []
    attention = diffusers.models.attention
    block_class = attention.JointTransformerBlock if case.startswith("sd3") else attention.BasicTransformerBlock
    forward = block_class.forward
    monkeypatch.setattr(
        block_class,
        "forward",
        lambda self, hidden_states, *a, **k: rows.append(len(hidden_states)) or forward(self, hidden_states, *a, **k),
    )
    cached = fastguide.accelerate(make(), cache=fastguide.FirstBlockCache(threshold=10.0))
    got = _images(cached, call)
    assert cached.fastguide_fallback is None and torch.isfinite(got).all()
    blocks = len(cached.transformer.transformer_blocks)
    assert 0 < sum(rows) < blocks * 2 * 2 * call["num_inference_steps"]


@pytest.mark.parametrize(
    "make, call",
    [(lambda: stable_diffusion(SD_SCHEDULERS["ddim"]()), SD_CALL), (stable_diffusion_xl, SDXL_CALL)],
    ids=["sd", "sdxl"],
)
def test_a_block_cache_reaches_an_accelerated_pipelines_unet(make, call):
    """A UNet2DConditionModel's blocks after its first down block are skipped on reused calls
    (exact where it never reuses)."""
    plain = _images(fastguide.accelerate(make()), call)
    never = fastguide.accelerate(make(), cache=fastguide.FirstBlockCache(threshold=1e-30))
    assert torch.equal(_images(never, call), plain)
    cached = fastguide.accelerate(make(), cache=fastguide.FirstBlockCache(threshold=10.0))
    mid_runs = []
    cached.unet.mid_block.resnets[0].register_forward_hook(lambda *args: mid_runs.append(1))
    got = _images(cached, call)
    assert cached.fastguide_fallback is None and torch.isfinite(got).all() and not torch.equal(got, plain)
    assert 0 < len(mid_runs) < call["num_inference_steps"]


def test_a_forecast_cache_on_sd3s_joint_blocks():
    """Both streams pass through a forecast call's joint blocks; the last, which drops the
    context stream, returns (None, h₀ + R̂) as it would return (None, h)."""
    plain = _images(fastguide.accelerate(stable_diffusion_3()), SD3_CALL)
    never = fastguide.accelerate(stable_diffusion_3(), cache=fastguide.ForecastCache(every=2, warmup=100))
    assert torch.equal(_images(never, SD3_CALL), plain)
    forecast = _images(fastguide.accelerate(stable_diffusion_3(), cache=fastguide.ForecastCache(every=2)), SD3_CALL)
    assert torch.isfinite(forecast).all() and not torch.equal(forecast, plain)
    assert (forecast - plain).abs().mean() < plain.abs().mean()


def test_accelerate_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="apply to a diffusers pipeline"):
        fastguide.accelerate(torch.nn.Linear(2, 2), sampler="unipc")
    with pytest.raises(TypeError, match="torch.nn.Module or a diffusers pipeline"):
        fastguide.accelerate(object())
    pipe = stable_diffusion(SD_SCHEDULERS["ddim"]())
    with pytest.raises(TypeError, match="guidance must be a fastguide Guidance"):
        fastguide.accelerate(pipe, guidance=7.5)
    with pytest.raises(ValueError, match="spacing= places fastguide's own sampler's steps"):
        fastguide.accelerate(pipe, spacing="karras")
    with pytest.raises(TypeError, match="cache must be a fastguide.FirstBlockCache"):
        fastguide.accelerate(pipe, cache=0.1)
    with pytest.raises(ValueError, match="sampler must be one of"):
        fastguide.accelerate(pipe, sampler="bogus")
    with pytest.raises(ValueError, match="spacing must be one of"):
        fastguide.accelerate(pipe, sampler="unipc", spacing="bogus")


@pytest.mark.gpu
def test_a_graphed_pipeline_on_cuda_gives_the_originals_latents():
    original = stable_diffusion(SD_SCHEDULERS["dpm++2m"]()).to("cuda")
    call = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in SD_CALL.items()}
    expected = original(**call).images
    graphed = fastguide.accelerate(copy.deepcopy(original), cuda_graph=True)
    for _ in range(2):  # the first call captures the loop, the second replays it
        got = graphed(**call).images
        assert graphed.fastguide_fallback is None
        torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    "case, make, call",
    [
        # a deterministic sampler takes its noise from the latents only: a list of generators is fine
        ("generator list", lambda: stable_diffusion(SD_SCHEDULERS["dpm++2m"]()), {**SD_CALL, "latents": None}),
        # the PAG pipeline defaults each side on its own (768 x default), the plain one both at once
        (
            "pag default width",
            lambda: stable_diffusion(SD_SCHEDULERS["ddim"](), "StableDiffusionPAGPipeline"),
            {**SD_CALL, "latents": None, "height": 32, "width": None, "pag_scale": 1.0},
        ),
        (
            "plain default size",
            lambda: stable_diffusion(SD_SCHEDULERS["ddim"]()),
            {**SD_CALL, "latents": None, "height": 32, "width": None},
        ),
        # one step inside the skip-layer window (6 steps, 0.01 < i/6 < 0.2: i = 1 only)
        (
            "skip-layer window of one step",
            stable_diffusion_3,
            {**SD3_CALL, "num_inference_steps": 6, "skip_guidance_layers": [1]},
        ),
    ],
)
def test_edge_calls_give_the_originals_latents(case, make, call):
    generators = lambda: [torch.Generator().manual_seed(seed) for seed in (5, 6)]  # noqa: E731
    original = make()
    expected = original(**call, generator=generators()).images
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    got = accelerated(**call, generator=generators()).images
    assert accelerated.fastguide_fallback is None and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


def test_a_list_of_one_generator_is_that_generator_for_a_noise_drawing_sampler():
    # diffusers' randn_tensor takes [g] as g; the call fell back ("a list of generators")
    original = stable_diffusion(diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS))
    call = {**SD_CALL, "prompt_embeds": SD_CALL["prompt_embeds"][:1]}
    call["negative_prompt_embeds"] = SD_CALL["negative_prompt_embeds"][:1]
    call["latents"] = SD_CALL["latents"][:1]
    expected_generator = torch.Generator().manual_seed(3)
    expected = original(**call, generator=[expected_generator]).images
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    generator = torch.Generator().manual_seed(3)
    got = accelerated(**call, generator=[generator]).images
    assert accelerated.fastguide_fallback is None
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)
    assert torch.equal(generator.get_state(), expected_generator.get_state())


def test_a_hooked_denoiser_runs_the_loop_without_graphs():
    # A hook that acts at each forward (CPU offloading, diffusers' caches) never runs in a
    # replay: cuda_graph=True is not applied, with a warning (on CPU, where graphs cannot
    # run, the call would refuse them otherwise).
    hooks = pytest.importorskip("diffusers.hooks")

    class Offloading(hooks.ModelHook):
        pass

    original = stable_diffusion(SD_SCHEDULERS["ddim"]())
    expected = original(**SD_CALL).images
    accelerated = fastguide.accelerate(copy.deepcopy(original), cuda_graph=True)
    hooks.HookRegistry.check_if_exists_or_initialize(accelerated.unet.down_blocks[0]).register_hook(
        Offloading(), "offload"
    )
    with pytest.warns(UserWarning, match="cuda_graph=True not applied: diffusers' Offloading on"):
        got = accelerated(**SD_CALL).images
    assert accelerated.fastguide_fallback is None
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


def test_calls_and_classes_no_recipe_follows_are_left_to_diffusers():
    pixart_alpha = pixart("PixArtAlphaPipeline")
    pixart_alpha.scheduler = diffusers.DDIMScheduler()  # its step returns the x0 diffusers takes at one step
    pixart_alpha = fastguide.accelerate(pixart_alpha)
    pixart_alpha(**{**PIXART_CALL, "num_inference_steps": 1})
    assert "one step on PixArtAlphaPipeline" in pixart_alpha.fastguide_fallback
    pixart_alpha.scheduler = diffusers.EulerDiscreteScheduler()  # (takes custom timesteps)
    pixart_alpha(**{**PIXART_CALL, "timesteps": [901]})  # one step, whatever num_inference_steps says
    assert "one step on PixArtAlphaPipeline" in pixart_alpha.fastguide_fallback

    class Custom(diffusers.StableDiffusionPipeline):
        def __call__(self, *args, **kwargs):  # code no recipe knows
            return super().__call__(*args, **kwargs)

    pipe = stable_diffusion(SD_SCHEDULERS["ddim"]())
    pipe.__class__ = Custom
    with pytest.raises(TypeError, match="a diffusers pipeline of"):
        fastguide.accelerate(pipe)


def test_fastguides_own_sampler_starts_from_unit_noise_whatever_the_previous_call():
    # An Euler scheduler's init_noise_sigma depends on the steps of the last set_timesteps:
    # x_T must be read with this call's, not the previous call's.
    make = lambda: fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["euler"]()), sampler="unipc")  # noqa: E731
    call = {**SD_CALL, "latents": None}
    fresh = _images(make(), call)
    reused = make()
    _images(reused, {**call, "num_inference_steps": 3})
    torch.testing.assert_close(_images(reused, call), fresh, atol=0, rtol=0)


@pytest.mark.parametrize(
    "case, make, call",
    [
        # refused (fastguide's rescale takes [0, 1]) before the recipe draws the latents
        ("sd rescale outside [0, 1]", lambda: stable_diffusion(SD_SCHEDULERS["ddim"]()), {"guidance_rescale": 1.5}),
        ("sdxl rescale outside [0, 1]", stable_diffusion_xl, {**SDXL_CALL, "guidance_rescale": 1.5}),
        # diffusers' DiT loop steps on scale_model_input's output (an Euler scheduler rescales it)
        (
            "dit euler",
            lambda: dit(diffusers.EulerDiscreteScheduler(timestep_spacing="trailing")),
            dict(class_labels=[1, 7], num_inference_steps=4, guidance_scale=4.0, output_type="pt"),
        ),
    ],
)
def test_a_fallback_draws_the_latents_diffusers_would(case, make, call):
    # latents=None: the generator draws them; a fallback starts from the generator as the call found it
    call = {**SD_CALL, **call, "latents": None} if "class_labels" not in call else call
    original = make()
    expected = _images(original, call)
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    got = _images(accelerated, call)
    assert accelerated.fastguide_fallback is not None
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("global_rng", [False, True], ids=["generator", "no generator"])
def test_a_refusal_after_the_recipe_drew_the_latents_puts_the_generator_back(global_rng):
    from fastguide.pipelines import recipes

    def images(pipe, call):
        if not global_rng:
            return _images(pipe, call)
        torch.manual_seed(11)
        return pipe(**call).images

    original = stable_diffusion(SD_SCHEDULERS["ddim"]())
    call = {**SD_CALL, "latents": None}
    expected = images(original, call)
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    draw = accelerated.prepare_latents
    refusals = []

    def draw_then_refuse(*args, **kwargs):  # the recipe's draw, then a refusal; diffusers' own draw
        latents = draw(*args, **kwargs)
        if not refusals:
            refusals.append(True)
            raise recipes.Unsupported("a refusal after the draw")
        return latents

    accelerated.prepare_latents = draw_then_refuse
    got = images(accelerated, call)
    assert accelerated.fastguide_fallback == "a refusal after the draw"
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


def test_a_call_without_a_prompt_gets_diffusers_own_error():
    call = {k: v for k, v in SDXL_CALL.items() if k not in ("prompt_embeds", "pooled_prompt_embeds")}
    for pipe in (stable_diffusion_xl(), fastguide.accelerate(stable_diffusion_xl())):
        with pytest.raises(ValueError, match="Provide either `prompt` or `prompt_embeds`"):
            pipe(**call)


def test_a_negative_guidance_rescale_is_none_as_in_diffusers():
    original = stable_diffusion(SD_SCHEDULERS["ddim"]())
    call = {**SD_CALL, "guidance_rescale": -0.5}
    expected = _images(original, {**SD_CALL, "guidance_rescale": 0.0})
    accelerated = fastguide.accelerate(copy.deepcopy(original))
    got = _images(accelerated, call)
    assert accelerated.fastguide_fallback is None
    _close(got, expected)


def test_a_fallback_warns_that_fastguides_own_options_did_not_apply():
    pipe = fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["ddim"]()), sampler="dpm++2m")
    with pytest.warns(UserWarning, match="without accelerate's sampler=") as record:
        pipe(**SD_CALL, callback_on_step_end=lambda p, i, t, kwargs: kwargs)
    assert record[0].filename == __file__  # the caller's line
    # an empty cross_attention_kwargs is diffusers' none: no fallback
    pipe(**SD_CALL, cross_attention_kwargs={})
    assert pipe.fastguide_fallback is None


def test_guidance_option_guides_whatever_the_calls_guidance_scale():
    # accelerate(guidance=CFG(...)): the negative prompt is encoded, and the pipeline's
    # guidance_scale (1: diffusers would not guide) has no effect
    original = stable_diffusion(SD_SCHEDULERS["ddim"]())
    guided = fastguide.accelerate(copy.deepcopy(original), guidance=fastguide.CFG(5.0))
    with pytest.warns(UserWarning, match="have no effect: accelerate") as record:
        got = _images(guided, {**SD_CALL, "guidance_scale": 1.0})
    assert record[0].filename == __file__  # the caller's line (_images)
    expected = _images(original, SD_CALL)
    # float rounding relative to the latents' size, as above
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)
    # not given, the pipeline's guidance arguments raise no warning
    without = {k: v for k, v in SD_CALL.items() if k != "guidance_scale"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guided(**without, generator=torch.Generator().manual_seed(11))
    assert not [w for w in caught if "no effect" in str(w.message)]


def test_guidance_option_warns_of_a_pag_pipelines_own_scales():
    """A PAG pipeline's pag_scale and guidance_rescale, given beside accelerate(guidance=...),
    have no effect: the call says so rather than dropping them silently."""
    make, call = CASES["sd-pag"]
    pipe = fastguide.accelerate(make(), guidance=fastguide.CFG(3.0))
    with pytest.warns(UserWarning, match=r"guidance_rescale=, guidance_scale=, pag_scale= of this Stable"):
        _images(pipe, call)
    assert pipe.fastguide_fallback is None


def test_an_accelerated_pipeline_pickles_as_an_accelerated_pipeline():
    # pickle finds a class by its name, which the accelerated class shares with the
    # original: the pipeline pickles as the original's object and is accelerated again
    # when loaded (as a spawned worker receives it)
    original = stable_diffusion(SD_SCHEDULERS["ddim"]())
    pipe = fastguide.accelerate(copy.deepcopy(original), sampler="dpm++2m")
    expected = _images(pipe, SD_CALL)
    loaded = pickle.loads(pickle.dumps(pipe))
    assert type(loaded) is type(pipe) and loaded.fastguide_options == pipe.fastguide_options
    assert torch.equal(_images(loaded, SD_CALL), expected) and loaded.fastguide_fallback is None


def test_fallback_says_this_calls_reason_even_after_a_call_that_raised():
    pipe = fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["ddim"]()))
    pipe(**SD_CALL, callback_on_step_end=lambda p, i, t, kwargs: kwargs)
    assert "callback_on_step_end=" in pipe.fastguide_fallback
    with pytest.raises(ValueError):
        pipe(**{**SD_CALL, "latents": None}, height=20, width=20)  # diffusers' own check refuses 20
    assert pipe.fastguide_fallback is None


def test_latents_of_another_batch_are_refused_by_name():
    pipe = fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["ddim"]()))
    latents = torch.cat([SD_CALL["latents"], SD_CALL["latents"][:1]])
    with pytest.raises(ValueError, match=r"latents must hold 2 rows \(the prompts times num_images_per_prompt\)"):
        pipe(**{**SD_CALL, "latents": latents})
    # one prompt's embeddings against two rows of latents: diffusers' loop fails on the
    # shapes; fastguide's would broadcast the prompt over both
    one_prompt = {name: SD_CALL[name][:1] for name in ("prompt_embeds", "negative_prompt_embeds")}
    with pytest.raises(ValueError, match=r"latents must hold 1 rows"):
        pipe(**{**SD_CALL, **one_prompt})


SD3_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@pytest.mark.parametrize(
    "make",
    [
        stable_diffusion_3,
        lambda: stable_diffusion_3("StableDiffusion3PAGPipeline", pag_applied_layers=["blocks.1"]),
    ],
    ids=["sd3", "sd3-pag"],
)
@pytest.mark.parametrize(
    "call, reason",
    [
        # given embeddings of one prompt for its two images (SD3 spreads only those it computes)
        pytest.param(
            {**SD3_CALL, **{name: SD3_CALL[name][:1] for name in SD3_NAMES}, "num_images_per_prompt": 2},
            "SD3 does not repeat given embeddings",
            id="several images per prompt",
        ),
        pytest.param(
            {**SD3_CALL, **{name: SD3_CALL[name][:1] for name in SD3_NAMES[2:]}},
            "SD3 does not repeat it",
            id="one pooled row for two prompts",
        ),
    ],
)
def test_sd3_given_embeddings_of_too_few_rows_fail_as_in_diffusers(make, call, reason):
    # SD3's encode_prompt repeats no embeddings it is given: diffusers' loop fails on their
    # rows, where fastguide's row layout would broadcast them over the batch
    with pytest.raises(RuntimeError) as theirs:
        make()(**call)
    pipe = fastguide.accelerate(make())
    with pytest.raises(RuntimeError) as ours:
        pipe(**call)
    assert str(ours.value) == str(theirs.value) and reason in pipe.fastguide_fallback


@pytest.mark.parametrize(
    "make, call",
    [
        # a float mask given beside an int one: diffusers' torch.cat of the halves promotes them
        (
            lambda: pixart("PixArtSigmaPipeline"),
            {**PIXART_CALL, "negative_prompt_attention_mask": torch.ones(2, 7, dtype=torch.long)},
        ),
        (stable_diffusion_xl, {**SDXL_CALL, "pooled_prompt_embeds": SDXL_CALL["pooled_prompt_embeds"].double()}),
    ],
    ids=["pixart int negative mask", "sdxl float64 pooled"],
)
def test_conditioning_halves_of_two_dtypes_are_promoted_as_diffusers_concatenates_them(make, call):
    expected = make()(**call).images
    accelerated = fastguide.accelerate(make())
    got = accelerated(**call).images
    assert accelerated.fastguide_fallback is None
    torch.testing.assert_close(got, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


def test_an_array_given_for_an_argument_fastguide_refuses_is_refused_not_compared():
    # (an ip_adapter_image may be a numpy array: `value != {}` compared it elementwise)
    import numpy as np

    from fastguide.pipelines import recipes

    with pytest.raises(recipes.Unsupported, match="ip_adapter_image="):
        recipes._refuse_given({"ip_adapter_image": np.zeros((4, 4, 3))}, ("ip_adapter_image",))
    recipes._refuse_given({"cross_attention_kwargs": {}, "ip_adapter_image": None}, ("cross_attention_kwargs",))


@pytest.mark.parametrize(
    "make",
    [
        stable_diffusion_3,
        lambda: stable_diffusion_3("StableDiffusion3PAGPipeline", pag_applied_layers=["blocks.1"]),
    ],
    ids=["sd3", "sd3-pag"],
)
@pytest.mark.parametrize("sampler", [None, "euler"])
def test_sd3_with_a_scheduler_that_scales_its_input(make, sampler):
    # SD3's loop neither scales its latents by init_noise_sigma nor calls scale_model_input,
    # which an Euler-type VP scheduler's steps assume: the reproduced scheduler runs
    # diffusers' loop, and fastguide's own sampler starts from the latents as they are.
    original = make()
    original.scheduler = diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULERS["euler"]().config)
    accelerated = fastguide.accelerate(copy.deepcopy(original), sampler=sampler)
    got = _images(accelerated, SD3_CALL)
    if sampler is None:
        assert "does not scale its latents by init_noise_sigma" in accelerated.fastguide_fallback
        _close(got, _images(original, SD3_CALL))
    else:
        assert accelerated.fastguide_fallback is None
        ddim = fastguide.accelerate(copy.deepcopy(original), sampler=sampler)
        ddim.scheduler = diffusers.DDIMScheduler.from_config(original.scheduler.config)  # init_noise_sigma 1
        _close(got, _images(ddim, SD3_CALL))


def test_eta_on_a_scheduler_without_it_is_ignored_as_diffusers_does():
    # diffusers passes eta only to a scheduler whose step takes it (DDIM); with sampler=,
    # fastguide's loop runs on the others as it would without eta
    pipe = fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["dpm++2m"]()), sampler="unipc")
    expected = _images(pipe, SD_CALL)
    assert torch.equal(_images(pipe, {**SD_CALL, "eta": 0.3}), expected) and pipe.fastguide_fallback is None
    ddim = fastguide.accelerate(stable_diffusion(SD_SCHEDULERS["ddim"]()), sampler="unipc")
    with pytest.warns(UserWarning, match="without accelerate's sampler="):
        _images(ddim, {**SD_CALL, "eta": 0.3})
    assert "eta=0.3" in ddim.fastguide_fallback

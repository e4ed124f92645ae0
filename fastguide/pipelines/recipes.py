"""Per pipeline: what runs before and after diffusers' denoising loop, with the pipeline's
own methods, so that fastguide's loop can run in between.

Each recipe's ``prepare(pipe, arguments, options)`` reads the pipeline call's bound
arguments, refuses (``Unsupported``, before anything runs) what fastguide does not
reproduce, then does what the pipeline's ``__call__`` does up to its loop (input checks,
prompt encoding, the scheduler's timesteps, the latents) and returns a ``Denoising``: the
denoiser as ``model(x_t, t, **kwargs)``, x_T, the conditional and unconditional keyword
arguments, the guidance, the sampler settings, and ``finish``, which does what the
pipeline does after its loop (VAE decode, post-processing, the output object).

The pipelines order their CFG batch [uncond; cond]; fastguide's is [cond; uncond], with
the same per-row computation, so the latents agree to float rounding.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from ..sampling.guidance import CFG, PAG, Guidance, SkipLayerGuidance
from ..sampling.schedule import NoiseSchedule
from .schedulers import STOCHASTIC_SAMPLERS, settings_for


class Unsupported(ValueError):
    """A pipeline call that fastguide's loop does not reproduce; the pipeline runs its own."""


@dataclass
class Denoising:
    """What fastguide's loop needs from a pipeline call, prepared by the pipeline's methods."""

    denoiser: Denoiser  # model(x_t, t[, labels], **kwargs) -> prediction (C or 2C channels)
    noise: Tensor  # x_T in fastguide's convention (x = α·x0 + σ·ε)
    cond: dict
    uncond: dict | None
    guidance: Guidance | None
    sampling: dict  # GuidedSampler's sampler settings
    generator: torch.Generator | None  # the steps' noise (None for a sampler that draws none)
    finish: Callable[[Tensor], object]  # the final latents -> the pipeline's output
    labels: Tensor | None = None  # class labels, the denoiser's third argument
    # N(0, I) tensors diffusers' loop draws from ``generator``: the draws fastguide's loop
    # does not need (a last step's zero-variance noise) are made after it, so that the
    # generator ends where diffusers leaves it
    draws: int = 0


class Denoiser(nn.Module):
    """A pipeline's unet or transformer as fastguide's ``model(x_t, t[, labels], **kwargs)``:
    ``call(network, x_t, t, ...)`` returns its prediction tensor. PAG and skip-layer
    guidance perturb the network itself (``perturbation_target``), by diffusers' layer names."""

    def __init__(self, network: nn.Module, call: Callable[..., Tensor]):
        super().__init__()
        self.network, self.call = network, call

    @property
    def perturbation_target(self) -> nn.Module:
        return self.network

    def forward(self, x: Tensor, t: Tensor, *args: Tensor, **kwargs: object) -> Tensor:
        return self.call(self.network, x, t, *args, **kwargs)


def _unet_call(unet: nn.Module, x: Tensor, t: Tensor, **kwargs: object) -> Tensor:
    return unet(x, t, return_dict=False, **kwargs)[0]


def _sd3_call(transformer: nn.Module, x: Tensor, t: Tensor, **kwargs: object) -> Tensor:
    return transformer(hidden_states=x, timestep=t, return_dict=False, **kwargs)[0]


def _pixart_call(transformer: nn.Module, x: Tensor, t: Tensor, **kwargs: object) -> Tensor:
    return transformer(x, timestep=t, return_dict=False, **kwargs)[0]


def _dit_call(transformer: nn.Module, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    return transformer(x, timestep=t, class_labels=labels).sample


@dataclass(frozen=True)
class Recipe:
    """A pipeline class's denoiser (for its kernels) and its preparation of a call."""

    denoiser_of: Callable[[object], nn.Module]
    prepare: Callable[[object, dict, object], Denoising]


def _refuse_given(arguments: Mapping, names: tuple[str, ...]) -> None:
    """Unsupported when any of ``names`` is given (not None, and not an empty dict, which
    diffusers reads as none): what fastguide's loop does not run."""
    given = [name for name in names if not _absent(arguments.get(name))]
    if given:
        raise Unsupported(
            f"{', '.join(f'{name}=' for name in given)} ha{'s' if len(given) == 1 else 've'} no "
            "counterpart in fastguide's loop"
        )


def _absent(value: object) -> bool:
    """None or an empty dict (not ``value != {}``: an array compares elementwise)."""
    return value is None or (isinstance(value, dict) and not value)


def _module(pipe):
    """The module the pipeline's class is defined in (its retrieve_timesteps, its output class)."""
    return sys.modules[type(pipe).__module__]


def _dit_returns_tensors() -> bool:
    """Whether DiTPipeline returns output_type="pt" as a tensor (B, C, H, W), as diffusers
    does from 0.41; before, every output type but "pil" came back as a numpy (B, H, W, C)."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return (major, minor) >= (0, 41)


class Sampling(NamedTuple):
    """GuidedSampler's settings, the map from the pipeline's starting latents to x_T, and the
    generator of the steps' noise (None for a sampler that draws none)."""

    settings: dict
    initial_noise: Callable[[Tensor], Tensor]
    generator: torch.Generator | None
    draws: int = 0  # the N(0, I) tensors diffusers' loop draws from the generator (SamplerSettings.diffusers_draws)


def _step_generator(
    generator: torch.Generator | list[torch.Generator] | None, draws_noise: bool, sampler: str
) -> torch.Generator | None:
    """The generator the loop draws each step's noise from: none when the sampler draws none
    (the latents come from the pipeline), refused when a list of several would have to give
    it (a list of one is its generator, as diffusers' randn_tensor takes it)."""
    if not draws_noise:
        return None
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        return generator[0]
    if isinstance(generator, (list, tuple)):
        raise Unsupported(
            f"a list of generators with sampler {sampler!r}, which draws noise: fastguide draws each "
            "step's noise from one generator"
        )
    return generator


def _sampling(
    pipe,
    arguments: Mapping,
    options,
    *,
    eta: float = 0.0,
    generator_in_step: bool = True,
    mu: float | None = None,
    scaled_latents: bool = True,
) -> Sampling:
    """The scheduler reproduced (``schedulers.settings_for``), or with ``options.sampler``
    fastguide's own sampler on the scheduler's noise schedule (x_T the unscaled noise:
    the latents divided by ``init_noise_sigma`` where the pipeline scaled them by it,
    ``scaled_latents``). A pipeline that does not (DiT, SD3) runs no σ-space scheduler
    (Euler, Heun) as fastguide's reproduction does, which scales its latents and steps on
    them unscaled: such a call is refused."""
    scheduler = pipe.scheduler
    steps = arguments.get("num_inference_steps")
    if options.sampler is None:
        settings = settings_for(
            scheduler,
            steps,
            eta=eta,
            timesteps=arguments.get("timesteps"),
            sigmas=arguments.get("sigmas"),
            mu=mu,
            generator_in_step=generator_in_step,
        )
        if not scaled_latents and settings.latent_scale != 1.0:
            raise Unsupported(
                f"{type(pipe).__name__} with {type(scheduler).__name__}: the pipeline does not scale its "
                "latents by init_noise_sigma and step on them unscaled, as this scheduler's steps (and "
                "fastguide's reproduction of them) assume"
            )
        generator = _step_generator(arguments.get("generator"), settings.draws_noise, settings.sampler)
        return Sampling(
            settings.sample_kwargs(),
            settings.initial_noise,
            generator,
            settings.diffusers_draws if settings.draws_noise else 0,  # from the global RNG without a generator
        )
    _refuse_given(arguments, ("timesteps", "sigmas"))
    # diffusers passes eta only to a scheduler whose step takes it (DDIM's): elsewhere it is
    # ignored, by diffusers' loop and so by this one
    if eta and "eta" in inspect.signature(scheduler.step).parameters:
        raise Unsupported(f"eta={eta} with accelerate(sampler=...): DDIM's eta belongs to the pipeline's scheduler")
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    schedule: NoiseSchedule
    if type(scheduler).__name__.startswith("FlowMatch"):
        if scheduler.config.get("use_dynamic_shifting", False):
            raise Unsupported(
                "sampler= on a flow-matching scheduler with use_dynamic_shifting (its shift depends on the image size)"
            )
        schedule = NoiseSchedule.flow(float(scheduler.config.shift), scheduler.config.num_train_timesteps)
        prediction_type = "flow_prediction"
    else:
        try:
            schedule = NoiseSchedule(scheduler.betas.double())
        except (AttributeError, ValueError) as error:
            raise Unsupported(f"sampler= needs the scheduler's betas as a VP schedule: {error}") from None
    sampling = dict(
        sampler=options.sampler,
        steps=steps,
        spacing=options.spacing,
        schedule=schedule,
        prediction_type=prediction_type,
        clip_denoised=False,
    )
    generator = _step_generator(arguments.get("generator"), options.sampler in STOCHASTIC_SAMPLERS, options.sampler)

    def initial_noise(latents: Tensor) -> Tensor:
        # init_noise_sigma as prepare_latents used it: set by this call's set_timesteps,
        # which runs after this function (before it, it holds the previous call's)
        return latents / pipe.scheduler.init_noise_sigma if scaled_latents else latents

    return Sampling(sampling, initial_noise, generator)


def _guidance(options, scale: float, rescale: float = 0.0) -> Guidance | None:
    """The accelerate option's guidance, else the pipeline's CFG (on when scale > 1)."""
    if options.guidance is not None:
        return options.guidance
    if scale > 1 and rescale > 1:
        raise Unsupported(f"guidance_rescale={rescale} above 1: fastguide's CFG rescale takes [0, 1]")
    # diffusers rescales only where guidance_rescale > 0: a negative one is none
    return CFG(float(scale), rescale=max(0.0, float(rescale))) if scale > 1 else None


def _guided(pipeline_cfg: bool, options) -> bool:
    """Whether the call needs the unconditional branch (the negative prompt's embeddings):
    the pipeline's own CFG, or an accelerate(guidance=...) that guides with it, whatever the
    call's guidance_scale."""
    if options.guidance is not None:
        return "uncond" in options.guidance.branches
    return pipeline_cfg


def _pair(cond: dict, uncond: dict, guided: bool) -> tuple[dict, dict | None]:
    """The keyword conditioning of the two branches; no unconditional one without CFG. Two
    tensors of one argument in different dtypes (a float mask beside the tokenizer's int
    one, float32 pooled embeddings beside a float16 pipeline's) both take their promoted
    dtype, as diffusers' torch.cat of the two halves gives them."""
    return (_promoted(cond, uncond), _promoted(uncond, cond)) if guided else (cond, None)


def _promoted(mine: dict, other: dict) -> dict:
    """``mine`` with each tensor (in nested dicts too: SDXL's added_cond_kwargs) in the dtype
    it promotes to beside ``other``'s tensor of that name; called both ways, so each side
    gets the common dtype."""
    out = {}
    for name, value in mine.items():
        theirs = other.get(name)
        if isinstance(value, dict) and isinstance(theirs, dict):
            value = _promoted(value, theirs)
        elif isinstance(value, Tensor) and isinstance(theirs, Tensor) and value.dtype != theirs.dtype:
            value = value.to(torch.promote_types(value.dtype, theirs.dtype))
        out[name] = value
    return out


def _batch(a: Mapping) -> int:
    """The prompts' count, as the pipelines read it: one string, a list, or the embeddings' rows."""
    prompt = a["prompt"]
    return 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else a["prompt_embeds"].shape[0]


def latent_rows(a: Mapping) -> int:
    """The rows of the latents a text-to-image call denoises: the prompts times
    num_images_per_prompt."""
    return _batch(a) * a["num_images_per_prompt"]


def _refuse_guidance_embedding(pipe) -> None:
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise Unsupported("a UNet with time_cond_proj_dim (a guidance-scale embedding, as LCM's) is diffusers' own")


# --------------------------------------------------------------------------------------
# Stable Diffusion 1.x/2.x
# --------------------------------------------------------------------------------------


def _stable_diffusion(pipe, a: dict, options) -> Denoising:
    _refuse_given(a, ("ip_adapter_image", "ip_adapter_image_embeds", "cross_attention_kwargs", "callback_on_step_end"))
    _refuse_guidance_embedding(pipe)
    sampling, x_T, generator, draws = _sampling(pipe, a, options, eta=a["eta"])
    guidance = _guidance(options, a["guidance_scale"], a["guidance_rescale"])  # (refusals before anything runs)
    size = pipe.unet.config.sample_size
    default_height, default_width = (size, size) if isinstance(size, int) else tuple(size)
    default_height, default_width = default_height * pipe.vae_scale_factor, default_width * pipe.vae_scale_factor
    height, width = a["height"], a["width"]
    if "pag_scale" in a:  # StableDiffusionPAGPipeline defaults each side on its own
        height, width = height or default_height, width or default_width
    elif not height or not width:  # StableDiffusionPipeline defaults both when either is missing
        height, width = default_height, default_width
    pipe.check_inputs(
        a["prompt"],
        height,
        width,
        None,
        a["negative_prompt"],
        a["prompt_embeds"],
        a["negative_prompt_embeds"],
        None,
        None,
        a["callback_on_step_end_tensor_inputs"],
    )
    pipe._guidance_scale, pipe._guidance_rescale, pipe._clip_skip = (
        a["guidance_scale"],
        a["guidance_rescale"],
        a["clip_skip"],
    )
    pipe._cross_attention_kwargs, pipe._interrupt = None, False
    prompt, batch = a["prompt"], _batch(a)
    device = pipe._execution_device
    guided = _guided(pipe.do_classifier_free_guidance, options)
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        prompt,
        device,
        a["num_images_per_prompt"],
        guided,
        a["negative_prompt"],
        prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"],
        lora_scale=None,
        clip_skip=a["clip_skip"],
    )
    _module(pipe).retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    latents = pipe.prepare_latents(
        batch * a["num_images_per_prompt"],
        pipe.unet.config.in_channels,
        height,
        width,
        prompt_embeds.dtype,
        device,
        a["generator"],
        a["latents"],
    )
    cond, uncond = _pair({"encoder_hidden_states": prompt_embeds}, {"encoder_hidden_states": negative_embeds}, guided)

    denoiser = Denoiser(pipe.unet, _unet_call)

    def finish(latents: Tensor):
        output_type = a["output_type"]
        if output_type != "latent":
            image = pipe.vae.decode(
                latents / pipe.vae.config.scaling_factor, return_dict=False, generator=a["generator"]
            )[0]
            image, nsfw = pipe.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, nsfw = latents, None
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        pipe.maybe_free_model_hooks()
        if not a["return_dict"]:
            return image, nsfw
        return _module(pipe).StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)

    return Denoising(denoiser, x_T(latents), cond, uncond, guidance, sampling, generator, finish, draws=draws)


# --------------------------------------------------------------------------------------
# Stable Diffusion XL
# --------------------------------------------------------------------------------------


def _stable_diffusion_xl(pipe, a: dict, options) -> Denoising:
    _refuse_given(
        a,
        (
            "ip_adapter_image",
            "ip_adapter_image_embeds",
            "cross_attention_kwargs",
            "callback_on_step_end",
            "denoising_end",
        ),
    )
    _refuse_guidance_embedding(pipe)
    height = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    width = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    original_size, target_size = a["original_size"] or (height, width), a["target_size"] or (height, width)
    prompt = a["prompt"]
    pipe.check_inputs(  # (diffusers' errors first: the batch below reads prompt or prompt_embeds)
        prompt,
        a["prompt_2"],
        height,
        width,
        None,
        a["negative_prompt"],
        a["negative_prompt_2"],
        a["prompt_embeds"],
        a["negative_prompt_embeds"],
        a["pooled_prompt_embeds"],
        a["negative_pooled_prompt_embeds"],
        None,
        None,
        a["callback_on_step_end_tensor_inputs"],
    )
    rows = latent_rows(a)
    negative_sizes = a["negative_original_size"] is not None and a["negative_target_size"] is not None
    if negative_sizes and rows > 1:
        raise Unsupported(
            "negative_original_size/negative_target_size with more than one image: diffusers repeats "
            "[negative; positive] time ids row-wise, interleaving them across its CFG halves"
        )
    sampling, x_T, generator, draws = _sampling(pipe, a, options, eta=a["eta"])
    guidance = _guidance(options, a["guidance_scale"], a["guidance_rescale"])  # (refusals before anything runs)
    pipe._guidance_scale, pipe._guidance_rescale, pipe._clip_skip = (
        a["guidance_scale"],
        a["guidance_rescale"],
        a["clip_skip"],
    )
    pipe._cross_attention_kwargs, pipe._denoising_end, pipe._interrupt = None, None, False
    device = pipe._execution_device
    guided = _guided(pipe.do_classifier_free_guidance, options)
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt,
        prompt_2=a["prompt_2"],
        device=device,
        num_images_per_prompt=a["num_images_per_prompt"],
        do_classifier_free_guidance=guided,
        negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"],
        prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"],
        pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
        lora_scale=None,
        clip_skip=a["clip_skip"],
    )
    _module(pipe).retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    latents = pipe.prepare_latents(
        rows, pipe.unet.config.in_channels, height, width, prompt_embeds.dtype, device, a["generator"], a["latents"]
    )
    projection = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(
        original_size,
        a["crops_coords_top_left"],
        target_size,
        dtype=prompt_embeds.dtype,
        text_encoder_projection_dim=projection,
    ).to(device)
    negative_time_ids = (
        time_ids
        if not negative_sizes
        else pipe._get_add_time_ids(
            a["negative_original_size"],
            a["negative_crops_coords_top_left"],
            a["negative_target_size"],
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection,
        ).to(device)
    )
    cond, uncond = _pair(
        {
            "encoder_hidden_states": prompt_embeds.to(device),
            "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids},
        },
        {
            "encoder_hidden_states": None if negative_embeds is None else negative_embeds.to(device),
            "added_cond_kwargs": {
                "text_embeds": None if negative_pooled is None else negative_pooled.to(device),
                "time_ids": negative_time_ids,
            },
        },
        guided,
    )

    denoiser = Denoiser(pipe.unet, _unet_call)

    def finish(latents: Tensor):
        module = _module(pipe)
        if a["output_type"] == "latent":
            image = latents
        else:
            upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
            if upcast:
                pipe.upcast_vae()
                latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
            mean, std = getattr(pipe.vae.config, "latents_mean", None), getattr(pipe.vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / pipe.vae.config.scaling_factor + mean
            else:
                latents = latents / pipe.vae.config.scaling_factor
            image = pipe.vae.decode(latents.to(module.get_module_execution_device(pipe.vae)), return_dict=False)[0]
            if upcast:
                pipe.vae.to(dtype=torch.float16)
            if pipe.watermark is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
        pipe.maybe_free_model_hooks()
        return module.StableDiffusionXLPipelineOutput(images=image) if a["return_dict"] else (image,)

    return Denoising(denoiser, x_T(latents), cond, uncond, guidance, sampling, generator, finish, draws=draws)


# --------------------------------------------------------------------------------------
# Stable Diffusion 3
# --------------------------------------------------------------------------------------


def _stable_diffusion_3(pipe, a: dict, options) -> Denoising:
    _refuse_given(a, ("ip_adapter_image", "ip_adapter_image_embeds", "joint_attention_kwargs", "callback_on_step_end"))
    if a["prompt_embeds"] is not None and a["num_images_per_prompt"] > 1:
        # SD3's encode_prompt repeats the embeddings it computes, not given ones: diffusers' loop
        # fails on their rows, and raises that error
        raise Unsupported("prompt_embeds= with num_images_per_prompt > 1: SD3 does not repeat given embeddings")
    skip_layers = a.get("skip_guidance_layers")  # StableDiffusion3PAGPipeline has none
    if skip_layers is not None and (options.sampler is not None or options.guidance is not None):
        raise Unsupported(
            "skip_guidance_layers= with accelerate(sampler=...) or (guidance=...): its window is a "
            "fraction of the scheduler's own steps, and it adds to the pipeline's CFG"
        )
    height = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    width = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(
        a["prompt"],
        a["prompt_2"],
        a["prompt_3"],
        height,
        width,
        negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"],
        negative_prompt_3=a["negative_prompt_3"],
        prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"],
        pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
        callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
        max_sequence_length=a["max_sequence_length"],
    )
    pipe._guidance_scale, pipe._skip_layer_guidance_scale = a["guidance_scale"], a.get("skip_layer_guidance_scale")
    pipe._clip_skip, pipe._joint_attention_kwargs, pipe._interrupt = a["clip_skip"], None, False
    prompt, batch = a["prompt"], _batch(a)
    mu = a.get("mu")  # StableDiffusion3PAGPipeline takes none, and shifts none
    if "mu" in a and pipe.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
        patch = pipe.transformer.config.patch_size
        latent_h, latent_w = int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor
        if a["latents"] is not None:  # diffusers reads the size off the latents it denoises
            latent_h, latent_w = a["latents"].shape[-2:]
        config = pipe.scheduler.config
        mu = _module(pipe).calculate_shift(
            (latent_h // patch) * (latent_w // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    # SD3's prepare_latents does not scale by init_noise_sigma, nor its loop call scale_model_input
    sampling, x_T, generator, draws = _sampling(pipe, a, options, generator_in_step=False, mu=mu, scaled_latents=False)
    if skip_layers is not None and pipe.do_classifier_free_guidance and sampling["sampler"] != "euler":
        raise Unsupported(
            f"skip_guidance_layers with sampler {sampling['sampler']!r}: diffusers' window counts "
            "model calls, fastguide's reproduction counts steps (equal for Euler only)"
        )
    device = pipe._execution_device
    guided = _guided(pipe.do_classifier_free_guidance, options)
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt,
        prompt_2=a["prompt_2"],
        prompt_3=a["prompt_3"],
        negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"],
        negative_prompt_3=a["negative_prompt_3"],
        do_classifier_free_guidance=guided,
        prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"],
        pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
        device=device,
        clip_skip=a["clip_skip"],
        num_images_per_prompt=a["num_images_per_prompt"],
        max_sequence_length=a["max_sequence_length"],
        lora_scale=None,
    )
    rows = batch * a["num_images_per_prompt"]
    given = {"prompt_embeds": prompt_embeds}
    if guided:  # (unguided, one pooled row broadcasts in diffusers' transformer as in fastguide's layout)
        given |= {
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
    for name, tensor in given.items():
        if tensor.shape[0] != rows:
            # SD3's encode_prompt repeats none it is given: diffusers' loop fails on their rows
            # (fastguide's layout would broadcast one), and raises that error
            raise Unsupported(f"{name} of {tensor.shape[0]} rows for {rows} latents: SD3 does not repeat it")
    latents = pipe.prepare_latents(
        rows,
        pipe.transformer.config.in_channels,
        height,
        width,
        prompt_embeds.dtype,
        device,
        a["generator"],
        a["latents"],
    )
    scheduler_kwargs = {} if mu is None else {"mu": mu}
    _module(pipe).retrieve_timesteps(
        pipe.scheduler, a["num_inference_steps"], device, sigmas=a["sigmas"], **scheduler_kwargs
    )
    cond, uncond = _pair(
        {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled},
        {"encoder_hidden_states": negative_embeds, "pooled_projections": negative_pooled},
        guided,
    )

    denoiser = Denoiser(pipe.transformer, _sd3_call)

    def finish(latents: Tensor):
        if a["output_type"] == "latent":
            image = latents
        else:
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
        pipe.maybe_free_model_hooks()
        return _module(pipe).StableDiffusion3PipelineOutput(images=image) if a["return_dict"] else (image,)

    guidance = _guidance(options, a["guidance_scale"])
    if skip_layers is not None and guided:
        # diffusers skips each block whose index is listed, and ignores an index no block has
        present = [i for i in range(len(pipe.transformer.transformer_blocks)) if i in skip_layers]
        guidance = _skip_layer_guidance(a, sampling, present)
    return Denoising(denoiser, x_T(latents), cond, uncond, guidance, sampling, generator, finish, draws=draws)


def _skip_layer_guidance(a: dict, sampling: dict, layers) -> Guidance:
    """SD3's skip-layer guidance: after CFG, + s·(c − p) with p the conditional rows through the
    transformer with ``layers`` skipped, at the steps i with N·start < i < N·stop (of N); those
    steps' σ̃ (EDM's, strictly decreasing along the grid) bound the strategy's interval."""
    sigmas = [sampling["schedule"].edm_sigma(t) for t in sampling["steps"]]
    count = len(sigmas)
    start, stop = count * a["skip_layer_guidance_start"], count * a["skip_layer_guidance_stop"]
    chosen = [i for i in range(count) if start < i < stop]
    cfg = CFG(float(a["guidance_scale"]))
    if not chosen or not layers or a["skip_layer_guidance_scale"] == 0:
        return cfg
    # σ̃ falls along the grid: the window's edges lie halfway to the neighbouring steps
    first, last = chosen[0], chosen[-1]
    high = (
        (sigmas[first] + sigmas[first - 1]) / 2 if first > 0 and math.isfinite(sigmas[first - 1]) else 2 * sigmas[first]
    )  # a flow path's pure-noise start has σ̃ = ∞
    low = (sigmas[last] + sigmas[last + 1]) / 2 if last + 1 < count else sigmas[last] / 2
    return SkipLayerGuidance(
        float(a["skip_layer_guidance_scale"]), tuple(layers), cfg_scale=cfg.scale, interval=(low, high)
    )


# --------------------------------------------------------------------------------------
# PixArt-α and PixArt-Σ
# --------------------------------------------------------------------------------------


def _pixart(pipe, a: dict, options) -> Denoising:
    _refuse_given(a, ("callback",))
    alpha = _recipe_class(pipe).__name__ == "PixArtAlphaPipeline"
    custom = a["timesteps"] if a["timesteps"] is not None else a["sigmas"]
    if alpha and (a["num_inference_steps"] == 1 or (custom is not None and len(custom) == 1)):
        # (diffusers counts the steps after its custom schedule: a one-step loop)
        raise Unsupported("one step on PixArtAlphaPipeline: diffusers returns the step's predicted x0")
    height = a["height"] or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    width = a["width"] or pipe.transformer.config.sample_size * pipe.vae_scale_factor
    module = _module(pipe)
    original_size = (height, width)
    if a["use_resolution_binning"]:
        bins = {
            128: "ASPECT_RATIO_1024_BIN",
            64: "ASPECT_RATIO_512_BIN",
            32: "ASPECT_RATIO_256_BIN",
            256: "ASPECT_RATIO_2048_BIN",
        }
        name = bins.get(pipe.transformer.config.sample_size)
        if name is None or not hasattr(module, name):
            raise Unsupported(f"resolution binning for sample_size {pipe.transformer.config.sample_size}")
        height, width = pipe.image_processor.classify_height_width_bin(height, width, ratios=getattr(module, name))
    pipe.check_inputs(
        a["prompt"],
        height,
        width,
        a["negative_prompt"],
        a["callback_steps"],
        a["prompt_embeds"],
        a["negative_prompt_embeds"],
        a["prompt_attention_mask"],
        a["negative_prompt_attention_mask"],
    )
    sampling, x_T, generator, draws = _sampling(pipe, a, options, eta=a["eta"])
    if sampling.get("variance_type") == "learned_range":
        raise Unsupported(
            "DDPMScheduler's learned_range variance: PixArt guides its variance channels, fastguide "
            "reads the conditional ones"
        )
    prompt, batch = a["prompt"], _batch(a)
    device = pipe._execution_device
    guided = _guided(a["guidance_scale"] > 1.0, options)
    prompt_embeds, prompt_mask, negative_embeds, negative_mask = pipe.encode_prompt(
        prompt,
        guided,
        negative_prompt=a["negative_prompt"],
        num_images_per_prompt=a["num_images_per_prompt"],
        device=device,
        prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"],
        prompt_attention_mask=a["prompt_attention_mask"],
        negative_prompt_attention_mask=a["negative_prompt_attention_mask"],
        clean_caption=a["clean_caption"],
        max_sequence_length=a["max_sequence_length"],
    )
    module.retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    rows = batch * a["num_images_per_prompt"]
    latents = pipe.prepare_latents(
        rows,
        pipe.transformer.config.in_channels,
        height,
        width,
        prompt_embeds.dtype,
        device,
        a["generator"],
        a["latents"],
    )
    added: dict[str, Tensor | None] = {"resolution": None, "aspect_ratio": None}
    if alpha and pipe.transformer.config.sample_size == 128:  # PixArt-α's micro-conditions; Σ has none
        added = {
            "resolution": torch.tensor([height, width]).repeat(rows, 1).to(prompt_embeds.dtype).to(device),
            "aspect_ratio": torch.tensor([float(height / width)]).repeat(rows, 1).to(prompt_embeds.dtype).to(device),
        }
    cond, uncond = _pair(
        {"encoder_hidden_states": prompt_embeds, "encoder_attention_mask": prompt_mask, "added_cond_kwargs": added},
        {"encoder_hidden_states": negative_embeds, "encoder_attention_mask": negative_mask, "added_cond_kwargs": added},
        guided,
    )

    denoiser = Denoiser(pipe.transformer, _pixart_call)

    def finish(latents: Tensor):
        if a["output_type"] == "latent":
            image = latents
        else:
            image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
            if a["use_resolution_binning"]:
                image = pipe.image_processor.resize_and_crop_tensor(image, original_size[1], original_size[0])
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
        pipe.maybe_free_model_hooks()
        return _module(pipe).ImagePipelineOutput(images=image) if a["return_dict"] else (image,)

    return Denoising(
        denoiser,
        x_T(latents),
        cond,
        uncond,
        _guidance(options, a["guidance_scale"]),
        sampling,
        generator,
        finish,
        draws=draws,
    )


# --------------------------------------------------------------------------------------
# DiT (class-conditional)
# --------------------------------------------------------------------------------------

# DiTPipeline's unconditional class: the extra row of the label table of ImageNet's 1000.
DIT_NULL_CLASS = 1000


def _dit(pipe, a: dict, options) -> Denoising:
    # DiTPipeline's latents are unscaled, and its loop steps on scale_model_input's output
    sampling, x_T, generator, draws = _sampling(pipe, a, options, generator_in_step=False, scaled_latents=False)
    if sampling.get("variance_type") == "learned_range":
        raise Unsupported("DDPMScheduler's learned_range variance: DiTPipeline steps on the guided eps alone")
    labels = a["class_labels"]
    device = pipe._execution_device
    size, channels = pipe.transformer.config.sample_size, pipe.transformer.config.in_channels
    latents = _module(pipe).randn_tensor(
        shape=(len(labels), channels, size, size), generator=a["generator"], device=device, dtype=pipe.transformer.dtype
    )
    labels = torch.tensor(labels, device=device).reshape(-1)
    pipe.scheduler.set_timesteps(a["num_inference_steps"])
    guidance = options.guidance
    if guidance is None and a["guidance_scale"] > 1:
        # DiTPipeline guides the first in_channels (the eps) of its 2C output: all of fastguide's C.
        guidance = CFG(float(a["guidance_scale"]))

    denoiser = Denoiser(pipe.transformer, _dit_call)

    def finish(latents: Tensor):
        samples = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if a["output_type"] != "pt" or not _dit_returns_tensors():
            samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
            if a["output_type"] == "pil":
                samples = pipe.numpy_to_pil(samples)
        pipe.maybe_free_model_hooks()
        return _module(pipe).ImagePipelineOutput(images=samples) if a["return_dict"] else (samples,)

    return Denoising(
        denoiser,
        x_T(latents),
        {},
        None,
        guidance,
        {**sampling, "null_label": DIT_NULL_CLASS},
        generator,
        finish,
        labels,
        draws,
    )


# --------------------------------------------------------------------------------------
# The PAG pipelines: their base pipeline's recipe, with PAG as the guidance
# --------------------------------------------------------------------------------------


# The attention processors a PAG pipeline perturbs with by default (its __init__'s
# set_pag_applied_layers), with CFG and without: the identity self-attention map that
# fastguide's PAG reproduces.
IDENTITY_PAG_PROCESSORS = ("PAGCFGIdentitySelfAttnProcessor2_0", "PAGIdentitySelfAttnProcessor2_0")
JOINT_PAG_PROCESSORS = ("PAGCFGJointAttnProcessor2_0", "PAGJointAttnProcessor2_0")


def _with_pag(
    prepare: Callable[[object, dict, object], Denoising], processors: tuple[str, str] = IDENTITY_PAG_PROCESSORS
) -> Callable[[object, dict, object], Denoising]:
    """A PAG pipeline's recipe: its base pipeline's, with the pipeline's CFG (if any) extended
    by perturbed-attention guidance at ``pipe.pag_applied_layers`` (diffusers' do_perturbed_
    attention_guidance: pag_scale > 0 and some layers); the rescale applies with CFG only,
    as there. Only with the pipeline's default PAG attention processors (``processors``, by
    class name): others a user set (set_pag_applied_layers(..., pag_attn_processors=...))
    perturb in their own way, which diffusers' loop runs."""

    def prepare_pag(pipe, a: dict, options) -> Denoising:
        if a["pag_adaptive_scale"] > 0:
            raise Unsupported("pag_adaptive_scale > 0 (a PAG scale that varies with t) is diffusers' own")
        # the pipeline's own state, as its __call__ leaves it (pipe.pag_scale, do_perturbed_attention_guidance)
        pipe._pag_scale, pipe._pag_adaptive_scale = a["pag_scale"], a["pag_adaptive_scale"]
        layers = pipe.pag_applied_layers
        if options.guidance is not None or not (a["pag_scale"] > 0 and layers):
            return prepare(pipe, a, options)
        chosen = getattr(pipe, "_pag_attn_processors", None) or ()
        if tuple(type(p).__name__ for p in chosen) != processors or not all(
            type(p).__module__.startswith("diffusers.") for p in chosen
        ):
            names = ", ".join(type(p).__name__ for p in chosen) or "none"
            raise Unsupported(
                f"PAG attention processors other than diffusers' {processors[0]} and {processors[1]} "
                f"(set_pag_applied_layers' pag_attn_processors: {names})"
            )
        network = getattr(pipe, "transformer", None)
        if network is not None and any(getattr(module, "norm_q", None) is not None for module in network.modules()):
            raise Unsupported(
                "PAG on a transformer with q/k norms (SD3.5): diffusers' PAG attention processors drop "
                "the norms, fastguide's perturbation keeps them"
            )
        denoising = prepare(pipe, a, options)
        cfg = cast("CFG | None", denoising.guidance)  # _guidance's: options.guidance is None here
        denoising.guidance = PAG(
            float(a["pag_scale"]),
            (layers,) if isinstance(layers, str) else tuple(layers),
            cfg_scale=cfg.scale if cfg is not None else 1.0,
            rescale=cfg.rescale if cfg is not None else 0.0,
        )
        return denoising

    return prepare_pag


def _unet(pipe) -> nn.Module:
    """The denoiser of the UNet pipelines."""
    return pipe.unet


def _transformer(pipe) -> nn.Module:
    """The denoiser of the transformer pipelines."""
    return pipe.transformer


RECIPES = {
    "StableDiffusionPipeline": Recipe(_unet, _stable_diffusion),
    "StableDiffusionPAGPipeline": Recipe(_unet, _with_pag(_stable_diffusion)),
    "StableDiffusionXLPAGPipeline": Recipe(_unet, _with_pag(_stable_diffusion_xl)),
    "StableDiffusion3PAGPipeline": Recipe(_transformer, _with_pag(_stable_diffusion_3, JOINT_PAG_PROCESSORS)),
    "StableDiffusionXLPipeline": Recipe(_unet, _stable_diffusion_xl),
    "StableDiffusion3Pipeline": Recipe(_transformer, _stable_diffusion_3),
    "PixArtAlphaPipeline": Recipe(_transformer, _pixart),
    "PixArtSigmaPipeline": Recipe(_transformer, _pixart),
    "DiTPipeline": Recipe(_transformer, _dit),
}


def _recipe_class(pipe) -> type:
    """The class whose ``__call__`` the pipeline runs (past fastguide's accelerated subclass)."""
    for cls in type(pipe).__mro__:
        if "__call__" in cls.__dict__ and not cls.__dict__.get("_fastguide_accelerated", False):
            return cls
    return type(pipe)


def recipe_for(pipe) -> Recipe | None:
    """The recipe of a diffusers pipeline, when its ``__call__`` is the one a recipe follows
    (a subclass that overrides ``__call__`` runs code no recipe knows: none)."""
    cls = _recipe_class(pipe)
    return RECIPES.get(cls.__name__) if cls.__module__.startswith("diffusers.") else None


def supported() -> tuple[str, ...]:
    """The diffusers pipeline classes with a recipe."""
    return tuple(RECIPES)

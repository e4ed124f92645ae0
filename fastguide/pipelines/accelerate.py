"""``fastguide.accelerate(pipe)``: a diffusers pipeline's denoising loop replaced by fastguide's.

On a diffusers pipeline, ``accelerate`` does three things, in place:

1. it swaps fastguide's kernels into the pipeline's denoiser (``unet`` or ``transformer``),
   as ``fastguide.accelerate(module)`` does for any module;
2. it replaces the denoising loop: the pipeline's class becomes a subclass whose
   ``__call__`` keeps the original signature, prompt encoding, latents, VAE decode and
   outputs (all the pipeline's own methods), and runs the loop between them as
   ``fastguide.sample``: one batched forward of [cond; uncond] per model call and the fused
   guidance combine + sampler update (``fastguide::guided_step``);
3. it reproduces the pipeline's scheduler (``schedulers.settings_for``), so that with the
   same scheduler, embeddings and latents the latents equal the original's to float
   rounding.

A call fastguide cannot reproduce (a scheduler or option it has no equal for, an IP-adapter
image, step callbacks, ...) runs diffusers' own ``__call__``; the reason is logged at INFO
by the ``fastguide.pipelines`` logger and kept in ``pipe.fastguide_fallback``. Never a
silently different image: the generators are put back as the call found them, so the
fallback draws what diffusers alone would (and an accelerated call leaves them where
diffusers' loop would, its draws for a last zero-variance step included); and where the
pipeline was accelerated with options of fastguide's own (``sampler=``, ``guidance=``,
``cache=``), which diffusers' loop does not have, the fallback warns that they did not
apply.

fastguide's own choices stay open, as options of ``accelerate`` (kept on the pipeline as
``pipe.fastguide_options``, in diffusers' way of configuring a pipeline once):
``sampler=`` (with ``spacing=``) samples with a fastguide solver on the scheduler's noise
schedule instead of reproducing the scheduler; ``guidance=`` a ``fastguide.Guidance`` to use
instead of the pipeline's CFG (its ``guidance_scale`` and ``guidance_rescale``, and a PAG
pipeline's ``pag_scale``, then have no effect, and a call that passes them is warned; the
negative prompt is encoded where the guidance has an unconditional branch); ``cache=`` a
``fastguide.FirstBlockCache`` or ``ForecastCache`` for the denoiser's blocks (DiT, PixArt
and SD3 transformer blocks; an SD/SDXL UNet's down, mid and up blocks);
``cuda_graph=True`` captures the loop as CUDA graphs. The capture is kept across calls of
one shape, whatever their prompts, so the data-dependent decisions it holds (a
``FirstBlockCache``'s reuse, truncated CFG's stop) are then those of the first call's
warm-up run: a fixed schedule calibrated on that call. A change to the denoiser that
leaves its weights where they are (``fuse_lora()``, ``set_adapters``, another attention
processor) is not seen by a replay: call ``accelerate`` again, with the same options, to
drop the captures. A denoiser with a hook that acts at each forward (CPU offloading,
diffusers' caches) runs fastguide's loop without graphs, with a warning.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models.accelerate import accelerate as accelerate_module
from ..models.block_cache import BlockCacheSettings, FirstBlockCache, ForecastCache, check_cacheable
from ..sampling.guidance import Guidance
from ..sampling.loop import GuidedSampler, per_forward_hook
from ..sampling.schedule import SPACINGS, NoiseSchedule
from ..sampling.solvers import FLOAT32_NOISE_SAMPLERS, SAMPLERS
from . import recipes
from .schedulers import UnsupportedScheduler

log = logging.getLogger("fastguide.pipelines")


@dataclass(frozen=True)
class PipelineOptions:
    """fastguide's choices for an accelerated pipeline (see the module docstring)."""

    sampler: str | None = None
    spacing: str | None = None
    guidance: Guidance | None = None
    cuda_graph: bool = False
    cache: BlockCacheSettings | None = None


def accelerate(
    target: Any,
    *,
    sampler: str | None = None,
    spacing: str | None = None,
    guidance: Guidance | None = None,
    cuda_graph: bool = False,
    cache: BlockCacheSettings | None = None,
) -> Any:
    """Accelerate a module (fastguide's kernels swapped in, see
    ``fastguide.models.accelerate.accelerate``) or a diffusers pipeline (also its denoising
    loop replaced, see this module's docstring). Returns ``target``, changed in place.
    The keyword options apply to pipelines only."""
    if isinstance(target, nn.Module):
        if sampler is not None or spacing is not None or guidance is not None or cuda_graph or cache is not None:
            raise ValueError(
                "sampler=, spacing=, guidance=, cache= and cuda_graph= apply to a diffusers pipeline; "
                f"a module ({type(target).__name__}) only has its kernels swapped"
            )
        return accelerate_module(target)
    recipe = recipes.recipe_for(target)
    if recipe is None:
        raise TypeError(
            f"accelerate takes a torch.nn.Module or a diffusers pipeline of {recipes.supported()}, "
            f"got {type(target).__name__}"
        )
    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(
            f"guidance must be a fastguide Guidance (CFG, CFGPlusPlus, ...) or None, got {type(guidance).__name__}"
        )
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if cache is not None and not isinstance(cache, (FirstBlockCache, ForecastCache)):
        raise TypeError(
            f"cache must be a fastguide.FirstBlockCache, a fastguide.ForecastCache or None, got {type(cache).__name__}"
        )
    if sampler is None and spacing is not None:
        raise ValueError("spacing= places fastguide's own sampler's steps: it needs sampler=")
    # the names now, not at the first call (after the kernels, the class and a prompt's encoding)
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} or None, got {sampler!r}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS} or None, got {spacing!r}")
    if cache is not None:  # before any change: a denoiser the cache cannot take is refused here, not at a call
        check_cacheable(recipe.denoiser_of(target), type(cache).__name__)
    accelerate_module(recipe.denoiser_of(target))
    if not getattr(type(target), "_fastguide_accelerated", False):
        target.__class__ = _accelerated_class(type(target))
    target.fastguide_options = PipelineOptions(sampler, spacing, guidance, cuda_graph, cache)
    target.fastguide_fallback = None
    target._fastguide_samplers = {}
    return target


_CLASSES: dict[type, type] = {}
# A call's arguments that set the pipeline's own guidance, which accelerate(guidance=...)
# replaces: given with it, they are warned of, not silently dropped.
PIPELINE_GUIDANCE_ARGUMENTS = frozenset({"guidance_scale", "guidance_rescale", "pag_scale"})


def _accelerated_class(cls: type) -> type:
    """A subclass of the pipeline's class whose ``__call__`` runs fastguide's loop (one per
    class, so that isinstance, the pipeline's methods and its components stay as they were)."""
    if cls not in _CLASSES:
        original = cls.__call__

        @torch.no_grad()  # as diffusers' own __call__
        def __call__(self, *args, **kwargs):
            return _accelerated_call(self, original, args, kwargs)

        __call__.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]  # (typeshed lacks it)
        __call__.__doc__ = original.__doc__

        def __reduce__(self):
            # pickle finds classes by name, and this one's name is the original's: pickled
            # as the original class's object with its state, accelerated again when loaded
            # (the loop's cache of samplers is rebuilt at the next call).
            state = {name: value for name, value in self.__dict__.items() if name != "_fastguide_samplers"}
            return _unpickle_accelerated, (cls, state)

        _CLASSES[cls] = type(
            cls.__name__,
            (cls,),
            {
                "__call__": __call__,
                "__reduce__": __reduce__,
                "_fastguide_accelerated": True,
                "__module__": cls.__module__,
            },
        )
    return _CLASSES[cls]


def _unpickle_accelerated(cls: type, state: dict) -> Any:
    """An accelerated pipeline from its original class and its state (``__reduce__``)."""
    pipe: Any = object.__new__(cls)
    pipe.__dict__.update(state)
    pipe.__dict__["_fastguide_samplers"] = {}
    pipe.__class__ = _accelerated_class(cls)
    return pipe


def _accelerated_call(pipe, original: Callable, args: tuple, kwargs: dict):
    bound = inspect.signature(original).bind(pipe, *args, **kwargs)
    given = set(bound.arguments)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    extra = arguments.pop("kwargs", {}) or {}
    recipe = recipes.recipe_for(pipe)
    assert recipe is not None  # accelerate() made this class for a pipeline with a recipe
    options = pipe.fastguide_options
    pipe.fastguide_fallback = None  # this call's, whatever an earlier one set (even one that raised)
    generators = _generator_states(arguments.get("generator"), pipe._execution_device)
    try:
        if extra:
            raise recipes.Unsupported(
                f"the arguments {sorted(extra)} are not parameters of {type(pipe).__name__}.__call__ "
                "(diffusers' deprecated step callbacks, or a misspelling, which diffusers ignores)"
            )
        denoising = recipe.prepare(pipe, arguments, options)
        if (
            options.sampler is None
            and denoising.noise.dtype == torch.float64
            and denoising.sampling["sampler"] in FLOAT32_NOISE_SAMPLERS
        ):
            raise recipes.Unsupported(
                f"float64 latents with the scheduler's {denoising.sampling['sampler']}: diffusers draws its noise "
                "in float32 whatever the latents' dtype, fastguide's loop in float64 (as k-diffusion)"
            )
    except (recipes.Unsupported, UnsupportedScheduler) as reason:
        for generator, state in generators:  # as the call found them: diffusers draws what it alone would
            generator.set_state(state)
        pipe.fastguide_fallback = str(reason)
        log.info("fastguide: %s runs diffusers' own denoising loop: %s", type(pipe).__name__, reason)
        own = [f"{name}=" for name in ("sampler", "guidance", "cache") if getattr(options, name) is not None]
        if own:
            warnings.warn(
                f"fastguide: this {type(pipe).__name__} call runs diffusers' own loop ({reason}), "
                f"without accelerate's {', '.join(own)}",
                stacklevel=4,  # the caller's line: past _accelerated_call, __call__ and no_grad's wrapper
            )
        return original(pipe, *args, **kwargs)
    if arguments.get("latents") is not None:
        _check_latent_rows(arguments, denoising)
    overridden = sorted(given & PIPELINE_GUIDANCE_ARGUMENTS) if options.guidance is not None else []
    if overridden:
        warnings.warn(
            f"fastguide: {', '.join(f'{name}=' for name in overridden)} of this {type(pipe).__name__} call "
            f"have no effect: accelerate(guidance={type(options.guidance).__name__}(...)) guides instead",
            stacklevel=4,  # the caller's line: past _accelerated_call, __call__ and no_grad's wrapper
        )
    steps = denoising.sampling["steps"]
    # the pipeline's num_timesteps: its scheduler's steps where fastguide reproduces them (a
    # Heun scheduler counts each of its two stages), fastguide's own sampler's otherwise
    own_steps = steps if isinstance(steps, int) else len(steps)
    pipe._num_timesteps = own_steps if options.sampler is not None else len(pipe.scheduler.timesteps)
    return denoising.finish(_denoise(pipe, denoising))


def _check_latent_rows(arguments: dict, denoising: recipes.Denoising) -> None:
    """Refuse ``latents`` of another batch than the prompts times num_images_per_prompt,
    naming the argument, where diffusers' loop fails on the mismatch (the loop's own check
    would name its conditioning's keys, and would broadcast embeddings of one row)."""
    rows = recipes.latent_rows(arguments)
    if denoising.noise.shape[0] != rows:
        raise ValueError(
            f"latents must hold {rows} rows (the prompts times num_images_per_prompt) on dim 0, "
            f"got shape {tuple(denoising.noise.shape)}"
        )


def _generator_states(generator: object, device: torch.device) -> list[tuple[torch.Generator, Tensor]]:
    """The call's generator(s), each with its state before the call; without one, the global
    generator of ``device`` (the pipeline's), which diffusers' randn_tensor then draws from."""
    if generator is None:
        device = torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            generator = torch.cuda.default_generators[index]
        elif device.type == "cpu":
            generator = torch.default_generator
        # (another device's global generator, which diffusers would draw from: not kept)
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    return [(g, g.get_state()) for g in generators if isinstance(g, torch.Generator)]


def _denoise(pipe, denoising: recipes.Denoising) -> Tensor:
    """fastguide's loop from the pipeline's prepared latents and conditioning."""
    options = pipe.fastguide_options
    settings = denoising.sampling
    # The sampler (and its captured graphs) is kept for the same settings, schedule (by
    # value), network and guidance; anything else builds a new one.
    key = (
        tuple(sorted((k, v.cache_key if isinstance(v, NoiseSchedule) else repr(v)) for k, v in settings.items())),
        id(denoising.denoiser.network),
        denoising.guidance,
    )
    graphs = options.cuda_graph
    hooked = per_forward_hook(denoising.denoiser) if graphs else None
    if hooked:  # (CPU offloading, diffusers' caches): the loop runs, without graphs
        warnings.warn(
            f"fastguide: cuda_graph=True not applied: {hooked} runs at each forward, which a graph's replay "
            "does not; this call runs fastguide's loop without graphs",
            stacklevel=3,
        )
        graphs = False
    sampler = pipe._fastguide_samplers.get(key) if graphs else None
    if sampler is None:
        sampler = GuidedSampler(
            denoising.denoiser,
            guidance=denoising.guidance,
            cuda_graph=graphs,
            cache=options.cache,
            **settings,
        )
        if graphs:  # graphs are worth keeping only when captured
            pipe._fastguide_samplers = {key: sampler}
    progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    latents = sampler(
        tuple(denoising.noise.shape),
        noise=denoising.noise,
        labels=denoising.labels,
        cond=denoising.cond,
        uncond=denoising.uncond,
        generator=denoising.generator,
        progress=progress,
    )
    generator = denoising.generator
    # diffusers' stochastic schedulers also draw the noise their last step multiplies by 0:
    # drawn here too (as fastguide's loop draws, in its dtype on the generator's device, or
    # without a generator from the latents' device's global RNG, as diffusers' randn_tensor),
    # the generator ends the call where diffusers' leaves it
    for _ in range(denoising.draws - sampler.noise_draws):
        assert generator is None or isinstance(generator, torch.Generator)  # (a list draws nothing: _step_generator)
        device = latents.device if generator is None else generator.device
        torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    return latents

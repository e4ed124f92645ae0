"""``fastguide sample --pipeline DIR --prompt ...``: a diffusers pipeline saved in a local
folder, accelerated (``fastguide.accelerate``), sampled from prompts into a PNG grid.

The folder is what ``pipe.save_pretrained(DIR)`` writes (model_index.json and one folder
per component); nothing is downloaded. ``--pag-scale`` loads the pipeline's PAG variant
(diffusers' ``AutoPipelineForText2Image`` with ``enable_pag``). The digits-model options
(--model, --labels, --guidance, ...) do not apply and are refused when given.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .options import (
    DEFAULT_GRID,
    SEED_STRIDE,
    UsageError,
    atomic_path,
    check_at_least,
    check_backend,
    check_batch_seeds,
    check_grid_fits,
    check_image_file,
    check_modules,
    check_scale,
    parse_device,
    torchrun_world_size,
)

# Options of the digits models that a pipeline has no use for: (dest, flag, default).
DIGITS_ONLY = (
    ("model", "--model", "digits"),
    ("checkpoint", "--checkpoint", None),
    ("classifier_checkpoint", "--classifier-checkpoint", None),
    ("labels", "--labels", "0-9"),
    ("guidance", "--guidance", "cfg"),
    ("schedule", "--schedule", "constant"),
    ("interval", "--interval", None),
    ("tangential", "--tangential", False),
    ("classifier_scale", "--classifier-scale", None),
    ("npz", "--npz", None),
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check(args: argparse.Namespace) -> None:
    """The options of a pipeline run, before anything loads; sets args.device."""
    given = [flag for dest, flag, default in DIGITS_ONLY if getattr(args, dest) != default]
    if given:
        raise UsageError(given[0], "applies to the digits and ADM models, not to --pipeline")
    if torchrun_world_size() > 1:
        raise UsageError(
            "--pipeline",
            "runs in one process: under torchrun every rank would sample every image and write "
            "the same files (the digits and ADM models split their batches over the ranks)",
        )
    check_modules("--pipeline", "diffusers", "transformers", extra="diffusers")
    folder = Path(args.pipeline)
    if not (folder / "model_index.json").is_file():
        raise UsageError(
            "--pipeline",
            f"expected a folder written by a diffusers pipeline's save_pretrained "
            f"(with model_index.json), got {str(folder)!r}",
        )
    if args.prompt is None:
        raise UsageError("--prompt", "is required with --pipeline")
    check_at_least("--num-samples", args.num_samples, high=10_000)
    check_at_least("--batch-size", args.batch_size)
    check_at_least("--steps", args.steps, high=1000)
    if args.scale is not None:
        check_scale("--scale", args.scale)
        # diffusers' pipelines guide only above 1 (do_classifier_free_guidance: scale > 1);
        # at or below it they sample the conditional model and drop the negative prompt
        if args.scale < 1:
            raise UsageError(
                "--scale",
                f"a diffusers pipeline guides only with a scale above 1 and samples the conditional "
                f"model alone at or below it (give 1 for that), got {args.scale:g}",
            )
        if args.scale == 1 and args.negative_prompt is not None:
            raise UsageError(
                "--negative-prompt",
                "is the unconditional branch of CFG, which a diffusers pipeline runs only with --scale above 1",
            )
    if args.pag_scale is not None:
        check_scale("--pag-scale", args.pag_scale)
    check_batch_seeds(args.num_samples, args.batch_size, args.seed)
    if args.spacing is not None and args.sampler is None:
        raise UsageError(
            "--spacing",
            "places fastguide's own sampler's steps: with --pipeline it needs --sampler "
            "(without one, the pipeline's scheduler is reproduced, its steps with it)",
        )
    if args.spacing == "adm":  # the CLI's adm is the models' strided grid, which accelerate() does not place
        raise UsageError(
            "--spacing",
            "adm (ADM's strided ddimN grid) applies to the digits and ADM models; a pipeline's sampler "
            "takes leading, trailing, linspace, logsnr or karras",
        )
    if args.sampler is not None:
        _check_sampler_fits(args.sampler, folder)
    else:
        _check_scheduler_steps(args.steps, folder)
    args.device = parse_device(args.device)
    check_backend(args.backend, args.device)
    if args.out is None:
        args.out = DEFAULT_GRID
    check_image_file("--out", args.out, "RGB")


def _scheduler_config(folder: Path) -> dict:
    """The saved scheduler's config, read before anything loads; {} where it cannot be read
    (loading the pipeline then names what is wrong with its scheduler)."""
    try:
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _check_scheduler_steps(steps: int, folder: Path) -> None:
    """--steps that the saved scheduler, run as it is, takes: diffusers' PNDMScheduler with
    its Runge–Kutta start (skip_prk_steps false) fails in set_timesteps below 4 steps (a
    NumPy broadcast error from deep inside diffusers)."""
    config = _scheduler_config(folder)
    if config.get("_class_name") == "PNDMScheduler" and not config.get("skip_prk_steps", False) and steps < 4:
        raise UsageError(
            "--steps",
            f"the pipeline's PNDMScheduler starts with Runge–Kutta steps (skip_prk_steps false), which "
            f"diffusers runs only from 4 steps, got {steps} (or give --sampler for fastguide's own)",
        )


def _check_sampler_fits(sampler: str, folder: Path) -> None:
    """--sampler runs on the saved scheduler's kind of path (read from its config, before
    anything loads): a FlowMatch scheduler's flow path, any other's variance-preserving
    schedule (sampling.solvers.check_sampler)."""
    from ..sampling.schedule import NoiseSchedule
    from ..sampling.solvers import check_sampler

    config = _scheduler_config(folder)
    if not config:
        return
    name = config.get("_class_name", "")
    flow = str(name).startswith("FlowMatch")
    try:
        check_sampler(sampler, NoiseSchedule.flow() if flow else NoiseSchedule.linear())
    except ValueError as error:
        raise UsageError("--sampler", f"{error} ({name}'s {'flow path' if flow else 'schedule'})") from None


def _from_pretrained(args: argparse.Namespace, dtype: torch.dtype):
    """The saved pipeline, from local files only (its PAG variant with --pag-scale)."""
    import diffusers

    if args.pag_scale is not None:
        return diffusers.AutoPipelineForText2Image.from_pretrained(
            args.pipeline, enable_pag=True, torch_dtype=dtype, local_files_only=True
        )
    return diffusers.DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype, local_files_only=True)


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """With ``quiet`` (--quiet), diffusers' and transformers' loading progress bars off while
    loading, then as they were (the setting is process-wide)."""
    if not quiet:
        yield
        return
    import diffusers.utils.logging as diffusers_logging

    modules: list = [diffusers_logging]
    try:  # (a pipeline without text encoders loads without transformers)
        import transformers.utils.logging as transformers_logging

        modules.append(transformers_logging)
    except ImportError:
        pass
    enabled = [module.is_progress_bar_enabled() for module in modules]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was in zip(modules, enabled):
            if was:
                module.enable_progress_bar()


def load(args: argparse.Namespace):
    """The saved pipeline (its PAG variant with --pag-scale), accelerated, on --device."""
    from ..pipelines.accelerate import accelerate

    dtype = DTYPES[args.precision]
    try:
        with _quiet_loading(args.quiet):
            pipe = _from_pretrained(args, dtype)
    except (OSError, ValueError, TypeError, AttributeError, ImportError, KeyError) as error:
        # (AttributeError: a pipeline class this diffusers does not have, as a newer one saves;
        # KeyError: a model_index.json without the entries diffusers reads, such as _class_name)
        raise UsageError(
            "--pipeline" if args.pag_scale is None else "--pag-scale",
            f"could not load the pipeline in {str(args.pipeline)!r}: {error}",
        ) from None
    if "prompt" not in inspect.signature(type(pipe).__call__).parameters:
        raise UsageError("--pipeline", f"{type(pipe).__name__} takes no prompt (a class-conditional pipeline)")
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=args.quiet)
    try:
        return accelerate(pipe, sampler=args.sampler, spacing=args.spacing)
    except TypeError as error:
        raise UsageError("--pipeline", str(error)) from None


def run(args: argparse.Namespace) -> int:
    """Sample --num-samples images in batches of --batch-size (batch b seeded with
    seed · SEED_STRIDE + b, as the digits models' batches: runs of other seeds share none)
    and write them as one PNG grid."""
    from ..ops import backends
    from .cli import save_grid

    with backends.backend(args.backend) if args.backend is not None else contextlib.nullcontext():
        return _sample(args, save_grid)


def _sample(args: argparse.Namespace, save_grid) -> int:
    from .cli import grid_pixels

    pipe = load(args)
    options = {"num_inference_steps": args.steps, "output_type": "pt"}
    if args.scale is not None:
        options["guidance_scale"] = args.scale
    if args.negative_prompt is not None:
        options["negative_prompt"] = args.negative_prompt
    if args.pag_scale is not None:
        options["pag_scale"] = args.pag_scale
    images, fallbacks = [], set()
    for batch, start in enumerate(range(0, args.num_samples, args.batch_size)):
        count = min(args.batch_size, args.num_samples - start)
        generator = torch.Generator().manual_seed(args.seed * SEED_STRIDE + batch)
        images.append(pipe(args.prompt, num_images_per_prompt=count, generator=generator, **options).images.cpu())
        if batch == 0:  # the samples' size is known from the first batch on: stop before the rest
            height, width = images[0].shape[-2:]
            columns = min(10, args.num_samples)
            check_grid_fits("--out", args.out, *grid_pixels(args.num_samples, height, width, columns, 1))
        if pipe.fastguide_fallback is not None:
            fallbacks.add(pipe.fastguide_fallback)
    # [0, 1] -> save_grid's uint8 NHWC, rounded as diffusers' numpy_to_pil rounds
    pixels = (torch.cat(images).float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with atomic_path(args.out) as scratch:  # never a partial PNG at --out
        save_grid(pixels, scratch, columns=min(10, len(pixels)), scale=1)
    # (messages after the file: a reader that stopped early ends the command at a print)
    for reason in sorted(fallbacks):
        print(f"fastguide: diffusers' own loop ran: {reason}")
    print(f"wrote {len(pixels)} samples to {args.out}")
    return 0

"""The ``fastguide`` command (also ``python -m fastguide``).

    fastguide sample   guided samples from the shipped digits model
    fastguide sweep    accuracy, Fréchet distance and diversity against guidance scale
    fastguide train    retrain the digits model, its noisy classifier, its evaluator, its guide and
                       the flow transformer
    fastguide bench    the benchmark suite (python -m fastguide bench)
    fastguide selfcheck  the four ops against their formulas

Bad input ends with one line on stderr, ``fastguide: error: --option: what was expected,
got X``, and exit status 2, never a traceback (the checks live in fastguide.apps.options).
Each subcommand's options are checked by one function (``check_sample``, ``check_sweep``,
…) right after parsing, before any model is loaded or any sample drawn; files that can
only be judged by reading them (broken checkpoints) fail the same way when loaded. Output
files are written to a scratch file beside the target and moved over it (``os.replace``)
once complete, so a run that fails leaves no empty or partial file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import select
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..ops import backends
from ..ops.validation import FLOAT32_MAX
from ..sampling.schedule import SPACINGS, NoiseSchedule
from ..sampling.solvers import SAMPLERS
from .options import (
    DEFAULT_GRID,
    MAX_SAMPLES,
    SEED_STRIDE,
    Parser,
    UsageError,
    atomic_path,
    check_at_least,
    check_backend,
    check_batch_seeds,
    check_digits_folder,
    check_grid_fits,
    check_image_file,
    check_modules,
    check_output_file,
    check_output_folder,
    check_plot_file,
    check_scale,
    check_seed,
    check_steps,
    check_weights_file,
    existing_ancestor,
    fail,
    load_weights,
    npz_path,
    parse_device,
    parse_labels,
    torchrun_world_size,
)

GUIDANCE = ("cfg", "cfg++", "auto", "classifier", "both", "none")
DIGITS_NETWORKS = ("unet", "classifier", "evaluator")  # what a --checkpoint folder of --model digits holds
CLASSIFIER_SCALE = 4.0  # --classifier-scale's default for the digits models
# and for ADM's releases, the scale guided-diffusion's README samples each with
ADM_CLASSIFIER_SCALES = {"adm64": 1.0, "adm128": 0.5, "adm256": 1.0, "adm256-uncond": 10.0, "adm512": 4.0}
CFG_KINDS = ("cfg", "cfg++", "both")  # the kinds --schedule and --tangential apply to
# A sweep row's samples are one batch: its peak memory was 0.94 GB at 2000 samples and
# 2.2 GB at 8000 (the digits UNet on CPU, 2026-12-07), about 0.2 MB a sample, so 20,000 take
# about 5 GB where ten million (the cap it shared with sample) would have taken 2 TB.
MAX_SWEEP_SAMPLES = 20_000
INTERVAL_KINDS = (*CFG_KINDS, "auto")  # AutoGuidance takes an interval too, but a constant w


# ---------------------------------------------------------------------------------------
# Sampling.


@dataclass
class SamplingModel:
    """What ``fastguide sample`` samples from: the UNet, an optional noisy classifier, the
    image shape, the training schedule (sampled on its strided_timesteps grid) and, for
    autoguidance, an optional weaker guide UNet."""

    unet: torch.nn.Module  # the denoiser (for digits-transformer, the flow transformer)
    classifier: torch.nn.Module | None
    shape: tuple[int, int, int]
    num_classes: int
    schedule: NoiseSchedule
    guide: torch.nn.Module | None = None
    prediction_type: str = "epsilon"


LABELS_DEFAULT = "0-9"
SWEEP_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)  # fastguide sweep --scales
# The released ADM models' training schedules (their noise_schedule flags).
ADM_SCHEDULES = {
    "adm64": "cosine",
    "adm128": "linear",
    "adm256": "linear",
    "adm256-uncond": "linear",  # unconditional: its labels are the classifier's
    "adm512": "linear",
}
# digits-transformer: the digits' flow-matching transformer (velocity on a flow path).
MODELS = ("digits", "digits-transformer", *ADM_SCHEDULES)


def model_schedule(name: str) -> NoiseSchedule:
    """The training schedule of --model ``name``."""
    from . import digits

    if name == "digits":
        return digits.schedule()
    if name == "digits-transformer":
        return digits.flow_schedule()
    return NoiseSchedule.cosine() if ADM_SCHEDULES[name] == "cosine" else NoiseSchedule.linear()


def load_sampling_model(
    name: str, checkpoint: Path | None, classifier_checkpoint: Path | None, device: torch.device, precision: str
) -> SamplingModel:
    """The networks of --model ``name`` on ``device``; broken checkpoints raise UsageError."""
    from ..models.checkpoints import load_checkpoint
    from ..models.configs import (
        classifier_config,
        create_classifier,
        create_model,
        unet_config,
    )
    from . import digits

    if name == "digits":
        folder = checkpoint or digits.WEIGHTS
        # (the UNet and its networks: the flow transformer is --model digits-transformer's)
        models = load_weights("--checkpoint", folder, lambda: digits.load(device, weights=folder, transformer=False))
        if classifier_checkpoint is not None:
            load_weights(
                "--classifier-checkpoint",
                classifier_checkpoint,
                lambda: load_checkpoint(models.classifier, classifier_checkpoint),
            )
        bundle = SamplingModel(
            models.unet,
            models.classifier,
            (1, digits.IMAGE_SIZE, digits.IMAGE_SIZE),
            digits.NUM_CLASSES,
            model_schedule(name),
            models.guide,
        )
    elif name == "digits-transformer":
        folder = checkpoint or digits.WEIGHTS
        transformer = load_weights("--checkpoint", folder, lambda: digits.load_transformer(device, folder))
        bundle = SamplingModel(
            transformer,
            None,
            (1, digits.IMAGE_SIZE, digits.IMAGE_SIZE),
            digits.NUM_CLASSES,
            model_schedule(name),
            prediction_type="flow_prediction",
        )
    else:
        assert checkpoint is not None  # an ADM model's is required (_check_sample_weights)
        # The presets hold the releases' use_fp16=True; --precision decides it here (fp16:
        # ADM's fp16 convolutions, converted below; fp32: the model in fp32, as its help says).
        unet = load_weights(
            "--checkpoint",
            checkpoint,
            lambda: load_checkpoint(create_model(**{**unet_config(name), "use_fp16": False}), checkpoint),
        )
        classifier = None
        if classifier_checkpoint is not None:
            classifier = load_weights(
                "--classifier-checkpoint",
                classifier_checkpoint,
                lambda: load_checkpoint(create_classifier(**classifier_config(name)), classifier_checkpoint),
            )
        size = unet.image_size
        bundle = SamplingModel(unet, classifier, (3, size, size), 1000, model_schedule(name))
    for module in (bundle.unet, bundle.classifier, bundle.guide):
        if module is not None:
            module.to(device).eval()
            # (the classifier stays float32, as guided-diffusion's README samples beside an fp16 UNet)
            if precision == "fp16" and module is not bundle.classifier and hasattr(module, "convert_to_fp16"):
                # ADM's use_fp16: convolutions in fp16, norms in fp32 (the ignore: nn.Module's __getattr__
                # stub gives a tensor or a module, not the method hasattr found)
                module.convert_to_fp16()  # type: ignore[operator]
    return bundle


def _guidance(
    kind: str, scale: float, classifier_scale: float, model: SamplingModel, cfg_options: dict | None = None
) -> tuple | None:
    """The sampler's guidance specs for --guidance ``kind`` (checked by check_sample);
    ``cfg_options`` (schedule, interval, tangential; for auto, interval only) go to the
    CFG, CFG++ or AutoGuidance spec."""
    from ..sampling.guidance import CFG, AutoGuidance, CFGPlusPlus, ClassifierGuidance, Guidance

    cfg_options = cfg_options or {}
    cfg: Guidance | None = CFG(scale, **cfg_options) if kind in ("cfg", "both") else None
    if kind == "cfg++":
        cfg = CFGPlusPlus(scale, **cfg_options)
    if kind == "auto":
        assert model.guide is not None  # checked by check_sample (_check_guide)
        cfg = AutoGuidance(model.guide, scale, **cfg_options)
    clf = None
    if kind in ("classifier", "both"):
        assert model.classifier is not None  # checked by check_sample (the digits model has one)
        clf = ClassifierGuidance(model.classifier, classifier_scale)
    return tuple(g for g in (cfg, clf) if g is not None) or None


def _grid(schedule: NoiseSchedule, steps: int, spacing: str | None) -> list[float]:
    """The timesteps of --steps and --spacing (None: the schedule's default; "adm": the
    strided grid, which stops a stride short of t = T − 1; a flow schedule refuses it)."""
    if spacing == "adm" and not schedule.is_flow:
        return schedule.strided_timesteps(steps)
    return schedule.spaced_timesteps(steps, spacing or schedule.default_spacing)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), ADM's .npz layout and conversion:
    (x + 1)·127.5 clamped to [0, 255], then truncated, as guided-diffusion's
    image_sample.py and classifier_sample.py write their samples (rounding would put about
    half the pixels one level above ADM's own)."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(pixels: np.ndarray, path: Path, columns: int, scale: int | None = None) -> None:
    """A PNG grid of uint8 (N, H, W, C) samples, each upscaled ``scale``× (nearest) with a
    1-pixel gap; by default as many times as brings a side to 32 pixels (the 8×8 digits
    4×, ADM's images not at all: 100 samples of adm512 upscaled 4× would be a 1.3 GB image)."""
    from PIL import Image

    n, h, w, c = pixels.shape
    scale = grid_scale(h, w) if scale is None else scale
    rows = -(-n // columns)
    grid = Image.new("L" if c == 1 else "RGB", (columns * (w + 1) + 1, rows * (h + 1) + 1), color=255)
    for i in range(n):
        tile = Image.fromarray(pixels[i, :, :, 0] if c == 1 else pixels[i])
        grid.paste(tile, (1 + (i % columns) * (w + 1), 1 + (i // columns) * (h + 1)))
    # (Image.NEAREST: Pillow sets its resampling names at import, where its type hints do not see them)
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)  # type: ignore[attr-defined]


def grid_scale(h: int, w: int) -> int:
    """save_grid's default upscaling of h × w samples."""
    return max(1, 32 // max(h, w))


def grid_pixels(n: int, h: int, w: int, columns: int, scale: int) -> tuple[int, int]:
    """(width, height) of save_grid's image of n h × w samples."""
    rows = -(-n // columns)
    return (columns * (w + 1) + 1) * scale, (rows * (h + 1) + 1) * scale


def generate(
    model: SamplingModel,
    labels: torch.Tensor,
    *,
    guidance_kind: str,
    scale: float,
    classifier_scale: float,
    sampler: str,
    steps: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    cfg_options: dict | None = None,
    spacing: str | None = None,
) -> dict[int, torch.Tensor]:
    """{batch index: samples} for this rank's batches (round-robin over ranks). Each batch
    draws from its own seed stream (seed, batch index), so any split of the batches across
    processes gives exactly the images of a single-process run."""
    from ..sampling.loop import sample

    guidance = _guidance(guidance_kind, scale, classifier_scale, model, cfg_options)
    # an unconditional model's labels are the classifier's: without it, none
    labelled = uses_labels(model, guidance_kind)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    out = {}
    batches = range(rank, -(-len(labels) // batch_size), world_size)
    # one bar over the model calls of a single batch, over the batches of several
    batch_bar = progress and len(batches) > 1
    if batch_bar:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"{len(labels)} samples, batches of {batch_size}")  # type: ignore[assignment]
    for index in batches:
        batch_labels = labels[index * batch_size : (index + 1) * batch_size].to(device)
        generator = torch.Generator(device).manual_seed(seed * SEED_STRIDE + index)
        with autocast:
            images = sample(
                model.unet,
                (len(batch_labels), *model.shape),
                labels=batch_labels if labelled else None,
                sampler=sampler,
                steps=_grid(model.schedule, steps, spacing),
                schedule=model.schedule,
                guidance=guidance,
                prediction_type=model.prediction_type,
                clip_denoised=True,  # every --model draws pixels in [−1, 1], the flow one too
                generator=generator,
                device=device,
                progress=progress and not batch_bar,
            )
        out[index] = images.float().cpu()
    return out


def _unet_flags(name: str) -> dict:
    """ADM's script flags of --model ``name`` (an ADM preset)."""
    from ..models.configs import unet_config

    return unet_config(name)


def uses_labels(model: SamplingModel, guidance_kind: str) -> bool:
    """Whether a run reads its labels: a class-conditional model's, or a classifier's."""
    return getattr(model.unet, "num_classes", None) is not None or guidance_kind in ("classifier", "both")


# torchrun starts its ranks together: joining takes seconds, and a process that waits
# longer (one that inherited WORLD_SIZE from a torchrun job it is not a rank of) stops.
JOIN_TIMEOUT = datetime.timedelta(minutes=5)
# A rank with fewer batches waits in the gather for rank 0's last (a rank with none, for
# the whole run): torch's default timeouts (10 min under NCCL, 30 under gloo) would end a
# long run there and lose every sample.
GATHER_TIMEOUT = datetime.timedelta(days=7)


def _distributed(device: torch.device) -> tuple[int, int, torch.device, Any]:
    """(rank, world size, device, gather group) under torchrun (WORLD_SIZE > 1; else rank
    0 of 1 and no group). The ranks exchange nothing but the finished samples, uint8 on the
    host, so one gloo group serves CPU and GPU runs (under NCCL, gather_object would stage
    every rank's share on rank 0's GPU). On CUDA each rank samples on cuda:LOCAL_RANK."""
    world_size = torchrun_world_size()
    if world_size == 1:
        return 0, 1, device, None
    import torch.distributed as dist

    if device.type == "cuda":
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= visible:
            raise UsageError(
                "--device",
                f"under torchrun rank {local_rank} of this node samples on cuda:{local_rank} (LOCAL_RANK), but "
                f"{visible} CUDA device(s) are visible: start at most {visible} processes a node",
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # the rendezvous's store timing out: no other rank came, or none could be reached
    # (ValueError: the env:// rendezvous missing RANK, MASTER_ADDR or MASTER_PORT, as with
    # WORLD_SIZE set outside torchrun)
    unjoined = (*(getattr(dist, name, RuntimeError) for name in ("DistStoreError", "DistNetworkError")), ValueError)
    try:
        dist.init_process_group("gloo", timeout=JOIN_TIMEOUT)
    except unjoined as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            "WORLD_SIZE",
            f"is {world_size} in the environment, but the ranks did not meet at MASTER_ADDR:MASTER_PORT ({reason}): "
            "start 'fastguide sample' under torchrun, or unset WORLD_SIZE (a process started by a torchrun job "
            "inherits it); across nodes, gloo may need GLOO_SOCKET_IFNAME set to the network interface",
        ) from error
    return dist.get_rank(), world_size, device, dist.new_group(backend="gloo", timeout=GATHER_TIMEOUT)


# ---------------------------------------------------------------------------------------
# Subcommands: check_<name>(args) validates and parses the options (replacing text by
# parsed values), cmd_<name>(args) does the work.


def check_sample(args: argparse.Namespace) -> None:
    """Every option of ``fastguide sample``; sets args.device and args.label_ids."""
    from . import digits

    if args.pipeline is not None:
        from . import pipeline_sample

        return pipeline_sample.check(args)
    for dest, flag in (("prompt", "--prompt"), ("negative_prompt", "--negative-prompt"), ("pag_scale", "--pag-scale")):
        if getattr(args, dest) is not None:
            raise UsageError(flag, "applies to --pipeline only (the digits and ADM models take --labels)")

    if args.model not in MODELS:
        raise UsageError("--model", f"expected one of {', '.join(MODELS)}, got {args.model!r}")
    adm = args.model in ADM_SCHEDULES
    check_at_least("--num-samples", args.num_samples, high=MAX_SAMPLES)
    check_at_least("--batch-size", args.batch_size)
    check_steps(args.steps, model_schedule(args.model), args.model, args.spacing)
    try:
        _grid(model_schedule(args.model), args.steps, args.spacing)
    except ValueError as error:
        raise UsageError("--spacing", str(error)) from None
    _guidance_defaults(args)
    check_sampler_fits("--sampler", args.sampler, args.model)
    check_scale("--scale", args.scale)
    check_scale("--classifier-scale", args.classifier_scale)
    _check_cfg_options(args)
    check_batch_seeds(args.num_samples, args.batch_size, args.seed)
    args.label_ids = parse_labels(args.labels, args.num_samples, 1000 if adm else digits.NUM_CLASSES)
    # an unconditional model (adm256-uncond) reads labels only through classifier guidance
    args.unconditional = (
        adm and not _unet_flags(args.model)["class_cond"] and args.guidance not in ("classifier", "both")
    )
    if args.unconditional and args.labels != LABELS_DEFAULT:
        raise UsageError(
            "--labels", f"--model {args.model} is unconditional: labels apply with --guidance classifier only"
        )
    args.device = parse_device(args.device)
    check_backend(args.backend, args.device)
    if args.precision == "fp16" and args.model == "digits-transformer":  # it would run in fp32 without a word
        raise UsageError(
            "--precision",
            "fp16 is ADM's use_fp16 (a UNet's convolutions in fp16), which --model "
            "digits-transformer does not have: use fp32 or bf16 (autocast)",
        )
    if args.out is None and args.npz is None:
        args.out = DEFAULT_GRID
    if args.out is not None:
        check_image_file("--out", args.out, "RGB" if adm else "L")
        from ..models.configs import unet_config

        side = unet_config(args.model)["image_size"] if adm else digits.IMAGE_SIZE
        columns = min(10, args.num_samples)
        check_grid_fits("--out", args.out, *grid_pixels(args.num_samples, side, side, columns, grid_scale(side, side)))
    if args.npz is not None:
        check_output_file("--npz", args.npz)  # a folder: np.savez would write FOLDER.npz beside it
        check_output_file("--npz", npz_path(args.npz))
    _check_sample_weights(args, adm)


def check_sampler_fits(option: str, sampler: str, model: str) -> None:
    """``sampler`` runs on the schedule of --model ``model`` (sampling.solvers.check_sampler:
    ddpm, euler-ancestral and dpm++2m-sde need a variance-preserving schedule,
    euler-maruyama a flow path)."""
    from ..sampling.solvers import check_sampler

    schedule = model_schedule(model)

    def fits(name: str) -> bool:
        try:
            check_sampler(name, schedule)
        except ValueError:
            return False
        return True

    if not fits(sampler):
        kind = "flow path" if schedule.is_flow else "variance-preserving schedule"
        raise UsageError(
            option,
            f"expected one of {', '.join(s for s in SAMPLERS if fits(s))} for the {kind} of "
            f"--model {model}, got {sampler}",
        )


CFG_PLUS_PLUS_SCALE = 0.4  # CFG++'s λ: the digits UNet's best in `fastguide sweep` (the transformer's: 0.2)


def _guidance_defaults(args: argparse.Namespace) -> None:
    """--scale, --classifier-scale and --sampler when not given: w = 2 (λ = 0.4 under
    cfg++, whose λ lies in [0, 1]), 4 (an ADM release's own scale, ADM_CLASSIFIER_SCALES),
    and unipc (dpm++2m under cfg++, see sampling.guidance.default_sampler); a scale the
    --guidance does not use is refused."""
    from ..sampling.guidance import default_sampler

    if args.scale is not None and args.guidance in ("none", "classifier"):
        raise UsageError("--scale", f"applies to --guidance cfg, cfg++, auto, both, not {args.guidance}")
    if args.classifier_scale is not None and args.guidance not in ("classifier", "both"):
        raise UsageError("--classifier-scale", f"applies to --guidance classifier, both, not {args.guidance}")
    if args.classifier_scale is None:
        args.classifier_scale = ADM_CLASSIFIER_SCALES.get(args.model, CLASSIFIER_SCALE)
    plus_plus = args.guidance == "cfg++"
    if args.scale is None:
        args.scale = CFG_PLUS_PLUS_SCALE if plus_plus else 2.0
    if args.sampler is None:
        args.sampler = default_sampler(plus_plus, args.interval is not None)


def _check_cfg_options(args: argparse.Namespace) -> None:
    """--guidance cfg++ and auto, --schedule, --interval and --tangential; sets args.cfg_options."""
    if args.guidance == "cfg++":
        if args.scale > 1:
            raise UsageError("--scale", f"expected CFG++'s λ in [0, 1] with --guidance cfg++, got {args.scale}")
        from ..sampling.guidance import CFGPlusPlus

        if args.sampler not in CFGPlusPlus.SAMPLERS:
            raise UsageError(
                "--sampler", f"--guidance cfg++ is built for {', '.join(CFGPlusPlus.SAMPLERS)}, got {args.sampler}"
            )
        if args.sampler == "dpm++2m" and args.interval is not None:
            raise UsageError(
                "--interval",
                "--guidance cfg++ on dpm++2m reads every call's unconditional x0, which "
                "calls outside an interval do not compute: use --sampler ddim or euler",
            )
        for option, on in (("--tangential", args.tangential), ("--schedule", args.schedule != "constant")):
            if on:
                raise UsageError(option, "applies to --guidance cfg or both, not cfg++ (a constant λ)")
    cfg_only = [
        name for name, on in (("--schedule", args.schedule != "constant"), ("--tangential", args.tangential)) if on
    ]
    if cfg_only and args.guidance == "auto":
        raise UsageError(
            cfg_only[0],
            "applies to --guidance cfg or both, not auto (autoguidance takes a constant w; --interval does apply)",
        )
    if cfg_only and args.guidance not in CFG_KINDS:
        raise UsageError(cfg_only[0], f"applies to --guidance {', '.join(CFG_KINDS)}, got --guidance {args.guidance}")
    if args.interval and args.guidance not in INTERVAL_KINDS:
        raise UsageError(
            "--interval", f"applies to --guidance {', '.join(INTERVAL_KINDS)}, got --guidance {args.guidance}"
        )
    if args.schedule != "constant":
        check_schedule_peak("--scale", args.schedule, args.scale)
    options: dict = {} if args.guidance == "auto" else {"schedule": args.schedule}
    if args.interval:
        options["interval"] = _checked_interval(args.interval)
    if args.tangential:
        options["tangential"] = True
    args.cfg_options = options


def _checked_interval(interval: list[float]) -> tuple[float, float]:
    """--interval LOW HIGH as a pair, 0 <= LOW < HIGH."""
    low, high = interval
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        raise UsageError("--interval", f"expected LOW HIGH with 0 <= LOW < HIGH (EDM's σ̃), got {low} {high}")
    return low, high


def _check_sample_weights(args: argparse.Namespace, adm: bool) -> None:
    """The checkpoints sample reads, and the guidance they allow."""
    from ..models.configs import unet_config

    if adm:
        if args.checkpoint is None:
            raise UsageError(
                "--checkpoint",
                f"expected the guided-diffusion .pt or .safetensors file of --model {args.model}, got none",
            )
        check_weights_file("--checkpoint", args.checkpoint)
    elif args.checkpoint is not None:  # (digits-transformer reads its own network alone: _check_transformer)
        check_digits_folder(
            "--checkpoint", args.checkpoint, () if args.model == "digits-transformer" else DIGITS_NETWORKS
        )
    if args.model == "digits-transformer":
        _check_transformer(args)
    if args.classifier_checkpoint is not None:
        if args.guidance == "auto":  # the sampler has no autoguidance-plus-classifier mode to put it in
            raise UsageError(
                "--classifier-checkpoint",
                "--guidance auto guides with the weaker guide network, "
                "not a classifier: use --guidance classifier or both",
            )
        if args.guidance not in ("classifier", "both"):  # it would be loaded and never used
            raise UsageError(
                "--classifier-checkpoint",
                f"--guidance {args.guidance} uses no classifier: use --guidance classifier or both, or leave it out",
            )
        check_weights_file("--classifier-checkpoint", args.classifier_checkpoint)
    if args.guidance == "auto":
        _check_guide(args, adm)
    if not adm:
        return  # the digits model has a null class and a classifier
    if args.guidance in CFG_KINDS and not unet_config(args.model).get("null_class", False):
        raise UsageError(
            "--guidance",
            f"{args.guidance} needs a model with a null class, and the released ADM "
            "models have none: use --guidance classifier or none",
        )
    if args.guidance in ("classifier", "both") and args.classifier_checkpoint is None:
        raise UsageError("--guidance", f"{args.guidance} needs --classifier-checkpoint with --model {args.model}")


def _check_transformer(args: argparse.Namespace) -> None:
    """--model digits-transformer: its weights exist, and the guidance is one it has (CFG;
    no noisy classifier or guide network is trained for its flow path)."""
    from . import digits

    weights = digits.transformer_file(args.checkpoint or digits.WEIGHTS)
    if not weights.is_file():
        raise UsageError(
            "--model",
            f"digits-transformer needs {weights}, which is missing: "
            f"'fastguide train --only transformer --out {weights.parent}' writes it",
        )
    check_weights_file("--checkpoint", weights)
    if args.guidance not in ("cfg", "cfg++", "none"):
        raise UsageError(
            "--guidance",
            f"--model digits-transformer has classifier-free guidance only (cfg, cfg++ or none), got {args.guidance}",
        )
    if args.classifier_checkpoint is not None:
        raise UsageError("--classifier-checkpoint", "--model digits-transformer has no classifier guidance")


def _check_guide(args: argparse.Namespace, adm: bool) -> None:
    """--guidance auto: the model has a guide network (digits_guide.safetensors)."""
    from . import digits

    if adm:
        raise UsageError(
            "--guidance",
            f"auto needs a weaker guide network, which only --model digits has, not "
            f"{args.model}: use --guidance classifier or none",
        )
    guide = digits.guide_file(args.checkpoint or digits.WEIGHTS)
    if not guide.is_file():
        raise UsageError(
            "--guidance",
            f"auto needs the guide network {guide}, which is missing: "
            f"'fastguide train --only guide --out {guide.parent}' adds it",
        )
    check_weights_file("--checkpoint", guide)


def cmd_sample(args: argparse.Namespace) -> int:
    if args.pipeline is not None:
        from . import pipeline_sample

        return pipeline_sample.run(args)
    rank, world_size, device, gather_group = _distributed(args.device)
    chosen = backends.backend(args.backend) if args.backend is not None else contextlib.nullcontext()
    with chosen:
        model = load_sampling_model(args.model, args.checkpoint, args.classifier_checkpoint, device, args.precision)
        batches = generate(
            model,
            args.label_ids,
            guidance_kind=args.guidance,
            scale=args.scale,
            classifier_scale=args.classifier_scale,
            sampler=args.sampler,
            steps=args.steps,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            precision=args.precision,
            rank=rank,
            world_size=world_size,
            progress=not args.quiet and rank == 0,
            cfg_options=args.cfg_options,
            spacing=args.spacing,
        )
    # uint8 NHWC from here on: a quarter of float32's bytes through the gather
    pixels = {index: to_uint8_nhwc(images) for index, images in batches.items()}
    if world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(pixels, gathered, dst=0, group=gather_group)
        # Every rank waits for the gather to finish before tearing gloo down: a rank that
        # destroys its group while rank 0 still receives aborts ("terminate called ...").
        dist.barrier(group=gather_group)
        dist.destroy_process_group()
        if rank != 0:
            return 0
        assert gathered is not None  # rank 0's
        pixels = {index: part_pixels for part in gathered for index, part_pixels in part.items()}
    images = np.concatenate([pixels[index] for index in sorted(pixels)])
    # Every file before any message: stdout piped into a reader that stops early (| head)
    # ends the command at its next print.
    written = []
    try:
        if args.npz is not None:  # first: the samples themselves, whatever happens to the grid
            target = npz_path(args.npz)
            with atomic_path(target) as scratch:
                if args.unconditional:  # as ADM's image_sample writes an unconditional model's
                    np.savez(scratch, images)
                else:
                    np.savez(scratch, images, args.label_ids.numpy())
            kinds = "" if args.unconditional else ", arr_1: labels"
            written.append(f"wrote {target} (arr_0: uint8 NHWC images{kinds})")
        if args.out is not None:
            with atomic_path(args.out) as scratch:
                save_grid(images, scratch, columns=min(10, len(images)))
            written.append(f"wrote {len(images)} samples to {args.out}")
    finally:  # (what was written, also where the grid then failed)
        print("\n".join(written))
    return 0


def check_schedule_peak(option: str, schedule: str, scale: float) -> None:
    """The linear and cosine weight schedules peak at 1 + 2(w − 1), which must stay a float32."""
    if 1 + 2 * (scale - 1) > FLOAT32_MAX:
        raise UsageError(option, f"--schedule {schedule} peaks at 1 + 2(w − 1), past float32's range for w = {scale}")


def check_sweep(args: argparse.Namespace) -> None:
    """Every option of ``fastguide sweep``; sets args.device and args.variants."""
    from . import digits, sweep

    for option, scales in (
        ("--scales", args.scales),
        ("--cfgpp-scales", args.cfgpp_scales),
        ("--auto-scales", args.auto_scales or []),
    ):
        for scale in scales:
            check_scale(option, scale)
    if "cfg++" in args.guidances and max(args.cfgpp_scales) > 1:
        raise UsageError("--cfgpp-scales", f"expected CFG++'s λ values in [0, 1], got {max(args.cfgpp_scales)}")
    weights = args.checkpoint or digits.WEIGHTS
    if args.checkpoint is not None:
        check_digits_folder("--checkpoint", args.checkpoint)
    if "auto" in args.guidances and not digits.guide_file(weights).is_file():
        raise UsageError(
            "--guidances",
            f"auto needs the guide network {digits.guide_file(weights)}, which is missing: "
            f"'fastguide train --only guide --out {weights}' writes it",
        )
    args.variants = sweep.Variants(
        tuple(args.cfgpp_scales),
        args.auto_scales and tuple(args.auto_scales),
        _checked_interval(args.interval),
        args.schedule,
    )
    for option, kind, given in (
        ("--cfgpp-scales", "cfg++", args.cfgpp_scales != list(sweep.Variants.cfgpp_scales)),
        ("--auto-scales", "auto", args.auto_scales is not None),
        ("--interval", "interval", args.interval != list(sweep.DEFAULT_INTERVAL)),
        ("--schedule", "schedule", args.schedule != "linear"),
    ):
        if given and kind not in args.guidances:  # an option with no row to act on
            raise UsageError(option, f"applies to the {kind} rows: add {kind} to --guidances")
    if "schedule" in args.guidances:
        for scale in args.scales:
            check_schedule_peak("--scales", args.schedule, scale)
    # --scales: the rows of every kind but cfg++ (its --cfgpp-scales) and auto given --auto-scales
    reads_scales = [k for k in args.guidances if k != "cfg++" and not (k == "auto" and args.auto_scales is not None)]
    if tuple(args.scales) != SWEEP_SCALES and not reads_scales:
        raise UsageError("--scales", f"no row of --guidances {' '.join(args.guidances)} reads it")
    # within-class diversity needs two samples of one class; labels cycle over the classes
    check_at_least("--samples-per-scale", args.samples_per_scale, digits.NUM_CLASSES + 1, MAX_SWEEP_SAMPLES)
    check_steps(args.steps, model_schedule(args.model), args.model, args.spacing)
    try:
        _grid(model_schedule(args.model), args.steps, args.spacing)
    except ValueError as error:
        raise UsageError("--spacing", str(error)) from None
    check_sampler_fits("--sampler", args.sampler, args.model)
    if args.model == "digits-transformer":
        if {"auto", "classifier"} & set(args.guidances):
            raise UsageError("--guidances", "--model digits-transformer has CFG kinds only (no classifier or guide)")
        if not digits.transformer_file(weights).is_file():
            raise UsageError(
                "--model", f"digits-transformer needs {digits.transformer_file(weights)}, which is missing"
            )
    try:  # the held-out images must be ones no swept network saw
        digits.held_out_seed(
            weights, ("guide",) * ("auto" in args.guidances) + ("transformer",) * (args.model == "digits-transformer")
        )
    except ValueError as error:
        raise UsageError("--checkpoint", str(error)) from None
    if args.checkpoint is not None:  # a broken file fails here, as under sample, not mid-sweep
        load = digits.load_transformer if args.model == "digits-transformer" else digits.load
        load_weights("--checkpoint", weights, lambda: load(torch.device("cpu"), weights))
    check_seed("--seed", args.seed)
    args.device = parse_device(args.device)
    check_backend(None, args.device)
    check_modules("sweep", "sklearn", "matplotlib")
    if args.table is not None:
        check_output_file("--table", args.table)
    check_plot_file("--plot", args.plot)
    if args.table is not None and args.table.resolve() == args.plot.resolve():
        raise UsageError("--table", f"is the --plot file {str(args.plot)!r}: the plot would replace the table")


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import digits, sweep

    kinds = tuple(dict.fromkeys(args.guidances))  # each kind once, in the order given
    rows = sweep.run(
        args.scales,
        kinds=kinds,
        variants=args.variants,
        samples_per_scale=args.samples_per_scale,
        steps=_grid(model_schedule(args.model), args.steps, args.spacing),
        sampler=args.sampler,
        seed=args.seed,
        device=str(args.device),
        progress=not args.quiet,
        transformer=args.model == "digits-transformer",
        weights=args.checkpoint or digits.WEIGHTS,
    )
    table = sweep.markdown(rows)
    # The files before the table is printed: stdout piped into a reader that stops early
    # (| head) ends the command at its next print.
    if args.table is not None:
        with atomic_path(args.table) as scratch:
            scratch.write_text(table)
    with atomic_path(args.plot) as scratch:
        sweep.plot(rows, scratch)
    print(table)
    print(f"wrote {args.plot}")
    return 0


def check_train(args: argparse.Namespace) -> None:
    """Every option of ``fastguide train``; with --only guide or transformer, sets
    args.record to --out's digits_training.json (empty when there is none)."""
    check_at_least("--unet-steps", args.unet_steps)
    check_at_least("--classifier-steps", args.classifier_steps)
    check_at_least("--evaluator-steps", args.evaluator_steps)
    check_at_least("--guide-steps", args.guide_steps)
    check_at_least("--transformer-steps", args.transformer_steps)
    if args.seed is not None:
        check_seed("--seed", args.seed)
    if args.only is not None:  # the other networks' step counts would be ignored: refused
        import inspect

        from . import digits

        trains = {"guide": "guide_steps", "transformer": "transformer_steps"}[args.only]
        defaults = inspect.signature(digits.train).parameters
        for name in ("unet_steps", "classifier_steps", "evaluator_steps", "guide_steps", "transformer_steps"):
            if name != trains and getattr(args, name) != defaults[name].default:
                option = "--" + name.replace("_", "-")
                raise UsageError(option, f"trains a network that --only {args.only} leaves as it is")
    check_output_folder("--out", args.out)
    check_modules("train", "sklearn")
    args.record = read_training_record(args.out / "digits_training.json") if args.only is not None else None
    # The seed draws the train/held-out split too: a network trained on another split may
    # have seen the images the others are scored on, which the sweep then refuses. So --only
    # takes the folder's seed by default (the main networks', else the other network's), and
    # says so where --seed differs.
    folder_seed_key = next(
        (
            key
            for key in ("seed", "guide_seed", "transformer_seed")
            if key != f"{args.only}_seed" and key in (args.record or {})
        ),
        None,
    )
    if folder_seed_key is not None:
        folder_seed = args.record[folder_seed_key]
        if isinstance(folder_seed, bool) or not isinstance(folder_seed, int):
            raise UsageError(
                "--out", f"its digits_training.json's {folder_seed_key!r} must be an int, got {folder_seed!r}"
            )
        if args.seed is None:
            args.seed = folder_seed
        elif args.seed != folder_seed:
            print(
                f"fastguide train: note: --seed {args.seed} draws another train/held-out split than the one the "
                f"networks in {args.out} were trained on (seed {folder_seed}): fastguide sweep refuses "
                f"to score this {args.only} against their held-out images (leave --seed out to share it)",
                file=sys.stderr,
            )
    if args.seed is None:
        args.seed = 0


def read_training_record(path: Path) -> dict:
    """The JSON object ``fastguide train`` wrote at ``path``, or {} when there is no file."""
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError("--out", f"cannot read {path}: {' '.join(str(error).split())}") from None
    if not isinstance(record, dict):
        raise UsageError("--out", f"expected {path} to hold a JSON object, got {type(record).__name__}")
    return record


def cmd_train(args: argparse.Namespace) -> int:
    """Trains into a scratch folder, then moves each finished file into --out."""
    from . import digits

    with tempfile.TemporaryDirectory(dir=existing_ancestor(args.out), prefix=".fastguide-train-") as scratch:
        if args.only == "guide":
            record = digits.train_guide(
                Path(scratch), seed=args.seed, steps=args.guide_steps, progress=not args.quiet, record=args.record
            )
        elif args.only == "transformer":
            record = digits.train_transformer(
                Path(scratch), seed=args.seed, steps=args.transformer_steps, progress=not args.quiet, record=args.record
            )
        else:
            record = digits.train(
                Path(scratch),
                seed=args.seed,
                unet_steps=args.unet_steps,
                classifier_steps=args.classifier_steps,
                evaluator_steps=args.evaluator_steps,
                guide_steps=args.guide_steps,
                transformer_steps=args.transformer_steps,
                progress=not args.quiet,
            )
        args.out.mkdir(parents=True, exist_ok=True)
        for file in sorted(Path(scratch).iterdir()):
            os.replace(file, args.out / file.name)
    print(f"trained the digits networks into {args.out}: {record}")
    return 0


def check_selfcheck(args: argparse.Namespace) -> None:
    """Every option of ``fastguide selfcheck``; sets args.device."""
    check_seed("--seed", args.seed)
    args.device = parse_device(args.device)
    check_backend(None, args.device)


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from . import selfcheck

    return selfcheck.run(args.device, seed=args.seed)


def cmd_bench(rest: list[str]) -> int:
    from . import bench

    return bench.main(rest)


# ---------------------------------------------------------------------------------------
# The parser and main().


def build_parser() -> argparse.ArgumentParser:
    from . import digits, sweep

    parser = Parser(prog="fastguide", description="Fast guided diffusion sampling.")
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser(
        "sample",
        help="draw guided samples and write a PNG grid and/or an .npz",
        description="Draw class-guided samples from the shipped digits models or an ADM checkpoint, or "
        "prompted samples from a saved diffusers pipeline (--pipeline).",
    )
    s.add_argument(
        "--model",
        default="digits",
        help="digits (the shipped UNet; default), digits-transformer (the shipped flow transformer) or a "
        "guided-diffusion preset: adm64, adm128, adm256, adm256-uncond, adm512 (with --checkpoint)",
    )
    s.add_argument(
        "--checkpoint",
        type=Path,
        help="the model's weights: a guided-diffusion .pt/.safetensors for adm*, a folder written by "
        "'fastguide train' for digits",
    )
    s.add_argument(
        "--classifier-checkpoint",
        type=Path,
        help="the noisy classifier's weights (adm* presets; for digits it replaces the classifier of "
        "the --checkpoint folder)",
    )
    s.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="fp16: ADM's use_fp16 (the UNet's convolutions in fp16; a classifier stays fp32, as ADM's "
        "sampling commands keep it); bf16: autocast (default: fp32)",
    )
    s.add_argument("--labels", default=LABELS_DEFAULT, help="class, range (0-9) or list (1,4,7), cycled (default: 0-9)")
    s.add_argument(
        "--guidance",
        choices=GUIDANCE,
        default="cfg",
        help="classifier-free (cfg), CFG++ (cfg++, λ = --scale in [0, 1]; ddim, euler or dpm++2m), "
        "autoguidance (auto: w = --scale, guided by the digits model's weaker guide network, "
        "Karras et al. 2024), classifier (the class-conditional model given the labels, plus the "
        "classifier's gradient, as ADM's classifier_sample.py with a conditional model; sweep's "
        "classifier rows guide the null label instead), both or none (default: cfg)",
    )
    s.add_argument(
        "--schedule",
        choices=("constant", "linear", "cosine"),
        default="constant",
        help="guidance weight over the steps (Wang et al. 2024; default: constant); linear and cosine "
        "move it from 1 to 1 + 2(w - 1) (mean w), below 0 late in sampling for w < 0.5",
    )
    s.add_argument(
        "--interval",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="guide only where EDM's σ̃ lies in (LOW, HIGH] (Kynkäänniemi et al. 2024; cfg, cfg++, both or auto; "
        "with both, the CFG half: the classifier gradient applies at every step)",
    )
    s.add_argument(
        "--tangential",
        action="store_true",
        help="tangential damping CFG (TCFG, Kwon et al. 2025) with --guidance cfg or both",
    )
    s.add_argument(
        "--scale",
        type=float,
        help="CFG scale w >= 0; 1 = the conditional model, 0 = unconditional (auto: 0 = the guide; "
        "--pipeline: above 1, as diffusers guides, or 1); "
        f"cfg++'s λ in [0, 1] (default: 2; cfg++: {CFG_PLUS_PLUS_SCALE}, the digits UNet's best "
        "λ in fastguide sweep, the transformer's was 0.2)",
    )
    s.add_argument(
        "--classifier-scale",
        type=float,
        help="classifier guidance scale >= 0 with --guidance classifier or both (default: the release's own "
        f"for an ADM model, as guided-diffusion's README samples it; {CLASSIFIER_SCALE:g} for the digits models)",
    )
    s.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="sampler (default: unipc, the most accurate per model call in fastguide bench --nfe; "
        "cfg++: dpm++2m, or ddim with --interval)",
    )
    s.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    s.add_argument(
        "--spacing",
        choices=SPACINGS,
        help="where the steps lie: adm (ADM's strided ddimN grid, at most T/2 steps: unlike the API's "
        "spacing='adm', ADM's N respacing), diffusers' leading/trailing/linspace, logsnr "
        "(uniform in log-SNR) or karras (rho 7) (default: the schedule's own, logsnr; uniform "
        "in σ, linspace, for --model digits-transformer)",
    )
    s.add_argument("--num-samples", type=int, default=40, help="how many samples (default: 40)")
    s.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="samples per model batch (default: 100); batch i draws from the seed stream (seed, i), so a "
        "run's images depend on it (not on the number of processes)",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    s.add_argument(
        "--backend", choices=backends.BACKENDS, help="op backend (default: FASTGUIDE_BACKEND if set, else auto)"
    )
    s.add_argument(
        "--out", type=Path, help=f"image grid to write (default: {DEFAULT_GRID}, or none when --npz is given)"
    )
    s.add_argument("--npz", type=Path, help="write ADM's .npz (uint8 NHWC arr_0, labels arr_1), before any grid")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument(
        "--pipeline",
        type=Path,
        help="a diffusers pipeline saved in this folder (save_pretrained), accelerated, sampled from "
        "--prompt instead of the digits model",
    )
    s.add_argument("--prompt", help="with --pipeline: the text prompt")
    s.add_argument("--negative-prompt", help="with --pipeline: the negative prompt (default: the pipeline's)")
    s.add_argument(
        "--pag-scale",
        type=float,
        help="with --pipeline: perturbed-attention guidance scale (loads the pipeline's PAG variant)",
    )
    s.set_defaults(check=check_sample, run=cmd_sample)

    w = commands.add_parser(
        "sweep",
        help="accuracy, Fréchet distance and diversity against guidance scale",
        description="Sample the digits model at several guidance scales, for each kind of "
        "guidance in --guidances, and score the samples with a separate evaluator.",
    )
    w.add_argument(
        "--guidances",
        nargs="+",
        choices=sweep.KINDS,
        default=["cfg", "classifier"],
        help="kinds of guidance, one group of rows each: cfg, cfg++ (λ = --cfgpp-scales, on --sampler if "
        "CFG++ is built for it, else dpm++2m), auto (autoguidance, w = --auto-scales), interval "
        "(cfg within --interval), schedule (cfg with --schedule), classifier (default: cfg classifier)",
    )
    w.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(SWEEP_SCALES),
        help="guidance scales of cfg, interval, schedule and classifier (default: 0 1 2 3 5 8)",
    )
    w.add_argument(
        "--cfgpp-scales",
        type=float,
        nargs="+",
        default=list(sweep.Variants.cfgpp_scales),
        help="CFG++'s λ values in [0, 1] (default: 0 0.2 0.4 0.6 0.8 1)",
    )
    w.add_argument("--auto-scales", type=float, nargs="+", help="autoguidance's w values (default: --scales)")
    w.add_argument(
        "--interval",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=list(sweep.DEFAULT_INTERVAL),
        help="the interval rows' range of EDM's σ̃ (default: 0.28 5.42, Kynkäänniemi et al.'s EDM2-S)",
    )
    w.add_argument(
        "--schedule",
        choices=("linear", "cosine"),
        default="linear",
        help="the schedule rows' guidance weight over the steps (default: linear)",
    )
    w.add_argument(
        "--samples-per-scale",
        type=int,
        default=500,
        help=f"samples of each row, drawn in one batch (default: 500; at most {MAX_SWEEP_SAMPLES:,})",
    )
    w.add_argument("--steps", type=int, default=25)
    w.add_argument(
        "--model",
        choices=("digits", "digits-transformer"),
        default="digits",
        help="the UNet, or the flow transformer (CFG kinds only)",
    )
    w.add_argument(
        "--checkpoint",
        type=Path,
        help="a folder written by 'fastguide train' (default: the shipped weights); scored against the "
        "held-out images of the split its networks were trained on",
    )
    w.add_argument("--sampler", choices=SAMPLERS, default="unipc")
    w.add_argument(
        "--spacing",
        choices=SPACINGS,
        help="where the steps lie (as for sample; default: logsnr, linspace for --model digits-transformer)",
    )
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--device", default="cpu")
    w.add_argument("--table", type=Path, help="also write the markdown table here")
    w.add_argument("--plot", type=Path, default=Path("sweep.png"), help="PNG plot (default: sweep.png)")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(check=check_sweep, run=cmd_sweep)

    t = commands.add_parser("train", help="retrain the digits model (needs scikit-learn)")
    t.add_argument(
        "--out", type=Path, default=Path("digits-weights"), help="folder for the weights (default: digits-weights)"
    )
    t.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed, which also draws the train/held-out split (default: 0; with --only, the seed "
        "the folder's other networks were trained with, whose split the new one must share)",
    )
    t.add_argument("--unet-steps", type=int, default=3000, help="training steps of the UNet (default: 3000)")
    t.add_argument(
        "--classifier-steps", type=int, default=1500, help="training steps of the classifier (default: 1500)"
    )
    t.add_argument(
        "--evaluator-steps", type=int, default=1000, help="training steps of the evaluator CNN (default: 1000)"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument(
        "--guide-steps",
        type=int,
        default=digits.GUIDE_STEPS,
        help=f"training steps of the autoguidance guide network (default: {digits.GUIDE_STEPS})",
    )
    t.add_argument(
        "--transformer-steps",
        type=int,
        default=digits.TRANSFORMER_STEPS,
        help=f"training steps of the flow transformer (default: {digits.TRANSFORMER_STEPS})",
    )
    t.add_argument(
        "--only",
        choices=("guide", "transformer"),
        help="train just the guide network or the flow transformer into --out, leaving the other "
        "networks' files and entries of digits_training.json as they are",
    )
    t.set_defaults(check=check_train, run=cmd_train)

    c = commands.add_parser(
        "selfcheck",
        help="check the four ops against their formulas",
        description="Run the four ops on this machine (the backend auto picks, or "
        "FASTGUIDE_BACKEND) and compare them with their float64 formulas.",
    )
    c.add_argument("--device", default="cpu", help="device to run the ops on: cpu, cuda or cuda:N (default: cpu)")
    c.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    c.set_defaults(check=check_selfcheck, run=cmd_selfcheck)

    commands.add_parser("bench", help="run the benchmark suite (options: python -m fastguide bench -h)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input raises SystemExit(2) after one line on stderr. Output
    piped into a reader that stops early (``| head``) ends the command quietly, as it
    would a Unix tool: status 141 (128 + SIGPIPE), no traceback."""
    try:
        try:
            return _run_command(argv)
        finally:  # the last buffered output too (--help's SystemExit included), within reach here
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe's (a subprocess's): reported as it is
            raise
        # Python flushes stdout again at exit, which would raise once more: point it at
        # /dev/null first (the recipe of Python's signal module documentation).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe that its reader has closed (poll reports an error on it);
    where poll is missing (Windows), a broken pipe is taken for stdout's."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        world_size = torchrun_world_size()
    except UsageError as error:
        fail(str(error))
    if args.command != "sample" and world_size > 1:
        # (sample splits its batches over the ranks; the others would each do all the work)
        fail(
            f"{args.command}: runs in one process, but WORLD_SIZE is {world_size} (torchrun): "
            "under torchrun every rank would repeat the whole job and write the same files"
        )
    if args.command == "bench":
        try:
            return cmd_bench(rest)  # the suite runner parses its own options
        except KeyboardInterrupt:  # (the suite reports its finished cases itself; the studies stop here)
            print("fastguide: interrupted", file=sys.stderr)
            return 130
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.check(args)
        return args.run(args)
    except UsageError as error:
        fail(str(error))
    except KeyboardInterrupt:
        print("fastguide: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastguide`` command (also ``python -m fastguide``).

    fastguide sample   guided samples from the shipped digits model
    fastguide sweep    accuracy, Fréchet distance and diversity against guidance scale
    fastguide train    retrain the digits model, its noisy classifier and its evaluator
    fastguide bench    the benchmark suite (python -m fastguide.bench)
    fastguide selfcheck  the three ops against their formulas

Bad options end with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..ops import backends
from ..sampling.schedule import NoiseSchedule
from ..sampling.solvers import SAMPLERS

GUIDANCE = ("cfg", "classifier", "both", "none")


class UsageError(Exception):
    """A bad option value: reported in one line, exit status 2."""


def parse_labels(text: str, count: int, num_classes: int) -> torch.Tensor:
    """'3' -> all threes; '0-9' or '1,4,7' -> cycled over the samples."""
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-"))
            values = list(range(low, high + 1))
        else:
            values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--labels must be a class, a range like 0-9 or a list like 1,4,7; got {text!r}") from None
    if not values or min(values) < 0 or max(values) >= num_classes:
        raise UsageError(f"--labels must lie in 0..{num_classes - 1}, got {text!r}")
    return torch.tensor([values[i % len(values)] for i in range(count)])


def _check_writable(path: Path | None, option: str) -> None:
    if path is None:
        return
    parent = path.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{option}: folder {parent} does not exist")
    try:
        with open(path, "ab"):
            pass
    except OSError as error:
        raise UsageError(f"{option}: cannot write {path} ({error.strerror})") from None


def _guidance(kind: str, scale: float, classifier_scale: float, model: "SamplingModel"):
    from ..sampling.guidance import CFG, ClassifierGuidance

    if kind in ("cfg", "both") and not getattr(model.unet, "null_class", False):
        raise UsageError("--guidance cfg needs a model with a null class (the released ADM models have none): "
                         "use --guidance classifier or none")
    if kind in ("classifier", "both") and model.classifier is None:
        raise UsageError("--guidance classifier needs --classifier-checkpoint for this model")
    cfg = CFG(scale) if kind in ("cfg", "both") else None
    clf = ClassifierGuidance(model.classifier, classifier_scale) if kind in ("classifier", "both") else None
    return tuple(g for g in (cfg, clf) if g is not None) or None


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), ADM's .npz layout."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: Path, columns: int, scale: int = 4) -> None:
    """A PNG grid of samples, each upscaled ``scale``× (nearest) with a 1-pixel gap."""
    from PIL import Image

    pixels = to_uint8_nhwc(images)
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    grid = Image.new("L" if c == 1 else "RGB", (columns * (w + 1) + 1, rows * (h + 1) + 1), color=255)
    for i in range(n):
        tile = Image.fromarray(pixels[i, :, :, 0] if c == 1 else pixels[i])
        grid.paste(tile, (1 + (i % columns) * (w + 1), 1 + (i // columns) * (h + 1)))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


@dataclass
class SamplingModel:
    """What ``fastguide sample`` samples from: the UNet, an optional noisy classifier, the
    image shape and the training schedule (sampled on its strided_timesteps grid)."""

    unet: torch.nn.Module
    classifier: torch.nn.Module | None
    shape: tuple[int, int, int]
    num_classes: int
    schedule: NoiseSchedule


# The released ADM models' training schedules (their noise_schedule flags).
ADM_SCHEDULES = {"adm64": "cosine", "adm128": "linear", "adm256": "linear", "adm512": "linear"}


def load_sampling_model(name: str, checkpoint: Path | None, classifier_checkpoint: Path | None,
                        device: torch.device, precision: str) -> SamplingModel:
    from ..models.checkpoints import load_checkpoint
    from ..models.configs import (
        classifier_config,
        create_classifier,
        create_model,
        unet_config,
    )
    from . import digits

    for option, path in (("--checkpoint", checkpoint), ("--classifier-checkpoint", classifier_checkpoint)):
        if path is not None and not path.exists():
            raise UsageError(f"{option}: {path} does not exist")
    if name == "digits":
        models = digits.load(device, weights=checkpoint or digits.WEIGHTS)
        bundle = SamplingModel(models.unet, models.classifier, (1, digits.IMAGE_SIZE, digits.IMAGE_SIZE),
                               digits.NUM_CLASSES, digits.schedule())
    elif name in ADM_SCHEDULES:
        if checkpoint is None:
            raise UsageError(f"--model {name} needs --checkpoint (the guided-diffusion .pt or .safetensors file)")
        unet = load_checkpoint(create_model(**unet_config(name)), checkpoint)
        classifier = None
        if classifier_checkpoint is not None:
            classifier = load_checkpoint(create_classifier(**classifier_config(name)), classifier_checkpoint)
        schedule = NoiseSchedule.cosine() if ADM_SCHEDULES[name] == "cosine" else NoiseSchedule.linear()
        size = unet.image_size
        bundle = SamplingModel(unet, classifier, (3, size, size), 1000, schedule)
    else:
        raise UsageError(f"--model: unknown model {name!r} (available: digits, {', '.join(ADM_SCHEDULES)})")
    for module in (bundle.unet, bundle.classifier):
        if module is not None:
            module.to(device).eval()
            if precision == "fp16" and hasattr(module, "convert_to_fp16"):
                module.convert_to_fp16()  # ADM's use_fp16: convolutions in fp16, norms in fp32
    return bundle


def generate(model: SamplingModel, labels: torch.Tensor, *, guidance_kind: str, scale: float,
             classifier_scale: float, sampler: str, steps: int, seed: int, batch_size: int,
             device: torch.device, precision: str = "fp32", rank: int = 0, world_size: int = 1,
             progress: bool = False) -> dict[int, torch.Tensor]:
    """{batch index: samples} for this rank's batches (round-robin over ranks). Each batch
    draws from its own seed stream (seed, batch index), so any split of the batches across
    processes gives exactly the images of a single-process run."""
    from ..sampling.loop import sample

    guidance = _guidance(guidance_kind, scale, classifier_scale, model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    out = {}
    for index in range(rank, -(-len(labels) // batch_size), world_size):
        batch_labels = labels[index * batch_size:(index + 1) * batch_size].to(device)
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + index)
        with autocast:
            images = sample(model.unet, (len(batch_labels), *model.shape), labels=batch_labels, sampler=sampler,
                            steps=model.schedule.strided_timesteps(steps), schedule=model.schedule, guidance=guidance,
                            generator=generator, device=device, progress=progress)
        out[index] = images.float().cpu()
    return out


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def cmd_sample(args: argparse.Namespace) -> int:
    from . import digits

    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_writable(args.out, "--out")
    _check_writable(args.npz, "--npz")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    if args.model not in ("digits", *ADM_SCHEDULES):
        raise UsageError(f"--model: unknown model {args.model!r} (available: digits, {', '.join(ADM_SCHEDULES)})")
    labels = parse_labels(args.labels, args.num_samples, 1000 if args.model in ADM_SCHEDULES else digits.NUM_CLASSES)
    backends.set_backend(args.backend)
    rank, world_size, device = _distributed(device)
    model = load_sampling_model(args.model, args.checkpoint, args.classifier_checkpoint, device, args.precision)
    _guidance(args.guidance, args.scale, args.classifier_scale, model)  # bad combinations fail before sampling
    batches = generate(model, labels, guidance_kind=args.guidance, scale=args.scale,
                       classifier_scale=args.classifier_scale, sampler=args.sampler, steps=args.steps,
                       seed=args.seed, batch_size=args.batch_size, device=device, precision=args.precision,
                       rank=rank, world_size=world_size, progress=not args.quiet and rank == 0)
    if world_size > 1:
        import torch.distributed as dist

        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(batches, gathered, dst=0)
        dist.destroy_process_group()
        if rank != 0:
            return 0
        batches = {index: images for part in gathered for index, images in part.items()}
    images = torch.cat([batches[index] for index in sorted(batches)])
    if args.out:
        save_grid(images, args.out, columns=min(10, len(images)))
        print(f"wrote {len(images)} samples to {args.out}")
    if args.npz:
        np.savez(args.npz, to_uint8_nhwc(images), labels.numpy())
        print(f"wrote {args.npz} (arr_0: uint8 NHWC images, arr_1: labels)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep

    if args.samples_per_scale < 2 or args.steps < 1:
        raise UsageError("--samples-per-scale must be at least 2 and --steps at least 1")
    _check_writable(args.plot, "--plot")
    rows = sweep.run(args.scales, samples_per_scale=args.samples_per_scale, steps=args.steps,
                     sampler=args.sampler, seed=args.seed, device=args.device, progress=not args.quiet)
    table = sweep.markdown(rows)
    print(table)
    if args.table:
        _check_writable(args.table, "--table")
        args.table.write_text(table)
    if args.plot:
        sweep.plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import digits

    record = digits.train(args.out, seed=args.seed, unet_steps=args.unet_steps,
                          classifier_steps=args.classifier_steps, evaluator_steps=args.evaluator_steps)
    print(f"trained the digits networks into {args.out}: {record}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args.rest)


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from . import selfcheck

    return selfcheck.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastguide", description="Fast guided diffusion sampling.")
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("sample", help="draw guided samples and write a PNG grid and/or an .npz",
                            description="Draw class-guided samples from the shipped digits model.")
    s.add_argument("--model", default="digits",
                   help="digits (shipped with fastguide; default) or a guided-diffusion preset: adm64, adm128, "
                        "adm256, adm512 (with --checkpoint)")
    s.add_argument("--checkpoint", type=Path,
                   help="the model's weights: a guided-diffusion .pt/.safetensors for adm*, a folder written by "
                        "'fastguide train' for digits")
    s.add_argument("--classifier-checkpoint", type=Path, help="the noisy classifier's weights (adm* presets)")
    s.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="fp16: ADM's use_fp16 (convolutions in fp16); bf16: autocast (default: fp32)")
    s.add_argument("--labels", default="0-9", help="class, range (0-9) or list (1,4,7), cycled (default: 0-9)")
    s.add_argument("--guidance", choices=GUIDANCE, default="cfg",
                   help="classifier-free (cfg), classifier, both or none (default: cfg)")
    s.add_argument("--scale", type=float, default=2.0,
                   help="CFG scale w; 1 = the conditional model, 0 = unconditional (default: 2)")
    s.add_argument("--classifier-scale", type=float, default=4.0, help="classifier guidance scale (default: 4)")
    s.add_argument("--sampler", choices=SAMPLERS, default="dpm++2m",
                   help="sampler (default: dpm++2m)")
    s.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    s.add_argument("--num-samples", type=int, default=40, help="how many samples (default: 40)")
    s.add_argument("--batch-size", type=int, default=100, help="samples per model batch (default: 100)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    s.add_argument("--backend", choices=backends.BACKENDS, default="auto", help="op backend (default: auto)")
    s.add_argument("--out", type=Path, default=Path("digits.png"), help="PNG grid to write (default: digits.png)")
    s.add_argument("--npz", type=Path, help="also write ADM's .npz (uint8 NHWC arr_0, labels arr_1)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=cmd_sample)

    w = commands.add_parser("sweep", help="accuracy, Fréchet distance and diversity against guidance scale",
                            description="Sample the digits model at several guidance scales, for CFG and for "
                                        "classifier guidance, and score the samples with a separate evaluator.")
    w.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 3, 5, 8], help="guidance scales")
    w.add_argument("--samples-per-scale", type=int, default=500)
    w.add_argument("--steps", type=int, default=25)
    w.add_argument("--sampler", choices=SAMPLERS, default="dpm++2m")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--device", default="cpu")
    w.add_argument("--table", type=Path, help="also write the markdown table here")
    w.add_argument("--plot", type=Path, default=Path("sweep.png"), help="PNG plot (default: sweep.png)")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(run=cmd_sweep)

    t = commands.add_parser("train", help="retrain the digits model (needs scikit-learn)")
    t.add_argument("--out", type=Path, default=Path("digits-weights"), help="folder for the weights")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--unet-steps", type=int, default=3000)
    t.add_argument("--classifier-steps", type=int, default=1500)
    t.add_argument("--evaluator-steps", type=int, default=1000)
    t.set_defaults(run=cmd_train)

    for name, function, text in (("bench", cmd_bench,
                                  "run the benchmark suite (options: python -m fastguide.bench -h)"),
                                 ("selfcheck", cmd_selfcheck, "check the three ops against their formulas")):
        p = commands.add_parser(name, help=text, add_help=False)
        p.set_defaults(run=function, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.rest = rest  # bench and selfcheck parse their own options
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args)
    except UsageError as error:
        print(f"fastguide {args.command}: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"fastguide {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

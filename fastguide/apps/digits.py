"""fastguide's own guided model: handwritten digits (scikit-learn's 1,797 8×8 images).

Five networks, trained by ``fastguide train`` with a fixed seed, ship as fp16
safetensors in fastguide/weights/ so that ``fastguide sample`` works right after install:
- ``unet``: a compact class-conditional ADM UNet with a null class and label dropout
  (classifier-free guidance ready), eps-prediction on the cosine schedule;
- ``classifier``: a noisy EncoderUNet classifier of x_t (classifier guidance);
- ``evaluator``: a separate clean CNN classifier, never used for guidance, whose
  accuracy and 64-d features score samples (fidelity, Fréchet distance, diversity);
- ``guide``: a weaker version of ``unet`` for autoguidance (Karras et al. 2024): the same
  conditioning and schedule, fewer channels at 4×4 and a fraction of the training steps.
  Its streams are re-seeded from the same seed before it trains (``fastguide train --only
  guide``: the batches, noise and timesteps the UNet's training drew first), so adding or
  retraining it leaves the other networks as they are;
- ``transformer``: a small class-conditional flow-matching transformer (SiT-style: a
  ``fastguide.DiT`` over 2×2 patches, velocity ε − x0 on ``NoiseSchedule.flow()``, label
  dropout for CFG), trained on its own streams as the guide is
  (``fastguide train --only transformer``).
Pixels 0…16 map to [−1, 1]. A fixed, stratified held-out set is kept out of training.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models.checkpoints import load_checkpoint, write_safetensors
from ..models.configs import create_classifier, create_model
from ..models.dit import DiT
from ..models.unet import EncoderUNet, UNet
from ..sampling.schedule import FlowSchedule, NoiseSchedule

WEIGHTS = Path(__file__).parents[1] / "weights"
IMAGE_SIZE, NUM_CLASSES, HELD_OUT_PER_CLASS = 8, 10, 30

UNET_FLAGS: dict[str, Any] = dict(
    image_size=IMAGE_SIZE,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_head_channels=32,
    dropout=0.1,
    class_cond=True,
    num_classes=NUM_CLASSES,
    learn_sigma=False,
    in_channels=1,
    use_scale_shift_norm=True,
    resblock_updown=True,
    null_class=True,
    label_dropout=0.1,
)
# Karras et al. build their guides smaller and shorter-trained than the main model, with
# the same conditioning: here 32 instead of 64 channels at 4×4 (0.35 M parameters instead
# of 0.83 M; GroupNorm's 32 groups rule out narrowing the 32-channel level) and 250
# instead of 3000 steps. The length was picked by the sweep's Fréchet distance (300
# samples, seed 0, dpm++2m, best w): 150, 250, 400, 750 and 1500 steps gave 6.47, 6.12,
# 6.54, 7.13, 7.22; the full-size UNet at 250 and 500 steps gave 6.60 and 6.74.
GUIDE_FLAGS = {**UNET_FLAGS, "channel_mult": "1,1"}
GUIDE_STEPS = 250
# The flow transformer: 16 tokens of 2×2 patches, 0.73 M parameters (the UNet's 0.83 M).
TRANSFORMER_FLAGS: dict[str, Any] = dict(
    input_size=IMAGE_SIZE,
    patch_size=2,
    in_channels=1,
    hidden_size=96,
    depth=4,
    num_heads=4,
    mlp_ratio=4.0,
    class_dropout_prob=0.1,
    num_classes=NUM_CLASSES,
    learn_sigma=False,
)
TRANSFORMER_STEPS = 4000
CLASSIFIER_FLAGS: dict[str, Any] = dict(
    image_size=IMAGE_SIZE,
    classifier_width=32,
    classifier_depth=1,
    channel_mult="1,2",
    classifier_attention_resolutions="4",
    classifier_pool="attention",
    num_classes=NUM_CLASSES,
    in_channels=1,
)


def schedule() -> NoiseSchedule:
    """The digits model's training schedule (cosine, 1000 steps)."""
    return NoiseSchedule.cosine(1000)


def flow_schedule() -> FlowSchedule:
    """The flow transformer's path: x = (1 − σ)·x0 + σ·ε, model time 1000·σ."""
    return NoiseSchedule.flow()


def load_dataset(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x, train_y, held_x, held_y); x in [−1, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(y), dtype=torch.bool)
    for label in range(NUM_CLASSES):
        members = (y == label).nonzero().flatten()
        held[members[torch.randperm(len(members), generator=g)[:HELD_OUT_PER_CLASS]]] = True
    return x[~held], y[~held], x[held], y[held]


class Evaluator(nn.Module):
    """A small clean-digit CNN; ``features`` are its 64-d penultimate activations."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.SiLU(),
        )
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class DigitsModels:
    unet: UNet
    classifier: EncoderUNet
    evaluator: Evaluator
    guide: UNet | None = None  # None for a weights folder written before the guide existed
    transformer: DiT | None = None  # likewise for the flow transformer


def build() -> DigitsModels:
    """The three main networks, freshly initialised (the guide: ``build_guide``)."""
    return DigitsModels(create_model(**UNET_FLAGS), create_classifier(**CLASSIFIER_FLAGS), Evaluator())


def build_guide() -> UNet:
    """The autoguidance guide, freshly initialised."""
    return create_model(**GUIDE_FLAGS)


def build_transformer() -> DiT:
    """The flow-matching transformer, freshly initialised (adaLN-Zero)."""
    return DiT(**TRANSFORMER_FLAGS)


def guide_file(weights: Path = WEIGHTS) -> Path:
    return weights / "digits_guide.safetensors"


def transformer_file(weights: Path = WEIGHTS) -> Path:
    return weights / "digits_transformer.safetensors"


def load(device: torch.device | str = "cpu", weights: Path = WEIGHTS, transformer: bool = True) -> DigitsModels:
    """The shipped (or ``weights``) networks in eval mode, float32, on ``device``; the
    guide and (with ``transformer``) the flow transformer too when ``weights`` holds their
    files, else None."""
    models = build()
    for name in ("unet", "classifier", "evaluator"):
        load_checkpoint(getattr(models, name), weights / f"digits_{name}.safetensors")
    if guide_file(weights).is_file():
        models.guide = load_checkpoint(build_guide(), guide_file(weights))
    for model in (models.unet, models.classifier, models.evaluator, models.guide):
        if model is not None:
            model.to(device).float().eval()
    if transformer and transformer_file(weights).is_file():
        models.transformer = load_transformer(device, weights)
    return models


def load_transformer(device: torch.device | str = "cpu", weights: Path = WEIGHTS) -> DiT:
    """The flow transformer of ``weights`` alone (a folder of ``fastguide train --only
    transformer`` holds no other network), in eval mode, float32, on ``device``."""
    return load_checkpoint(build_transformer(), transformer_file(weights)).to(device).float().eval()


def held_out_seed(weights: Path = WEIGHTS, networks: tuple[str, ...] = ()) -> int:
    """The seed of the train/held-out split (``load_dataset``) that the main networks of
    ``weights`` (and ``networks``, of "guide" and "transformer") were trained on, from its
    digits_training.json (0 without one): a score against the held-out images is honest
    only for networks that never saw them. ValueError where they were trained on different
    splits."""
    path = weights / "digits_training.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object (fastguide train's record), got {type(record).__name__}")
    keys = ("seed", *(f"{name}_seed" for name in networks))
    seeds = {name: record[name] for name in keys if name in record}
    for name, seed in seeds.items():
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{path}'s {name!r} must be an int (a training seed), got {seed!r}")
    if len(set(seeds.values())) > 1:
        raise ValueError(
            f"the networks in {weights} were trained on different train/held-out splits ({seeds} in {path.name}): "
            "train them with one --seed"
        )
    return next(iter(seeds.values()), 0)


def _batches(n: int, batch_size: int, steps: int, g: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=g)


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random one-pixel shifts (digits are centred; shifts add variety, keep the class)."""
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=shifts, dims=(2, 3))


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():  # 0 steps would write untrained weights
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class _Run:
    """One training run's data and random streams: ``g`` draws batches, shifts, timesteps
    and noise; torch's global generator (seeded with the same seed) draws the initial
    weights, dropout and label dropout."""

    train_x: Tensor
    train_y: Tensor
    batch_size: int
    g: torch.Generator
    progress: bool

    def noisy(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        abar = _alphas_cumprod()
        t = torch.randint(0, len(abar), (len(x),), generator=self.g)
        eps = torch.randn(x.shape, generator=self.g)
        a = abar[t].reshape(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * eps, t, eps

    def diffusion_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_t, t, eps = self.noisy(x)
        return F.mse_loss(model(x_t, t, y), eps)

    def flow_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Flow matching (rectified flow, SiT's linear path): σ ~ U(0, 1),
        x_σ = (1 − σ)·x0 + σ·ε, the model at time 1000·σ regresses the velocity ε − x0."""
        sigma = torch.rand(len(x), generator=self.g)
        eps = torch.randn(x.shape, generator=self.g)
        level = sigma.reshape(-1, 1, 1, 1)
        return F.mse_loss(model((1 - level) * x + level * eps, 1000 * sigma, y), eps - x)

    def noisy_classifier_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_t, t, _ = self.noisy(x)
        return F.cross_entropy(model(x_t, t), y)

    @staticmethod
    def clean_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    def fit(self, name: str, model: nn.Module, steps: int, loss_fn, lr: float) -> float | None:
        """AdamW with warmup and cosine decay; returns the smoothed final loss (None only for 0
        steps, which the callers refuse)."""
        from tqdm.auto import tqdm

        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        lr_at = lambda i: lr * min(1.0, (i + 1) / 200) * 0.5 * (1 + math.cos(math.pi * i / steps))  # noqa: E731
        smoothed = None
        bar = tqdm(
            _batches(len(self.train_y), self.batch_size, steps, self.g),
            total=steps,
            desc=f"train {name}",
            disable=not self.progress,
        )
        for i, index in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = lr_at(i)
            loss = loss_fn(model, _augment(self.train_x[index], self.g), self.train_y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.4f}")
        model.eval()
        return smoothed


@functools.cache
def _alphas_cumprod() -> Tensor:
    return schedule().alphas_cumprod.float()


def _start(seed: int, batch_size: int, progress: bool) -> tuple[_Run, Tensor, Tensor]:
    """Seed both random streams and load the data: (run, held-out x, held-out y)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train_x, train_y, held_x, held_y = load_dataset(seed)
    return _Run(train_x, train_y, batch_size, g, progress), held_x, held_y


def _save(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(state, path)


def train(
    out: Path = WEIGHTS,
    *,
    seed: int = 0,
    unet_steps: int = 3000,
    classifier_steps: int = 1500,
    evaluator_steps: int = 1000,
    guide_steps: int = GUIDE_STEPS,
    transformer_steps: int = TRANSFORMER_STEPS,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Train the five networks deterministically and write fp16 safetensors plus a JSON
    record of the run into ``out``. Returns the record (losses, held-out accuracy).
    ``batch_size`` is the UNet's, classifier's, evaluator's and guide's; the transformer trains
    at its own (``train_transformer``'s 128, as the shipped one did). Raises ValueError,
    before any work, for a step count or batch size below 1."""
    _check_counts(
        unet_steps=unet_steps,
        classifier_steps=classifier_steps,
        evaluator_steps=evaluator_steps,
        guide_steps=guide_steps,
        transformer_steps=transformer_steps,
        batch_size=batch_size,
    )
    run, held_x, held_y = _start(seed, batch_size, progress)
    models = build()
    record: dict = {"seed": seed, "train_images": len(run.train_y), "held_out_images": len(held_y)}
    record["unet_loss"] = run.fit("unet", models.unet, unet_steps, run.diffusion_loss, 2e-3)
    record["classifier_loss"] = run.fit(
        "classifier", models.classifier, classifier_steps, run.noisy_classifier_loss, 1e-3
    )
    record["evaluator_loss"] = run.fit("evaluator", models.evaluator, evaluator_steps, run.clean_loss, 2e-3)
    with torch.no_grad():
        record["evaluator_held_out_accuracy"] = (models.evaluator(held_x).argmax(-1) == held_y).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "classifier", "evaluator"):
        _save(getattr(models, name), out / f"digits_{name}.safetensors")
    record = train_guide(out, seed=seed, steps=guide_steps, batch_size=batch_size, progress=progress, record=record)
    return train_transformer(out, seed=seed, steps=transformer_steps, progress=progress, record=record)


def train_guide(
    out: Path = WEIGHTS,
    *,
    seed: int = 0,
    steps: int = GUIDE_STEPS,
    batch_size: int = 64,
    progress: bool = True,
    record: dict | None = None,
) -> dict:
    """Train the guide alone, deterministically from ``seed`` (its streams are re-seeded,
    so it comes out the same whether or not the other networks were trained first), and
    write digits_guide.safetensors plus digits_training.json: ``record`` (the other
    networks' entries, kept as they are) with guide_seed, guide_steps and guide_loss set.
    Returns that record. Raises ValueError, before any work, for ``steps`` or
    ``batch_size`` below 1."""
    return _train_alone(
        "guide",
        build_guide,
        "diffusion_loss",
        2e-3,
        guide_file(out),
        out,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        progress=progress,
        record=record,
    )


def train_transformer(
    out: Path = WEIGHTS,
    *,
    seed: int = 0,
    steps: int = TRANSFORMER_STEPS,
    batch_size: int = 128,
    progress: bool = True,
    record: dict | None = None,
) -> dict:
    """Train the flow transformer alone, as ``train_guide`` trains the guide (its own
    re-seeded streams; transformer_seed, transformer_steps and transformer_loss set in the
    record), and write digits_transformer.safetensors plus digits_training.json."""
    return _train_alone(
        "transformer",
        build_transformer,
        "flow_loss",
        1e-3,
        transformer_file(out),
        out,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        progress=progress,
        record=record,
    )


def _train_alone(
    name: str,
    build_network,
    loss: str,
    lr: float,
    path: Path,
    out: Path,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    progress: bool,
    record: dict | None,
) -> dict:
    _check_counts(**{f"{name}_steps": steps, "batch_size": batch_size})
    run, _, _ = _start(seed, batch_size, progress)
    network = build_network()
    final_loss = run.fit(name, network, steps, getattr(run, loss), lr)
    record = {**(record or {}), f"{name}_seed": seed, f"{name}_steps": steps, f"{name}_loss": final_loss}
    out.mkdir(parents=True, exist_ok=True)
    _save(network, path)
    (out / "digits_training.json").write_text(json.dumps(record, indent=1))
    return record

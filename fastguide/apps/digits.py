"""fastguide's own guided model: handwritten digits (scikit-learn's 1,797 8×8 images).

Three networks, trained by ``fastguide train`` with a fixed seed, ship as fp16
safetensors in fastguide/weights/ so that ``fastguide sample`` works right after install:
- ``unet``: a compact class-conditional ADM UNet with a null class and label dropout
  (classifier-free guidance ready), eps-prediction on the cosine schedule;
- ``classifier``: a noisy EncoderUNet classifier of x_t (classifier guidance);
- ``evaluator``: a separate clean CNN classifier, never used for guidance, whose
  accuracy and 64-d features score samples (fidelity, Fréchet distance, diversity).
Pixels 0…16 map to [−1, 1]. A fixed, stratified held-out set is kept out of training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models.checkpoints import load_checkpoint
from ..models.configs import create_classifier, create_model
from ..models.unet import EncoderUNet, UNet
from ..sampling.schedule import NoiseSchedule

WEIGHTS = Path(__file__).parents[1] / "weights"
IMAGE_SIZE, NUM_CLASSES, HELD_OUT_PER_CLASS = 8, 10, 30

UNET_FLAGS = dict(image_size=IMAGE_SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                  attention_resolutions="4", num_head_channels=32, dropout=0.1, class_cond=True,
                  num_classes=NUM_CLASSES, learn_sigma=False, in_channels=1, use_scale_shift_norm=True,
                  resblock_updown=True, null_class=True, label_dropout=0.1)
CLASSIFIER_FLAGS = dict(image_size=IMAGE_SIZE, classifier_width=32, classifier_depth=1, channel_mult="1,2",
                        classifier_attention_resolutions="4", classifier_pool="attention",
                        num_classes=NUM_CLASSES, in_channels=1)


def schedule() -> NoiseSchedule:
    """The digits model's training schedule (cosine, 1000 steps)."""
    return NoiseSchedule.cosine(1000)


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
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, 64), nn.SiLU(),
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


def build() -> DigitsModels:
    return DigitsModels(create_model(**UNET_FLAGS), create_classifier(**CLASSIFIER_FLAGS), Evaluator())


def load(device: torch.device | str = "cpu", weights: Path = WEIGHTS) -> DigitsModels:
    """The shipped (or ``weights``) networks in eval mode, float32, on ``device``."""
    models = build()
    for name in ("unet", "classifier", "evaluator"):
        load_checkpoint(getattr(models, name), weights / f"digits_{name}.safetensors")
    for model in (models.unet, models.classifier, models.evaluator):
        model.to(device).float().eval()
    return models


def _batches(n: int, batch_size: int, steps: int, g: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=g)


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random one-pixel shifts (digits are centred; shifts add variety, keep the class)."""
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=shifts, dims=(2, 3))


def train(out: Path = WEIGHTS, *, seed: int = 0, unet_steps: int = 3000, classifier_steps: int = 1500,
          evaluator_steps: int = 1000, batch_size: int = 64, progress: bool = True) -> dict:
    """Train the three networks deterministically and write fp16 safetensors plus a JSON
    record of the run into ``out``. Returns the record (losses, held-out accuracy).
    Raises ValueError, before any work, for a step count or batch size below 1."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    counts = dict(unet_steps=unet_steps, classifier_steps=classifier_steps, evaluator_steps=evaluator_steps,
                  batch_size=batch_size)
    for name, value in counts.items():  # 0 steps would write untrained weights
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train_x, train_y, held_x, held_y = load_dataset(seed)
    models = build()
    sched = schedule()
    abar = sched.alphas_cumprod.float()
    record: dict = {"seed": seed, "train_images": len(train_y), "held_out_images": len(held_y)}

    def noisy(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.randint(0, sched.num_timesteps, (len(x),), generator=g)
        eps = torch.randn(x.shape, generator=g)
        a = abar[t].reshape(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * eps, t, eps

    def fit(name: str, model: nn.Module, steps: int, loss_fn, lr: float) -> float:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        lr_at = lambda i: lr * min(1.0, (i + 1) / 200) * 0.5 * (1 + math.cos(math.pi * i / steps))  # noqa: E731
        smoothed = None
        bar = tqdm(_batches(len(train_y), batch_size, steps, g), total=steps, desc=f"train {name}",
                   disable=not progress)
        for i, index in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = lr_at(i)
            loss = loss_fn(model, _augment(train_x[index], g), train_y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.4f}")
        model.eval()
        return smoothed

    def diffusion_loss(model, x, y):
        x_t, t, eps = noisy(x)
        return F.mse_loss(model(x_t, t, y), eps)

    def noisy_classifier_loss(model, x, y):
        x_t, t, _ = noisy(x)
        return F.cross_entropy(model(x_t, t), y)

    def clean_loss(model, x, y):
        return F.cross_entropy(model(x), y)

    record["unet_loss"] = fit("unet", models.unet, unet_steps, diffusion_loss, 2e-3)
    record["classifier_loss"] = fit("classifier", models.classifier, classifier_steps, noisy_classifier_loss, 1e-3)
    record["evaluator_loss"] = fit("evaluator", models.evaluator, evaluator_steps, clean_loss, 2e-3)
    with torch.no_grad():
        record["evaluator_held_out_accuracy"] = (models.evaluator(held_x).argmax(-1) == held_y).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "classifier", "evaluator"):
        state = {k: v.detach().half().contiguous() for k, v in getattr(models, name).state_dict().items()}
        save_file(state, str(out / f"digits_{name}.safetensors"))
    (out / "digits_training.json").write_text(json.dumps(record, indent=1))
    return record

"""Guidance sweep on the digits model: fidelity, distance to real data, and diversity by scale.

For CFG (the class-conditional model, scale w; w = 0 is the unconditional model) and for
classifier guidance (the unconditional model, i.e. the null label, guided by the noisy
classifier at scale s), samples are scored by the separate clean evaluator network:
- accuracy: how often the evaluator reads the requested class (fidelity);
- Fréchet distance between the evaluator's 64-d features of the samples and of the
  held-out real digits: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^½ Σ₂ Σ₁^½)^½) (FID's formula);
- diversity: mean pairwise feature distance between samples of the same class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import digits


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a and of b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


def within_class_diversity(features: Tensor, labels: Tensor) -> float:
    """Mean pairwise L2 distance of features within each class, averaged over classes."""
    distances = []
    for label in labels.unique():
        members = features[labels == label]
        if len(members) > 1:
            pairwise = torch.cdist(members, members)
            distances.append(pairwise.sum() / (len(members) * (len(members) - 1)))
    return float(torch.stack(distances).mean())


def score(models: digits.DigitsModels, images: Tensor, labels: Tensor, real_features: np.ndarray) -> dict:
    with torch.no_grad():
        evaluator = models.evaluator.cpu()
        features = evaluator.features(images.cpu())
        accuracy = (evaluator.head(features).argmax(-1) == labels).float().mean().item()
    return {"accuracy": accuracy, "frechet": frechet_distance(features.numpy(), real_features),
            "diversity": within_class_diversity(features, labels)}


class _Unconditional(torch.nn.Module):
    """The CFG model fed its null label whatever the requested class (classifier guidance's base)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.num_classes = unet, unet.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.unet(x, t, torch.full_like(y, self.unet.null_label))


def run(scales: list[float], *, samples_per_scale: int = 500, steps: int = 25, sampler: str = "dpm++2m",
        seed: int = 0, device: str = "cpu", progress: bool = True) -> list[dict]:
    """Rows {guidance, scale, accuracy, frechet, diversity} for CFG and classifier guidance."""
    from tqdm.auto import tqdm

    from ..sampling.guidance import CFG, ClassifierGuidance
    from ..sampling.loop import sample

    models = digits.load(device)
    _, _, held_x, _ = digits.load_dataset()
    with torch.no_grad():
        real_features = models.evaluator.features(held_x.to(device)).cpu().numpy()
    labels = torch.arange(samples_per_scale) % digits.NUM_CLASSES
    shape = (samples_per_scale, 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    unconditional = _Unconditional(models.unet)
    rows = []
    jobs = [("cfg", s) for s in scales] + [("classifier", s) for s in scales]
    for kind, scale in tqdm(jobs, desc="guidance sweep", disable=not progress):
        if kind == "cfg":
            model, guidance = models.unet, CFG(scale)
        else:
            model, guidance = unconditional, ClassifierGuidance(models.classifier, scale)
        images = sample(model, shape, labels=labels.to(device), sampler=sampler,
                        steps=digits.schedule().strided_timesteps(steps),
                        schedule=digits.schedule(), guidance=guidance, null_label=models.unet.null_label,
                        generator=torch.Generator(device).manual_seed(seed), device=device)
        rows.append({"guidance": kind, "scale": scale, **score(models, images, labels, real_features)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| guidance | scale | accuracy | Fréchet distance | diversity |", "|---|---|---|---|---|"]
    lines += [f"| {r['guidance']} | {r['scale']:g} | {r['accuracy']:.3f} | {r['frechet']:.3f} | {r['diversity']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for kind, style in (("cfg", "o-"), ("classifier", "s--")):
        kind_rows = [r for r in rows if r["guidance"] == kind]
        for ax, metric in zip(axes, ("accuracy", "frechet", "diversity")):
            ax.plot([r["scale"] for r in kind_rows], [r[metric] for r in kind_rows], style, label=kind)
            ax.set_xlabel("guidance scale")
            ax.set_title({"accuracy": "accuracy (fidelity)", "frechet": "Fréchet distance (lower is better)",
                          "diversity": "within-class diversity"}[metric])
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Guidance sweep on the digits model: fidelity, distance to real data, and diversity by scale.

Kinds of guidance (``KINDS``), each over its own scales:
- cfg: the class-conditional model at CFG scale w (w = 0 is the unconditional model);
- cfg++: CFG++ at λ in [0, 1], on dpm++2m (second order, on the other rows' grid) unless
  the sweep's sampler is one CFG++ is built for;
- auto: autoguidance at w, the digits model guided by its weaker guide network;
- interval: CFG at w inside a guidance interval of EDM's σ̃ (Kynkäänniemi et al. 2024),
  the conditional model outside it;
- schedule: CFG whose weight follows a linear or cosine schedule over the steps;
- classifier: the unconditional model (the null label) guided by the noisy classifier at s.
Samples are scored by the separate clean evaluator network:
- accuracy: how often the evaluator reads the requested class (fidelity);
- Fréchet distance between the evaluator's 64-d features of the samples and of the
  held-out real digits: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^½ Σ₂ Σ₁^½)^½) (FID's formula);
- diversity: mean pairwise feature distance between samples of the same class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor

from ..models.unet import UNet
from . import digits


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a and of b (unbiased
    covariances, as pytorch-fid); NaN where a feature is not finite (samples that overflowed
    at a huge scale), which numpy's eigensolver would not converge on."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(
        ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(middle, 0, None)).sum()
    )


def within_class_diversity(features: Tensor, labels: Tensor) -> float:
    """Mean pairwise L2 distance of features within each class, averaged over the classes
    with two or more members (NaN where none has)."""
    distances = []
    for label in labels.unique():
        members = features[labels == label]
        if len(members) > 1:
            pairwise = torch.cdist(members, members)
            distances.append(pairwise.sum() / (len(members) * (len(members) - 1)))
    return float(torch.stack(distances).mean()) if distances else float("nan")


def score(models: digits.DigitsModels, images: Tensor, labels: Tensor, real_features: np.ndarray) -> dict:
    with torch.no_grad():
        evaluator = models.evaluator.cpu()
        features = evaluator.features(images.cpu())
        accuracy = (evaluator.head(features).argmax(-1) == labels).float().mean().item()
    return {
        "accuracy": accuracy,
        "frechet": frechet_distance(features.numpy(), real_features),
        "diversity": within_class_diversity(features, labels),
    }


class _Unconditional(torch.nn.Module):
    """The CFG model fed its null label whatever the requested class (classifier guidance's base)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.num_classes = unet, unet.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.unet(x, t, torch.full_like(y, self.unet.null_label))


KINDS = ("cfg", "cfg++", "auto", "interval", "schedule", "classifier")
# The guidance interval of Kynkäänniemi et al. 2024 for EDM2-S: the middle noise levels.
DEFAULT_INTERVAL = (0.28, 5.42)


@dataclass(frozen=True)
class Variants:
    """The sweep's settings beyond --scales: CFG++'s λ values, autoguidance's w values
    (None: --scales), the interval rows' σ̃ interval and the schedule rows' schedule."""

    cfgpp_scales: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    auto_scales: tuple[float, ...] | None = None
    interval: tuple[float, float] = DEFAULT_INTERVAL
    schedule: str = "linear"


def _jobs(kinds: tuple[str, ...], scales: list[float], variants: Variants, sampler: str) -> list[dict]:
    """One {kind, guidance (the table's label), sampler, scale} per row, in ``kinds`` order."""
    from ..sampling.guidance import CFGPlusPlus

    low, high = variants.interval
    labels = {"interval": f"cfg, σ̃ in ({low:g}, {high:g}]", "schedule": f"cfg, {variants.schedule} schedule"}
    jobs = []
    for kind in kinds:
        kind_scales = {"cfg++": variants.cfgpp_scales, "auto": variants.auto_scales or scales}.get(kind, scales)
        # CFG++ is built for a few samplers only: its rows use --sampler if it is one, else dpm++2m
        kind_sampler = (sampler if sampler in CFGPlusPlus.SAMPLERS else "dpm++2m") if kind == "cfg++" else sampler
        jobs += [
            {"kind": kind, "guidance": labels.get(kind, kind), "sampler": kind_sampler, "scale": scale}
            for scale in kind_scales
        ]
    return jobs


def run(
    scales: list[float],
    *,
    kinds: tuple[str, ...] = ("cfg", "classifier"),
    variants: Variants = Variants(),
    samples_per_scale: int = 500,
    steps: int | list[float] = 25,
    sampler: str = "unipc",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    transformer: bool = False,
    weights: Path = digits.WEIGHTS,
) -> list[dict]:
    """Rows {kind, guidance, sampler, scale, accuracy, frechet, diversity} for each of
    ``kinds`` (see ``KINDS``), every row from the same seed; ``steps`` a count (on the
    sampler's default grid) or the timesteps. "auto" needs the guide network (ValueError
    without it). ``transformer``: sample the flow transformer instead of the UNet (CFG
    kinds only: it has no classifier or guide). ``weights``: the folder of the networks
    (the shipped ones by default); the images scored against are the held-out ones of the
    split they were trained on (``digits.held_out_seed``). ValueError, before any
    sampling, for an unknown kind or fewer samples per scale than two of a class."""
    from tqdm.auto import tqdm

    from ..sampling.guidance import CFG, AutoGuidance, CFGPlusPlus, ClassifierGuidance
    from ..sampling.loop import GuidanceSpec, sample

    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"kinds must be among {KINDS}, got {unknown}")
    if samples_per_scale < digits.NUM_CLASSES + 1:  # within-class diversity needs two of a class
        raise ValueError(f"samples_per_scale must be at least {digits.NUM_CLASSES + 1}, got {samples_per_scale}")
    split_seed = digits.held_out_seed(weights, ("guide",) * ("auto" in kinds) + ("transformer",) * transformer)
    models = digits.load(device, weights)
    if "auto" in kinds and models.guide is None:
        raise ValueError(f"autoguidance needs the guide network {digits.guide_file(weights)}, which is missing")
    if transformer and (models.transformer is None or {"auto", "classifier"} & set(kinds)):
        raise ValueError(
            f"the flow transformer sweep needs {digits.transformer_file(weights)} and CFG kinds only, got kinds {kinds}"
        )
    denoiser = models.transformer if transformer else models.unet
    assert denoiser is not None  # a transformer sweep without the transformer was refused above
    path = (
        dict(schedule=digits.flow_schedule(), prediction_type="flow_prediction", clip_denoised=True)  # pixels
        if transformer
        else dict(schedule=digits.schedule())
    )
    _, _, held_x, _ = digits.load_dataset(split_seed)
    with torch.no_grad():
        real_features = models.evaluator.features(held_x.to(device)).cpu().numpy()
    labels = torch.arange(samples_per_scale) % digits.NUM_CLASSES
    shape = (samples_per_scale, 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    unconditional = _Unconditional(models.unet)
    specs: dict[str, Callable[[float], GuidanceSpec]] = {
        "cfg": lambda w: CFG(w),
        "cfg++": lambda w: CFGPlusPlus(w),
        "auto": lambda w: AutoGuidance(cast(UNet, models.guide), w),  # (an "auto" sweep has a guide: checked above)
        "interval": lambda w: CFG(w, interval=variants.interval),
        "schedule": lambda w: CFG(w, schedule=variants.schedule),
        "classifier": lambda w: ClassifierGuidance(models.classifier, w),
    }
    rows = []
    for job in tqdm(_jobs(kinds, scales, variants, sampler), desc="guidance sweep", disable=not progress):
        model = unconditional if job["kind"] == "classifier" else denoiser
        images = sample(
            model,
            shape,
            labels=labels.to(device),
            sampler=job["sampler"],
            steps=steps,
            guidance=specs[job["kind"]](job["scale"]),
            null_label=denoiser.null_label,
            generator=torch.Generator(device).manual_seed(seed),
            device=device,
            **path,
        )
        rows.append({**job, **score(models, images, labels, real_features)})
    return rows


def best_rows(rows: list[dict]) -> dict[str, dict]:
    """{kind: its row with the lowest Fréchet distance}, in the rows' order of kinds; a NaN
    distance (samples that overflowed) is never the lowest unless every row of the kind has one."""
    best: dict[str, dict] = {}
    for row in rows:
        held = best.get(row["kind"])
        if held is None or (not math.isnan(row["frechet"]) and not row["frechet"] >= held["frechet"]):
            best[row["kind"]] = row
    return best


def markdown(rows: list[dict]) -> str:
    """The table (each kind's lowest Fréchet distance in bold), then one line naming the
    best row of each kind."""
    best = best_rows(rows)
    lines = ["| guidance | sampler | scale | accuracy | Fréchet distance | diversity |", "|---|---|---|---|---|---|"]
    for r in rows:
        frechet = f"**{r['frechet']:.3f}**" if best[r["kind"]] is r else f"{r['frechet']:.3f}"
        lines.append(
            f"| {r['guidance']} | {r['sampler']} | {r['scale']:g} | {r['accuracy']:.3f} | {frechet} "
            f"| {r['diversity']:.3f} |"
        )
    symbols = {"cfg++": "λ", "classifier": "s"}  # each kind's name for its scale
    named = [
        f"{r['guidance']} at {symbols.get(r['kind'], 'w')} = {r['scale']:g} ({r['frechet']:.3f})" for r in best.values()
    ]
    lines += ["", "Lowest Fréchet distance: " + "; ".join(named) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    styles = dict(zip(KINDS, ("o-", "v-", "D-", "^:", "x:", "s--")))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        kind_rows = [r for r in rows if r["kind"] == kind]
        for ax, metric in zip(axes, ("accuracy", "frechet", "diversity")):
            ax.plot(
                [r["scale"] for r in kind_rows],
                [r[metric] for r in kind_rows],
                styles[kind],
                label=kind_rows[0]["guidance"],
            )
            ax.set_xlabel("guidance scale (λ for cfg++)")
            ax.set_title(
                {
                    "accuracy": "accuracy (fidelity)",
                    "frechet": "Fréchet distance (lower is better)",
                    "diversity": "within-class diversity",
                }[metric]
            )
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

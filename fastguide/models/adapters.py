"""Adapters from other libraries' models to the sampler's ``model(x_t, t, y)`` signature."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` as ``model(x_t, t, y) -> prediction``.

    ``null_label`` is the class index the model was trained to treat as "no class"
    (classifier-free guidance); the real classes are then 0 … null_label − 1.
    """

    def __init__(self, unet: nn.Module, null_label: int | None = None):
        """Checks unet a module with a diffusers ``config`` and null_label None or an int (not
        a bool) indexing the model's class embeddings."""
        super().__init__()
        if not isinstance(unet, nn.Module) or not hasattr(unet, "config"):
            raise TypeError(
                f"unet must be a diffusers UNet2DModel (an nn.Module with a config), got {type(unet).__name__}"
            )
        self.unet = unet
        class_embeds = getattr(unet.config, "num_class_embeds", None)
        if null_label is not None and (
            isinstance(null_label, bool)
            or not isinstance(null_label, int)
            or class_embeds is None
            or not 0 <= null_label < class_embeds
        ):
            raise ValueError(
                f"null_label must be an int indexing the model's {class_embeds} class embeddings, got {null_label!r}"
            )
        self.null_class = null_label is not None
        self.num_classes = null_label if null_label is not None else class_embeds

    @property
    def null_label(self) -> int | None:
        """The unconditional class index, or None when the model was given none."""
        return self.num_classes if self.null_class else None

    @property
    def perturbation_target(self) -> nn.Module:
        """The wrapped UNet, whose layers PAG perturbs by their own names ("mid_block", not
        "unet.mid_block"; fastguide.models.blocks.perturbation_target)."""
        return self.unet

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(x, timesteps, class_labels=y).sample


class SiTVelocity(nn.Module):
    """A SiT-convention flow model (Ma et al. 2024: x_τ = τ·x0 + (1 − τ)·ε, data at τ = 1,
    the network predicting dx/dτ = x0 − ε) as fastguide's ``prediction_type="flow_prediction"``
    model on ``NoiseSchedule.flow()``: time t = T·σ with σ = 1 − τ, output ε − x0.

    A SiT checkpoint built with learn_sigma (8 output channels for 4 latent ones, as the
    released SiT-XL/2) keeps its first ``in_channels`` outputs, as SiT's own sampler does.
    ``num_classes``, ``null_class`` and ``null_label`` are the wrapped model's; PAG,
    skip-layer guidance and block caches reach its layers (``perturbation_target``).
    """

    def __init__(self, sit: nn.Module, num_timesteps: int = 1000):
        """Checks sit callable and num_timesteps a positive int (not a bool): the T of the
        flow schedule it is sampled on, which the time τ = 1 − t/T divides by."""
        super().__init__()
        if not callable(sit):
            raise TypeError(f"sit must be a callable SiT model sit(x, tau, y), got {type(sit).__name__}")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int (the flow schedule's T), got {num_timesteps!r}")
        self.sit, self.num_timesteps = sit, num_timesteps
        self.num_classes = getattr(sit, "num_classes", None)
        self.null_class = getattr(sit, "null_class", False)
        if self.null_class:
            self.null_label = sit.null_label

    @property
    def perturbation_target(self) -> nn.Module:
        """The wrapped network, whose layers PAG and skip-layer guidance perturb and whose
        blocks a block cache skips (fastguide.models.blocks.perturbation_target)."""
        return self.sit

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        tau = 1.0 - t.to(torch.promote_types(x.dtype, torch.float32)) / self.num_timesteps  # (float64 for float64 x)
        velocity = self.sit(x, tau, y)
        return -velocity[:, : x.shape[1]]

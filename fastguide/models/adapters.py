"""Adapters from other libraries' models to the sampler's ``model(x_t, t, y)`` signature."""

from __future__ import annotations

from torch import Tensor, nn


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` as ``model(x_t, t, y) -> prediction``.

    ``null_label`` is the class index the model was trained to treat as "no class"
    (classifier-free guidance); the real classes are then 0 … null_label − 1.
    """

    def __init__(self, unet: nn.Module, null_label: int | None = None):
        super().__init__()
        self.unet = unet
        class_embeds = getattr(unet.config, "num_class_embeds", None)
        if null_label is not None and (class_embeds is None or not 0 <= null_label < class_embeds):
            raise ValueError(f"null_label must index the model's {class_embeds} class embeddings, got {null_label}")
        self.null_class = null_label is not None
        self.num_classes = null_label if null_label is not None else class_embeds

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(x, timesteps, class_labels=y).sample


class SiTVelocity(nn.Module):
    """A SiT-convention flow model (Ma et al. 2024: x_τ = τ·x0 + (1 − τ)·ε, data at τ = 1,
    the network predicting dx/dτ = x0 − ε) as fastguide's ``prediction_type="flow_prediction"``
    model on ``NoiseSchedule.flow()``: time t = T·σ with σ = 1 − τ, output ε − x0.

    A SiT checkpoint built with learn_sigma (8 output channels for 4 latent ones, as the
    released SiT-XL/2) keeps its first ``in_channels`` outputs, as SiT's own sampler does.
    ``num_classes``, ``null_class`` and ``null_label`` are the wrapped model's.
    """

    def __init__(self, sit: nn.Module, num_timesteps: int = 1000):
        super().__init__()
        self.sit, self.num_timesteps = sit, num_timesteps
        self.num_classes = getattr(sit, "num_classes", None)
        self.null_class = getattr(sit, "null_class", False)
        if self.null_class:
            self.null_label = sit.null_label

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        tau = 1.0 - t.float() / self.num_timesteps
        velocity = self.sit(x, tau, y)
        return -velocity[:, : x.shape[1]]

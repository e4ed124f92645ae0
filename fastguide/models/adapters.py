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

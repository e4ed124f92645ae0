"""fastguide's DiT as diffusers' ``DiTTransformer2DModel`` holding the same weights.

For comparisons on the same network: diffusers' port of DiT, and whatever diffusers runs
on its models (its cache hooks), against fastguide's DiT. The layout follows diffusers'
scripts/convert_dit_to_diffusers.py: every block carries its own copy of the timestep and
label embedders, the qkv projection splits into to_q/to_k/to_v, and pos_embed is dropped
(diffusers recomputes it). Two of diffusers' defaults differ from the official math, and
are set to it: its timestep sinusoids divide the exponent by half − 1
(``downscale_freq_shift=1``) where the official code divides by half, and its MLP LayerNorm
takes ``norm_eps`` (default 1e-5) where the official one has 1e-6.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .dit import DiT
from .unet import check_labels, check_timesteps


def diffusers_state_dict(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """A fastguide (official) DiT state dict in diffusers' DiTTransformer2DModel names."""
    out = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
    }
    for d in range(depth):
        block, ours = f"transformer_blocks.{d}", f"blocks.{d}"
        for suffix in ("weight", "bias"):
            out[f"{block}.norm1.emb.timestep_embedder.linear_1.{suffix}"] = state[f"t_embedder.mlp.0.{suffix}"]
            out[f"{block}.norm1.emb.timestep_embedder.linear_2.{suffix}"] = state[f"t_embedder.mlp.2.{suffix}"]
            out[f"{block}.norm1.linear.{suffix}"] = state[f"{ours}.adaLN_modulation.1.{suffix}"]
            q, k, v = state[f"{ours}.attn.qkv.{suffix}"].chunk(3, dim=0)
            out[f"{block}.attn1.to_q.{suffix}"], out[f"{block}.attn1.to_k.{suffix}"] = q, k
            out[f"{block}.attn1.to_v.{suffix}"] = v
            out[f"{block}.attn1.to_out.0.{suffix}"] = state[f"{ours}.attn.proj.{suffix}"]
            out[f"{block}.ff.net.0.proj.{suffix}"] = state[f"{ours}.mlp.fc1.{suffix}"]
            out[f"{block}.ff.net.2.{suffix}"] = state[f"{ours}.mlp.fc2.{suffix}"]
        out[f"{block}.norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    for suffix in ("weight", "bias"):
        out[f"proj_out_1.{suffix}"] = state[f"final_layer.adaLN_modulation.1.{suffix}"]
        out[f"proj_out_2.{suffix}"] = state[f"final_layer.linear.{suffix}"]
    return out


def to_diffusers(model: DiT) -> nn.Module:
    """diffusers' DiTTransformer2DModel with ``model``'s weights and the official math (see
    the module docstring), in ``model``'s dtype and device, in eval mode. Needs diffusers."""
    import diffusers

    if not isinstance(model, DiT):
        raise TypeError(f"model must be a fastguide.DiT, got {type(model).__name__}")
    width = model.pos_embed.shape[-1]
    # What DiTTransformer2DModel cannot hold: it always has the null class row, a 4× MLP
    # and at least one block.
    first: Any = model.blocks[0] if len(model.blocks) else None
    mlp_width = None if first is None else first.mlp.fc1.out_features
    problems = [
        problem
        for problem, present in (
            ("no blocks (depth=0)", not len(model.blocks)),
            (f"an MLP of {mlp_width} for width {width} (mlp_ratio != 4)", mlp_width not in (None, 4 * width)),
            ("no null class (class_dropout_prob=0)", not model.null_class),
        )
        if present
    ]
    if problems:
        raise ValueError(f"model cannot be a diffusers DiTTransformer2DModel: it has {'; '.join(problems)}")
    # Any: mypy takes diffusers' top-level names for their no-torch placeholders (utils.dummy_pt_objects)
    theirs: Any = diffusers.DiTTransformer2DModel(
        num_attention_heads=model.num_heads,
        attention_head_dim=width // model.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=len(model.blocks),
        sample_size=model.input_size,
        patch_size=model.patch_size,
        num_embeds_ada_norm=model.num_classes,
        norm_eps=1e-6,
    )
    theirs.load_state_dict(diffusers_state_dict(model.state_dict(), len(model.blocks)), strict=True)
    # diffusers builds its own sincos position table: a model whose pos_embed is another
    # (changed, or trained) would silently become a different network. Held to the rounding
    # of the table in fp16 (5e-4 on values in [−1, 1]: weights shipped in fp16, as the digits
    # transformer's, round it so), or in the model's dtype where that is coarser (bf16: 3.9e-3).
    table = theirs.pos_embed.pos_embed
    tolerance = max(1e-3, torch.finfo(model.pos_embed.dtype).eps)
    if not torch.allclose(model.pos_embed.detach().to(table), table, rtol=0, atol=tolerance):
        raise ValueError(
            "model cannot be a diffusers DiTTransformer2DModel: its pos_embed is not the fixed 2-D sincos table "
            "diffusers builds (diffusers holds no other)"
        )
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return theirs.to(device=model.pos_embed.device, dtype=model.pos_embed.dtype).eval()


class DiffusersDiT(nn.Module):
    """A diffusers DiTTransformer2DModel called as fastguide calls a DiT: model(x, t, y) -> tensor."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        # (nn.Module.__getattr__'s stub gives tensors and modules only; config is diffusers' FrozenDict)
        self.num_classes: int = transformer.config.num_embeds_ada_norm  # type: ignore[union-attr,assignment]
        # diffusers' label table always has the null class, row num_classes (DiTPipeline's 1000)
        self.null_class = True

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def perturbation_target(self) -> nn.Module:
        """The wrapped transformer, whose layers PAG and skip-layer guidance perturb and whose
        blocks a block cache skips, by diffusers' names ("transformer_blocks.1", not
        "transformer.transformer_blocks.1"; fastguide.models.blocks.perturbation_target)."""
        return self.transformer

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """As ``DiT.forward``: t and y (N,) or 0-d, one for the whole batch; y None is the null label."""
        t = check_timesteps(t, x)
        if y is None:
            y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        y = check_labels(y, x, self.num_classes + 1)
        return self.transformer(x, timestep=t, class_labels=y).sample

"""DiT's forward pass written out as the official code (facebookresearch/DiT, models.py)
computes it, over a fastguide.DiT's weights, with torch.nn.functional alone: modulate(LN(x),
shift, scale) with a LayerNorm without affine (eps 1e-6), timm's attention through
F.scaled_dot_product_attention, the GELU-tanh MLP, the gated residuals as adds, an einsum
unpatchify. No fastguide op runs in it. It is the "same weights, the official forward"
baseline of the end-to-end benchmark and an independent check of the fused forward in the
tests; differentiable, so it also gives reference gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastguide.models.dit import DiT

NORM_EPS = 1e-6  # the official blocks' nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
FREQUENCY_EMBEDDING_SIZE = 256  # the official TimestepEmbedder's sinusoids


def _linear(v: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(v, layer.weight, layer.bias)


def plain_dit(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The prediction (N, out_channels, H, W) of x (N, C, H, W) at timesteps t (N,) and labels
    y (N,), as in eval mode (no label dropout)."""
    p, dim = model.patch_size, model.pos_embed.shape[-1]
    heads, head_dim = model.num_heads, dim // model.num_heads
    proj = model.x_embedder.proj
    h = F.conv2d(x, proj.weight, proj.bias, stride=p).flatten(2).transpose(1, 2) + model.pos_embed
    half = FREQUENCY_EMBEDDING_SIZE // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = t[:, None].float() * freqs[None]
    # (float32 sinusoids cast to x's dtype: the official code runs float32 models only)
    sinusoids = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
    mlp = model.t_embedder.mlp
    c = _linear(F.silu(_linear(sinusoids, mlp[0])), mlp[2]) + model.y_embedder.embedding_table.weight[y]

    def modulate(v: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(v, (dim,), eps=NORM_EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    for block in model.blocks:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _linear(
            F.silu(c), block.adaLN_modulation[1]
        ).chunk(6, dim=1)
        a = modulate(h, shift_msa, scale_msa)
        batch, tokens, _ = a.shape
        q, k, v = _linear(a, block.attn.qkv).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        h = h + gate_msa.unsqueeze(1) * _linear(attn.transpose(1, 2).reshape(batch, tokens, dim), block.attn.proj)
        m = F.gelu(_linear(modulate(h, shift_mlp, scale_mlp), block.mlp.fc1), approximate="tanh")
        h = h + gate_mlp.unsqueeze(1) * _linear(m, block.mlp.fc2)
    shift, scale = _linear(F.silu(c), model.final_layer.adaLN_modulation[1]).chunk(2, dim=1)
    out = _linear(modulate(h, shift, scale), model.final_layer.linear)
    grid, channels = int(out.shape[1] ** 0.5), model.out_channels
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(out.shape[0], grid, grid, p, p, channels))
    return out.reshape(out.shape[0], channels, grid * p, grid * p)

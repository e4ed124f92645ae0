"""Thin modules over fastguide.ops, with ADM's parameter names and shapes.

``GroupNorm32`` is an ``nn.GroupNorm`` (same ``weight``/``bias``) whose call can also take
ADM's scale-shift and a fused SiLU. ``QKVAttention`` splits a packed (B, 3·C, T)
projection into q, k, v as strided views in either head order and attends without
copying them. ``AttentionBlock`` and ``AttentionPool2d`` are ADM's modules on top.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype (ADM's GroupNorm32).

    ``norm(x, scale=s, shift=h, activation="silu")`` computes
    silu(GN(x)·(1 + s) + h) in one op: the ResBlock's norm → scale-shift → SiLU.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(
        self,
        x: Tensor,
        *,
        scale: Tensor | None = None,
        shift: Tensor | None = None,
        activation: str | None = None,
    ) -> Tensor:
        return ops.group_norm(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            scale=scale,
            shift=shift,
            activation=activation,
        )


def split_heads(qkv: Tensor, num_heads: int, legacy_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as (B, H, T, ch) strided views of a (B, 3·H·ch, T) projection.

    Legacy order (ADM's default) groups rows per head, [q₀ k₀ v₀ q₁ k₁ v₁ …]; the new
    order is [Q; K; V] with the heads inside each. No data is copied.
    """
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        parts = qkv.view(batch, num_heads, 3, ch, length).unbind(2)
    else:
        parts = qkv.view(batch, 3, num_heads, ch, length).unbind(1)
    q, k, v = (t.transpose(-1, -2) for t in parts)
    return q, k, v


class QKVAttention(nn.Module):
    """Multi-head attention over a packed qkv projection, (B, 3·C, T) -> (B, C, T).

    Scale 1/√ch overall (ADM applies 1/⁴√ch to q and to k; one scale is the same math).
    """

    def __init__(self, num_heads: int, legacy_order: bool):
        super().__init__()
        self.num_heads = num_heads
        self.legacy_order = legacy_order

    def forward(self, qkv: Tensor) -> Tensor:
        batch, width, length = qkv.shape
        q, k, v = split_heads(qkv, self.num_heads, self.legacy_order)
        out = ops.attention(q, k, v)  # (B, H, T, ch)
        return out.transpose(-1, -2).reshape(batch, width // 3, length)


class AttentionBlock(nn.Module):
    """ADM's spatial self-attention: x + proj_out(attention(qkv(norm(x))))."""

    def __init__(
        self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_new_attention_order: bool = False
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels != 0:
                raise ValueError(f"channels ({channels}) must be divisible by num_head_channels ({num_head_channels})")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({self.num_heads})")
        head_dim = channels // self.num_heads
        if head_dim % 8 or not 8 <= head_dim <= 256:
            raise ValueError(
                f"the head dim (channels {channels} / {self.num_heads} heads = {head_dim}) must be a "
                "multiple of 8 from 8 to 256 (what ops.attention takes): set num_heads or "
                "num_head_channels"
            )
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads, legacy_order=not use_new_attention_order)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        assert self.proj_out.bias is not None  # a Conv1d built with its default bias=True
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, *spatial = x.shape
        x = x.flatten(2)  # (B, C, T); a -1 would be ambiguous for an empty batch
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, *spatial)


class AttentionPool2d(nn.Module):
    """ADM's attention pooling head: attend from the mean token over all positions
    (new head order), return token 0 projected to ``output_dim``."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.attention = QKVAttention(embed_dim // num_heads_channels, legacy_order=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2)  # (B, C, T); a -1 would be ambiguous for an empty batch
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]

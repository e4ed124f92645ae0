"""``accelerate(module)``: put fastguide's fused ops under an existing PyTorch UNet, in place.

Matched by structure, never by import (diffusers need not be installed):
- diffusers ``ResnetBlock2D`` (norm1, nonlinearity, conv1, time_emb_proj, norm2, conv2):
  its forward is rebound so that norm1 → SiLU and norm2 → (temb add or scale-shift) →
  SiLU are each one ``ops.group_norm`` call;
- diffusers ``Attention`` modules (processor API): a processor calling ``ops.attention``
  (masked calls go to the processor it replaced);
- ADM-style ``ResBlock`` (in_layers, emb_layers, out_layers, skip_connection,
  use_scale_shift_norm) and ``AttentionBlock`` (norm, qkv, attention, proj_out):
  rebound to fused forwards, qkv read as views in the module's head order;
- every other ``nn.GroupNorm``: replaced by ``FusedGroupNorm`` sharing its parameters,
  which also absorbs an ``nn.SiLU`` that directly follows it in an ``nn.Sequential`` or as
  diffusers' ``conv_norm_out``/``conv_act`` pair.
Parameters are shared, not copied: state dicts keep their keys. The counts of what was
replaced are returned in ``module.fastguide_accelerated`` and logged.
"""

from __future__ import annotations

import logging
import types
from collections import Counter

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .nn import split_heads

log = logging.getLogger(__name__)


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm through ops.group_norm (fp32 statistics), optionally fused with SiLU."""

    def __init__(self, source: nn.GroupNorm, activation: str | None = None):
        super().__init__(source.num_groups, source.num_channels, source.eps, source.affine,
                         device="meta")
        self.weight, self.bias = source.weight, source.bias  # shared, not copied
        self.activation = activation

    def forward(self, x: Tensor, *, scale: Tensor | None = None, shift: Tensor | None = None,
                activation: str | None = None) -> Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                              scale=scale, shift=shift, activation=activation or self.activation)


def _norm(module: nn.Module) -> FusedGroupNorm:
    return module if isinstance(module, FusedGroupNorm) else FusedGroupNorm(module)


# ---- diffusers ----------------------------------------------------------------------


def _fused_resnet_block_forward(self, input_tensor: Tensor, temb: Tensor | None, *args, **kwargs) -> Tensor:
    h = self.norm1(input_tensor, activation="silu")
    if self.upsample is not None:
        input_tensor, h = self.upsample(input_tensor), self.upsample(h)
    elif self.downsample is not None:
        input_tensor, h = self.downsample(input_tensor), self.downsample(h)
    h = self.conv1(h)
    if self.time_emb_proj is not None and temb is not None:
        if not self.skip_time_act:
            temb = F.silu(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        scale, shift = temb.chunk(2, dim=1)
        h = self.norm2(h, scale=scale, shift=shift, activation="silu")
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            h = h + temb
        h = self.norm2(h, activation="silu")
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def _is_diffusers_resnet(m: nn.Module) -> bool:
    return (type(m).__name__ == "ResnetBlock2D" and isinstance(getattr(m, "norm1", None), nn.GroupNorm)
            and isinstance(getattr(m, "nonlinearity", None), nn.SiLU)
            and getattr(m, "time_embedding_norm", None) in ("default", "scale_shift"))


class FastguideAttnProcessor:
    """A diffusers attention processor on ops.attention (self- and cross-attention)."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        head_dim = attn.inner_dim // attn.heads if hasattr(attn, "inner_dim") else None
        if attention_mask is not None or attn.spatial_norm is not None or head_dim is None or head_dim % 8:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = ops.attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _is_diffusers_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "Attention" and hasattr(m, "set_processor") and hasattr(m, "to_q")


# ---- ADM-structured modules -----------------------------------------------------------


def _fused_adm_resblock_forward(self, x: Tensor, emb: Tensor) -> Tensor:
    h = self.in_layers[0](x, activation="silu")
    if getattr(self, "updown", False):
        h, x = self.h_upd(h), self.x_upd(x)
    h = self.in_layers[-1](h)
    emb_out = self.emb_layers(emb).to(h.dtype)
    while emb_out.dim() < h.dim():
        emb_out = emb_out[..., None]
    if self.use_scale_shift_norm:
        scale, shift = emb_out.chunk(2, dim=1)
        h = self.out_layers[0](h, scale=scale, shift=shift, activation="silu")
    else:
        h = self.out_layers[0](h + emb_out, activation="silu")
    return self.skip_connection(x) + self.out_layers[3](self.out_layers[2](h))


def _is_adm_resblock(m: nn.Module) -> bool:
    layers = [getattr(m, n, None) for n in ("in_layers", "out_layers")]
    return (all(isinstance(s, nn.Sequential) for s in layers) and hasattr(m, "emb_layers")
            and hasattr(m, "skip_connection") and hasattr(m, "use_scale_shift_norm")
            and isinstance(layers[0][0], nn.GroupNorm) and isinstance(layers[1][0], nn.GroupNorm)
            and len(layers[1]) == 4)


def _fused_adm_attention_forward(self, x: Tensor, *args) -> Tensor:
    batch, channels, *spatial = x.shape
    x = x.reshape(batch, channels, -1)
    qkv = self.qkv(self.norm(x))
    legacy = "Legacy" in type(self.attention).__name__
    heads = self.attention.n_heads
    q, k, v = split_heads(qkv, heads, legacy)
    h = ops.attention(q, k, v).transpose(-1, -2).reshape(batch, channels, -1)
    return (x + self.proj_out(h)).reshape(batch, channels, *spatial)


def _is_adm_attention(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "norm", None), nn.GroupNorm) and hasattr(m, "qkv")
            and hasattr(m, "proj_out") and hasattr(getattr(m, "attention", None), "n_heads"))


# ---- the walk -----------------------------------------------------------------------


def accelerate(module: nn.Module) -> nn.Module:
    """Swap, in place, the GroupNorm(+SiLU) and attention of ``module`` for fastguide ops.

    Returns ``module``; ``module.fastguide_accelerated`` counts what was replaced.
    Outputs are unchanged within floating-point tolerance (GroupNorm statistics become
    float32 in every dtype, as ADM computes them).
    """
    replaced: Counter[str] = Counter()
    for m in list(module.modules()):
        if _is_diffusers_resnet(m):
            m.forward = types.MethodType(_fused_resnet_block_forward, m)
            replaced["diffusers ResnetBlock2D"] += 1
        elif _is_diffusers_attention(m):
            m.set_processor(FastguideAttnProcessor(m.processor))
            replaced["diffusers Attention"] += 1
        elif _is_adm_resblock(m):
            m.forward = types.MethodType(_fused_adm_resblock_forward, m)
            replaced["ADM ResBlock"] += 1
        elif _is_adm_attention(m):
            m.forward = types.MethodType(_fused_adm_attention_forward, m)
            replaced["ADM AttentionBlock"] += 1
    for parent in list(module.modules()):
        replaced["GroupNorm"] += _replace_group_norms(parent)
    module.fastguide_accelerated = {k: v for k, v in replaced.items() if v}
    log.info("fastguide.accelerate replaced %s", module.fastguide_accelerated)
    return module


def _replace_group_norms(parent: nn.Module) -> int:
    """Swap parent's direct GroupNorm children; fuse a following SiLU where it is known to
    run right after (the next item of an nn.Sequential, or conv_norm_out → conv_act)."""
    count = 0
    children = list(parent.named_children())
    for index, (name, child) in enumerate(children):
        if not isinstance(child, nn.GroupNorm) or isinstance(child, FusedGroupNorm):
            continue
        follower = children[index + 1][1] if index + 1 < len(children) else None
        fuse_silu = isinstance(follower, nn.SiLU) and (
            isinstance(parent, nn.Sequential) or (name == "conv_norm_out" and children[index + 1][0] == "conv_act")
        )
        setattr(parent, name, FusedGroupNorm(child, "silu" if fuse_silu else None))
        if fuse_silu:
            setattr(parent, children[index + 1][0], nn.Identity())
        count += 1
    return count

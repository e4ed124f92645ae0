"""ADM's forward pass written as guided-diffusion writes it (unet.py, nn.py), unfused, over a
fastguide model's weights, with torch.nn.functional alone: GroupNorm32 as F.group_norm with
32 groups and eps 1e-5 in float32, separate SiLU and scale-shift, einsum attention with
1/⁴√ch on q and k, nearest ×2 upsampling (then an optional 3×3 conv), stride-2 3×3 conv or
2×2 average-pool downsampling, 3×3 convolutions with padding 1 and 1×1 without. From the
model it reads only weights and which layer is where (a ResBlock, an Upsample with or
without its conv, …); no module of the model runs, and no fastguide op. It is the "same
weights on plain PyTorch ops" baseline of the benchmarks and an independent check of the
fused forward in the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastguide.models.nn import AttentionBlock
from fastguide.models.unet import Downsample, ResBlock, Upsample

NORM_GROUPS = 32  # ADM's normalization(channels): GroupNorm32(32, channels)
NORM_EPS = 1e-5  # nn.GroupNorm's default, which GroupNorm32 keeps


def plain_norm(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """GroupNorm32: GN(x) over 32 groups, eps 1e-5, computed in float32, back in x's dtype."""
    return F.group_norm(x.float(), NORM_GROUPS, norm.weight, norm.bias, NORM_EPS).type(x.dtype)


def plain_conv(conv: nn.Conv1d | nn.Conv2d, x: Tensor, stride: int = 1) -> Tensor:
    """ADM's conv_nd: a 3×3 kernel with padding 1 (size kept at stride 1), a 1×1 without."""
    weight = conv.weight
    padding = 1 if weight.shape[-1] == 3 else 0
    op = F.conv1d if weight.dim() == 3 else F.conv2d
    return op(x, weight, conv.bias, stride=stride, padding=padding)


def plain_linear(linear: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, linear.weight, linear.bias)


def plain_upsample(x: Tensor) -> Tensor:
    """Upsample's resampling: nearest-neighbour ×2 in H and W."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def plain_downsample(x: Tensor) -> Tensor:
    """Downsample without its conv: 2×2 average pooling, stride 2."""
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def plain_resample(layer: Upsample | Downsample, x: Tensor) -> Tensor:
    """Upsample: nearest ×2, then its 3×3 conv if it has one; Downsample: its 3×3 conv at
    stride 2 (padding 1) if it has one, else 2×2 average pooling."""
    if isinstance(layer, Upsample):
        x = plain_upsample(x)
        return plain_conv(layer.conv, x) if layer.use_conv else x
    if isinstance(layer.op, nn.Conv2d):
        return plain_conv(layer.op, x, stride=2)
    return plain_downsample(x)


def plain_qkv_attention(qkv, heads, legacy):
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(batch * heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(batch * heads, ch, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


def plain_attention_block(block, x):
    """x + proj_out(attention(qkv(GN(x)))) over the flattened positions."""
    batch, channels, *spatial = x.shape
    x = x.reshape(batch, channels, -1)
    qkv = plain_conv(block.qkv, plain_norm(block.norm, x))
    h = plain_conv(block.proj_out, plain_qkv_attention(qkv, block.num_heads, block.attention.legacy_order))
    return (x + h).reshape(batch, channels, *spatial)


def plain_resblock(block, x, emb):
    """skip(x) + conv(silu(GN(h)·(1 + scale) + shift)) with h = conv(silu(GN(x))) (or
    conv(silu(GN(h + emb_out))) without scale-shift); up/down resample h after its SiLU
    and x, both without a conv."""
    h = F.silu(plain_norm(block.in_layers[0], x))
    if block.updown:
        resample = plain_upsample if isinstance(block.h_upd, Upsample) else plain_downsample
        h, x = resample(h), resample(x)
    h = plain_conv(block.in_layers[2], h)
    emb_out = plain_linear(block.emb_layers[1], F.silu(emb)).type(h.dtype)[..., None, None]
    if block.use_scale_shift_norm:
        scale, shift = emb_out.chunk(2, dim=1)
        h = plain_norm(block.out_layers[0], h) * (1 + scale) + shift
    else:
        h = plain_norm(block.out_layers[0], h + emb_out)
    h = plain_conv(block.out_layers[3], F.silu(h))  # (out_layers[2], dropout: eval mode)
    skip = block.skip_connection
    return (x if isinstance(skip, nn.Identity) else plain_conv(skip, x)) + h


def plain_sequential(seq, h, emb):
    for layer in seq:
        if isinstance(layer, ResBlock):
            h = plain_resblock(layer, h, emb)
        elif isinstance(layer, AttentionBlock):
            h = plain_attention_block(layer, h)
        elif isinstance(layer, (Upsample, Downsample)):
            h = plain_resample(layer, h)
        elif isinstance(layer, nn.Conv2d):  # the stem
            h = plain_conv(layer, h)
        else:
            raise TypeError(f"no plain ADM forward for {type(layer).__name__}")
    return h


def plain_embedding(model, t):
    """time_embed(sinusoids): linear → SiLU → linear over [cos(t·f), sin(t·f)],
    f = 10000^(−i/half)."""
    half = model.model_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    sinusoids = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    # float32 into ADM's float32 time MLP (also under use_fp16); a model cast whole takes its own
    first, _, last = model.time_embed
    return plain_linear(last, F.silu(plain_linear(first, sinusoids.to(first.weight.dtype))))


def plain_unet(model, x, t, y=None):
    emb = plain_embedding(model, t)
    if y is not None:
        emb = emb + F.embedding(y, model.label_emb.weight)
    # ADM's use_fp16: the blocks run in their convolutions' dtype, x and the output head in x's
    hs, h = [], x.type(model.dtype)
    for block in model.input_blocks:
        h = plain_sequential(block, h, emb)
        hs.append(h)
    h = plain_sequential(model.middle_block, h, emb)
    for block in model.output_blocks:
        h = plain_sequential(block, torch.cat([h, hs.pop()], dim=1), emb)
    h = h.type(x.dtype)
    return plain_conv(model.out[2], F.silu(plain_norm(model.out[0], h)))


def plain_classifier(model, x, t):
    emb = plain_embedding(model, t)
    h, means = x.type(model.dtype), []  # (use_fp16: as plain_unet)
    for block in model.input_blocks:
        h = plain_sequential(block, h, emb)
        means.append(h.type(x.dtype).mean(dim=(2, 3)))
    h = plain_sequential(model.middle_block, h, emb).type(x.dtype)
    if model.pool == "spatial":
        first, _, last = model.out  # linear → ReLU → linear
        features = torch.cat(means + [h.mean(dim=(2, 3))], dim=-1)
        return plain_linear(last, F.relu(plain_linear(first, features)))
    if model.pool == "spatial_v2":
        first, norm, _, last = model.out  # linear → GroupNorm32 → SiLU → linear
        features = torch.cat(means + [h.mean(dim=(2, 3))], dim=-1)
        return plain_linear(last, F.silu(plain_norm(norm, plain_linear(first, features))))
    h = F.silu(plain_norm(model.out[0], h))
    if model.pool == "adaptive":  # global average pool → 1×1 conv → flatten
        return plain_conv(model.out[3], h.mean(dim=(2, 3), keepdim=True)).flatten(1)
    pool = model.out[2]  # attention pooling from the mean token, new head order
    h = h.reshape(h.shape[0], h.shape[1], -1)
    h = torch.cat([h.mean(dim=-1, keepdim=True), h], dim=-1) + pool.positional_embedding[None]
    qkv = plain_conv(pool.qkv_proj, h)
    return plain_conv(pool.c_proj, plain_qkv_attention(qkv, pool.attention.num_heads, legacy=False))[:, :, 0]

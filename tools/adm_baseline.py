"""ADM's forward pass written as guided-diffusion writes it, unfused, over a fastguide model's
weights: F.group_norm in float32, separate SiLU and scale-shift, einsum attention with
1/⁴√ch on q and k. It is the "same weights on plain PyTorch ops" baseline of the
benchmarks and an independent check of the fused forward in the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastguide.models.nn import AttentionBlock
from fastguide.models.unet import ResBlock


def plain_norm(norm, x):
    return F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps).type(x.dtype)


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
    batch, channels, *spatial = x.shape
    x = x.reshape(batch, channels, -1)
    qkv = block.qkv(plain_norm(block.norm, x))
    h = block.proj_out(plain_qkv_attention(qkv, block.num_heads, block.attention.legacy_order))
    return (x + h).reshape(batch, channels, *spatial)


def plain_resblock(block, x, emb):
    if block.updown:
        h = F.silu(plain_norm(block.in_layers[0], x))
        h, x = block.h_upd(h), block.x_upd(x)
        h = block.in_layers[2](h)
    else:
        h = block.in_layers[2](F.silu(plain_norm(block.in_layers[0], x)))
    emb_out = block.emb_layers(emb).type(h.dtype)[..., None, None]
    if block.use_scale_shift_norm:
        scale, shift = emb_out.chunk(2, dim=1)
        h = plain_norm(block.out_layers[0], h) * (1 + scale) + shift
        h = block.out_layers[3](F.silu(h))
    else:
        h = block.out_layers[3](F.silu(plain_norm(block.out_layers[0], h + emb_out)))
    return block.skip_connection(x) + h


def plain_sequential(seq, h, emb):
    for layer in seq:
        if isinstance(layer, ResBlock):
            h = plain_resblock(layer, h, emb)
        elif isinstance(layer, AttentionBlock):
            h = plain_attention_block(layer, h)
        else:
            h = layer(h)
    return h


def plain_embedding(model, t):
    half = model.model_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    sinusoids = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    # float32 into ADM's float32 time MLP (also under use_fp16); a model cast whole takes its own
    return model.time_embed(sinusoids.to(model.time_embed[0].weight.dtype))


def plain_unet(model, x, t, y=None):
    emb = plain_embedding(model, t)
    if y is not None:
        emb = emb + model.label_emb(y)
    # ADM's use_fp16: the blocks run in their convolutions' dtype, x and the output head in x's
    hs, h = [], x.type(model.dtype)
    for block in model.input_blocks:
        h = plain_sequential(block, h, emb)
        hs.append(h)
    h = plain_sequential(model.middle_block, h, emb)
    for block in model.output_blocks:
        h = plain_sequential(block, torch.cat([h, hs.pop()], dim=1), emb)
    h = h.type(x.dtype)
    return model.out[2](F.silu(plain_norm(model.out[0], h)))


def plain_classifier(model, x, t):
    emb = plain_embedding(model, t)
    h, means = x.type(model.dtype), []  # (use_fp16: as plain_unet)
    for block in model.input_blocks:
        h = plain_sequential(block, h, emb)
        means.append(h.type(x.dtype).mean(dim=(2, 3)))
    h = plain_sequential(model.middle_block, h, emb).type(x.dtype)
    if model.pool == "spatial":
        return model.out(torch.cat(means + [h.mean(dim=(2, 3))], dim=-1))
    if model.pool == "spatial_v2":
        first, norm, _, last = model.out
        return last(F.silu(plain_norm(norm, first(torch.cat(means + [h.mean(dim=(2, 3))], dim=-1)))))
    h = F.silu(plain_norm(model.out[0], h))
    if model.pool == "adaptive":
        return model.out[2:](h)
    pool = model.out[2]
    h = h.reshape(h.shape[0], h.shape[1], -1)
    h = torch.cat([h.mean(dim=-1, keepdim=True), h], dim=-1) + pool.positional_embedding[None]
    return pool.c_proj(plain_qkv_attention(pool.qkv_proj(h), pool.attention.num_heads, legacy=False))[:, :, 0]

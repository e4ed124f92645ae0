"""accelerate(): swapping fastguide ops into existing UNets leaves their outputs unchanged."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import fastguide
from tests.helpers import backends_for, randomize

BACKENDS = sorted(set(backends_for("group_norm")) & set(backends_for("attention")))
diffusers = pytest.importorskip("diffusers")


def tiny_diffusers_unet(time_norm: str) -> nn.Module:
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, attention_head_dim=16, resnet_time_scale_shift=time_norm,
    )
    return randomize(model, seed=3).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("time_norm", ["default", "scale_shift"])
def test_accelerate_diffusers_unet2d_keeps_outputs(backend, time_norm):
    model = tiny_diffusers_unet(time_norm)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    keys = list(model.state_dict())
    count = lambda kind: sum(type(m).__name__ == kind for m in model.modules())  # noqa: E731
    resnets, attentions, norms = count("ResnetBlock2D"), count("Attention"), count("GroupNorm")
    with torch.no_grad():
        expected = model(x, t).sample
        exact = copy.deepcopy(model).double()(x.double(), t).sample
        fastguide.accelerate(model)
        with fastguide.backend(backend):
            got = model(x, t).sample
    assert list(model.state_dict()) == keys
    report = model.fastguide_accelerated
    assert resnets > 0 and attentions > 0
    assert report == {"diffusers ResnetBlock2D": resnets, "diffusers Attention": attentions, "GroupNorm": norms}
    assert count("GroupNorm") == 0
    assert isinstance(model.conv_act, nn.Identity)  # fused into conv_norm_out
    # Within float32 rounding of the original: at most twice its own error against float64.
    assert (got.double() - exact).abs().max() <= 2 * (expected.double() - exact).abs().max() + 1e-5


class LegacyQKVAttention(nn.Module):
    """As guided-diffusion's QKVAttentionLegacy (structure only; accelerate replaces it)."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        batch, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(batch * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class AdmStyleBlock(nn.Module):
    """An ADM ResBlock (scale-shift) followed by an ADM AttentionBlock, written as ADM does."""

    def __init__(self, ch=64, emb=32):
        super().__init__()
        self.res = nn.Module()
        self.res.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.res.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * ch))
        self.res.out_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Dropout(0.0),
                                            nn.Conv2d(ch, ch, 3, padding=1))
        self.res.skip_connection = nn.Identity()
        self.res.use_scale_shift_norm = True
        self.res.forward = self._res_forward
        self.attn = nn.Module()
        self.attn.norm = nn.GroupNorm(32, ch)
        self.attn.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.attn.attention = LegacyQKVAttention(n_heads=4)
        self.attn.proj_out = nn.Conv1d(ch, ch, 1)
        self.attn.forward = self._attn_forward

    def _res_forward(self, x, emb):
        r = self.res
        h = r.in_layers(x)
        scale, shift = r.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        h = r.out_layers[0](h) * (1 + scale) + shift
        return r.skip_connection(x) + r.out_layers[1:](h)

    def _attn_forward(self, x):
        a = self.attn
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        return (x + a.proj_out(a.attention(a.qkv(a.norm(x))))).reshape(b, c, *spatial)

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


def test_accelerate_adm_structured_modules():
    model = randomize(AdmStyleBlock(), seed=5).eval()
    x, emb = torch.randn(2, 64, 6, 6), torch.randn(2, 32)
    with torch.no_grad():
        expected = model(x, emb)
        fastguide.accelerate(model)
        got = model(x, emb)
    assert model.fastguide_accelerated["ADM ResBlock"] == 1
    assert model.fastguide_accelerated["ADM AttentionBlock"] == 1
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)

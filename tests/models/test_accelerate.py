"""accelerate(): swapping fastguide ops into existing UNets leaves their outputs unchanged."""

import abc
import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastguide
from tests.helpers import ATTENTION, assert_close, backends_for, randomize, tiny_cfg_unet

BACKENDS = sorted(set(backends_for("group_norm")) & set(backends_for("attention")))
diffusers = pytest.importorskip("diffusers")
ap = pytest.importorskip("diffusers.models.attention_processor")


def tiny_diffusers_unet(time_norm: str) -> nn.Module:
    model = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=16,
        resnet_time_scale_shift=time_norm,
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


class QKVAttention(nn.Module):
    """As GLIDE's QKVAttention: the legacy head order despite the name, and optional encoder_kv."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv, encoder_kv=None):
        batch, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(batch * self.n_heads, ch * 3, length).split(ch, dim=1)
        if encoder_kv is not None:
            ek, ev = encoder_kv.reshape(batch * self.n_heads, ch * 2, -1).split(ch, dim=1)
            k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class LegacyQKVAttention(QKVAttention):
    """As guided-diffusion's QKVAttentionLegacy: GLIDE's head order, no encoder_kv."""

    def forward(self, qkv):
        return super().forward(qkv)


class NewOrderQKVAttention(nn.Module):
    """As guided-diffusion's QKVAttention: [Q; K; V] with the heads inside each."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        batch, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(batch * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class LinearQKVAttention(NewOrderQKVAttention):
    """Not softmax attention (same structure, other math): accelerate must leave it alone."""

    def forward(self, qkv):
        batch, width, length = qkv.shape
        q, k, v = (t.reshape(batch * self.n_heads, -1, length) for t in qkv.chunk(3, dim=1))
        return torch.einsum("bcs,bds,bdt->bct", v, k, q.softmax(dim=1)).reshape(batch, -1, length) / length


class AdmResBlock(nn.Module):
    """An ADM ResBlock (scale-shift) from its layers, its forward written as ADM's."""

    def __init__(self, in_layers, out_layers, ch=64, emb=32):
        super().__init__()
        self.in_layers = in_layers
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * ch))
        self.out_layers = out_layers
        self.skip_connection = nn.Identity()
        self.use_scale_shift_norm = True

    def forward(self, x, emb):  # (ADM's checkpoints _forward)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](self.in_layers(x)) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)


class AdmAttentionBlock(nn.Module):
    """An ADM AttentionBlock, its forward written as ADM's."""

    def __init__(self, ch=64, attention=LegacyQKVAttention):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.attention = attention(n_heads=4)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        return (x + self.proj_out(self.attention(self.qkv(self.norm(x))))).reshape(b, c, *spatial)


class AdmStyleBlock(nn.Module):
    """An ADM ResBlock (scale-shift) followed by an ADM AttentionBlock."""

    def __init__(self, ch=64, emb=32, attention=LegacyQKVAttention):
        super().__init__()
        self.res = AdmResBlock(
            nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1)),
            nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(ch, ch, 3, padding=1)),
            ch,
            emb,
        )
        self.attn = AdmAttentionBlock(ch, attention)

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


# ---- what accelerate() leaves alone ---------------------------------------------------


def run(module, *args, **kwargs):
    with torch.no_grad():
        return module(*args, **kwargs)


def attention_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 7, 24, generator=g), torch.randn(2, 4, 24, generator=g)


class HalvingProcessor:
    """A custom processor (as a user or a library would write one)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return ap.AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * 0.5


def added_kv_attention(processor):
    return ap.Attention(
        32,
        cross_attention_dim=32,
        heads=2,
        dim_head=16,
        added_kv_proj_dim=24,
        norm_num_groups=8,
        cross_attention_norm="group_norm",
        cross_attention_norm_num_groups=8,
        bias=True,
        upcast_softmax=True,
        processor=processor,
    )


def ip_adapter_attention():
    attn = ap.Attention(32, cross_attention_dim=24, heads=2, dim_head=16, norm_num_groups=8)
    attn.set_processor(ap.IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24, num_tokens=(4,), scale=0.7))
    return attn


x4, text, image_tokens = attention_inputs()
ATTN2_0, CROSS = ap.AttnProcessor2_0, {"encoder_hidden_states": text}
LEFT_ALONE = {
    # name: (constructor, call arguments, the reason accelerate reports)
    "AttnAddedKVProcessor": (
        lambda: added_kv_attention(ap.AttnAddedKVProcessor()),
        (x4,),
        CROSS,
        "processor AttnAddedKVProcessor",
    ),
    "AttnAddedKVProcessor2_0": (
        lambda: added_kv_attention(ap.AttnAddedKVProcessor2_0()),
        (x4,),
        CROSS,
        "processor AttnAddedKVProcessor2_0",
    ),
    "added-KV module, plain processor": (
        lambda: ap.Attention(
            32,
            cross_attention_dim=24,
            heads=2,
            dim_head=16,
            added_kv_proj_dim=24,
            norm_num_groups=8,
            processor=ATTN2_0(),
        ),
        (x4,),
        CROSS,
        "added-KV projections",
    ),
    "IPAdapterAttnProcessor2_0": (
        ip_adapter_attention,
        (x4,),
        {"encoder_hidden_states": (text, [image_tokens])},
        "processor IPAdapterAttnProcessor2_0",
    ),
    "custom processor": (
        lambda: ap.Attention(32, heads=2, dim_head=16, norm_num_groups=8, processor=HalvingProcessor()),
        (x4,),
        {},
        "processor HalvingProcessor",
    ),
    "spatial_norm": (
        lambda: ap.Attention(32, heads=2, dim_head=16, spatial_norm_dim=4, processor=ATTN2_0()),
        (x4,),
        {"temb": torch.randn(2, 4, 2, 2)},
        "spatial_norm",
    ),
    "head_dim 12": (
        lambda: ap.Attention(24, heads=2, dim_head=12, processor=ATTN2_0()),
        (torch.randn(2, 24, 4, 4),),
        {},
        "head_dim 12 (ops.attention takes multiples of 8 up to 256)",
    ),
}


@pytest.mark.parametrize("case", list(LEFT_ALONE))
def test_accelerate_leaves_other_attention_processors_alone(case):
    make, args, kwargs, reason = LEFT_ALONE[case]
    attn = randomize(make(), seed=1).eval()
    processor, keys = attn.processor, list(attn.state_dict())
    expected = run(attn, *args, **kwargs)
    assert fastguide.accelerate(attn) is attn
    assert attn.processor is processor and list(attn.state_dict()) == keys
    assert torch.equal(run(attn, *args, **kwargs), expected)  # bit for bit: nothing under it was touched
    assert attn.fastguide_accelerated == {}
    norms = sum(isinstance(m, nn.GroupNorm) for m in attn.modules())
    assert attn.fastguide_skipped == {
        "diffusers Attention": {reason: 1},
        **({"GroupNorm": {"inside a module left alone": norms}} if norms else {}),
    }


PLAIN = {
    # name: (processor, Attention options, call kwargs beyond the (B, C, H, W) input)
    "2_0 self, residual, rescale": (
        ATTN2_0,
        dict(norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0, bias=True),
        {},
    ),
    "2_0 cross, norm_cross, qk norm": (
        ATTN2_0,
        dict(cross_attention_dim=24, cross_attention_norm="layer_norm", qk_norm="layer_norm"),
        CROSS,
    ),
    "2_0 scale_qk=False (SDPA ignores attn.scale)": (ATTN2_0, dict(scale_qk=False), {}),
    "classic scale_qk=False (uses attn.scale)": (ap.AttnProcessor, dict(scale_qk=False, upcast_attention=True), {}),
    "classic cross, qk norm (which it ignores)": (
        ap.AttnProcessor,
        dict(cross_attention_dim=24, qk_norm="layer_norm"),
        CROSS,
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PLAIN))
def test_accelerate_swaps_plain_attention_processors(case, backend):
    processor, options, kwargs = PLAIN[case]
    attn = randomize(ap.Attention(32, heads=2, dim_head=16, processor=processor(), **options), seed=2).eval()
    keys = list(attn.state_dict())
    expected = run(attn, x4, **kwargs)
    fastguide.accelerate(attn)
    assert type(attn.processor).__name__ == "FastguideAttnProcessor"
    assert attn.fastguide_accelerated == {
        "diffusers Attention": 1,
        **({"GroupNorm": 1} if "norm_num_groups" in options else {}),
    }
    assert attn.fastguide_skipped == {}
    assert list(attn.state_dict()) == keys
    with fastguide.backend(backend):
        got = run(attn, x4, **kwargs)
    assert_close(got, expected, ATTENTION, torch.float32)


def test_a_processor_rebuilt_by_its_class_as_diffusers_loaders_do_runs_as_diffusers_default():
    # load_ip_adapter and unload_ip_adapter rebuild the processors they keep by type(processor)()
    attn = randomize(ap.Attention(32, cross_attention_dim=24, heads=2, dim_head=16), seed=5).eval()
    expected = run(attn, x4, encoder_hidden_states=text)
    fastguide.accelerate(attn)
    attn.set_processor(type(attn.processor)())
    assert type(attn.processor).__name__ == "FastguideAttnProcessor"
    assert_close(run(attn, x4, encoder_hidden_states=text), expected, ATTENTION, torch.float32)


def test_a_processor_rebuilt_by_its_class_takes_the_processor_diffusers_would_pick():
    # scale_qk=False (diffusers' T5FilmDecoder): diffusers' Attention runs AttnProcessor,
    # with attn.scale; rebuilt by class, fastguide's processor ran AttnProcessor2_0's math
    # (head_dim^-1/2): 0.43 off
    attn = randomize(ap.Attention(32, heads=2, dim_head=16, scale_qk=False), seed=5).eval()
    accelerated = fastguide.accelerate(copy.deepcopy(attn))
    for module in (attn, accelerated):
        module.set_processor(type(module.processor)())
    tokens = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    assert_close(run(accelerated, tokens), run(attn, tokens), ATTENTION, torch.float32)


def test_accelerate_empty_sequences_go_to_the_replaced_processor():
    attn = randomize(ap.Attention(32, cross_attention_dim=24, heads=2, dim_head=16), seed=4).eval()
    tokens = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    calls = [(tokens, text[:, :0]), (tokens[:, :0], text)]
    expected = [run(attn, hidden, encoder_hidden_states=context) for hidden, context in calls]
    fastguide.accelerate(attn)
    for (hidden, context), want in zip(calls, expected):
        got = run(attn, hidden, encoder_hidden_states=context)
        assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("scores", [False, True], ids=["skip_attention", "skip_attention_scores"])
def test_diffusers_layer_skipping_on_an_accelerated_transformer(scores):
    # diffusers' skip hooks look the processor's skip function up by its class (fastguide's
    # was not registered: ValueError), and skip_attention_scores swaps
    # scaled_dot_product_attention's result inside a TorchFunctionMode, which ops.attention
    # does not call: such a call goes to the replaced processor.
    hooks = pytest.importorskip("diffusers.hooks")
    from tests.models.test_perturbation import pixart_inputs, tiny_pixart

    model = tiny_pixart()
    accelerated = fastguide.accelerate(copy.deepcopy(model))
    assert accelerated.fastguide_accelerated["diffusers Attention"] == 4
    config = dict(indices=[1], fqn="transformer_blocks", skip_ff=False)
    config |= dict(skip_attention=False, skip_attention_scores=True) if scores else dict(skip_attention=True)
    inputs = pixart_inputs(2)
    plain = run(model, **inputs).sample
    for network in (model, accelerated):
        hooks.apply_layer_skip(network, hooks.LayerSkipConfig(**config))
    expected = run(model, **inputs).sample
    assert not torch.allclose(expected, plain, atol=1e-3)  # the skip changes the output
    assert_close(run(accelerated, **inputs).sample, expected, ATTENTION, torch.float32)


def test_accelerate_leaves_modules_with_diffusers_hooks_alone():
    # diffusers' HookRegistry (group offloading, layer skipping, caches) wraps an instance's
    # forward: a GroupNorm or an Attention swapped under it lost the hook, silently (layer
    # skipping's attention-score hook catches the processor's F.scaled_dot_product_attention,
    # which fastguide's processor never calls).
    hooks = pytest.importorskip("diffusers.hooks")

    class Doubling(hooks.ModelHook):
        def post_forward(self, module, output):
            return output * 2

    def hooked():
        model = tiny_diffusers_unet("default")
        for module in (model.down_blocks[0].resnets[0].norm1, model.down_blocks[1].attentions[0]):
            hooks.HookRegistry.check_if_exists_or_initialize(module).register_hook(Doubling(), "doubling")
        return model

    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    expected = run(hooked(), x, t).sample
    assert not torch.allclose(expected, run(tiny_diffusers_unet("default"), x, t).sample, atol=1e-3)
    model = fastguide.accelerate(hooked())
    assert_close(run(model, x, t).sample, expected, ATTENTION, torch.float32)
    assert model.fastguide_skipped["diffusers ResnetBlock2D"] == {"norm1: hooks registered on it": 1}
    assert model.fastguide_skipped["diffusers Attention"] == {"a diffusers hook on it": 1}


def test_accelerate_masked_calls_go_to_the_replaced_processor():
    attn = randomize(ap.Attention(32, cross_attention_dim=24, heads=2, dim_head=16), seed=4).eval()
    mask = torch.ones(2, 7)
    mask[0, 3:] = 0
    expected = run(attn, x4, encoder_hidden_states=text, attention_mask=mask)
    fastguide.accelerate(attn)
    assert attn.fastguide_accelerated == {"diffusers Attention": 1}
    assert torch.equal(run(attn, x4, encoder_hidden_states=text, attention_mask=mask), expected)


def test_accelerate_a_context_of_another_batch_goes_to_the_replaced_processor():
    # one context for two samples: AttnProcessor2_0 returns a batch-1 result, AttnProcessor
    # raises; viewed with the hidden states' batch, the context's tokens were split between
    # the samples, silently
    attn = randomize(ap.Attention(32, cross_attention_dim=24, heads=2, dim_head=16), seed=4).eval()
    context, tokens = text[:1], torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    expected = run(attn, tokens, encoder_hidden_states=context)
    fastguide.accelerate(attn)
    got = run(attn, tokens, encoder_hidden_states=context)
    assert got.shape == expected.shape and torch.equal(got, expected)


class GroupNorm32(nn.GroupNorm):
    """As GLIDE's GroupNorm32: float32, then an optional swish. Not a plain GroupNorm."""

    def __init__(self, num_groups, num_channels, swish, eps=1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.swish = swish

    def forward(self, x):
        y = super().forward(x.float()).to(x.dtype)
        if self.swish == 1.0:
            return F.silu(y)
        return y * torch.sigmoid(y * float(self.swish)) if self.swish else y


class GlideAttentionBlock(nn.Module):
    """As GLIDE's AttentionBlock: with encoder_channels it also attends to encoder_out."""

    def __init__(self, ch, n_heads, encoder_channels, norm):
        super().__init__()
        self.norm = norm
        self.qkv = nn.Conv1d(ch, ch * 3, 1)
        self.attention = QKVAttention(n_heads)
        self.encoder_kv = nn.Conv1d(encoder_channels, ch * 2, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x, encoder_out=None):
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x).view(b, c, -1))
        h = self.attention(qkv) if encoder_out is None else self.attention(qkv, self.encoder_kv(encoder_out))
        return x + self.proj_out(h).reshape(b, c, *spatial)


class GlideStyleModel(nn.Module):
    """GLIDE's ResBlock (GroupNorm32 with swish, nn.Identity in place of SiLU), its
    AttentionBlock with encoder_kv, and its output head."""

    def __init__(self, ch=64, emb=32, encoder_channels=48, attention_norm=None):
        super().__init__()
        self.res = AdmResBlock(
            nn.Sequential(GroupNorm32(32, ch, swish=1.0), nn.Identity(), nn.Conv2d(ch, ch, 3, padding=1)),
            nn.Sequential(GroupNorm32(32, ch, swish=0.0), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(ch, ch, 3, padding=1)),
            ch,
            emb,
        )
        self.attn = GlideAttentionBlock(ch, 4, encoder_channels, attention_norm or GroupNorm32(32, ch, swish=0.0))
        self.out = nn.Sequential(GroupNorm32(32, ch, swish=1.0), nn.Identity(), nn.Conv2d(ch, 3, 3, padding=1))

    def forward(self, x, emb, encoder_out):
        return self.out(self.attn(self.res(x, emb), encoder_out))


@pytest.mark.parametrize("attention_norm", ["GLIDE's GroupNorm32", "nn.GroupNorm"])
def test_accelerate_leaves_glide_blocks_alone(attention_norm):
    norm = nn.GroupNorm(32, 64) if attention_norm == "nn.GroupNorm" else None
    model = randomize(GlideStyleModel(attention_norm=norm), seed=6).eval()
    g = torch.Generator().manual_seed(1)
    x, emb, encoder_out = (
        torch.randn(2, 64, 6, 6, generator=g),
        torch.randn(2, 32, generator=g),
        torch.randn(2, 48, 5, generator=g),
    )
    expected = run(model, x, emb, encoder_out)
    assert (run(model.attn, x, None) - run(model.attn, x, encoder_out)).abs().max() > 1e-2  # encoder_out matters
    fastguide.accelerate(model)
    assert torch.equal(run(model, x, emb, encoder_out), expected)
    assert model.fastguide_accelerated == {}
    glide_norm = f"class {__name__}.GroupNorm32 (a subclass whose forward may differ)"
    assert model.fastguide_skipped == {
        "ADM ResBlock": {"in_layers is not [GroupNorm, SiLU, conv]": 1},
        "GroupNorm": {"inside a module left alone": 3, glide_norm: 1},
        "ADM AttentionBlock": {"encoder_kv (it also attends to encoder_out)": 1},
    }


@pytest.mark.parametrize("attention", [LegacyQKVAttention, QKVAttention, NewOrderQKVAttention])
def test_accelerate_adm_attention_in_its_head_order(attention):
    model = randomize(AdmStyleBlock(attention=attention), seed=7).eval()
    x, emb = torch.randn(2, 64, 6, 6), torch.randn(2, 32)
    expected = run(model, x, emb)
    fastguide.accelerate(model)
    assert model.fastguide_accelerated == {"ADM ResBlock": 1, "ADM AttentionBlock": 1, "GroupNorm": 3}
    assert model.fastguide_skipped == {}
    torch.testing.assert_close(run(model, x, emb), expected, atol=2e-4, rtol=2e-4)
    assert run(model.attn, x[:0]).shape == (0, 64, 6, 6)  # an empty batch: (B, C, T) without a -1


def test_accelerate_leaves_other_adm_attention_math_alone():
    model = randomize(AdmStyleBlock(attention=LinearQKVAttention), seed=7).eval()
    x = torch.randn(2, 64, 6, 6)
    expected = run(model.attn, x)
    fastguide.accelerate(model)
    assert model.fastguide_skipped["ADM AttentionBlock"] == {
        "attention is not softmax(q·kᵀ/√d)·v in either ADM head order": 1
    }
    assert torch.equal(run(model.attn, x), expected)


class HalvedResBlock(AdmResBlock):
    """A subclass whose own forward differs from ADM's: the structure alone says nothing."""

    def forward(self, x, emb):
        return 0.5 * super().forward(x, emb)


def _patched(block):
    forward = block.forward
    block.forward = lambda x, emb: forward(x, 0 * emb)
    return block


def _silenced(module):
    module.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    return module


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda model: _patched(model.res), "forward replaced on the instance"),
        (lambda model: _silenced(model.res.in_layers[1]), "hooks registered on in_layers[1], which the fused"),
        (lambda model: _silenced(model.res.out_layers), "hooks registered on out_layers, which the fused"),
        (lambda model: _silenced(model.attn.attention), "hooks registered on attention, which the fused"),
    ],
    ids=["patched forward", "hooked SiLU", "hooked out_layers", "hooked attention"],
)
def test_accelerate_leaves_an_adm_block_with_a_changed_forward_or_hooked_layers_alone(change, reason):
    """An ADM block is recognised by its structure; a forward patched on the instance, or
    hooks on the layers the fused forward does not call, would be silently dropped."""
    model = randomize(AdmStyleBlock(), seed=5).eval()
    change(model)
    x, emb = torch.randn(2, 64, 6, 6), torch.randn(2, 32)
    expected = run(model, x, emb)
    fastguide.accelerate(model)
    skipped = {why for reasons in model.fastguide_skipped.values() for why in reasons}
    assert any(why.startswith(reason) for why in skipped), skipped
    torch.testing.assert_close(run(model, x, emb), expected, atol=2e-4, rtol=2e-4)


class HalvedInner(AdmResBlock):
    def _forward(self, x, emb):
        return 0.5 * super()._forward(x, emb)


class AbstractStep(nn.Module):
    """As ADM's TimestepBlock: an abstract forward its blocks define."""

    @abc.abstractmethod
    def forward(self, x, emb): ...


class StepResBlock(AbstractStep, AdmResBlock):
    forward = AdmResBlock.forward
    _forward = AdmResBlock._forward


@pytest.mark.parametrize(
    "cls, reason",
    [
        (HalvedResBlock, "HalvedResBlock.forward overrides AdmResBlock's"),
        (HalvedInner, "HalvedInner._forward overrides AdmResBlock's"),
        (StepResBlock, None),
    ],
    ids=["forward", "_forward", "below an abstract forward"],
)
def test_accelerate_leaves_an_adm_subclass_overriding_its_forward_alone(cls, reason):
    block = randomize(
        cls(
            nn.Sequential(nn.GroupNorm(32, 64), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1)),
            nn.Sequential(nn.GroupNorm(32, 64), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(64, 64, 3, padding=1)),
        ),
        seed=3,
    ).eval()
    x, emb = torch.randn(2, 64, 6, 6), torch.randn(2, 32)
    expected = run(block, x, emb)
    fastguide.accelerate(block)
    if reason is None:
        assert block.fastguide_accelerated["ADM ResBlock"] == 1
    else:
        assert block.fastguide_skipped["ADM ResBlock"] == {reason: 1}
    torch.testing.assert_close(run(block, x, emb), expected, atol=2e-4, rtol=2e-4)


def test_accelerate_leaves_a_resnet_with_a_hooked_nonlinearity_alone():
    from diffusers.models.resnet import ResnetBlock2D

    block = randomize(ResnetBlock2D(in_channels=32, temb_channels=16, groups=8), seed=2).eval()
    # its own SiLU to hook: diffusers before 0.35 hands every block one shared instance
    block.nonlinearity = torch.nn.SiLU()
    _silenced(block.nonlinearity)
    x, temb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    expected = run(block, x, temb)
    fastguide.accelerate(block)
    assert block.fastguide_skipped["diffusers ResnetBlock2D"] == {
        "hooks registered on nonlinearity, which the fused forward does not call": 1
    }
    torch.testing.assert_close(run(block, x, temb), expected, atol=0, rtol=0)


class IndexedSequential(nn.Module):
    """Calls the items of its Sequential apart, as ADM's ResBlock calls out_layers[0], then
    out_layers[1:]: GroupNorm → SiLU must not become one fused call here."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1))

    def forward(self, x):
        return self.layers[1:](self.layers[0](x) * 1.5 - 0.75)


def test_accelerate_group_norm_alone_where_its_caller_is_unknown():
    model = randomize(IndexedSequential(), seed=8).eval()
    x = torch.randn(2, 32, 5, 5)
    expected = run(model, x)
    fastguide.accelerate(model)
    assert model.fastguide_accelerated == {"GroupNorm": 1}
    assert type(model.layers[1]) is nn.SiLU
    torch.testing.assert_close(run(model, x), expected, atol=1e-5, rtol=1e-5)


class AdmGroupNorm32(nn.GroupNorm):
    """As guided-diffusion's GroupNorm32 (float32 statistics, cast back), which is what
    ops.group_norm computes; recognised by its class name and module."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


AdmGroupNorm32.__name__ = AdmGroupNorm32.__qualname__ = "GroupNorm32"
AdmGroupNorm32.__module__ = "guided_diffusion.nn"


def test_accelerate_group_norm_classes_and_hooks():
    hooked = nn.GroupNorm(8, 32)
    calls = []
    hooked.register_forward_hook(lambda *_: calls.append(1))
    model = randomize(
        nn.Sequential(AdmGroupNorm32(8, 32), nn.Conv2d(32, 32, 1), hooked, GroupNorm32(8, 32, swish=1.0)), seed=9
    ).eval()
    x = torch.randn(2, 32, 5, 5)
    expected = run(model, x)
    fastguide.accelerate(model)
    assert model.fastguide_accelerated == {"GroupNorm": 1}
    assert model.fastguide_skipped == {
        "GroupNorm": {
            "hooks registered on it": 1,
            f"class {__name__}.GroupNorm32 (a subclass whose forward may differ)": 1,
        }
    }
    assert type(model[0]).__name__ == "FusedGroupNorm" and model[2] is hooked
    torch.testing.assert_close(run(model, x), expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2


def test_accelerate_group_norm_with_one_value_per_group_gives_torchs_result():
    # GroupNorm(4, 4) on (N, 4, 1, 1): each group holds one value (var 0), and torch returns
    # the bias there; so does the swapped norm (within x·eps^-1/2·ε of the fused form).
    model = randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 1), nn.GroupNorm(4, 4), nn.SiLU(), nn.Flatten(), nn.Linear(4, 2), nn.GroupNorm(2, 2)
        ),
        seed=10,
    ).eval()
    x = torch.randn(3, 3, 1, 1)
    expected = run(model, x)
    fastguide.accelerate(model)
    assert model.fastguide_accelerated == {"GroupNorm": 2}
    torch.testing.assert_close(run(model, x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("eps", [math.inf, math.nan, -1e-5, True, 1e-40, 1e39])
def test_accelerate_leaves_norms_with_an_eps_the_ops_refuse_alone(eps):
    model = nn.Sequential(nn.GroupNorm(2, 4, eps=eps), nn.LayerNorm(4, eps=eps))
    fastguide.accelerate(model)
    assert model.fastguide_accelerated == {}
    assert model.fastguide_skipped == {"GroupNorm": {f"eps {eps!r} (fused: a number within float32's normal range)": 1}}
    assert type(model[0]) is nn.GroupNorm


@pytest.mark.parametrize("time_embedding_norm", ["scale_shift", "default"])
def test_a_resnet_without_its_time_embedding_is_named(time_embedding_norm):
    # diffusers' own block fails on silu(None) there; the default norm's must not skip the
    # embedding and return an output
    from diffusers.models.resnet import ResnetBlock2D  # (not an attribute of diffusers.models before 0.35)

    block = ResnetBlock2D(
        in_channels=8, out_channels=8, temb_channels=16, groups=4, time_embedding_norm=time_embedding_norm
    )
    fastguide.accelerate(block)
    with pytest.raises(ValueError, match=r"temb must be given to a ResnetBlock2D with a time embedding"):
        block(torch.randn(1, 8, 4, 4), None)
    plain = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4)
    fastguide.accelerate(plain)
    assert plain(torch.randn(1, 8, 4, 4), None).shape == (1, 8, 4, 4)  # no embedding to give


def test_a_scale_shift_resnet_broadcasts_a_time_embedding_of_another_batch():
    # diffusers broadcasts temb (batch 1) over x's batch, and x (batch 1) over temb's; the
    # fused norm takes one scale and shift per sample and refused both
    from diffusers.models.resnet import ResnetBlock2D

    block = randomize(
        ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8, time_embedding_norm="scale_shift"),
        seed=3,
    ).eval()
    accelerated = fastguide.accelerate(copy.deepcopy(block))
    g = torch.Generator().manual_seed(0)
    for x_rows, temb_rows in ((2, 1), (1, 2)):
        x, temb = torch.randn(x_rows, 32, 4, 4, generator=g), torch.randn(temb_rows, 16, generator=g)
        assert_close(run(accelerated, x, temb), run(block, x, temb), ATTENTION, torch.float32)


def test_accelerate_report_lists_swapped_and_left_alone(caplog):
    model = tiny_diffusers_unet("default")
    custom = next(m for m in model.modules() if type(m).__name__ == "Attention")
    custom.set_processor(HalvingProcessor())
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    count = lambda kind: sum(type(m).__name__ == kind for m in model.modules())  # noqa: E731
    resnets, attentions, norms = count("ResnetBlock2D"), count("Attention"), count("GroupNorm")
    expected = run(model, x, t).sample
    with caplog.at_level(logging.INFO, logger="fastguide.models.accelerate"):
        fastguide.accelerate(model)
    assert model.fastguide_accelerated == {
        "diffusers ResnetBlock2D": resnets,
        "diffusers Attention": attentions - 1,
        "GroupNorm": norms - 1,
    }
    assert model.fastguide_skipped == {
        "diffusers Attention": {"processor HalvingProcessor": 1},
        "GroupNorm": {"inside a module left alone": 1},
    }
    assert type(custom.group_norm) is nn.GroupNorm
    message = caplog.records[-1].getMessage()
    assert f"diffusers Attention {attentions - 1}" in message and "processor HalvingProcessor: 1" in message
    got = run(model, x, t).sample
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    fastguide.accelerate(model)  # again: nothing new to swap, nothing wrapped twice
    assert model.fastguide_accelerated == {}
    assert model.fastguide_skipped == {
        "diffusers ResnetBlock2D": {"already fastguide": resnets},
        "GroupNorm": {"already fastguide": norms - 1, "inside a module left alone": 1},
        "diffusers Attention": {"already fastguide": attentions - 1, "processor HalvingProcessor": 1},
    }
    assert torch.equal(run(model, x, t).sample, got)


def test_accelerate_fastguide_unet_is_already_fastguide():
    model = tiny_cfg_unet().eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 1])
    expected = run(model, x, t, y)
    fastguide.accelerate(model)
    assert model.fastguide_accelerated == {}
    assert set(model.fastguide_skipped) <= {"ADM ResBlock", "ADM AttentionBlock", "GroupNorm"}
    assert all(set(reasons) == {"already fastguide"} for reasons in model.fastguide_skipped.values())
    assert torch.equal(run(model, x, t, y), expected)


def test_an_accelerated_module_saves_and_loads_with_torch():
    # The fused forwards are bound as partials of module-level functions, which pickle by
    # name (torch.save of a bound method of a foreign function wrote, and torch.load failed).
    import io

    from diffusers.models.resnet import ResnetBlock2D

    block = fastguide.accelerate(ResnetBlock2D(in_channels=32, temb_channels=16, groups=8).eval())
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.forward.args[0] is loaded  # bound to the loaded block, not to the saved one
    torch.testing.assert_close(loaded(x, temb), block(x, temb), atol=0, rtol=0)

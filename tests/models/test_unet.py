"""UNet and EncoderUNet: ADM's key layout, fused vs an unfused plain-PyTorch composition of
the same weights, torch vs triton backends, head orders, loading, precision modes."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fastguide
from fastguide import EncoderUNet, UNet, load_checkpoint, save_state_dict
from fastguide.models.configs import (
    classifier_config,
    create_classifier,
    create_model,
    unet_config,
)
from fastguide.models.unet import timestep_embedding
from tests.helpers import TINY_ADM, backends_for, randomize
from tools.adm_baseline import plain_classifier, plain_unet

REFERENCE = Path(__file__).resolve().parent / "data"  # ADM state-dict listings (data/README.md)
BACKENDS = sorted(set(backends_for("group_norm")) & set(backends_for("attention")))


TINY = {
    "scale-shift, updown, legacy order, learned sigma, CFG row": dict(
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=False,
        num_head_channels=16,
        out_channels=6,
        num_classes=5,
        null_class=True,
    ),
    "plain norm, conv resample, new order, heads": dict(
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=True,
        num_heads=2,
        out_channels=3,
        num_classes=None,
    ),
}


def tiny_unet(**overrides) -> UNet:
    args = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        channel_mult=(1, 2),
        dropout=0.0,
    )
    return randomize(UNet(**{**args, **overrides})).eval()


def tiny_inputs(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=g)
    t = torch.tensor([3, 901][:batch] + [500] * max(0, batch - 2))
    num_classes = getattr(model, "num_classes", None)
    y = None if num_classes is None else torch.arange(batch) % (num_classes + 1)
    return x, t, y


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listing, factory, preset",
    [
        ("adm64-unet-keys.txt", create_model, unet_config("adm64")),
        ("adm256-unet-keys.txt", create_model, unet_config("adm256")),
        ("adm64-classifier-keys.txt", create_classifier, classifier_config("adm64")),
    ],
)
def test_state_dict_matches_adm_listing(listing, factory, preset):
    with torch.device("meta"):
        model = factory(**preset)
    lines = [f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()]
    assert lines == (REFERENCE / listing).read_text().splitlines()


def test_presets_sample_in_the_precision_of_the_released_models():
    # guided-diffusion's README: --use_fp16 True for the 64, 128 and 256 models, False for 512
    assert {name: unet_config(name)["use_fp16"] for name in ("adm64", "adm128", "adm256", "adm512")} == {
        "adm64": True,
        "adm128": True,
        "adm256": True,
        "adm512": False,
    }


# Each released model's attention, from guided-diffusion's README flags and script_util:
# (heads of a block of C channels, the legacy head order). The 64 model has
# --num_head_channels 64 --use_new_attention_order True, the 128 model --num_heads 4, the
# 256 and 512 models --num_head_channels 64; create_classifier fixes num_head_channels=64.
# Heads and their order leave every shape as it is, so the state-dict listings cannot
# tell a wrong one: the official weights would load and sample wrongly.
RELEASED_ATTENTION = {
    ("unet", "adm64"): (lambda channels: channels // 64, False),
    ("unet", "adm128"): (lambda channels: 4, True),
    ("unet", "adm256"): (lambda channels: channels // 64, True),
    ("unet", "adm256-uncond"): (lambda channels: channels // 64, True),
    ("unet", "adm512"): (lambda channels: channels // 64, True),
    **{
        ("classifier", name): (lambda channels: channels // 64, True)
        for name in ("adm64", "adm128", "adm256", "adm512")
    },
}


@pytest.mark.parametrize("kind, name", list(RELEASED_ATTENTION), ids=lambda v: v)
def test_presets_split_attention_heads_as_the_released_models(kind, name):
    from fastguide.models.nn import AttentionBlock, AttentionPool2d

    with torch.device("meta"):
        model = create_model(**unet_config(name)) if kind == "unet" else create_classifier(**classifier_config(name))
    heads, legacy = RELEASED_ATTENTION[kind, name]
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert blocks
    for block in blocks:
        channels = block.qkv.in_channels
        assert (block.attention.num_heads, block.attention.legacy_order) == (heads(channels), legacy), channels
    for pool in (m for m in model.modules() if isinstance(m, AttentionPool2d)):  # the classifier's head
        channels = pool.qkv_proj.in_channels
        assert (pool.attention.num_heads, pool.attention.legacy_order) == (channels // 64, False)


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 10)
    for row, step in zip(emb, t.tolist()):
        for i in range(5):
            freq = 10000 ** (-i / 5)
            assert row[i].item() == pytest.approx(math.cos(step * freq), abs=1e-5)
            assert row[5 + i].item() == pytest.approx(math.sin(step * freq), abs=1e-5)
    assert timestep_embedding(t, 7).shape == (4, 7)


@pytest.mark.parametrize("case", list(TINY))
def test_fused_unet_matches_plain_composition(case):
    model = tiny_unet(**TINY[case])
    x, t, y = tiny_inputs(model)
    with torch.no_grad(), fastguide.backend("torch"):
        fused = model(x, t, y)
    expected = plain_unet(model, x, t, y)
    assert fused.shape == (2, model.out_channels, 16, 16)
    torch.testing.assert_close(fused, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("pool", [None, "attention", "spatial", "spatial_v2", "adaptive"])
def test_the_plain_composition_runs_adms_use_fp16_as_adm_does(pool):
    # tools/adm_baseline.py is the benchmarks' "ADM's own forward": with use_fp16 (fp16
    # convolutions, float32 norms, linears, input and output) it casts x to the blocks'
    # dtype and back before the head, as guided-diffusion's forward does.
    if pool is None:
        model, y = tiny_unet(num_classes=4, use_fp16=True, out_channels=6), torch.tensor([0, 3])
        forward, plain, size = (lambda x, t: model(x, t, y)), (lambda x, t: plain_unet(model, x, t, y)), 16
    else:
        model = randomize(fastguide.EncoderUNet(**TINY_ADM, out_channels=4, pool=pool, use_fp16=True), seed=6).eval()
        forward, plain, size = model, (lambda x, t: plain_classifier(model, x, t)), 8
    assert model.dtype == torch.float16
    x, t = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
    with torch.no_grad(), fastguide.backend("torch"):
        fused = forward(x, t)
    expected = plain(x, t)
    assert expected.dtype == torch.float32
    # fp16 blocks: the two forwards round differently (fused norms, attention's order)
    torch.testing.assert_close(fused, expected, atol=2e-3 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TINY))
def test_unet_backends_agree(backend, case):
    model = tiny_unet(**TINY[case])
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        with fastguide.backend("torch"):
            expected = model(x, t, y)
        with fastguide.backend(backend):
            got = model(x, t, y)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


def _permute_qkv_rows_to_new_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Legacy rows [q₀ k₀ v₀ q₁ …] → new rows [q₀ q₁ … k₀ k₁ … v₀ v₁ …]."""
    ch = weight.shape[0] // (3 * heads)
    return weight.reshape(heads, 3, ch, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def test_legacy_and_new_head_orders_agree_after_permuting_weights():
    legacy = tiny_unet(use_new_attention_order=False, num_head_channels=16, out_channels=3)
    new = UNet(
        image_size=16,
        in_channels=3,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        channel_mult=(1, 2),
        use_new_attention_order=True,
        num_head_channels=16,
        out_channels=3,
    ).eval()
    state = legacy.state_dict()
    for name, module in legacy.named_modules():
        if isinstance(module, fastguide.models.nn.AttentionBlock):
            for suffix in ("weight", "bias"):
                key = f"{name}.qkv.{suffix}"
                state[key] = _permute_qkv_rows_to_new_order(state[key], module.num_heads)
    new.load_state_dict(state)
    x, t, _ = tiny_inputs(legacy)
    with torch.no_grad():
        torch.testing.assert_close(new(x, t), legacy(x, t), atol=1e-5, rtol=1e-5)


def tiny_classifier(pool: str) -> EncoderUNet:
    flags = {**TINY_ADM, "image_size": 16}
    return randomize(
        EncoderUNet(**flags, out_channels=7, use_scale_shift_norm=True, resblock_updown=True, pool=pool)
    ).eval()


@pytest.mark.parametrize("pool", EncoderUNet.POOLS)
def test_classifier_matches_plain_and_input_gradient_agrees_across_backends(pool):
    model = tiny_classifier(pool)
    x, t, _ = tiny_inputs(model)
    y = torch.tensor([1, 4])
    with torch.no_grad(), fastguide.backend("torch"):
        torch.testing.assert_close(model(x, t), plain_classifier(model, x, t), atol=2e-4, rtol=2e-4)

    # One sample through the other backends (the Triton interpreter's time grows with the
    # groups: ~15 s a sample on the development CPU); batching has tests of its own.
    def input_gradient(backend):
        x_in = x[:1].clone().requires_grad_()
        with fastguide.backend(backend):
            log_probs = torch.log_softmax(model(x_in, t[:1]), dim=-1)
            return torch.autograd.grad(log_probs[0, y[0]], x_in)[0]

    expected = input_gradient("torch")
    assert expected.abs().max() > 0
    for backend in BACKENDS:
        torch.testing.assert_close(input_gradient(backend), expected, atol=2e-4, rtol=2e-3)


def test_unet_compiles_fullgraph():
    model = tiny_unet(**TINY["scale-shift, updown, legacy order, learned sigma, CFG row"])
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        eager = model(x, t, y)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix):
    model = tiny_unet(**TINY["scale-shift, updown, legacy order, learned sigma, CFG row"])
    path = tmp_path / f"model{suffix}"
    save_state_dict(model, path)
    fresh = UNet(
        **{
            **dict(
                image_size=16,
                in_channels=3,
                model_channels=32,
                num_res_blocks=1,
                attention_resolutions=(1, 2),
                channel_mult=(1, 2),
            ),
            **TINY["scale-shift, updown, legacy order, learned sigma, CFG row"],
        }
    ).eval()
    load_checkpoint(fresh, path)
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), model(x, t, y))


def test_checkpoint_errors_are_clear(tmp_path):
    model = tiny_unet(out_channels=3)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(model, tmp_path / "missing.pt")
    state = model.state_dict()
    del state["out.2.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad_keys.pt")
    with pytest.raises(ValueError, match=r"1 missing keys \(out.2.bias\), 1 unexpected keys \(extra.weight\)"):
        load_checkpoint(model, tmp_path / "bad_keys.pt")
    other = tiny_unet(out_channels=6)
    save_state_dict(other, tmp_path / "wrong_shape.safetensors")
    with pytest.raises(ValueError, match=r"wrong shape: out.2.weight: checkpoint \(6, 32, 3, 3\)"):
        load_checkpoint(model, tmp_path / "wrong_shape.safetensors")


def test_adm_label_table_loads_into_cfg_model(tmp_path):
    adm = tiny_unet(out_channels=3, num_classes=5)
    save_state_dict(adm, tmp_path / "adm.pt")
    cfg = tiny_unet(out_channels=3, num_classes=5, null_class=True)
    with pytest.raises(ValueError, match="expand_label_table=True"):
        load_checkpoint(cfg, tmp_path / "adm.pt")
    load_checkpoint(cfg, tmp_path / "adm.pt", expand_label_table=True)
    table = adm.label_emb.weight
    torch.testing.assert_close(cfg.label_emb.weight, torch.cat([table, table.mean(0, keepdim=True)]))
    assert cfg.null_label == 5


def test_label_dropout_uses_the_null_class():
    model = tiny_unet(out_channels=3, num_classes=5, null_class=True, label_dropout=1.0).train()
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        dropped = model(x, t, y)
        model.eval()
        torch.testing.assert_close(dropped, model(x, t, torch.full_like(y, 5)))


def test_fp16_mode_bf16_autocast_and_channels_last_stay_close():
    model = tiny_unet(**TINY["scale-shift, updown, legacy order, learned sigma, CFG row"])
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        expected = model(x, t, y)
        channels_last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, y)
        torch.testing.assert_close(channels_last, expected, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, t, y)
        assert (bf16.float() - expected).abs().max() < 0.1 * expected.abs().max()
        model.convert_to_fp16()
        assert model.dtype == torch.float16 and model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
        fp16 = model(x, t, y)
        assert fp16.dtype == torch.float32
        assert (fp16 - expected).abs().max() < 0.02 * expected.abs().max()


def _assert_within_autocast_tolerance(got, expected, plain):
    """bf16's tolerance is what autocast does to ADM's unfused forward (tools/adm_baseline):
    the error stays within twice that one's (FlashAttention's rule, as for the ops), plus one
    bf16 rounding of the output."""
    assert got.shape == expected.shape and got.dtype == plain.dtype
    assert (got.float() - expected).abs().max() <= 2 * (
        plain.float() - expected
    ).abs().max() + 2**-8 * expected.abs().max()


@pytest.mark.parametrize("case", list(TINY))
def test_unet_under_bf16_autocast_matches_the_fp32_forward(case):
    model = tiny_unet(**TINY[case])
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        expected = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _assert_within_autocast_tolerance(model(x, t, y), expected, plain_unet(model, x, t, y))


@pytest.mark.parametrize("pool", EncoderUNet.POOLS)
def test_classifier_under_bf16_autocast_matches_the_fp32_forward(pool):
    model = tiny_classifier(pool)
    x, t, _ = tiny_inputs(model)
    with torch.no_grad():
        expected = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _assert_within_autocast_tolerance(model(x, t), expected, plain_classifier(model, x, t))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_unet(out_channels=3, use_checkpoint=use_checkpoint).train()
        x, t, _ = tiny_inputs(model)
        model(x, t).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(model_channels=0), ValueError, "model_channels must be at least 1, got 0"),
        (
            dict(model_channels=48),
            ValueError,
            r"int\(channel_mult·model_channels\) must be positive multiples of 32 "
            r"\(GroupNorm32's 32 groups\), got \[48, 96\]",
        ),
        (dict(in_channels=0), ValueError, "in_channels must be at least 1, got 0"),
        (dict(out_channels=0), ValueError, "out_channels must be at least 1, got 0"),
        (dict(image_size=0), ValueError, "image_size must be at least 1, got 0"),
        (dict(num_res_blocks=-1), ValueError, "num_res_blocks must be at least 0, got -1"),
        (dict(num_res_blocks=1.0), TypeError, "num_res_blocks must be an int, got float"),
        (dict(num_heads=0), ValueError, "num_heads must be at least 1, got 0"),
        (dict(num_head_channels=0), ValueError, r"num_head_channels must be a positive int, or -1"),
        (dict(num_head_channels=4), ValueError, r"the head dim \(channels 32 / 8 heads = 4\) must be a multiple of 8"),
        (dict(num_heads=3), ValueError, r"channels \(32\) must be divisible by num_heads \(3\)"),
        (dict(num_heads_upsample=0), ValueError, r"num_heads_upsample must be a positive int, or -1"),
        (dict(channel_mult=()), ValueError, "channel_mult must be a non-empty sequence of positive numbers, got ()"),
        (dict(channel_mult=(1, -2)), ValueError, "channel_mult must be a non-empty sequence of positive numbers"),
        (dict(attention_resolutions="2"), TypeError, "attention_resolutions must be a collection of ints"),
        (dict(dropout=1.5), ValueError, r"dropout must be a probability in \[0, 1\], got 1.5"),
        (dict(num_classes=0), ValueError, "num_classes must be a positive int, or None"),
        (dict(num_classes=5, null_class=True, label_dropout=-0.5), ValueError, "label_dropout must be a probability"),
        # a string flag is truthy: "False" would switch the feature on
        (dict(use_fp16="no"), TypeError, "use_fp16 must be a bool, got str 'no'"),
        (dict(num_classes=4, null_class="no"), TypeError, "null_class must be a bool, got str 'no'"),
        (dict(resblock_updown=1), TypeError, "resblock_updown must be a bool, got int 1"),
    ],
)
def test_bad_constructor_arguments_are_named(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_unet(**{"out_channels": 3, **overrides})


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (
            lambda x, t, y: (x[:, :, :15, :15], t, y),
            ValueError,
            r"x's height and width must be multiples of 2 \(the UNet halves them 1 time\(s\)",
        ),
        (lambda x, t, y: (x[:, :, :0], t, y), ValueError, "x's height and width must be positive"),
        (lambda x, t, y: (x.double(), t, y), TypeError, "x must have the model's input dtype torch.float32"),
        (lambda x, t, y: (x[:, :2], t, y), ValueError, r"x must be \(N, 3, H, W\), got shape \(2, 2, 16, 16\)"),
        (lambda x, t, y: (x.long(), t, y), TypeError, "x must be a floating tensor, got dtype torch.int64"),
        (lambda x, t, y: (x, t[:, None], y), ValueError, r"t \(timesteps\) must have shape \(2,\)"),
        (lambda x, t, y: (x, t.bool(), y), TypeError, r"t \(timesteps\) must hold real numbers"),
        (lambda x, t, y: (x, t, y.float()), TypeError, r"y \(class labels\) must be integer class indices"),
        (
            lambda x, t, y: (x, t, torch.tensor([0, 6])),
            ValueError,
            r"y \(class labels\) must lie in \[0, 5\], got 0..6",
        ),
        (lambda x, t, y: (x, t, torch.tensor([0, 1, 2])), ValueError, r"y \(class labels\) must have shape \(2,\)"),
    ],
)
def test_bad_inputs_are_named(inputs, error, match):
    model = tiny_unet(**TINY["scale-shift, updown, legacy order, learned sigma, CFG row"])
    with pytest.raises(error, match=match):
        model(*inputs(*tiny_inputs(model)))


def test_classifier_inputs_are_named():
    model = EncoderUNet(16, 3, 32, 4, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool="attention")
    x, t, _ = tiny_inputs(model)
    with pytest.raises(ValueError, match=r"x must be \(N, 3, 16, 16\) \(the attention pool's position embedding"):
        model(x[:, :, :8, :8], t)
    with pytest.raises(ValueError, match=r"t \(timesteps\) must have shape \(2,\)"):
        model(x, t[:1])


def test_a_0d_timestep_and_label_apply_to_the_whole_batch():
    model = tiny_unet(**TINY["scale-shift, updown, legacy order, learned sigma, CFG row"])
    x, _, _ = tiny_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, torch.tensor(250), torch.tensor(3)),
            model(x, torch.full((2,), 250), torch.full((2,), 3)),
            atol=0,
            rtol=0,
        )


def test_an_empty_batch_gives_an_empty_result():
    # The attention blocks flatten (B, C, H, W) to (B, C, T): with B = 0 a reshape to -1 is ambiguous.
    unet = tiny_unet(**TINY["scale-shift, updown, legacy order, learned sigma, CFG row"])
    classifier = EncoderUNet(16, 3, 32, 4, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool="attention")
    x, t, y = (v[:0] for v in tiny_inputs(unet))
    with torch.no_grad():
        assert unet(x, t, y).shape == (0, 6, 16, 16) and classifier(x, t).shape == (0, 4)


def test_models_on_the_meta_device_run_on_meta_tensors():
    with torch.device("meta"):
        unet = tiny_unet(**TINY["scale-shift, updown, legacy order, learned sigma, CFG row"])
        classifier = EncoderUNet(16, 3, 32, 4, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool="attention")
        x, t, y = torch.empty(2, 3, 16, 16), torch.empty(2), torch.zeros(2, dtype=torch.long)
        out, logits = unet(x, t, y), classifier(x, t)
    assert out.is_meta and out.shape == (2, 6, 16, 16) and logits.is_meta and logits.shape == (2, 4)


@pytest.mark.parametrize(
    "flags, error, match",
    [
        (dict(learn_sigma="False"), TypeError, "learn_sigma must be a bool, got str 'False'"),
        (dict(class_cond="yes"), TypeError, "class_cond must be a bool, got str 'yes'"),
        (dict(channel_mult="1,x"), ValueError, "channel_mult must be comma-separated numbers such as '1,2,3,4'"),
        (dict(channel_mult=7), TypeError, "channel_mult must be a comma-separated string such as"),
        (dict(attention_resolutions="0"), ValueError, "attention_resolutions must be positive int feature-map sizes"),
        (dict(attention_resolutions=4), TypeError, "attention_resolutions must be a comma-separated string"),
    ],
)
def test_bad_script_flags_are_named(flags, error, match):
    with pytest.raises(error, match=match):
        create_model(**{"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", **flags})


def test_script_flags_take_sequences_as_strings():
    # ADM's scripts pass "1,2" and "4"; Python callers may pass the numbers themselves
    common = dict(image_size=8, num_channels=32, num_res_blocks=1)
    from_strings = create_model(**common, channel_mult="1,2", attention_resolutions="4")
    from_lists = create_model(**common, channel_mult=[1, 2], attention_resolutions=(4,))
    from_numpy = create_model(**common, channel_mult=[np.int64(1), 2], attention_resolutions=(np.int32(4),))
    for model in (from_lists, from_numpy):
        assert str(from_strings) == str(model)
        shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
        assert shapes == {name: tensor.shape for name, tensor in from_strings.state_dict().items()}
        assert "input_blocks.3.1.qkv.weight" in shapes  # the attention at 4×4 (downsampled by 2)
        assert model.channel_mult == from_strings.channel_mult == (1, 2)
    with pytest.raises(ValueError, match="classifier_attention_resolutions must be positive int"):
        create_classifier(image_size=8, classifier_attention_resolutions="8,0", channel_mult="1,2")


def test_unknown_preset_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown UNet preset 'adm32'"):
        unet_config("adm32")
    with pytest.raises(ValueError, match="pool must be one of"):
        EncoderUNet(16, 3, 32, 4, 1, (2,), pool="max")
    with pytest.raises(ValueError, match="pass labels y exactly"):
        tiny_unet(out_channels=3)(*tiny_inputs(tiny_unet(out_channels=3))[:2], torch.tensor([0, 1]))

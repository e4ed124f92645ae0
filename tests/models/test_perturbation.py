"""perturb_attention (PAG) and skip_blocks (skip-layer guidance) on the rows of one batched forward.

Tiny random-weight models, float64 so that "equal" means rounding-level agreement:
- diffusers UNet2DConditionModel, SD3Transformer2DModel, PixArtTransformer2DModel: PAG's
  perturbed rows against diffusers' own PAG processors, put on the layers diffusers picks
  (PAGMixin._set_pag_attn_processor, as the PAG pipelines do); SLG against
  SD3Transformer2DModel's skip_layers on the perturbed rows alone;
- fastguide's DiT and UNet, SD3 with q/k norms and dual attention (which diffusers' PAG
  processors do not cover): against a copy of the model whose perturbed modules are
  written-out references (identity attention: the out-projection of the value projection;
  a skipped block: its input), run on the perturbed rows alone;
and everywhere: the other rows are exactly the plain model's, rows=None is the plain
model, remove() restores it.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastguide
from fastguide.models.blocks import passthrough
from fastguide.models.perturbation import Perturbation, perturb_attention, skip_blocks
from tests.helpers import randomize, tiny_cfg_unet

B = 2  # rows per branch


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_dit() -> fastguide.DiT:
    model = fastguide.DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10
    )
    pos_embed = model.pos_embed.detach().clone()
    randomize(model, seed=5)
    with torch.no_grad():
        model.pos_embed.copy_(pos_embed)  # the fixed sin-cos embedding, as the official code sets it
    return model.eval().double()


def dit_inputs(rows: int) -> dict:
    return dict(
        x=torch.randn(rows, 4, 8, 8, generator=generator(1), dtype=torch.float64),
        t=torch.arange(rows) * 97 % 1000,
        y=torch.arange(rows) % 11,
    )


def unet_inputs(rows: int) -> dict:
    return dict(
        x=torch.randn(rows, 3, 8, 8, generator=generator(2), dtype=torch.float64),
        timesteps=torch.arange(rows) * 131 % 1000,
        y=torch.arange(rows) % 5,
    )


def call(model: nn.Module, inputs: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, **extra)
    return out if isinstance(out, torch.Tensor) else out.sample


def rows_of(inputs: dict, rows: slice) -> dict:
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in inputs.items()}


def assert_plain(model: nn.Module) -> None:
    """No instance forward left behind by a perturbation."""
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]


# ---- diffusers models -----------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")
ap = pytest.importorskip("diffusers.models.attention_processor")
pag_utils = pytest.importorskip("diffusers.pipelines.pag.pag_utils")


def tiny_unet2d() -> nn.Module:
    # attention_head_dim is the head count in UNet2DConditionModel: head dims 32/4, 64/4.
    model = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    return randomize(model, seed=3).eval()


def unet2d_inputs(rows: int) -> dict:
    g = generator(4)
    return dict(
        sample=torch.randn(rows, 4, 8, 8, generator=g),
        timestep=torch.tensor(321),
        encoder_hidden_states=torch.randn(rows, 5, 16, generator=g),
    )


def tiny_sd3(**config) -> nn.Module:
    model = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
        **config,
    )
    return randomize(model, seed=6).eval()


def sd3_inputs(rows: int) -> dict:
    g = generator(7)
    return dict(
        hidden_states=torch.randn(rows, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(rows, 5, 16, generator=g),
        pooled_projections=torch.randn(rows, 8, generator=g),
        timestep=torch.arange(rows) * 113.0 % 1000,
    )


def tiny_pixart() -> nn.Module:
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        use_additional_conditions=False,
    )
    return randomize(model, seed=8).eval()


def pixart_inputs(rows: int) -> dict:
    g = generator(9)
    return dict(
        hidden_states=torch.randn(rows, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(rows, 5, 12, generator=g),
        timestep=torch.arange(rows) * 89 % 1000,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def as_float64(inputs: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


DIFFUSERS_MODELS = {
    # name: (model, inputs, PAG processors (with CFG, without), layers, the pipeline attribute)
    "unet2d": (
        tiny_unet2d,
        unet2d_inputs,
        ("PAGCFGIdentitySelfAttnProcessor2_0", "PAGIdentitySelfAttnProcessor2_0"),
        ["mid", "up_blocks.1.attentions.1"],
        "unet",
    ),
    # block 2, the last, is context_pre_only: its context output skips to_add_out
    "sd3": (
        tiny_sd3,
        sd3_inputs,
        ("PAGCFGJointAttnProcessor2_0", "PAGJointAttnProcessor2_0"),
        ["blocks.1", "blocks.2"],
        "transformer",
    ),
    "pixart": (
        tiny_pixart,
        pixart_inputs,
        ("PAGCFGIdentitySelfAttnProcessor2_0", "PAGIdentitySelfAttnProcessor2_0"),
        "blocks.(0|1)",
        "transformer",
    ),
}


def diffusers_pag(model: nn.Module, layers, cfg: bool, processors: tuple[str, str], attribute: str):
    """A copy of ``model`` with diffusers' PAG processors where its PAG pipelines put them,
    and the names of those modules."""
    reference = copy.deepcopy(model)
    pipeline = pag_utils.PAGMixin()
    setattr(pipeline, attribute, reference)
    pipeline._pag_attn_processors = tuple(getattr(ap, name)() for name in processors)
    pipeline._set_pag_attn_processor(layers if isinstance(layers, list) else [layers], cfg)
    pag_types = tuple(getattr(ap, name) for name in processors)
    names = tuple(name for name, m in reference.named_modules() if isinstance(getattr(m, "processor", None), pag_types))
    return reference, names


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg-3B", "no-cfg-2B"])
@pytest.mark.parametrize("name", DIFFUSERS_MODELS)
def test_pag_matches_diffusers_pag_processors(name, cfg):
    build, make_inputs, processors, layers, attribute = DIFFUSERS_MODELS[name]
    model = build().double()
    inputs = as_float64(make_inputs((3 if cfg else 2) * B))
    plain = call(model, inputs)
    reference, pag_layers = diffusers_pag(model, layers, cfg, processors, attribute)
    expected = call(reference, inputs)  # diffusers perturbs the last chunk of B rows

    handle = perturb_attention(model, layers, rows=slice(-B, None))
    assert handle.layers == pag_layers  # the layers diffusers picks
    got = call(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:-B], plain[:-B])
    assert (got[-B:] - plain[-B:]).abs().max() > 1e-3  # the perturbation does something

    handle.rows = None
    assert torch.equal(call(model, inputs), plain)
    handle.rows = slice(-B, None)
    handle.remove()
    assert torch.equal(call(model, inputs), plain)
    assert_plain(model)


def masked_joint_attention(attn, hidden_states, encoder_hidden_states):
    """Written out: SD3 joint attention (JointAttnProcessor2_0's projections and q/k norms)
    under an additive mask that makes the image-to-image block of the map the identity."""
    batch, image_tokens, heads = hidden_states.shape[0], hidden_states.shape[1], attn.heads

    def split(t):
        return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    cq, ck, cv = (
        split(attn.add_q_proj(encoder_hidden_states)),
        split(attn.add_k_proj(encoder_hidden_states)),
        split(attn.add_v_proj(encoder_hidden_states)),
    )
    if attn.norm_q is not None:
        q, k, cq, ck = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(cq), attn.norm_added_k(ck)
    q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
    tokens = q.shape[2]
    mask = torch.zeros(tokens, tokens, dtype=q.dtype)
    mask[:image_tokens, :image_tokens] = float("-inf")
    mask[:image_tokens, :image_tokens].fill_diagonal_(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, tokens, -1)
    image, text = attn.to_out[1](attn.to_out[0](out[:, :image_tokens])), out[:, image_tokens:]
    return image, (text if attn.context_pre_only else attn.to_add_out(text))


class WrittenOutIdentityAttention:
    """A diffusers attention processor: identity self-attention, to_out(to_v(x)), or the
    masked joint attention above when called with encoder_hidden_states."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            return masked_joint_attention(attn, hidden_states, encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))


def test_pag_on_sd3_with_qk_norms_and_dual_attention():
    # SD3.5's blocks: q/k RMS norms, and a second (plain self-)attention attn2 in block 0;
    # diffusers' PAG processors skip the norms and fail on attn2, so: a written-out reference.
    model = tiny_sd3(qk_norm="rms_norm", dual_attention_layers=(0,)).double()
    inputs = as_float64(sd3_inputs(3 * B))
    plain = call(model, inputs)
    reference = copy.deepcopy(model)
    handle = perturb_attention(model, r"blocks\.0\.", rows=slice(2 * B, 3 * B))
    assert handle.layers == ("transformer_blocks.0.attn", "transformer_blocks.0.attn2")
    got = call(model, inputs)
    handle.remove()
    for layer in ("attn", "attn2"):
        getattr(reference.transformer_blocks[0], layer).set_processor(WrittenOutIdentityAttention())
    expected = call(reference, rows_of(inputs, slice(2 * B, 3 * B)))
    torch.testing.assert_close(got[2 * B :], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[: 2 * B], plain[: 2 * B])
    assert torch.equal(call(model, inputs), plain)


@pytest.mark.parametrize("layers", [[1], [2], [0, 2]], ids=["middle", "last (context_pre_only)", "two"])
@pytest.mark.parametrize("batch", [3 * B, 2 * B], ids=["cfg-3B", "no-cfg-2B"])
def test_skip_blocks_matches_sd3_skip_layers(layers, batch):
    model = tiny_sd3().double()
    inputs = as_float64(sd3_inputs(batch))
    plain = call(model, inputs)
    perturbed = slice(batch - B, batch)
    with skip_blocks(model, layers, rows=perturbed) as handle:
        assert handle.layers == tuple(f"transformer_blocks.{i}" for i in layers)
        got = call(model, inputs)
    expected = call(model, rows_of(inputs, perturbed), skip_layers=layers)
    torch.testing.assert_close(got[perturbed], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[: batch - B], plain[: batch - B])
    assert (got[perturbed] - plain[perturbed]).abs().max() > 1e-3
    assert torch.equal(call(model, inputs), plain)
    assert_plain(model)


class PassThrough(nn.Module):
    """A skipped block, written out: its first input back."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize("name", ["pixart", "dit"])
def test_skip_blocks_on_pixart_and_dit(name):
    if name == "pixart":
        model, inputs, blocks = tiny_pixart().double(), as_float64(pixart_inputs(3 * B)), "transformer_blocks"
    else:
        model, inputs, blocks = tiny_dit(), dit_inputs(3 * B), "blocks"
    plain = call(model, inputs)
    perturbed = slice(2 * B, 3 * B)
    reference = copy.deepcopy(model)
    with skip_blocks(model, 1, rows=perturbed):
        got = call(model, inputs)
    getattr(reference, blocks)[1] = PassThrough()
    expected = call(reference, rows_of(inputs, perturbed))
    torch.testing.assert_close(got[perturbed], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[: 2 * B], plain[: 2 * B])
    assert torch.equal(call(model, inputs), plain)
    assert_plain(model)


# ---- fastguide's models ---------------------------------------------------------------


class IdentityDiTAttention(nn.Module):
    """fastguide DiT Attention with the identity map, written out: proj(v), v the third
    [Q; K; V] part of the qkv projection."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.qkv, self.proj = attention.qkv, attention.proj

    def forward(self, x):
        batch, tokens, width = x.shape
        return self.proj(self.qkv(x).view(batch, tokens, 3, width)[:, :, 2])


class IdentityQKVAttention(nn.Module):
    """fastguide UNet QKVAttention with the identity map, written out: each head's v,
    laid out (B, C, T) as the attention output is."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.heads, self.legacy = attention.num_heads, attention.legacy_order

    def forward(self, qkv):
        batch, width, length = qkv.shape
        if self.legacy:  # per head [q k v]
            v = qkv.view(batch, self.heads, 3, width // (3 * self.heads), length)[:, :, 2]
        else:  # [Q; K; V]
            v = qkv.view(batch, 3, width // 3, length)[:, 2]
        return v.reshape(batch, width // 3, length)


def test_pag_on_fastguide_dit():
    model = tiny_dit()
    inputs = dit_inputs(3 * B)
    plain = call(model, inputs)
    reference = copy.deepcopy(model)
    handle = perturb_attention(model, "blocks.1", rows=slice(2 * B, None))
    assert handle.layers == ("blocks.1.attn",)
    got = call(model, inputs)
    handle.remove()
    reference.blocks[1].attn = IdentityDiTAttention(reference.blocks[1].attn)
    torch.testing.assert_close(
        got[2 * B :], call(reference, rows_of(inputs, slice(2 * B, None))), rtol=1e-12, atol=1e-12
    )
    assert torch.equal(got[: 2 * B], plain[: 2 * B])
    assert (got[2 * B :] - plain[2 * B :]).abs().max() > 1e-3
    assert torch.equal(call(model, inputs), plain)
    assert_plain(model)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy-heads", "new-heads"])
def test_pag_on_fastguide_unet(new_order):
    model = tiny_cfg_unet().double()
    for module in model.modules():
        if isinstance(module, fastguide.models.nn.QKVAttention):
            module.legacy_order = not new_order
    inputs = unet_inputs(3 * B)
    plain = call(model, inputs)
    reference = copy.deepcopy(model)
    handle = perturb_attention(model, ["mid", r"output_blocks\.1\."], rows=slice(2 * B, None))
    assert handle.layers == ("middle_block.1.attention", "output_blocks.1.1.attention")
    got = call(model, inputs)
    handle.remove()
    for block in (reference.middle_block[1], reference.output_blocks[1][1]):
        block.attention = IdentityQKVAttention(block.attention)
    torch.testing.assert_close(
        got[2 * B :], call(reference, rows_of(inputs, slice(2 * B, None))), rtol=1e-12, atol=1e-12
    )
    assert torch.equal(got[: 2 * B], plain[: 2 * B])
    assert (got[2 * B :] - plain[2 * B :]).abs().max() > 1e-3
    assert torch.equal(call(model, inputs), plain)
    assert_plain(model)


def test_rows_are_read_at_each_call():
    model = tiny_dit()
    inputs = dit_inputs(3 * B)
    plain = call(model, inputs)
    reference = copy.deepcopy(model)
    handle = perturb_attention(model, "blocks.2")
    assert torch.equal(call(model, inputs), plain)  # rows=None until set
    outputs = {}
    for rows in (slice(2 * B, 3 * B), slice(0, B), slice(-1, None), slice(B, B)):
        handle.rows = rows
        outputs[rows.start] = call(model, inputs)
    handle.remove()
    reference.blocks[2].attn = IdentityDiTAttention(reference.blocks[2].attn)
    perturbed = call(reference, inputs)
    for rows, got in (
        (slice(2 * B, 3 * B), outputs[2 * B]),
        (slice(0, B), outputs[0]),
        (slice(3 * B - 1, 3 * B), outputs[-1]),
    ):
        torch.testing.assert_close(got[rows], perturbed[rows], rtol=1e-12, atol=1e-12)
        others = torch.ones(3 * B, dtype=torch.bool)
        others[rows] = False
        assert torch.equal(got[others], plain[others])
    assert torch.equal(outputs[B], plain)  # an empty slice perturbs nothing


@pytest.mark.parametrize("order", ["accelerate-first", "perturb-first"])
def test_pag_composes_with_accelerate(order):
    model = tiny_unet2d()
    inputs = unet2d_inputs(3 * B)
    reference, _ = diffusers_pag(model, "mid", True, DIFFUSERS_MODELS["unet2d"][2], "unet")
    expected = call(reference, inputs)
    plain = call(model, inputs)
    if order == "accelerate-first":
        fastguide.accelerate(model)
    handle = perturb_attention(model, "mid", rows=slice(2 * B, None))
    if order == "perturb-first":
        fastguide.accelerate(model)
    assert model.fastguide_accelerated["diffusers Attention"] == 8  # the perturbed one included
    torch.testing.assert_close(call(model, inputs), expected, rtol=1e-4, atol=1e-4)
    handle.remove()
    torch.testing.assert_close(call(model, inputs), plain, rtol=1e-4, atol=1e-4)
    assert all(
        type(m.processor).__name__ == "FastguideAttnProcessor" for m in model.modules() if isinstance(m, ap.Attention)
    )


@pytest.mark.gpu
def test_cuda_graph_replays_the_rows_set_at_capture():
    device = torch.device("cuda")
    model = tiny_dit().float().to(device)
    inputs = {k: v.to(device) for k, v in dit_inputs(3 * B).items()}
    inputs["x"] = inputs["x"].float()
    pag = perturb_attention(model, "blocks.1", rows=slice(2 * B, None))
    slg = skip_blocks(model, [2], rows=slice(2 * B, None))
    with torch.no_grad():
        eager = model(**inputs)
        static = {k: v.clone() for k, v in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(**static)  # warm-up off the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(**static)
        static["x"].copy_(inputs["x"] * 0.5)
        graph.replay()
        torch.testing.assert_close(out, model(**{**inputs, "x": inputs["x"] * 0.5}), rtol=1e-4, atol=1e-4)
        static["x"].copy_(inputs["x"])
        graph.replay()
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    pag.remove()
    slg.remove()


# ---- errors ---------------------------------------------------------------------------


def test_unknown_layers_name_the_layers_there_are():
    model = tiny_unet2d()
    with pytest.raises(
        ValueError,
        match=r"layers: 'down\.block_1' matches no self-attention module; they are: "
        r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1, ",
    ):
        perturb_attention(model, "down.block_1")
    with pytest.raises(ValueError, match=r"layers: '\(' is not a regular expression"):
        perturb_attention(model, ["mid", "("])
    assert_plain(model)  # nothing installed on a failed call


def test_models_without_attention_or_blocks():
    with pytest.raises(ValueError, match=r"model \(Sequential\) has no self-attention to perturb"):
        perturb_attention(nn.Sequential(nn.Linear(4, 4)), "0")
    with pytest.raises(ValueError, match=r"model \(UNet\) has no transformer blocks: skip_blocks"):
        skip_blocks(tiny_cfg_unet(), [0])
    with pytest.raises(ValueError, match=r"layers: block 3 does not exist; model\.blocks holds blocks 0\.\.2"):
        skip_blocks(tiny_dit(), [1, 3])


@pytest.mark.parametrize("bad", [None, [], 3, ["mid", 1]])
def test_attention_layers_must_be_patterns(bad):
    with pytest.raises(TypeError, match="layers must be a layer-name pattern"):
        perturb_attention(tiny_dit(), bad)


@pytest.mark.parametrize("bad", ["1", [], [True], 1.0])
def test_block_layers_must_be_indices(bad):
    with pytest.raises(TypeError, match="layers must be a block index"):
        skip_blocks(tiny_dit(), bad)


def test_rows_errors():
    model = tiny_dit()
    handle = perturb_attention(model, "blocks.0")
    with pytest.raises(TypeError, match="rows must be a slice or None, got list"):
        handle.rows = [0, 1]
    with pytest.raises(ValueError, match=r"rows must be a contiguous slice \(step 1\)"):
        handle.rows = slice(0, 4, 2)
    with pytest.raises(TypeError, match="rows must have int"):
        handle.rows = slice(0.0, 2)
    handle.rows = slice(4, 9)
    with pytest.raises(ValueError, match=r"rows slice\(4, 9, None\) reaches past the batch of 6 rows"):
        call(model, dit_inputs(6))
    handle.remove()


def test_install_and_remove_errors():
    model = tiny_dit()
    first = perturb_attention(model, "blocks.1")
    with pytest.raises(ValueError, match=r"layers: 'blocks\.1\.attn' is already perturbed"):
        perturb_attention(model, ["blocks.0", "blocks.1"])
    assert "forward" not in model.blocks[0].attn.__dict__  # all or nothing
    perturbed_forward = model.blocks[1].attn.forward
    model.blocks[1].attn.forward = lambda x: perturbed_forward(x)
    with pytest.raises(RuntimeError, match=r"cannot remove the perturbation of 'blocks\.1\.attn'"):
        first.remove()
    model.blocks[1].attn.forward = perturbed_forward
    first.remove()
    first.remove()  # a second call does nothing
    assert_plain(model)
    assert isinstance(first, Perturbation) and "removed" in repr(first)


def test_a_later_handle_installs_the_wrapper_a_module_had_while_its_forward_is_unchanged():
    # One wrapper object per module and kind (torch.compile guards on the instance forward),
    # with each handle's own rows; a forward replaced in between gets a new wrapper.
    model = tiny_dit()
    with perturb_attention(model, "blocks.1", rows=slice(0, 1)):
        first = model.blocks[1].attn.forward
    with perturb_attention(model, "blocks.1", rows=slice(1, 2)) as second:
        assert model.blocks[1].attn.forward is first and first.rows == slice(1, 2)
        second.rows = None
        assert first.rows is None
    with skip_blocks(model, 1):
        assert model.blocks[1].forward is not first
    model.blocks[1].attn.forward = model.blocks[1].attn.forward  # an instance forward of the user's
    with perturb_attention(model, "blocks.1"):
        assert model.blocks[1].attn.forward is not first
    del model.blocks[1].attn.forward
    assert_plain(model)


def test_a_perturbed_block_called_by_keyword_still_names_its_input():
    # What a block passes through is found by the block's own argument name (DiTBlock's
    # forward(x, c)), not by a perturbation wrapper's (*args, **kwargs): a block cache asks
    # while skip-layer guidance has the block wrapped.
    model = tiny_dit()
    width = model.blocks[0].attn.proj.in_features
    h, c = torch.randn(3, 5, width, dtype=torch.float64), torch.randn(3, width, dtype=torch.float64)
    with skip_blocks(model, 0, rows=slice(1, 3)):
        assert passthrough(model.blocks[0])((), {"x": h, "c": c}) is h
        out = model.blocks[0](x=h, c=c)
    torch.testing.assert_close(out[1:], h[1:], rtol=0, atol=0)
    torch.testing.assert_close(out[:1], model.blocks[0](h[:1], c[:1]))


def test_a_block_that_runs_at_two_positions_is_refused():
    # A block list holding one module twice (shared weights): skipping it at one position
    # would skip it at the other too.
    model = tiny_dit()
    model.blocks[2] = model.blocks[0]
    for layers in (0, [0, 2]):
        with pytest.raises(ValueError, match=r"model\.blocks\[0\] is the same module as block\(s\) \[2\]"):
            skip_blocks(model, layers)
        assert "forward" not in model.blocks[0].__dict__
    skip_blocks(model, 1).remove()


def test_joint_attention_other_than_sd3s_is_refused():
    # Added K/V projections under another processor (HunyuanVideo's masks the text and
    # rotates q and k) are not the joint attention whose identity map is written out.
    processor = ap.AttnAddedKVProcessor2_0()
    attn = ap.Attention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=32, processor=processor)
    model = nn.ModuleDict({"attn": attn})
    with pytest.raises(ValueError, match=r"layers: 'attn' is joint attention .*processor AttnAddedKVProcessor2_0"):
        perturb_attention(model, "attn")
    assert_plain(model)
    # A joint layer whose processor is swapped after the install is refused when called.

    class OwnJointProcessor(ap.JointAttnProcessor2_0):
        pass

    sd3 = tiny_sd3()
    with perturb_attention(sd3, r"transformer_blocks\.0\.attn$", rows=slice(1, 2)):
        sd3.transformer_blocks[0].attn.set_processor(OwnJointProcessor())
        with pytest.raises(ValueError, match="cannot perturb this joint attention: processor OwnJointProcessor"):
            sd3(**sd3_inputs(2))


def test_a_self_attention_layer_called_with_encoder_hidden_states_names_its_processor():
    # (CogVideoX's attn1: its processor attends to the text concatenated into one stream)
    attn = ap.Attention(query_dim=16, heads=2, dim_head=8)
    with perturb_attention(nn.ModuleDict({"attn": attn}), "attn", rows=slice(1, 2)):
        with pytest.raises(ValueError, match=r"\(processor AttnProcessor2_0\) was called with encoder_hidden_states"):
            attn(torch.randn(2, 4, 16), encoder_hidden_states=torch.randn(2, 3, 16))


def test_a_whole_layer_name_ending_in_a_number_picks_that_layer():
    model = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=5,
    )
    with perturb_attention(model, "mid_block.attentions.0") as handle:
        assert handle.layers == ("mid_block.attentions.0",)
    # diffusers' number rule otherwise kept: "attentions.0" ends in the number its matches end in
    with pytest.raises(ValueError, match=r"layers: 'attentions\.0' matches no self-attention module"):
        perturb_attention(model, "attentions.0")
    # The adapter's PAG layers are the UNet's own names.
    handle = fastguide.PAG(2.0, r"^mid_block\.").perturb(fastguide.DiffusersUNet(model, null_label=4))
    assert handle.layers == ("mid_block.attentions.0",)
    handle.remove()
    assert_plain(model)


@pytest.mark.parametrize("layers", ["blocks.1", r"blocks\.1\.", "attn1", "transformer_blocks.(2|11)"])
def test_layer_names_select_what_diffusers_selects(layers):
    # diffusers' quirk kept: "blocks.1" also picks blocks 10 and 11 (anchor it for block 1 alone).
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=1,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=12,
        cross_attention_dim=8,
        sample_size=4,
        patch_size=2,
        caption_channels=8,
        use_additional_conditions=False,
    )
    _, expected = diffusers_pag(model, layers, True, DIFFUSERS_MODELS["pixart"][2], "transformer")
    with perturb_attention(model, layers) as handle:
        assert handle.layers == expected
    assert {"blocks.1": 3, r"blocks\.1\.": 1, "attn1": 12, "transformer_blocks.(2|11)": 2}[layers] == len(expected)


def test_a_model_once_perturbed_is_freed_and_copies_and_pickles_as_before():
    # A table of each module's last wrapper, keyed weakly by module, kept every perturbed
    # module alive, weights included: the wrapper it held refers to its module.
    import copy
    import gc
    import io
    import weakref

    model = tiny_dit()
    perturb_attention(model, "blocks.1").remove()
    skip_blocks(model, 0).remove()
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())  # the replacements are local functions, which do not pickle
    with perturb_attention(clone, "blocks.1"):  # the copy's own wrapper, not the original's
        assert clone.blocks[1].attn.forward.module is clone.blocks[1].attn
    shallow = copy.copy(model.blocks[1].attn)  # shares the original's __dict__ values
    with perturb_attention(shallow, ".*"):
        assert shallow.forward.module is shallow
    refs = [weakref.ref(model), weakref.ref(model.blocks[0]), weakref.ref(model.blocks[1].attn)]
    del model, clone, shallow
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]

"""PAG and skip-layer guidance through the sampler: [c; u; p] (or [c; p]) in one batched
forward, the perturbation on p's rows only, combined in the fused step as
u + w·(c − u) + s·(c − p): equal to the update written out with three separate forwards."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import fastguide
from fastguide import PAG, SkipLayerGuidance, sample
from fastguide.models.perturbation import perturb_attention, skip_blocks
from tests.helpers import randomize, tiny_cfg_unet

SCHEDULE = fastguide.NoiseSchedule.linear()
NULL = 4


def tiny_dit():
    return randomize(
        fastguide.DiT(
            input_size=8,
            patch_size=2,
            in_channels=3,
            hidden_size=32,
            depth=3,
            num_heads=2,
            num_classes=4,
            learn_sigma=False,
        ),
        seed=3,
    ).eval()


def written_out_ddim(model, perturbed, noise, labels, timesteps, w, s, window=None):
    """DDIM (eta 0, no clipping) with m = u + w·(c − u) + s·(c − p) (w = 1: m = c + s·(c − p)),
    each prediction its own forward; ``perturbed`` runs the perturbed model on all its rows;
    outside ``window`` (σ̃ low, high) the p term is dropped."""
    x = noise.clone()
    with torch.no_grad():
        for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
            tb = torch.full((len(x),), t)
            c = model(x, tb, labels)[:, :3]
            u = model(x, tb, torch.full_like(labels, NULL))[:, :3] if w > 1 else c
            eps = u + w * (c - u)
            if window is None or window[0] <= SCHEDULE.edm_sigma(t) <= window[1]:
                eps = eps + s * (c - perturbed(x, tb, labels)[:, :3])
            abar, abar_next = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t_next)
            x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
            x = math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next) * eps
    return x


def _perturbed_forward(model, install):
    def forward(x, t, y):
        with install(model) as handle:
            handle.rows = slice(0, len(x))
            return model(x, t, y)

    return forward


TIMESTEPS = [600, 400, 200, 0]  # from t = 999, x0 = (x − σ·eps)/α amplifies rounding 158×
NOISE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
LABELS = torch.tensor([1, 3])


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize(
    "make, guidance",
    [
        (tiny_cfg_unet, lambda w: PAG(2.0, "input_blocks|middle_block", cfg_scale=w)),
        (tiny_dit, lambda w: PAG(1.5, r"blocks\.1\.", cfg_scale=w)),
        (tiny_dit, lambda w: SkipLayerGuidance(2.5, [1, 2], cfg_scale=w)),
    ],
    ids=["pag-unet", "pag-dit", "slg-dit"],
)
def test_perturbed_guidance_equals_three_forwards_written_out(make, guidance, cfg_scale):
    model = make()
    spec = guidance(cfg_scale)
    install = (
        (lambda m: perturb_attention(m, spec.layers))
        if isinstance(spec, PAG)
        else (lambda m: skip_blocks(m, spec.layers))
    )
    plain, peeks = make(), []

    def callback(d):  # a callback's own forwards, of B rows and of the guided forward's 3B, are plain
        with torch.no_grad():
            for copies in (1, 3):
                x, labels = d["x"].repeat(copies, 1, 1, 1), LABELS.repeat(copies)
                t = torch.full((len(x),), d["t"])
                peeks.append(torch.equal(model(x, t, labels), plain(x, t, labels)))

    got = sample(
        model,
        NOISE.shape,
        labels=LABELS,
        guidance=spec,
        sampler="ddim",
        steps=TIMESTEPS,
        noise=NOISE,
        clip_denoised=False,
        null_label=NULL,
        callback=callback,
    )
    assert peeks == [True] * 2 * len(TIMESTEPS)
    expected = written_out_ddim(
        model, _perturbed_forward(model, install), NOISE, LABELS, TIMESTEPS, cfg_scale, spec.scale
    )
    # float32 rounding of one 3B forward against separate B-row ones (~1e-6 of the output)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    # the run's perturbation is removed: the model is its plain self again
    with torch.no_grad():
        x, t = NOISE, torch.full((2,), 500)
        torch.testing.assert_close(model(x, t, LABELS), make()(x, t, LABELS), atol=0, rtol=0)


def test_the_perturbed_branch_runs_only_inside_its_window():
    model = tiny_dit()
    window = (0.5, 20.0)
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    spec = SkipLayerGuidance(2.0, [1], cfg_scale=3.0, interval=window)
    got = sample(
        model,
        NOISE.shape,
        labels=LABELS,
        guidance=spec,
        sampler="ddim",
        steps=TIMESTEPS,
        noise=NOISE,
        clip_denoised=False,
        null_label=NULL,
    )
    inside = [window[0] <= SCHEDULE.edm_sigma(t) <= window[1] for t in TIMESTEPS]
    assert rows == [6 if on else 4 for on in inside] and any(inside) and not all(inside)
    rows.clear()
    expected = written_out_ddim(
        model, _perturbed_forward(model, lambda m: skip_blocks(m, [1])), NOISE, LABELS, TIMESTEPS, 3.0, 2.0, window
    )
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_a_perturbation_window_that_holds_no_call_warns():
    # with CFG every call is guided, so the check once looked at the combine and said nothing
    spec = SkipLayerGuidance(2.0, [1], cfg_scale=3.0, interval=(0.0, 1e-4))
    with pytest.warns(UserWarning, match="holds none of the .* model calls"):
        sample(
            tiny_dit(),
            NOISE.shape,
            labels=LABELS,
            guidance=spec,
            sampler="ddim",
            steps=TIMESTEPS,
            noise=NOISE,
            null_label=NULL,
        )


def test_pag_without_cfg_needs_no_null_label_and_specs_are_checked():
    model = tiny_dit()
    sample(model, NOISE.shape, labels=LABELS, guidance=PAG(1.0, r"blocks\.0\."), sampler="ddim", steps=3)
    with pytest.raises(ValueError, match="PAG scale must be non-zero"):
        PAG(0.0, "mid", cfg_scale=3.0)
    with pytest.raises(ValueError, match="PAG cfg_scale must be >= 1"):
        PAG(1.0, "mid", cfg_scale=0.5)
    with pytest.raises(ValueError, match="SkipLayerGuidance rescale must be in"):
        SkipLayerGuidance(1.0, [1], rescale=2.0)
    with pytest.raises(ValueError, match="SkipLayerGuidance interval"):
        SkipLayerGuidance(1.0, [1], interval=(3.0, 1.0))
    # layers when built, not at the first forward; sequences (NumPy's included) become tuples
    for bad in ([], "7", [1, True], np.array([1.5])):
        with pytest.raises(TypeError, match="layers must be a block index"):
            SkipLayerGuidance(1.0, bad)
    for bad in ([], 3, ["mid", 3]):
        with pytest.raises(TypeError, match="layers must be a layer-name pattern"):
            PAG(1.0, bad)
    assert SkipLayerGuidance(1.0, [np.int64(2), 1]).layers == (2, 1)
    assert SkipLayerGuidance(1.0, np.int64(2)).layers == 2 and PAG(1.0, ["mid"]).layers == ("mid",)
    assert hash(SkipLayerGuidance(1.0, [2])) == hash(SkipLayerGuidance(1.0, (2,)))


def test_a_sampler_installs_the_same_perturbation_each_run_while_it_can():
    # The same wrapper objects every run (a torch.compile'd model guards on them); a module
    # replaced between runs gets a new perturbation, never the old module's.
    model, forwards = tiny_dit(), []
    kwargs = dict(sampler="ddim", steps=2, schedule=SCHEDULE, guidance=PAG(2.0, r"blocks\.1\."))
    sampler = fastguide.GuidedSampler(model, **kwargs)
    noise, labels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])

    def draw(sampler_, callback=None):
        return sampler_(noise.shape, labels=labels, noise=noise, callback=callback)

    for _ in range(2):
        draw(sampler, lambda info: forwards.append(model.blocks[1].attn.__dict__["forward"]))
        assert "forward" not in model.blocks[1].attn.__dict__  # removed after each run
    assert forwards[0] is forwards[-1]
    model.blocks[1].attn = randomize(copy.deepcopy(model.blocks[1].attn), seed=9)
    torch.testing.assert_close(draw(sampler), draw(fastguide.GuidedSampler(model, **kwargs)), rtol=0, atol=0)


def test_a_compiled_model_is_compiled_once_for_every_perturbed_run():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(tiny_dit(), backend="eager")
        for guidance in (PAG(2.0, r"blocks\.1\."), SkipLayerGuidance(2.0, [1], interval=(0.0, 1e9))):
            kwargs = dict(sampler="euler", steps=2, schedule=SCHEDULE, guidance=guidance)
            sampler = fastguide.GuidedSampler(compiled, **kwargs)
            for _ in range(3):
                sampler((2, 3, 8, 8), labels=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
            for _ in range(3):  # sample() makes a new sampler, and a new perturbation handle, per call
                fastguide.sample(compiled, (2, 3, 8, 8), labels=torch.tensor([1, 2]), **kwargs)
        assert counters["stats"]["unique_graphs"] == 2  # one a guidance
    finally:
        torch._dynamo.reset()

"""Keyword conditioning (cond/uncond) through the sampler: equal to labels where it encodes
them, laid out once per run, broadcast, nested, refused before any forward when it does
not pair up, and replayed by CUDA graphs."""

from __future__ import annotations

import pytest
import torch

import fastguide
from fastguide import CFG, GuidedSampler, sample
from tests.helpers import tiny_cfg_unet

NULL = 4  # tiny_cfg_unet's null class


class ContextModel(torch.nn.Module):
    """tiny_cfg_unet conditioned through keyword arguments: ``context`` a one-hot (rows, 5)
    of the class (the null class in the last column), and an optional nested ``extra``
    dict whose ``shift`` (rows, 1) is added to the prediction. Records every call's row
    count and the data pointers of what it was given."""

    def __init__(self):
        super().__init__()
        self.unet = tiny_cfg_unet()
        self.calls: list[tuple[int, int, int | None]] = []

    def forward(self, x, t, *, context, extra=None):
        assert context.shape == (len(x), NULL + 1)
        self.calls.append((len(x), context.data_ptr(), None if extra is None else extra["shift"].data_ptr()))
        out = self.unet(x, t, context.argmax(dim=1))
        if extra is not None:
            out = out + extra["shift"].reshape(-1, 1, 1, 1)
        return out


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, NULL + 1).float()


LABELS = torch.tensor([0, 3, 2])
NOISE = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
COMMON = dict(sampler="dpm++2m", steps=4, noise=NOISE)


@pytest.mark.parametrize(
    "guidance", [CFG(3.0), CFG(2.5, rescale=0.5, interval=(0.3, 5.0)), fastguide.CFGPlusPlus(0.4)], ids=str
)
def test_keyword_conditioning_equals_the_labels_it_encodes(guidance):
    model = ContextModel()
    by_labels = sample(model.unet, NOISE.shape, labels=LABELS, guidance=guidance, **COMMON)
    by_keywords = sample(
        model,
        NOISE.shape,
        cond={"context": one_hot(LABELS)},
        uncond={"context": one_hot(torch.full_like(LABELS, NULL))},
        guidance=guidance,
        **COMMON,
    )
    torch.testing.assert_close(by_keywords, by_labels, atol=0, rtol=0)


def test_conditioning_is_laid_out_once_per_run_and_a_row_broadcasts():
    model = ContextModel()
    guidance = CFG(3.0, interval=(0.3, 5.0))  # calls outside the interval run B rows
    cond = {"context": one_hot(LABELS), "extra": {"shift": torch.tensor([[0.1], [-0.2], [0.3]])}}
    one_row = {"context": one_hot(torch.tensor([NULL])), "extra": {"shift": torch.tensor([[0.05]])}}
    batch_rows = {"context": one_hot(torch.full_like(LABELS, NULL)), "extra": {"shift": torch.full((3, 1), 0.05)}}
    broadcast = sample(model, NOISE.shape, cond=cond, uncond=one_row, guidance=guidance, **COMMON)
    calls = list(model.calls)
    assert {rows for rows, _, _ in calls} == {3, 6}  # both sides of the interval are exercised
    # The same tensors on every call (one layout per run, sliced, never concatenated per step).
    assert len({pointer for _, pointer, _ in calls}) == 1 and len({pointer for _, _, pointer in calls}) == 1
    model.calls.clear()
    full = sample(model, NOISE.shape, cond=cond, uncond=batch_rows, guidance=guidance, **COMMON)
    torch.testing.assert_close(broadcast, full, atol=0, rtol=0)
    assert not torch.allclose(
        full,
        sample(
            model,
            NOISE.shape,
            cond={**cond, "extra": {"shift": torch.zeros(3, 1)}},
            uncond=batch_rows,
            guidance=guidance,
            **COMMON,
        ),
    )


def test_labels_and_keywords_together_and_unguided_keywords():
    def model(x, t, y, *, gain):
        return tiny(x, t, y) * gain.reshape(-1, 1, 1, 1)

    tiny = tiny_cfg_unet()
    gain = torch.tensor([1.0, 0.5, 2.0])
    got = sample(
        model,
        NOISE.shape,
        labels=LABELS,
        cond={"gain": gain},
        uncond={"gain": gain.flip(0)},
        guidance=CFG(2.0),
        null_label=NULL,
        **COMMON,
    )
    expected = sample(
        lambda x, t, y: tiny(x, t, y) * torch.cat([gain, gain.flip(0)]).reshape(-1, 1, 1, 1),
        NOISE.shape,
        labels=LABELS,
        guidance=CFG(2.0),
        null_label=NULL,
        **COMMON,
    )
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # Unguided: uncond is not needed; cond reaches the model on the B rows.
    unguided = sample(model, NOISE.shape, labels=LABELS, cond={"gain": gain}, **COMMON)
    torch.testing.assert_close(
        unguided,
        sample(lambda x, t, y: tiny(x, t, y) * gain.reshape(-1, 1, 1, 1), NOISE.shape, labels=LABELS, **COMMON),
        atol=0,
        rtol=0,
    )


def test_autoguidance_guide_gets_the_conditional_keywords():
    main, guide = ContextModel(), ContextModel()
    guidance = fastguide.AutoGuidance(guide, 2.0)
    got = sample(main, NOISE.shape, cond={"context": one_hot(LABELS)}, guidance=guidance, **COMMON)
    expected = sample(main.unet, NOISE.shape, labels=LABELS, guidance=fastguide.AutoGuidance(guide.unet, 2.0), **COMMON)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert {rows for rows, _, _ in guide.calls} == {3}


BAD = {  # name: (cond, uncond, error type, message)
    "mismatched keys": (
        {"context": one_hot(LABELS)},
        {"ctx": one_hot(LABELS)},
        ValueError,
        r"cond\['context'\] has no counterpart in uncond.*uncond\['ctx'\] has no counterpart in cond",
    ),
    "nested keys": (
        {"context": one_hot(LABELS), "extra": {"shift": torch.ones(3, 1)}},
        {"context": one_hot(LABELS), "extra": {"scale": torch.ones(3, 1)}},
        ValueError,
        r"cond\['extra'\]\['shift'\] has no counterpart",
    ),
    "batch": (
        {"context": one_hot(LABELS[:2])},
        {"context": one_hot(LABELS)},
        ValueError,
        r"cond\['context'\] must hold 1 or 3 rows",
    ),
    "shape past dim 0": (
        {"context": one_hot(LABELS)},
        {"context": torch.zeros(3, 6)},
        ValueError,
        "same shape past dim 0",
    ),
    "dtype": ({"context": one_hot(LABELS)}, {"context": one_hot(LABELS).double()}, ValueError, "same dtype"),
    "device": (
        {"context": one_hot(LABELS)},
        {"context": one_hot(LABELS).to("meta")},
        ValueError,
        "same device, got cpu and meta",
    ),
    "no uncond": ({"context": one_hot(LABELS)}, None, ValueError, "needs uncond="),
    "not a tensor": (
        {"context": [1, 2, 3]},
        {"context": [1, 2, 3]},
        TypeError,
        r"cond\['context'\] must be a tensor batched on dim 0",
    ),
    "not a dict": (one_hot(LABELS), None, TypeError, "cond must be a dict of the model's keyword arguments"),
    "0-d": ({"context": torch.tensor(1.0)}, {"context": torch.tensor(1.0)}, ValueError, "must be batched on dim 0"),
    "tensor against None": ({"context": one_hot(LABELS)}, {"context": None}, ValueError, "must both be tensors"),
}


@pytest.mark.parametrize("case", BAD)
def test_conditioning_that_does_not_pair_up_is_refused_before_any_forward(case):
    cond, uncond, error, message = BAD[case]
    model = ContextModel()
    with pytest.raises(error, match=message):
        sample(model, NOISE.shape, cond=cond, uncond=uncond, guidance=CFG(2.0), **COMMON)
    assert model.calls == []


def test_guidance_without_any_conditioning_is_refused():
    with pytest.raises(ValueError, match="guidance needs labels .* or cond=/uncond="):
        sample(lambda x, t: x, NOISE.shape, guidance=CFG(2.0), **COMMON)
    with pytest.raises(ValueError, match="classifier guidance needs labels"):
        sample(
            lambda x, t: x,
            NOISE.shape,
            cond={"context": one_hot(LABELS)},
            guidance=fastguide.ClassifierGuidance(lambda x, t: x.flatten(1), 1.0),
            **COMMON,
        )


def test_sampler_and_sample_take_cond_and_uncond():
    model = ContextModel()
    sampler = GuidedSampler(model, sampler="ddim", steps=3, guidance=CFG(2.0))
    kwargs = dict(
        cond={"context": one_hot(LABELS)}, uncond={"context": one_hot(torch.full_like(LABELS, NULL))}, noise=NOISE
    )
    torch.testing.assert_close(
        sampler(NOISE.shape, **kwargs),
        sample(model, NOISE.shape, sampler="ddim", steps=3, guidance=CFG(2.0), **kwargs),
        atol=0,
        rtol=0,
    )


def _graphed_against_eager(device: str) -> None:
    model = ContextModel().to(device)
    kwargs = dict(sampler="dpm++2m", steps=4, guidance=CFG(3.0, interval=(0.3, 5.0)))
    graphed, eager = GuidedSampler(model, cuda_graph=True, **kwargs), GuidedSampler(model, **kwargs)
    for seed, labels in ((0, [0, 3, 1]), (1, [2, 1, 0])):  # the second call replays with new conditioning
        labels = torch.tensor(labels, device=device)
        conditioning = dict(
            cond={"context": one_hot(labels), "extra": {"shift": labels[:, None] / 10}},
            uncond={
                "context": one_hot(torch.full_like(labels[:1], NULL)),
                "extra": {"shift": torch.zeros(1, 1, device=device)},
            },
        )
        run = lambda s: s(
            (3, 3, 8, 8),
            generator=torch.Generator(device).manual_seed(seed),  # noqa: E731
            **conditioning,
        )
        torch.testing.assert_close(run(graphed), run(eager), atol=1e-5, rtol=1e-5)
    assert len(graphed._graphs) == 1


def test_keyword_conditioning_in_another_order_replays_the_same_capture(cpu_graphs):
    model = ContextModel()
    sampler = GuidedSampler(model, sampler="ddim", steps=3, guidance=CFG(2.0), cuda_graph=True)
    context, shift = one_hot(LABELS), LABELS[:, None] / 10
    null = one_hot(torch.full_like(LABELS, NULL))
    for cond, uncond in (
        ({"context": context, "extra": {"shift": shift}}, {"context": null, "extra": {"shift": 0 * shift}}),
        ({"extra": {"shift": shift}, "context": context}, {"extra": {"shift": 0 * shift}, "context": null}),
    ):
        sampler(NOISE.shape, cond=cond, uncond=uncond, noise=NOISE)
    assert len(sampler._graphs) == 1


def test_graph_replays_read_each_runs_conditioning_on_cpu(cpu_graphs):
    _graphed_against_eager("cpu")


@pytest.mark.gpu
def test_cuda_graph_replays_read_each_runs_conditioning():
    _graphed_against_eager("cuda")

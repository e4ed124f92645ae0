"""Guidance as a strategy the loop calls: a new method is one class, and the loop never
asks a guidance its class."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from fastguide import CFG, sample
from fastguide.ops.contract import GuidanceCombine
from fastguide.sampling import guidance as guidance_module
from fastguide.sampling import loop
from fastguide.sampling.guidance import Guidance
from tests.helpers import tiny_cfg_unet


class HalfwayCFG(Guidance):
    """A method written only against the Guidance interface: CFG whose weight is w for the
    noisier half of the calls (σ̃ above 1) and 1 (the conditional prediction) below."""

    branches = ("cond", "uncond")

    def __init__(self, scale: float):
        self.scale = scale

    def scale_at(self, edm_sigma: float, progress: float) -> float:
        return self.scale if edm_sigma > 1.0 else 1.0

    def combine(self, scale: float | None = None) -> GuidanceCombine:
        return GuidanceCombine(self.scale if scale is None else scale)


def test_a_new_guidance_is_one_class():
    model, labels = tiny_cfg_unet(), torch.tensor([1, 2])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    common = dict(labels=labels, sampler="ddim", steps=6, noise=noise)
    got = sample(model, noise.shape, guidance=HalfwayCFG(3.0), **common)
    expected = sample(model, noise.shape, guidance=CFG(3.0, schedule=lambda s: 3.0 if s > 1.0 else 1.0), **common)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_the_loop_never_asks_a_guidance_its_class():
    guidance_classes = {
        name
        for name, value in vars(guidance_module).items()
        if inspect.isclass(value) and value.__module__ == guidance_module.__name__
    }
    tree = ast.parse(inspect.getsource(loop))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "type", "issubclass"):
            named = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not named & guidance_classes, ast.unparse(node)
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "guidance"
        for alias in node.names
    }
    assert imported <= {
        "BRANCHES",
        "ClassifierGuidance",
        "Guidance",
        "default_sampler",
        "parameter_dtype",
        "split_guidance",
    }


def test_a_guidance_subclass_must_say_its_combine():
    class Incomplete(Guidance):
        pass

    with pytest.raises(TypeError, match="combine"):
        Incomplete()

    class NoSchedule(Guidance):
        def combine(self, scale=None):
            return GuidanceCombine(2.0)

    with pytest.raises(NotImplementedError, match="NoSchedule defines no scale_at"):
        NoSchedule().combine_at(1.0, 0.5)


@pytest.mark.parametrize(
    "branches", [("cond", "cond"), ("uncond", "cond"), ("cond", "negative")], ids=["twice", "order", "unknown"]
)
def test_a_guidance_of_ones_own_names_distinct_known_branches(branches):
    # Each name keys its rows' conditioning and block cache: a repeated one would share them.
    class Odd(HalfwayCFG):
        pass

    Odd.branches = branches
    with pytest.raises(ValueError, match=r"Odd.branches must be distinct names from \('cond', 'uncond', 'perturbed'\)"):
        sample(tiny_cfg_unet(), (2, 3, 8, 8), labels=torch.tensor([1, 2]), guidance=Odd(3.0), steps=2)

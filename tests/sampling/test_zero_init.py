"""CFG-Zero*'s zero-init (Fan et al. 2025, §4.2): ``CFG(w, zero_star=True, zero_init_steps=K)``
takes the prediction 0 at the first K model calls and runs no forward there; the other
calls are CFG-Zero*'s guided ones. Checked against diffusers' ClassifierFreeZeroStarGuidance
driving diffusers' schedulers on the same model."""

from __future__ import annotations

import pytest
import torch

from fastguide import (
    CFG,
    CFGPlusPlus,
    ClassifierGuidance,
    FirstBlockCache,
    ForecastCache,
    GuidedSampler,
    NoiseSchedule,
    sample,
)
from tests.helpers import diffusers_feature, tiny_cfg_unet

# the peer: diffusers' guiders arrived in 0.35
diffusers = pytest.importorskip("diffusers")
ClassifierFreeZeroStarGuidance = diffusers_feature("diffusers.guiders", since=(0, 35)).ClassifierFreeZeroStarGuidance
NULL = 3  # the toy model's null label


def toy_model(x, t, y):
    """A smooth class-conditional model of x, t and the label y (NULL: unconditional)."""
    t = t.to(x.dtype).reshape(-1, 1, 1, 1)
    y = y.to(x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(0.7 * x + 0.3) * (0.5 + t / 2000) - 0.3 * x + 0.2 * torch.sin(y + 0.5 * x)


def diffusers_loop(scheduler, guider, x_T, labels):
    """diffusers' guided loop: both predictions, the guider's combine (which zeroes its first
    zero_init_steps), the scheduler's step."""
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    null = torch.full_like(labels, NULL)
    for i, t in enumerate(scheduler.timesteps):
        t_batch = t.reshape(1).expand(len(x))
        guider.set_state(step=i, num_inference_steps=len(scheduler.timesteps), timestep=t)
        pred = guider.forward(toy_model(x, t_batch, labels), toy_model(x, t_batch, null)).pred
        x = scheduler.step(pred, t, x).prev_sample
    return x


@pytest.mark.parametrize("zero_init_steps", [1, 3])
@pytest.mark.parametrize("path", ["flow-euler", "vp-ddim"])
def test_zero_init_matches_diffusers_zero_star_guider(path, zero_init_steps):
    labels = torch.tensor([0, 2, 1])
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    if path == "flow-euler":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        scheduler.set_timesteps(8)
        options = dict(
            sampler="euler", schedule=NoiseSchedule.flow(3.0), prediction_type="flow_prediction", clip_denoised=False
        )
        times = scheduler.timesteps.tolist()
    else:
        scheduler = diffusers.DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True
        )
        scheduler.set_timesteps(8)
        options = dict(sampler="ddim", clip_denoised=False)
        times = [int(t) for t in scheduler.timesteps]
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=zero_init_steps)
    expected = diffusers_loop(scheduler, guider, x_T, labels)
    got = sample(
        toy_model,
        x_T.shape,
        labels=labels,
        null_label=NULL,
        guidance=CFG(4.0, zero_star=True, zero_init_steps=zero_init_steps),
        steps=times,
        noise=x_T,
        **options,
    )
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    # Without zero-init, the first calls are guided and the sample differs.
    plain = sample(
        toy_model,
        x_T.shape,
        labels=labels,
        null_label=NULL,
        guidance=CFG(4.0, zero_star=True),
        steps=times,
        noise=x_T,
        **options,
    )
    assert (plain - got).abs().max() > 1e-3


def test_zero_init_calls_run_no_forward_and_keep_x_on_a_flow_path():
    # A zero velocity leaves x where it is through Euler steps: the sample after the K
    # zeroed calls is x_T itself, and the model sees only the other calls' 2B rows.
    seen = []

    def model(x, t, y):
        seen.append(len(x))
        return toy_model(x, t, y)

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    after = {}
    sample(
        model,
        x_T.shape,
        labels=torch.tensor([1, 0]),
        null_label=NULL,
        guidance=CFG(3.0, zero_star=True, zero_init_steps=2),
        sampler="euler",
        steps=6,
        schedule=NoiseSchedule.flow(),
        prediction_type="flow_prediction",
        noise=x_T,
        callback=lambda info: after.setdefault(info["i"], info["x"].clone()),
    )
    assert seen == [4] * 4
    torch.testing.assert_close(after[1], x_T, atol=1e-6, rtol=0)  # the step's coefficients round
    assert (after[2] - x_T).abs().max() > 1e-3


def test_zero_init_with_a_block_cache_counts_only_the_computed_calls():
    model = tiny_cfg_unet()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    guidance = CFG(3.0, zero_star=True, zero_init_steps=1)

    def run(cache):
        sampler = GuidedSampler(model, guidance=guidance, sampler="ddim", steps=6, cache=cache)
        return sampler(x_T.shape, labels=torch.tensor([0, 1]), noise=x_T), sampler.last_compute

    plain, plain_compute = run(None)
    assert plain_compute["model_rows"] == 2 * 2 * 5  # the zeroed call runs no rows
    # A cache that never reuses changes nothing; its first computed call is call 1.
    never, _ = run(FirstBlockCache(threshold=1e-30))
    assert torch.equal(plain, never)
    # A forecast from call 1 on (warmup 1: call 0 has no forward) computes calls 1, 3, 5.
    forecast, compute = run(ForecastCache(every=2, warmup=1))
    assert compute["model_rows"] == 2 * 2 * 5 and compute["reused_calls"] == 2
    assert torch.isfinite(forecast).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CFG(3.0, zero_init_steps=1), "set zero_star=True"),
        (lambda: CFG(3.0, zero_star=True, zero_init_steps=-1), "zero_init_steps must be an int >= 0"),
        (lambda: CFG(3.0, zero_star=True, zero_init_steps=True), "zero_init_steps must be an int >= 0"),
        (lambda: CFG(3.0, zero_star=True, zero_init_steps=1.0), "zero_init_steps must be an int >= 0"),
        (lambda: CFGPlusPlus(0.5, zero_star=True, zero_init_steps=1), "CFGPlusPlus does not take zero_init_steps"),
    ],
)
def test_bad_zero_init_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_zero_init_is_refused_where_it_cannot_apply():
    x_T = torch.randn(1, 3, 8, 8)
    common = dict(labels=torch.tensor([0]), null_label=NULL, noise=x_T)
    guidance = CFG(3.0, zero_star=True, zero_init_steps=1)
    with pytest.raises(ValueError, match="sampler='ddpm' may read a variance"):
        sample(toy_model, x_T.shape, guidance=guidance, sampler="ddpm", **common)
    # A fixed variance needs no forward: DDPM runs, its zeroed call stepping on ε̂ = 0.
    got = sample(
        toy_model, x_T.shape, guidance=guidance, sampler="ddpm", variance_type="fixed_small", steps=4, **common
    )
    assert torch.isfinite(got).all()
    classifier = ClassifierGuidance(lambda x, t: torch.log_softmax(x.flatten(1)[:, :4], dim=1), 1.0)
    with pytest.raises(ValueError, match="which ClassifierGuidance's gradient would shift"):
        sample(toy_model, x_T.shape, guidance=(guidance, classifier), sampler="ddim", steps=4, **common)
    with pytest.raises(ValueError, match="zeroes every one of the 4 model calls"):
        sample(toy_model, x_T.shape, guidance=CFG(3.0, zero_star=True, zero_init_steps=4), steps=4, **common)

"""Guidance at less than two forwards: truncated CFG, reuse of the guidance delta, and
First-Block Cache, through the sampler. Each: exact where it never fires, its compute
counted exactly, the conditional and unconditional rows kept apart, and captured runs
(the CPU stand-in for CUDA graphs) following the warm-up run's decisions."""

from __future__ import annotations

import pytest
import torch

import fastguide
from fastguide import CFG, DeltaReuse, FirstBlockCache, ForecastCache, GuidedSampler
from fastguide.models import dit
from fastguide.models.block_cache import BlockCacheState
from fastguide.sampling import cuda_graphs
from tests.helpers import randomize, tiny_cfg_unet

SCHEDULE = fastguide.NoiseSchedule.linear()
BATCH = 3


def tiny_dit(depth: int = 4) -> fastguide.DiT:
    return randomize(
        fastguide.DiT(
            input_size=8,
            patch_size=2,
            in_channels=3,
            hidden_size=32,
            depth=depth,
            num_heads=2,
            num_classes=4,
            learn_sigma=False,
        ),
        seed=5,
    ).eval()


def run(model, guidance=None, cache=None, steps=10, sampler="dpm++2m", seed=0, **kwargs):
    sampler = GuidedSampler(
        model, sampler=sampler, steps=steps, schedule=SCHEDULE, guidance=guidance, cache=cache, **kwargs
    )
    noise = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    out = sampler(noise.shape, labels=torch.tensor([0, 1, 3]), noise=noise)
    return out, sampler


class ShiftedLabels(torch.nn.Module):
    """model(x, t, y) = f(x, t) + g(y): c − u = g(y) − g(null) is the same at every call, so
    a reused delta is exact. A DiT-shaped f (so it also has blocks)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_dit()
        self.offsets = torch.nn.Parameter(torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
        self.num_classes = 4

    def forward(self, x, t, y):
        return self.net(x, t, torch.zeros_like(y)) + self.offsets[y]


# ---- exact where nothing fires ------------------------------------------------------------


@pytest.mark.parametrize("model_fn", [tiny_dit, tiny_cfg_unet], ids=["dit", "unet"])
def test_a_cache_that_never_reuses_is_bit_for_bit_plain_cfg(model_fn):
    model = model_fn()
    plain, _ = run(model, CFG(3.0))
    cached, sampler = run(model, CFG(3.0), cache=FirstBlockCache(threshold=1e-30))
    assert torch.equal(plain, cached)
    assert sampler.last_compute["reused_calls"] == 0
    assert not any("forward" in block.__dict__ for block in model.modules())  # removed after the run
    assert "rest" not in model.__dict__


@pytest.mark.parametrize("model_fn", [tiny_dit, tiny_cfg_unet], ids=["dit", "unet"])
def test_a_compiled_model_is_cached_as_the_model_itself(model_fn):
    # torch.compile's wrapper is looked past (its _orig_mod's blocks run): an ADM UNet was
    # refused as "no transformer blocks" when compiled. (backend="eager": dynamo alone)
    model = model_fn()
    expected, plain = run(model, CFG(3.0), cache=FirstBlockCache(threshold=1.0))
    torch._dynamo.reset()
    try:
        got, compiled = run(torch.compile(model, backend="eager"), CFG(3.0), cache=FirstBlockCache(threshold=1.0))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    assert compiled.last_compute == plain.last_compute and plain.last_compute["reused_calls"] > 0


@pytest.mark.parametrize("model_fn", [tiny_dit, tiny_cfg_unet], ids=["dit", "unet"])
def test_a_forecast_whose_warmup_covers_the_loop_is_bit_for_bit_plain_cfg(model_fn):
    model = model_fn()
    plain, _ = run(model, CFG(3.0))
    cached, sampler = run(model, CFG(3.0), cache=ForecastCache(every=2, warmup=10))
    assert torch.equal(plain, cached) and sampler.last_compute["reused_calls"] == 0


def test_truncation_that_never_fires_is_bit_for_bit_plain_cfg():
    model = tiny_dit()
    plain, _ = run(model, CFG(3.0))
    truncated, sampler = run(model, CFG(3.0, truncate=1.0))
    assert sampler.last_compute["truncated_from"] is None
    assert torch.equal(plain, truncated)


@pytest.mark.parametrize("order", [0, 1])
def test_reusing_a_constant_delta_is_plain_cfg(order):
    model = ShiftedLabels()
    plain, _ = run(model, CFG(3.0), null_label=4)
    reused, sampler = run(model, CFG(3.0, reuse=DeltaReuse(every=3, order=order)), null_label=4)
    torch.testing.assert_close(reused, plain, rtol=1e-4, atol=1e-4)
    assert sampler.last_compute["model_rows"] < 2 * BATCH * sampler.num_calls


@pytest.mark.parametrize("sampler", ["dpm++2m", "heun"])
def test_an_order_1_delta_is_extrapolated_in_the_step_index(sampler):
    # heun calls the network twice at one t, at one step index: in the call index its calls
    # are not evenly spaced, and the estimate was half a step off; where the last two
    # computed deltas share a step index, the last one alone
    guided = GuidedSampler(
        tiny_dit(), sampler=sampler, steps=6, schedule=SCHEDULE, guidance=CFG(3.0, reuse=DeltaReuse(every=2, order=1))
    )
    calls = guided._calls(False)
    positions = {call.t: call.position for call in calls}
    assert sorted(positions.values()) == list(range(len(positions)))
    ring: dict[int, int] = {}  # slot -> the step index of the delta it holds
    checked = 0
    for call in calls:
        if call.delta_in:
            (newest, weight), *older = call.delta_in
            if older:
                (oldest, oldest_weight) = older[0]
                p_a, p_b = ring[newest], ring[oldest]
                slope = (call.position - p_a) / (p_a - p_b)
                assert weight == pytest.approx(1 + slope) and oldest_weight == pytest.approx(-slope)
                checked += 1
            else:
                assert weight == 1.0
        if call.delta_out is not None:
            ring[call.delta_out] = call.position
    assert checked >= 1


def test_reusing_a_constant_delta_keeps_the_unguided_channels_conditional():
    # guided_channels = 2 of 3: the third channel takes c alone, on the calls that run u
    # and on those that estimate it (c − Δ, Δ = 0 there).
    model = ShiftedLabels()
    plain, _ = run(model, CFG(3.0, guided_channels=2), null_label=4)
    reused, sampler = run(model, CFG(3.0, guided_channels=2, reuse=DeltaReuse(every=3)), null_label=4)
    torch.testing.assert_close(reused, plain, rtol=1e-4, atol=1e-4)
    assert sampler.last_compute["model_rows"] < 2 * BATCH * sampler.num_calls
    unguided, _ = run(model, CFG(3.0), null_label=4)
    assert not torch.allclose(plain, unguided, rtol=1e-3, atol=1e-3)  # the channel setting matters here


# ---- the compute, counted exactly ---------------------------------------------------------


def test_delta_reuse_runs_the_unconditional_rows_at_every_kth_guided_call():
    model = tiny_dit()
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    _, sampler = run(model, CFG(3.0, reuse=DeltaReuse(every=3)), steps=10)
    assert rows == [2 * BATCH if i % 3 == 0 else BATCH for i in range(sampler.num_calls)]
    assert sampler.last_compute["model_rows"] == sum(rows)


def test_delta_reuse_counts_guided_calls_inside_an_interval():
    model = tiny_dit()
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    interval = (0.5, 5.0)
    _, sampler = run(model, CFG(3.0, interval=interval, reuse=DeltaReuse(every=2)), steps=12)
    guided = [interval[0] < SCHEDULE.edm_sigma(t) <= interval[1] for t in sampler.timesteps]
    expected, j = [], 0
    for inside in guided:
        expected.append((2 * BATCH if j % 2 == 0 else BATCH) if inside else BATCH)
        j += inside
    assert 0 < sum(guided) < len(guided)
    assert rows == expected


def test_the_guidance_interval_is_half_open_as_in_the_paper():
    # Kynkäänniemi et al. guide σ̃ in (σ_lo, σ_hi]: a call at σ_lo itself is unguided
    probe = GuidedSampler(tiny_dit(), sampler="ddim", steps=6, schedule=SCHEDULE)
    sigmas = [SCHEDULE.edm_sigma(t) for t in probe.timesteps]
    rows = []
    model = tiny_dit()
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    run(model, CFG(3.0, interval=(sigmas[3], sigmas[1])), steps=6, sampler="ddim")
    assert rows == [2 * BATCH if i in (1, 2) else BATCH for i in range(6)]
    rows.clear()
    run(model, CFG(3.0, interval=(sigmas[3], float("inf"))), steps=6, sampler="ddim")
    assert rows == [2 * BATCH if i < 3 else BATCH for i in range(6)]


@pytest.mark.parametrize(
    "guidance, sampler",
    [
        (CFG(3.0, reuse=DeltaReuse(every=2, order=1)), "ddpm"),  # a learned-variance model, noise drawn
        (fastguide.CFGPlusPlus(0.6, reuse=DeltaReuse(every=2)), "dpm++2m"),  # its history holds the estimated u's x0
        (CFG(3.0, reuse=DeltaReuse(every=2), apg=fastguide.APG(momentum=-0.5)), "unipc"),
    ],
    ids=["learned-variance", "cfg++", "apg-momentum"],
)
def test_delta_reuse_runs_with_the_other_guidance_options(guidance, sampler):
    model = tiny_cfg_unet()
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    out, sampler = run(model, guidance, sampler=sampler, steps=6)
    assert torch.isfinite(out).all()
    assert rows == [2 * BATCH if i % 2 == 0 else BATCH for i in range(sampler.num_calls)]


def test_truncation_runs_b_rows_from_the_call_after_it_fires():
    model = tiny_dit()
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    _, sampler = run(model, CFG(3.0, truncate=-0.99))  # any similarity reaches it at the first call
    assert sampler.last_compute["truncated_from"] == 1
    assert rows == [2 * BATCH] + [BATCH] * (sampler.num_calls - 1)
    # reached at the last call, it has no later call to stop guiding: it did not fire
    rows.clear()
    _, sampler = run(model, CFG(3.0, truncate=-0.99), steps=1)
    assert sampler.last_compute["truncated_from"] is None and rows == [2 * BATCH]


def test_a_nan_in_the_first_blocks_residual_makes_the_call_compute():
    # no threshold passes a NaN change: a NaN residual (or reference) must not read as
    # "unchanged", which would reuse a stale residual for the rest of the run
    from fastguide.models.block_cache import _relative_change

    one, nan, inf = torch.ones(4), torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.tensor([1.0, float("inf"), 1, 1])
    for residual, reference in ((nan, one), (one, nan), (inf, inf)):
        assert not bool(_relative_change(residual, reference) < float("inf"))  # NaN or inf: computes
    assert _relative_change(one, one) == 0 and _relative_change(torch.zeros(4), torch.zeros(4)) == 0
    assert _relative_change(one, torch.zeros(4)).isinf() and _relative_change(2 * one, one) == 1


def test_truncated_calls_are_unguided():
    """After truncation the sampler steps on the conditional prediction alone: the same as
    plain CFG for the first call, then CFG at scale 1 from the second."""
    model = tiny_dit()
    truncated, _ = run(model, CFG(3.0, truncate=-0.99))
    first_guided = CFG(3.0, interval=(SCHEDULE.edm_sigma(SCHEDULE.spaced_timesteps(10, "logsnr")[0]) * 0.999, 1e9))
    expected, _ = run(model, first_guided)
    torch.testing.assert_close(truncated, expected, rtol=0, atol=0)


def test_block_cache_counts_the_blocks_it_evaluates(monkeypatch):
    model = tiny_dit(depth=4)
    evaluated = []
    forward = dit.DiTBlock.forward
    monkeypatch.setattr(dit.DiTBlock, "forward", lambda self, h, c: evaluated.append(h.shape[0]) or forward(self, h, c))
    _, sampler = run(model, CFG(3.0), cache=FirstBlockCache(threshold=1.0), steps=12)
    compute = sampler.last_compute
    assert 0 < compute["reused_calls"] < sampler.num_calls
    assert compute["block_rows"] == sum(evaluated)
    assert compute["block_rows"] == 2 * BATCH * (4 * sampler.num_calls - 3 * compute["reused_calls"])


def test_forecast_cache_skips_every_block_on_its_schedule(monkeypatch):
    model = tiny_dit(depth=4)
    evaluated = []
    forward = dit.DiTBlock.forward
    monkeypatch.setattr(dit.DiTBlock, "forward", lambda self, h, c: evaluated.append(h.shape[0]) or forward(self, h, c))
    cache = ForecastCache(every=3, warmup=2)
    _, sampler = run(model, CFG(3.0), cache=cache, steps=12)
    forecast = [cache.forecasts(i) for i in range(sampler.num_calls)]
    assert forecast == [False, False, False, True, True, False, True, True, False, True, True, False]
    assert sampler.last_compute["reused_calls"] == sum(forecast)
    assert sum(evaluated) == sampler.last_compute["block_rows"] == 2 * BATCH * 4 * (12 - sum(forecast))


def test_a_block_cache_state_decides_by_a_threshold_or_a_schedule_never_both():
    for settings in ({}, dict(threshold=0.1, schedule=lambda call: True)):
        with pytest.raises(ValueError, match="exactly one"):
            BlockCacheState(blocks=3, first_blocks=1, **settings)


@pytest.mark.parametrize(
    "positions",
    [{}, {0: 0, 2: 1, 5: 3}, {0: 1, 2: 1, 5: 2}],
    ids=["no positions: the call index", "step indices", "two calls at one step"],
)
def test_an_extrapolated_residual_is_linear_in_the_step_index(positions):
    """order 1: R̂ at call i = R_a + (p_i − p_a)/(p_a − p_b)·(R_a − R_b), a > b the last two
    computed calls (R_a alone where p_a = p_b, as heun's two calls at one t)."""
    state = BlockCacheState(blocks=3, first_blocks=0, order=1, schedule=lambda call: call == 5)
    state.positions.update(positions)
    h = torch.randn(2, 4)
    residuals = {0: torch.randn(2, 4), 2: torch.randn(2, 4)}
    for call, residual in residuals.items():
        state.call = call
        state.decide(h, h)
        assert not state.reusing
        state.computed(h + residual)
    state.call = 5
    state.decide(h, h)
    assert state.reusing
    p = {call: positions.get(call, call) for call in (0, 2, 5)}
    slope = 0.0 if p[2] == p[0] else (p[5] - p[2]) / (p[2] - p[0])
    expected = h + residuals[2] + slope * (residuals[2] - residuals[0])
    torch.testing.assert_close(state.reused(h), expected)


@pytest.mark.parametrize("sampler, shared", [("dpm++2m", False), ("heun", True)])
def test_the_loop_tells_the_cache_each_calls_step_index(monkeypatch, sampler, shared):
    # heun calls the network twice at one t, which share a step index; a one-call sampler's
    # step index is its call index
    states = []
    original = BlockCacheState.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        states.append(self)

    monkeypatch.setattr(BlockCacheState, "__init__", recording)
    _, guided = run(tiny_dit(), CFG(3.0), cache=ForecastCache(every=2, order=1), sampler=sampler, steps=4)
    (state,) = states
    calls = guided._calls(False)
    assert state.positions == {i: call.position for i, call in enumerate(calls)}
    ts = [call.t for call in calls]
    assert all(
        (ts[i] == ts[j]) == (state.positions[i] == state.positions[j]) for i in range(len(ts)) for j in range(len(ts))
    )
    assert (len(set(state.positions.values())) < len(calls)) == shared
    assert sorted(state.positions.values()) == list(state.positions.values())


# ---- conditional and unconditional caches kept apart ---------------------------------------


def test_each_branch_keeps_and_reuses_its_own_residual():
    """The unconditional rows compare against, and reuse, the unconditional rows of their
    own last computed call, also across a call that ran the conditional rows alone."""
    state = BlockCacheState(threshold=0.1, blocks=4, first_blocks=1)
    h0 = torch.randn(4, 5)
    r_c, r_u = torch.randn(2, 5), 10 * torch.randn(2, 5)
    R_c, R_u = torch.randn(2, 5), torch.randn(2, 5)

    def forward(call, branches, residual, rest_residual=None):
        state.call, state.branches = call, branches
        rows = len(branches) * 2
        h1 = h0[:rows] + residual
        state.decide(h0[:rows], h1)
        if state.reusing:
            return state.reused(h1)
        state.computed(h1 + rest_residual)
        return h1 + rest_residual

    forward(0, ("cond", "uncond"), torch.cat([r_c, r_u]), torch.cat([R_c, R_u]))
    forward(1, ("cond",), r_c * 1.5, R_c)  # the conditional rows change: computed, cond caches refreshed
    assert not state.recorded[1]
    # Call 2: cond as at call 1, uncond as at call 0: both unchanged against their own references.
    out = forward(2, ("cond", "uncond"), torch.cat([r_c * 1.5, r_u]))
    assert state.recorded[2]
    h1 = h0 + torch.cat([r_c * 1.5, r_u])
    torch.testing.assert_close(out, h1 + torch.cat([R_c, R_u]))
    # Had the branches shared one cache, the uncond rows (10x the cond residual) would differ.
    assert (r_u - r_c * 1.5).abs().mean() > 0.1 * (r_c * 1.5).abs().mean()


# ---- captured runs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guidance, cache",
    [
        (CFG(3.0, truncate=0.0), None),
        (CFG(3.0, reuse=DeltaReuse(every=2, order=1)), None),
        (CFG(3.0), FirstBlockCache(threshold=1.0)),
        (CFG(3.0, reuse=DeltaReuse(every=4, order=1)), ForecastCache(every=2)),
        # order 1 with the unconditional rows every 3rd call: a branch's first reuse follows its
        # first computed call, which must not extrapolate through the previous run's residuals
        (CFG(3.0, reuse=DeltaReuse(every=3)), FirstBlockCache(threshold=1.1, order=1)),
    ],
    ids=["truncate", "delta-reuse", "first-block-cache", "forecast-with-delta-reuse", "order-1-with-delta-reuse"],
)
def test_graph_replays_follow_the_warm_up_runs_decisions(cpu_graphs, guidance, cache):
    model = tiny_dit()
    eager, eager_sampler = run(model, guidance, cache=cache)
    graphed = GuidedSampler(
        model, sampler="dpm++2m", steps=10, schedule=SCHEDULE, guidance=guidance, cache=cache, cuda_graph=True
    )
    noise = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 3])
    first = graphed(noise.shape, labels=labels, noise=noise)
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    assert graphed.last_compute == eager_sampler.last_compute
    # Another x_T replays the same decisions (no host read inside a captured run).
    other = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    graphed(noise.shape, labels=labels, noise=other)
    assert graphed.last_compute == eager_sampler.last_compute
    assert len(cpu_graphs) >= 1


@pytest.mark.parametrize("inside", [True, False], ids=["noise-inside", "noise-on-host"])
def test_a_stochastic_graphed_run_decides_on_the_callers_noise(cpu_graphs, monkeypatch, inside):
    # The warm-up run, whose decisions the graphs keep, draws what an eager run with the
    # caller's generator draws: truncated CFG stops at the same call as eager sampling.
    monkeypatch.setattr(cuda_graphs, "GRAPH_SAFE_GENERATORS", inside)
    model, labels = tiny_dit(), torch.tensor([0, 1, 3])
    kwargs = dict(sampler="ddpm", steps=10, schedule=SCHEDULE, guidance=CFG(3.0, truncate=0.995))
    eager, graphed = GuidedSampler(model, **kwargs), GuidedSampler(model, cuda_graph=True, **kwargs)
    generators = [torch.Generator().manual_seed(0) for _ in range(2)]
    results = [s((BATCH, 3, 8, 8), labels=labels, generator=g) for s, g in zip((eager, graphed), generators)]
    assert eager.last_compute["truncated_from"] not in (None, 0, eager.num_calls)
    assert graphed.last_compute == eager.last_compute
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(generators[0].get_state(), generators[1].get_state())


def test_a_truncated_graphed_run_launches_only_the_step_variants_its_warm_up_ran(cpu_graphs, monkeypatch):
    # A kernel variant first launched inside a capture compiles and loads its module there,
    # which the warm-up is for. The captured guided calls compute the similarity too (unread).
    variants = []
    step = GuidedSampler._step
    monkeypatch.setattr(
        GuidedSampler,
        "_step",
        staticmethod(lambda t, s, c: variants.append((c is None, t.similarity is None)) or step(t, s, c)),
    )
    guidance = CFG(3.0, truncate=0.995)
    sampler = GuidedSampler(tiny_dit(), sampler="ddim", steps=10, schedule=SCHEDULE, guidance=guidance, cuda_graph=True)
    sampler((BATCH, 3, 8, 8), labels=torch.tensor([0, 1, 3]), generator=torch.Generator().manual_seed(0))
    warm_up, replay = variants[: len(variants) // 2], variants[len(variants) // 2 :]
    assert sampler.last_compute["truncated_from"] not in (None, 0, sampler.num_calls)
    assert replay == warm_up


def test_a_callbacks_own_forward_does_not_touch_the_cache():
    model = tiny_dit()
    plain, plain_sampler = run(model, CFG(3.0), cache=FirstBlockCache(threshold=1.0))
    peeks = []
    sampler = GuidedSampler(
        model, sampler="dpm++2m", steps=10, schedule=SCHEDULE, guidance=CFG(3.0), cache=FirstBlockCache(threshold=1.0)
    )
    noise = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 3])
    out = sampler(
        noise.shape,
        labels=labels,
        noise=noise,
        callback=lambda d: peeks.append(model(d["x"], torch.full((BATCH,), d["t"]), labels)),
    )
    assert len(peeks) == sampler.num_calls  # an odd batch: no "2 equal row blocks" error
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert sampler.last_compute == plain_sampler.last_compute


def test_a_cache_reaches_a_dit_wrapped_as_a_sit_velocity():
    sit = tiny_dit()
    wrapped = fastguide.SiTVelocity(sit)
    flow = dict(
        sampler="euler",
        steps=6,
        schedule=fastguide.NoiseSchedule.flow(),
        prediction_type="flow_prediction",
        guidance=CFG(2.0),
        null_label=4,
    )
    noise = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    plain = fastguide.sample(wrapped, noise.shape, noise=noise, labels=torch.tensor([0, 1, 3]), **flow)
    sampler = GuidedSampler(wrapped, cache=ForecastCache(every=2), **flow)
    cached = sampler(noise.shape, noise=noise, labels=torch.tensor([0, 1, 3]))
    assert sampler.last_compute["reused_calls"] > 0 and not torch.equal(plain, cached)


def test_autoguidance_counts_its_guide_networks_rows():
    guide = tiny_dit()
    _, sampler = run(tiny_dit(), fastguide.AutoGuidance(guide, 2.0), steps=6)
    assert sampler.last_compute["model_rows"] == sampler.last_compute["guide_rows"] == BATCH * sampler.num_calls


# ---- bad settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: CFG(3.0, truncate=1.5), ValueError, "truncate must be a cosine similarity"),
        (lambda: CFG(3.0, truncate=float("nan")), ValueError, "truncate must be a finite number"),
        (lambda: CFG(3.0, reuse=2), TypeError, "reuse must be a fastguide.DeltaReuse"),
        (lambda: DeltaReuse(every=1), ValueError, "every must be an int >= 2"),
        (lambda: DeltaReuse(order=2), ValueError, "order must be 0"),
        (lambda: fastguide.CFGPlusPlus(0.5, truncate=0.9), ValueError, "CFGPlusPlus does not take truncate"),
        (lambda: DeltaReuse(order=1.0), ValueError, "order must be 0"),
        (
            lambda: GuidedSampler(tiny_dit(), sampler="heun", guidance=CFG(3.0, truncate=0.9)),
            ValueError,
            "two model calls per step",
        ),
        (lambda: FirstBlockCache(threshold=0), ValueError, "threshold must be a finite number > 0"),
        (lambda: FirstBlockCache(order=2), ValueError, "order must be 0"),
        (lambda: ForecastCache(every=1), ValueError, "every must be an int >= 2"),
        (lambda: ForecastCache(warmup=0), ValueError, "warmup must be an int >= 1"),
        (lambda: GuidedSampler(tiny_dit(), cache=0.1), TypeError, "cache must be a fastguide.FirstBlockCache"),
    ],
)
def test_bad_settings_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_numpy_scalars_are_taken_as_python_numbers():
    import numpy as np

    settings = [
        (FirstBlockCache(np.float32(0.1), order=np.int64(1)), dict(threshold=0.10000000149011612, order=1)),
        (ForecastCache(every=np.int64(3), warmup=np.int32(2)), dict(every=3, warmup=2)),
        (DeltaReuse(every=np.int64(2), order=np.int64(1)), dict(every=2, order=1)),
    ]
    for made, expected in settings:
        for name, value in expected.items():
            assert getattr(made, name) == value and type(getattr(made, name)) is type(value)


def test_a_state_is_taken_only_by_the_settings_and_model_it_was_made_for():
    model = tiny_dit()
    with FirstBlockCache(threshold=0.5).install(model) as handle:
        state = handle.state
    with FirstBlockCache(threshold=0.5).install(model, state) as handle:  # equal settings: its buffers kept
        assert handle.state is state
    for settings, other in (
        (FirstBlockCache(threshold=10.0), model),  # another threshold
        (FirstBlockCache(threshold=0.5, order=1), model),
        (ForecastCache(every=2), model),  # a schedule's wrappers on a threshold's state
        (FirstBlockCache(threshold=0.5), tiny_dit(depth=6)),  # other block counts
    ):
        with pytest.raises(ValueError, match="state: a BlockCacheState made for"):
            settings.install(other, state)
        assert not any("forward" in block.__dict__ for block in other.modules())
    with ForecastCache(every=3).install(model) as handle:
        forecast = handle.state
    with pytest.raises(ValueError, match="state: a BlockCacheState made for"):
        ForecastCache(every=2).install(model, forecast)
    ForecastCache(every=3).install(model, forecast).remove()


def test_a_model_a_cache_cannot_install_on_is_refused_when_the_sampler_is_built():
    # It was refused at the first run, which had drawn x_T from the caller's generator by then
    with pytest.raises(ValueError, match="no transformer blocks: FirstBlockCache"):
        GuidedSampler(torch.nn.Identity(), steps=4, schedule=SCHEDULE, cache=FirstBlockCache())
    model = torch.nn.Identity()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(TypeError, match="cache: FirstBlockCache caches a torch.nn.Module's blocks, got function"):
        fastguide.sample(lambda x, t: model(x), (1, 3, 8, 8), cache=FirstBlockCache(), generator=generator)
    assert torch.equal(generator.get_state(), state)


def test_a_unet_without_a_full_resolution_residual_block_is_refused():
    """num_res_blocks=0: the UNet's second input block downsamples (or is absent), so no
    residual of h₁'s shape exists for the cache to keep."""
    for channel_mult in ((1, 2), (1,)):
        unet = fastguide.UNet(
            image_size=8,
            in_channels=3,
            model_channels=32,
            out_channels=3,
            num_res_blocks=0,
            attention_resolutions=(),
            channel_mult=channel_mult,
            num_classes=4,
            null_class=True,
        )
        for cache in (FirstBlockCache(), ForecastCache()):
            with pytest.raises(ValueError, match="num_res_blocks=0"):
                GuidedSampler(unet, steps=4, schedule=SCHEDULE, guidance=CFG(3.0), cache=cache)


class TupleBlocks(torch.nn.Module):
    """Blocks that return (context, hidden states), as Flux's do: the cache cannot tell
    which output is the hidden states."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, hidden_states, context):
            return context, hidden_states + self.linear(hidden_states)

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(self.Block() for _ in range(3))

    def forward(self, x, t):
        h, context = x.reshape(x.shape[0], -1, 8), torch.zeros(x.shape[0], 1, 8)
        for block in self.blocks:
            context, h = block(h, context)
        return h.reshape(x.shape)


@pytest.mark.parametrize("cache", [FirstBlockCache(), ForecastCache()], ids=["first-block", "forecast"])
def test_blocks_that_return_a_tuple_are_refused_by_name(cache):
    sampler = GuidedSampler(TupleBlocks(), steps=4, schedule=SCHEDULE, cache=cache)
    with pytest.raises(TypeError, match="Block returned tuple: a block cache takes blocks"):
        sampler((1, 2, 4, 4))


class KeywordBlocks(torch.nn.Module):
    """Blocks called with keywords, the hidden states not first: block(c=..., x=h). Keeps
    the hidden states each call gives its first block."""

    class Block(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.linear = randomize(torch.nn.Linear(8, 8), seed=seed)

        def forward(self, x, c):
            return x + torch.tanh(self.linear(x) + c)

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(self.Block(seed) for seed in range(4))
        self.first_inputs: list[torch.Tensor] = []

    def forward(self, x, t):
        h = x.reshape(x.shape[0], -1, 8)
        c = torch.ones_like(h) * t.float().reshape(-1, 1, 1) / 1000  # h's shape: only identity tells them apart
        self.first_inputs.append(h)
        for block in self.blocks:
            h = block(c=c, x=h)
        return h.reshape(x.shape)


def test_the_first_blocks_input_is_its_hidden_states_whatever_the_argument_order():
    model = KeywordBlocks()
    seen = []
    state_decide = BlockCacheState.decide

    def decide(self, h0, h1):
        seen.append(h0)
        return state_decide(self, h0, h1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockCacheState, "decide", decide)
        GuidedSampler(model, steps=3, schedule=SCHEDULE, cache=FirstBlockCache())((2, 2, 4, 4))
    assert len(seen) == len(model.first_inputs) == 3
    assert all(h0 is h for h0, h in zip(seen, model.first_inputs))


def test_rows_whose_first_block_is_skipped_leave_the_decision_to_the_others():
    """Skip-layer guidance on block 0: the perturbed rows' first residual is 0 at every call,
    which says nothing changed; the conditional rows decide, and the cache still reuses."""
    guidance = fastguide.SkipLayerGuidance(2.0, layers=[0])
    _, sampler = run(tiny_dit(), guidance, FirstBlockCache(threshold=1.0))
    assert sampler.last_compute["reused_calls"] > 0
    state = BlockCacheState(threshold=0.5, blocks=4, first_blocks=1)
    h0 = torch.randn(4, 5)
    for call, scale in enumerate((1.0, 1.01)):  # cond rows barely change, perturbed rows are h0
        state.call, state.branches = call, ("cond", "perturbed")
        h1 = torch.cat([h0[:2] + scale, h0[2:]])
        state.decide(h0, h1)
        if not state.reusing:
            state.computed(h1 + 1)
    assert state.recorded == {0: False, 1: True}


# ---- diffusers' UNet2DConditionModel ------------------------------------------------------


class TextUNet(torch.nn.Module):
    """A tiny SD-style UNet2DConditionModel (random weights) as a fastguide model of
    ``encoder_hidden_states``; block caches reach it through ``perturbation_target``."""

    def __init__(self):
        super().__init__()
        diffusers = pytest.importorskip("diffusers")
        self.unet = randomize(
            diffusers.UNet2DConditionModel(
                sample_size=8,
                in_channels=3,
                out_channels=3,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=16,
                norm_num_groups=8,
                attention_head_dim=8,
            ),
            seed=6,
        ).eval()

    @property
    def perturbation_target(self) -> torch.nn.Module:
        return self.unet

    def forward(self, x, t, encoder_hidden_states):
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def run_text(model, cache=None, steps=8):
    prompts = torch.randn(2, BATCH, 5, 16, generator=torch.Generator().manual_seed(7))
    sampler = GuidedSampler(model, sampler="dpm++2m", steps=steps, schedule=SCHEDULE, guidance=CFG(3.0), cache=cache)
    noise = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(8))
    out = sampler(
        noise.shape,
        noise=noise,
        cond={"encoder_hidden_states": prompts[0]},
        uncond={"encoder_hidden_states": prompts[1]},
    )
    return out, sampler


@pytest.mark.parametrize("cache", [FirstBlockCache(threshold=1e-30), ForecastCache(every=2, warmup=20)], ids=str)
def test_a_diffusers_unet_cache_that_never_reuses_is_bit_for_bit_plain_cfg(cache):
    model = TextUNet()
    plain, _ = run_text(model)
    cached, sampler = run_text(model, cache=cache)
    assert torch.equal(plain, cached) and sampler.last_compute["reused_calls"] == 0
    assert not any("forward" in module.__dict__ for module in model.modules())  # removed after the run


@pytest.mark.parametrize("cache", [FirstBlockCache(threshold=10.0), ForecastCache(every=2, warmup=2)], ids=str)
def test_a_diffusers_unet_reuse_skips_every_block_after_the_first_and_counts_them(cache):
    model = TextUNet()
    ran = {"down_blocks.0": [], "mid_block": [], "up_blocks.1": []}  # counted by a resnet inside each
    for name in ran:
        model.unet.get_submodule(f"{name}.resnets.0").register_forward_hook(
            lambda module, args, out, name=name: ran[name].append(1)
        )
    plain, _ = run_text(model)
    ran = {name: calls.clear() or calls for name, calls in ran.items()}
    cached, sampler = run_text(model, cache=cache)
    calls, reused = sampler.num_calls, sampler.last_compute["reused_calls"]
    assert 0 < reused < calls
    assert len(ran["mid_block"]) == len(ran["up_blocks.1"]) == calls - reused
    first_runs = calls if isinstance(cache, FirstBlockCache) else calls - reused
    assert len(ran["down_blocks.0"]) == first_runs
    blocks = 2 + 1 + 2
    first = 1 if isinstance(cache, FirstBlockCache) else 0
    assert sampler.last_compute["block_rows"] == 2 * BATCH * ((calls - reused) * blocks + reused * first)
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    # what a reused call takes is the computed calls' output features, not noise: the samples stay near
    assert (cached - plain).abs().mean() < plain.abs().mean()


def test_a_reused_diffusers_unet_call_returns_the_computed_output_for_the_same_input():
    """R = (last up block's output) − conv_in's output: reusing it on the same input gives the
    computed output back, up to the rounding of adding and subtracting h₀."""
    unet = TextUNet().unet
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9)), torch.tensor([500, 500])
    context = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(10))
    with FirstBlockCache(threshold=0.01).install(unet) as handle, torch.no_grad():
        state = handle.state
        state.active = True
        outputs = []
        for call in range(2):
            state.call = call
            outputs.append(unet(x, t, encoder_hidden_states=context, return_dict=False)[0])
        assert state.recorded == {0: False, 1: True}
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context, return_dict=False)[0], outputs[0])


@pytest.mark.parametrize("cache", [FirstBlockCache(threshold=0.3, order=1), ForecastCache(every=2)], ids=str)
def test_graph_replays_of_a_diffusers_unet_follow_the_warm_up_runs_decisions(cpu_graphs, cache):
    model = TextUNet()
    eager, eager_sampler = run_text(model, cache=cache)
    assert 0 < eager_sampler.last_compute["reused_calls"] < eager_sampler.num_calls
    prompts = torch.randn(2, BATCH, 5, 16, generator=torch.Generator().manual_seed(7))
    conditioning = dict(cond={"encoder_hidden_states": prompts[0]}, uncond={"encoder_hidden_states": prompts[1]})
    graphed = GuidedSampler(
        model, sampler="dpm++2m", steps=8, schedule=SCHEDULE, guidance=CFG(3.0), cache=cache, cuda_graph=True
    )
    noise = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(graphed(noise.shape, noise=noise, **conditioning), eager, rtol=1e-5, atol=1e-5)
    other = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(9))
    graphed(noise.shape, noise=other, **conditioning)  # another x_T replays the same decisions
    assert graphed.last_compute == eager_sampler.last_compute and len(cpu_graphs) >= 1


def test_an_order_1_cache_extrapolates_only_from_residuals_of_the_batch_it_runs():
    """A state driven by hand across batch sizes (the sampling loop begins a run for each):
    after one computed call of a new batch, the other batch's residual is dropped rather
    than broadcast into the extrapolation."""
    state = BlockCacheState(threshold=0.5, blocks=4, first_blocks=1, order=1)

    def forward(call, h0, residual, rest_residual=None):
        state.call = call
        h1 = h0 + residual
        state.decide(h0, h1)
        if state.reusing:
            return state.reused(h1)
        state.computed(h1 + rest_residual)
        return h1 + rest_residual

    one, two = torch.randn(1, 3), torch.randn(2, 3)
    forward(0, torch.zeros(1, 3), one, torch.randn(1, 3))
    forward(1, torch.zeros(1, 3), 2 * one, torch.randn(1, 3))
    R = torch.randn(2, 3)
    forward(2, torch.zeros(2, 3), two, R)  # the new batch: computed (no reference of its shape)
    out = forward(3, torch.zeros(2, 3), two)  # its first block unchanged: reused
    assert state.recorded[3]
    torch.testing.assert_close(out, two + R)  # its own R alone (one computed call of this batch)


def test_a_fixed_schedule_reuses_no_residual_of_another_batch():
    """schedule= decides without comparing residuals: a call of a new batch size computes
    even where the schedule says reuse, rather than adding the other batch's R."""
    state = BlockCacheState(blocks=3, first_blocks=0, schedule=lambda call: call > 0)
    state.call = 0
    h = torch.randn(1, 4)
    state.decide(h, h)
    state.computed(h + torch.randn(1, 4))
    state.call = 1
    state.decide(torch.randn(2, 4), torch.randn(2, 4))
    assert not state.reusing

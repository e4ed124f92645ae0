"""Timestep respacing against guided-diffusion's ``space_timesteps``, written out below from
its source (guided_diffusion/respace.py) as the reference. ADM returns a set; fastguide
lists the same timesteps in descending order (the order they are visited)."""

import math
import re

import numpy as np
import pytest
import torch

import fastguide.sampling.solvers
from fastguide import NoiseSchedule
from fastguide.ops.contract import PREDICTION_TYPES
from fastguide.sampling.schedule import FlowSchedule

SCHEDULE = NoiseSchedule.linear()


def adm_space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """guided-diffusion's space_timesteps, statement for statement."""
    if section_counts.startswith("ddim"):
        desired_count = int(section_counts[len("ddim") :])
        for i in range(1, num_timesteps):
            if len(range(0, num_timesteps, i)) == desired_count:
                return set(range(0, num_timesteps, i))
        raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
    counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def descending(steps: set[int]) -> list[int]:
    return sorted(steps, reverse=True)


def test_every_count_matches_adm():
    wrong = [n for n in range(1, 1001) if SCHEDULE.timesteps(n) != descending(adm_space_timesteps(1000, str(n)))]
    assert wrong == []


def test_every_ddim_count_matches_adm_or_is_refused_where_adm_refuses():
    refused, wrong = [], []
    for n in range(1, 1001):
        try:
            expected = descending(adm_space_timesteps(1000, f"ddim{n}"))
        except ValueError:
            refused.append(n)
            with pytest.raises(ValueError, match=f"exactly {n} DDIM steps"):
                SCHEDULE.timesteps(f"ddim{n}")
            continue
        if SCHEDULE.timesteps(f"ddim{n}") != expected:
            wrong.append(n)
    assert wrong == []
    assert 1 in refused and 25 not in refused and 1000 not in refused


def test_the_comparison_covers_the_half_way_cases():
    """Where i·999/(N−1) is k + ½, rounding the product (half to even) and rounding ADM's
    running sum disagree for hundreds of N; the tests above would catch either."""

    def product_grid(n):
        return descending({round(i * 999 / (n - 1)) for i in range(n)})

    disagree = [n for n in range(2, 1001) if product_grid(n) != descending(adm_space_timesteps(1000, str(n)))]
    assert len(disagree) > 200 and 21 in disagree
    assert 499 in SCHEDULE.timesteps(21) and 500 not in SCHEDULE.timesteps(21)  # 10·999/20 = 499.5
    assert 500 in SCHEDULE.timesteps(31) and 499 not in SCHEDULE.timesteps(31)  # 15·999/30 = 499.5


def test_one_step_is_adms_first_timestep():
    assert SCHEDULE.timesteps(1) == descending(adm_space_timesteps(1000, "1")) == [0]


@pytest.mark.parametrize("total", [50, 4000])
def test_other_schedule_lengths_match_adm(total):
    schedule = NoiseSchedule.linear(total)
    counts = {1, 2, 3, total // 3, total // 2 + 1, total - 1, total} | set(range(5, total + 1, max(total // 97, 1)))
    wrong = [n for n in sorted(counts) if schedule.timesteps(n) != descending(adm_space_timesteps(total, str(n)))]
    assert wrong == []


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
# 27 (linspace), 48 and 96 (trailing): counts where torch's linspace or a product in place
# of numpy's arange rounded a timestep the other way
@pytest.mark.parametrize("steps", [1, 7, 25, 27, 48, 50, 96, 333])
def test_diffusers_spacings_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", timestep_spacing=spacing, steps_offset=0
    )
    scheduler.set_timesteps(steps)
    assert NoiseSchedule.linear().spaced_timesteps(steps, spacing) == scheduler.timesteps.tolist()


def test_logsnr_and_karras_spacings_follow_their_grids():
    schedule = NoiseSchedule.linear()
    log_snr = [schedule.log_snr(t) for t in schedule.spaced_timesteps(20, "logsnr")]
    gaps = [b - a for a, b in zip(log_snr, log_snr[1:])]
    assert len(set(schedule.spaced_timesteps(20, "logsnr"))) == 20
    assert max(gaps) < 1.5 * min(gaps)  # uniform in λ up to the integer grid
    rho = 7.0
    sigmas = [schedule.edm_sigma(t) for t in schedule.spaced_timesteps(12, "karras", rho)]
    ramp = [s ** (1 / rho) for s in sigmas]  # Karras' grid is uniform in σ̃^(1/ρ)
    steps = [a - b for a, b in zip(ramp, ramp[1:])]
    assert max(steps) < 1.25 * min(steps)
    for spacing in ("logsnr", "karras"):  # crowded ends move to free timesteps, in order
        for count in (10, 300, 1000):
            for grid in (schedule, NoiseSchedule.cosine()):
                chosen = grid.spaced_timesteps(count, spacing)
                assert len(set(chosen)) == count and chosen == sorted(chosen, reverse=True)
                if spacing == "karras" or count == 1000:
                    assert chosen[0] == 999 and chosen[-1] == 0
    # "logsnr" starts at σ̃ ≤ 160 (the linear schedule's T − 1; the cosine's σ̃ there is 2·10⁴)
    # and ends at σ̃ = max(σ̃_0, 0.3/N).
    cosine = NoiseSchedule.cosine()
    top = cosine.spaced_timesteps(10, "logsnr")[0]
    assert cosine.edm_sigma(top) < 1.01 * 160 < cosine.edm_sigma(top + 1)  # the nearest timestep
    assert schedule.spaced_timesteps(10, "logsnr")[0] == 999
    for count in (10, 25):
        last = schedule.spaced_timesteps(count, "logsnr")[-1]
        assert abs(schedule.edm_sigma(last) - 0.3 / count) < 0.3 / count * 0.25
    assert schedule.spaced_timesteps(50, "logsnr")[-1] == 0  # 0.3/50 is below σ̃_0 = 0.01
    # many steps crowd at the cosine's steep cap: they stay at or below its timestep (they
    # once climbed to 999, σ̃ = 2·10⁴, from 107 steps on)
    for count in (107, 250, 500):
        assert cosine.spaced_timesteps(count, "logsnr")[0] == top
    # a schedule that never reaches σ̃ = 0.3/N: the grid still runs down to its σ̃_0
    flat = NoiseSchedule(torch.full((1000,), 1e-6, dtype=torch.float64))
    chosen = flat.spaced_timesteps(5, "logsnr")
    assert chosen[0] == 999 and chosen[-1] == 0 and chosen == sorted(chosen, reverse=True)
    with pytest.raises(ValueError, match="spacing must be one of"):
        schedule.spaced_timesteps(10, "uniform")


# --------------------------------------------------------------------------------------
# What a schedule can compute
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1e-4, 0.1, 3.0, 7.0, 1e4])
def test_the_time_shift_starts_every_grid_at_pure_noise(shift):
    # shift·σ/(1 + (shift − 1)·σ) rounded above 1 at σ = 1 for shifts far from 1 (α < 0 then);
    # the map is written to give exactly 1 there.
    flow = NoiseSchedule.flow(shift)
    assert flow.shifted(1.0) == 1.0 and all(flow.shifted(s / 97) <= 1.0 for s in range(98))
    assert flow.spaced_timesteps(25)[0] == 1000.0
    assert flow.shifted(0.25) == pytest.approx(shift * 0.25 / (1 + (shift - 1) * 0.25), rel=1e-15)


@pytest.mark.parametrize(
    "shift, message",
    [
        (1e-300, "stay distinct and positive as the model's float32 times"),  # σ < 1 underflows to t = 0
        (1e-50, "stay distinct and positive as the model's float32 times"),
        (1e8, "stay distinct and positive as the model's float32 times"),  # σ < 1 rounds to t = T in float32
        (1e20, "lower the noise at every step"),  # ... and to σ = 1 in float64
        (1e300, "lower the noise at every step"),
    ],
)
def test_a_shift_that_cannot_place_a_grid_is_refused_when_the_schedule_is_built(shift, message):
    with pytest.raises(ValueError, match=re.escape(f"shift={shift!r}'s 2-step grid must {message}")):
        NoiseSchedule.flow(shift)


def test_a_grid_the_shift_collapses_is_refused_naming_the_shift_and_the_steps():
    flow = NoiseSchedule.flow(1e6)  # a 2-step grid fits; 300 steps crowd below float32's resolution at T
    assert len(flow.spaced_timesteps(5)) == 5
    with pytest.raises(ValueError, match=r"the 300-step grid of shift=1000000.0 must stay distinct"):
        flow.spaced_timesteps(300)
    with pytest.raises(ValueError, match="stay distinct and positive as the model's float32 times"):
        NoiseSchedule.flow().check_grid([999.9999999999999, 999.9999999999998])
    with pytest.raises(ValueError, match="must lie at noise levels of finite log-SNR"):
        NoiseSchedule.flow().check_grid([1e-320])  # σ = 1e-323: λ overflows
    with pytest.raises(ValueError, match="t = 500 and t = 500 lie at one noise level"):
        SCHEDULE.check_grid([500, 500])
    NoiseSchedule.flow().check_grid([1000.0, 500.0, 1e-30])  # pure noise first, then finite λ


@pytest.mark.parametrize(
    "betas, error, message",
    [
        ([1e-300] * 10, ValueError, "strictly decreasing from below 1"),  # 1 − β rounds to 1: σ = 0
        ([1e-4, 1e-4, 1e-17, 1e-4], ValueError, "strictly decreasing from below 1"),
        ([0.9999] * 1000, ValueError, "above 0 at the last timestep"),  # ᾱ underflows: α = 0
        ("abc", TypeError, "betas must be a sequence of numbers"),
        ([0.5, 1.0], ValueError, r"betas must be a non-empty sequence of values in \(0, 1\)"),
        ([[1e-4], [2e-2]], ValueError, r"betas must be 1-D, one β a timestep, got shape \(2, 1\)"),
        (0.01, ValueError, r"betas must be 1-D, one β a timestep, got shape \(\)"),
    ],
)
def test_betas_must_give_a_computable_alpha_bar(betas, error, message):
    with pytest.raises(error, match=message):
        NoiseSchedule(betas)


def test_a_schedule_holds_its_own_copy_of_the_betas():
    # a tensor that requires grad, or that its owner edits afterwards, is taken by value
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64, requires_grad=True)
    schedule = NoiseSchedule(betas)
    expected = NoiseSchedule.linear()
    assert schedule.cache_key == expected.cache_key and not schedule.betas.requires_grad
    owned = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    schedule = NoiseSchedule(owned)
    owned.mul_(2)
    assert schedule.cache_key == expected.cache_key
    plan = fastguide.sampling.solvers.plan_steps("ddim", schedule, [999, 499, 0])
    assert plan == fastguide.sampling.solvers.plan_steps("ddim", expected, [999, 499, 0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_timesteps=2.5), "num_timesteps must be a positive int"),
        (dict(num_timesteps=True), "num_timesteps must be a positive int"),
        (dict(s=-1.0), r"s \(the cosine schedule's offset\) must be a finite non-negative number"),  # divided by 1 + s
        (dict(s=math.nan), "s .* must be a finite non-negative number"),
        (dict(max_beta=1.0), r"max_beta must be a number in \(0, 1\)"),
    ],
)
def test_cosine_schedule_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.cosine(**kwargs)


@pytest.mark.parametrize(
    "rho, message",
    [
        (1e-300, "cannot place a Karras grid"),  # σ̃^(1/ρ) overflows
        (1e300, "cannot place a Karras grid"),  # σ̃^(1/ρ) = 1 at both ends: one σ̃ for every target
        ("7", "rho must be a positive number"),
        (0.0, "rho must be a positive number"),
    ],
)
def test_karras_rho_must_place_a_grid(rho, message):
    with pytest.raises(ValueError, match=message):
        SCHEDULE.spaced_timesteps(10, "karras", rho)
    if isinstance(rho, str):  # a bad rho is refused with any spacing, as any bad argument
        with pytest.raises(ValueError, match=message):
            SCHEDULE.spaced_timesteps(10, "logsnr", rho)


def test_a_variance_type_given_to_another_sampler_than_ddpm_is_refused_not_ignored():
    with pytest.raises(ValueError, match="variance_type applies to sampler='ddpm'"):
        fastguide.sampling.solvers.plan_steps("ddim", SCHEDULE, [999, 500], variance_type="fixed_large")


def test_a_rho_given_with_another_spacing_is_refused_not_ignored():
    for schedule, spacing in ((SCHEDULE, "logsnr"), (SCHEDULE, "leading"), (NoiseSchedule.flow(), "linspace")):
        with pytest.raises(ValueError, match="shapes spacing='karras' only"):
            schedule.spaced_timesteps(10, spacing, 3.0)
    assert SCHEDULE.spaced_timesteps(10, "karras") == SCHEDULE.spaced_timesteps(10, "karras", 7.0)


def test_each_schedule_refuses_the_prediction_types_it_cannot_convert():
    # One table (contract.PREDICTION_PATHS): v = α·ε − σ·x0 inverts where α² + σ² = 1, a
    # flow velocity where α + σ = 1; epsilon and sample convert on either path.
    accepted = {
        SCHEDULE: ("epsilon", "v_prediction", "sample"),
        NoiseSchedule.flow(): ("epsilon", "sample", "flow_prediction"),
    }
    for schedule, usable in accepted.items():
        for prediction_type in PREDICTION_TYPES:
            if prediction_type in usable:
                schedule.check_prediction_type(prediction_type)
                continue
            with pytest.raises(
                ValueError,
                match=rf"prediction_type='{prediction_type}' converts to x0 and eps only "
                rf"on a .* schedule .*use one of \{re.escape(repr(usable))[1:]}",
            ):
                schedule.check_prediction_type(prediction_type)
    for bad in ("eps", None, ["epsilon"]):
        with pytest.raises(ValueError, match="prediction_type must be one of"):
            SCHEDULE.check_prediction_type(bad)


# --------------------------------------------------------------------------------------
# Fractional timesteps: σ̃ interpolated linearly in t (diffusers' Euler-type schedulers)
# --------------------------------------------------------------------------------------

SD15_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("steps", [7, 13, 25, 50])
def test_fractional_times_interpolate_edm_sigma_as_diffusers_does(steps):
    """diffusers' linspace grid: σ̃(t) = np.interp(t, arange(T), σ̃_k), α = 1/√(1 + σ̃²), σ = σ̃·α."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EulerDiscreteScheduler(**SD15_BETAS)
    scheduler.set_timesteps(steps)
    schedule = NoiseSchedule(scheduler.betas.double())
    times = schedule.timesteps(scheduler.timesteps.tolist())
    assert any(isinstance(t, float) for t in times) and times == scheduler.timesteps.tolist()
    # the same formula on fastguide's float64 σ̃ table, written out with numpy
    abar = schedule.alphas_cumprod.numpy()
    table = np.sqrt((1 - abar) / abar)
    for t, expected in zip(times, np.interp(times, np.arange(1000), table)):
        alpha, sigma = schedule.alpha_sigma(t)
        k = math.floor(t)
        assert schedule.edm_sigma(t) == pytest.approx(expected, rel=1e-15)
        assert alpha == pytest.approx(1 / math.sqrt(1 + expected**2), rel=1e-15)
        assert sigma == pytest.approx(expected / math.sqrt(1 + expected**2), rel=1e-15)
        assert schedule.alpha_bar(t) == pytest.approx(alpha**2, rel=1e-15) and alpha**2 + sigma**2 == pytest.approx(1)
        assert schedule.log_snr(t) == pytest.approx(-math.log(expected), rel=1e-14)
        if t != k:  # strictly between its neighbours' noise levels
            assert schedule.edm_sigma(k) < schedule.edm_sigma(t) < schedule.edm_sigma(k + 1)
    # and diffusers' own σ's: its ᾱ is a float32 cumprod (1e-5 relative near t = 0)
    ours = torch.tensor([schedule.edm_sigma(t) for t in times], dtype=torch.float64)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1].double(), rtol=3e-5, atol=0)


def test_integer_timesteps_never_go_through_the_interpolation():
    # bit for bit as before: √ᾱ_t and √(1 − ᾱ_t) of the float64 table, also for an integral float
    for t in (0, 1, 500, 999):
        abar = SCHEDULE.alphas_cumprod[t].item()
        assert SCHEDULE.alpha_sigma(t) == SCHEDULE.alpha_sigma(float(t)) == (math.sqrt(abar), math.sqrt(1 - abar))
        assert SCHEDULE.alpha_bar(float(t)) == abar
    assert SCHEDULE.alpha_sigma(-1) == (1.0, 0.0) and SCHEDULE.log_snr(-1) == math.inf
    # continuous at the timesteps: σ̃ just off t = 500 is σ̃_500 to first order
    for t in (499.999999, 500.000001):
        assert SCHEDULE.edm_sigma(t) == pytest.approx(SCHEDULE.edm_sigma(500), rel=1e-8)


def test_explicit_timesteps_take_fractional_times():
    assert SCHEDULE.timesteps([100, 957.375, 999.0, 0.5]) == [999, 957.375, 100, 0.5]  # visited descending
    with pytest.raises(ValueError, match="timesteps must be distinct"):
        SCHEDULE.timesteps([100, 999.0, 100.0])  # 100 and 100.0: one time
    assert [type(t) for t in SCHEDULE.timesteps([999.0, 957.375, 0])] == [int, float, int]
    assert SCHEDULE.timesteps(torch.tensor([999.0, 957.375], dtype=torch.float32)) == [999, 957.375]
    assert SCHEDULE.model_time_dtype([999, 957.375, 0]) == torch.float32
    assert SCHEDULE.model_time_dtype(SCHEDULE.timesteps([999.0, 500.0])) == torch.int64
    assert NoiseSchedule.flow().model_time_dtype([1000.0]) == torch.float32
    SCHEDULE.check_grid([998.5, 998.25, 998, 0.5])
    for bad in ([999.5], [-0.5, 10], [math.nan], [math.inf], []):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
            SCHEDULE.timesteps(bad)
    for bad in ([True, 10], ["10"]):
        with pytest.raises(TypeError, match="timesteps must be numbers"):
            SCHEDULE.timesteps(bad)


def test_numbers_of_every_kind_and_clear_refusals():
    import numpy as np

    flow, vp = NoiseSchedule.flow(), NoiseSchedule.linear()
    assert flow.timesteps(np.array([1000, 500])) == [1000.0, 500.0]  # NumPy scalars are numbers
    assert vp.spaced_timesteps(5, "karras", np.float32(7)) == vp.spaced_timesteps(5, "karras", 7.0)
    with pytest.raises(ValueError, match="steps must be at most 16777216 on a flow schedule"):
        NoiseSchedule.flow().spaced_timesteps(2**24 + 1)
    with pytest.raises(ValueError, match="the 16777216-step grid of shift=3.0 must stay distinct"):
        NoiseSchedule.flow(3.0).spaced_timesteps(2**24)  # (its first gaps, before the rest is built)
    for made in (
        NoiseSchedule.linear(np.int64(100)),
        NoiseSchedule.cosine(np.int64(100)),
        FlowSchedule(1.0, np.int64(100)),
    ):
        assert made.num_timesteps == 100 and type(made.num_timesteps) is int
    with pytest.raises(ValueError, match="steps must be an int, got True"):
        vp.strided_timesteps(True)
    assert len(vp.strided_timesteps(1000)) == 1000  # ddim1000 exists, past T/2
    with pytest.raises(ValueError, match="or a count with a ddimN grid"):
        vp.strided_timesteps(600)
    with pytest.raises(TypeError, match="timesteps as a tensor must be 1-D"):
        vp.timesteps(torch.tensor(5))
    # fractional times reach the model as float32: two that round to one are refused
    with pytest.raises(ValueError, match="must stay distinct as the model's float32 times"):
        vp.check_grid(vp.timesteps([500.000001, 500]))
    vp.check_grid(vp.timesteps([500.5, 500, 0]))  # distinct, and t = 0 is fine on a VP path


@pytest.mark.parametrize(
    "schedule, t",
    [
        (NoiseSchedule.linear(), 1000),  # past the last timestep, 999
        (NoiseSchedule.linear(), 999.5),
        (NoiseSchedule.linear(), math.nan),
        (NoiseSchedule.flow(), 1000.5),  # σ > 1: a negative α
        (NoiseSchedule.flow(), math.nan),
    ],
    ids=str,
)
def test_a_time_past_the_schedule_is_refused_by_name(schedule, t):
    with pytest.raises(ValueError, match=r"t must be a number at most 1?[0-9]{3} on .*Schedule"):
        schedule.alpha_sigma(t)
    with pytest.raises(ValueError, match="t must be a number at most"):
        schedule.edm_sigma(t)

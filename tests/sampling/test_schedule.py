"""Timestep respacing against guided-diffusion's ``space_timesteps``, written out below from
its source (guided_diffusion/respace.py) as the reference. ADM returns a set; fastguide
lists the same timesteps in descending order (the order they are visited)."""

import pytest

from fastguide import NoiseSchedule

SCHEDULE = NoiseSchedule.linear()


def adm_space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """guided-diffusion's space_timesteps, statement for statement."""
    if section_counts.startswith("ddim"):
        desired_count = int(section_counts[len("ddim"):])
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
@pytest.mark.parametrize("steps", [1, 7, 25, 50, 333])
def test_diffusers_spacings_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing=spacing,
                                        steps_offset=0)
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
    with pytest.raises(ValueError, match="spacing must be one of"):
        schedule.spaced_timesteps(10, "uniform")

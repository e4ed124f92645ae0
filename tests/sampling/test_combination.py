"""The linear combinations the solvers write their updates in (fastguide/sampling/combination.py):
arithmetic, the shift to the next call's symbols, and their evaluation into the fused step's
k_* with the refusal of what one call's update cannot read."""

import dataclasses
import math
import random

import pytest

from fastguide.ops.contract import MAX_HISTORY
from fastguide.sampling.combination import EPS, NOISE, ZERO, Combination, Symbol, X, x0


def step(combination, x, eps, noise, x0s, x_previous):
    """What the fused step computes from the combination's k_*: k_x·x + k_x0·m₀ + k_eps·eps +
    Σⱼ k_history[j]·mⱼ₊₁ + k_x_previous·x₁ + k_noise·z, with x0s = (m₀, m₁, …)."""
    k = combination.kernel_coefficients()
    return (
        k["k_x"] * x
        + k["k_x0"] * x0s[0]
        + k["k_eps"] * eps
        + k["k_noise"] * noise
        + sum(w * m for w, m in zip(k["k_history"], x0s[1:]))
        + k["k_x_previous"] * x_previous
    )


def test_symbols_evaluate_to_one_coefficient_each():
    assert X.kernel_coefficients() == dict(k_x=1.0, k_x0=0.0, k_eps=0.0, k_history=(), k_x_previous=0.0, k_noise=0.0)
    assert EPS.kernel_coefficients()["k_eps"] == 1.0 and NOISE.kernel_coefficients()["k_noise"] == 1.0
    assert x0(0).kernel_coefficients() == dict(
        k_x=0.0, k_x0=1.0, k_eps=0.0, k_history=(), k_x_previous=0.0, k_noise=0.0
    )
    assert x0(2).kernel_coefficients()["k_history"] == (0.0, 1.0)  # m₂ in the second slot, the first left 0
    assert ZERO.kernel_coefficients() == dict(k_x=0.0, k_x0=0.0, k_eps=0.0, k_history=(), k_x_previous=0.0, k_noise=0.0)


def test_arithmetic_acts_per_coefficient():
    a = 2.0 * X - 0.5 * x0(0) + x0(1) / 4 + 3 * EPS
    b = X + 0.5 * x0(0) - NOISE
    assert (a + b).kernel_coefficients() == dict(
        k_x=3.0, k_x0=0.0, k_eps=3.0, k_history=(0.25,), k_x_previous=0.0, k_noise=-1.0
    )
    assert (a - b).kernel_coefficients() == dict(
        k_x=1.0, k_x0=-1.0, k_eps=3.0, k_history=(0.25,), k_x_previous=0.0, k_noise=1.0
    )
    assert (-a).coefficient(Symbol("x0", 1)) == -0.25
    assert (a * 2).coefficient(Symbol("x")) == 4.0 and (2 * a) == (a * 2)
    assert (a / 2).coefficient(Symbol("eps")) == 1.5
    assert a.coefficient(Symbol("noise")) == 0.0  # no term: 0


def test_a_symbol_named_twice_is_one_term_and_zero_terms_drop():
    assert a_sum() == Combination(((Symbol("x"), 3.0),))
    assert X - X == ZERO and (X - X).terms == ()
    assert 0.0 * x0(3) == ZERO and (x0(0) + x0(3) - x0(3)).kernel_coefficients()["k_history"] == ()
    # the terms are listed x, m₀, m₁, …, eps, noise whatever the order they were written in
    assert [s for s, _ in (NOISE + EPS + x0(1) + x0(0) + X).terms] == [
        Symbol("x"),
        Symbol("x0", 0),
        Symbol("x0", 1),
        Symbol("eps"),
        Symbol("noise"),
    ]


def a_sum():
    return Combination(((Symbol("x"), 1.0), (Symbol("x"), 2.0)))


@pytest.mark.parametrize("seed", range(5))
def test_evaluation_is_linear(seed):
    """Evaluating a sum, a difference or a multiple is the sum, difference or multiple of the
    evaluations (the algebra is the step's own linear map, at random values)."""
    rng = random.Random(seed)
    symbols = [X, EPS, NOISE, X.shift()] + [x0(k) for k in range(MAX_HISTORY)]

    def random_combination():
        return sum((rng.uniform(-2, 2) * s for s in rng.sample(symbols, 4)), ZERO)

    a, b, c = random_combination(), random_combination(), rng.uniform(-3, 3)
    values = dict(
        x=rng.gauss(0, 1),
        eps=rng.gauss(0, 1),
        noise=rng.gauss(0, 1),
        x0s=[rng.gauss(0, 1) for _ in range(MAX_HISTORY)],
        x_previous=rng.gauss(0, 1),
    )
    at = lambda comb: step(comb, **values)  # noqa: E731
    assert at(a + b) == pytest.approx(at(a) + at(b), rel=1e-12, abs=1e-12)
    assert at(a - b) == pytest.approx(at(a) - at(b), rel=1e-12, abs=1e-12)
    assert at(-a) == pytest.approx(-at(a), rel=1e-12, abs=1e-12)
    assert at(c * a) == pytest.approx(c * at(a), rel=1e-12, abs=1e-12)
    assert at(a / c) == pytest.approx(at(a) / c, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    "operation",
    [
        lambda: X * EPS,  # a product of two combinations is not linear
        lambda: X + 1.0,  # the step has no constant term
        lambda: 1.0 - X,
        lambda: X * "2",
        lambda: X / X,
        lambda: True * X,
    ],
)
def test_what_is_not_a_linear_combination_is_a_type_error(operation):
    with pytest.raises(TypeError):
        operation()


def test_combinations_are_immutable_values():
    a = X + x0(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.terms = ()
    assert hash(a) == hash(x0(1) + X) and a == x0(1) + X and a != X
    with pytest.raises(TypeError, match="Symbol"):
        Combination(((("x", 0), 1.0),))
    with pytest.raises(TypeError, match="Symbol"):
        Combination(((Symbol("sigma"), 1.0),))
    with pytest.raises(TypeError, match="calls_back must be an int"):
        x0(1.0)
    for calls_back in (1.5, True):  # a hand-built Symbol is checked as x0() checks its argument
        with pytest.raises(TypeError, match="calls_back must be an int"):
            Combination(((Symbol("x0", calls_back), 1.0),))


def test_shift_restates_a_value_in_the_next_calls_symbols():
    assert x0(0).shift() == x0(1) and x0(2).shift(2) == x0(4) and x0(-1).shift() == x0(0)
    a = 0.5 * x0(-1) - 0.25 * x0(0) + 2.0 * x0(1)
    assert a.shift().kernel_coefficients() == dict(
        k_x=0.0, k_x0=0.5, k_eps=0.0, k_history=(-0.25, 2.0), k_x_previous=0.0, k_noise=0.0
    )
    assert a.shift().shift(-1) == a
    assert (a + x0(3)).shift() == a.shift() + x0(4) and (3.0 * a).shift() == 3.0 * a.shift()  # linear
    assert ZERO.shift() == ZERO
    with pytest.raises(TypeError, match="calls must be an int"):
        a.shift(1.0)


@pytest.mark.parametrize(
    "combination, named",
    [
        (X.shift(2), r"x\[2\]"),  # an x from before the previous call's
        (EPS.shift(), r"eps\[1\]"),
        (2.0 * x0(0) + NOISE.shift(), r"noise\[1\]"),
        (x0(-1), r"m\[-1\]"),  # the next call's x0, not known yet
        (x0(MAX_HISTORY + 1), f"m{MAX_HISTORY + 1}"),  # beyond the kernel's history slots
        (x0(MAX_HISTORY).shift(), f"m{MAX_HISTORY + 1}"),
        (x0(MAX_HISTORY) + X.shift(), "the history"),  # the kept x takes one more slot
    ],
)
def test_a_term_the_step_cannot_read_is_refused(combination, named):
    with pytest.raises(ValueError, match=f"the fused step cannot express {named} in"):
        combination.kernel_coefficients()


def test_the_furthest_history_the_kernel_holds_is_expressible():
    k = (x0(MAX_HISTORY) - x0(1)).kernel_coefficients()
    assert k["k_history"] == (-1.0,) + (0.0,) * (MAX_HISTORY - 2) + (1.0,)
    assert len(k["k_history"]) == MAX_HISTORY


def test_the_previous_calls_x_is_read_beside_the_x0_history():
    k = (0.5 * X.shift() + 0.5 * X - 0.25 * x0(1)).kernel_coefficients()
    assert k["k_x_previous"] == 0.5 and k["k_x"] == 0.5 and k["k_history"] == (-0.25,)


def test_dpm_solver_2m_as_written_in_the_module_docstring():
    """x' = (σ'/σ)·x − α'·(e^{−h} − 1)·D, D = m₀ + (m₀ − m₁)/(2r₀): k_x0 = α'·φ₁·(1 + 1/2r₀),
    k_history = (−α'·φ₁/2r₀,) with φ₁ = 1 − e^{−h}."""
    sigma, sigma_next, alpha_next, h, r0 = 0.8, 0.5, 0.866, 0.7, 0.9
    m0, m1 = x0(0), x0(1)
    D = m0 + (m0 - m1) / (2 * r0)
    x_next = (sigma_next / sigma) * X - alpha_next * math.expm1(-h) * D
    k = x_next.kernel_coefficients()
    phi_1 = -math.expm1(-h)
    assert k["k_x"] == sigma_next / sigma and k["k_eps"] == k["k_noise"] == 0.0
    assert k["k_x0"] == pytest.approx(alpha_next * phi_1 * (1 + 1 / (2 * r0)), rel=1e-15)
    assert k["k_history"] == pytest.approx((-alpha_next * phi_1 / (2 * r0),), rel=1e-15)


def test_a_corrector_folds_into_the_next_call_by_a_shift():
    """UniPC's pattern: a predictor and a corrector written at one call, the corrector reading
    the next call's x0; their difference holds no x, so it carries over to the next call."""
    base = 0.9 * X + 0.3 * x0(0)
    predictor = base - 0.1 * (x0(1) - x0(0))
    corrector = base - 0.1 * (x0(1) - x0(0)) - 0.05 * (x0(-1) - x0(0))
    with pytest.raises(ValueError, match=r"m\[-1\]"):
        corrector.kernel_coefficients()
    correction = (corrector - predictor).shift()
    assert correction.coefficient(Symbol("x")) == 0.0
    k = correction.kernel_coefficients()  # the shared terms cancel to rounding (m₀ and m₁ here)
    assert (k["k_x"], k["k_eps"], k["k_noise"]) == (0.0, 0.0, 0.0)
    assert k["k_x0"] == pytest.approx(-0.05, rel=1e-14) and k["k_history"] == pytest.approx((0.05,), rel=1e-14)
    assert (0.5 * (X + correction)).kernel_coefficients()["k_history"] == pytest.approx((0.025,), rel=1e-14)


def test_the_text_form_names_the_terms():
    assert str(X - 0.5 * x0(1) + 2.0 * NOISE) == "1.0·x - 0.5·m1 + 2.0·noise"
    assert repr(ZERO) == "Combination(0)"
    assert str(x0(-1) + EPS.shift()) == "1.0·m[-1] + 1.0·eps[1]"

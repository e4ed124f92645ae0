"""Linear combinations of what one model call's update reads, so a solver reads like its paper.

The fused step (``fastguide.ops.guided_step``) computes, once per model call,
    x_next = k_x·x + k_x0·m₀ + k_eps·eps + Σⱼ k_history[j]·mⱼ₊₁ + k_x_previous·x₁ + k_noise·z
where x is the sample the call runs at, eps its noise prediction, z the noise it draws,
mₖ the x0 predicted k model calls back (m₀ this call's; k ≤ MAX_HISTORY, the kernel's
history slots) and x₁ the previous call's x, which the loop keeps for a call that reads it
(in one more history slot: Heun's second call, whose update in x₁ rounds as its paper's
does, where one in m₁ would divide rounding by the small σ' it lands on).

A ``Combination`` is such a sum Σ cₛ·s over named symbols s with float coefficients cₛ,
closed under +, − and scaling by a float. A solver writes its update in
these symbols, e.g. DPM-Solver++(2M):

    D = m0 + (m0 - m1) / (2 * r0)
    x_next = (sigma_next / sigma) * X - alpha_next * math.expm1(-h) * D

with ``m0, m1 = x0(0), x0(1)``, and ``x_next.kernel_coefficients()`` reads off the k_* (and
refuses what the kernel cannot express).

A symbol belongs to one model call, counted back from the call whose update is written:
``Symbol("x0", 1)`` is m₁, ``Symbol("x", 1)`` the previous call's x. ``shift`` restates a
combination in the next call's symbols (every symbol one call further back), which is how a
value written at one call is used at the next: UniPC's corrector, written at the call that
predicts x with the next call's x0 ``x0(-1)`` in it, is at the next call a combination of
that call's m₀ and its history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypedDict

from ..ops.contract import MAX_HISTORY

# The quantities of a model call, in the order a combination lists them.
KINDS = ("x", "x0", "eps", "noise")


class Symbol(NamedTuple):
    """One quantity of one model call: ``kind`` "x" (the sample the call runs at), "x0" (its
    x0 prediction), "eps" (its noise prediction) or "noise" (the noise its update draws);
    ``calls_back`` which call: 0 the one whose update is written, k > 0 the call k calls
    before it, k < 0 the call −k calls after it."""

    kind: str
    calls_back: int = 0

    def __str__(self) -> str:
        if self.kind == "x0":
            return f"m{self.calls_back}" if self.calls_back >= 0 else f"m[{self.calls_back}]"
        return self.kind if self.calls_back == 0 else f"{self.kind}[{self.calls_back}]"


class KernelCoefficients(TypedDict):
    """The k_* of one call of the fused step (the like-named fields of ``StepPlan``)."""

    k_x: float
    k_x0: float
    k_eps: float
    k_history: tuple[float, ...]
    k_x_previous: float
    k_noise: float


def _order(term: tuple[Symbol, float]) -> tuple[int, int]:
    symbol = term[0]
    return KINDS.index(symbol.kind), symbol.calls_back


@dataclass(frozen=True)
class Combination:
    """Σₛ cₛ·s: float coefficients ``terms`` ((symbol, cₛ) pairs) over ``Symbol``s.

    Immutable and normal: a symbol listed twice is one term with the sum of the coefficients,
    terms of coefficient 0 are dropped (so ``a - a == ZERO``), and the terms are sorted (x,
    then m₀, m₁, …, then eps, noise). Arithmetic acts per coefficient:
        (a + b)ₛ = aₛ + bₛ,  (a − b)ₛ = aₛ − bₛ,  (−a)ₛ = −aₛ,  (c·a)ₛ = (a·c)ₛ = c·aₛ,
        (a / c)ₛ = aₛ / c
    for combinations a, b and a float c; a product of two combinations, or a constant term,
    is no linear combination and raises TypeError."""

    terms: tuple[tuple[Symbol, float], ...] = ()

    def __post_init__(self) -> None:
        merged: dict[Symbol, float] = {}
        for symbol, coefficient in self.terms:
            if not isinstance(symbol, Symbol) or symbol.kind not in KINDS:
                raise TypeError(
                    f"a Combination's symbols are Symbol(kind, calls_back) with kind in {KINDS}, got {symbol!r}"
                )
            if isinstance(symbol.calls_back, bool) or not isinstance(symbol.calls_back, int):
                raise TypeError(f"a Symbol's calls_back must be an int, got {symbol!r}")
            merged[symbol] = merged[symbol] + float(coefficient) if symbol in merged else float(coefficient)
        normal = tuple(sorted(((s, c) for s, c in merged.items() if c != 0.0), key=_order))
        object.__setattr__(self, "terms", normal)

    def coefficient(self, symbol: Symbol) -> float:
        """cₛ of ``symbol`` (0.0 where it has no term)."""
        return dict(self.terms).get(symbol, 0.0)

    def __add__(self, other: Combination) -> Combination:
        if not isinstance(other, Combination):
            return NotImplemented
        return Combination(self.terms + other.terms)

    def __sub__(self, other: Combination) -> Combination:
        if not isinstance(other, Combination):
            return NotImplemented
        return self + -other

    def __neg__(self) -> Combination:
        return Combination(tuple((s, -c) for s, c in self.terms))

    def __mul__(self, scalar: float) -> Combination:
        if not _is_scalar(scalar):
            return NotImplemented
        return Combination(tuple((s, c * scalar) for s, c in self.terms))

    def __rmul__(self, scalar: float) -> Combination:
        if not _is_scalar(scalar):
            return NotImplemented
        return Combination(tuple((s, scalar * c) for s, c in self.terms))

    def __truediv__(self, scalar: float) -> Combination:
        if not _is_scalar(scalar):
            return NotImplemented
        return Combination(tuple((s, c / scalar) for s, c in self.terms))

    def shift(self, calls: int = 1) -> Combination:
        """The same value in the symbols of the call ``calls`` calls later: each symbol
        moves ``calls`` calls further back (mₖ → mₖ₊₁ for calls = 1: the previous call's m₀
        is this call's m₁, and its x this call's x[1]). That call's update cannot read this
        call's eps or noise, nor its x further than the next call, nor beyond MAX_HISTORY
        calls back (``kernel_coefficients`` refuses them)."""
        if isinstance(calls, bool) or not isinstance(calls, int):
            raise TypeError(f"calls must be an int, got {calls!r}")
        return Combination(tuple((Symbol(s.kind, s.calls_back + calls), c) for s, c in self.terms))

    def kernel_coefficients(self) -> KernelCoefficients:
        """The fused step's k_* of this combination, read as the update of the call at
        calls_back = 0: k_x, k_x0, k_eps, k_noise the coefficients of x, m₀, eps and noise,
        k_history[j] that of mⱼ₊₁ (as long as the furthest mₖ with a term), k_x_previous
        that of x[1], the previous call's x. The x0 slots and x[1]'s take at most
        MAX_HISTORY history slots. Raises ValueError for a term the step cannot read:
        another call's eps or noise, an x from before the previous call, a later call's x0
        (x0(−1): ``shift`` the combination to that call), or more than MAX_HISTORY slots."""
        scalars = {"x": 0.0, "eps": 0.0, "noise": 0.0}
        x0s: dict[int, float] = {}
        x_previous = 0.0
        refused = []
        for symbol, coefficient in self.terms:
            if symbol.kind == "x0" and 0 <= symbol.calls_back <= MAX_HISTORY:
                x0s[symbol.calls_back] = coefficient
            elif symbol.kind != "x0" and symbol.calls_back == 0:
                scalars[symbol.kind] = coefficient
            elif symbol == Symbol("x", 1):
                x_previous = coefficient
            else:
                refused.append(symbol)
        history = tuple(x0s.get(k, 0.0) for k in range(1, max(x0s, default=0) + 1))
        if refused or len(history) + (x_previous != 0.0) > MAX_HISTORY:
            raise ValueError(
                f"the fused step cannot express {', '.join(map(str, refused)) or 'the history'} in {self}: one call's "
                f"update reads its own x, eps and noise, the x0 of that call and up to {MAX_HISTORY} slots of "
                f"history: the x0 of the calls before it (m1 … m{MAX_HISTORY}) and the previous call's x (x[1]); a "
                "later call's x0 is known only at that call (shift() the combination there)"
            )
        return KernelCoefficients(
            k_x=scalars["x"],
            k_x0=x0s.get(0, 0.0),
            k_eps=scalars["eps"],
            k_history=history,
            k_x_previous=x_previous,
            k_noise=scalars["noise"],
        )

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        text = " + ".join(f"{c!r}·{s}" for s, c in self.terms)
        return text.replace("+ -", "- ")

    def __repr__(self) -> str:
        return f"Combination({self})"


def _is_scalar(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def x0(calls_back: int) -> Combination:
    """m_k, the x0 predicted ``calls_back`` = k model calls back: x0(0) this call's (the
    kernel's x0), x0(1) … x0(MAX_HISTORY) its history, x0(−1) the next call's."""
    if isinstance(calls_back, bool) or not isinstance(calls_back, int):
        raise TypeError(f"calls_back must be an int, got {calls_back!r}")
    return Combination(((Symbol("x0", calls_back), 1.0),))


ZERO = Combination()
X = Combination(((Symbol("x"), 1.0),))  # the sample this call runs at
EPS = Combination(((Symbol("eps"), 1.0),))  # this call's noise prediction
NOISE = Combination(((Symbol("noise"), 1.0),))  # the noise z this call's update draws

"""First-Block Cache: on calls where a network's first block barely changed, skip its other
blocks and reuse their residual from the last call that ran them.

A sampling loop calls the network at nearby noise levels, and most of its blocks' work
changes slowly from one call to the next. First-Block Cache (ParaAttention's FBCache, as
diffusers' ``FirstBlockCacheConfig``) watches the first block's residual r = h₁ − h₀ and
decides at every model call:

    reuse  ⇔  mean|r − r_ref| / mean|r_ref| < threshold   for every branch the call runs
              (0 where r = r_ref: rows whose first block skip-layer guidance skips have
              r = 0 at every call and leave the decision to the other branches)
    reuse:     h_L = h₁ + R̂                                (the other blocks do not run)
    compute:   h_L = blocks 2..L (h₁);   then R ← h_L − h₁ and r_ref ← r

R̂ is the last computed R (``order=0``, FBCache's rule), or its linear extrapolation in the
call's position p through the last two computed calls a > b (``order=1``, as TaylorSeer
extrapolates cached features in the step index): R̂ = R_a + (p_i − p_a)/(p_a − p_b)·(R_a − R_b),
R_a alone where p_a = p_b. p counts the distinct model times before the call's
(``BlockCacheState.positions``, set by the sampling loop): the step index for heun, whose
two consecutive calls at one t (a step's second, the next step's first) share a p, and the
half-step for dpm++2s, whose midpoint calls have times of their own (in the call index,
heun's calls would not be evenly spaced); a state used without positions takes the call
index.

r_ref and R are kept per branch: the conditional, unconditional and perturbed rows of a
guided forward, each a B-row block that the sampling loop names before every call
(``BlockCacheState.branches``). So the unconditional rows are compared with, and reuse,
the unconditional rows of their own last computed call, also when calls in between ran
the conditional rows alone. A call computes all its rows or reuses all of them: a branch
whose change is small still runs when another branch's is not, and its caches then
refresh, so the network always evaluates one batch.

Where it installs (``FirstBlockCache.install``):
- a model with a ModuleList of transformer blocks (fastguide's DiT ``blocks``; diffusers'
  DiT and PixArt ``transformer_blocks``, whose blocks return their hidden states): block 0
  is the first block; on a reused call blocks 1..L−2 pass their input through and block
  L−1 returns it plus R; SD3's joint blocks likewise on their image stream, the context
  stream passed through (the last block drops it, ``context_pre_only``). A block's hidden
  states are its first parameter, however it is called; blocks that return anything else
  than one tensor (Flux's pairs) are refused at their first output;
- fastguide's ADM UNet (with num_res_blocks ≥ 1): its first ``UNet.FIRST_BLOCKS`` input
  blocks (the stem convolution and the first residual block) are the first block, r that
  residual block's residual; ``UNet.rest``, the network up to the last output block's
  features, is replaced on a reused call by h₁ + R.
- diffusers' ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL): ``down_blocks[0]`` is the first
  block and decides on the change of its output features h₁ (downsampled, so no residual
  of the same shape: r = h₁); the anchor is ``conv_in``'s output h₀, which has the shape
  of the last up block's output, so R = (last up block's output) − h₀. On a reused call the
  other down blocks, the mid block and the up blocks pass their input through (a down
  block with as many skip tensors as it would give) and the last up block returns
  h₀ + R̂; the output convolutions run. Blocks are counted as down, mid and up blocks.

``ForecastCache(every, order, warmup)`` replaces the threshold by a fixed schedule
(TaylorSeer's): every block is skipped on the calls between every k-th, and the whole
stack's residual h_L − h₀ is extrapolated.

Under CUDA graphs a decision cannot read a tensor on the host, so the decisions of one
run (the warm-up run before capture) are kept (``BlockCacheState.recorded``) and replayed:
a captured run reuses at the calls where that run reused. Compute is counted exactly from
the decisions (``BlockCacheState.block_rows``: rows × blocks evaluated).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .blocks import block_list, hidden_output, passthrough, with_hidden_output
from .unet import UNet


def _set_order(settings: FirstBlockCache | ForecastCache) -> None:
    """Check ``settings.order`` (0: the last residual, 1: extrapolated) and hold it as an int."""
    order = settings.order
    if isinstance(order, bool) or not isinstance(order, Integral) or order not in (0, 1):
        raise ValueError(
            f"{type(settings).__name__} order must be 0 (the last residual) or 1 (extrapolated), got {order!r}"
        )
    object.__setattr__(settings, "order", int(order))


@dataclass(frozen=True)
class FirstBlockCache:
    """First-Block Cache settings: ``threshold`` > 0, the relative change of the first
    block's residual, mean|r − r_ref| / mean|r_ref| over the batch's rows of each branch (all
    rows compute or all reuse), below which a call reuses the other blocks' residual
    (diffusers' FirstBlockCacheConfig default, 0.05; larger reuses more);
    ``order``: 0 reuses the last computed residual, 1 extrapolates it linearly from the
    last two (the module docstring)."""

    threshold: float = 0.05
    order: int = 0

    def __post_init__(self):
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"FirstBlockCache threshold must be a finite number > 0, got {value!r}")
        object.__setattr__(self, "threshold", float(value))  # (a NumPy scalar too; frozen dataclass)
        _set_order(self)

    def install(self, model: nn.Module, state: BlockCacheState | None = None) -> BlockCacheHandle:
        """Wrap ``model``'s first block and the rest (see the module docstring) to consult
        ``state`` (a fresh one by default: a run's caches). Returns the handle, whose
        ``remove()`` restores the model. The wrappers decide only while ``state.active``,
        with ``state.call`` and ``state.branches`` set for each forward, which
        ``GuidedSampler`` (``cache=``) does; outside it the model runs as it was."""
        return _install(
            model,
            state,
            type(self).__name__,
            lambda blocks, first: BlockCacheState(blocks, first, self.order, threshold=self.threshold),
        )


@dataclass(frozen=True)
class ForecastCache:
    """A fixed schedule of forecast calls (TaylorSeer's, Liu et al. 2025, at the level of the
    whole block stack): the first ``warmup`` calls and then every ``every``-th call run the
    network; the calls between run none of its blocks (but a UNet's first blocks) and take
    h_L = h_0 + R̂, R̂ the blocks' total residual R = h_L − h_0 extrapolated linearly in the
    step index from the branch's last two computed calls (``order=1``, the module
    docstring) or the last one (``order=0``). Static, so it needs no host read and is captured like any plan. Checked
    when built: every an int >= 2, order 0 or 1, warmup an int >= 1."""

    every: int = 2
    order: int = 1
    warmup: int = 2

    def __post_init__(self):
        for name, low in (("every", 2), ("warmup", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise ValueError(f"ForecastCache {name} must be an int >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))  # (a NumPy integer too; frozen dataclass)
        _set_order(self)

    def forecasts(self, call: int) -> bool:
        """Whether model call ``call`` is forecast (once its branches have a computed call)."""
        return call >= self.warmup and (call - self.warmup) % self.every != 0

    def install(self, model: nn.Module, state: BlockCacheState | None = None) -> BlockCacheHandle:
        """As FirstBlockCache.install, with every block of a transformer skipped on a forecast call."""
        return _install(
            model,
            state,
            type(self).__name__,
            lambda blocks, first: BlockCacheState(blocks, first, self.order, schedule=self.forecasts),
            skip_first=True,
        )


BlockCacheSettings = FirstBlockCache | ForecastCache


def _is_diffusers_unet(model: nn.Module) -> bool:
    """Whether ``model`` is diffusers' UNet2DConditionModel (its down, mid and up blocks)."""
    return type(model).__name__ == "UNet2DConditionModel" and type(model).__module__.startswith("diffusers.")


def check_cacheable(model: object, name: str) -> None:
    """Refuse, naming ``cache``, a model a block cache cannot install on (see the module
    docstring for those it can)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"cache: {name} caches a torch.nn.Module's blocks, got {type(model).__name__}")
    if isinstance(model, UNet):
        if model.num_res_blocks < 1:  # input_blocks[1] would downsample: h₁ and rest's output differ in shape
            raise ValueError(
                f"cache: {name} watches the residual of an ADM UNet's first residual block at full "
                "resolution, and this UNet has none (num_res_blocks=0)"
            )
        return
    if _is_diffusers_unet(model):
        return
    try:
        attribute, blocks = block_list(model, name)
    except ValueError as error:
        raise ValueError(f"cache: {error}") from None
    if len(blocks) < 2:
        raise ValueError(f"cache: {name} needs at least 2 blocks to skip any, model.{attribute} holds {len(blocks)}")


def _install(
    model: nn.Module,
    state: BlockCacheState | None,
    name: str,
    new_state: Callable[[int, int], BlockCacheState],
    skip_first: bool = False,
) -> BlockCacheHandle:
    """The wrappers of a block cache on ``model``: on fastguide's UNet its first blocks
    decide and ``UNet.rest`` is replaced; on a transformer block list block 0 decides (and
    with ``skip_first`` passes its input through too on a reused call: the residual is then
    the whole stack's), the inner blocks pass through, the last adds the residual.
    ``new_state(blocks, first_blocks)`` makes the state when none is given."""
    check_cacheable(model, name)
    if isinstance(model, UNet):
        state = _checked_state(
            state, new_state(len(model.input_blocks) + 1 + len(model.output_blocks), UNet.FIRST_BLOCKS)
        )
        handle = BlockCacheHandle(state)
        first = model.input_blocks[UNet.FIRST_BLOCKS - 1]
        handle.wrap(first, "forward", _first_block(state, passthrough(first), lambda out: out))
        handle.wrap(model, "rest", _unet_rest(state))
        return handle
    if _is_diffusers_unet(model):
        return _install_on_diffusers_unet(model, state, new_state, skip_first)
    _, blocks = block_list(model, name)
    state = _checked_state(state, new_state(len(blocks), 0 if skip_first else 1))
    handle = BlockCacheHandle(state)
    first, hidden = blocks[0], hidden_output(blocks[0])
    handle.wrap(
        first,
        "forward",
        _scheduled_first_block(state, passthrough(first), hidden)
        if skip_first
        else _first_block(state, passthrough(first), hidden),
    )
    for block in blocks[1:-1]:
        handle.wrap(block, "forward", _passed_through_when_reused(state, passthrough(block)))
    last = blocks[-1]
    handle.wrap(last, "forward", _last_block(state, hidden_output(last), with_hidden_output(last)))
    return handle


def _checked_state(given: BlockCacheState | None, fresh: BlockCacheState) -> BlockCacheState:
    """``given`` (an earlier run's state, kept for its buffers) when it was made for these
    settings on this model, as ``fresh`` is; ``fresh`` when none is given. A state of other
    settings or another model is refused: its wrappers would decide by its rule, not the
    settings' (a schedule's on a threshold's first block reuses the first call's residual)."""
    if given is None:
        return fresh
    if _made_for(given) != _made_for(fresh):
        raise ValueError(
            f"state: a BlockCacheState made for {_made_for(given)}, but these settings on this model make "
            f"{_made_for(fresh)}: pass the state an install of the same settings on the same model returned"
        )
    return given


def _made_for(state: BlockCacheState) -> dict[str, object]:
    """What a state was made for: the model's block counts and the settings' rule (a
    ForecastCache's schedule by the settings it is the method of)."""
    schedule = getattr(state.schedule, "__self__", state.schedule)
    return dict(
        blocks=state.blocks,
        first_blocks=state.first_blocks,
        order=state.order,
        threshold=state.threshold,
        schedule=schedule,
    )


def _install_on_diffusers_unet(
    model: Any, state: BlockCacheState | None, new_state: Callable[[int, int], BlockCacheState], skip_first: bool
) -> BlockCacheHandle:
    """The wrappers on a UNet2DConditionModel (the module docstring): conv_in keeps the
    anchor h₀, down_blocks[0] decides, the blocks after it pass through on a reused call,
    the last up block adds the residual to h₀."""
    down, up = list(model.down_blocks), list(model.up_blocks)
    middle = [model.mid_block] if model.mid_block is not None else []
    state = _checked_state(state, new_state(len(down) + len(middle) + len(up), 0 if skip_first else 1))
    handle = BlockCacheHandle(state)
    handle.wrap(model.conv_in, "forward", _anchoring(state))
    through, hidden = _down_block_passthrough(down[0]), (lambda out: out[0])  # a down block gives (h, skips)
    handle.wrap(
        down[0],
        "forward",
        _scheduled_first_block(state, through, hidden) if skip_first else _first_block(state, through, hidden),
    )
    for block in down[1:]:
        handle.wrap(block, "forward", _passed_through_when_reused(state, _down_block_passthrough(block)))
    for block in middle + up[:-1]:
        handle.wrap(block, "forward", _passed_through_when_reused(state, passthrough(block)))
    handle.wrap(up[-1], "forward", _last_block(state, lambda out: out, lambda args, kwargs, h: h))
    return handle


def _down_block_passthrough(block: Any) -> Callable[[tuple, dict], tuple[Tensor, tuple[Tensor, ...]]]:
    """What a diffusers down block returns when it passes its input h through: (h, skips)
    with as many skip tensors as it gives (one per resnet, one more for a downsampler), so
    that the up blocks, skipped too, take their usual number of them."""
    count = len(block.resnets) + (len(block.downsamplers) if getattr(block, "downsamplers", None) else 0)
    hidden_states = passthrough(block)

    def through(args: tuple, kwargs: dict) -> tuple[Tensor, tuple[Tensor, ...]]:
        h = hidden_states(args, kwargs)
        return h, (h,) * count

    return through


class BlockCacheState:
    """One run's block caches and decisions (see the module docstring).

    Set by the sampling loop before each model call: ``call`` (its index in the loop) and
    ``branches`` (the branch name of each B-row block of the forward, in order).
    ``recorded``: call index → reused, of the run that decided; with ``replaying`` the
    decisions come from it instead of the data (a captured run). ``blocks``: the
    network's blocks, ``first_blocks`` of them evaluated on a reused call; ``order``: R̂'s.
    One of ``threshold`` (FirstBlockCache: the first block's relative change below which a
    call reuses) and ``schedule(call)`` (ForecastCache: whether a call reuses) decides.
    """

    def __init__(
        self,
        blocks: int,
        first_blocks: int,
        order: int = 0,
        *,
        threshold: float | None = None,
        schedule: Callable[[int], bool] | None = None,
    ):
        if (threshold is None) == (schedule is None):
            raise ValueError("BlockCacheState decides by a threshold or by a schedule: give exactly one")
        self.blocks, self.first_blocks, self.order = blocks, first_blocks, order
        self.threshold, self.schedule = threshold, schedule
        self.call = 0
        self.positions: dict[int, int] = {}  # call index → its step index (set by the loop)
        self.branches: tuple[str, ...] = ("cond",)
        self.recorded: dict[int, bool] = {}
        self.replaying = False
        self.reference: dict[str, Tensor] = {}  # branch -> r_ref
        # branch -> the R of its last computed calls, newest first: [(call, R), ...], at most
        # order + 1, each kept in one of order + 1 tensors rewritten in place (graph-safe)
        self.residual: dict[str, list[tuple[int, Tensor]]] = {}
        # Whether the loop's own forward is running: a forward from elsewhere (a callback's)
        # goes through the wrappers untouched.
        self.active = False
        self.reusing = False  # the current forward's decision
        # The current forward's base, which R is taken from and added to: h₁, or the anchor
        self.base: Tensor | None = None
        # The tensor the residual is taken from and added to, when not h₁ (a diffusers UNet's h₀,
        # set by its conv_in before the first block decides)
        self.anchor: Tensor | None = None

    def begin_run(self) -> None:
        """Forget the kept residuals and references: every run (and a captured run's capture)
        starts from none, as the run that recorded the decisions did."""
        self.reference.clear()
        self.residual.clear()

    def _blocks_of(self, rows: int) -> list[tuple[str, slice]]:
        """(branch, rows) of each B-row block of a forward of ``rows`` rows."""
        count = len(self.branches)
        if rows % count:
            raise ValueError(
                f"FirstBlockCache: a forward of {rows} rows cannot hold the {count} equal row blocks "
                f"of branches {self.branches}"
            )
        size = rows // count
        return [(branch, slice(k * size, (k + 1) * size)) for k, branch in enumerate(self.branches)]

    def decide(self, first_in: Tensor, first_out: Tensor) -> None:
        """The call's decision, from the first block's input h₀ and output h₁ (the anchor
        the reused residual is added to; h₀ itself when every block is skipped)."""
        blocks = self._blocks_of(first_out.shape[0])
        self.base = first_out if self.anchor is None else self.anchor
        if self.schedule is not None:  # fixed: no residual compared, nothing read on the host
            if not self.replaying:
                self.recorded[self.call] = self.schedule(self.call) and all(
                    branch in self.residual and self.residual[branch][0][1].shape == first_out[rows].shape
                    for branch, rows in blocks
                )  # (a kept R of another batch's shape is not reused)
            self.reusing = self.recorded[self.call]
            return
        residual = _residual(first_out, first_in)
        if self.replaying:
            if self.call not in self.recorded:
                raise RuntimeError(f"FirstBlockCache: no recorded decision for model call {self.call} to replay")
            reuse = self.recorded[self.call]
        else:
            reuse = all(
                branch in self.reference
                and branch in self.residual
                and self.reference[branch].shape == residual[rows].shape
                for branch, rows in blocks
            )
            if reuse:
                changes = torch.stack(
                    [_relative_change(residual[rows], self.reference[branch]) for branch, rows in blocks]
                )
                assert self.threshold is not None  # a state without a schedule has a threshold
                reuse = bool(changes.max() < self.threshold)  # one host read per call
            self.recorded[self.call] = reuse
        self.reusing = reuse
        if reuse:
            return
        for branch, block_rows in blocks:
            _keep(self.reference, branch, residual[block_rows])

    def block_rows(self, rows: dict[int, int]) -> int:
        """Σ rows × blocks evaluated over the calls ``rows`` (call index → its forward's rows),
        from the recorded decisions."""
        return sum(
            count * (self.first_blocks if self.recorded.get(call) else self.blocks) for call, count in rows.items()
        )

    def reused(self, h: Tensor) -> Tensor:
        """h₁ + R, each branch's rows with that branch's R (on a reused call)."""
        out = torch.empty_like(h)
        for branch, rows in self._blocks_of(h.shape[0]):
            kept = self.residual[branch]
            (last_call, last), *older = kept
            if not older:
                torch.add(h[rows], last, out=out[rows])
                continue
            previous_call, previous = older[0]
            p_now, p_last, p_previous = (self.positions.get(c, c) for c in (self.call, last_call, previous_call))
            slope = 0.0 if p_last == p_previous else (p_now - p_last) / (p_last - p_previous)
            torch.add(h[rows], last, alpha=1.0 + slope, out=out[rows])
            out[rows].sub_(previous, alpha=slope)
        return out

    def computed(self, h_last: Tensor) -> None:
        """Keep each branch's R = h_L − h₁ after a computed call."""
        assert self.base is not None  # set by the call's decide()
        residual = _residual(h_last, self.base)
        for branch, rows in self._blocks_of(h_last.shape[0]):
            kept = self.residual.setdefault(branch, [])
            value = residual[rows]
            if any(tensor.shape != value.shape or tensor.dtype != value.dtype for _, tensor in kept):
                kept.clear()  # another batch's or dtype's: neither reused nor extrapolated from
            if kept and kept[0][0] == self.call:  # the same call again (a captured run's replay)
                kept.pop(0)
            if len(kept) > self.order:
                _, tensor = kept.pop()  # the oldest's tensor, rewritten
                kept.insert(0, (self.call, tensor.copy_(value)))
            else:
                kept.insert(0, (self.call, value.clone()))


class BlockCacheHandle:
    """What ``FirstBlockCache.install`` wrapped; ``remove()`` restores it (also as a context
    manager). ``state``: the caches the wrappers consult."""

    def __init__(self, state: BlockCacheState):
        self.state = state
        # (owner, attribute, wrapper, whether the owner had the attribute itself, what it was)
        self._wrapped: list[tuple[object, str, Callable, bool, Callable]] = []

    def wrap(self, owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
        """Replace ``owner.name`` (a forward or a method) by ``make(owner.name)`` on the instance."""
        had_own = name in owner.__dict__
        inner = getattr(owner, name)
        wrapper = make(inner)
        setattr(owner, name, wrapper)
        self._wrapped.append((owner, name, wrapper, had_own, inner))

    def remove(self) -> None:
        """Put back every attribute this handle replaced (a second call does nothing)."""
        for owner, name, wrapper, _, _ in self._wrapped:
            if owner.__dict__.get(name) is not wrapper:
                raise RuntimeError(
                    f"cannot remove FirstBlockCache from {type(owner).__name__}.{name}: it was "
                    "replaced after the cache was installed (remove that first)"
                )
        for owner, name, _, had_own, inner in reversed(self._wrapped):
            if had_own:
                setattr(owner, name, inner)
            else:
                delattr(owner, name)
        self._wrapped.clear()

    def __enter__(self) -> BlockCacheHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _residual(h: Tensor, h_in: Tensor) -> Tensor:
    """h − h_in, or h itself where the shapes differ (a block that changes the width)."""
    return h - h_in if h.shape == h_in.shape else h


def _relative_change(residual: Tensor, reference: Tensor) -> Tensor:
    """mean|r − r_ref| / mean|r_ref| in float32: 0 where r equals r_ref (also both zero, as
    on rows whose first block is skipped by skip-layer guidance, which then leave the
    decision to the other branches), infinite where only the reference is zero, NaN or
    infinite where either holds a NaN or an inf meets an inf (no threshold passes either:
    the call computes)."""
    change = (residual.float() - reference.float()).abs().mean()
    scale = reference.float().abs().mean()
    relative = torch.where(scale > 0, change / scale, torch.full_like(change, math.inf))
    return torch.where(change != 0, relative, torch.zeros_like(change))


def _keep(store: dict[str, Tensor], key: str, value: Tensor) -> None:
    """store[key] = value, copied in place when a tensor of its shape is already kept (a
    captured graph keeps reading the same tensor)."""
    kept = store.get(key)
    if kept is None or kept.shape != value.shape or kept.dtype != value.dtype:
        store[key] = value.clone()
    else:
        kept.copy_(value)


def _first_block(
    state: BlockCacheState, through: Callable, hidden: Callable[[Any], Tensor]
) -> Callable[[Callable], Callable]:
    """The first block, deciding from its input h₀ (the hidden states among its arguments,
    as ``through`` finds them, whatever their position) and its output's hidden states h₁."""

    def make(inner: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> object:
            out = inner(*args, **kwargs)
            if state.active:
                state.decide(hidden(through(args, kwargs)), hidden(out))
            return out

        return forward

    return make


def _anchoring(state: BlockCacheState) -> Callable[[Callable], Callable]:
    """A diffusers UNet's conv_in: its output h₀ is the anchor of the call's residual."""

    def make(inner: Callable) -> Callable:
        def forward(*args: object, **kwargs: object) -> Tensor:
            out = inner(*args, **kwargs)
            if state.active:
                state.anchor = out
            return out

        return forward

    return make


def _scheduled_first_block(
    state: BlockCacheState, through: Callable, hidden: Callable[[Any], Tensor]
) -> Callable[[Callable], Callable]:
    """Block 0 when a fixed schedule decides: before it runs, anchored at its input h₀, which
    it passes through on a reused call."""

    def make(inner: Callable) -> Callable:
        def forward(*args: object, **kwargs: object) -> object:
            if not state.active:
                return inner(*args, **kwargs)
            passed = through(args, kwargs)
            state.decide(hidden(passed), hidden(passed))
            return passed if state.reusing else inner(*args, **kwargs)

        return forward

    return make


def _passed_through_when_reused(state: BlockCacheState, through: Callable) -> Callable[[Callable], Callable]:
    def make(inner: Callable) -> Callable:
        def forward(*args: object, **kwargs: object) -> object:
            return through(args, kwargs) if state.active and state.reusing else inner(*args, **kwargs)

        return forward

    return make


def _last_block(
    state: BlockCacheState, hidden: Callable[[Any], Tensor], with_hidden: Callable[[tuple, dict, Tensor], object]
) -> Callable[[Callable], Callable]:
    """The last block: on a reused call the anchor plus R̂ (a transformer's h₁, which the
    blocks between passed through; a diffusers UNet's h₀) in the block's output form, else
    its output, R kept from its hidden states."""

    def make(inner: Callable) -> Callable:
        def forward(*args: object, **kwargs: object) -> object:
            if not state.active:
                return inner(*args, **kwargs)
            if state.reusing:
                assert state.base is not None  # set by the call's decide()
                return with_hidden(args, kwargs, state.reused(state.base))
            out = inner(*args, **kwargs)
            state.computed(hidden(out))
            return out

        return forward

    return make


def _unet_rest(state: BlockCacheState) -> Callable[[Callable], Callable]:
    def make(inner: Callable) -> Callable:
        def rest(h: Tensor, emb: Tensor, skips: list[Tensor]) -> Tensor:
            if not state.active:
                return inner(h, emb, skips)
            if state.reusing:
                return state.reused(h)
            out = inner(h, emb, skips)
            state.computed(out)
            return out

        return rest

    return make

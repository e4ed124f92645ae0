"""Perturb some rows of a batched forward: PAG's identity self-attention and skip-layer guidance.

Guidance against a perturbed model runs the branches in one batched forward: 3B rows
[c; u; p] (conditional, unconditional, perturbed) with CFG, 2B rows [c; p] without. The
perturbation must reach the perturbed rows only, so it is installed once and told per call
which rows it owns:

    handle = perturb_attention(model, "mid")     # or skip_blocks(model, [7, 8, 9])
    handle.rows = slice(2 * B, 3 * B)            # before each guided call; None: no row perturbed
    out = model(torch.cat([x_c, x_u, x_p]), ...)
    handle.remove()                              # the model as it was

- ``perturb_attention`` (PAG, Ahn et al. 2024): at the chosen self-attention layers the
  perturbed rows attend with the identity map, so their output is the value projection
  put through the output projection, to_out(to_v(x)), with whatever the layer does around
  the attention (diffusers' spatial_norm, group_norm, residual connection,
  rescale_output_factor) as diffusers' ``PAGIdentitySelfAttnProcessor2_0`` does it. In an
  SD3 joint-attention layer only the image-to-image block of the map is the identity: an
  image token attends to itself and to every text token, text tokens attend as usual, as
  diffusers' ``PAGJointAttnProcessor2_0`` does it (but with the layer's q/k norms, which
  that processor leaves out).
- ``skip_blocks`` (skip-layer guidance, SD3's ``skip_guidance_layers``): the chosen
  transformer blocks return their input on the perturbed rows -- hidden_states, and for an
  SD3 joint block encoder_hidden_states too -- which is what
  ``SD3Transformer2DModel.forward(..., skip_layers=...)`` does for the whole batch.

How: each perturbed module gets an instance ``forward`` that runs the forward it had
(whatever computes it: diffusers' attention processor, the one ``fastguide.accelerate()``
puts in, a custom one) on the whole batch, then computes the perturbed rows' output and
writes it over those rows (``slice_scatter``, a new tensor). So the unperturbed rows are
exactly the plain model's, rows=None is exactly the plain model, and the perturbed rows'
regular output at the chosen layers is computed and dropped (a small cost: a third of the
batch at a few layers). ``handle.rows`` is read at call time: setting it re-installs
nothing; a Python slice resolved against the batch size gives fixed shapes and no host
sync, so a CUDA graph captures one rows value; torch.compile guards on it and on the
instance forward (a rows value, an install or a remove it has not seen recompiles). So a
module keeps its wrapper object across handles: a later handle of the same kind on a
module whose forward is as the last wrapper found it installs that very wrapper again
(``fastguide.sample()`` makes a new handle per call, and a compiled model then compiles once).

``fastguide.accelerate()`` composes in either order with attention perturbations
(diffusers ``Attention``: accelerate swaps the processor under the instance forward;
fastguide's own attention it leaves as it is). A block that ``skip_blocks`` wraps is
"forward replaced on the instance" to accelerate, which leaves it unfused: call
accelerate first.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .blocks import argument, block_list, passthrough
from .diffusers_attention import enter_tokens
from .dit import Attention as DiTAttention
from .nn import AttentionBlock, QKVAttention, split_heads

# (module, rows, args, kwargs) -> what the module outputs on ``rows`` when perturbed; the module
# is the one the replacement was chosen for (a diffusers Attention, a fastguide DiT Attention, ...).
Replacement = Callable[[Any, slice, tuple, dict], object]
# A module to perturb: (its name, the module, its replacement).
Target = tuple[str, nn.Module, Replacement]
# The key in a perturbed module's __dict__ of the wrapper it had last (``_LastWrapper``).
_LAST_WRAPPER = "_fastguide_last_perturbation"


class _LastWrapper:
    """The wrapper a module had last, for the next handle of its kind to install again (a
    new wrapper object is a new forward to torch.compile's guards: a recompile). It is kept
    on the module itself, so it goes with the module: a table keyed weakly by module kept
    every module alive, since the wrapper refers to its module. A copy or pickle of the
    module leaves it behind (its replacement need not pickle; a new handle makes a new one)."""

    def __init__(self, wrapper: _PerturbedForward | None = None):
        self.wrapper = wrapper

    def __reduce__(self) -> tuple[type, tuple]:
        return _LastWrapper, ()

    def __deepcopy__(self, memo: dict) -> _LastWrapper:
        return _LastWrapper()


class Perturbation:
    """What ``perturb_attention`` or ``skip_blocks`` installed on a model.

    ``rows``: the rows of the batch (its first dim, as the perturbed modules see it: the
    model's batch) that are perturbed, a slice with step 1 (negative bounds count from the
    end, e.g. ``slice(-B, None)``), or None for none. Read at every call.
    ``layers``: the names of the perturbed modules, in the model's order; ``kind``:
    "identity attention" (``perturb_attention``) or "skipped blocks" (``skip_blocks``).
    ``remove()`` restores the model exactly; the handle is also a context manager that
    removes itself on exit.
    """

    def __init__(self, kind: str, layers: tuple[str, ...], rows: slice | None):
        self.kind = kind
        self.layers = layers
        self._installed: list[tuple[nn.Module, _PerturbedForward]] = []
        self.rows = rows

    @property
    def rows(self) -> slice | None:
        return self._rows

    @rows.setter
    def rows(self, rows: slice | None) -> None:
        if rows is not None:
            if not isinstance(rows, slice):
                raise TypeError(f"rows must be a slice or None, got {type(rows).__name__} {rows!r}")
            for bound in (rows.start, rows.stop):
                if bound is not None and (isinstance(bound, bool) or not isinstance(bound, Integral)):
                    raise TypeError(f"rows must have int (or None) bounds, got {rows!r}")
            if rows.step not in (None, 1):
                raise ValueError(f"rows must be a contiguous slice (step 1), got {rows!r}")
        self._rows = rows
        for _, wrapper in self._installed:
            wrapper.rows = rows

    def _install(self, targets: Sequence[Target]) -> None:
        """Wrap the forward of every (name, module, replacement) target, or of none when one
        of them is already perturbed."""
        for name, module, _ in targets:
            if isinstance(module.__dict__.get("forward"), _PerturbedForward):
                raise ValueError(f"layers: {name!r} is already perturbed by another Perturbation (remove that first)")
        for wrapper in [self._wrapper(name, module, replace) for name, module, replace in targets]:
            wrapper.rows = self._rows
            wrapper.module.forward = wrapper
            self._installed.append((wrapper.module, wrapper))

    def _wrapper(self, name: str, module: nn.Module, replace: Replacement) -> _PerturbedForward:
        """The wrapper ``module`` had last when it is of this kind and name and the module's
        forward is the one it wrapped (its replacement, chosen by the module and the kind,
        is then this one's); else a new one."""
        held = module.__dict__.get(_LAST_WRAPPER)
        last = held.wrapper if isinstance(held, _LastWrapper) else None
        if (
            last is not None
            and last.module is module  # (a shallow copy of the module shares its __dict__'s values)
            and last.kind == self.kind
            and last.name == name
            and last.forward_unchanged()
        ):
            return last
        wrapper = _PerturbedForward(self.kind, module, name, replace)
        module.__dict__[_LAST_WRAPPER] = _LastWrapper(wrapper)
        return wrapper

    def remove(self) -> None:
        """Put back every forward this handle replaced (a second call does nothing). Fails,
        changing nothing, when something replaced one of them after this handle did."""
        for module, wrapper in self._installed:
            if module.__dict__.get("forward") is not wrapper:
                raise RuntimeError(
                    f"cannot remove the perturbation of {wrapper.name!r}: its forward was replaced "
                    "after the perturbation was installed (remove that first)"
                )
        for module, wrapper in reversed(self._installed):
            wrapper.rows = None
            if wrapper.had_own_forward:
                module.forward = wrapper.inner
            else:
                del module.forward
        self._installed.clear()

    def __enter__(self) -> Perturbation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if not self._installed else f"rows={self._rows!r}"
        return f"Perturbation({self.kind}, layers={list(self.layers)}, {state})"


class _PerturbedForward:
    """A module's instance forward while it is perturbed: the forward it had, with the
    rows ``rows`` (its handle's, which sets them) replaced by ``replace``'s output."""

    def __init__(self, kind: str, module: nn.Module, name: str, replace: Replacement):
        self.kind, self.module, self.name, self.replace = kind, module, name, replace
        self.rows: slice | None = None
        self.had_own_forward = "forward" in module.__dict__
        self.inner = module.forward
        self.class_forward = type(module).forward

    def forward_unchanged(self) -> bool:
        """Whether the module's forward is (while this wrapper is not installed) the one it wrapped."""
        own = self.module.__dict__.get("forward")
        if self.had_own_forward:
            return own is self.inner
        return own is None and type(self.module).forward is self.class_forward

    def __call__(self, *args: object, **kwargs: object) -> object:
        out = self.inner(*args, **kwargs)
        rows = self.rows
        if rows is None:
            return out
        batch = _first_tensor(out, self.name).shape[0]
        for bound in (rows.start, rows.stop):
            if bound is not None and not -batch <= bound <= batch:
                raise ValueError(
                    f"rows {rows!r} reaches past the batch of {batch} rows (perturbed module {self.name!r})"
                )
        start, stop = _bound(rows.start, batch, 0), _bound(rows.stop, batch, batch)
        if start >= stop:
            return out
        return _scatter(out, self.replace(self.module, slice(start, stop), args, kwargs), start, stop, self.name)


def _bound(bound: int | None, batch: int, default: int) -> int:
    """A slice bound within [-batch, batch] as a row index in [0, batch], as
    ``slice.indices`` gives it (which torch 2.11's dynamo, the GPU image's, cannot trace: a
    graph break that sent the whole compiled forward back to eager)."""
    if bound is None:
        return default
    return bound + batch if bound < 0 else bound


def _first_tensor(out: object, name: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple):
        for item in out:
            if isinstance(item, Tensor):
                return item
    raise TypeError(f"perturbed module {name!r} returned {type(out).__name__}, not a tensor or a tuple of tensors")


def _scatter(out: object, replacement: object, start: int, stop: int, name: str) -> object:
    """``out`` with rows [start, stop) of each tensor replaced by ``replacement``'s (a new
    tensor; None entries of a tuple stay None)."""
    if isinstance(out, Tensor) and isinstance(replacement, Tensor):
        return out.slice_scatter(replacement.to(out.dtype), 0, start, stop)
    if isinstance(out, tuple) and isinstance(replacement, tuple) and len(out) == len(replacement):
        return tuple(o if o is None else _scatter(o, r, start, stop, name) for o, r in zip(out, replacement))
    raise TypeError(
        f"perturbed module {name!r} returned {type(out).__name__}, which the perturbation cannot "
        f"merge with its {type(replacement).__name__}"
    )


def _installed(kind: str, model: object, select: Callable[[], list[Target]], rows: slice | None) -> Perturbation:
    """A handle of ``kind`` installed on the targets ``select`` picks in ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = select()
    handle = Perturbation(kind, tuple(name for name, _, _ in targets), rows)
    handle._install(targets)
    return handle


# ---- PAG: identity self-attention -------------------------------------------------------


def _identity_diffusers_attention(attn: Any, rows: slice, args: tuple, kwargs: dict) -> object:
    """diffusers ``Attention`` with an identity attention map on ``rows``: to_out(to_v(x))
    with the layer's spatial_norm, group_norm, residual and rescale, as
    ``PAGIdentitySelfAttnProcessor2_0`` computes its perturbed chunk; a joint (SD3) call
    goes to ``_identity_joint_attention``."""
    hidden_states = argument(args, kwargs, 0, "hidden_states")
    encoder_hidden_states = argument(args, kwargs, 1, "encoder_hidden_states")
    if encoder_hidden_states is not None:
        if getattr(attn, "add_v_proj", None) is None:
            raise ValueError(
                "perturb_attention perturbs self-attention and SD3's joint attention, but a perturbed "
                f"diffusers Attention (processor {type(attn.processor).__name__}) was called with "
                "encoder_hidden_states, which its processor attends to"
            )
        problem = _joint_problem(attn)
        if problem:
            raise ValueError(f"perturb_attention cannot perturb this joint attention: {problem}")
        return _identity_joint_attention(attn, hidden_states[rows], encoder_hidden_states[rows])
    x = residual = hidden_states[rows]
    if attn.spatial_norm is not None:
        x = attn.spatial_norm(x, kwargs["temb"][rows])
    tokens, leave = enter_tokens(attn, x, residual)
    return leave(attn.to_out[1](attn.to_out[0](attn.to_v(tokens))))


def _joint_problem(attn: Any) -> str | None:
    """Why the identity map of ``_identity_joint_attention`` is not this layer's (None when it
    is): it writes out SD3's ``JointAttnProcessor2_0``; another processor on added K/V
    projections (HunyuanVideo's, with a text mask and rotary embeddings) computes something else."""
    processor = type(getattr(attn, "processor", None)).__name__
    if processor != "JointAttnProcessor2_0":
        return f"processor {processor} (the identity map is written for SD3's JointAttnProcessor2_0)"
    return None


def _identity_joint_attention(attn: Any, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
    """SD3 joint attention (JointAttnProcessor2_0's projections and q/k norms) whose map is
    the identity on the image-to-image block: image token i attends to itself and to every
    context token; context tokens attend to all tokens as usual. Returns (image output,
    context output) as the processor does: to_add_out on the context unless context_pre_only."""
    batch, heads = x.shape[0], attn.heads

    def project(linear: nn.Module, norm: nn.Module | None, tokens: Tensor) -> Tensor:
        out = linear(tokens)
        out = out.view(batch, -1, heads, out.shape[-1] // heads).transpose(1, 2)
        return out if norm is None else norm(out)

    q, k, v = (project(attn.to_q, attn.norm_q, x), project(attn.to_k, attn.norm_k, x), project(attn.to_v, None, x))
    cq, ck, cv = (
        project(attn.add_q_proj, attn.norm_added_q, context),
        project(attn.add_k_proj, attn.norm_added_k, context),
        project(attn.add_v_proj, None, context),
    )
    scale = q.shape[-1] ** -0.5
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ ck.transpose(-1, -2)], dim=-1) * scale
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    image = weights[..., :1] * v + weights[..., 1:] @ cv
    text = F.scaled_dot_product_attention(cq, torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2))
    image, text = (t.transpose(1, 2).reshape(batch, -1, heads * t.shape[-1]).to(q.dtype) for t in (image, text))
    image = attn.to_out[1](attn.to_out[0](image))
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    return image, text


def _identity_dit_attention(attn: DiTAttention, rows: slice, args: tuple, kwargs: dict) -> Tensor:
    """fastguide DiT ``Attention`` with an identity map: proj(V(x)), V the last third of
    the [Q; K; V] qkv projection (its heads in the order the attention output uses)."""
    x = argument(args, kwargs, 0, "x")[rows]
    width = attn.proj.in_features
    return attn.proj(F.linear(x, attn.qkv.weight[2 * width :], attn.qkv.bias[2 * width :]))


def _identity_qkv_attention(attention: QKVAttention, rows: slice, args: tuple, kwargs: dict) -> Tensor:
    """fastguide UNet ``QKVAttention`` with an identity map: each head's v, (B, C, T) as
    its forward lays out softmax(q·kᵀ/√d)·v."""
    qkv = argument(args, kwargs, 0, "qkv")[rows]
    batch, width, length = qkv.shape
    _, _, v = split_heads(qkv, attention.num_heads, attention.legacy_order)
    return v.transpose(-1, -2).reshape(batch, width // 3, length)


def _self_attention(model: nn.Module) -> dict[str, tuple[nn.Module, Replacement]]:
    """The self-attention modules PAG can perturb, by name: diffusers ``Attention`` that is
    not cross-attention (what diffusers' PAG pipelines select), fastguide DiT ``Attention``,
    and the ``attention`` (QKVAttention) of fastguide UNet ``AttentionBlock``s."""
    diffusers_attention = getattr(sys.modules.get("diffusers.models.attention_processor"), "Attention", None)
    found: dict[str, tuple[nn.Module, Replacement]] = {}
    for name, module in model.named_modules():
        if diffusers_attention is not None and isinstance(module, diffusers_attention):
            if not module.is_cross_attention:
                found[name] = (module, _identity_diffusers_attention)
        elif isinstance(module, DiTAttention):
            found[name] = (module, _identity_dit_attention)
        elif isinstance(module, AttentionBlock):
            found[f"{name}.attention" if name else "attention"] = (module.attention, _identity_qkv_attention)
    return found


def _matches(layer: str, name: str) -> bool:
    """diffusers' PAG layer test (``PAGMixin._set_pag_attn_processor``): ``re.search(layer,
    name)``, unless the last dot-parts of both are the same number. As there, "blocks.1"
    also matches "transformer_blocks.10.attn" (the attention's name ends in "attn", so the
    number test never applies): anchor it, r"blocks\\.1\\.", for block 1 alone. A pattern
    that is a whole name ("mid_block.attentions.0") picks that module."""
    last_layer, last_name = layer.split(".")[-1], name.split(".")[-1]
    fake_integral = last_layer.isnumeric() and last_name.isnumeric() and last_layer == last_name
    if fake_integral:  # (diffusers refuses the whole name too; taken here, as it is unambiguous)
        return re.fullmatch(layer, name) is not None
    return re.search(layer, name) is not None


def _names(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def perturb_attention(model: nn.Module, layers: str | Sequence[str], rows: slice | None = None) -> Perturbation:
    """Perturbed-attention guidance's perturbation: identity self-attention on ``rows``.

    ``layers``: one or more patterns picking self-attention modules by name, as diffusers'
    ``pag_applied_layers``: each is a regular expression searched in the module names
    ("mid", "blocks.1", "down_blocks.1", "blocks.(1|2)"); each must pick at least one.
    ``rows``: the initial ``handle.rows`` (None: none perturbed until set).
    Works on diffusers models (any ``Attention`` that is not cross-attention, e.g.
    UNet2DConditionModel's attn1, PixArt's attn1, and SD3's joint attn under its
    ``JointAttnProcessor2_0``; other joint attention is refused) and fastguide's DiT and
    UNet. Returns the handle; ``handle.remove()`` undoes it.
    """
    return _installed("identity attention", model, functools.partial(_attention_targets, model, layers), rows)


def attention_patterns(layers: object) -> tuple[str, ...]:
    """``layers`` of ``perturb_attention`` (a pattern or a non-empty sequence of them) as a
    tuple of patterns; TypeError for anything else."""
    patterns = [layers] if isinstance(layers, str) else layers
    if not isinstance(patterns, Sequence) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"layers must be a layer-name pattern or a non-empty sequence of them, got {layers!r}")
    return tuple(patterns)


def _attention_targets(model: nn.Module, layers: str | Sequence[str]) -> list[Target]:
    """The self-attention modules the patterns ``layers`` pick, checked, in the model's order."""
    patterns = attention_patterns(layers)
    candidates = _self_attention(model)
    if not candidates:
        raise ValueError(
            f"model ({type(model).__name__}) has no self-attention to perturb: perturb_attention "
            "perturbs diffusers Attention modules that are not cross-attention, fastguide DiT "
            "Attention and fastguide UNet AttentionBlock"
        )
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            picked = {name for name in candidates if _matches(pattern, name)}
        except re.error as error:
            raise ValueError(f"layers: {pattern!r} is not a regular expression ({error})") from None
        if not picked:
            raise ValueError(
                f"layers: {pattern!r} matches no self-attention module; they are: {_names(list(candidates))}"
            )
        chosen |= picked
    names = tuple(name for name in candidates if name in chosen)
    for name in names:
        module = candidates[name][0]
        if getattr(module, "add_v_proj", None) is not None:
            problem = _joint_problem(module)
            if problem:
                raise ValueError(
                    f"layers: {name!r} is joint attention that perturb_attention cannot perturb: {problem}"
                )
    return [(name, *candidates[name]) for name in names]


# ---- SLG: skipped blocks ----------------------------------------------------------------


def _skip_block(block: nn.Module) -> Replacement:
    """The replacement of a skipped block: its input passed through (``blocks.passthrough``)
    on ``rows``."""
    through = passthrough(block)

    def replace(module: nn.Module, rows: slice, args: tuple, kwargs: dict) -> object:
        out = through(args, kwargs)
        return out[rows] if isinstance(out, Tensor) else tuple(t[rows] for t in out)

    return replace


def skip_blocks(model: nn.Module, layers: int | Sequence[int], rows: slice | None = None) -> Perturbation:
    """Skip-layer guidance's perturbation: the blocks ``layers`` pass their input through on ``rows``.

    ``layers``: indices into the model's block list (``transformer_blocks``, or ``blocks``
    for fastguide's DiT), as SD3's ``skip_guidance_layers``. A skipped block returns its
    input on the perturbed rows: hidden_states, and an SD3 joint block
    (encoder_hidden_states, hidden_states), as ``SD3Transformer2DModel``'s ``skip_layers``
    leaves both. ``rows``: the initial ``handle.rows``. Returns the handle.
    """
    return _installed("skipped blocks", model, functools.partial(_block_targets, model, layers), rows)


def block_indices(layers: object) -> tuple[int, ...]:
    """``layers`` of ``skip_blocks`` (a block index or a non-empty sequence of them) as a
    tuple of ints; TypeError for anything else (bools included)."""
    single = isinstance(layers, Integral) and not isinstance(layers, bool)
    indices = cast("Sequence[int]", [layers] if single else layers)
    if (
        not isinstance(indices, Sequence)
        or not indices
        or not all(isinstance(i, Integral) and not isinstance(i, bool) for i in indices)
    ):
        raise TypeError(f"layers must be a block index or a non-empty sequence of them, got {layers!r}")
    return tuple(int(i) for i in indices)


def _block_targets(model: nn.Module, layers: int | Sequence[int]) -> list[Target]:
    """The blocks at indices ``layers`` of the model's block list, checked, in order."""
    indices = block_indices(layers)
    attribute, blocks = block_list(model, "skip_blocks")
    for index in indices:
        if not 0 <= index < len(blocks):
            raise ValueError(
                f"layers: block {index} does not exist; model.{attribute} holds blocks 0..{len(blocks) - 1}"
            )
    chosen = sorted(set(indices))
    for index in chosen:
        shared = [other for other, block in enumerate(blocks) if block is blocks[index] and other != index]
        if shared:
            raise ValueError(
                f"layers: model.{attribute}[{index}] is the same module as block(s) {shared} (shared "
                "weights): skip_blocks skips a module wherever it runs, so it cannot skip one position of it"
            )
    return [(f"{attribute}.{index}", blocks[index], _skip_block(blocks[index])) for index in chosen]

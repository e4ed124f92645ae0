"""``accelerate(module)``: put fastguide's fused ops under an existing PyTorch UNet or DiT, in place.

Only what the fused ops reproduce exactly is swapped, recognised by known class (by name and
defining module, never by import: diffusers need not be installed) and exact structure;
everything else is left as it was and reported with the reason.

- diffusers ``Attention`` whose processor is exactly diffusers' ``AttnProcessor`` or
  ``AttnProcessor2_0``: a ``FastguideAttnProcessor`` that mirrors it on ``ops.attention``
  (masked calls go to the processor it replaced). Left alone: any other processor (added-KV,
  IP-Adapter, LoRA, xformers, custom, ...), added-KV projections, spatial_norm, kv_heads,
  no to_k/to_v/to_out, a head_dim ``ops.attention`` does not take.
- diffusers ``ResnetBlock2D`` with SiLU, "default" or "scale_shift" time embedding and plain
  GroupNorms: its forward is rebound so that norm1 → SiLU and norm2 → (temb add or
  scale-shift) → SiLU are each one ``ops.group_norm`` call.
- ADM ``ResBlock`` (exactly in_layers [GroupNorm, SiLU, conv], emb_layers, out_layers
  [GroupNorm, SiLU, Dropout, conv], skip_connection, optional h_upd/x_upd, forward(x, emb))
  and ``AttentionBlock`` (exactly norm, qkv a 1x1 Conv1d, attention, proj_out, forward(x);
  no encoder_kv): rebound to fused forwards, qkv read as views in the module's head order,
  which is found by running its ``attention`` once on a small random input.
- diffusers ``AdaLayerNormZero`` (exactly nn.SiLU, nn.Linear to 6·D, an exact nn.LayerNorm;
  its forward's signature as mirrored): rebound so that LayerNorm → (1 + scale_msa), + shift_msa
  is one ``ops.layer_norm`` call.
- diffusers ``BasicTransformerBlock`` with norm_type "ada_norm_zero" (DiT's block), without
  cross-attention or an in-block positional embedding, norm1 diffusers' AdaLayerNormZero, norm3
  an exact nn.LayerNorm: rebound so that the attention's gated residual and norm3's modulation
  are one ``ops.gated_residual_layer_norm`` pass and the MLP's gated residual is
  ``ops.gated_residual``; calls with chunked feed-forward, GLIGEN or a LoRA scale go to the
  class forward. ``DiTTransformer2DModel.norm_out`` stays as it is (the model's own forward
  modulates it) and is reported under "LayerNorm".
- every other ``nn.GroupNorm`` (exactly that class, or guided-/improved-diffusion's
  ``GroupNorm32``), without hooks: replaced by ``FusedGroupNorm`` sharing its parameters;
  diffusers' ``conv_norm_out`` → ``conv_act`` (SiLU) pair, which diffusers' forwards always
  call back to back, becomes one fused call.
A module that is left alone keeps its whole subtree, GroupNorms included, bit for bit.
Parameters are shared, not copied: state dicts keep their keys.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops.validation import norm_eps_in_range
from .diffusers_attention import enter_tokens
from .nn import GroupNorm32, split_heads

log = logging.getLogger(__name__)

DIFFUSERS_ATTENTION = "diffusers Attention"
DIFFUSERS_RESNET = "diffusers ResnetBlock2D"
DIFFUSERS_ADA_NORM_ZERO = "diffusers AdaLayerNormZero"
DIFFUSERS_ADA_NORM_ZERO_BLOCK = "diffusers BasicTransformerBlock"
ADM_RESBLOCK = "ADM ResBlock"
ADM_ATTENTION = "ADM AttentionBlock"
GROUP_NORM = "GroupNorm"
LAYER_NORM = "LayerNorm"

ALREADY = "already fastguide"
LEFT_ALONE_PARENT = "inside a module left alone"

# GroupNorm subclasses whose forward is GroupNorm in float32 cast back to x's dtype, which is
# what ops.group_norm computes (ADM's GroupNorm32). GLIDE's GroupNorm32 is not one: it adds
# a swish.
_FP32_GROUP_NORMS = {("guided_diffusion.nn", "GroupNorm32"), ("improved_diffusion.nn", "GroupNorm32")}
_PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm through ops.group_norm (fp32 statistics), optionally fused with SiLU."""

    def __init__(self, source: nn.GroupNorm, activation: str | None = None):
        super().__init__(source.num_groups, source.num_channels, source.eps, source.affine, device="meta")
        self.weight, self.bias = source.weight, source.bias  # shared, not copied
        self.activation = activation
        self.train(source.training)  # in the mode of the model it joins

    def forward(
        self, x: Tensor, *, scale: Tensor | None = None, shift: Tensor | None = None, activation: str | None = None
    ) -> Tensor:
        return ops.group_norm(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            scale=scale,
            shift=shift,
            activation=activation or self.activation,
        )


def _is_fastguide(m: object) -> bool:
    return type(m).__module__.split(".")[0] == "fastguide"


def _has_hooks(m: nn.Module) -> bool:
    """Hooks that replacing the module would lose: torch's module hooks, accelerate's _hf_hook,
    and diffusers' HookRegistry (``_diffusers_hook``: group offloading, layer skipping, the
    caches), which wraps the instance's forward."""
    return (
        hasattr(m, "_hf_hook")
        or hasattr(m, "_diffusers_hook")
        or "forward" in m.__dict__
        or any(
            getattr(m, name, None)
            for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        )
    )


def _hooked(m: nn.Module, skipped: dict[str, object]) -> str | None:
    """Why the fused forward of ``m`` would drop hooks: some of the ``skipped`` submodules
    (name: module), which it does not call, have them; None when none has."""
    hooked = [name for name, child in skipped.items() if isinstance(child, nn.Module) and _has_hooks(child)]
    return f"hooks registered on {', '.join(hooked)}, which the fused forward does not call" if hooked else None


def _own_forward_problem(m: nn.Module) -> str | None:
    """Why the forward of a module recognised by its structure (an ADM block, from any code
    base) may not be the one the fused forward reproduces: one set on the instance, or a
    subclass's override of the block's forward or of the _forward it checkpoints (ADM's
    blocks define both in one class, below an abstract TimestepBlock.forward at most);
    None when neither."""
    if "forward" in m.__dict__:  # accelerate's hooks, patches: not the forward we reproduce
        return "forward replaced on the instance"
    owners = {}
    for name in ("forward", "_forward"):
        concrete = [  # the classes defining it, base-most last
            c
            for c in type(m).__mro__
            if c is not nn.Module
            and name in c.__dict__
            and not getattr(c.__dict__[name], "__isabstractmethod__", False)
        ]
        # one function assigned in a subclass (forward = Base.forward) is no override
        distinct = [
            c for i, c in enumerate(concrete) if all(c.__dict__[name] is not d.__dict__[name] for d in concrete[:i])
        ]
        if len(distinct) > 1:
            return f"{distinct[0].__qualname__}.{name} overrides {distinct[1].__qualname__}'s"
        owners[name] = concrete[-1] if concrete else None
    if owners["_forward"] is not None and owners["_forward"] is not owners["forward"]:
        forward_owner, inner_owner = owners["forward"], owners["_forward"]
        return (
            f"forward from {getattr(forward_owner, '__qualname__', None)} and _forward from "
            f"{inner_owner.__qualname__} (a subclass's override)"
        )
    return None


def _has_own_tensors(m: nn.Module) -> bool:
    return any(t is not None for t in (*m._parameters.values(), *m._buffers.values()))


def _takes_exactly(forward: Callable, count: int) -> bool:
    """forward takes exactly ``count`` positional inputs: no optional ones, no *args/**kwargs."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len(params) == count and all(p.kind in plain and p.default is p.empty for p in params)


def _rebound_by_us(m: nn.Module) -> bool:
    """Whether m's forward is one of ours, bound as functools.partial(fused_forward, m): a
    partial of a module-level function pickles by name (a bound method of a function that
    is not m's class's does not: torch.save would write it, torch.load fail)."""
    forward = m.__dict__.get("forward")
    return getattr(forward, "func", None) in _FUSED_FORWARDS


def _head_dim_problem(head_dim: int) -> str | None:
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return f"head_dim {head_dim} (ops.attention takes multiples of 8 up to 256)"
    return None


def _eps_skip(eps: object) -> str | None:
    """Why a norm with this ``eps`` cannot run as the ops (they take a real number within
    float32's normal range, ``norm_eps_in_range``); None when it can."""
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not (0 < eps < math.inf and norm_eps_in_range(eps))
    ):
        return f"eps {eps!r} (fused: a number within float32's normal range)"
    return None


def _group_norm_skip(m: nn.GroupNorm) -> str | None:
    """Why the GroupNorm ``m`` cannot become a FusedGroupNorm; None when it can."""
    if _is_fastguide(m):
        return ALREADY
    cls = type(m)
    if cls is not nn.GroupNorm and (cls.__module__, cls.__name__) not in _FP32_GROUP_NORMS:
        return f"class {cls.__module__}.{cls.__qualname__} (a subclass whose forward may differ)"
    if _has_hooks(m):
        return "hooks registered on it"
    return _eps_skip(m.eps)


def _fusable_norm(m: object) -> str | None:
    """Why ``m`` will not take activation/scale/shift once the walk is done; None when it will
    (it is fastguide's, or a GroupNorm that the walk replaces)."""
    if type(m) in (FusedGroupNorm, GroupNorm32):
        return None
    if not isinstance(m, nn.GroupNorm):
        return f"{type(m).__name__} is not a GroupNorm"
    return _group_norm_skip(m)


# ---- diffusers ----------------------------------------------------------------------


def _fused_resnet_block_forward(self, input_tensor: Tensor, temb: Tensor | None, *args, **kwargs) -> Tensor:
    h = self.norm1(input_tensor, activation="silu")
    if self.upsample is not None:
        if h.shape[0] >= 64:  # diffusers' own: upsample_nearest_nhwc fails on large batches (its #984)
            input_tensor, h = input_tensor.contiguous(), h.contiguous()
        input_tensor, h = self.upsample(input_tensor), self.upsample(h)
    elif self.downsample is not None:
        input_tensor, h = self.downsample(input_tensor), self.downsample(h)
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        if temb is None:  # (diffusers' own block fails on it too, less clearly)
            raise ValueError("temb must be given to a ResnetBlock2D with a time embedding (temb_channels)")
        if not self.skip_time_act:
            temb = F.silu(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        assert temb is not None  # (it has a time_emb_proj: _check_diffusers_resnet)
        scale, shift = temb.chunk(2, dim=1)
        if scale.shape[0] == h.shape[0]:
            h = self.norm2(h, scale=scale, shift=shift, activation="silu")
        else:  # a time embedding of another batch: diffusers broadcasts it, the fused norm takes one per sample
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            h = h + temb
        h = self.norm2(h, activation="silu")
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        if self.training:  # diffusers' own: DDP's gradient strides (its #12975)
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def _check_diffusers_resnet(m: nn.Module) -> str | Callable[[], None]:
    if _rebound_by_us(m):
        return ALREADY
    if "forward" in m.__dict__:  # accelerate's hooks, patches: not the forward we reproduce
        return "forward replaced on the instance"
    if type(getattr(m, "nonlinearity", None)) is not nn.SiLU:
        return f"nonlinearity {type(getattr(m, 'nonlinearity', None)).__name__} (fused: SiLU only)"
    time_norm = getattr(m, "time_embedding_norm", None)
    if time_norm not in ("default", "scale_shift"):
        return f"time_embedding_norm {time_norm!r}"
    if time_norm == "scale_shift" and getattr(m, "time_emb_proj", None) is None:
        return "scale_shift without time_emb_proj"
    for name in ("norm1", "norm2"):
        reason = _fusable_norm(getattr(m, name, None))
        if reason:
            return f"{name}: {reason}"
    reason = _hooked(m, {"nonlinearity": m.nonlinearity})  # (fused into the norms)
    if reason:
        return reason

    def swap() -> None:
        m.forward = functools.partial(_fused_resnet_block_forward, m)

    return swap


class FastguideAttnProcessor:
    """diffusers' ``AttnProcessor`` / ``AttnProcessor2_0`` on ops.attention, step for step.

    o = softmax(q·kᵀ·scale)·v with fp32 accumulation (so AttnProcessor's upcast flags are
    met); scale is ``attn.scale`` as AttnProcessor uses it, or head_dim^-1/2 as
    AttnProcessor2_0's scaled_dot_product_attention uses it (it ignores attn.scale), and
    norm_q/norm_k apply as AttnProcessor2_0 applies them (AttnProcessor ignores them).
    Calls it cannot run the same way (an attention mask, spatial_norm, an unsupported
    head_dim, a context whose batch is not the hidden states': diffusers raises or
    broadcasts there, never mixes samples; an empty sequence; diffusers' layer skipping
    of attention scores, which intercepts scaled_dot_product_attention) go to
    ``fallback``, the processor it replaced.
    """

    def __init__(self, fallback: Any = None):
        # None: built by class, as diffusers' loaders rebuild a processor (type(processor)());
        # each layer then takes the processor diffusers' Attention picks by default (_fallback).
        self.fallback = fallback

    def _fallback(self, attn) -> Any:
        """The processor this one stands in for: the one it replaced, else the one diffusers'
        Attention would pick (AttnProcessor2_0, or AttnProcessor where scale_qk is off)."""
        return self.fallback if self.fallback is not None else _diffusers_default(getattr(attn, "scale_qk", True))

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        head_dim = attn.inner_dim // attn.heads if hasattr(attn, "inner_dim") else None
        fallback = self._fallback(attn)
        if (
            attention_mask is not None
            or attn.spatial_norm is not None
            or head_dim is None
            or _head_dim_problem(head_dim)
            or hidden_states.numel() == 0
            or (
                encoder_hidden_states is not None
                and (encoder_hidden_states.shape[0] != hidden_states.shape[0] or encoder_hidden_states.numel() == 0)
            )
            or _skipping_attention_scores()
        ):
            return fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        name = type(fallback).__name__
        hidden_states, leave = enter_tokens(attn, hidden_states, residual=hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if name != "AttnProcessor":  # (AttnProcessor ignores norm_q and norm_k)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
        # (AttnProcessor2_0's scaled_dot_product_attention ignores attn.scale)
        out = ops.attention(q, k, v, scale=None if name == "AttnProcessor2_0" else attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        return leave(attn.to_out[1](attn.to_out[0](out)))


@functools.cache
def _diffusers_default(scale_qk: bool) -> Any:
    """The processor diffusers' Attention picks by default (stateless, so one is shared)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor2_0() if scale_qk else AttnProcessor()


def _skipping_attention_scores() -> bool:
    """Whether diffusers' layer skipping with skip_attention_scores (PAG's, skip-layer
    guidance's) is on: it swaps F.scaled_dot_product_attention's result for v inside a
    TorchFunctionMode, and ops.attention makes no such call, so the call goes to the
    processor that does."""
    if not torch._C._is_torch_function_mode_enabled():
        return False
    stack = torch.overrides._get_current_function_mode_stack()
    return any(type(mode).__name__ == "AttentionScoreSkipFunctionMode" for mode in stack)


@functools.cache  # (once: every swapped layer asks)
def _register_for_layer_skipping() -> None:
    """diffusers' layer skipping looks each processor's skip function up by its class:
    fastguide's takes AttnProcessor2_0's (the block's input returned, for skip_attention).
    (diffusers releases without these hooks have nothing to register with.)"""
    try:
        from diffusers.hooks._helpers import AttentionProcessorRegistry
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError:
        return
    AttentionProcessorRegistry.register(FastguideAttnProcessor, AttentionProcessorRegistry.get(AttnProcessor2_0))


def _is_diffusers_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "Attention" and hasattr(m, "set_processor") and hasattr(m, "to_q")


def _check_diffusers_attention(m: Any) -> str | Callable[[], None]:  # a diffusers Attention
    processor = getattr(m, "processor", None)
    if isinstance(processor, FastguideAttnProcessor):
        return ALREADY
    if hasattr(m, "_diffusers_hook"):
        # e.g. layer skipping's AttentionProcessorSkipHook, which catches the processor's
        # F.scaled_dot_product_attention call: fastguide's processor makes none
        return "a diffusers hook on it"
    cls = type(processor)
    if cls.__name__ not in _PLAIN_PROCESSORS or cls.__module__.split(".")[0] != "diffusers":
        return f"processor {cls.__name__}"
    if getattr(m, "added_kv_proj_dim", None) is not None or any(
        getattr(m, name, None) is not None for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    ):
        return "added-KV projections"
    to_out = getattr(m, "to_out", None)
    if getattr(m, "to_k", None) is None or getattr(m, "to_v", None) is None or to_out is None or len(to_out) != 2:
        return "no to_k/to_v/to_out"
    if getattr(m, "spatial_norm", None) is not None:
        return "spatial_norm"
    inner = getattr(m, "inner_dim", None)
    if not isinstance(inner, int) or inner % m.heads:
        return "no inner_dim divisible by heads"
    if getattr(m, "inner_kv_dim", inner) != inner:
        return "kv_heads != heads"
    reason = _head_dim_problem(inner // m.heads)
    if reason:
        return reason

    def swap() -> None:
        _register_for_layer_skipping()
        m.set_processor(FastguideAttnProcessor(processor))

    return swap


# ---- diffusers adaLN-Zero (DiT) -------------------------------------------------------

# The forward signatures the fused forwards below mirror (diffusers 0.42); a class
# whose forward takes other arguments is a version they do not reproduce.
_ADA_NORM_ZERO_ARGS = ("self", "x", "timestep", "class_labels", "hidden_dtype", "emb")
_BLOCK_ARGS = (
    "self",
    "hidden_states",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "timestep",
    "cross_attention_kwargs",
    "class_labels",
    "added_cond_kwargs",
)


def _is_diffusers(m: object, class_name: str) -> bool:
    return type(m).__name__ == class_name and type(m).__module__.startswith("diffusers.")


def _argument_names(forward: Callable) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return None


def _layer_norm_skip(m: object) -> str | None:
    """Why ``m`` cannot run as ops.layer_norm; None when it can (exactly nn.LayerNorm over
    one last dim, no hooks)."""
    if type(m) is not nn.LayerNorm:
        return f"{type(m).__name__} is not exactly nn.LayerNorm"
    if _has_hooks(m):
        return "hooks registered on it"
    if len(m.normalized_shape) != 1:
        return f"normalized_shape {tuple(m.normalized_shape)} (fused: the last dim only)"
    return _eps_skip(m.eps)


def _modulation_fuses(x: Tensor, *per_sample: Tensor) -> bool:
    """Whether ops can compute diffusers' ``f(x)·(1 + scale[:, None]) + shift[:, None]`` here:
    x (N, L, D) and per-sample (N, D) tensors of x's dtype (a different dtype would promote
    diffusers' result, which the ops, returning x's dtype, would not)."""
    return x.dim() == 3 and all(t.shape == (x.shape[0], x.shape[2]) and t.dtype == x.dtype for t in per_sample)


def _fused_ada_layer_norm_zero_forward(
    self,
    x: Tensor,
    timestep: Tensor | None = None,
    class_labels: Tensor | None = None,
    hidden_dtype: torch.dtype | None = None,
    emb: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    if _modulation_fuses(x, scale_msa):
        x = ops.layer_norm(
            x,
            self.norm.normalized_shape,
            self.norm.weight,
            self.norm.bias,
            self.norm.eps,
            scale=scale_msa,
            shift=shift_msa,
        )
    else:
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _check_ada_layer_norm_zero(m: Any) -> str | Callable[[], None]:  # a diffusers AdaLayerNormZero
    if _rebound_by_us(m):
        return ALREADY
    if "forward" in m.__dict__:
        return "forward replaced on the instance"
    if _argument_names(type(m).forward) != _ADA_NORM_ZERO_ARGS:
        return "forward signature of another diffusers version"
    if type(getattr(m, "silu", None)) is not nn.SiLU or type(getattr(m, "linear", None)) is not nn.Linear:
        return "silu/linear are not exactly nn.SiLU/nn.Linear"
    reason = _layer_norm_skip(getattr(m, "norm", None))
    if reason:
        return f"norm: {reason}"
    if m.linear.out_features != 6 * m.norm.normalized_shape[0]:
        return "linear does not give 6 modulations of the normalised width"

    def swap() -> None:
        m.forward = functools.partial(_fused_ada_layer_norm_zero_forward, m)

    return swap


def _fused_ada_norm_zero_block_forward(
    self,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    timestep: Tensor | None = None,
    cross_attention_kwargs: dict | None = None,
    class_labels: Tensor | None = None,
    added_cond_kwargs: dict | None = None,
) -> Tensor:
    """BasicTransformerBlock.forward's ada_norm_zero path without cross-attention:

        h ← h + gate_msa·attn1(norm1(h))                      (norm1 modulates itself)
        h ← h + gate_mlp·ff(norm3(h)·(1 + scale_mlp) + shift_mlp)

    the first residual and norm3's modulation in one ops.gated_residual_layer_norm pass.
    Calls with what this path leaves out (chunked feed-forward, GLIGEN, the deprecated
    LoRA scale, whose warning the class forward logs) go to the class forward."""
    if self._chunk_size is not None or any(
        (cross_attention_kwargs or {}).get(key) is not None for key in ("gligen", "scale")
    ):
        return type(self).forward(
            self,
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            timestep,
            cross_attention_kwargs,
            class_labels,
            added_cond_kwargs,
        )
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
        hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype
    )
    # (a None "gligen" entry, which the class forward pops before attn1, popped here too)
    attention_kwargs = {key: value for key, value in (cross_attention_kwargs or {}).items() if key != "gligen"}
    attn_output = self.attn1(
        norm_hidden_states,
        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=attention_mask,
        **attention_kwargs,
    )
    norm3 = self.norm3
    if (
        _modulation_fuses(hidden_states, gate_msa, scale_mlp, shift_mlp)
        and attn_output.shape == hidden_states.shape
        and attn_output.dtype == hidden_states.dtype
    ):
        hidden_states, norm_hidden_states = ops.gated_residual_layer_norm(
            hidden_states,
            attn_output,
            gate_msa,
            norm3.normalized_shape,
            norm3.weight,
            norm3.bias,
            norm3.eps,
            scale=scale_mlp,
            shift=shift_mlp,
        )
    else:
        hidden_states = gate_msa.unsqueeze(1) * attn_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        norm_hidden_states = norm3(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff_output = self.ff(norm_hidden_states)
    if (
        _modulation_fuses(hidden_states, gate_mlp)
        and ff_output.shape == hidden_states.shape
        and ff_output.dtype == hidden_states.dtype
    ):
        return ops.gated_residual(hidden_states, ff_output, gate_mlp)
    hidden_states = gate_mlp.unsqueeze(1) * ff_output + hidden_states
    return hidden_states.squeeze(1) if hidden_states.ndim == 4 else hidden_states


def _is_ada_norm_zero_block(m: nn.Module) -> bool:
    return _is_diffusers(m, "BasicTransformerBlock") and getattr(m, "norm_type", None) == "ada_norm_zero"


def _check_ada_norm_zero_block(m: nn.Module) -> str | Callable[[], None]:
    if _rebound_by_us(m):
        return ALREADY
    if "forward" in m.__dict__:
        return "forward replaced on the instance"
    if _argument_names(type(m).forward) != _BLOCK_ARGS:
        return "forward signature of another diffusers version"
    if not _is_diffusers(getattr(m, "norm1", None), "AdaLayerNormZero"):
        return "norm1 is not diffusers' AdaLayerNormZero"
    if getattr(m, "attn2", None) is not None:
        return "cross-attention (attn2)"
    if getattr(m, "pos_embed", None) is not None:
        return "positional embedding inside the block"
    if not isinstance(getattr(m, "attn1", None), nn.Module) or not isinstance(getattr(m, "ff", None), nn.Module):
        return "no attn1/ff"
    reason = _layer_norm_skip(getattr(m, "norm3", None))
    if reason:
        return f"norm3: {reason}"

    def swap() -> None:
        m.forward = functools.partial(_fused_ada_norm_zero_block_forward, m)

    return swap


# ---- ADM-structured modules -----------------------------------------------------------


def _fused_adm_resblock_forward(self, x: Tensor, emb: Tensor) -> Tensor:
    h = self.in_layers[0](x, activation="silu")
    if getattr(self, "updown", False):
        h, x = self.h_upd(h), self.x_upd(x)
    h = self.in_layers[-1](h)
    emb_out = self.emb_layers(emb).to(h.dtype)
    while emb_out.dim() < h.dim():
        emb_out = emb_out[..., None]
    if self.use_scale_shift_norm:
        scale, shift = emb_out.chunk(2, dim=1)
        h = self.out_layers[0](h, scale=scale, shift=shift, activation="silu")
    else:
        h = self.out_layers[0](h + emb_out, activation="silu")
    return self.skip_connection(x) + self.out_layers[3](self.out_layers[2](h))


def _looks_like_adm_resblock(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Module) for n in ("in_layers", "emb_layers", "out_layers"))


def _check_adm_resblock(m: nn.Module) -> str | Callable[[], None]:
    if _is_fastguide(m) or _rebound_by_us(m):
        return ALREADY
    if hasattr(m, "_hf_hook"):
        return "an accelerate hook wraps its forward"
    reason = _own_forward_problem(m)
    if reason:
        return reason
    names = {name for name, child in m._modules.items() if child is not None}
    required = {"in_layers", "emb_layers", "out_layers", "skip_connection"}
    if not required <= names <= required | {"h_upd", "x_upd"} or ("h_upd" in names) != ("x_upd" in names):
        return f"submodules {sorted(names)} (not ADM's)"
    if getattr(m, "updown", False) and "h_upd" not in names:
        return "updown without h_upd/x_upd"
    if _has_own_tensors(m):
        return "own parameters or buffers"
    if not isinstance(getattr(m, "use_scale_shift_norm", None), bool):
        return "use_scale_shift_norm not a bool"
    if not _takes_exactly(m.forward, 2):
        return "forward takes other inputs than (x, emb)"
    ins, outs = m.in_layers, m.out_layers
    if not (type(ins) is nn.Sequential and len(ins) == 3 and type(ins[1]) is nn.SiLU):
        return "in_layers is not [GroupNorm, SiLU, conv]"
    if not (
        type(outs) is nn.Sequential and len(outs) == 4 and type(outs[1]) is nn.SiLU and type(outs[2]) is nn.Dropout
    ):
        return "out_layers is not [GroupNorm, SiLU, Dropout, conv]"
    for where, norm in (("in_layers[0]", ins[0]), ("out_layers[0]", outs[0])):
        reason = _fusable_norm(norm)
        if reason:
            return f"{where}: {reason}"
    # the fused forward calls the layers one by one, the SiLUs fused into the norms
    reason = _hooked(m, {"in_layers": ins, "in_layers[1]": ins[1], "out_layers": outs, "out_layers[1]": outs[1]})
    if reason:
        return reason

    def swap() -> None:
        m.forward = functools.partial(_fused_adm_resblock_forward, m)

    return swap


def _fused_adm_attention_forward(self, x: Tensor) -> Tensor:
    batch, channels, *spatial = x.shape
    x = x.flatten(2)  # (B, C, T); a -1 would be ambiguous for an empty batch
    qkv = self.qkv(self.norm(x))
    q, k, v = split_heads(qkv, self.attention.n_heads, self._fastguide_legacy_order)
    h = ops.attention(q, k, v).transpose(-1, -2).reshape(x.shape)
    return (x + self.proj_out(h)).reshape(batch, channels, *spatial)


def _looks_like_adm_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Module) for n in ("norm", "qkv", "attention", "proj_out"))


def _adm_head_order(attention: nn.Module, heads: int, head_dim: int) -> bool | None:
    """Whether ``attention`` is softmax(q·kᵀ/√d)·v over (B, 3·H·d, T) in the legacy head order
    (True) or the new one (False), found by running it once; None when it is neither."""
    qkv = torch.randn(2, 3 * heads * head_dim, 5, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            got = attention(qkv)
    except Exception:  # whatever it is, it is not the op we would put in its place
        return None
    if not isinstance(got, Tensor) or got.shape != (2, heads * head_dim, 5):
        return None
    for legacy in (True, False):
        q, k, v = (t.double() for t in split_heads(qkv, heads, legacy))
        want = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1) @ v
        if torch.allclose(got.double(), want.transpose(-1, -2).reshape(got.shape), rtol=1e-4, atol=1e-5):
            return legacy
    return None


def _check_adm_attention(m: nn.Module) -> str | Callable[[], None]:
    if getattr(m, "encoder_kv", None) is not None:
        return "encoder_kv (it also attends to encoder_out)"
    if _is_fastguide(m) or _rebound_by_us(m):
        return ALREADY
    if hasattr(m, "_hf_hook"):
        return "an accelerate hook wraps its forward"
    reason = _own_forward_problem(m)
    if reason:
        return reason
    names = {name for name, child in m._modules.items() if child is not None}
    if names != {"norm", "qkv", "attention", "proj_out"}:
        return f"submodules {sorted(names)} (not ADM's)"
    if _has_own_tensors(m):
        return "own parameters or buffers"
    if not _takes_exactly(m.forward, 1):
        return "forward takes other inputs than (x)"
    if not isinstance(m.norm, nn.GroupNorm):
        return f"norm {type(m.norm).__name__} is not a GroupNorm"
    qkv = m.qkv
    if not (isinstance(qkv, nn.Conv1d) and qkv.kernel_size == (1,) and qkv.out_channels == 3 * qkv.in_channels):
        return "qkv is not a 1x1 Conv1d from C to 3·C channels"
    attention, heads = m.attention, getattr(m.attention, "n_heads", None)
    assert isinstance(attention, nn.Module)  # one of the submodules named above
    if not isinstance(heads, int) or heads < 1 or qkv.in_channels % heads:
        return "attention has no n_heads dividing the channels"
    if _has_own_tensors(attention) or any(True for _ in attention.children()):
        return "attention has parameters, buffers or submodules"
    head_dim = qkv.in_channels // heads
    reason = _head_dim_problem(head_dim)
    if reason:
        return reason
    reason = _hooked(m, {"attention": attention})  # ops.attention runs in its place
    if reason:
        return reason
    legacy = _adm_head_order(attention, heads, head_dim)
    if legacy is None:
        return "attention is not softmax(q·kᵀ/√d)·v in either ADM head order"

    def swap() -> None:
        setattr(m, "_fastguide_legacy_order", legacy)  # (nn.Module.__setattr__'s stub takes tensors and modules)
        m.forward = functools.partial(_fused_adm_attention_forward, m)

    return swap


_FUSED_FORWARDS = (
    _fused_resnet_block_forward,
    _fused_adm_resblock_forward,
    _fused_adm_attention_forward,
    _fused_ada_layer_norm_zero_forward,
    _fused_ada_norm_zero_block_forward,
)

# In the order they are tried: the first that recognises a module decides its kind.
_KINDS = (
    (DIFFUSERS_ATTENTION, _is_diffusers_attention, _check_diffusers_attention),
    (
        DIFFUSERS_RESNET,
        lambda m: type(m).__name__ == "ResnetBlock2D" and type(m).__module__.startswith("diffusers."),
        _check_diffusers_resnet,
    ),
    (DIFFUSERS_ADA_NORM_ZERO_BLOCK, _is_ada_norm_zero_block, _check_ada_norm_zero_block),
    (DIFFUSERS_ADA_NORM_ZERO, lambda m: _is_diffusers(m, "AdaLayerNormZero"), _check_ada_layer_norm_zero),
    (ADM_RESBLOCK, _looks_like_adm_resblock, _check_adm_resblock),
    (ADM_ATTENTION, _looks_like_adm_attention, _check_adm_attention),
)


# ---- the walk -----------------------------------------------------------------------


def accelerate(module: nn.Module) -> nn.Module:
    """Swap, in place, the GroupNorm(+SiLU), adaLN-Zero LayerNorm and attention of ``module``
    for fastguide ops, where they reproduce exactly what was there (see the module
    docstring); leave the rest.

    Returns ``module``, with the report of what happened in two attributes (and logged at
    INFO by the ``fastguide.models.accelerate`` logger):

    - ``module.fastguide_accelerated``: {kind: count} of what was swapped, kinds being
      "diffusers Attention", "diffusers ResnetBlock2D", "diffusers BasicTransformerBlock",
      "diffusers AdaLayerNormZero", "ADM ResBlock", "ADM AttentionBlock" and "GroupNorm"
      (kinds with no swap are absent);
    - ``module.fastguide_skipped``: {kind: {reason: count}} of what was recognised as one of
      those kinds but left as it was, e.g. {"diffusers Attention": {"processor
      AttnAddedKVProcessor2_0": 2}, "GroupNorm": {"inside a module left alone": 4}}. Reason
      "already fastguide" is what an earlier call (or fastguide's own modules) made.

    Outputs are unchanged within floating-point tolerance (GroupNorm and LayerNorm statistics
    become float32 in every dtype, as ADM computes them; attention accumulates in float32);
    what is left alone is bit-identical. One dtype differs under CUDA autocast: torch's
    GroupNorm and LayerNorm return float32 there (autocast's float32 list), the fused ones
    the input's dtype (the values round where the next autocast op would round them).
    Gradient checkpointing inside rebound ADM blocks is not kept.
    There is no undo: keep a copy (``copy.deepcopy``) or load the model again for the original
    modules. diffusers' ``set_default_attn_processor()`` refuses an accelerated model (its
    attention processors are fastguide's); ``set_attn_processor(AttnProcessor2_0())`` works.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"accelerate takes a torch.nn.Module, got {type(module).__name__}")
    swapped: Counter[str] = Counter()
    skipped: defaultdict[str, Counter[str]] = defaultdict(Counter)
    _Walk(swapped, skipped).visit(module, None, None)
    accelerated = {kind: n for kind, n in swapped.items() if n}
    left_alone = {kind: dict(reasons) for kind, reasons in skipped.items()}
    # (setattr: nn.Module.__setattr__'s stub takes tensors and modules only)
    setattr(module, "fastguide_accelerated", accelerated)
    setattr(module, "fastguide_skipped", left_alone)
    log.info("fastguide.accelerate(%s): %s", type(module).__name__, _describe(accelerated, left_alone))
    return module


def _describe(swapped: dict[str, int], skipped: dict[str, dict[str, int]]) -> str:
    """'swapped GroupNorm 12, ...; left alone diffusers Attention 2 (processor X: 2), ...'"""
    done = ", ".join(f"{kind} {n}" for kind, n in swapped.items()) or "nothing"
    left = (
        ", ".join(
            f"{kind} {sum(reasons.values())} ({', '.join(f'{r}: {n}' for r, n in reasons.items())})"
            for kind, reasons in skipped.items()
        )
        or "nothing"
    )
    return f"swapped {done}; left alone {left}"


class _Walk:
    """One depth-first pass: swap recognised modules that pass their checks, keep the whole
    subtree of those that do not, replace GroupNorms in their parents."""

    def __init__(self, swapped: Counter[str], skipped: defaultdict[str, Counter[str]]):
        self.swapped, self.skipped = swapped, skipped
        self.seen: set[int] = set()
        self.fused: dict[int, FusedGroupNorm] = {}  # id(original GroupNorm) -> its replacement

    def visit(self, m: nn.Module, parent: nn.Module | None, name: str | None) -> None:
        if id(m) in self.seen:  # a module registered under several parents
            if id(m) in self.fused:
                assert parent is not None and name is not None  # the root is visited first
                setattr(parent, name, self.fused[id(m)])
            return
        self.seen.add(id(m))
        if isinstance(m, nn.GroupNorm):
            reason = _group_norm_skip(m) or (None if parent is not None else "the root module")
            if reason:
                self.skipped[GROUP_NORM][reason] += 1
            else:
                self.fused[id(m)] = FusedGroupNorm(m)
                assert name is not None  # a child: the root module is left alone
                setattr(parent, name, self.fused[id(m)])
                self.swapped[GROUP_NORM] += 1
            return
        kind = next(((kind, check) for kind, recognise, check in _KINDS if recognise(m)), None)
        if kind is not None:
            outcome = kind[1](m)
            if isinstance(outcome, str):
                self.skipped[kind[0]][outcome] += 1
                self.leave_alone(m)
                return
            outcome()
            self.swapped[kind[0]] += 1
        for child_name, child in list(m.named_children()):
            self.visit(child, m, child_name)
        if kind is None:
            self.fuse_norm_out(m)
            self.note_inline_layer_norm(m)

    def leave_alone(self, m: nn.Module) -> None:
        # Not marked seen: a GroupNorm also registered outside m is still replaced there
        # (replacement is per parent, so m keeps the original).
        for sub in m.modules():
            if sub is not m:
                if isinstance(sub, nn.GroupNorm):
                    self.skipped[GROUP_NORM][ALREADY if _is_fastguide(sub) else LEFT_ALONE_PARENT] += 1

    def note_inline_layer_norm(self, parent: nn.Module) -> None:
        """diffusers' DiT models modulate their last LayerNorm in their own forward, which
        accelerate does not replace: report it as left alone."""
        if _is_diffusers(parent, "DiTTransformer2DModel") and type(parent._modules.get("norm_out")) is nn.LayerNorm:
            self.skipped[LAYER_NORM]["DiTTransformer2DModel.norm_out (modulated inside the model's forward)"] += 1

    def fuse_norm_out(self, parent: nn.Module) -> None:
        """diffusers' models call conv_norm_out then conv_act, always back to back."""
        norm, act = parent._modules.get("conv_norm_out"), parent._modules.get("conv_act")
        if (
            type(parent).__module__.split(".")[0] == "diffusers"
            and type(norm) is FusedGroupNorm
            and norm.activation is None
            and any(norm is f for f in self.fused.values())
            and type(act) is nn.SiLU
            and not _has_hooks(act)
        ):
            parent.conv_norm_out = FusedGroupNorm(norm, "silu")
            parent.conv_act = nn.Identity()

"""A model's sequence of transformer blocks, and what a block returns when it passes its input
through: what skip-layer guidance (perturbation.py) and block caching (block_cache.py) need
to know of a model's blocks.

Two block forms are known:
- a block that returns its new hidden states, ``block(hidden_states, ...) -> Tensor``
  (fastguide's DiT, diffusers' ``BasicTransformerBlock`` in DiT and PixArt);
- diffusers' SD3 ``JointTransformerBlock``, ``block(hidden_states, encoder_hidden_states,
  ...) -> (encoder_hidden_states, hidden_states)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn
from torch import Tensor

# (args, kwargs) of a block's call -> what the block returns when it passes its input through.
Passthrough = Callable[[tuple, dict], Any]


def perturbation_target(model: object) -> Any:
    """The network whose layers PAG and skip-layer guidance perturb, and whose blocks a block
    cache skips: the model's ``perturbation_target`` when it wraps one (a pipeline's denoiser
    adapter, so that layers keep the wrapped network's names), else the model itself; past
    torch.compile's wrapper (its ``_orig_mod``), whose forward runs that module's layers,
    so that a compiled network is perturbed and cached as the network itself."""
    target = getattr(model, "perturbation_target", model)
    while isinstance(compiled := getattr(target, "_orig_mod", None), nn.Module):
        target = compiled
    return target


def argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """The forward's argument ``name``, ``index``-th positionally (None when not passed)."""
    return args[index] if len(args) > index else kwargs.get(name)


def block_list(model: nn.Module, purpose: str) -> tuple[str, nn.ModuleList]:
    """(attribute, blocks): the model's ModuleList ``transformer_blocks`` (diffusers' SD3,
    PixArt, DiT) or ``blocks`` (fastguide's DiT); ``purpose`` names the caller in the error."""
    for attribute in ("transformer_blocks", "blocks"):
        blocks = getattr(model, attribute, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return attribute, blocks
    raise ValueError(
        f"model ({type(model).__name__}) has no transformer blocks: {purpose} works on a ModuleList "
        "`transformer_blocks` (diffusers' SD3, PixArt, DiT) or `blocks` (fastguide's DiT)"
    )


def is_joint_block(block: nn.Module) -> bool:
    """Whether ``block`` is diffusers' SD3 joint block (two streams in, two out)."""
    return type(block).__name__ == "JointTransformerBlock" and type(block).__module__.startswith("diffusers.")


def passthrough(block: nn.Module) -> Passthrough:
    """What ``block`` returns when it passes its input through: its first argument
    (hidden_states, whatever the forward names it), or for an SD3 joint block
    (encoder_hidden_states, hidden_states), as it orders its outputs."""
    if is_joint_block(block):
        return _joint_passthrough
    # The class's forward, past self: an instance forward (a perturbation's or a cache's
    # wrapper, taking *args and **kwargs) does not name the block's arguments.
    try:
        first = list(inspect.signature(type(block).forward).parameters)[1]
    except (IndexError, TypeError, ValueError):
        first = "hidden_states"

    def hidden_states(args: tuple, kwargs: dict) -> Tensor:
        return argument(args, kwargs, 0, first)

    return hidden_states


def _joint_passthrough(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    return argument(args, kwargs, 1, "encoder_hidden_states"), argument(args, kwargs, 0, "hidden_states")


def hidden_output(block: nn.Module) -> Callable[[Any], Tensor]:
    """The hidden states among ``block``'s outputs: its output, or an SD3 joint block's
    second. Another block that returns anything but one tensor (Flux's, CogVideoX's pairs)
    is refused at its first output: which of its outputs are the hidden states is not
    known."""
    if is_joint_block(block):
        return lambda out: out[1]
    name = type(block).__name__

    def hidden(out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(
                f"cache: {name} returned {type(out).__name__}: a block cache takes blocks "
                "that return their hidden states as one tensor (or diffusers' SD3 joint blocks)"
            )
        return out

    return hidden


def with_hidden_output(block: nn.Module) -> Callable[[tuple, dict, Tensor], object]:
    """``(args, kwargs, h)`` -> what ``block`` returns with hidden states h: h itself, or for
    an SD3 joint block (its encoder_hidden_states input, h), the first None when the block
    drops the context stream (the last block's ``context_pre_only``)."""
    if not is_joint_block(block):
        return lambda args, kwargs, h: h
    if block.context_pre_only:
        return lambda args, kwargs, h: (None, h)
    return lambda args, kwargs, h: (argument(args, kwargs, 1, "encoder_hidden_states"), h)

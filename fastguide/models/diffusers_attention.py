"""The frame a diffusers ``Attention`` layer puts around its attention map, as its
AttnProcessor, AttnProcessor2_0 and PAG's identity processor all compute it: a (B, C, H, W)
feature map flattened to (B, H·W, C) tokens and the layer's group_norm applied; after the
map and to_out, the tokens folded back to (B, C, H, W), the residual added when
``residual_connection``, and the sum divided by ``rescale_output_factor``. Used by
fastguide.models.accelerate (the processor on ops.attention) and
fastguide.models.perturbation (PAG's identity map)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def enter_tokens(attn: Any, hidden_states: Tensor, residual: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(tokens, leave): ``hidden_states`` as the tokens the projections read, and the
    function that takes the layer's to_out output back to the layer's output, adding
    ``residual`` (the layer's input before any spatial_norm) where the layer has one."""
    shape = hidden_states.shape
    tokens = hidden_states
    if len(shape) == 4:
        tokens = tokens.reshape(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    if attn.group_norm is not None:
        tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)

    def leave(out: Tensor) -> Tensor:
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    return tokens, leave

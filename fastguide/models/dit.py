"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") on fastguide's fused ops.

The module tree, parameter names, shapes, registration order and constructor arguments are
those of the official ``models.py`` (facebookresearch/DiT; willisma/SiT has the same tree),
so their checkpoints load with ``load_state_dict(strict=True)`` and no key mapping. The
forward pass differs only in fusion: each LayerNorm → adaLN modulate is one
``ops.layer_norm`` call (in a block, the second is fused with the attention branch's
gated residual before it: ``ops.gated_residual_layer_norm``), the MLP branch's gated
residual is ``ops.gated_residual``, and attention is one ``ops.attention`` call on strided
views of the qkv projection. The model takes the ORIGINAL timestep (0…999), as the
official one does.

A block, with (shift, scale, gate)×2 = Linear(SiLU(c)) and c = t_emb + y_emb:

    x ← x + gate_msa·Attn(LN(x)·(1 + scale_msa) + shift_msa)
    x ← x + gate_mlp·MLP(LN(x)·(1 + scale_mlp) + shift_mlp)

LN without affine parameters, eps 1e-6; the per-sample (N, D) modulation broadcasts over
the tokens. The final layer is Linear(LN(x)·(1 + scale) + shift) and an unpatchify.

Under ``torch.autocast`` the residual stream x stays float32 (the patch embedding plus the
float32 pos_embed) while the branches and the modulation come out of autocast's Linears in
bfloat16 or float16; the fused ops cast each branch to the stream's dtype, which is what
torch's promotion of x + gate·branch gives.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, cast

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from .unet import autocast_enabled, check_labels, check_timesteps, timestep_embedding

FREQUENCY_EMBEDDING_SIZE = 256  # the sinusoid width fed to the timestep MLP
NORM_EPS = 1e-6


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, device: torch.device | str | None = None) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding, (grid_size², embed_dim), float32.

    Token i·grid + j (row i, column j) gets [e(j), e(i)], each half
    e(p) = [sin(p·ω_k), cos(p·ω_k)], ω_k = 10000^(−k/(D/4)), k < D/4: the column comes
    first, as in the official code (its meshgrid puts w first). Computed in float64 and
    rounded once, as the official numpy code does.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class ModulatedLayerNorm(nn.Module):
    """LayerNorm over the last dim without affine parameters, then adaLN's modulation:
    y = (x − mean)/√(var + eps)·(1 + scale) + shift, with (scale, shift) of shape (N, D)
    broadcast over the tokens of x (N, T, D). One ``ops.layer_norm`` call; it holds no
    parameters, like the official ``nn.LayerNorm(elementwise_affine=False)``."""

    def __init__(self, hidden_size: int, eps: float = NORM_EPS):
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps

    def forward(self, x: Tensor, *, scale: Tensor, shift: Tensor) -> Tensor:
        return ops.layer_norm(x, self.normalized_shape, None, None, self.eps, scale=scale, shift=shift)

    def after_gated_residual(
        self, h: Tensor, branch: Tensor, gate: Tensor, *, scale: Tensor, shift: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(h_new, y): h_new = h + gate·branch (gate (N, D) per sample), y = this norm of
        h_new; one ``ops.gated_residual_layer_norm`` pass instead of a residual add whose
        result the norm reads back."""
        return ops.gated_residual_layer_norm(
            h, branch, gate, self.normalized_shape, None, None, self.eps, scale=scale, shift=shift
        )


class PatchEmbed(nn.Module):
    """(N, C, H, W) → (N, T, D) tokens: a p×p stride-p convolution (``proj``), tokens in
    row-major order over the (H/p, W/p) grid (timm's PatchEmbed, as the official code uses)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t (N,) → MLP(sinusoids(t)) (N, D): 256 sinusoids, cos first, max period 10000."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        # The sinusoids are float32 as in the official code; cast to the MLP's dtype so a
        # model cast whole with .half() or .double() runs.
        sinusoids = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(sinusoids.to(cast(nn.Linear, self.mlp[0]).weight.dtype))


class LabelEmbedder(nn.Module):
    """Labels (N,) → embedding rows (N, D). With ``dropout_prob`` > 0 the table has one
    more row, index ``num_classes``, the null class of classifier-free guidance; in
    training, labels are replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (1 if dropout_prob > 0 else 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(dropped, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention over tokens (timm's Attention with qkv bias):
    proj(softmax(q·kᵀ/√d)·v), q, k, v strided views of one (N, T, 3·D) projection laid
    out [Q; K; V] with the heads inside each."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, d), no copy
        out = ops.attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    """fc2(GELU_tanh(fc1(x))), hidden width mlp_ratio·D (timm's Mlp as DiT builds it)."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (the module docstring states the math)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = ModulatedLayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn_out = self.attn(self.norm1(x, scale=scale_msa, shift=shift_msa))
        x, y = self.norm2.after_gated_residual(x, attn_out, gate_msa, scale=scale_mlp, shift=shift_mlp)
        return ops.gated_residual(x, self.mlp(y), gate_mlp)


class FinalLayer(nn.Module):
    """Linear(LN(x)·(1 + scale) + shift) to p²·out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x, scale=scale, shift=shift))


def _check_config(
    input_size: Any,
    patch_size: Any,
    in_channels: Any,
    hidden_size: Any,
    depth: Any,
    num_heads: Any,
    mlp_ratio: Any,
    class_dropout_prob: Any,
    num_classes: Any,
    learn_sigma: Any,
) -> None:
    """DiT's constructor arguments, each named when wrong: positive ints (depth may be 0)
    with patch_size dividing input_size, hidden_size a multiple of 4 (the 2-D sin-cos
    embedding) and of num_heads, the head dim hidden_size/num_heads one ops.attention
    takes (a multiple of 8 from 8 to 256), mlp_ratio positive and finite with a hidden
    width of at least 1, class_dropout_prob in [0, 1], learn_sigma a bool."""
    for name, value, low in (
        ("input_size", input_size, 1),
        ("patch_size", patch_size, 1),
        ("in_channels", in_channels, 1),
        ("hidden_size", hidden_size, 1),
        ("depth", depth, 0),
        ("num_heads", num_heads, 1),
        ("num_classes", num_classes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if input_size % patch_size:
        raise ValueError(f"input_size ({input_size}) must be divisible by patch_size ({patch_size})")
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (the 2-D sin-cos position embedding), got {hidden_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    head_dim = hidden_size // num_heads
    if head_dim % 8 or not 8 <= head_dim <= 256:
        raise ValueError(
            f"hidden_size / num_heads (the head dim, {hidden_size} / {num_heads} = {head_dim}) must be a "
            "multiple of 8 from 8 to 256 (what ops.attention takes)"
        )
    for name, value in (("mlp_ratio", mlp_ratio), ("class_dropout_prob", class_dropout_prob)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(mlp_ratio) and int(hidden_size * mlp_ratio) >= 1):
        raise ValueError(
            f"mlp_ratio must be finite and give an MLP width int(hidden_size·mlp_ratio) of at least 1, got {mlp_ratio}"
        )
    if not 0 <= class_dropout_prob <= 1:
        raise ValueError(f"class_dropout_prob must lie in [0, 1], got {class_dropout_prob}")
    if not isinstance(learn_sigma, bool):
        raise TypeError(f"learn_sigma must be a bool, got {type(learn_sigma).__name__} {learn_sigma!r}")


class DiT(nn.Module):
    """The official DiT (and SiT: same tree, see fastguide.models.configs), arguments
    keeping the official names. ``forward(x, t, y)`` maps x_t (N, in_channels, H, W) with
    H = W = input_size, original timesteps t (N,) and labels y (N,) to
    (N, out_channels, H, W); out_channels = 2·in_channels with ``learn_sigma``
    (the prediction, then ADM's variance interpolation v, as fastguide's sampler reads it).

    With ``class_dropout_prob`` > 0 the label table has a null row, index ``num_classes``
    (``null_label``), which classifier-free guidance uses as the unconditional label, and
    ``null_class`` is True; y=None means that label for every sample.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        _check_config(
            input_size,
            patch_size,
            in_channels,
            hidden_size,
            depth,
            num_heads,
            mlp_ratio,
            class_dropout_prob,
            num_classes,
            learn_sigma,
        )
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels, self.learn_sigma = in_channels, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_heads, self.num_classes = num_heads, num_classes
        self.null_class = class_dropout_prob > 0

        # Registered in the official order; pos_embed is the official frozen Parameter
        # (not a buffer), so it sits first in the state dict as in the released files.
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier-uniform linears (and the patch conv viewed
        as one) with zero biases, N(0, 0.02) label table and timestep MLP weights, the
        sin-cos pos_embed, and adaLN-Zero: every modulation linear and the output linear
        zero, so each block starts as the identity and the model outputs zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = self.input_size // self.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid, self.pos_embed.device)[None])
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        assert proj.bias is not None  # a Conv2d built with its default bias=True
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[0]).weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[2]).weight, std=0.02)
        for modulation in [cast(DiTBlock, block).adaLN_modulation[-1] for block in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            assert isinstance(modulation, nn.Linear)
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)

    @property
    def null_label(self) -> int:
        """The label that means "no class" (classifier-free guidance's unconditional)."""
        if not self.null_class:
            raise ValueError("this model has no null class (construct it with class_dropout_prob > 0)")
        return self.num_classes

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(N, T, p²·C) → (N, C, H, W): token (i, j) holds its p×p patch as [p_row, p_col, C]."""
        batch, p, c, grid = tokens.shape[0], self.patch_size, self.out_channels, self.input_size // self.patch_size
        patches = tokens.reshape(batch, grid, grid, p, p, c)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, c, grid * p, grid * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Prediction (N, out_channels, H, W) for x_t (N, C, H, W) at original timesteps t
        (N,) and labels y (N,) (None: the null label); t and y may be 0-d, one for the
        whole batch. x is floating, in the model's dtype unless autocast is on; labels lie
        in [0, num_classes), or are ``null_label``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"x must be (N, {self.in_channels}, {self.input_size}, {self.input_size}) "
                f"(the fixed position embedding sets the size), got {tuple(x.shape)}"
            )
        dtype = self.x_embedder.proj.weight.dtype
        if x.dtype != dtype and not autocast_enabled(x.device):
            raise TypeError(f"x must have the model's dtype {dtype} (or run under torch.autocast), got {x.dtype}")
        t = check_timesteps(t, x)
        if y is None:
            y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        y = check_labels(y, x, self.num_classes + (1 if self.null_class else 0))
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = (H/p)·(W/p)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

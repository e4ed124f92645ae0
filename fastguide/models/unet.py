"""ADM's UNet and noisy classifier (EncoderUNet) on fastguide's fused ops.

The module tree, parameter names, shapes and constructor arguments are those of the
guided-diffusion release (``UNetModel`` / ``EncoderUNetModel``), so its checkpoints load
with ``load_state_dict(strict=True)`` and no key mapping. The forward passes differ only
in fusion: a ResBlock's norm → scale-shift → SiLU and the output norm → SiLU are each
one ``ops.group_norm`` call, and attention is one ``ops.attention`` call on strided views
of the qkv projection. Models take the ORIGINAL timestep (0…999), as ADM's do.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from numbers import Integral, Real
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import ops
from .nn import AttentionBlock, AttentionPool2d, GroupNorm32


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, cos first: [cos(t·f_i), sin(t·f_i)], f_i = max_period^(−i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def check_timesteps(t: object, x: Tensor) -> Tensor:
    """t as (N,) for x of batch N: a tensor of real (integer or floating) timesteps on x's
    device, shaped (N,), or 0-d for one timestep of the whole batch (as diffusers takes it)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"t (timesteps) must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t (timesteps) must hold real numbers (an integer or floating dtype), got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"t (timesteps) is on {t.device} but x is on {x.device}")
    batch = x.shape[0]
    if t.dim() == 0:
        return t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(
            f"t (timesteps) must have shape ({batch},), one per sample of x, or () for all of them, "
            f"got {tuple(t.shape)}"
        )
    return t


def check_labels(y: object, x: Tensor, num_labels: int) -> Tensor:
    """y as int64 (N,) for x of batch N: an integer tensor on x's device, shaped (N,) or 0-d
    (one label for the whole batch), each in [0, num_labels). The range is checked where the
    values can be read without a device sync or a break in a trace (CPU tensors, not under
    torch.compile, tracing or transforms); on a GPU an index out of range is the
    embedding's own device-side error."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y (class labels) must be a torch.Tensor of integers, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y (class labels) must be integer class indices, got dtype {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"y (class labels) is on {y.device} but x is on {x.device}")
    batch = x.shape[0]
    if y.dim() == 0:
        y = y.expand(batch)
    elif tuple(y.shape) != (batch,):
        raise ValueError(
            f"y (class labels) must have shape ({batch},), one per sample of x, or () for all of them, "
            f"got {tuple(y.shape)}"
        )
    if y.numel() and y.device.type == "cpu" and type(y) is Tensor and not ops.dispatch.tracing():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_labels:
            raise ValueError(f"y (class labels) must lie in [0, {num_labels - 1}], got {low}..{high}")
    return y.long()  # the embedding takes int64 (or int32) indices only


def check_image(x: object, channels: int, multiple: int = 1, size: int | None = None) -> None:
    """x a floating (N, channels, H, W) tensor, H and W positive multiples of ``multiple``
    (a UNet's 2^downsamplings, which its skip connections need), or exactly ``size``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"x must be (N, {channels}, H, W), got shape {tuple(x.shape)}")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise ValueError(
            f"x must be (N, {channels}, {size}, {size}) (the attention pool's position embedding sets "
            f"the size), got shape {tuple(x.shape)}"
        )
    if any(s < 1 for s in x.shape[2:]):
        raise ValueError(f"x's height and width must be positive, got shape {tuple(x.shape)}")
    if any(s % multiple for s in x.shape[2:]):
        raise ValueError(
            f"x's height and width must be multiples of {multiple} (the UNet halves them "
            f"{multiple.bit_length() - 1} time(s), and its skip connections need the sizes back), "
            f"got shape {tuple(x.shape)}"
        )


def autocast_enabled(device: torch.device) -> bool:
    """Whether torch.autocast is on for ``device``'s type (False for types autocast does not
    know, such as meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def _zeroed(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """Marks a module whose forward is ``forward(x, emb)``: it takes the time embedding."""


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that passes the embedding to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]  # ADM's (x, emb), not (input)
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest ×2, then an optional 3×3 conv (``.conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3×3 conv, or 2×2 average pooling (``.op`` either way)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM's residual block; with scale-shift norm,
    h = conv(silu(GN(h)·(1 + scale) + shift)) with (scale, shift) from the embedding."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd: nn.Module
        self.x_upd: nn.Module
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        in_norm, in_conv = self.in_layers[0], self.in_layers[2]
        h = in_norm(x, activation="silu")
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)
        out_norm, dropout, out_conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h, scale=scale, shift=shift, activation="silu")
        else:
            h = out_norm(h + emb_out[:, :, None, None], activation="silu")
        return self.skip_connection(x) + out_conv(dropout(h))


class _AttentionBlock(AttentionBlock):
    """AttentionBlock with optional gradient checkpointing."""

    def __init__(self, *args, use_checkpoint: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def _convert_convs_to_fp16(module: nn.Module) -> None:
    # ADM's convert_module_to_f16: only convolutions; norms and linears stay fp32.
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.half()


def _check_config(
    image_size: Any,
    in_channels: Any,
    model_channels: Any,
    out_channels: Any,
    num_res_blocks: Any,
    attention_resolutions: Any,
    dropout: Any,
    channel_mult: Any,
    num_heads: Any,
    num_head_channels: Any,
) -> None:
    """The arguments UNet and EncoderUNet share, each named when wrong: positive ints
    (num_res_blocks may be 0), attention_resolutions a collection of ints, dropout in
    [0, 1], channel_mult a non-empty sequence of positive numbers whose widths
    int(mult·model_channels) are multiples of 32 (GroupNorm32's groups), num_heads and
    num_head_channels positive ints (num_head_channels −1: heads by num_heads)."""
    # The type: ignore[operator] below: typeshed's numbers.Integral and numbers.Real declare only
    # __lt__ and __le__, so mypy refuses ``0 <= value`` on them (the ints and floats here compare fine).
    for name, value, low in (
        ("image_size", image_size, 1),
        ("in_channels", in_channels, 1),
        ("model_channels", model_channels, 1),
        ("out_channels", out_channels, 1),
        ("num_res_blocks", num_res_blocks, 0),
        ("num_heads", num_heads, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if (
        isinstance(num_head_channels, bool)
        or not isinstance(num_head_channels, Integral)
        or not (num_head_channels == -1 or num_head_channels >= 1)  # type: ignore[operator]
    ):
        raise ValueError(
            f"num_head_channels must be a positive int, or -1 (heads set by num_heads), got {num_head_channels!r}"
        )
    if (
        not isinstance(attention_resolutions, Collection)
        or isinstance(attention_resolutions, str)
        or not all(isinstance(r, Integral) and not isinstance(r, bool) for r in attention_resolutions)
    ):
        raise TypeError(
            f"attention_resolutions must be a collection of ints (downsample rates), got {attention_resolutions!r}"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout <= 1:  # type: ignore[operator]
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    if (
        not isinstance(channel_mult, Sequence)
        or not channel_mult
        or not all(
            isinstance(m, Real) and not isinstance(m, bool) and 0 < m < math.inf  # type: ignore[operator]
            for m in channel_mult
        )
    ):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive numbers, got {channel_mult!r}")
    widths = [int(m * model_channels) for m in channel_mult]
    if any(w < 1 or w % 32 for w in widths):
        raise ValueError(
            f"the level widths int(channel_mult·model_channels) must be positive multiples of 32 "
            f"(GroupNorm32's 32 groups), got {widths} for model_channels={model_channels}"
        )


def _check_flags(**flags: Any) -> None:
    """The on/off arguments are bools, each named when not (a string such as "False" is
    truthy and would silently switch its feature on)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


class _Trunk(nn.Module):
    """What UNet and EncoderUNet share: time embedding, input blocks, middle block."""

    model_channels: int  # set by the subclass's constructor

    def _build_time_embed(self, model_channels: int) -> None:
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def _build_trunk(
        self,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        use_checkpoint: bool,
        num_heads: int,
        num_head_channels: int,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        use_new_attention_order: bool,
    ) -> tuple[list[int], int, int]:
        """Builds input_blocks and middle_block; returns (skip channels, ch, ds)."""
        _check_flags(
            conv_resample=conv_resample,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        emb_dim = model_channels * 4
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels, ds = [ch], 1
        self._feature_size = ch
        res: dict[str, Any] = dict(
            dropout=dropout, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm
        )
        attn: dict[str, Any] = dict(
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
            use_checkpoint=use_checkpoint,
        )
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, out_channels=int(mult * model_channels), **res)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(_AttentionBlock(ch, **attn))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    ResBlock(ch, emb_dim, out_channels=ch, down=True, **res)
                    if resblock_updown
                    else Downsample(ch, conv_resample, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
                self._feature_size += ch
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, **res), _AttentionBlock(ch, **attn), ResBlock(ch, emb_dim, **res)
        )
        self._feature_size += ch
        return skip_channels, ch, ds

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the blocks run in (float16 after convert_to_fp16)."""
        return cast(nn.Conv2d, cast(TimestepEmbedSequential, self.input_blocks[0])[0]).weight.dtype

    def _check_dtype(self, x: Tensor) -> None:
        """x in the dtype the model takes and returns (its time MLP's: float32 in ADM, also
        under use_fp16; a model cast whole with .double() or .half() takes its own), unless
        autocast is on."""
        dtype = cast(nn.Linear, self.time_embed[0]).weight.dtype
        if x.dtype != dtype and not autocast_enabled(x.device):
            raise TypeError(f"x must have the model's input dtype {dtype} (or run under torch.autocast), got {x.dtype}")

    def _embed_time(self, timesteps: Tensor) -> Tensor:
        # The sinusoids in the time MLP's dtype (float32 in ADM, also under use_fp16; a model
        # cast whole with .double() or .half() runs them in its own dtype).
        sinusoids = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(sinusoids.to(cast(nn.Linear, self.time_embed[0]).weight.dtype))


class UNet(_Trunk):
    """ADM's UNetModel. Arguments keep ADM's names; ``attention_resolutions`` holds
    downsample rates (ADM's create_model turns "32,16,8" into them; see fastguide.models.configs).

    ``null_class`` adds one label-embedding row, index ``num_classes``, for classifier-free
    guidance; ``label_dropout`` replaces labels by it with that probability in training.
    """

    # The input blocks before ``rest``: the stem convolution and the first residual block,
    # whose residual block caching watches.
    FIRST_BLOCKS = 2

    # Declared for the type checker, which cannot infer them from __init__ (its argument checks
    # narrow ints to numbers.Integral, which defers the method past the ones that read them).
    image_size: int
    in_channels: int
    out_channels: int
    num_classes: int | None
    channel_mult: tuple[float, ...]
    num_res_blocks: int
    null_class: bool
    label_dropout: float
    label_emb: nn.Embedding
    output_blocks: nn.ModuleList
    out: nn.Sequential

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        null_class: bool = False,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"dims must be 2 (images), got {dims}")
        _check_config(
            image_size,
            in_channels,
            model_channels,
            out_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            num_heads,
            num_head_channels,
        )
        _check_flags(use_fp16=use_fp16, null_class=null_class)  # the trunk's flags: _build_trunk
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int, or None (unconditional), got {num_classes!r}")
        if isinstance(label_dropout, bool) or not isinstance(label_dropout, Real) or not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must be a probability in [0, 1], got {label_dropout!r}")
        if (
            isinstance(num_heads_upsample, bool)
            or not isinstance(num_heads_upsample, Integral)
            or not (num_heads_upsample == -1 or num_heads_upsample >= 1)
        ):
            raise ValueError(
                f"num_heads_upsample must be a positive int, or -1 (num_heads), got {num_heads_upsample!r}"
            )
        if (null_class or label_dropout) and num_classes is None:
            raise ValueError("null_class and label_dropout need num_classes")
        if label_dropout and not null_class:
            raise ValueError("label_dropout replaces labels by the null class: set null_class=True")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes, self.channel_mult = model_channels, num_classes, tuple(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.null_class, self.label_dropout = null_class, label_dropout
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self._build_time_embed(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + (1 if null_class else 0), model_channels * 4)
        skip_channels, ch, ds = self._build_trunk(
            in_channels,
            model_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            use_checkpoint,
            num_heads,
            num_head_channels,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        emb_dim = model_channels * 4
        res: dict[str, Any] = dict(
            dropout=dropout, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                layers: list[nn.Module] = [ResBlock(ch + skip, emb_dim, out_channels=int(model_channels * mult), **res)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(
                        _AttentionBlock(
                            ch,
                            num_heads=num_heads_upsample,
                            num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order,
                            use_checkpoint=use_checkpoint,
                        )
                    )
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, emb_dim, out_channels=ch, up=True, **res)
                        if resblock_updown
                        else Upsample(ch, conv_resample, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            _zeroed(nn.Conv2d(int(model_channels * channel_mult[0]), out_channels, 3, padding=1)),
        )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """ADM's use_fp16: the blocks' convolutions in float16; norms, linears, I/O fp32."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(_convert_convs_to_fp16)

    @property
    def null_label(self) -> int:
        """The label that means "no class" (classifier-free guidance's unconditional)."""
        if not self.null_class:
            raise ValueError("this model has no null class (construct it with null_class=True)")
        assert self.num_classes is not None  # null_class needs num_classes (checked when built)
        return self.num_classes

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """Prediction for x_t (B, C, H, W) at original timesteps (B,) and labels y (B,)
        (timesteps and labels may be 0-d: one for the whole batch). x is floating, in the
        model's input dtype unless autocast is on; H and W must be multiples of
        2^(levels − 1), which the skip connections need; labels lie in [0, num_classes),
        or are num_classes (the null label) with ``null_class``."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass labels y exactly when the model is class-conditional")
        check_image(x, self.in_channels, 2 ** (len(self.channel_mult) - 1))
        self._check_dtype(x)
        timesteps = check_timesteps(timesteps, x)
        emb = self._embed_time(timesteps)
        if y is not None:
            assert self.num_classes is not None  # y is passed exactly when the model is class-conditional
            y = check_labels(y, x, self.num_classes + (1 if self.null_class else 0))
            if self.training and self.label_dropout > 0:
                dropped = torch.rand(y.shape, device=y.device) < self.label_dropout
                y = torch.where(dropped, torch.full_like(y, self.num_classes), y)
            emb = emb + self.label_emb(y)
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks[: self.FIRST_BLOCKS]:
            h = block(h, emb)
            skips.append(h)
        h = self.rest(h, emb, skips).to(x.dtype)
        out_norm, out_conv = self.out[0], self.out[2]
        return out_conv(out_norm(h, activation="silu"))

    def rest(self, h: Tensor, emb: Tensor, skips: list[Tensor]) -> Tensor:
        """The network between its first ``FIRST_BLOCKS`` input blocks and its output head:
        the other input blocks, the middle block and the output blocks, from the first
        blocks' output h (``skips`` holding their outputs, the skip connections) to the last
        output block's features. Block caching (models/block_cache.py) replaces it on reused
        calls."""
        for block in self.input_blocks[self.FIRST_BLOCKS :]:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return h


class EncoderUNet(_Trunk):
    """ADM's EncoderUNetModel, the noisy classifier: the UNet's first half and a pooling
    head, ``pool`` ∈ {"adaptive", "attention", "spatial", "spatial_v2"}."""

    POOLS = ("adaptive", "attention", "spatial", "spatial_v2")

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"dims must be 2 (images), got {dims}")
        _check_config(
            image_size,
            in_channels,
            model_channels,
            out_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            num_heads,
            num_head_channels,
        )
        _check_flags(use_fp16=use_fp16)  # the trunk's flags: _build_trunk
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.pool = model_channels, pool
        self._build_time_embed(model_channels)
        _, ch, ds = self._build_trunk(
            in_channels,
            model_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            use_checkpoint,
            num_heads,
            num_head_channels,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        if pool == "adaptive":
            self.out = nn.Sequential(
                GroupNorm32(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                _zeroed(nn.Conv2d(ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            self.out = nn.Sequential(
                GroupNorm32(ch), nn.SiLU(), AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
            )
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), GroupNorm32(2048), nn.SiLU(), nn.Linear(2048, out_channels)
            )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        for blocks in (self.input_blocks, self.middle_block):
            blocks.apply(_convert_convs_to_fp16)

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """Logits (B, out_channels) for x_t (B, C, H, W) at original timesteps (B,) (or 0-d:
        one for the whole batch); with the attention pool H = W = image_size."""
        check_image(x, self.in_channels, size=self.image_size if self.pool == "attention" else None)
        self._check_dtype(x)
        emb = self._embed_time(check_timesteps(timesteps, x))
        h = x.to(self.dtype)
        spatial = self.pool.startswith("spatial")
        spatial_means = []
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                spatial_means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            spatial_means.append(h.to(x.dtype).mean(dim=(2, 3)))
            features = torch.cat(spatial_means, dim=-1)
            if self.pool == "spatial":
                return self.out(features)
            first, norm, _, last = self.out
            return last(norm(first(features), activation="silu"))
        norm, head = self.out[0], self.out[2:]
        return head(norm(h.to(x.dtype), activation="silu"))

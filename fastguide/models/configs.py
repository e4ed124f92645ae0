"""Presets with the released guided-diffusion hyper-parameters, and ADM's model factories.

``unet_config(name)`` / ``classifier_config(name)`` return the flags of ADM's scripts
(``num_channels``, ``attention_resolutions="32,16,8"`` as resolutions, ``learn_sigma`` …);
``create_model(**flags)`` / ``create_classifier(**flags)`` turn them into modules the way
ADM's ``script_util`` does (channel multipliers by image size, resolutions to
downsample rates, 6 output channels when learning the variance, 1000 classes).

``dit_config(name)`` returns the constructor arguments of the official DiT and SiT models
("DiT-XL/2" … "SiT-S/8"); ``fastguide.DiT(**dit_config(name))`` builds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

from .unet import EncoderUNet, UNet

_UNET_PRESETS = {
    "adm64": dict(
        image_size=64,
        num_channels=192,
        num_res_blocks=3,
        attention_resolutions="32,16,8",
        num_head_channels=64,
        use_new_attention_order=True,
        dropout=0.1,
    ),
    "adm128": dict(
        image_size=128, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8", num_heads=4, dropout=0.0
    ),
    "adm256": dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        attention_resolutions="32,16,8",
        num_head_channels=64,
        dropout=0.0,
    ),
    "adm512": dict(
        image_size=512,
        num_channels=256,
        num_res_blocks=2,
        attention_resolutions="32,16,8",
        num_head_channels=64,
        dropout=0.0,
        use_fp16=False,  # (the one released model sampled in float32: guided-diffusion's README)
    ),
    # A small class-conditional model for 16×16 images with a null class (the benchmarks'
    # compact UNet; not the digits model, whose flags are fastguide.apps.digits').
    "compact": dict(
        image_size=16,
        num_channels=64,
        num_res_blocks=2,
        attention_resolutions="8",
        channel_mult="1,2,2",
        num_head_channels=32,
        dropout=0.1,
        num_classes=10,
        learn_sigma=False,
        use_fp16=False,
        null_class=True,
        in_channels=1,
    ),
}
# 256x256_diffusion_uncond.pt: adm256 without the label table, sampled with the 256
# classifier's guidance (the README's scale 10).
_UNET_PRESETS["adm256-uncond"] = {**_UNET_PRESETS["adm256"], "class_cond": False}
_UNET_COMMON = dict(
    class_cond=True,
    learn_sigma=True,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_fp16=True,
    num_heads=4,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_new_attention_order=False,
    channel_mult="",
    use_checkpoint=False,
)

_CLASSIFIER_PRESETS = {
    "adm64": dict(image_size=64, classifier_depth=4),
    "adm128": dict(image_size=128, classifier_depth=2),
    "adm256": dict(image_size=256, classifier_depth=2),
    "adm256-uncond": dict(image_size=256, classifier_depth=2),  # the 256 classifier guides it
    "adm512": dict(image_size=512, classifier_depth=2),
    "compact": dict(
        image_size=16,
        classifier_depth=1,
        classifier_width=32,
        classifier_attention_resolutions="8",
        channel_mult="1,2,2",
        num_classes=10,
        in_channels=1,
    ),
}
_CLASSIFIER_COMMON = dict(
    classifier_width=128,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
    classifier_use_fp16=False,
    channel_mult="",
)


# The official DiT sizes (facebookresearch/DiT models.py), each with patch 2, 4 and 8; SiT
# (willisma/SiT) has the same architectures, trained as a flow. Both keep learn_sigma's 2C
# output channels: SiT's train.py defaults to it, and its sample.py builds the released
# SiT-XL-2-256x256.pt with it (SiT's sampler, as SiTVelocity, reads the first C).
_TRANSFORMER_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
}
_DIT_PRESETS = {
    f"{family}-{size}/{patch}": dict(**dims, patch_size=patch, learn_sigma=True)
    for family in ("DiT", "SiT")
    for size, dims in _TRANSFORMER_SIZES.items()
    for patch in (2, 4, 8)
}
_DIT_COMMON = dict(input_size=32, in_channels=4, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000)


def _preset(name: str, table: dict, common: dict, kind: str) -> dict:
    if name not in table:
        raise ValueError(f"unknown {kind} preset {name!r}; choose one of {sorted(table)}")
    return {**common, **table[name]}


def unet_config(name: str) -> dict:
    """ADM script flags of a released UNet ("adm64", "adm128", "adm256", "adm512", the
    unconditional "adm256-uncond") or fastguide's "compact" preset; pass them to
    ``create_model``."""
    return _preset(name, _UNET_PRESETS, _UNET_COMMON, "UNet")


def classifier_config(name: str) -> dict:
    """ADM script flags of a released noisy classifier; pass them to ``create_classifier``.
    ``classifier_use_fp16`` is False (fp32 convolutions), as guided-diffusion's README
    samples every released model (its flag's default there, and its training flags leave
    it so too); only its 25-step DDIM example passes True, which ``{**classifier_config(name),
    "classifier_use_fp16": True}`` gives."""
    return _preset(name, _CLASSIFIER_PRESETS, _CLASSIFIER_COMMON, "classifier")


def dit_config(name: str) -> dict:
    """``DiT`` constructor arguments of an official model, "DiT-XL/2" … "DiT-S/8" or
    "SiT-XL/2" … "SiT-S/8", for 256×256 images (32×32 latents; pass input_size=64 for
    512×512). Every preset has learn_sigma=True (2C output channels), as the released
    checkpoints; pass learn_sigma=False for a SiT trained without it."""
    return _preset(name, _DIT_PRESETS, _DIT_COMMON, "DiT")


def _comma_list(name: str, value: object, example: str) -> tuple[float, ...]:
    """ADM's comma-separated flag (``example``), or a sequence of numbers, as a tuple of
    numbers (ints, floats where written with a point); named when it is neither."""
    if isinstance(value, str):
        try:
            return tuple(float(v) if "." in v else int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{name} must be comma-separated numbers such as {example!r}, got {value!r}") from None
    if isinstance(value, (tuple, list)) and all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        # (NumPy numbers as Python's, which UNet takes too)
        return tuple(int(v) if isinstance(v, Integral) else float(v) for v in value)
    raise TypeError(f"{name} must be a comma-separated string such as {example!r} or a list of numbers, got {value!r}")


def _channel_mult(image_size: int, channel_mult: object) -> tuple[float, ...]:
    multipliers = _comma_list("channel_mult", channel_mult, "1,2,3,4")
    if multipliers:
        return multipliers
    defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if image_size not in defaults:
        raise ValueError(f"no default channel_mult for image_size {image_size}; pass channel_mult")
    return defaults[image_size]


def _downsample_rates(image_size: int, resolutions: object, name: str) -> tuple[int, ...]:
    """ADM's attention resolutions (the feature-map sizes that get attention) as the
    downsample rates image_size // r that the UNet takes."""
    sizes = _comma_list(name, resolutions, "32,16,8")
    if not all(isinstance(r, int) and r >= 1 for r in sizes):
        raise ValueError(f"{name} must be positive int feature-map sizes such as '32,16,8', got {resolutions!r}")
    return tuple(image_size // int(r) for r in sizes)


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | Sequence[float] = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions: str | Sequence[int] = "16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
    num_classes: int = 1000,
    in_channels: int = 3,
    null_class: bool = False,
    label_dropout: float = 0.0,
) -> UNet:
    """ADM's create_model: a UNet from script flags (``null_class`` adds the CFG row)."""
    for name, flag in (("learn_sigma", learn_sigma), ("class_cond", class_cond)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    return UNet(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_downsample_rates(image_size, attention_resolutions, "attention_resolutions"),
        dropout=dropout,
        channel_mult=_channel_mult(image_size, channel_mult),
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        null_class=null_class,
        label_dropout=label_dropout,
    )


def create_classifier(
    image_size: int,
    classifier_use_fp16: bool = False,
    classifier_width: int = 128,
    classifier_depth: int = 2,
    classifier_attention_resolutions: str | Sequence[int] = "32,16,8",
    classifier_use_scale_shift_norm: bool = True,
    classifier_resblock_updown: bool = True,
    classifier_pool: str = "attention",
    channel_mult: str | Sequence[float] = "",
    num_classes: int = 1000,
    in_channels: int = 3,
) -> EncoderUNet:
    """ADM's create_classifier: the noisy classifier from script flags."""
    return EncoderUNet(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=_downsample_rates(
            image_size, classifier_attention_resolutions, "classifier_attention_resolutions"
        ),
        channel_mult=_channel_mult(image_size, channel_mult),
        use_fp16=classifier_use_fp16,
        num_head_channels=64 if classifier_width >= 64 else classifier_width,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )

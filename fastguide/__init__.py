"""fastguide: fast guided diffusion sampling.

Fused kernels for the three hot spots of a guided sampler (attention, GroupNorm with
ADM's scale-shift and SiLU, the guidance combine + sampler update) behind one set of
ops, ``fastguide.ops``, with a pure-PyTorch reference path that runs everywhere.

Importing fastguide registers the ``fastguide::`` custom ops; it imports neither triton
nor the CUDA extension and never touches the CUDA driver.
"""

from . import ops
from .models.adapters import DiffusersUNet, SiTVelocity
from .models.block_cache import FirstBlockCache, ForecastCache
from .models.checkpoints import load_checkpoint, save_state_dict
from .models.configs import (
    classifier_config,
    create_classifier,
    create_model,
    dit_config,
    unet_config,
)
from .models.dit import DiT
from .models.unet import EncoderUNet, UNet
from .ops import reference
from .ops.backends import available_backends, backend, get_backend, set_backend
from .pipelines.accelerate import accelerate
from .sampling.guidance import (
    APG,
    CFG,
    PAG,
    AutoGuidance,
    CFGPlusPlus,
    ClassifierGuidance,
    DeltaReuse,
    Guidance,
    SkipLayerGuidance,
)
from .sampling.loop import GuidedSampler, sample
from .sampling.schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "APG",
    "AutoGuidance",
    "CFG",
    "CFGPlusPlus",
    "ClassifierGuidance",
    "DeltaReuse",
    "DiT",
    "DiffusersUNet",
    "SiTVelocity",
    "SkipLayerGuidance",
    "EncoderUNet",
    "FirstBlockCache",
    "ForecastCache",
    "Guidance",
    "GuidedSampler",
    "NoiseSchedule",
    "PAG",
    "UNet",
    "accelerate",
    "available_backends",
    "backend",
    "classifier_config",
    "create_classifier",
    "create_model",
    "dit_config",
    "get_backend",
    "load_checkpoint",
    "ops",
    "reference",
    "sample",
    "save_state_dict",
    "set_backend",
    "unet_config",
]

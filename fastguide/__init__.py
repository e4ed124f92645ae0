"""fastguide: fast guided diffusion sampling.

Fused kernels for the three hot spots of a guided sampler (attention, GroupNorm with
ADM's scale-shift and SiLU, the guidance combine + sampler update) behind one set of
ops, ``fastguide.ops``, with a pure-PyTorch reference path that runs everywhere.

Importing fastguide registers the ``fastguide::`` custom ops; it imports neither triton
nor the CUDA extension and never touches the CUDA driver.
"""

from . import ops, reference
from .accelerate import accelerate
from .adapters import DiffusersUNet
from .backends import available_backends, backend, get_backend, set_backend
from .checkpoints import load_checkpoint, save_state_dict
from .configs import classifier_config, create_classifier, create_model, unet_config
from .guidance import APG, CFG, ClassifierGuidance
from .samplers import GuidedSampler, sample
from .schedule import NoiseSchedule
from .unet import EncoderUNet, UNet

__version__ = "0.1.0"

__all__ = [
    "APG",
    "CFG",
    "ClassifierGuidance",
    "DiffusersUNet",
    "EncoderUNet",
    "GuidedSampler",
    "NoiseSchedule",
    "UNet",
    "accelerate",
    "available_backends",
    "backend",
    "classifier_config",
    "create_classifier",
    "create_model",
    "get_backend",
    "load_checkpoint",
    "ops",
    "reference",
    "sample",
    "save_state_dict",
    "set_backend",
    "unet_config",
]

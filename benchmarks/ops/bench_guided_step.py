"""guided_step vs the eager way (chunk, combine, diffusers-style DDIM update, cat) and
torch.compile of that eager code, on the same tensors.

Floor: the step must read the 2B model output and x and write the next 2B input:
5·E elements (E = B·C·H·W), at the tensors' element size.
"""

import math

import pytest
import torch

from benchmarks.conftest import DEVICE, GPU_FASTGUIDE_IMPLS, compiled, on_backend
from fastguide import ops

W, ABAR_T, ABAR_PREV = 5.0, 0.5, 0.6
ALPHA, SIGMA = math.sqrt(ABAR_T), math.sqrt(1 - ABAR_T)


def eager_cfg_ddim(model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """CFG + DDIM (eta=0, clip, use_clipped_model_output) as a diffusers pipeline does it."""
    noise_pred_cond, noise_pred_uncond = model_output.chunk(2)
    noise_pred = noise_pred_uncond + W * (noise_pred_cond - noise_pred_uncond)
    pred_original_sample = (x - SIGMA * noise_pred) / ALPHA
    pred_original_sample = pred_original_sample.clamp(-1, 1)
    pred_epsilon = (x - ALPHA * pred_original_sample) / SIGMA
    pred_sample_direction = math.sqrt(1 - ABAR_PREV) * pred_epsilon
    prev_sample = math.sqrt(ABAR_PREV) * pred_original_sample + pred_sample_direction
    return torch.cat([prev_sample] * 2)


def fastguide_cfg_ddim(model_output: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return ops.guided_step(model_output, x, STEP, COMBINE, out=out)


STEP = ops.StepCoefficients(
    alpha=ALPHA, sigma=SIGMA, clip_denoised=True, k_x0=math.sqrt(ABAR_PREV), k_eps=math.sqrt(1 - ABAR_PREV)
)
COMBINE = ops.GuidanceCombine(W)

CPU_SHAPES = [(8, 3, 64, 64)]
GPU_SHAPES = [(64, 3, 256, 256), (16, 4, 128, 128)]


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    model_output = torch.randn((2 * shape[0], *shape[1:]), generator=g).to(DEVICE, dtype)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return model_output, x, torch.empty_like(model_output)


def _run(record, impl, shape, dtype):
    model_output, x, out = _inputs(shape, dtype)
    if impl.startswith("fastguide"):
        fn = on_backend(impl, lambda: fastguide_cfg_ddim(model_output, x, out))
    else:
        step = {"eager": eager_cfg_ddim, "torch.compile": compiled(eager_cfg_ddim)}[impl]
        fn = lambda: step(model_output, x)  # noqa: E731
    record(fn, bytes_moved=5 * x.numel() * x.element_size(), expected=lambda: eager_cfg_ddim(model_output, x))


@pytest.mark.parametrize("impl", ["fastguide", "eager", "torch.compile"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_guided_step_cpu(record, impl, shape):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    _run(record, impl, shape, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [*GPU_FASTGUIDE_IMPLS, "eager", "torch.compile"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_guided_step_gpu(record, impl, dtype, shape):
    _run(record, impl, shape, dtype)

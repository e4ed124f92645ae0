"""What the tests share, in one module (no test module imports another): which backends
run here, the tolerance table of each op, random and poisoned tensors, and the inputs of
the kernel tests that more than one backend's suite uses."""

import math

import torch
import torch.nn.functional as F

from fastguide import ops
from fastguide.ops import backends

# --------------------------------------------------------------------------------------
# Backends under test
# --------------------------------------------------------------------------------------

def backends_for(op: str) -> list[str]:
    """Backends that can run ``op`` on this machine's test device (torch always)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = ["torch"]
    for name in ("triton", "cuda"):
        if ops._HAS_KERNEL[op][name] and backends.why_not(name, device) is None:
            found.append(name)
    return found


def backend_dtype_params(op: str, dtypes: list[torch.dtype]) -> list[tuple[str, torch.dtype]]:
    """(backend, dtype) pairs to test; float64 only on the torch backend (the kernels' dtypes
    are fp32/fp16/bf16)."""
    return [(b, d) for b in backends_for(op) for d in dtypes if b == "torch" or d != torch.float64]


# --------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------

ATTENTION = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
GROUP_NORM = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
GUIDED_STEP = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, table: dict, dtype: torch.dtype) -> None:
    atol, rtol = table[dtype]
    assert not actual.isnan().any(), "output holds NaN: some elements were never written"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (ADM zero-initialises output convs, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.5 if p.dim() == 1 else 0.0))
    return module


SHAPES = [
    (1, 3, 1, (7, 13)),
    (1, 3, 1, (32, 32)),
    (1, 8, 2, (64, 64)),
    (2, 320, 32, (32, 32)),
    (2, 96, 32, (1, 1)),
    (5, 160, 32, (7, 13)),
    (2, 320, 32, (9,)),
    (1, 512, 32, (4, 4)),
]


def explicit_group_norm(x, groups, weight, bias, scale, shift, activation, eps=1e-5):
    """F.group_norm in float64, then y·(1 + scale) + shift and silu(y) = y·sigmoid(y)."""
    y = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.double().reshape(view))
    if shift is not None:
        y = y + shift.double().reshape(view)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y


def random_inputs(n, c, spatial, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, c, *spatial), generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    # weight far from 1 and bias far from 0: catches SiLU derivatives taken at the wrong point.
    weight = (torch.rand(c, generator=g) * 2 + 0.5).to(device)
    bias = torch.randn(c, generator=g).to(device)
    scale = (torch.randn(n, c, generator=g) * 0.5).to(device=device, dtype=dtype)
    shift = torch.randn(n, c, generator=g).to(device=device, dtype=dtype)
    return x, weight, bias, scale, shift


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def poisoned(shape, dtype=torch.float64):
    return torch.full(shape, float("nan"), dtype=dtype)


CASES = {
    "unguided-ddim": dict(k_x0=0.8, k_eps=0.5),
    "cfg-ddim": dict(guidance_scale=4.0, k_x0=0.8, k_eps=0.5),
    "cfg-clip-noise": dict(guidance_scale=4.0, clip_denoised=True, k_x0=0.8, k_eps=0.4, k_noise=0.3),
    "cfg-v-prediction": dict(guidance_scale=3.0, prediction_type="v_prediction", k_x=0.3, k_x0=0.6, k_eps=0.2),
    "sample-prediction-clip": dict(prediction_type="sample", clip_denoised=True, k_x0=0.7, k_eps=0.6),
    "dpm2m-prev-x0out": dict(guidance_scale=2.0, k_x=0.9, k_x0=0.4, k_prev=-0.1, x0_out=True),
    "classifier-eps-shift": dict(clip_denoised=True, grad_eps_scale=0.7, k_x0=0.8, k_eps=0.5),
    "cfg-and-classifier": dict(guidance_scale=3.0, grad_eps_scale=0.5, k_x0=0.8, k_eps=0.5),
    "ddpm-learned-var-grad": dict(
        guidance_scale=3.0, clip_denoised=True, k_x=0.6, k_x0=0.3, k_noise=1.0, k_grad=2.0,
        log_variance_range=(-6.0, -4.5), learned_variance=True,
    ),
    "rescale": dict(guidance_scale=7.0, guidance_rescale=0.7, k_x0=0.8, k_eps=0.5),
    "cfg-zero-star": dict(guidance_scale=5.0, cfg_zero_star=True, k_x0=0.8, k_eps=0.5),
    "apg-momentum-clip": dict(
        guidance_scale=6.0, apg=True, apg_eta=0.2, apg_norm_threshold=3.0, apg_momentum=-0.5,
        k_x0=0.8, k_eps=0.5,
    ),
    "apg-rescale-2b-out": dict(guidance_scale=6.0, apg=True, guidance_rescale=0.5, k_x0=0.8, k_eps=0.5, out_2b=True),
}


STEP_SHAPES = [(1, 3, (1, 1)), (2, 3, (7, 13)), (5, 4, (16, 16)), (2, 3, (32, 32)), (1, 4, (72, 72))]


def case_inputs(case: dict, batch: int, channels: int, spatial: tuple, dtype: torch.dtype, device):
    """Random inputs for one case: (model_output, x, kwargs), with poisoned out buffers."""
    case = dict(case)
    learned = case.pop("learned_variance", False)
    want_x0 = case.pop("x0_out", False)
    out_2b = case.pop("out_2b", False)
    guided = case.get("guidance_scale") is not None
    shape = (batch, channels, *spatial)
    rows = 2 * batch if guided else batch
    model_output = randn(rows, channels * (2 if learned else 1), *spatial, seed=1, dtype=dtype).to(device)
    x = (randn(*shape, seed=0, dtype=dtype) * 1.3).to(device)
    kwargs = dict(alpha=0.75, sigma=math.sqrt(1 - 0.75**2), **case)
    for i, name in enumerate(["prev", "noise", "grad"]):
        kwargs[name] = randn(*shape, seed=10 + i, dtype=dtype).to(device)
    if case.get("apg_momentum"):
        kwargs["apg_buffer"] = randn(*shape, seed=20, dtype=torch.float32).to(device)
    if want_x0:
        kwargs["x0_out"] = poisoned(shape, dtype).to(device)
    kwargs["out"] = poisoned(((2 * batch) if out_2b else batch, channels, *spatial), dtype).to(device)
    return model_output, x, kwargs


def as_float64(kwargs: dict) -> dict:
    return {k: v.detach().cpu().double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

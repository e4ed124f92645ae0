"""group_norm + scale-shift + SiLU vs the eager way (F.group_norm, scale-shift, F.silu; the
norm in float32 as ADM's GroupNorm32 runs it, which in fp16/bf16 moves about 3x the bytes
of a norm in the input's dtype, as diffusers' nn.GroupNorm runs: read its eager ratio so),
torch.compile of that eager code, and a peer fused GroupNorm (Liger-Kernel's Triton
GroupNorm with its affine, then the scale-shift and SiLU eagerly) when it is installed, on
the same tensors. Liger reads NCHW: a channels_last x is copied to it first (its
`ensure_contiguous`), which its channels_last rows pay, as its users would.

Floor: read x once and write y once: 2·E elements (E = N·C·H·W). The forward reads x
twice (statistics, then normalise); only where the second read hits L2 (the Triton
one-pass kernels, or an x smaller than L2) can it pass 2/3 of copy speed.
`test_group_norm_one_pass_gpu` times the Triton forward at the large shape with its
one-pass kernel and forced onto the two launches (channels_last: three), on the same
tensors, in both layouts: whether the one-pass kernels' second read hits L2 shows as the
difference.

The backward's floor: read x and dy once, write dx once: 3·E (the O(N·C) parameter
gradients aside). `test_group_norm_backward_gpu` times the backward alone (the forward's
graph kept) against eager autograd and torch.compile's; at NCHW, `fastguide-triton` takes
the one-pass kernel where it fits and `fastguide-triton-three-launch` is it forced onto
the three launches, which read x and dy twice.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, GPU_FASTGUIDE_IMPLS, row_function
from benchmarks.timing import forward_for_capture
from fastguide import ops

GROUPS = 32


def eager_norm(x, weight, bias, scale, shift):
    h = F.group_norm(x.float(), GROUPS, weight, bias).to(x.dtype)  # ADM's GroupNorm32
    return F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def fastguide_norm(x, weight, bias, scale, shift):
    return ops.group_norm(x, GROUPS, weight, bias, scale=scale, shift=shift, activation="silu")


def peer_norm():
    """Liger-Kernel's fused GroupNorm (affine), then the scale-shift and SiLU eagerly;
    skips when absent."""
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
    except ImportError:
        pytest.skip("peer not installed (pip install liger-kernel)")

    def run(x, weight, bias, scale, shift):
        h = LigerGroupNormFunction.apply(x, weight, bias, x.shape[1], GROUPS, 1e-5)
        return F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])

    return run


CPU_SHAPES = [(2, 128, 32, 32)]
GPU_SHAPES = [(2, 320, 64, 64), (16, 512, 32, 32), (64, 256, 64, 64)]


def _inputs(shape, dtype, channels_last):
    """(x, weight, bias, scale, shift) on DEVICE, from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.rand(c, generator=g).to(DEVICE) + 0.5, torch.randn(c, generator=g).to(DEVICE)
    scale, shift = (torch.randn(n, c, generator=g).to(DEVICE, dtype) for _ in range(2))
    return x, weight, bias, scale, shift


def _norm(impl):
    return row_function(impl, fastguide_norm, peer_norm, eager_norm)


def _run(record, impl, shape, dtype, channels_last=False):
    inputs = _inputs(shape, dtype, channels_last)
    fn = _norm(impl)
    record(
        lambda: fn(*inputs),
        bytes_moved=2 * inputs[0].numel() * inputs[0].element_size(),
        expected=lambda: eager_norm(*inputs),
    )


def _run_backward(record, impl, shape, dtype, channels_last):
    leaves = [t.requires_grad_() for t in _inputs(shape, dtype, channels_last)]
    with torch.enable_grad(), forward_for_capture():
        y = _norm(impl)(*leaves)
    dy = torch.randn_like(y)
    record(
        lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True),
        bytes_moved=3 * y.numel() * y.element_size(),
        grad=True,
        expected=lambda: torch.autograd.grad(eager_norm(*leaves), leaves, dy),
    )


@pytest.mark.parametrize("impl", ["fastguide", "eager", "torch.compile"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_group_norm_cpu(record, impl, shape):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    _run(record, impl, shape, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [*GPU_FASTGUIDE_IMPLS, "eager", "torch.compile", "peer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_gpu(record, impl, dtype, shape, channels_last):
    _run(record, impl, shape, dtype, channels_last)


@pytest.mark.gpu
# impl, so the table sets the two paths side by side: "fastguide-triton" as it chooses (one
# pass where a group fits), "fastguide-triton-two-pass" held to the passes over HBM.
@pytest.mark.parametrize("impl", ["fastguide-triton", "fastguide-triton-two-pass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_one_pass_gpu(record, impl, dtype, channels_last, monkeypatch):
    kernels = importlib.import_module("fastguide.kernels.group_norm")
    if impl == "fastguide-triton-two-pass":
        # no room in L2: NCHW's two launches, channels_last's three
        monkeypatch.setattr(kernels, "_l2_budget", lambda device: 0)
    _run(record, "fastguide-triton", (64, 256, 64, 64), dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "impl", ["fastguide-triton", "fastguide-triton-three-launch", "fastguide-cuda", "eager", "torch.compile", "peer"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_backward_gpu(record, impl, dtype, channels_last, monkeypatch):
    if impl == "fastguide-triton-three-launch":
        if channels_last:
            pytest.skip("channels_last's backward is the three launches already")
        kernels = importlib.import_module("fastguide.kernels.group_norm")
        monkeypatch.setattr(kernels, "_l2_budget", lambda device: 0)
        impl = "fastguide-triton"
    _run_backward(record, impl, (64, 256, 64, 64), dtype, channels_last)

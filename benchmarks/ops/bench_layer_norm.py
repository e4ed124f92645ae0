"""layer_norm + adaLN modulation (DiT's modulate(norm(x), shift, scale)) and the fused
gated residual + norm seam, against the eager way, torch.compile of that eager code, and
a peer fused LayerNorm (Liger-Kernel's Triton LayerNorm, then the modulation eagerly; for
the seam, the gated residual eagerly before it) when it is installed, on the same tensors.

Floors: layer_norm reads x once and writes y once: 2·E elements (E = N·L·D), which the
fused kernels move exactly (a row is read once into registers). gated_residual_layer_norm
reads h and branch and writes h_new and y: 4·E elements; the eager pair moves 7·E
(h + gate·branch: 3·E, the norm 2·E, the modulation 2·E or more). The backward (DiT
training, the gradient through x and the per-sample scale and shift) reads x and dy and
writes dx: 3·E; fastguide's two launches (dx, then the column sums) read x and dy twice,
5·E, so they top out at 60% of that floor.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, GPU_FASTGUIDE_IMPLS, row_function
from benchmarks.timing import forward_for_capture
from fastguide import ops


def eager_modulated_norm(x, scale, shift):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def eager_seam(h, branch, gate, scale, shift):
    h = h + gate.unsqueeze(1) * branch
    return h, eager_modulated_norm(h, scale, shift)


def fastguide_modulated_norm(x, scale, shift):
    return ops.layer_norm(x, x.shape[-1:], None, None, 1e-6, scale=scale, shift=shift)


def fastguide_seam(h, branch, gate, scale, shift):
    return ops.gated_residual_layer_norm(h, branch, gate, h.shape[-1], scale=scale, shift=shift)


def peer_modulated_norm():
    """Liger-Kernel's fused LayerNorm, then the modulation eagerly; skips when absent. (Its
    backward forms the identity affine's dW and dB too, work the other rows skip.)"""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        pytest.skip("peer not installed (pip install liger-kernel)")

    # The identity affine made once per width (as a model holds it), not timed with each call.
    affine: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(x, scale, shift):
        d = x.shape[-1]
        key = (d, x.device, x.dtype)
        if key not in affine:
            ones = torch.ones(d, device=x.device, dtype=x.dtype)
            affine[key] = (ones, torch.zeros_like(ones))
        ones, zeros = affine[key]
        y = LigerLayerNormFunction.apply(x, ones, zeros, 1e-6)
        return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    return run


def peer_seam():
    """The gated residual eagerly, then peer_modulated_norm; skips when the peer is absent."""
    norm = peer_modulated_norm()

    def run(h, branch, gate, scale, shift):
        h = h + gate.unsqueeze(1) * branch
        return h, norm(h, scale, shift)

    return run


# (N, L, D): DiT-XL/2 at 256² (256 tokens) and 512² (1024 tokens), batch 2·8 (CFG), and a
# narrow width; CPU runs one small case of each.
CPU_SHAPES = [(2, 64, 384)]
GPU_SHAPES = [(16, 256, 1152), (16, 1024, 1152), (64, 256, 384)]


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    n, _, d = shape
    x, branch = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    scale, shift, gate = (torch.randn(n, d, generator=g).to(DEVICE, dtype) for _ in range(3))
    return x, branch, gate, scale, shift


def _modulated_norm(impl):
    """modulate(norm(x), shift, scale) as the row ``impl`` computes it."""
    return row_function(impl, fastguide_modulated_norm, peer_modulated_norm, eager_modulated_norm)


def _run_norm(record, impl, shape, dtype):
    x, _, _, scale, shift = _inputs(shape, dtype)
    fn = _modulated_norm(impl)
    record(
        lambda: fn(x, scale, shift),
        bytes_moved=2 * x.numel() * x.element_size(),
        expected=lambda: eager_modulated_norm(x, scale, shift),
    )


def _run_seam(record, impl, shape, dtype):
    h, branch, gate, scale, shift = _inputs(shape, dtype)
    fn = row_function(impl, fastguide_seam, peer_seam, eager_seam)
    record(
        lambda: fn(h, branch, gate, scale, shift),
        bytes_moved=4 * h.numel() * h.element_size(),
        expected=lambda: eager_seam(h, branch, gate, scale, shift),
    )


def _run_norm_backward(record, impl, shape, dtype):
    x, _, _, scale, shift = _inputs(shape, dtype)
    leaves = [t.requires_grad_() for t in (x, scale, shift)]
    fn = _modulated_norm(impl)
    with torch.enable_grad(), forward_for_capture():
        y = fn(*leaves)
    dy = torch.randn_like(y)
    # the backward alone: the forward's graph kept, its gradient taken again each call
    record(
        lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True),
        bytes_moved=3 * x.numel() * x.element_size(),
        grad=True,
        expected=lambda: torch.autograd.grad(eager_modulated_norm(*leaves), leaves, dy),
    )


@pytest.mark.parametrize("impl", ["fastguide", "eager", "torch.compile"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "gated_residual_layer_norm", "layer_norm_backward"])
def test_layer_norm_cpu(record, op, impl, shape):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    run = {"layer_norm": _run_norm, "gated_residual_layer_norm": _run_seam, "layer_norm_backward": _run_norm_backward}
    run[op](record, impl, shape, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [*GPU_FASTGUIDE_IMPLS, "eager", "torch.compile", "peer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_layer_norm_gpu(record, impl, dtype, shape):
    _run_norm(record, impl, shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [*GPU_FASTGUIDE_IMPLS, "eager", "torch.compile", "peer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gated_residual_layer_norm_gpu(record, impl, dtype, shape):
    _run_seam(record, impl, shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [*GPU_FASTGUIDE_IMPLS, "eager", "torch.compile", "peer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_layer_norm_backward_gpu(record, impl, dtype):
    _run_norm_backward(record, impl, (16, 1024, 1152), dtype)

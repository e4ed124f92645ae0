"""attention vs eager softmax(q·kᵀ)·v, torch.compile of it, and every SDPA backend the
machine has (flash, efficient, math, cuDNN), forward and forward+backward. On Hopper,
"fastguide" reads q, k, v by TMA (kernels.attention._forward_tma_kernel) and
"fastguide-pointer" is the same op held to the pointer kernel, forward only: the A/B of
the two loads.

FLOPs: forward 4·B·H·Lq·Lk·D; forward + backward 14·B·H·Lq·Lk·D (the backward's five
matmuls, as FlashAttention counts it). Reported as TFLOP/s.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.conftest import DEVICE, compiled
from fastguide import ops
from fastguide.kernels import attention as attention_kernels


def eager_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
}
IMPLS = ["fastguide", "fastguide-pointer", "eager", "torch.compile", *SDPA_BACKENDS]


def pointer_attention(q, k, v):
    """ops.attention with the TMA forward off (FASTGUIDE_ATTENTION_TMA=off for this call)."""
    previous, attention_kernels.tma_mode = attention_kernels.tma_mode, "off"
    try:
        return ops.attention(q, k, v)
    finally:
        attention_kernels.tma_mode = previous


def _attention_fn(impl):
    if impl == "fastguide":
        return ops.attention
    if impl == "fastguide-pointer":
        return pointer_attention
    if impl == "eager":
        return eager_attention
    if impl == "torch.compile":
        return compiled(eager_attention)

    def sdpa(q, k, v):
        with sdpa_kernel([SDPA_BACKENDS[impl]]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return sdpa


def _run(record, impl, shape, dtype, backward):
    batch, heads, lq, lk, dim = shape
    if impl in ("eager", "torch.compile", "sdpa-math") and batch * heads * lq * lk * 4 > 8 << 30:
        pytest.skip("the Lq×Lk score matrix would not fit")
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn((batch, heads, n, dim), generator=g).to(DEVICE, dtype).requires_grad_(backward)
        for n in (lq, lk, lk)
    )
    if impl == "fastguide-pointer":
        if backward:
            pytest.skip("the TMA path is the forward's alone")
        reasons = attention_kernels.tma_not_supported_reasons(q, k, v)
        if reasons:
            pytest.skip(f"fastguide runs the pointer kernel here: {reasons}")
    attend = _attention_fn(impl)
    try:
        out = attend(q, k, v)
    except RuntimeError as error:  # an SDPA backend that does not take these inputs here
        pytest.skip(f"{impl} cannot run this case: {str(error).splitlines()[0][:120]}")
    flops = 4 * batch * heads * lq * lk * dim
    if backward:
        grad = torch.randn_like(out)
        # autograd.grad, not backward: .grad accumulation would add three adds to every row
        record(
            lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), grad),
            flops=flops * 14 // 4,
            grad=True,
            expected=lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad),
        )
    else:
        # expected: torch's SDPA (eager's Lq×Lk scores would not fit at the long shapes)
        record(lambda: attend(q, k, v), flops=flops, expected=lambda: F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("impl", ["fastguide", "eager", "torch.compile", "sdpa-math"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attention_cpu(record, impl, backward):
    if DEVICE.type != "cpu":
        pytest.skip("CPU set")
    _run(record, impl, (2, 4, 256, 256, 64), torch.float32, backward)


# ADM 64×64 at batch 2×32: 6 heads at 32×32, 9 at 16×16, 12 at 8×8 (head dim 64); long sequences.
GPU_SHAPES = [
    (64, 6, 1024, 1024, 64),
    (64, 9, 256, 256, 64),
    (64, 12, 64, 64, 64),
    (4, 16, 4096, 4096, 64),
    (4, 16, 4096, 4096, 128),
    (4, 16, 16384, 16384, 64),
    (4, 16, 16384, 16384, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attention_gpu(record, impl, dtype, shape, backward):
    _run(record, impl, shape, dtype, backward)


# The targets, forward only (a few minutes where the sweep above takes far longer):
# ADM-64's three attention shapes at batch 2×32 and L = 4096, D = 128; gpu.sh runs these
# beside the other op kernels and the sweep last.
TARGET_SHAPES = [(64, 6, 1024, 1024, 64), (64, 9, 256, 256, 64), (64, 12, 64, 64, 64), (4, 16, 4096, 4096, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastguide", "fastguide-pointer", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", TARGET_SHAPES, ids=str)
def test_attention_targets_gpu(record, impl, dtype, shape):
    _run(record, impl, shape, dtype, backward=False)

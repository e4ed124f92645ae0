"""group_norm: every backend against F.group_norm in float64 with scale-shift and SiLU written out."""

import importlib
import math

import pytest
import torch
import triton
import triton.language as tl

import fastguide
from fastguide import ops
from fastguide.kernels.group_norm import _ticket_task
from fastguide.ops.contract import NormParameters
from tests.helpers import (
    GROUP_NORM,
    SHAPES,
    assert_close,
    backend_dtype_params,
    backends_for,
    backends_with_emulation,
    explicit_group_norm,
    random_inputs,
    running_on,
)

BACKENDS = backends_for("group_norm")
# (N, C, G, spatial): C = 3 with one group, C not a power of two, 1×1, odd and 32×32
# spatial sizes; few groups over a large image split each group over several programs.


@pytest.mark.parametrize(
    "backend, dtype",
    backend_dtype_params("group_norm", [torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    ids=str,
)
@pytest.mark.parametrize(
    "shape, channels_last",
    [(s, False) for s in SHAPES] + [(s, True) for s in SHAPES if len(s[3]) == 2],
    ids=str,
)
@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_matches_explicit_formula(backend, dtype, shape, channels_last, scale_shift, activation, device):
    if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu" and not (scale_shift and activation):
        pytest.skip("for time: the interpreter checks Triton's bf16 on the full path alone (a GPU runs every case)")
    n, c, groups, spatial = shape
    x, weight, bias, scale, shift = random_inputs(n, c, spatial, dtype, device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if not scale_shift:
        scale = shift = None
    with fastguide.backend(backend):
        y = ops.group_norm(x, groups, weight, bias, scale=scale, shift=shift, activation=activation)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, explicit_group_norm(x, groups, weight, bias, scale, shift, activation), GROUP_NORM, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_scale_shift_as_adm_chunks(backend, device):
    # ADM chunks a (N, 2C, 1, 1) embedding projection: scale and shift are strided views.
    x, weight, bias, _, _ = random_inputs(2, 64, (5, 6), torch.float32, device)
    emb = torch.randn(2, 128, 1, 1, device=device)
    scale, shift = emb.chunk(2, dim=1)
    with fastguide.backend(backend):
        y = ops.group_norm(x, 32, weight, bias, scale=scale, shift=shift, activation="silu")
    assert_close(y, explicit_group_norm(x, 32, weight, bias, scale, shift, "silu"), GROUP_NORM, torch.float32)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_gradcheck_float64(activation):
    x, weight, bias, scale, shift = random_inputs(2, 6, (3, 5), torch.float64, "cpu")
    inputs = tuple(t.double().requires_grad_() for t in (x, weight, bias, scale, shift))

    def fn(x_, w_, b_, sc_, sh_):
        return ops.group_norm(x_, 3, w_, b_, scale=sc_, shift=sh_, activation=activation)

    with fastguide.backend("torch"):  # float64: the reference path
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 3, 1, (7, 13)), (1, 8, 2, (64, 64)), (2, 96, 32, (5, 5)), (5, 160, 32, (1, 1))], ids=str
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_backward_matches_autograd_of_formula(backend, dtype, shape, channels_last, device):
    n, c, groups, spatial = shape
    x, weight, bias, scale, shift = random_inputs(n, c, spatial, dtype, device, seed=3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, scale, shift)]
    grad_y = torch.randn(x.shape, dtype=dtype, device=device)
    with fastguide.backend(backend):
        y = ops.group_norm(leaves[0], groups, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation="silu")
        grads = torch.autograd.grad(y, leaves, grad_y)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    expected = explicit_group_norm(doubles[0], groups, *doubles[1:3], doubles[3], doubles[4], "silu")
    wanted = torch.autograd.grad(expected, doubles, grad_y.double())
    for got, want, leaf in zip(grads, wanted, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        # Parameter gradients sum over N·HW elements: their error grows with the count.
        count = want.numel() and x.numel() // want.numel()
        atol, rtol = GROUP_NORM[dtype]
        torch.testing.assert_close(got.double(), want, atol=atol * max(1, count) ** 0.5, rtol=rtol * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_channels_last_backward_without_silu_or_bias(backend, device):
    # Groups of 10 channels (SD's first blocks: 320 in 32), 80 = 64 + 16 channels (a partial
    # block of rows), no SiLU, no bias, a shift without a scale.
    n, c, groups = 2, 80, 8
    x, weight, _, _, shift = random_inputs(n, c, (6, 11), torch.float32, device, seed=5)
    x = x.to(memory_format=torch.channels_last)
    leaves = [t.detach().requires_grad_() for t in (x, weight, shift)]
    grad_y = torch.randn(x.shape, device=device)
    with fastguide.backend(backend):
        y = ops.group_norm(leaves[0], groups, leaves[1], None, shift=leaves[2])
        grads = torch.autograd.grad(y, leaves, grad_y)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    expected = explicit_group_norm(
        doubles[0], groups, doubles[1], torch.zeros(c, dtype=torch.float64, device=device), None, doubles[2], None
    )
    wanted = torch.autograd.grad(expected, doubles, grad_y.double())
    for got, want in zip(grads, wanted):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_group_norm_without_affine_matches_formula():
    x = torch.randn(3, 12, 4, 4, dtype=torch.float64)
    expected = explicit_group_norm(x, 4, torch.ones(12), torch.zeros(12), None, None, None)
    torch.testing.assert_close(ops.group_norm(x, 4), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 320, 32, (64, 64)), (16, 512, 32, (32, 32)), (1, 64, 32, (128, 128))], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_gpu_large_and_bf16(backend, dtype, shape, channels_last):
    n, c, groups, spatial = shape
    x, weight, bias, scale, shift = random_inputs(n, c, spatial, dtype, "cuda", seed=5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, scale, shift)]
    with fastguide.backend(backend):
        y = ops.group_norm(leaves[0], groups, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation="silu")
    expected = explicit_group_norm(x, groups, weight, bias, scale, shift, "silu")
    assert_close(y, expected, GROUP_NORM, dtype)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    wanted = torch.autograd.grad(
        explicit_group_norm(doubles[0], groups, *doubles[1:3], doubles[3], doubles[4], "silu"), doubles, grad_y.double()
    )
    atol, rtol = GROUP_NORM[dtype]
    for got, want in zip(grads, wanted):
        count = max(1, x.numel() // want.numel())
        torch.testing.assert_close(got.double(), want, atol=atol * count**0.5, rtol=rtol * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_on_flattened_channels_last(backend, device):
    # An AttentionBlock flattens a channels_last (N, C, H, W) to (N, C, H·W): channel stride 1.
    x, weight, bias, _, _ = random_inputs(2, 64, (6, 5), torch.float32, device)
    flat = x.to(memory_format=torch.channels_last).reshape(2, 64, -1)
    assert flat.stride(1) == 1
    with fastguide.backend(backend):
        y = ops.group_norm(flat, 32, weight, bias)
    assert_close(y, explicit_group_norm(flat, 32, weight, bias, None, None, None), GROUP_NORM, torch.float32)


@pytest.mark.parametrize("backend", backends_with_emulation("group_norm"))
def test_groups_whose_float32_statistics_overflow_are_nan(backend, device, request):
    # Values near 1e20 square past float32's range: such a group's statistics cannot be
    # formed in float32, and the NaN policy makes it NaN on every backend (aten alone
    # would return a finite, wrong row); the other group stays exact. Sample 2's first
    # group is two constant channels of ±1e30: each channel's M2 is 0, the group's variance
    # 1e60 (the cuda backend held it in float64 and gave ±1).
    x = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    x[0, :2] *= 1e20
    x[2, 0], x[2, 1] = 1e30, -1e30
    with running_on(backend, request):
        y = ops.group_norm(x.to(device), 2).cpu()
    assert y[0, :2].isnan().all() and y[2, :2].isnan().all()
    expected = torch.nn.functional.group_norm(x.double(), 2)
    assert_close(y[0, 2:], expected[0, 2:], GROUP_NORM, torch.float32)
    assert_close(y[1], expected[1], GROUP_NORM, torch.float32)
    assert_close(y[2, 2:], expected[2, 2:], GROUP_NORM, torch.float32)


@pytest.mark.parametrize("backend", backends_for("group_norm"))
def test_strided_parameters_and_batch_one_views(backend, device):
    # A strided weight/bias (every other element), and a batch-1 view whose strides aten's
    # layout suggestion rejects (a transposed projection reshaped, as in diffusers' blocks).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 4, 4, generator=g).to(device)
    weight, bias = torch.randn(16, generator=g)[::2].to(device), torch.randn(16, generator=g)[1::2].to(device)
    with fastguide.backend(backend):
        y = ops.group_norm(x, 4, weight, bias)
    expected = torch.nn.functional.group_norm(x.double(), 4, weight.double(), bias.double())
    assert_close(y.cpu(), expected.cpu(), GROUP_NORM, torch.float32)
    view = torch.randn(1, 16, 32, generator=g).transpose(1, 2).reshape(1, 32, 4, 4).to(device)
    with fastguide.backend(backend):
        y = ops.group_norm(view, 8)
    assert_close(y.cpu(), torch.nn.functional.group_norm(view.double(), 8).cpu(), GROUP_NORM, torch.float32)


@pytest.mark.parametrize("backend", backends_with_emulation("group_norm"))
@pytest.mark.parametrize("shape", [(3, 4, 1, 1), (2, 6, 1), (2, 5)], ids=str)
def test_groups_of_one_value_give_the_bias_as_nn_group_norm(backend, shape, device, request):
    # One value per group: var 0, x − mean = 0, so y = bias, as torch's nn.GroupNorm gives
    # (within x·rstd·ε: rstd = eps^-1/2 in the fused x·(rstd·w) + (b − mean·rstd·w)).
    device = device if backend != "cuda-emulation" else torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    norm = torch.nn.GroupNorm(shape[1], shape[1]).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[1], generator=g))
        norm.bias.copy_(torch.randn(shape[1], generator=g))
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    scale, shift = (torch.randn(shape[:2], generator=g).to(device) for _ in range(2))
    with running_on(backend, request):
        y = ops.group_norm(x, shape[1], norm.weight, norm.bias, norm.eps)
        fused = ops.group_norm(
            x, shape[1], norm.weight, norm.bias, norm.eps, scale=scale, shift=shift, activation="silu"
        )
        (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, norm(x), atol=1e-4, rtol=0)
    ones = (1,) * (len(shape) - 2)  # the spatial dims, each of size 1
    bias = norm.bias.detach().view(1, shape[1], *ones)
    scale, shift = (t.view(*t.shape, *ones) for t in (scale, shift))
    torch.testing.assert_close(y, bias.expand(shape), atol=1e-4, rtol=0)
    torch.testing.assert_close(fused, torch.nn.functional.silu(bias * (1 + scale) + shift), atol=1e-4, rtol=0)
    torch.testing.assert_close(dx, torch.zeros_like(dx), atol=1e-4, rtol=0)


def test_meta_tensors_give_meta_results():
    # Models are built and traced on the meta device: no values, only shapes and dtypes.
    x = torch.empty(2, 8, 4, 4, dtype=torch.float16, device="meta").to(memory_format=torch.channels_last)
    y = ops.group_norm(
        x, 4, torch.empty(8, device="meta"), None, scale=torch.empty(2, 8, 1, 1, device="meta"), activation="silu"
    )
    assert y.is_meta and y.shape == x.shape and y.dtype == torch.float16
    assert y.is_contiguous(memory_format=torch.channels_last)
    leaf = torch.empty(2, 8, 3, device="meta", requires_grad=True)
    ops.group_norm(leaf, 2).sum().backward()
    assert leaf.grad.is_meta and leaf.grad.shape == leaf.shape


@pytest.mark.parametrize("backend", backends_with_emulation("group_norm"))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mean", [10.0, 1e4])
def test_group_norm_statistics_at_large_mean_and_small_spread(backend, channels_last, mean, request):
    # A cancelling E[x²] − E[x]² (aten's CPU channels_last kernel forms one) loses the
    # spread; float32 can only be asked for ulp(|x|)·rstd here, the input's own rounding.
    g = torch.Generator().manual_seed(3)
    x = (mean + 0.01 * torch.randn(3, 12, 9, 11, generator=g)).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.group_norm(x.double(), 4, eps=1e-5)
    with running_on(backend, request):
        got = ops.group_norm(x, 4, eps=1e-5)
    tolerance = 4 * torch.finfo(torch.float32).eps * mean / 0.01
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("backend", backends_with_emulation("group_norm"))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
# batch 1 and 8: the cuda backend's three launches and its group-in-registers kernel
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("outlier", [1e3, 1e4])
def test_group_norm_with_an_outlier_first_in_its_group(backend, channels_last, batch, outlier, request):
    # One element far from its group (the first, where a statistics pass may take its
    # shift from; two of the three elements the kernels' shift is the median of make it the
    # shift: test_triton_forward_statistics_on_every_path, test_cuda_three_launch_statistics):
    # the variance must not cancel. Held to twice PyTorch's float32 error plus 2 ulp (below).
    # Every path merges moments rather than sums from a shift (Chan et al.; the cuda group-
    # in-registers kernel, NCHW at N·G ≥ 2 SMs, batch 8 in the emulation, takes two passes
    # over its registers); the shifted sums they replaced missed by 100-2000x (2026-12-06:
    # up to 6e-3 against 3e-5).
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 32, 16, 16, generator=g)
    x[:, ::4, 0, 0] = outlier  # 8 groups of 4 channels: each group's first element
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.group_norm(x.double(), 8, eps=1e-5)
    with running_on(backend, request):
        got = ops.group_norm(x, 8, eps=1e-5)
    ours = (got.double() - expected).abs().max()
    # PyTorch's error on NCHW (its CPU channels_last kernel cancels E[x²] − E[x]²), and 2
    # ulp of the largest output beside it: float32 moments merged over steps, lanes,
    # channels and chunks round var by a few ulp (2026-12-06: up to 2.6 ulp at |y| = 32,
    # PyTorch's 1), where the shifted sums they replaced missed by 100-2000x
    theirs = (torch.nn.functional.group_norm(x.contiguous(), 8, eps=1e-5).double() - expected).abs().max()
    bound = 2 * theirs + 2 * torch.finfo(torch.float32).eps * expected.abs().max()
    assert ours <= bound, f"error {ours:.3g} exceeds twice PyTorch's {theirs:.3g} plus 2 ulp"


def _with_outliers(x: torch.Tensor, data: str, first_channels: slice) -> torch.Tensor:
    """x with 1e4 in each of the given channels: at its first element ("outlier-first"),
    its last ("outlier-last"), or its first and middle ("outlier-at-shift": two of the
    three elements whose median the kernels shift by, so the shift is the outlier)."""
    x = x.clone()
    flat = x.view(x.shape[0], x.shape[1], -1)
    positions = {"outlier-first": [0], "outlier-last": [-1], "outlier-at-shift": [0, flat.shape[-1] // 2]}[data]
    for position in positions:
        flat[:, first_channels, position] = 1e4
    return x


# (layout, dtype, shape): at N·C ≥ 32 the emulation's 8 SMs get one chunk a channel, so a
# thread takes 2+ whole statistics steps and a partial one: NCHW's 16-byte vectors (fp32,
# fp16), its single elements (129×131), channels_last's 16-element steps. N·G < 16 keeps
# the group-in-registers kernel out.
CUDA_STATISTICS_CASES = [
    ("nchw", torch.float32, (1, 32, 128, 100)),
    ("nchw", torch.float32, (1, 32, 129, 131)),
    ("nchw", torch.float16, (1, 32, 128, 160)),
    ("nhwc", torch.float32, (1, 8, 96, 100)),
    ("nhwc", torch.float32, (1, 8, 97, 101)),
    ("nhwc", torch.bfloat16, (1, 8, 96, 100)),
]


@pytest.mark.parametrize(
    "layout, dtype, shape, data",
    [
        (*case, data)
        for case in CUDA_STATISTICS_CASES
        for data in ("outlier-first", "outlier-at-shift", "outlier-last", "large-mean")
        # a mean of 1e4 with a spread of 0.01 needs float32
        if data != "large-mean" or case[1] == torch.float32
    ],
    ids=str,
)
def test_cuda_three_launch_statistics(layout, dtype, shape, data, host_harness):
    # The cuda backend's per-channel statistics (channel_sums_*_kernel's moments, merged
    # over steps, threads, rows and chunks), on the emulation, against float64: the mean
    # and rstd it returns, and y, with an outlier among the elements the channel's shift is
    # the median of, two there (the shift is the outlier), or far from them, or a large
    # mean of small spread (fp32: 16-bit types cannot hold it).
    # y to twice PyTorch's error plus 2 ulp of the largest output (float32 moments merged
    # through a block's tree of ~11 levels round M2 by a few ulp: 2026-12-06, 3.7e-5
    # against 1.4e-5 at |y| up to 196; the shifted sums they replaced missed by 100x+).
    n, c, *spatial = shape
    groups = c // 4
    g = torch.Generator().manual_seed(29)
    x = torch.randn(n, c, *spatial, generator=g)
    x = 1e4 + 0.01 * x if data == "large-mean" else _with_outliers(x, data, slice(None, None, 4))
    x = x.to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    y, mean, rstd = host_harness.group_norm_forward(x, None, None, None, None, groups, 1e-5, False)
    grouped = x.double().permute(0, 2, 3, 1).reshape(n, -1, groups, 4).transpose(1, 2).reshape(n, groups, -1)
    want_mean, want_var = grouped.mean(-1), grouped.var(-1, unbiased=False)
    eps32 = torch.finfo(torch.float32).eps
    # the mean to 1e-5 of the spread beside float32's rounding of it; rstd to 1e-5
    mean_error = (mean.double() - want_mean).abs()
    assert (mean_error <= 1e-5 * want_var.sqrt() + 4 * eps32 * want_mean.abs()).all(), mean_error.max()
    torch.testing.assert_close(rstd.double(), (want_var + 1e-5).rsqrt(), atol=0, rtol=1e-5)
    expected = torch.nn.functional.group_norm(x.double(), groups, eps=1e-5)
    ours = (y.double() - expected).abs().max().item()
    if data == "large-mean":
        assert ours <= 4 * eps32 * 1e4 / 0.01
    else:
        # PyTorch's error on NCHW: its CPU channels_last kernel cancels E[x²] − E[x]²
        theirs = (torch.nn.functional.group_norm(x.contiguous(), groups, eps=1e-5).double() - expected).abs().max()
        bound = 2 * theirs.item() + 2 * torch.finfo(dtype).eps * expected.abs().max().item()
        assert ours <= bound, f"error {ours:.3g} exceeds twice PyTorch's {theirs:.3g} plus 2 ulp"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_statistics_stay_finite_past_a_run_of_huge_values(channels_last, host_harness):
    # A quarter of a channel at 2e19 (whole statistics steps of it): a thread's first step
    # merged δ²·0 with δ² = inf, NaN, where every partial and the float64 merges of chunks
    # and channels are finite (the group's var ~2e37). Cuda alone: Triton merges a group's
    # M2 in float32, which overflows here (NaN by the policy).
    g = torch.Generator().manual_seed(37)
    x = torch.randn(1, 8, 128, 160, generator=g)
    x.view(1, 8, -1)[0, 0, 15360:] = 2e19
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, rstd = host_harness.group_norm_forward(x, None, None, None, None, 2, 1e-5, False)
    grouped = x.double().permute(0, 2, 3, 1).reshape(1, -1, 2, 4).transpose(1, 2).reshape(1, 2, -1)
    torch.testing.assert_close(rstd.double(), (grouped.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-5)
    torch.testing.assert_close(mean.double(), grouped.mean(-1), atol=0, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", backends_with_emulation("group_norm"))
def test_group_norm_statistics_stay_finite_past_a_huge_outlier(backend, channels_last, request):
    # An outlier of 3e18 at a channel's shift and one of 1e19 in a partial step: the
    # variance (≤ 1e38/n) is finite in float32, so the statistics must be too. A merge that
    # multiplied δ² by a count before its share (δ²·na overflows) or merged an empty side
    # (inf·0) made them NaN.
    g = torch.Generator().manual_seed(31)
    x = torch.randn(1, 8, 97, 101, generator=g)
    x.view(1, 8, -1)[0, 0, 0] = 3e18
    x.view(1, 8, -1)[0, 4, -1] = 1e19
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with running_on(backend, request):
        got = ops.group_norm(x, 2, eps=1e-5)
    expected = torch.nn.functional.group_norm(x.double(), 2, eps=1e-5)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", backends_with_emulation("group_norm"))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mean", [10.0, 1e3])
def test_group_norm_backward_at_large_mean_and_small_spread(backend, channels_last, mean, request):
    # The kernels fold dx into dy·α + x·β + γ per channel (γ cancels x·β's mean part), so
    # they lose about ε·|mean|/σ of dx's scale, as the forward's x·gain + offset does; a
    # form that cancelled E[x²] − E[x]² would lose (|mean|/σ)² and fail here.
    n, c, groups, spread = 3, 12, 4, 0.01
    g = torch.Generator().manual_seed(7)
    x = (mean + spread * torch.randn(n, c, 9, 11, generator=g)).float()
    weight, bias = 1 + 0.5 * torch.randn(c, generator=g), torch.randn(c, generator=g)
    grad_y = torch.randn(x.shape, generator=g)
    if channels_last:
        x, grad_y = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_y))
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    with running_on(backend, request):
        y = ops.group_norm(leaves[0], groups, leaves[1], leaves[2], eps=1e-5, activation="silu")
        grads = torch.autograd.grad(y, leaves, grad_y)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    expected = explicit_group_norm(doubles[0], groups, doubles[1], doubles[2], None, None, "silu", eps=1e-5)
    wanted = torch.autograd.grad(expected, doubles, grad_y.double())
    eps32 = torch.finfo(torch.float32).eps
    for got, want in zip(grads, wanted):
        # relative to each gradient's own scale (float32 autograd of F.group_norm loses as much)
        tolerance = 8 * eps32 * (mean / spread) * want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=0)


# NCHW shapes for the one-pass forward at 2 programs: groups of 10 channels (a tile holds
# 16); a group of exactly one whole statistics step (16384 elements); 33×35 (partial
# steps); channels of 3 positions; 9 groups (the 2 programs take 5 and 4); rows of 4900
# positions (a whole normalising step and a partial one).
NCHW_ONE_PASS_SHAPES = [
    (2, 320, 32, (32, 32)),
    (3, 8, 2, (64, 64)),
    (2, 64, 4, (33, 35)),
    (5, 160, 32, (1, 3)),
    (3, 24, 3, (9, 8)),
    (1, 4, 2, (70, 70)),
]
# The backward's: rows of at least 4 16-byte vectors (shorter ones take the three
# launches); 25 positions (fp16: a row of 32, 8 to a slab, in 4 slabs a step).
NCHW_BACKWARD_ONE_PASS_SHAPES = [s for s in NCHW_ONE_PASS_SHAPES if math.prod(s[3]) > 16] + [(5, 160, 32, (5, 5))]


class _LaunchCount:
    """A Triton kernel that counts its launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _forced_path(monkeypatch, one_pass: bool, kernel_name: str):
    """The Triton kernels module on 2 SMs (on a GPU too, whose SMs would outnumber these
    shapes' groups), with an L2 budget that takes its one-pass kernels or none, and its
    one-pass kernel `kernel_name` counting launches: (module, budget, counter)."""
    kernels = importlib.import_module("fastguide.kernels.group_norm")
    monkeypatch.setattr(kernels, "_multiprocessors", lambda device: 2)
    budget = 2**40 if one_pass else 0
    monkeypatch.setattr(kernels, "_l2_budget", lambda device: budget)
    counter = _LaunchCount(getattr(kernels, kernel_name))
    monkeypatch.setattr(kernels, kernel_name, counter)
    return kernels, budget, counter


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape",
    NCHW_ONE_PASS_SHAPES,
    ids=str,
)
def test_triton_nchw_forward_in_one_pass_and_in_two(one_pass, dtype, shape, monkeypatch, device):
    # The launcher picks the one-pass kernel (_group_kernel) where the groups in flight fit
    # its L2 budget, the two launches otherwise: each path, forced, on the same inputs.
    kernels, budget, one_pass_kernel = _forced_path(monkeypatch, one_pass, "_group_kernel")
    monkeypatch.setattr(kernels, "FUSED_PROGRAMS_PER_SM", 1)  # 2 programs
    n, c, groups, spatial = shape
    taken = kernels.fused_config(n, c, groups, math.prod(spatial), 2, dtype.itemsize, budget)
    assert (taken is not None) == one_pass
    x, weight, bias, scale, shift = random_inputs(n, c, spatial, dtype, device, seed=11)
    params = NormParameters(weight, bias, scale, shift)
    y, mean, rstd = kernels.group_norm_forward(x, params, groups, 1e-5, "silu")
    assert one_pass_kernel.launches == one_pass
    assert_close(y, explicit_group_norm(x, groups, weight, bias, scale, shift, "silu"), GROUP_NORM, dtype)
    # the saved statistics, which the backward reads
    grouped = x.double().reshape(n, groups, -1)
    torch.testing.assert_close(mean.double(), grouped.mean(-1), atol=1e-5, rtol=1e-5)
    want_rstd = (grouped.var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(rstd.double(), want_rstd, atol=0, rtol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("one_pass", [False, True], ids=["three-launch", "one-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    # SD's 320 channels in 32 groups of 10 (groups straddle the 64-channel tiles); one
    # group of 16 channels; 160 channels of 3 positions (groups of 5, 3 tiles, one
    # partial); a 70×70 image split into chunks (the last one partial); 4 groups of 24
    # channels (a tile of 64 holds 2 and part of a third) over 33×35
    "shape",
    [(2, 320, 32, (16, 16)), (3, 16, 1, (9, 8)), (5, 160, 32, (1, 3)), (1, 16, 2, (70, 70)), (3, 96, 4, (33, 35))],
    ids=str,
)
def test_triton_channels_last_forward_in_one_pass_and_in_three(one_pass, dtype, shape, monkeypatch, device):
    # The launcher picks the one-pass kernel (_rows_group_kernel) where 3·lag − 1 samples
    # fit its L2 budget, the three launches otherwise: each path, forced, on the same inputs.
    kernels, budget, one_pass_kernel = _forced_path(monkeypatch, one_pass, "_rows_group_kernel")
    n, c, groups, spatial = shape
    taken = kernels.rows_fused_config(n, c, groups, math.prod(spatial), 2, dtype.itemsize, budget)
    assert (taken is not None) == one_pass
    x, weight, bias, scale, shift = random_inputs(n, c, spatial, dtype, device, seed=13)
    x = x.to(memory_format=torch.channels_last)
    params = NormParameters(weight, bias, scale, shift)
    y, mean, rstd = kernels.group_norm_forward(x, params, groups, 1e-5, "silu")
    assert one_pass_kernel.launches == one_pass
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, explicit_group_norm(x, groups, weight, bias, scale, shift, "silu"), GROUP_NORM, dtype)
    grouped = x.double().permute(0, 2, 3, 1).reshape(n, -1, groups, c // groups).transpose(1, 2).reshape(n, groups, -1)
    torch.testing.assert_close(mean.double(), grouped.mean(-1), atol=1e-5, rtol=1e-5)
    want_rstd = (grouped.var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(rstd.double(), want_rstd, atol=0, rtol=1e-5)


# (layout, extent) -> (N, C, G, spatial). "long": several chunks, groups split over
# channels_last tiles; "tail": NCHW's one-pass groups of two whole steps and a partial one
# (steps merged past the first), channels_last chunks of whole steps and a partial one.
STATISTICS_SHAPES = {
    ("nchw", "long"): (2, 64, 4, (33, 35)),
    ("nhwc", "long"): (3, 96, 4, (33, 35)),
    ("nchw", "tail"): (1, 8, 2, (64, 130)),
    ("nhwc", "tail"): (1, 64, 4, (1, 197)),
}


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize(
    "layout, one_pass, kernel_name",
    [
        ("nchw", False, "_group_kernel"),
        ("nchw", True, "_group_kernel"),
        ("nhwc", False, "_rows_group_kernel"),
        ("nhwc", True, "_rows_group_kernel"),
    ],
    ids=["nchw-two-launch", "nchw-one-pass", "nhwc-three-launch", "nhwc-one-pass"],
)
@pytest.mark.parametrize("extent", ["long", "tail"])
@pytest.mark.parametrize(
    "data, dtype",
    [
        ("outlier-first", torch.float32),
        ("outlier-at-shift", torch.float32),
        ("outlier-last", torch.float32),
        ("large-mean", torch.float32),
        ("outlier-at-shift", torch.float16),
    ],
    ids=lambda value: value if isinstance(value, str) else str(value).removeprefix("torch.").replace("float", "fp"),
)
def test_triton_forward_statistics_on_every_path(
    layout, one_pass, kernel_name, extent, data, dtype, monkeypatch, device
):
    # Each forward path's statistics (whole steps, partial ones, several chunks and, on
    # channels_last, groups split over tiles), forced, against float64: an outlier among
    # the elements a group's shift is the median of, two there (the shift is the outlier),
    # or one far from them, held to twice
    # PyTorch's own error (on NCHW: its CPU channels_last kernel cancels E[x²] − E[x]²)
    # plus 2 ulp of the largest output (see the test above); a large mean of small
    # spread, to the input's rounding.
    kernels, budget, one_pass_kernel = _forced_path(monkeypatch, one_pass, kernel_name)
    monkeypatch.setattr(kernels, "FUSED_PROGRAMS_PER_SM", 1)  # 2 programs: the tail shape's 2 groups
    n, c, groups, spatial = STATISTICS_SHAPES[layout, extent]
    g = torch.Generator().manual_seed(23)
    x = torch.randn(n, c, *spatial, generator=g)
    x = 1e4 + 0.01 * x if data == "large-mean" else _with_outliers(x, data, slice(None, None, c // groups))
    x = x.to(device, dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    y, _, _ = kernels.group_norm_forward(x, NormParameters(None, None, None, None), groups, 1e-5, None)
    assert one_pass_kernel.launches == one_pass
    expected = torch.nn.functional.group_norm(x.double(), groups, eps=1e-5)
    ours = (y.double() - expected).abs().max().item()
    if data == "large-mean":
        assert ours <= 4 * torch.finfo(torch.float32).eps * 1e4 / 0.01
    else:
        theirs = (torch.nn.functional.group_norm(x.contiguous(), groups, eps=1e-5).double() - expected).abs().max()
        bound = 2 * theirs.item() + 2 * torch.finfo(dtype).eps * expected.abs().max().item()
        assert ours <= bound, f"error {ours:.3g} exceeds twice PyTorch's {theirs:.3g} plus 2 ulp"


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize(
    "layout, kernel_name", [("nchw", "_group_kernel"), ("nhwc", "_rows_group_kernel")], ids=["nchw", "nhwc"]
)
def test_triton_one_pass_statistics_stay_finite_past_a_huge_outlier(layout, kernel_name, monkeypatch, device):
    # test_group_norm_statistics_stay_finite_past_a_huge_outlier's outliers (3e18 at a
    # group's first element, 1e19 at another's last) on the one-pass kernels, forced.
    kernels, _, one_pass_kernel = _forced_path(monkeypatch, True, kernel_name)
    monkeypatch.setattr(kernels, "FUSED_PROGRAMS_PER_SM", 1)
    n, c, groups, spatial = STATISTICS_SHAPES[layout, "long"]
    g = torch.Generator().manual_seed(41)
    x = torch.randn(n, c, *spatial, generator=g)
    x.view(n, c, -1)[0, 0, 0] = 3e18
    x.view(n, c, -1)[0, c // groups, -1] = 1e19
    x = x.to(device)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    y, _, _ = kernels.group_norm_forward(x, NormParameters(None, None, None, None), groups, 1e-5, None)
    assert one_pass_kernel.launches == 1
    expected = torch.nn.functional.group_norm(x.double(), groups, eps=1e-5)
    assert y.isfinite().all()
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)


def _check_nchw_backward(kernels, shape, dtype, present, activation, monkeypatch, device, channels_last=False):
    """kernels.group_norm_backward with the parameters named in `present` (of weight, bias,
    scale, shift), outputs poisoned with NaN, against float64 autograd of the formula (x
    channels_last where asked)."""
    n, c, groups, spatial = shape
    x, *params = random_inputs(n, c, spatial, dtype, device, seed=19)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = NormParameters(*(t if name in present else None for name, t in zip(NormParameters._fields, params)))
    _, mean, rstd = kernels.group_norm_forward(x, params, groups, 1e-5, activation)
    dy = torch.randn(x.shape, dtype=dtype, device=device)
    empty, empty_like = torch.empty, torch.empty_like
    with monkeypatch.context() as poison:
        poison.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
        poison.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
        grads = kernels.group_norm_backward(dy, x, params, mean, rstd, groups, activation)
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, *params)]
    expected = explicit_group_norm(leaves[0], groups, *leaves[1:3], leaves[3], leaves[4], activation)
    wanted = torch.autograd.grad(expected, [t for t in leaves if t is not None], dy.double())
    atol, rtol = GROUP_NORM[dtype]
    assert [g is None for g in grads] == [t is None for t in leaves]
    for got, want in zip([g for g in grads if g is not None], wanted):
        assert got.shape == want.shape
        count = x.numel() // want.numel()  # a parameter gradient sums N·S elements
        torch.testing.assert_close(got.double(), want, atol=atol * count**0.5, rtol=rtol * 4)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("one_pass", [False, True], ids=["three-launch", "one-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", NCHW_BACKWARD_ONE_PASS_SHAPES, ids=str)
def test_triton_nchw_backward_in_one_pass_and_in_three(one_pass, dtype, shape, monkeypatch, device):
    # The launcher picks the one-pass backward (_group_backward_kernel) where the groups in
    # flight fit its L2 budget, the three launches otherwise: each path, forced, on the
    # same inputs, every gradient against float64 autograd.
    kernels, budget, one_pass_kernel = _forced_path(monkeypatch, one_pass, "_group_backward_kernel")
    n, c, groups, spatial = shape
    taken = kernels.backward_fused_config(n, c, groups, math.prod(spatial), 2, dtype.itemsize, budget)
    assert (taken is not None) == one_pass
    _check_nchw_backward(kernels, shape, dtype, NormParameters._fields, "silu", monkeypatch, device)
    assert one_pass_kernel.launches == one_pass


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("one_pass", [False, True], ids=["three-launch", "one-pass"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize(
    "present", [(), ("weight", "shift"), ("bias", "scale"), NormParameters._fields], ids=lambda p: "+".join(p) or "none"
)
def test_triton_nchw_backward_over_many_steps_and_parameter_sets(one_pass, activation, present, monkeypatch, device):
    # Slabs of 256 bytes: a row of 4900 positions takes 19 whole steps and a partial one
    # (the default slab covers it in one); each subset of the parameters, with and without SiLU.
    kernels, _, one_pass_kernel = _forced_path(monkeypatch, one_pass, "_group_backward_kernel")
    monkeypatch.setattr(kernels, "BACKWARD_FUSED_SLAB_BYTES", 256)
    _check_nchw_backward(kernels, (1, 4, 2, (70, 70)), torch.float32, present, activation, monkeypatch, device)
    assert one_pass_kernel.launches == one_pass


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("one_pass", [False, True], ids=["three-launch", "one-pass"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize(
    "present", [(), ("shift",), ("bias", "scale"), ("weight", "scale")], ids=lambda p: "+".join(p) or "none"
)
def test_triton_channels_last_over_parameter_sets(one_pass, activation, present, monkeypatch, device):
    # The channels_last kernels' branches for each absent parameter, forward (one pass or
    # three launches) and backward, each against float64 autograd of the formula.
    kernels, _, one_pass_kernel = _forced_path(monkeypatch, one_pass, "_rows_group_kernel")
    shape = (3, 32, 4, (5, 7))
    n, c, groups, spatial = shape
    x, *given = random_inputs(n, c, spatial, torch.float32, device, seed=23)
    x = x.to(memory_format=torch.channels_last)
    params = NormParameters(*(t if name in present else None for name, t in zip(NormParameters._fields, given)))
    y, _, _ = kernels.group_norm_forward(x, params, groups, 1e-5, activation)
    assert one_pass_kernel.launches == one_pass
    assert_close(y, explicit_group_norm(x, groups, *params, activation), GROUP_NORM, torch.float32)
    _check_nchw_backward(kernels, shape, torch.float32, present, activation, monkeypatch, device, channels_last=True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("batch", [3, 5])
def test_triton_channels_last_one_pass_interleaves_statistics_and_normalising(batch, monkeypatch, device):
    # An L2 budget of two samples: lag 1, so the tickets alternate between a sample's
    # statistics and the normalising of the one before (with the whole batch in flight,
    # every statistics ticket ran first)
    kernels, _, one_pass_kernel = _forced_path(monkeypatch, True, "_rows_group_kernel")
    c, groups, spatial = 16, 4, (5, 7)
    budget = 2 * c * math.prod(spatial) * 4
    monkeypatch.setattr(kernels, "_l2_budget", lambda device: budget)
    taken = kernels.rows_fused_config(batch, c, groups, math.prod(spatial), 2, 4, budget)
    assert taken is not None and taken["lag"] == 1
    x, weight, bias, scale, shift = random_inputs(batch, c, spatial, torch.float32, device, seed=29)
    x = x.to(memory_format=torch.channels_last)
    y, _, _ = kernels.group_norm_forward(x, NormParameters(weight, bias, scale, shift), groups, 1e-5, "silu")
    assert one_pass_kernel.launches
    assert_close(y, explicit_group_norm(x, groups, weight, bias, scale, shift, "silu"), GROUP_NORM, torch.float32)


def test_one_pass_nchw_forward_config_takes_groups_that_keep_its_programs_busy():
    kernels = importlib.import_module("fastguide.kernels.group_norm")
    programs = kernels.FUSED_PROGRAMS_PER_SM * 132
    taken = kernels.fused_config(64, 256, 32, 64 * 64, 132, 2, kernels.FUSED_L2_BYTES)
    assert taken is not None and taken["grid"] == (programs,)
    # groups of 32×32 positions: one round exactly; one group more (a second round nearly
    # idle: the two launches' 3·E spread evenly beat it); a second round 3/4 full
    assert kernels.fused_config(programs, 32, 1, 32 * 32, 132, 2, 2**40) is not None
    assert kernels.fused_config(programs + 1, 32, 1, 32 * 32, 132, 2, 2**40) is None
    assert kernels.fused_config(programs * 7 // 4, 32, 1, 32 * 32, 132, 2, 2**40) is not None
    assert kernels.fused_config(programs - 1, 32, 1, 32 * 32, 132, 2, 2**40) is None


def test_one_pass_nchw_backward_config_falls_back_where_it_does_not_fit():
    kernels = importlib.import_module("fastguide.kernels.group_norm")
    # issue 22's shape: 132 groups' x and dy (128 KB each group) in 24 MB
    big = kernels.backward_fused_config(64, 256, 32, 64 * 64, 132, 2, kernels.FUSED_L2_BYTES)
    assert big is not None and big["grid"] == (132 * kernels.BACKWARD_FUSED_PROGRAMS_PER_SM,)
    # a 16-byte vector a thread in each dtype: tiles of 4096 fp16, 2048 fp32 elements
    assert big["meta"]["BLOCK_C"] * big["meta"]["BLOCK_S"] == 4096
    fp32 = kernels.backward_fused_config(64, 256, 32, 32 * 32, 132, 4, kernels.FUSED_L2_BYTES)
    assert fp32["meta"]["BLOCK_C"] * fp32["meta"]["BLOCK_S"] == 2048
    group_pair = 2 * 8 * 64 * 64 * 2
    assert kernels.backward_fused_config(64, 256, 32, 64 * 64, 132, 2, 132 * group_pair) is not None
    assert kernels.backward_fused_config(64, 256, 32, 64 * 64, 132, 2, 132 * group_pair - 1) is None
    # fewer groups than programs: the three launches split the groups to fill the GPU
    assert kernels.backward_fused_config(4, 256, 32, 64 * 64, 132, 2, 2**40) is None
    # a second round of 1 group in 132 (5·E spread evenly beats it); of 100 in 132 (3·E does)
    assert kernels.backward_fused_config(133, 32, 1, 64 * 64, 132, 2, 2**40) is None
    assert kernels.backward_fused_config(232, 32, 1, 64 * 64, 132, 2, 2**40) is not None
    # rows shorter than 4 16-byte vectors (fp16: 17 positions round up to 32, 8 a slab)
    assert kernels.backward_fused_config(64, 256, 32, 16, 132, 2, 2**40) is None
    assert kernels.backward_fused_config(64, 256, 32, 17, 132, 2, 2**40) is not None


@triton.jit
def _tickets_kernel(out_ptr, N, tasks, lag):
    """(is statistics, sample, task) of ticket t at out[t]."""
    t = tl.program_id(0)
    is_stats, n, task = _ticket_task(t, N, tasks, lag)
    tl.store(out_ptr + 3 * t, is_stats.to(tl.int32))
    tl.store(out_ptr + 3 * t + 1, n)
    tl.store(out_ptr + 3 * t + 2, task)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("batch, tasks, lag", [(1, 5, 1), (4, 3, 1), (4, 3, 4), (7, 2, 3), (9, 16, 2)])
def test_one_pass_tickets_put_every_sample_statistics_before_its_normalising(batch, tasks, lag, device):
    # _ticket_task's order is what keeps _rows_group_kernel from deadlocking: a program
    # that waits for a sample's statistics holds a later ticket than all of them. Each
    # (pass, sample, task) once; a sample's statistics all before its normalising; and
    # from a sample's first statistics ticket to its last normalising one, at most lag + 1
    # samples' statistics and lag + 1 samples' normalising (what the L2 budget counts).
    total = 2 * batch * tasks
    out = torch.full((total, 3), -1, dtype=torch.int32, device=device)
    _tickets_kernel[(total,)](out, batch, tasks, lag)
    rows = [tuple(r) for r in out.tolist()]
    assert sorted(rows) == sorted((s, n, k) for s in (0, 1) for n in range(batch) for k in range(tasks))
    for n in range(batch):
        stats = [t for t, (s, m, _) in enumerate(rows) if s == 1 and m == n]
        normalising = [t for t, (s, m, _) in enumerate(rows) if s == 0 and m == n]
        assert max(stats) < min(normalising)
        between = rows[min(stats) : max(normalising) + 1]
        assert len({m for s, m, _ in between if s == 1}) <= lag + 1
        assert len({m for s, m, _ in between if s == 0}) <= lag + 1


def test_one_pass_channels_last_config_falls_back_where_it_does_not_fit():
    kernels = importlib.import_module("fastguide.kernels.group_norm")
    sample = 320 * 128 * 128 * 2  # SDXL's first GroupNorm, fp16: 10 MB a sample
    fits = kernels.rows_fused_config(2, 320, 32, 128 * 128, 132, 2, 2 * sample)
    assert fits is not None and fits["lag"] == 1
    assert kernels.rows_fused_config(2, 320, 32, 128 * 128, 132, 2, 2 * sample - 1) is None
    # rows that are not whole 16-byte vectors: the three launches
    assert kernels.rows_fused_config(2, 72, 8, 64 * 64, 132, 2, 2**40) is None
    many = kernels.rows_fused_config(64, 256, 32, 64 * 64, 132, 2, kernels.FUSED_L2_BYTES)
    # 3·lag − 1 samples of 2 MB within 24 MB
    assert many["lag"] == 4
    # a program per ticket: both passes of every tile of every sample
    assert many["grid"] == (2 * 64 * 4 * many["split"],)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_nchw_backward_one_pass_agrees_with_three_launches_gpu(dtype, monkeypatch):
    # The GPU's grid (an SM's program each) over 2048 groups: deterministic, and as the three launches.
    kernels = importlib.import_module("fastguide.kernels.group_norm")
    x, weight, bias, scale, shift = random_inputs(64, 256, (32, 32), dtype, "cuda", seed=23)
    params = NormParameters(weight, bias, scale, shift)
    _, mean, rstd = kernels.group_norm_forward(x, params, 32, 1e-5, "silu")
    dy = torch.randn_like(x)
    assert kernels.backward_fused_config(64, 256, 32, 1024, 132, 2, kernels._l2_budget(x.device)) is not None
    counter = _LaunchCount(kernels._group_backward_kernel)
    monkeypatch.setattr(kernels, "_group_backward_kernel", counter)
    runs = [kernels.group_norm_backward(dy, x, params, mean, rstd, 32, "silu") for _ in range(3)]
    assert counter.launches == 3
    monkeypatch.setattr(kernels, "_l2_budget", lambda device: 0)
    three = kernels.group_norm_backward(dy, x, params, mean, rstd, 32, "silu")
    for run in runs:
        for got, first in zip(run, runs[0]):
            assert torch.equal(got, first)
    for got, want in zip(runs[0], three):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channels_last_one_pass_agrees_with_three_launches_gpu(dtype, monkeypatch):
    # Real concurrency (the interpreter runs one program at a time): 64 samples, 4096
    # tickets taken by programs in whatever order the GPU runs them, five times over.
    kernels = importlib.import_module("fastguide.kernels.group_norm")
    x, weight, bias, scale, shift = random_inputs(64, 256, (32, 32), dtype, "cuda", seed=17)
    x = x.to(memory_format=torch.channels_last)
    params = NormParameters(weight, bias, scale, shift)
    assert kernels.rows_fused_config(64, 256, 32, 1024, 132, 2, kernels._l2_budget(x.device)) is not None
    runs = [kernels.group_norm_forward(x, params, 32, 1e-5, "silu") for _ in range(5)]
    monkeypatch.setattr(kernels, "_l2_budget", lambda device: 0)
    y3, mean3, rstd3 = kernels.group_norm_forward(x, params, 32, 1e-5, "silu")
    for y, mean, rstd in runs:
        torch.testing.assert_close(mean, mean3, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rstd, rstd3, atol=0, rtol=1e-5)
        torch.testing.assert_close(y.float(), y3.float(), **dict(zip(("atol", "rtol"), GROUP_NORM[dtype])))


@pytest.mark.parametrize("backend", [b for b in backends_for("group_norm") if b == "triton"])
def test_groups_past_the_triton_kernels_int32_count(backend, device, monkeypatch):
    # The Triton kernels count a group's elements in int32: at 2^31 and past it the NCHW
    # statistics and the backward read wrong memory. (The limit is lowered here: such a
    # group is 4 GiB in fp16.)
    from fastguide.ops import _group_norm, dispatch

    monkeypatch.setattr(_group_norm, "TRITON_GROUP_LIMIT", 32)
    x = torch.randn(2, 4, 4, 4, device=device)  # groups of 2 × 16 = 32 elements
    with fastguide.backend(backend), pytest.raises(RuntimeError, match="cannot run group_norm on groups of 32"):
        ops.group_norm(x, 2)
    # under auto (which picks Triton on CUDA only, stood in for here) the reference runs
    with fastguide.backend("torch"):
        expected = ops.group_norm(x, 2)
    monkeypatch.setattr(dispatch, "backend_for", lambda *args, **kwargs: "triton")
    with fastguide.backend("auto"):
        torch.testing.assert_close(ops.group_norm(x, 2), expected)

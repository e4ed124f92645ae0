"""attention: every backend against an explicit float64 softmax(q·kᵀ·scale)·v."""

import math

import pytest
import torch

import fastguide
from fastguide import ops
from fastguide.ops import reference
from tests.helpers import ATTENTION, assert_close, assert_within_twice_torch, backend_dtype_params, backends_for

BACKENDS = backends_for("attention")
# (batch, heads, Lq, Lk, head_dim): every L in {1, 7, 64, 77, 200, 1025} and D in
# {8, 24, 32, 40, 64, 80, 128} at least once, Lq ≠ Lk, B·H up to 8; Lk a multiple of the
# key block with D a power of two (the forward's unmasked loop) and with D not.
SHAPES = [
    (1, 1, 1, 1, 32),
    (2, 2, 50, 96, 64),
    (2, 3, 7, 7, 40),
    (1, 2, 77, 13, 64),
    (2, 1, 64, 200, 80),
    (1, 2, 1025, 77, 128),
    (2, 4, 200, 1025, 32),
    (1, 1, 1, 1025, 40),
    (1, 2, 1025, 1025, 64),
    (1, 3, 9, 64, 8),
    (2, 2, 77, 7, 24),
    (1, 2, 70, 33, 192),
    (1, 1, 40, 65, 256),
]


def attention_kernels():
    """fastguide.kernels.attention, for the tests of its launcher's own logic; they skip
    where the triton backend cannot run attention (its reason says why)."""
    if "triton" not in BACKENDS:
        pytest.skip("the triton backend cannot run attention on this machine")
    from fastguide.kernels import attention

    return attention


def explicit_attention(q, k, v, scale):
    """softmax(q·kᵀ·scale)·v written out in float64, subtracting the row max."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) * scale
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def plain_attention(q, k, v, scale):
    """What plain PyTorch computes in q's dtype (scores and softmax in float32): the error
    the kernels are held to (at most twice it)."""
    return torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(q.dtype) @ v


def gradient_magnitudes(q, k, v, grad_out, scale):
    """max|dq|, max|dk|, max|dv| in float64 with every term of every sum taken positive: the
    scale of their float32 rounding. dq and dk sum P·(dP − δ)·k, which cancels (to 0 with a
    single key), and each dot product in dP = dO·vᵀ and δ = rowsum(dO·O) rounds relative to
    the sum of its terms' magnitudes, not to its value."""
    q, k, v, grad_out = (t.detach().double() for t in (q, k, v, grad_out))
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    dp = grad_out.abs() @ v.abs().transpose(-1, -2)
    delta = (grad_out.abs() * (p @ v).abs()).sum(-1, keepdim=True)
    terms = p * (dp + delta)
    return (
        (scale * terms @ k.abs()).max().item(),
        (scale * terms.transpose(-1, -2) @ q.abs()).max().item(),
        (p.transpose(-1, -2) @ grad_out.abs()).max().item(),
    )


def random_qkv(shape, dtype, device, generator_seed=0):
    batch, heads, lq, lk, dim = shape
    g = torch.Generator().manual_seed(generator_seed)
    q = torch.randn(batch, heads, lq, dim, generator=g)
    k = torch.randn(batch, heads, lk, dim, generator=g)
    v = torch.randn(batch, heads, lk, dim, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


@pytest.mark.parametrize(
    "backend, dtype",
    backend_dtype_params("attention", [torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    ids=str,
)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_matches_explicit_formula(backend, dtype, shape, device):
    q, k, v = random_qkv(shape, dtype, device)
    scale = 0.7 * shape[-1] ** -0.5
    with fastguide.backend(backend):
        out = ops.attention(q, k, v, scale=scale)
    expected = explicit_attention(q, k, v, scale)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, ATTENTION, dtype)
    if dtype != torch.float64:
        # The FlashAttention rule: at most twice the error of plain PyTorch in this dtype.
        assert_within_twice_torch(out, expected, plain_attention(q, k, v, scale))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_default_scale_and_strided_views(backend, device):
    # q, k, v as views of one packed qkv projection (B, L, 3, H, D) permuted to (B, H, L, D).
    batch, length, heads, dim = 2, 33, 3, 48
    packed = torch.randn(batch, length, 3, heads, dim, device=device)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    with fastguide.backend(backend):
        out = ops.attention(q, k, v)
    assert_close(out, explicit_attention(q, k, v, dim**-0.5), ATTENTION, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_reads_an_overlapping_query_view(backend, device):
    # q as a sliding window over one row (unfold: strides (120, 1, 40, 1)), its head stride 1
    # as well as its head dim's: aten's CPU flash kernel read such a q as garbage (1e33).
    source = torch.randn(2, 3, 40, device=device, requires_grad=True)
    q = source.unfold(-1, 8, 1)[:, :, :4].permute(0, 2, 1, 3)
    k, v = (torch.randn(2, 4, 5, 8, device=device) for _ in range(2))
    grad_out = torch.randn(2, 4, 3, 8, device=device)
    with fastguide.backend(backend):
        out = ops.attention(q, k, v, scale=0.3)
        (d_source,) = torch.autograd.grad(out, source, grad_out)
    reference_source = source.detach().double().requires_grad_()
    rq = reference_source.unfold(-1, 8, 1)[:, :, :4].permute(0, 2, 1, 3)
    expected = explicit_attention(rq, k.double(), v.double(), 0.3)
    (expected_d_source,) = torch.autograd.grad(expected, reference_source, grad_out.double())
    assert_close(out.detach(), expected.detach(), ATTENTION, torch.float32)
    assert_close(d_source, expected_d_source, ATTENTION, torch.float32)


def test_reference_attention_matches_formula_float64():
    q, k, v = random_qkv((2, 2, 9, 11, 24), torch.float64, "cpu")
    torch.testing.assert_close(reference.attention(q, k, v, 0.3), explicit_attention(q, k, v, 0.3))


def test_reference_forward_returns_row_logsumexp():
    q, k, v = random_qkv((1, 2, 9, 300, 16), torch.float64, "cpu")
    _, lse = reference.attention_forward(q, k, v, 0.25)
    expected = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, dim=-1)
    torch.testing.assert_close(lse, expected)
    # The fallback (non-CPU devices) chunks queries; check it on the same inputs.
    torch.testing.assert_close(reference._attention_lse(q, k, 0.25, rows_per_chunk=4), expected)


def test_attention_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in random_qkv((1, 2, 5, 7, 16), torch.float64, "cpu"))
    with fastguide.backend("torch"):  # float64: the reference path
        assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, scale=0.4), (q, k, v))


@pytest.mark.parametrize(
    "backend, dtype", backend_dtype_params("attention", [torch.float32, torch.float16, torch.bfloat16]), ids=str
)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 2, 7, 7, 32),
        (2, 1, 77, 20, 40),
        (1, 1, 130, 66, 64),
        (2, 4, 77, 200, 40),
        (1, 1, 1025, 64, 128),
        (1, 2, 1, 7, 80),
        (1, 1, 200, 1, 24),
        (1, 2, 64, 96, 64),  # whole query and key blocks, D a power of two: the unmasked loops
    ],
    ids=str,
)
def test_attention_backward_matches_autograd_of_formula(backend, dtype, shape, device):
    q, k, v = (t.requires_grad_() for t in random_qkv(shape, dtype, device, generator_seed=1))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    scale = shape[-1] ** -0.5
    with fastguide.backend(backend):
        grads = torch.autograd.grad(ops.attention(q, k, v), (q, k, v), grad_out)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(explicit_attention(qd, kd, vd, scale), (qd, kd, vd), grad_out.double())
    # The FlashAttention rule, as the forward's: each gradient's error at most twice that of
    # autograd through plain PyTorch in this dtype, plus a few float32 ulps of its terms.
    plain = torch.autograd.grad(plain_attention(q, k, v, scale), (q, k, v), grad_out)
    magnitudes = gradient_magnitudes(q, k, v, grad_out, scale)
    for got, want, theirs, magnitude in zip(grads, expected, plain, magnitudes):
        assert got.dtype == dtype
        assert_close(got, want, ATTENTION, dtype)
        assert_within_twice_torch(got, want, theirs, magnitude)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("legacy_order", [True, False])
def test_attention_on_adm_qkv_views_forward_and_backward(backend, legacy_order, device):
    # ADM's (B, 3·H·ch, T) projection viewed as (B, H, T, ch): the head dim has stride T.
    batch, heads, ch, length = 2, 2, 16, 50
    qkv = torch.randn(batch, 3 * heads * ch, length, device=device, requires_grad=True)
    q, k, v = fastguide.models.nn.split_heads(qkv, heads, legacy_order)
    assert q.stride(-1) == length
    grad_out = torch.randn(batch, heads, length, ch, device=device)
    with fastguide.backend(backend):
        out = ops.attention(q, k, v)
        (d_qkv,) = torch.autograd.grad(out, qkv, grad_out)
    ref = qkv.detach().double().requires_grad_()
    rq, rk, rv = fastguide.models.nn.split_heads(ref, heads, legacy_order)
    expected = explicit_attention(rq, rk, rv, ch**-0.5)
    (expected_grad,) = torch.autograd.grad(expected, ref, grad_out.double())
    assert_close(out, expected, ATTENTION, torch.float32)
    assert_close(d_qkv, expected_grad, ATTENTION, torch.float32)


def test_reference_backward_by_recompute_matches_formula():
    # The torch backend's backward off-CPU (on CPU it uses aten's flash backward).
    q, k, v = (t.requires_grad_() for t in random_qkv((2, 2, 13, 21, 40), torch.float64, "cpu"))
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    expected = torch.autograd.grad(explicit_attention(q, k, v, 0.3), (q, k, v), grad_out)
    got = reference.attention_backward_by_recompute(grad_out, q.detach(), k.detach(), v.detach(), 0.3)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backward_with_strided_views(backend, device):
    # q, k, v from one packed projection and a transposed grad_out: no copies needed.
    batch, length, heads, dim = 2, 45, 2, 40
    packed = torch.randn(batch, length, 3, heads, dim, device=device, requires_grad=True)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    grad_out = torch.randn(batch, length, heads, dim, device=device).transpose(1, 2)
    with fastguide.backend(backend):
        (d_packed,) = torch.autograd.grad(ops.attention(q, k, v), packed, grad_out)
    ref = packed.detach().double().requires_grad_()
    rq, rk, rv = ref.permute(2, 0, 3, 1, 4).unbind(0)
    (expected,) = torch.autograd.grad(explicit_attention(rq, rk, rv, dim**-0.5), ref, grad_out.double())
    assert_close(d_packed, expected, ATTENTION, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 16, 4096, 4096, 128), (64, 4, 1024, 1024, 64), (2, 8, 1000, 77, 80)], ids=str)
def test_attention_gpu_large_and_bf16(dtype, shape):
    q, k, v = (t.requires_grad_() for t in random_qkv(shape, dtype, "cuda", generator_seed=2))
    with fastguide.backend("triton"):
        out = ops.attention(q, k, v)
    # Float64 reference on a slice of heads keeps the check's memory small.
    expected = explicit_attention(q[:1, :2], k[:1, :2], v[:1, :2], shape[-1] ** -0.5)
    assert_close(out[:1, :2], expected, ATTENTION, dtype)
    scores = (q[:1, :2] @ k[:1, :2].transpose(-1, -2)).float() * shape[-1] ** -0.5
    plain = torch.softmax(scores, -1).to(dtype) @ v[:1, :2]
    assert_within_twice_torch(out[:1, :2], expected, plain)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    qd, kd, vd = (t[:1, :2].detach().double().requires_grad_() for t in (q, k, v))
    wanted = torch.autograd.grad(
        explicit_attention(qd, kd, vd, shape[-1] ** -0.5), (qd, kd, vd), grad_out[:1, :2].double()
    )
    for got, want in zip((dq, dk, dv), wanted):
        assert_close(got[:1, :2], want, ATTENTION, dtype)


@pytest.mark.parametrize("backend", [b for b in backends_for("attention") if b == "triton"])
def test_the_large_launch_form_computes_the_same(backend, device, monkeypatch):
    # The kernels' LARGE form (one grid axis, int64 offsets), which batch·heads past 65535
    # or offsets past 2^31 take, here on small tensors (the limit lowered to 1).
    from fastguide.kernels import attention as kernels

    monkeypatch.setattr(kernels, "_MAX_GRID_Y", 1)
    assert kernels._large(2 * 3, torch.empty(1))
    q, k, v = (t.requires_grad_() for t in random_qkv((2, 3, 37, 45, 16), torch.float32, device, generator_seed=5))
    with fastguide.backend(backend):
        out = ops.attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = explicit_attention(qd, kd, vd, 16**-0.5)
    assert_close(out, expected, ATTENTION, torch.float32)
    for got, want in zip(grads, torch.autograd.grad(expected, (qd, kd, vd), torch.ones_like(expected))):
        assert_close(got, want, ATTENTION, torch.float32)


@pytest.mark.gpu
def test_attention_gpu_past_the_grid_and_int32_limits(monkeypatch):
    # batch·heads = 65536 programs a tile (AnimateDiff's temporal attention at 512², CFG
    # batch 2: 8192 sequences of 16 frames × 8 heads), past CUDA's 65535 on grid axis 1;
    # and a row stride whose (L − 1)·stride passes 2^31 elements (a 4 GiB view).
    q, k, v = (t.requires_grad_() for t in random_qkv((8192, 8, 16, 16, 64), torch.float16, "cuda", generator_seed=3))
    with fastguide.backend("triton"):
        out = ops.attention(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    last = (slice(-1, None), slice(-1, None))  # the last programs' sequence
    qd, kd, vd = (t[last].detach().double().requires_grad_() for t in (q, k, v))
    expected = explicit_attention(qd, kd, vd, 64**-0.5)
    assert_close(out[last], expected, ATTENTION, torch.float16)
    wanted = torch.autograd.grad(expected, (qd, kd, vd), torch.ones_like(expected))
    for got, want in zip((dq, dk, dv), wanted):
        assert_close(got[last], want, ATTENTION, torch.float16)
    stride = 2**30 + 64
    storage = torch.zeros(2 * stride + 64, dtype=torch.float16, device="cuda")
    wide = storage.as_strided((1, 1, 3, 64), (0, 0, stride, 1))
    wide.copy_(torch.randn(1, 1, 3, 64, generator=torch.Generator().manual_seed(4)).to("cuda", torch.float16))
    keys, values = (t.to("cuda", torch.float16) for t in torch.randn(2, 1, 1, 5, 64).unbind(0))
    with fastguide.backend("triton"):
        out = ops.attention(wide, keys, values)
    assert_close(
        out, explicit_attention(wide.double(), keys.double(), values.double(), 64**-0.5), ATTENTION, torch.float16
    )
    # The same view as keys and values, on the pointer kernels (the TMA forward copies no
    # strides): a block's row offsets i·stride, i < BLOCK_N, passed 2^31 in int32 and read
    # row 2 from a wrapped address; the backward's dq kernel reads k and v so too.
    from fastguide.kernels import attention as kernels

    monkeypatch.setattr(kernels, "tma_mode", "off")
    queries = torch.randn(1, 1, 5, 64, generator=torch.Generator().manual_seed(5)).to("cuda", torch.float16)
    queries.requires_grad_()
    with fastguide.backend("triton"):
        out = ops.attention(queries, wide, wide)
        (dq,) = torch.autograd.grad(out, queries, torch.ones_like(out))
    qd = queries.detach().double().requires_grad_()
    expected = explicit_attention(qd, wide.double(), wide.double(), 64**-0.5)
    assert_close(out, expected, ATTENTION, torch.float16)
    (wanted,) = torch.autograd.grad(expected, qd, torch.ones_like(expected))
    assert_close(dq, wanted, ATTENTION, torch.float16)


@pytest.fixture
def restore_fp32_precision():
    """Puts torch's float32 matmul precision settings back as they were."""
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_tf32_follows_torchs_newer_precision_setting(backend, device, restore_fp32_precision):
    # torch 2.9's fp32_precision: once set, reading allow_tf32 raises, which every float32
    # call on the Triton backend once did
    from fastguide.kernels import attention as kernels

    assert not kernels._tf32_allowed()
    torch.backends.fp32_precision = "tf32"
    assert kernels._tf32_allowed() and kernels._precision(torch.float32) == "tf32"
    q, k, v = random_qkv((1, 2, 9, 17, 32), torch.float32, device, generator_seed=2)
    with fastguide.backend(backend):
        out = ops.attention(q, k, v)
    torch.testing.assert_close(out.double(), explicit_attention(q, k, v, 32**-0.5), atol=2e-3, rtol=2e-3)
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # the matmul setting overrides the global one
    assert not kernels._tf32_allowed()


@pytest.mark.parametrize("scale", [0.0, -0.3])
@pytest.mark.parametrize(
    "backend, dtype", backend_dtype_params("attention", [torch.float32, torch.float16, torch.bfloat16]), ids=str
)
def test_zero_and_negative_scales(backend, dtype, scale, device):
    # The kernels fold a scale ≥ 0 into the exponent's FMA; a negative one runs as (−q)·kᵀ·|scale|,
    # and at 0 every key weighs the same (a ragged last key block: masked keys must stay out).
    q, k, v = random_qkv((2, 2, 33, 77, 40), dtype, device, generator_seed=5)
    with fastguide.backend(backend):
        out = ops.attention(q, k, v, scale=scale)
    assert_close(out, explicit_attention(q, k, v, scale), ATTENTION, dtype)
    if scale == 0.0:
        assert_close(out, v.double().mean(dim=2, keepdim=True).expand_as(out), ATTENTION, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_heads_give_an_empty_result(backend, device):
    q, k = torch.randn(2, 0, 5, 16).to(device), torch.randn(2, 0, 7, 16).to(device)
    with fastguide.backend(backend):
        assert ops.attention(q, k, k).shape == (2, 0, 5, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_query_rows_are_nan(backend, device):
    q, k, v = (torch.randn(1, 2, 4, 16, generator=torch.Generator().manual_seed(i)).to(device) for i in range(3))
    q[0, 0, 1, 3], q[0, 1, 2, 0] = -math.inf, math.nan
    with fastguide.backend(backend):
        out = ops.attention(q, k, v).cpu()
    assert out[0, 0, 1].isnan().all() and out[0, 1, 2].isnan().all()
    assert torch.isfinite(out[0, 0, [0, 2, 3]]).all()


def test_query_rows_whose_values_sum_past_float32_or_to_an_infinity_are_checked_exactly():
    # The CPU reference skips its per-row check where q's sum is finite. A lone +inf makes
    # the sum +inf (not NaN), and finite values of 3e38 make it overflow: both rows must
    # still come out as the policy says (NaN; the others finite).
    q, k, v = (torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    huge = q.clone()
    huge[0, 0, :, 0] = 3e38
    huge[0, 0, :, 1:] = 0.0  # scores 3e38·k, finite where k's first column is small
    k[0, 0, :, 0] = 1e-39
    out = ops.attention(huge, k, v)
    assert torch.isfinite(out).all()
    q[0, 0, 2, 5] = math.inf
    out = ops.attention(q, k, v)
    assert out[0, 0, 2].isnan().all() and torch.isfinite(out[0, 0, [0, 1, 3]]).all()


def test_a_single_nan_key_makes_its_rows_nan_on_every_backend():
    # IEEE softmax of one NaN score is NaN; aten's CPU flash kernel returns a zero row there.
    q, k, v = (torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    k, v = k[:, :, :1], v[:, :, :1]
    k[0, 1, 0, 2] = math.nan
    for backend in backends_for("attention"):
        with fastguide.backend(backend):
            out = ops.attention(q, k, v)
        assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all(), backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_key_makes_nan_the_rows_it_scores_nan_or_inf(backend, dtype, device):
    # IEEE softmax among many keys: a row with a NaN or +inf score is NaN, a -inf score
    # weighs 0. On a device the reference leaves this to SDPA's kernels (docs/design.md,
    # NaN and Inf), so this test, which gpu.sh runs on CUDA, checks them there. The bad
    # keys sit past the first 64, in a later block of the kernels' key loop.
    q = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    k, v = (torch.randn(1, 2, 90, 16, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    k[0, 0, 70, 7] = math.nan  # head 0: every row scores NaN
    k[0, 1, 80, :] = 0.0
    k[0, 1, 80, 0] = math.inf  # head 1: the sign of q[..., 0] makes a row's score ±inf, or 0·inf = NaN
    q[0, 1, :, 0] = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0])
    with fastguide.backend(backend):
        out = ops.attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)).float().cpu()
    assert out[0, 0].isnan().all(), backend
    assert out[0, 1, [0, 2, 3]].isnan().all(), backend
    assert torch.isfinite(out[0, 1, [1, 4]]).all(), backend
    # a row whose every score is -inf: softmax's 0/0, NaN (aten's CPU flash kernel gave 0)
    for keys in (1, 90):
        k = torch.randn(1, 1, keys, 16, generator=torch.Generator().manual_seed(3))
        k[..., 0] = -math.inf
        q = torch.ones(1, 1, 2, 16)
        q[0, 0, 1, 0] = -1.0  # the other row scores +inf: NaN as well
        with fastguide.backend(backend):
            out = ops.attention(q.to(device, dtype), k.to(device, dtype), k.to(device, dtype)).float().cpu()
        assert out.isnan().all(), (backend, keys)


@pytest.mark.parametrize("keys", [40, 70, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_whose_first_keys_all_score_minus_inf_are_the_softmax_of_the_rest(backend, dtype, keys, device):
    # The first 32 keys (a whole key block of every config) score −inf for rows with
    # q[..., 0] > 0, the later ones finite: those rows weigh only the later keys. The online
    # softmax's running max stays −inf over the first block, where 2^(−inf − (−inf)) made
    # the Triton rows NaN. A row with q[..., 0] < 0 scores +inf there: NaN. Gradients too.
    q = torch.randn(1, 2, 4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k, v = (
        torch.randn(1, 2, keys, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in (1, 2)
    )
    q[..., 0] = torch.tensor([1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
    k[:, :, :32, 0] = -math.inf
    expected = explicit_attention(q[:, :, :3], k[..., 32:, :], v[..., 32:, :], 0.25)  # the finite keys alone
    with fastguide.backend(backend):
        out = ops.attention(*(t.to(device, dtype) for t in (q, k, v)), scale=0.25).double().cpu()
        assert out[:, :, 3].isnan().all(), backend
        assert_close(out[:, :, :3], expected, ATTENTION, dtype)
        q, k, v = (t.to(device, dtype).requires_grad_(True) for t in (q[:, :, :3], k, v))
        dq, dv = torch.autograd.grad(ops.attention(q, k, v, scale=0.25).float().sum(), (q, v))
    assert torch.isfinite(dq[..., 1:]).all() and torch.isfinite(dv[:, :, 32:]).all(), backend
    assert (dv[:, :, :32] == 0).all(), backend  # the keys no row weighs


@pytest.mark.parametrize("scale", [0.5, -0.5])
@pytest.mark.parametrize("forward", ["attention", "attention_forward"])
def test_the_reference_makes_rows_nan_where_a_non_finite_key_makes_a_score_nan_or_inf(monkeypatch, forward, scale):
    # torch 2.5's CPU SDPA returns a zero row in float64 where a key holds a NaN: the
    # reference must not rely on the kernel. Here SDPA (and the flash kernel that returns
    # the log-sum-exp) see the keys with their non-finite values zeroed, as such a kernel
    # would; the rows must still follow IEEE softmax: NaN where a score against a bad key
    # is NaN or +inf, finite where it is -inf (weight 0).
    g = torch.Generator().manual_seed(0)
    q = torch.rand(1, 2, 4, 8, generator=g, dtype=torch.float64) + 0.5  # positive: the signs below hold
    k, v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2))
    q[0, 0, 3] = -q[0, 0, 3]  # a row that sees the +inf key below as -inf (with scale > 0)
    k[0, 0, 1, 4] = math.inf  # head 0: a score of +inf on rows 0-2, -inf on row 3
    k[0, 1, 2, 0] = math.nan  # head 1: NaN scores on every row
    sdpa, flash = torch.nn.functional.scaled_dot_product_attention, reference._flash_readable
    monkeypatch.setattr(
        reference.F, "scaled_dot_product_attention", lambda q, k, v, **kw: sdpa(q, k.nan_to_num(0, 0, 0), v, **kw)
    )
    monkeypatch.setattr(reference, "_flash_readable", lambda t: flash(t).nan_to_num(0, 0, 0))
    if forward == "attention":
        outputs = [reference.attention(q, k, v, scale=scale)]
    else:
        outputs = list(reference.attention_forward(q, k, v, scale))
    nan_rows = [0, 1, 2] if scale > 0 else [3]
    finite_rows = [3] if scale > 0 else [0, 1, 2]
    for out in outputs:
        assert torch.isnan(out[0, 0, nan_rows]).all() and torch.isfinite(out[0, 0, finite_rows]).all()
        assert torch.isnan(out[0, 1]).all()


# --------------------------------------------------------------------------------------
# The TMA forward (tensor descriptors): the interpreter runs it under FASTGUIDE_ATTENTION_TMA
# "on"; a GPU's tests take it under "auto" on sm_90 too (every fp16/bf16 case above).
# --------------------------------------------------------------------------------------


@pytest.fixture
def tma_forward(monkeypatch):
    """The triton backend's forward forced onto _forward_tma_kernel: the pointer kernel
    fails if the launcher reaches it."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend on this machine")
    from fastguide.kernels import attention as kernels

    if not kernels._has_descriptors():
        pytest.skip(f"Triton {kernels.triton.__version__} has no host tensor descriptors")

    class Unreachable:
        def __getitem__(self, grid):
            raise AssertionError("the pointer kernel ran where the TMA kernel should have")

    monkeypatch.setattr(kernels, "tma_mode", "on")
    monkeypatch.setattr(kernels, "_forward_kernel", Unreachable())
    return kernels


TMA_DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])  # interpreter: bf16 dot


@pytest.mark.parametrize("dtype", TMA_DTYPES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] <= 128], ids=str)
def test_tma_forward_matches_explicit_formula(tma_forward, dtype, shape, device):
    q, k, v = random_qkv(shape, dtype, device, generator_seed=3)
    scale = 0.7 * shape[-1] ** -0.5
    assert tma_forward.tma_not_supported_reasons(q, k, v) == []
    out, lse = tma_forward.attention_forward(q, k, v, scale)
    expected = explicit_attention(q, k, v, scale)
    assert_close(out, expected, ATTENTION, dtype)
    assert_within_twice_torch(out, expected, plain_attention(q, k, v, scale))
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    assert_close(lse, torch.logsumexp(scores, dim=-1), ATTENTION, torch.float32)


@pytest.mark.parametrize("scale", [0.0, -0.3])
def test_tma_forward_zero_and_negative_scales(tma_forward, scale, device):
    q, k, v = random_qkv((2, 2, 33, 77, 40), torch.float16, device, generator_seed=5)
    out, lse = tma_forward.attention_forward(q, k, v, scale)
    assert_close(out, explicit_attention(q, k, v, scale), ATTENTION, torch.float16)
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    assert_close(lse, torch.logsumexp(scores, dim=-1), ATTENTION, torch.float32)


def test_tma_forward_reads_packed_qkv_views_and_propagates_nan(tma_forward, device):
    # Views of one packed (B, L, 3, H, D) projection: strides (3·L·H·D, D, 3·H·D, 1), k and
    # v starting H·D and 2·H·D elements in; lengths that are not multiples of any block.
    batch, length, heads, dim = 2, 45, 3, 40
    packed = torch.randn(batch, length, 3, heads, dim, generator=torch.Generator().manual_seed(4))
    packed = packed.to(device=device, dtype=torch.float16)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    assert tma_forward.tma_not_supported_reasons(q, k, v) == []
    out, _ = tma_forward.attention_forward(q, k, v, dim**-0.5)
    assert_close(out, explicit_attention(q, k, v, dim**-0.5), ATTENTION, torch.float16)
    # A NaN key poisons every row of its head; a NaN query only its own row.
    packed[1, 44, 1, 2, 5] = math.nan  # the last key of head 2 (the peeled block's)
    packed[0, 3, 0, 0, 0] = math.nan  # query 3 of head 0
    out, _ = tma_forward.attention_forward(q, k, v, dim**-0.5)
    assert out[1, 2].isnan().all() and out[0, 0, 3].isnan().all()
    assert torch.isfinite(out[0, 0, [0, 1, 2, 4]]).all() and torch.isfinite(out[1, :2]).all()


def test_tma_forward_ignores_the_stride_of_a_size_one_dim(tma_forward, device):
    # A batch of one whose batch stride (7 elements) no descriptor could take: never used.
    storage = torch.randn(2 * 40 * 64, generator=torch.Generator().manual_seed(6)).to(device, torch.float16)
    q = storage.as_strided((1, 2, 40, 64), (7, 40 * 64, 64, 1))
    assert tma_forward.tma_not_supported_reasons(q, q, q) == []
    out, _ = tma_forward.attention_forward(q, q, q, 0.125)
    assert_close(out, explicit_attention(q, q, q, 0.125), ATTENTION, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 16, 4096, 4096, 128), (64, 4, 1024, 1024, 64), (3, 5, 77, 333, 40)], ids=str)
def test_tma_and_pointer_forwards_agree_on_every_head_gpu(dtype, shape, monkeypatch):
    # On real TMA hardware: the descriptor kernel (taken by "auto" on sm_90) against the
    # pointer kernel over every batch and head, and both against float64 on the last head.
    from fastguide.kernels import attention as kernels

    q, k, v = random_qkv(shape, dtype, "cuda", generator_seed=7)
    scale = 0.9 * shape[-1] ** -0.5
    hopper = torch.cuda.get_device_capability() >= (9, 0) and kernels._has_descriptors()
    monkeypatch.setattr(kernels, "tma_mode", "auto")
    assert (kernels.tma_not_supported_reasons(q, k, v) == []) == hopper
    monkeypatch.setattr(kernels, "tma_mode", "on")
    by_descriptors, lse = kernels.attention_forward(q, k, v, scale)
    monkeypatch.setattr(kernels, "tma_mode", "off")
    by_pointers, lse_pointers = kernels.attention_forward(q, k, v, scale)
    assert_close(by_descriptors, by_pointers, ATTENTION, dtype)
    assert_close(lse, lse_pointers, ATTENTION, torch.float32)
    expected = explicit_attention(q[-1:, -1:], k[-1:, -1:], v[-1:, -1:], scale)
    for out in (by_descriptors, by_pointers):
        assert_close(out[-1:, -1:], expected, ATTENTION, dtype)


def test_a_descriptor_steps_size_one_dims_as_a_dense_tensor_would():
    # A size-1 dim's stride is never stepped, and may be anything (here 0 from expand, or a
    # padded view's); the descriptor gets a dense one over the dims inside it.
    kernels = attention_kernels()

    if not kernels._has_descriptors():
        pytest.skip(f"Triton {kernels.triton.__version__} has no host tensor descriptors")
    t = torch.randn(1, 3, 1, 64, dtype=torch.float16).expand(1, 3, 1, 64)
    assert kernels._descriptor(t, 64).strides == [3 * 64, 64, 64, 1]
    t = torch.randn(4, 1, 16, 64, dtype=torch.float16)
    assert kernels._descriptor(t, 64).strides == [16 * 64, 16 * 64, 64, 1]


def test_tma_not_supported_reasons_name_each_cause(monkeypatch):
    kernels = attention_kernels()

    def reasons(q, k, v):
        found = kernels.tma_not_supported_reasons(q, k, v)
        assert kernels._takes_tma(q, k, v) == (not found)  # the launcher's own test agrees
        return found

    monkeypatch.setattr(kernels, "_has_descriptors", lambda: True)
    monkeypatch.setattr(kernels, "tma_mode", "on")
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    assert reasons(q, q, q) == []
    assert any("float32" in r for r in reasons(q.float(), q.float(), q.float()))
    wide = torch.randn(1, 2, 16, 192, dtype=torch.float16)
    assert any("head dim 192" in r for r in reasons(wide, wide, wide))
    transposed = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # unit stride on L, not D
    assert any(r.startswith("k is not") for r in reasons(q, transposed, q))
    shifted = torch.randn(1, 2, 16 * 64 + 4, dtype=torch.float16)[..., 4:].view(1, 2, 16, 64)  # 8-byte start
    assert any(r.startswith("v is not") for r in reasons(q, q, shifted))
    # q, k, v views of 36 of 64 columns: aligned strides, but the dense output's rows of 72
    # bytes are not 16-byte multiples
    padded = torch.randn(1, 2, 16, 64, dtype=torch.float16)[..., :36]
    assert reasons(padded, padded, padded) == ["the output's rows (36 elements of 2 bytes) are not 16-byte multiples"]
    expanded = torch.randn(1, 1, 16, 64, dtype=torch.float16).expand(1, 2, 16, 64)  # a 0 head stride
    assert any(r.startswith("k is not") for r in reasons(q, expanded, q))
    odd_rows = torch.randn(1, 2, 16, 68, dtype=torch.float16)[..., :64]  # rows 136 bytes apart
    assert any(r.startswith("q is not") for r in reasons(odd_rows, q, q))
    monkeypatch.setattr(kernels, "_has_descriptors", lambda: False)
    assert any("host tensor descriptors" in r for r in reasons(q, q, q))
    monkeypatch.setattr(kernels, "_has_descriptors", lambda: True)
    monkeypatch.setattr(kernels, "tma_mode", "auto")
    assert any("sm_90" in r for r in reasons(q, q, q))  # a CPU tensor
    monkeypatch.setattr(kernels, "tma_mode", "off")
    assert reasons(q, q, q) == [f"{kernels.TMA_SETTING}=off"]
    monkeypatch.setattr(kernels, "tma_mode", "yes")
    for ask in (kernels.tma_not_supported_reasons, kernels._takes_tma):
        with pytest.raises(ValueError, match="FASTGUIDE_ATTENTION_TMA must be 'auto', 'on' or 'off'"):
            ask(q, q, q)


def test_every_autotuned_kernel_prunes_with_its_own_arguments(monkeypatch):
    # The tests tune over one config (tests/conftest.py), which Triton's autotuner never
    # prunes; outside them it prunes the full list with the kernel's own named arguments,
    # so a prune that reads an argument its kernel does not take fails only there.
    from triton.runtime.autotuner import Autotuner

    kernels = attention_kernels()

    monkeypatch.delenv(kernels.AUTOTUNE_SETTING, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tuned = {name: k for name, k in vars(kernels).items() if isinstance(k, Autotuner)}
    assert set(tuned) == {"_forward_kernel", "_forward_tma_kernel", "_backward_dkdv_kernel", "_backward_dq_kernel"}
    for name, kernel in tuned.items():
        configs = kernels._tma_configs() if "tma" in name else kernels._configs(for_backward="backward" in name)
        assert len(configs) > 1
        if kernel.early_config_prune is None:
            continue
        for dtype, head_dim in ((torch.float16, 64), (torch.float32, 64), (torch.float16, 256)):
            named = {
                arg: torch.empty(1, dtype=dtype) if arg.endswith(("_ptr", "_desc")) else 1 for arg in kernel.arg_names
            }
            kept = kernel.early_config_prune(configs, named, BLOCK_D=head_dim, PRECISION="ieee")
            assert 0 < len(kept) <= len(configs), name


@pytest.mark.skipif(torch.cuda.is_available() or "triton" not in BACKENDS, reason="the Triton interpreter on CPU")
def test_the_interpreter_declines_bf16_attention():
    """Its bf16 tl.dot is wrong (8e8 off on unit inputs): declined with the reason, never a
    silent wrong answer; auto runs the reference, which agrees with the float64 formula."""
    q = torch.randn(1, 1, 16, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with fastguide.backend("triton"), pytest.raises(RuntimeError, match="bf16 tl.dot wrongly"):
        ops.attention(q, q, q)
    with fastguide.backend("auto"):
        out = ops.attention(q, q, q)
    expected = explicit_attention(q, q, q, 16**-0.5)
    assert_close(out, expected, ATTENTION, torch.bfloat16)
    assert_within_twice_torch(out, expected, plain_attention(q, q, q, 16**-0.5))

"""layer_norm, gated_residual and gated_residual_layer_norm: the float64 reference against
F.layer_norm with the adaLN modulation written out, then every backend (the Triton
interpreter, the cuda backend on its CPU emulation) against that float64 formula, forward
and backward, under torch.compile, and the argument checks."""

import pytest
import torch
import torch.nn.functional as F

import fastguide
from fastguide import ops
from fastguide.ops import reference
from fastguide.ops.contract import NormParameters
from tests.helpers import (
    LAYER_NORM,
    assert_close,
    assert_within_twice_torch,
    backends_with_emulation,
    explicit_layer_norm,
    random_token_inputs,
    running_on,
)

# The cuda backend runs here on its emulation unless a GPU runs it for real.
BACKENDS = backends_with_emulation("layer_norm")
LOW = [torch.float32, torch.float16, torch.bfloat16]
# (N, L, D) and (N, D): odd widths (72 below a warp's vector sweep, DiT-XL's 1152, 13 no
# multiple of a 16-byte vector), one token, a token count past a power of two, and x
# without a token dim.
SHAPES = [(2, 7, 72), (3, 1, 72), (2, 257, 72), (2, 5, 1152), (2, 9, 13), (3, 72), (2, 11, 96)]
# (scale per token, shift per token, affine): None drops both modulations.
VARIANTS = {
    "plain": (None, False),
    "per-sample": ((False, False), False),
    "per-token-affine": ((True, True), True),
    "mixed-affine": ((False, True), True),
    "token-scale": ((True, False), False),
}


def device_for(backend: str, device: torch.device) -> torch.device:
    """The emulated cuda backend runs on CPU tensors, whatever the machine."""
    return torch.device("cpu") if backend == "cuda-emulation" else device


def inputs(shape, dtype, device, variant, seed=0):
    per_token, affine = VARIANTS[variant]
    x, weight, bias, scale, shift = random_token_inputs(shape, dtype, device, per_token or (False, False), seed)
    if per_token is None:
        scale = shift = None
    if not affine:
        weight = bias = None
    return x, weight, bias, scale, shift


def eager_in_dtype(x, weight, bias, scale, shift, eps=1e-6):
    """What plain PyTorch computes in x's dtype (a DiT's modulate(norm(x))): the error the
    kernels are held to (at most twice it)."""
    dtype = x.dtype
    y = F.layer_norm(
        x, x.shape[-1:], None if weight is None else weight.to(dtype), None if bias is None else bias.to(dtype), eps
    )

    def tokens(t):
        return t.unsqueeze(1) if t.dim() == 2 and x.dim() == 3 else t

    if scale is not None:
        y = y * (1 + tokens(scale))
    if shift is not None:
        y = y + tokens(shift)
    return y


def interpreter_truncates(backend, dtype, device) -> bool:
    """Triton's interpreter converts float32 to bfloat16 by truncation (a GPU rounds to
    nearest): a full ulp rather than half, so the 2× rule holds on a GPU only there."""
    return backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu"


def assert_close_and_within_twice_torch(got, expected, plain, dtype, strict=True):
    assert_close(got, expected, LAYER_NORM, dtype)
    if dtype != torch.float64 and strict:
        assert_within_twice_torch(got, expected, plain)


# --------------------------------------------------------------------------------------
# The reference against the formula
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_matches_written_out_formula(shape, variant):
    x, weight, bias, scale, shift = inputs(shape, torch.float64, "cpu", variant)
    tokens = [None if t is None else (t.unsqueeze(1) if t.dim() == 2 and x.dim() == 3 else t) for t in (scale, shift)]
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + 1e-6)
    if weight is not None:
        y = y * weight + bias
    if tokens[0] is not None:
        y = y * (1 + tokens[0]) + tokens[1]
    y_reference, _, _ = reference.layer_norm_forward(x, NormParameters(weight, bias, *tokens), 1e-6)
    torch.testing.assert_close(y_reference, y)
    torch.testing.assert_close(ops.layer_norm(x, (shape[-1],), weight, bias, scale=scale, shift=shift), y)


def test_reference_gated_residual_layer_norm_is_the_unfused_pair():
    h, branch = torch.randn(2, 9, 40, dtype=torch.float64), torch.randn(2, 9, 40, dtype=torch.float64)
    gate, scale, shift = (torch.randn(2, 40, dtype=torch.float64) for _ in range(3))
    h_new, y = ops.gated_residual_layer_norm(h, branch, gate, 40, scale=scale, shift=shift)
    torch.testing.assert_close(h_new, h + gate.unsqueeze(1) * branch)
    torch.testing.assert_close(y, explicit_layer_norm(h_new, None, None, scale, shift))
    torch.testing.assert_close(ops.gated_residual(h, branch, gate), h_new)


# --------------------------------------------------------------------------------------
# Every backend against the float64 formula
# --------------------------------------------------------------------------------------


def backend_dtypes():
    return [(b, d) for b in BACKENDS for d in ([torch.float64] if b == "torch" else []) + LOW]


@pytest.mark.parametrize("backend, dtype", backend_dtypes(), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_norm_matches_formula(backend, dtype, shape, variant, device, request):
    device = device_for(backend, device)
    x, weight, bias, scale, shift = inputs(shape, dtype, device, variant)
    with running_on(backend, request):
        y = ops.layer_norm(x, (shape[-1],), weight, bias, 1e-6, scale=scale, shift=shift)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_and_within_twice_torch(
        y,
        explicit_layer_norm(x, weight, bias, scale, shift),
        eager_in_dtype(x, weight, bias, scale, shift),
        dtype,
        strict=not interpreter_truncates(backend, dtype, device),
    )


@pytest.mark.parametrize("backend, dtype", backend_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 72), (2, 257, 72), (3, 72), (1, 3, 1160)], ids=str)
@pytest.mark.parametrize("per_token_gate", [False, True])
def test_gated_residual_layer_norm_matches_formula(backend, dtype, shape, per_token_gate, device, request):
    device = device_for(backend, device)
    x, weight, bias, scale, shift = inputs(shape, dtype, device, "mixed-affine")
    g = torch.Generator().manual_seed(9)
    branch = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    gate = torch.randn(shape if per_token_gate else (shape[0], shape[-1]), generator=g).to(device=device, dtype=dtype)
    with running_on(backend, request):
        h_new, y = ops.gated_residual_layer_norm(x, branch, gate, shape[-1], weight, bias, scale=scale, shift=shift)
    gate_tokens = gate.unsqueeze(1) if gate.dim() == 2 and x.dim() == 3 else gate
    sum64 = x.double() + gate_tokens.double() * branch.double()
    # h_new is h + gate·branch rounded once to h's dtype; the norm reads that rounded value.
    assert_close(h_new, sum64, LAYER_NORM, dtype)
    assert_close(h_new, sum64.to(dtype), {dtype: (0, 0) if dtype == torch.float64 else LAYER_NORM[dtype]}, dtype)
    expected = explicit_layer_norm(h_new, weight, bias, scale, shift)
    assert_close_and_within_twice_torch(
        y,
        expected,
        eager_in_dtype(h_new, weight, bias, scale, shift),
        dtype,
        strict=not interpreter_truncates(backend, dtype, device),
    )


def test_gated_residual_matches_formula_and_differentiates():
    h, branch = torch.randn(2, 5, 24, requires_grad=True), torch.randn(2, 5, 24, requires_grad=True)
    gate = torch.randn(2, 24, requires_grad=True)
    out = ops.gated_residual(h, branch, gate)
    torch.testing.assert_close(out, h + gate.unsqueeze(1) * branch)
    grads = torch.autograd.grad(out, (h, branch, gate), torch.ones_like(out))
    torch.testing.assert_close(grads[2], branch.sum(1))
    bf16 = ops.gated_residual(h.bfloat16(), branch.bfloat16(), gate)  # a float32 gate, rounded once
    expected = (h.bfloat16().double() + gate.double().unsqueeze(1) * branch.bfloat16().double()).bfloat16()
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.double(), expected.double(), atol=0, rtol=2**-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("branch_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_branch_of_another_dtype_is_cast_to_h(backend, branch_dtype, device, request):
    # autocast's DiT: a float32 residual stream, bfloat16 branches from autocast Linears. The
    # stream keeps its dtype; the result is that of the branch cast to it first.
    device = device_for(backend, device)
    g = torch.Generator().manual_seed(0)
    h, branch, per_token = (torch.randn(2, 5, 24, generator=g).to(device) for _ in range(3))
    gate, scale = (torch.randn(2, 24, generator=g).to(device) for _ in range(2))
    branch = branch.to(branch_dtype)
    with running_on(backend, request):
        out = ops.gated_residual(h, branch, per_token)
        h_new, y = ops.gated_residual_layer_norm(h, branch, gate, 24, scale=scale.bfloat16(), shift=scale)
        want_h_new, want_y = ops.gated_residual_layer_norm(
            h, branch.float(), gate, 24, scale=scale.bfloat16(), shift=scale
        )
    assert out.dtype == h_new.dtype == y.dtype == torch.float32
    torch.testing.assert_close(out, ops.gated_residual(h, branch.float(), per_token), atol=0, rtol=0)
    torch.testing.assert_close((h_new, y), (want_h_new, want_y), atol=0, rtol=0)
    leaf = branch.detach().requires_grad_()
    (grad,) = torch.autograd.grad(ops.gated_residual_layer_norm(h, leaf, gate, 24)[1].sum(), leaf)
    assert grad.dtype == branch_dtype and grad.shape == branch.shape


def test_per_sample_tensors_of_an_n_by_d_x_may_be_n_by_1_by_d():
    # For (N, D) x each sample is one token: (N, 1, D) is its per-sample shape too.
    x, branch, gate, scale, shift = (torch.randn(3, 24) for _ in range(5))
    y = ops.layer_norm(x, 24, scale=scale[:, None], shift=shift[:, None])
    assert y.shape == (3, 24)
    torch.testing.assert_close(y, ops.layer_norm(x, 24, scale=scale, shift=shift), atol=0, rtol=0)
    out = ops.gated_residual(x, branch, gate[:, None])
    assert out.shape == (3, 24)
    torch.testing.assert_close(out, x + gate * branch)
    h_new, y = ops.gated_residual_layer_norm(x, branch, gate[:, None], 24, scale=scale[:, None])
    torch.testing.assert_close((h_new, y), ops.gated_residual_layer_norm(x, branch, gate, 24, scale=scale))


def test_jit_trace_with_per_sample_modulation():
    # Under torch.jit.trace sizes are traced values, which the shape checks compare, not hash.
    x, scale, gate = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 1, 8)
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(lambda a, b, c: ops.gated_residual_layer_norm(a, a, c, 8, scale=b), (x, scale, gate))
    torch.testing.assert_close(traced(x, scale, gate), ops.gated_residual_layer_norm(x, x, gate, 8, scale=scale))


def test_meta_tensors_give_meta_results():
    # Models are built and traced on the meta device: no values, only shapes and dtypes.
    meta = {"device": "meta"}
    x = torch.empty(2, 5, 24, dtype=torch.bfloat16, **meta)
    y = ops.layer_norm(x, 24, torch.empty(24, **meta), None, scale=torch.empty(2, 24, **meta))
    assert y.is_meta and y.shape == x.shape and y.dtype == torch.bfloat16
    h_new, y = ops.gated_residual_layer_norm(x, torch.empty(2, 5, 24, **meta), torch.empty(2, 24, **meta), 24)
    assert h_new.is_meta and y.is_meta and h_new.shape == y.shape == x.shape and y.dtype == torch.bfloat16
    leaf = torch.empty(3, 24, **meta, requires_grad=True)
    ops.layer_norm(leaf, 24, shift=torch.empty(3, 24, **meta)).sum().backward()
    assert leaf.grad.is_meta and leaf.grad.shape == leaf.shape
    with fastguide.backend("cuda"):  # an explicit backend: nothing runs, so nothing is missing
        assert ops.layer_norm(x, 24).is_meta


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def assert_grads_close(got_grads, wanted, leaves, x, dtype):
    atol, rtol = LAYER_NORM[dtype]
    for got, want, leaf in zip(got_grads, wanted, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        # Parameter gradients sum over rows: their error grows with the count.
        count = max(1, x.numel() // max(1, want.numel()))
        torch.testing.assert_close(got.double(), want, atol=atol * count**0.5 * 4, rtol=rtol * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(
    "shape, variant",
    [
        ((2, 7, 72), "per-sample"),
        ((2, 257, 72), "mixed-affine"),
        # enough tokens that the cuda column sums' chunks hold whole steps of 4 tokens, with
        # a per-token scale in the sums
        ((2, 300, 72), "per-token-affine"),
        # the same on the element-by-element column sums (13 columns: no 16-byte vector)
        ((2, 300, 13), "per-token-affine"),
        # more samples than the emulated grid's 3 rows: the column sums' loop over samples,
        # each with its own per-sample scale (which the sums read only beside a weight)
        ((5, 40, 72), "mixed-affine"),
        ((3, 1, 72), "per-token-affine"),
        ((3, 72), "mixed-affine"),
        ((1, 3, 1152), "per-token-affine"),
        # DiT's width under a per-sample scale, which the Triton column sums apply once at
        # the end: 4.5 column blocks in 16-bit, and token chunks, the last a partial step
        ((2, 20, 1152), "mixed-affine"),
        # a per-token scale in the Triton column sums over several column blocks (3 in fp32)
        # and chunks at once, and a per-token scale beside a per-sample shift
        ((2, 37, 300), "per-token-affine"),
        ((2, 37, 300), "token-scale"),
        # An odd width that pads (13 in a row of 16) and a power of two that does not (64).
        ((2, 9, 13), "per-sample"),
        ((2, 5, 64), "plain"),
    ],
    ids=str,
)
def test_layer_norm_backward_matches_autograd_of_formula(backend, dtype, shape, variant, device, request):
    device = device_for(backend, device)
    x, weight, bias, scale, shift = inputs(shape, dtype, device, variant, seed=3)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, scale, shift) if t is not None]
    present = [t is not None for t in (x, weight, bias, scale, shift)]
    full = iter(leaves)
    x_, weight_, bias_, scale_, shift_ = (next(full) if p else None for p in present)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    with running_on(backend, request):
        y = ops.layer_norm(x_, shape[-1], weight_, bias_, scale=scale_, shift=shift_)
        grads = torch.autograd.grad(y, leaves, grad_y)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    full = iter(doubles)
    args = [next(full) if p else None for p in present]
    wanted = torch.autograd.grad(explicit_layer_norm(*args), doubles, grad_y.double())
    assert_grads_close(grads, wanted, leaves, x, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_residual_layer_norm_backward(backend, dtype, device, request):
    device = device_for(backend, device)
    shape = (2, 9, 72)
    x, weight, bias, scale, shift = inputs(shape, dtype, device, "mixed-affine", seed=5)
    g = torch.Generator().manual_seed(6)
    branch = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    gate = torch.randn(shape[0], shape[-1], generator=g).to(device=device, dtype=dtype)
    leaves = [t.detach().requires_grad_() for t in (x, branch, gate, weight, bias, scale, shift)]
    grad_h, grad_y = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    with running_on(backend, request):
        h_new, y = ops.gated_residual_layer_norm(
            leaves[0], leaves[1], leaves[2], shape[-1], *leaves[3:5], scale=leaves[5], shift=leaves[6]
        )
        grads = torch.autograd.grad((h_new, y), leaves, (grad_h, grad_y))
    d = [t.detach().double().requires_grad_() for t in leaves]
    h64 = d[0] + d[2].unsqueeze(1) * d[1]
    y64 = explicit_layer_norm(h64, d[3], d[4], d[5], d[6])
    wanted = torch.autograd.grad((h64, y64), d, (grad_h.double(), grad_y.double()))
    assert_grads_close(grads, wanted, leaves, x, dtype)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    leaves = [
        torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
        for s in [(2, 3, 6), (6,), (6,), (2, 6), (2, 3, 6), (2, 3, 6), (2, 6)]
    ]
    x, weight, bias, scale, shift, branch, gate = leaves
    assert torch.autograd.gradcheck(
        lambda *t: ops.layer_norm(t[0], 6, t[1], t[2], scale=t[3], shift=t[4]), (x, weight, bias, scale, shift)
    )
    assert torch.autograd.gradcheck(
        lambda *t: ops.gated_residual_layer_norm(t[0], t[1], t[2], 6, scale=t[3]), (x, branch, gate, scale)
    )


# --------------------------------------------------------------------------------------
# Layouts, the NaN policy, empty tensors, wide rows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_transposed_views(backend, device, request):
    device = device_for(backend, device)
    x, weight, bias, scale, shift = inputs((2, 7, 72), torch.float32, device, "mixed-affine")
    wide = torch.randn(2, 7, 144, device=device)[..., ::2]
    transposed = x.transpose(0, 1).contiguous().transpose(0, 1)
    strided_scale = torch.randn(2, 144, device=device)[:, 1::2]
    for view in (wide, transposed):
        assert not view.is_contiguous()
        with running_on(backend, request):
            y = ops.layer_norm(view, 72, weight, bias, scale=strided_scale, shift=shift)
        assert_close(y, explicit_layer_norm(view, weight, bias, strided_scale, shift), LAYER_NORM, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("misaligned", ["rows-and-weight", "weight"])
def test_misaligned_tensors(backend, dtype, misaligned, device, request):
    device = device_for(backend, device)

    # The CUDA kernels use 16-byte vectors only when every pointer they read in vectors
    # allows them; the emulation reports a misaligned vector access as the fault a GPU
    # would raise. A misaligned weight alone leaves the backward's column sums (which do
    # not read it) on vectors while the rows go element by element.
    def offset_copy(t):
        storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        return view

    rows = offset_copy if misaligned == "rows-and-weight" else (lambda t: t)
    x, weight, bias, scale, shift = inputs((2, 5, 64), dtype, device, "mixed-affine")
    weight = offset_copy(weight)  # a float32 parameter off its 16-byte boundary (read as float4)
    branch, gate = rows(x * 0.5), torch.randn(2, 64, device=device).to(dtype)
    x = rows(x)
    leaves = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
    grad_y = rows(torch.randn(x.shape, device=device).to(dtype))
    with running_on(backend, request):
        y = ops.layer_norm(x, 64, weight, bias, scale=scale, shift=shift)
        grads = torch.autograd.grad(y, leaves, grad_y)
        h_new, z = ops.gated_residual_layer_norm(
            x.detach(), branch, gate, 64, weight.detach(), bias.detach(), scale=scale.detach()
        )
    assert_close(y, explicit_layer_norm(*(t.detach() for t in leaves)), LAYER_NORM, dtype)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    wanted = torch.autograd.grad(explicit_layer_norm(*doubles), doubles, grad_y.double())
    assert_grads_close(grads, wanted, leaves, x, dtype)
    assert_close(z, explicit_layer_norm(h_new, weight.detach(), bias.detach(), scale.detach(), None), LAYER_NORM, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_overflow_rows_are_nan_and_others_exact(backend, device, request):
    device = device_for(backend, device)
    x = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(0))
    x[0, 1, 3] = float("nan")
    x[0, 2, 5] = float("inf")
    x[1, 0] *= 1e20  # squares past float32's range: the row's statistics cannot be formed
    with running_on(backend, request):
        y = ops.layer_norm(x.to(device), 40).cpu()
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[0, 1] = bad[0, 2] = bad[1, 0] = True
    assert y[bad].isnan().all()
    assert_close(y[~bad], F.layer_norm(x.double(), (40,), eps=1e-6)[~bad], LAYER_NORM, torch.float32)


@pytest.mark.parametrize("backend, dtype", [(b, d) for b in BACKENDS for d in (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("case", ["outlier first channel", "outlier channel 37", "mean far from zero"])
@pytest.mark.parametrize("width", [1152, 72, 13])
def test_rows_with_an_outlier_or_a_large_mean(backend, dtype, case, width, device, request):
    # DiT activations carry a few huge channels: a row's statistics must not lose precision
    # to the distance between one element and the mean (the cuda kernel once shifted every
    # sum by the row's first element, 100x over float32's tolerance with it an outlier)
    device = device_for(backend, device)
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(3))
    if case == "mean far from zero":
        x += 1e3
    else:
        x[..., 0 if case == "outlier first channel" else 37 % width] = 1e3
    x = x.to(dtype)
    with running_on(backend, request):
        y = ops.layer_norm(x.to(device), width).cpu()
    expected = F.layer_norm(x.double(), (width,), eps=1e-6)
    if dtype == torch.bfloat16:  # the output's rounding dominates
        assert_close(y, expected, LAYER_NORM, dtype)
        return
    # float32's mean of values near 1e3 is off by up to half its ulp (3e-5), past the
    # table's tolerance: held to PyTorch's own error instead
    ours = (y.double() - expected).abs().max()
    theirs = (F.layer_norm(x, (width,), eps=1e-6).double() - expected).abs().max()
    assert ours <= 2 * theirs + 1e-6, f"error {ours:.3g} exceeds twice PyTorch's {theirs:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [13, 72])
def test_rows_whose_sums_overflow_float32_are_nan_on_every_backend(backend, width, device, request):
    # ±1e38 in turn: each value fits, the variance does not (the cuda kernel merges its
    # lanes in float64, which holds it: it checks the float32 range)
    device = device_for(backend, device)
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(2))
    x[0] = torch.tensor([1e38, -1e38]).repeat(width)[:width]
    with running_on(backend, request):
        y = ops.layer_norm(x.to(device), width).cpu()
    assert y[0].isnan().all()
    assert_close(y[1], F.layer_norm(x[1].double(), (width,), eps=1e-6), LAYER_NORM, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend, device, request):
    device = device_for(backend, device)
    with running_on(backend, request):
        y = ops.layer_norm(torch.empty(0, 3, 8, device=device), 8, scale=torch.empty(0, 8, device=device))
        h_new, z = ops.gated_residual_layer_norm(
            *(torch.empty(2, 0, 8, device=device) for _ in range(2)), torch.randn(2, 8, device=device), 8
        )
    assert y.shape == (0, 3, 8) and h_new.shape == z.shape == (2, 0, 8)


def test_triton_backward_of_samples_without_tokens():
    # The ops route empty inputs to the torch backend; the kernels' launcher, called
    # directly, still gives empty dx and a zero per-sample dscale (it divided by zero).
    if "triton" not in BACKENDS:
        pytest.skip("triton does not run here")
    from fastguide.kernels import layer_norm as triton_layer_norm

    x, scale = torch.randn(2, 0, 72), torch.randn(2, 1, 72)
    stats = torch.empty(2, 0)
    dx, dweight, dbias, dscale, dshift = triton_layer_norm.layer_norm_backward(
        torch.randn(2, 0, 72), x, NormParameters(None, None, scale, None), stats, stats
    )
    assert dx.shape == (2, 0, 72) and dweight is None and dbias is None and dshift is None
    assert torch.equal(dscale, torch.zeros_like(scale))


def test_triton_rows_wider_than_its_tile_run_on_the_reference(monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton does not run here")
    from fastguide.kernels import layer_norm as triton_layer_norm

    monkeypatch.setattr(triton_layer_norm, "MAX_D", 64)
    x, weight, bias, scale, shift = inputs((2, 3, 72), torch.float32, "cpu", "mixed-affine")
    with fastguide.backend("triton"):
        y = ops.layer_norm(x, 72, weight, bias, scale=scale, shift=shift)
    assert_close(y, explicit_layer_norm(x, weight, bias, scale, shift), LAYER_NORM, torch.float32)


def test_triton_forward_tiles_hold_whole_rows_and_a_light_row_gather():
    # Every width's tile: whole rows of K segments, ROWS_POW2 the rows' power of two, and
    # the [ROWS_POW2, SEGMENTS] gather at most MAX_GATHER_PER_THREAD values a thread (DiT's
    # 1152 as 7 rows of 9 segments of 128 on 16 warps; the digits transformer's 96 as 5
    # rows of 3 segments of 32 on one warp).
    pytest.importorskip("triton")
    from fastguide.kernels import layer_norm as triton_layer_norm

    assert triton_layer_norm.forward_tile(1152) == (128, 64, 8, 16)
    assert triton_layer_norm.forward_tile(96) == (32, 16, 8, 1)
    for d in range(1, 4097):
        segment, segments, rows_pow2, warps = triton_layer_norm.forward_tile(d)
        per_row = -(-d // segment)
        rows = segments // per_row
        assert rows >= 1 and segments <= triton_layer_norm.MAX_SEGMENTS, d
        assert rows_pow2 >= rows > rows_pow2 // 2, d
        gather = rows_pow2 * segments / (warps * 32)
        assert rows == 1 or gather <= triton_layer_norm.MAX_GATHER_PER_THREAD, d


# --------------------------------------------------------------------------------------
# torch.compile: one node per call
# --------------------------------------------------------------------------------------


def compiled_graph_targets(fn, *args):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    out = torch.compile(fn, fullgraph=True, backend=capture)(*args)
    assert len(graphs) == 1
    return out, [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]


def test_compile_fullgraph_one_node_per_call():
    x, _, _, scale, shift = inputs((2, 7, 72), torch.float32, "cpu", "per-sample")
    branch, gate = torch.randn(2, 7, 72), torch.randn(2, 72)

    def block(x, scale, shift, branch, gate):
        h, y = ops.gated_residual_layer_norm(x, branch, gate, 72, scale=scale, shift=shift)
        return ops.layer_norm(y, (72,), None, None, 1e-6, scale=scale, shift=shift) + h

    out, targets = compiled_graph_targets(block, x, scale, shift, branch, gate)
    assert targets.count(torch.ops.fastguide.layer_norm.default) == 1
    assert targets.count(torch.ops.fastguide.gated_residual_layer_norm.default) == 1
    torch.testing.assert_close(out, block(x, scale, shift, branch, gate))
    leaves = [t.detach().double().requires_grad_() for t in (x, scale, shift, branch, gate)]
    eager = torch.autograd.grad(block(*leaves).square().sum(), leaves)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*leaves)
    for e, c in zip(eager, torch.autograd.grad(compiled.square().sum(), leaves)):
        torch.testing.assert_close(c, e)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x, branch = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    per_sample, per_token = (
        torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((2, 1, 8), (2, 3, 8))
    )
    torch.library.opcheck(
        torch.ops.fastguide.layer_norm.default, (x, weight, bias, per_sample, per_token, 1e-6, "torch")
    )
    torch.library.opcheck(torch.ops.fastguide.layer_norm.default, (x, None, None, None, per_sample, 1e-5, "torch"))
    torch.library.opcheck(
        torch.ops.fastguide.gated_residual_layer_norm.default,
        (x, branch, per_sample, weight, None, per_token, None, 1e-6, "torch"),
    )


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: ops.layer_norm(x, (71,)), ValueError, r"normalized_shape must be \(72,\)"),
        (lambda x: ops.layer_norm(x, (7, 72)), ValueError, "normalized_shape"),
        (lambda x: ops.layer_norm(x, 72.0), TypeError, "normalized_shape"),
        (lambda x: ops.layer_norm(x, "72"), TypeError, "normalized_shape"),
        (lambda x: ops.layer_norm(x[None], 72), ValueError, r"x must be \(N, L, D\) or \(N, D\)"),
        (lambda x: ops.layer_norm(x.int(), 72), TypeError, "x must be a floating tensor"),
        (lambda x: ops.layer_norm(x, 72, torch.ones(71)), ValueError, r"weight must have shape \(72,\)"),
        (lambda x: ops.layer_norm(x, 72, None, torch.ones(2, 72)), ValueError, "bias must have shape"),
        (lambda x: ops.layer_norm(x, 72, scale=torch.ones(2, 3, 72)), ValueError, r"scale \(adaLN modulation\)"),
        (lambda x: ops.layer_norm(x, 72, shift=torch.ones(3, 72)), ValueError, "shift"),
        (lambda x: ops.layer_norm(x, 72, scale=torch.ones(2, 72, dtype=torch.int32)), TypeError, "scale"),
        (lambda x: ops.layer_norm(x, 72, torch.ones(72, device="meta")), ValueError, "weight is on meta"),
        (lambda x: ops.layer_norm(x, 72, eps=0.0), ValueError, "eps must be positive"),
        (lambda x: ops.layer_norm(x, 72, eps=1e39), ValueError, "eps must be positive and within float32's normal"),
        (lambda x: ops.gated_residual(x, x[:, :3], torch.ones(2, 72)), ValueError, "branch must have shape"),
        (lambda x: ops.gated_residual(x, x.int(), torch.ones(2, 72)), TypeError, "branch must be a floating tensor"),
        (
            lambda x: ops.layer_norm(x[:, 0], 72, scale=torch.ones(2, 2, 72)),
            ValueError,
            r"scale \(adaLN modulation\) must have shape \(2, 72\) or \(2, 1, 72\)",
        ),
        (lambda x: ops.gated_residual(x, x, torch.ones(72)), ValueError, r"gate \(residual gate\).* for h of shape"),
        (
            lambda x: ops.gated_residual_layer_norm(x, x, torch.ones(2, 72), 72, scale=torch.ones(3, 72)),
            ValueError,
            r"scale \(adaLN modulation\).* for h of shape",
        ),
        (lambda x: ops.gated_residual_layer_norm(x, x, torch.ones(2, 72), 70), ValueError, "the last dim of h"),
        (
            lambda x: ops.gated_residual_layer_norm(x, x, torch.ones(2, 72, device="meta"), 72),
            ValueError,
            "gate is on meta",
        ),
    ],
)
def test_invalid_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 7, 72))


# --------------------------------------------------------------------------------------
# On a GPU: DiT sizes, the compiled kernels (bf16 included, rounded to nearest there)
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("triton", "cuda")])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(16, 256, 1152), (8, 1024, 1152), (4, 4096, 384)], ids=str)
@pytest.mark.parametrize("variant", ["per-sample", "per-token-affine"])
def test_layer_norm_gpu_dit_sizes(backend, dtype, shape, variant):
    x, weight, bias, scale, shift = inputs(shape, dtype, "cuda", variant, seed=8)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, scale, shift) if t is not None]
    present = [t is not None for t in (x, weight, bias, scale, shift)]
    full = iter(leaves)
    args = [next(full) if p else None for p in present]
    g = torch.Generator(device="cuda").manual_seed(2)
    branch, grad_y = (torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(2))
    gate = torch.randn(shape[0], shape[-1], generator=g, device="cuda").to(dtype)
    with fastguide.backend(backend):
        y = ops.layer_norm(args[0], shape[-1], *args[1:3], scale=args[3], shift=args[4])
        h_new, z = ops.gated_residual_layer_norm(x, branch, gate, shape[-1], weight, bias, scale=scale, shift=shift)
        grads = torch.autograd.grad(y, leaves, grad_y)
    assert_close_and_within_twice_torch(
        y, explicit_layer_norm(x, weight, bias, scale, shift), eager_in_dtype(x, weight, bias, scale, shift), dtype
    )
    assert_close_and_within_twice_torch(
        z,
        explicit_layer_norm(h_new, weight, bias, scale, shift),
        eager_in_dtype(h_new, weight, bias, scale, shift),
        dtype,
    )
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    full = iter(doubles)
    wanted = torch.autograd.grad(
        explicit_layer_norm(*[next(full) if p else None for p in present]), doubles, grad_y.double()
    )
    assert_grads_close(grads, wanted, leaves, x, dtype)

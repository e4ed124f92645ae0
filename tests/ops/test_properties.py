"""Property-based tests (hypothesis): every op on every backend that runs here, over random
shapes (empty ones included), dtypes, strides, memory formats, aliasing and non-finite
values, against the float64 reference and the NaN policy of docs/design.md:

  an output element that depends on a NaN or ±inf input is non-finite on every backend
  (NaN or ±inf), every other element is finite and agrees with the reference within the
  op's tolerance; for guided_step's per-sample reductions (CFG rescale, CFG-Zero*, APG,
  tangential CFG) and for GroupNorm's statistics the dependency is the whole sample or group.
  guided_step runs with and without a perturbed prediction (PAG, SLG: model output [c; u; p]).

guided_step's predictions are also drawn with a large mean and a small spread, and
constant, where statistics that cancel in float32 would give wrong answers silently.

The examples are derandomized, so CI runs the same cases every time.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastguide import ops
from fastguide.ops import reference
from fastguide.ops.contract import PREDICTION_TYPES, GuidanceCombine, NormParameters, StepCoefficients, StepTensors
from tests.helpers import ATTENTION, GROUP_NORM, GUIDED_STEP, LAYER_NORM, backends_with_emulation, running_on

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NON_FINITE = [math.nan, math.inf, -math.inf]


def assert_policy(actual: torch.Tensor, expected: torch.Tensor, table: dict, dtype: torch.dtype) -> None:
    """Same non-finite elements as the reference; the finite ones close to it."""
    actual = actual.detach().cpu().double()
    finite = torch.isfinite(expected)
    mismatched = (torch.isfinite(actual) != finite).nonzero()
    assert mismatched.numel() == 0, f"finite/non-finite differ at {mismatched[:5].tolist()}"
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=rtol)


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in a channels_last or a strided (every other element of a wider) tensor."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), 7.0, dtype=t.dtype)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    return t.clone()


def inject(t: torch.Tensor, spots: list[tuple[int, float]]) -> None:
    """Put non-finite values at (flat index mod numel) positions of t, in place."""
    for index, value in spots:
        if t.numel() > 0:
            coords = torch.unravel_index(torch.tensor(index % t.numel()), t.shape)
            t[tuple(int(c) for c in coords)] = value


# --------------------------------------------------------------------------------------
# guided_step
# --------------------------------------------------------------------------------------

coefficients = st.sampled_from([0.0, 0.5, -0.7, 1.3])
spots = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(NON_FINITE)), max_size=2)
# (mean, spread) of the guided channels of c and u, each row with its own level added:
# where a single-pass E[x²] − E[x]² in float32 cancels (a constant row: std exactly 0).
PREDICTIONS = {"random": None, "mean-10": (10.0, 1e-2), "mean-1e4": (1e4, 1e-2), "constant": (0.0, 0.0)}
STEP_VARIANTS = [
    "none",
    "cfg",
    "rescale",
    "zero_star",
    "tangential",
    "apg",
    "apg-momentum",
    "perturbed",
    "perturbed-rescale",
]


@st.composite
def step_cases(draw):
    case = dict(
        batch=draw(st.integers(1, 3)),
        channels=draw(st.integers(1, 4)),
        spatial=(draw(st.integers(1, 6)), draw(st.integers(1, 7))),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        variant=draw(st.sampled_from(STEP_VARIANTS)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        out=draw(st.sampled_from(["new", "x", "2b", "3b"])),
        learned=draw(st.booleans()),
        clip=draw(st.booleans()),
        prediction_type=draw(st.sampled_from(PREDICTION_TYPES)),
        alpha_sigma=draw(st.sampled_from([(0.9, math.sqrt(1 - 0.81)), (0.3, math.sqrt(1 - 0.09))])),
        k={name: draw(coefficients) for name in ("k_x", "k_x0", "k_eps", "k_noise", "k_grad", "grad_eps_scale")},
        k_history=tuple(draw(coefficients) for _ in range(draw(st.integers(0, 4)))),
        x_spots=draw(spots),
        output_spots=draw(spots),
        seed=draw(st.integers(0, 2**16)),
    )
    # An empty batch or image now and then (drawn as sizes from 0, they were a third to
    # a half of the examples).
    empty = draw(st.sampled_from([None] * 6 + ["batch", "height"]))
    if empty == "batch":
        case["batch"] = 0
    elif empty == "height":
        case["spatial"] = (0, case["spatial"][1])
    # A perturbed prediction is the third B rows of the model output: never beside a guide.
    case["guide"] = case["variant"] not in ("none", "perturbed", "perturbed-rescale") and draw(st.booleans())
    case["k"]["k_guide_eps"] = draw(coefficients) if case["variant"] != "none" else 0.0  # CFG++'s renoising
    # Mean 1e4 would overflow float16's outputs (and float16 holds no 1e-2 spread there).
    case["predictions"] = draw(
        st.sampled_from(
            list(PREDICTIONS) if case["dtype"] == torch.float32 else [k for k in PREDICTIONS if k != "mean-1e4"]
        )
    )
    return case


def build_step(case: dict) -> tuple[dict, StepCoefficients, GuidanceCombine | None]:
    g = torch.Generator().manual_seed(case["seed"])
    batch, channels, dtype = case["batch"], case["channels"], case["dtype"]
    shape = (batch, channels, *case["spatial"])
    model_channels = 2 * channels if case["learned"] else channels
    variant = case["variant"]
    combine = (
        None
        if variant == "none"
        else GuidanceCombine(
            3.0,
            rescale=0.6 if variant.endswith("rescale") else 0.0,
            apg_eta=0.3 if variant.startswith("apg") else 0.0,
            apg_momentum=-0.5 if variant == "apg-momentum" else 0.0,
            perturbed_scale=2.0 if variant.startswith("perturbed") else 0.0,
            variant="apg"
            if variant.startswith("apg")
            else variant
            if variant in ("zero_star", "tangential")
            else "cfg",
        )
    )
    rows = batch if combine is None or case["guide"] else 3 * batch if combine.perturbed_scale else 2 * batch

    def random(*size, scale=1.0):
        return in_layout((torch.randn(size, generator=g) * scale).to(dtype), case["layout"])

    def predictions(rows, scale=1.0):  # (rows, C', ...); the variance channels stay random
        values = torch.randn((rows, model_channels, *case["spatial"]), generator=g) * scale
        if PREDICTIONS[case["predictions"]] is not None:
            mean, spread = PREDICTIONS[case["predictions"]]
            levels = torch.randn((rows,) + (1,) * (values.dim() - 1), generator=g)
            values[:, :channels] = mean + levels + spread * values[:, :channels]
        return in_layout(values.to(dtype), case["layout"])

    tensors = {"model_output": predictions(rows), "x": random(*shape, scale=1.3)}
    inject(tensors["model_output"], case["output_spots"])
    inject(tensors["x"], case["x_spots"])
    if case["guide"]:
        tensors["guide"] = predictions(batch, scale=0.5)
    tensors["history"] = tuple(random(*shape) for _ in case["k_history"])
    tensors["noise"], tensors["grad"] = random(*shape), random(*shape)
    if variant == "apg-momentum":
        tensors["apg_buffer"] = random(*shape).float()
    tensors["x0_out"] = torch.full(shape, math.nan, dtype=dtype)
    if case["out"] == "x":
        tensors["out"] = tensors["x"]
    elif case["out"] in ("2b", "3b"):  # the next input, x its first B rows
        blocks = 2 if case["out"] == "2b" else 3
        buffer = in_layout(
            torch.full((blocks * batch, channels, *case["spatial"]), math.nan, dtype=dtype), "contiguous"
        )
        buffer[:batch] = tensors["x"]
        tensors["x"], tensors["out"] = buffer[:batch], buffer
    else:
        tensors["out"] = torch.full(shape, math.nan, dtype=dtype)
    alpha, sigma = case["alpha_sigma"]
    if case["prediction_type"] == "flow_prediction":
        sigma = 1.0 - alpha  # a flow path's point at the same alpha
    step = StepCoefficients(
        alpha=alpha,
        sigma=sigma,
        **case["k"],
        k_history=case["k_history"],
        prediction_type=case["prediction_type"],
        clip_denoised=case["clip"],
        log_variance_range=(-5.0, -2.0) if case["learned"] else None,
    )
    return tensors, step, combine


def a_case_of(variant: str) -> dict:
    """A non-empty, finite float32 case of ``variant``, which the derandomized draws may not
    give a backend; over STEP_VARIANTS the cases take every prediction type, every kind of
    prediction, every layout and every out."""
    i = STEP_VARIANTS.index(variant)
    k = dict(k_x=0.5, k_x0=1.3, k_eps=-0.7, k_noise=0.5, k_grad=-0.7, grad_eps_scale=0.5)
    k["k_guide_eps"] = 0.0 if variant == "none" else 0.5  # CFG++'s renoising, as step_cases draws it
    return dict(
        batch=2,
        channels=3,
        spatial=(5, 7),
        dtype=torch.float32,
        variant=variant,
        layout=("contiguous", "channels_last", "strided")[i % 3],
        out=("new", "x", "2b", "3b")[i % 4],
        learned=i % 2 == 1,
        clip=i % 3 == 0,
        prediction_type=PREDICTION_TYPES[i % len(PREDICTION_TYPES)],
        alpha_sigma=((0.9, math.sqrt(1 - 0.81)), (0.3, math.sqrt(1 - 0.09)))[i % 2],
        k=k,
        k_history=(0.5, -0.7)[: i % 3],
        x_spots=[],
        output_spots=[],
        seed=i,
        guide=variant not in ("none", "perturbed", "perturbed-rescale") and i % 2 == 0,
        predictions=list(PREDICTIONS)[i % len(PREDICTIONS)],
    )


def assert_step_follows_the_reference(case: dict, backend: str, request) -> None:
    tensors, step, combine = build_step(case)
    if combine is not None and combine.rescale > 0 and math.prod(case["spatial"]) * case["channels"] == 1:
        with pytest.raises(ValueError, match="rescale needs at least 2 elements"):
            ops.guided_step(**tensors, step=step, combine=combine)
        return
    expected = {
        name: tuple(t.double() for t in value) if name == "history" else value.detach().double().clone()
        for name, value in tensors.items()
    }
    if case["out"] in ("2b", "3b"):  # the reference's x is the first block of its own out
        expected["x"] = expected["out"][: case["batch"]]
    elif case["out"] == "x":
        expected["out"] = expected["x"]
    inputs_before = {
        name: t.clone() for name, t in tensors.items() if name in ("model_output", "guide", "noise", "grad")
    }
    reference.guided_step(StepTensors(**expected), step, combine)
    with running_on(backend, request):
        ops.guided_step(**tensors, step=step, combine=combine)
    for name in ("out", "x0_out", "apg_buffer"):
        if name in tensors:
            assert_policy(tensors[name], expected[name], GUIDED_STEP, tensors[name].dtype)
    for name, before in inputs_before.items():  # inputs are not modified
        assert torch.equal(tensors[name].nan_to_num(), before.nan_to_num()), name


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@SETTINGS
@given(case=step_cases())
def test_guided_step_follows_the_reference_and_the_nan_policy(backend, case, request):
    assert_step_follows_the_reference(case, backend, request)


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_guided_step_follows_the_reference_on_every_variant(backend, variant, request):
    # (the 80 draws gave the triton backend no non-empty rescale, zero_star, apg or
    # perturbed-rescale case, and the cuda emulation no cfg, rescale, zero_star or perturbed)
    assert_step_follows_the_reference(a_case_of(variant), backend, request)


@st.composite
def overlapping_views(draw):
    length = draw(st.integers(2, 12))
    return length, draw(st.integers(0, 2 * length)), draw(st.integers(0, 2 * length))


@SETTINGS
@given(views=overlapping_views())
def test_guided_step_refuses_partial_overlap_and_takes_disjoint_views(views):
    # out and x as (1, 1, 1, length) windows at two offsets of one buffer.
    length, x_at, out_at = views
    g = torch.Generator().manual_seed(length)
    buffer = torch.randn(4 * length, generator=g)
    x = buffer[x_at : x_at + length].view(1, 1, 1, length)
    out = buffer[out_at : out_at + length].view(1, 1, 1, length)
    model_output = torch.randn(2, 1, 1, length, generator=g)
    step, combine = StepCoefficients(alpha=0.8, sigma=0.6, k_x=0.5, k_eps=0.4), GuidanceCombine(2.0)
    expected = reference.guided_step(StepTensors(model_output.double(), x.double()), step, combine)
    if x_at == out_at or abs(x_at - out_at) >= length:
        ops.guided_step(model_output, x, step, combine, out=out)
        assert_policy(out, expected, GUIDED_STEP, torch.float32)
    else:
        with pytest.raises(ValueError, match="out overlaps x in memory"):
            ops.guided_step(model_output, x, step, combine, out=out)


# --------------------------------------------------------------------------------------
# group_norm
# --------------------------------------------------------------------------------------


@st.composite
def norm_cases(draw):
    groups = draw(st.integers(1, 4))
    return dict(
        batch=draw(st.integers(0, 3)),
        groups=groups,
        channels=groups * draw(st.integers(1, 3)),
        spatial=(draw(st.integers(0, 5)), draw(st.integers(1, 6))),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        affine=draw(st.booleans()),
        scale_shift=draw(st.booleans()),
        activation=draw(st.sampled_from([None, "silu"])),
        x_spots=draw(spots),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("backend", backends_with_emulation("group_norm"))
@SETTINGS
@given(case=norm_cases())
def test_group_norm_follows_the_reference_and_the_nan_policy(backend, case, request):
    g = torch.Generator().manual_seed(case["seed"])
    n, c, dtype = case["batch"], case["channels"], case["dtype"]
    x = in_layout((torch.randn((n, c, *case["spatial"]), generator=g) * 2 + 0.5).to(dtype), case["layout"])
    atol, rtol = GROUP_NORM[dtype]
    if c // case["groups"] * math.prod(case["spatial"]) == 1 and n > 0:
        # A group of one value: var 0, so y = b; but rstd = eps^-1/2 and the kernels' and
        # aten's x·(rstd·w) + (b − mean·rstd·w) cancel with an error relative to |x|·rstd.
        atol *= 1 + x.abs().max().item() * 1e-5**-0.5
    inject(x, case["x_spots"])
    weight = torch.rand(c, generator=g) + 0.5 if case["affine"] else None
    bias = torch.randn(c, generator=g) if case["affine"] else None
    scale = (torch.randn(n, c, generator=g) * 0.5).to(dtype) if case["scale_shift"] else None
    shift = torch.randn(n, c, generator=g).to(dtype) if case["scale_shift"] else None
    double = lambda t: None if t is None else t.double()  # noqa: E731
    params64 = NormParameters(double(weight), double(bias), double(scale), double(shift))
    expected, _, _ = reference.group_norm_forward(x.double(), params64, case["groups"], 1e-5, case["activation"])
    finite_input = bool(torch.isfinite(x).all()) and x.numel() > 0
    x.requires_grad_(finite_input)
    with running_on(backend, request):
        y = ops.group_norm(x, case["groups"], weight, bias, scale=scale, shift=shift, activation=case["activation"])
        assert_policy(y, expected, {dtype: (atol, rtol)}, dtype)
        if finite_input:  # the backward on finite inputs
            grad_y = torch.randn(y.shape, generator=g).to(dtype)
            (dx,) = torch.autograd.grad(y, x, grad_y)
    if finite_input:
        x64 = x.detach().double().requires_grad_()
        (dx64,) = torch.autograd.grad(
            reference.group_norm_forward(x64, params64, case["groups"], 1e-5, case["activation"])[0],
            x64,
            grad_y.double(),
        )
        torch.testing.assert_close(dx.double(), dx64, atol=10 * atol * (1 + dx64.abs().max().item()), rtol=10 * rtol)


# --------------------------------------------------------------------------------------
# layer_norm and gated_residual_layer_norm
# --------------------------------------------------------------------------------------


@st.composite
def layer_norm_cases(draw):
    return dict(
        batch=draw(st.integers(0, 3)),
        tokens=draw(st.sampled_from([None, 0, 1, 2, 5])),
        d=draw(st.integers(1, 40)),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        layout=draw(st.sampled_from(["contiguous", "strided"])),
        affine=draw(st.booleans()),
        scale=draw(st.sampled_from([None, "sample", "token"])),
        shift=draw(st.sampled_from([None, "sample", "token"])),
        residual=draw(st.sampled_from([None, "sample", "token"])),
        x_spots=draw(spots),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("backend", backends_with_emulation("layer_norm"))
@SETTINGS
@given(case=layer_norm_cases())
def test_layer_norm_follows_the_reference_and_the_nan_policy(backend, case, request):
    g = torch.Generator().manual_seed(case["seed"])
    n, d, dtype = case["batch"], case["d"], case["dtype"]
    shape = (n, d) if case["tokens"] is None else (n, case["tokens"], d)
    x = in_layout((torch.randn(shape, generator=g) * 2 + 0.5).to(dtype), case["layout"])
    inject(x, case["x_spots"])
    weight = torch.rand(d, generator=g) + 0.5 if case["affine"] else None
    bias = torch.randn(d, generator=g) if case["affine"] else None

    def per(kind, factor=1.0):  # a per-sample (N, D) or a per-token x-shaped tensor
        return (
            None
            if kind is None
            else (torch.randn(shape if kind == "token" else (n, d), generator=g) * factor).to(dtype)
        )

    scale, shift, gate = per(case["scale"], 0.5), per(case["shift"]), per(case["residual"])
    branch = None if gate is None else torch.randn(shape, generator=g).to(dtype)
    double = lambda t: None if t is None else t.double()  # noqa: E731
    tokens = lambda t: None if t is None else (t.unsqueeze(1) if t.dim() < len(shape) else t)  # noqa: E731
    x64 = x.double()
    if gate is not None:
        x64 = reference.gated_residual(x64, branch.double(), double(tokens(gate)))
    params64 = NormParameters(double(weight), double(bias), double(tokens(scale)), double(tokens(shift)))
    expected, _, _ = reference.layer_norm_forward(x64, params64, 1e-6)
    inputs_before = x.clone()
    with running_on(backend, request):
        if gate is None:
            y = ops.layer_norm(x, d, weight, bias, scale=scale, shift=shift)
        else:
            h_new, y = ops.gated_residual_layer_norm(x, branch, gate, d, weight, bias, scale=scale, shift=shift)
            assert_policy(h_new, x64, LAYER_NORM, dtype)
    assert_policy(y, expected, LAYER_NORM, dtype)
    assert torch.equal(x.nan_to_num(), inputs_before.nan_to_num())


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    return dict(
        batch=draw(st.integers(0, 2)),
        heads=draw(st.integers(1, 2)),
        lq=draw(st.integers(1, 9)),
        lk=draw(st.integers(1, 9)),
        head_dim=draw(st.sampled_from([8, 16, 32])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        packed=draw(st.booleans()),
        nan_in=draw(st.sampled_from([None, "q", "k", "v"])),
        spot=draw(st.integers(0, 10**6)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("backend", backends_with_emulation("attention"))
@SETTINGS
@given(case=attention_cases())
def test_attention_follows_the_reference_and_the_nan_policy(backend, case, request):
    g = torch.Generator().manual_seed(case["seed"])
    b, h, d, dtype = case["batch"], case["heads"], case["head_dim"], case["dtype"]
    if case["packed"] and case["lq"] == case["lk"]:  # q, k, v as strided views of one projection
        qkv = torch.randn((b, case["lq"], 3, h, d), generator=g).to(dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q = torch.randn((b, h, case["lq"], d), generator=g).to(dtype)
        k, v = (torch.randn((b, h, case["lk"], d), generator=g).to(dtype) for _ in range(2))
    if case["nan_in"] is not None and b > 0:
        target = {"q": q, "k": k, "v": v}[case["nan_in"]]
        coords = torch.unravel_index(torch.tensor(case["spot"] % target.numel()), target.shape)
        target[tuple(int(c) for c in coords)] = math.nan
    expected = reference.attention(q.double(), k.double(), v.double())
    with running_on(backend, request):
        out = ops.attention(q, k, v)
    assert_policy(out, expected, ATTENTION, dtype)

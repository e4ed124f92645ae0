"""What the tests share, in one module (no test module imports another): which backends
run here, the tolerance table of each op, random and poisoned tensors, and the inputs of
the kernel tests that more than one backend's suite uses."""

import contextlib
import importlib
import importlib.metadata
import math

import pytest
import torch
import torch.nn.functional as F

import fastguide
from fastguide import ops
from fastguide.ops import backends, reference
from fastguide.ops.contract import GuidanceCombine, StepCoefficients, StepTensors

# --------------------------------------------------------------------------------------
# Backends under test
# --------------------------------------------------------------------------------------


def release(distribution: str) -> tuple[int, ...]:
    """(major, minor) of an installed distribution; (0,) when it is not installed."""
    try:
        return tuple(int(part) for part in importlib.metadata.version(distribution).split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return (0,)


def diffusers_feature(module: str, since: tuple[int, int]):
    """diffusers' module ``module``, a peer feature that diffusers ``since`` introduced: the
    caller (a test, or a test module) skips under an older diffusers or none, and from
    ``since`` on an import error fails it, as a broken peer import must."""
    if release("diffusers") < since:
        version = ".".join(map(str, since))
        pytest.skip(f"{module} needs diffusers {version} or newer", allow_module_level=True)
    return importlib.import_module(module)


def backends_for(op: str) -> list[str]:
    """Backends that can run ``op`` on this machine's test device (torch always), in float32
    at least."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = ["torch"]
    for name in ("triton", "cuda"):
        if not backends.IMPLEMENTATIONS[name].not_supported_reasons(op, device, torch.float32):
            found.append(name)
    return found


def backends_with_emulation(op: str) -> list[str]:
    """``backends_for(op)``, plus "cuda-emulation" (the cuda backend on its CPU emulation,
    see ``running_on``) where the op has CUDA kernels that no GPU runs here."""
    names = backends_for(op)
    emulated = backends.IMPLEMENTATIONS["cuda"].has_kernel(op) and "cuda" not in names
    return names + (["cuda-emulation"] if emulated else [])


@contextlib.contextmanager
def running_on(backend: str, request):
    """Run the ops on ``backend``; "cuda-emulation" through the on_cuda_emulation fixture
    of tests/ops/conftest.py (``request`` is the test's pytest request)."""
    if backend == "cuda-emulation":
        with request.getfixturevalue("on_cuda_emulation")():
            yield
    else:
        with fastguide.backend(backend):
            yield


def backend_dtype_params(op: str, dtypes: list[torch.dtype]) -> list[tuple[str, torch.dtype]]:
    """(backend, dtype) pairs to test; float64 only on the torch backend (the kernels' dtypes
    are fp32/fp16/bf16), and bf16 attention on Triton only on a GPU (the interpreter's bf16
    tl.dot is wrong: test_attention.py checks that it declines)."""
    interpreter = not torch.cuda.is_available()
    return [
        (b, d)
        for b in backends_for(op)
        for d in dtypes
        if (b == "torch" or d != torch.float64)
        and not (b == "triton" and op == "attention" and d == torch.bfloat16 and interpreter)
    ]


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
LAYER_NORM = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, table: dict, dtype: torch.dtype) -> None:
    atol, rtol = table[dtype]
    assert not actual.isnan().any(), "output holds NaN: some elements were never written"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def assert_within_twice_torch(
    actual: torch.Tensor, expected: torch.Tensor, plain: torch.Tensor, magnitude: float | None = None
) -> None:
    """The FlashAttention rule: ``actual``'s largest error against the float64 ``expected``
    at most twice that of ``plain``, what plain PyTorch computes in actual's dtype, plus 4
    float32 ulps of ``magnitude`` (max|expected| unless given): where both are within a few
    ulps of float32's rounding (an exact result, a single key's softmax), the rule would
    compare one rounding's noise with another's. In float16 and bfloat16 the slack is nil
    beside PyTorch's error."""
    ours = (actual.double() - expected).abs().max().item()
    theirs = (plain.double() - expected).abs().max().item()
    magnitude = expected.abs().max().item() if magnitude is None else magnitude
    slack = 4 * torch.finfo(torch.float32).eps * magnitude
    assert ours <= 2 * theirs + slack, f"error {ours:.3g} exceeds twice PyTorch's {theirs:.3g} (+{slack:.2g})"


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


# A tiny ADM UNet's and classifier's shared flags (8×8 images, two levels).
TINY_ADM = dict(
    image_size=8,
    in_channels=3,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_head_channels=16,
)


def tiny_unet(seed: int = 4, **flags):
    """A tiny ADM UNet (learned sigma) with every parameter random; ``flags`` add to
    TINY_ADM (num_classes, null_class: without them, an unconditional model)."""
    unet = fastguide.UNet(**TINY_ADM, out_channels=6, use_scale_shift_norm=True, resblock_updown=True, **flags)
    return randomize(unet, seed=seed).eval()


def tiny_cfg_unet():
    """A tiny CFG-ready ADM UNet (learned sigma, null class) with every parameter random."""
    return tiny_unet(num_classes=4, null_class=True)


def tiny_classifier(classes: int = 4, seed: int = 6):
    """A tiny ADM noisy classifier (attention pooling) of ``classes`` logits."""
    return randomize(fastguide.EncoderUNet(**TINY_ADM, out_channels=classes, pool="attention"), seed=seed).eval()


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
    """F.group_norm in float64 (without its affine), then y·weight + bias, y·(1 + scale) +
    shift and silu(y) = y·sigmoid(y); each parameter may be None."""
    y = F.group_norm(x.double(), groups, eps=eps)
    channels = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(channels)
    if bias is not None:
        y = y + bias.double().reshape(channels)
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


def explicit_layer_norm(x, weight, bias, scale, shift, eps=1e-6):
    """F.layer_norm over the last dim in float64, then y·(1 + scale) + shift with an (N, D)
    scale or shift broadcast over the tokens of an (N, L, D) x."""
    y = F.layer_norm(
        x.double(),
        x.shape[-1:],
        None if weight is None else weight.double(),
        None if bias is None else bias.double(),
        eps,
    )

    def tokens(t):
        return t.double().unsqueeze(1) if t.dim() == 2 and x.dim() == 3 else t.double()

    if scale is not None:
        y = y * (1 + tokens(scale))
    if shift is not None:
        y = y + tokens(shift)
    return y


def random_token_inputs(shape, dtype, device, per_token=(False, False), seed=0):
    """(x, weight, bias, scale, shift) for an (N, L, D) or (N, D) x: x with mean far from 0,
    weight far from 1, bias far from 0; scale and shift (N, D), or x-shaped when per token."""
    g = torch.Generator().manual_seed(seed)
    n, d = shape[0], shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    weight = (torch.rand(d, generator=g) * 2 + 0.5).to(device)
    bias = torch.randn(d, generator=g).to(device)
    scale, shift = (
        (torch.randn(shape if token else (n, d), generator=g) * factor).to(device=device, dtype=dtype)
        for token, factor in zip(per_token, (0.5, 1.0))
    )
    return x, weight, bias, scale, shift


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def poisoned(shape, dtype=torch.float64):
    return torch.full(shape, float("nan"), dtype=dtype)


G = GuidanceCombine
CASES = {
    "unguided-ddim": dict(step=dict(k_x0=0.8, k_eps=0.5)),
    "cfg-ddim": dict(combine=G(4.0), step=dict(k_x0=0.8, k_eps=0.5)),
    "cfg-clip-noise": dict(combine=G(4.0), step=dict(clip_denoised=True, k_x0=0.8, k_eps=0.4, k_noise=0.3)),
    "cfg-v-prediction": dict(combine=G(3.0), step=dict(prediction_type="v_prediction", k_x=0.3, k_x0=0.6, k_eps=0.2)),
    "sample-prediction-clip": dict(step=dict(prediction_type="sample", clip_denoised=True, k_x0=0.7, k_eps=0.6)),
    "dpm2m-history-x0out": dict(combine=G(2.0), step=dict(k_x=0.9, k_x0=0.4, k_history=(-0.1,)), x0_out=True),
    "history-of-3": dict(combine=G(2.0), step=dict(k_x=0.9, k_x0=0.4, k_history=(-0.3, 0.2, -0.05)), x0_out=True),
    "history-of-4-unguided": dict(step=dict(k_x=0.5, k_x0=0.4, k_history=(0.3, -0.2, 0.1, -0.05))),
    "cfg-noise-history-of-2": dict(combine=G(3.0), step=dict(k_x=0.8, k_x0=0.3, k_noise=0.4, k_history=(0.2, -0.1))),
    # A learned variance range with no noise or gradient to scale (DDIM on ADM): it changes nothing.
    "ddim-learned-range-unused": dict(
        combine=G(3.0), step=dict(k_x0=0.8, k_eps=0.5, log_variance_range=(-6.0, -4.5)), learned_variance=True
    ),
    "separate-guide": dict(combine=G(3.0), step=dict(k_x0=0.8, k_eps=0.5), guide=True),
    "separate-guide-rescale-history": dict(
        combine=G(5.0, rescale=0.6),
        step=dict(k_x=0.7, k_x0=0.4, k_history=(0.2, -0.1)),
        guide=True,
        out_2b=True,
    ),
    "classifier-eps-shift": dict(step=dict(clip_denoised=True, grad_eps_scale=0.7, k_x0=0.8, k_eps=0.5)),
    "cfg-and-classifier": dict(combine=G(3.0), step=dict(grad_eps_scale=0.5, k_x0=0.8, k_eps=0.5)),
    # Classifier guidance's other instances: noise without a learned variance, and a
    # learned variance (scaling the gradient term) without noise.
    "ddpm-classifier-noise": dict(step=dict(k_x=0.6, k_x0=0.3, k_noise=0.8, k_grad=1.5)),
    "learned-var-grad-term-no-noise": dict(
        combine=G(2.5),
        step=dict(k_x=0.6, k_x0=0.3, k_grad=2.0, log_variance_range=(-6.0, -4.5)),
        learned_variance=True,
    ),
    "ddpm-learned-var-grad": dict(
        combine=G(3.0),
        step=dict(clip_denoised=True, k_x=0.6, k_x0=0.3, k_noise=1.0, k_grad=2.0, log_variance_range=(-6.0, -4.5)),
        learned_variance=True,
    ),
    "rescale": dict(combine=G(7.0, rescale=0.7), step=dict(k_x0=0.8, k_eps=0.5)),
    "cfg-zero-star": dict(combine=G(5.0, variant="zero_star"), step=dict(k_x0=0.8, k_eps=0.5)),
    "zero-star-separate-learned-guide": dict(
        combine=G(4.0, variant="zero_star"),
        step=dict(k_x0=0.8, k_eps=0.5),
        guide=True,
        learned_variance=True,
    ),
    "apg-momentum-clip": dict(
        combine=G(6.0, apg_eta=0.2, apg_norm_threshold=3.0, apg_momentum=-0.5, variant="apg"),
        step=dict(k_x0=0.8, k_eps=0.5),
    ),
    # The momentum step's own instances: with noise and no history, with two and no noise,
    # with noise and one history tensor (two slots, one in use).
    "apg-momentum-noise": dict(
        combine=G(5.0, apg_momentum=0.3, variant="apg"), step=dict(k_x0=0.8, k_eps=0.4, k_noise=0.3)
    ),
    "apg-momentum-noise-history-of-1": dict(
        combine=G(4.0, apg_momentum=0.5, variant="apg"), step=dict(k_x=0.8, k_x0=0.3, k_noise=0.4, k_history=(0.15,))
    ),
    "apg-momentum-history-of-2": dict(
        combine=G(5.0, apg_eta=0.5, apg_momentum=-0.4, variant="apg"),
        step=dict(k_x=0.8, k_x0=0.3, k_history=(0.2, -0.1)),
    ),
    "apg-rescale-2b-out": dict(combine=G(6.0, rescale=0.5, variant="apg"), step=dict(k_x0=0.8, k_eps=0.5), out_2b=True),
    "tangential": dict(combine=G(5.0, variant="tangential"), step=dict(k_x0=0.8, k_eps=0.5)),
    "cfgpp-renoise-v": dict(combine=G(0.6), step=dict(prediction_type="v_prediction", k_x0=0.8, k_guide_eps=0.5)),
    "cfgpp-renoise-sample-guide-zero-star": dict(
        combine=G(0.6, variant="zero_star"),
        step=dict(prediction_type="sample", k_x0=0.8, k_guide_eps=0.5),
        guide=True,
    ),
    "cfgpp-renoise-eps-learned": dict(
        combine=G(0.8),
        step=dict(k_x0=0.7, k_guide_eps=0.6, k_noise=0.2, log_variance_range=(-5.0, -3.0)),
        learned_variance=True,
    ),
    "tangential-rescale-guide": dict(
        combine=G(4.0, rescale=0.5, variant="tangential"), step=dict(k_x0=0.8, k_eps=0.5), guide=True
    ),
    # A flow path (alpha + sigma = 1): a multistep update, its pure-noise start (alpha = 0), CFG++.
    "flow-cfg-history": dict(
        combine=G(3.0),
        path=(0.6, 0.4),
        step=dict(prediction_type="flow_prediction", k_x=1.0, k_x0=-0.3, k_eps=0.3, k_history=(0.1,)),
        x0_out=True,
    ),
    "flow-pure-noise-clip": dict(
        combine=G(2.0),
        path=(0.0, 1.0),
        step=dict(prediction_type="flow_prediction", clip_denoised=True, k_x0=0.9, k_eps=0.1),
    ),
    "flow-cfgpp-guide": dict(
        combine=G(0.7),
        path=(0.3, 0.7),
        guide=True,
        step=dict(prediction_type="flow_prediction", k_x0=0.5, k_guide_eps=0.5),
    ),
}
STEP_SHAPES = [(1, 3, (1, 1)), (2, 3, (7, 13)), (5, 4, (16, 16)), (2, 3, (32, 32)), (1, 4, (72, 72))]


def case_inputs(
    case: dict, batch: int, channels: int, spatial: tuple, dtype: torch.dtype, device
) -> tuple[dict, StepCoefficients, GuidanceCombine | None]:
    """Random inputs for one case: (tensors, step, combine), the tensors as ops.guided_step's
    keywords (model_output, x, and each optional one the case uses), out buffers poisoned."""
    combine = case.get("combine")
    alpha, sigma = case.get("path", (0.75, math.sqrt(1 - 0.75**2)))
    step = StepCoefficients(alpha=alpha, sigma=sigma, **case["step"])
    shape = (batch, channels, *spatial)
    model_channels = channels * (2 if case.get("learned_variance") else 1)
    rows = 2 * batch if combine is not None and not case.get("guide") else batch
    tensors = {
        "model_output": randn(rows, model_channels, *spatial, seed=1, dtype=dtype).to(device),
        "x": (randn(*shape, seed=0, dtype=dtype) * 1.3).to(device),
        "history": tuple(randn(*shape, seed=30 + i, dtype=dtype).to(device) for i in range(len(step.k_history))),
    }
    if case.get("guide"):
        tensors["guide"] = (0.5 * randn(batch, model_channels, *spatial, seed=5, dtype=dtype)).to(device)
    for i, name in enumerate(["noise", "grad"]):
        tensors[name] = randn(*shape, seed=10 + i, dtype=dtype).to(device)
    if combine is not None and combine.apg_momentum:
        tensors["apg_buffer"] = randn(*shape, seed=20, dtype=torch.float32).to(device)
    if case.get("x0_out"):
        tensors["x0_out"] = poisoned(shape, dtype).to(device)
    tensors["out"] = poisoned(((2 * batch) if case.get("out_2b") else batch, channels, *spatial), dtype).to(device)
    return tensors, step, combine


def as_float64(tensors: dict) -> dict:
    """Float64 CPU copies of a case's tensors (the reference's inputs and outputs)."""

    def copy(value):
        if isinstance(value, tuple):
            return tuple(copy(v) for v in value)
        return value.detach().cpu().double() if isinstance(value, torch.Tensor) else value

    return {name: copy(value) for name, value in tensors.items()}


def run_reference(tensors: dict, step: StepCoefficients, combine: GuidanceCombine | None) -> dict:
    """The reference's results for a case, in float64: the float64 copies of its tensors
    (``out``, ``x0_out`` and ``apg_buffer`` hold the results)."""
    expected = as_float64(tensors)
    reference.guided_step(StepTensors(**expected), step, combine)
    return expected


# --------------------------------------------------------------------------------------
# The three ops in one function (compile tests)
# --------------------------------------------------------------------------------------


def three_ops(q, k, v, x, weight, bias, scale, shift, model_output, x_t, noise):
    attended = ops.attention(q, k, v)
    normed = ops.group_norm(x, 4, weight, bias, scale=scale, shift=shift, activation="silu")
    step = ops.StepCoefficients(alpha=0.8, sigma=0.6, clip_denoised=True, k_x0=0.5, k_eps=0.3, k_noise=0.1)
    stepped = ops.guided_step(model_output, x_t, step, ops.GuidanceCombine(3.0, rescale=0.5), noise=noise)
    return attended, normed, stepped


def example_inputs(device):
    g = torch.Generator().manual_seed(0)
    shapes = [
        (2, 3, 7, 40),
        (2, 3, 9, 40),
        (2, 3, 9, 40),
        (2, 8, 5, 7),
        (8,),
        (8,),
        (2, 8),
        (2, 8),
        (4, 3, 6, 6),
        (2, 3, 6, 6),
        (2, 3, 6, 6),
    ]
    return [torch.randn(s, generator=g).to(device) for s in shapes]


def fails_with(capsys, folder, argv, message, *more):
    """cli.main(argv) exits 2 with the one line ``fastguide: error: ...message...`` (which
    also holds each of ``more``) and leaves ``folder`` as it was."""
    before = sorted(folder.rglob("*"))
    from fastguide.apps import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastguide: error: ") and err.count("\n") == 1, err
    assert all(part in err for part in (message, *more)), err
    assert "Traceback" not in err
    assert sorted(folder.rglob("*")) == before


def x0_prediction(prediction: torch.Tensor, x: torch.Tensor, step: StepCoefficients) -> torch.Tensor:
    """The x0 that ``prediction`` implies for x = alpha·x0 + sigma·eps, written out by the
    step's prediction type: eps x0 = (x − σ·ε)/α; v = α·ε − σ·x0 gives x0 = α·x − σ·v
    (α² + σ² = 1); a flow velocity v = ε − x0 gives x0 = x − σ·v (α + σ = 1); sample x0."""
    alpha, sigma = step.alpha, step.sigma
    return {
        "epsilon": lambda: (x - sigma * prediction) / alpha,
        "v_prediction": lambda: alpha * x - sigma * prediction,
        "flow_prediction": lambda: x - sigma * prediction,
        "sample": lambda: prediction,
    }[step.prediction_type]()

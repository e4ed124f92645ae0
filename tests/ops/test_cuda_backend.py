"""The cuda backend (csrc/) without a GPU: its kernels run on the CPU emulation.

tests/ops/cuda_emulation/ (built by tests/ops/conftest.py) compiles csrc/'s kernel sources as
they are for the CPU, with stand-ins for the CUDA headers: a launch runs every block of the grid in turn, each
block's threads as fibers that switch at __syncthreads and warp shuffles. csrc/bindings.cpp
built with -DFASTGUIDE_HOST_HARNESS registers those launchers for CPU tensors, so with
fastguide.ops routed to the cuda backend every option and variant runs the real path —
validation, custom op, fastguide.ops.cuda_backend's glue, the bindings, the launchers' choice
of grid and vector width, the kernels' indexing, block reductions and per-element
``__host__ __device__`` math — and is compared with the float64 reference, in float32,
float16 and bfloat16 storage. What the emulation cannot show (timing, races between
blocks, the GPU's memory model) is left to the GPU-marked tests of test_guided_step.py
and test_group_norm.py, which run the compiled kernels.
"""

import re
from types import SimpleNamespace

import pytest
import torch

import fastguide
from fastguide import ops
from fastguide.ops import contract, cuda_backend, extension
from fastguide.ops.contract import COMBINE_ARGUMENTS, STEP_ARGUMENTS, GuidanceCombine, StepCoefficients
from tests.helpers import (
    CASES,
    GROUP_NORM,
    GUIDED_STEP,
    LAYER_NORM,
    STEP_SHAPES,
    assert_close,
    case_inputs,
    example_inputs,
    explicit_group_norm,
    explicit_layer_norm,
    poisoned,
    randn,
    random_inputs,
    random_token_inputs,
    run_reference,
    three_ops,
    tiny_cfg_unet,
    x0_prediction,
)
from tests.helpers import SHAPES as NORM_SHAPES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------------------
# guided_step
# --------------------------------------------------------------------------------------


def run_against_reference(tensors, step, combine, names=("out", "x0_out", "apg_buffer")):
    expected = run_reference(tensors, step, combine)
    ops.guided_step(**tensors, step=step, combine=combine)
    for name in names:
        if name in tensors:
            assert_close(tensors[name], expected[name], GUIDED_STEP, tensors[name].dtype)


def test_contract_structs_match_the_python_types():
    # bindings.cpp copies each type's float[] into its struct: the field orders must agree.
    header = (extension.source_dir() / "guided_step.cuh").read_text()
    for struct, names in (("StepScalars", contract.STEP_SCALARS), ("CombineScalars", contract.COMBINE_SCALARS)):
        body = re.search(r"struct " + struct + r" \{\s*float ([^;]*);\s*\};", header).group(1)
        assert tuple(name.strip() for name in body.split(",")) == names


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_guided_step_matches_reference(cuda_backend_on_cpu, dtype, shape, case):
    run_against_reference(*case_inputs(CASES[case], *shape, dtype, "cpu"))


@pytest.mark.parametrize(
    "case",
    ["cfg-clip-noise", "rescale", "apg-momentum-clip", "ddpm-learned-var-grad", "history-of-3", "separate-guide"],
)
def test_guided_step_channels_last(cuda_backend_on_cpu, case):
    tensors, step, combine = case_inputs(CASES[case], 2, 5, (9, 11), torch.float32, "cpu")
    to_cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    tensors = {name: tuple(map(to_cl, t)) if name == "history" else to_cl(t) for name, t in tensors.items()}
    run_against_reference(tensors, step, combine)
    assert tensors["out"].is_contiguous(memory_format=torch.channels_last)


def test_guided_step_strided_outputs_and_mixed_dtypes(cuda_backend_on_cpu):
    # out and x0_out as views into one buffer, the history in float64: converted, written through.
    tensors, step, combine = case_inputs(CASES["history-of-3"], 2, 3, (8, 8), torch.float32, "cpu")
    storage = poisoned((2, 3, 8, 16), torch.float32)
    tensors["out"], tensors["x0_out"] = storage[..., ::2], storage[..., 1::2]
    tensors["history"] = tuple(h.double() for h in tensors["history"])
    run_against_reference(tensors, step, combine)


@pytest.mark.parametrize("x_dtype, other_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_guided_step_computes_mixed_dtypes_in_the_widest(cuda_backend_on_cpu, x_dtype, other_dtype):
    # A float32 model output beside bfloat16 x (or bf16 beside fp16) is not rounded to x's
    # dtype first, as the other backends read it: with u ≈ c at w = 7.5 that rounding cost
    # 0.05, and a float32 output past float16's range turned into inf − inf = NaN.
    tensors, step, combine = case_inputs(CASES["cfg-clip-noise"], 2, 3, (8, 8), x_dtype, "cpu")
    conditional = tensors["model_output"][:2].to(other_dtype)
    offset = 1e-3 * randn(*conditional.shape, seed=8, dtype=torch.float32).to(other_dtype)
    tensors["model_output"] = torch.cat([conditional, conditional - offset])
    tensors["out"] = poisoned(tuple(tensors["out"].shape), other_dtype)
    run_against_reference(tensors, step, GuidanceCombine(7.5))
    if other_dtype == torch.float32:
        tensors["model_output"] = torch.cat([torch.full_like(conditional, 1e5), torch.full_like(conditional, 1e5 - 1)])
        ops.guided_step(**tensors, step=step, combine=combine)
        assert torch.isfinite(tensors["out"]).all()


def test_guided_step_in_place_on_x(cuda_backend_on_cpu):
    tensors, step, combine = case_inputs(CASES["cfg-clip-noise"], 2, 3, (8, 8), torch.float32, "cpu")
    expected = run_reference(tensors, step, combine)
    tensors["out"] = tensors["x"]
    ops.guided_step(**tensors, step=step, combine=combine)
    assert_close(tensors["x"], expected["out"], GUIDED_STEP, torch.float32)


@pytest.mark.parametrize("case", ["rescale", "cfg-zero-star", "apg-momentum-clip", "apg-rescale-2b-out"])
def test_reduction_variants_when_cond_is_close_to_uncond(cuda_backend_on_cpu, case):
    # 3·4·48² elements per sample: several partial sums per sample, merged in float64.
    tensors, step, combine = case_inputs(CASES[case], 3, 4, (48, 48), torch.float32, "cpu")
    model_output = tensors["model_output"]
    model_output[3:] = model_output[:3] + 0.01 * randn(3, 4, 48, 48, seed=7, dtype=torch.float32)
    run_against_reference(tensors, step, combine, names=("out",))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["rescale", "apg-momentum-clip", "tangential-rescale-guide"])
def test_reduction_variants_on_parts_of_several_strides(cuda_backend_on_cpu, dtype, case):
    # 4·176² = 123904 elements a sample: 32 parts of 3872, so a stats thread's loop reads two
    # vectors an iteration, then one more for some threads (every dtype's vector).
    tensors, step, combine = case_inputs(CASES[case], 2, 4, (176, 176), dtype, "cpu")
    run_against_reference(tensors, step, combine, names=("out",))


def stats_tail_mask(part: int, dtype: torch.dtype) -> torch.Tensor:
    """The positions of a stats part that its single last vectors read, not the loop of two
    vectors an iteration (csrc/guided_step.cu's guided_stats: 256 threads of 16-byte vectors)."""
    vec = 16 // dtype.itemsize
    stride = 256 * vec
    tail = torch.zeros(part, dtype=torch.bool)
    for thread in range(256):
        j = thread * vec
        while j + stride < part:
            j += 2 * stride
        if j < part:
            tail[j : j + vec] = True
    return tail


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("perturbed", [False, True], ids=["cfg", "pag"])
def test_stats_tail_vectors_are_summed(cuda_backend_on_cpu, dtype, perturbed):
    # The rescale's std(c)/std(m) over parts of 3872 (see above) where the single last
    # vectors hold a large c and m = 0 (u = c·w/(w − 1), p = c): std(c) comes from them,
    # std(m) from the rest, so a pass that left them out is far off in every dtype (the
    # plain and the perturbed stats kernels).
    tensors, step, combine = case_inputs(CASES["rescale"], 2, 4, (176, 176), dtype, "cpu")
    w = combine.scale
    tail = stats_tail_mask(3872, dtype).repeat(32).reshape(4, 176, 176)
    c = randn(2, 4, 176, 176, seed=1) * torch.where(tail, 30.0, 1.0)
    u = torch.where(tail, c * w / (w - 1), randn(2, 4, 176, 176, seed=2))
    blocks = [c, u, torch.where(tail, c, randn(2, 4, 176, 176, seed=3))] if perturbed else [c, u]
    tensors["model_output"] = torch.cat(blocks).to(dtype)
    combine = combine._replace(perturbed_scale=2.5) if perturbed else combine
    run_against_reference(tensors, step, combine, names=("out",))


def offset_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a tensor whose data starts one element past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", ["cfg-clip-noise", "rescale", "dpm2m-history-x0out", "history-of-4-unguided", "separate-guide"]
)
def test_guided_step_on_misaligned_tensors(cuda_backend_on_cpu, dtype, case):
    # 16-byte vectors are only used when every pointer allows them: the emulation reports a
    # misaligned vector access as the GPU fault it would be.
    tensors, step, combine = case_inputs(CASES[case], 2, 4, (16, 16), dtype, "cpu")
    tensors = {name: tuple(map(offset_copy, t)) if name == "history" else offset_copy(t) for name, t in tensors.items()}
    run_against_reference(tensors, step, combine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_step_with_only_the_apg_buffer_misaligned(cuda_backend_on_cpu, dtype):
    # The momentum buffer is read and written in 16-byte vectors too: one misaligned buffer
    # sends the step to the element path (else the emulation raises the GPU's fault).
    tensors, step, combine = case_inputs(CASES["apg-momentum-clip"], 2, 4, (16, 16), dtype, "cpu")
    tensors["apg_buffer"] = offset_copy(tensors["apg_buffer"])
    run_against_reference(tensors, step, combine)


def x0_cosine_of_inputs(tensors: dict, step: StepCoefficients) -> torch.Tensor:
    """cos(x̂0_c, x̂0_u) per sample in float64 from the inputs: the x0 predictions of c and u
    (the first C channels of each) by the step's map with x, then their cosine."""
    batch, channels = tensors["x"].shape[:2]
    x = tensors["x"].double()
    model_output = tensors["model_output"].double()
    uncond = tensors["guide"].double() if "guide" in tensors else model_output[batch : 2 * batch]
    x0_c = x0_prediction(model_output[:batch, :channels], x, step)
    x0_u = x0_prediction(uncond[:, :channels], x, step)
    return torch.nn.functional.cosine_similarity(x0_c.flatten(1), x0_u.flatten(1), dim=1)


def run_with_similarity(tensors, step, combine):
    """The step into a NaN-poisoned similarity, checked against the float64 cosine of the
    x0 predictions (c, u and x read exactly, float32 x0 and sums: the float32 tolerance for
    every dtype) and its other outputs against the reference."""
    similarity = poisoned((tensors["x"].shape[0],), torch.float32)
    expected = run_reference(tensors, step, combine)
    ops.guided_step(**tensors, step=step, combine=combine, similarity=similarity)
    assert_close(similarity, x0_cosine_of_inputs(tensors, step), GUIDED_STEP, torch.float32)
    for name in ("out", "x0_out", "apg_buffer"):
        if name in tensors:
            assert_close(tensors[name], expected[name], GUIDED_STEP, tensors[name].dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case",
    [
        "cfg-clip-noise",
        "rescale",
        "separate-guide",
        "ddpm-learned-var-grad",
        "cfg-v-prediction",
        "flow-cfgpp-guide",
        "cfgpp-renoise-sample-guide-zero-star",
    ],
)
def test_similarity_on_misaligned_tensors(cuda_backend_on_cpu, dtype, case):
    # The element-by-element instance (similarity_guided_step_kernel<T, 1>), 16 blocks per sample.
    tensors, step, combine = case_inputs(CASES[case], 2, 4, (32, 32), dtype, "cpu")
    tensors = {name: tuple(map(offset_copy, t)) if name == "history" else offset_copy(t) for name, t in tensors.items()}
    run_with_similarity(tensors, step, combine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, (48, 48)), (3, 3, (37, 41))], ids=str)
@pytest.mark.parametrize("case", ["apg-momentum-clip", "flow-cfg-history"])
def test_similarity_over_many_blocks(cuda_backend_on_cpu, dtype, shape, case):
    # Vectors over 5 (fp16, bf16) or 9 (fp32) blocks a sample; odd sizes element by element
    # over 18 blocks, the last one partly past the sample's end.
    run_with_similarity(*case_inputs(CASES[case], *shape, dtype, "cpu"))


def test_bindings_return_one_row_of_sums_per_block_and_refuse_a_perturbed_prediction(host_harness):
    # fp32 vectors, plain CFG (a CommonReads instance): 256 threads × 2 vectors × 4 elements
    # a block, 9216 elements a sample -> 5 blocks, the last half full.
    batch, shape = 2, (4, 48, 48)
    model_output, x = (
        randn(2 * batch, *shape, seed=1, dtype=torch.float32),
        randn(batch, *shape, seed=0, dtype=torch.float32),
    )
    step = StepCoefficients(alpha=0.8, sigma=0.6, k_x0=1.0)

    def call(model_output, combine):
        return host_harness.guided_step(
            model_output,
            None,
            x,
            [],
            None,
            None,
            None,
            torch.empty_like(x),
            None,
            *STEP_ARGUMENTS.pack(step),
            *COMBINE_ARGUMENTS.pack(combine)[:1],
            0,
            True,
        )

    partials = call(model_output, GuidanceCombine(3.0))
    assert partials.shape == (batch, 5, 3) and partials.dtype == torch.float32
    # The sums of the x0 predictions' products (epsilon: x0 = (x − σ·c)/α), not of c and u.
    x0_c, x0_u = (
        x0_prediction(half.double(), x.double(), step).flatten(1)
        for half in (model_output[:batch], model_output[batch:])
    )
    sums = torch.stack([(x0_c * x0_u).sum(1), (x0_c * x0_c).sum(1), (x0_u * x0_u).sum(1)], dim=1)
    torch.testing.assert_close(partials.double().sum(1), sums, rtol=1e-5, atol=1e-3)
    with pytest.raises(RuntimeError, match="similarity needs a guided step without a perturbed prediction"):
        call(torch.cat([model_output, model_output[:batch]]), GuidanceCombine(3.0, perturbed_scale=2.0))


def test_bindings_refuse_what_their_kernels_cannot_index(host_harness):
    # fastguide.ops checks all of this before a call; the ops registered by the extension
    # are callable directly too. An empty batch or channel divided by zero (SIGFPE), an
    # empty spatial size read x[-1], and a tensor in another layout or shape was indexed
    # with x's offsets (a permuted result, or reads past a too-small parameter).
    x = randn(2, 4, 6, 6, seed=0, dtype=torch.float32)
    step = StepCoefficients(alpha=0.8, sigma=0.6, k_x0=1.0)

    def step_call(model_output, x=x, out=None, noise=None, combine=GuidanceCombine(3.0), stats=0):
        return host_harness.guided_step(
            model_output,
            None,
            x,
            [],
            noise,
            None,
            None,
            torch.empty_like(x) if out is None else out,
            None,
            *STEP_ARGUMENTS.pack(step),
            *(COMBINE_ARGUMENTS.pack(combine)[:1] if combine is not None else [None]),
            stats,
            False,
        )

    step_call(torch.cat([x, x]))  # (the well-formed call)
    for empty in (x[:0], x[:, :0], x[:, :, :0]):
        with pytest.raises(RuntimeError, match="x must be a non-empty"):
            step_call(torch.cat([empty, empty]), x=empty, out=torch.empty_like(empty))
    with pytest.raises(RuntimeError, match="out must be dense in x's memory format"):
        step_call(torch.cat([x, x]), out=torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match=r"model_output has shape \[2, 4, 6, 6\], which does not fit"):
        step_call(x)  # guided without a guide: [c; u], 2B rows
    with pytest.raises(RuntimeError, match=r"noise has shape \[2, 4, 6, 5\]"):
        step_call(torch.cat([x, x]), noise=x[..., :5].contiguous())
    # A statistics pass reads u, which an unguided step has not (a segfault); a 2C
    # prediction in channels_last was read at x's offsets, a pixel's 2C values apart
    for stats in (1, 5, -1):
        with pytest.raises(RuntimeError, match=f"stats must be 0 to 4, and 0 without a combine, got {stats}"):
            step_call(x, combine=None, stats=stats)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="a prediction of 2C channels needs contiguous tensors, not channels_last"):
        step_call(
            torch.cat([x, x], dim=1).contiguous(memory_format=torch.channels_last),
            x=channels_last,
            out=torch.empty_like(channels_last),
            combine=None,
        )

    def norm_call(x, groups, weight=None, scale=None):
        return host_harness.group_norm_forward(x, weight, None, scale, None, groups, 1e-5, False)

    norm_call(x, 2)
    with pytest.raises(RuntimeError, match="group_norm needs a non-empty x"):
        norm_call(x[:0], 2)
    with pytest.raises(RuntimeError, match="group_norm needs a non-empty x"):
        norm_call(x[:, :, :0], 2)
    for groups in (0, 3):
        with pytest.raises(RuntimeError, match=f"num_groups dividing the 4 channels, got {groups}"):
            norm_call(x, groups)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous .* \(C,\) tensor"):
        norm_call(x, 2, weight=torch.ones(3))
    with pytest.raises(RuntimeError, match=r"scale must be a contiguous .* \(N, C\) tensor"):
        norm_call(x, 2, scale=torch.ones(1, 4))
    y, mean, rstd = norm_call(x, 2)
    with pytest.raises(RuntimeError, match=r"mean and rstd must be contiguous float32 of \(N, num_groups\)"):
        host_harness.group_norm_backward(y, x, None, None, None, None, mean[:1], rstd[:1], 2, False)


def test_a_perturbed_scale_below_float32s_range_runs_unperturbed(cuda_backend_on_cpu):
    # fastguide.ops takes [c; u; p] for any nonzero scale; the bindings decided from the
    # float32-rounded scale (0) and refused the 3B rows
    x = randn(2, 4, 6, 6, seed=0, dtype=torch.float32)
    model_output = randn(6, 4, 6, 6, seed=1, dtype=torch.float32)
    step = StepCoefficients(alpha=0.8, sigma=0.6, k_x0=1.0)
    got = ops.guided_step(model_output, x, step, GuidanceCombine(3.0, perturbed_scale=1e-50))
    expected = ops.guided_step(model_output[:4], x, step, GuidanceCombine(3.0))
    assert_close(got, expected, GUIDED_STEP, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_on_misaligned_tensors(cuda_backend_on_cpu, dtype, channels_last):
    # x and dy one element past a 16-byte boundary: no vector (nor, channels_last, a
    # channel pair of the backward sums) may be read from them.
    def misaligned(t):
        if not channels_last:
            return offset_copy(t)
        return offset_copy(t.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)

    x, weight, bias, scale, shift = random_inputs(2, 64, (16, 16), dtype, "cpu")
    x = misaligned(x).requires_grad_()
    y = ops.group_norm(x, 32, weight, bias, scale=scale, shift=shift, activation="silu")
    assert_close(y, explicit_group_norm(x.detach(), 32, weight, bias, scale, shift, "silu"), GROUP_NORM, dtype)
    grad_y = misaligned(torch.randn(x.shape).to(dtype))
    (dx,) = torch.autograd.grad(y, x, grad_y)
    x64 = x.detach().double().requires_grad_()
    expected = explicit_group_norm(x64, 32, weight.double(), bias.double(), scale.double(), shift.double(), "silu")
    (wanted,) = torch.autograd.grad(expected, x64, grad_y.double())
    atol, rtol = GROUP_NORM[dtype]
    torch.testing.assert_close(dx.double(), wanted, atol=atol, rtol=rtol * 4)


def test_group_norm_bindings_refuse_a_grid_past_2_to_the_31(host_harness):
    # A block per (n, c) in the statistics grid's x: batch × channels of 2^31 would wrap
    # it. An empty tensor of that shape costs no memory and reaches the check.
    x = torch.empty(2**16, 2**15, 0, 1)
    with pytest.raises(RuntimeError, match="batch × channels below 2\\^31"):
        host_harness.group_norm_forward(x, None, None, None, None, 2**15, 1e-5, False)


def test_samples_agree_with_torch_backend(on_cuda_emulation):
    # The whole sampler on a tiny UNet: its GroupNorms and steps on the cuda backend.
    model = tiny_cfg_unet()
    kwargs = dict(
        labels=torch.tensor([1]),
        sampler="dpm++2m",
        steps=[600, 300, 100],
        noise=torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(6)),
        guidance=fastguide.CFG(3.0, rescale=0.5),
    )
    with fastguide.backend("torch"):
        expected = fastguide.sample(model, (1, 3, 8, 8), **kwargs)
    with on_cuda_emulation():
        got = fastguide.sample(model, (1, 3, 8, 8), **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------
# group_norm
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, channels_last",
    [(s, False) for s in NORM_SHAPES] + [(s, True) for s in NORM_SHAPES if len(s[3]) == 2],
    ids=str,
)
@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_matches_explicit_formula(cuda_backend_on_cpu, shape, channels_last, scale_shift, activation, dtype):
    n, c, groups, spatial = shape
    x, weight, bias, scale, shift = random_inputs(n, c, spatial, dtype, "cpu")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if not scale_shift:
        scale = shift = None
    y = ops.group_norm(x, groups, weight, bias, scale=scale, shift=shift, activation=activation)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == dtype
    assert_close(y, explicit_group_norm(x, groups, weight, bias, scale, shift, activation), GROUP_NORM, dtype)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_one_group_of_many_channels(cuda_backend_on_cpu, channels_last):
    # Cg = 100 > 32: each lane of a group's merge warp sums several channels.
    x, weight, bias, scale, shift = random_inputs(2, 100, (6, 5), torch.float32, "cpu", seed=4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, scale, shift)]
    y = ops.group_norm(leaves[0], 1, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation="silu")
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    expected = explicit_group_norm(doubles[0], 1, *doubles[1:3], doubles[3], doubles[4], "silu")
    assert_close(y, expected, GROUP_NORM, torch.float32)
    grad_y = torch.randn(x.shape)
    for got, want in zip(
        torch.autograd.grad(y, leaves, grad_y), torch.autograd.grad(expected, doubles, grad_y.double())
    ):
        count = x.numel() // want.numel()
        atol, rtol = GROUP_NORM[torch.float32]
        torch.testing.assert_close(got.double(), want, atol=atol * max(1, count) ** 0.5, rtol=rtol * 4)


def test_group_norm_mean_far_from_zero(cuda_backend_on_cpu):
    # |mean| = 25·std: Σx² − (Σx)²/n in fp32 would lose ~1e-4 of the variance; the
    # shifted sums must not (64 groups: held in registers, group_in_registers_kernel).
    x, weight, bias, _, _ = random_inputs(2, 64, (16, 16), torch.float32, "cpu")
    x = x + 50.0
    y = ops.group_norm(x, 32, weight, bias)
    assert_close(y, explicit_group_norm(x, 32, weight, bias, None, None, None), GROUP_NORM, torch.float32)


@pytest.mark.parametrize(
    "shape", [(1, 3, 1, (7, 13)), (1, 8, 2, (64, 64)), (2, 96, 32, (5, 5)), (5, 160, 32, (1, 1))], ids=str
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", ["none", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_backward_matches_autograd_of_formula(cuda_backend_on_cpu, shape, channels_last, affine, dtype):
    n, c, groups, spatial = shape
    x, weight, bias, scale, shift = random_inputs(n, c, spatial, dtype, "cpu", seed=3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, scale, shift)]
    if affine == "none":
        leaves[1:] = [None] * 4
    grad_y = torch.randn(x.shape).to(dtype)
    y = ops.group_norm(leaves[0], groups, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation="silu")
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, grad_y)
    doubles = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    ones = (torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64))
    w, b = (doubles[1], doubles[2]) if affine == "all" else ones
    expected = explicit_group_norm(doubles[0], groups, w, b, doubles[3], doubles[4], "silu")
    wanted = torch.autograd.grad(expected, [t for t in doubles if t is not None], grad_y.double())
    for got, want in zip(grads, wanted):
        count = x.numel() // want.numel()
        atol, rtol = GROUP_NORM[dtype]
        torch.testing.assert_close(got.double(), want, atol=atol * max(1, count) ** 0.5, rtol=rtol * 4)


# --------------------------------------------------------------------------------------
# torch.compile sees the same fastguide:: ops on the cuda backend
# --------------------------------------------------------------------------------------


def test_ops_compile_fullgraph_on_the_cuda_backend(cuda_backend_on_cpu):
    inputs = example_inputs("cpu")
    eager = three_ops(*inputs)
    compiled = torch.compile(three_ops, fullgraph=True, backend="aot_eager")(*inputs)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    x, weight, bias, scale, shift = (t.detach().requires_grad_() for t in inputs[3:8])

    def loss(*leaves):
        return (
            ops.group_norm(leaves[0], 4, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation="silu")
            .square()
            .sum()
        )

    leaves = (x, weight, bias, scale, shift)
    eager_grads = torch.autograd.grad(loss(*leaves), leaves)
    compiled_grads = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e)


# (2, 64, 3, 3): the three launches; (8, 64, 4, 4): 16 groups (two an emulated SM) of
# 16-byte vectors, held in one block's registers (group_in_registers_kernel).
@pytest.mark.parametrize("shape", [(2, 64, 3, 3), (8, 64, 4, 4)], ids=str)
def test_group_norm_groups_whose_float32_statistics_overflow_are_nan(cuda_backend_on_cpu, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[0, :32] *= 1e20
    y = ops.group_norm(x, 2)
    assert y[0, :32].isnan().all()
    expected = torch.nn.functional.group_norm(x.double(), 2)
    assert_close(y[0, 32:], expected[0, 32:], GROUP_NORM, torch.float32)
    assert_close(y[1:], expected[1:], GROUP_NORM, torch.float32)


# --------------------------------------------------------------------------------------
# Norm parameters read in their own dtype: no cast per call
# --------------------------------------------------------------------------------------

# Each norm binding's parameters: the position of the first, and their names in order.
PARAMETER_ARGS = {
    "group_norm_forward": (1, ("weight", "bias", "scale", "shift")),
    "group_norm_backward": (2, ("weight", "bias", "scale", "shift")),
    "layer_norm_forward": (1, ("weight", "bias", "scale", "shift")),
    "gated_residual_layer_norm_forward": (2, ("gate", "weight", "bias", "scale", "shift")),
    "layer_norm_backward": (2, ("weight", "bias", "scale", "shift")),
}


@pytest.fixture
def kernel_parameters(on_cuda_emulation, host_harness):
    """The cuda backend on its emulation, recording what each norm binding gets as its
    parameters: a list of (binding, {name: tensor or None})."""
    seen = []

    def recording(binding):
        op = getattr(host_harness, binding)
        first, names = PARAMETER_ARGS[binding]

        def call(*args):
            seen.append((binding, dict(zip(names, args[first : first + len(names)]))))
            return op(*args)

        return call

    bindings = SimpleNamespace(**{binding: recording(binding) for binding in PARAMETER_ARGS})
    with on_cuda_emulation(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_backend, "_ops", lambda: bindings)
        yield seen


def assert_bindings_got_the_parameters_themselves(seen, bindings, given):
    """The kernels of `bindings` (in call order) read the caller's parameter tensors in
    place: the same memory in the same dtype, no copy and no cast in the glue."""
    assert [binding for binding, _ in seen] == bindings
    for binding, parameters in seen:
        for name, t in parameters.items():
            assert t.dtype == given[name].dtype, f"{binding}: {name} cast to {t.dtype}"
            assert t.data_ptr() == given[name].data_ptr(), f"{binding}: {name} copied"


def other_dtypes(dtype):
    """The two kernel dtypes besides x's, for parameters that differ from x and from each other."""
    return [d for d in DTYPES if d != dtype]


def assert_grads_close(got_grads, wanted, leaves, x, table):
    """Float64 autograd's gradients, each within the tolerance of the coarser of x's dtype
    and its own, loosened as a parameter gradient sums over more elements."""
    for got, want, leaf in zip(got_grads, wanted, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        atol, rtol = max(table[x.dtype], table[leaf.dtype])
        count = max(1, x.numel() // want.numel())
        torch.testing.assert_close(got.double(), want, atol=atol * count**0.5 * 4, rtol=rtol * 4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
# Odd C and S: element by element; S = 24 and C = 16: 16-byte vectors in both layouts.
@pytest.mark.parametrize("shape", [(3, 12, 4, (5, 7)), (2, 16, 4, (4, 6))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_group_norm_reads_parameters_in_their_own_dtype(kernel_parameters, dtype, shape, channels_last):
    n, c, groups, spatial = shape
    first, second = other_dtypes(dtype)
    x, weight, bias, scale, shift = random_inputs(n, c, spatial, dtype, "cpu", seed=11)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    parameters = [t.to(d) for t, d in zip((weight, bias, scale, shift), (first, second, second, first))]
    leaves = [t.detach().requires_grad_() for t in (x, *parameters)]
    grad_y = randn(*x.shape, seed=12, dtype=dtype)
    y = ops.group_norm(leaves[0], groups, *leaves[1:3], scale=leaves[3], shift=leaves[4], activation="silu")
    grads = torch.autograd.grad(y, leaves, grad_y)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    expected = explicit_group_norm(doubles[0], groups, *doubles[1:3], doubles[3], doubles[4], "silu")
    assert_close(y, expected, GROUP_NORM, dtype)
    assert_grads_close(grads, torch.autograd.grad(expected, doubles, grad_y.double()), leaves, x, GROUP_NORM)
    assert_bindings_got_the_parameters_themselves(
        kernel_parameters,
        ["group_norm_forward", "group_norm_backward"],
        dict(zip(("weight", "bias", "scale", "shift"), leaves[1:])),
    )


# (2, 5, 24): 16-byte vectors of x and of the parameters (8-byte ones of fp16/bf16
# parameters beside fp32 x); (3, 4, 13): element by element.
TOKEN_SHAPES = [(2, 5, 24), (3, 4, 13)]


@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_reads_parameters_in_their_own_dtype(kernel_parameters, dtype, shape):
    first, second = other_dtypes(dtype)
    # A per-token scale beside a per-sample shift.
    x, weight, bias, scale, shift = random_token_inputs(shape, dtype, "cpu", per_token=(True, False), seed=13)
    parameters = [t.to(d) for t, d in zip((weight, bias, scale, shift), (first, second, first, second))]
    leaves = [t.detach().requires_grad_() for t in (x, *parameters)]
    grad_y = randn(*shape, seed=14, dtype=dtype)
    y = ops.layer_norm(leaves[0], shape[-1], *leaves[1:3], scale=leaves[3], shift=leaves[4])
    grads = torch.autograd.grad(y, leaves, grad_y)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    expected = explicit_layer_norm(*doubles)
    assert_close(y, expected, LAYER_NORM, dtype)
    assert_grads_close(grads, torch.autograd.grad(expected, doubles, grad_y.double()), leaves, x, LAYER_NORM)
    assert_bindings_got_the_parameters_themselves(
        kernel_parameters,
        ["layer_norm_forward", "layer_norm_backward"],
        dict(zip(("weight", "bias", "scale", "shift"), leaves[1:])),
    )


@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_residual_layer_norm_reads_parameters_in_their_own_dtype(kernel_parameters, dtype, shape):
    first, second = other_dtypes(dtype)
    # A per-sample scale beside a per-token shift; the gate per sample.
    h, weight, bias, scale, shift = random_token_inputs(shape, dtype, "cpu", per_token=(False, True), seed=15)
    branch = randn(*shape, seed=16, dtype=dtype)
    gate = randn(shape[0], shape[-1], seed=17, dtype=second)
    parameters = [t.to(d) for t, d in zip((weight, bias, scale, shift), (first, first, second, second))]
    leaves = [t.detach().requires_grad_() for t in (h, branch, gate, *parameters)]
    grad_h, grad_y = randn(*shape, seed=18, dtype=dtype), randn(*shape, seed=19, dtype=dtype)
    h_new, y = ops.gated_residual_layer_norm(
        leaves[0], leaves[1], leaves[2], shape[-1], *leaves[3:5], scale=leaves[5], shift=leaves[6]
    )
    grads = torch.autograd.grad((h_new, y), leaves, (grad_h, grad_y))
    d = [t.detach().double().requires_grad_() for t in leaves]
    h64 = d[0] + d[2].unsqueeze(1) * d[1]
    # h_new is rounded once to h's dtype, and the norm reads that rounded value.
    assert_close(h_new, h64, LAYER_NORM, dtype)
    assert_close(y, explicit_layer_norm(h_new, *parameters), LAYER_NORM, dtype)
    wanted = torch.autograd.grad((h64, explicit_layer_norm(h64, *d[3:])), d, (grad_h.double(), grad_y.double()))
    assert_grads_close(grads, wanted, leaves, h, LAYER_NORM)
    assert_bindings_got_the_parameters_themselves(
        kernel_parameters,
        ["gated_residual_layer_norm_forward", "layer_norm_backward"],
        dict(zip(("gate", "weight", "bias", "scale", "shift"), leaves[2:])),
    )


def test_norm_forwards_cast_no_parameter(cuda_backend_on_cpu):
    # fp16 activations beside fp32, fp16 and bf16 parameters: not one aten::_to_copy in a call.
    x, weight, bias, scale, shift = random_inputs(2, 16, (4, 6), torch.float16, "cpu")
    bias = bias.bfloat16()
    tokens, t_weight, t_bias, t_scale, t_shift = random_token_inputs((2, 5, 24), torch.float16, "cpu")
    t_weight, t_scale = t_weight.bfloat16(), t_scale.bfloat16()
    branch, gate = randn(2, 5, 24, seed=1, dtype=torch.float16), randn(2, 24, seed=2, dtype=torch.bfloat16)
    with torch.profiler.profile() as profile:
        ops.group_norm(x, 4, weight, bias, scale=scale, shift=shift, activation="silu")
        ops.layer_norm(tokens, 24, t_weight, t_bias, scale=t_scale, shift=t_shift)
        ops.gated_residual_layer_norm(tokens, branch, gate, 24, t_weight, t_bias, scale=t_scale, shift=t_shift)
    assert [event.name for event in profile.events() if event.name == "aten::_to_copy"] == []

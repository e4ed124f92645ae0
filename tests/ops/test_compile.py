"""The ops under torch.compile(fullgraph=True) and torch.library.opcheck."""

import pytest
import torch

import fastguide
from fastguide import ops
from fastguide.ops import contract
from tests.helpers import CASES, backends_for, case_inputs, example_inputs, three_ops


# Every backend that runs guided_step here; under "cuda" attention runs as under auto.
@pytest.mark.parametrize("backend", backends_for("guided_step"))
def test_three_ops_compile_fullgraph_and_match_eager(backend, device):
    inputs = example_inputs(device)
    with fastguide.backend(backend):
        eager = three_ops(*inputs)
        compiled = torch.compile(three_ops, fullgraph=True, backend="aot_eager")(*inputs)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


def test_backward_compiles_fullgraph():
    q, k, v, x, weight, bias, scale, shift = (t.double().requires_grad_() for t in example_inputs("cpu")[:8])

    def loss(q, k, v, x, weight, bias, scale, shift):
        return (
            ops.attention(q, k, v).square().sum()
            + ops.group_norm(x, 4, weight, bias, scale=scale, shift=shift, activation="silu").square().sum()
        )

    inputs = (q, k, v, x, weight, bias, scale, shift)
    eager = torch.autograd.grad(loss(*inputs), inputs)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs), inputs)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


def test_opcheck_attention():
    q, k, v = (torch.randn(2, 3, n, 24, dtype=torch.float64, requires_grad=True) for n in (7, 9, 9))
    torch.library.opcheck(torch.ops.fastguide.attention.default, (q, k, v, 0.3, "torch"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_group_norm(channels_last):
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(6,), (6,), (2, 6), (2, 6)]]
    torch.library.opcheck(
        torch.ops.fastguide.group_norm.default, (x.requires_grad_(), *params, 3, 1e-5, "silu", "torch")
    )
    torch.library.opcheck(
        torch.ops.fastguide.group_norm.default, (x, None, params[1], None, params[3], 2, 1e-6, "none", "torch")
    )


def test_opcheck_guided_step():
    model_output, x = torch.randn(4, 6, 5, 5), torch.randn(2, 3, 5, 5)
    noise, grad, buffer = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5), torch.zeros(2, 3, 5, 5)
    history = (torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5))
    out, x0_out = torch.empty(4, 3, 5, 5), torch.empty(2, 3, 5, 5)
    tensors = contract.StepTensors(model_output, x, None, history, noise, grad, buffer, out, x0_out)
    step = ops.StepCoefficients(
        alpha=0.8,
        sigma=0.6,
        k_x=0.3,
        k_x0=0.2,
        k_eps=2.0,
        k_noise=0.1,
        k_grad=0.2,
        grad_eps_scale=0.5,
        k_history=(-0.5, 0.25),
        clip_denoised=True,
        log_variance_range=(-4.0, -2.0),
    )
    combine = ops.GuidanceCombine(3.0, apg_eta=0.1, apg_momentum=-0.3, variant="apg")
    torch.library.opcheck(torch.ops.fastguide.guided_step.default, (*contract.pack(tensors, step, combine), "torch"))


def test_opcheck_and_compile_guided_step_with_a_perturbed_prediction():
    # PAG / SLG: model_output [c; u; p], x_next into each block of a 3B out.
    model_output, x = torch.randn(6, 3, 5, 5), torch.randn(2, 3, 5, 5)
    step = ops.StepCoefficients(alpha=0.8, sigma=0.6, k_x=0.3, k_x0=0.7)
    combine = ops.GuidanceCombine(3.0, rescale=0.5, perturbed_scale=2.0)
    tensors = contract.StepTensors(model_output, x, out=torch.empty(6, 3, 5, 5), x0_out=torch.empty(2, 3, 5, 5))
    torch.library.opcheck(torch.ops.fastguide.guided_step.default, (*contract.pack(tensors, step, combine), "torch"))

    def stepped(model_output, x):
        return ops.guided_step(model_output, x, step, combine, out=torch.empty(6, 3, 5, 5))

    torch.testing.assert_close(
        torch.compile(stepped, fullgraph=True, backend="aot_eager")(model_output, x), stepped(model_output, x)
    )


def test_contract_round_trips_through_the_op_arguments():
    tensors = contract.StepTensors(torch.randn(4, 3, 2, 2), torch.randn(2, 3, 2, 2), history=(torch.randn(2, 3, 2, 2),))
    step = ops.StepCoefficients(alpha=0.8, sigma=0.6, k_x0=0.2, k_history=(-0.5,), log_variance_range=(-4.0, -2.0))
    for combine in (
        None,
        ops.GuidanceCombine(3.0, rescale=0.5, variant="zero_star"),
        ops.GuidanceCombine(3.0, rescale=0.5, perturbed_scale=2.0),
    ):
        got_tensors, got_step, got_combine = contract.unpack(contract.pack(tensors, step, combine))
        assert got_step == step and got_combine == combine
        assert got_tensors.history[0] is tensors.history[0] and got_tensors.model_output is tensors.model_output


def test_guided_step_bumps_version_of_written_tensors():
    model_output, x = torch.randn(4, 3, 5, 5), torch.randn(2, 3, 5, 5)
    out, x0_out = torch.empty(2, 3, 5, 5), torch.empty(2, 3, 5, 5)
    before = out._version, x0_out._version
    ops.guided_step(
        model_output,
        x,
        ops.StepCoefficients(alpha=0.8, sigma=0.6, k_x0=1.0),
        ops.GuidanceCombine(2.0),
        out=out,
        x0_out=x0_out,
    )
    assert out._version > before[0] and x0_out._version > before[1]


def test_guided_step_without_autograd_skips_the_dispatcher_and_agrees():
    # A sampler's loop (no_grad) calls the backend straight; the result and the version
    # bumps are those of the custom op's path.
    tensors, step, combine = case_inputs(CASES["history-of-3"], 2, 3, (5, 5), torch.float32, "cpu")
    via_op = {name: t.clone() for name, t in tensors.items() if name in ("out", "x0_out")}
    ops.guided_step(**{**tensors, **via_op}, step=step, combine=combine)
    before = tensors["out"]._version
    with torch.no_grad():
        ops.guided_step(**tensors, step=step, combine=combine)
    assert tensors["out"]._version > before
    for name, expected in via_op.items():
        torch.testing.assert_close(tensors[name], expected, rtol=0, atol=0)


def test_guided_step_under_fake_tensors_goes_through_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode():
        x, model_output = torch.empty(2, 3, 4, 4), torch.empty(4, 3, 4, 4)
        out = ops.guided_step(
            model_output, x, ops.StepCoefficients(alpha=0.8, sigma=0.6, k_x0=1.0), ops.GuidanceCombine(2.0)
        )
    assert out.shape == x.shape

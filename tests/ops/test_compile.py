"""The ops under torch.compile(fullgraph=True) and torch.library.opcheck."""

import pytest
import torch

import fastguide
from fastguide import ops
from tests.helpers import backends_for


def three_ops(q, k, v, x, weight, bias, scale, shift, model_output, x_t, noise):
    attended = ops.attention(q, k, v)
    normed = ops.group_norm(x, 4, weight, bias, scale=scale, shift=shift, activation="silu")
    stepped = ops.guided_step(
        model_output, x_t, alpha=0.8, sigma=0.6, guidance_scale=3.0, clip_denoised=True,
        noise=noise, k_x0=0.5, k_eps=0.3, k_noise=0.1, guidance_rescale=0.5,
    )
    return attended, normed, stepped


def example_inputs(device):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 7, 40), (2, 3, 9, 40), (2, 3, 9, 40), (2, 8, 5, 7), (8,), (8,), (2, 8), (2, 8),
              (4, 3, 6, 6), (2, 3, 6, 6), (2, 3, 6, 6)]
    return [torch.randn(s, generator=g).to(device) for s in shapes]


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
        return ops.attention(q, k, v).square().sum() + ops.group_norm(
            x, 4, weight, bias, scale=scale, shift=shift, activation="silu").square().sum()

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
    out, x0_out = torch.empty(4, 3, 5, 5), torch.empty(2, 3, 5, 5)
    torch.library.opcheck(
        torch.ops.fastguide.guided_step.default,
        (model_output, x, None, noise, grad, buffer, out, x0_out,
         0.8, 0.6, 0.3, 0.2, 2.0, -0.5, 0.1, 0.1, 0.5, 0.3, 0.0, 1.0, 0.2,  # alpha … k_grad
         "epsilon", 3.0, False, True, True, -4.0, -2.0, "torch"),
    )


def test_guided_step_bumps_version_of_written_tensors():
    model_output, x = torch.randn(4, 3, 5, 5), torch.randn(2, 3, 5, 5)
    out, x0_out = torch.empty(2, 3, 5, 5), torch.empty(2, 3, 5, 5)
    before = out._version, x0_out._version
    ops.guided_step(model_output, x, alpha=0.8, sigma=0.6, guidance_scale=2.0, k_x0=1.0, out=out, x0_out=x0_out)
    assert out._version > before[0] and x0_out._version > before[1]

"""guided_step: the reference against sampler formulas written out independently, and
every backend against the reference in float64 for every option and variant."""

import importlib
import math

import numpy as np
import pytest
import torch

import fastguide
from fastguide import ops
from fastguide.ops import _guided_step, contract, reference
from fastguide.ops.contract import GuidanceCombine, StepCoefficients, StepTensors
from tests.helpers import (
    CASES,
    GUIDED_STEP,
    STEP_SHAPES,
    assert_close,
    backends_for,
    backends_with_emulation,
    case_inputs,
    diffusers_feature,
    poisoned,
    randn,
    run_reference,
    running_on,
    x0_prediction,
)

BACKENDS = backends_for("guided_step")

# ADM's linear schedule over 1000 steps.
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, dim=0)


def abar(t: int) -> float:
    return 1.0 if t < 0 else float(ALPHAS_CUMPROD[t])


# --------------------------------------------------------------------------------------
# The reference against formulas written out from the papers / ADM
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_with_cfg_matches_written_out_step(clip, eta):
    batch, shape, w, t, t_prev = 3, (3, 5, 7), 4.0, 600, 540
    x = randn(batch, *shape, seed=0) * 1.5
    model_output = randn(2 * batch, *shape, seed=1)
    noise = randn(batch, *shape, seed=2)
    a_t, a_prev = abar(t), abar(t_prev)

    # ADM's ddim_sample, with its sqrt_recip / sqrt_recipm1 forms of the same algebra.
    eps_c, eps_u = model_output[:batch], model_output[batch:]
    eps = eps_u + w * (eps_c - eps_u)
    x0 = math.sqrt(1 / a_t) * x - math.sqrt(1 / a_t - 1) * eps
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (math.sqrt(1 / a_t) * x - x0) / math.sqrt(1 / a_t - 1)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    expected = x0 * math.sqrt(a_prev) + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise

    step = StepCoefficients(
        alpha=math.sqrt(a_t),
        sigma=math.sqrt(1 - a_t),
        clip_denoised=clip,
        k_x0=math.sqrt(a_prev),
        k_eps=math.sqrt(1 - a_prev - sigma**2),
        k_noise=sigma,
    )
    out = reference.guided_step(StepTensors(model_output, x, noise=noise), step, GuidanceCombine(w))
    torch.testing.assert_close(out, expected)


def test_ddpm_learned_variance_with_cfg_and_classifier_mean_shift():
    batch, channels, spatial, w, s, t = 2, 3, (6, 5), 2.5, 3.0, 250
    x = randn(batch, channels, *spatial, seed=0)
    model_output = randn(2 * batch, 2 * channels, *spatial, seed=1)
    noise = randn(batch, channels, *spatial, seed=2)
    grad = randn(batch, channels, *spatial, seed=3)

    # ADM's p_mean_variance (learned_range) + condition_mean + p_sample, guidance on eps only.
    beta, a_t, a_prev = float(BETAS[t]), abar(t), abar(t - 1)
    posterior_variance = beta * (1 - a_prev) / (1 - a_t)
    min_log, max_log = math.log(posterior_variance), math.log(beta)
    eps_c, eps_u = model_output[:batch, :channels], model_output[batch:, :channels]
    eps = eps_u + w * (eps_c - eps_u)
    var_values = model_output[:batch, channels:]
    frac = (var_values + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log
    x0 = (math.sqrt(1 / a_t) * x - math.sqrt(1 / a_t - 1) * eps).clamp(-1, 1)
    coef1 = beta * math.sqrt(a_prev) / (1 - a_t)
    coef2 = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t)
    mean = coef1 * x0 + coef2 * x
    mean = mean + torch.exp(log_variance) * (s * grad)
    expected = mean + torch.exp(0.5 * log_variance) * noise

    step = StepCoefficients(
        alpha=math.sqrt(a_t),
        sigma=math.sqrt(1 - a_t),
        clip_denoised=True,
        k_x0=coef1,
        k_x=coef2,
        k_noise=1.0,
        k_grad=s,
        log_variance_range=(min_log, max_log),
    )
    out = reference.guided_step(StepTensors(model_output, x, noise=noise, grad=grad), step, GuidanceCombine(w))
    torch.testing.assert_close(out, expected)


def toy_guided_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic eps-model on (B, ...) returning [cond; uncond] predictions."""
    cond = torch.tanh(0.8 * x + 0.001 * t) + 0.1
    uncond = 0.5 * torch.sin(x) - 0.0002 * t
    return torch.cat([cond, uncond])


def test_dpm_solver_pp_2m_matches_written_out_steps():
    batch, shape, w = 2, (3, 4, 4), 3.0
    timesteps = [999, 700, 400]
    x = randn(batch, *shape, seed=0)
    alpha = {t: math.sqrt(abar(t)) for t in timesteps}
    sigma = {t: math.sqrt(1 - abar(t)) for t in timesteps}
    lam = {t: math.log(alpha[t] / sigma[t]) for t in timesteps}

    def denoised(x_, t):
        out = toy_guided_model(x_, t)
        eps = out[batch:] + w * (out[:batch] - out[batch:])
        return (x_ - sigma[t] * eps) / alpha[t]

    # DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (first step first order).
    t0, t1, t2 = timesteps
    d0 = denoised(x, t0)
    h1 = lam[t1] - lam[t0]
    x1 = sigma[t1] / sigma[t0] * x - alpha[t1] * math.expm1(-h1) * d0
    d1 = denoised(x1, t1)
    h2 = lam[t2] - lam[t1]
    r = h1 / h2
    d = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    x2_expected = sigma[t2] / sigma[t1] * x1 - alpha[t2] * math.expm1(-h2) * d

    # The same with guided_step: a sampler only computes the k's; x0 carries to prev.
    prev, cfg = poisoned(x.shape), GuidanceCombine(w)
    first = StepCoefficients(
        alpha=alpha[t0], sigma=sigma[t0], k_x=sigma[t1] / sigma[t0], k_x0=-alpha[t1] * math.expm1(-h1)
    )
    x1_op = reference.guided_step(StepTensors(toy_guided_model(x, t0), x, x0_out=prev), first, cfg)
    torch.testing.assert_close(prev, d0)
    phi = -alpha[t2] * math.expm1(-h2)
    second = StepCoefficients(
        alpha=alpha[t1],
        sigma=sigma[t1],
        k_x=sigma[t2] / sigma[t1],
        k_x0=phi * (1 + 1 / (2 * r)),
        k_history=(-phi / (2 * r),),
    )
    x2_op = reference.guided_step(StepTensors(toy_guided_model(x1_op, t1), x1_op, history=(prev,)), second, cfg)
    torch.testing.assert_close(x1_op, x1)
    torch.testing.assert_close(x2_op, x2_expected)


def test_classifier_eps_shift_follows_adm_order():
    # ADM condition_score: eps from the CLIPPED x0, shifted by √(1−ᾱ)·s·grad, x0 re-derived unclipped.
    batch, shape, s, t = 2, (3, 5, 5), 10.0, 300
    x = randn(batch, *shape, seed=0) * 2
    model_output = randn(batch, *shape, seed=1)
    grad = randn(batch, *shape, seed=2)
    a_t = abar(t)
    x0 = (math.sqrt(1 / a_t) * x - math.sqrt(1 / a_t - 1) * model_output).clamp(-1, 1)
    eps = (math.sqrt(1 / a_t) * x - x0) / math.sqrt(1 / a_t - 1)
    eps = eps - math.sqrt(1 - a_t) * s * grad
    x0 = math.sqrt(1 / a_t) * x - math.sqrt(1 / a_t - 1) * eps
    x0_out, eps_out = poisoned(x.shape), None
    step = StepCoefficients(
        alpha=math.sqrt(a_t),
        sigma=math.sqrt(1 - a_t),
        clip_denoised=True,
        grad_eps_scale=math.sqrt(1 - a_t) * s,
        k_eps=1.0,
    )
    eps_out = reference.guided_step(StepTensors(model_output, x, grad=grad, x0_out=x0_out), step)
    torch.testing.assert_close(eps_out, eps)
    torch.testing.assert_close(x0_out, x0)
    assert x0_out.abs().max() > 1  # not clipped again


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_give_x0_and_eps_of_x(prediction_type):
    # Build m from a known (x0, eps) pair; the step must recover both.
    alpha, sigma = 0.6, 0.8
    x0_true, eps_true = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1)
    x = alpha * x0_true + sigma * eps_true
    m = {
        "epsilon": eps_true,
        "v_prediction": alpha * eps_true - sigma * x0_true,
        "sample": x0_true,
    }[prediction_type]
    step = StepCoefficients(alpha=alpha, sigma=sigma, prediction_type=prediction_type)
    torch.testing.assert_close(reference.guided_step(StepTensors(m, x), step._replace(k_x0=1.0)), x0_true)
    torch.testing.assert_close(reference.guided_step(StepTensors(m, x), step._replace(k_eps=1.0)), eps_true)


def test_cfg_rescale_matches_lin_et_al():
    cond, uncond = randn(3, 4, 6, 6, seed=0), randn(3, 4, 6, 6, seed=1) * 0.5
    w, phi = 7.5, 0.7
    cfg = uncond + w * (cond - uncond)
    std_cond = cond.flatten(1).std(dim=1).reshape(-1, 1, 1, 1)
    std_cfg = cfg.flatten(1).std(dim=1).reshape(-1, 1, 1, 1)
    expected = phi * cfg * std_cond / std_cfg + (1 - phi) * cfg
    got = reference.guided_prediction(cond, uncond, GuidanceCombine(w, rescale=phi))
    torch.testing.assert_close(got, expected)


def test_cfg_zero_star_matches_fan_et_al():
    cond, uncond = randn(3, 4, 6, 6, seed=0), randn(3, 4, 6, 6, seed=1) + 0.3
    w = 5.0
    c, u = cond.flatten(1), uncond.flatten(1)
    s_star = ((c * u).sum(1) / ((u * u).sum(1) + 1e-8)).reshape(-1, 1, 1, 1)
    expected = uncond * s_star + w * (cond - uncond * s_star)
    torch.testing.assert_close(
        reference.guided_prediction(cond, uncond, GuidanceCombine(w, variant="zero_star")), expected
    )


def test_apg_matches_sadat_et_al_over_two_steps():
    w, eta, threshold, momentum = 6.0, 0.3, 2.0, -0.5
    buffer = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    running = torch.zeros_like(buffer)
    for step in range(2):
        cond, uncond = randn(2, 3, 5, 5, seed=2 * step), randn(2, 3, 5, 5, seed=2 * step + 1)
        # Algorithm 1 of the paper, per sample over (C, H, W).
        running = (cond - uncond) + momentum * running
        diff = running
        norm = diff.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        diff = diff * torch.minimum(torch.ones_like(norm), threshold / norm)
        unit = cond / cond.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        parallel = (diff * unit).flatten(1).sum(1).reshape(-1, 1, 1, 1) * unit
        expected = cond + (w - 1) * ((diff - parallel) + eta * parallel)
        combine = GuidanceCombine(w, apg_eta=eta, apg_norm_threshold=threshold, apg_momentum=momentum, variant="apg")
        got = reference.guided_prediction(cond, uncond, combine, buffer)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(buffer, running)


def test_apg_is_diffusers_original_formulation_at_scale_w_minus_one():
    # diffusers' normalized_guidance with use_original_formulation=True: c + s·(Δ⊥ + η·Δ∥);
    # the paper's w is s + 1. Its momentum buffer runs as ours over the steps.
    apg = diffusers_feature("diffusers.guiders.adaptive_projected_guidance", since=(0, 35))
    MomentumBuffer, normalized_guidance = apg.MomentumBuffer, apg.normalized_guidance

    w, eta, threshold, momentum = 5.0, 0.4, 3.0, -0.6
    buffer = torch.zeros(2, 4, 6, 6, dtype=torch.float64)
    peer_buffer = MomentumBuffer(momentum)
    combine = GuidanceCombine(w, apg_eta=eta, apg_norm_threshold=threshold, apg_momentum=momentum, variant="apg")
    for step in range(3):
        cond, uncond = randn(2, 4, 6, 6, seed=10 + 2 * step), randn(2, 4, 6, 6, seed=11 + 2 * step)
        peer = normalized_guidance(
            cond, uncond, w - 1, peer_buffer, eta=eta, norm_threshold=threshold, use_original_formulation=True
        )
        torch.testing.assert_close(reference.guided_prediction(cond, uncond, combine, buffer), peer)


def test_tangential_cfg_matches_kwon_et_al_and_diffusers():
    # TCFG: u ← (u·v₁)v₁ with v₁ the top right-singular vector of the per-sample [c; u].
    tcfg = diffusers_feature("diffusers.guiders.tangential_classifier_free_guidance", since=(0, 35))
    normalized_guidance = tcfg.normalized_guidance

    cond, uncond = randn(3, 4, 6, 6, seed=0), randn(3, 4, 6, 6, seed=1) * 0.7 + 0.3 * randn(3, 4, 6, 6, seed=0)
    w = 5.0
    expected = torch.empty_like(cond)
    for b in range(3):  # written out per sample from the SVD
        a = torch.stack([cond[b].flatten(), uncond[b].flatten()])
        v1 = torch.linalg.svd(a, full_matrices=False).Vh[0]
        projected = (uncond[b].flatten() @ v1) * v1
        expected[b] = (projected + w * (cond[b].flatten() - projected)).reshape(cond[b].shape)
    got = reference.guided_prediction(cond, uncond, GuidanceCombine(w, variant="tangential"))
    torch.testing.assert_close(got, expected)
    peer = normalized_guidance(cond.float(), uncond.float(), w)
    torch.testing.assert_close(got.float(), peer, atol=2e-5, rtol=2e-5)


def test_apg_without_projection_or_clipping_is_cfg():
    cond, uncond = randn(2, 3, 5, 5, seed=0), randn(2, 3, 5, 5, seed=1)
    torch.testing.assert_close(
        reference.guided_prediction(cond, uncond, GuidanceCombine(3.0, apg_eta=1.0, variant="apg")),
        uncond + 3.0 * (cond - uncond),
    )


@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_perturbed_guidance_matches_diffusers_pag_and_skip_layer_guidance(phi):
    # diffusers' PAG pipelines and SkipLayerGuidance: m = u + w·(c − u) + s·(c − p), then
    # rescale_noise_cfg against std(c); here inside a DDIM-like update, model output [c; u; p].
    SkipLayerGuidance = diffusers_feature("diffusers.guiders.skip_layer_guidance", since=(0, 35)).SkipLayerGuidance

    batch, shape, w, s, alpha, sigma = 3, (4, 6, 5), 5.0, 2.5, 0.6, 0.8
    cond, x = randn(batch, *shape, seed=0), 1.3 * randn(batch, *shape, seed=3)
    uncond = 0.7 * randn(batch, *shape, seed=1) + 0.2
    perturbed = 0.9 * randn(batch, *shape, seed=2) - 0.1
    guided = uncond + w * (cond - uncond) + s * (cond - perturbed)
    if phi:
        std_cond = cond.flatten(1).std(dim=1).reshape(-1, 1, 1, 1)
        std_guided = guided.flatten(1).std(dim=1).reshape(-1, 1, 1, 1)
        guided = phi * guided * std_cond / std_guided + (1 - phi) * guided
    x0 = (x - sigma * guided) / alpha
    expected = 0.9 * x + 0.4 * x0 + 0.3 * guided

    combine = GuidanceCombine(w, rescale=phi, perturbed_scale=s)
    step = StepCoefficients(alpha=alpha, sigma=sigma, k_x=0.9, k_x0=0.4, k_eps=0.3)
    x0_out = poisoned(x.shape)
    out = reference.guided_step(StepTensors(torch.cat([cond, uncond, perturbed]), x, x0_out=x0_out), step, combine)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x0_out, x0)
    guider = SkipLayerGuidance(
        guidance_scale=w,
        skip_layer_guidance_scale=s,
        guidance_rescale=phi,
        skip_layer_guidance_layers=[0],
        skip_layer_guidance_start=0.0,
    )
    guider.set_state(step=1, num_inference_steps=10, timestep=torch.tensor(500))  # inside its SLG interval
    torch.testing.assert_close(
        reference.guided_prediction(cond, uncond, combine, perturbed=perturbed),
        guider.forward(cond, uncond, perturbed).pred,
    )


def test_history_of_three_is_the_written_out_multistep_sum():
    # A third-order multistep update: x_next = k_x·x + k_x0·D + Σⱼ kⱼ·D₋ⱼ over three earlier x0.
    batch, shape = 2, (3, 5, 4)
    x, model_output = randn(batch, *shape, seed=0), randn(batch, *shape, seed=1)
    history = tuple(randn(batch, *shape, seed=2 + j) for j in range(3))
    alpha, sigma, k = 0.6, 0.8, (0.7, -0.4, 0.15)
    x0 = (x - sigma * model_output) / alpha
    expected = 0.9 * x + 1.1 * x0 + k[0] * history[0] + k[1] * history[1] + k[2] * history[2]
    step = StepCoefficients(alpha=alpha, sigma=sigma, k_x=0.9, k_x0=1.1, k_history=k)
    torch.testing.assert_close(reference.guided_step(StepTensors(model_output, x, history=history), step), expected)


def test_separate_guide_equals_the_batched_layout():
    # Autoguidance's layout: u from a second tensor gives what [c; u] in one output gives.
    batch, shape = 3, (4, 6, 6)
    x, cond, uncond = randn(batch, *shape, seed=0), randn(batch, *shape, seed=1), randn(batch, *shape, seed=2)
    step = StepCoefficients(alpha=0.7, sigma=math.sqrt(1 - 0.49), k_x0=0.8, k_eps=0.5, clip_denoised=True)
    for combine in (GuidanceCombine(3.0), GuidanceCombine(4.0, rescale=0.5, variant="zero_star")):
        batched = reference.guided_step(StepTensors(torch.cat([cond, uncond]), x), step, combine)
        separate = reference.guided_step(StepTensors(cond, x, guide=uncond), step, combine)
        torch.testing.assert_close(separate, batched, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Buffers and layout, through the public op
# --------------------------------------------------------------------------------------

STEP = StepCoefficients(alpha=0.7, sigma=0.714, k_x=0.9, k_x0=0.2, clip_denoised=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_fills_both_halves_of_next_input_and_x0_out(backend, device):
    batch, shape = 3, (4, 5, 6)
    x = randn(batch, *shape, seed=0, dtype=torch.float32).to(device)
    model_output = randn(2 * batch, *shape, seed=1, dtype=torch.float32).to(device)
    next_input = poisoned((2 * batch, *shape), torch.float16).to(device)
    x0_out = poisoned(x.shape, torch.float32).to(device)
    with fastguide.backend(backend):
        returned = ops.guided_step(model_output, x, STEP, GuidanceCombine(3.0), out=next_input, x0_out=x0_out)
    assert returned is next_input
    expected_x0 = poisoned(x.shape)
    expected = reference.guided_step(
        StepTensors(model_output.double().cpu(), x.double().cpu(), x0_out=expected_x0), STEP, GuidanceCombine(3.0)
    )
    assert_close(next_input[:batch].cpu(), expected, GUIDED_STEP, torch.float16)
    assert_close(next_input[batch:].cpu(), expected, GUIDED_STEP, torch.float16)
    assert_close(x0_out.cpu(), expected_x0, GUIDED_STEP, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_may_be_x_itself(backend, device):
    x = randn(2, 3, 8, 8, seed=0, dtype=torch.float32).to(device)
    model_output = randn(4, 3, 8, 8, seed=1, dtype=torch.float32).to(device)
    step = StepCoefficients(alpha=0.9, sigma=math.sqrt(1 - 0.81), k_x=0.5, k_eps=0.25)
    expected = reference.guided_step(
        StepTensors(model_output.double().cpu(), x.double().cpu()), step, GuidanceCombine(2.0)
    )
    with fastguide.backend(backend):
        ops.guided_step(model_output, x, step, GuidanceCombine(2.0), out=x)
    assert_close(x.cpu(), expected, GUIDED_STEP, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_step_as_python_floats(backend, device):
    # The op's checks take NumPy scalars; Triton's launcher refuses them (the interpreter, a
    # float32 one; compiled, any but float64), so they are Python floats by then.
    x = randn(2, 3, 8, 8, seed=0, dtype=torch.float32).to(device)
    model_output = randn(4, 6, 8, 8, seed=1, dtype=torch.float32).to(device)
    noise, h0 = (randn(2, 3, 8, 8, seed=s, dtype=torch.float32).to(device) for s in (2, 3))
    floats = dict(alpha=0.8, sigma=0.6, k_x=0.9, k_noise=0.1, k_history=(0.5,), log_variance_range=(-3.0, -1.0))
    numpy_scalars = floats | dict(
        alpha=np.float32(0.8),
        sigma=np.float32(0.6),
        k_history=(np.float16(0.5),),
        log_variance_range=(np.float32(-3.0), -1.0),
    )
    results = []
    with fastguide.backend(backend), torch.no_grad():  # (with grad, the custom op's schema converts them)
        for values in (floats, numpy_scalars):
            results.append(
                ops.guided_step(
                    model_output, x, StepCoefficients(**values), GuidanceCombine(3.0), noise=noise, history=(h0,)
                )
            )
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend, device):
    names = ["x", "h0", "h1", "h2", "noise", "grad", "guide"]
    tensors = {name: randn(2, 3, 4, 4, seed=i, dtype=torch.float32).to(device) for i, name in enumerate(names)}
    model_output = randn(2, 6, 4, 4, seed=9, dtype=torch.float32).to(device)
    copies = {name: t.clone() for name, t in tensors.items()}
    mo_copy = model_output.clone()
    step = StepCoefficients(
        alpha=0.8,
        sigma=0.6,
        grad_eps_scale=0.3,
        k_x=1.0,
        k_history=(0.5, -0.2, 0.1),
        k_noise=0.1,
        k_grad=0.2,
        log_variance_range=(-3.0, -1.0),
        clip_denoised=True,
    )
    with fastguide.backend(backend):
        ops.guided_step(
            model_output,
            tensors["x"],
            step,
            GuidanceCombine(2.0, rescale=0.3),
            guide=tensors["guide"],
            history=[tensors["h0"], tensors["h1"], tensors["h2"]],
            noise=tensors["noise"],
            grad=tensors["grad"],
        )
    for name, t in tensors.items():
        assert torch.equal(t, copies[name]), name
    assert torch.equal(model_output, mo_copy)


# --------------------------------------------------------------------------------------
# Every backend against the reference in float64: each option and variant, each dtype
# --------------------------------------------------------------------------------------


def assert_outputs_match(tensors: dict, expected: dict) -> None:
    for name in ("out", "x0_out", "apg_buffer"):
        if name in tensors:
            assert_close(tensors[name].cpu(), expected[name], GUIDED_STEP, tensors[name].dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_guided_step_matches_reference_float64(backend, dtype, shape, case, device):
    tensors, step, combine = case_inputs(CASES[case], *shape, dtype, device)
    expected = run_reference(tensors, step, combine)
    with fastguide.backend(backend):
        ops.guided_step(**tensors, step=step, combine=combine)
    assert_outputs_match(tensors, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", ["cfg-clip-noise", "rescale", "apg-momentum-clip", "cfg-zero-star", "history-of-3", "separate-guide"]
)
def test_guided_step_channels_last(backend, case, device):
    tensors, step, combine = case_inputs(CASES[case], 2, 5, (9, 11), torch.float32, device)
    to_cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    tensors = {name: tuple(map(to_cl, t)) if name == "history" else to_cl(t) for name, t in tensors.items()}
    expected = run_reference(tensors, step, combine)
    with fastguide.backend(backend):
        ops.guided_step(**tensors, step=step, combine=combine)
    assert tensors["out"].is_contiguous(memory_format=torch.channels_last)
    assert_outputs_match(tensors, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_step_into_strided_out(backend, device):
    # out and x0_out as non-dense views: written through, nothing else touched.
    tensors, step, combine = case_inputs(CASES["dpm2m-history-x0out"], 2, 3, (8, 8), torch.float32, device)
    storage = poisoned((2, 3, 8, 16), torch.float32).to(device)
    tensors["out"], tensors["x0_out"] = storage[..., ::2], storage[..., 1::2]
    expected = run_reference(tensors, step, combine)
    with fastguide.backend(backend):
        ops.guided_step(**tensors, step=step, combine=combine)
    assert_close(storage[..., ::2].cpu(), expected["out"], GUIDED_STEP, torch.float32)
    assert_close(storage[..., 1::2].cpu(), expected["x0_out"], GUIDED_STEP, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_step_reads_strided_history_and_guide(backend, device):
    # History and guide as non-dense views (every other channel of a wider buffer).
    tensors, step, combine = case_inputs(CASES["separate-guide-rescale-history"], 2, 3, (6, 7), torch.float32, device)

    def strided(t, seed):
        return torch.cat([t, randn(*t.shape, seed=seed, dtype=t.dtype).to(device)], 1)[:, ::2]

    tensors["history"] = tuple(strided(h, 40 + i) for i, h in enumerate(tensors["history"]))
    tensors["guide"] = strided(tensors["guide"], 50)
    expected = run_reference(tensors, step, combine)
    with fastguide.backend(backend):
        ops.guided_step(**tensors, step=step, combine=combine)
    assert_outputs_match(tensors, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["rescale", "cfg-zero-star", "apg-momentum-clip", "apg-rescale-2b-out"])
def test_reduction_variants_when_cond_is_close_to_uncond(backend, case, device):
    # Trained models give c ≈ u: the per-sample statistics must not lose precision to it.
    tensors, step, combine = case_inputs(CASES[case], 3, 4, (24, 24), torch.float32, device)
    model_output = tensors["model_output"]
    cond = model_output[:3]
    model_output[3:] = cond + 0.01 * randn(*cond.shape, seed=7, dtype=torch.float32).to(device)
    expected = run_reference(tensors, step, combine)
    with fastguide.backend(backend):
        ops.guided_step(**tensors, step=step, combine=combine)
    assert_close(tensors["out"].cpu(), expected["out"], GUIDED_STEP, torch.float32)


# --------------------------------------------------------------------------------------
# A perturbed branch (PAG, skip-layer guidance): model_output [c; u; p]
# --------------------------------------------------------------------------------------

# Cases as tests.helpers.CASES, plus out_blocks: the B-row blocks of out (3 by default).
PERTURBED_CASES = {
    "pag-ddim": dict(combine=GuidanceCombine(4.0, perturbed_scale=2.5), step=dict(k_x0=0.8, k_eps=0.5)),
    "pag-rescale": dict(combine=GuidanceCombine(4.0, rescale=0.7, perturbed_scale=2.5), step=dict(k_x0=0.8, k_eps=0.5)),
    # diffusers' PAG without CFG, m = c + s·(c − p), is w = 1.
    "pag-without-cfg-rescale-2b-out": dict(
        combine=GuidanceCombine(1.0, rescale=0.5, perturbed_scale=3.0),
        step=dict(k_x=0.9, k_x0=0.4),
        out_blocks=2,
    ),
    "slg-v-clip-history-x0out-1b-out": dict(
        combine=GuidanceCombine(3.0, perturbed_scale=1.5),
        step=dict(
            prediction_type="v_prediction", clip_denoised=True, k_x=0.3, k_x0=0.6, k_eps=0.2, k_history=(0.2, -0.1)
        ),
        x0_out=True,
        out_blocks=1,
    ),
    "pag-ancestral-history-of-1": dict(
        combine=GuidanceCombine(3.0, perturbed_scale=2.0), step=dict(k_x=0.6, k_x0=0.3, k_noise=0.7, k_history=(0.1,))
    ),
    "pag-rescale-learned-var-noise-renoise": dict(
        combine=GuidanceCombine(5.0, rescale=0.6, perturbed_scale=2.0),
        step=dict(k_x=0.6, k_x0=0.3, k_noise=1.0, k_guide_eps=0.2, log_variance_range=(-6.0, -4.5)),
        learned_variance=True,
    ),
}
# Odd sizes (the CUDA scalar path), 16-byte vectors, and several stats parts per sample.
PERTURBED_SHAPES = [(1, 3, (1, 1)), (2, 3, (7, 13)), (3, 4, (16, 16)), (1, 4, (72, 72))]


def perturbed_case_inputs(case: dict, batch: int, channels: int, spatial: tuple, dtype, device):
    """``case_inputs`` with a model output of 3B rows [c; u; p] and a poisoned out of
    ``case["out_blocks"]`` B-row blocks (3 when not given)."""
    tensors, step, combine = case_inputs(case, batch, channels, spatial, dtype, device)
    model_channels = tensors["model_output"].shape[1]
    tensors["model_output"] = randn(3 * batch, model_channels, *spatial, seed=1, dtype=dtype).to(device)
    tensors["out"] = poisoned((case.get("out_blocks", 3) * batch, channels, *spatial), dtype).to(device)
    return tensors, step, combine


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        *(
            (backend, dtype)
            for backend in backends_with_emulation("guided_step")
            for dtype in (torch.float32, torch.float16, torch.bfloat16)
        ),
        ("torch", torch.float64),
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", PERTURBED_SHAPES, ids=str)
@pytest.mark.parametrize("case", list(PERTURBED_CASES), ids=str)
def test_perturbed_guidance_matches_reference_float64(backend, dtype, shape, case, device, request):
    device = "cpu" if backend == "cuda-emulation" else device
    tensors, step, combine = perturbed_case_inputs(PERTURBED_CASES[case], *shape, dtype, device)
    expected = run_reference(tensors, step, combine)
    with running_on(backend, request):
        ops.guided_step(**tensors, step=step, combine=combine)
    assert_outputs_match(tensors, expected)


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("case", ["pag-rescale", "slg-v-clip-history-x0out-1b-out"])
def test_perturbed_guidance_channels_last(backend, case, device, request):
    device = "cpu" if backend == "cuda-emulation" else device
    tensors, step, combine = perturbed_case_inputs(PERTURBED_CASES[case], 2, 5, (9, 11), torch.float32, device)
    to_cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    tensors = {name: tuple(map(to_cl, t)) if name == "history" else to_cl(t) for name, t in tensors.items()}
    expected = run_reference(tensors, step, combine)
    with running_on(backend, request):
        ops.guided_step(**tensors, step=step, combine=combine)
    assert tensors["out"].is_contiguous(memory_format=torch.channels_last)
    assert_outputs_match(tensors, expected)


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("perturbed_scale", [0.0, 2.0])
def test_out_fills_every_block_of_a_3b_next_input_holding_x(backend, perturbed_scale, device, request):
    # The sampler's next [c; u; p] input, written in place: x is its first B rows.
    device = "cpu" if backend == "cuda-emulation" else device
    batch, shape = 3, (4, 5, 6)
    combine = GuidanceCombine(3.0, rescale=0.5, perturbed_scale=perturbed_scale)
    rows = 3 * batch if perturbed_scale else 2 * batch
    model_output = randn(rows, *shape, seed=1, dtype=torch.float32).to(device)
    next_input = poisoned((3 * batch, *shape), torch.float32).to(device)
    next_input[:batch] = randn(batch, *shape, seed=0, dtype=torch.float32).to(device)
    x, x0_out = next_input[:batch], poisoned((batch, *shape), torch.float32).to(device)
    expected_x0 = poisoned(x.shape)
    expected = reference.guided_step(
        StepTensors(model_output.double().cpu(), x.double().cpu(), x0_out=expected_x0), STEP, combine
    )
    with running_on(backend, request):
        returned = ops.guided_step(model_output, x, STEP, combine, out=next_input, x0_out=x0_out)
    assert returned is next_input
    for block in next_input.cpu().split(batch):
        assert_close(block, expected, GUIDED_STEP, torch.float32)
    assert_close(x0_out.cpu(), expected_x0, GUIDED_STEP, torch.float32)


# --------------------------------------------------------------------------------------
# Per-sample statistics where a single-pass E[x²] − E[x]² would cancel
# --------------------------------------------------------------------------------------

# x_next = x0 = m: the step returns the guided prediction itself.
PREDICTION_STEP = StepCoefficients(alpha=0.75, sigma=math.sqrt(1 - 0.75**2), k_x0=1.0, prediction_type="sample")
REDUCING = {
    "cfg-rescale": GuidanceCombine(3.0, rescale=0.7),
    "zero-star": GuidanceCombine(3.0, variant="zero_star"),
    "apg-clip": GuidanceCombine(3.0, apg_eta=0.3, apg_norm_threshold=0.5, variant="apg"),
    "tangential": GuidanceCombine(3.0, variant="tangential"),
    "zero-star-rescale": GuidanceCombine(3.0, rescale=0.7, variant="zero_star"),
    "apg-rescale": GuidanceCombine(3.0, rescale=0.7, apg_eta=0.3, variant="apg"),
    "tangential-rescale": GuidanceCombine(3.0, rescale=0.7, variant="tangential"),
}
# Odd (the CUDA scalar path, 3 Triton parts), 16-byte vectors, and 32 parts (Triton's of
# 2 blocks each, the trailing ones empty).
REDUCTION_SHAPES = [(2, 3, (37, 41)), (2, 4, (36, 40)), (1, 3, (150, 151))]


def guided_prediction_step(backend, request, device, model_output, x, combine):
    """x_next = m on ``backend``, into a poisoned out (CPU tensors for the emulation)."""
    device = "cpu" if backend == "cuda-emulation" else device
    out = poisoned(x.shape, x.dtype).to(device)
    with running_on(backend, request):
        ops.guided_step(model_output.to(device), x.to(device), PREDICTION_STEP, combine, out=out)
    return out.cpu()


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("variant", list(REDUCING))
# (1, 3, (300, 301)): 5 blocks of 2048 a stats chunk, so the stats loop's last pair of
# blocks has its second past the chunk's end.
@pytest.mark.parametrize("shape", [*REDUCTION_SHAPES, (1, 3, (300, 301))], ids=str)
def test_reductions_at_large_mean_and_small_spread(backend, variant, shape, device, request):
    # c, u of mean 1e4 and spread 1e-2, where E[x²] − E[x]² in float32 keeps no digit of
    # the variance. The kernels' m = f·(α_c·c + α_v·v), f ≤ 1, has c and v = c − u exact
    # and rounds α_c, α_v, f and its three operations once each (≤ 5·2⁻²⁴·|c|); the
    # statistics, from exact deviations, put a few 2⁻²⁴ into f: within ε·|c|·4 (ε = 2⁻²³,
    # 4.8e-3) of the float64 result (measured ≤ 0.6·ε·|c|; the old single pass: ~1e3).
    # The torch backend reduces in float64 and rounds m once.
    batch, channels, spatial = shape
    cond = 1e4 + 1e-2 * randn(batch, channels, *spatial, seed=11)
    uncond = 1e4 + 1e-2 * randn(batch, channels, *spatial, seed=12)
    model_output = torch.cat([cond, uncond]).float()
    x = randn(batch, channels, *spatial, seed=13, dtype=torch.float32)
    combine = REDUCING[variant]
    expected = reference.guided_step(StepTensors(model_output.double(), x.double()), PREDICTION_STEP, combine)
    out = guided_prediction_step(backend, request, device, model_output, x, combine)
    tolerance = 4 * torch.finfo(torch.float32).eps * 1e4
    assert_close(out, expected, {torch.float32: (tolerance, 0.0)}, torch.float32)


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("variant", list(REDUCING))
@pytest.mark.parametrize("shape", REDUCTION_SHAPES, ids=str)
def test_reductions_when_cond_dwarfs_uncond(backend, variant, shape, device, request):
    # u of spread 1e-3 beside c with one value of 100 per sample. CFG-Zero*'s
    # s* = ⟨c, u⟩/‖u‖², rebuilt from the moments of (c, v = c − u) as ‖u‖² =
    # Σc² − 2Σc·v + Σv², kept no digit of ‖u‖² (up to 2.8e3·ε·100 off); from the moments of
    # (c, u) it is exact to a few ε. What remains is the elementwise pass's: it rounds
    # v = c − u (ε·|c|) and scales it by α_v = s*(w − 1), so the bound grows with |s*|
    # (measured ≤ 0.1 of it on Triton).
    batch, channels, spatial = shape
    cond = randn(batch, channels, *spatial, seed=11)
    cond.view(batch, -1)[:, 5] = 100.0
    uncond = 1e-3 * randn(batch, channels, *spatial, seed=12)
    model_output = torch.cat([cond, uncond]).float()
    x = randn(batch, channels, *spatial, seed=13, dtype=torch.float32)
    combine = REDUCING[variant]
    expected = reference.guided_step(StepTensors(model_output.double(), x.double()), PREDICTION_STEP, combine)
    out = guided_prediction_step(backend, request, device, model_output, x, combine)
    c, u = (t.double().flatten(1) for t in (cond, uncond))
    s_star = ((c * u).sum(1) / (u * u).sum(1)).abs().max().item()
    tolerance = 4 * torch.finfo(torch.float32).eps * 100 * (1 + (combine.scale - 1) * s_star)
    assert_close(out, expected, {torch.float32: (tolerance, 0.0)}, torch.float32)


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("shape", REDUCTION_SHAPES, ids=str)
def test_zero_star_at_a_large_scale_when_cond_is_close_to_uncond(backend, rescale, shape, device, request):
    # c ≈ u (‖c − u‖ = 1e-2·‖c‖) at w = 7.5, what trained models give. The moments of (c, u)
    # that CFG-Zero*'s s* needs (test_reductions_when_cond_dwarfs_uncond) cost some of the
    # accuracy that (c, v) had here: s* from two sums of independent rounding, and the
    # rescale's std of m = w·c + (1 − w)s*·u from w²-sized terms. Measured ≤ 3.2 ε
    # (≤ 13 ε with rescale) relative to max(|m|, 1); from (c, v) ≤ 1.3 ε (≤ 1.8 ε).
    batch, channels, spatial = shape
    cond = 1 + randn(batch, channels, *spatial, seed=11)
    uncond = cond + 1e-2 * randn(batch, channels, *spatial, seed=12)
    model_output = torch.cat([cond, uncond]).float()
    x = randn(batch, channels, *spatial, seed=13, dtype=torch.float32)
    combine = GuidanceCombine(7.5, rescale=rescale, variant="zero_star")
    expected = reference.guided_step(StepTensors(model_output.double(), x.double()), PREDICTION_STEP, combine)
    out = guided_prediction_step(backend, request, device, model_output, x, combine)
    error = ((out.double() - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
    assert error <= (6 if rescale == 0 else 30) * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("predictions", ["mean-1e4", "constant"])
@pytest.mark.parametrize("shape", REDUCTION_SHAPES, ids=str)
def test_perturbed_rescale_at_large_mean_and_when_constant(backend, predictions, shape, device, request):
    # The statistics of c and of the whole guidance term (w − 1)·(c − u) + s·(c − p): at mean
    # 1e4 and spread 1e-2 within the bound of test_reductions_at_large_mean_and_small_spread;
    # for constant c, u, p the guided m is constant (std 0), which rescale leaves as it is.
    batch, channels, spatial = shape
    combine = GuidanceCombine(3.0, rescale=0.7, perturbed_scale=2.0)
    x = randn(batch, channels, *spatial, seed=13, dtype=torch.float32)
    if predictions == "constant":
        model_output = torch.cat([torch.full((batch, channels, *spatial), v) for v in (0.5, 0.2, 0.3)])
        expected = reference.guided_step(
            StepTensors(model_output.double(), x.double()), PREDICTION_STEP, combine._replace(rescale=0.0)
        )
        tolerance = GUIDED_STEP
    else:
        model_output = torch.cat(
            [1e4 + 1e-2 * randn(batch, channels, *spatial, seed=seed) for seed in (11, 12, 14)]
        ).float()
        expected = reference.guided_step(StepTensors(model_output.double(), x.double()), PREDICTION_STEP, combine)
        tolerance = {torch.float32: (4 * torch.finfo(torch.float32).eps * 1e4, 0.0)}
    out = guided_prediction_step(backend, request, device, model_output, x, combine)
    assert_close(out, expected, tolerance, torch.float32)


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        *(
            (backend, dtype)
            for backend in backends_with_emulation("guided_step")
            for dtype in (torch.float32, torch.float16, torch.bfloat16)
        ),
        ("torch", torch.float64),  # tangential's float64 SVD leaves u constant only to ~1e-17
    ],
    ids=str,
)
@pytest.mark.parametrize("variant", ["cfg", "zero_star", "apg", "tangential"])
@pytest.mark.parametrize("shape", REDUCTION_SHAPES[:2], ids=str)
def test_rescale_leaves_a_constant_guided_prediction_unchanged(backend, dtype, variant, shape, device, request):
    # c = 0.5, u = 0.2 everywhere: std(m) = 0, so the policy leaves m as it is (f = 1),
    # where a cancelling variance divides noise by noise (a probe found Triton 0.58 off).
    batch, channels, spatial = shape
    model_output = torch.cat(
        [torch.full((batch, channels, *spatial), 0.5), torch.full((batch, channels, *spatial), 0.2)]
    ).to(dtype)
    x = randn(batch, channels, *spatial, seed=13, dtype=dtype)
    combine = GuidanceCombine(3.0, rescale=0.7, apg_eta=0.3 if variant == "apg" else 0.0, variant=variant)
    unchanged = reference.guided_step(
        StepTensors(model_output.double(), x.double()), PREDICTION_STEP, combine._replace(rescale=0.0)
    )
    out = guided_prediction_step(backend, request, device, model_output, x, combine)
    assert_close(out, unchanged, GUIDED_STEP, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 4, (128, 128)), (8, 3, (256, 256))], ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_guided_step_gpu_large_and_bf16(backend, dtype, shape, case):
    tensors, step, combine = case_inputs(CASES[case], *shape, dtype, "cuda")
    expected = run_reference(tensors, step, combine)
    with fastguide.backend(backend):
        ops.guided_step(**tensors, step=step, combine=combine)
    assert_outputs_match(tensors, expected)


# --------------------------------------------------------------------------------------
# The similarity output: cos(x̂0_c, x̂0_u) per sample, the two branches' x0 predictions,
# summed in the elementwise pass
# --------------------------------------------------------------------------------------

# c, u and x are read exactly in every storage dtype, and what rounds is float32 (the
# kernels' x0 predictions and sums, every backend's output): the float32 row of the step's
# table whatever the inputs.
SIMILARITY = {dtype: GUIDED_STEP[torch.float32] for dtype in GUIDED_STEP}
G = GuidanceCombine
# Every prediction type: epsilon, v_prediction, flow_prediction (also at its pure-noise
# start, alpha = 0) and sample; [c; u] and a separate guide; a learned-variance (2C)
# output and guide; u transformed by CFG-Zero*, tangential CFG and APG's momentum after
# the sums are taken; clip and the classifier shift, which the x0 predictions never see;
# rescale's stats pass.
SIMILARITY_CASES = {
    **{
        name: CASES[name]
        for name in [
            "cfg-ddim",
            "separate-guide",
            "ddpm-learned-var-grad",
            "zero-star-separate-learned-guide",
            "apg-momentum-clip",
            "tangential-rescale-guide",
            "cfgpp-renoise-eps-learned",
            "rescale",
            "cfg-and-classifier",
            "cfg-v-prediction",
            "cfgpp-renoise-v",
            "flow-cfg-history",
            "flow-pure-noise-clip",
            "flow-cfgpp-guide",
            "cfgpp-renoise-sample-guide-zero-star",
        ]
    },
    "sample-cfg-clip": dict(
        combine=G(3.0), step=dict(prediction_type="sample", clip_denoised=True, k_x0=0.7, k_eps=0.6)
    ),
    "v-apg-momentum-learned-var": dict(
        combine=G(4.0, apg_eta=0.3, apg_momentum=-0.4, variant="apg"),
        learned_variance=True,
        step=dict(
            prediction_type="v_prediction", k_x=0.2, k_x0=0.6, k_eps=0.3, k_noise=0.5, log_variance_range=(-5.0, -3.5)
        ),
    ),
}
# Odd (the CUDA scalar path and its tail), one element per channel, and several CUDA blocks
# (and 2 Triton programs) per sample on the vector path.
SIMILARITY_SHAPES = [(3, 3, (5, 7)), (1, 3, (1, 1)), (2, 4, (24, 24))]
WRITTEN = ("out", "x0_out", "apg_buffer")
# A step of each prediction type (on the path the type needs).
SIMILARITY_STEPS = {
    "epsilon": STEP,
    "v_prediction": StepCoefficients(alpha=0.6, sigma=0.8, k_x=0.9, k_x0=0.2, prediction_type="v_prediction"),
    "flow_prediction": StepCoefficients(alpha=0.35, sigma=0.65, k_x=0.9, k_x0=0.2, prediction_type="flow_prediction"),
    "sample": StepCoefficients(alpha=0.7, sigma=0.714, k_x=0.9, k_x0=0.2, clip_denoised=True, prediction_type="sample"),
}


def x0_cosine_of_inputs(tensors: dict, step: StepCoefficients) -> torch.Tensor:
    """cos(x̂0_c, x̂0_u) per sample in float64, written out from the inputs: c the model
    output's first B rows, u its second B rows or the guide, each over the first C
    channels, each turned into its x0 prediction with x and the step's alpha, sigma and
    prediction type, then the cosine."""
    batch, channels = tensors["x"].shape[:2]
    x = tensors["x"].cpu().double()
    model_output = tensors["model_output"].cpu().double()
    uncond = tensors["guide"].cpu().double() if "guide" in tensors else model_output[batch : 2 * batch]
    x0_c = x0_prediction(model_output[:batch, :channels], x, step)
    x0_u = x0_prediction(uncond[:, :channels], x, step)
    return torch.nn.functional.cosine_similarity(x0_c.flatten(1), x0_u.flatten(1), dim=1)


def step_with_similarity(backend: str, request, tensors: dict, step, combine) -> torch.Tensor:
    """The step on ``backend`` into a NaN-poisoned similarity, and again without asking for
    it on copies of the written tensors: what it writes there must not change, bit for bit.
    Returns the similarity (on the CPU)."""
    plain = {name: t.clone() if name in WRITTEN else t for name, t in tensors.items()}
    similarity = poisoned((tensors["x"].shape[0],), torch.float32).to(tensors["x"].device)
    with running_on(backend, request):
        ops.guided_step(**tensors, step=step, combine=combine, similarity=similarity)
        ops.guided_step(**plain, step=step, combine=combine)
    for name in WRITTEN:
        if name in tensors:
            torch.testing.assert_close(
                tensors[name],
                plain[name],
                rtol=0,
                atol=0,
                equal_nan=True,
                msg=f"{name} differs when similarity is asked for",
            )
    return similarity.cpu()


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        *(
            (backend, dtype)
            for backend in backends_with_emulation("guided_step")
            for dtype in (torch.float32, torch.float16, torch.bfloat16)
        ),
        ("torch", torch.float64),
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", SIMILARITY_SHAPES, ids=str)
@pytest.mark.parametrize("case", list(SIMILARITY_CASES))
def test_similarity_matches_float64_cosine_of_x0_predictions(backend, dtype, shape, case, device, request):
    device = "cpu" if backend == "cuda-emulation" else device
    tensors, step, combine = case_inputs(SIMILARITY_CASES[case], *shape, dtype, device)
    expected = run_reference(tensors, step, combine)
    similarity = step_with_similarity(backend, request, tensors, step, combine)
    assert_outputs_match(tensors, expected)
    assert_close(similarity, x0_cosine_of_inputs(tensors, step), SIMILARITY, dtype)


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize(
    "case",
    [
        "cfg-clip-noise",
        "apg-momentum-clip",
        "separate-guide",
        "tangential-rescale-guide",
        "cfg-v-prediction",
        "flow-cfgpp-guide",
        "sample-cfg-clip",
    ],
)
def test_similarity_channels_last(backend, case, device, request):
    device = "cpu" if backend == "cuda-emulation" else device
    tensors, step, combine = case_inputs({**CASES, **SIMILARITY_CASES}[case], 2, 5, (9, 11), torch.float32, device)
    to_cl = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    tensors = {name: tuple(map(to_cl, t)) if name == "history" else to_cl(t) for name, t in tensors.items()}
    expected = run_reference(tensors, step, combine)
    similarity = step_with_similarity(backend, request, tensors, step, combine)
    assert tensors["out"].is_contiguous(memory_format=torch.channels_last)
    assert_outputs_match(tensors, expected)
    assert_close(similarity, x0_cosine_of_inputs(tensors, step), SIMILARITY, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "case",
    [
        "cfg-ddim",
        "separate-guide",
        "apg-momentum-clip",
        "ddpm-learned-var-grad",
        "cfg-v-prediction",
        "flow-cfgpp-guide",
        "sample-cfg-clip",
    ],
)
def test_similarity_gpu_large(backend, dtype, case, request):
    # Many programs and blocks a sample (65536 elements), the compiled kernels' reductions.
    tensors, step, combine = case_inputs(SIMILARITY_CASES.get(case, CASES.get(case)), 16, 4, (128, 128), dtype, "cuda")
    expected = run_reference(tensors, step, combine)
    similarity = step_with_similarity(backend, request, tensors, step, combine)
    assert_outputs_match(tensors, expected)
    assert_close(similarity, x0_cosine_of_inputs(tensors, step), SIMILARITY, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("case", ["cfg-ddim", "rescale", "apg-momentum-clip", "ddpm-learned-var-grad"])
def test_guided_step_gpu_past_the_grid_limit(backend, case, request):
    # 70000 small samples (a digits sweep in one batch): past the 65535 blocks of a grid's
    # y axis, which the kernels once put the batch on; the stats pass and the similarity's
    # per-block sums too.
    tensors, step, combine = case_inputs(
        SIMILARITY_CASES.get(case, CASES.get(case)), 70000, 3, (4, 4), torch.float16, "cuda"
    )
    expected = run_reference(tensors, step, combine)
    similarity = step_with_similarity(backend, request, tensors, step, combine)
    assert_outputs_match(tensors, expected)
    assert_close(similarity, x0_cosine_of_inputs(tensors, step), SIMILARITY, torch.float16)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
@pytest.mark.parametrize("case", ["apg-momentum-clip", "tangential-rescale-guide", "ddpm-learned-var-grad"])
# (1, 3, (300, 301)): 5 blocks a stats chunk, the stats loop's int64 offsets.
@pytest.mark.parametrize("shape", [(2, 3, (5, 7)), (1, 3, (300, 301))], ids=str)
def test_triton_large_sample_variant_matches_reference(case, shape, device, request, monkeypatch):
    # A sample of 2³¹ elements (int64 offsets within it) cannot run here: its LARGE variant
    # of both kernels runs on small samples instead.
    monkeypatch.setattr(importlib.import_module("fastguide.kernels.guided_step"), "LARGE_SAMPLE", 0)
    tensors, step, combine = case_inputs(SIMILARITY_CASES.get(case, CASES.get(case)), *shape, torch.float32, device)
    expected = run_reference(tensors, step, combine)
    similarity = step_with_similarity("triton", request, tensors, step, combine)
    assert_outputs_match(tensors, expected)
    assert_close(similarity, x0_cosine_of_inputs(tensors, step), SIMILARITY, torch.float32)


def similarity_on(backend, request, device, model_output, x, combine=GuidanceCombine(3.0), guide=None, step=STEP):
    """The similarity of one step on ``backend`` (CPU tensors for the emulation)."""
    device = "cpu" if backend == "cuda-emulation" else device
    similarity = poisoned((x.shape[0],), torch.float32).to(device)
    guide = None if guide is None else guide.to(device)
    with running_on(backend, request):
        ops.guided_step(model_output.to(device), x.to(device), step, combine, guide=guide, similarity=similarity)
    return similarity.cpu()


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("prediction_type", list(SIMILARITY_STEPS))
def test_similarity_is_the_same_whatever_the_parameterisation(backend, prediction_type, device, request):
    # Two x0 guesses and an x: each prediction type's c and u that imply exactly them, so
    # that every parameterisation gives the cosine of the two guesses.
    step = SIMILARITY_STEPS[prediction_type]
    alpha, sigma = step.alpha, step.sigma
    batch, shape = 3, (4, 6, 9)
    x0_c, x0_u = randn(batch, *shape, seed=1), randn(batch, *shape, seed=2)
    x0_u = 0.6 * x0_c + 0.8 * x0_u  # cos ≈ 0.6
    x = alpha * x0_c + sigma * randn(batch, *shape, seed=0)

    def prediction(x0):
        eps = (x - alpha * x0) / sigma
        return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0, "flow_prediction": eps - x0}[
            prediction_type
        ]

    cond, uncond = prediction(x0_c).float(), prediction(x0_u).float()
    got = similarity_on(backend, request, device, torch.cat([cond, uncond]), x.float(), step=step)
    expected = torch.nn.functional.cosine_similarity(x0_c.flatten(1), x0_u.flatten(1), dim=1)
    # float32 inputs carry x0 to about 1e-6 relative (the maps divide by alpha or sigma ≈ 0.6).
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)
    assert_close(
        got,
        x0_cosine_of_inputs({"model_output": torch.cat([cond, uncond]), "x": x.float()}, step),
        SIMILARITY,
        torch.float32,
    )


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
def test_similarity_of_an_eps_model_at_high_noise_is_of_x0_not_of_eps(backend, device, request):
    # alpha = 5e-3: x ≈ σ·ε, so c and u, two eps predictions, have a raw cosine of ≈ 1 while
    # their x0 predictions (x − σ·ε)/α differ (cos ≈ 0.6). x0 must be formed elementwise
    # before the products: expanding Σ(x − σc)(x − σu)/α² into sums of x·x, x·c, ... would
    # cancel 1/α² = 4e4 times over in float32.
    alpha = 5e-3
    step = StepCoefficients(alpha=alpha, sigma=math.sqrt(1 - alpha**2), k_x0=1.0)
    sigma = step.sigma
    batch, shape = 2, (4, 24, 24)
    x0_c, x0_u = randn(batch, *shape, seed=1), randn(batch, *shape, seed=2)
    x0_u = 0.6 * x0_c + 0.8 * x0_u
    x = (alpha * randn(batch, *shape, seed=3) + sigma * randn(batch, *shape, seed=0)).float()
    cond = ((x.double() - alpha * x0_c) / sigma).float()
    uncond = ((x.double() - alpha * x0_u) / sigma).float()
    model_output = torch.cat([cond, uncond])
    got = similarity_on(backend, request, device, model_output, x, step=step)
    raw = torch.nn.functional.cosine_similarity(cond.double().flatten(1), uncond.double().flatten(1), dim=1)
    assert (raw > 0.9999).all() and (got < 0.7).all()
    assert_close(got, x0_cosine_of_inputs({"model_output": model_output, "x": x}, step), SIMILARITY, torch.float32)


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("layout", ["batched", "guide"])
def test_similarity_is_zero_where_an_x0_norm_is_zero(backend, prediction_type, layout, device, request):
    # Sample 0: x̂0_c = 0; sample 1: x̂0_u = 0 (sample: c = 0, resp. u = 0; epsilon: that
    # and x = 0); sample 2: both nonzero.
    step = SIMILARITY_STEPS[prediction_type]
    batch, shape = 3, (3, 5, 7)
    cond, uncond = randn(batch, *shape, seed=1), randn(batch, *shape, seed=2)
    cond[0], uncond[1] = 0.0, 0.0
    x = randn(batch, *shape, seed=0, dtype=torch.float32)
    if prediction_type == "epsilon":
        x[:2] = 0.0
    if layout == "batched":
        got = similarity_on(backend, request, device, torch.cat([cond, uncond]).float(), x, step=step)
    else:
        got = similarity_on(backend, request, device, cond.float(), x, guide=uncond.float(), step=step)
    assert got[:2].tolist() == [0.0, 0.0]
    assert_close(
        got[2:],
        x0_cosine_of_inputs({"model_output": cond[2:], "guide": uncond[2:], "x": x[2:]}, step),
        SIMILARITY,
        torch.float32,
    )


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("prediction_type", list(SIMILARITY_STEPS))
def test_similarity_is_nan_where_an_x0_prediction_is_not_finite(backend, prediction_type, device, request):
    # A (2B, 2C) output without log_variance_range: the variance channels are read by no
    # term, and the similarity never reads them (sample 3's are NaN and infinite). A NaN in
    # x reaches both x0 predictions, except for sample prediction (x0 = c, x unread).
    step = SIMILARITY_STEPS[prediction_type]
    batch, channels, spatial = 4, 3, (5, 7)
    model_output = randn(2 * batch, 2 * channels, *spatial, seed=1, dtype=torch.float32)
    model_output[0, 1, 2, 3] = math.nan  # c of sample 0
    model_output[batch + 1, 2, 4, 6] = -math.inf  # u of sample 1
    model_output[3, channels:] = math.nan
    model_output[batch + 3, channels:] = math.inf
    x = randn(batch, channels, *spatial, seed=0, dtype=torch.float32)
    x[2, 0, 1, 1] = math.nan
    got = similarity_on(backend, request, device, model_output, x, step=step)
    finite = [3] if prediction_type != "sample" else [2, 3]
    assert got[[i for i in range(batch) if i not in finite]].isnan().all()
    rows = finite + [batch + i for i in finite]
    assert_close(
        got[finite],
        x0_cosine_of_inputs({"model_output": model_output[rows], "x": x[finite]}, step),
        SIMILARITY,
        torch.float32,
    )


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
def test_similarity_whose_float32_sums_overflow_is_nan_on_the_kernels(backend, device, request):
    # |c| ~ 1e20, so |x̂0_c| ~ 1e20: its square overflows float32. The kernels' sums are
    # float32, so they give NaN rather than a finite 0; the reference sums in float64 and
    # gives the cosine.
    batch, shape = 2, (3, 5, 7)
    model_output = torch.cat([1e20 * randn(batch, *shape, seed=1), randn(batch, *shape, seed=2)]).float()
    x = randn(batch, *shape, seed=0, dtype=torch.float32)
    got = similarity_on(backend, request, device, model_output, x)
    if backend == "torch":
        assert_close(got, x0_cosine_of_inputs({"model_output": model_output, "x": x}, STEP), SIMILARITY, torch.float32)
    else:
        assert got.isnan().all()


def test_similarity_of_samples_without_elements_is_zero():
    x, model_output = torch.empty(2, 0, 3), torch.empty(4, 0, 3)
    similarity = poisoned((2,), torch.float32)
    ops.guided_step(model_output, x, STEP, GuidanceCombine(3.0), similarity=similarity)
    assert similarity.tolist() == [0.0, 0.0]


def test_opcheck_guided_step_with_similarity():
    # The schema declares similarity written: torch.library's checks of schema, fake and
    # functionalisation (torch.compile's view of the op) hold.
    model_output, x = torch.randn(4, 6, 5, 5), torch.randn(2, 3, 5, 5)
    tensors = StepTensors(model_output, x, out=torch.empty(2, 3, 5, 5), similarity=torch.empty(2))
    step = StepCoefficients(alpha=0.8, sigma=0.6, k_x=0.3, k_x0=0.7)
    for combine in (GuidanceCombine(3.0), GuidanceCombine(3.0, rescale=0.5, variant="zero_star")):
        torch.library.opcheck(
            torch.ops.fastguide.guided_step.default, (*contract.pack(tensors, step, combine), "torch")
        )


SIMILARITY_INPUTS = (randn(4, 3, 4, 4, seed=1, dtype=torch.float32), randn(2, 3, 4, 4, seed=0, dtype=torch.float32))


@pytest.mark.parametrize(
    "combine, similarity, error, message",
    [
        (None, torch.empty(2), ValueError, "similarity was given but combine is None"),
        (
            GuidanceCombine(3.0, perturbed_scale=2.0),
            torch.empty(2),
            ValueError,
            r"similarity is not available with combine.perturbed_scale = 2.0",
        ),
        (GuidanceCombine(3.0), [0.0, 0.0], TypeError, "similarity must be a torch.Tensor, got list"),
        (
            GuidanceCombine(3.0),
            torch.empty(2, dtype=torch.float64),
            TypeError,
            "similarity must have dtype torch.float32, got torch.float64",
        ),
        (GuidanceCombine(3.0), torch.empty(2).to_sparse(), TypeError, "similarity must be a dense"),
        (GuidanceCombine(3.0), torch.empty(3), ValueError, r"similarity must have shape \(2,\), one value per sample"),
        (GuidanceCombine(3.0), torch.empty(2, 1), ValueError, r"similarity must have shape \(2,\)"),
        (GuidanceCombine(3.0), torch.empty(4)[::2], ValueError, r"similarity must be contiguous, got strides \(2,\)"),
        (GuidanceCombine(3.0), torch.empty(2, device="meta"), ValueError, "similarity is on meta but x is on cpu"),
    ],
)
def test_similarity_validation(combine, similarity, error, message):
    model_output, x = SIMILARITY_INPUTS
    if combine is None:
        model_output = model_output[:2]
    elif combine.perturbed_scale:
        model_output = torch.cat([model_output, model_output[:2]])
    with pytest.raises(error, match=message):
        ops.guided_step(model_output, x, STEP, combine, similarity=similarity)
    tensors = StepTensors(model_output, x, out=torch.empty_like(x), similarity=similarity)
    for check in (_guided_step.check_step_layout, _guided_step.check_step_tensors):  # the sampling loop's door too
        with pytest.raises(error, match=message):
            check(tensors, STEP, combine)


def test_similarity_must_be_writable_memory_of_its_own():
    model_output, x = SIMILARITY_INPUTS
    with pytest.raises(ValueError, match="similarity must not require grad"):
        ops.guided_step(model_output, x, STEP, GuidanceCombine(3.0), similarity=torch.zeros(2, requires_grad=True))
    with pytest.raises(ValueError, match="similarity overlaps x in memory"):
        ops.guided_step(model_output, x, STEP, GuidanceCombine(3.0), similarity=x.view(-1)[5:7])
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="out overlaps similarity in memory"):
        ops.guided_step(model_output, x, STEP, GuidanceCombine(3.0), out=out, similarity=out.view(-1)[:2])


@pytest.mark.parametrize("backend", backends_with_emulation("guided_step"))
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_clipping_keeps_a_non_finite_x0_non_finite(backend, bad, device, request):
    # An fp16 model output that overflowed must not come out as a saturated, finite
    # sample: clip_denoised clamps finite x0 only (the NaN/Inf policy), on every backend.
    device = "cpu" if backend == "cuda-emulation" else device
    batch, shape = 2, (3, 4, 5)
    model_output = randn(2 * batch, *shape, seed=1, dtype=torch.float32).to(device)
    model_output[1, 2, 3, 4] = bad  # c of sample 1: its x0 there is non-finite
    x = randn(batch, *shape, seed=0, dtype=torch.float32).to(device)
    step = StepCoefficients(alpha=0.7, sigma=math.sqrt(1 - 0.49), k_x0=0.8, k_eps=0.6, clip_denoised=True)
    out, x0_out = poisoned(x.shape, torch.float32).to(device), poisoned(x.shape, torch.float32).to(device)
    with running_on(backend, request):
        ops.guided_step(model_output, x, step, GuidanceCombine(3.0), out=out, x0_out=x0_out)
    for got in (out.cpu(), x0_out.cpu()):
        assert not got[1, 2, 3, 4].isfinite()
        got[1, 2, 3, 4] = 0.0
        assert got.isfinite().all()  # every other element is clipped as before
    assert x0_out.abs().max() <= 1.0

"""Bad input raises a standard exception naming the argument: one test per rule."""

import math

import numpy as np
import pytest
import torch

from fastguide import ops
from fastguide.ops import _guided_step


def qkv(b=1, h=2, lq=5, lk=5, d=32, dtype=torch.float32):
    return (
        torch.randn(b, h, lq, d, dtype=dtype),
        torch.randn(b, h, lk, d, dtype=dtype),
        torch.randn(b, h, lk, d, dtype=dtype),
    )


# ---- attention ------------------------------------------------------------------------


def test_attention_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q must be 4-D"):
        ops.attention(q[0], k, v)


def test_attention_mismatched_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k must have shape"):
        ops.attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        ops.attention(q, k, v[:, :, :3])


def test_attention_mismatched_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        ops.attention(q, k.half(), v)


def test_attention_integer_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a floating tensor"):
        ops.attention(q.long(), k, v)


@pytest.mark.parametrize("head_dim", [12, 264, 4])
def test_attention_unsupported_head_dim(head_dim):
    q, k, v = qkv(d=head_dim)
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention(q, k, v)


def test_attention_non_finite_scale():
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.attention(*qkv(), scale=math.inf)


def test_attention_scale_beyond_float32():
    # finite in Python, inf in the kernels' float32 (NaN rows, differently on each backend)
    with pytest.raises(ValueError, match="scale must lie within float32's range"):
        ops.attention(*qkv(), scale=1e39)
    # within float32, but not once the kernels fold log2 e into it (NaN rows on Triton)
    with pytest.raises(ValueError, match=r"scale must lie within ±2\.359e\+38 \(float32's range over log2 e\)"):
        ops.attention(*qkv(), scale=3e38)


def test_attention_takes_a_numpy_scale():
    import numpy as np

    q, k, v = qkv()
    torch.testing.assert_close(ops.attention(q, k, v, scale=np.float32(0.5)), ops.attention(q, k, v, scale=0.5))


def test_attention_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        ops.attention(q, k, v.tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_attention_mismatched_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k is on"):
        ops.attention(q, k.cuda(), v)


# ---- group_norm -----------------------------------------------------------------------


def test_group_norm_channels_not_divisible():
    with pytest.raises(ValueError, match=r"channels of x \(10.*divisible by num_groups \(4\)"):
        ops.group_norm(torch.randn(2, 10, 3, 3), 4)


def test_group_norm_wrong_rank():
    with pytest.raises(ValueError, match="x must have at least 2 dims"):
        ops.group_norm(torch.randn(8), 2)


def test_group_norm_weight_shape():
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.group_norm(torch.randn(2, 8, 3, 3), 2, torch.ones(4))


def test_group_norm_scale_shape():
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 8\)"):
        ops.group_norm(torch.randn(2, 8, 3, 3), 2, scale=torch.zeros(8))


def test_group_norm_integer_tensor():
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        ops.group_norm(torch.ones(2, 8, 3, 3, dtype=torch.int32), 2)


def test_group_norm_bad_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.group_norm(torch.randn(2, 8, 3, 3), 2, activation="gelu")


@pytest.mark.parametrize("eps", [0.0, math.nan, -1e-5, 1e39, 1e-50])
def test_group_norm_bad_eps(eps):
    # 1e39 would be inf in the kernels' float32 statistics (and NaN on the reference); 1e-50
    # rounds to 0 there, and a constant group's variance + eps with it: NaN from finite input.
    with pytest.raises(ValueError, match="eps must be"):
        ops.group_norm(torch.randn(2, 8, 3, 3), 2, eps=eps)


@pytest.mark.parametrize("op", ["group_norm", "layer_norm"])
def test_norms_refuse_sparse_tensors(op):
    x = torch.randn(2, 4, 3)
    call = (lambda t: ops.group_norm(t, 2)) if op == "group_norm" else (lambda t: ops.layer_norm(t, 3))
    with pytest.raises(TypeError, match="x must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"):
        call(x.to_sparse())
    with pytest.raises(TypeError, match="scale must be a dense"):
        ops.layer_norm(x, 3, scale=torch.randn(2, 3).to_sparse())


def test_group_norm_bad_num_groups():
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        ops.group_norm(torch.randn(2, 8, 3, 3), 0)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        ops.group_norm(torch.randn(2, 8, 3, 3), 4.0)


def test_norm_sizes_may_be_numpy_integers_as_torchs_norms_take():
    # (a size read off a NumPy array; only eps and the step scalars took NumPy numbers)
    x = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(ops.group_norm(x, np.int64(4)), torch.nn.functional.group_norm(x, 4))
    tokens = x.flatten(1, 2)
    for shape in (np.int64(5), (np.int32(5),)):
        torch.testing.assert_close(
            ops.layer_norm(tokens, shape, eps=1e-5), torch.nn.functional.layer_norm(tokens, (5,))
        )


# ---- guided_step ----------------------------------------------------------------------

STEP = ops.StepCoefficients(alpha=0.8, sigma=0.6)
CFG = ops.GuidanceCombine(3.0)


def step_inputs(batch=2, rows=4, channels=3):
    return torch.randn(rows, channels, 4, 4), torch.randn(batch, channels, 4, 4)


def test_guided_step_batch_mismatch():
    model_output, x = step_inputs(rows=6)
    with pytest.raises(ValueError, match=r"model_output must have batch 2·2 = 4"):
        ops.guided_step(model_output, x, STEP, CFG)
    with pytest.raises(ValueError, match=r"without guidance \(combine=None\)"):
        ops.guided_step(model_output, x, STEP)
    with pytest.raises(ValueError, match="with a separate guide tensor"):
        ops.guided_step(model_output, x, STEP, CFG, guide=torch.randn(2, 3, 4, 4))


def test_guided_step_guide_checks():
    model_output, x = step_inputs(rows=2)
    with pytest.raises(ValueError, match="guide must have shape"):
        ops.guided_step(model_output, x, STEP, CFG, guide=torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="guide was given but combine is None"):
        ops.guided_step(model_output, x, STEP, guide=torch.randn(2, 3, 4, 4))


def test_guided_step_channel_mismatch():
    with pytest.raises(ValueError, match="model_output must have 3 or 6 channels"):
        ops.guided_step(torch.randn(4, 5, 4, 4), torch.randn(2, 3, 4, 4), STEP, CFG)


@pytest.mark.parametrize("name", ["alpha", "sigma", "k_x", "k_noise", "grad_eps_scale"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_guided_step_non_finite_step_scalar(name, value):
    with pytest.raises(ValueError, match=f"step.{name} must be finite"):
        ops.guided_step(*step_inputs(), STEP._replace(**{name: value}), CFG)


@pytest.mark.parametrize("name", ["scale", "rescale", "apg_eta", "perturbed_scale"])
def test_guided_step_non_finite_combine_scalar(name):
    with pytest.raises(ValueError, match=f"combine.{name} must be finite"):
        ops.guided_step(*step_inputs(), STEP, CFG._replace(**{name: math.nan}))


def test_guided_step_history_checks():
    model_output, x = step_inputs()
    with pytest.raises(ValueError, match="history holds 1 tensors but step.k_history 2 coefficients"):
        ops.guided_step(model_output, x, STEP._replace(k_history=(0.5, 0.2)), CFG, history=[x])
    with pytest.raises(ValueError, match=r"history\[1\] must have shape \(2, 3, 4, 4\)"):
        ops.guided_step(model_output, x, STEP._replace(k_history=(0.5, 0.2)), CFG, history=[x, torch.randn(2, 3, 4, 5)])
    with pytest.raises(ValueError, match="at most 4 coefficients"):
        ops.guided_step(model_output, x, STEP._replace(k_history=(0.1,) * 5), CFG, history=[x] * 5)
    with pytest.raises(TypeError, match="k_history must be a tuple"):
        ops.guided_step(model_output, x, STEP._replace(k_history=[0.5]), CFG, history=[x])
    with pytest.raises(ValueError, match=r"step.k_history\[0\] must be finite"):
        ops.guided_step(model_output, x, STEP._replace(k_history=(math.inf,)), CFG, history=[x])


def test_guided_step_wrong_types():
    with pytest.raises(TypeError, match="step must be a fastguide.ops.StepCoefficients"):
        ops.guided_step(*step_inputs(), dict(alpha=0.8, sigma=0.6))
    with pytest.raises(TypeError, match="combine must be a fastguide.ops.GuidanceCombine or None"):
        ops.guided_step(*step_inputs(), STEP, 3.0)


def test_guided_step_integer_tensor():
    model_output, x = step_inputs()
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        ops.guided_step(model_output, x.int(), STEP, CFG)


def test_guided_step_out_shape():
    model_output, x = step_inputs()
    with pytest.raises(ValueError, match="out must have shape"):
        ops.guided_step(model_output, x, STEP, CFG, out=torch.empty(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3, 4, 4\), \(4, 3, 4, 4\) or \(6, 3, 4, 4\)"):
        ops.guided_step(model_output, x, STEP, CFG, out=torch.empty(8, 3, 4, 4))
    with pytest.raises(ValueError, match="out must have shape"):
        ops.guided_step(model_output, x, STEP, CFG, out=torch.empty(6, 3, 4, 5))
    ops.guided_step(model_output, x, STEP, CFG, out=torch.empty(6, 3, 4, 4))  # a 3B out, each block x_next


# ---- guided_step with a perturbed prediction (PAG, skip-layer guidance) ----------------

PAG = ops.GuidanceCombine(3.0, perturbed_scale=2.0)


def test_guided_step_perturbed_prediction_is_the_third_block_of_model_output():
    model_output, x = step_inputs(rows=4)
    with pytest.raises(
        ValueError,
        match=r"model_output must have batch 3·2 = 6 \(\[cond; uncond; perturbed\] for x "
        r"of batch 2\) when combine.perturbed_scale is 2.0, got 4",
    ):
        ops.guided_step(model_output, x, STEP, PAG)
    with pytest.raises(ValueError, match=r"model_output must have batch 2·2 = 4"):  # [c; u; p] without s
        ops.guided_step(torch.randn(6, 3, 4, 4), x, STEP, CFG)
    ops.guided_step(torch.randn(6, 3, 4, 4), x, STEP, PAG, out=torch.empty(6, 3, 4, 4))


def test_guided_step_perturbed_prediction_refuses_a_separate_guide():
    model_output, x = step_inputs(rows=6)
    for rows in (6, 2):  # [c; u; p] or c alone beside the guide
        with pytest.raises(ValueError, match="guide must be None when combine.perturbed_scale is 2.0"):
            ops.guided_step(model_output[:rows], x, STEP, PAG, guide=torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("variant", ["zero_star", "apg", "tangential"])
def test_guided_step_perturbed_prediction_needs_the_cfg_variant(variant):
    model_output, x = step_inputs(rows=6)
    with pytest.raises(ValueError, match=f"combine.perturbed_scale is 2.0 but combine.variant is '{variant}'"):
        ops.guided_step(model_output, x, STEP, PAG._replace(variant=variant))


def test_guided_step_noise_shape():
    model_output, x = step_inputs()
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 3, 4, 4\)"):
        ops.guided_step(model_output, x, STEP._replace(k_noise=1.0), CFG, noise=torch.randn(2, 3, 4))


def test_guided_step_coefficient_without_tensor():
    model_output, x = step_inputs()
    with pytest.raises(ValueError, match="step.k_noise is 0.5 but noise was not given"):
        ops.guided_step(model_output, x, STEP._replace(k_noise=0.5), CFG)
    with pytest.raises(ValueError, match="combine.apg_momentum is -0.5 but apg_buffer was not given"):
        ops.guided_step(model_output, x, STEP, ops.GuidanceCombine(3.0, apg_momentum=-0.5, variant="apg"))


def test_guided_step_bad_prediction_type_and_variant():
    with pytest.raises(ValueError, match="step.prediction_type must be one of"):
        ops.guided_step(*step_inputs(), STEP._replace(prediction_type="eps"), CFG)
    with pytest.raises(ValueError, match="combine.variant must be one of"):
        ops.guided_step(*step_inputs(), STEP, ops.GuidanceCombine(3.0, variant="apg2"))


def test_guided_step_apg_settings_need_the_apg_variant():
    with pytest.raises(ValueError, match="combine.apg_eta is set but combine.variant is 'zero_star'"):
        ops.guided_step(*step_inputs(), STEP, ops.GuidanceCombine(3.0, apg_eta=0.5, variant="zero_star"))


def test_guided_step_learned_variance_needs_2c_channels():
    with pytest.raises(ValueError, match="log_variance_range needs a model_output with 2·3 channels"):
        ops.guided_step(*step_inputs(), STEP._replace(log_variance_range=(-2.0, -1.0)), CFG)


def test_guided_step_bad_alpha_sigma():
    with pytest.raises(ValueError, match="step.alpha must be positive to derive x0 from eps"):
        ops.guided_step(*step_inputs(), STEP._replace(alpha=0.0), CFG)
    with pytest.raises(ValueError, match="step.alpha must be non-negative"):
        ops.guided_step(*step_inputs(), STEP._replace(alpha=-0.1, prediction_type="sample"), CFG)
    with pytest.raises(ValueError, match="flow_prediction' needs a flow path, alpha \\+ sigma = 1"):
        ops.guided_step(*step_inputs(), STEP._replace(prediction_type="flow_prediction"), CFG)
    # A flow path's pure-noise start (alpha = 0) derives x0 without dividing by alpha.
    ops.guided_step(*step_inputs(), STEP._replace(alpha=0.0, sigma=1.0, prediction_type="flow_prediction"), CFG)
    with pytest.raises(ValueError, match="step.sigma must be positive"):
        ops.guided_step(*step_inputs(), STEP._replace(sigma=0.0, clip_denoised=True), CFG)


@pytest.mark.parametrize("name", ["model_output", "x"])
def test_guided_step_refuses_inputs_that_require_grad_under_grad_mode(name):
    """Not differentiable on any backend: a gradient through it would be the torch
    backend's alone (the kernels record no graph)."""
    model_output, x = step_inputs()
    given = {"model_output": model_output, "x": x}
    given[name] = given[name].clone().requires_grad_()
    with pytest.raises(ValueError, match=f"{name} requires grad, and guided_step is not differentiable"):
        ops.guided_step(given["model_output"], given["x"], STEP, CFG)
    with torch.no_grad():
        ops.guided_step(given["model_output"], given["x"], STEP, CFG)


def test_guided_step_written_tensors_must_be_writable_and_own_their_memory():
    model_output, x = step_inputs()
    with pytest.raises(ValueError, match="out has elements that share memory"):
        ops.guided_step(model_output, x, STEP, CFG, out=torch.zeros(1, 3, 1, 1).expand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="out must not require grad"):
        ops.guided_step(model_output, x, STEP, CFG, out=torch.randn(2, 3, 4, 4, requires_grad=True))
    apg = ops.GuidanceCombine(3.0, apg_momentum=-0.5, variant="apg")
    for alias in ("x", "noise"):
        noise = torch.randn(2, 3, 4, 4)
        buffer = x if alias == "x" else noise
        with pytest.raises(ValueError, match=f"apg_buffer overlaps {alias} in memory"):
            ops.guided_step(model_output, x, STEP._replace(k_noise=0.1), apg, noise=noise, apg_buffer=buffer)


def test_guided_step_history_must_be_a_sequence():
    with pytest.raises(TypeError, match="history must be a tuple or list of tensors"):
        ops.guided_step(*step_inputs(), STEP, CFG, history=None)


def test_guided_step_renoise_term_needs_a_guiding_prediction():
    model_output, x = step_inputs(rows=2)
    with pytest.raises(ValueError, match="step.k_guide_eps is 0.5 but there is no guiding prediction"):
        ops.guided_step(model_output, x, STEP._replace(k_guide_eps=0.5))


def test_validation_does_not_depend_on_what_was_validated_before():
    # Constants are checked once per value; a plain tuple or a bool equal to an earlier
    # valid value must still be refused.
    model_output, x = step_inputs()
    ops.guided_step(model_output, x, STEP._replace(k_x=1.0), CFG)
    with pytest.raises(TypeError, match="step must be a fastguide.ops.StepCoefficients"):
        ops.guided_step(model_output, x, tuple(STEP._replace(k_x=1.0)), CFG)
    with pytest.raises(TypeError, match="step.k_x must be a real number, got bool"):
        ops.guided_step(model_output, x, STEP._replace(k_x=True), CFG)
    with pytest.raises(TypeError, match="combine must be a fastguide.ops.GuidanceCombine"):
        ops.guided_step(model_output, x, STEP, tuple(CFG))


def test_guided_step_names_non_tensor_history_and_out():
    model_output, x = step_inputs()
    with pytest.raises(TypeError, match=r"history\[0\] must be a torch.Tensor, got NoneType"):
        ops.guided_step(model_output, x, STEP._replace(k_history=(0.1,)), CFG, history=(None,))
    with pytest.raises(TypeError, match="out must be a torch.Tensor, got list"):
        ops.guided_step(model_output, x, STEP, CFG, out=[1.0])


def test_guided_step_prediction_types_hold_alpha_and_sigma_to_their_path():
    # v = alpha·eps − sigma·x0 inverts only where alpha² + sigma² = 1; off it the samples are
    # silently off (a flow path's alpha = 0.4, sigma = 0.6 gave x0 8% small), so it is refused.
    with pytest.raises(ValueError, match=r"'v_prediction' needs a variance-preserving path, alpha² \+ sigma² = 1"):
        ops.guided_step(*step_inputs(), STEP._replace(alpha=0.4, sigma=0.6, prediction_type="v_prediction"), CFG)
    ops.guided_step(*step_inputs(), STEP._replace(prediction_type="v_prediction"), CFG)  # 0.8² + 0.6² = 1
    ops.guided_step(*step_inputs(), STEP._replace(alpha=0.4, sigma=0.6, prediction_type="sample"), CFG)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (STEP._replace(k_x=1e39), CFG), r"step.k_x must lie within float32's range"),
        (lambda: (STEP._replace(k_noise=-4e38), CFG), r"step.k_noise must lie within float32's range"),
        (lambda: (STEP._replace(k_history=(1e39,)), CFG), r"step.k_history\[0\] must lie within float32's range"),
        (lambda: (STEP, ops.GuidanceCombine(1e300)), r"combine.scale must lie within float32's range"),
        (
            lambda: (STEP, ops.GuidanceCombine(3.0, perturbed_scale=-1e39)),
            r"combine.perturbed_scale must lie within float32's range",
        ),
        # 1/alpha and 1/sigma reach the kernels as float32 too.
        (lambda: (STEP._replace(alpha=1e-39), CFG), "step.alpha must be positive to derive x0 from eps"),
        (lambda: (STEP._replace(sigma=1e-39, clip_denoised=True), CFG), "step.sigma must be positive to derive eps"),
    ],
)
def test_guided_step_scalars_must_be_float32_numbers(make, message):
    step, combine = make()
    model_output, x = step_inputs()
    with pytest.raises(ValueError, match=message):
        ops.guided_step(model_output, x, step, combine, history=[x] * len(step.k_history), noise=torch.randn_like(x))
    # At the edges of the range the step runs.
    ops.guided_step(model_output, x, STEP._replace(k_x=3e38, alpha=3e-38), ops.GuidanceCombine(-3e38))


def test_guided_step_refuses_a_learned_variance_guide_beside_a_plain_model_output():
    # The kernels read the guide in model_output's layout: a (B, 2C) guide beside a (B, C)
    # model output is read with the wrong channel stride (channels_last x on Triton).
    model_output, x = step_inputs(rows=2)
    with pytest.raises(ValueError, match=r"guide must have shape \(2, 3, ...\) or that of model_output"):
        ops.guided_step(model_output, x, STEP, CFG, guide=torch.randn(2, 6, 4, 4))
    ops.guided_step(torch.randn(2, 6, 4, 4), x, STEP, CFG, guide=torch.randn(2, 6, 4, 4))  # both learned
    ops.guided_step(torch.randn(2, 6, 4, 4), x, STEP, CFG, guide=torch.randn(2, 3, 4, 4))


def step_layout_tensors(device="cpu"):
    """The tensors of a guided multistep call as the sampling loop hands them over."""
    x2 = torch.randn(4, 3, 4, 4, device=device)
    return ops.StepTensors(
        torch.randn(4, 6, 4, 4, device=device),
        x2[:2],
        None,
        (torch.randn(2, 3, 4, 4, device=device),),
        torch.randn(2, 3, 4, 4, device=device),
        None,
        None,
        x2,
        torch.empty(2, 3, 4, 4, device=device),
    )


LAYOUT_STEP = STEP._replace(k_x=0.5, k_history=(0.2,), k_noise=0.1)


def test_step_layout_reads_no_tensor_data():
    # It runs every model call of the sampling loop: shapes, dtypes and devices only, so it
    # passes on meta tensors, which have no data to read or synchronise on.
    _guided_step.check_step_layout(step_layout_tensors("meta"), LAYOUT_STEP, CFG)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(guide=torch.randn(2, 6, 4, 4)), ValueError, "model_output must have batch 2"),
        (dict(model_output=torch.randn(4, 5, 4, 4)), ValueError, "model_output must have 3 or 6 channels"),
        (dict(history=(torch.randn(2, 3, 4, 5),)), ValueError, r"history\[0\] must have shape \(2, 3, 4, 4\)"),
        (dict(history=(torch.randn(2, 3, 4, 4).int(),)), TypeError, r"history\[0\] must be a floating tensor"),
        (dict(history=(torch.randn(2, 3, 4, 4).to_sparse(),)), TypeError, r"history\[0\] must be a dense"),
        (
            dict(history=(torch.randn(2, 3, 4, 4, device="meta"),)),
            ValueError,
            r"history\[0\] is on meta but x is on cpu",
        ),
        (dict(history=()), ValueError, "history holds 0 tensors but step.k_history 1"),
        (dict(noise=None), ValueError, "step.k_noise is 0.1 but noise was not given"),
        (dict(x0_out=torch.empty(2, 3, 4)), ValueError, r"x0_out must have shape \(2, 3, 4, 4\)"),
        (dict(out=torch.empty(3, 3, 4, 4)), ValueError, "out must have shape"),
        (dict(model_output=torch.randn(4, 6, 4, 4, device="meta")), ValueError, "model_output is on meta"),
    ],
)
def test_step_layout_names_what_the_kernels_would_misread(change, error, message):
    tensors = step_layout_tensors()._replace(**change)
    with pytest.raises(error, match=message):
        _guided_step.check_step_layout(tensors, LAYOUT_STEP, CFG)
    with pytest.raises(error, match=message):  # the op's own per-call check runs the same rules
        _guided_step.check_step_tensors(tensors, LAYOUT_STEP, CFG)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(), r"model_output must have batch 3·2 = 6"),
        (dict(model_output=torch.randn(6, 6, 4, 4), guide=torch.randn(2, 6, 4, 4)), "guide must be None"),
        (dict(model_output=torch.randn(6, 6, 4, 4), out=torch.empty(8, 3, 4, 4)), "out must have shape"),
    ],
)
def test_step_layout_checks_the_perturbed_layout(change, message):
    # The sampling loop's door checks [c; u; p] as the op does.
    tensors = step_layout_tensors()._replace(**change)
    for check in (_guided_step.check_step_layout, _guided_step.check_step_tensors):
        with pytest.raises(ValueError, match=message):
            check(tensors, LAYOUT_STEP, PAG)
    x3 = torch.randn(6, 3, 4, 4)  # the loop's 3B buffer: x its first B rows, out all of it
    _guided_step.check_step_tensors(
        step_layout_tensors()._replace(model_output=torch.randn(6, 6, 4, 4), x=x3[:2], out=x3), LAYOUT_STEP, PAG
    )

"""The static report's own rules: which csrc/ kernels it holds to the in-flight floor."""

import pytest

pytest.importorskip("triton")  # (the report compiles Triton kernels; its rules need no GPU)

from tools import kernel_report  # noqa: E402


@pytest.mark.parametrize(
    "name, held",
    [
        ("guided_step_kernel<fp16, 8, 0, CommonReads<false, false>>", True),
        ("guided_step_kernel<fp16, 1, 4, RuntimeReads>", False),  # kVec = 1: unaligned tensors
        ("channel_sums_nchw_kernel<fp16, SumsMode=0, 8>", True),
        # no kVec template argument, yet a whole tensor streamed: held (it once was not)
        ("channel_sums_nhwc_kernel<fp16, SumsMode=1>", True),
        ("layer_norm_column_sums_kernel<bf16>", True),
        # merges of per-group or per-sample partials
        ("forward_statistics_kernel", False),
        ("backward_group_kernel", False),
        ("sample_coefficients_kernel<true>", False),
    ],
)
def test_every_csrc_kernel_that_streams_a_tensor_is_held_to_the_floor(name, held):
    assert kernel_report.held_to_floor(name) is held

"""Tolerances (atol, rtol) per op and dtype against the float64 reference: the one place."""

import torch

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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, table: dict, dtype: torch.dtype) -> None:
    atol, rtol = table[dtype]
    assert not actual.isnan().any(), "output holds NaN: some elements were never written"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)

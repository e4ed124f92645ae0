"""Which backends a test parametrises over: torch always, plus each that can run here."""

import torch

from fastguide import backends, ops


def backends_for(op: str) -> list[str]:
    """Backends that can run ``op`` on this machine's test device (torch always)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = ["torch"]
    for name in ("triton", "cuda"):
        if ops._HAS_KERNEL[op][name] and backends.why_not(name, device) is None:
            found.append(name)
    return found


def backend_dtype_params(op: str, dtypes: list[torch.dtype]) -> list[tuple[str, torch.dtype]]:
    """(backend, dtype) pairs to test; float64 only on the torch backend (the kernels' dtypes
    are fp32/fp16/bf16)."""
    return [(b, d) for b in backends_for(op) for d in dtypes if b == "torch" or d != torch.float64]

"""Test configuration shared by every test module.

- Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which must be set before
  triton is first imported; on a machine with a GPU they compile for real instead, and
  the attention kernel autotunes over one config (FASTGUIDE_AUTOTUNE=off).
- Every test runs with PyTorch's deterministic mode, whose fill_uninitialized_memory
  makes torch.empty return NaN-filled memory: an op that leaves part of its output
  unwritten fails its comparison. Buffers passed in by the tests are poisoned explicitly.
- cuDNN's TF32 convolutions are off (PyTorch turns them on by default): tests compare CUDA
  runs with CPU runs, eager with compiled, in float32, and a UNet's TF32 rounding, ~1e-3
  relative and amplified ~160x by 1/alpha at t = 999, moved sampled images by 0.03-0.3 on
  the H200 (2026-12-04). Matmuls keep PyTorch's float32 default.
- ``gpu`` tests skip cleanly without CUDA (the root conftest.py).
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
# Under pytest-xdist each worker takes its share of the cores for torch's intra-op threads
# (and passes it on to the processes it starts), rather than every worker taking them all:
# two workers of two threads each on two cores took 567 s for the suite, not 436, and 1.9x
# the CPU time on tests/apps (2026-12-07), most of it OpenMP threads waiting on each other.
# A thread count the user set stays.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)
    # Inductor's compile pool too (read when torch._inductor.config is first imported,
    # after this): otherwise each of 8 workers on the GPU machine's 16 cores starts 16.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(_threads))
# On a GPU, the attention kernel autotunes over one config in tests (benchmarks never do).
os.environ.setdefault("FASTGUIDE_AUTOTUNE", "off")

import pytest  # noqa: E402

from fastguide.ops import backends  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def _float32_convolutions():
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    backends._global_choice = None  # back to FASTGUIDE_BACKEND / auto


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

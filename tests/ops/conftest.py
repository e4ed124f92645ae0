"""Fixtures of the op tests: the CUDA emulation (tests/ops/cuda_emulation/), built once per
session, and the switch that routes fastguide.ops' cuda backend onto it."""

import contextlib
import platform
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

from fastguide.ops import cuda_backend, dispatch, extension

EMULATION_DIR = Path(__file__).parent / "cuda_emulation"
HOST_NAMESPACE = "fastguide_cuda_host"


def _build_emulated_extension() -> None:
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=extension.build_name(HOST_NAMESPACE, [extension.source_dir(), EMULATION_DIR]),
        sources=[
            str(extension.source_dir() / "bindings.cpp"),
            str(EMULATION_DIR / "emulated_guided_step.cpp"),
            str(EMULATION_DIR / "emulated_group_norm.cpp"),
            str(EMULATION_DIR / "emulated_layer_norm.cpp"),
            str(EMULATION_DIR / "emulator.cpp"),
        ],
        # (a grid of 3 rows along y: the kernels' loops over more rows than the grid has run)
        extra_cflags=[
            "-O2",
            "-DFASTGUIDE_HOST_HARNESS",
            "-DFASTGUIDE_MAX_GRID_Y=3",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unknown-pragmas",
        ],
        extra_include_paths=[str(EMULATION_DIR)],
        is_python_module=False,
    )


@pytest.fixture(scope="session")
def host_harness():
    """The op namespace of csrc/'s kernels compiled for the CPU emulation."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the CUDA emulation's fiber switch is x86-64 assembly")
    _build_emulated_extension()
    return getattr(torch.ops, HOST_NAMESPACE)


@pytest.fixture(scope="session")
def on_cuda_emulation(host_harness) -> Callable[[], AbstractContextManager[None]]:
    """A context manager factory: inside, guided_step and group_norm run on the cuda
    backend's glue and bindings with the emulated kernels (attention as under auto)."""

    @contextlib.contextmanager
    def routed() -> Iterator[None]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cuda_backend, "_ops", lambda: host_harness)
            patch.setattr(
                dispatch,
                "backend_for",
                lambda op, device, dtype, empty=False: "torch" if op == "attention" or empty else "cuda",
            )
            yield

    return routed


@pytest.fixture
def cuda_backend_on_cpu(on_cuda_emulation):
    with on_cuda_emulation():
        yield

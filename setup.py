"""Build hook: the pure-Python package always; the CUDA extension only when asked.

`pip install .` needs no compiler and no GPU. `FASTGUIDE_BUILD_CUDA=1 pip install
--no-build-isolation .` compiles csrc/'s sources (as fastguide/ops/extension.py lists them) into the extension
`fastguide._C` against the installed CUDA build of torch, for the architectures in
`FASTGUIDE_CUDA_ARCHS` (default "80;90"; 80 at least), with the newest one's PTX for
newer GPUs.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def build_lists():
    """fastguide/ops/extension.py, loaded on its own (the package is not importable before
    it is installed): the one place that names the sources and compiler flags, which the
    just-in-time build uses too."""
    spec = importlib.util.spec_from_file_location("_fastguide_extension", ROOT / "fastguide" / "ops" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extensions():
    if os.environ.get("FASTGUIDE_BUILD_CUDA", "0") != "1":
        return [], {}
    try:
        import torch
    except ImportError as error:
        raise RuntimeError(
            "FASTGUIDE_BUILD_CUDA=1 builds against the installed torch: install torch (a CUDA build) "
            "first and pass --no-build-isolation to pip"
        ) from error
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    lists = build_lists()
    # The bindings (host compiler) and the kernels (nvcc); the .cuh headers are included.
    sources = [f"csrc/{name}" for name in lists.BINDING_SOURCES + lists.KERNEL_SOURCES]

    if torch.version.cuda is None:
        raise RuntimeError(
            f"FASTGUIDE_BUILD_CUDA=1 needs a CUDA build of torch; this one ({torch.__version__}) is a CPU build"
        )
    if CUDA_HOME is None:
        raise RuntimeError("FASTGUIDE_BUILD_CUDA=1 needs the CUDA toolkit (nvcc): none found, set CUDA_HOME")

    archs = [a.strip() for a in os.environ.get("FASTGUIDE_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    if not archs or not all(a.isdigit() and int(a) >= 80 for a in archs):
        raise RuntimeError(
            f"FASTGUIDE_CUDA_ARCHS must list compute capabilities of 80 or more (the kernels use "
            f"sm_80's bfloat16 arithmetic and cp.async), e.g. '80;90', got {os.environ['FASTGUIDE_CUDA_ARCHS']!r}"
        )
    # Machine code for each, and the newest one's PTX, which the driver compiles for GPUs
    # newer than every listed one (sm_100, sm_120) instead of failing with "no kernel image".
    newest = max(archs, key=int)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    extension = CUDAExtension(
        "fastguide._C",
        sources,
        # the just-in-time build's flags; torch adds the C++ standard its headers need
        extra_compile_args={"cxx": list(lists.HOST_FLAGS), "nvcc": [*lists.NVCC_FLAGS, *gencode]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build hook: the pure-Python package always; the CUDA extension only when asked.

`pip install .` needs no compiler and no GPU. `FASTGUIDE_BUILD_CUDA=1 pip install
--no-build-isolation .` compiles every source under csrc/ into the extension
`fastguide._C` against the installed CUDA build of torch, for the architectures in
`FASTGUIDE_CUDA_ARCHS` (default "80;90").
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def cuda_extensions():
    if os.environ.get("FASTGUIDE_BUILD_CUDA", "0") != "1":
        return [], {}
    # The kernels (.cu, compiled by nvcc) and the bindings (.cpp); .cuh headers are included.
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp"))
    if not sources:
        raise RuntimeError(
            "FASTGUIDE_BUILD_CUDA=1 was given but csrc/ holds no .cu or .cpp sources to build"
        )
    try:
        import torch
    except ImportError as error:
        raise RuntimeError(
            "FASTGUIDE_BUILD_CUDA=1 builds against the installed torch: install torch (a CUDA build) "
            "first and pass --no-build-isolation to pip"
        ) from error
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise RuntimeError(
            f"FASTGUIDE_BUILD_CUDA=1 needs a CUDA build of torch; this one ({torch.__version__}) is a CPU build"
        )
    if CUDA_HOME is None:
        raise RuntimeError("FASTGUIDE_BUILD_CUDA=1 needs the CUDA toolkit (nvcc): none found, set CUDA_HOME")

    archs = os.environ.get("FASTGUIDE_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    extension = CUDAExtension(
        "fastguide._C",
        sources,
        # the same flags as fastguide/extension.py's just-in-time build
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-std=c++17", *gencode]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

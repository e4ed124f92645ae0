"""The compiled extension behind the ``cuda`` backend: find it, or build it.

Two ways to get it:
- ahead of time: ``FASTGUIDE_BUILD_CUDA=1 pip install --no-build-isolation .`` builds
  ``fastguide._C`` against the installed torch (setup.py, CUDAExtension with ninja,
  architectures from ``FASTGUIDE_CUDA_ARCHS``, default "80;90");
- just in time: on the first use of the cuda backend, ``torch.utils.cpp_extension.load``
  compiles csrc/ with ninja for the GPU at hand, into torch's extension cache
  (``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions), where later runs find it.
Loading either registers the ``torch.ops.fastguide_cuda`` ops that fastguide.ops.cuda_backend
calls. Nothing is built or loaded at ``import fastguide``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

OPS_NAMESPACE = "fastguide_cuda"
KERNEL_SOURCES = ("guided_step.cu", "group_norm.cu", "layer_norm.cu")  # nvcc; no torch headers
BINDING_SOURCES = ("bindings.cpp",)  # the host compiler, against torch's headers
NVCC_FLAGS = ("-O3", "--use_fast_math")  # torch adds the C++ standard its headers need
HOST_FLAGS = ("-O3",)
# The static check (tools/kernel_report.py): each kernel source on its own,
# with the half-type restrictions torch's extension builds add, warnings as errors.
KERNEL_CHECK_FLAGS = (
    "-std=c++17",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-Werror",
    "all-warnings",
    "-Xcompiler",
    "-Wall,-Wextra,-Werror",
)

_loaded = False
# Why loading or building the extension failed in this process: said again at every later
# call, which neither retries (a failed build costs the whole compile) nor loads anything.
_failure: str | None = None
REBUILD_HINT = "FASTGUIDE_BUILD_CUDA=1 pip install --no-build-isolation ."


def source_dir() -> Path:
    """csrc/, wherever it lives: the source tree, or the installed package data."""
    spec = importlib.util.find_spec("fastguide.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fastguide's CUDA sources (package fastguide.csrc) are not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _cuda_homes() -> list[Path]:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return [Path(home) for home in homes if home]


def nvcc() -> str | None:
    """nvcc under CUDA_HOME / CUDA_PATH / /usr/local/cuda, else the one on PATH."""
    for home in _cuda_homes():
        if (home / "bin" / "nvcc").exists():
            return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include() -> Path:
    """The toolkit's include directory (cuda_runtime_api.h)."""
    candidates = _cuda_homes()
    compiler = nvcc()
    if compiler is not None:
        candidates.append(Path(os.path.realpath(compiler)).parent.parent)
    for home in candidates:
        if (home / "include" / "cuda_runtime_api.h").exists():
            return home / "include"
    raise RuntimeError("the CUDA toolkit's headers were not found (set CUDA_HOME)")


def kernel_check_command(source: str, arch: int, cubin: Path) -> list[str]:
    """nvcc compiling one kernel source on its own for sm_<arch> into a cubin, warnings as errors."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found (put the CUDA toolkit's bin on PATH, or set CUDA_HOME)")
    return [
        compiler,
        *NVCC_FLAGS,
        *KERNEL_CHECK_FLAGS,
        "-cubin",
        f"-arch=sm_{arch}",
        "-o",
        str(cubin),
        str(source_dir() / source),
    ]


def bindings_check_command(torch_include: Path) -> list[str]:
    """The host compiler checking bindings.cpp against a CUDA build's torch/include, warnings
    as errors (syntax only: nothing is linked)."""
    cxx = shutil.which("c++") or shutil.which("g++") or "c++"
    standard = "-std=c++20" if "C++20" in (torch_include / "ATen" / "ATen.h").read_text() else "-std=c++17"
    return [
        cxx,
        standard,
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-isystem",
        str(torch_include),
        "-isystem",
        str(torch_include / "torch" / "csrc" / "api" / "include"),
        "-isystem",
        str(cuda_include()),
        *(str(source_dir() / name) for name in BINDING_SOURCES),
    ]


def _find_prebuilt() -> str | None:
    try:
        spec = importlib.util.find_spec("fastguide._C")
    except ModuleNotFoundError:
        return None
    return None if spec is None else spec.origin


# Looked up at import (a spec lookup loads nothing): backend resolution asks for it while
# torch.compile traces an op call, and dynamo refuses to trace find_spec.
_PREBUILT_PATH = _find_prebuilt()


def prebuilt_path() -> str | None:
    """The ahead-of-time build fastguide._C, when installed (looked up once, at import)."""
    return _PREBUILT_PATH


def why_not_buildable() -> str | None:
    """What a just-in-time build lacks on this machine; None when it can build."""
    if torch.version.cuda is None:
        build = "a ROCm" if getattr(torch.version, "hip", None) else "a CPU"
        return f"this torch ({torch.__version__}) is {build} build; the CUDA extension needs a CUDA build of torch"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (install one with nvcc, or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if not any(shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++") if name):
        return "no C++ compiler found ($CXX, c++ or g++)"
    return None


def why_not_available() -> str | None:
    """None when the extension is built or can be built here, else the reason: what a
    build lacks, or how this process's load or build of it failed."""
    return _failure or _why_not_at_start()


@functools.lru_cache(maxsize=None)
def _why_not_at_start() -> str | None:
    """``why_not_available`` before any load: asked on every op call under the cuda
    backend, so answered once per process (a build check runs ninja)."""
    if prebuilt_path() is not None:
        return None
    reason = why_not_buildable()
    if reason is None:
        return None
    return f"fastguide._C is not built ({REBUILD_HINT}) and cannot be built now: {reason}"


def prebuilt_loads() -> bool:
    """Whether the ahead-of-time build fastguide._C is installed and loads: ``auto`` runs
    the cuda backend only then. Loaded on the first eager ask (the op call would load it
    next); a library that does not load (built against another torch, say) is warned
    about once, and ``auto`` runs another backend. Under a trace, a load not yet tried
    counts as loading (nothing is loaded while torch.compile traces)."""
    if prebuilt_path() is None:
        return False
    if torch.compiler.is_compiling():  # (reads no _loaded: a guard on it would recompile after the load)
        return _failure is None
    if _loaded:
        return True
    if _failure is not None:
        return False
    try:
        load()
    except RuntimeError as error:
        warnings.warn(f"{error}; the auto backend runs triton or torch instead", RuntimeWarning, stacklevel=2)
        return False
    return True


def build_name(prefix: str, directories: list[Path]) -> str:
    """prefix + a digest of every file in directories: torch's build cache tracks only the
    listed sources, not the headers they include, so a changed header needs a new name."""
    digest = hashlib.sha256()
    for directory in directories:
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix in (".cu", ".cuh", ".cpp", ".h"):
                digest.update(path.name.encode() + path.read_bytes())
    return f"{prefix}_{digest.hexdigest()[:12]}"


def load() -> None:
    """Register the fastguide_cuda ops: load fastguide._C, or build it (once, cached).
    RuntimeError naming the extension when it cannot; a failure is not retried."""
    global _loaded, _failure
    if _loaded:
        return
    if _failure is not None:
        raise RuntimeError(_failure)
    path = prebuilt_path()
    if path is None and (reason := why_not_buildable()) is not None:
        raise RuntimeError(f"the cuda backend needs the extension fastguide._C: {reason}")
    try:
        if path is not None:
            torch.ops.load_library(path)
        else:
            _build()
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if path is not None:
            _failure = (
                f"the cuda backend's extension fastguide._C ({path}) does not load: {first_line} "
                f"(rebuild it against this torch, {torch.__version__}: {REBUILD_HINT})"
            )
        else:
            _failure = (
                f"the cuda backend's extension fastguide._C failed to build just in time: {first_line} "
                "(the compiler's output is in the error chained to this one; "
                f"or build it ahead of time: {REBUILD_HINT})"
            )
        raise RuntimeError(_failure) from error
    _loaded = True


def _build() -> None:
    """Compile csrc/ into torch's extension cache and load it (torch.utils.cpp_extension)."""
    from torch.utils import cpp_extension

    sources = source_dir()
    name = build_name(OPS_NAMESPACE, [sources])
    with _build_lock(_build_directory(name)):
        cpp_extension.load(
            name=name,
            sources=[str(sources / file) for file in BINDING_SOURCES + KERNEL_SOURCES],
            extra_cflags=list(HOST_FLAGS),  # torch picks the C++ standard its headers need
            extra_cuda_cflags=list(NVCC_FLAGS),
            is_python_module=False,
        )


def _build_directory(name: str) -> Path | None:
    """The folder torch's extension cache builds ``name`` in (None where this torch does
    not say: its helper is private)."""
    from torch.utils import cpp_extension

    locate = getattr(cpp_extension, "_get_build_directory", None)
    try:
        return None if locate is None else Path(locate(name, False))
    except (OSError, TypeError):
        return None


@contextlib.contextmanager
def _build_lock(directory: Path | None) -> Iterator[None]:
    """Held around a build: one builder at a time, and a build stopped midway does not
    hang the next. torch's own lock is a file ("lock") that a builder killed midway
    leaves behind, and every later build waits on it forever. This one is a flock, which
    the kernel releases when its holder dies; under it, no other fastguide build runs, so
    a "lock" file there is a stopped build's, and is removed."""
    try:
        import fcntl
    except ImportError:  # (not on Windows: torch's lock alone)
        fcntl = None  # type: ignore[assignment]
    if directory is None or fcntl is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "fastguide.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            print(
                f"fastguide: waiting for another process's build of the cuda extension in {directory}",
                file=sys.stderr,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
            locked = True
        except OSError:  # a file system without flock: torch's lock alone
            locked = False
        try:
            stale = directory / "lock"
            if locked and stale.exists():
                warnings.warn(
                    f"removed {stale}, left by a build of the cuda extension that was stopped midway "
                    "(no other build of it is running)",
                    RuntimeWarning,
                    stacklevel=4,
                )
                stale.unlink(missing_ok=True)
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)

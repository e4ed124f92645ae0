"""The checkout's top-level kernels/ folder (installed as fastguide.kernels) must not shadow
Hugging Face's ``kernels`` package for anything run from the repository root.

From the root, ``sys.path`` starts with the root (``python -c``, ``python -m fastguide``,
and pytest, whose rootdir conftest.py puts it there), so ``import kernels`` finds the
folder first. diffusers and transformers count ``kernels`` as available when
``importlib.util.find_spec`` finds a module and the ``kernels`` distribution is installed
(transformers >= 5 requires it), then ``from kernels import CUDAProperties`` failed on
the folder: resolving ``diffusers.StableDiffusionPipeline`` raised. kernels/__init__.py
now hands the name to the real package, or, when there is none, leaves an empty stand-in
that reads as "not installed" (on the H200 image, without Hugging Face's ``kernels`` and
with peft, raising there broke every diffusers model import: transformers' availability
check imports the name and lets the error through).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPO_KERNELS = ROOT / "kernels"


def run_from_root(code: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in the repository root, where sys.path[0] is the root."""
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# Prepended to run_from_root's code: hides an installed Hugging Face ``kernels`` (its files
# and its distribution) so that the run sees a machine without it, as the GPU image is.
WITHOUT_HUGGINGFACE_KERNELS = """
import importlib.machinery, importlib.metadata, os
_find_spec, _version = importlib.machinery.PathFinder.find_spec, importlib.metadata.version
def _find_spec_here_only(name, path=None, target=None):
    spec = _find_spec(name, path, target)
    elsewhere = spec is not None and os.path.dirname(os.path.realpath(spec.origin)) != os.path.realpath("kernels")
    return None if name == "kernels" and elsewhere else spec
def _version_without_kernels(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)
importlib.machinery.PathFinder.find_spec = _find_spec_here_only
importlib.metadata.version = _version_without_kernels
"""


def is_repo_folder(file: str | None) -> bool:
    return file is not None and Path(file).resolve().parent == REPO_KERNELS


def test_diffusers_pipelines_resolve_from_the_repository_root():
    for name in ("diffusers", "transformers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name}")
    result = run_from_root(
        "import diffusers\n"
        "diffusers.StableDiffusionPipeline\n"
        "from diffusers import PixArtAlphaPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline\n"
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_import_kernels_from_the_repository_root_is_not_the_folder():
    result = run_from_root(
        "import sys\n"
        "assert sys.path[0] == '', sys.path[0]\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as error:\n"
        "    assert error.name == 'kernels', error.name\n"
        "    print('not found')\n"
        "else:\n"
        "    print(getattr(kernels, '__file__', None))\n"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = result.stdout.strip()
    assert found in ("not found", "None") or not is_repo_folder(found), found


def test_without_huggingface_kernels_the_name_reads_as_not_installed():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers")
    result = run_from_root(
        WITHOUT_HUGGINGFACE_KERNELS + "from transformers.utils import import_utils\n"
        "if not hasattr(import_utils, 'is_kernels_available'):\n"
        "    print('transformers looks for no kernels package')\n"
        "    raise SystemExit(0)\n"
        "assert import_utils.is_kernels_available() is False\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, '__version__')\n"
        "try:\n"
        "    from kernels import attention\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('the folder is reachable as kernels: ' + repr(attention))\n"
        "try:\n"
        "    import kernels.group_norm\n"
        "except ModuleNotFoundError:\n"
        "    print('not installed')\n"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    if result.stdout.strip() == "transformers looks for no kernels package":
        pytest.skip("this transformers is older than its check for Hugging Face's kernels package")
    assert result.stdout.strip() == "not installed", result.stdout


def test_import_kernels_under_pytest_is_not_the_folder():
    # pytest's default import mode puts the root on sys.path (rootdir conftest.py, tests/
    # is a package), so the folder is the first "kernels" the path finder sees.
    if str(ROOT) not in [os.path.realpath(entry or ".") for entry in sys.path if isinstance(entry, str)]:
        pytest.skip("the repository root is not on sys.path in this run")
    try:
        import kernels
    except ModuleNotFoundError as error:
        assert error.name == "kernels"
    else:
        assert not is_repo_folder(getattr(kernels, "__file__", None)), kernels

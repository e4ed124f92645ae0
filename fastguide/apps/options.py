"""The command line's option checks: bad input ends with one line on stderr,
``fastguide: error: --option: what was expected, got X``, and exit status 2, never a
traceback; output files are written through ``atomic_path`` (a scratch file beside the
target, moved over it once complete), so a failing run leaves no file behind."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import os
import pickle
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import torch

from ..ops import backends
from ..ops.validation import FLOAT32_MAX
from ..sampling.schedule import NoiseSchedule

DEFAULT_GRID = Path("digits.png")  # sample's --out when neither it nor --npz is given
SEED_LIMIT = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
SEED_STRIDE = 1_000_003  # a run's batch i draws from seed * SEED_STRIDE + i: runs of other seeds never share one
T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Errors: one line, exit status 2.


class UsageError(Exception):
    """Bad input, reported as ``fastguide: error: <option>: <message>`` with exit status 2.

    ``option`` names what was wrong: an option (``--steps``), an environment variable
    (``FASTGUIDE_BACKEND``) or, for a missing dependency, the subcommand.
    """

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


def torchrun_world_size() -> int:
    """torchrun's WORLD_SIZE (1 where it is not set), and its RANK, where set, within it (a
    rank past the world waited out the rendezvous's whole timeout for ranks that never come)."""
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not raw.isdecimal() or int(raw) < 1:
        raise UsageError("WORLD_SIZE", f"must be a positive integer (torchrun sets it), got {raw!r}")
    world_size = int(raw)
    rank = os.environ.get("RANK")
    if world_size > 1 and rank is not None and not (rank.strip().isdecimal() and int(rank) < world_size):
        raise UsageError(
            "RANK", f"must be an integer from 0 to {world_size - 1} (WORLD_SIZE {world_size}), got {rank!r}"
        )
    return world_size


def fail(message: str) -> NoReturn:
    """Print ``message`` as fastguide's one error line and exit with status 2."""
    print(f"fastguide: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with fastguide's one-line errors (no usage block): ``--steps: invalid int
    value: 'x'``. Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        fail(message.removeprefix("argument "))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------------------------------
# Checks of single values. Each raises UsageError naming the option.


# The most samples one command draws: ten million 256×256 images are 2 TB of uint8, and a
# count past any machine's memory would hang building its labels before a model ran.
MAX_SAMPLES = 10_000_000


def check_at_least(option: str, value: int, low: int = 1, high: int | None = None) -> None:
    """An integer count of at least ``low`` (and at most ``high``, when given)."""
    if value < low or (high is not None and value > high):
        bound = f"of at least {low}" if high is None else f"between {low} and {high:,}"
        raise UsageError(option, f"expected an integer {bound}, got {value}")


def check_scale(option: str, value: float) -> None:
    """A guidance scale: finite, non-negative (0 turns guidance off; a negative scale would
    steer samples away from the requested class) and within float32's range (the kernels'
    scalar type)."""
    if not math.isfinite(value) or not 0 <= value <= FLOAT32_MAX:
        raise UsageError(option, f"expected a finite number from 0 to {FLOAT32_MAX:.4g}, got {value}")


def check_seed(option: str, seed: int, high: int = SEED_LIMIT) -> None:
    """A seed in 0..high (torch seeds are unsigned 64-bit integers)."""
    if not 0 <= seed <= high:
        raise UsageError(option, f"expected an integer from 0 to {high}, got {seed}")


def check_batch_seeds(num_samples: int, batch_size: int, seed: int) -> None:
    """A run's batch seeds, seed · SEED_STRIDE + i for batch i, within torch's 64 bits and
    shared with no other --seed's run: at most SEED_STRIDE batches (past them, batch
    SEED_STRIDE of seed s would draw as batch 0 of seed s + 1)."""
    batches = -(-num_samples // batch_size)
    if batches > SEED_STRIDE:
        raise UsageError(
            "--batch-size",
            f"{num_samples:,} samples in batches of {batch_size} are {batches:,} batches, past the "
            f"{SEED_STRIDE:,} whose seeds no other --seed's run shares: use larger batches",
        )
    check_seed("--seed", seed, high=(SEED_LIMIT + 1 - batches) // SEED_STRIDE)


def parse_device(text: str, option: str = "--device") -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, and only a CUDA device this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(option, f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cpu":
        return device
    if torch.version.cuda is None and torch.version.hip is None:
        raise UsageError(
            option,
            f"got {text!r}, but this PyTorch ({torch.__version__}) is a CPU-only build: "
            "use --device cpu or install a CUDA build of PyTorch",
        )
    if not torch.cuda.is_available():
        raise UsageError(option, f"got {text!r}, but no CUDA device is visible here: use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(option, f"expected cuda or cuda:0 to cuda:{count - 1} on this machine, got {text!r}")
    return device


def check_backend(choice: str | None, device: torch.device) -> None:
    """The op backend chosen by --backend, or by FASTGUIDE_BACKEND when --backend is
    absent, can run on ``device`` (``auto`` and ``torch`` always can)."""
    option = "--backend" if choice is not None else "FASTGUIDE_BACKEND"
    if choice is None:
        try:
            choice = backends.get_backend()
        except ValueError:
            got = os.environ.get("FASTGUIDE_BACKEND")
            raise UsageError(option, f"expected one of {', '.join(backends.BACKENDS)}, got {got!r}") from None
    if choice in ("auto", "torch"):
        return
    reason = backends.why_not(choice, device)
    if reason is not None:
        raise UsageError(option, f"the {choice} backend cannot run on {device.type} here: {reason}")


def check_modules(command: str, *modules: str, extra: str = "train") -> None:
    """The optional packages a subcommand (or option) needs are installed: else the extra
    that installs them."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(command, f"needs {', '.join(missing)}: pip install 'fastguide[{extra}]'")


def check_steps(steps: int, schedule: NoiseSchedule, model: str, spacing: str | None = None) -> None:
    """A sampling step count for --spacing: the strided grid ("adm" on a VP schedule) takes
    at most T/2 of the T timesteps, every other grid (and a flow path) at most T (a count is
    checked before its grid is built, so a huge one is refused at once)."""
    total = schedule.num_timesteps
    if schedule.is_flow or spacing != "adm":
        if not 1 <= steps <= total:
            path = "flow path" if schedule.is_flow else f"{total}-timestep schedule"
            raise UsageError(
                "--steps", f"expected an integer from 1 to {total} for the {path} of --model {model}, got {steps}"
            )
        return
    try:
        schedule.strided_timesteps(steps)
    except ValueError:
        raise UsageError(
            "--steps",
            f"expected an integer from 1 to {total // 2} for the {total}-timestep "
            f"schedule of --model {model}, got {steps}",
        ) from None


def parse_labels(text: str, count: int, num_classes: int) -> torch.Tensor:
    """'3' -> all threes; '0-9' or '1,4,7' -> cycled over the samples."""
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-"))
            if low > high:
                raise UsageError("--labels", f"expected a range LOW-HIGH with LOW <= HIGH, got {text!r}")
            # (bounded before the range is built: 0-1000000000000 would fill the memory)
            values = list(range(low, high + 1)) if 0 <= low <= high < num_classes else []
        else:
            values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError("--labels", f"expected a class, a range like 0-9 or a list like 1,4,7, got {text!r}") from None
    if not values or min(values) < 0 or max(values) >= num_classes:
        raise UsageError("--labels", f"expected classes in 0..{num_classes - 1}, got {text!r}")
    return torch.tensor([values[i % len(values)] for i in range(count)])


# ---------------------------------------------------------------------------------------
# Files: inputs that must exist, outputs that can be written, atomic writes.


@contextlib.contextmanager
def _path_errors(option: str, path: Path) -> Iterator[None]:
    """What the file system says about ``path`` beyond "missing" (a name past its length
    limit, a folder that cannot be searched) as the usage error of ``option``."""
    try:
        yield
    except OSError as error:
        raise UsageError(option, f"cannot use {str(path)!r}: {error.strerror or error}") from None


def check_weights_file(option: str, path: Path) -> None:
    """A checkpoint file that exists, is a file and is not empty (its contents are judged
    when it is loaded)."""
    with _path_errors(option, path):
        _check_weights_file(option, path)


def _check_weights_file(option: str, path: Path) -> None:
    if not path.exists():
        raise UsageError(option, f"{path} does not exist")
    if path.is_dir():
        raise UsageError(option, f"expected a .pt or .safetensors file, got the folder {path}")
    if path.stat().st_size == 0:
        raise UsageError(option, f"expected a .pt or .safetensors file, got the empty file {path}")


def check_digits_folder(
    option: str, path: Path, networks: tuple[str, ...] = ("unet", "classifier", "evaluator")
) -> None:
    """A folder written by ``fastguide train``, holding the digits ``networks`` (the three
    main ones by default)."""
    with _path_errors(option, path):
        if not path.exists():
            raise UsageError(option, f"{path} does not exist")
        if not path.is_dir():
            raise UsageError(option, f"expected a folder written by 'fastguide train', got the file {path}")
    for name in networks:
        check_weights_file(option, path / f"digits_{name}.safetensors")


def _check_folder_writable(option: str, folder: Path) -> None:
    if not folder.exists():
        raise UsageError(option, f"folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(option, f"expected a path in a folder, but {folder} is a file")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(option, f"cannot write in folder {folder} ({error.strerror})") from None


def check_output_file(option: str, path: Path) -> None:
    """``path`` can be written: not a folder, in an existing writable folder. Creates nothing."""
    with _path_errors(option, path):
        if path.is_dir():
            raise UsageError(option, f"expected a file name, got the folder {path}")
        _check_folder_writable(option, path.resolve().parent)


# The widest and tallest image each format holds (Pillow's encoders refuse more, after the
# samples are drawn; measured with Pillow 13). PNG, TIFF and BMP hold 2³¹ − 1 a side.
IMAGE_SIDE_LIMITS = {
    "WEBP": 16383,
    "JPEG": 65500,
    "MPO": 65500,
    "PDF": 65500,
    "GIF": 65535,
    "TGA": 65535,
    "PCX": 65535,
    "SGI": 65535,
}
# Icon formats, which Pillow resizes to icon sizes without a word.
ICON_FORMATS = ("ICO", "ICNS")


def check_image_file(option: str, path: Path, mode: str) -> None:
    """``path`` can be written and its extension names a format PIL writes ``mode`` images in."""
    from PIL import Image

    check_output_file(option, path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format in ICON_FORMATS:
        raise UsageError(option, f"{path.name!r} is an icon format, which would shrink the grid to an icon's size")
    if image_format in Image.SAVE:
        try:
            Image.new(mode, (1, 1)).save(io.BytesIO(), format=image_format)
            return
        except (OSError, ValueError, KeyError, TypeError):
            pass
    raise UsageError(
        option, f"expected an image file name that PIL can write (.png, .jpg, .webp, .tif, ...), got {path.name!r}"
    )


def check_grid_fits(option: str, path: Path, width: int, height: int) -> None:
    """A grid of ``width`` × ``height`` pixels fits the format of ``path``'s extension."""
    from PIL import Image

    image_format = Image.registered_extensions().get(path.suffix.lower(), "")
    limit = IMAGE_SIDE_LIMITS.get(image_format)
    if limit is not None and max(width, height) > limit:
        raise UsageError(
            option,
            f"the grid would be {width}×{height} pixels, past {image_format}'s {limit} a side: "
            f"write it as .png, or sample fewer at a time",
        )


def check_plot_file(option: str, path: Path) -> None:
    """``path`` can be written and its extension names a format matplotlib saves."""
    from matplotlib.backend_bases import FigureCanvasBase

    check_output_file(option, path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().removeprefix(".") not in formats:
        raise UsageError(option, f"expected a file name ending in .{', .'.join(formats)}, got {path.name!r}")


def check_output_folder(option: str, path: Path) -> None:
    """``path`` is a folder, or can be created as one (missing parents included)."""
    with _path_errors(option, path):
        if path.exists() and not path.is_dir():
            raise UsageError(option, f"expected a folder, got the file {path}")
        _check_folder_writable(option, path if path.is_dir() else existing_ancestor(path))


def existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def npz_path(path: Path) -> Path:
    """Where ``np.savez(path)`` writes: ``path``, with ``.npz`` appended when it lacks it."""
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A scratch path beside ``path`` with the same suffix (writers infer the format from
    it) that replaces ``path`` when the block succeeds and is removed when it fails, so
    ``path`` never holds an empty or partial file."""
    # The stem cut to what leaves the scratch name within a file system's 255 bytes.
    stem = path.stem.encode()[: 255 - len(f"..{'0' * 8}.part{path.suffix}".encode())].decode(errors="ignore")
    scratch = path.with_name(f".{stem}.{secrets.token_hex(4)}.part{path.suffix}")
    try:
        yield scratch
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError)


def load_weights(option: str, path: Path, load: Callable[[], T]) -> T:
    """``load()``, with a broken or mismatched checkpoint reported against ``option``."""
    try:
        return load()
    except LOAD_ERRORS as error:
        message = _one_line(error)
        raise UsageError(option, message if str(path) in message else f"cannot load {path}: {message}") from None

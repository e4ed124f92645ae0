"""Loading weights into fastguide models: ADM ``.pt`` files and ``.safetensors``.

ADM state dicts load with no key mapping (the module trees are the same). A model built
with ``null_class=True`` has one more label-embedding row than ADM's released models;
``expand_label_table=True`` appends that row, initialised to the mean of the class rows
(a neutral "average class" to fine-tune from).

The format is read from the file's first bytes, not its suffix: a safetensors file is an
8-byte little-endian header length followed by a JSON header that begins with ``{``;
anything else goes to ``torch.load(weights_only=True)``, which unpickles tensors and
plain containers only, on torch 2.6 or later: before it, weights_only could still run a
crafted file's code (CVE-2025-32434), so only safetensors files load there. Nothing here
ever unpickles arbitrary objects.
"""

from __future__ import annotations

import math
import os
import pickle
from collections import Counter
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

# The label tables of ADM's UNets and DiT/SiT: a CFG model's has one more row (the null class).
LABEL_TABLES = ("label_emb.weight", "y_embedder.embedding_table.weight")

# The dtypes a float weight may be stored in: load_state_dict casts anything else (int,
# bool, fp8, complex) into the model's float tensors without a word.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _safetensors_header(path: Path) -> int | None:
    """The header length when the file starts like a safetensors file, else None."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return None  # torch.save's zip files start with b"PK\x03\x04", its legacy files with pickle's 0x80
    return int.from_bytes(head[:8], "little")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 160:  # torch's messages run on; their first sentence says what failed
        text = text.split(". ", 1)[0][:160]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_path(path: Path) -> int:
    """The file's size; clear errors for a missing path, a directory and an empty file."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
        hint = f" (it holds {_describe(inside)}: pass one of them)" if inside else ""
        raise IsADirectoryError(f"checkpoint path {path} is a directory, not a checkpoint file{hint}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise ValueError(f"checkpoint path {path} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint file {path} is empty (0 bytes)")
    return size


def _read_safetensors(path: Path, size: int, header: int) -> dict[str, Tensor]:
    if 8 + header > size:
        raise ValueError(
            f"checkpoint file {path} is a truncated safetensors file: its header alone is {header} bytes "
            f"but the file has {size}"
        )
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # SafetensorError has no importable base class of its own
        raise ValueError(
            f"checkpoint file {path} is a truncated or corrupt safetensors file ({_first_line(error)})"
        ) from error


# The first torch whose weights_only unpickler runs no code of a crafted file (CVE-2025-32434).
SAFE_TORCH_LOAD = (2, 6)


def _torch_release() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _read_torch(path: Path) -> object:
    if _torch_release() < SAFE_TORCH_LOAD:
        raise ValueError(
            f"checkpoint file {path} is a torch.save file, which torch {torch.__version__} cannot load safely "
            "(its weights_only unpickler can run a crafted file's code before torch 2.6, CVE-2025-32434): "
            "upgrade torch, or convert the file to .safetensors where torch 2.6 or later runs"
        )
    try:
        with path.open("rb") as f:  # a file object: torch.load would pick its loader by a path's suffix
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False, i.e. running whatever code the file
        # holds; keep only its reason, and do not chain it.
        reason = next(
            (
                line.split("WeightsUnpickler error:", 1)[1].strip()
                for line in str(error).splitlines()
                if "WeightsUnpickler error:" in line
            ),
            "",
        )
        reason = reason.split(". Please", 1)[0] or type(error).__name__
        raise ValueError(
            f"checkpoint file {path} cannot be read as tensors only ({reason}): it is truncated or corrupt, or "
            "it pickles Python objects besides tensors (a training checkpoint?), which fastguide never "
            "unpickles; re-save its state dict (torch.save or .safetensors) with code you trust"
        ) from None
    except Exception as error:
        raise ValueError(
            f"checkpoint file {path} is truncated, corrupt or not a checkpoint: it is neither a safetensors "
            f"file nor a torch.save file that loads ({_first_line(error)})"
        ) from error


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a safetensors or ``torch.save`` file (told apart by content), on CPU.

    Raises FileNotFoundError for a missing file, IsADirectoryError for a directory, and
    ValueError naming the path for an empty, truncated or unreadable file or one that does
    not hold a flat dict of dense tensors with data (meta and sparse tensors are refused).
    """
    path = Path(path)
    size = _check_path(path)
    header = _safetensors_header(path)
    if header is not None:
        return _read_safetensors(path, size, header)
    state = _read_torch(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        hint = ""
        if isinstance(state, dict):
            # the entries that are not tensors first: they are what is wrong
            entries = sorted(state.items(), key=lambda item: isinstance(item[1], Tensor))
            found = f"a dict of {_describe([f'{k!r} ({type(v).__name__})' for k, v in entries])}"
            if state and all(isinstance(v, dict) for v in state.values()):
                chosen = "ema" if "ema" in state else next(iter(state))
                hint = (
                    f" (a training checkpoint's state dicts: save the one to sample with on its own, e.g. "
                    f"torch.save(torch.load(path)[{chosen!r}], new_path); DiT's and SiT's find_model take 'ema')"
                )
        else:
            found = f"a {type(state).__name__}"
        raise ValueError(f"{path} does not hold a state dict of tensors: it holds {found}{hint}")
    names = [k for k in state if not isinstance(k, str)]
    if names:
        raise ValueError(f"{path} does not hold a state dict: its keys must be names, got {names[:5]!r}")
    no_data = [
        f"{k} ({'meta' if v.is_meta else v.layout})" for k, v in state.items() if v.is_meta or v.layout != torch.strided
    ]
    if no_data:
        raise ValueError(
            f"checkpoint file {path} holds tensors without dense data (saved from a model built on the "
            f"meta device, or sparse): {_describe(no_data)}"
        )
    return state


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """Writes the model's weights as ``.safetensors`` (or ``.pt`` for any other suffix);
    tensors that share memory (tied weights) are written as copies each."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path {path} is a directory; pass a file name ending .safetensors or .pt")
    meta = [k for k, v in model.state_dict().items() if v.is_meta]
    if meta:
        raise ValueError(
            f"cannot save {path}: the model's tensors {_describe(meta)} are meta tensors (no data; "
            "load weights into it first)"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share memory (tied weights, views of one buffer):
    # each of those is written as its own copy, which loads back into every name
    storages = Counter(t.untyped_storage().data_ptr() for t in state.values())
    state = {k: t.clone() if storages[t.untyped_storage().data_ptr()] > 1 else t for k, t in state.items()}
    if path.suffix == ".safetensors":
        write_safetensors(state, path)
    else:
        torch.save(state, path)


def write_safetensors(state: dict[str, Tensor], path: Path) -> None:
    """``state`` as a .safetensors file at ``path``, with the permissions of any file the
    user writes (safetensors creates its files readable by the owner alone: 0600)."""
    from safetensors.torch import save_file

    save_file(state, str(path))
    umask = os.umask(0)  # (read by setting it: there is no other way)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")


def load_checkpoint(model: ModuleT, path: str | Path, *, expand_label_table: bool = False) -> ModuleT:
    """Loads ``path`` into ``model`` strictly; returns the model.

    Raises FileNotFoundError for a missing file, IsADirectoryError for a directory, and
    ValueError naming the path for an unreadable file or one of tensors without data
    (meta), for checkpoint tensors that are not float16/bfloat16/float32/float64 where the
    model's are floating (int, bool, fp8: load_state_dict would cast them silently), for
    floating tensors where the model's are not (an integer buffer: they would be truncated),
    for a model on meta whose non-persistent buffers (which no checkpoint holds) are meta
    too, for the first few missing and unexpected keys, and for every tensor whose shape
    differs.

    A model built on the meta device (no data yet, how large models are built) gets the
    checkpoint's tensors themselves, each cast to the dtype the model declares for it, on
    the CPU (``load_state_dict(assign=True)``; copying into a meta tensor would keep no data).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_checkpoint(model, path): model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_checkpoint(model, path): path must be a str or os.PathLike, got {type(path).__name__}")
    state = read_state_dict(path)
    expected = model.state_dict()
    # A checkpoint holds no non-persistent buffers: on a model built on meta they would stay
    # without data, and the model would fail at its first forward.
    kept = set(expected)
    unfilled = [name for name, t in model.named_buffers() if t.is_meta and name not in kept]
    if unfilled:
        raise ValueError(
            f"cannot load {path} into the model: its non-persistent buffers {_describe(unfilled)} are meta "
            "tensors, which no checkpoint fills (build the model with them on a device)"
        )
    not_integer = [
        f"{k} ({state[k].dtype} into {v.dtype})"
        for k, v in expected.items()
        if k in state and not v.is_floating_point() and state[k].is_floating_point()
    ]
    if not_integer:
        raise ValueError(
            f"checkpoint {path} holds floating tensors where the model's are not (loading would truncate "
            f"them without a word): {_describe(not_integer)}"
        )
    not_float = [
        f"{k} ({state[k].dtype})"
        for k, v in expected.items()
        if k in state and v.is_floating_point() and state[k].dtype not in (v.dtype, *FLOAT_DTYPES)
    ]
    if not_float:
        raise ValueError(
            f"checkpoint {path} holds tensors that are not float16/bfloat16/float32/float64 where the model's "
            f"weights are floating (loading would cast them without a word): {_describe(not_float)}"
        )
    label_table = next((name for name in LABEL_TABLES if name in expected), None)
    if expand_label_table and label_table is None:
        raise ValueError(
            f"expand_label_table=True: the model has no label table ({' or '.join(LABEL_TABLES)}) to expand"
        )
    if expand_label_table and not getattr(model, "null_class", False):
        # the appended row is the CFG null row: in a model without one it would be a class
        raise ValueError(
            "expand_label_table=True appends the null class's row, and the model has no null class "
            "(build it with null_class=True, or a DiT with class_dropout_prob > 0)"
        )
    if expand_label_table and label_table in state:
        table, wanted_rows = state[label_table], expected[label_table].shape[0]
        if table.shape[0] + 1 == wanted_rows:
            state[label_table] = torch.cat([table, table.mean(dim=0, keepdim=True)])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = ""
        if missing == [label_table] and not unexpected:
            hint = " (an unconditional checkpoint: build the model without labels, e.g. unet_config('adm256-uncond'))"
        elif len(unexpected) == 1 and unexpected[0] in LABEL_TABLES and not missing:
            hint = " (a class-conditional checkpoint: build the model with its classes, e.g. unet_config('adm256'))"
        raise ValueError(
            f"checkpoint {path} does not match the model: "
            f"{len(missing)} missing keys ({_describe(missing) or 'none'}), "
            f"{len(unexpected)} unexpected keys ({_describe(unexpected) or 'none'}){hint}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        hint = ""
        if label_table is not None:
            rows, wanted_rows = state[label_table].shape[0], expected[label_table].shape[0]
            if rows + 1 == wanted_rows and not expand_label_table and getattr(model, "null_class", False):
                hint = " (a CFG model's label table has one more row: pass expand_label_table=True)"
            elif rows != wanted_rows:
                hint = f" (the checkpoint's label table has {rows} rows, the model's {wanted_rows}: other classes)"
        patch_size = getattr(model, "patch_size", None)
        if "pos_embed" in expected and tuple(state["pos_embed"].shape) != tuple(expected["pos_embed"].shape):
            side = math.isqrt(state["pos_embed"].shape[-2]) if state["pos_embed"].dim() == 3 else 0
            if side and side * side == state["pos_embed"].shape[-2] and isinstance(patch_size, int):
                # a DiT's position table is fixed by its image size: (input_size / patch)² tokens
                hint += f" (the checkpoint's position table is for input_size={side * patch_size}: another image size)"
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape: {_describe(wrong)}{hint}")
    tied = _tied_names(model)
    differing = [names for names in tied if not all(torch.equal(state[names[0]], state[n]) for n in names[1:])]
    if differing:
        raise ValueError(
            f"checkpoint {path} holds different values for weights the model ties (one tensor under "
            f"several names): {_describe([' = '.join(names) for names in differing])}"
        )
    if any(v.is_meta for v in expected.values()):
        state = {
            k: _own_storage(v.to(dtype=expected[k].dtype, device="cpu" if expected[k].is_meta else expected[k].device))
            for k, v in state.items()
        }
        model.load_state_dict(state, strict=True, assign=True)
        _retie(model, tied)  # (assign gave each name a tensor of its own)
        return model
    model.load_state_dict(state, strict=True)
    return model


def _own_storage(tensor: Tensor) -> Tensor:
    """``tensor``, or a copy where it is a view of a larger storage: assigned to a model, a
    view keeps its whole storage alive. guided-diffusion's fp16-trained checkpoints hold
    their weights as views of one flat float32 buffer, and an fp16 model keeps its norms'
    and linear layers' float32 weights as they are: each kept the whole buffer (2.2 GB for
    adm256) beside the model's converted copies."""
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _tied_names(model: nn.Module) -> list[list[str]]:
    """The state-dict names that share one tensor (tied weights), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Point every name of each tied group at its first name's (loaded) tensor again."""
    loaded = model.state_dict(keep_vars=True)  # (the Parameter or buffer itself under each name)
    for first, *others in tied:
        for name in others:
            owner_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner_name), attribute, loaded[first])

"""Loading weights into fastguide models: ADM ``.pt`` files and ``.safetensors``.

ADM state dicts load with no key mapping (the module trees are the same). A model built
with ``null_class=True`` has one more label-embedding row than ADM's released models;
``expand_label_table=True`` appends that row, initialised to the mean of the class rows
(a neutral "average class" to fine-tune from).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

LABEL_TABLE = "label_emb.weight"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.pt``/``.pth`` (torch.load, weights_only) or ``.safetensors`` file, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """Writes the model's weights as ``.safetensors`` (or ``.pt`` for any other suffix)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")


def load_checkpoint(model: nn.Module, path: str | Path, *, expand_label_table: bool = False) -> nn.Module:
    """Loads ``path`` into ``model`` strictly; returns the model.

    Raises FileNotFoundError for a missing file, and ValueError naming the first few
    missing and unexpected keys, or every tensor whose shape differs.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    if expand_label_table and LABEL_TABLE in state and LABEL_TABLE in expected:
        table, wanted_rows = state[LABEL_TABLE], expected[LABEL_TABLE].shape[0]
        if table.shape[0] + 1 == wanted_rows:
            state[LABEL_TABLE] = torch.cat([table, table.mean(dim=0, keepdim=True)])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: "
            f"{len(missing)} missing keys ({_describe(missing) or 'none'}), "
            f"{len(unexpected)} unexpected keys ({_describe(unexpected) or 'none'})"
        )
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        hint = ""
        if any(w.startswith(LABEL_TABLE) for w in wrong):
            hint = " (a CFG model's label table has one more row: pass expand_label_table=True)"
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape: {_describe(wrong)}{hint}")
    model.load_state_dict(state, strict=True)
    return model

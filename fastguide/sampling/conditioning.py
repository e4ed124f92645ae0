"""The conditioning of the model's batched forward, laid out once per run.

The sampler calls ``model(x_t, t, labels, **kwargs)`` (``labels`` left out when there are
none, or when the model is an unconditional ADM UNet, whose labels are its classifier's
guidance's alone). A guided forward runs several B-row blocks at once, each with its own conditioning
(``Guidance.branches``): [cond; uncond] for CFG, [cond; uncond; perturbed] for PAG. The
blocks' labels and keyword arguments are concatenated on dim 0 once, before the loop, into
``RowConditioning``; each call passes views of its first ``rows`` rows (all blocks while
guidance is active, the conditional block alone outside it). Nothing is concatenated per
step, and a CUDA graph reads the same tensors on every replay (``copy_from``).

Keyword conditioning (``cond``/``uncond``) is a dict of tensors batched on dim 0, or of
nested dicts of them (SDXL's ``added_cond_kwargs``), or None. A tensor of one row
broadcasts to the batch. ``cond`` and ``uncond`` must have the same keys, and each pair of
tensors the same shape past dim 0, dtype and device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

# A leaf's place in a nested conditioning dict: its keys from the top.
Path = tuple[str, ...]
# The model's keyword arguments: tensors batched on dim 0, None, or nested dicts of them.
Conditioning = Mapping[str, object]
# A leaf of a flattened conditioning dict: a tensor batched on dim 0, None, or an empty dict.
Leaf = Tensor | None | dict


def _named(name: str, path: Path) -> str:
    return name + "".join(f"[{key!r}]" for key in path)


def flatten(conditioning: object, name: str) -> dict[Path, Leaf]:
    """The leaves of a conditioning dict by path, checked: string keys, and values that are
    tensors with a batch dim, None, or dicts of them (an empty dict is a leaf)."""
    if not isinstance(conditioning, Mapping):
        raise TypeError(f"{name} must be a dict of the model's keyword arguments, got {type(conditioning).__name__}")
    leaves: dict[Path, Leaf] = {}

    def visit(node: Mapping, path: Path) -> None:
        if not node and path:
            leaves[path] = {}
        for key, value in node.items():
            here = (*path, key)
            if not isinstance(key, str):
                raise TypeError(f"{_named(name, path)} keys must be argument names (str), got {key!r}")
            if isinstance(value, Mapping):
                visit(value, here)
            elif value is None:
                leaves[here] = None
            elif isinstance(value, Tensor):
                if value.dim() == 0:
                    raise ValueError(f"{_named(name, here)} must be batched on dim 0, got a 0-d tensor")
                leaves[here] = value
            else:
                raise TypeError(
                    f"{_named(name, here)} must be a tensor batched on dim 0, a dict of them, or None, "
                    f"got {type(value).__name__}"
                )

    visit(conditioning, ())
    return leaves


def nest(leaves: Mapping[Path, object]) -> dict:
    """A nested dict from leaves by path (flatten's inverse)."""
    root: dict = {}
    for path, value in leaves.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root


def check_pair(
    cond: object, uncond: object, batch: int, uses_uncond: bool
) -> tuple[dict[Path, Leaf], dict[Path, Leaf] | None]:
    """cond and uncond flattened and checked against each other and the batch, before any
    forward. ``uses_uncond``: the guidance runs an unconditional block, so keyword
    conditioning needs its unconditional counterpart."""
    cond_leaves = flatten({} if cond is None else cond, "cond")
    uncond_leaves = None if uncond is None else flatten(uncond, "uncond")
    if uses_uncond and cond_leaves and uncond_leaves is None:
        raise ValueError(
            "guidance with an unconditional branch needs uncond= (the unconditional or negative "
            "prompt's keyword arguments, with the same keys as cond)"
        )
    if uncond_leaves is not None and cond_leaves.keys() != uncond_leaves.keys():
        missing = sorted(_named("cond", p) for p in cond_leaves.keys() - uncond_leaves.keys())
        extra = sorted(_named("uncond", p) for p in uncond_leaves.keys() - cond_leaves.keys())
        raise ValueError(
            "cond and uncond must have the same keys: "
            + "; ".join(
                f"{' '.join(names)} {which}"
                for names, which in ((missing, "has no counterpart in uncond"), (extra, "has no counterpart in cond"))
                if names
            )
        )
    for path, value in cond_leaves.items():
        other = None if uncond_leaves is None else uncond_leaves[path]
        for tree, tensor in (("cond", value), ("uncond", other)):
            if isinstance(tensor, Tensor) and tensor.shape[0] not in (1, batch):
                raise ValueError(
                    f"{_named(tree, path)} must hold 1 or {batch} rows (the batch) on dim 0, got shape "
                    f"{tuple(tensor.shape)}"
                )
        if uncond_leaves is None:
            continue
        if (value is None) != (other is None) or isinstance(value, Tensor) != isinstance(other, Tensor):
            raise ValueError(
                f"{_named('cond', path)} and {_named('uncond', path)} must both be tensors, None or "
                f"empty dicts, got {type(value).__name__} and {type(other).__name__}"
            )
        if isinstance(value, Tensor):
            assert isinstance(other, Tensor)  # checked above: both tensors
            if value.shape[1:] != other.shape[1:]:
                raise ValueError(
                    f"{_named('cond', path)} and {_named('uncond', path)} must have the same shape past "
                    f"dim 0, got {tuple(value.shape)} and {tuple(other.shape)}"
                )
            if value.dtype != other.dtype:
                raise ValueError(
                    f"{_named('cond', path)} and {_named('uncond', path)} must have the same dtype, got "
                    f"{value.dtype} and {other.dtype}"
                )
            if value.device != other.device:
                raise ValueError(
                    f"{_named('cond', path)} and {_named('uncond', path)} must be on the same device, "
                    f"got {value.device} and {other.device}"
                )
    return cond_leaves, uncond_leaves


@dataclass
class RowConditioning:
    """Every row's conditioning of the batched forward: ``labels`` (rows,) or None, and the
    keyword arguments' leaves, each (rows, ...) or None, the blocks in branch order."""

    labels: Tensor | None
    leaves: dict[Path, Leaf]

    @classmethod
    def lay_out(
        cls, blocks: Sequence[tuple[Tensor | None, Mapping[Path, Leaf]]], batch: int, device: torch.device
    ) -> RowConditioning:
        """The blocks' (labels, leaves), each broadcast to ``batch`` rows, concatenated on dim 0
        on ``device``. One block is not copied unless it must be broadcast or moved."""
        labels = None
        if blocks[0][0] is not None:
            # (every block has labels when the first has: the null label in unconditional blocks)
            labels = (
                torch.cat([cast(Tensor, block_labels).to(device) for block_labels, _ in blocks])
                if len(blocks) > 1
                else blocks[0][0].to(device)
            )
        leaves: dict[Path, Leaf] = {}
        for path, first in blocks[0][1].items():
            if not isinstance(first, Tensor):
                leaves[path] = first
                continue
            # check_pair: a leaf that is a tensor in the first block is one in every block
            tensors = [cast(Tensor, leaf[path]) for _, leaf in blocks]
            parts = [tensor.to(device).expand(batch, *tensor.shape[1:]) for tensor in tensors]
            leaves[path] = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        return cls(labels, leaves)

    @property
    def signature(self) -> tuple:
        """What a captured graph's static copy depends on: each tensor's place, shape and dtype
        (a set: keyword arguments given in another order are the same layout)."""
        return (
            None if self.labels is None else tuple(self.labels.shape),
            frozenset(
                (path, tuple(v.shape), v.dtype) if isinstance(v, Tensor) else (path, v is None)
                for path, v in self.leaves.items()
            ),
        )

    def clone(self) -> RowConditioning:
        """A copy with storage of its own (a graph's static conditioning)."""
        return RowConditioning(
            None if self.labels is None else self.labels.clone(),
            {p: v.clone() if isinstance(v, Tensor) else v for p, v in self.leaves.items()},
        )

    def copy_from(self, other: RowConditioning) -> None:
        """Load another run's conditioning of the same signature into these tensors."""
        if self.labels is not None:
            assert other.labels is not None  # the same signature
            self.labels.copy_(other.labels)
        for path, value in self.leaves.items():
            if isinstance(value, Tensor):
                other_value = other.leaves[path]
                assert isinstance(other_value, Tensor)  # the same signature
                value.copy_(other_value)

    def arguments(self, rows: int, floating_dtype: torch.dtype | None = None) -> tuple[Tensor | None, dict]:
        """The first ``rows`` rows' labels and keyword arguments: views, or with
        ``floating_dtype`` the floating ones cast to it (for a network of another dtype)."""

        def first_rows(leaf: Leaf) -> Leaf:
            if not isinstance(leaf, Tensor):
                return leaf
            if floating_dtype is not None and leaf.is_floating_point():
                return leaf[:rows].to(floating_dtype)
            return leaf[:rows]

        labels = None if self.labels is None else self.labels[:rows]
        return labels, nest({path: first_rows(leaf) for path, leaf in self.leaves.items()})

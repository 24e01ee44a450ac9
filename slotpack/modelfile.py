"""``.slot`` files for any slotified model: tensors by ``state_dict`` name, no architecture.

``save(model, path)`` writes a weights-only file (docs/FORMAT.md §2.8): each slot layer's weight
as the indices its evaluation uses (seed, generator layer number, K and reference rule in the
manifest), every other entry of the model's ``state_dict`` (biases, BatchNorm and LayerNorm
parameters and statistics, embeddings) as a tensor. ``load_state_dict(path)`` gives back the
``state_dict`` of the dense architecture the model was slotified from, as torch tensors, so
``dense.load_state_dict(slotpack.load_state_dict(path))`` rebuilds it bit for bit;
``slotpack.runtime.load_state_dict`` is the same without torch (numpy arrays).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import arch as A
from . import format as F
from . import prng
from .errors import ConfigError
from .modules import selected_indices, slot_layer_info
from .pack import NamedWeight, PackInfo, encode_named


def pack_module(
    model: nn.Module,
    *,
    metadata: dict[str, Any] | None = None,
    encoding: str = "float32",
    index_encoding: str = "auto",
) -> tuple[bytes, PackInfo]:
    """The bytes of a weights-only file of a slotified ``model`` (``slotify``), and sizes."""
    infos = slot_layer_info(model)
    if not infos:
        raise ConfigError("the model has no slot layers: slotify it first (slotpack.slotify)")
    seeds = {i.seed for i in infos}
    selections = {i.selection for i in infos}
    if len(seeds) > 1 or len(selections) > 1:
        raise ConfigError(
            f"one file holds one seed and one selection; the model's slot layers have seeds "
            f"{sorted(seeds)} and selections {sorted(selections)}"
        )
    if [i.number for i in infos] != list(range(len(infos))):
        raise ConfigError("slot layers must be numbered 0, 1, 2, ... in order (slotify does)")
    for i in infos:  # a reader derives each bound from the weight's shape alone (§2.8)
        if prng.glorot_bound(*A.Weight(tuple(i.weight_shape)).fans) != i.bound:
            raise ConfigError(
                f"{i.weight_name}: its bound {i.bound} is not the one its shape "
                f"{list(i.weight_shape)} implies; a file could not rebuild it"
            )
    indices = selected_indices(model)
    weights = [
        NamedWeight(i.weight_name, tuple(i.weight_shape), i.k, i.reference_rule,
                    indices[i.weight_name])
        for i in infos
    ]  # fmt: skip
    scores = {f"{i.name}.scores" if i.name else "scores": i.weight_name for i in infos}
    order, tensors = [], {}
    for key, value in model.state_dict().items():
        if key in scores:
            order.append(scores[key])
        else:
            order.append(key)
            tensors[key] = _numpy(key, value)
    blob = encode_named(
        weights, tensors, seed=seeds.pop(), selection=selections.pop(), order=order,
        metadata=metadata, encoding=encoding, index_encoding=index_encoding,
    )  # fmt: skip
    connections = sum(w.index.size for w in weights)
    dense = sum(t.size for t in tensors.values())
    return blob, PackInfo(len(blob), connections, dense)


def save(
    model: nn.Module,
    path: Path | str,
    *,
    force: bool = False,
    metadata: dict[str, Any] | None = None,
    encoding: str = "float32",
    index_encoding: str = "auto",
) -> PackInfo:
    """Write ``model`` (slotified) to ``path`` as a weights-only ``.slot`` file, atomically."""
    blob, info = pack_module(
        model, metadata=metadata, encoding=encoding, index_encoding=index_encoding
    )
    F.write(path, blob, force=force)
    return info


def load_state_dict(path: Path | str | bytes, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The dense ``state_dict`` a ``.slot`` file holds, as torch tensors (CPU)."""
    from .runtime.rebuild import load_state_dict as load_arrays

    return {name: torch.from_numpy(a) for name, a in load_arrays(path, verify=verify).items()}


def _numpy(name: str, value: torch.Tensor) -> np.ndarray:
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float16):
        value = value.float()  # bfloat16 / float64 entries: stored as float32
    if value.is_complex():
        raise ConfigError(f"tensor {name} is {value.dtype}: complex tensors cannot be stored")
    return value.detach().cpu().numpy()

"""``.slot`` files for any slotified model: tensors by ``state_dict`` name, no architecture.

``save(model, path)`` writes a weights-only file (docs/FORMAT.md §2.8): each slot layer's weight
as the indices its evaluation uses (seed, generator layer number, K and reference rule in the
manifest), every other entry of the model's ``state_dict`` (biases, BatchNorm and LayerNorm
parameters and statistics, embeddings) as a tensor. ``load_state_dict(path)`` gives back the
``state_dict`` of the dense architecture the model was slotified from, as torch tensors, so
``dense.load_state_dict(slotpack.load_state_dict(path))`` rebuilds it bit for bit;
``slotpack.runtime.load_state_dict`` is the same without torch (numpy arrays).
``pack_state_dict(state)`` writes the same bytes from the model's ``state_dict`` alone (slot
layers record their seed, number, K, selection, init and shape in it: ``layers.SlotRecord``), so
``torch.save(slot.state_dict(), "checkpoint.pt")`` packs with ``slotpack pack checkpoint.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import arch as A
from . import format as F
from . import prng
from .errors import CheckpointError, ConfigError
from .layers import SlotRecord, is_record, record_prefix
from .modules import slot_layer_info
from .pack import NamedWeight, PackInfo, encode_named


def pack_module(
    model: nn.Module,
    *,
    metadata: dict[str, Any] | None = None,
    encoding: str = "float32",
    index_encoding: str = "auto",
) -> tuple[bytes, PackInfo]:
    """The bytes of a weights-only file of a slotified ``model`` (``slotify``), and sizes:
    ``pack_state_dict(model.state_dict())``, after checking what only the model knows."""
    for i in slot_layer_info(model):  # a reader derives each bound from the weight's shape alone
        if prng.glorot_bound(*A.Weight(tuple(i.weight_shape)).fans) != i.bound:
            raise ConfigError(
                f"{i.weight_name}: its bound {i.bound} is not the one its shape "
                f"{list(i.weight_shape)} implies; a file could not rebuild it"
            )
    return pack_state_dict(
        model.state_dict(), metadata=metadata, encoding=encoding, index_encoding=index_encoding
    )


def pack_state_dict(
    state: Mapping[str, Any],
    *,
    metadata: dict[str, Any] | None = None,
    encoding: str = "float32",
    index_encoding: str = "auto",
) -> tuple[bytes, PackInfo]:
    """The bytes of a weights-only file (docs/FORMAT.md §2.8) of a slotified model's
    ``state_dict``, and sizes; no model needed.

    Each slot layer's record (``layers.SlotRecord``, key ``<name>._extra_state``) and scores
    (``<name>.scores``) become its weight ``<name>.weight``, stored as the indices evaluation
    uses; every other entry is a tensor, in the state_dict's order. The bytes are those of
    ``pack_module`` on the model that gave ``state`` (as ``torch.load(weights_only=True)`` of
    ``torch.save(slot.state_dict(), path)`` reads it back). Malformed entries are
    CheckpointErrors; slot layers that one file cannot hold together are ConfigErrors."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"a state_dict is a dict of tensors, not a {type(state).__name__}")
    records = _records(state)
    seed, selection = _one_file(records)
    weights = [_named_weight(state, prefix, r) for prefix, r in records.items()]
    order, tensors = [], {}
    for key, value in state.items():
        prefix = record_prefix(key)
        if prefix in records:
            continue
        if key.endswith("scores") and key[: -len("scores")] in records:
            order.append(key[: -len("scores")] + "weight")
        else:
            order.append(key)
            tensors[key] = _numpy(key, value)
    blob = encode_named(
        weights, tensors, seed=seed, selection=selection, order=order,
        metadata=metadata, encoding=encoding, index_encoding=index_encoding,
    )  # fmt: skip
    connections = sum(w.index.size for w in weights)
    dense = sum(t.size for t in tensors.values())
    return blob, PackInfo(len(blob), connections, dense)


def _records(state: Mapping[str, Any]) -> dict[str, SlotRecord]:
    """Module prefix (``""``, ``"<name>."``) -> the record of each slot layer, in state order."""
    records = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"state_dict key {key!r:.60} is not a string")
        prefix = record_prefix(key)
        if prefix is not None and is_record(value):
            try:
                records[prefix] = SlotRecord.from_state(value)
            except CheckpointError as exc:
                raise CheckpointError(f"{key}: {exc}") from None
    if records:
        return records
    for key, value in state.items():
        if not torch.is_tensor(value):  # a checkpoint dict around the state_dict, say
            raise _not_a_tensor(key, value)
    if any(key == "scores" or key.endswith(".scores") for key in state):
        raise CheckpointError(
            "the state_dict has slot layer scores but no records of their seed, layer and K: it "
            "was saved before slot layers recorded themselves; load it into the slotified model "
            "and save model.state_dict() again with this version, or write the file with "
            "slotpack.save(model, path)"
        )
    raise ConfigError(
        "no slot layers (no slot layer records in the state_dict): slotify the model first "
        "(slotpack.slotify)"
    )


def _one_file(records: dict[str, SlotRecord]) -> tuple[int, str]:
    """The one seed and selection of ``records``, numbered 0, 1, 2, ... in order, or ConfigError."""
    seeds = {r.seed for r in records.values()}
    selections = {r.selection for r in records.values()}
    if len(seeds) > 1 or len(selections) > 1:
        raise ConfigError(
            f"one file holds one seed and one selection; the model's slot layers have seeds "
            f"{sorted(seeds)} and selections {sorted(selections)}"
        )
    numbers = [r.layer for r in records.values()]
    if numbers != list(range(len(numbers))):
        shown = ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")
        twice = len(set(numbers)) < len(numbers)  # one module in two places: one weight, 2 names
        raise ConfigError(
            f"slot layers must be numbered 0, 1, 2, ... in order (slotify does), got {shown}"
            + ("; a slot layer used in two places cannot be packed" if twice else "")
        )
    return seeds.pop(), selections.pop()


def _named_weight(state: Mapping[str, Any], prefix: str, record: SlotRecord) -> NamedWeight:
    """The slot weight ``<prefix>weight``: its record and the index its scores deploy."""
    scores = state.get(prefix + "scores")
    want = [math.prod(record.shape), record.k]
    if not (torch.is_tensor(scores) and scores.is_floating_point() and list(scores.shape) == want):
        got = list(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise CheckpointError(
            f"{prefix}scores: expected float scores of shape {want} (its record's weight shape "
            f"{list(record.shape)} and K={record.k}), got {got}"
        )
    index = _numpy(prefix + "scores", record.deployed_index(scores)).astype(np.uint16)
    return NamedWeight(prefix + "weight", record.shape, record.k, record.reference_rule, index)


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


def _numpy(name: str, value: Any) -> np.ndarray:
    """A state_dict entry as a numpy array; CheckpointError for what is not a storable tensor."""
    if not torch.is_tensor(value):
        raise _not_a_tensor(name, value)
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float16):
        value = value.float()  # bfloat16 / float64 entries: stored as float32
    if value.is_complex():
        raise ConfigError(f"tensor {name} is {value.dtype}: complex tensors cannot be stored")
    try:
        return value.detach().cpu().numpy()
    except (RuntimeError, TypeError) as exc:  # sparse, quantized, meta: not plain numbers
        raise CheckpointError(f"tensor {name} ({value.layout}) cannot be stored: {exc}") from None


def _not_a_tensor(name: str, value: Any) -> CheckpointError:
    return CheckpointError(
        f"entry {name!r:.60} is not a tensor ({type(value).__name__}): a state_dict holds "
        "tensors and slot layers' records; save the model's own: torch.save(slot.state_dict(), "
        "path)"
    )

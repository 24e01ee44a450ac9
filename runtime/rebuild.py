"""Dense float32 arrays from a ``.slot`` file, with numpy only (torch is never imported here).

The names follow the dense twin's torch state dict (``"1.weight"``, ``"4.running_var"``...), so
``model.load_state_dict({k: torch.from_numpy(v) ...})`` loads them into ``create(name,
method="learned")`` unchanged. :func:`layout` sizes them without building any, and
:func:`array` / :func:`iter_arrays` build one at a time, so a writer can stream a model whose
dense form does not fit in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from slotpack import format as F
from slotpack import prng
from slotpack.errors import OutOfMemoryError, size_text

Source = Path | str | bytes | F.SlotFile


def weight(slot: F.SlotFile, position: int) -> np.ndarray:
    """The dense weight of the weighted layer at ``position``: only the selected values are made."""
    for w in slot.weights:
        if w.position == position:
            index = slot.indices(w.section)
            values = prng.selected_np(slot.seed, w.number, index, w.k, w.bound)
            return values.reshape(w.layer.weight_shape)
    raise KeyError(f"layer {position} is not a weighted layer")


def _entries(slot: F.SlotFile) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """name -> (shape, build) of every dense array, in layer order; nothing is built here."""
    out = {}
    if slot.weights_only:  # every section is one state_dict entry, in the file's order (§2.8)
        slots = {w.section: w for w in slot.weights}
        for name, s in slot.sections.items():
            if name in slots:
                w = slots[name]
                out[name] = (w.layer.weight_shape, lambda pos=w.position: weight(slot, pos))
            else:
                out[name] = (s.shape, lambda n=name: slot.tensor(n))
        return out
    weighted = {pos for pos, *_ in slot.weighted()}
    for pos, (layer, roles) in enumerate(zip(slot.layers, slot.tensors, strict=True)):
        if pos in weighted:
            out[f"{pos}.weight"] = (tuple(layer.weight_shape), lambda pos=pos: weight(slot, pos))
        for role, name in roles.items():
            if role != "indices":
                out[f"{pos}.{role}"] = (slot.sections[name].shape, lambda n=name: slot.tensor(n))
    return out


def layout(source: Source) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every dense float32 array of a ``.slot`` file, in layer order; none is
    built."""
    return {name: shape for name, (shape, _) in _entries(_decoded(source)).items()}


def array(slot: F.SlotFile, name: str) -> np.ndarray:
    """One dense array by name; running out of memory is an OutOfMemoryError naming it."""
    entries = _entries(slot)
    if name not in entries:
        raise KeyError(f"no dense array {name!r}; the file has {', '.join(entries)}")
    shape, build = entries[name]
    try:
        return build()
    except MemoryError:
        count = math.prod(shape)
        raise OutOfMemoryError(
            f"out of memory rebuilding {name} ({count:,} float32 values, {size_text(4 * count)})"
        ) from None


def iter_arrays(
    source: Source, names: Iterable[str] | None = None, *, verify: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every dense array (or of ``names``, in that order), built one at a time."""
    slot = _decoded(source, verify)
    for name in layout(slot) if names is None else names:
        yield name, array(slot, name)


def rebuild(source: Source, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Dense float32 arrays by name from a ``.slot`` file: a path, its bytes, or already decoded."""
    return dict(iter_arrays(source, verify=verify))


def load_state_dict(source: Source, *, verify: bool = True) -> dict[str, np.ndarray]:
    """``{state_dict name: numpy array}`` of a ``.slot`` file, without torch: every slot weight
    rebuilt (float32), every other tensor as stored (float16 widened to float32, int64 kept).
    Zoo files name their tensors as the zoo's dense twin does (``1.weight``, ...)."""
    return rebuild(source, verify=verify)


def _decoded(source: Source, verify: bool = True) -> F.SlotFile:
    if isinstance(source, F.SlotFile):
        return source
    if isinstance(source, bytes):
        return F.decode(source, verify=verify)
    return F.read(source, verify=verify)

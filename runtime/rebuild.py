"""Dense float32 arrays from a ``.slot`` file, with numpy only (torch is never imported here).

The names follow the dense twin's torch state dict (``"1.weight"``, ``"4.running_var"``...), so
``model.load_state_dict({k: torch.from_numpy(v) ...})`` loads them into ``create(name,
method="learned")`` unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slotpack import format as F
from slotpack import prng


def weight(slot: F.SlotFile, position: int) -> np.ndarray:
    """The dense weight of the weighted layer at ``position``: only the selected values are made."""
    for w in slot.weights:
        if w.position == position:
            index = slot.indices(w.section)
            values = prng.selected_np(slot.seed, w.number, index, w.k, w.bound)
            return values.reshape(w.layer.weight_shape)
    raise KeyError(f"layer {position} is not a weighted layer")


def arrays(slot: F.SlotFile) -> dict[str, np.ndarray]:
    """Every dense array of a decoded file, in layer order."""
    out: dict[str, np.ndarray] = {}
    weighted = {pos for pos, *_ in slot.weighted()}
    for pos, roles in enumerate(slot.tensors):
        if pos in weighted:
            out[f"{pos}.weight"] = weight(slot, pos)
        for role, name in roles.items():
            if role != "indices":
                out[f"{pos}.{role}"] = slot.tensor(name)
    return out


def rebuild(
    source: Path | str | bytes | F.SlotFile, *, verify: bool = True
) -> dict[str, np.ndarray]:
    """Dense float32 arrays by name from a ``.slot`` file: a path, its bytes, or already decoded."""
    if isinstance(source, F.SlotFile):
        slot = source
    elif isinstance(source, bytes):
        slot = F.decode(source, verify=verify)
    else:
        slot = F.read(source, verify=verify)
    return arrays(slot)

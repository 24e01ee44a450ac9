"""What ``slotpack inspect`` reports: per-layer sizes of a decoded ``.slot`` file (no torch)."""

from __future__ import annotations

import math
from typing import Any

from . import arch as A
from . import bits as B
from . import format as F


def summary(slot: F.SlotFile, *, verified: bool = False) -> dict[str, Any]:
    """Per-layer rows (position, op, shape, K, index encoding, changed fraction, bits per
    connection, bytes, ratio vs float32) and totals."""
    rows = []
    connections = dense = 0
    weights = {w.position: w for w in slot.weights}
    for pos, (layer, roles) in enumerate(zip(slot.layers, slot.tensors, strict=True)):
        if not roles:
            continue
        nbytes = sum(slot.sections[name].length for name in roles.values())
        values = sum(
            slot.sections[name].count for name in roles.values() if not name.endswith(".indices")
        )
        w = weights.get(pos)
        n = math.prod(layer.weight_shape) if isinstance(layer, A.WEIGHTED) else 0
        connections += n
        dense += values
        row: dict[str, Any] = {
            "position": pos,
            "op": layer.op,
            "shape": list(layer.weight_shape) if w else [layer.num_features],
            "k": w.k if w else None,
            "bits": B.bits_for(w.k) if w else None,
            "connections": n,
            "dense_values": values,
            "bytes": nbytes,
            "ratio": 4 * (n + values) / nbytes if nbytes else 0.0,
        }
        if w:
            s = slot.sections[w.section]
            changed = s.changes if s.encoding == "delta" else _changed(slot, w)
            row.update(
                encoding=s.encoding,
                gap_code=s.gap_code if s.encoding == "delta" else None,
                reference=w.reference,
                changed=changed,
                changed_fraction=changed / n if n else 0.0,
                index_bytes=s.length,
                bits_per_connection=8 * s.length / n if n else 0.0,
            )
        rows.append(row)
    float32 = 4 * (connections + dense)
    total = {
        "bytes": slot.size,
        "overhead_bytes": slot.size - sum(r["bytes"] for r in rows),
        "connections": connections,
        "changed": sum(r.get("changed", 0) for r in rows),
        "dense_values": dense,
        "float32_bytes": float32,
        "bits_per_connection": 8 * slot.size / connections if connections else 0.0,
        "ratio": float32 / slot.size,
    }
    return {
        "format_version": slot.version,
        "generator": slot.manifest["generator"]["id"],
        "seed": slot.manifest["generator"]["seed"],
        "k": slot.k,
        "index_bits": slot.index_bits,
        "selection": slot.manifest["selection"],
        "checksums_verified": verified,
        "layers": rows,
        "total": total,
        "metadata": slot.manifest["metadata"],
    }


def _changed(slot: F.SlotFile, w: F.Weights) -> int:
    """Connections of a fixed-width section that differ from their reference slot."""
    return int((slot.indices(w.section) != slot.reference(w)).sum())

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
    pairs = [] if slot.weights_only else zip(slot.layers, slot.tensors, strict=True)
    if slot.weights_only:
        rows, connections, dense = _named_rows(slot)
    for pos, (layer, roles) in enumerate(pairs):
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
            row.update(_index_columns(slot, w))
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


def _index_columns(slot: F.SlotFile, w: F.Weights) -> dict[str, Any]:
    s, n = slot.sections[w.section], w.count
    changed = s.changes if s.encoding == "delta" else _changed(slot, w)
    return {
        "encoding": s.encoding,
        "gap_code": s.gap_code if s.encoding == "delta" else None,
        "crossing": s.crossing if s.encoding == "delta" else None,
        "reference": w.reference,
        "changed": changed,
        "changed_fraction": changed / n if n else 0.0,
        "index_bytes": s.length,
        "bits_per_connection": 8 * s.length / n if n else 0.0,
    }


def _named_rows(slot: F.SlotFile) -> tuple[list[dict[str, Any]], int, int]:
    """A weights-only file (§2.8): one row per tensor, by state_dict name, in file order."""
    named = {w.section: w for w in slot.weights}
    rows, connections, dense = [], 0, 0
    for pos, (name, s) in enumerate(slot.sections.items()):
        w = named.get(name)
        n, values = (w.count, 0) if w else (0, s.count)
        connections, dense = connections + n, dense + values
        row: dict[str, Any] = {
            "position": pos,
            "name": name,
            "op": "slot" if w else s.encoding,
            "shape": list(w.layer.weight_shape if w else s.shape),
            "k": w.k if w else None,
            "bits": B.bits_for(w.k) if w else None,
            "connections": n,
            "dense_values": values,
            "bytes": s.length,
            "ratio": 4 * (n + values) / s.length if s.length else 0.0,
        }
        if w:
            row.update(_index_columns(slot, w))
        rows.append(row)
    return rows, connections, dense


def _changed(slot: F.SlotFile, w: F.Weights) -> int:
    """Connections of a fixed-width section that differ from their reference slot."""
    return int((slot.indices(w.section) != slot.reference(w)).sum())

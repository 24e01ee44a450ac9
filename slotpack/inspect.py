"""What ``slotpack inspect`` reports: per-layer sizes of a decoded ``.slot`` file (no torch)."""

from __future__ import annotations

import math
from typing import Any

from . import arch as A
from . import format as F


def summary(slot: F.SlotFile, *, verified: bool = False) -> dict[str, Any]:
    """Per-layer rows (position, op, shape, K, bits, bytes, ratio vs float32) and totals."""
    rows = []
    connections = dense = 0
    for pos, (layer, roles) in enumerate(zip(slot.layers, slot.tensors, strict=True)):
        if not roles:
            continue
        nbytes = sum(slot.sections[name].length for name in roles.values())
        values = sum(
            slot.sections[name].count for name in roles.values() if not name.endswith(".indices")
        )
        weighted = isinstance(layer, A.WEIGHTED)
        n = math.prod(layer.weight_shape) if weighted else 0
        connections += n
        dense += values
        rows.append(
            {
                "position": pos,
                "op": layer.op,
                "shape": list(layer.weight_shape) if weighted else [layer.num_features],
                "k": slot.k if weighted else None,
                "bits": slot.index_bits if weighted else None,
                "connections": n,
                "dense_values": values,
                "bytes": nbytes,
                "ratio": 4 * (n + values) / nbytes if nbytes else 0.0,
            }
        )
    float32 = 4 * (connections + dense)
    total = {
        "bytes": slot.size,
        "overhead_bytes": slot.size - sum(r["bytes"] for r in rows),
        "connections": connections,
        "dense_values": dense,
        "float32_bytes": float32,
        "bits_per_connection": 8 * slot.size / connections if connections else 0.0,
        "ratio": float32 / slot.size,
    }
    return {
        "format_version": slot.manifest["version"],
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

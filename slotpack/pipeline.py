"""The main job end to end on a small default: fetch MNIST, train slot and float32 Lenet, compare.

``slotpack demo`` prints the table this returns. Packing, export and onnxruntime join the path as
their issues land; until then the table compares what training alone can show: accuracy, time and
the bits each connection needs in principle (log2 K against 32).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import data
from .errors import CheckpointError
from .train import Reporter, TrainConfig, train


@dataclass(frozen=True)
class DemoRow:
    name: str
    method: str
    k: int | None
    connections: int
    bits_per_connection: float
    test_acc: float
    seconds_per_epoch: float
    run: str


def demo(
    out: Path | str = "runs/demo",
    *,
    root: Path | str | None = None,
    model: str = "lenet300100",
    k: int = 8,
    epochs: int = 3,
    limit: int | None = None,
    device: str = "auto",
    force: bool = False,
    reporter: Reporter | None = None,
) -> list[DemoRow]:
    """Train ``model`` as a K-slot network and as its float32 twin; return one row per run."""
    out = Path(out)
    root = Path(root) if root is not None else data.default_root()
    runs = {"slot": out / f"slot-k{k}", "learned": out / "learned-fp32"}
    existing = [p for p in runs.values() if p.exists()]
    if existing and not force:
        raise CheckpointError(f"{existing[0]} already exists; choose another --out or pass --force")
    for path in existing:
        shutil.rmtree(path)
    data.fetch("mnist" if model == "lenet300100" else "cifar10", root)
    rows = []
    for method, path in runs.items():
        cfg = TrainConfig(model=model, k=k, method=method, epochs=epochs, limit=limit)
        result = train(cfg, path, root=root, device=device, reporter=reporter)
        bits = math.log2(k) if method == "slot" else 32.0
        connections = cfg_connections(model)
        rows.append(
            DemoRow(
                f"{model} {'K=' + str(k) if method == 'slot' else 'float32'}",
                method,
                k if method == "slot" else None,
                connections,
                bits,
                result["test_acc"],
                result["mean_epoch_seconds"],
                str(path),
            )
        )
    return rows


def cfg_connections(model: str) -> int:
    from . import arch

    return arch.get(model).num_connections

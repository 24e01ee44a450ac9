"""Does a zero slot move the Lenet-300-100 frontier? (issue 11, item 4b; measured, then dropped)

    python -m benchmarks.zero_slot --k 8 --rate 0.2 --epochs 40 --root data/

The option under test: one of each connection's K values is exactly 0 (slot 0), so training can
switch a connection off: a supermask over random values, with edge-popup as the K=2 case. The
format has no way to say so (a reader would regenerate slot 0's random value), so this script
measures the option without shipping it: it trains with the library's own loop while the slot
layers' value banks have slot 0 zeroed, evaluates the best checkpoint in torch with the same
banks, and sizes the ``delta`` file of its selection (the coding depends on indices only: which
connections left their reference slot and to which rank, not on the values). The record sits
beside the accuracy records of the same config without a zero slot.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import write_record


@contextmanager
def zero_slot():
    """While active, every model the training code builds has slot 0 of each bank set to 0."""
    from slotpack import train
    from slotpack.layers import _SlotMixin

    build = train.build_model

    def build_zeroed(cfg, device="cpu"):
        model = build(cfg, device)
        for m in model.modules():
            if isinstance(m, _SlotMixin):
                if m.bank is None:
                    raise SystemExit("zero_slot: lean layers have no bank to edit; drop --lean")
                m.bank[:, 0] = 0.0
        return model

    train.build_model = build_zeroed
    try:
        yield
    finally:
        train.build_model = build


def measure(run: Path, root: Path) -> dict[str, Any]:
    """Test accuracy in torch (zeroed banks) and the delta-coded size of the best selection."""
    import numpy as np

    from slotpack import data
    from slotpack import format as F
    from slotpack.pack import pack_model
    from slotpack.train import evaluate, load_checkpoint, load_model, run_metadata

    with zero_slot():
        model, cfg = load_model(run)
    result = evaluate(model, data.load(cfg.dataset, root, "test"))
    blob, _ = pack_model(model, metadata=run_metadata(load_checkpoint(run)))
    slot = F.decode(blob)
    zeros = sum(int((slot.indices(w.section) == 0).sum()) for w in slot.weights)
    n = sum(w.count for w in slot.weights)
    return {
        "test_acc": result.accuracy,
        "file_bytes": len(blob),
        "bits_per_connection": 8 * len(blob) / n,
        "zero_fraction": zeros / n,
        "changed_fraction": float(
            np.mean(
                np.concatenate([slot.indices(w.section) != slot.reference(w) for w in slot.weights])
            )
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--runs", type=Path, default=Path("runs/bench"))
    args = p.parse_args(argv)

    from slotpack import train
    from slotpack.data import default_root

    root = args.root or default_root()
    cfg = train.TrainConfig(
        model="lenet300100", k=args.k, epochs=args.epochs, seed=args.seed, rate=args.rate
    )
    name = f"zero_slot_lenet300100_k{args.k}-rate{args.rate:g}_e{args.epochs}_s{args.seed}"
    run = args.runs / name
    with zero_slot():
        train.train(cfg, run, root=root, device="cpu")
    payload = {"kind": "zero_slot", "config": cfg.resolved().to_dict(), **measure(run, root)}
    print(write_record(name, payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())

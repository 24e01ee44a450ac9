"""Train zoo models and record their accuracy: one JSON record per run under results/.

    python -m benchmarks.accuracy --model lenet300100 --k 8 --epochs 30 --root data/
    python -m benchmarks.accuracy --model lenet300100 --method learned --epochs 30 --root data/

Each record holds the full config, every epoch's metrics (training curve), the best-on-validation
epoch and its test accuracy measured in torch, and seconds per epoch on the machine that ran it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import write_record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--k", type=int, nargs="+", default=[8])
    p.add_argument("--method", default="slot", choices=["slot", "learned"])
    p.add_argument("--selection", default="greedy", choices=["greedy", "probabilistic"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", default=None, choices=["constant", "cosine", "step"])
    p.add_argument("--limit", type=int, default=None, help="first N training examples only")
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--runs", type=Path, default=Path("runs/bench"))
    p.add_argument("--device", default="auto")
    p.add_argument("--tag", default="", help="suffix for the record name (e.g. the machine)")
    args = p.parse_args(argv)

    from slotpack import data
    from slotpack.cli import _Bars
    from slotpack.train import TrainConfig, iter_metrics, train

    root = args.root or data.default_root()
    ks = args.k if args.method == "slot" else [args.k[0]]
    for k in ks:
        for seed in args.seed:
            cfg = TrainConfig(
                model=args.model,
                k=k,
                method=args.method,
                selection=args.selection,
                epochs=args.epochs,
                seed=seed,
                lr=args.lr,
                schedule=args.schedule,
                limit=args.limit,
            )
            label = "learned" if args.method == "learned" else f"k{k}-{args.selection}"
            name = f"accuracy_{args.model}_{label}_e{args.epochs}_s{seed}{args.tag}"
            out = args.runs / name
            result = train(cfg, out, root=root, device=args.device, reporter=_Bars())
            payload = {
                "kind": "accuracy",
                "config": cfg.resolved().to_dict(),
                "result": result,
                "curve": list(iter_metrics(out)),
            }
            path = write_record(name, payload)
            print(
                f"{name}: test {result['test_acc']:.4f} (val {result['val_acc']:.4f}, "
                f"{result['mean_epoch_seconds']:.1f} s/epoch) -> {path}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

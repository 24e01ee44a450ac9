"""Data-parallel training throughput: one process against torchrun with 1 and N ranks (gloo on CPU).

    python -m benchmarks.ddp_throughput --model lenet300100 --nproc 1 2 --epochs 3 --limit 20000

Every configuration trains the same run (same seed, same global batches) from scratch with
``slotpack train``, under torchrun with both gradient reductions (``--grad-reduce scores``: DDP
all-reduces the [connections, K] score gradients; ``weights``: the [connections] weight gradients); the CPU cores are split evenly between the ranks (OMP_NUM_THREADS). Records
images per second of training (epochs after the first, which holds start-up costs), the
test accuracy each run reached, and whether the ranks' replicas were identical. On one
machine the ranks share its cores, so this shows that data-parallel training works and what the
all-reduce costs, not how it scales across GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import write_record


def _run(nproc: int | None, reduce: str, args: argparse.Namespace, out: Path, root: Path) -> dict:
    """Train once; ``nproc=None`` is the plain single process without DDP."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // (nproc or 1))
    train = [
        "train",
        "--model",
        args.model,
        "--k",
        str(args.k),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--device",
        "cpu",
        "--root",
        str(root),
        "--out",
        str(out),
    ]
    if args.limit:
        train += ["--limit", str(args.limit)]
    if nproc is None:
        cmd = [sys.executable, "-m", "slotpack", *train]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        train += ["--grad-reduce", reduce]
        cmd = [*launcher, "--nproc-per-node", str(nproc), "-m", "slotpack", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    result = json.loads((out / "result.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = epochs[1:] or epochs
    seconds = sum(e["epoch_seconds"] for e in timed) / len(timed)
    return {
        "mode": "single process" if nproc is None else f"torchrun, {nproc} rank(s), {reduce}",
        "ranks": nproc or 1,
        "ddp": nproc is not None,
        "grad_reduce": reduce if nproc else None,
        "threads_per_rank": threads,
        "epoch_seconds": seconds,
        "images_per_second": result["train_count"] / seconds,
        "test_acc": result["test_acc"],
        "replicas_identical": len(set(result.get("replica_digests", ["-"]))) == 1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="lenet300100")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=20_000)
    p.add_argument("--root", type=Path, default=None)
    args = p.parse_args(argv)

    from slotpack import data

    root = args.root or data.default_root()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(None, "")] + [(n, r) for n in args.nproc for r in ("scores", "weights")]
        for nproc, reduce in runs:
            row = _run(nproc, reduce, args, Path(tmp) / f"run{nproc}{reduce}", root)
            rows.append(row)
            print(
                f"{row['mode']:24s} {row['images_per_second']:9.0f} images/s  "
                f"test {row['test_acc']:.4f}  replicas identical: {row['replicas_identical']}",
                flush=True,
            )
    config = {k: getattr(args, k) for k in ("model", "k", "epochs", "batch_size", "limit")}
    path = write_record("ddp_cpu", {"kind": "ddp", "config": config, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

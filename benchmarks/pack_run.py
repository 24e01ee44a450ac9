"""Wall time of ``slotpack pack RUN -o FILE`` on a Lenet-300-100 run, this tree against another.

    python -m benchmarks.pack_run --before 4305e06        # a commit to compare with (optional)

Each side runs the real command in a fresh process (imports included, as a user waits for it),
``--repeat`` times; the record keeps the median wall time, the median CPU time of the process,
and whether both sides wrote the same bytes. ``--before`` extracts that commit's tree with
``git archive`` and runs it from there (``PYTHONPATH``). Without ``--run`` a 1-epoch run on 2,000
MNIST images is trained first (its checkpoint is what ``pack`` reads; training length does not
change the checkpoint's size).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_record

ROOT = Path(__file__).resolve().parents[1]


def _pack(tree: Path, run: Path, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``slotpack pack`` process run from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "slotpack", "pack", str(run), "-o", str(out), "--force"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=tree, capture_output=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def measure(label: str, tree: Path, run: Path, out: Path, repeat: int) -> dict:
    times = [_pack(tree, run, out) for _ in range(repeat)]
    row = {
        "tree": label,
        "seconds": statistics.median(t[0] for t in times),
        "cpu_seconds": statistics.median(t[1] for t in times),
        "all_seconds": [t[0] for t in times],
        "file_bytes": out.stat().st_size,
    }
    print(f"{label:28s} {row['seconds']:6.2f} s wall, {row['cpu_seconds']:6.2f} s CPU", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", type=Path, default=None, help="A Lenet-300-100 run folder.")
    p.add_argument("--before", default=None, help="A git commit to compare with.")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--root", type=Path, default=None, help="MNIST root (default: $SLOTPACK_DATA).")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slotpack-packrun-") as tmp:
        tmp = Path(tmp)
        run = args.run
        if run is None:
            run = tmp / "lenet"
            root = ["--root", str(args.root)] if args.root else []
            subprocess.run(
                [sys.executable, "-m", "slotpack", "train", "--model", "lenet300100",
                 "--epochs", "1", "--limit", "2000", "--eval-limit", "500", "--out", str(run),
                 *root],
                check=True, cwd=ROOT, capture_output=True, timeout=1200,
            )  # fmt: skip
        rows = []
        outs = {}
        if args.before:
            old = tmp / "before"
            old.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.before], check=True, capture_output=True
            )
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            outs["before"] = tmp / "before.slot"
            rows.append(measure(f"before ({args.before})", old, run, outs["before"], args.repeat))
        outs["after"] = tmp / "after.slot"
        rows.append(measure("this tree", ROOT, run, outs["after"], args.repeat))
        same = len({o.read_bytes() for o in outs.values()}) == 1
    print(f"same bytes: {same}")
    path = write_record(
        "pack_run",
        {"kind": "pack_run", "model": "lenet300100", "k": 8, "same_bytes": same, "rows": rows},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

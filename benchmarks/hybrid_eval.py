"""CIFAR-10 accuracy of .slot files on the labelled 10k hybrid test set, in onnxruntime.

    python -m benchmarks.hybrid_eval runs/*.slot --root data/

The hybrid set (see ../shared/DATA.md) holds all 10,000 test images, 1,000 exact and 9,000
decoded from a lossy JPEG copy: its accuracy is an estimate, always reported as "10k hybrid",
never as CIFAR-10 test accuracy. One record per file (``hybrid_<file stem>``), which the report
joins to the accuracy record of the same name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import write_record


def load_hybrid(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x uint8 [N,3,32,32], y, exact flags) from the converted folder's test_hybrid_10k.npz."""
    from slotpack.sources import CIFAR10_FOLDER

    with np.load(root / CIFAR10_FOLDER / "test_hybrid_10k.npz") as f:
        return (
            np.ascontiguousarray(f["x"].transpose(0, 3, 1, 2)),
            f["y"].astype(np.int64),
            f["exact"],
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--root", type=Path, default=Path("data"))
    args = p.parse_args(argv)

    from slotpack.runtime import evaluate, session

    x, y, exact = load_hybrid(args.root)
    for path in args.files:
        sess = session(path)
        every = evaluate(sess, x, y).accuracy
        exact_only = evaluate(sess, x[exact], y[exact]).accuracy
        name = f"hybrid_{path.stem}"
        write_record(
            name,
            {
                "kind": "hybrid",
                "accuracy_record": path.stem,
                "file": path.name,
                "hybrid10k_acc": every,
                "exact1000_acc": exact_only,
                "count": int(len(y)),
                "exact_count": int(exact.sum()),
            },
        )
        print(f"{path.name}: 10k hybrid {every:.4f}, its 1,000 exact images {exact_only:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

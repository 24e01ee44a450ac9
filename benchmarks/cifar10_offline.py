"""Convert the offline CIFAR-10 copy (PNG batches) into torchvision's cifar-10-batches-py layout.

    python -m benchmarks.cifar10_offline --src ../shared/data/cifar10 --root data/

The source (see DATA.md) is Karpathy's ConvNetJS export: cifar10_batch_{0..50}.png, 1000 images
per PNG, one 32x32x3 HWC image per 1024-pixel row, plus cifar10_labels.json (51,000 labels).
PNGs 0-49 become data_batch_1..5 in the standard order (exact); PNG 50 becomes a test_batch of
the first 1,000 standard test images only (exact). The pickles have the real files' keys and
dtypes, so torchvision's CIFAR10 reads them; as they cannot match torchvision's md5s, a marker
(slotpack-offline.json) records the sha256 of every file written, and slotpack.data.load checks
that instead. The 10k JPEG-hybrid test set is copied alongside and marked "lossy estimate only".

--allow-partial converts whatever complete data_batch_N (ten consecutive PNGs) is present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from slotpack.errors import DataError, SlotpackError
from slotpack.sources import (
    CIFAR10_FOLDER,
    CIFAR10_LABEL_NAMES,
    CIFAR10_MARKER,
    CIFAR10_MARKER_FORMAT,
    CIFAR10_MARKER_VERSION,
    write_atomic,
)

PNG_COUNT = 51  # 0-49 training, 50 the first 1,000 test images
PER_PNG = 1000
PNGS_PER_BATCH = 10
HYBRID = "cifar10_test_10k_jpeg_hybrid.npz"
HYBRID_OUT = "test_hybrid_10k.npz"
# Published facts of the real training set, checked when all 50,000 images are converted.
FIRST_RED_PIXELS = (59, 43, 50, 68)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
DEFAULT_SRC = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10"


def _write_atomic(path: Path, blob: bytes) -> str:
    """Write via a temporary file and rename, so a crash never leaves a half file; sha256."""
    write_atomic(path, blob)
    return hashlib.sha256(blob).hexdigest()


def _read_png(path: Path) -> np.ndarray:
    """One source PNG as uint8 [1000, 3072] in CIFAR's CHW-planar row order."""
    with Image.open(path) as img:
        if img.mode != "RGB" or img.size != (1024, PER_PNG):
            raise DataError(f"{path}: expected a 1024x1000 RGB PNG, got {img.mode} {img.size}")
        hwc = np.asarray(img, dtype=np.uint8).reshape(PER_PNG, 32, 32, 3)
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)).reshape(PER_PNG, 3072)


def _batch(data: np.ndarray, labels: list[int], label: str, prefix: str, start: int) -> bytes:
    # Same keys and types as the real pickles; the original file names are not in the source.
    entry = {
        "batch_label": label,
        "labels": labels,
        "data": data,
        "filenames": [f"{prefix}_{start + i:05d}.png" for i in range(len(labels))],
    }
    return pickle.dumps(entry, protocol=4)


def _load_labels(src: Path) -> list[int]:
    path = src / "cifar10_labels.json"
    try:
        labels = json.loads(path.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read the labels ({exc})") from exc
    if len(labels) != PNG_COUNT * PER_PNG or not all(
        isinstance(v, int) and 0 <= v < 10 for v in labels
    ):
        raise DataError(f"{path}: expected {PNG_COUNT * PER_PNG} labels in 0..9")
    return labels


def convert(src: Path, root: Path, *, allow_partial: bool = False) -> dict:
    """Write root/cifar-10-batches-py/ from ``src``; return a summary (also in the marker)."""
    src, out = Path(src), Path(root) / CIFAR10_FOLDER
    labels = _load_labels(src)
    have = {i for i in range(PNG_COUNT) if (src / f"cifar10_batch_{i}.png").is_file()}
    missing = sorted(set(range(PNG_COUNT)) - have)
    if missing and not allow_partial:
        raise DataError(
            f"{src}: {len(missing)} of {PNG_COUNT} PNG batches missing (first: "
            f"cifar10_batch_{missing[0]}.png); pass --allow-partial to convert what is there"
        )
    out.mkdir(parents=True, exist_ok=True)
    # Drop any old marker first: a run that dies midway must not leave a marker that vouches
    # for a mix of old and new files.
    (out / CIFAR10_MARKER).unlink(missing_ok=True)

    files: dict[str, dict] = {}
    train_batches: list[str] = []
    counts = np.zeros(10, np.int64)
    sums, sumsq, first_red = np.zeros(3), np.zeros(3), None
    for k in range(1, 6):
        pngs = range((k - 1) * PNGS_PER_BATCH, k * PNGS_PER_BATCH)
        if not set(pngs) <= have:
            continue
        data = np.concatenate([_read_png(src / f"cifar10_batch_{i}.png") for i in pngs])
        start = pngs[0] * PER_PNG
        y = labels[start : start + len(data)]
        name = f"data_batch_{k}"
        blob = _batch(data, y, f"training batch {k} of 5", "offline_train", start)
        files[name] = {"sha256": _write_atomic(out / name, blob), "bytes": len(blob)}
        train_batches.append(name)
        counts += np.bincount(y, minlength=10)
        planes = data.reshape(-1, 3, 1024).astype(np.float64) / 255.0
        sums += planes.sum(axis=(0, 2))
        sumsq += (planes**2).sum(axis=(0, 2))
        if k == 1:
            first_red = tuple(int(v) for v in data[0, :4])

    test_batch = None
    if 50 in have:
        data = _read_png(src / "cifar10_batch_50.png")
        blob = _batch(
            data, labels[50_000:], "testing batch 1 of 1 (first 1,000 only)", "offline_test", 0
        )
        test_batch = "test_batch"
        files[test_batch] = {
            "sha256": _write_atomic(out / test_batch, blob),
            "bytes": len(blob),
            "note": "the first 1,000 images of the standard test_batch, exact (not 10,000)",
        }
    if not train_batches and test_batch is None:
        raise DataError(f"{src}: no complete data_batch (ten consecutive PNGs) and no PNG 50")

    meta = {
        "num_cases_per_batch": 10_000,
        "label_names": list(CIFAR10_LABEL_NAMES),
        "num_vis": 3072,
    }
    blob = pickle.dumps(meta, protocol=4)
    files["batches.meta"] = {
        "sha256": _write_atomic(out / "batches.meta", blob),
        "bytes": len(blob),
    }

    hybrid = None
    if (src / HYBRID).is_file():
        blob = (src / HYBRID).read_bytes()
        hybrid = HYBRID_OUT
        files[hybrid] = {
            "sha256": _write_atomic(out / hybrid, blob),
            "bytes": len(blob),
            "note": "lossy estimate only: all 10,000 test images ordered by class; 1,000 exact "
            "(flag `exact`), 9,000 decoded from a JPEG copy (quality ~75, mean abs error "
            "~5.8/255); never report it as CIFAR-10 test accuracy",
        }

    n_train = PER_PNG * PNGS_PER_BATCH * len(train_batches)
    complete = len(train_batches) == 5
    mean = tuple(round(float(v), 4) for v in sums / max(n_train * 1024, 1))
    var = sumsq / max(n_train * 1024, 1) - (sums / max(n_train * 1024, 1)) ** 2
    std = tuple(round(float(v), 4) for v in np.sqrt(np.maximum(var, 0.0)))
    if complete:
        # Known answers of the real set: a wrong reshape or a lossy source fails here.
        bad = []
        if first_red != FIRST_RED_PIXELS:
            bad.append(f"first red pixels {first_red} != {FIRST_RED_PIXELS}")
        if counts.tolist() != [5000] * 10:
            bad.append(f"class counts {counts.tolist()} != 5000 each")
        if (
            np.abs(np.subtract(mean, MEAN)).max() > 1e-3
            or np.abs(np.subtract(std, STD)).max() > 1e-3
        ):
            bad.append(f"mean {mean} / std {std} differ from {MEAN} / {STD}")
        if bad:
            raise DataError(f"{src} is not the CIFAR-10 training set: " + "; ".join(bad))

    summary = {
        "format": CIFAR10_MARKER_FORMAT,
        "version": CIFAR10_MARKER_VERSION,
        "complete": complete and test_batch is not None,
        "train_batches": train_batches,
        "train_images": n_train,
        "train_class_counts": counts.tolist(),
        "train_mean": list(mean),
        "train_std": list(std),
        "test_batch": test_batch,
        "test_images": PER_PNG if test_batch else 0,
        "hybrid": hybrid,
        "files": files,
        "provenance": (
            "Converted by benchmarks/cifar10_offline.py from Karpathy's ConvNetJS export of "
            "CIFAR-10 (lossless PNG, cifar10_batch_0..50.png + cifar10_labels.json). Training "
            "batches are exact and in the standard order; test_batch holds only the first 1,000 "
            "standard test images (exact); file names inside the batches are placeholders."
        ),
    }
    # The marker goes last: its presence vouches for every file listed in it.
    _write_atomic(
        out / CIFAR10_MARKER, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cifar10_offline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder of the PNG copy")
    parser.add_argument("--root", type=Path, default=Path("data"), help="slotpack data root")
    parser.add_argument(
        "--allow-partial", action="store_true", help="convert only the complete batches present"
    )
    args = parser.parse_args(argv)
    try:
        s = convert(args.src, args.root, allow_partial=args.allow_partial)
    except SlotpackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.root / CIFAR10_FOLDER
    print(f"wrote {out}/ ({'complete' if s['complete'] else 'PARTIAL'})")
    print(
        f"  train: {', '.join(s['train_batches']) or 'none'} = {s['train_images']} images, "
        f"class counts {s['train_class_counts']}"
    )
    print(f"  mean {tuple(s['train_mean'])}, std {tuple(s['train_std'])}")
    print(
        f"  test_batch: {s['test_images']} exact test images"
        if s["test_batch"]
        else "  test_batch: none (cifar10_batch_50.png missing)"
    )
    if s["hybrid"]:
        print(f"  {s['hybrid']}: 10,000 test images, lossy estimate only")
    print(f"  marker: {out / CIFAR10_MARKER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

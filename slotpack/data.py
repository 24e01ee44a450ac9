"""Data sets as whole uint8 tensors: torchvision's MNIST and CIFAR-10, fixed splits, GPU batches.

Everything is read through torchvision's own classes over a root folder, then held as one
uint8 tensor (on the GPU if asked), so an epoch is a few index operations instead of a
per-image DataLoader. ``slotpack.sources`` puts the files there; its ``fetch`` is re-exported
here.

The train/val split is fixed forever: ``split_indices`` sorts the indices of torchvision's
training set by the project's generator (SplitMix64, ``prng.bits_np``) keyed with SPLIT_KEY and
holds out the first ``val_fraction``. It depends on no RNG library, so it cannot change with
torch or numpy versions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from slotpack import prng, sources
from slotpack.errors import ConfigError, DataError, RegistryError
from slotpack.sources import first_line, mnist_present, open_cifar10_offline, shown

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


@dataclass(frozen=True)
class TensorData:
    """A whole split as tensors: x uint8 [N,C,H,W], y int64 [N], on one device.

    ``index`` (int64 [N], CPU) is each example's position in torchvision's training set
    (train/val) or test set (test), so results can be traced to the original images.
    """

    x: torch.Tensor
    y: torch.Tensor
    spec: DataSpec
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise DataError(
                f"{self.spec.name}: x must be uint8 [N,C,H,W], got {self.x.dtype} "
                f"{tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise DataError(f"{self.spec.name}: y must be int64 [N] matching x")

    def __len__(self) -> int:
        return self.x.shape[0]


def default_root() -> Path:
    """The data root: $SLOTPACK_DATA if set, else ./data."""
    return Path(os.environ.get("SLOTPACK_DATA") or "data")


def fetch(name: str, root: Path | str, *, progress: Callable[[str], None] | None = None) -> Path:
    """``sources.fetch`` for a registered name (a RegistryError lists the valid ones)."""
    spec(name)
    return sources.fetch(name, root, progress=progress)


def spec(name: str) -> DataSpec:
    """The DataSpec of a registered data set; RegistryError lists the valid names."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise RegistryError(
            f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}"
        ) from None


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


def load(
    name: str,
    root: Path | str,
    split: str,
    device: str | torch.device = "cpu",
    limit: int | None = None,
) -> TensorData:
    """One split of a data set as whole tensors on ``device``.

    "train"/"val" come from torchvision's training set via ``split_indices``; "test" is its
    test set in the standard order (the offline CIFAR-10 copy has only its first 1,000).
    ``limit`` keeps the first ``limit`` examples of the split. Missing data raises DataError
    naming the command that fetches it.
    """
    data_spec = spec(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples, got {limit}")
    root = Path(root)
    reader = _read_mnist if name == "mnist" else _read_cifar10
    x, y, present = reader(root, train=split != "test")

    if split == "test":
        rows = np.arange(len(y), dtype=np.int64)
        index = rows
    else:
        # Map global indices to rows actually present (a partial offline CIFAR-10 copy holds
        # only some batches); a partial split is then a subset of the full one, never another.
        train_idx, val_idx = split_indices(name)
        wanted = val_idx if split == "val" else train_idx
        row_of = np.full(_TRAIN_SIZE[name], -1, dtype=np.int64)
        row_of[present] = np.arange(len(present))
        rows = row_of[wanted]
        index = wanted[rows >= 0]
        rows = rows[rows >= 0]
    if limit is not None:
        rows, index = rows[:limit], index[:limit]
    rows_t = torch.from_numpy(rows)
    return TensorData(
        x=x[rows_t].contiguous().to(device),
        y=y[rows_t].to(device),
        spec=data_spec,
        index=torch.from_numpy(np.ascontiguousarray(index)),
    )


def normalize(x_uint8: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """float32 (x/255 - mean) / std per channel, for [N,C,H,W] or [C,H,W] uint8 input."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    return (x_uint8.to(torch.float32) / 255.0 - mean) / std


def augment(
    x_uint8: torch.Tensor, generator: torch.Generator | None, padding: int = 4
) -> torch.Tensor:
    """Random crop (zero padding 4) and horizontal flip (p=0.5) of a uint8 [N,C,H,W] batch.

    Same distribution as torchvision's RandomCrop(H, padding=4) + RandomHorizontalFlip, drawn
    on the batch's own device with ``generator`` (which must live on that device) and done as
    one gather, with no per-image Python loop.
    """
    if x_uint8.dim() != 4:
        raise ConfigError(f"augment wants a [N,C,H,W] batch, got shape {tuple(x_uint8.shape)}")
    n, c, h, w = x_uint8.shape
    dev = x_uint8.device
    padded = torch.nn.functional.pad(x_uint8, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = top[:, None] + ar_h  # [N,H]
    # Crop then flip: output column j reads padded column left + (w-1-j).
    cols = left[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # [N,W]
    b = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return padded[b, ch, rows[:, None, :, None], cols[:, None, None, :]]


def batches(
    data: TensorData,
    batch_size: int,
    *,
    train: bool,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalized float32 x [B,C,H,W], int64 y [B]) on data's device; last batch kept.

    train=True shuffles with ``generator`` (on data's device) and augments when the spec asks;
    train=False keeps the fixed order. The same generator state gives the same batches.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    n = len(data)
    if not train:
        for i in range(0, n, batch_size):
            yield normalize(data.x[i : i + batch_size], data.spec), data.y[i : i + batch_size]
        return
    order = torch.randperm(n, generator=generator, device=data.x.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        xb = data.x[idx]
        if data.spec.augment:
            xb = augment(xb, generator)
        yield normalize(xb, data.spec), data.y[idx]


# ----------------------------------------------------------------------------- readers


def _mnist_missing(root: Path) -> DataError:
    return DataError(
        f"MNIST not found under {shown(root)}: run `slotpack data mnist --root {shown(root)}`"
    )


def _read_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    if not mnist_present(root):
        raise _mnist_missing(root)
    try:
        ds = torchvision.datasets.MNIST(root, train=train, download=False)
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        raise DataError(
            f"MNIST under {shown(root)} is unreadable ({first_line(exc)}): delete "
            f"{shown(root / 'MNIST')} and run `slotpack data mnist --root {shown(root)}`"
        ) from exc
    expected = 60_000 if train else 10_000
    if ds.data.shape != (expected, 28, 28):
        raise DataError(
            f"MNIST under {shown(root)} has shape {tuple(ds.data.shape)}, "
            f"expected ({expected}, 28, 28)"
        )
    return ds.data.unsqueeze(1), ds.targets.to(torch.int64), np.arange(expected)


def _read_cifar10(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    try:
        ds: torchvision.datasets.CIFAR10 = torchvision.datasets.CIFAR10(root, train=train)
        present = np.arange(len(ds.targets))
    except RuntimeError:  # missing, or failed torchvision's md5s: maybe our offline copy
        ds, present = open_cifar10_offline(root, train)
    x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # HWC -> CHW
    return x, torch.tensor(ds.targets, dtype=torch.int64), present


__all__ = [
    "DATASETS",
    "SPLITS",
    "DataSpec",
    "TensorData",
    "augment",
    "batches",
    "default_root",
    "fetch",
    "load",
    "normalize",
    "spec",
    "split_indices",
]

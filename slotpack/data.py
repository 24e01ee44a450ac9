"""Data sets as whole uint8 tensors: MNIST and CIFAR-10 in torchvision's layout, GPU batches.

``slotpack.datafiles`` reads the files with numpy (the registry of specs and the fixed
train/val split live there too, re-exported here); each split is then held as one uint8 tensor
(on the GPU if asked), so an epoch is a few index operations instead of a per-image DataLoader.
``slotpack.sources`` puts the files there; its ``fetch`` is re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from slotpack import datafiles, sources
from slotpack.datafiles import (
    AUGMENTS,
    DATASETS,
    SPLIT_KEY,
    SPLITS,
    DataSpec,
    default_augment,
    default_root,
    spec,
    split_indices,
)
from slotpack.errors import ConfigError, DataError


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


def fetch(name: str, root: Path | str, *, progress: Callable[[str], None] | None = None) -> Path:
    """``sources.fetch`` for a registered name (a RegistryError lists the valid ones)."""
    spec(name)
    return sources.fetch(name, root, progress=progress)


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
    x, y, index = datafiles.load_arrays(name, root, split, limit)
    return TensorData(
        x=torch.from_numpy(x).to(device),
        y=torch.from_numpy(y).to(device),
        spec=spec(name),
        index=torch.from_numpy(index),
    )


def normalize(x_uint8: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """float32 (x/255 - mean) / std per channel, for [N,C,H,W] or [C,H,W] uint8 input."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    return (x_uint8.to(torch.float32) / 255.0 - mean) / std


def augment(
    x_uint8: torch.Tensor, generator: torch.Generator | None, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and, if ``flip``, horizontal flip (p=0.5) of a
    uint8 [N,C,H,W] batch.

    Same distribution as torchvision's RandomCrop(H, padding) (+ RandomHorizontalFlip), drawn
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
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = top[:, None] + ar_h  # [N,H]
    cols = left[:, None] + ar_w  # [N,W]
    if flip:  # crop then flip: output column j reads padded column left + (w-1-j)
        flipped = torch.rand(n, generator=generator, device=dev) < 0.5
        cols = left[:, None] + torch.where(flipped[:, None], (w - 1) - ar_w, ar_w)
    b = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return padded[b, ch, rows[:, None, :, None], cols[:, None, None, :]]


def batches(
    data: TensorData,
    batch_size: int,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    augmentation: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalized float32 x [B,C,H,W], int64 y [B]) on data's device; last batch kept.

    train=True shuffles with ``generator`` (on data's device) and augments as ``augmentation``
    says (one of AUGMENTS; None: the data set's default); train=False keeps the fixed order.
    The same generator state gives the same batches.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    kind = augmentation or default_augment(data.spec)
    if kind not in AUGMENTS:
        raise ConfigError(f"unknown augmentation {kind!r}; choose one of: {', '.join(AUGMENTS)}")
    n = len(data)
    if not train:
        for i in range(0, n, batch_size):
            yield normalize(data.x[i : i + batch_size], data.spec), data.y[i : i + batch_size]
        return
    order = torch.randperm(n, generator=generator, device=data.x.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        xb = data.x[idx]
        if kind == "crop-flip":
            xb = augment(xb, generator)
        elif kind == "shift":
            xb = augment(xb, generator, padding=2, flip=False)
        yield normalize(xb, data.spec), data.y[idx]


# ----------------------------------------------------------------------------- readers


__all__ = [
    "DATASETS",
    "SPLITS",
    "SPLIT_KEY",
    "DataSpec",
    "TensorData",
    "AUGMENTS",
    "augment",
    "batches",
    "default_augment",
    "default_root",
    "fetch",
    "load",
    "normalize",
    "spec",
    "split_indices",
]

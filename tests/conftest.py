"""Shared fixtures: real MNIST, fetched once per machine into a cache and reused."""

import os
from pathlib import Path

import pytest

from slotpack import data


def cache_dir() -> Path:
    """$SLOTPACK_TEST_DATA, else ~/.cache/slotpack/data: where tests keep real data sets."""
    return Path(
        os.environ.get("SLOTPACK_TEST_DATA") or Path.home() / ".cache" / "slotpack" / "data"
    )


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A root folder holding real MNIST in torchvision's layout (fetched via `slotpack data`)."""
    return data.fetch("mnist", cache_dir())


@pytest.fixture(scope="session")
def big_slot_file(tmp_path_factory) -> Path:
    """A valid K=2 file of 16.8M connections (2 MiB) whose dense form is 64 MiB of float32."""
    from tests.helpers import big_slot

    path = tmp_path_factory.mktemp("big") / "big.slot"
    path.write_bytes(big_slot())
    return path


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """A root folder holding a synthetic CIFAR-10 (random images) in the offline layout that
    slotpack reads: tests need its shapes and file handling, never the real images (CIFAR-10 is
    for benchmarks, and a fresh machine has no internet to fetch it)."""
    from tests.helpers import synthetic_cifar10

    root = tmp_path_factory.mktemp("cifar10")
    synthetic_cifar10(root)
    return root

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
def cifar10_root() -> Path:
    """A root folder holding CIFAR-10 in torchvision's layout (fetched via `slotpack data`)."""
    return data.fetch("cifar10", cache_dir())

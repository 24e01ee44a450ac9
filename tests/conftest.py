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

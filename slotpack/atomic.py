"""Atomic file output: a temporary file in the target's folder, renamed over it when complete.

Readers never see a half-written file, and a failure leaves any earlier file untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError


@contextmanager
def replacing(path: Path | str, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(path: Path | str, data: bytes, *, force: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; with ``force=False`` an existing file is an error."""
    with replacing(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)

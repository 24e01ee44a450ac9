"""Writing dense arrays as ``.safetensors`` or ``.npz`` (what ``slotpack unpack`` produces)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from slotpack.atomic import write_bytes
from slotpack.errors import ConfigError

SUFFIXES = (".safetensors", ".npz")


def _encode(arrays: dict[str, np.ndarray], suffix: str, metadata: dict[str, str] | None) -> bytes:
    if suffix == ".safetensors":
        from safetensors.numpy import save

        return save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_arrays(
    arrays: dict[str, np.ndarray],
    path: Path | str,
    *,
    force: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``arrays`` to ``path`` (format from its suffix), atomically; never a partial file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"cannot write {path.name}: choose a {' or '.join(SUFFIXES)} file name")
    return write_bytes(path, _encode(arrays, path.suffix, metadata), force=force)

"""Writing dense arrays as ``.safetensors`` or ``.npz`` (what ``slotpack unpack`` produces).

Arrays are built and streamed into the temporary file one at a time, so unpacking needs memory
for one array, not for the model (and never an in-memory copy of the file). The bytes are what
``safetensors.numpy.save`` and ``np.savez`` write for the same arrays.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from slotpack import format as F
from slotpack.atomic import replacing
from slotpack.errors import ConfigError, OutOfMemoryError, OutputExistsError, size_text

from .rebuild import array, layout

SUFFIXES = (".safetensors", ".npz")


def unpack(
    source: Path | str | F.SlotFile, path: Path | str, *, force: bool = False
) -> dict[str, tuple[int, ...]]:
    """Rebuild a ``.slot`` file's dense arrays into ``path`` (.safetensors or .npz), one array
    in memory at a time; returns the name -> shape of what was written."""
    path = Path(path)
    _check_suffix(path)
    if path.exists() and not force:  # before the work; the write checks again atomically
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
    slot = source if isinstance(source, F.SlotFile) else F.read(source)
    shapes = layout(slot)
    ints = {name for name, s in slot.sections.items() if s.encoding == "int64"}
    dtypes = {name: np.dtype(np.int64 if name in ints else np.float32) for name in shapes}
    write_arrays(path, shapes, lambda name: array(slot, name), force=force, dtypes=dtypes)
    return shapes


def save_arrays(
    arrays: Mapping[str, np.ndarray],
    path: Path | str,
    *,
    force: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write float32 ``arrays`` to ``path`` (format from its suffix), atomically: never a partial
    file."""
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    dtypes = {name: np.asarray(a).dtype for name, a in arrays.items()}
    return write_arrays(
        path, shapes, arrays.__getitem__, force=force, metadata=metadata, dtypes=dtypes
    )


def write_arrays(
    path: Path | str,
    shapes: Mapping[str, tuple[int, ...]],
    build: Callable[[str], np.ndarray],
    *,
    force: bool = False,
    metadata: dict[str, str] | None = None,
    dtypes: Mapping[str, np.dtype] | None = None,
) -> Path:
    """Stream the arrays ``shapes`` declares into ``path``, asking ``build(name)`` for each one
    only when it is written and holding no other. Atomic, like :func:`save_arrays`. Arrays are
    float32 unless ``dtypes`` says int64 (weights-only files keep BatchNorm's batch counts)."""
    path = Path(path)
    _check_suffix(path)
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ConfigError("array file metadata must map strings to strings")
    shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    kinds = {name: np.dtype((dtypes or {}).get(name, np.float32)) for name in shapes}
    for name, kind in kinds.items():
        if kind not in (np.dtype(np.float32), np.dtype(np.int64)):
            raise ConfigError(f"array {name} is {kind}: only float32 and int64 arrays are written")
    if "__metadata__" in shapes:
        raise ConfigError("an array cannot be named __metadata__ (safetensors reserves it)")

    def checked(name: str) -> np.ndarray:
        got, want = build(name), kinds[name]
        if not isinstance(got, np.ndarray) or got.dtype != want or got.shape != shapes[name]:
            raise ConfigError(
                f"array {name} must be {want} {list(shapes[name])}, got "
                f"{getattr(got, 'dtype', type(got).__name__)} {list(np.shape(got))}"
            )
        return np.ascontiguousarray(got, dtype=want.newbyteorder("<"))

    with replacing(path, force=force) as tmp:
        try:
            if path.suffix == ".safetensors":
                _write_safetensors(tmp, shapes, kinds, checked, metadata)
            else:
                _write_npz(tmp, shapes, checked)
        except MemoryError:
            total = sum(kinds[n].itemsize * math.prod(shape) for n, shape in shapes.items())
            raise OutOfMemoryError(
                f"out of memory writing {path.name} ({len(shapes)} arrays, {size_text(total)})"
            ) from None
    return path


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"cannot write {path.name}: choose a {' or '.join(SUFFIXES)} file name")


def _raw(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (also when it has no elements)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _write_npz(tmp: Path, shapes: dict, build: Callable[[str], np.ndarray]) -> None:
    # What np.savez writes (stored zip64 members of .npy data, in the given order), one at a time.
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in shapes:
            array = build(name)
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                # write_array's header, then the data straight from the array (no copy)
                header = np.lib.format.header_data_from_array_1_0(array)
                np.lib.format.write_array_header_1_0(member, header)
                member.write(_raw(array))
            del array


def _write_safetensors(
    tmp: Path, shapes: dict, kinds: dict, build: Callable[[str], np.ndarray], metadata: dict | None
) -> None:
    # safetensors' layout: u64 header length, JSON header padded with spaces to 8 bytes, then
    # the tensors back to back. The library orders float32 tensors by name; so does this.
    order = sorted(shapes)
    header: dict = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        end = offset + kinds[name].itemsize * math.prod(shapes[name])
        tag = "I64" if kinds[name] == np.dtype(np.int64) else "F32"
        header[name] = {"dtype": tag, "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(_raw(build(name)))

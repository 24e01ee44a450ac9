"""Reading and writing ``.slot`` files (docs/FORMAT.md §2): a strict reader, a deterministic writer.

The reader reads format versions 1 and 2; the writer writes 2 (or 1 when asked). Index sections
are fixed-width ``bits`` or, in version 2, ``delta`` (only what training changed, slotpack.delta).
No torch and no pickle. The reader checks the magic, version, CRCs and every length against the
real size before it allocates anything that depends on them, and rejects any manifest key it does
not know. The writer validates its own output with the reader before anything reaches the disk.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import arch as A
from . import bits as B
from . import delta as D
from . import prng
from .atomic import write_bytes
from .errors import SlotpackError
from .prng import GENERATOR_ID

MAGIC = b"\x89SLOT\r\n\x1a"
FORMAT_VERSION = 2  # what the writer writes unless told otherwise
FORMAT_VERSIONS = (1, 2)  # what the reader reads
HEADER = struct.Struct(
    "<8sHHIIIQ"
)  # magic, version, flags, manifest len, manifest crc, header crc, payload len
MAX_MANIFEST_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_K = 1 << 16
MAX_DIM = 1 << 31
MAX_INT_DIGITS = 4300  # longest integer literal in a manifest, whatever the interpreter allows
# Every activation a manifest's network produces holds at most this many values per image, so
# no reader (or onnxruntime behind it) is asked for gigabytes by a few bytes of manifest.
MAX_ACTIVATION = 1 << 26
SELECTIONS = ("greedy", "probabilistic")
ENCODINGS = {"bits": 0, "float32": 4, "float16": 2}  # bytes per element (bits: packed)
INT64 = {"int64": 8}  # version 2 weights-only files: integer buffers (BatchNorm's batch count)
INDEX_ENCODINGS = {1: ("bits",), 2: ("bits", "delta")}
MANIFEST_KEYS_V1 = {
    "format",
    "version",
    "generator",
    "k",
    "index_bits",
    "selection",
    "input",
    "num_classes",
    "layers",
    "sections",
    "metadata",
}
MANIFEST_KEYS = {1: MANIFEST_KEYS_V1, 2: MANIFEST_KEYS_V1 - {"k", "index_bits"}}
ARCHITECTURE_KEYS = {"input", "num_classes", "layers"}
# version 2 weights-only files (§2.8): tensors by state_dict name, no architecture
WEIGHTS_ONLY_KEYS = MANIFEST_KEYS[2] - ARCHITECTURE_KEYS | {"weights"}
WEIGHT_KEYS = {"name", "shape", "k", "reference"}
MAX_WEIGHT_DIMS = 5  # [out, in] up to [out, in, d, h, w]
WEIGHTED_KEYS_V2 = {"k", "reference"}  # version 2: every weighted layer carries its own K
SECTION_KEYS = {"name", "encoding", "shape", "offset", "length", "crc32"}
DELTA_KEYS = {"changes", "gap_param", "rank_param"}
# and, when they apply: "gap_code" for Exp-Golomb gaps, "crossing" for ranks in the crossing order
DELTA_OPTIONAL = ("gap_code", "crossing")
ROLES = {
    "linear": ("indices", "bias"),
    "conv2d": ("indices", "bias"),
    "batchnorm2d": ("running_mean", "running_var"),
}


class SlotFormatError(SlotpackError):
    """A file is not a valid ``.slot`` file; the subclass says which rule it breaks."""


class TruncatedError(SlotFormatError):
    """The file is shorter than its header or its declared sizes."""


class MagicError(SlotFormatError):
    """The file does not start with the ``.slot`` magic bytes."""


class VersionError(SlotFormatError):
    """The format version or flags are not ones this reader knows."""


class ChecksumError(SlotFormatError):
    """A CRC-32 (header, manifest or section) does not match the bytes."""


class ManifestError(SlotFormatError):
    """The manifest is not valid UTF-8 JSON, or breaks a rule of §2.2-2.4 (keys, ranges, shapes)."""


class LayoutError(SlotFormatError):
    """Sections do not tile the payload exactly (offsets, lengths, padding, trailing bytes)."""


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class Section:
    """One section of the payload as the manifest declares it."""

    name: str
    encoding: str
    shape: tuple[int, ...]
    offset: int
    length: int
    crc32: int
    changes: int = 0  # delta sections: changed connections, the two code parameters
    gap_param: int = 0
    rank_param: int = 0
    gap_code: str = "rice"  # and how the gaps are coded
    crossing: int | None = None  # the crossing order's margin (§1.8); None: the reference order

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Weights:
    """What a reader needs to rebuild one weighted layer: where, K, and its reference rule."""

    position: int
    number: int  # the generator's layer number (§1.2)
    layer: A.Linear | A.Conv2d | A.Weight  # A.Weight in weights-only files
    k: int
    reference: str  # one of prng.REFERENCE_RULES (§1.8)
    section: str  # the indices section

    @property
    def count(self) -> int:
        return math.prod(self.layer.weight_shape)

    @property
    def bound(self) -> float:
        return prng.glorot_bound(*self.layer.fans)


@dataclass(frozen=True)
class SlotFile:
    """A decoded file: validated manifest, parsed layers and the payload (not yet expanded)."""

    manifest: dict[str, Any]
    layers: tuple[A.Layer, ...]
    tensors: tuple[dict[str, str], ...]  # per layer: role -> section name
    sections: dict[str, Section]
    payload: memoryview
    size: int
    weights: tuple[Weights, ...] = ()
    # delta sections' changed positions and ranks, parsed once while the file was checked
    streams: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def seed(self) -> int:
        return int(self.manifest["generator"]["seed"], 16)

    @property
    def weights_only(self) -> bool:
        """True for a file of tensors by name without an architecture (§2.8)."""
        return "weights" in self.manifest

    @property
    def ks(self) -> tuple[int, ...]:
        """K of each weighted layer, in order."""
        return tuple(w.k for w in self.weights)

    @property
    def k(self) -> int | None:
        """The K every weighted layer shares (None when they differ)."""
        return self.ks[0] if len(set(self.ks)) == 1 else None

    @property
    def index_bits(self) -> int | None:
        """Bits of the fixed-width index encoding at that shared K (None when Ks differ)."""
        return B.bits_for(self.k) if self.k is not None else None

    def require_architecture(self, what: str) -> None:
        """ManifestError unless the file describes its network (``what`` needs to run it)."""
        if self.weights_only:
            raise ManifestError(
                f"the file holds weights by name but no architecture, which {what} needs: "
                "load them into your model with slotpack.load_state_dict (or unpack them)"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        self.require_architecture("running the model")
        return tuple(self.manifest["input"]["shape"])

    def raw(self, name: str) -> memoryview:
        s = self.sections[name]
        return self.payload[s.offset : s.offset + s.length]

    def weights_of(self, name: str) -> Weights:
        for w in self.weights:
            if w.section == name:
                return w
        raise KeyError(f"{name} is not an indices section")

    def reference(self, w: Weights) -> np.ndarray:
        """The reference slot of every connection of ``w`` (§1.8)."""
        return prng.reference_np(self.seed, w.number, w.count, w.k, w.bound, w.reference)

    def indices(self, name: str) -> np.ndarray:
        """The stored indices of a section (uint16), whatever its encoding."""
        s, w = self.sections[name], self.weights_of(name)
        if s.encoding == "bits":
            return B.unpack(self.raw(name), s.count, B.bits_for(w.k))
        positions, ranks = self.streams[name]

        def slot_at(pos: np.ndarray, rank: np.ndarray, ref: np.ndarray) -> np.ndarray:
            return prng.slots_at_ranks_np(
                self.seed, w.number, pos, rank, ref, w.k, w.reference, s.crossing
            )

        return D.expand(positions, ranks, w.k, self.reference(w), slot_at)

    def packed_indices(self, name: str) -> bytes:
        """The section's indices in the fixed-width ``bits`` encoding (random access)."""
        if self.sections[name].encoding == "bits":
            return bytes(self.raw(name))
        return B.pack(self.indices(name), B.bits_for(self.weights_of(name).k))

    def tensor(self, name: str) -> np.ndarray:
        """A float section as a float32 array of its declared shape (int64 sections as int64)."""
        s = self.sections[name]
        if s.encoding == "int64":
            return np.frombuffer(self.raw(name), dtype="<i8").astype(np.int64).reshape(s.shape)
        dtype = np.dtype("<f4") if s.encoding == "float32" else np.dtype("<f2")
        return np.frombuffer(self.raw(name), dtype=dtype).astype(np.float32).reshape(s.shape)

    def weighted(self) -> Iterator[tuple[int, int, A.Linear | A.Conv2d, dict[str, str]]]:
        """(position, generator layer number, layer, tensors) of each weighted layer."""
        self.require_architecture("walking its layers")
        for w in self.weights:
            yield w.position, w.number, w.layer, self.tensors[w.position]


# ------------------------------------------------------------------------------- writing


def section_name(position: int, role: str) -> str:
    return f"{position}.{role}"


def implicit_reference(selection: str) -> str:
    """The reference rule of a version 1 file, which records none (§1.8): what its training used."""
    return "draw" if selection == "probabilistic" else "argmax"


def encode(
    *,
    layers: tuple[A.Layer, ...],
    seed: int,
    k: int | tuple[int, ...],
    selection: str,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    blobs: dict[str, tuple[str, tuple[int, ...], bytes | D.Delta]],
    metadata: dict[str, Any] | None = None,
    references: tuple[str, ...] | None = None,
    version: int = FORMAT_VERSION,
) -> bytes:
    """The bytes of a file of format ``version`` (2 unless asked; 1 for readers that know no 2).

    ``blobs`` maps section name -> (encoding, shape, bytes, or a ``delta.Delta``); ``k`` is one K
    for every weighted layer or one per weighted layer; ``references`` the rule of each weighted
    layer (default: what ``selection`` implies for files trained with the "uniform" init).
    """
    n_weighted = sum(isinstance(layer, A.WEIGHTED) for layer in layers)
    ks = (k,) * n_weighted if isinstance(k, int) else tuple(k)
    refs = references or (implicit_reference(selection),) * n_weighted
    if len(ks) != n_weighted or len(refs) != n_weighted:
        raise ValueError(f"{len(ks)} K and {len(refs)} references for {n_weighted} weighted layers")
    if version == 1 and (len(set(ks)) > 1 or set(refs) - {implicit_reference(selection)}):
        raise ValueError("format version 1 holds one K and no reference rule")
    manifest_layers, order, number = [], [], 0
    for pos, layer in enumerate(layers):
        entry = A.layer_to_dict(layer)
        if version >= 2 and isinstance(layer, A.WEIGHTED):
            entry["k"], entry["reference"] = ks[number], refs[number]
            number += 1
        roles = _roles(layer)
        if roles:
            entry["tensors"] = {role: section_name(pos, role) for role in roles}
            order += [section_name(pos, role) for role in roles]
        manifest_layers.append(entry)
    if set(order) != set(blobs):
        raise ValueError(f"sections {sorted(blobs)} do not match the layers' {sorted(order)}")
    sections, payload = _lay_out(order, blobs)
    manifest = {
        "format": "slotpack",
        "version": version,
        "generator": {"id": GENERATOR_ID, "seed": f"{seed:016x}"},
        "selection": selection,
        "input": {"shape": list(input_shape), "mean": list(mean), "std": list(std)},
        "num_classes": num_classes,
        "layers": manifest_layers,
        "sections": sections,
        "metadata": metadata or {},
    }
    if version == 1:
        manifest.update(k=ks[0] if ks else 2, index_bits=B.bits_for(ks[0] if ks else 2))
    return _assemble(manifest, version, payload)


def encode_weights(
    *,
    seed: int,
    selection: str,
    weights: list[tuple[str, tuple[int, ...], int, str]],
    blobs: dict[str, tuple[str, tuple[int, ...], bytes | D.Delta]],
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """The bytes of a version 2 weights-only file (§2.8): tensors by state_dict name.

    ``weights`` lists (name, shape, K, reference rule) of each slot weight, generator layer 0
    first; ``blobs`` maps every tensor name, slot weights included, to (encoding, shape, bytes or
    ``delta.Delta``), in the order the sections take (the state_dict's)."""
    entries = [
        {"name": name, "shape": list(shape), "k": k, "reference": rule}
        for name, shape, k, rule in weights
    ]
    sections, payload = _lay_out(list(blobs), blobs)
    manifest = {
        "format": "slotpack",
        "version": 2,
        "generator": {"id": GENERATOR_ID, "seed": f"{seed:016x}"},
        "selection": selection,
        "weights": entries,
        "sections": sections,
        "metadata": metadata or {},
    }
    return _assemble(manifest, 2, payload)


def _lay_out(
    order: list[str], blobs: dict[str, tuple[str, tuple[int, ...], bytes | D.Delta]]
) -> tuple[list[dict[str, Any]], bytes]:
    """Section entries and the payload, sections 8-byte aligned in ``order``."""
    sections, payload, offset = [], bytearray(), 0
    for name in order:
        encoding, shape, data = blobs[name]
        entry = {"name": name, "encoding": encoding, "shape": list(shape), "offset": 0}
        if isinstance(data, D.Delta):
            entry.update(changes=data.changes, gap_param=data.gap_param, rank_param=data.rank_param)
            if data.gap_code != "rice":  # Rice, the first code, goes without saying
                entry["gap_code"] = data.gap_code
            if data.crossing is not None:  # so does the reference order
                entry["crossing"] = data.crossing
            data = data.data
        payload += bytes(_align8(offset) - offset)
        offset = _align8(offset)
        entry.update(offset=offset, length=len(data), crc32=_crc(data))
        sections.append(entry)
        payload += data
        offset += len(data)
    return sections, bytes(payload)


def _assemble(manifest: dict[str, Any], version: int, payload: bytes) -> bytes:
    text = canonical_json(manifest)
    head = _header(version, len(text), _crc(text), len(payload))
    data = head + text + bytes(_align8(len(text)) - len(text)) + payload
    decode(data)  # the writer never emits a file its own reader refuses
    return data


def canonical_json(doc: Any) -> bytes:
    """The one spelling of a manifest (§2.2): sorted keys, no spaces, ASCII with \\u escapes,
    shortest round-trip floats. Readers compare a manifest with this spelling of itself."""
    try:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise ManifestError(f"manifest cannot be written: {exc}") from None
    return text.encode("ascii")


def _roles(layer: A.Layer) -> tuple[str, ...]:
    if isinstance(layer, A.WEIGHTED):
        return ("indices", "bias") if layer.bias else ("indices",)
    if isinstance(layer, A.BatchNorm2d):
        return ("running_mean", "running_var")
    return ()


def _header(version: int, manifest_length: int, manifest_crc: int, payload_length: int) -> bytes:
    head = HEADER.pack(MAGIC, version, 0, manifest_length, manifest_crc, 0, payload_length)
    crc = _crc(head[:20] + head[24:])
    return head[:20] + struct.pack("<I", crc) + head[24:]


def write(path: Path | str, data: bytes, *, force: bool = False) -> Path:
    """Write file bytes atomically; an existing file needs ``force``."""
    return write_bytes(path, data, force=force)


# ------------------------------------------------------------------------------- reading


def read(path: Path | str, *, verify: bool = True) -> SlotFile:
    """Read and validate a file; ``verify=False`` skips the section CRCs (header CRCs still hold).

    Only a regular file is read, its header is checked against the file's real size before
    anything else is, and the payload is mapped, not copied: a huge, sparse or endless (FIFO,
    device) file is refused or read without allocating its size."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SlotFormatError(f"{path}: not a regular file")
            head = f.read(HEADER.size)
            try:
                _check_header(head, st.st_size)
            except SlotFormatError as exc:
                raise type(exc)(f"{path}: {exc}") from None
            data: bytes | mmap.mmap = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
            )
    except OSError as exc:
        raise SlotFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return decode(data, verify=verify)
    except SlotFormatError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def _check_header(head: bytes | memoryview, size: int) -> tuple[int, int, int, int]:
    """Validate the 32-byte header against the file's real ``size``: (version, manifest length,
    manifest CRC, payload length). Nothing after the header has been read yet."""
    head = bytes(head[: HEADER.size])
    if len(head) < HEADER.size:
        if head[:8] != MAGIC[: min(8, len(head))] or not head:
            raise MagicError("not a .slot file (too short and no magic)")
        raise TruncatedError(f"file is {size} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, flags, m_len, m_crc, h_crc, p_len = HEADER.unpack(head)
    if magic != MAGIC:
        raise MagicError("not a .slot file (wrong magic bytes)")
    if _crc(head[:20] + head[24:32]) != h_crc:
        raise ChecksumError("header CRC-32 mismatch: the header is corrupt")
    if version not in FORMAT_VERSIONS:
        known = ", ".join(map(str, FORMAT_VERSIONS))
        raise VersionError(f"format version {version} is not supported (this reader knows {known})")
    if flags:
        raise VersionError(f"header flags {flags:#06x} are not supported (must be 0)")
    if not 2 <= m_len <= MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest length {m_len} is outside 2..{MAX_MANIFEST_BYTES}")
    start = HEADER.size + _align8(m_len)
    if size < start + p_len:
        raise TruncatedError(f"file is {size} bytes, its header declares {start + p_len}")
    if size > start + p_len:
        raise LayoutError(f"{size - start - p_len} trailing bytes after the payload")
    return version, m_len, m_crc, p_len


def decode(data: bytes | memoryview | mmap.mmap, *, verify: bool = True) -> SlotFile:
    """Validate and decode the bytes of a file (see :func:`read`)."""
    view = memoryview(data).cast("B")
    size = len(view)
    version, m_len, m_crc, p_len = _check_header(view[: HEADER.size], size)
    start = HEADER.size + _align8(m_len)
    text = view[HEADER.size : HEADER.size + m_len]
    if _crc(text) != m_crc:
        raise ChecksumError("manifest CRC-32 mismatch: the manifest is corrupt")
    if any(view[HEADER.size + m_len : start]):
        raise LayoutError("padding after the manifest is not zero")
    manifest = _parse_json(bytes(text))
    if canonical_json(manifest) != bytes(text):
        raise ManifestError(
            "manifest is not in canonical form (§2.2: sorted keys, no spaces, "
            "ASCII escapes, shortest numbers)"
        )
    payload = view[start:]
    layers, tensors, sections, weights = _validate(manifest, version, p_len)
    streams = _check_payload(payload, sections, weights, verify)
    return SlotFile(manifest, layers, tensors, sections, payload, size, weights, streams)


def _parse_json(text: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):  # linear: a manifest of 100k keys is refused in milliseconds
            seen: set[str] = set()
            dups = {k for k, _ in pairs if k in seen or seen.add(k)}
            raise ManifestError(f"manifest has duplicate keys {sorted(dups)[:5]}")
        return out

    def no_constants(name: str) -> None:
        raise ManifestError(f"manifest contains {name}, which JSON does not allow")

    def finite(literal: str) -> float:  # 1e999 would parse as inf: Infinity by another name
        value = float(literal)
        if not math.isfinite(value):
            raise ManifestError(f"manifest number {literal[:24]} overflows to Infinity")
        return value

    def integer(literal: str) -> int:  # the limit of §2.2, not the interpreter's (it may be off)
        if len(literal.lstrip("-")) > MAX_INT_DIGITS:
            raise ManifestError(f"manifest has an integer of {len(literal)} digits")
        try:
            return int(literal)
        except ValueError:  # an interpreter whose own limit is set below the format's
            raise ManifestError(
                f"manifest integer of {len(literal)} digits exceeds this "
                "interpreter's limit (PYTHONINTMAXSTRDIGITS)"
            ) from None

    try:
        doc = json.loads(
            text.decode("utf-8"),
            object_pairs_hook=no_duplicates,
            parse_constant=no_constants,
            parse_float=finite,
            parse_int=integer,
        )
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ManifestError(f"manifest nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest is not JSON: {exc.msg} at byte {exc.pos}") from None
    if _depth(doc) > MAX_JSON_DEPTH:
        raise ManifestError(f"manifest nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    return doc


def _depth(doc: Any) -> int:
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(node, dict):
            stack += [(v, d + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, d + 1) for v in node]
    return deepest


def _keys(obj: Any, expected: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where} must be an object")
    missing, unknown = expected - obj.keys(), obj.keys() - expected
    if missing or unknown:
        parts = ([f"missing {sorted(missing)}"] if missing else []) + (
            [f"unknown {sorted(unknown)}"] if unknown else []
        )
        raise ManifestError(f"{where}: {', '.join(parts)} keys")
    return obj


def _shown(value: Any) -> str:
    """A manifest value for an error message: one short line, however long the value."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any, where: str, lo: int = 1, hi: int = MAX_DIM) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ManifestError(f"{where} must be an integer in {lo}..{hi}, got {_shown(value)}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            if math.isfinite(value):
                return float(value)
        except OverflowError:  # an integer literal that no double holds: infinity by another name
            pass
    raise ManifestError(f"{where} must be a finite number, got {_shown(value)}")


def _parse_layer(entry: Any, pos: int, version: int) -> tuple[A.Layer, dict[str, str]]:
    where = f"layer {pos}"
    op = entry.get("op") if isinstance(entry, dict) else None
    if not isinstance(op, str) or op not in A.LAYER_TYPES:  # a list op is unhashable
        op = entry.get("op") if isinstance(entry, dict) else entry
        raise ManifestError(
            f"{where}: unknown op {_shown(op)}; known: {', '.join(sorted(A.LAYER_TYPES))}"
        )
    cls = A.LAYER_TYPES[entry["op"]]
    names = {f.name: f.type for f in fields(cls)}
    has_tensors = entry["op"] in ROLES
    extra = WEIGHTED_KEYS_V2 if version >= 2 and issubclass(cls, A.WEIGHTED) else set()
    expected = {"op", *names, *extra, *(["tensors"] if has_tensors else [])}
    _keys(entry, expected, f"{where} ({entry['op']})")
    values: dict[str, Any] = {}
    for name, kind in names.items():
        v, w = entry[name], f"{where} {name}"
        if kind == "bool":
            if not isinstance(v, bool):
                raise ManifestError(f"{w} must be true or false, got {_shown(v)}")
            values[name] = v
        elif kind == "float":
            values[name] = _float(v, w)
        else:
            values[name] = _int(v, w, lo=0 if name == "padding" else 1)
    layer = cls(**values)
    if isinstance(layer, A.BatchNorm2d) and layer.affine:
        raise ManifestError(
            f"{where}: batchnorm2d with affine=true is not supported (format versions 1 and 2)"
        )
    if isinstance(layer, A.Dropout) and not 0 <= layer.p < 1:
        raise ManifestError(f"{where}: dropout p must be in [0, 1), got {layer.p}")
    if isinstance(layer, A.Conv2d) and layer.padding > layer.dilation * (layer.kernel_size - 1):
        raise ManifestError(
            f"{where}: padding {layer.padding} exceeds dilation * (kernel_size - 1) = "
            f"{layer.dilation * (layer.kernel_size - 1)} (only zeros would be added)"
        )
    tensors: dict[str, str] = {}
    if has_tensors:
        roles = set(_roles(layer))
        tensors = _keys(entry["tensors"], roles, f"{where} tensors")
        for role, name in tensors.items():
            if name != section_name(pos, role):
                raise ManifestError(
                    f"{where}: tensor {role} must be section {section_name(pos, role)!r}, got {_shown(name)}"
                )
    return layer, tensors


def _validate(m: dict[str, Any], version: int, payload_length: int):
    weights_only = version >= 2 and isinstance(m, dict) and "weights" in m
    _keys(m, WEIGHTS_ONLY_KEYS if weights_only else MANIFEST_KEYS[version], "manifest")
    if m["format"] != "slotpack":
        raise ManifestError(f"manifest format is {_shown(m['format'])}, not 'slotpack'")
    if type(m["version"]) is not int or m["version"] != version:  # not true, not 1.0
        raise ManifestError(
            f"manifest version {_shown(m['version'])} does not match the header's {version}"
        )
    gen = _keys(m["generator"], {"id", "seed"}, "generator")
    if gen["id"] != GENERATOR_ID:
        raise ManifestError(
            f"generator {_shown(gen['id'])} is not supported (this reader knows {GENERATOR_ID})"
        )
    if not isinstance(gen["seed"], str) or not re.fullmatch(r"[0-9a-f]{16}", gen["seed"]):
        raise ManifestError(
            f"generator seed must be 16 lowercase hex digits, got {_shown(gen['seed'])}"
        )
    if version == 1:
        k = _int(m["k"], "k", 2, MAX_K)
        if _int(m["index_bits"], "index_bits", 1, B.MAX_BITS) != B.bits_for(k):
            raise ManifestError(
                f"index_bits {m['index_bits']} does not match K={k} (needs {B.bits_for(k)})"
            )
    if not isinstance(m["selection"], str) or m["selection"] not in SELECTIONS:
        raise ManifestError(
            f"selection {_shown(m['selection'])} is not one of {', '.join(SELECTIONS)}"
        )
    if not isinstance(m["metadata"], dict):
        raise ManifestError("metadata must be an object")
    if weights_only:
        weights = _named_weights(m["weights"])
        sections = _validate_sections(m["sections"], weights, version, payload_length, INT64)
        missing = [w.section for w in weights if w.section not in sections]
        if missing:
            raise ManifestError(f"weight {_shown(missing[0])} has no indices section")
        return (), (), sections, weights
    inp = _keys(m["input"], {"shape", "mean", "std"}, "input")
    if not isinstance(inp["shape"], list) or len(inp["shape"]) != 3:
        raise ManifestError("input shape must be [C, H, W]")
    shape = tuple(_int(v, "input shape") for v in inp["shape"])
    for key in ("mean", "std"):
        if not isinstance(inp[key], list) or len(inp[key]) != shape[0]:
            raise ManifestError(f"input {key} must list one number per channel ({shape[0]})")
        [_float(v, f"input {key}") for v in inp[key]]
    if any(v <= 0 for v in inp["std"]):
        raise ManifestError("input std must be positive")
    num_classes = _int(m["num_classes"], "num_classes")
    if not isinstance(m["layers"], list) or not m["layers"]:
        raise ManifestError("layers must be a non-empty list")
    parsed = [_parse_layer(entry, pos, version) for pos, entry in enumerate(m["layers"])]
    layers = tuple(layer for layer, _ in parsed)
    tensors = tuple(t for _, t in parsed)
    try:
        shapes = A.output_shapes(layers, shape)
    except ValueError as exc:
        raise ManifestError(f"layers do not chain: {exc}") from None
    for pos, out in enumerate([shape, *shapes]):
        if math.prod(out) > MAX_ACTIVATION:
            where = "the input" if pos == 0 else f"layer {pos - 1}"
            raise ManifestError(
                f"{where} produces {math.prod(out):,} values per image (at most {MAX_ACTIVATION:,})"
            )
    if shapes[-1] != (num_classes,):
        raise ManifestError(f"the network outputs {list(shapes[-1])}, not [{num_classes}] classes")
    weights = _weights(m, version, layers, tensors)
    sections = _validate_sections(m["sections"], weights, version, payload_length)
    _check_references(layers, tensors, sections)
    return layers, tensors, sections, weights


def _weights(m: dict[str, Any], version: int, layers, tensors) -> tuple[Weights, ...]:
    out, number = [], 0
    for pos, (layer, roles) in enumerate(zip(layers, tensors, strict=True)):
        if not isinstance(layer, A.WEIGHTED):
            continue
        if version == 1:
            k, rule = m["k"], implicit_reference(m["selection"])
        else:
            entry = m["layers"][pos]
            k = _int(entry["k"], f"layer {pos} k", 2, MAX_K)
            rule = _reference_rule(entry["reference"], f"layer {pos}")
        out.append(Weights(pos, number, layer, k, rule, roles["indices"]))
        number += 1
    return tuple(out)


def _reference_rule(rule: Any, where: str) -> str:
    """A weighted layer's ``reference`` (§1.8), or the ManifestError naming ``where``."""
    if not isinstance(rule, str) or rule not in prng.REFERENCE_RULES:
        raise ManifestError(
            f"{where}: reference {_shown(rule)} is not one of {', '.join(prng.REFERENCE_RULES)}"
        )
    return rule


def _named_weights(entries: Any) -> tuple[Weights, ...]:
    """The ``weights`` list of a weights-only file (§2.8): entry j is generator layer j."""
    if not isinstance(entries, list) or not entries:
        raise ManifestError("weights must be a non-empty list")
    out, names = [], set()
    for j, entry in enumerate(entries):
        where = f"weight {j}"
        _keys(entry, WEIGHT_KEYS, where)
        name = entry["name"]
        if not isinstance(name, str) or not name or name in names:
            raise ManifestError(
                f"{where}: name must be a unique non-empty string, got {_shown(name)}"
            )
        names.add(name)
        shape = entry["shape"]
        if not isinstance(shape, list) or not 2 <= len(shape) <= MAX_WEIGHT_DIMS:
            raise ManifestError(
                f"{where} ({name}): shape must list 2..{MAX_WEIGHT_DIMS} sizes [out, in, kernel...]"
            )
        dims = tuple(_int(v, f"{where} ({name}) shape") for v in shape)
        if math.prod(dims) > MAX_DIM:
            raise ManifestError(
                f"{where} ({name}): {math.prod(dims):,} connections (most {MAX_DIM:,})"
            )
        k = _int(entry["k"], f"{where} ({name}) k", 2, MAX_K)
        rule = _reference_rule(entry["reference"], f"{where} ({name})")
        out.append(Weights(j, j, A.Weight(dims), k, rule, name))
    return tuple(out)


def _validate_sections(
    entries: Any,
    weights: tuple[Weights, ...],
    version: int,
    payload_length: int,
    extra: dict[str, int] | None = None,
) -> dict[str, Section]:
    if not isinstance(entries, list):
        raise ManifestError("sections must be a list")
    index_k = {w.section: w.k for w in weights}
    rules = {w.section: w.reference for w in weights}
    counts = {w.section: w.count for w in weights}
    element = {**ENCODINGS, **(extra or {})}
    known = (*element, *INDEX_ENCODINGS[version][1:])
    sections: dict[str, Section] = {}
    expected_offset = 0
    for i, entry in enumerate(entries):
        where = f"section {i}"
        is_delta = isinstance(entry, dict) and entry.get("encoding") == "delta" and version >= 2
        delta_keys = DELTA_KEYS | {key for key in DELTA_OPTIONAL if is_delta and key in entry}
        _keys(entry, SECTION_KEYS | (delta_keys if is_delta else set()), where)
        name, encoding = entry["name"], entry["encoding"]
        if not isinstance(name, str) or name in sections:
            raise ManifestError(f"{where}: name must be a unique string, got {_shown(name)}")
        if not isinstance(encoding, str) or encoding not in known:
            raise ManifestError(
                f"{where} ({name}): encoding {_shown(encoding)} is not one of {', '.join(known)}"
            )
        if encoding in ("bits", "delta") and name not in index_k:
            raise ManifestError(f"{where} ({name}): {encoding} section is no layer's indices")
        if not isinstance(entry["shape"], list) or len(entry["shape"]) > 8:
            raise ManifestError(f"{where} ({name}): shape must be a list of at most 8 sizes")
        shape = tuple(_int(v, f"{where} ({name}) shape", 0) for v in entry["shape"])
        count = math.prod(shape)
        if encoding in ("bits", "delta") and len(shape) != 1:
            raise ManifestError(f"{where} ({name}): indices have shape [count]")
        if name in counts and count != counts[name]:
            raise LayoutError(
                f"{where} ({name}): {count} indices for a weight of {counts[name]} connections"
            )
        if name in counts and encoding not in ("bits", "delta"):
            raise ManifestError(f"{where} ({name}): a weight's section holds bits or delta indices")
        length = _int(entry["length"], f"{where} ({name}) length", 0, payload_length)
        offset = _int(entry["offset"], f"{where} ({name}) offset", 0, payload_length)
        crc = _int(entry["crc32"], f"{where} ({name}) crc32", 0, 0xFFFFFFFF)
        params: tuple = (0, 0, 0, "rice", None)
        if encoding == "delta":
            params = _delta_params(
                entry, count, index_k[name], rules[name], length, f"{where} ({name})"
            )
            expected = length  # the decoder checks that the streams fill it exactly
        elif encoding == "bits":
            expected = B.packed_length(count, B.bits_for(index_k[name]))
        else:
            expected = count * element[encoding]
        if length != expected:
            raise LayoutError(
                f"{where} ({name}): length {length} does not fit shape {list(shape)} ({expected} bytes)"
            )
        if offset != _align8(expected_offset):
            raise LayoutError(
                f"{where} ({name}): offset {offset}, expected {_align8(expected_offset)}"
            )
        expected_offset = offset + length
        if expected_offset > payload_length:
            raise LayoutError(
                f"{where} ({name}) ends at {expected_offset}, past the payload ({payload_length})"
            )
        sections[name] = Section(name, encoding, shape, offset, length, crc, *params)
    if expected_offset != payload_length:
        raise LayoutError(
            f"sections end at {expected_offset} but the payload is {payload_length} bytes"
        )
    return sections


def _delta_params(
    entry: dict[str, Any], count: int, k: int, rule: str, length: int, where: str
) -> tuple[int, int, int, str, int | None]:
    changes = _int(entry["changes"], f"{where} changes", 0, count)
    g = _int(entry["gap_param"], f"{where} gap_param", 0, D.MAX_GAP_PARAM)
    r = _int(entry["rank_param"], f"{where} rank_param", 0, D.MAX_RANK_PARAM)
    code = entry.get("gap_code", "rice")
    if "gap_code" in entry and code != "expgolomb":
        raise ManifestError(
            f'{where}: gap_code must be "expgolomb" (Rice gaps omit the key), got {_shown(code)}'
        )
    if changes == 0 and (g or r or length or "gap_code" in entry or "crossing" in entry):
        raise LayoutError(f"{where}: no changes, so length and parameters must be 0")
    crossing = None
    if "crossing" in entry:
        if k == 2 or rule not in prng.CROSSING_SCALE:
            raise ManifestError(
                f"{where}: crossing applies to K > 2 and the rules "
                f"{', '.join(prng.CROSSING_SCALE)}, not K={k} with {rule}"
            )
        crossing = _int(entry["crossing"], f"{where} crossing", 0, prng.MAX_MARGIN)
    # each unary stream (one, or two above K=2) holds at least one bit per change
    if length < (1 if k == 2 else 2) * -(-changes // 8):
        raise LayoutError(f"{where}: {length} bytes cannot hold {changes} changes")
    return changes, g, r, code, crossing


def _check_references(layers, tensors, sections: dict[str, Section]) -> None:
    used: set[str] = set()
    for pos, (layer, roles) in enumerate(zip(layers, tensors, strict=True)):
        for role, name in roles.items():
            if name not in sections:
                raise ManifestError(f"layer {pos}: section {_shown(name)} is not declared")
            s = sections[name]
            if role == "indices":
                want, encodings = (math.prod(layer.weight_shape),), ("bits", "delta")
            else:
                size = (
                    layer.num_features
                    if isinstance(layer, A.BatchNorm2d)
                    else layer.weight_shape[0]
                )
                want, encodings = (size,), ("float32", "float16")
            if s.encoding not in encodings or s.shape != want:
                raise ManifestError(
                    f"layer {pos}: section {name} is {s.encoding} {list(s.shape)}, expected {encodings[0]} {list(want)}"
                )
            used.add(name)
    unused = set(sections) - used
    if unused:
        raise ManifestError(f"sections {sorted(unused)} are not used by any layer")


def _check_payload(
    payload: memoryview, sections: dict[str, Section], weights: tuple[Weights, ...], verify: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Padding, CRCs (``verify``) and the indices themselves: every path that reads a file
    gets only indices below K (§2.3, §2.6), whatever it later does with them. Returns the
    parsed streams of the delta sections."""
    k_of = {w.section: w.k for w in weights}
    streams = {}
    end = 0
    for s in sections.values():
        if any(payload[end : s.offset]):
            raise LayoutError(f"padding before section {s.name} is not zero")
        body = payload[s.offset : s.offset + s.length]
        if verify and _crc(body) != s.crc32:
            raise ChecksumError(f"section {s.name}: CRC-32 mismatch, the data is corrupt")
        if s.encoding == "bits":
            _check_bits(body, s, k_of[s.name])
        elif s.encoding == "delta":
            streams[s.name] = _check_delta(body, s, k_of[s.name])
        end = s.offset + s.length
    return streams


def _check_bits(body: memoryview, s: Section, k: int) -> None:
    bits = B.bits_for(k)
    if s.length and not B.padding_is_zero(body, s.count, bits):
        raise LayoutError(f"section {s.name}: unused bits of the last byte are not zero")
    if k < 1 << bits:
        for a in range(0, s.count, 1 << 20):  # blocks: a bounded temporary per step
            n = min(1 << 20, s.count - a)
            chunk = body[a * bits // 8 : (a * bits + n * bits + 7) // 8]
            if n and int(B.unpack(chunk, n, bits).max()) >= k:
                raise ManifestError(f"section {s.name}: an index is >= K={k}")


def _check_delta(body: memoryview, s: Section, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The streams parse to exactly the declared changes and ranks (no generator needed)."""
    try:
        return D.check(
            body,
            count=s.count,
            k=k,
            changes=s.changes,
            gap_param=s.gap_param,
            rank_param=s.rank_param,
            gap_code=s.gap_code,
        )
    except D.DeltaError as exc:
        raise LayoutError(f"section {s.name}: {exc}") from None

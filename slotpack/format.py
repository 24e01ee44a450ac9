"""Reading and writing ``.slot`` files (docs/FORMAT.md §2): a strict reader, a deterministic writer.

No torch and no pickle. The reader checks the magic, version, CRCs and every length against the
real size before it allocates anything that depends on them, and rejects any manifest key it does
not know. The writer validates its own output with the reader before anything reaches the disk.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import arch as A
from . import bits as B
from .atomic import write_bytes
from .errors import SlotpackError
from .prng import GENERATOR_ID

MAGIC = b"\x89SLOT\r\n\x1a"
FORMAT_VERSION = 1
HEADER = struct.Struct(
    "<8sHHIIIQ"
)  # magic, version, flags, manifest len, manifest crc, header crc, payload len
MAX_MANIFEST_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_K = 1 << 16
MAX_DIM = 1 << 31
SELECTIONS = ("greedy", "probabilistic")
ENCODINGS = {"bits": 0, "float32": 4, "float16": 2}  # bytes per element (bits: packed)
MANIFEST_KEYS = {
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
SECTION_KEYS = {"name", "encoding", "shape", "offset", "length", "crc32"}
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

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SlotFile:
    """A decoded file: validated manifest, parsed layers and the payload (not yet expanded)."""

    manifest: dict[str, Any]
    layers: tuple[A.Layer, ...]
    tensors: tuple[dict[str, str], ...]  # per layer: role -> section name
    sections: dict[str, Section]
    payload: memoryview
    size: int

    @property
    def seed(self) -> int:
        return int(self.manifest["generator"]["seed"], 16)

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def index_bits(self) -> int:
        return self.manifest["index_bits"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    def raw(self, name: str) -> memoryview:
        s = self.sections[name]
        return self.payload[s.offset : s.offset + s.length]

    def indices(self, name: str) -> np.ndarray:
        """The stored indices of a section (uint16); an index >= K is a ManifestError."""
        s = self.sections[name]
        out = B.unpack(self.raw(name), s.count, self.index_bits)
        if self.k < 1 << self.index_bits and out.size and int(out.max()) >= self.k:
            raise ManifestError(f"section {name}: an index is >= K={self.k}")
        return out

    def tensor(self, name: str) -> np.ndarray:
        """A float section as a float32 array of its declared shape."""
        s = self.sections[name]
        dtype = np.dtype("<f4") if s.encoding == "float32" else np.dtype("<f2")
        return np.frombuffer(self.raw(name), dtype=dtype).astype(np.float32).reshape(s.shape)

    def weighted(self) -> Iterator[tuple[int, int, A.Linear | A.Conv2d, dict[str, str]]]:
        """(position, generator layer number, layer, tensors) of each weighted layer."""
        number = 0
        for pos, (layer, tensors) in enumerate(zip(self.layers, self.tensors, strict=True)):
            if isinstance(layer, A.WEIGHTED):
                yield pos, number, layer, tensors
                number += 1


# ------------------------------------------------------------------------------- writing


def section_name(position: int, role: str) -> str:
    return f"{position}.{role}"


def encode(
    *,
    layers: tuple[A.Layer, ...],
    seed: int,
    k: int,
    selection: str,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    blobs: dict[str, tuple[str, tuple[int, ...], bytes]],
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """The bytes of a version-1 file. ``blobs`` maps section name -> (encoding, shape, bytes)."""
    manifest_layers, order = [], []
    for pos, layer in enumerate(layers):
        entry = A.layer_to_dict(layer)
        roles = _roles(layer)
        if roles:
            entry["tensors"] = {role: section_name(pos, role) for role in roles}
            order += [section_name(pos, role) for role in roles]
        manifest_layers.append(entry)
    if set(order) != set(blobs):
        raise ValueError(f"sections {sorted(blobs)} do not match the layers' {sorted(order)}")
    sections, payload, offset = [], bytearray(), 0
    for name in order:
        encoding, shape, data = blobs[name]
        payload += bytes(_align8(offset) - offset)
        offset = _align8(offset)
        sections.append(
            {
                "name": name,
                "encoding": encoding,
                "shape": list(shape),
                "offset": offset,
                "length": len(data),
                "crc32": _crc(data),
            }
        )
        payload += data
        offset += len(data)
    manifest = {
        "format": "slotpack",
        "version": FORMAT_VERSION,
        "generator": {"id": GENERATOR_ID, "seed": f"{seed:016x}"},
        "k": k,
        "index_bits": B.bits_for(k),
        "selection": selection,
        "input": {"shape": list(input_shape), "mean": list(mean), "std": list(std)},
        "num_classes": num_classes,
        "layers": manifest_layers,
        "sections": sections,
        "metadata": metadata or {},
    }
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    head = _header(len(text), _crc(text), len(payload))
    data = head + text + bytes(_align8(len(text)) - len(text)) + bytes(payload)
    decode(data)  # the writer never emits a file its own reader refuses
    return data


def _roles(layer: A.Layer) -> tuple[str, ...]:
    if isinstance(layer, A.WEIGHTED):
        return ("indices", "bias") if layer.bias else ("indices",)
    if isinstance(layer, A.BatchNorm2d):
        return ("running_mean", "running_var")
    return ()


def _header(manifest_length: int, manifest_crc: int, payload_length: int) -> bytes:
    head = HEADER.pack(MAGIC, FORMAT_VERSION, 0, manifest_length, manifest_crc, 0, payload_length)
    crc = _crc(head[:20] + head[24:])
    return head[:20] + struct.pack("<I", crc) + head[24:]


def write(path: Path | str, data: bytes, *, force: bool = False) -> Path:
    """Write file bytes atomically; an existing file needs ``force``."""
    return write_bytes(path, data, force=force)


# ------------------------------------------------------------------------------- reading


def read(path: Path | str, *, verify: bool = True) -> SlotFile:
    """Read and validate a file; ``verify=False`` skips the section CRCs (header CRCs still hold)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SlotFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return decode(data, verify=verify)
    except SlotFormatError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def decode(data: bytes | memoryview, *, verify: bool = True) -> SlotFile:
    """Validate and decode the bytes of a file (see :func:`read`)."""
    view = memoryview(data).cast("B")
    size = len(view)
    if size < HEADER.size:
        if bytes(view[:8]) != MAGIC[:size] or size == 0:
            raise MagicError("not a .slot file (too short and no magic)")
        raise TruncatedError(f"file is {size} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, flags, m_len, m_crc, h_crc, p_len = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise MagicError("not a .slot file (wrong magic bytes)")
    if _crc(bytes(view[:20]) + bytes(view[24:32])) != h_crc:
        raise ChecksumError("header CRC-32 mismatch: the header is corrupt")
    if version != FORMAT_VERSION:
        raise VersionError(
            f"format version {version} is not supported (this reader knows {FORMAT_VERSION})"
        )
    if flags:
        raise VersionError(f"header flags {flags:#06x} are not supported (must be 0)")
    if not 2 <= m_len <= MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest length {m_len} is outside 2..{MAX_MANIFEST_BYTES}")
    start = HEADER.size + _align8(m_len)
    if size < start + p_len:
        raise TruncatedError(f"file is {size} bytes, its header declares {start + p_len}")
    if size > start + p_len:
        raise LayoutError(f"{size - start - p_len} trailing bytes after the payload")
    text = view[HEADER.size : HEADER.size + m_len]
    if _crc(text) != m_crc:
        raise ChecksumError("manifest CRC-32 mismatch: the manifest is corrupt")
    if any(view[HEADER.size + m_len : start]):
        raise LayoutError("padding after the manifest is not zero")
    manifest = _parse_json(bytes(text))
    payload = view[start:]
    layers, tensors, sections = _validate(manifest, p_len)
    _check_payload(payload, sections, manifest["index_bits"], verify)
    return SlotFile(manifest, layers, tensors, sections, payload, size)


def _parse_json(text: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ManifestError(
                f"manifest has duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}"
            )
        return dict(pairs)

    def no_constants(name: str) -> None:
        raise ManifestError(f"manifest contains {name}, which JSON does not allow")

    def finite(literal: str) -> float:  # 1e999 would parse as inf: Infinity by another name
        value = float(literal)
        if not math.isfinite(value):
            raise ManifestError(f"manifest number {literal[:24]} overflows to Infinity")
        return value

    def integer(literal: str) -> int:  # int() refuses over 4300 digits with a plain ValueError
        try:
            return int(literal)
        except ValueError:
            raise ManifestError(f"manifest has an integer of {len(literal)} digits") from None

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


def _int(value: Any, where: str, lo: int = 1, hi: int = MAX_DIM) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ManifestError(f"{where} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _float(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ManifestError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _parse_layer(entry: Any, pos: int) -> tuple[A.Layer, dict[str, str]]:
    where = f"layer {pos}"
    op = entry.get("op") if isinstance(entry, dict) else None
    if not isinstance(op, str) or op not in A.LAYER_TYPES:  # a list op is unhashable
        op = entry.get("op") if isinstance(entry, dict) else entry
        raise ManifestError(
            f"{where}: unknown op {op!r}; known: {', '.join(sorted(A.LAYER_TYPES))}"
        )
    cls = A.LAYER_TYPES[entry["op"]]
    names = {f.name: f.type for f in fields(cls)}
    has_tensors = entry["op"] in ROLES
    _keys(entry, {"op", *names, *(["tensors"] if has_tensors else [])}, f"{where} ({entry['op']})")
    values: dict[str, Any] = {}
    for name, kind in names.items():
        v, w = entry[name], f"{where} {name}"
        if kind == "bool":
            if not isinstance(v, bool):
                raise ManifestError(f"{w} must be true or false, got {v!r}")
            values[name] = v
        elif kind == "float":
            values[name] = _float(v, w)
        else:
            values[name] = _int(v, w, lo=0 if name == "padding" else 1)
    layer = cls(**values)
    if isinstance(layer, A.BatchNorm2d) and layer.affine:
        raise ManifestError(f"{where}: batchnorm2d with affine=true is not in format version 1")
    if isinstance(layer, A.Dropout) and not 0 <= layer.p < 1:
        raise ManifestError(f"{where}: dropout p must be in [0, 1), got {layer.p}")
    tensors: dict[str, str] = {}
    if has_tensors:
        roles = set(_roles(layer))
        tensors = _keys(entry["tensors"], roles, f"{where} tensors")
        for role, name in tensors.items():
            if name != section_name(pos, role):
                raise ManifestError(
                    f"{where}: tensor {role} must be section {section_name(pos, role)!r}, got {name!r}"
                )
    return layer, tensors


def _validate(m: dict[str, Any], payload_length: int):
    _keys(m, MANIFEST_KEYS, "manifest")
    if m["format"] != "slotpack":
        raise ManifestError(f"manifest format is {m['format']!r}, not 'slotpack'")
    if type(m["version"]) is not int or m["version"] != FORMAT_VERSION:  # not true, not 1.0
        raise ManifestError(
            f"manifest version {m['version']!r} does not match the header's {FORMAT_VERSION}"
        )
    gen = _keys(m["generator"], {"id", "seed"}, "generator")
    if gen["id"] != GENERATOR_ID:
        raise ManifestError(
            f"generator {gen['id']!r} is not supported (this reader knows {GENERATOR_ID})"
        )
    if not isinstance(gen["seed"], str) or not re.fullmatch(r"[0-9a-f]{16}", gen["seed"]):
        raise ManifestError(f"generator seed must be 16 lowercase hex digits, got {gen['seed']!r}")
    k = _int(m["k"], "k", 2, MAX_K)
    if _int(m["index_bits"], "index_bits", 1, B.MAX_BITS) != B.bits_for(k):
        raise ManifestError(
            f"index_bits {m['index_bits']} does not match K={k} (needs {B.bits_for(k)})"
        )
    if m["selection"] not in SELECTIONS:
        raise ManifestError(f"selection {m['selection']!r} is not one of {', '.join(SELECTIONS)}")
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
    if not isinstance(m["metadata"], dict):
        raise ManifestError("metadata must be an object")
    if not isinstance(m["layers"], list) or not m["layers"]:
        raise ManifestError("layers must be a non-empty list")
    parsed = [_parse_layer(entry, pos) for pos, entry in enumerate(m["layers"])]
    layers = tuple(layer for layer, _ in parsed)
    try:
        shapes = A.output_shapes(layers, shape)
    except ValueError as exc:
        raise ManifestError(f"layers do not chain: {exc}") from None
    if shapes[-1] != (num_classes,):
        raise ManifestError(f"the network outputs {list(shapes[-1])}, not [{num_classes}] classes")
    sections = _validate_sections(m["sections"], k, payload_length)
    _check_references(layers, tuple(t for _, t in parsed), sections)
    return layers, tuple(t for _, t in parsed), sections


def _validate_sections(entries: Any, k: int, payload_length: int) -> dict[str, Section]:
    if not isinstance(entries, list):
        raise ManifestError("sections must be a list")
    sections: dict[str, Section] = {}
    expected_offset = 0
    for i, entry in enumerate(entries):
        where = f"section {i}"
        _keys(entry, SECTION_KEYS, where)
        name, encoding = entry["name"], entry["encoding"]
        if not isinstance(name, str) or name in sections:
            raise ManifestError(f"{where}: name must be a unique string, got {name!r}")
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise ManifestError(
                f"{where} ({name}): encoding {encoding!r} is not one of {', '.join(ENCODINGS)}"
            )
        if not isinstance(entry["shape"], list) or len(entry["shape"]) > 8:
            raise ManifestError(f"{where} ({name}): shape must be a list of at most 8 sizes")
        shape = tuple(_int(v, f"{where} ({name}) shape", 0) for v in entry["shape"])
        count = math.prod(shape)
        if encoding == "bits":
            if len(shape) != 1:
                raise ManifestError(f"{where} ({name}): packed indices have shape [count]")
            expected = B.packed_length(count, B.bits_for(k))
        else:
            expected = count * ENCODINGS[encoding]
        length = _int(entry["length"], f"{where} ({name}) length", 0, payload_length)
        offset = _int(entry["offset"], f"{where} ({name}) offset", 0, payload_length)
        crc = _int(entry["crc32"], f"{where} ({name}) crc32", 0, 0xFFFFFFFF)
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
        sections[name] = Section(name, encoding, shape, offset, length, crc)
    if expected_offset != payload_length:
        raise LayoutError(
            f"sections end at {expected_offset} but the payload is {payload_length} bytes"
        )
    return sections


def _check_references(layers, tensors, sections: dict[str, Section]) -> None:
    used: set[str] = set()
    for pos, (layer, roles) in enumerate(zip(layers, tensors, strict=True)):
        for role, name in roles.items():
            if name not in sections:
                raise ManifestError(f"layer {pos}: section {name!r} is not declared")
            s = sections[name]
            if role == "indices":
                want, encodings = (math.prod(layer.weight_shape),), ("bits",)
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
    payload: memoryview, sections: dict[str, Section], bits: int, verify: bool
) -> None:
    end = 0
    for s in sections.values():
        if any(payload[end : s.offset]):
            raise LayoutError(f"padding before section {s.name} is not zero")
        body = payload[s.offset : s.offset + s.length]
        if verify and _crc(body) != s.crc32:
            raise ChecksumError(f"section {s.name}: CRC-32 mismatch, the data is corrupt")
        if s.encoding == "bits" and s.length and not B.padding_is_zero(body, s.count, bits):
            raise LayoutError(f"section {s.name}: unused bits of the last byte are not zero")
        end = s.offset + s.length

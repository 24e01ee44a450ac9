"""The .slot reader and writer against docs/FORMAT.md §2: golden bytes, every error class, fuzzing.

Malformed files start from a real file made by ``encode_selection`` and are edited in one place;
``build`` re-fixes the lengths and CRCs around an edit, so the check under test is the one that
fires. The fuzz tests mutate a small valid file (about 1,000 mutated files per property, derandomized
so CI is reproducible) and require a ``SlotFormatError`` or a working file, never anything else.
"""

import json
import math
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slotpack import arch as A
from slotpack import format as F
from slotpack.errors import OutputExistsError
from slotpack.pack import encode_selection

GOLDEN = Path(__file__).parent / "golden" / "tiny.slot"
HEADER = struct.Struct("<8sHHIIIQ")  # the table of §2.1, written out independently of format.py


def align8(n: int) -> int:
    return -(-n // 8) * 8


def crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- files to test


TINY = A.Arch(
    "tiny", "toy", (1, 4, 4),
    (A.Conv2d(1, 2, 3, padding=1, bias=True), A.BatchNorm2d(2), A.ReLU(), A.MaxPool2d(2, 2),
     A.Flatten(), A.Linear(8, 3, bias=True)),
    num_classes=3,
)  # fmt: skip


def tiny_bytes(k: int = 5, encoding: str = "float32", metadata: dict | None = None) -> bytes:
    """The golden version 1 model: fixed indices (i mod K), exactly representable tensors, fixed
    metadata. Every test in this file reads version 1 files; tests/test_format_v2.py covers 2."""
    return encode_selection(
        TINY, version=1, seed=0x0123456789ABCDEF, k=k, selection="greedy",
        indices=[np.arange(18) % k, (np.arange(24) * 7) % k],
        tensors={"0.bias": [0.5, -0.25], "1.running_mean": [0.125, -1.5],
                 "1.running_var": [1.0, 2.0], "5.bias": [0.0, 1.0, -3.0]},
        mean=(0.5,), std=(0.25,), encoding=encoding,
        metadata={"dataset": "toy", "note": "golden", "val_acc": 0.75} if metadata is None else metadata,
    )  # fmt: skip


FUZZ_ARCH = A.Arch(
    "fuzz", "toy", (3, 6, 6),
    (A.Conv2d(3, 4, 3, padding=1, bias=True), A.BatchNorm2d(4), A.ReLU(), A.MaxPool2d(2, 2),
     A.Conv2d(4, 4, 3, bias=False), A.ReLU(), A.Flatten(), A.Linear(4, 10, bias=True)),
)  # fmt: skip


def fuzz_bytes() -> bytes:
    rng = np.random.default_rng(7)
    return encode_selection(
        FUZZ_ARCH, seed=2**64 - 1, k=6, selection="probabilistic",
        indices=[rng.integers(0, 6, math.prod(w.weight_shape)) for w in FUZZ_ARCH.weighted],
        tensors={"0.bias": rng.normal(size=4), "1.running_mean": rng.normal(size=4),
                 "1.running_var": rng.uniform(0.5, 2, 4), "7.bias": rng.normal(size=10)},
        mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), encoding="float16", metadata={"run": 1},
    )  # fmt: skip


# ----------------------------------------------------------------------------- helpers


def split(data: bytes) -> tuple[dict, bytes]:
    """(manifest, payload) of a valid file."""
    m_len = HEADER.unpack_from(data)[3]
    return json.loads(data[32 : 32 + m_len]), data[32 + align8(m_len) :]


def build_raw(
    text: bytes, payload: bytes, *, version: int = 1, flags: int = 0, pad: bytes | None = None
) -> bytes:
    """A file around any manifest bytes, with correct lengths and CRCs."""
    head = bytearray(HEADER.pack(b"\x89SLOT\r\n\x1a", version, flags, len(text), crc(text), 0,
                                 len(payload)))  # fmt: skip
    head[20:24] = struct.pack("<I", crc(bytes(head[:20] + head[24:])))
    if pad is None:
        pad = bytes(align8(len(text)) - len(text))
    return bytes(head) + text + pad + payload


def dumps(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def build(manifest: dict, payload: bytes, **kw) -> bytes:
    """A file from a (modified) manifest dict and payload, CRCs and lengths re-fixed."""
    return build_raw(dumps(manifest), payload, **kw)


def section(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["sections"] if s["name"] == name)


def set_header(data: bytes, *, fix_crc: bool = True, **fields) -> bytes:
    """Change named header fields (version, flags, m_len, m_crc, h_crc, p_len)."""
    names = ("magic", "version", "flags", "m_len", "m_crc", "h_crc", "p_len")
    values = dict(zip(names, HEADER.unpack_from(data), strict=True)) | fields
    head = bytearray(HEADER.pack(*values.values()))
    if fix_crc:
        head[20:24] = struct.pack("<I", crc(bytes(head[:20] + head[24:])))
    return bytes(head) + data[32:]


def exercise(data: bytes) -> None:
    """Decode (with and without section CRCs) and read every section; only SlotFormatError may
    escape from the reader, and it is swallowed here: any other exception fails the test."""
    for verify in (True, False):
        try:
            f = F.decode(data, verify=verify)
        except F.SlotFormatError:
            continue
        for name, s in f.sections.items():
            try:
                array = f.indices(name) if s.encoding == "bits" else f.tensor(name)
            except F.SlotFormatError:
                continue
            assert array.shape == s.shape


@pytest.fixture(scope="module")
def tiny() -> bytes:
    return tiny_bytes()


# ----------------------------------------------------------------------------- golden bytes


def golden_bytes(data: bytes) -> bytes:
    """The committed golden file; with SLOTPACK_REGEN_GOLDEN=1 it is first rewritten from ``data``.

    After a deliberate format change, regenerate it with
    ``SLOTPACK_REGEN_GOLDEN=1 python3 -m pytest tests/test_format.py -k golden`` and review the diff.
    """
    if os.environ.get("SLOTPACK_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(data)
    return GOLDEN.read_bytes()


def test_golden_bytes(tiny):
    """The tiny model packs to exactly the committed bytes (see golden_bytes to regenerate)."""
    assert 200 < len(tiny) < 2000
    assert tiny == golden_bytes(tiny)


def test_header_fields_follow_the_spec_table(tiny):
    magic, version, flags, m_len, m_crc, h_crc, p_len = HEADER.unpack_from(tiny)
    assert magic == bytes([0x89, 0x53, 0x4C, 0x4F, 0x54, 0x0D, 0x0A, 0x1A])
    assert (version, flags) == (1, 0)
    assert 2 <= m_len <= 1_048_576
    text = tiny[32 : 32 + m_len]
    assert m_crc == zlib.crc32(text)
    assert h_crc == zlib.crc32(tiny[:20] + tiny[24:32])
    start = 32 + align8(m_len)
    assert start % 8 == 0 and tiny[32 + m_len : start] == bytes(start - 32 - m_len)
    assert start + p_len == len(tiny)  # no trailing bytes
    # Manifest: UTF-8 JSON with sorted keys and no whitespace, i.e. its own canonical form.
    manifest = json.loads(text.decode("utf-8"))
    assert text == json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert b" " not in text and b"\n" not in text
    assert set(manifest) == F.MANIFEST_KEYS[1]
    assert manifest["format"] == "slotpack" and manifest["version"] == 1
    assert manifest["generator"] == {"id": "splitmix64-v1", "seed": "0123456789abcdef"}
    assert (manifest["k"], manifest["index_bits"], manifest["num_classes"]) == (5, 3, 3)
    assert manifest["input"] == {"shape": [1, 4, 4], "mean": [0.5], "std": [0.25]}
    assert [layer["op"] for layer in manifest["layers"]] == [
        "conv2d", "batchnorm2d", "relu", "maxpool2d", "flatten", "linear"]  # fmt: skip
    # Sections: payload order, aligned offsets, spec lengths, CRCs, padding zero, payload covered.
    payload, end = tiny[start:], 0
    expect = {"0.indices": ("bits", [18], 7), "0.bias": ("float32", [2], 8),
              "1.running_mean": ("float32", [2], 8), "1.running_var": ("float32", [2], 8),
              "5.indices": ("bits", [24], 9), "5.bias": ("float32", [3], 12)}  # fmt: skip
    assert [s["name"] for s in manifest["sections"]] == list(expect)
    for s in manifest["sections"]:
        assert set(s) == F.SECTION_KEYS
        assert (s["encoding"], s["shape"], s["length"]) == expect[s["name"]]
        assert s["offset"] == align8(end) and payload[end : s["offset"]] == bytes(s["offset"] - end)
        assert s["crc32"] == zlib.crc32(payload[s["offset"] : s["offset"] + s["length"]])
        end = s["offset"] + s["length"]
    assert end == p_len


def test_golden_decodes_to_its_inputs(tiny):
    f = F.read(GOLDEN)
    assert (f.seed, f.k, f.index_bits, f.size) == (0x0123456789ABCDEF, 5, 3, len(tiny))
    assert f.layers == TINY.layers and f.input_shape == (1, 4, 4)
    assert np.array_equal(f.indices("0.indices"), np.arange(18) % 5)
    assert np.array_equal(f.indices("5.indices"), (np.arange(24) * 7) % 5)
    assert f.tensor("5.bias").tolist() == [0.0, 1.0, -3.0]
    assert f.tensor("1.running_var").dtype == np.float32
    assert f.manifest["metadata"] == {"dataset": "toy", "note": "golden", "val_acc": 0.75}
    assert [pos for pos, *_ in f.weighted()] == [0, 5]


# ----------------------------------------------------------------------------- determinism


def test_same_inputs_same_bytes():
    assert tiny_bytes() == tiny_bytes()
    assert fuzz_bytes() == fuzz_bytes()
    # Metadata key order and tensor dict order do not leak into the file.
    meta = {"val_acc": 0.75, "note": "golden", "dataset": "toy"}
    assert tiny_bytes(metadata=meta) == tiny_bytes()
    f16 = tiny_bytes(encoding="float16")
    assert f16 == tiny_bytes(encoding="float16")
    assert F.decode(f16).tensor("0.bias").tolist() == [0.5, -0.25]


@pytest.mark.parametrize("k,bits", [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (65536, 16)])
def test_index_bits_is_ceil_log2_k(k, bits):
    f = F.decode(tiny_bytes(k=k))
    assert f.index_bits == bits == math.ceil(math.log2(k))
    assert f.sections["0.indices"].length == math.ceil(18 * bits / 8)
    assert f.sections["5.indices"].length == math.ceil(24 * bits / 8)
    assert np.array_equal(f.indices("0.indices"), np.arange(18) % k)


@pytest.mark.parametrize("k,field", [(3, 3), (5, 5), (5, 7)])
def test_index_at_least_k_is_rejected_on_read(k, field):
    manifest, payload = split(tiny_bytes(k=k))
    bits, s = manifest["index_bits"], section(manifest, "0.indices")
    body = bytearray(payload[: s["length"]])
    body[0] = (body[0] & (0xFF >> bits)) | (field << (8 - bits))  # connection 0's index
    s["crc32"] = crc(bytes(body))
    data = build(manifest, bytes(body) + payload[s["length"] :])
    # the layout and CRCs are valid; the reader checks the values too, for every path that reads
    with pytest.raises(F.ManifestError, match=f"section 0.indices: an index is >= K={k}"):
        F.decode(data, verify=False)


# ----------------------------------------------------------------------------- header errors


def test_empty_file():
    with pytest.raises(F.MagicError, match="not a .slot file"):
        F.decode(b"")


@pytest.mark.parametrize(
    "data", [b"PK\x03\x04" + bytes(60), b"\x89PNG\r\n\x1a\n" + bytes(60), b"x"]
)
def test_wrong_magic(data):
    with pytest.raises(F.MagicError, match="not a .slot file"):
        F.decode(data)


@pytest.mark.parametrize("where", ["header", "manifest", "payload"])
def test_truncated(tiny, where):
    m_len = HEADER.unpack_from(tiny)[3]
    start = 32 + align8(m_len)
    cuts = {"header": [1, 8, 20, 31], "manifest": [32, 33, 32 + m_len // 2, 32 + m_len],
            "payload": [start, start + 9, len(tiny) - 1]}[where]  # fmt: skip
    for cut in cuts:
        with pytest.raises(F.TruncatedError, match=r"file is \d+ bytes, (shorter|its header)"):
            F.decode(tiny[:cut])


def test_unknown_version(tiny):
    with pytest.raises(F.VersionError, match="format version 3 is not supported"):
        F.decode(set_header(tiny, version=3))
    with pytest.raises(F.ManifestError, match=r"unknown \['index_bits', 'k'\] keys"):
        F.decode(set_header(tiny, version=2))  # a version 1 manifest under a version 2 header


def test_nonzero_flags(tiny):
    with pytest.raises(F.VersionError, match="flags 0x0001 are not supported"):
        F.decode(set_header(tiny, flags=1))


def test_header_crc_mismatch(tiny):
    h_crc = HEADER.unpack_from(tiny)[5]
    with pytest.raises(F.ChecksumError, match="header CRC-32 mismatch"):
        F.decode(set_header(tiny, h_crc=h_crc ^ 1, fix_crc=False))
    with pytest.raises(F.ChecksumError, match="header CRC-32 mismatch"):  # a field, CRC not fixed
        F.decode(set_header(tiny, version=2, fix_crc=False))


@pytest.mark.parametrize("m_len", [0, 1, F.MAX_MANIFEST_BYTES + 1, 2**32 - 1])
def test_manifest_length_out_of_range(tiny, m_len):
    with pytest.raises(F.ManifestError, match=f"manifest length {m_len} is outside"):
        F.decode(set_header(tiny, m_len=m_len))


def test_manifest_crc_mismatch(tiny):
    data = bytearray(tiny)
    data[40] ^= 0x20  # inside the manifest; the header's manifest CRC is left stale
    with pytest.raises(F.ChecksumError, match="manifest CRC-32 mismatch"):
        F.decode(bytes(data))


def test_section_crc_mismatch(tiny):
    manifest, payload = split(tiny)
    s = section(manifest, "5.bias")
    data = bytearray(tiny)
    data[len(tiny) - len(payload) + s["offset"] + 3] ^= 0x80  # the sign bit of 5.bias[0]
    with pytest.raises(F.ChecksumError, match="section 5.bias: CRC-32 mismatch"):
        F.decode(bytes(data))
    f = F.decode(bytes(data), verify=False)
    assert f.tensor("5.bias").tolist() == [-0.0, 1.0, -3.0]


def test_trailing_bytes(tiny):
    with pytest.raises(F.LayoutError, match="1 trailing bytes after the payload"):
        F.decode(tiny + b"\0")
    with pytest.raises(F.LayoutError, match="8 trailing bytes"):
        F.decode(tiny + tiny[:8])


def test_nonzero_padding_after_manifest(tiny):
    manifest, payload = split(tiny)
    # Give the manifest a length that is not a multiple of 8, so that it has padding.
    while len(dumps(manifest)) % 8 == 0:
        manifest["metadata"]["note"] += "x"
    text = dumps(manifest)
    assert F.decode(build(manifest, payload))
    pad = bytearray(align8(len(text)) - len(text))
    pad[-1] = 1
    with pytest.raises(F.LayoutError, match="padding after the manifest is not zero"):
        F.decode(build_raw(text, payload, pad=bytes(pad)))


def test_nonzero_padding_between_sections(tiny):
    manifest, payload = split(tiny)
    s = section(manifest, "0.indices")
    assert s["length"] == 7 and section(manifest, "0.bias")["offset"] == 8
    data = bytearray(tiny)
    data[len(tiny) - len(payload) + 7] = 0x80  # padding is covered by no CRC, only by this rule
    with pytest.raises(F.LayoutError, match="padding before section 0.bias is not zero"):
        F.decode(bytes(data))


def test_nonzero_unused_bits_of_last_byte(tiny):
    manifest, payload = split(tiny)
    s = section(manifest, "0.indices")  # 18 x 3 bits = 54 bits: 2 unused bits
    body = bytearray(payload[:7])
    body[6] |= 1
    s["crc32"] = crc(bytes(body))
    with pytest.raises(F.LayoutError, match="section 0.indices: unused bits of the last byte"):
        F.decode(build(manifest, bytes(body) + payload[7:]))


# ----------------------------------------------------------------------------- manifest errors


def edited(tiny: bytes, edit) -> bytes:
    """The tiny file with ``edit(manifest)`` applied and CRCs re-fixed."""
    manifest, payload = split(tiny)
    result = edit(manifest)
    if isinstance(result, tuple):  # the edit changed the payload too
        manifest, payload = result
    return build(manifest, payload)


def replace_metadata(tiny: bytes, raw: bytes) -> bytes:
    """The tiny file with its metadata replaced by raw manifest bytes (not valid JSON, perhaps)."""
    manifest, payload = split(tiny)
    manifest["metadata"] = {"x": "@@"}
    text = dumps(manifest).replace(b'{"x":"@@"}', raw)
    return build_raw(text, payload)


def test_manifest_not_utf8(tiny):
    with pytest.raises(F.ManifestError, match="manifest is not UTF-8"):
        F.decode(replace_metadata(tiny, b'{"x":"caf\xe9"}'))


@pytest.mark.parametrize("raw", [b"{", b'{"x":}', b"{'x':1}", b'{"x":1}}', b'{"x":"\x01"}'])
def test_manifest_not_json(tiny, raw):
    with pytest.raises(F.ManifestError, match="manifest is not JSON"):
        F.decode(replace_metadata(tiny, raw))


def test_manifest_not_an_object(tiny):
    _, payload = split(tiny)
    with pytest.raises(F.ManifestError, match="manifest is not a JSON object"):
        F.decode(build_raw(b"[1, 2]", payload))


@pytest.mark.parametrize("n", [100_000, 1000, 31])
def test_manifest_nested_too_deep(tiny, n):
    """Depth counts from the manifest object (1); metadata is 2, so n lists in it reach n + 2."""
    with pytest.raises(F.ManifestError, match="manifest nests deeper than 32 levels"):
        F.decode(replace_metadata(tiny, b'{"x":' + b"[" * n + b"]" * n + b"}"))


def test_manifest_nested_to_the_limit_is_fine(tiny):
    assert F.decode(replace_metadata(tiny, b'{"x":' + b"[" * 30 + b"]" * 30 + b"}"))


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
def test_manifest_nan_and_infinity(tiny, raw):
    with pytest.raises(F.ManifestError, match="NaN|Infinity"):
        F.decode(replace_metadata(tiny, b'{"x":[' + raw + b"]}"))


def test_manifest_huge_integer(tiny):
    with pytest.raises(F.ManifestError, match="manifest has an integer of 5000 digits"):
        F.decode(replace_metadata(tiny, b'{"x":' + b"9" * 5000 + b"}"))


def test_manifest_duplicate_keys(tiny):
    manifest, payload = split(tiny)
    text = b'{"k":5,' + dumps(manifest)[1:]
    with pytest.raises(F.ManifestError, match=r"duplicate keys \['k'\]"):
        F.decode(build_raw(text, payload))
    with pytest.raises(F.ManifestError, match=r"duplicate keys \['a'\]"):  # nested, in metadata
        F.decode(replace_metadata(tiny, b'{"a":1,"b":{},"a":2}'))


def test_manifest_unknown_and_missing_keys(tiny):
    with pytest.raises(F.ManifestError, match=r"manifest: unknown \['extra'\] keys"):
        F.decode(edited(tiny, lambda m: m.update(extra=1)))
    with pytest.raises(F.ManifestError, match=r"manifest: missing \['selection'\] keys"):
        F.decode(edited(tiny, lambda m: m.pop("selection")))
    with pytest.raises(F.ManifestError, match=r"generator: unknown \['salt'\] keys"):
        F.decode(edited(tiny, lambda m: m["generator"].update(salt="00")))
    with pytest.raises(F.ManifestError, match=r"section 2: missing \['crc32'\] keys"):
        F.decode(edited(tiny, lambda m: m["sections"][2].pop("crc32")))
    # Metadata is free-form: unknown keys there are fine.
    assert F.decode(edited(tiny, lambda m: m["metadata"].update(anything={"goes": [1]})))


@pytest.mark.parametrize("value", [2, "1", 1.0, True])
def test_manifest_version_must_be_the_integer_1(tiny, value):
    with pytest.raises(F.ManifestError, match="manifest version .* does not match"):
        F.decode(edited(tiny, lambda m: m.update(version=value)))


def test_manifest_format_and_selection(tiny):
    with pytest.raises(F.ManifestError, match="format is 'slotjack', not 'slotpack'"):
        F.decode(edited(tiny, lambda m: m.update(format="slotjack")))
    with pytest.raises(F.ManifestError, match="selection 'random' is not one of"):
        F.decode(edited(tiny, lambda m: m.update(selection="random")))
    with pytest.raises(F.ManifestError, match="selection .* is not one of"):
        F.decode(edited(tiny, lambda m: m.update(selection=["greedy"])))


def test_unknown_layer_op(tiny):
    def op(value):
        return lambda m: m["layers"][2].update(op=value)

    with pytest.raises(F.ManifestError, match="layer 2: unknown op 'gelu'; known: avgpool2d"):
        F.decode(edited(tiny, op("gelu")))
    for value in (["relu"], {"relu": 1}, None):  # unhashable or missing ops are named too
        with pytest.raises(F.ManifestError, match="layer 2: unknown op"):
            F.decode(edited(tiny, op(value)))
    with pytest.raises(F.ManifestError, match="layer 2: unknown op 'relu'"):  # not an object
        F.decode(edited(tiny, lambda m: m["layers"].__setitem__(2, "relu")))


def test_unknown_and_missing_layer_fields(tiny):
    with pytest.raises(F.ManifestError, match=r"layer 0 \(conv2d\): unknown \['group'\] keys"):
        F.decode(edited(tiny, lambda m: m["layers"][0].update(group=1)))
    with pytest.raises(F.ManifestError, match=r"layer 0 \(conv2d\): missing \['dilation'\] keys"):
        F.decode(edited(tiny, lambda m: m["layers"][0].pop("dilation")))
    with pytest.raises(F.ManifestError, match=r"layer 2 \(relu\): unknown \['tensors'\] keys"):
        F.decode(edited(tiny, lambda m: m["layers"][2].update(tensors={})))
    with pytest.raises(F.ManifestError, match=r"layer 5 tensors: missing \['bias'\] keys"):
        F.decode(edited(tiny, lambda m: m["layers"][5]["tensors"].pop("bias")))
    with pytest.raises(F.ManifestError, match="layer 5: tensor bias must be section '5.bias'"):
        F.decode(edited(tiny, lambda m: m["layers"][5]["tensors"].update(bias="0.bias")))


@pytest.mark.parametrize(
    "pos,field,value,match",
    [(0, "in_channels", True, "layer 0 in_channels must be an integer in 1..2147483648, got True"),
     (0, "kernel_size", 3.0, "layer 0 kernel_size must be an integer"),
     (0, "padding", -1, "layer 0 padding must be an integer in 0.."),
     (0, "stride", 0, "layer 0 stride must be an integer in 1.."),
     (0, "bias", 1, "layer 0 bias must be true or false, got 1"),
     (1, "eps", "1e-5", "layer 1 eps must be a finite number"),
     (1, "momentum", False, "layer 1 momentum must be a finite number, got False"),
     (3, "kernel_size", "2", "layer 3 kernel_size must be an integer")],
)  # fmt: skip
def test_layer_field_types(tiny, pos, field, value, match):
    with pytest.raises(F.ManifestError, match=match):
        F.decode(edited(tiny, lambda m: m["layers"][pos].update({field: value})))


def test_affine_batchnorm(tiny):
    with pytest.raises(
        F.ManifestError, match="layer 1: batchnorm2d with affine=true is not supported"
    ):
        F.decode(edited(tiny, lambda m: m["layers"][1].update(affine=True)))


def test_dropout_p_range(tiny):
    def dropout(p):
        return lambda m: m["layers"].__setitem__(2, {"op": "dropout", "p": p})

    assert F.decode(edited(tiny, dropout(0.5))).layers[2] == A.Dropout(0.5)
    with pytest.raises(F.ManifestError, match=r"layer 2: dropout p must be in \[0, 1\), got 1.0"):
        F.decode(edited(tiny, dropout(1)))


@pytest.mark.parametrize("k", [1, 0, -3, 65537, True, 5.0, "5"])
def test_k_out_of_range(tiny, k):
    with pytest.raises(F.ManifestError, match=f"k must be an integer in 2..65536, got {k!r}"):
        F.decode(edited(tiny, lambda m: m.update(k=k)))


@pytest.mark.parametrize("bits", [2, 4, 16])
def test_index_bits_inconsistent_with_k(tiny, bits):
    with pytest.raises(
        F.ManifestError, match=f"index_bits {bits} does not match K=5 \\(needs 3\\)"
    ):
        F.decode(edited(tiny, lambda m: m.update(index_bits=bits)))
    with pytest.raises(F.ManifestError, match="index_bits must be an integer in 1..16"):
        F.decode(edited(tiny, lambda m: m.update(index_bits=17)))


def test_wrong_generator(tiny):
    with pytest.raises(F.ManifestError, match="generator 'philox4x32-10' is not supported"):
        F.decode(edited(tiny, lambda m: m["generator"].update(id="philox4x32-10")))


@pytest.mark.parametrize("seed", ["0123456789ABCDEF", "123456789abcdef", "0x23456789abcdef",
                                  "0123456789abcdef0", 81985529216486895, None])  # fmt: skip
def test_bad_seed(tiny, seed):
    with pytest.raises(F.ManifestError, match="generator seed must be 16 lowercase hex digits"):
        F.decode(edited(tiny, lambda m: m["generator"].update(seed=seed)))


def test_bad_input(tiny):
    with pytest.raises(F.ManifestError, match=r"input shape must be \[C, H, W\]"):
        F.decode(edited(tiny, lambda m: m["input"].update(shape=[4, 4])))
    with pytest.raises(F.ManifestError, match=r"input mean must list one number per channel \(1\)"):
        F.decode(edited(tiny, lambda m: m["input"].update(mean=[0.5, 0.5])))
    with pytest.raises(F.ManifestError, match="input std must be positive"):
        F.decode(edited(tiny, lambda m: m["input"].update(std=[0])))
    with pytest.raises(F.ManifestError, match="metadata must be an object"):
        F.decode(edited(tiny, lambda m: m.update(metadata=[])))
    with pytest.raises(F.ManifestError, match="layers must be a non-empty list"):
        F.decode(edited(tiny, lambda m: m.update(layers=[])))


def test_layers_do_not_chain(tiny):
    with pytest.raises(F.ManifestError, match=r"do not chain: layer 5 \(linear\) expects \[9\]"):
        F.decode(edited(tiny, lambda m: m["layers"][5].update(in_features=9)))
    with pytest.raises(F.ManifestError, match=r"do not chain: layer 1 \(batchnorm2d\) has 3 feat"):
        F.decode(edited(tiny, lambda m: m["layers"][1].update(num_features=3)))
    with pytest.raises(F.ManifestError, match=r"do not chain: layer 0 \(conv2d\) expects 2 chan"):
        F.decode(edited(tiny, lambda m: m["layers"][0].update(in_channels=2)))


def test_wrong_num_classes(tiny):
    with pytest.raises(F.ManifestError, match=r"the network outputs \[3\], not \[10\] classes"):
        F.decode(edited(tiny, lambda m: m.update(num_classes=10)))


# ----------------------------------------------------------------------------- section errors


def test_section_length_inconsistent_with_shape(tiny):
    def length(name, value):
        return lambda m: section(m, name).update(length=value)

    with pytest.raises(F.LayoutError, match=r"\(0.indices\): length 8 does not fit shape \[18\]"):
        F.decode(edited(tiny, length("0.indices", 8)))
    with pytest.raises(F.LayoutError, match=r"\(5.bias\): length 8 does not fit shape \[3\]"):
        F.decode(edited(tiny, length("5.bias", 8)))
    with pytest.raises(F.ManifestError, match=r"\(0.bias\) shape must be an integer in 0.."):
        F.decode(edited(tiny, lambda m: section(m, "0.bias").update(shape=[-2])))
    with pytest.raises(F.ManifestError, match="indices have shape"):
        F.decode(edited(tiny, lambda m: section(m, "0.indices").update(shape=[2, 9])))


def test_section_shape_disagrees_with_layer(tiny):
    def shrink(m):  # a consistent section, but smaller than the layer needs
        s, tail = section(m, "5.bias"), split(tiny)[1]
        s.update(shape=[2], length=8, crc32=crc(tail[s["offset"] : s["offset"] + 8]))
        return m, tail[: s["offset"] + 8]

    with pytest.raises(F.ManifestError, match=r"section 5.bias is float32 \[2\], expected float32"):
        F.decode(edited(tiny, shrink))


def test_section_encoding(tiny):
    def encoding(value):
        return lambda m: section(m, "0.bias").update(encoding=value)

    with pytest.raises(F.ManifestError, match=r"\(0.bias\): encoding 'int8' is not one of bits"):
        F.decode(edited(tiny, encoding("int8")))
    with pytest.raises(F.ManifestError, match=r"\(0.bias\): encoding \['float32'\] is not one of"):
        F.decode(edited(tiny, encoding(["float32"])))  # unhashable: still a ManifestError


def test_section_offset_not_aligned_or_overlapping(tiny):
    def offset(value):
        return lambda m: section(m, "0.bias").update(offset=value)

    with pytest.raises(F.LayoutError, match=r"\(0.bias\): offset 7, expected 8"):
        F.decode(edited(tiny, offset(7)))
    with pytest.raises(F.LayoutError, match=r"\(0.bias\): offset 0, expected 8"):  # overlaps
        F.decode(edited(tiny, offset(0)))
    with pytest.raises(F.LayoutError, match=r"\(0.indices\): offset 8, expected 0"):
        F.decode(edited(tiny, lambda m: section(m, "0.indices").update(offset=8)))


def test_sections_must_cover_the_payload(tiny):
    manifest, payload = split(tiny)
    with pytest.raises(F.LayoutError, match=r"sections end at \d+ but the payload is \d+ bytes"):
        F.decode(build(manifest, payload + bytes(8)))


def test_section_not_referenced_by_any_layer(tiny):
    manifest, payload = split(tiny)
    extra = np.array([1, 2], "<f4").tobytes()
    manifest["sections"].append({"name": "9.extra", "encoding": "float32", "shape": [2],
                                 "offset": align8(len(payload)), "length": 8, "crc32": crc(extra)})  # fmt: skip
    payload += bytes(align8(len(payload)) - len(payload)) + extra
    with pytest.raises(F.ManifestError, match=r"sections \['9.extra'\] are not used by any layer"):
        F.decode(build(manifest, payload))


def test_referenced_section_missing(tiny):
    manifest, payload = split(tiny)
    last = manifest["sections"].pop()
    assert last["name"] == "5.bias"
    prev = manifest["sections"][-1]
    payload = payload[: prev["offset"] + prev["length"]]
    with pytest.raises(F.ManifestError, match="layer 5: section '5.bias' is not declared"):
        F.decode(build(manifest, payload))


def test_duplicate_section_name(tiny):
    with pytest.raises(F.ManifestError, match=r"section 1: name must be a unique string"):
        F.decode(edited(tiny, lambda m: m["sections"][1].update(name="0.indices")))


def assert_refused_small(data: bytes) -> None:
    """decode refuses ``data`` with a SlotFormatError, allocating little (no memory bomb)."""
    tracemalloc.start()
    try:
        with pytest.raises(F.SlotFormatError) as info:
            F.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, (peak, info.value)


def test_memory_bomb_section_shape(tiny):
    big = [2**31, 2**31]
    for length in (8, 4 * 2**62):
        data = edited(tiny, lambda m, n=length: section(m, "0.bias").update(shape=big, length=n))
        assert_refused_small(data)


def test_memory_bomb_huge_layers(tiny):
    """A 2^31 x 2^31 linear layer over a 2^31-pixel input, with a payload of a few bytes."""
    n = 2**31

    def bomb(m, declared):
        m.update(num_classes=n, sections=[])
        m["input"].update(shape=[1, 1, n])
        m["layers"] = [{"op": "flatten"}, {"op": "linear", "in_features": n, "out_features": n,
                       "bias": False, "tensors": {"indices": "1.indices"}}]  # fmt: skip
        m["sections"] = [{"name": "1.indices", "encoding": "bits", "shape": [declared],
                          "offset": 0, "length": 9, "crc32": 0}]  # fmt: skip
        return m, bytes(9)

    for declared in (24, n * n):
        data = edited(tiny, lambda m, d=declared: bomb(m, d))
        assert_refused_small(data)
        with pytest.raises(F.ManifestError):
            F.decode(data)


# ----------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz() -> bytes:
    data = fuzz_bytes()
    assert 500 < len(data) < 4000
    exercise(data)  # the unmutated file is fully readable
    return data


FUZZ = fuzz_bytes()
FUZZ_PAYLOAD = 32 + align8(HEADER.unpack_from(FUZZ)[3])
FUZZ_SETTINGS = settings(max_examples=1000, derandomize=True, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@pytest.mark.parametrize("make", [tiny_bytes, fuzz_bytes])
def test_every_truncation(make):
    """Every proper prefix of a valid file is refused: the empty one as not a .slot file, the others
    as truncated (the exact subclass, not merely some SlotFormatError)."""
    data = make()
    with pytest.raises(F.MagicError):
        F.decode(data[:0])
    for cut in range(1, len(data)):
        with pytest.raises(F.TruncatedError):
            F.decode(data[:cut])


@FUZZ_SETTINGS
@given(cut=st.integers(0, len(FUZZ) - 1))
def test_fuzz_truncation(cut):
    exercise(FUZZ[:cut])


positions = st.one_of(  # header, manifest and payload, each hit often
    st.integers(0, 31), st.integers(32, FUZZ_PAYLOAD - 1), st.integers(FUZZ_PAYLOAD, len(FUZZ) - 1)
)
edits = st.lists(st.tuples(positions, st.integers(1, 255), st.booleans()), min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for pos, value, xor in ops:
        out[pos] = out[pos] ^ value if xor else value
    return bytes(out)


@FUZZ_SETTINGS
@given(ops=edits)
def test_fuzz_byte_edits(ops):
    data = mutate(FUZZ, ops)
    exercise(data)
    if data != FUZZ:  # every byte is under a CRC or a must-be-zero rule
        with pytest.raises(F.SlotFormatError):
            F.decode(data)


@FUZZ_SETTINGS
@given(ops=st.lists(st.tuples(st.integers(0, HEADER.unpack_from(FUZZ)[3] - 1),
                              st.integers(1, 255), st.booleans()), min_size=1, max_size=4))  # fmt: skip
def test_fuzz_manifest_bytes_with_fixed_crcs(ops):
    """Byte edits inside the manifest with its CRC re-fixed: the JSON and rule checks must hold."""
    manifest_text = FUZZ[32 : 32 + HEADER.unpack_from(FUZZ)[3]]
    exercise(build_raw(mutate(manifest_text, ops), FUZZ[FUZZ_PAYLOAD:]))


def json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, list):
        node = dict(enumerate(node))
    for key, value in node.items() if isinstance(node, dict) else ():
        yield from json_paths(value, (*prefix, key))


FUZZ_MANIFEST = split(FUZZ)[0]
json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, 1, -1, 2, 3, 7, 8, 2**31, 2**63, 2**64])
    | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "bits", "float16", "linear", "relu", "0.indices", "ffffffffffffffff"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@FUZZ_SETTINGS
@given(path=st.sampled_from(list(json_paths(FUZZ_MANIFEST))[1:]), value=json_values,
       delete=st.booleans())  # fmt: skip
def test_fuzz_manifest_values(path, value, delete):
    """Any manifest node replaced by any JSON value (or deleted), CRCs re-fixed."""
    manifest = json.loads(json.dumps(FUZZ_MANIFEST))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    exercise(build(manifest, FUZZ[FUZZ_PAYLOAD:]))


# ----------------------------------------------------------------------------- read and write


def test_read_missing_path_and_directory(tmp_path):
    for path in (tmp_path / "nope.slot", tmp_path):
        with pytest.raises(F.SlotFormatError, match="cannot read") as info:
            F.read(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_read_names_the_file_and_keeps_the_class(tmp_path, tiny):
    path = tmp_path / "bad.slot"
    path.write_bytes(tiny + b"\0")
    with pytest.raises(F.LayoutError, match=f"^{path}: 1 trailing bytes"):
        F.read(path)
    path.write_bytes(tiny)
    assert F.read(path).manifest == F.decode(tiny).manifest


def test_write_refuses_to_overwrite_and_leaves_no_temporary_files(tmp_path, tiny):
    path = tmp_path / "model.slot"
    assert F.write(path, tiny) == path
    assert path.read_bytes() == tiny and os.listdir(tmp_path) == ["model.slot"]
    other = tiny_bytes(k=3)
    with pytest.raises(OutputExistsError, match="exists; pass --force"):
        F.write(path, other)
    assert path.read_bytes() == tiny and os.listdir(tmp_path) == ["model.slot"]
    F.write(path, other, force=True)
    assert path.read_bytes() == other and os.listdir(tmp_path) == ["model.slot"]
    # A failed write (bad data, or a directory in the way) leaves the folder as it was.
    with pytest.raises(TypeError):
        F.write(tmp_path / "second.slot", 12345)
    assert os.listdir(tmp_path) == ["model.slot"]
    (tmp_path / "dir.slot").mkdir()
    with pytest.raises(OSError):
        F.write(tmp_path / "dir.slot", tiny, force=True)
    assert sorted(os.listdir(tmp_path)) == ["dir.slot", "model.slot"]
    assert path.read_bytes() == other

"""The file generator of the structure-aware fuzzer (benchmarks/fuzz_slot.py): ``.slot`` files
built from the grammar of docs/FORMAT.md §2, then mutated where the spec has rules.

``generate(seed, index)`` always makes the same bytes. A base file is a random valid network
(convolutions with strides, padding, dilation and groups, BatchNorm, pools, dropout, linear
layers; sometimes none weighted), per-layer K and reference rule, indices as training leaves them
in the ``bits`` or ``delta`` encoding, float32 or float16 tensors, format version 1 or 2. About a
third of the files stay valid, the others get one mutation (near-valid) or several (hostile).
Each mutation says whether the spec decides the result ("valid", "invalid") or not (None), so
the fuzzer also checks the reader against the generator's own reading of the spec.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slotpack import arch as A
from slotpack import bits as B
from slotpack import delta as D
from slotpack import format as F
from slotpack import prng
from slotpack.pack import encode_indices

KINDS = {"valid": 0.35, "near": 0.45, "hostile": 0.20}
MAX_WORK = 1 << 22  # connections * K of one generated layer: argmax/draw readers pay K each
MAX_FEATURES = 2048  # activations of generated networks stay small: the limits come from mutations
DIMS = {
    "in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
    "dilation", "groups", "num_features", "num_classes",
}  # fmt: skip
LIMITS = [0, 1, 2, 3, 1 << 20, 1 << 26, (1 << 26) + 1, 1 << 31, (1 << 31) + 1, 1 << 32]
KS = [2, 2, 2, 3, 4, 5, 8, 8, 16, 255, 256, 257, 1000, 65536]


class Giant:
    """An integer literal of ``digits`` nines (json.dumps refuses ints over 4,300 digits)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


EXTREMES = [
    0, 1, -1, 2, 1 << 31, (1 << 31) + 1, (1 << 53) + 1, 1 << 63, 1 << 64, -(1 << 63), 1e308,
    -1e308, -0.0, 5e-324, 1e-300, 0.1, 1.5, Giant(400), Giant(4300), Giant(4301),
]  # fmt: skip


def crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def align8(n: int) -> int:
    return -(-n // 8) * 8


@dataclass
class Case:
    """A generated file and what its generator knows about it."""

    name: str  # "seed:index": generate(*name) makes the same bytes again
    data: bytes
    kind: str
    version: int
    mutations: list[str]
    expect: str | None  # "valid" or "invalid" where the spec decides for sure, else None
    indices: dict[int, np.ndarray] | None = None  # position -> indices, when nothing touched them


@dataclass
class _Draft:
    rng: np.random.Generator
    version: int
    seed: int
    manifest: dict[str, Any]
    bodies: dict[str, bytes | D.Delta]
    indices: dict[int, np.ndarray]
    payload: bytes = b""
    text_edits: list = field(default_factory=list)
    byte_edits: list = field(default_factory=list)
    sort_keys: bool = True
    dups: int = 0


def _roles(layer: A.Layer) -> tuple[str, ...]:
    if isinstance(layer, A.WEIGHTED):
        return ("indices", "bias") if layer.bias else ("indices",)
    return ("running_mean", "running_var") if isinstance(layer, A.BatchNorm2d) else ()


def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(len(items)))]


def _spatial(rng: np.random.Generator, shape: tuple[int, ...]) -> A.Layer | None:
    c, h, w = shape
    op = _pick(rng, ["conv2d", "conv2d", "conv2d", "batchnorm2d", "relu", "maxpool2d",
                     "avgpool2d", "dropout"])  # fmt: skip
    if rng.random() < 0.05 and op in ("conv2d", "maxpool2d", "avgpool2d"):
        # valid extremes: a stride of 2^31 keeps one output, whatever the dilation and padding
        if op != "conv2d":
            return A.LAYER_TYPES[op](1, 1 << 31)
        k, dilation = int(rng.integers(1, 4)), _pick(rng, [1, 1 << 29, 1 << 30])
        return A.Conv2d(c, c, k, stride=1 << 31, padding=dilation * (k - 1), dilation=dilation)
    if op == "conv2d":
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        groups = 1 if rng.random() < 0.6 else _pick(rng, divisors)
        k = int(rng.integers(1, 5))
        dilation = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        return A.Conv2d(
            c, groups * int(rng.integers(1, 5)), k, stride=int(rng.integers(1, 4)),
            padding=int(rng.integers(0, dilation * (k - 1) + 1)), dilation=dilation,
            groups=groups, bias=bool(rng.random() < 0.5),
        )  # fmt: skip
    if op == "batchnorm2d":
        return A.BatchNorm2d(c, eps=_pick(rng, [1e-5, 1e-3, 0.1]), momentum=0.1)
    if op in ("maxpool2d", "avgpool2d"):
        k = int(rng.integers(1, min(3, h, w) + 1))
        return A.LAYER_TYPES[op](k, int(rng.integers(1, 4)))
    if op == "dropout":
        return A.Dropout(_pick(rng, [0.0, 0.5, 0.999]))
    return A.ReLU()


def _network(rng: np.random.Generator) -> tuple[tuple[int, int, int], list[A.Layer], int]:
    """A random chain of layers from a random input to ``num_classes`` outputs."""
    h = int(rng.integers(1, 13))
    shape: tuple[int, ...] = (
        _pick(rng, [1, 1, 2, 3, 4, 8]), h, h if rng.random() < 0.8 else int(rng.integers(1, 13))
    )  # fmt: skip
    input_shape = shape
    layers: list[A.Layer] = []
    for _ in range(int(rng.integers(0, 5))):
        layer = _spatial(rng, shape)
        try:
            out = A.output_shapes((layer,), shape)[-1]
        except ValueError:
            continue
        if math.prod(out) <= MAX_FEATURES:
            layers.append(layer)
            shape = out
    layers.append(A.Flatten())
    features = math.prod(shape)
    if features <= 64 and rng.random() < 0.1:  # no weighted layer at all
        return input_shape, layers, features
    for _ in range(int(rng.integers(0, 3))):
        width = int(rng.integers(1, 33))
        layers += [A.Linear(features, width, bias=bool(rng.random() < 0.5)), A.ReLU()]
        if rng.random() < 0.3:
            layers.append(A.Dropout(0.5))
        features = width
    classes = int(rng.integers(1, 13))
    layers.append(A.Linear(features, classes, bias=bool(rng.random() < 0.7)))
    if rng.random() < 0.1:
        layers.append(_pick(rng, [A.ReLU(), A.Dropout(0.25)]))
    return input_shape, layers, classes


def _base(rng: np.random.Generator) -> _Draft:
    """A valid file of a random network, as a manifest dict and section bodies."""
    version = 1 if rng.random() < 0.3 else 2
    seed = _pick(rng, [0, (1 << 64) - 1, int(rng.integers(0, 1 << 63)) * 2 + 1])
    input_shape, layers, classes = _network(rng)
    selection = _pick(rng, ["greedy", "probabilistic"])
    weighted = [(p, layer) for p, layer in enumerate(layers) if isinstance(layer, A.WEIGHTED)]
    most = max((math.prod(layer.weight_shape) for _, layer in weighted), default=1)
    ks_ok = [k for k in KS if k * most <= MAX_WORK]
    shared_k = _pick(rng, ks_ok)
    half = rng.random() < 0.3
    mixed = rng.random() < 0.1
    bodies: dict[str, bytes | D.Delta] = {}
    entries, sections, indices = [], [], {}
    number = 0
    for pos, layer in enumerate(layers):
        entry = A.layer_to_dict(layer)
        roles = _roles(layer)
        if isinstance(layer, A.WEIGHTED):
            count = math.prod(layer.weight_shape)
            k = shared_k if version == 1 else _pick(rng, [k for k in KS if k * count <= MAX_WORK])
            rule = (
                F.implicit_reference(selection)
                if version == 1
                else _pick(rng, list(prng.REFERENCE_RULES))
            )
            if version == 2:
                entry["k"], entry["reference"] = k, rule
            ref = prng.reference_np(seed, number, count, k, prng.glorot_bound(*layer.fans), rule)
            index = ref.astype(np.int64)
            changed = rng.random(count) < _pick(rng, [0.0, 0.02, 0.3, 1.0])
            index[changed] = (index[changed] + rng.integers(1, k, changed.sum())) % k
            encoding = "bits" if version == 1 else _pick(rng, ["auto", "bits", "delta"])
            kind, data = encode_indices(
                index, seed=seed, number=number, layer=layer, k=k, reference=rule,
                encoding=encoding,
            )  # fmt: skip
            name = f"{pos}.indices"
            bodies[name] = data
            sections.append({"name": name, "encoding": kind, "shape": [count]})
            indices[pos] = index
            number += 1
        for role in roles:
            if role == "indices":
                continue
            size = layer.num_features if isinstance(layer, A.BatchNorm2d) else layer.weight_shape[0]
            values = (
                rng.uniform(0.5, 2.0, size) if role == "running_var" else rng.normal(0, 0.5, size)
            )
            f16 = half != (mixed and rng.random() < 0.5)
            name = f"{pos}.{role}"
            bodies[name] = values.astype("<f2" if f16 else "<f4").tobytes()
            sections.append(
                {"name": name, "encoding": "float16" if f16 else "float32", "shape": [size]}
            )
        if roles:
            entry["tensors"] = {role: f"{pos}.{role}" for role in roles}
        entries.append(entry)
    c = input_shape[0]
    manifest = {
        "format": "slotpack",
        "version": version,
        "generator": {"id": prng.GENERATOR_ID, "seed": f"{seed:016x}"},
        "selection": selection,
        "input": {
            "shape": list(input_shape),
            "mean": [float(v) for v in rng.uniform(0, 1, c).round(3)],
            "std": [float(v) for v in rng.uniform(0.1, 1, c).round(3)],
        },
        "num_classes": classes,
        "layers": entries,
        "sections": sections,
        "metadata": _pick(rng, [{}, {"dataset": "mnist"}, {"dataset": "toy", "val_acc": 0.5}]),
    }
    if version == 1:
        manifest["k"], manifest["index_bits"] = shared_k, B.bits_for(shared_k)
    return _Draft(rng, version, seed, manifest, bodies, indices)


def _assemble(d: _Draft) -> None:
    """Lay the bodies out as the manifest's sections list says: offsets, lengths, CRCs."""
    payload = bytearray()
    for entry in d.manifest["sections"]:
        body = d.bodies.get(entry["name"])
        if isinstance(body, D.Delta):
            entry.update(changes=body.changes, gap_param=body.gap_param, rank_param=body.rank_param)
            for key in F.DELTA_OPTIONAL:
                entry.pop(key, None)
            if body.gap_code != "rice":
                entry["gap_code"] = body.gap_code
            if body.crossing is not None:
                entry["crossing"] = body.crossing
            body = body.data
        else:
            for key in (*F.DELTA_KEYS, *F.DELTA_OPTIONAL):
                entry.pop(key, None)
        payload += bytes(align8(len(payload)) - len(payload))
        entry.update(offset=len(payload), length=len(body), crc32=crc(body))
        payload += body
    d.payload = bytes(payload)


def _emit(d: _Draft) -> bytes:
    """The file: header, manifest text (with its duplicated keys and edits), payload."""
    giants: list[Giant] = []

    def placeholder(obj: Any) -> str:
        if isinstance(obj, Giant):
            giants.append(obj)
            return f"\0g{len(giants) - 1}"
        raise TypeError(type(obj).__name__)

    doc = d.manifest if d.sort_keys else dict(reversed(list(d.manifest.items())))
    text = json.dumps(doc, sort_keys=d.sort_keys, separators=(",", ":"), default=placeholder)
    text = re.sub(r'"\\u0000d\d+-(.*?)-"', lambda m: json.dumps(m.group(1)), text)
    text = re.sub(r'"\\u0000g(\d+)"', lambda m: "9" * giants[int(m.group(1))].digits, text)
    for edit in d.text_edits:
        text = edit(text)
    manifest = text.encode("utf-8")
    head = header(d.version, manifest, d.payload)
    data = head + manifest + bytes(align8(len(manifest)) - len(manifest)) + d.payload
    for edit in d.byte_edits:
        try:
            data = edit(data)
        except (struct.error, ValueError):
            pass  # an earlier edit cut the bytes this one needs
    return data


HEADER = struct.Struct("<8sHHIIIQ")


def header(format_version: int, manifest: bytes, payload: bytes, **fields: Any) -> bytes:
    """The 32-byte header of §2.1 with correct lengths and CRCs, or with ``fields`` changed
    (the header CRC is recomputed unless ``h_crc`` is given)."""
    values = {
        "magic": F.MAGIC, "version": format_version, "flags": 0, "m_len": len(manifest),
        "m_crc": crc(manifest), "h_crc": 0, "p_len": len(payload),
    } | fields  # fmt: skip
    head = bytearray(HEADER.pack(*values.values()))
    if "h_crc" not in fields:
        head[20:24] = struct.pack("<I", crc(bytes(head[:20] + head[24:])))
    return bytes(head)


# ------------------------------------------------------------------------------ mutations
# Each returns "valid" or "invalid" when the spec decides the result for sure, None when it
# does not, or "skip" when it does not apply to this file. Phases: "body" mutations change
# sections and run before the layout is computed; "payload" ones edit laid-out bytes (CRC
# re-fixed); "manifest" ones edit values; "text" ones the JSON; "bytes" ones the file.


def _objects(m: dict, metadata: bool = False) -> list[dict]:
    out = [m]
    for key in ("generator", "input") + (("metadata",) if metadata else ()):
        if isinstance(m.get(key), dict):
            out.append(m[key])
    for key in ("layers", "sections"):
        for entry in m.get(key) if isinstance(m.get(key), list) else []:
            if isinstance(entry, dict):
                out.append(entry)
                if isinstance(entry.get("tensors"), dict):
                    out.append(entry["tensors"])
    return out


def _leaves(m: dict) -> list[tuple[Any, Any, str]]:
    """(container, key, field) of every value outside ``metadata``, containers included; ``field``
    names the rule the value goes by (its key; "shape.item" for an entry of a shape list)."""
    out = []

    def walk(node: Any, name: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if node is m and key == "metadata":
                continue
            if isinstance(node, dict):
                child = "tensors" if name == "tensors" else key
            else:
                child = "shape.item" if name == "shape" else name
            out.append((node, key, child))
            if isinstance(value, (dict, list)):
                walk(value, child)

    walk(m, "")
    return out


def _int_value(v: Any) -> int | None:
    if isinstance(v, Giant):
        return int("9" * v.digits) if v.digits <= 4300 else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


SHAPING = {
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "num_features",
    "num_classes",
    "groups",
}  # changing one changes a section's size or the output


def _verdict(name: str, old: Any, new: Any, node: Any) -> str | None:
    """Whether a manifest holding ``new`` where a valid one held ``old`` (in ``node``) is valid
    for sure ("valid", "invalid"), or None when the spec alone does not say."""
    if isinstance(new, Giant) and new.digits > F.MAX_INT_DIGITS:
        return "invalid"
    as_int = _int_value(new)
    number = as_int is not None or isinstance(new, float)
    same = as_int is not None and type(old) is int and as_int == old
    if isinstance(old, (list, dict)):  # a whole shape, mean, layer, ... replaced
        return "invalid" if not isinstance(new, type(old)) else None
    if name in DIMS or name in ("k", "index_bits", "padding"):
        lo, hi = {"k": (2, F.MAX_K), "index_bits": (1, 16), "padding": (0, F.MAX_DIM)}.get(
            name, (1, F.MAX_DIM)
        )
        if as_int is None or not lo <= as_int <= hi:
            return "invalid"
        if same:
            return "valid"
        if name in SHAPING or (name == "kernel_size" and node.get("op") == "conv2d"):
            return "invalid"
        if name == "padding" and as_int > node["dilation"] * (node["kernel_size"] - 1):
            return "invalid"
        return None
    if name == "shape.item":  # of the input (chaining decides) or of a section (must match)
        return (
            "valid"
            if same
            else "invalid"
            if as_int is None or not 1 <= as_int <= F.MAX_DIM
            else None
        )
    if name in ("offset", "length", "crc32", "version"):
        return "valid" if same else "invalid"
    if name in ("changes", "gap_param", "rank_param"):
        return "valid" if same else "invalid" if as_int is None or as_int < 0 else None
    if name in ("mean", "std", "eps", "momentum", "p"):
        if not number:
            return "invalid"
        try:
            value = float(as_int if as_int is not None else new)
        except OverflowError:
            return "invalid"  # an integer literal no double holds: not a finite number
        if name == "std" and value <= 0 or name == "p" and not 0 <= value < 1:
            return "invalid"
        return "valid"
    if isinstance(old, bool):
        if not isinstance(new, bool) or new != old:
            return "invalid"  # affine must be false; a bias flag must match its section
        return "valid"
    if isinstance(old, str):
        return "valid" if new == old else "invalid"
    return None


def _set_leaf(d: _Draft, values: list, pick: Any = None) -> str | None:
    leaves = [leaf for leaf in _leaves(d.manifest) if pick is None or pick(leaf)]
    if not leaves:
        return "skip"
    node, key, name = _pick(d.rng, leaves)
    new = _pick(d.rng, values)
    old = node[key]
    node[key] = new
    return _verdict(name, old, new, node)


def m_wrong_type(d: _Draft) -> str | None:
    return _set_leaf(d, ["1", "", 1.0, 1, True, False, None, [], {}, [1], {"a": 1}])


def m_extreme_number(d: _Draft) -> str | None:
    return _set_leaf(d, EXTREMES)


def m_shape_limit(d: _Draft) -> str | None:
    return _set_leaf(
        d, LIMITS, lambda leaf: leaf[2] in DIMS or leaf[2] in ("padding", "shape.item")
    )


def m_k_value(d: _Draft) -> str | None:
    return _set_leaf(d, [0, 1, 2, 3, 4, 65535, 65536, 65537], lambda leaf: leaf[2] == "k")


def m_missing_key(d: _Draft) -> str | None:
    objects = [o for o in _objects(d.manifest) if o]
    obj = _pick(d.rng, objects)
    del obj[_pick(d.rng, sorted(obj))]
    return "invalid"


def m_unknown_key(d: _Draft) -> str | None:
    obj = _pick(d.rng, _objects(d.manifest))
    key = _pick(d.rng, ["extra", "k", "index_bits", "reference", "tensors", "changes", "op"])
    if key in obj:
        return "skip"
    obj[key] = _pick(d.rng, [0, 2, "argmax", {}])
    return "invalid"


def m_reference_rule(d: _Draft) -> str | None:
    layers = [e for e in d.manifest["layers"] if "reference" in e]
    if not layers:
        return "skip"
    if d.rng.random() < 0.6:
        _pick(d.rng, layers)["reference"] = _pick(d.rng, list(prng.REFERENCE_RULES))
        return "valid"  # a delta stream parses the same under any rule; bits do not depend on it
    _pick(d.rng, layers)["reference"] = _pick(d.rng, ["ONEDRAW", "", "argmax ", "max", 3])
    return "invalid"


def m_geometry_bomb(d: _Draft) -> str | None:
    """Padding 6000, 2^30 or 2^31, or dilation 2^30: what asked onnxruntime for gigabytes."""
    convs = [e for e in d.manifest["layers"] if e["op"] == "conv2d"]
    if not convs:
        d.manifest["input"]["shape"][1:] = [_pick(d.rng, [1 << 14, 1 << 16, 1 << 31])] * 2
        return "invalid"  # the input alone holds more than 2^26 values
    conv = _pick(d.rng, convs)
    k = conv["kernel_size"]
    if d.rng.random() < 0.5:
        conv["padding"] = _pick(d.rng, [6000, 1 << 30, 1 << 31])
        return "invalid" if conv["padding"] > conv["dilation"] * (k - 1) else None
    conv["dilation"] = 1 << 30
    conv["padding"] = _pick(d.rng, [0, conv["padding"], min(1 << 31, (1 << 30) * (k - 1))])
    if k == 1:
        return "valid"  # a 1x1 kernel has no extent to dilate
    # stride 1: the output is negative or over 2^30 wide; a huge stride can fold it back to a
    # valid size (found by seed 16, file 1416: padding 2^30, stride 2^31, output 1x1)
    return "invalid" if conv["stride"] == 1 else None


def m_chain_break(d: _Draft) -> str | None:
    layers = d.manifest["layers"]
    choice = d.rng.random()
    linears = [e for e in layers if e["op"] == "linear"]
    if choice < 0.3 and linears:
        _pick(d.rng, linears)["in_features"] += 1
        return "invalid"
    if choice < 0.5:
        d.manifest["num_classes"] += 1
        return "invalid"
    pos = int(d.rng.integers(len(layers)))
    later = any("tensors" in e for e in layers[pos:])
    if choice < 0.75:
        del layers[pos]
    else:
        layers.insert(pos, json.loads(json.dumps(layers[pos])))
    return "invalid" if later or not layers else None


def m_swap_layers(d: _Draft) -> str | None:
    layers = d.manifest["layers"]
    if len(layers) < 2:
        return "skip"
    i = int(d.rng.integers(len(layers) - 1))
    layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return None


def m_pool_op(d: _Draft) -> str | None:
    pools = [e for e in d.manifest["layers"] if e["op"] in ("maxpool2d", "avgpool2d")]
    if not pools:
        return "skip"
    pool = _pick(d.rng, pools)
    pool["op"] = "avgpool2d" if pool["op"] == "maxpool2d" else "maxpool2d"
    return "valid"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


METADATA = [
    *[(v, "invalid" if isinstance(v, Giant) and v.digits > F.MAX_INT_DIGITS else "valid")
      for v in EXTREMES],
    ("a/b\u00e9\u2028\x00\ud83d\ude00\\\"", "valid"), ([], "valid"), ({}, "valid"),
    (_nested(20), "valid"), (_nested(40), "invalid"), (_nested(500), "invalid"),
]  # fmt: skip


def m_metadata(d: _Draft, choices: list = METADATA) -> str | None:
    """Anything JSON allows is valid in metadata, up to the nesting and digit limits."""
    value, verdict = _pick(d.rng, choices)
    d.manifest["metadata"][f"x{len(d.manifest['metadata'])}"] = value
    return verdict


def m_metadata_valid(d: _Draft) -> str | None:
    return m_metadata(d, [c for c in METADATA if c[1] == "valid"])


def m_section_order(d: _Draft) -> str | None:
    order = list(d.rng.permutation(len(d.manifest["sections"])))
    d.manifest["sections"][:] = [d.manifest["sections"][i] for i in order]
    return "valid"


def m_float_values(d: _Draft) -> str | None:
    floats = [s for s in d.manifest["sections"] if s["encoding"].startswith("float")]
    if not floats:
        return "skip"
    s = _pick(d.rng, floats)
    dtype = "<f4" if s["encoding"] == "float32" else "<f2"
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 65504.0, 3e38, 1e-8], np.float64)
    values = np.frombuffer(d.bodies[s["name"]], dtype).copy()
    values[d.rng.random(values.size) < 0.5] = _pick(d.rng, list(specials))
    d.bodies[s["name"]] = values.astype(dtype).tobytes()
    return "valid"  # the format puts no rule on float values


def m_recode(d: _Draft) -> str | None:
    floats = [s for s in d.manifest["sections"] if s["encoding"].startswith("float")]
    if not floats:
        return "skip"
    s = _pick(d.rng, floats)
    old, new = ("<f4", "<f2") if s["encoding"] == "float32" else ("<f2", "<f4")
    d.bodies[s["name"]] = np.frombuffer(d.bodies[s["name"]], old).astype(new).tobytes()
    s["encoding"] = "float16" if new == "<f2" else "float32"
    return "valid"


def _index_sections(d: _Draft) -> list[dict]:
    return [s for s in d.manifest["sections"] if s["name"].endswith(".indices")]


def _k_of(d: _Draft, name: str) -> int:
    if d.version == 1:
        return d.manifest["k"]
    return d.manifest["layers"][int(name.split(".")[0])]["k"]


def m_delta_random(d: _Draft) -> str | None:
    """An indices section becomes a delta section with random parameters: streams that decode
    (changes anywhere, either gap code, any parameters in range), sometimes with a bit or a byte
    off, or a random body."""
    sections = _index_sections(d)
    if not sections or d.version == 1:
        return "skip"
    s, rng = _pick(d.rng, sections), d.rng
    count, k = s["shape"][0], _k_of(d, s["name"])
    s["encoding"] = "delta"
    if rng.random() < 0.6:
        most = min(count, 4096)  # streams stay small when a layer declares 2^31 connections
        changes = _pick(rng, [0, 1, 2, int(rng.integers(1, most + 1)), most])
        where = (
            np.unique(rng.integers(0, count, changes))
            if count > 1 << 16
            else np.sort(rng.choice(count, changes, replace=False))
        )
        changes = where.size
        gap = int(rng.integers(max(0, count.bit_length() - 16), 32)) if changes else 0
        rank = int(rng.integers(0, 16)) if changes else 0
        code = _pick(rng, list(D.GAP_CODES)) if changes else "rice"
        gaps = np.diff(where, prepend=-1) - 1
        body = b""
        if changes:
            body = D.rice_encode(gaps, gap) if code == "rice" else D.eg_encode(gaps, gap)
        crossing = None
        if k > 2 and changes:
            body += D.rice_encode(rng.integers(0, k - 1, changes), rank)
            rule = d.manifest["layers"][int(s["name"].split(".")[0])].get("reference")
            if rule in prng.CROSSING_SCALE and rng.random() < 0.5:  # ranks in the crossing order
                crossing = int(rng.integers(0, prng.MAX_MARGIN + 1))
        else:
            rank = 0
        d.bodies[s["name"]] = D.Delta(body, changes, gap, rank, code, crossing)
        if rng.random() < 0.7 or not body:
            return "valid"  # the reader takes any parameters in range, not only the best ones
        body = bytearray(body)
        if rng.random() < 0.5:
            body[int(rng.integers(len(body)))] ^= 1 << int(rng.integers(8))
        else:
            body.append(int(rng.integers(256)))
        d.bodies[s["name"]] = D.Delta(bytes(body), changes, gap, rank, code, crossing)
        return None
    changes = _pick(rng, [0, 1, 2, int(rng.integers(0, count + 1)), count, count + 1])
    size = _pick(rng, [0, 1, 2, 3, max(0, changes // 4), int(rng.integers(0, 40))])
    body = rng.bytes(size)
    if rng.random() < 0.3:  # mostly ones: long unary codes
        body = bytes(b | 0xFE for b in body)
    rank = 0 if k == 2 and rng.random() < 0.8 else int(rng.integers(0, 17))
    code = _pick(rng, list(D.GAP_CODES))
    crossing = _pick(rng, [None, None, int(rng.integers(-1, prng.MAX_MARGIN + 2))])
    d.bodies[s["name"]] = D.Delta(body, changes, int(rng.integers(0, 33)), rank, code, crossing)
    return None


def m_declare_much(d: _Draft) -> str | None:
    """A valid file of a few hundred bytes whose manifest declares 10^7..2^31 connections (an
    empty delta section: nothing changed; 2^31 is the most a section's shape may say). What a
    reader may spend on it is bounded by the declaration, not the file size: out of memory in
    one line, or a timeout counted as heavy."""
    if d.version == 1:
        return "skip"
    f, n = _pick(d.rng, [(1 << 20, 10), (1 << 20, 1 << 11), (1 << 23, 256), (1 << 26, 32)])
    d.manifest.update(
        input={"shape": [1, 1, f], "mean": [0.5], "std": [0.5]}, num_classes=n,
        layers=[{"op": "flatten"}, {"op": "linear", "in_features": f, "out_features": n,
                "bias": False, "k": 2, "reference": "onedraw", "tensors": {"indices": "1.indices"}}],
        sections=[{"name": "1.indices", "encoding": "delta", "shape": [f * n]}],
    )  # fmt: skip
    d.bodies = {"1.indices": D.Delta(b"", 0, 0, 0)}
    return "valid"


def m_delta_params(d: _Draft) -> str | None:
    """A valid delta section with one parameter moved by one."""
    deltas = [n for n, b in d.bodies.items() if isinstance(b, D.Delta) and b.changes]
    if not deltas:
        return "skip"
    name = _pick(d.rng, deltas)
    body = d.bodies[name]
    which = _pick(d.rng, ["changes", "gap_param", "rank_param", "gap_code", "crossing"])
    step = _pick(d.rng, [-1, 1])
    values = {"changes": body.changes, "gap_param": body.gap_param, "rank_param": body.rank_param}
    code, crossing = body.gap_code, body.crossing
    if which == "gap_code":  # the other code reads the same streams differently
        code = "rice" if code == "expgolomb" else "expgolomb"
    elif which == "crossing":  # the other rank order, or another margin: other valid indices
        crossing = 0 if crossing is None else _pick(d.rng, [None, max(0, crossing + step)])
    else:
        values[which] = max(0, values[which] + step)
    d.bodies[name] = D.Delta(body.data, **values, gap_code=code, crossing=crossing)
    return None


def m_bits_random(d: _Draft) -> str | None:
    bits = [s for s in _index_sections(d) if s["encoding"] == "bits"]
    if not bits:
        return "skip"
    s = _pick(d.rng, bits)
    d.bodies[s["name"]] = d.rng.bytes(len(d.bodies[s["name"]]))
    return None


def _section_body(d: _Draft, s: dict) -> bytes:
    return d.payload[s["offset"] : s["offset"] + s["length"]]


def _put_body(d: _Draft, s: dict, body: bytes) -> None:
    d.payload = d.payload[: s["offset"]] + body + d.payload[s["offset"] + s["length"] :]
    s["crc32"] = crc(body)


def p_index_out_of_range(d: _Draft) -> str | None:
    """A bits section holding an index >= K, CRC correct (issue 15 item 4)."""
    sections = [
        s for s in _index_sections(d)
        if s["encoding"] == "bits" and _k_of(d, s["name"]) < 1 << B.bits_for(_k_of(d, s["name"]))
    ]  # fmt: skip
    if not sections:
        return "skip"
    s = _pick(d.rng, sections)
    k = _k_of(d, s["name"])
    width = B.bits_for(k)
    index = B.unpack(_section_body(d, s), s["shape"][0], width)
    spots = d.rng.random(index.size) < _pick(d.rng, [0.0, 0.1, 1.0])
    spots[int(d.rng.integers(index.size))] = True
    index[spots] = d.rng.integers(k, 1 << width, int(spots.sum()))
    _put_body(d, s, B.pack(index, width))
    return "invalid"


def p_bits_padding(d: _Draft) -> str | None:
    sections = [
        s for s in _index_sections(d)
        if s["encoding"] == "bits" and (s["shape"][0] * B.bits_for(_k_of(d, s["name"]))) % 8
    ]  # fmt: skip
    if not sections:
        return "skip"
    s = _pick(d.rng, sections)
    body = bytearray(_section_body(d, s))
    body[-1] |= 1
    _put_body(d, s, bytes(body))
    return "invalid"


def p_gap_padding(d: _Draft) -> str | None:
    ends = [s["offset"] + s["length"] for s in d.manifest["sections"]]
    gaps = [e for e in ends if e % 8 and e < len(d.payload)]
    if not gaps:
        return "skip"
    at = _pick(d.rng, gaps)
    d.payload = d.payload[:at] + b"\x01" + d.payload[at + 1 :]
    return "invalid"


def m_section_entry(d: _Draft) -> str | None:
    """A section's offset, length or CRC off by a little."""
    if not d.manifest["sections"]:
        return "skip"
    s = _pick(d.rng, d.manifest["sections"])
    key = _pick(d.rng, ["offset", "length", "crc32"])
    s[key] = s[key] ^ 1 if key == "crc32" else s[key] + _pick(d.rng, [-1, 1, 8, 1 << 40])
    return "invalid"


def m_version_fields(d: _Draft) -> str | None:
    """Version 1 fields in a version 2 manifest and back, or a delta section in version 1."""
    if d.version == 2:
        d.manifest["k"], d.manifest["index_bits"] = 2, 1
        return "invalid"
    weighted = [e for e in d.manifest["layers"] if "tensors" in e and "indices" in e["tensors"]]
    if weighted and d.rng.random() < 0.5:
        _pick(d.rng, weighted).update(k=d.manifest["k"], reference="argmax")
        return "invalid"
    if not d.manifest["sections"]:
        return "skip"
    _pick(d.rng, d.manifest["sections"])["encoding"] = "delta"
    return "invalid"


def m_seed_and_strings(d: _Draft) -> str | None:
    """A string field (seed, generator id, format, selection, section name, op, encoding) set
    to a value it may not hold there."""
    m, rng = d.manifest, d.rng
    target = _pick(rng, ["seed", "id", "format", "selection", "name", "op", "encoding"])
    value = _pick(rng, ["", "X", "0123456789ABCDEF", "0" * 15, "0" * 17, "relu", "bits"])
    if target in ("seed", "id"):
        node, key = m["generator"], target
    elif target in ("format", "selection"):
        node, key = m, target
    elif target == "op":
        node, key = _pick(rng, m["layers"]), "op"
    elif m["sections"]:
        node, key = _pick(rng, m["sections"]), target
        others = [o["name"] for o in m["sections"] if o is not node]
        if target == "name" and others and rng.random() < 0.5:
            value = _pick(rng, others)  # a duplicated section name
    else:
        return "skip"
    if node[key] == value:
        return "skip"
    node[key] = value
    return "invalid"  # no value of the list is valid where it is put (relu: no such fields)


def t_duplicate_key(d: _Draft) -> str | None:
    obj = _pick(d.rng, [o for o in _objects(d.manifest, metadata=True) if o])
    key = _pick(d.rng, sorted(obj))
    value = obj[key] if d.rng.random() < 0.5 else _pick(d.rng, [0, "x", None])
    obj[f"\0d{d.dups}-{key}-"] = value  # placeholder: _emit writes it as "key"
    d.dups += 1
    return "invalid"


def t_non_canonical(d: _Draft) -> str | None:
    """A spelling of the manifest other than its canonical one (§2.2)."""
    meta = d.manifest["metadata"]
    edits = {
        "space": lambda t: t.replace(":", ": ", 1),
        "newline": lambda t: t + "\n",
        "bom": lambda t: "\ufeff" + t,
        "slash": lambda t: t.replace("a/b", "a\\/b"),
        "upper": lambda t: t.replace("\\u00e9", "\\u00E9"),
        "raw": lambda t: t.replace("\\u00e9", "\u00e9"),
        "ascii": lambda t: t.replace('"zz":"A"', '"zz":"\\u0041"'),
        "float": lambda t: t.replace('"zf":0.5', '"zf":0.50'),
        "exponent": lambda t: t.replace('"ze":1e-05', '"ze":1e-5'),
        "minus0": lambda t: t.replace('"zi":0', '"zi":-0'),
        "unsorted": None,
    }
    which = _pick(d.rng, sorted(edits))
    meta.update(zs="a/b\u00e9", zz="A", zf=0.5, ze=1e-05, zi=0)
    if which == "unsorted":
        d.sort_keys = False
    else:
        d.text_edits.append(edits[which])
    return "invalid"


def b_header(d: _Draft) -> str | None:
    """A header field changed, its CRC recomputed (or the CRC itself wrong)."""
    which = _pick(d.rng, ["h_crc", "m_crc", "version", "flags", "m_len", "p_len", "magic"])

    def edit(data: bytes) -> bytes:
        magic, version, flags, m_len, m_crc, h_crc, p_len = HEADER.unpack_from(data)
        manifest, payload = data[32 : 32 + m_len], data[32 + align8(m_len) :]
        new = {
            "h_crc": {"h_crc": h_crc ^ 1},
            "m_crc": {"m_crc": m_crc ^ 0x80000000},
            "version": {"version": _pick(d.rng, [0, 3, 65535, 3 - version])},
            "flags": {"flags": _pick(d.rng, [1, 0x8000])},
            "m_len": {"m_len": _pick(d.rng, [0, 1, m_len + 1, (1 << 20) + 1, (1 << 32) - 1])},
            "p_len": {"p_len": p_len + _pick(d.rng, [-1, 1, 1 << 63]) & (1 << 64) - 1},
            "magic": {"magic": b"\x89SLOT\r\n\x00"},
        }[which]
        return header(version, manifest, payload, **new) + data[32:]

    d.byte_edits.append(edit)
    return "invalid"


def b_bytes(d: _Draft) -> str | None:
    """Truncation, trailing bytes, padding after the manifest, flipped bytes, or garbage."""
    which = _pick(d.rng, ["truncate", "trailing", "manifest_padding", "flip", "garbage", "empty"])
    rng = d.rng

    def edit(data: bytes) -> bytes:
        if which == "truncate":
            return data[: int(rng.integers(0, len(data)))]
        if which == "trailing":
            return data + bytes(int(rng.integers(1, 9)))
        if which == "manifest_padding":
            m_len = HEADER.unpack_from(data)[3]
            if m_len % 8 == 0:
                return data + b"\0"
            return data[: 32 + m_len] + b"\x20" + data[33 + m_len :]
        if which == "flip":
            out = bytearray(data)
            for at in rng.choice(
                len(data), size=min(len(data), int(rng.integers(1, 5))), replace=False
            ):
                out[at] ^= int(rng.integers(1, 256))
            return bytes(out)
        if which == "garbage":
            return (F.MAGIC if rng.random() < 0.5 else b"") + rng.bytes(int(rng.integers(0, 200)))
        return b""

    d.byte_edits.append(edit)
    return "invalid"


BODY = [
    m_delta_random,
    m_declare_much,
    m_delta_params,
    m_bits_random,
    m_section_order,
    m_float_values,
    m_recode,
]
PAYLOAD = [p_index_out_of_range, p_bits_padding, p_gap_padding]
MANIFEST = [
    m_wrong_type, m_extreme_number, m_shape_limit, m_k_value, m_missing_key, m_unknown_key,
    m_reference_rule, m_geometry_bomb, m_chain_break, m_swap_layers, m_pool_op, m_metadata,
    m_section_entry, m_version_fields, m_seed_and_strings,
]  # fmt: skip
TEXT = [t_duplicate_key, t_non_canonical]
BYTES = [b_header, b_bytes]
PHASES = [BODY, PAYLOAD, MANIFEST, TEXT, BYTES]
DRAWS = {  # how many tickets each mutation has in the draw; the others of MANIFEST have 3
    m_delta_random: 10, m_declare_much: 1, m_delta_params: 3, m_bits_random: 3, m_section_order: 2,
    m_float_values: 2, m_recode: 2, p_index_out_of_range: 6, p_bits_padding: 2,
    p_gap_padding: 2, t_duplicate_key: 6, t_non_canonical: 6, b_header: 5, b_bytes: 5,
}  # fmt: skip
SAFE = [m_section_order, m_float_values, m_recode, m_pool_op, m_metadata_valid]  # valid -> valid
PHASE = {f: i for i, funcs in enumerate(PHASES) for f in funcs} | {m_metadata_valid: 2}


def parse_name(name: str) -> tuple[int, int]:
    seed, index = name.split(":")
    return int(seed), int(index)


def generate(seed: int, index: int) -> Case:
    """File ``index`` of the run with ``seed``: always the same bytes."""
    rng = np.random.default_rng([seed, index])
    d = _base(rng)
    kind = _pick(rng, [k for k, w in KINDS.items() for _ in range(int(20 * w))])
    if kind == "valid":
        chosen = [_pick(rng, SAFE) for _ in range(int(rng.integers(0, 3)) * (rng.random() < 0.5))]
    else:
        pool = [f for funcs in PHASES for f in funcs for _ in range(DRAWS.get(f, 3))]
        chosen = [_pick(rng, pool) for _ in range(1 if kind == "near" else int(rng.integers(2, 6)))]
    chosen.sort(key=PHASE.__getitem__)  # stable: the draw order within a phase
    names, early, late = [], [], []
    assembled = False
    for f in chosen:
        if not assembled and PHASE[f] >= 1:
            _assemble(d)
            assembled = True
        try:
            with np.errstate(all="ignore"):
                verdict = f(d)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            verdict = None  # an earlier mutation took away what this one edits: it may be half done
        if verdict == "skip":
            continue
        names.append(f.__name__)
        (early if PHASE[f] <= 2 else late).append(verdict)
    if not assembled:
        _assemble(d)
    if "invalid" in late:
        expect = "invalid"
    elif all(v == "valid" for v in early):
        expect = "valid"
    else:
        expect = early[0] if len(early) == 1 else None
    untouched = all(PHASE[f] == 2 or f in SAFE for f in chosen) and not late
    touched = {"m_reference_rule", "m_k_value", "m_chain_break", "m_swap_layers", "m_declare_much"}
    keep = untouched and expect == "valid" and not touched & set(names)
    return Case(f"{seed}:{index}", _emit(d), kind, d.version, names, expect,
                d.indices if keep else None)  # fmt: skip

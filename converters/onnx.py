"""ONNX graphs from a ``.slot`` file, built with ``onnx.helper`` only (no torch).

Two forms:
- dense: every weight is a float32 initializer (what ``slotpack.runtime.rebuild`` returns);
- self-decoding: the graph holds the seed (as layer keys), the packed index bytes and the dense
  non-random tensors, and a subgraph of standard operators (Range, Mul/Add/BitShift/BitwiseAnd/
  BitwiseXor on uint64, Gather, Cast, Reshape) regenerates each selected weight with the
  generator of docs/FORMAT.md §1. Its inputs are all initializers, so onnxruntime folds it into
  constants when the session is created, and inference runs the same float32 weights, bit for bit.

The input is the normalised image batch ``[N, C, H, W]`` float32 (``(pixel/255 - mean) / std``,
mean and std in the metadata props); the output is ``logits [N, num_classes]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slotpack import __version__, prng
from slotpack import arch as A
from slotpack import bits as B
from slotpack import format as F
from slotpack.errors import ConfigError, OutOfMemoryError, OutputExistsError, size_text

OPSET = 18  # BitwiseAnd/BitwiseXor need 18; onnxruntime >= 1.21 runs all of it
IR_VERSION = 8  # the IR version that opset 18 was released with
INPUT, OUTPUT = "input", "logits"


class ExternalData:
    """Where a graph's large initializers go instead of the protobuf: ``file``, open for writing,
    named ``location`` relative to the model's folder (ONNX's external data convention)."""

    MIN_BYTES = 1024  # onnx's convert_model_to_external_data default: smaller ones stay inline
    ALIGN = 4096  # page-aligned offsets, so a runtime may map the tensors

    def __init__(self, file: BinaryIO, location: str) -> None:
        self.file, self.location = file, location

    def add(self, tensor: onnx.TensorProto, name: str, array: np.ndarray) -> None:
        """Append ``array`` to the file and make ``tensor`` refer to it."""
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        offset = -(-self.file.tell() // self.ALIGN) * self.ALIGN
        self.file.write(bytes(offset - self.file.tell()))
        self.file.write(memoryview(array).cast("B"))
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        where = {"location": self.location, "offset": offset, "length": array.nbytes}
        for key, value in where.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)


class _Graph:
    """Accumulates nodes and initializers with short unique names.

    Initializers go straight into the model being built (or, with ``external``, into its
    external data file), so a large graph is never copied whole on the way to the file.
    """

    def __init__(self, external: ExternalData | None = None, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.model = onnx.ModelProto()
        self.external = external
        self.prefix = prefix  # keeps names apart from those of a graph the nodes join
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}{self._count}"

    def const(
        self, value: np.ndarray | int | float, dtype: np.dtype | type, hint: str = "c"
    ) -> str:
        name = self.name(hint)
        array = np.asarray(value, dtype=dtype)
        if self.external is not None and array.nbytes >= ExternalData.MIN_BYTES:
            self.external.add(self.model.graph.initializer.add(), name, array)
        else:
            self.model.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "t", **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _u64(value: int) -> np.ndarray:
    return np.asarray(value & prng.MASK64, dtype=np.uint64)


def _fields(g: _Graph, packed: np.ndarray, groups: int, b: int) -> str:
    """The stored indices as uint64 [groups, 8]: 8 fields of b <= 8 bits fill exactly b bytes."""
    data = g.const(packed.reshape(groups, b), np.uint8, "bytes")
    word = None
    for j in range(b):  # the b bytes of a group, big-endian, as one uint64 (cheap: groups long)
        col = g.op(
            "Slice",
            [data, g.const([j], np.int64), g.const([j + 1], np.int64), g.const([1], np.int64)],
        )
        part = g.op(
            "BitShift",
            [g.op("Cast", [col], to=TensorProto.UINT64), g.const(8 * (b - 1 - j), np.uint64)],
            direction="LEFT",
        )
        word = part if word is None else g.op("BitwiseOr", [word, part])
    shifts = g.const([b * (7 - p) for p in range(8)], np.uint64)
    return g.op(
        "BitwiseAnd",
        [g.op("BitShift", [word, shifts], direction="RIGHT"), g.const((1 << b) - 1, np.uint64)],
    )


def _decode_weight(g: _Graph, slot: F.SlotFile, number: int, layer, name: str) -> str:
    """Nodes that regenerate the dense weight of weighted layer ``number`` from its packed bytes.

    Connections are laid out as [groups, 8] (connection i = 8 * group + position), so the index
    fields come out of one shift and one mask, and the generator's counter term for (group,
    position) is a broadcast sum of a groups-long and an 8-long vector. Every full-size step is
    one elementwise operator: onnxruntime's constant folding, which runs once per session, costs
    roughly the number of full-size operators times the number of connections.
    """
    n = int(np.prod(layer.weight_shape))
    k = slot.weights_of(name).k
    b = B.bits_for(k)
    if b > 8:
        raise ConfigError(f"--self-decoding supports K <= 256 (8-bit indices); this file has K={k}")
    groups = -(-n // 8)
    # A delta-coded section is expanded to fixed-width fields: the graph needs random access.
    packed = np.frombuffer(slot.packed_indices(name), dtype=np.uint8)
    packed = np.concatenate([packed, np.zeros(groups * b - packed.size, np.uint8)])
    s = _fields(g, packed, groups, b)
    # §1: z0 = key + (i*K + s + 1) * GAMMA with i = 8*group + position, all mod 2**64.
    key = prng.layer_key(slot.seed, number)
    rows = g.op(
        "Cast",
        [g.op("Range", [g.const(0, np.int64), g.const(groups, np.int64), g.const(1, np.int64)])],
        to=TensorProto.UINT64,
    )
    rows = g.op(
        "Add",
        [
            g.op("Mul", [rows, g.const(_u64(8 * k * prng.GAMMA), np.uint64)]),
            g.const(_u64(key + prng.GAMMA), np.uint64),
        ],
    )
    rows = g.op("Unsqueeze", [rows, g.const([1], np.int64)])
    cols = g.const([(p * k * prng.GAMMA) & prng.MASK64 for p in range(8)], np.uint64)
    z = g.op(
        "Add", [g.op("Add", [rows, cols]), g.op("Mul", [s, g.const(_u64(prng.GAMMA), np.uint64)])]
    )
    for shift_bits, mult in ((30, prng.MIX1), (27, prng.MIX2), (31, None)):
        z = g.op(
            "BitwiseXor",
            [z, g.op("BitShift", [z, g.const(shift_bits, np.uint64)], direction="RIGHT")],
        )
        if mult is not None:
            z = g.op("Mul", [z, g.const(_u64(mult), np.uint64)])
    top = g.op(
        "Cast",
        [g.op("BitShift", [z, g.const(40, np.uint64)], direction="RIGHT")],
        to=TensorProto.FLOAT,
    )
    # (u - 2^23) is exact in float32, and bound * 2^-23 is an exact float32, so one rounded
    # multiply gives the bits of §1.3.
    scale = np.float32(prng.glorot_bound(*layer.fans)) * np.float32(2.0**-23)
    values = g.op(
        "Mul", [g.op("Sub", [top, g.const(float(1 << 23), np.float32)]), g.const(scale, np.float32)]
    )
    if groups * 8 != n:
        values = g.op(
            "Slice",
            [
                g.op("Reshape", [values, g.const([-1], np.int64)]),
                g.const([0], np.int64),
                g.const([n], np.int64),
            ],
        )
    return g.op("Reshape", [values, g.const(list(layer.weight_shape), np.int64)], hint="w")


def _layer_nodes(
    g: _Graph, x: str, layer: A.Layer, tensor: Callable[[str], str], weight: str | None
) -> str:
    match layer:
        case A.Linear():
            inputs = [x, weight] + ([tensor("bias")] if layer.bias else [])
            return g.op("Gemm", inputs, transB=1)
        case A.Conv2d():
            k, p, s, d = layer.kernel_size, layer.padding, layer.stride, layer.dilation
            inputs = [x, weight] + ([tensor("bias")] if layer.bias else [])
            return g.op(
                "Conv",
                inputs,
                kernel_shape=[k, k],
                pads=[p, p, p, p],
                strides=[s, s],
                dilations=[d, d],
                group=layer.groups,
            )
        case A.BatchNorm2d():
            c = layer.num_features
            scale, shift = g.const(np.ones(c), np.float32), g.const(np.zeros(c), np.float32)
            return g.op(
                "BatchNormalization",
                [x, scale, shift, tensor("running_mean"), tensor("running_var")],
                epsilon=layer.eps,
            )
        case A.ReLU():
            return g.op("Relu", [x])
        case A.MaxPool2d():
            return g.op(
                "MaxPool", [x], kernel_shape=[layer.kernel_size] * 2, strides=[layer.stride] * 2
            )
        case A.AvgPool2d():
            return g.op(
                "AveragePool", [x], kernel_shape=[layer.kernel_size] * 2, strides=[layer.stride] * 2
            )
        case A.Flatten():
            return g.op("Flatten", [x], axis=1)
        case A.Dropout():
            return x  # the identity at inference
    raise ConfigError(f"cannot export layer op {layer.op!r} to ONNX")


def _model(
    g: _Graph, x: str, input_shape: tuple[int, ...], num_classes: int, props: dict[str, str]
) -> onnx.ModelProto:
    g.nodes.append(helper.make_node("Identity", [x], [OUTPUT]))
    # What helper.make_graph and make_model build, filled in place: they would copy every
    # initializer twice.
    model, graph = g.model, g.model.graph
    graph.name = "slotpack"
    graph.node.extend(g.nodes)
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *input_shape]))
    graph.output.append(
        helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", num_classes])
    )
    model.opset_import.append(helper.make_opsetid("", OPSET))
    model.producer_name, model.producer_version = "slotpack", __version__
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"slotpack_version": __version__, **props})
    return model


def _props(mean, std, metadata: dict) -> dict[str, str]:
    return {
        "input_mean": json.dumps(list(mean)),
        "input_std": json.dumps(list(std)),
        "metadata": json.dumps(metadata, sort_keys=True, separators=(",", ":")),
    }


def export(
    slot: F.SlotFile,
    *,
    self_decoding: bool = False,
    source: bytes | None = None,
    external: ExternalData | None = None,
) -> onnx.ModelProto:
    """The ONNX model of a decoded ``.slot`` file; ``source`` (the file bytes) is hashed into the metadata.

    With ``external``, tensors of 1 KiB or more are written to its file as they are made (one
    layer's in memory at a time) and the model only refers to them.
    """
    from slotpack.runtime.rebuild import weight

    slot.require_architecture("an ONNX export")
    g = _Graph(external)
    x = INPUT
    number = 0
    for pos, (layer, roles) in enumerate(zip(slot.layers, slot.tensors, strict=True)):

        def tensor(role: str, pos=pos, roles=roles) -> str:
            return g.const(slot.tensor(roles[role]), np.float32, f"l{pos}{role[:1]}")

        with _building(f"layer {pos} ({_describe(layer)}) of the ONNX graph"):
            w = None
            if isinstance(layer, A.WEIGHTED):
                if self_decoding:
                    w = _decode_weight(g, slot, number, layer, roles["indices"])
                else:
                    w = g.const(weight(slot, pos), np.float32, f"l{pos}w")
                number += 1
            x = _layer_nodes(g, x, layer, tensor, w)
    m = slot.manifest
    props = {
        "generator": m["generator"]["id"],
        "seed": m["generator"]["seed"],
        "k": str(slot.k) if slot.k is not None else ",".join(map(str, slot.ks)),
        "self_decoding": str(self_decoding).lower(),
        "source_sha256": hashlib.sha256(source).hexdigest() if source is not None else "",
        **_props(m["input"]["mean"], m["input"]["std"], m["metadata"]),
    }
    return _model(g, x, slot.input_shape, m["num_classes"], props)


@contextmanager
def _building(what: str) -> Iterator[None]:
    """A MemoryError inside becomes one OutOfMemoryError naming ``what`` was being built."""
    try:
        yield
    except MemoryError:
        raise OutOfMemoryError(f"out of memory building {what}") from None


def _describe(layer: A.Layer) -> str:
    if not isinstance(layer, A.WEIGHTED):
        return layer.op
    n = math.prod(layer.weight_shape)
    return f"{layer.op}, {n:,} weights, {size_text(4 * n)} as float32"


def export_arrays(
    layers: tuple[A.Layer, ...],
    arrays: dict[str, np.ndarray],
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean,
    std,
    metadata: dict | None = None,
) -> onnx.ModelProto:
    """A dense graph from a layer list and state-dict-style arrays (``"1.weight"``, ``"4.running_var"``):
    how a float32 (learned) model, which has no ``.slot`` file, is exported."""
    g = _Graph()
    x = INPUT
    for pos, layer in enumerate(layers):

        def tensor(role: str, pos=pos) -> str:
            return g.const(arrays[f"{pos}.{role}"], np.float32, f"l{pos}{role[:1]}")

        w = tensor("weight") if isinstance(layer, A.WEIGHTED) else None
        x = _layer_nodes(g, x, layer, tensor, w)
    return _model(g, x, input_shape, num_classes, _props(mean, std, metadata or {}))


# protobuf cannot serialize a message of 2 GiB or more; 64 MiB is left for nodes and metadata
# (a manifest holds at most 1 MiB of them).
MAX_INLINE_BYTES = (1 << 31) - (1 << 26)


def initializer_bytes(slot: F.SlotFile, *, self_decoding: bool = False) -> int:
    """Bytes of the tensors an export of ``slot`` holds: float32 weights (or packed indices),
    biases and BatchNorm statistics, each float32. Computed from the manifest; nothing is built."""
    total = 0
    for layer, roles in zip(slot.layers, slot.tensors, strict=True):
        if isinstance(layer, A.BatchNorm2d):
            total += 8 * layer.num_features  # the constant scale and shift
        for role, name in roles.items():
            section = slot.sections[name]
            packed = role == "indices" and self_decoding
            total += section.length + 8 if packed else 4 * section.count
    return total


def data_path(output: Path | str) -> Path:
    """Where the external data of an exported ``output`` goes: ``model.onnx.data`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".data")


def export_file(
    source: Path | str,
    output: Path | str,
    *,
    self_decoding: bool = False,
    force: bool = False,
    max_inline_bytes: int | None = None,
) -> tuple[int, int]:
    """Export a ``.slot`` file to ``output`` (checked with onnx's full checker); (onnx, slot) bytes.

    Tensors are streamed to a data file one layer at a time and the graph is checked by path, so
    memory holds one layer, never the model. When they exceed ``max_inline_bytes`` (default
    MAX_INLINE_BYTES: protobuf's 2 GiB limit, less room for the graph) the data file stays as
    :func:`data_path` (ONNX external data) and the size returned counts both files; otherwise they are copied into ``output``,
    which gets the bytes ``export(...).SerializeToString()`` would give. Both files are written
    atomically, the data file first; neither replaces an existing file without ``force``.
    """
    from slotpack.atomic import replacing

    output = Path(output)
    if output.exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to overwrite it")
    slot = F.read(source)
    limit = MAX_INLINE_BYTES if max_inline_bytes is None else max_inline_bytes
    external = initializer_bytes(slot, self_decoding=self_decoding) > limit
    data = data_path(output)
    if external and data.exists() and not force:
        raise OutputExistsError(f"{data} exists; pass --force to overwrite it")
    with replacing(output, force=force) as tmp, _data_file(data, external, force) as tmp_data:
        with open(tmp_data, "wb") as f:
            sink = ExternalData(f, tmp_data.name)
            model = export(
                slot, self_decoding=self_decoding, source=slot.payload.obj, external=sink
            )
        # The checker reads external data next to the model: check the temporary pair.
        tmp.write_bytes(model.SerializeToString())
        onnx.checker.check_model(str(tmp), full_check=True)
        if external:
            _relocate(model, data.name)
            tmp.write_bytes(model.SerializeToString())
        else:
            with open(tmp, "wb") as out, open(tmp_data, "rb") as tensors:
                _write_inline(model, tensors, out)
    size = output.stat().st_size + (data.stat().st_size if external else 0)
    return size, slot.size


@contextmanager
def _data_file(data: Path, keep: bool, force: bool) -> Iterator[Path]:
    """A temporary data file beside ``data``: it becomes ``data`` if ``keep``, else is removed."""
    from slotpack.atomic import replacing

    if keep:
        with replacing(data, force=force) as tmp:
            yield tmp
        return
    fd, name = tempfile.mkstemp(prefix=f".{data.name}.", suffix=".tmp", dir=data.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _relocate(model: onnx.ModelProto, location: str) -> None:
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location


# ------------------------------------------------------------------ streaming serialization
# protobuf writes a message's fields in field-number order, each length-delimited field as
# tag, length, bytes. So a model whose initializers are external data can be written with them
# inline, byte for byte as SerializeToString() would, copying each tensor from the data file.

_CHUNK = 1 << 24


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(number: int, length: int) -> bytes:
    """Tag and length of length-delimited field ``number``."""
    return _varint(number << 3 | 2) + _varint(length)


def _split(message, number: int) -> tuple[bytes, bytes]:
    """The serialized fields of ``message`` numbered below ``number``, and those above it."""
    parts = []
    for keep in (lambda n: n < number, lambda n: n > number):
        part = type(message)()
        part.CopyFrom(message)
        for field, _ in message.ListFields():
            if not keep(field.number):
                part.ClearField(field.name)
        parts.append(part.SerializeToString())
    return parts[0], parts[1]


def _tensor_parts(tensor: onnx.TensorProto) -> tuple[bytes, int, int]:
    """(serialized fields before raw_data, data offset, data length) of an external tensor;
    an inline one is (its bytes, 0, 0)."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return tensor.SerializeToString(), 0, 0
    where = {e.key: e.value for e in tensor.external_data}
    head = TensorProto()
    head.CopyFrom(tensor)
    head.ClearField("external_data")
    head.ClearField("data_location")
    # dims, data_type and name come before raw_data (9); nothing this module sets comes after.
    return head.SerializeToString(), int(where["offset"]), int(where["length"])


def _write_inline(model: onnx.ModelProto, tensors: BinaryIO, out: BinaryIO) -> None:
    """Write ``model`` with its external initializers inline, reading them from ``tensors``."""
    inits = [_tensor_parts(t) for t in model.graph.initializer]
    sizes = [len(h) + (len(_key(9, n)) + n if n else 0) for h, _, n in inits]
    graph_head, graph_tail = _split(model.graph, 5)
    graph_size = len(graph_head) + sum(len(_key(5, s)) + s for s in sizes) + len(graph_tail)
    model_head, model_tail = _split(model, 7)
    out.write(model_head + _key(7, graph_size) + graph_head)
    for (head, offset, length), size in zip(inits, sizes, strict=True):
        out.write(_key(5, size) + head)
        if length:
            out.write(_key(9, length))
            tensors.seek(offset)
            for start in range(0, length, _CHUNK):
                chunk = tensors.read(min(_CHUNK, length - start))
                if not chunk:
                    raise OSError(f"{tensors.name} ended before its tensors")
                out.write(chunk)
    out.write(graph_tail + model_tail)

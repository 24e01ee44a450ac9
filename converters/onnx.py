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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slotpack import __version__, prng
from slotpack import arch as A
from slotpack import bits as B
from slotpack import format as F
from slotpack.errors import ConfigError, OutputExistsError

OPSET = 18  # BitwiseAnd/BitwiseXor need 18; onnxruntime >= 1.21 runs all of it
IR_VERSION = 8  # the IR version that opset 18 was released with
INPUT, OUTPUT = "input", "logits"


class _Graph:
    """Accumulates nodes and initializers with short unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}{self._count}"

    def const(
        self, value: np.ndarray | int | float, dtype: np.dtype | type, hint: str = "c"
    ) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
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
    graph = helper.make_graph(
        g.nodes,
        "slotpack",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", num_classes])],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="slotpack",
        producer_version=__version__,
    )
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
    slot: F.SlotFile, *, self_decoding: bool = False, source: bytes | None = None
) -> onnx.ModelProto:
    """The ONNX model of a decoded ``.slot`` file; ``source`` (the file bytes) is hashed into the metadata."""
    from slotpack.runtime.rebuild import weight

    g = _Graph()
    x = INPUT
    number = 0
    for pos, (layer, roles) in enumerate(zip(slot.layers, slot.tensors, strict=True)):

        def tensor(role: str, pos=pos, roles=roles) -> str:
            return g.const(slot.tensor(roles[role]), np.float32, f"l{pos}{role[:1]}")

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


def export_file(
    source: Path | str, output: Path | str, *, self_decoding: bool = False, force: bool = False
) -> tuple[int, int]:
    """Export a ``.slot`` file to ``output`` (checked with onnx's full checker); (onnx, slot) bytes."""
    from slotpack.atomic import write_bytes

    output = Path(output)
    if output.exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to overwrite it")
    slot = F.read(source)
    model = export(slot, self_decoding=self_decoding, source=slot.payload.obj)
    onnx.checker.check_model(model, full_check=True)
    blob = model.SerializeToString()
    write_bytes(output, blob, force=force)
    return len(blob), slot.size

"""onnxruntime sessions for ``.slot`` and ``.onnx`` files, and evaluation with latency percentiles.

No torch: a ``.slot`` file is rebuilt with numpy and exported to a dense graph in memory (no
temporary files); a self-decoding ``.onnx`` file decodes itself while the session is created.

An ``.onnx`` file may come from anywhere, so nothing about it is assumed: it is loaded by path
(external data resolves next to it, and a location that leaves its folder is refused), and
:func:`interface` checks what it takes and gives before any data is fed to it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from slotpack.errors import OutOfMemoryError, SlotpackError, size_text


class ModelFileError(SlotpackError):
    """A model file cannot be loaded or used (corrupt, not ONNX/.slot, or not an image classifier)."""


class InputError(SlotpackError):
    """An input array has the wrong shape or dtype for the model."""


@dataclass(frozen=True)
class OrtEvaluation:
    accuracy: float
    count: int
    batch_size: int
    images_per_second: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float


@dataclass(frozen=True)
class Signature:
    """What a model takes and gives: one float32 image input ``[N, C, H, W]`` and logits
    ``[N, classes]`` as its first output. Dimensions a model leaves symbolic are ``None``."""

    input: str
    output: str
    batch: int | None  # a fixed batch size, or None when the model takes any
    image: tuple[int | None, int | None, int | None]  # C, H, W

    def fits(self, image: tuple[int, ...]) -> bool:
        """Whether images of shape ``image`` (C, H, W) match every dimension the model fixes."""
        return all(want in (None, got) for want, got in zip(self.image, image, strict=True))

    def shape_text(self) -> str:
        return f"[N, {', '.join('?' if d is None else str(d) for d in self.image)}]"


# ----------------------------------------------------------------------------- loading


def _slot_model(path: Path, self_decoding: bool) -> bytes:
    from slotpack import format as F
    from slotpack.converters.onnx import MAX_INLINE_BYTES, export, initializer_bytes

    data = F.read(path).payload.obj  # the whole file's bytes, already in memory
    slot = F.decode(data)
    size = initializer_bytes(slot, self_decoding=self_decoding)
    if size > MAX_INLINE_BYTES:
        raise ModelFileError(
            f"{path}: its {size_text(size)} of tensors do not fit in one in-memory ONNX model "
            f"(protobuf's 2 GiB limit); `slotpack export` it (the weights go to external data) "
            f"and use the .onnx file"
        )
    return export(slot, self_decoding=self_decoding, source=bytes(data)).SerializeToString()


def _tensors(graph) -> Iterator:
    """Every TensorProto of a graph and its subgraphs (initializers and attribute values)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node) -> Iterator:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for sub in attr.graphs:
            yield from _tensors(sub)


def external_locations(model) -> list[str]:
    """The external data locations (file names) an ONNX ModelProto refers to, in order."""
    from onnx import TensorProto

    tensors = list(_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors += _attribute_tensors(node)
    out = []
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL:
            where = {e.key: e.value for e in tensor.external_data}
            out.append(where.get("location", ""))
    return out


def _check_external_data(model, folder: Path | None, name: str) -> None:
    """ModelFileError unless every external data location is a file inside ``folder``."""
    for location in external_locations(model):
        if folder is None:
            raise ModelFileError(
                f"{name} refers to external data ({location!r}) but was given as bytes; "
                f"load it from its file"
            )
        parts = PurePosixPath(location.replace("\\", "/")).parts
        if (
            not location
            or "\0" in location
            or PurePosixPath(location).is_absolute()
            or PureWindowsPath(location).is_absolute()
            or PureWindowsPath(location).drive
            or ".." in parts
        ):
            raise ModelFileError(
                f"{name}: external data location {location!r} must be a relative path inside "
                f"the model's folder"
            )
        resolved = Path(os.path.realpath(folder / location))
        if not resolved.is_relative_to(Path(os.path.realpath(folder))):
            raise ModelFileError(
                f"{name}: external data {location!r} leads outside the model's folder "
                f"(to {resolved})"
            )


def _onnx_source(path: Path) -> str:
    """``path`` as onnxruntime should load it, after refusing what it must not read."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        if not path.is_file():  # a FIFO or a device would hang or never end
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise ModelFileError(f"cannot read {path}: it {what}")
        # always binary: onnx would guess a text format from some suffixes, onnxruntime never does
        model = onnx.load_model(path, format="protobuf", load_external_data=False)
    except MemoryError:
        raise OutOfMemoryError(f"out of memory reading {path}") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (DecodeError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"cannot load {path}: not an ONNX model ({first[:200]})") from None
    _check_external_data(model, path.parent, str(path))
    return str(path)


def _bytes_source(data: bytes) -> bytes:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.ModelProto.FromString(data)
    except DecodeError as exc:
        raise ModelFileError(
            f"cannot load model bytes: not an ONNX model ({_first(exc)})"
        ) from None
    _check_external_data(model, None, "model bytes")
    return data


def session(source: Path | str | bytes, *, self_decoding: bool = False, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for a ``.slot`` file, an ``.onnx`` file or ONNX bytes.

    An ``.onnx`` file is loaded by path: its external data must lie in its own folder.
    """
    import onnxruntime as ort

    if isinstance(source, bytes):
        model, name = _bytes_source(source), "model bytes"
    elif Path(source).suffix == ".slot":
        model, name = _slot_model(Path(source), self_decoding), str(source)
    else:
        model, name = _onnx_source(Path(source)), str(source)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: its errors come back as exceptions (one line)
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise OutOfMemoryError(f"out of memory loading {name} into onnxruntime") from None
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise ModelFileError(f"onnxruntime cannot load {name}: {_first(exc)}") from None


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# ----------------------------------------------------------------------------- interface


def signature(sess) -> Signature:
    """The model's input and output, checked: ModelFileError (one line) unless it takes one
    float32 ``[N, C, H, W]`` input and gives ``[N, classes]`` logits as its first output."""
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise ModelFileError(
            f"model has {len(inputs)} inputs ({names}); slotpack feeds one image input [N, C, H, W]"
        )
    (spec,) = inputs
    if spec.type != "tensor(float)":
        raise ModelFileError(
            f"model input {spec.name!r} is {spec.type}; slotpack feeds tensor(float) [N, C, H, W]"
        )
    dims = [_dim(d) for d in spec.shape]
    if len(dims) != 4 or any(d == 0 for d in dims):
        raise ModelFileError(
            f"model input {spec.name!r} has shape {_shape_text(spec.shape)}; slotpack feeds "
            f"images [N, C, H, W]"
        )
    if not outputs:
        raise ModelFileError("model has no outputs")
    out = outputs[0]
    if out.type not in ("tensor(float)", "tensor(double)", "tensor(float16)"):
        raise ModelFileError(
            f"model output {out.name!r} is {out.type}; slotpack needs float logits [N, classes]"
        )
    if len(out.shape) not in (0, 2):  # no shape at all is allowed: checked when it runs
        raise ModelFileError(
            f"model output {out.name!r} has shape {_shape_text(out.shape)}; slotpack needs "
            f"logits [N, classes]"
        )
    return Signature(spec.name, out.name, dims[0], (dims[1], dims[2], dims[3]))


def _dim(d) -> int | None:
    return d if isinstance(d, int) and d >= 0 else None


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _numbers(props: dict[str, str], key: str) -> np.ndarray:
    """A metadata prop that must be a JSON list of finite numbers, as float32."""
    if key not in props:
        raise ModelFileError(
            f"model has no slotpack input normalisation metadata ({key}); export it with slotpack"
        )
    text = props[key]
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):
        values = None
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise ModelFileError(
            f"model metadata {key} must be a JSON list of numbers, one per channel; got "
            f"{text[:60]!r}"
        )
    with np.errstate(over="ignore"):
        out = np.asarray([float(v) if math.isfinite(v) else math.nan for v in values], np.float32)
    if not np.isfinite(out).all():
        raise ModelFileError(
            f"model metadata {key} must be finite float32 numbers, got {text[:60]}"
        )
    return out


def input_normalisation(sess) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel from a slotpack model's metadata props, checked: finite numbers,
    std positive, one of each per channel where the model fixes C."""
    props = sess.get_modelmeta().custom_metadata_map
    mean, std = _numbers(props, "input_mean"), _numbers(props, "input_std")
    if (std <= 0).any():
        raise ModelFileError(
            f"model metadata input_std must be positive, got {props['input_std'][:60]}"
        )
    if mean.size != std.size:
        raise ModelFileError(
            f"model metadata has {mean.size} input_mean and {std.size} input_std values"
        )
    inputs = sess.get_inputs()
    channels = _dim(inputs[0].shape[1]) if len(inputs) == 1 and len(inputs[0].shape) == 4 else None
    if channels is not None and mean.size != channels:
        raise ModelFileError(
            f"model metadata has {mean.size} input_mean values for {channels} input channels"
        )
    return mean, std


def recorded_dataset(sess) -> str | None:
    """The data set a slotpack model records in its ``metadata`` prop, or None."""
    text = sess.get_modelmeta().custom_metadata_map.get("metadata")
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ModelFileError(
            f"model metadata prop 'metadata' is not JSON ({text[:40]!r}); pass --dataset"
        ) from None
    if not isinstance(doc, dict):
        raise ModelFileError(
            f"model metadata prop 'metadata' is not a JSON object ({text[:40]!r}); pass --dataset"
        )
    dataset = doc.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise ModelFileError(
            f"model metadata names data set {dataset!r}, not a name; pass --dataset"
        )
    return dataset


# ----------------------------------------------------------------------------- running


def normalize(x_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 (x/255 - mean)/std per channel, the same float32 operations as training."""
    x = x_uint8.astype(np.float32) / np.float32(255.0)
    return (x - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)


def check_input(sess, x: np.ndarray) -> None:
    """InputError unless ``x`` is float32 ``[N, C, H, W]`` with the model's fixed C, H, W."""
    _check_input(signature(sess), x)


def _check_input(sig: Signature, x: np.ndarray) -> None:
    shape = sig.shape_text()
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise InputError(
            f"input must be a float32 array of shape {shape}, "
            f"got {getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.ndim != 4 or not sig.fits(x.shape[1:]):
        raise InputError(f"input must have shape {shape}, got {list(x.shape)}")


def predict(sess, x: np.ndarray) -> np.ndarray:
    """Logits for a normalised float32 batch, after checking its shape and dtype.

    A model with a fixed batch size runs on slices of that size (the last one zero-padded).
    """
    sig = signature(sess)
    _check_input(sig, x)
    if sig.batch is None or len(x) == sig.batch:
        return _run(sess, sig, x)
    parts = []
    for i in range(0, len(x), sig.batch):
        part = x[i : i + sig.batch]
        pad = sig.batch - len(part)
        if pad:
            part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), np.float32)])
        parts.append(_run(sess, sig, part)[: sig.batch - pad])
    if not parts:
        raise InputError("input has no images")
    return np.concatenate(parts)


def _run(sess, sig: Signature, x: np.ndarray) -> np.ndarray:
    try:
        (logits,) = sess.run([sig.output], {sig.input: x})
    except MemoryError:
        raise OutOfMemoryError(
            f"out of memory running the model on a {list(x.shape)} batch"
        ) from None
    except Exception as exc:  # onnxruntime's own types: the model cannot run on this input
        asked = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", str(exc))
        if asked:  # its arena ran out: what a valid network's activations need, times the batch
            raise OutOfMemoryError(
                f"out of memory running the model on a {list(x.shape)} batch (onnxruntime "
                f"asked for {size_text(int(asked.group(1)))}); try a smaller --batch-size"
            ) from None
        raise ModelFileError(
            f"onnxruntime cannot run the model on a {list(x.shape)} batch: {_first(exc)}"
        ) from None
    if not isinstance(logits, np.ndarray) or logits.ndim != 2 or len(logits) != len(x):
        raise ModelFileError(
            f"model output {sig.output!r} is {list(np.shape(logits))} for a batch of {len(x)}; "
            f"slotpack needs logits [N, classes]"
        )
    return logits


def evaluate(
    sess,
    x_uint8: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> OrtEvaluation:
    """Accuracy, throughput and per-batch latency percentiles over a uint8 [N, C, H, W] set.

    The model's interface and metadata are checked first; a model with a fixed batch size runs
    batches of that size (the result's ``batch_size``).
    """
    sig = signature(sess)
    mean, std = input_normalisation(sess)
    _check_data(sig, mean, x_uint8, y)
    batch_size = sig.batch or batch_size
    correct, latencies = 0, []
    start = time.perf_counter()
    for i in range(0, len(y), batch_size):
        batch = normalize(x_uint8[i : i + batch_size], mean, std)
        t0 = time.perf_counter()
        logits = predict(sess, batch)
        latencies.append(time.perf_counter() - t0)
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
        if progress:
            progress(len(batch))
    total = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return OrtEvaluation(
        correct / len(y),
        len(y),
        batch_size,
        len(y) / total,
        *(float(np.percentile(ms, q)) for q in (50, 90, 99)),
    )


def _check_data(sig: Signature, mean: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise InputError(
            f"images must be a uint8 array [N, C, H, W], got "
            f"{getattr(x, 'dtype', type(x).__name__)} {list(np.shape(x))}"
        )
    if len(x) == 0 or len(y) != len(x):
        raise InputError(
            f"need one label per image and at least one image, got {len(x)} and {len(y)}"
        )
    if not sig.fits(x.shape[1:]) or mean.size != x.shape[1]:
        raise InputError(
            f"the model takes images {sig.shape_text()} ({mean.size} normalisation channels), "
            f"the data set's are {list(x.shape[1:])}; pass the model's --dataset"
        )

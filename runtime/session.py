"""onnxruntime sessions for ``.slot`` and ``.onnx`` files, and evaluation with latency percentiles.

No torch: a ``.slot`` file is rebuilt with numpy and exported to a dense graph in memory (no
temporary files); a self-decoding ``.onnx`` file decodes itself while the session is created.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slotpack.errors import SlotpackError


class ModelFileError(SlotpackError):
    """A model file cannot be loaded (corrupt or not an ONNX/.slot file)."""


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


def _model_bytes(source: Path | str | bytes, self_decoding: bool) -> bytes:
    if isinstance(source, bytes):
        return source
    path = Path(source)
    if path.suffix == ".slot":
        from slotpack import format as F
        from slotpack.converters.onnx import export

        data = F.read(path).payload.obj  # the whole file's bytes, already in memory
        return export(
            F.decode(data), self_decoding=self_decoding, source=bytes(data)
        ).SerializeToString()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def session(source: Path | str | bytes, *, self_decoding: bool = False, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for a ``.slot`` file, an ``.onnx`` file or ONNX bytes."""
    import onnxruntime as ort

    data = _model_bytes(source, self_decoding)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: folding notes are not the user's business
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        name = source if not isinstance(source, bytes) else "model bytes"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"onnxruntime cannot load {name}: {first[:300]}") from None


def input_normalisation(sess) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel from a slotpack model's metadata props."""
    props = sess.get_modelmeta().custom_metadata_map
    try:
        mean = np.asarray(json.loads(props["input_mean"]), dtype=np.float32)
        std = np.asarray(json.loads(props["input_std"]), dtype=np.float32)
    except (KeyError, ValueError) as exc:
        raise ModelFileError(
            f"model has no slotpack input normalisation metadata ({exc})"
        ) from None
    return mean, std


def normalize(x_uint8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 (x/255 - mean)/std per channel, the same float32 operations as training."""
    x = x_uint8.astype(np.float32) / np.float32(255.0)
    return (x - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)


def check_input(sess, x: np.ndarray) -> None:
    """InputError unless ``x`` is float32 with the model's [N, C, H, W] shape."""
    spec = sess.get_inputs()[0]
    want = spec.shape[1:]
    shape = f"[N, {', '.join(map(str, want))}]"
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise InputError(
            f"input must be a float32 array of shape {shape}, "
            f"got {getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.ndim != len(spec.shape) or list(x.shape[1:]) != list(want):
        raise InputError(f"input must have shape {shape}, got {list(x.shape)}")


def predict(sess, x: np.ndarray) -> np.ndarray:
    """Logits for a normalised float32 batch, after checking its shape and dtype."""
    check_input(sess, x)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def evaluate(
    sess,
    x_uint8: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> OrtEvaluation:
    """Accuracy, throughput and per-batch latency percentiles over a uint8 [N, C, H, W] set."""
    mean, std = input_normalisation(sess)
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

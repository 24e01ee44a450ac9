"""Packing trained slot networks into ``.slot`` bytes: the index each connection uses.

``encode_selection`` is the numpy core (indices and dense tensors in, file bytes out);
``pack_model`` and ``pack_checkpoint`` read them off a torch model or a run's checkpoint. The
packed index is what evaluation uses: the argmax of the scores for greedy models, one fixed,
seeded draw from softmax(scores) for probabilistic ones (``layers.select_index``), so the file
is the model ``slotpack eval`` measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from . import arch as A
from . import bits as B
from . import format as F
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .models import Net

ENCODINGS = ("float32", "float16")


@dataclass(frozen=True)
class PackInfo:
    """What was packed, for the CLI's report."""

    size: int
    connections: int
    dense_values: int

    @property
    def float32_size(self) -> int:
        return 4 * (self.connections + self.dense_values)

    @property
    def bits_per_connection(self) -> float:
        return 8 * self.size / self.connections

    @property
    def ratio(self) -> float:
        return self.float32_size / self.size


def encode_selection(
    arch: A.Arch,
    *,
    seed: int,
    k: int,
    selection: str,
    indices: list[np.ndarray],
    tensors: dict[str, np.ndarray],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    metadata: dict[str, Any] | None = None,
    encoding: str = "float32",
) -> bytes:
    """File bytes for ``arch`` with one index array per weighted layer and the dense tensors.

    ``tensors`` maps section names (``"<position>.<role>"``: bias, running_mean, running_var) to
    arrays; ``encoding`` stores them as float32 or float16.
    """
    if encoding not in ENCODINGS:
        raise ConfigError(
            f"unknown tensor encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}"
        )
    bits = B.bits_for(k)
    blobs: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    weighted = [
        (pos, layer) for pos, layer in enumerate(arch.layers) if isinstance(layer, A.WEIGHTED)
    ]
    if len(indices) != len(weighted):
        raise ConfigError(f"{len(indices)} index arrays for {len(weighted)} weighted layers")
    for (pos, layer), idx in zip(weighted, indices, strict=True):
        idx = np.asarray(idx).reshape(-1)
        if idx.size != math.prod(layer.weight_shape):
            raise ConfigError(
                f"layer {pos}: {idx.size} indices for {math.prod(layer.weight_shape)} connections"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= k):
            raise ConfigError(f"layer {pos}: indices must lie in [0, {k})")
        blobs[F.section_name(pos, "indices")] = ("bits", (idx.size,), B.pack(idx, bits))
    dtype = np.dtype("<f4") if encoding == "float32" else np.dtype("<f2")
    for name, array in tensors.items():
        array = np.asarray(array, dtype=np.float32)
        blobs[name] = (encoding, array.shape, array.astype(dtype).tobytes())
    return F.encode(
        layers=arch.layers,
        seed=seed,
        k=k,
        selection=selection,
        input_shape=arch.input_shape,
        mean=mean,
        std=std,
        num_classes=arch.num_classes,
        blobs=blobs,
        metadata=metadata,
    )


def _deployed_index(module) -> np.ndarray:
    """The index a slot layer uses in evaluation: the argmax (greedy), the fixed draw
    (probabilistic); see ``layers.select_index``."""
    was_training = module.training
    module.eval()
    try:
        return module.selected_index().cpu().numpy().astype(np.uint16)
    finally:
        module.train(was_training)


def pack_model(
    model: Net,
    *,
    metadata: dict[str, Any] | None = None,
    encoding: str = "float32",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> tuple[bytes, PackInfo]:
    """Pack a slot ``Net`` (the indices its evaluation uses) into file bytes.

    The input normalisation recorded in the file is the data set's unless ``mean``/``std`` say.
    """
    from . import data

    if model.method != "slot":
        raise ConfigError(
            "only slot models pack into .slot files (this one is a dense float32 model)"
        )
    if mean is None or std is None:
        spec = data.spec(model.arch.dataset)
        mean, std = spec.mean, spec.std
    indices, tensors = [], {}
    for pos, (layer, module) in enumerate(zip(model.arch.layers, model, strict=True)):
        if isinstance(layer, A.WEIGHTED):
            indices.append(_deployed_index(module))
            if module.bias is not None:
                tensors[F.section_name(pos, "bias")] = module.bias.detach().cpu().numpy()
        elif isinstance(layer, A.BatchNorm2d):
            tensors[F.section_name(pos, "running_mean")] = module.running_mean.cpu().numpy()
            tensors[F.section_name(pos, "running_var")] = module.running_var.cpu().numpy()
    blob = encode_selection(
        model.arch,
        seed=model.seed,
        k=model.k,
        selection=model.selection,
        indices=indices,
        tensors=tensors,
        mean=mean,
        std=std,
        metadata=metadata,
        encoding=encoding,
    )
    info = PackInfo(len(blob), model.arch.num_connections, sum(t.size for t in tensors.values()))
    return blob, info


def run_metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a file records about its training run (free-form manifest metadata)."""
    meta: dict[str, Any] = {
        "model": ckpt["config"]["model"],
        "dataset": ckpt["config"].get("dataset"),
        "epoch": ckpt["epoch"] + 1,
        "val_acc": ckpt.get("val_acc"),
        "slotpack": ckpt.get("slotpack_version", __version__),
        "config": ckpt["config"],
    }
    result = Path(ckpt["path"]).parent / "result.json"
    if result.is_file():
        try:
            meta["test_acc"] = json.loads(result.read_text())["test_acc"]
        except (OSError, ValueError, KeyError):
            pass  # result.json is a convenience; a broken one is simply not recorded
    return meta


def pack_checkpoint(path: Path | str, *, encoding: str = "float32") -> tuple[bytes, PackInfo]:
    """Pack a run folder (its best checkpoint) or a checkpoint file; loads it safely."""
    from .train import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt["config"].get("method") != "slot":
        raise CheckpointError(
            f"{ckpt['path']} holds a dense float32 model (--method {ckpt['config'].get('method')}); "
            "only slot models pack into .slot files"
        )
    model = model_from_checkpoint(ckpt, "cpu")
    return pack_model(model, metadata=run_metadata(ckpt), encoding=encoding)

"""Packing trained slot networks into ``.slot`` bytes: the index each connection uses.

``encode_selection`` is the numpy core (indices and dense tensors in, file bytes out);
``pack_model`` reads them off a torch model (``train.pack_checkpoint`` off a run's checkpoint:
packing never imports the training loop). The
packed index is what evaluation uses: the argmax of the scores for greedy models, one fixed,
seeded draw from softmax(scores) for probabilistic ones (``layers.select_index``), so the file
is the model ``slotpack eval`` measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arch as A
from . import bits as B
from . import delta as D
from . import format as F
from . import prng
from .datafiles import spec
from .errors import ConfigError, OutOfMemoryError, size_text

if TYPE_CHECKING:
    from .models import Net

ENCODINGS = ("float32", "float16")
# How indices are stored (docs/FORMAT.md §2.3, §2.6): "auto" picks the smaller of the two per
# layer (ties: bits, which keeps random access); "fast" as "auto" with delta ranks in the
# reference order only, which rebuilds faster than the crossing order (about 14% larger files).
INDEX_ENCODINGS = ("auto", "bits", "delta", "fast")


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


def _check_encodings(encoding: str, index_encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ConfigError(
            f"unknown tensor encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}"
        )
    if index_encoding not in INDEX_ENCODINGS:
        raise ConfigError(
            f"unknown index encoding {index_encoding!r}; choose one of: {', '.join(INDEX_ENCODINGS)}"
        )


def _checked_indices(index: Any, shape: tuple[int, ...], k: int, where: str) -> np.ndarray:
    """``index`` flat, after checking its count against ``shape`` and its values against K."""
    idx = np.asarray(index).reshape(-1)
    if idx.size != math.prod(shape):
        raise ConfigError(f"{where}: {idx.size} indices for {math.prod(shape)} connections")
    if not 2 <= k <= F.MAX_K:
        raise ConfigError(f"{where}: K must be in 2..{F.MAX_K}, got {k}")
    if idx.size and (idx.min() < 0 or idx.max() >= k):
        raise ConfigError(f"{where}: indices must lie in [0, {k})")
    return idx


def _float_blob(array: np.ndarray, encoding: str) -> tuple[str, tuple[int, ...], bytes]:
    """A float32 array as a section stored in ``encoding`` (float32 or float16, little-endian)."""
    dtype = np.dtype("<f4") if encoding == "float32" else np.dtype("<f2")
    return encoding, array.shape, array.astype(dtype).tobytes()


def rank_function(seed: int, number: int, k: int, reference: str) -> D.RankOf:
    """The ranks of a layer's changed slots in its reference or crossing order (§1.8)."""

    def rank_of(pos: np.ndarray, slots: np.ndarray, refs: np.ndarray, crossing: int | None):
        return prng.ranks_np(seed, number, pos, slots, refs, k, reference, crossing)

    return rank_of


def encode_indices(
    index: np.ndarray,
    *,
    seed: int,
    number: int,
    layer: A.Linear | A.Conv2d | A.Weight,
    k: int,
    reference: str,
    encoding: str = "auto",
) -> tuple[str, bytes | D.Delta]:
    """One weighted layer's indices as ("bits", bytes) or ("delta", Delta), per ``encoding``
    (one of INDEX_ENCODINGS)."""
    bits = ("bits", B.pack(index, B.bits_for(k)))
    if encoding == "bits":
        return bits
    n, bound = index.size, prng.glorot_bound(*layer.fans)
    ref = prng.reference_np(seed, number, n, k, bound, reference)
    delta = D.encode(
        index,
        ref,
        k,
        rank_function(seed, number, k, reference),
        crossing=reference in prng.CROSSING_SCALE and encoding != "fast",
    )
    if encoding == "delta" or len(delta.data) < len(bits[1]):
        return "delta", delta
    return bits


def encode_selection(
    arch: A.Arch,
    *,
    seed: int,
    k: int | tuple[int, ...],
    selection: str,
    indices: list[np.ndarray],
    tensors: dict[str, np.ndarray],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    metadata: dict[str, Any] | None = None,
    encoding: str = "float32",
    references: tuple[str, ...] | None = None,
    index_encoding: str = "auto",
    version: int = F.FORMAT_VERSION,
) -> bytes:
    """File bytes for ``arch`` with one index array per weighted layer and the dense tensors.

    ``tensors`` maps section names (``"<position>.<role>"``: bias, running_mean, running_var) to
    arrays; ``encoding`` stores them as float32 or float16. ``k`` is one K or one per weighted
    layer; ``references`` each layer's reference rule (default: that of a "uniform" init);
    ``index_encoding`` "auto" (the smaller per layer), "bits", "delta" or "fast" (version 2
    only; see INDEX_ENCODINGS).
    """
    _check_encodings(encoding, index_encoding)
    if version == 1:
        index_encoding = "bits"
    weighted = [
        (pos, layer) for pos, layer in enumerate(arch.layers) if isinstance(layer, A.WEIGHTED)
    ]
    ks = (k,) * len(weighted) if isinstance(k, int) else tuple(k)
    refs = references or (F.implicit_reference(selection),) * len(weighted)
    if len(indices) != len(weighted) or len(ks) != len(weighted):
        raise ConfigError(
            f"{len(indices)} index arrays and {len(ks)} K for {len(weighted)} weighted layers"
        )
    blobs: dict[str, tuple[str, tuple[int, ...], bytes | D.Delta]] = {}
    for number, ((pos, layer), idx, k_i) in enumerate(zip(weighted, indices, ks, strict=True)):
        idx = _checked_indices(idx, layer.weight_shape, k_i, f"layer {pos}")
        kind, data = encode_indices(
            idx, seed=seed, number=number, layer=layer, k=k_i, reference=refs[number],
            encoding=index_encoding,
        )  # fmt: skip
        blobs[F.section_name(pos, "indices")] = (kind, (idx.size,), data)
    for name, array in tensors.items():
        blobs[name] = _float_blob(np.asarray(array, dtype=np.float32), encoding)
    return F.encode(
        layers=arch.layers,
        seed=seed,
        k=ks,
        selection=selection,
        input_shape=arch.input_shape,
        mean=mean,
        std=std,
        num_classes=arch.num_classes,
        blobs=blobs,
        metadata=metadata,
        references=refs,
        version=version,
    )


def repack(
    source: F.SlotFile, *, index_encoding: str = "auto", encoding: str | None = None
) -> bytes:
    """A version 2 file with the same network as ``source`` (either version), indices
    re-encoded; dense tensors keep their encoding unless ``encoding`` says. Lossless: the
    rebuilt weights are bit-identical. Running out of memory is an OutOfMemoryError."""
    try:
        return _repack(source, index_encoding, encoding)
    except MemoryError:
        n = sum(w.count for w in source.weights)
        raise OutOfMemoryError(
            f"out of memory re-encoding {n:,} connections ({size_text(2 * n)} of indices)"
        ) from None


@dataclass(frozen=True)
class NamedWeight:
    """One slot weight of a weights-only file: its state_dict name, shape, K, reference rule,
    and the flat indices evaluation uses (entry j of the list is generator layer j)."""

    name: str
    shape: tuple[int, ...]
    k: int
    reference: str
    index: np.ndarray


def encode_named(
    weights: list[NamedWeight],
    tensors: dict[str, np.ndarray],
    *,
    seed: int,
    selection: str,
    order: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    encoding: str = "float32",
    index_encoding: str = "auto",
) -> bytes:
    """Weights-only file bytes (docs/FORMAT.md §2.8): slot weights and other tensors by
    state_dict name, in ``order`` (default: the weights, then ``tensors``). Floating tensors
    are stored as ``encoding``; integer ones (BatchNorm's batch count) as int64."""
    _check_encodings(encoding, index_encoding)
    blobs: dict[str, tuple[str, tuple[int, ...], bytes | D.Delta]] = {}
    for number, w in enumerate(weights):
        idx = _checked_indices(w.index, w.shape, w.k, w.name)
        kind, data = encode_indices(
            idx, seed=seed, number=number, layer=A.Weight(tuple(w.shape)), k=w.k,
            reference=w.reference, encoding=index_encoding,
        )  # fmt: skip
        blobs[w.name] = (kind, (idx.size,), data)
    for name, array in tensors.items():
        array = np.asarray(array)
        if name in blobs:
            raise ConfigError(f"tensor {name} is also a slot weight")
        if array.dtype.kind in "iub":
            blobs[name] = ("int64", array.shape, array.astype("<i8").tobytes())
        elif array.dtype.kind == "f":
            blobs[name] = _float_blob(array.astype(np.float32), encoding)
        else:
            raise ConfigError(f"tensor {name} is {array.dtype}: only numbers can be stored")
    order = order or list(blobs)
    if sorted(order) != sorted(blobs):
        raise ConfigError("order must list every weight and tensor exactly once")
    return F.encode_weights(
        seed=seed,
        selection=selection,
        weights=[(w.name, tuple(w.shape), w.k, w.reference) for w in weights],
        blobs={name: blobs[name] for name in order},
        metadata=metadata,
    )


def _repack_named(source: F.SlotFile, index_encoding: str, encoding: str | None) -> bytes:
    slots = {w.section for w in source.weights}
    tensors = {n: source.tensor(n) for n in source.sections if n not in slots}
    floats = {s.encoding for n, s in source.sections.items() if n in tensors} - {"int64"}
    weights = [
        NamedWeight(w.section, w.layer.weight_shape, w.k, w.reference, source.indices(w.section))
        for w in source.weights
    ]
    return encode_named(
        weights, tensors, seed=source.seed, selection=source.manifest["selection"],
        order=list(source.sections), metadata=source.manifest["metadata"],
        encoding=encoding or ("float16" if floats == {"float16"} else "float32"),
        index_encoding=index_encoding,
    )  # fmt: skip


def _repack(source: F.SlotFile, index_encoding: str, encoding: str | None) -> bytes:
    if source.weights_only:
        return _repack_named(source, index_encoding, encoding)
    arch = A.Arch(
        "file", str(source.manifest["metadata"].get("dataset", "")), source.input_shape,
        source.layers, source.manifest["num_classes"],
    )  # fmt: skip
    indices = [source.indices(w.section) for w in source.weights]
    tensors, kinds = {}, set()
    for roles in source.tensors:
        for role, name in roles.items():
            if role != "indices":
                tensors[name] = source.tensor(name)
                kinds.add(source.sections[name].encoding)
    if encoding is None:
        encoding = "float16" if kinds == {"float16"} else "float32"
    inp = source.manifest["input"]
    return encode_selection(
        arch,
        seed=source.seed,
        k=source.ks,
        selection=source.manifest["selection"],
        indices=indices,
        tensors=tensors,
        mean=tuple(inp["mean"]),
        std=tuple(inp["std"]),
        metadata=source.manifest["metadata"],
        encoding=encoding,
        references=tuple(w.reference for w in source.weights),
        index_encoding=index_encoding,
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
    index_encoding: str = "auto",
) -> tuple[bytes, PackInfo]:
    """Pack a slot ``Net`` (the indices its evaluation uses) into file bytes.

    The input normalisation recorded in the file is the data set's unless ``mean``/``std`` say.
    """
    if model.method != "slot":
        raise ConfigError(
            "only slot models pack into .slot files (this one is a dense float32 model)"
        )
    if mean is None or std is None:
        mean, std = spec(model.arch.dataset).mean, spec(model.arch.dataset).std
    indices, tensors, refs, ks = [], {}, [], []
    for pos, (layer, module) in enumerate(zip(model.arch.layers, model, strict=True)):
        if isinstance(layer, A.WEIGHTED):
            indices.append(_deployed_index(module))
            refs.append(module.reference_rule)
            ks.append(module.k)
            if module.bias is not None:
                tensors[F.section_name(pos, "bias")] = module.bias.detach().cpu().numpy()
        elif isinstance(layer, A.BatchNorm2d):
            tensors[F.section_name(pos, "running_mean")] = module.running_mean.cpu().numpy()
            tensors[F.section_name(pos, "running_var")] = module.running_var.cpu().numpy()
    blob = encode_selection(
        model.arch,
        seed=model.seed,
        k=tuple(ks),
        selection=model.selection,
        indices=indices,
        tensors=tensors,
        mean=mean,
        std=std,
        metadata=metadata,
        encoding=encoding,
        references=tuple(refs),
        index_encoding=index_encoding,
    )
    info = PackInfo(len(blob), model.arch.num_connections, sum(t.size for t in tensors.values()))
    return blob, info

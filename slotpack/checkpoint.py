"""Run configs and checkpoints: what a run folder records, read safely, and packing it.

``TrainConfig`` defines a run; checkpoints are plain dicts of tensors and primitives read with
``torch.load(weights_only=True)``. This module needs torch but not the training loop or the data
sets, so ``slotpack pack`` of a run imports neither (``slotpack.train`` re-exports it all).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import pickle
import types
import typing
import zipfile
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__, models, prng
from . import arch as A
from .datafiles import AUGMENTS, spec
from .errors import CheckpointError, ConfigError, SlotpackError
from .format import MAX_K
from .layers import SlotRecord, is_record, record_prefix, score_torch_dtype
from .modelfile import pack_module, pack_state_dict
from .pack import PackInfo, pack_model

CHECKPOINT_VERSION = 1
SCHEDULES = ("constant", "cosine", "step")


# Fields that only slot models have, with their defaults: a learned (float32) config keeps the
# defaults, and neither records nor reports them.
SLOT_ONLY = {
    "k": 8,
    "layer_k": None,
    "selection": "greedy",
    "init": prng.DEFAULT_INIT,
    "rate": 0.0,
    "layer_rate": None,
    "score_dtype": "float32",
}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type (ints count as floats, bools as neither; lists
    as tuples, since JSON has no tuples); annotations this does not know are left to the checks."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int or hint is float:
        number = numbers.Integral if hint is int else numbers.Real
        return isinstance(value, number) and not isinstance(value, bool)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple | list) and all(_type_ok(v, item) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_types(cfg: Any) -> None:
    """Every field of dataclass ``cfg`` has its annotated type, before any check compares or
    allocates with it; lists become tuples."""
    hints = _field_types(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(
                f"{f.name} must be {f.type}, got {type(value).__name__} {value!r:.60}"
            )
        if isinstance(value, list):
            object.__setattr__(cfg, f.name, tuple(value))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; ``None`` fields take the reference code's default per model."""

    model: str
    dataset: str | None = None
    method: str = "slot"
    k: int = 8
    selection: str = "greedy"
    seed: int = 0
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str | None = None
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    limit: int | None = None
    eval_limit: int | None = None
    init_from: str | None = None
    lean: bool = False  # slot layers keep no value bank in memory (same results, less memory)
    score_dtype: str = "float32"  # or "bfloat16": scores, their gradient and momentum
    step_in_backward: bool = False  # SGD step per parameter inside backward (same results)
    init: str = prng.DEFAULT_INIT  # initial scores, one of prng.INITS (§1.7)
    layer_k: tuple[int, ...] | None = None  # one K per weighted layer (overrides k)
    rate: float = 0.0  # rate-aware margin of the reference slot, in layer bounds (0: none)
    layer_rate: tuple[float, ...] | None = None  # one margin per weighted layer (overrides rate)
    augment: str | None = None  # training augmentation (datafiles.AUGMENTS); None: the data set's

    def __post_init__(self) -> None:
        _check_types(self)
        arch = A.spec(self.model)
        if self.dataset is not None:
            spec(self.dataset)
            if self.dataset != arch.dataset:
                raise ConfigError(
                    f"model {self.model} is defined for {arch.dataset}, not {self.dataset}"
                )
        if self.method not in models.METHODS:
            raise ConfigError(
                f"unknown method {self.method!r}; choose one of: {', '.join(models.METHODS)}"
            )
        if self.method == "slot" and not all(2 <= k <= MAX_K for k in (self.k, *self.ks)):
            raise ConfigError(
                f"K must be >= 2 and <= {MAX_K} (the most a .slot file holds), got "
                f"{self.layer_k or self.k}"
            )
        if self.augment is not None and self.augment not in AUGMENTS:
            raise ConfigError(
                f"unknown augmentation {self.augment!r}; choose one of: {', '.join(AUGMENTS)}"
            )
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}"
            )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("limit", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [0, 2**64), got {self.seed}")
        score_torch_dtype(self.score_dtype)
        if self.init not in prng.INITS:
            raise ConfigError(f"unknown init {self.init!r}; choose one of: {', '.join(prng.INITS)}")
        rates = (self.rate, *(self.layer_rate or ()))
        if not all(r >= 0 and math.isfinite(r) for r in rates):
            raise ConfigError(
                f"--rate must be finite numbers >= 0, got {self.layer_rate or self.rate}"
            )
        if self.layer_rate is not None and len(self.layer_rate) != len(self.ks):
            raise ConfigError(
                f"{self.model} has {len(self.ks)} weighted layers; got {len(self.layer_rate)} rates"
            )
        if any(rates) and (self.method != "slot" or self.selection != "greedy"):
            raise ConfigError("--rate applies to greedy slot models")
        if self.method != "slot" and self.score_dtype != "float32":
            raise ConfigError("--score-dtype applies to slot models; learned models have no scores")
        if self.method != "slot" and any(
            getattr(self, name) != default for name, default in SLOT_ONLY.items()
        ):
            raise ConfigError(
                "--k, --selection and --init apply to slot models; a learned (float32) model has "
                "no slots to select from"
            )

    @property
    def ks(self) -> tuple[int, ...]:
        """K of each weighted layer."""
        if self.layer_k is None:
            return (self.k,) * A.spec(self.model).num_weighted
        return models.layer_ks(A.spec(self.model), self.layer_k)

    def resolved(self) -> TrainConfig:
        """The same config with every default filled in from the reference code.

        ResNets (module models) follow the usual CIFAR recipe instead: cosine schedule, lr 0.1
        (slot models above K=8 0.01, as the zoo's), weight decay 5e-4 for the learned twin and
        1e-4 for slot models (VGG-19's, which decays the scores too)."""
        arch = A.spec(self.model)
        if isinstance(arch, A.ModuleArch):
            return self._resolved_resnet(arch)
        lr = self.lr
        if lr is None:
            if self.method == "learned":
                lr = 0.01
            elif self.selection == "probabilistic":
                lr = 25.0 if self.model == "conv6" else 50.0
            else:
                lr = 0.1 if max(self.ks) <= 8 else 0.01
        vgg = self.model == "vgg19"
        schedule = self.schedule or ("step" if vgg else "constant")
        milestones = self.milestones if self.milestones is not None else ((80,) if vgg else ())
        wd = self.weight_decay if self.weight_decay is not None else (1e-4 if vgg else 0.0)
        return replace(
            self,
            dataset=arch.dataset,
            lr=lr,
            schedule=schedule,
            milestones=tuple(milestones),
            weight_decay=wd,
        )

    def _resolved_resnet(self, arch: A.ModuleArch) -> TrainConfig:
        slot = self.method == "slot"
        lr = self.lr
        if lr is None:
            if slot and self.selection == "probabilistic":
                lr = 50.0  # the zoo's default for probabilistic selection
            else:
                lr = 0.01 if slot and max(self.ks) > 8 else 0.1
        wd = self.weight_decay if self.weight_decay is not None else (1e-4 if slot else 5e-4)
        return replace(
            self,
            dataset=arch.dataset,
            lr=lr,
            schedule=self.schedule or "cosine",
            milestones=tuple(self.milestones or ()),
            weight_decay=wd,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON values; a learned model's omits the slot-only fields."""
        d = asdict(self)
        d["milestones"] = list(self.milestones) if self.milestones is not None else None
        if self.method != "slot":
            for name in SLOT_ONLY:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> TrainConfig:
        """The config a checkpoint or config.json records; anything malformed (a non-dict, missing
        or unknown keys, wrong types, values out of range) is a CheckpointError."""
        if not isinstance(d, dict):
            raise CheckpointError(f"config is a {type(d).__name__}, not a dict")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CheckpointError(f"config has unknown keys {sorted(map(str, unknown))}")
        if d.get("method") != "slot" and "method" in d:  # learned: no slots, whatever older
            d = {k: v for k, v in d.items() if k not in SLOT_ONLY}  # versions recorded
        else:
            d = {"init": "uniform", **d}  # checkpoints written before "onedraw" existed
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if required - set(d):
            raise CheckpointError(f"config lacks {sorted(required - set(d))}")
        try:
            return cls(**d)
        except ConfigError as exc:
            raise CheckpointError(f"config: {exc}") from None


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint file or a run folder's ``best.pt`` safely (no arbitrary unpickling)."""
    path = _checkpoint_path(path)
    return _checked_checkpoint(read_torch_file(path), path)


def _checkpoint_path(path: Path | str) -> Path:
    """The file a run folder (its ``best.pt``) or checkpoint path names; CheckpointError if none."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a run folder or a .pt file)")
    return path


def read_torch_file(path: Path) -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True`` (tensors and plain
    values, never code); a CheckpointError says in a user's terms why it cannot be read."""
    problem = _archive_problem(path)
    if problem is not None:
        raise CheckpointError(f"cannot read checkpoint {path}: {problem}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a class: a foreign or hostile file
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds Python objects, not only tensors and plain "
            "values (slotpack never unpickles code; save a model's state_dict(), not the model)"
        ) from None
    except Exception:  # torch raises many types (KeyError, EOFError, ...) for foreign archives
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is a zip archive but not a PyTorch checkpoint "
            "torch can load; train one with `slotpack train`"
        ) from None
    return ckpt


def _checked_checkpoint(ckpt: Any, path: Path) -> dict[str, Any]:
    """``ckpt``, read from ``path``, if it is a well-formed slotpack run checkpoint."""
    if not isinstance(ckpt, dict) or ckpt.get("slotpack_checkpoint") != CHECKPOINT_VERSION:
        if isinstance(ckpt, dict) and any(is_record(v) for v in ckpt.values()):
            raise CheckpointError(
                f"{path} is the state_dict of a slotified model, not a slotpack run checkpoint; "
                f"`slotpack pack {path} -o model.slot` packs it (load that into your model with "
                "slotpack.load_state_dict)"
            )
        raise CheckpointError(
            f"{path} is not a slotpack checkpoint (version {CHECKPOINT_VERSION}); "
            "train one with `slotpack train`"
        )
    for key in ("config", "model", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    problem = _checkpoint_problem(ckpt)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is malformed: {problem}")
    try:
        TrainConfig.from_dict(ckpt["config"])
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path} is malformed: {exc}") from None
    ckpt["path"] = str(path)
    return ckpt


def _archive_problem(path: Path) -> str | None:
    """What makes ``path`` unreadable as a torch checkpoint, in a user's terms, before torch
    tries (its own messages for such files are internal: "pop from empty list", a bare number).

    torch writes checkpoints as zip archives with a CRC-32 per member, which torch itself does
    not check: a truncated copy lacks the zip's central directory, a damaged one fails a CRC."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        return exc.strerror or "unreadable"
    if size == 0:
        return "the file is empty"
    if head != b"PK\x03\x04":
        return (
            "not a PyTorch checkpoint (slotpack checkpoints are the best.pt and last.pt files "
            "`slotpack train` writes)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member and checks its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError):
        return (
            f"the file is truncated or damaged ({size:,} bytes, its zip directory cannot be "
            "read); copy it again or use the run's other checkpoint"
        )
    if damaged is not None:
        return (
            f"the file is damaged (archive member {damaged!r} fails its CRC-32 check); copy it "
            "again or use the run's other checkpoint"
        )
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a loaded checkpoint (its config aside), if anything."""
    model = ckpt["model"]
    if not isinstance(model, dict):
        return f"'model' is a {type(model).__name__}, not a dict of tensors"
    for key, value in model.items():
        if isinstance(key, str) and torch.is_tensor(value):
            continue
        if not (isinstance(key, str) and record_prefix(key) is not None and is_record(value)):
            return f"'model' entry {str(key)!r:.60} is not a named tensor"
        try:  # a slot layer's record (layers.SlotRecord)
            SlotRecord.from_state(value)
        except CheckpointError as exc:
            return f"'model' entry {key!r:.60}: {exc}"
    if not _is_int(ckpt["epoch"]) or not 0 <= ckpt["epoch"] < 2**31:
        return f"'epoch' must be an int in [0, 2**31), got {ckpt['epoch']!r:.60}"
    for key in ("val_acc", "best_val"):
        value = ckpt.get(key, 0.0)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"{key!r} must be a number, got {value!r:.60}"
    return None


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The freshly initialised network a config describes."""
    return models.create(
        cfg.model,
        cfg.layer_k or cfg.k,
        method=cfg.method,
        selection=cfg.selection,
        seed=cfg.seed,
        device=device,
        lean=cfg.lean,
        score_dtype=cfg.score_dtype,
        init=cfg.init,
        stick=cfg.layer_rate or cfg.rate,
    )


def model_from_checkpoint(
    ckpt: dict[str, Any], device: torch.device | str = "cpu", *, lean: bool = False
) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes (the bank is regenerated from the seed;
    ``lean``: slot layers keep none in memory, same results).

    On the ``"meta"`` device nothing is generated: a lean skeleton takes the checkpoint's own
    tensors (cast to each parameter's dtype, as loading into a built model would), which is
    all packing needs."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    problem = _fit_problem(cfg, ckpt["model"])  # before building: that can take seconds
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt['path']} does not fit {_describe(cfg)}: {problem}")
    meta = torch.device(device).type == "meta"
    model = build_model(replace(cfg, lean=True) if meta or lean else cfg, device)
    state = ckpt["model"]
    if meta:
        own = {k: v.dtype for k, v in model.state_dict().items() if torch.is_tensor(v)}
        state = {k: v.to(own[k]) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state, assign=meta)
    except (RuntimeError, CheckpointError) as exc:  # CheckpointError: a slot layer's record
        raise CheckpointError(
            f"checkpoint {ckpt['path']} does not fit {_describe(cfg)}: {str(exc).splitlines()[0]}"
        ) from None
    return model


def _describe(cfg: TrainConfig) -> str:
    if cfg.method != "slot":
        return f"model {cfg.model} ({cfg.method}, float32)"
    return f"model {cfg.model} ({cfg.method}, K={cfg.layer_k or cfg.k}, {cfg.selection})"


def _fit_problem(cfg: TrainConfig, state: dict[str, Any], shown: int = 3) -> str | None:
    """The first few missing and unexpected tensors and the first shape mismatch between a
    checkpoint's ``state`` and the model its config describes, built on the meta device (shapes
    only, no memory, no generator work). Slot layers' records may be missing (checkpoints
    written before layers recorded themselves); loading checks those present."""
    try:
        with torch.device("meta"):
            own = build_model(cfg, "meta").state_dict()
    except Exception:  # pragma: no cover - a layer that cannot be built on meta: torch checks
        return None
    expected = {n: tuple(t.shape) for n, t in own.items() if torch.is_tensor(t)}
    records = set(own) - set(expected)

    def names(keys: list[str]) -> str:
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        return ", ".join(keys[:shown]) + more

    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected and n not in records]
    parts = []
    if missing:
        parts.append(f"it lacks {names(missing)}")
    if unexpected:
        parts.append(f"it has unexpected {names(unexpected)}")
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != shape:
            got = list(state[name].shape)
            parts.append(f"{name} has shape {got}, the model expects {list(shape)}")
            break
    return "; ".join(parts) or None


def load_model(
    path: Path | str, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, TrainConfig]:
    """The model and config of a run folder (best checkpoint) or checkpoint file."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, device), TrainConfig.from_dict(ckpt["config"])


# ------------------------------------------------------------------------ packing a run


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


def pack_checkpoint(
    path: Path | str, *, encoding: str = "float32", index_encoding: str = "auto"
) -> tuple[bytes, PackInfo]:
    """Pack a run folder (its best checkpoint), a checkpoint file, or a file holding the bare
    ``state_dict`` of a slotified model (``torch.save(slot.state_dict(), path)``); loads it
    safely.

    For a run, the network is built on torch's meta device (shapes, no values) and takes the
    checkpoint's tensors in place of its parameters: packing needs the scores, never the K-value
    bank or the initial scores, so nothing is generated (the bytes are those of ``pack_model``
    on the model training used). A bare ``state_dict`` becomes a weights-only file
    (``modelfile.pack_state_dict``: the bytes of ``slotpack.save`` on the model that saved it)."""
    file = _checkpoint_path(path)
    loaded = read_torch_file(file)
    if not (isinstance(loaded, dict) and "slotpack_checkpoint" in loaded):
        try:
            return pack_state_dict(loaded, encoding=encoding, index_encoding=index_encoding)
        except SlotpackError as exc:
            raise type(exc)(f"{file}: {exc}") from None
    ckpt = _checked_checkpoint(loaded, file)
    if ckpt["config"].get("method") != "slot":
        raise CheckpointError(
            f"{ckpt['path']} holds a float32 model (--method {ckpt['config'].get('method')}), "
            f"which has no slots to pack; export it to ONNX instead: `slotpack export {path} -o "
            "model.onnx`"
        )
    model = model_from_checkpoint(ckpt, "meta")
    return pack_net(
        model, metadata=run_metadata(ckpt), encoding=encoding, index_encoding=index_encoding
    )


def pack_net(model: torch.nn.Module, **options: Any) -> tuple[bytes, PackInfo]:
    """``pack_model`` of a layer-list ``Net``; a weights-only file (``modelfile.pack_module``,
    docs/FORMAT.md §2.8) of a module model (resnet20, resnet18), which has no layer list."""
    if models.is_module_model(model):
        return pack_module(model, **options)
    return pack_model(model, **options)

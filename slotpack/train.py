"""Training, evaluation, checkpoints and finetuning of zoo models on whole-tensor data sets.

The loop keeps the data set on the training device, augments there, and synchronises with the host
once per epoch (no ``.item()`` per step). Under torchrun it trains data-parallel
(``slotpack.distributed``: the same global batches as one process, sharded across ranks). A run
folder holds ``config.json``, ``metrics.jsonl`` (one JSON line per epoch), ``last.pt``
(everything ``--resume`` needs), ``best.pt`` (best on the validation split) and ``result.json``. Checkpoints are plain dicts of tensors and primitives,
written atomically and read with ``torch.load(weights_only=True)``. A run holds ``.lock`` (flock)
for its whole life, so a folder has one writer; ``--resume`` finishes a run killed at any moment
(docs/GUARANTEES.md).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import time
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from . import __version__, data, kernels, layers, models, optim, prng
from . import arch as A
from . import distributed as D
from .atomic import exclusive, replacing, write_bytes
from .errors import CheckpointError, ConfigError
from .format import MAX_K
from .layers import score_torch_dtype
from .pack import PackInfo, pack_model

CHECKPOINT_VERSION = 1
SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")


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
    init: str = "onedraw"  # initial scores: "onedraw" or "uniform" (runs before format 2)
    layer_k: tuple[int, ...] | None = None  # one K per weighted layer (overrides k)
    rate: float = 0.0  # rate-aware margin of the reference slot, in layer bounds (0: none)
    layer_rate: tuple[float, ...] | None = None  # one margin per weighted layer (overrides rate)

    def __post_init__(self) -> None:
        _check_types(self)
        arch = A.get(self.model)
        if self.dataset is not None:
            data.spec(self.dataset)
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

    @property
    def ks(self) -> tuple[int, ...]:
        """K of each weighted layer."""
        if self.layer_k is None:
            return (self.k,) * len(A.get(self.model).weighted)
        return models.layer_ks(A.get(self.model), self.layer_k)

    def resolved(self) -> TrainConfig:
        """The same config with every default filled in from the reference code."""
        arch = A.get(self.model)
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones) if self.milestones is not None else None
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
        d = {"init": "uniform", **d}  # checkpoints written before "onedraw" existed
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if required - set(d):
            raise CheckpointError(f"config lacks {sorted(required - set(d))}")
        try:
            return cls(**d)
        except ConfigError as exc:
            raise CheckpointError(f"config: {exc}") from None


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based ``epoch`` under the (resolved) schedule."""
    assert cfg.lr is not None, "resolve the config first"
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones or ())
    return cfg.lr


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a ConfigError."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


class Reporter(Protocol):
    """Hooks the CLI implements with progress bars; the library itself never prints."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...


class SilentReporter:
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self) -> None:
        pass

    def epoch_end(self, record: dict[str, Any]) -> None:
        pass


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    count: int
    seconds: float = field(default=0.0)


def _autocast(device: torch.device):
    # bf16 autocast on CUDA: the bank and scores stay float32, matmuls/convs run in bf16.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _prepare(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda and x.dim() == 4 else x


def evaluate(
    model: torch.nn.Module, dataset: data.TensorData, batch_size: int = 1000
) -> Evaluation:
    """Mean cross-entropy and accuracy of ``model`` (eval mode: greedy selection) on ``dataset``."""
    device = dataset.x.device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad(), _autocast(device):
        for x, y in data.batches(dataset, batch_size, train=False):
            logits = model(_prepare(x)).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(dataset)
    return Evaluation(loss_sum.item() / n, correct.item() / n, n, time.perf_counter() - start)


class _Writer:
    """The file object torch.save writes through: it keeps the OSError (disk full, quota, file
    size limit) that torch would otherwise turn into an opaque ``enforce fail`` RuntimeError."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):
                done += self.f.write(view[done:])
            return done
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _atomic_save(obj: Any, path: Path) -> None:
    with replacing(path) as tmp, open(tmp, "wb", buffering=0) as f:
        writer = _Writer(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None


def _append_line(path: Path, line: str) -> None:
    """Append one line with a single write (a crash can tear it, which ``iter_metrics`` allows)."""
    data = line.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        finally:
            os.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _atomic_write_text(text: str, path: Path) -> None:
    write_bytes(path, text.encode())


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint file or a run folder's ``best.pt`` safely (no arbitrary unpickling)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a run folder or a .pt file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("slotpack_checkpoint") != CHECKPOINT_VERSION:
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a loaded checkpoint (its config aside), if anything."""
    model = ckpt["model"]
    if not isinstance(model, dict):
        return f"'model' is a {type(model).__name__}, not a dict of tensors"
    bad = [k for k, v in model.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        return f"'model' entry {str(bad[0])!r:.60} is not a named tensor"
    if not _is_int(ckpt["epoch"]) or not 0 <= ckpt["epoch"] < 2**31:
        return f"'epoch' must be an int in [0, 2**31), got {ckpt['epoch']!r:.60}"
    for key in ("val_acc", "best_val"):
        value = ckpt.get(key, 0.0)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"{key!r} must be a number, got {value!r:.60}"
    return None


def _resume_problem(state: dict[str, Any]) -> str | None:
    """What a last.pt lacks that --resume needs, if anything."""
    if "best_val" not in state or not isinstance(state.get("optimizer"), dict):
        return "it lacks 'best_val' or an 'optimizer' dict"
    for key in ("rng_cpu", "rng_data"):
        if not torch.is_tensor(state.get(key)) or state[key].dtype != torch.uint8:
            return f"{key!r} is not a generator state (a uint8 tensor)"
    return None


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> models.Net:
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


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> models.Net:
    """Rebuild the network a checkpoint describes (the bank is regenerated from the seed)."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg, device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {ckpt['path']} does not fit model {cfg.model}: {str(exc).splitlines()[0]}"
        ) from None
    return model


def load_model(
    path: Path | str, device: torch.device | str = "cpu"
) -> tuple[models.Net, TrainConfig]:
    """The model and config of a run folder (best checkpoint) or checkpoint file."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, device), TrainConfig.from_dict(ckpt["config"])


def _initial_model(cfg: TrainConfig, device: torch.device) -> models.Net:
    if cfg.init_from is None:
        return build_model(cfg, device)
    source, _ = load_model(cfg.init_from, device)
    if source.method != "slot":
        raise ConfigError(
            f"finetuning starts from a slot model; {cfg.init_from} is {source.method}"
        )
    return models.dense_from_slot(source)


def _epoch(
    model: torch.nn.Module,
    opt: optim.Optimizer,
    train_data: data.TensorData,
    cfg: TrainConfig,
    generator: torch.Generator,
    reporter: Reporter,
    world: D.World,
) -> tuple[float, float]:
    """One pass over the data; every rank walks the same global batches and keeps its shard."""
    device = train_data.x.device
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in data.batches(train_data, cfg.batch_size, train=True, generator=generator):
        if y.shape[0] < world.size:  # a last global batch too short to give every rank a row
            continue
        scale = D.loss_scale(y.shape[0], world)
        x, y = D.shard(x, y, world)
        with _autocast(device):
            logits = model(_prepare(x)).float()
            if world.size == 1:
                loss = F.cross_entropy(logits, y)
                summed = loss.detach().double() * y.shape[0]
            else:
                summed = F.cross_entropy(logits, y, reduction="sum")
                loss = summed * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += summed.detach().double()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.shape[0]
        reporter.step()
    total_loss, total_correct, total_seen = D.all_sum(
        torch.stack([loss_sum, correct.double(), seen.double()]), world
    ).tolist()  # the epoch's one host synchronisation
    n = max(total_seen, 1.0)
    return total_loss / n, total_correct / n


def _steps(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def train(
    cfg: TrainConfig,
    out: Path | str,
    *,
    root: Path | str,
    device: str = "auto",
    resume: bool = False,
    reporter: Reporter | None = None,
    distributed: bool = False,
    compile: bool = False,
    grad_reduce: str = "scores",
    kernel: str = "auto",
) -> dict[str, Any]:
    """Train ``cfg`` into run folder ``out``; return the result record (also in result.json).

    ``compile``: run the training steps through ``torch.compile`` (same function; the first
    steps pay the compilation).

    ``kernel``: the code lean slot layers run (slotpack.kernels): "auto" (fused Triton kernels
    on CUDA where they match the torch generator, else torch), "torch" or "triton". Results
    are bit-identical whichever runs.

    ``distributed``: this process is one rank of a torchrun job (slotpack.distributed): the
    model is wrapped in DistributedDataParallel, each rank trains on its shard of every global
    batch of ``cfg.batch_size``, and only rank 0 evaluates, writes files and reports progress.
    Every rank returns the same result. ``grad_reduce`` ("scores" or "weights") is what travels:
    see ``slotpack.distributed.wrap``.
    """
    cfg = cfg.resolved()
    dev = resolve_device(device)
    kernels.check_kernel(kernel)
    if kernel == "triton" and not cfg.lean:
        raise ConfigError("--kernel triton runs lean slot layers; add --lean")
    if cfg.lean:  # an explicit "triton" that cannot run fails here, before any work
        for k in set(cfg.ks):
            kernels.resolve(kernel, dev, k)
    if not distributed:
        reporter = reporter or SilentReporter()
        world = D.World()
        with _run_lock(Path(out), resume):
            return _train(cfg, Path(out), root, dev, resume, reporter, world, None, compile, kernel)
    D.check_grad_reduce(grad_reduce)
    if cfg.step_in_backward and grad_reduce != "weights":
        raise ConfigError(
            "--step-in-backward with --distributed needs --grad-reduce weights: DDP averages "
            "score gradients after the per-parameter steps would already have run"
        )
    world, dev, created = D.start(dev)
    try:
        reporter = (reporter or SilentReporter()) if world.main else SilentReporter()
        # Rank 0 alone writes, so it alone locks; if it fails, torchrun stops the other ranks.
        with _run_lock(Path(out), resume) if world.main else nullcontext():
            return _train(
                cfg, Path(out), root, dev, resume, reporter, world, grad_reduce, compile, kernel
            )
    finally:
        if created:
            D.stop()


LOCK_NAME = ".lock"
RECORDS = ("last.pt", "best.pt", "metrics.jsonl", "config.json", "result.json")


@contextmanager
def _run_lock(out: Path, resume: bool) -> Iterator[None]:
    """One writer per run folder, for the whole run: ``out/.lock`` held under flock."""
    if resume and not out.is_dir():
        raise CheckpointError(f"nothing to resume: {out} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / LOCK_NAME, f"run folder {out}"):
        yield


def _check_resumed_config(cfg: TrainConfig, path: Path) -> None:
    """A run without last.pt resumes from epoch 0, under the config its config.json records."""
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path.parent} holds no last.pt or config.json")
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:  # CheckpointError is a ValueError too
        raise CheckpointError(f"cannot resume from {path}: {_first_line(exc)}") from None
    if replace(saved, epochs=cfg.epochs) != cfg:
        raise CheckpointError(
            f"--resume with a different config than {path} (only --epochs may change)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _keep_metrics(out: Path, epochs: int) -> None:
    """Cut metrics.jsonl back to the ``epochs`` a resumed run keeps (a crash after an append, or
    in the middle of one, leaves records that the checkpoint lacks); they must be 1..epochs."""
    kept = [r for r in iter_metrics(out) if r["epoch"] <= epochs]
    if [r["epoch"] for r in kept] != list(range(1, epochs + 1)):
        raise CheckpointError(
            f"{out / 'metrics.jsonl'} holds epochs {[r['epoch'] for r in kept]}, but the "
            f"checkpoint resumes after epoch {epochs}; the run folder is inconsistent"
        )
    _atomic_write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), out / "metrics.jsonl"
    )


def _train(
    cfg: TrainConfig,
    out: Path,
    root: Path | str,
    dev: torch.device,
    resume: bool,
    reporter: Reporter,
    world: D.World,
    grad_reduce: str | None = None,
    compile: bool = False,
    kernel: str = "auto",
) -> dict[str, Any]:
    """The loop; ``grad_reduce`` is None for a single process, else how ranks share gradients."""
    last_path = out / "last.pt"
    held = [name for name in RECORDS if (out / name).exists()]
    if resume and not last_path.is_file():  # killed before its first last.pt: start again
        _check_resumed_config(cfg, out / "config.json")
    elif not resume and held:
        raise CheckpointError(
            f"{out} already holds a run ({held[0]}); pass --resume to continue it or choose "
            "another --out"
        )
    D.barrier(world)  # every rank has checked the folder before rank 0 writes to it
    train_data = data.load(cfg.dataset, root, "train", dev, limit=cfg.limit)
    val_data = data.load(cfg.dataset, root, "val", dev, limit=cfg.eval_limit)

    torch.manual_seed(cfg.seed % 2**63)  # dropout and probabilistic sampling
    generator = torch.Generator(device=dev)
    generator.manual_seed(cfg.seed % 2**63)
    net = _initial_model(cfg, dev)
    layers.set_kernel(net, kernel)
    model = net if grad_reduce is None else D.wrap(net, world, dev, grad_reduce)
    if cfg.step_in_backward and model is not net:
        raise ConfigError(
            "--step-in-backward with --distributed works only for models whose only parameters "
            f"are slot scores; {cfg.model} ({cfg.method}) has others that DDP must reduce first"
        )
    opt = optim.sgd(
        net.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        in_backward=cfg.step_in_backward,
        seed=cfg.seed,
    )
    start_epoch, best_val = 0, -1.0
    if resume and last_path.is_file():
        state = load_checkpoint(last_path)
        if (problem := _resume_problem(state)) is not None:
            raise CheckpointError(f"cannot resume from {last_path}: {problem}")
        saved = TrainConfig.from_dict(state["config"])
        if replace(saved, epochs=cfg.epochs) != cfg:
            raise CheckpointError(
                f"--resume with a different config than {last_path} (only --epochs may change)"
            )
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        generator.set_state(state["rng_data"])
        if dev.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        start_epoch, best_val = state["epoch"] + 1, state["best_val"]
    if resume and world.main:
        _keep_metrics(out, start_epoch)  # the epochs last.pt holds (none without one)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(
            json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n", out / "config.json"
        )
    if compile:
        model = torch.compile(model)  # evaluation and checkpoints keep using ``net`` itself

    steps = _steps(len(train_data), cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        reporter.epoch_start(epoch, cfg.epochs, steps)
        t0 = time.perf_counter()
        train_loss, train_acc = _epoch(model, opt, train_data, cfg, generator, reporter, world)
        seconds = time.perf_counter() - t0
        if not world.main:
            continue
        val = evaluate(net, val_data)
        record = {
            "epoch": epoch + 1,
            "lr": lr_at(cfg, epoch),
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "epoch_seconds": seconds,
        }
        base = {
            "slotpack_checkpoint": CHECKPOINT_VERSION,
            "slotpack_version": __version__,
            "config": cfg.to_dict(),
            "epoch": epoch,
            "val_acc": val.accuracy,
        }
        if val.accuracy > best_val:
            best_val = val.accuracy
            _atomic_save({**base, "model": net.state_dict()}, out / "best.pt")
        state = {
            **base,
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "best_val": best_val,
            "rng_cpu": torch.get_rng_state(),
            "rng_data": generator.get_state(),
        }
        if dev.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        _append_line(out / "metrics.jsonl", json.dumps(record, sort_keys=True) + "\n")
        _atomic_save(state, last_path)
        reporter.epoch_end(record)

    extra: dict[str, Any] = {"train_count": len(train_data), "val_count": len(val_data)}
    if cfg.lean:  # what ran, for reading epoch times (the numbers are the same either way)
        extra["kernel"] = kernels.resolve(kernel, dev, max(cfg.ks))
    if grad_reduce is not None:
        digests = D.replica_digests(net, world)
        extra.update(world_size=world.size, grad_reduce=grad_reduce, replica_digests=digests)
        if cfg.method == "slot":
            extra["packed_digests"] = D.packed_digests(pack_model(net)[0], world)
    result = finish(out, root=root, device=dev, extra=extra) if world.main else None
    result = D.broadcast(result, world)
    if grad_reduce is not None and any(
        len(set(result.get(key, ["-"]))) != 1 for key in ("replica_digests", "packed_digests")
    ):
        raise D.ReplicaMismatchError(
            f"the {world.size} ranks ended with different parameters or packed files: "
            f"{result['replica_digests']}, {result.get('packed_digests')}"
        )
    return result


def finish(
    out: Path, *, root: Path | str, device: torch.device, extra: dict[str, Any]
) -> dict[str, Any]:
    """Evaluate a run's best checkpoint on the test split and write result.json."""
    ckpt = load_checkpoint(out / "best.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = model_from_checkpoint(ckpt, device)
    test = evaluate(model, data.load(cfg.dataset, root, "test", device, limit=cfg.eval_limit))
    epochs = list(iter_metrics(out))
    result = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "method": cfg.method,
        "k": cfg.layer_k or cfg.k,
        "selection": cfg.selection,
        "seed": cfg.seed,
        "epochs": len(epochs),
        "best_epoch": ckpt["epoch"] + 1,
        "val_acc": ckpt["val_acc"],
        "test_acc": test.accuracy,
        "test_loss": test.loss,
        "test_count": test.count,
        **extra,
        "mean_epoch_seconds": sum(e["epoch_seconds"] for e in epochs) / max(len(epochs), 1),
        "device": str(device),
        "torch": torch.__version__,
        "slotpack": __version__,
    }
    _atomic_write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", out / "result.json")
    return result


def iter_metrics(out: Path | str) -> Iterator[dict[str, Any]]:
    """The per-epoch records of a run folder.

    A torn last line (an append cut short by a kill, power loss or full disk) is skipped: its
    epoch has no last.pt yet, so ``--resume`` runs it again. Anything else unreadable is a
    CheckpointError."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            if number == len(lines):
                return
            record = None
        if not isinstance(record, dict) or not _is_int(record.get("epoch")):
            raise CheckpointError(
                f"{path} line {number} is not an epoch record; the run's metrics are corrupt"
            )
        yield record


def finetune_config(
    run: Path | str,
    *,
    epochs: int,
    lr: float | None = None,
    schedule: str | None = None,
    limit: int | None = None,
    eval_limit: int | None = None,
) -> TrainConfig:
    """Config of the paper's finetuning: the learned twin, initialised from a slot run's selection."""
    ckpt = load_checkpoint(run)
    source = TrainConfig.from_dict(ckpt["config"])
    if source.method != "slot":
        raise ConfigError(
            f"finetune needs a slot run; {run} was trained with --method {source.method}"
        )
    return replace(
        source,
        method="learned",
        score_dtype="float32",
        init_from=str(Path(ckpt["path"]).resolve()),
        epochs=epochs,
        lr=lr,
        schedule=schedule,
        milestones=None,
        limit=limit,
        eval_limit=eval_limit,
    )


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
    """Pack a run folder (its best checkpoint) or a checkpoint file; loads it safely."""
    ckpt = load_checkpoint(path)
    if ckpt["config"].get("method") != "slot":
        raise CheckpointError(
            f"{ckpt['path']} holds a dense float32 model (--method {ckpt['config'].get('method')}); "
            "only slot models pack into .slot files"
        )
    model = model_from_checkpoint(ckpt, "cpu")
    return pack_model(
        model, metadata=run_metadata(ckpt), encoding=encoding, index_encoding=index_encoding
    )

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

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from . import __version__, data, kernels, layers, models, optim
from . import distributed as D
from .atomic import exclusive, replacing, write_bytes
from .checkpoint import (  # noqa: F401 (the run config and checkpoints live there; re-exported)
    CHECKPOINT_VERSION,
    SCHEDULES,
    SLOT_ONLY,
    TrainConfig,
    _is_int,
    build_model,
    load_checkpoint,
    load_model,
    model_from_checkpoint,
    pack_checkpoint,
    pack_net,
    run_metadata,
)
from .errors import CheckpointError, ConfigError

DEVICES = ("auto", "cpu", "cuda")


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


def _resume_problem(state: dict[str, Any]) -> str | None:
    """What a last.pt lacks that --resume needs, if anything."""
    if "best_val" not in state or not isinstance(state.get("optimizer"), dict):
        return "it lacks 'best_val' or an 'optimizer' dict"
    for key in ("rng_cpu", "rng_data"):
        if not torch.is_tensor(state.get(key)) or state[key].dtype != torch.uint8:
            return f"{key!r} is not a generator state (a uint8 tensor)"
    return None


def _initial_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
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
    batches = data.batches(
        train_data, cfg.batch_size, train=True, generator=generator, augmentation=cfg.augment
    )
    for x, y in batches:
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
            extra["packed_digests"] = D.packed_digests(pack_net(net)[0], world)
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
        **({"k": cfg.layer_k or cfg.k, "selection": cfg.selection} if cfg.method == "slot" else {}),
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
        **SLOT_ONLY,  # the twin has no slots: none of the source's K, selection, init, rate
        init_from=str(Path(ckpt["path"]).resolve()),
        epochs=epochs,
        lr=lr,
        schedule=schedule,
        milestones=None,
        limit=limit,
        eval_limit=eval_limit,
    )

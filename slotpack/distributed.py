"""Data-parallel training over torch.distributed: who this process is, its shard, replica checks.

Launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Nothing
random is ever communicated: every rank builds the same value bank and the same initial scores
from the shared seed, draws the same shuffled order and the same augmentation of each *global*
batch from the same generator, and keeps rows ``rank::world`` of it. Each rank's loss is scaled
by ``world / global batch size`` so that DDP's gradient average equals the single-process
gradient of the whole batch exactly, whatever the shard sizes. Only gradients travel: the score
gradients in DDP's all-reduce (``grad_reduce="scores"``), or, K times smaller, each slot layer's
weight gradient, averaged inside its backward pass (``"weights"``, see WeightGradReducer).

What is not the same as one process: dropout masks come from each rank's identically seeded RNG
over its own shard, so they differ from the single process's (probabilistic draws are over the
scores and do match); BatchNorm uses per-rank batch statistics (ordinary DDP, no SyncBatchNorm)
and rank 0's running statistics.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, SlotpackError

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ReplicaMismatchError(SlotpackError):
    """The ranks of a distributed run ended with different parameters (a bug, never expected)."""


@dataclass(frozen=True)
class World:
    """This process's place in the job; ``World()`` is the single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True under torchrun (or any launcher that sets the standard environment variables)."""
    return all(v in os.environ for v in _LAUNCH_VARS)


def start(device: torch.device) -> tuple[World, torch.device, bool]:
    """Join the process group torchrun prepared: NCCL on CUDA (one GPU per local rank), else gloo.

    Returns this rank's World, its device, and whether this call created the process group (and
    so should destroy it)."""
    if not launched():
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        raise ConfigError(
            f"--distributed needs a launcher: run `torchrun --nproc-per-node N -m slotpack train ...` "
            f"({', '.join(missing)} not set)"
        )
    world = World(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    )
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible)"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return world, device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device, True


GRAD_REDUCE = ("scores", "weights")


def check_grad_reduce(name: str) -> None:
    """A ConfigError naming the valid choices unless ``name`` is one of GRAD_REDUCE."""
    if name not in GRAD_REDUCE:
        raise ConfigError(
            f"unknown gradient reduction {name!r}; choose one of: {', '.join(GRAD_REDUCE)}"
        )


class WeightGradReducer:
    """Averages d loss / d w over the ranks inside a slot layer's backward.

    A slot layer's score gradient is ``grad_w[i] * value[i, k]`` and every rank holds the same
    values, so averaging ``grad_w`` ([connections] floats) and then forming the score gradient
    on each rank equals averaging the [connections, K] score gradients, with K times less
    traffic (up to floating-point rounding; every rank gets the same bits)."""

    def __init__(self, world: World) -> None:
        self.size = world.size

    def __call__(self, grad_w: torch.Tensor) -> torch.Tensor:
        g = grad_w.clone()  # autograd's buffer is not ours to overwrite
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g.div_(self.size)


def wrap(
    net: torch.nn.Module, world: World, device: torch.device, grad_reduce: str
) -> torch.nn.Module:
    """The module to train data-parallel.

    ``scores``: DistributedDataParallel all-reduces every gradient, the [connections, K] score
    gradients included. ``weights``: slot layers average their weight gradient themselves
    (WeightGradReducer) and DDP handles only the other parameters; a model with no other
    parameters (every zoo slot model) is returned unwrapped.
    """
    from torch.nn.parallel import DistributedDataParallel

    check_grad_reduce(grad_reduce)
    ignored: list[str] = []
    if grad_reduce == "weights":
        reducer = WeightGradReducer(world)
        for name, module in net.named_modules():
            if hasattr(module, "grad_reducer"):  # a slot layer
                module.grad_reducer = reducer
                ignored.append(f"{name}.scores")
    rest = [n for n, p in net.named_parameters() if p.requires_grad and n not in ignored]
    if not rest:
        return net
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ignored)
    return DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None
    )


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(x: torch.Tensor, y: torch.Tensor, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a global batch: ``rank::size`` (the shards partition the batch)."""
    if world.size == 1:
        return x, y
    return x[world.rank :: world.size], y[world.rank :: world.size]


def loss_scale(global_batch: int, world: World) -> float:
    """Factor on a rank's summed loss so that DDP's mean over ranks is the global batch mean."""
    return world.size / global_batch


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place); identity in a single process."""
    if world.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters (names, dtypes, shapes, bytes) in a fixed order.

    Buffers are left out: BatchNorm running statistics are per rank (rank 0's are saved)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's ``value``, in rank order (all ranks must call this)."""
    if world.size == 1:
        return [value]
    every: list[Any] = [None] * world.size
    dist.all_gather_object(every, value)
    return every


def replica_digests(module: torch.nn.Module, world: World) -> list[str]:
    """Every rank's digest of ``module``'s parameters, in rank order."""
    return gather(digest(module), world)


def packed_digests(blob: bytes, world: World) -> list[str]:
    """Every rank's SHA-256 of the .slot bytes it packed from its replica, in rank order."""
    return gather(hashlib.sha256(blob).hexdigest(), world)


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (the processes of one job trust each other)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()

"""Data-parallel training: sharding rules, and a real 2-process gloo run under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from slotpack import distributed as D
from slotpack import models
from slotpack.cli import main
from slotpack.errors import ConfigError
from slotpack.train import TrainConfig, load_checkpoint, train
from tests.helpers import one_line_error

RUN = dict(model="lenet300100", k=8, epochs=2, limit=1000, eval_limit=500, batch_size=100)


def test_shards_partition_the_global_batch():
    x, y = torch.arange(7 * 3).view(7, 3), torch.arange(7)
    for size in (1, 2, 3, 7):
        parts = [D.shard(x, y, D.World(r, size, r)) for r in range(size)]
        rows = sorted(int(v) for _, yy in parts for v in yy)
        assert rows == list(range(7))
        for xx, yy in parts:
            assert torch.equal(xx, x[yy])


@pytest.mark.parametrize("size", [2, 3])
def test_scaled_shard_losses_average_to_the_global_gradient(size):
    # What DDP computes (the mean over ranks of each rank's gradient) must equal the gradient
    # of the mean loss over the whole global batch, also when the shards differ in size.
    model = models.create("lenet300100", 8, seed=3)
    x, y = torch.randn(11, 1, 28, 28), torch.randint(0, 10, (11,))
    F.cross_entropy(model(x), y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    ranks = []
    for r in range(size):
        model.zero_grad()
        xs, ys = D.shard(x, y, D.World(r, size, r))
        loss = F.cross_entropy(model(xs), ys, reduction="sum") * D.loss_scale(11, D.World(r, size))
        loss.backward()
        ranks.append([p.grad.clone() for p in model.parameters()])
    for i, g in enumerate(full):
        mean = sum(rank[i] for rank in ranks) / size
        torch.testing.assert_close(mean, g, rtol=1e-5, atol=1e-7)


def test_digest_sees_every_bit():
    model = models.create("lenet300100", 2, seed=1)
    before = D.digest(model)
    assert D.digest(models.create("lenet300100", 2, seed=1)) == before
    with torch.no_grad():
        s = model[1].scores
        s.view(-1)[5] = torch.nextafter(s.view(-1)[5], torch.tensor(9.0))
    assert D.digest(model) != before


def test_distributed_outside_a_launcher_is_a_clear_error(mnist_root, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        train(TrainConfig(**RUN), tmp_path / "r", root=mnist_root, distributed=True)
    cfg = TrainConfig(**RUN, step_in_backward=True)
    with pytest.raises(ConfigError, match="step-in-backward"):
        train(cfg, tmp_path / "r", root=mnist_root, distributed=True)
    assert not (tmp_path / "r").exists()
    args = ["train", "--model", "lenet300100", "--distributed", "--out", str(tmp_path / "c")]
    one_line_error(CliRunner().invoke(main, [*args, "--root", str(mnist_root)]), "torchrun")
    assert not (tmp_path / "c").exists()


def test_weight_gradient_reduction_equals_score_gradient_reduction():
    """Averaging d loss/d w, then the straight-through product = averaging score gradients."""
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    world = D.World(0, 2, 0)
    score_grads, weight_grads = [], []
    for r in range(2):
        model = models.create("lenet300100", 4, seed=6)
        model[1].grad_reducer = lambda g: weight_grads.append(g.clone()) or g
        xs, ys = D.shard(x, y, D.World(r, 2, r))
        (F.cross_entropy(model(xs), ys, reduction="sum") * D.loss_scale(10, world)).backward()
        score_grads.append(model[1].scores.grad)
    mean_scores = (score_grads[0] + score_grads[1]) / 2
    via_w = ((weight_grads[0] + weight_grads[1]) / 2).unsqueeze(1) * model[1].bank
    torch.testing.assert_close(via_w, mean_scores, rtol=1e-5, atol=1e-9)


def _torchrun(mnist_root, out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "slotpack",
        "train",
        "--model",
        "lenet300100",
        "--epochs",
        str(RUN["epochs"]),
        "--limit",
        str(RUN["limit"]),
        "--eval-limit",
        str(RUN["eval_limit"]),
        "--batch-size",
        str(RUN["batch_size"]),
        "--device",
        "cpu",
        "--root",
        str(mnist_root),
        "--out",
        str(out),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("reduce", ["scores", "weights"])
def test_two_gloo_ranks_train_like_one_process(mnist_root, tmp_path, reduce):
    """torchrun, 2 CPU processes: identical replicas, and the single process's training."""
    out = tmp_path / "ddp"
    proc = _torchrun(mnist_root, out, "--grad-reduce", reduce)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(2 ranks)") == 1  # only rank 0 prints
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["grad_reduce"] == reduce
    digests = result["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    packed = result["packed_digests"]  # the .slot file is the same whichever rank packs
    assert len(packed) == 2 and packed[0] == packed[1]
    ddp_last = load_checkpoint(out / "last.pt")
    model = models.create("lenet300100", 8)
    model.load_state_dict(ddp_last["model"])
    assert D.digest(model) == digests[0]  # what rank 0 saved is what both ranks hold

    train(TrainConfig(**RUN), tmp_path / "single", root=mnist_root, device="cpu")
    single = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    for name, scores in single.items():
        other = ddp_last["model"][name]
        if not torch.is_tensor(scores):  # a slot layer's record: seed, number, K, ...
            assert other == scores, name
            continue
        # Same data, same gradient up to float summation order over 20 steps.
        torch.testing.assert_close(other, scores, rtol=0, atol=1e-6)
        agree = (other.argmax(1) == scores.argmax(1)).float().mean().item()
        assert agree > 0.999, (name, agree)
    assert TrainConfig(**RUN).resolved().to_dict() == ddp_last["config"]


@pytest.mark.slow
def test_two_ranks_step_in_backward_with_weight_reduction(mnist_root, tmp_path):
    proc = _torchrun(mnist_root, tmp_path / "sib", "--grad-reduce", "weights", "--step-in-backward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "sib" / "result.json").read_text())
    assert len(set(result["replica_digests"])) == 1
    refused = _torchrun(mnist_root, tmp_path / "no", "--step-in-backward")  # DDP over scores
    assert refused.returncode != 0 and "--grad-reduce weights" in refused.stderr
    assert not (tmp_path / "no").exists()

"""The command line: the README's path on a subset, and one-line errors with exit code 2."""

import json

import pytest
from click.testing import CliRunner

from slotpack import format as F
from slotpack.cli import main
from slotpack.pack import repack
from tests.helpers import one_line_error as _one_line_error


@pytest.fixture()
def run(monkeypatch):
    def invoke(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def test_train_eval_finetune(run, mnist_root, tmp_path):
    out = tmp_path / "lenet-k8"
    r = run(
        "train",
        "--model",
        "lenet300100",
        "--dataset",
        "mnist",
        "--k",
        "8",
        "--selection",
        "greedy",
        "--epochs",
        "1",
        "--limit",
        "3000",
        "--eval-limit",
        "2000",
        "--root",
        mnist_root,
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "test acc" in r.output
    assert (out / "best.pt").is_file() and (out / "metrics.jsonl").is_file()
    r = run("eval", out, "--root", mnist_root, "--json", "--limit", "1000")
    assert r.exit_code == 0, r.output
    record = json.loads(r.output)
    assert record["count"] == 1000 and record["accuracy"] > 0.7
    result = json.loads((out / "result.json").read_text())
    r = run("eval", out, "--root", mnist_root, "--limit", "2000")
    assert f"{result['test_acc']:.4f}" in r.output
    r = run(
        "finetune",
        out,
        "--epochs",
        "1",
        "--limit",
        "2000",
        "--eval-limit",
        "1000",
        "--root",
        mnist_root,
        "--out",
        tmp_path / "ft",
    )
    assert r.exit_code == 0, r.output
    ft = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert ft["method"] == "learned"
    # The same folder again without --resume is refused, and nothing is overwritten.
    before = (out / "best.pt").read_bytes()
    r = run("train", "--model", "lenet300100", "--epochs", "1", "--root", mnist_root, "--out", out)
    _one_line_error(r, "already holds a run", "--resume")
    assert (out / "best.pt").read_bytes() == before


def test_train_with_the_memory_options(run, mnist_root, tmp_path):
    out = tmp_path / "lean"
    r = run(
        "train",
        "--model",
        "lenet300100",
        "--epochs",
        "1",
        "--limit",
        "2000",
        "--eval-limit",
        "1000",
        "--lean",
        "--step-in-backward",
        "--score-dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--root",
        mnist_root,
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["lean"] and config["step_in_backward"] and config["score_dtype"] == "bfloat16"
    assert json.loads((out / "result.json").read_text())["test_acc"] > 0.6


def test_env_var_sets_the_data_root(run, mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTPACK_DATA", str(mnist_root))
    r = run("data", "mnist")
    assert r.exit_code == 0 and str(mnist_root) in r.output
    monkeypatch.setenv("SLOTPACK_DATA", str(tmp_path / "empty"))
    r = run("train", "--model", "lenet300100", "--out", tmp_path / "x")
    _one_line_error(r, "MNIST not found", "slotpack data mnist")


@pytest.mark.parametrize(
    "args,needles",
    [
        (["train", "--model", "resnet50", "--out", "x"], ["unknown model", "lenet300100"]),
        (["train", "--model", "conv2", "--k", "1", "--out", "x"], ["K must be >= 2"]),
        (["train", "--model", "conv2", "--method", "frozen", "--out", "x"], ["frozen"]),
        (
            ["train", "--model", "conv2", "--dataset", "mnist", "--out", "x"],
            ["defined for cifar10"],
        ),
        (["train", "--model", "conv2", "--milestones", "a,b", "--out", "x"], ["milestones"]),
        (["train", "--model", "conv2", "--score-dtype", "fp8", "--out", "x"], ["fp8"]),
        (
            ["train", "--model", "conv2", "--method", "learned", "--score-dtype", "bfloat16"]
            + ["--out", "x"],
            ["no scores"],
        ),
        (["train", "--model", "conv2", "--kernel", "fast", "--out", "x"], ["fast", "triton"]),
        (["train", "--model", "conv2", "--kernel", "triton", "--out", "x"], ["add --lean"]),
        (
            ["train", "--model", "conv2", "--lean", "--kernel", "triton", "--device", "cpu"]
            + ["--out", "x"],
            ["needs a CUDA device"],
        ),
        (["eval", "does-not-exist"], ["no checkpoint"]),
        (["data", "imagenet"], ["imagenet"]),
    ],
)
def test_bad_input_is_one_line_exit_2(run, tmp_path, monkeypatch, args, needles):
    monkeypatch.chdir(tmp_path)
    _one_line_error(run(*args), *needles)


def test_corrupt_checkpoint_is_one_line(run, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    _one_line_error(run("eval", bad), "cannot read checkpoint")


def test_cuda_without_cuda_is_one_line(run, mnist_root, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path does not apply")
    r = run(
        "train",
        "--model",
        "lenet300100",
        "--device",
        "cuda",
        "--root",
        mnist_root,
        "--out",
        tmp_path / "x",
    )
    _one_line_error(r, "no CUDA device")


@pytest.fixture(scope="module")
def lenet_run(mnist_root, tmp_path_factory):
    from slotpack.train import TrainConfig, train

    out = tmp_path_factory.mktemp("cli") / "lenet-k8"
    cfg = TrainConfig(model="lenet300100", k=8, epochs=1, limit=3000, eval_limit=1000)
    train(cfg, out, root=mnist_root, device="cpu")
    return out


def test_pack_inspect_unpack(run, lenet_run, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    from slotpack.runtime import rebuild
    from slotpack.train import load_model

    slot = tmp_path / "lenet-k8.slot"
    r = run("pack", lenet_run, "-o", slot)
    assert r.exit_code == 0, r.output
    assert "bits per connection" in r.output and "smaller than float32" in r.output
    size = slot.stat().st_size
    assert f"{size:,} bytes" in r.output and size <= 101_500
    # The checkpoint file itself packs to the same bytes as its run folder.
    r = run("pack", lenet_run / "best.pt", "-o", tmp_path / "again.slot")
    assert r.exit_code == 0 and (tmp_path / "again.slot").read_bytes() == slot.read_bytes()

    r = run("inspect", slot)
    assert r.exit_code == 0 and "300x784" in r.output and "not verified" in r.output
    r = run("inspect", slot, "--json", "--verify")
    report = json.loads(r.output)
    assert report["checksums_verified"] and report["k"] == 8 and report["index_bits"] == 3
    assert [row["shape"] for row in report["layers"]] == [[300, 784], [100, 300], [10, 100]]
    assert report["total"]["bytes"] == size and report["metadata"]["model"] == "lenet300100"

    r = run("unpack", slot, "-o", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    arrays = load_file(tmp_path / "w.safetensors")
    model, _ = load_model(lenet_run)
    model.eval()
    assert np.array_equal(arrays["1.weight"], model[1].weight().detach().numpy())
    r = run("unpack", slot, "-o", tmp_path / "w.npz")
    assert r.exit_code == 0 and set(np.load(tmp_path / "w.npz").files) == set(rebuild(slot))


def test_pack_refuses_to_overwrite_and_bad_files(run, lenet_run, mnist_root, tmp_path):
    slot = tmp_path / "m.slot"
    assert run("pack", lenet_run, "-o", slot).exit_code == 0
    before = slot.read_bytes()
    _one_line_error(run("pack", lenet_run, "-o", slot), "exists", "--force")
    assert slot.read_bytes() == before
    assert run("pack", lenet_run, "-o", slot, "--force").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.slot"]  # no temporary files left

    corrupt = tmp_path / "corrupt.slot"
    corrupt.write_bytes(before[:-10])
    _one_line_error(run("inspect", corrupt), "corrupt.slot", "declares")
    flipped = bytearray(repack(F.decode(before), index_encoding="bits"))  # any 3 bits are valid
    flipped[-5] ^= 0xFF
    (tmp_path / "flipped.slot").write_bytes(bytes(flipped))
    assert run("inspect", tmp_path / "flipped.slot").exit_code == 0  # table only reads the manifest
    broken = bytearray(before)  # a delta stream that no longer parses: refused even unverified
    last = F.decode(before).sections["5.indices"]
    assert last.encoding == "delta" and last.length
    start = len(before) - F.decode(before).payload.nbytes + last.offset
    broken[start : start + last.length] = b"\xff" * last.length  # a unary code that never ends
    (tmp_path / "broken.slot").write_bytes(bytes(broken))
    _one_line_error(run("inspect", tmp_path / "broken.slot"), "broken.slot", "section 5.indices")
    _one_line_error(run("inspect", tmp_path / "flipped.slot", "--verify"), "CRC-32")
    _one_line_error(run("unpack", tmp_path / "flipped.slot", "-o", tmp_path / "x.npz"), "CRC-32")
    assert not (tmp_path / "x.npz").exists()
    _one_line_error(run("unpack", slot, "-o", tmp_path / "x.pt"), ".safetensors or .npz")
    _one_line_error(run("inspect", lenet_run / "best.pt"), "not a .slot file")
    _one_line_error(run("inspect", tmp_path / "missing.slot"), "missing.slot")
    _one_line_error(run("pack", tmp_path / "nothing", "-o", tmp_path / "n.slot"), "no checkpoint")

    learned = tmp_path / "fp32"
    r = run(
        "train",
        "--model",
        "lenet300100",
        "--method",
        "learned",
        "--epochs",
        "1",
        "--limit",
        "500",
        "--eval-limit",
        "500",
        "--root",
        mnist_root,
        "--out",
        learned,
    )
    assert r.exit_code == 0, r.output
    _one_line_error(
        run("pack", learned, "-o", tmp_path / "fp32.slot"), "no slots to pack", "slotpack export"
    )
    assert not (tmp_path / "fp32.slot").exists()

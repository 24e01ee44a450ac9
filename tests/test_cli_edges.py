"""Rough edges a new user met on the command line (issue 14, part 4), one test per edge: each
refusal is one line and exit code 2, before any work, and leaves nothing half-written."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from slotpack import models
from slotpack.cli import main
from slotpack.pack import pack_model
from slotpack.train import TrainConfig
from tests.helpers import one_line_error

README = Path(__file__).resolve().parents[1] / "README.md"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _checkpoint(folder: Path, method: str = "slot", k: int = 2) -> Path:
    """A run folder whose best.pt is what `slotpack train` writes (untrained, no data needed)."""
    slots = {"k": k} if method == "slot" else {}
    cfg = TrainConfig(model="lenet300100", method=method, **slots).resolved()
    model = models.create("lenet300100", k, method=method)
    folder.mkdir()
    torch.save(
        {
            "slotpack_checkpoint": 1,
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "epoch": 0,
        },
        folder / "best.pt",
    )
    return folder


@pytest.fixture(scope="module")
def slot_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("edges") / "m.slot"
    path.write_bytes(pack_model(models.create("lenet300100", 2))[0])
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------ 1. -o names a file


def test_output_must_be_a_file_in_an_existing_folder(slot_file, tmp_path):
    run = _checkpoint(tmp_path / "run")
    (tmp_path / "outdir").mkdir()
    before = _listing(tmp_path)
    for command, source in [("export", slot_file), ("pack", run), ("unpack", slot_file)]:
        for target in ("newdir/", "outdir/", "outdir"):
            r = cli(command, source, "-o", f"{tmp_path}/{target}")  # Path drops a final /
            one_line_error(r, "is a folder", "name the file to write in it")
        r = cli(command, source, "-o", tmp_path / "missing" / "deeper" / "m.out")
        one_line_error(r, "folder", "missing/deeper does not exist", "create it first")
    assert _listing(tmp_path) == before  # no file named after the folder, no folder created
    r = cli("pack", run, "-o", f"{tmp_path}/outdir/")
    one_line_error(r, f"-o {tmp_path / 'outdir' / 'run.slot'}")  # the hint names a real file


# ------------------------------------------------------------------ 2. never an input


def test_output_is_never_an_input_even_with_force(slot_file, tmp_path):
    copy = tmp_path / "self.slot"
    copy.write_bytes(slot_file.read_bytes())
    os.symlink(copy, tmp_path / "link.slot")
    os.link(copy, tmp_path / "hard.slot")
    run = _checkpoint(tmp_path / "run")
    best = (run / "best.pt").read_bytes()
    cases = [
        ("export", copy, copy),
        ("export", copy, tmp_path / "link.slot"),
        ("export", tmp_path / "link.slot", tmp_path / "hard.slot"),
        ("unpack", copy, tmp_path / "hard.slot"),
        ("pack", copy, tmp_path / "link.slot"),
        ("pack", run, run / "best.pt"),
        ("export", run / "best.pt", run / "best.pt"),
    ]
    for command, source, target in cases:
        one_line_error(cli(command, source, "-o", target, "--force"), "is the input file")
    assert copy.read_bytes() == slot_file.read_bytes() and (run / "best.pt").read_bytes() == best
    r = cli("finetune", run, "--out", run, "--epochs", "1")
    one_line_error(r, "is the run being finetuned")


# ------------------------------------------------------------------ 3. corrupt checkpoints


def test_corrupt_checkpoints_say_what_is_wrong(tmp_path):
    import zipfile

    good = (_checkpoint(tmp_path / "run") / "best.pt").read_bytes()
    middle = len(good) // 2
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("notes.txt", "a zip, but not torch's")
    cases = {
        "empty.pt": (b"", "the file is empty"),
        "text.pt": (b"hello\n", "not a PyTorch checkpoint"),
        "short.pt": (good[:10], "truncated or damaged"),
        "half.pt": (good[:middle], "truncated or damaged"),
        "flipped.pt": (
            good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1 :],
            "fails its CRC-32 check",
        ),
        "other.pt": (None, "not a PyTorch checkpoint torch can load"),
    }
    for name, (blob, needle) in cases.items():
        if blob is not None:
            (tmp_path / name).write_bytes(blob)
        for command in (["eval", tmp_path / name], ["pack", tmp_path / name, "-o", tmp_path / "x"]):
            r = cli(*command)
            one_line_error(r, f"cannot read checkpoint {tmp_path / name}: ", needle)
            for internal in ("pop from empty list", "EOFError", "miniz", "PytorchStreamReader"):
                assert internal not in r.output
    assert not (tmp_path / "x").exists()

    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    wrong_k = {**ckpt, "config": {**ckpt["config"], "k": 4}}
    torch.save(wrong_k, tmp_path / "k4.pt")
    one_line_error(
        cli("eval", tmp_path / "k4.pt"),
        "does not fit model lenet300100 (slot, K=4, greedy)",
        "1.scores has shape [235200, 2], the model expects [235200, 4]",
    )
    learned = TrainConfig(model="lenet300100", method="learned").resolved().to_dict()
    torch.save({**ckpt, "config": learned}, tmp_path / "as-learned.pt")
    r = cli("eval", tmp_path / "as-learned.pt")
    one_line_error(r, "it lacks 1.weight, 3.weight, 5.weight", "unexpected 1.scores")
    assert "Error(s) in loading state_dict" not in r.output


# ------------------------------------------------------------------ 4. eval's data set


def test_eval_names_the_data_set_a_model_expects_before_loading_data(tmp_path, monkeypatch):
    import onnx

    from slotpack import datafiles
    from slotpack.pipeline import dense_onnx

    conv2 = tmp_path / "conv2.onnx"
    conv2.write_bytes(dense_onnx(models.create("conv2", method="learned").eval()))
    anonymous = onnx.load(conv2)
    for prop in anonymous.metadata_props:
        if prop.key == "metadata":
            prop.value = "{}"  # a foreign file: records no data set
    onnx.save(anonymous, tmp_path / "anon.onnx")

    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded before the model's input was checked")

    monkeypatch.setattr(datafiles, "load_arrays", no_loading)
    r = cli("eval", conv2, "--dataset", "mnist", "--root", tmp_path)
    one_line_error(r, "CIFAR-10 model", "CIFAR-10-shaped input [N, 3, 32, 32]", "on MNIST")
    r = cli("eval", tmp_path / "anon.onnx", "--dataset", "mnist", "--root", tmp_path)
    one_line_error(
        r, "expects CIFAR-10-shaped input [N, 3, 32, 32]", "MNIST images are [N, 1, 28, 28]"
    )
    assert len(r.output.strip().splitlines()) == 1  # no progress bar before it


# ------------------------------------------------------------------ 5-7. float32 runs


@pytest.fixture(scope="module")
def learned_run(mnist_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learned") / "lenet-fp32"
    r = cli(
        "train",
        "--model",
        "lenet300100",
        "--method",
        "learned",
        "--epochs",
        "1",
        "--limit",
        "600",
        "--eval-limit",
        "300",
        "--device",
        "cpu",
        "--root",
        mnist_root,
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    return out


def test_float32_runs_export_and_do_not_pack(learned_run, tmp_path):
    from slotpack.runtime import session
    from slotpack.train import load_model

    for source in (learned_run, learned_run / "best.pt"):
        out = tmp_path / f"{source.name}.onnx"
        r = cli("export", source, "-o", out)
        assert r.exit_code == 0, r.output
        assert f"{out.stat().st_size:,} bytes (dense float32" in r.output
    model, _ = load_model(learned_run)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    sess = session(out)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(got, expected, atol=1e-5)

    r = cli("pack", learned_run, "-o", tmp_path / "fp32.slot")
    one_line_error(r, "float32 model", "no slots to pack", f"slotpack export {learned_run}")
    r = cli("export", learned_run, "-o", tmp_path / "tiny.onnx", "--self-decoding")
    one_line_error(r, "--self-decoding exports .slot files")
    slot_run = _checkpoint(tmp_path / "slot-run")
    one_line_error(cli("export", slot_run, "-o", tmp_path / "s.onnx"), "pack it first")
    assert not {"fp32.slot", "tiny.onnx", "s.onnx"} & {p.name for p in tmp_path.iterdir()}


def test_float32_runs_carry_no_k_or_selection(learned_run, mnist_root, tmp_path):
    from slotpack.errors import ConfigError
    from slotpack.train import finetune_config

    for option in (
        ["--k", "1"],
        ["--k", "8"],
        ["--selection", "greedy"],
        ["--init", "uniform"],
        ["--lean"],
    ):
        r = cli("train", "--model", "lenet300100", "--method", "learned", *option, "--out", "x")
        one_line_error(r, option[0], "only slot models have slots")
    with pytest.raises(ConfigError, match="apply to slot models"):
        TrainConfig(model="lenet300100", method="learned", k=4)
    slot_only = {"k", "layer_k", "selection", "init", "rate", "layer_rate", "score_dtype"}
    for name in ("config.json", "result.json"):
        assert not slot_only & set(json.loads((learned_run / name).read_text()))
    r = cli("eval", learned_run, "--root", mnist_root, "--limit", "100")
    assert r.exit_code == 0 and "lenet300100 (learned, float32) test accuracy" in r.output
    r = cli("eval", learned_run, "--root", mnist_root, "--limit", "100", "--json")
    assert "k" not in json.loads(r.output)
    # Older records of a learned run with K and selection still load, without them.
    old = {**json.loads((learned_run / "config.json").read_text()), "k": 16, "selection": "greedy"}
    assert TrainConfig.from_dict(old) == TrainConfig.from_dict({**old, "k": 8})
    # The finetuned twin of a K=4 slot run keeps none of its source's slot settings.
    cfg = finetune_config(_checkpoint(tmp_path / "k4", k=4), epochs=1)
    assert cfg.method == "learned" and "k" not in cfg.to_dict()


def test_eval_options_that_do_not_apply_are_refused_or_honoured(
    learned_run, mnist_root, tmp_path, monkeypatch
):
    from slotpack import train

    r = cli("eval", learned_run, "--dataset", "cifar10", "--root", mnist_root)
    one_line_error(r, "run on MNIST", "cannot be evaluated on CIFAR-10")
    sizes = []
    evaluate = train.evaluate
    monkeypatch.setattr(
        train, "evaluate", lambda m, d, batch_size: sizes.append(batch_size) or evaluate(m, d)
    )
    r = cli("eval", learned_run, "--root", mnist_root, "--limit", "50", "--batch-size", "7")
    assert r.exit_code == 0 and sizes == [7], r.output
    onnx_file = tmp_path / "m.onnx"
    assert cli("export", learned_run, "-o", onnx_file).exit_code == 0
    r = cli("eval", onnx_file, "--device", "cpu", "--root", mnist_root)
    one_line_error(r, "--device applies to run folders and checkpoints", "onnxruntime")


# ------------------------------------------------------------------ 8. CIFAR-10 offline


def test_cifar10_offline_leaves_nothing_and_says_where_the_archive_goes(tmp_path, monkeypatch):
    import torchvision

    class Offline(torchvision.datasets.CIFAR10):  # what torchvision does without internet
        def __init__(self, root, train, download):
            Path(root).mkdir(parents=True, exist_ok=True)
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
            raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    root = tmp_path / "fresh" / "data"
    r = cli("data", "cifar10", "--root", root)
    one_line_error(
        r,
        "could not download CIFAR-10",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        f"copy it to {root}/cifar-10-python.tar.gz",
        f"slotpack data cifar10 --root {root}/",
    )
    assert "benchmarks" not in r.output and list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    one_line_error(cli("data", "cifar10", "--root", tmp_path / "mine"), "could not download")
    assert _listing(tmp_path / "mine") == ["notes.txt"]  # a user's folder stays, as it was


# ------------------------------------------------------------------ 10. the demo's folder


def test_demo_reruns_into_its_own_folder_and_never_elsewhere(mnist_root, tmp_path, monkeypatch):
    from slotpack import pipeline
    from slotpack.errors import ConfigError

    def stop(*args, **kwargs):  # the folder logic is all this test needs: stop before training
        raise ConfigError("stopped before training")

    monkeypatch.setattr(pipeline, "train", stop)
    own = tmp_path / "runs" / "demo"
    one_line_error(cli("demo", "--out", own, "--root", mnist_root), "stopped before training")
    assert (own / pipeline.MARKER).is_file()
    (own / "lenet-k8.slot").write_text("an earlier demo's file")
    (own / "slot-k8").mkdir()
    r = cli("demo", "--out", own, "--root", mnist_root)  # a rerun, no --force
    one_line_error(r, "stopped before training")
    assert _listing(own) == [pipeline.MARKER]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "lenet-k8.slot").write_text("mine too")
    r = cli("demo", "--out", mine, "--root", mnist_root)
    one_line_error(r, "did not create", "--force")
    assert _listing(mine) == ["lenet-k8.slot", "notes.txt"]
    one_line_error(cli("demo", "--out", mine, "--root", mnist_root, "--force"), "stopped")
    assert _listing(mine) == ["notes.txt"]  # --force replaced the demo's file, nothing else


# ------------------------------------------------------------------ 11-12. help and README


def test_help_texts_show_choices_and_defaults():
    train_help = " ".join(cli("train", "--help").output.split())
    assert "--dataset [mnist|cifar10]" in cli("eval", "--help").output
    assert "--dataset [mnist|cifar10]" in train_help
    assert re.search(r"--schedule \[constant\|cosine\|step\]\s+Learning-rate schedule", train_help)
    assert "Default: constant" in train_help and "Default: 0, and 1e-4" in train_help
    finetune_help = " ".join(cli("finetune", "--help").output.split())
    for option in ("--limit INTEGER Use", "--eval-limit INTEGER Use", "--resume Continue"):
        assert option in finetune_help, option
    assert "--float16" in README.read_text()


def test_readme_writes_under_runs_and_needs_no_other_folder():
    text = README.read_text()
    assert "../shared" not in text and "cifar-10-python.tar.gz" in text
    assert "about a minute" not in text and "about 3 minutes" in text
    bash = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
    targets = re.findall(r"(?:-o|--out) (\S+)", bash)
    assert targets and all(t.startswith("runs/") for t in targets), targets
    assert "/runs/" in (README.parent / ".gitignore").read_text().split()

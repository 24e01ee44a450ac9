"""``pip install slotpack`` without torch: the wheel, a fresh venv, the runtime commands there.

Builds the project's wheel, installs it into a new venv with its dependencies from the package
index, checks that torch is not importable there, and runs every runtime command in that venv
on a small ``.slot`` file; eval's accuracy must equal this (full) install's. The sizes on disk
are recorded by ``python -m benchmarks.install_size``, not here.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from benchmarks.install_size import build_wheel, runtime_venv
from slotpack import format as F
from slotpack import models
from slotpack.cli import main
from slotpack.datafiles import load_arrays
from slotpack.pack import pack_model
from slotpack.runtime import rebuild
from tests.helpers import trained_like

pytestmark = pytest.mark.slow
# The venv must see only what it installed: no PYTHONPATH pointing at a checkout.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("install")
    return runtime_venv(build_wheel(folder), folder / "venv")


def _run(bin_: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(bin_ / args[0]), *map(str, args[1:])],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,  # not the checkout: only the installed wheel is importable
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    return r


def test_runtime_install_has_no_torch_and_runs_every_runtime_command(venv, mnist_root, tmp_path):
    r = subprocess.run(
        [str(venv / "python"), "-c", "import torch"], capture_output=True, text=True, env=ENV
    )
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    where = _run(venv, "python", "-c", "import slotpack; print(slotpack.__file__)", cwd=tmp_path)
    assert str(venv.parent) in where.stdout  # the wheel's copy, not the checkout

    slot = tmp_path / "lenet.slot"
    model = trained_like(models.create("lenet300100", 8, seed=9))
    F.write(slot, pack_model(model, metadata={"dataset": "mnist"})[0])
    report = json.loads(_run(venv, "slotpack", "inspect", slot, "--json", cwd=tmp_path).stdout)
    assert report["total"]["connections"] == model.arch.num_connections
    _run(venv, "slotpack", "unpack", slot, "-o", tmp_path / "w.npz", cwd=tmp_path)
    weights = np.load(tmp_path / "w.npz")
    for name, array in rebuild(slot).items():
        assert np.array_equal(weights[name], array), name
    _run(venv, "slotpack", "export", slot, "-o", tmp_path / "dense.onnx", cwd=tmp_path)
    _run(
        venv,
        "slotpack",
        "export",
        slot,
        "-o",
        tmp_path / "tiny.onnx",
        "--self-decoding",
        cwd=tmp_path,
    )
    _run(
        venv,
        "slotpack",
        "pack",
        slot,
        "-o",
        tmp_path / "bits.slot",
        "--encoding",
        "bits",
        cwd=tmp_path,
    )

    n = 1000
    full = CliRunner().invoke(
        main, ["eval", str(slot), "--root", str(mnist_root), "--limit", str(n), "--json"]
    )
    assert full.exit_code == 0, full.output
    want = json.loads(full.output)["accuracy"]
    for target in (slot, tmp_path / "dense.onnx", tmp_path / "tiny.onnx", tmp_path / "bits.slot"):
        out = _run(
            venv,
            "slotpack",
            "eval",
            target,
            "--root",
            mnist_root,
            "--limit",
            n,
            "--json",
            cwd=tmp_path,
        )
        record = json.loads(out.stdout)
        assert (record["accuracy"], record["count"]) == (want, n), target

    x, _, _ = load_arrays("mnist", mnist_root, "test", 3)
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(x[i, 0]).save(images[-1])
    ours = CliRunner().invoke(main, ["predict", str(slot), *map(str, images), "--json"])
    theirs = _run(venv, "slotpack", "predict", slot, *images, "--json", cwd=tmp_path)
    assert json.loads(theirs.stdout)["predictions"] == json.loads(ours.output)["predictions"]

    r = subprocess.run(
        [str(venv / "slotpack"), "train", "--model", "lenet300100", "--out", "run"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=ENV,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "Error: `slotpack train` needs torch, which the runtime-only install leaves out: "
        "pip install 'slotpack[train]'"
    )

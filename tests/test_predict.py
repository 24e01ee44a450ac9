"""``slotpack predict``: image files in, class and probability out, in onnxruntime.

Oracle: real MNIST test images saved as PNG must get the class that the per-image argmax of the
model's logits gives on the same images as ``eval`` feeds them (the data set's arrays).
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from converters.onnx import export_file
from slotpack import format as F
from slotpack import models
from slotpack.cli import main
from slotpack.datafiles import CIFAR10_LABEL_NAMES, load_arrays
from slotpack.pack import pack_model
from slotpack.runtime import predict, session
from slotpack.runtime.images import read_image
from slotpack.runtime.session import input_normalisation, normalize
from tests.helpers import one_line_error, trained_like

N = 40


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def mnist_case(mnist_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    slot = d / "lenet.slot"
    model = trained_like(models.create("lenet300100", 8, seed=11))
    F.write(slot, pack_model(model, metadata={"dataset": "mnist"})[0])
    export_file(slot, d / "lenet.onnx")
    x, y, _ = load_arrays("mnist", mnist_root, "test", N)
    paths = []
    for i in range(N):
        paths.append(d / f"test{i:02d}.png")
        Image.fromarray(x[i, 0]).save(paths[-1])
    return slot, d / "lenet.onnx", x, paths


@pytest.mark.parametrize("kind", ["slot", "onnx"])
def test_mnist_pngs_get_evals_per_image_argmax(mnist_case, kind):
    slot, onnx_path, x, paths = mnist_case
    target = slot if kind == "slot" else onnx_path
    sess = session(target)
    logits = predict(sess, normalize(x, *input_normalisation(sess)))
    r = _cli("predict", target, *paths, "--json", "--top", 3)
    assert r.exit_code == 0, r.output
    record = json.loads(r.output)
    assert record["dataset"] == "mnist" and len(record["predictions"]) == N
    for want, got, path in zip(logits, record["predictions"], paths, strict=True):
        p = np.exp(want - want.max())
        p /= p.sum()
        assert got["image"] == str(path) and got["class"] == int(want.argmax())
        assert [t["class"] for t in got["top"]] == list(np.argsort(-p, kind="stable")[:3])
        assert got["probability"] == pytest.approx(float(p.max()), rel=1e-5)
        assert got["top"][0]["label"] == str(got["class"])
    text = _cli("predict", target, paths[0])
    top = record["predictions"][0]
    assert text.output == f"{paths[0]}: {top['label']} ({top['probability']:.4f})\n"


def test_rgb_model_converts_and_resizes(tmp_path):
    """A CIFAR-10 model (3x32x32) reads a 48x40 JPEG and a grayscale PNG: converted to RGB,
    resized to 32x32, normalised with the model's mean and std; classes get CIFAR-10's names."""
    slot = tmp_path / "conv2.slot"
    model = trained_like(models.create("conv2", 4, seed=2))
    F.write(slot, pack_model(model, metadata={"dataset": "cifar10"})[0])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "b.png")
    images = [tmp_path / "a.jpg", tmp_path / "b.png"]
    x = np.stack([read_image(p, (3, 32, 32)) for p in images])
    with Image.open(images[0]) as img:
        want0 = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(x[0], want0)
    assert (x[1] == x[1][:1]).all()  # gray: three equal channels
    sess = session(slot)
    logits = predict(sess, normalize(x, *input_normalisation(sess)))
    r = _cli("predict", slot, *images, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["predictions"]
    assert [g["class"] for g in got] == logits.argmax(1).tolist()
    assert [g["label"] for g in got] == [CIFAR10_LABEL_NAMES[c] for c in logits.argmax(1)]


def test_bad_inputs_are_one_line(mnist_case, tmp_path):
    slot, _, _, paths = mnist_case
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(paths[0].read_bytes()[:60])
    one_line_error(_cli("predict", slot, slot), f"cannot read image {slot}", "not an image")
    one_line_error(_cli("predict", slot, tmp_path / "none.png"), "cannot read image", "none.png")
    one_line_error(_cli("predict", slot, truncated), f"cannot read image {truncated}")
    one_line_error(_cli("predict", paths[0], paths[0]), "predict takes a .slot or .onnx model")
    one_line_error(_cli("predict", tmp_path / "missing.slot", paths[0]), "missing.slot")
    one_line_error(_cli("predict", slot, paths[0], "--top", 0), "--top")

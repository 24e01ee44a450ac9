"""``slotpack export --web``: the page in headless Chromium against onnxruntime in Python, bit for bit.

The browser tests need Chromium (``apt-get install chromium``) and onnxruntime-web's npm files
(``npm ci --prefix runtime/web``); ``.ci/run`` installs both. Where they are missing the tests
fail and say how to get them; ``SLOTPACK_SKIP_BROWSER=1`` skips them instead, visibly.
"""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from benchmarks.browser import chromium, run_node, run_page
from slotpack import arch as A
from slotpack import format as F
from slotpack.cli import main
from slotpack.converters import web
from slotpack.runtime import session
from slotpack.runtime.session import input_normalisation, normalize
from tests.helpers import one_line_error


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("SLOTPACK_SKIP_BROWSER") == "1":
        pytest.skip("SLOTPACK_SKIP_BROWSER=1")
    path = chromium()
    if path is None:
        pytest.fail("no Chromium: apt-get install chromium (or set $SLOTPACK_CHROMIUM)")
    try:
        web.find_ort_web()
    except web.WebAssetsError as exc:
        pytest.fail(str(exc))
    return path


@pytest.fixture(scope="module")
def lenet_slot(tmp_path_factory):
    """Lenet-300-100 at K=8 with random scores (most connections off their initial slot)."""
    import torch

    from slotpack import create, pack_model

    model = create("lenet300100", k=8, seed=7)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.weighted_layers():
            layer.scores.copy_(torch.rand(layer.scores.shape, generator=g))
    blob, _ = pack_model(model, metadata={"dataset": "mnist", "model": "lenet300100"})
    path = tmp_path_factory.mktemp("web") / "lenet.slot"
    path.write_bytes(blob)
    return path


def _rgb_slot(path):
    """A small 3x32x32 model (one K=8 linear layer, random indices): the page's colour path."""
    layers = (A.Flatten(), A.Linear(3 * 32 * 32, 10))
    count = 3 * 32 * 32 * 10
    rng = np.random.default_rng(1)
    blob = F.encode(
        layers=layers,
        seed=11,
        k=8,
        selection="greedy",
        input_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        num_classes=10,
        blobs={"1.indices": ("bits", (count,), rng.bytes(count * 3 // 8))},
        metadata={"dataset": "cifar10"},
    )
    path.write_bytes(blob)
    return path


def _bits(a: np.ndarray) -> list[int]:
    return np.ascontiguousarray(a, np.float32).view(np.uint32).ravel().tolist()


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, "<f4").tobytes()).hexdigest()


def _probe(folder) -> list[str]:
    """Write ``probe.onnx``: model.onnx with every Gemm/Conv weight (decoded in the graph) as an
    extra output. Returns the weights' names."""
    model = onnx.load(folder / "model.onnx")
    weights = [n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "Conv")]
    for name in weights:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    onnx.save(model, folder / "probe.onnx")
    return weights


def _check_page(folder, slot_path, image: np.ndarray, browser_path, png: bytes | None = None):
    """The page on ``image`` (uint8 [C, H, W]; or on ``png``, its file) against onnxruntime in
    Python and in Node.js.

    Bit for bit: the normalised input, every weight the graph regenerates (Python onnxruntime's
    constant folding against the browser's), and the logits against onnxruntime-web in Node.js
    (the same wasm). Against Python's logits only closely: x86 MLAS kernels use FMA and another
    summation order than the wasm SIMD ones, so the last bits of a dot product differ.
    """
    if png is None:
        report = run_page(folder, image.tobytes(), browser=browser_path)
    else:  # an image file of ``image``'s pixels, at the model's size
        report = run_page(folder, png=png, browser=browser_path)
    assert report["ok"], report
    assert report["pixels"] == image.ravel().tolist()
    assert report["ort_version"] == web.PINNED
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    mean, std = input_normalisation(sess)
    x = normalize(image[None], mean, std)
    assert report["input_bits"] == _bits(x)
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    dense = session(slot_path)  # the dense export, built in memory from the .slot file
    assert _bits(logits) == _bits(dense.run(None, {dense.get_inputs()[0].name: x})[0])
    got = np.asarray(report["logits_bits"], np.uint32).view(np.float32).reshape(logits.shape)
    assert np.abs(got - logits).max() <= 1e-5 * np.abs(logits).max(), (got, logits)
    assert report["prediction"] == int(logits.argmax())
    probs = np.exp(logits[0] - logits.max()) / np.exp(logits[0] - logits.max()).sum()
    np.testing.assert_allclose(report["probabilities"], probs, rtol=1e-4, atol=1e-6)

    weights = _probe(folder)
    probe = run_page(folder, image.tobytes(), model="probe.onnx", browser=browser_path)
    assert probe["ok"], probe
    assert probe["logits_bits"] == report["logits_bits"]
    psess = ort.InferenceSession(str(folder / "probe.onnx"), providers=["CPUExecutionProvider"])
    arrays = psess.run(weights, {psess.get_inputs()[0].name: x})
    for name, array in zip(weights, arrays, strict=True):
        assert probe["outputs"][name]["dims"] == list(array.shape)
        assert probe["outputs"][name]["sha256"] == _sha256(array), name

    node = run_node(web.find_ort_web()[0], folder / "model.onnx", x)
    assert node["logits_bits"] == report["logits_bits"]
    differ = int((got != logits).sum())
    print(f"{differ} of {logits.size} logits differ from Python's in the last bits")
    return report


@pytest.mark.slow
def test_mnist_page_matches_onnxruntime(browser, lenet_slot, mnist_root, tmp_path):
    from slotpack import data

    folder = tmp_path / "site"
    r = _cli("export", lenet_slot, "--web", folder)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "app.js",
        "index.html",
        "model.json",
        "model.onnx",
        "ort",
    ]
    config = json.loads((folder / "model.json").read_text())
    assert config["classes"] == [str(d) for d in range(10)] and config["input_shape"] == [1, 28, 28]
    test = data.load("mnist", mnist_root, "test", limit=1)
    image = test.x[0].numpy()  # uint8 [1, 28, 28], test image 0 (a 7)
    report = _check_page(folder, lenet_slot, image, browser)
    print(f"lenet300100 K=8 in Chromium: session {report['create_ms']:.0f} ms")


@pytest.mark.slow
def test_colour_page_reads_an_image_file_and_matches_onnxruntime(browser, tmp_path):
    """A 32x32 PNG, read as the page reads a dropped image, for a 3x32x32 model."""
    from PIL import Image

    slot_path = _rgb_slot(tmp_path / "rgb.slot")
    folder = tmp_path / "site"
    assert _cli("export", slot_path, "--web", folder).exit_code == 0
    assert json.loads((folder / "model.json").read_text())["classes"][0] == "airplane"
    image = np.random.default_rng(2).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    _check_page(folder, slot_path, image, browser, png=buffer.getvalue())


# ------------------------------------------------------------ the folder, without a browser


@pytest.fixture()
def fake_ort(tmp_path, monkeypatch):
    """A stand-in onnxruntime-web package (the export only copies its files)."""
    package = tmp_path / "node_modules" / "onnxruntime-web"
    (package / "dist").mkdir(parents=True)
    for name in web.ORT_FILES:
        (package / "dist" / name).write_text("//")
    (package / "package.json").write_text(json.dumps({"version": web.PINNED}))
    monkeypatch.setenv(web.ENV, str(package))
    return package


def test_ort_web_is_found_from_the_option_the_env_or_nowhere(fake_ort, tmp_path, monkeypatch):
    for given in (fake_ort, fake_ort / "dist", fake_ort.parent, fake_ort.parent.parent):
        assert web.find_ort_web(given) == (fake_ort / "dist", web.PINNED)
    assert web.find_ort_web() == (fake_ort / "dist", web.PINNED)  # $SLOTPACK_ORT_WEB
    slot_path = _rgb_slot(tmp_path / "m.slot")
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    r = _cli("export", slot_path, "--web", tmp_path / "a", "--ort-web", nowhere)
    one_line_error(
        r, "--ort-web", "no onnxruntime-web package there", "npm ci --prefix runtime/web"
    )
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(web, "_checkout_package", lambda: tmp_path / "nothing")
    monkeypatch.delenv(web.ENV)
    r = _cli("export", slot_path, "--web", tmp_path / "a")
    one_line_error(r, "onnxruntime-web's files not found", f"onnxruntime-web@{web.PINNED}")
    assert not (tmp_path / "a").exists()


def test_folder_is_complete_or_absent_and_never_replaces_others(fake_ort, tmp_path):
    slot_path = _rgb_slot(tmp_path / "m.slot")
    site = tmp_path / "out" / "site"
    assert _cli("export", slot_path, "--web", site).exit_code == 0
    assert (site / "ort" / "ort.wasm.min.js").read_text() == "//"
    assert (site / "model.onnx").stat().st_size == json.loads((site / "model.json").read_text())[
        "onnx_bytes"
    ]
    one_line_error(_cli("export", slot_path, "--web", site), "exists", "--force")
    (site / "mine.txt").write_text("x")
    assert _cli("export", slot_path, "--web", site, "--force").exit_code == 0
    assert not (site / "mine.txt").exists()  # an earlier page of ours is replaced whole
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    one_line_error(_cli("export", slot_path, "--web", other, "--force"), "not a page folder")
    assert (other / "notes.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("export", slot_path, "--web", empty).exit_code == 0  # an empty folder is filled
    bad = tmp_path / "bad.slot"
    bad.write_bytes(slot_path.read_bytes()[:-7])
    r = _cli("export", bad, "--web", tmp_path / "never")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not (tmp_path / "never").exists()
    leftovers = [p.name for p in tmp_path.rglob("*slotpack*")]
    assert leftovers == [], leftovers


def test_the_pin_is_one_version():
    folder = Path(__file__).resolve().parents[1] / "runtime" / "web"
    package = json.loads((folder / "package.json").read_text())
    lock = json.loads((folder / "package-lock.json").read_text())
    assert package["dependencies"]["onnxruntime-web"] == web.PINNED
    assert lock["packages"]["node_modules/onnxruntime-web"]["version"] == web.PINNED


def test_export_needs_one_output(tmp_path):
    slot_path = _rgb_slot(tmp_path / "m.slot")
    one_line_error(_cli("export", slot_path), "one of -o FILE and --web DIR")
    one_line_error(
        _cli("export", slot_path, "-o", tmp_path / "m.onnx", "--web", tmp_path / "s"), "one of"
    )
    one_line_error(
        _cli("export", slot_path, "-o", tmp_path / "m.onnx", "--ort-web", tmp_path), "--ort-web"
    )

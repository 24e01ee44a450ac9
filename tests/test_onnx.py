"""ONNX export and the onnxruntime runtime: checker, torch oracle, self-decoding graphs, CLI.

The oracle is the torch slot model in eval mode: a Lenet-300-100 trained briefly on real MNIST
(module fixture) and zoo/custom models with random scores on synthetic inputs. Self-decoding graphs
must give the dense graph's outputs bit for bit, and their decoded weights must be the numpy
rebuild's bits.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from slotpack import __version__, converters, data, models
from slotpack import arch as A
from slotpack import format as F
from slotpack.cli import main
from slotpack.converters.onnx import (
    IR_VERSION,
    MAX_INLINE_BYTES,
    OPSET,
    data_path,
    export,
    export_file,
    initializer_bytes,
)
from slotpack.errors import ConfigError, OutputExistsError
from slotpack.pack import encode_selection, pack_model, repack
from slotpack.runtime import evaluate, predict, rebuild, session
from slotpack.runtime.session import InputError, ModelFileError, input_normalisation, normalize
from slotpack.train import TrainConfig, load_model, pack_checkpoint, train
from tests.helpers import big_slot, one_line_failure, run_capped
from tests.helpers import one_line_error as _one_line_error
from tests.helpers import trained_like as _trained_like

NO_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"

# Every weighted layer has a connection count that is not a multiple of 8 except the last
# (180, 90, 30, 168), and every layer option the exporter maps is used once.
CUSTOM = A.Arch(
    "custom",
    "cifar10",
    (4, 15, 15),
    (
        A.Conv2d(4, 5, 3, stride=2, padding=1, bias=True),
        A.BatchNorm2d(5, eps=1e-3),
        A.ReLU(),
        A.Conv2d(5, 10, 3, padding=2, dilation=2, groups=5, bias=True),
        A.ReLU(),
        A.AvgPool2d(2, 2),
        A.Conv2d(10, 6, 1, groups=2),
        A.MaxPool2d(2, 2),
        A.Flatten(),
        A.Dropout(0.5),
        A.Linear(24, 7, bias=True),
    ),
    num_classes=7,
)
CUSTOM_MEAN, CUSTOM_STD = (0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)


# ----------------------------------------------------------------------------- helpers


def _random_file(arch: A.Arch, k: int, seed: int = 7, metadata: dict | None = None) -> bytes:
    """A .slot file with uniform random indices and tensors, straight from numpy (no torch)."""
    rng = np.random.default_rng(seed)
    indices = [rng.integers(0, k, int(np.prod(layer.weight_shape))) for layer in arch.weighted]
    tensors = {}
    for pos, layer in enumerate(arch.layers):
        if isinstance(layer, A.WEIGHTED) and layer.bias:
            tensors[f"{pos}.bias"] = rng.standard_normal(layer.weight_shape[0])
        if isinstance(layer, A.BatchNorm2d):
            tensors[f"{pos}.running_mean"] = rng.standard_normal(layer.num_features)
            tensors[f"{pos}.running_var"] = rng.random(layer.num_features) + 0.5
    c = arch.input_shape[0]
    return encode_selection(
        arch,
        seed=seed * 0x9E3779B97F4A7C15 % 2**64,
        k=k,
        selection="greedy",
        indices=indices,
        tensors=tensors,
        mean=CUSTOM_MEAN[:c],
        std=CUSTOM_STD[:c],
        metadata=metadata,
    )


def _check_graph(model: onnx.ModelProto, slot_bytes: bytes, *, self_decoding: bool) -> None:
    """Checker, strict shape inference, the pinned versions, names, metadata and form."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert model.ir_version == IR_VERSION == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)] and OPSET == 18
    slot = F.decode(slot_bytes)
    (inp,) = model.graph.input
    batch, *rest = inp.type.tensor_type.shape.dim
    assert inp.name == "input" and inp.type.tensor_type.elem_type == TensorProto.FLOAT
    assert batch.dim_param and not batch.HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in rest] == list(slot.input_shape)
    (out,) = model.graph.output
    batch_out, classes = out.type.tensor_type.shape.dim
    assert out.name == "logits" and batch_out.dim_param == batch.dim_param
    assert classes.dim_value == slot.manifest["num_classes"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["slotpack_version"] == __version__
    assert props["k"] == str(slot.k) and props["generator"] == "splitmix64-v1"
    assert props["seed"] == f"{slot.seed:016x}"
    assert props["source_sha256"] == hashlib.sha256(slot_bytes).hexdigest()
    assert json.loads(props["input_mean"]) == slot.manifest["input"]["mean"]
    assert json.loads(props["input_std"]) == slot.manifest["input"]["std"]
    assert props["self_decoding"] == str(self_decoding).lower()
    assert json.loads(props["metadata"]) == slot.manifest["metadata"]
    ops = {n.op_type for n in model.graph.node}
    assert "Dropout" not in ops
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "Conv")}
    inits = {i.name for i in model.graph.initializer}
    assert len(weights) == sum(isinstance(layer, A.WEIGHTED) for layer in slot.layers)
    if self_decoding:  # no weight is stored: each is computed from the seed and packed bytes
        assert weights.isdisjoint(inits) and {"BitShift", "BitwiseXor"} <= ops
    else:
        assert weights <= inits


def _sess(model: onnx.ModelProto | bytes):
    blob = model if isinstance(model, bytes) else model.SerializeToString()
    return session(blob, threads=2)


def _assert_equivalent(ref: np.ndarray, got: np.ndarray, min_agree: float = 0.999) -> None:
    """onnxruntime against torch: max abs diff within 1e-4 of the logit scale, same argmax."""
    assert got.shape == ref.shape and got.dtype == np.float32
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got - ref).max()) <= 1e-4 * scale
    assert float((got.argmax(1) == ref.argmax(1)).mean()) >= min_agree


def _decoded_weights(model: onnx.ModelProto, level) -> list[np.ndarray]:
    """The weight tensors a graph feeds into Gemm/Conv, made graph outputs and run in ORT."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = [n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "Conv")]
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    shape = [1, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]
    return sess.run(names, {"input": np.zeros(shape, np.float32)})


def _synthetic(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Trained:
    run: Path
    slot_path: Path
    blob: bytes
    model: models.Net
    x: np.ndarray  # uint8 [10000, 1, 28, 28], the MNIST test set
    y: np.ndarray
    xn: np.ndarray  # normalised as in training (torch's data.normalize)
    logits: np.ndarray  # the torch slot model's, eval mode


@pytest.fixture(scope="module")
def lenet(tmp_path_factory, mnist_root) -> Trained:
    """Lenet-300-100, K=8, one epoch on 3,000 real MNIST images, packed to a .slot file."""
    folder = tmp_path_factory.mktemp("onnx")
    cfg = TrainConfig(model="lenet300100", k=8, epochs=1, limit=3000, eval_limit=1000)
    train(cfg, folder / "run", root=mnist_root, device="cpu")
    blob, _ = pack_checkpoint(folder / "run")
    path = F.write(folder / "lenet.slot", blob)
    model, _ = load_model(folder / "run")
    model.eval()
    test = data.load("mnist", mnist_root, "test")
    xn = data.normalize(test.x, test.spec)
    with torch.inference_mode():
        logits = model(xn).numpy()
    return Trained(
        folder / "run", path, blob, model, test.x.numpy(), test.y.numpy(), xn.numpy(), logits
    )


@pytest.fixture()
def run():
    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


# ----------------------------------------------------------------------------- 1. graphs


@pytest.mark.parametrize("name", list(A.ZOO))
def test_zoo_graphs_pass_checker_and_self_decode_exactly(name):
    arch = A.get(name)
    blob = _random_file(arch, 8, metadata={"dataset": arch.dataset})
    slot = F.decode(blob)
    dense = export(slot, source=blob)
    selfdec = export(slot, self_decoding=True, source=blob)
    _check_graph(dense, blob, self_decoding=False)
    _check_graph(selfdec, blob, self_decoding=True)
    x = _synthetic(arch.input_shape, 3)
    got = predict(_sess(selfdec), x)
    assert got.shape == (3, 10) and np.array_equal(got, predict(_sess(dense), x))


def test_exported_files_say_what_was_pinned(lenet, tmp_path):
    for self_decoding in (False, True):
        out = tmp_path / f"lenet-{self_decoding}.onnx"
        size, slot_size = export_file(lenet.slot_path, out, self_decoding=self_decoding)
        assert size == out.stat().st_size and slot_size == len(lenet.blob)
        model = onnx.load(out)
        _check_graph(model, lenet.blob, self_decoding=self_decoding)
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["metadata"])["dataset"] == "mnist"
        sess = session(out)
        (inp,), (out_spec,) = sess.get_inputs(), sess.get_outputs()
        assert inp.name == "input" and isinstance(inp.shape[0], str)  # symbolic batch
        assert out_spec.name == "logits"
        for n in (1, 7):  # any batch size
            assert predict(sess, lenet.xn[:n]).shape == (n, 10)


# ----------------------------------------------------------------------------- 2. torch oracle


def test_lenet_on_mnist_matches_torch(lenet):
    sess = session(lenet.slot_path)
    got = predict(sess, lenet.xn)
    _assert_equivalent(lenet.logits, got)
    acc_torch = float((lenet.logits.argmax(1) == lenet.y).mean())
    acc_ort = float((got.argmax(1) == lenet.y).mean())
    assert acc_torch > 0.8  # it learned something, so the comparison means something
    assert abs(acc_ort - acc_torch) <= 0.0005  # 0.05 points
    # the self-decoding graph gives the same logits as the dense one, bit for bit
    selfdec = predict(session(lenet.slot_path, self_decoding=True), lenet.xn)
    assert np.array_equal(selfdec, got)


@pytest.mark.parametrize(
    "name,k,arch",
    [("conv2", 2, None), ("conv6", 8, None), ("custom", 5, CUSTOM)],
)
def test_conv_models_match_torch(name, k, arch):
    if arch is None:
        model = _trained_like(models.create(name, k, seed=2**64 - 3), seed=1)
        blob, _ = pack_model(model)
    else:
        model = _trained_like(models.Net(arch, "slot", k, "greedy", 12345), seed=2)
        blob, _ = pack_model(model, mean=CUSTOM_MEAN, std=CUSTOM_STD)
    x = _synthetic(model.arch.input_shape, 16, seed=k)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(ref).max() > 1e-3  # not a dead network
    slot = F.decode(blob)
    dense = export(slot, source=blob)
    selfdec = export(slot, self_decoding=True, source=blob)
    _check_graph(dense, blob, self_decoding=False)
    _check_graph(selfdec, blob, self_decoding=True)
    got = predict(_sess(dense), x)
    _assert_equivalent(ref, got, min_agree=1.0)
    assert np.array_equal(predict(_sess(selfdec), x), got)


# ----------------------------------------------------------------------------- 3. self-decoding


@pytest.mark.parametrize("k", [2, 3, 5, 8, 64, 256])
def test_self_decoding_is_bit_exact_for_any_k(k):
    for arch in (CUSTOM, A.get("lenet300100")):
        blob = _random_file(arch, k, seed=k)
        slot = F.decode(blob)
        dense, selfdec = export(slot, source=blob), export(slot, self_decoding=True, source=blob)
        if arch is CUSTOM:
            _check_graph(selfdec, blob, self_decoding=True)
        x = _synthetic(arch.input_shape, 5, seed=k)
        assert np.array_equal(predict(_sess(selfdec), x), predict(_sess(dense), x))
        # the decoded weights are the numpy rebuild's bits, with and without constant folding
        expected = [w for name, w in rebuild(slot).items() if name.endswith(".weight")]
        for level in (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ):
            for got, want in zip(_decoded_weights(selfdec, level), expected, strict=True):
                assert got.shape == want.shape
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_onnxruntime_folds_the_decoder_when_the_session_is_created(lenet, tmp_path):
    """No generator operator is left for inference: the weights are constants after loading."""
    selfdec = export(F.decode(lenet.blob), self_decoding=True, source=lenet.blob)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3  # the note that an ENABLE_ALL graph is machine-specific
    ort.InferenceSession(selfdec.SerializeToString(), options, ["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert ops and not ops & {"BitShift", "BitwiseXor", "BitwiseAnd", "Range", "Cast", "Mul"}


def test_float16_tensors_export_as_stored():
    model = _trained_like(models.Net(CUSTOM, "slot", 4, "greedy", 99), seed=5)
    blob, _ = pack_model(model, mean=CUSTOM_MEAN, std=CUSTOM_STD, encoding="float16")
    slot = F.decode(blob)
    dense, selfdec = export(slot, source=blob), export(slot, self_decoding=True, source=blob)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in dense.graph.initializer}
    bias = model[0].bias.detach().numpy()
    assert any(
        np.array_equal(v, bias.astype(np.float16).astype(np.float32)) for v in inits.values()
    )
    x = _synthetic(CUSTOM.input_shape, 4)
    assert np.array_equal(predict(_sess(selfdec), x), predict(_sess(dense), x))


def test_self_decoding_size_is_close_to_the_fixed_width_slot_file(lenet):
    """The graph keeps fixed-width indices (it needs random access), so it is about the size of
    the ``bits`` encoding of the same network, whatever encoding the .slot file uses."""
    conv6 = pack_model(_trained_like(models.create("conv6", 8, seed=4)))[0]
    for blob in (lenet.blob, conv6):
        bits = repack(F.decode(blob), index_encoding="bits")
        for slot in (F.decode(blob), F.decode(bits)):
            size = len(export(slot, self_decoding=True, source=blob).SerializeToString())
            assert size <= 1.1 * len(bits)
            dense = len(export(slot, source=blob).SerializeToString())
            assert dense > 9 * len(bits)  # the dense form stores 32 bits per connection


def test_self_decoding_refuses_k_over_256_but_dense_exports(tmp_path):
    blob = _random_file(CUSTOM, 257)
    slot = F.decode(blob)
    with pytest.raises(ConfigError, match="K <= 256.*K=257"):
        export(slot, self_decoding=True, source=blob)
    x = _synthetic(CUSTOM.input_shape, 2)
    dense = export(slot, source=blob)
    _check_graph(dense, blob, self_decoding=False)
    assert predict(_sess(dense), x).shape == (2, 7)


# ----------------------------------------------------------------------------- 4. no torch


def test_export_and_session_without_torch(lenet, tmp_path):
    np.save(tmp_path / "x.npy", lenet.xn[:500])
    code = f"""
        import numpy as np
        from pathlib import Path
        from slotpack.converters.onnx import export_file
        from slotpack.runtime import predict, session
        from slotpack.cli import main
        d = Path({str(tmp_path)!r})
        export_file({str(lenet.slot_path)!r}, d / "dense.onnx")
        main(["export", {str(lenet.slot_path)!r}, "-o", str(d / "self.onnx"), "--self-decoding"],
             standalone_mode=False)
        x = np.load(d / "x.npy")
        for name in ("dense.onnx", "self.onnx"):
            np.save(d / (name + ".npy"), predict(session(d / name), x))
        np.save(d / "slot.npy", predict(session({str(lenet.slot_path)!r}), x))
        assert not [m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m]]
    """
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    dense = np.load(tmp_path / "dense.onnx.npy")
    _assert_equivalent(lenet.logits[:500], dense)
    assert np.array_equal(np.load(tmp_path / "self.onnx.npy"), dense)
    assert np.array_equal(np.load(tmp_path / "slot.npy"), dense)
    assert onnx.load(tmp_path / "self.onnx").metadata_props  # a real file was written


# ----------------------------------------------------------------------------- 5. runtime


def test_session_accepts_slot_onnx_and_bytes(lenet, tmp_path):
    onnx_path = tmp_path / "lenet.onnx"
    export_file(lenet.slot_path, onnx_path)
    x = lenet.xn[:64]
    outs = [
        predict(session(source), x)
        for source in (lenet.slot_path, str(lenet.slot_path), onnx_path, onnx_path.read_bytes())
    ]
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])
    # a .slot session carries the same metadata as the exported file
    props = session(lenet.slot_path).get_modelmeta().custom_metadata_map
    assert props["source_sha256"] == hashlib.sha256(lenet.blob).hexdigest()


def test_predict_checks_shape_and_dtype(lenet):
    sess = session(lenet.slot_path)
    for bad in (
        np.zeros((2, 1, 28, 27), np.float32),
        np.zeros((2, 784), np.float32),
        np.zeros((1, 28, 28), np.float32),
        np.zeros((2, 3, 28, 28), np.float32),
        np.zeros((2, 1, 28, 28), np.float64),
        np.zeros((2, 1, 28, 28), np.uint8),
        [[0.0]],
    ):
        with pytest.raises(InputError) as info:
            predict(sess, bad)
        message = str(info.value)
        assert "\n" not in message and "[N, 1, 28, 28]" in message, message
    with pytest.raises(InputError, match="float32.*float64"):
        predict(sess, np.zeros((2, 1, 28, 28), np.float64))


def test_corrupt_onnx_is_a_model_file_error(lenet, tmp_path):
    good = export(F.decode(lenet.blob), source=lenet.blob).SerializeToString()
    rng = np.random.default_rng(3)
    for i, blob in enumerate((good[: len(good) // 2], good[:100], rng.bytes(4096), b"")):
        path = tmp_path / f"bad{i}.onnx"
        path.write_bytes(blob)
        with pytest.raises(ModelFileError, match=f"bad{i}.onnx") as info:
            session(path)
        assert "\n" not in str(info.value)
        with pytest.raises(ModelFileError, match="model bytes"):
            session(blob)
    with pytest.raises(ModelFileError, match="cannot read"):
        session(tmp_path / "missing.onnx")
    # a valid ONNX model without slotpack metadata cannot say how to normalise its input
    model = export(F.decode(lenet.blob), source=lenet.blob)
    del model.metadata_props[:]
    with pytest.raises(ModelFileError, match="normalisation"):
        input_normalisation(_sess(model))


def test_evaluate_matches_torch(lenet):
    sess = session(lenet.slot_path)
    mean, std = input_normalisation(sess)
    n = 2000
    # the runtime's normalisation is training's, bit for bit
    assert np.array_equal(normalize(lenet.x[:n], mean, std), lenet.xn[:n])
    result = evaluate(sess, lenet.x[:n], lenet.y[:n], batch_size=300)  # last batch is partial
    seen = []
    result_again = evaluate(sess, lenet.x[:n], lenet.y[:n], batch_size=300, progress=seen.append)
    assert seen == [300] * 6 + [200] and result_again.accuracy == result.accuracy
    assert result.count == n and result.batch_size == 300
    ort_acc = float((predict(sess, lenet.xn[:n]).argmax(1) == lenet.y[:n]).mean())
    torch_acc = float((lenet.logits[:n].argmax(1) == lenet.y[:n]).mean())
    assert result.accuracy == ort_acc
    assert abs(result.accuracy - torch_acc) <= 0.0005
    assert 0 < result.images_per_second < float("inf")
    assert 0 < result.latency_ms_p50 <= result.latency_ms_p90 <= result.latency_ms_p99


# ----------------------------------------------------------------------------- 6. CLI


def test_cli_export_and_overwrite(run, lenet, tmp_path):
    out = tmp_path / "x.onnx"
    r = run("export", lenet.slot_path, "-o", out)
    assert r.exit_code == 0, r.output
    assert f"{out.stat().st_size:,} bytes (dense float32)" in r.output
    _check_graph(onnx.load(out), lenet.blob, self_decoding=False)
    old = out.read_bytes()
    r = run("export", lenet.slot_path, "-o", out, "--self-decoding")
    _one_line_error(r, "exists", "--force")
    assert out.read_bytes() == old
    with pytest.raises(OutputExistsError):
        export_file(lenet.slot_path, out, self_decoding=True)
    r = run("export", lenet.slot_path, "-o", out, "--self-decoding", "--force")
    assert r.exit_code == 0 and "(self-decoding)" in r.output, r.output
    ratio = out.stat().st_size / len(lenet.blob)
    assert f"{ratio:.3f}x the .slot file" in r.output
    fixed = len(repack(F.decode(lenet.blob), index_encoding="bits"))
    assert f"fixed-width indices: {out.stat().st_size / fixed:.3f}x" in r.output
    assert out.stat().st_size <= 1.1 * fixed
    _check_graph(onnx.load(out), lenet.blob, self_decoding=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]  # no temporary left


def test_cli_eval_matches_torch(run, lenet, mnist_root, tmp_path):
    onnx_path = tmp_path / "x.onnx"
    assert run("export", lenet.slot_path, "-o", onnx_path, "--self-decoding").exit_code == 0
    n = 2000
    torch_acc = float((lenet.logits[:n].argmax(1) == lenet.y[:n]).mean())
    accs = []
    for target in (onnx_path, lenet.slot_path):
        r = run("eval", target, "--root", mnist_root, "--limit", n, "--json")
        assert r.exit_code == 0, r.output
        record = json.loads(r.stdout)
        assert record["engine"] == "onnxruntime" and record["dataset"] == "mnist"
        assert record["count"] == n and record["split"] == "test"
        assert record["latency_ms_p50"] <= record["latency_ms_p90"] <= record["latency_ms_p99"]
        assert abs(record["accuracy"] - torch_acc) <= 0.0005
        accs.append(record["accuracy"])
    assert accs[0] == accs[1]
    r = run("eval", onnx_path, "--root", mnist_root, "--limit", n)
    assert r.exit_code == 0, r.output
    assert f"(onnxruntime) test accuracy {accs[0]:.4f} on {n} images" in r.output


def test_cli_errors_are_one_line(run, lenet, mnist_root, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(1000))
    _one_line_error(run("eval", bad, "--root", mnist_root), "cannot load", "bad.onnx")

    corrupt = bytearray(lenet.blob)
    corrupt[-5] ^= 0xFF  # a payload byte: the section's CRC no longer holds
    (tmp_path / "corrupt.slot").write_bytes(bytes(corrupt))
    out = tmp_path / "c.onnx"
    _one_line_error(run("export", tmp_path / "corrupt.slot", "-o", out), "corrupt.slot", "CRC")
    assert not out.exists()

    big = tmp_path / "k257.slot"
    big.write_bytes(_random_file(CUSTOM, 257))
    _one_line_error(run("export", big, "-o", out, "--self-decoding"), "K <= 256")
    assert not out.exists()

    # a file that records no data set needs --dataset
    nameless = tmp_path / "nameless.slot"
    F.write(nameless, pack_model(lenet.model)[0])
    assert run("export", nameless, "-o", out).exit_code == 0
    for target in (nameless, out):
        _one_line_error(run("eval", target, "--root", mnist_root), "--dataset")
    r = run("eval", out, "--root", mnist_root, "--dataset", "mnist", "--limit", 500, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["count"] == 500, r.output

    empty = tmp_path / "no-data"
    empty.mkdir()
    _one_line_error(run("eval", lenet.slot_path, "--root", empty), "slotpack data mnist")


# ----------------------------------------------------------------------------- 7. large models


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_export_file_writes_the_bytes_of_the_in_memory_model(tmp_path):
    """The file is streamed from a data file, but byte for byte what SerializeToString gives."""
    for arch, k in ((CUSTOM, 5), (A.get("lenet300100"), 2), (A.get("conv2"), 8)):
        blob = _random_file(arch, k, metadata={"dataset": arch.dataset})
        (tmp_path / "m.slot").write_bytes(blob)
        for self_decoding in (False, True):
            out = tmp_path / f"{arch.name}-{self_decoding}.onnx"
            size, _ = export_file(tmp_path / "m.slot", out, self_decoding=self_decoding)
            model = export(F.decode(blob), self_decoding=self_decoding, source=blob)
            assert out.read_bytes() == model.SerializeToString() and size == out.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_initializer_bytes_decides_external_data(tmp_path):
    assert MAX_INLINE_BYTES + 64 * 2**20 == 2**31  # protobuf's limit, less room for the graph
    for arch in (CUSTOM, A.get("lenet300100")):
        blob = _random_file(arch, 5)
        slot = F.decode(blob)
        # dense: exactly the initializers' bytes; self-decoding: the packed bytes and a few
        # small constants per layer (shifts, keys), which the 64 MiB allowance covers
        dense = sum(a.nbytes for a in _arrays(export(slot)).values())
        assert initializer_bytes(slot) == dense
        packed = sum(a.nbytes for a in _arrays(export(slot, self_decoding=True)).values())
        assert 0 <= packed - initializer_bytes(slot, self_decoding=True) < 4096 * len(slot.layers)
        (tmp_path / "m.slot").write_bytes(blob)
        n = initializer_bytes(slot)
        export_file(tmp_path / "m.slot", tmp_path / "at.onnx", max_inline_bytes=n, force=True)
        assert not data_path(tmp_path / "at.onnx").exists()
        export_file(tmp_path / "m.slot", tmp_path / "over.onnx", max_inline_bytes=n - 1, force=True)
        assert data_path(tmp_path / "over.onnx").exists()


def test_a_model_over_protobufs_limit_is_refused_in_memory_in_one_line(tmp_path, run):
    """A valid 66 MB file of 529M connections: 2 GiB of dense float32. Its size is known from
    the manifest, so it is refused before anything is built; `export` would use external data."""
    path = tmp_path / "huge.slot"
    path.write_bytes(big_slot(n=23_000, copies=1))
    slot = F.read(path)
    assert initializer_bytes(slot) > MAX_INLINE_BYTES
    with pytest.raises(ModelFileError, match="2 GiB.*slotpack export"):
        session(path)
    _one_line_error(run("eval", path, "--dataset", "mnist"), "huge.slot", "external data")


def test_external_data_export(run, lenet, tmp_path, monkeypatch):
    inline = tmp_path / "inline.onnx"
    export_file(lenet.slot_path, inline)
    folder = tmp_path / "models"
    folder.mkdir()
    out, data = folder / "ext.onnx", folder / "ext.onnx.data"
    size, _ = export_file(lenet.slot_path, out, max_inline_bytes=0)
    assert sorted(os.listdir(folder)) == ["ext.onnx", "ext.onnx.data"]  # no temporaries
    assert size == out.stat().st_size + data.stat().st_size and out.stat().st_size < 10_000
    model = onnx.load(out, load_external_data=False)
    weights = {n.input[1] for n in model.graph.node if n.op_type == "Gemm"}
    for t in model.graph.initializer:
        where = {e.key: e.value for e in t.external_data}
        if t.name in weights:
            assert t.data_location == TensorProto.EXTERNAL and where["location"] == "ext.onnx.data"
            assert int(where["offset"]) % 4096 == 0
    onnx.checker.check_model(str(out), full_check=True)
    want = _arrays(onnx.load(inline))
    got = _arrays(onnx.load(out))  # onnx's loader reads the data file beside the model
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # external data resolves next to the model, not here
    x = lenet.xn[:50]
    assert np.array_equal(predict(session(out), x), predict(session(inline), x))
    # neither file is replaced without force, and a refusal leaves both as they were
    before = out.read_bytes(), data.read_bytes()
    with pytest.raises(OutputExistsError, match="ext.onnx exists"):
        export_file(lenet.slot_path, out, self_decoding=True, max_inline_bytes=0)
    out.unlink()
    with pytest.raises(OutputExistsError, match="ext.onnx.data exists"):
        export_file(lenet.slot_path, out, self_decoding=True, max_inline_bytes=0)
    assert not out.exists() and data.read_bytes() == before[1]
    export_file(lenet.slot_path, out, max_inline_bytes=0, force=True)
    assert (out.read_bytes(), data.read_bytes()) == before  # deterministic
    selfdec = folder / "self.onnx"
    export_file(lenet.slot_path, selfdec, self_decoding=True, max_inline_bytes=0)
    assert data_path(selfdec).exists()
    assert np.array_equal(predict(session(selfdec), x), predict(session(inline), x))
    # the command says where the tensors went
    monkeypatch.setattr(converters.onnx, "MAX_INLINE_BYTES", 0)
    r = run("export", lenet.slot_path, "-o", folder / "cli.onnx")
    assert r.exit_code == 0 and "(dense float32, tensors in cli.onnx.data)" in r.output, r.output
    assert sorted(os.listdir(folder)) == [
        "cli.onnx",
        "cli.onnx.data",
        "ext.onnx",
        "ext.onnx.data",
        "self.onnx",
        "self.onnx.data",
    ]


LINUX = pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_AS and /proc")


@LINUX
@pytest.mark.slow
def test_export_streams_a_model_larger_than_its_memory(big_slot_file, tmp_path):
    """A 64 MiB dense graph exports with 48 MiB to spare: one layer in memory at a time."""
    out = tmp_path / "big.onnx"
    r = run_capped(48, "export", big_slot_file, "-o", out)
    assert r.returncode == 0, r.stderr
    slot = F.read(big_slot_file)
    assert out.stat().st_size > 64 * 2**20
    assert out.read_bytes() == export(slot, source=slot.payload.obj).SerializeToString()


@LINUX
def test_export_out_of_memory_is_one_line(big_slot_file, tmp_path):
    r = run_capped(10, "export", big_slot_file, "-o", tmp_path / "big.onnx")
    one_line_failure(
        r, "out of memory building layer 1 (linear, 4,194,304 weights, 16.0 MiB as float32)"
    )
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_every_version_and_encoding_exports_to_the_same_logits():
    """A version 1 file, its version 2 re-encodings (delta, bits) and a trained-like model with
    per-layer K export (dense and self-decoding) to graphs with bit-identical logits."""
    model = _trained_like(models.Net(CUSTOM, "slot", (5, 3, 8, 4), "greedy", 21), seed=3)
    v2, _ = pack_model(model, mean=CUSTOM_MEAN, std=CUSTOM_STD)
    slot2 = F.decode(v2)
    assert slot2.ks == (5, 3, 8, 4)
    x = _synthetic(CUSTOM.input_shape, 6)
    want = model.eval()(torch.from_numpy(x)).detach().numpy()
    for blob in (v2, repack(slot2, index_encoding="delta"), repack(slot2, index_encoding="bits")):
        for self_decoding in (False, True):
            got = predict(_sess(export(F.decode(blob), self_decoding=self_decoding)), x)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    old = repack(F.decode(_random_file(CUSTOM, 6)), index_encoding="bits")
    one = encode_selection(  # the same network as a version 1 file
        CUSTOM, seed=F.decode(old).seed, k=6, selection="greedy",
        indices=[F.decode(old).indices(w.section) for w in F.decode(old).weights],
        tensors={n: F.decode(old).tensor(n) for r in F.decode(old).tensors for role, n in r.items()
                 if role != "indices"},
        mean=CUSTOM_MEAN, std=CUSTOM_STD, version=1,
    )  # fmt: skip
    assert F.decode(one).version == 1
    logits = [
        predict(_sess(export(F.decode(b), self_decoding=s)), x)
        for b in (one, repack(F.decode(one)), old)
        for s in (False, True)
    ]
    for other in logits[1:]:
        assert np.array_equal(other, logits[0])

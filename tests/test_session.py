"""onnxruntime sessions for ONNX files from anywhere: the interface a model must have, and where
its external data may come from. Every model here is built with onnx.helper; the oracle for the
ones that run is numpy (normalise, flatten, matmul, argmax).
"""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from slotpack import data, models
from slotpack.cli import main
from slotpack.converters.onnx import export_file
from slotpack.pack import pack_model
from slotpack.runtime import evaluate, predict, session
from slotpack.runtime.session import ModelFileError, signature
from tests.helpers import one_line_error, trained_like

MEAN, STD = 0.1307, 0.3081
PROPS = {"input_mean": "[0.1307]", "input_std": "[0.3081]", "metadata": '{"dataset": "mnist"}'}
W = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32)


def _model(
    *,
    x=("x", TensorProto.FLOAT, ["N", 1, 28, 28]),
    more_inputs=(),
    y=("y", TensorProto.FLOAT, ["N", 10]),
    nodes=None,
    inits=None,
    props=PROPS,
) -> onnx.ModelProto:
    """A linear MNIST classifier: y = flatten(x) @ W, unless ``nodes``/``inits`` say otherwise."""
    if nodes is None:
        nodes = [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info(*spec) for spec in (x, *more_inputs)],
        [helper.make_tensor_value_info(*y)],
        [numpy_helper.from_array(W, "w")] if inits is None else inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    helper.set_model_props(model, props)
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _props(**changes) -> dict[str, str]:
    return {k: v for k, v in {**PROPS, **changes}.items() if v is not None}


@pytest.fixture(scope="module")
def mnist64(mnist_root):
    test = data.load("mnist", mnist_root, "test", limit=64)
    return test.x.numpy(), test.y.numpy()


def _oracle_accuracy(x: np.ndarray, y: np.ndarray, w: np.ndarray = W) -> float:
    xn = (x.astype(np.float32) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)
    return float(((xn.reshape(len(x), -1) @ w).argmax(1) == y).mean())


def _eval(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)], catch_exceptions=False)


# ----------------------------------------------------------------------------- interface


@pytest.mark.parametrize(
    "x,batch",
    [
        (["N", 1, 28, 28], 256),
        ([1, 1, 28, 28], 1),  # a fixed batch size runs batches of that size
        ([7, 1, 28, 28], 7),  # 64 = 9 * 7 + 1: the last batch is padded
        (["N", "C", "H", "W"], 256),  # symbolic image dimensions take what the data has
        ([None, None, None, None], 256),
    ],
)
def test_foreign_models_evaluate(tmp_path, mnist_root, mnist64, x, batch):
    y = ["N", 10] if x[0] == "N" else [x[0], 10]
    path = _save(
        _model(x=("x", TensorProto.FLOAT, x), y=("y", TensorProto.FLOAT, y)), tmp_path / "m.onnx"
    )
    r = _eval(path, "--root", mnist_root, "--limit", 64, "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["batch_size"] == batch and record["count"] == 64
    assert record["accuracy"] == _oracle_accuracy(*mnist64)
    sess = session(path)
    xn = ((mnist64[0][:10] / np.float32(255) - np.float32(MEAN)) / np.float32(STD)).astype(
        np.float32
    )
    np.testing.assert_allclose(predict(sess, xn), xn.reshape(10, -1) @ W, rtol=1e-5, atol=1e-4)
    assert signature(sess).batch == (x[0] if isinstance(x[0], int) else None)


def _cast_input():
    return [
        helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]


def _two_inputs():
    return [
        helper.make_node("Add", ["x", "z"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]


def _rank1_output():
    axes = numpy_helper.from_array(np.asarray([1], np.int64), "axes")
    return [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["l"]),
        helper.make_node("ReduceMax", ["l", "axes"], ["y"], keepdims=0),
    ], [numpy_helper.from_array(W, "w"), axes]


def _argmax_output():
    return [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["l"]),
        helper.make_node("ArgMax", ["l"], ["y"], axis=1),
    ]


FLOAT_X = ("x", TensorProto.FLOAT, ["N", 1, 28, 28])
REFUSED = {
    "double input": (
        dict(x=("x", TensorProto.DOUBLE, ["N", 1, 28, 28]), nodes=_cast_input()),
        ["input 'x' is tensor(double)", "tensor(float)"],
    ),
    "two inputs": (
        dict(more_inputs=[("z", TensorProto.FLOAT, ["N", 1, 28, 28])], nodes=_two_inputs()),
        ["2 inputs ('x', 'z')", "one image input"],
    ),
    "rank-1 output": (
        dict(y=("y", TensorProto.FLOAT, ["N"]), nodes=_rank1_output()[0], inits=_rank1_output()[1]),
        ["output 'y' has shape [N]", "logits [N, classes]"],
    ),
    "integer output": (
        dict(y=("y", TensorProto.INT64, ["N", 1]), nodes=_argmax_output()),
        ["output 'y' is tensor(int64)"],
    ),
    "rank-2 input": (
        dict(
            x=("x", TensorProto.FLOAT, ["N", 784]),
            nodes=[helper.make_node("MatMul", ["x", "w"], ["y"])],
        ),
        ["input 'x' has shape [N, 784]", "[N, C, H, W]"],
    ),
    "empty batch": (dict(x=("x", TensorProto.FLOAT, [0, 1, 28, 28])), ["shape [0, 1, 28, 28]"]),
    "no normalisation": (
        dict(props=_props(input_mean=None)),
        ["no slotpack input normalisation", "input_mean"],
    ),
    "metadata not JSON": (
        dict(props=_props(metadata='{"dataset": ')),
        ["'metadata' is not JSON", "--dataset"],
    ),
    "metadata not an object": (
        dict(props=_props(metadata='["mnist"]')),
        ["not a JSON object", "--dataset"],
    ),
    "data set not a name": (
        dict(props=_props(metadata='{"dataset": 3}')),
        ["data set 3", "--dataset"],
    ),
    "zero std": (dict(props=_props(input_std="[0]")), ["input_std must be positive"]),
    "negative std": (dict(props=_props(input_std="[-0.3]")), ["input_std must be positive"]),
    "std below float32": (dict(props=_props(input_std="[1e-50]")), ["input_std must be positive"]),
    "mean over float32": (dict(props=_props(input_mean="[1e39]")), ["input_mean must be finite"]),
    "mean per channel": (
        dict(props=_props(input_mean="[0.1, 0.2]", input_std="[1, 1]")),
        ["2 input_mean values for 1 input channels"],
    ),
    "mean and std counts": (
        dict(props=_props(input_mean="[0.1, 0.2]")),
        ["2 input_mean and 1 input_std"],
    ),
    **{
        f"mean {text}": (
            dict(props=_props(input_mean=text)),
            ["input_mean must be a JSON list of numbers"],
        )
        for text in (
            '["a"]',
            '{"a": 1}',
            "null",
            "[true]",
            '"0.5"',
            "[]",
            "[[0.1]]",
            "garbage",
            "[" * 5000,
        )
    },
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_foreign_interfaces_are_refused_up_front_in_one_line(tmp_path, case):
    """Refused before any data is loaded: the data root here is empty."""
    kwargs, needles = REFUSED[case]
    path = _save(_model(**kwargs), tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    one_line_error(_eval(path, "--root", tmp_path / "empty"), "m.onnx", *needles)


def test_malformed_metadata_is_not_needed_with_dataset(tmp_path, mnist_root, mnist64):
    for text in ('{"dataset": ', '["mnist"]', '{"dataset": 3}'):
        path = _save(_model(props=_props(metadata=text)), tmp_path / "m.onnx")
        r = _eval(path, "--root", mnist_root, "--limit", 64, "--dataset", "mnist", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["accuracy"] == _oracle_accuracy(*mnist64)


def test_models_that_do_not_fit_the_data_are_one_line(tmp_path, mnist_root, mnist64):
    wide = np.zeros((3 * 32 * 32, 10), np.float32)
    cifar = _model(
        x=("x", TensorProto.FLOAT, ["N", 3, 32, 32]),
        inits=[numpy_helper.from_array(wide, "w")],
        props=_props(input_mean="[0.5, 0.5, 0.5]", input_std="[0.2, 0.2, 0.2]"),
    )
    path = _save(cifar, tmp_path / "cifar.onnx")
    one_line_error(_eval(path, "--root", mnist_root, "--limit", 64), "[N, 3, 32, 32]", "--dataset")
    # symbolic dimensions accept the data, but the graph cannot multiply 784 by 100
    small = _model(
        x=("x", TensorProto.FLOAT, ["N", "C", "H", "W"]),
        inits=[numpy_helper.from_array(np.zeros((100, 10), np.float32), "w")],
    )
    path = _save(small, tmp_path / "small.onnx")
    one_line_error(
        _eval(path, "--root", mnist_root, "--limit", 64), "onnxruntime cannot run the model"
    )
    # the runtime API says the same
    with pytest.raises(ModelFileError, match="cannot run"):
        evaluate(session(path), *mnist64)


# ----------------------------------------------------------------------------- external data


def _external(name: str, array: np.ndarray, location: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(array, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _constant_node(location: str) -> list:
    """W as a Constant node's attribute tensor, inside an If branch (a subgraph)."""
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["wc"], value=_external("wv", W, location))],
        "branch",
        [],
        [helper.make_tensor_value_info("wc", TensorProto.FLOAT, [784, 10])],
    )
    cond = numpy_helper.from_array(np.asarray(True), "cond")
    return [
        helper.make_node("Constant", [], ["cond"], value=cond),
        helper.make_node("If", ["cond"], ["w"], then_branch=branch, else_branch=branch),
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    """models/ holds the model; cwd/, the working directory, holds a different w.bin."""
    (tmp_path / "models").mkdir()
    (tmp_path / "cwd").mkdir()
    (-W).tofile(tmp_path / "cwd" / "w.bin")
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "models", tmp_path / "cwd"


def test_external_data_resolves_next_to_the_model(folders, mnist64):
    models_dir, cwd = folders
    W.tofile(models_dir / "w.bin")
    path = _save(_model(inits=[_external("w", W, "w.bin")]), models_dir / "m.onnx")
    x = mnist64[0][:10].astype(np.float32).reshape(10, 1, 28, 28)
    np.testing.assert_allclose(
        predict(session(path), x), x.reshape(10, -1) @ W, rtol=1e-5, atol=1e-3
    )
    # a model whose data is missing beside it never reads the working directory's w.bin
    os.remove(models_dir / "w.bin")
    with pytest.raises(ModelFileError, match="onnxruntime cannot load") as info:
        session(path)
    assert "\n" not in str(info.value)
    # a model given as bytes has no folder for its external data
    with pytest.raises(ModelFileError, match="given as bytes; load it from its file"):
        session(path.read_bytes())


@pytest.mark.parametrize(
    "location,needle",
    [
        ("../cwd/w.bin", "must be a relative path inside the model's folder"),
        ("sub/../../cwd/w.bin", "must be a relative path inside the model's folder"),
        ("ABSOLUTE", "must be a relative path inside the model's folder"),
        ("", "must be a relative path inside the model's folder"),
        ("w\0.bin", "must be a relative path inside the model's folder"),
        ("C:w.bin", "must be a relative path inside the model's folder"),
        ("..\\cwd\\w.bin", "must be a relative path inside the model's folder"),
        ("link.bin", "leads outside the model's folder"),
    ],
)
@pytest.mark.parametrize("where", ["initializer", "attribute in a subgraph"])
def test_external_data_outside_the_models_folder_is_refused(folders, location, needle, where):
    models_dir, cwd = folders
    location = str(cwd / "w.bin") if location == "ABSOLUTE" else location
    os.symlink(cwd / "w.bin", models_dir / "link.bin")
    if where == "initializer":
        model = _model(inits=[_external("w", W, location)])
    else:
        model = _model(nodes=_constant_node(location), inits=[])
    path = _save(model, models_dir / "m.onnx")
    with pytest.raises(ModelFileError, match="external data") as info:
        session(path)
    assert needle in str(info.value) and "\n" not in str(info.value)
    one_line_error(_eval(path, "--dataset", "mnist"), "m.onnx", needle)


def test_exported_external_data_evaluates_from_any_folder(folders, mnist_root):
    models_dir, _ = folders
    blob, _ = pack_model(trained_like(models.create("lenet300100", 4, seed=3), seed=3))
    (models_dir / "m.slot").write_bytes(blob)
    export_file(models_dir / "m.slot", models_dir / "inline.onnx")
    export_file(models_dir / "m.slot", models_dir / "ext.onnx", max_inline_bytes=0)
    assert (models_dir / "ext.onnx.data").exists()
    records = []
    for name in ("inline.onnx", "ext.onnx"):
        r = _eval(
            models_dir / name, "--root", mnist_root, "--dataset", "mnist", "--limit", 200, "--json"
        )
        assert r.exit_code == 0, r.output
        records.append(json.loads(r.stdout)["accuracy"])
    assert records[0] == records[1]


def test_only_regular_onnx_files_are_read(tmp_path):
    os.mkfifo(tmp_path / "fifo.onnx")  # reading it would wait for a writer forever
    (tmp_path / "dir.onnx").mkdir()
    for name in ("fifo.onnx", "dir.onnx"):
        with pytest.raises(ModelFileError, match=f"cannot read .*{name}: it is not a regular file"):
            session(tmp_path / name)
    with pytest.raises(ModelFileError, match="it does not exist"):
        session(tmp_path / "missing.onnx")
    # a .txt or .textproto suffix does not make the check read a different format than
    # onnxruntime: both read protobuf bytes
    path = _save(_model(), tmp_path / "m.textproto")
    assert signature(session(path)).image == (1, 28, 28)

"""The README's promises: its Python example runs, and its two commands are what CI runs."""

import re
from pathlib import Path

import numpy as np
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_example_runs():
    example, _ = _blocks("python")
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)  # the README's own code, as a user runs it
    assert scope["logits"].shape == (5, 10)
    assert scope["model"][1].weight().shape == (300, 784)
    assert isinstance(scope["dense"][1], torch.nn.Linear)
    assert scope["info"].size == len(scope["blob"]) <= 101_500
    assert torch.equal(torch.from_numpy(scope["weights"]["1.weight"]), scope["model"][1].weight())


def test_your_own_model_example_runs(tmp_path, monkeypatch):
    """The "Your own model" block: resnet18 slotified, saved, loaded into its dense twin."""
    _, example = _blocks("python")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)
    slot, dense = scope["slot"], scope["dense"]
    dense.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(slot(x), dense(x))
    assert (tmp_path / "resnet18.slot").stat().st_size < 200_000  # 11.2M connections, untrained
    import onnxruntime as ort

    assert (tmp_path / "resnet18.onnx").stat().st_size < 5_000_000  # 3-bit indices, not floats
    sess = ort.InferenceSession(str(tmp_path / "resnet18.onnx"))
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.array_equal(got.argmax(1), slot(x).numpy().argmax(1))


def test_ci_runs_the_readme_test_command():
    first = _blocks("bash")[0].splitlines()
    test_cmd = next(line for line in first if "pytest" in line).split("#")[0].strip()
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci]

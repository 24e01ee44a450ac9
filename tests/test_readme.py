"""The README's promises: its Python example runs, and its two commands are what CI runs."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_example_runs():
    (example,) = _blocks("python")
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)  # the README's own code, as a user runs it
    assert scope["logits"].shape == (5, 10)
    assert scope["model"][1].weight().shape == (300, 784)
    assert isinstance(scope["dense"][1], torch.nn.Linear)
    assert scope["info"].size == len(scope["blob"]) <= 101_500
    assert torch.equal(torch.from_numpy(scope["weights"]["1.weight"]), scope["model"][1].weight())


def test_ci_runs_the_readme_test_command():
    first = _blocks("bash")[0].splitlines()
    test_cmd = next(line for line in first if "pytest" in line).split("#")[0].strip()
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci]

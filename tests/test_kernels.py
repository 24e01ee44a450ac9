"""The fused Triton kernels against the torch half of the generator, bit for bit.

Triton's interpreter runs the kernels on CPU (in a child process: it is chosen when triton is
imported); a GPU checks the compiled kernels with ``kernels.self_check`` before first use.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from slotpack import kernels, layers, prng
from slotpack.errors import ConfigError
from slotpack.train import load_checkpoint, pack_checkpoint, train
from tests.helpers import states_equal

sys.path.insert(0, str(Path(__file__).parent))
import kernel_interp  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def interp(mnist_root, tmp_path_factory):
    """What the kernels returned in the interpreter, and the run they trained."""
    tmp = tmp_path_factory.mktemp("interp")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(HERE / "kernel_interp.py"), str(tmp / "out.pt")]
    cmd += [str(mnist_root), str(tmp / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "out.pt", weights_only=True), tmp / "run"


def _values(key, n, k, bound):
    return prng.values_range_torch(key, 0, n * k, bound).view(n, k)


@pytest.mark.parametrize("k,key", kernel_interp.CASES)
def test_selection_kernels_match_the_torch_generator(interp, k, key):
    out, _ = interp
    x, bound, tag = kernel_interp.inputs(k, key), prng.glorot_bound(300, 100), f"{k}_{key}"
    bank = _values(key, kernel_interp.N, k, bound)
    rows = torch.arange(kernel_interp.N)
    for name, scores in (("greedy", x["scores"]), ("greedy_bf16", x["scores_bf16"])):
        want = bank[rows, scores.argmax(1)]
        assert torch.equal(out[f"{name}_{tag}"], want), name
    assert torch.equal(out[f"selected_{tag}"], bank[rows, x["index"]])
    # the ties are real: whole rows of equal scores select slot 0
    assert torch.equal(out[f"greedy_{tag}"][::11], bank[::11, 0])


@pytest.mark.parametrize("k,key", kernel_interp.CASES)
def test_score_gradient_kernel_matches_torch_in_both_dtypes(interp, k, key):
    out, _ = interp
    x, bound, tag = kernel_interp.inputs(k, key), prng.glorot_bound(300, 100), f"{k}_{key}"
    product = _values(key, kernel_interp.N, k, bound) * x["grad_w"].unsqueeze(1)
    for dtype in (torch.float32, torch.bfloat16):
        got, want = out[f"grad_{dtype}_{tag}"], product.to(dtype)
        assert got.dtype == dtype
        # The raw bits (inf, -0.0, subnormals and rounding ties included); a NaN stays a NaN,
        # but its bit pattern is not fixed (torch's own CPU and CUDA conversions differ).
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        nan = want.isnan()
        assert nan.any() and torch.equal(got.isnan(), nan)
        assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan]), dtype


def test_bfloat16_rounding_in_kernels_is_torchs(interp):
    x = kernel_interp.rounding_inputs()
    got, want = interp[0]["rounded"], x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    ties = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert ties.sum() > 1000 and want[ties].isinf().any()  # ties and overflow were exercised


@pytest.mark.parametrize("score_dtype", list(layers.SCORE_DTYPES))
@pytest.mark.parametrize("selection", list(layers.SELECTIONS))
def test_lean_layers_on_the_kernels_equal_the_torch_path(interp, selection, score_dtype):
    out, _ = interp
    common = dict(seed=4, layer=2, selection=selection, lean=True, score_dtype=score_dtype)
    conv = layers.SlotConv2d(6, 8, 3, 5, padding=1, groups=2, **common)
    fc = layers.SlotLinear(8 * 36, 10, 8, **{**common, "layer": 3})
    assert layers.set_kernel(torch.nn.Sequential(conv, fc), "torch") == 2
    torch.manual_seed(0)
    x = torch.randn(3, 6, 6, 6)
    fc(torch.relu(conv(x)).flatten(1)).square().sum().backward()
    tag = f"{selection}_{score_dtype}"
    assert torch.equal(out[f"conv_grad_{tag}"], conv.scores.grad)
    assert torch.equal(out[f"fc_grad_{tag}"], fc.scores.grad)
    conv.eval(), fc.eval()
    assert torch.equal(out[f"conv_w_{tag}"], conv.weight())
    assert torch.equal(out[f"fc_w_{tag}"], fc.weight())


def test_training_on_the_kernels_packs_the_same_file(interp, mnist_root, tmp_path):
    _, run = interp
    cfg = kernel_interp._train_config()
    result = train(cfg, tmp_path / "torch", root=mnist_root, device="cpu", kernel="torch")
    assert result["kernel"] == "torch"
    assert json.loads((run / "result.json").read_text())["kernel"] == "triton"
    a = load_checkpoint(run / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "torch" / "last.pt")["model"]
    assert states_equal(a, b)
    assert (run / "model.slot").read_bytes() == pack_checkpoint(tmp_path / "torch" / "last.pt")[0]


def test_kernel_choice_outside_the_interpreter(mnist_root, tmp_path):
    cpu = torch.device("cpu")
    if kernels.interpreting():
        pytest.fail("the suite itself must not run under TRITON_INTERPRET")
    assert not kernels.supported(cpu)
    assert kernels.resolve("auto", cpu, 8) == "torch"
    assert kernels.resolve("torch", torch.device("cuda"), 8) == "torch"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        kernels.resolve("triton", cpu, 8)
    with pytest.raises(ConfigError, match="unknown kernel 'fast'; choose one of: auto, torch"):
        layers.set_kernel(torch.nn.Linear(2, 2), "fast")
    cfg = replace(kernel_interp._train_config(), score_dtype="float32")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train(cfg, tmp_path / "a", root=mnist_root, device="cpu", kernel="triton")
    with pytest.raises(ConfigError, match="add --lean"):
        train(replace(cfg, lean=False), tmp_path / "b", root=mnist_root, kernel="triton")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_auto_falls_back_to_torch_when_the_kernels_fail_their_check(monkeypatch):
    cpu = torch.device("cpu")

    def mismatch(device, k):
        raise kernels.KernelMismatchError(f"the Triton kernel select_greedy (K={k}) differs")

    monkeypatch.setattr(kernels, "supported", lambda device: True)
    monkeypatch.setattr(kernels, "self_check", mismatch)
    with pytest.warns(UserWarning, match="using torch: the Triton kernel select_greedy"):
        assert kernels.resolve("auto", cpu, 7) == "torch"
    with pytest.raises(kernels.KernelMismatchError, match=r"\(K=7\) differs"):
        kernels.resolve("triton", cpu, 7)
    kernels._auto.cache_clear()  # the fallback above is remembered per device and K

"""ResNet-20 and ResNet-18 in the zoo (slotpack.resnets via slotify): sizes, slot == dense twin,
and a short ResNet-20 run through train, pack (weights-only), export and onnxruntime."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from slotpack import arch as A
from slotpack import data, models, resnets
from slotpack.checkpoint import TrainConfig, load_model
from slotpack.cli import main
from slotpack.errors import RegistryError
from slotpack.modelfile import load_state_dict
from slotpack.modules import dense_state_dict, slot_layer_info
from tests.helpers import one_line_error, states_equal, trained_like

# ResNet-20 with option-A shortcuts: He et al.'s "0.27M"; ResNet-18 (CIFAR stem): 11.2M.
WEIGHTS = {"resnet20": 268_336, "resnet18": 11_164_352}


def _weighted(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if type(m) in (nn.Conv2d, nn.Linear)]


@pytest.mark.parametrize("name", list(A.MODULE_ZOO))
def test_sizes_match_the_registry(name):
    dense, spec = resnets.build(name), A.MODULE_ZOO[name]
    layers = _weighted(dense)
    assert sum(m.weight.numel() for m in layers) == spec.num_connections == WEIGHTS[name]
    assert len(layers) == spec.num_weighted
    assert dense(torch.zeros(2, *spec.input_shape)).shape == (2, spec.num_classes)


def test_resnet20_is_he_et_al():
    dense = resnets.ResNet20()
    convs = [m for m in dense.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert [c.out_channels for c in convs] == [16] * 7 + [32] * 6 + [64] * 6
    assert dense.fc.in_features == 64 and dense.fc.bias is not None


def test_resnet18_has_the_cifar_stem():
    dense = resnets.resnet18()
    assert dense.conv1.kernel_size == (3, 3) and dense.conv1.stride == (1, 1)
    assert isinstance(dense.maxpool, nn.Identity)
    names = [n for n, m in dense.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert names[0] == "conv1" and names[-1] == "fc" and "layer2.0.downsample.0" in names


def test_registry_paths():
    with pytest.raises(RegistryError, match="not a layer list"):
        A.get("resnet20")
    with pytest.raises(RegistryError, match="resnet18"):
        A.spec("resnet50")
    assert set(A.names()) == set(A.ZOO) | {"resnet20", "resnet18"}
    cfg = TrainConfig("resnet20", "cifar10").resolved()
    assert (cfg.lr, cfg.schedule, cfg.weight_decay, cfg.ks) == (0.1, "cosine", 1e-4, (8,) * 20)
    learned = TrainConfig("resnet20", method="learned").resolved()
    assert (learned.lr, learned.weight_decay) == (0.1, 5e-4)
    assert TrainConfig("resnet18", k=64).resolved().lr == 0.01


@pytest.mark.slow
def test_slot_resnet20_equals_its_dense_twin():
    slot = trained_like(models.create("resnet20", 8, seed=7), seed=1)
    info = slot_layer_info(slot)
    assert [i.number for i in info] == list(range(20)) and info[0].name == "conv1"
    assert info[-1].name == "fc" and {i.k for i in info} == {8}
    dense = resnets.ResNet20()
    dense.load_state_dict(dense_state_dict(slot))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(slot(x), dense.eval()(x))
    twin = models.dense_from_slot(slot).eval()  # finetuning's start
    with torch.no_grad():
        assert torch.equal(slot(x), twin(x))


def test_module_models_depend_on_the_seed_alone():
    for method in ("slot", "learned"):
        torch.manual_seed(1)
        a = models.create("resnet20", 4, method=method, seed=5).state_dict()
        torch.manual_seed(2)
        b = models.create("resnet20", 4, method=method, seed=5).state_dict()
        assert states_equal(a, b)


@pytest.fixture()
def run():
    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.mark.slow
def test_resnet20_train_pack_export_eval(run, cifar10_root, tmp_path):
    out, slot, onnx_file = tmp_path / "r20", tmp_path / "r20.slot", tmp_path / "r20.onnx"
    r = run("train", "--model", "resnet20", "--dataset", "cifar10", "--k", "8", "--epochs", "1",
            "--limit", "256", "--eval-limit", "64", "--root", cifar10_root, "--out", out,
            "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    model, cfg = load_model(out)
    assert cfg.schedule == "cosine" and model.eval().training is False

    r = run("pack", out, "-o", slot)  # weights-only: state_dict names, no architecture
    assert r.exit_code == 0, r.output
    dense = resnets.ResNet20().eval()
    dense.load_state_dict(load_state_dict(slot))
    test = data.load("cifar10", cifar10_root, "test", limit=64)
    x = data.normalize(test.x, test.spec)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, dense(x))
    one_line_error(run("eval", slot, "--root", cifar10_root), "no architecture")

    r = run("export", out, "-o", onnx_file, "--self-decoding")
    assert r.exit_code == 0, r.output
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (ort_logits,) = sess.run(["logits"], {"input": x.numpy()})
    np.testing.assert_allclose(ort_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
    assert (ort_logits.argmax(1) == logits.argmax(1).numpy()).all()
    r = run("eval", onnx_file, "--root", cifar10_root, "--limit", "64", "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.output)
    torch_acc = (logits.argmax(1) == test.y).double().mean().item()
    assert record["dataset"] == "cifar10" and record["count"] == 64
    assert record["accuracy"] == torch_acc
    one_line_error(run("export", out, "-o", onnx_file), "exists")


def test_export_of_a_learned_run(run, tmp_path):
    cfg = TrainConfig("resnet20", method="learned").resolved()
    ckpt = tmp_path / "learned.pt"
    model = models.create("resnet20", method="learned", seed=3).eval()
    torch.save({"slotpack_checkpoint": 1, "config": cfg.to_dict(), "epoch": 0,
                "model": model.state_dict()}, ckpt)  # fmt: skip
    one_line_error(run("export", ckpt, "-o", tmp_path / "m.onnx", "--self-decoding"), "float32")
    one_line_error(run("pack", ckpt, "-o", tmp_path / "m.slot"), "float32 model")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.slot").exists()
    r = run("export", ckpt, "-o", tmp_path / "m.onnx")  # dense float32, with the metadata
    assert r.exit_code == 0, r.output
    from slotpack.runtime import session
    from slotpack.runtime.session import input_normalisation, recorded_dataset

    sess = session(tmp_path / "m.onnx")
    assert recorded_dataset(sess) == "cifar10" and input_normalisation(sess)[0].size == 3
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    (logits,) = sess.run(["logits"], {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-4, atol=1e-4)
    one_line_error(run("export", tmp_path / "nothing", "-o", tmp_path / "n.onnx"), "No such file")

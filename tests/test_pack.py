"""pack -> .slot -> numpy rebuild: bit-identical weights for every zoo model and layer option."""

import numpy as np
import pytest
import torch

from slotpack import arch as A
from slotpack import format as F
from slotpack import models
from slotpack.errors import ConfigError
from slotpack.pack import encode_selection, pack_model
from slotpack.runtime import rebuild
from tests.helpers import trained_like as _trained_like

ZOO_KS = [
    ("lenet300100", 2),
    ("lenet300100", 3),
    ("lenet300100", 8),
    ("lenet300100", 64),
    ("conv2", 2),
    ("conv2", 8),
    ("conv4", 5),
    ("conv6", 8),
    ("vgg19", 2),
    ("vgg19", 8),
]


def _check_bit_identical(model: models.Net, blob: bytes) -> dict[str, np.ndarray]:
    arrays = rebuild(F.decode(blob))
    state = {}
    for pos, module in enumerate(model):
        if hasattr(module, "scores"):
            expected = module.weight().detach().numpy()
            got = arrays[f"{pos}.weight"]
            assert got.dtype == np.float32 and got.shape == expected.shape
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), pos  # max diff 0
            if module.bias is not None:
                assert np.array_equal(arrays[f"{pos}.bias"], module.bias.detach().numpy())
        if isinstance(module, torch.nn.BatchNorm2d):
            assert np.array_equal(arrays[f"{pos}.running_mean"], module.running_mean.numpy())
            assert np.array_equal(arrays[f"{pos}.running_var"], module.running_var.numpy())
        state.update(
            {
                f"{pos}.{r}": v
                for r in ("weight", "bias", "running_mean", "running_var")
                if (v := arrays.get(f"{pos}.{r}")) is not None
            }
        )
    return state


@pytest.mark.parametrize("name,k", ZOO_KS)
def test_zoo_rebuilds_bit_identical(name, k):
    model = _trained_like(models.create(name, k, seed=11))
    blob, info = pack_model(model)
    assert info.connections == model.arch.num_connections
    _check_bit_identical(model, blob)


def test_groups_stride_dilation_bias_and_logits():
    arch = A.Arch(
        "custom",
        "cifar10",
        (3, 16, 16),
        (
            A.Conv2d(3, 8, 3, stride=2, padding=1, bias=True),
            A.BatchNorm2d(8),
            A.ReLU(),
            A.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=True),
            A.ReLU(),
            A.Conv2d(8, 12, 1, groups=2),
            A.MaxPool2d(2, 2),
            A.AvgPool2d(2, 2),
            A.Flatten(),
            A.Dropout(0.5),
            A.Linear(48, 10, bias=True),
        ),
    )
    slot = _trained_like(models.Net(arch, "slot", 6, "greedy", seed=2**64 - 5), seed=3)
    blob, _ = pack_model(slot)
    state = _check_bit_identical(slot, blob)
    dense = models.Net(arch, "learned", 6, "greedy", seed=0).eval()
    dense.load_state_dict(
        {**dense.state_dict(), **{k: torch.from_numpy(v) for k, v in state.items()}}
    )
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(slot(x), dense(x))


def test_same_model_same_bytes_and_float16_tensors():
    model = _trained_like(models.create("conv2", 2, seed=4))
    # conv2 has no dense tensors; VGG-19 has BatchNorm statistics to store as float16.
    assert pack_model(model)[0] == pack_model(model)[0]
    vgg = _trained_like(models.create("vgg19", 2, seed=1))
    blob16, info16 = pack_model(vgg, encoding="float16")
    blob32, info32 = pack_model(vgg)
    assert info16.size < info32.size
    a16, a32 = rebuild(F.decode(blob16)), rebuild(F.decode(blob32))
    assert np.array_equal(
        a16["1.running_var"], a32["1.running_var"].astype(np.float16).astype(np.float32)
    )
    assert np.array_equal(a16["0.weight"], a32["0.weight"])


def test_probabilistic_models_pack_the_draw_they_are_evaluated_with():
    model = _trained_like(models.create("lenet300100", 8, selection="probabilistic", seed=5))
    model.train()  # packing uses the evaluation rule whatever mode the model is in
    blob, _ = pack_model(model)
    assert model.training
    slot = F.decode(blob)
    assert slot.manifest["selection"] == "probabilistic"
    idx = slot.indices("1.indices")
    model.eval()
    assert np.array_equal(idx, model[1].selected_index().numpy())
    assert not np.array_equal(idx, model[1].scores.argmax(1).numpy())  # a draw, not the argmax
    x = torch.randn(3, 1, 28, 28)
    weights = rebuild(blob)
    assert np.array_equal(weights["1.weight"], model[1].weight().detach().numpy())
    assert torch.equal(model(x), model(x))  # evaluation is deterministic


def test_lenet_k8_size_target():
    """The whole file, header and realistic metadata included: <= 101,500 bytes (>= 10.5x)."""
    model = _trained_like(models.create("lenet300100", 8))
    meta = {
        "model": "lenet300100",
        "dataset": "mnist",
        "epoch": 40,
        "val_acc": 0.979,
        "test_acc": 0.9807,
        "slotpack": "0.1.0",
        "config": {
            "model": "lenet300100",
            "dataset": "mnist",
            "method": "slot",
            "k": 8,
            "selection": "greedy",
            "seed": 0,
            "epochs": 40,
            "batch_size": 128,
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "schedule": "constant",
            "milestones": [],
            "gamma": 0.1,
            "limit": None,
            "eval_limit": None,
            "init_from": None,
        },
    }
    blob, info = pack_model(model, metadata=meta)
    assert info.size == len(blob) <= 101_500
    assert info.bits_per_connection <= 3.05 and info.ratio >= 10.5
    assert info.float32_size == 1_064_800


def test_dense_models_and_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="only slot models"):
        pack_model(models.create("lenet300100", method="learned"))
    lenet = A.get("lenet300100")
    good = [np.zeros(784 * 300, np.uint8), np.zeros(30_000, np.uint8), np.zeros(1000, np.uint8)]
    common = dict(seed=0, k=8, selection="greedy", tensors={}, mean=(0.1,), std=(0.3,))
    with pytest.raises(ConfigError, match="3 weighted layers"):
        encode_selection(lenet, indices=good[:2], **common)
    with pytest.raises(ConfigError, match=r"indices must lie in \[0, 8\)"):
        encode_selection(lenet, indices=[good[0], good[1], np.full(1000, 8)], **common)
    with pytest.raises(ConfigError, match="encoding"):
        encode_selection(lenet, indices=good, encoding="bfloat16", **common)


@pytest.mark.parametrize(
    "options",
    [
        {"model": "lenet300100"},
        {"model": "lenet300100", "selection": "probabilistic", "init": "uniform"},
        {"model": "lenet300100", "layer_k": (2, 8, 5), "rate": 0.5, "score_dtype": "bfloat16"},
        {"model": "conv2", "k": 4, "seed": 7},
    ],
)
def test_pack_checkpoint_writes_the_bytes_of_the_built_model_without_its_values(
    options, tmp_path, monkeypatch
):
    """``pack`` of a run reads the scores off the checkpoint: no bank or initial scores are
    generated, and the bytes are those of packing the model training used."""
    from slotpack import checkpoint as C
    from slotpack import prng

    cfg = C.TrainConfig(**options)
    model = _trained_like(C.build_model(cfg))
    ckpt = {"slotpack_checkpoint": C.CHECKPOINT_VERSION, "config": cfg.to_dict(), "epoch": 2}
    torch.save({**ckpt, "model": model.state_dict(), "val_acc": 0.5}, tmp_path / "best.pt")
    loaded = C.load_checkpoint(tmp_path)
    before = pack_model(C.model_from_checkpoint(loaded, "cpu"), metadata=C.run_metadata(loaded))

    def generated(*args, **kwargs):
        raise AssertionError("packing a checkpoint generated values")

    for name in ("initial_scores_torch", "bank_torch", "values_range_torch"):
        monkeypatch.setattr(prng, name, generated)
    assert C.pack_checkpoint(tmp_path) == before

"""The model zoo: registry, parameter counts of the reference code, slot and dense twins."""

import math

import pytest
import torch

from slotpack import arch, models, prng
from slotpack.errors import ConfigError, RegistryError
from slotpack.layers import SlotConv2d, SlotLinear

# Weights (no biases) per model, as the reference code reports them (the numbers).
REFERENCE_COUNTS = {
    "lenet300100": 266_200,
    "conv2": 3_317_952,
    "conv4": 1_147_072,
    "conv6": 1_474_752,
    "vgg19": 20_024_000,
}


def test_registry_holds_the_paper_zoo():
    assert set(arch.ZOO) == set(REFERENCE_COUNTS)


@pytest.mark.parametrize("name", list(arch.ZOO))
def test_parameter_counts_match_reference(name):
    assert arch.get(name).num_connections == REFERENCE_COUNTS[name]


@pytest.mark.parametrize("name", list(arch.ZOO))
def test_slot_and_learned_twins(name):
    k = 2 if name == "vgg19" else 4  # keeps VGG-19's bank small on CI
    slot = models.create(name, k, seed=3)
    learned = models.create(name, method="learned", seed=3)
    a = slot.arch
    x = torch.randn(2, *a.input_shape)
    slot.eval()
    learned.eval()
    assert slot(x).shape == learned(x).shape == (2, a.num_classes)
    slot_layers, dense_layers = slot.weighted_layers(), learned.weighted_layers()
    assert len(slot_layers) == len(dense_layers) == len(a.weighted)
    # Weighted layers are numbered in forward order; each one's scores cover its connections.
    assert [m.layer for m in slot_layers] == list(range(len(a.weighted)))
    assert sum(m.scores.shape[0] for m in slot_layers) == REFERENCE_COUNTS[name]
    assert sum(m.weight.numel() for m in dense_layers) == REFERENCE_COUNTS[name]
    assert all(m.scores.shape[1] == k for m in slot_layers)
    # Trainable parameters of a slot model: scores only (the paper's networks have no biases).
    assert {n.split(".")[-1] for n, _ in slot.named_parameters()} == {"scores"}
    assert not any(key.endswith("bank") for key in slot.state_dict())


def test_layer_types_follow_the_arch():
    m = models.create("conv6", 8)
    kinds = [type(x) for x in m.weighted_layers()]
    assert kinds == [SlotConv2d] * 6 + [SlotLinear] * 3
    convs = [layer for layer in m.arch.layers if isinstance(layer, arch.Conv2d)]
    assert [c.padding for c in convs] == [0, 0, 0, 0, 1, 1]
    vgg = arch.get("vgg19")
    bns = [layer for layer in vgg.layers if isinstance(layer, arch.BatchNorm2d)]
    assert len(bns) == 16 and not any(b.affine for b in bns)
    assert any(isinstance(layer, arch.AvgPool2d) for layer in vgg.layers)


def test_learned_init_is_glorot_from_the_generator():
    m = models.create("lenet300100", method="learned", seed=5)
    first = m.weighted_layers()[0]
    bound = prng.glorot_bound(784, 300)
    expected = prng.bank_np(5, 0, 784 * 300, 1, bound).reshape(300, 784)
    assert torch.equal(first.weight.detach(), torch.from_numpy(expected))


def test_dense_from_slot_reproduces_logits():
    torch.manual_seed(0)
    slot = models.create("conv2", 8, seed=1)
    with torch.no_grad():
        for layer in slot.weighted_layers():
            layer.scores.uniform_()
    dense = models.dense_from_slot(slot)
    slot.eval()
    dense.eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(slot(x), dense(x))


def test_same_seed_same_model_different_seed_different():
    a, b, c = (models.create("lenet300100", 8, seed=s) for s in (1, 1, 2))
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))


def test_arch_round_trips_through_dicts():
    for a in arch.ZOO.values():
        again = tuple(arch.layer_from_dict(arch.layer_to_dict(layer)) for layer in a.layers)
        assert again == a.layers
    with pytest.raises(RegistryError, match="unknown layer op"):
        arch.layer_from_dict({"op": "lstm"})


def test_registry_errors_list_valid_names():
    with pytest.raises(
        RegistryError, match="lenet300100, conv2, conv4, conv6, vgg19, resnet20, resnet18"
    ):
        models.create("resnet50")
    with pytest.raises(ConfigError, match="K must be >= 2"):
        models.create("lenet300100", 1)
    with pytest.raises(ConfigError, match="unknown method"):
        models.create("lenet300100", method="frozen")


def test_fans_follow_torch_convention():
    conv = arch.Conv2d(16, 32, 3, groups=4)
    w = torch.empty(*conv.weight_shape)
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(w)
    assert conv.fans == (fan_in, fan_out)
    assert math.prod(conv.weight_shape) == 32 * 4 * 9

"""slotify: any nn.Module as a slot network, equal in eval mode to its dense twin."""

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from slotpack import models, prng
from slotpack.errors import ConfigError
from slotpack.layers import SlotConv1d, SlotConv2d, SlotLinear
from slotpack.modules import (
    dense_state_dict,
    param_groups,
    select_layers,
    selected_indices,
    slot_layer_info,
    slot_layers,
    slotify,
)
from tests.helpers import states_equal

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(48, 32),
        nn.LayerNorm(32),
        nn.GELU(),
        nn.Linear(32, 16, bias=False),
        nn.GELU(),
        nn.Linear(16, 10),
    )


class _Convs(nn.Module):
    """Every convolution geometry slotify must keep: non-square kernels, 'same', dilation,
    depthwise and grouped convolutions, stride tuples, Conv1d, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, (3, 5), stride=(1, 2), padding=(1, 2))
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, (2, 3), padding="same", dilation=(2, 1), bias=False)
        self.c = nn.Conv2d(8, 8, 3, padding="valid", groups=8)  # depthwise
        self.d = nn.Conv2d(8, 12, (1, 3), stride=2, padding=1, groups=4)
        self.e = nn.Conv1d(12, 6, 4, padding="same", dilation=3, groups=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.d(self.c(self.b(torch.relu(self.bn(self.a(x))))))
        x = self.e(x.flatten(2))  # [N, 12, H*W] as a sequence
        return self.head(x.mean(2))


def _eval_equal(slot: nn.Module, dense: nn.Module, x: torch.Tensor, state=None) -> None:
    """dense loads dense_state_dict(slot) strictly and gives the same output, bit for bit: the
    same float32 weights through the same torch functions."""
    dense.load_state_dict(dense_state_dict(slot) if state is None else state, strict=True)
    slot.eval(), dense.eval()
    with torch.no_grad():
        assert torch.equal(slot(x), dense(x))


def _dense_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in WEIGHTED]


@pytest.mark.parametrize("selection", ["greedy", "probabilistic"])
@pytest.mark.parametrize("lean", [False, True])
def test_mlp_matches_dense_twin(selection, lean):
    slot = slotify(_mlp(), 4, 11, selection=selection, lean=lean)
    assert [type(m) for _, m in slot_layers(slot)] == [SlotLinear] * 3
    assert isinstance(slot[2], nn.LayerNorm) and isinstance(slot[3], nn.GELU)
    _eval_equal(slot, _mlp(), torch.randn(2, 3, 4, 4))


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's, for the dense twin too
def test_convolutions_match_dense_twin():
    torch.manual_seed(0)
    model = _Convs()
    model.bn.running_mean.normal_(), model.bn.running_var.uniform_(0.5, 2)
    stats = copy.deepcopy(model.bn.state_dict())
    slot = slotify(model, 5, 3)
    kinds = {n: type(m) for n, m in slot_layers(slot)}
    assert kinds == {
        "a": SlotConv2d,
        "b": SlotConv2d,
        "c": SlotConv2d,
        "d": SlotConv2d,
        "e": SlotConv1d,
        "head": SlotLinear,
    }
    assert slot.b.padding == "same" and slot.a.stride == (1, 2)
    dense = _Convs()
    _eval_equal(slot, dense, torch.randn(1, 3, 12, 10))
    for key, value in stats.items():
        assert torch.equal(dense.bn.state_dict()[key], value)


def test_bias_is_the_users_parameter():
    model = _mlp()
    bias = model[1].bias
    slot = slotify(model, 2, 0)
    assert slot[1].bias is bias and slot[4].bias is None
    assert torch.equal(dense_state_dict(slot)["1.bias"], bias.detach())


def test_numbering_is_named_modules_order():
    model = _Convs()
    names = _dense_names(model)
    slot = slotify(model, 3, 9)
    assert [n for n, _ in slot_layers(slot)] == names
    assert [m.layer for _, m in slot_layers(slot)] == list(range(len(names)))
    info = slot_layer_info(slot)
    assert [i.number for i in info] == list(range(len(names)))
    assert info[1].name == "b" and info[1].weight_name == "b.weight" and info[1].bias_name is None
    assert info[1].weight_shape == (8, 8, 2, 3) and info[4].kind == "conv1d"
    assert {i.reference_rule for i in info} == {prng.DEFAULT_INIT} and {i.k for i in info} == {3}


def test_values_are_the_generators_numpy_half():
    """A torch-free reader rebuilds every deployed weight from (seed, number, index, K, bound)
    with the Glorot bound of torch's own fan convention for the dense weight's shape."""
    model = _Convs()
    shapes = {
        n + ".weight": m.weight.shape for n, m in model.named_modules() if type(m) in WEIGHTED
    }
    slot = slotify(model, 6, 2**63 + 5, init="uniform")
    dense = dense_state_dict(slot)
    indices = selected_indices(slot)
    for info in slot_layer_info(slot):
        idx = indices[info.weight_name]
        assert idx.dtype == np.uint16 and idx.size == np.prod(info.weight_shape)
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(
            torch.empty(shapes[info.weight_name])
        )
        assert info.bound == prng.glorot_bound(fan_in, fan_out)
        values = prng.selected_np(info.seed, info.number, idx, info.k, info.bound)
        assert np.array_equal(values.reshape(info.weight_shape), dense[info.weight_name].numpy())


def test_reslotify_is_bit_identical():
    a, b = slotify(_Convs(), 4, 77), slotify(_Convs(), 4, 77)
    da, db = dense_state_dict(a), dense_state_dict(b)
    for info in slot_layer_info(a):
        assert torch.equal(da[info.weight_name], db[info.weight_name])
    c = dense_state_dict(slotify(_Convs(), 4, 78))
    assert not torch.equal(da["a.weight"], c["a.weight"])


def test_sgd_changes_scores_and_floats_only():
    torch.manual_seed(1)
    slot = slotify(nn.Sequential(_Convs(), nn.LayerNorm(5)), 4, 5)
    before = {k: v.clone() for k, v in slot.state_dict().items() if torch.is_tensor(v)}
    bank = slot[0].a.bank.clone()
    groups = param_groups(slot, score_lr=0.5, float_lr=0.1, float_weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["scores", "floats"]
    assert len(groups[0]["params"]) == 6
    opt = torch.optim.SGD(groups, momentum=0.9)
    x, y = torch.randn(2, 3, 12, 10), torch.tensor([1, 3])
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(slot(x), y).backward()
        opt.step()
    after = slot.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {n for n, p in slot.named_parameters()}
    running = {k for k in before if "running_" in k or "num_batches" in k}
    assert changed - running == trainable  # every score and float moved, nothing else did
    assert torch.equal(slot[0].a.bank, bank)


def test_param_groups_leave_out_frozen_and_empty():
    slot = slotify(_mlp(), 2, 0)
    slot[2].weight.requires_grad_(False)
    groups = param_groups(slot, 1.0, 0.1)
    floats = {id(p) for p in groups[1]["params"]}
    assert id(slot[2].weight) not in floats and id(slot[2].bias) in floats
    only_scores = slotify(nn.Linear(4, 3, bias=False), 2, 0)
    assert [g["name"] for g in param_groups(only_scores, 1.0, 0.1)] == ["scores"]


def test_include_exclude_patterns_and_predicates():
    assert [n for n, _ in select_layers(_Convs(), exclude="head")] == ["a", "b", "c", "d", "e"]
    assert [n for n, _ in select_layers(_Convs(), include=["a", "e"])] == ["a", "e"]
    pred = [n for n, _ in select_layers(_Convs(), include=lambda n, m: isinstance(m, nn.Conv2d))]
    assert pred == ["a", "b", "c", "d"]
    nested = nn.Sequential(_Convs(), nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2)))
    assert [n for n, _ in select_layers(nested, include="1")] == ["1.0", "1.1"]  # subtree
    assert [n for n, _ in select_layers(nested, exclude="0.*")] == ["1.0", "1.1"]
    slot = slotify(nested, 2, 0, exclude="0")
    assert type(slot[0].a) is nn.Conv2d and [m.layer for _, m in slot_layers(slot)] == [0, 1]


def test_filter_errors():
    with pytest.raises(ConfigError, match="'haed' matches no module"):
        slotify(_Convs(), 2, 0, exclude="haed")
    up = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 3, 2))
    assert [n for n, _ in select_layers(up)] == ["0"]  # not asked for: stays float
    with pytest.raises(ConfigError, match=r"'1' \(ConvTranspose2d\)"):
        slotify(up, 2, 0, include="*")
    with pytest.raises(ConfigError, match=r"'b' \(Bilinear\)"):
        slotify(nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Bilinear(2, 2, 2)}), 2, 0, include="b")


def test_unsupported_layers_raise_config_errors():
    reflect = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ConfigError, match=r"'1' \(Conv2d\): padding_mode='reflect'"):
        slotify(reflect, 2, 0)
    assert type(reflect[0]) is nn.Linear  # checked before anything was replaced
    with pytest.raises(ConfigError, match="no nn.Linear"):
        slotify(nn.Sequential(nn.ReLU()), 2, 0)
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ConfigError, match="tied weights"):
        slotify(tied, 2, 0)
    with pytest.raises(ConfigError, match="float64"):
        slotify(nn.Sequential(nn.Linear(2, 2).double()), 2, 0)
    with pytest.raises(ConfigError, match="K must be"):
        slotify(_mlp(), 1, 0)
    with pytest.raises(ConfigError, match="got 2 values of K"):
        slotify(_mlp(), (2, 4), 0)
    with pytest.raises(ConfigError, match="already holds slot layers"):
        slotify(slotify(_mlp(), 2, 0), 2, 0)


def test_shared_module_is_one_slot_layer():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    slot = slotify(model, 2, 0)
    assert slot[0] is slot[2] and len(slot_layers(slot)) == 1
    _eval_equal(slot, nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), torch.randn(3, 4))


def test_per_layer_k_and_a_bare_layer():
    slot = slotify(_mlp(), (2, 3, np.int64(5)), np.uint64(0))
    assert [m.k for _, m in slot_layers(slot)] == [2, 3, 5]
    bare = slotify(nn.Conv2d(2, 3, (1, 2)), 4, 0)
    assert isinstance(bare, SlotConv2d) and [n for n, _ in slot_layers(bare)] == [""]
    assert set(dense_state_dict(bare)) == {"weight", "bias"}


def test_zoo_is_an_ordinary_use_of_slotify():
    """A learned zoo twin, slotified with the zoo's K and seed, is the zoo's slot model: same
    numbering, initial scores, values and biases (the zoo can become a call to slotify)."""
    slot = models.create("lenet300100", 4, seed=3)
    twin = slotify(models.create("lenet300100", 4, method="learned", seed=3), 4, 3)
    assert states_equal(slot.state_dict(), twin.state_dict())  # tensors and slot layer records
    finetune = models.dense_from_slot(slot).state_dict()
    assert finetune.keys() == dense_state_dict(slot).keys()
    assert all(torch.equal(v, finetune[k]) for k, v in dense_state_dict(twin).items())


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize(
    "ctor", [torchvision.models.resnet18, torchvision.models.mobilenet_v3_small]
)
def test_torchvision_models_match_dense_twins(ctor, x32):
    """K=2, lean and init "uniform" only to keep the generator's work small (11M connections)."""
    torch.manual_seed(0)
    model = ctor(num_classes=10)
    names = _dense_names(model)
    slot = slotify(model, 2, 1, lean=True, init="uniform")
    assert [n for n, _ in slot_layers(slot)] == names
    dense = dense_state_dict(slot)
    _eval_equal(slot, ctor(num_classes=10), x32, dense)
    indices = selected_indices(slot)
    for info in slot_layer_info(slot)[-2:]:  # the numpy half rebuilds the last two layers
        values = prng.selected_np(1, info.number, indices[info.weight_name], 2, info.bound)
        assert np.array_equal(values.reshape(info.weight_shape), dense[info.weight_name].numpy())

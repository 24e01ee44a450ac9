"""Slot layers: straight-through gradients, greedy == dense, probabilistic follows softmax."""

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slotpack import layers, prng
from slotpack.errors import ConfigError
from slotpack.layers import SlotConv2d, SlotLinear


def _reference_score_grad(layer, grad_w: torch.Tensor) -> torch.Tensor:
    """d loss/d score[i,k] = d loss/d w[i] * value[i,k], in float64 from the numpy bank."""
    n = grad_w.numel()
    bank = prng.bank_np(layer.seed, layer.layer, n, layer.k, layer.bound).astype(np.float64)
    return torch.from_numpy(grad_w.reshape(-1, 1).double().numpy() * bank)


@pytest.mark.parametrize("block", [None, 24])  # default, and many blocks with a remainder
def test_linear_gradient_matches_formula(block, monkeypatch):
    if block:
        monkeypatch.setattr(layers, "_GRAD_BLOCK", block)
    torch.manual_seed(0)
    layer = SlotLinear(20, 7, 4, seed=9, layer=2)
    x, r = torch.randn(5, 20), torch.randn(5, 7)
    (layer(x) * r).sum().backward()
    grad_w = r.double().T @ x.double()  # d loss / d W for y = x W^T
    expected = _reference_score_grad(layer, grad_w)
    torch.testing.assert_close(layer.scores.grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "groups,stride,dilation,padding", [(1, 1, 1, 0), (2, 2, 1, 1), (4, 1, 2, 2)]
)
def test_conv_gradient_matches_formula(groups, stride, dilation, padding):
    torch.manual_seed(1)
    layer = SlotConv2d(
        8,
        12,
        3,
        3,
        seed=5,
        layer=1,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    x = torch.randn(2, 8, 9, 9)
    out = layer(x)
    r = torch.randn_like(out)
    (out * r).sum().backward()
    w64 = layer.weight().detach().double().requires_grad_(True)
    out64 = F.conv2d(x.double(), w64, None, stride, padding, dilation, groups)
    (out64 * r.double()).sum().backward()
    expected = _reference_score_grad(layer, w64.grad)
    # float32 convolution sums against a float64 reference: errors relative to the gradient scale.
    scale = expected.abs().max().item()
    torch.testing.assert_close(layer.scores.grad.double(), expected, rtol=1e-5, atol=1e-5 * scale)


def test_greedy_forward_equals_dense_layer_of_selected_values():
    layer = SlotLinear(30, 11, 8, seed=1, layer=0, bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 11))
    index = layer.scores.argmax(1).numpy()
    w = prng.selected_np(1, 0, index, 8, layer.bound).reshape(11, 30)
    x = torch.randn(4, 30)
    dense = torch.nn.Linear(30, 11)
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(w))
        dense.bias.copy_(layer.bias)
    assert torch.equal(layer(x), dense(x))
    layer.eval()
    assert torch.equal(layer(x), dense(x))


@pytest.mark.parametrize("groups,stride,dilation,padding", [(1, 2, 1, 1), (3, 1, 2, 0)])
def test_conv_forward_equals_dense_conv(groups, stride, dilation, padding):
    layer = SlotConv2d(
        6,
        9,
        3,
        5,
        seed=2,
        layer=4,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=True,
    )
    dense = torch.nn.Conv2d(6, 9, 3, stride, padding, dilation, groups, bias=True)
    index = layer.scores.argmax(1).numpy()
    w = prng.selected_np(2, 4, index, 5, layer.bound).reshape(dense.weight.shape)
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(w))
        dense.bias.copy_(layer.bias)
    x = torch.randn(2, 6, 10, 10)
    assert torch.equal(layer(x), dense(x))


def test_probabilistic_selection_follows_softmax():
    torch.manual_seed(3)
    layer = SlotLinear(500, 200, 4, seed=0, layer=0, selection="probabilistic")
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    with torch.no_grad():
        layer.scores.copy_(logits.expand_as(layer.scores))
    layer.train()
    freq = torch.bincount(layer.selected_index(), minlength=4).double() / layer.scores.shape[0]
    p = torch.softmax(logits.double(), 0)
    se = torch.sqrt(p * (1 - p) / layer.scores.shape[0])
    assert torch.all((freq - p).abs() < 6 * se), (freq, p)
    # Evaluation (and packing) uses one fixed draw: softmax-distributed, seeded, repeatable,
    # independent of torch's RNG, and a different draw for another seed.
    layer.eval()
    fixed = layer.selected_index()
    freq = torch.bincount(fixed, minlength=4).double() / layer.scores.shape[0]
    assert torch.all((freq - p).abs() < 6 * se), (freq, p)
    torch.manual_seed(99)
    assert torch.equal(layer.selected_index(), fixed)
    other = SlotLinear(500, 200, 4, seed=1, layer=0, selection="probabilistic").eval()
    with torch.no_grad():
        other.scores.copy_(layer.scores)
    assert (other.selected_index() != fixed).float().mean() > 0.3
    # Peaked scores make the draw the argmax.
    with torch.no_grad():
        layer.scores.copy_(100 * logits.expand_as(layer.scores))
    assert torch.all(layer.selected_index() == 2)


def test_probabilistic_gradient_uses_the_sampled_values():
    torch.manual_seed(4)
    layer = SlotLinear(6, 3, 4, seed=0, layer=0, selection="probabilistic")
    x = torch.randn(2, 6)
    torch.manual_seed(10)
    index = layer.selected_index()
    torch.manual_seed(10)
    out = layer(x)
    w = layer.bank.gather(1, index[:, None]).view(3, 6)
    assert torch.equal(out, F.linear(x, w))


@pytest.mark.parametrize("k", [2, 3, 5, 64])
def test_any_k(k):
    layer = SlotLinear(10, 4, k, seed=0, layer=0)
    assert layer.scores.shape == (40, k)
    assert torch.equal(layer.bank, prng.bank_torch(0, 0, 40, k, layer.bound))
    layer(torch.randn(3, 10)).sum().backward()
    assert layer.scores.grad.shape == (40, k)


def test_bad_configuration():
    with pytest.raises(ConfigError, match="K must be >= 2"):
        SlotLinear(3, 3, 1, seed=0, layer=0)
    with pytest.raises(ConfigError, match="unknown selection"):
        SlotLinear(3, 3, 4, seed=0, layer=0, selection="best")
    with pytest.raises(ConfigError, match="divisible by groups"):
        SlotConv2d(6, 4, 3, 4, seed=0, layer=0, groups=4)


def test_bank_is_not_saved_and_scores_are():
    layer = SlotConv2d(3, 4, 3, 8, seed=0, layer=0, bias=True)
    keys = set(layer.state_dict())
    assert keys == {"scores", "bias", "_extra_state"}  # the extra state: its record, no tensor
    # The bank is regenerated identically on load.
    other = SlotConv2d(3, 4, 3, 8, seed=0, layer=0, bias=True)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.bank, layer.bank)


def test_scores_initialised_uniform_zero_to_bound():
    layer = SlotLinear(784, 300, 8, seed=0, layer=0)
    assert layer.scores.min() >= 0 and layer.scores.max() < layer.bound
    assert abs(layer.scores.mean().item() / layer.bound - 0.5) < 0.01


@pytest.mark.parametrize("score_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("selection", ["greedy", "probabilistic"])
def test_lean_mode_is_bit_identical_without_a_bank(selection, score_dtype, monkeypatch):
    monkeypatch.setattr(layers, "_GRAD_BLOCK", 64)  # several gradient blocks per layer

    def build(lean):
        common = dict(seed=4, lean=lean, selection=selection, score_dtype=score_dtype)
        return (
            SlotConv2d(6, 8, 3, 5, layer=2, padding=1, groups=2, **common),
            SlotLinear(8 * 36, 10, 5, layer=3, **common),
        )

    x = torch.randn(3, 6, 6, 6)
    grads, weights = {}, {}
    for lean in (False, True):
        conv, fc = build(lean)
        assert (conv.bank is None) == lean and (fc.bank is None) == lean
        torch.manual_seed(0)  # probabilistic selection draws the same samples in both modes
        fc(torch.relu(conv(x)).flatten(1)).square().sum().backward()
        torch.manual_seed(0)
        weights[lean] = [conv.weight(), fc.weight()]
        grads[lean] = [conv.scores.grad, fc.scores.grad]
    for a, b in zip(weights[False] + grads[False], weights[True] + grads[True], strict=True):
        assert torch.equal(a, b)


def test_bfloat16_scores_round_the_float32_gradient():
    bf = SlotLinear(30, 9, 8, seed=2, layer=1, score_dtype="bfloat16", bias=True)
    f32 = SlotLinear(30, 9, 8, seed=2, layer=1, bias=True)
    assert bf.scores.dtype == torch.bfloat16 and bf.bias.dtype == torch.float32
    with torch.no_grad():
        f32.scores.copy_(bf.scores.float())  # the same scores, so the same argmax
    x = torch.randn(4, 30)
    for layer in (bf, f32):
        layer(x).square().sum().backward()
    assert torch.equal(bf.weight(), f32.weight())
    assert bf.scores.grad.dtype == torch.bfloat16
    assert torch.equal(bf.scores.grad, f32.scores.grad.to(torch.bfloat16))
    with pytest.raises(ConfigError, match="score dtype"):
        SlotLinear(3, 2, 4, seed=0, layer=0, score_dtype="float16")


@pytest.mark.parametrize("make", [
    lambda **kw: SlotLinear(40, 30, 4, seed=1, layer=0, bias=True, **kw),
    lambda **kw: SlotConv2d(3, 5, 3, 4, seed=1, layer=1, padding=1, **kw),
])  # fmt: skip
def test_lean_greedy_layers_regenerate_their_weight_for_backward(make):
    x = torch.randn(2, 40) if isinstance(make(), SlotLinear) else torch.randn(2, 3, 6, 6)
    refs, grads = {}, {}
    for lean in (False, True):
        layer = make(lean=lean)
        weight = layer.weight
        kept = []

        def spy(weight=weight, kept=kept):
            w = weight()
            kept.append(weakref.ref(w._base))  # every view of the weight keeps its base alive
            return w

        layer.weight = spy
        xi = x.clone().requires_grad_()
        out = layer(xi)
        gc.collect()
        refs[lean] = kept[0]() is not None  # does the graph still hold the weight?
        out.square().sum().backward()
        grads[lean] = (xi.grad, layer.scores.grad)
    assert refs == {False: True, True: False}
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))


def test_regenerating_a_weight_refuses_scores_changed_since_forward():
    layer = SlotLinear(10, 6, 4, seed=1, layer=0, lean=True)
    out = layer(torch.randn(3, 10, requires_grad=True))
    with torch.no_grad():
        layer.scores.mul_(1.0)  # same values, but an in-place change all the same
    with pytest.raises(RuntimeError, match="slot layer 0 were modified in place"):
        out.sum().backward()
    stored = SlotLinear(10, 6, 4, seed=1, layer=0)  # the stored-bank layer keeps its weight
    out = stored(torch.randn(3, 10, requires_grad=True))
    with torch.no_grad():
        stored.scores.mul_(1.0)
    out.sum().backward()

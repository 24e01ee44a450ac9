"""Slot layers: every connection holds K fixed random values; training learns which one to use.

The value bank is regenerated from (seed, layer) on the layer's device and never saved; only the
scores [connections, K] (and an optional bias) are parameters. In lean mode the bank is not even
kept in memory: the forward pass generates only each connection's selected value, and the backward
pass regenerates the K values it needs for the score gradient (bit-identical results). The forward pass gathers the selected
value per connection (no K-times one-hot product); the backward pass is the straight-through rule
d loss / d score[i, k] = d loss / d w[i] * value[i, k].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import prng
from .errors import ConfigError

SELECTIONS = ("greedy", "probabilistic")


class _SelectValues(torch.autograd.Function):
    """w[i] = bank[i, index[i]] forward; straight-through score gradient backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bank)
        return bank.gather(1, index.unsqueeze(1)).squeeze(1)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        (bank,) = ctx.saved_tensors
        return grad_w.unsqueeze(1) * bank, None, None


class _SelectLean(torch.autograd.Function):
    """The same function as _SelectValues with no stored bank: values come from the generator."""

    @staticmethod
    def forward(
        ctx, scores: torch.Tensor, index: torch.Tensor, key: int, bound: float
    ) -> torch.Tensor:
        n, k = scores.shape
        ctx.key, ctx.bound, ctx.shape = key, bound, (n, k)
        counters = torch.arange(n, dtype=torch.int64, device=scores.device) * k + index
        return prng.values_torch(key, counters, bound)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        n, k = ctx.shape
        counters = torch.arange(n * k, dtype=torch.int64, device=grad_w.device)
        # The regenerated bank becomes the gradient buffer in place: one [n, K] allocation.
        grad = prng.values_torch(ctx.key, counters, ctx.bound).view(n, k)
        grad.mul_(grad_w.unsqueeze(1))
        return grad, None, None, None


def select_index(scores: torch.Tensor, selection: str, sample: bool) -> torch.Tensor:
    """Index of the chosen value per connection.

    Greedy: argmax. Probabilistic while ``sample``: a draw from softmax(scores) by the Gumbel-max
    trick (one vectorised argmax; the same distribution as torch.multinomial). When not sampling
    (evaluation, packing) every model uses the argmax, so what is evaluated is what is packed.
    """
    with torch.no_grad():
        if selection == "probabilistic" and sample:
            u = torch.rand_like(scores).clamp_(min=torch.finfo(scores.dtype).tiny)
            return (scores - torch.log(-torch.log(u))).argmax(1)
        return scores.argmax(1)


class _SlotMixin(nn.Module):
    """State shared by SlotLinear and SlotConv2d: scores, the bank and selection."""

    weight_shape: tuple[int, ...]

    def _init_slots(
        self,
        weight_shape: tuple[int, ...],
        fans: tuple[int, int],
        k: int,
        seed: int,
        layer: int,
        selection: str,
        bias: bool,
        device: torch.device | str | None,
        lean: bool = False,
    ) -> None:
        if k < 2:
            raise ConfigError(f"K must be >= 2, got {k}")
        if selection not in SELECTIONS:
            raise ConfigError(
                f"unknown selection {selection!r}; choose one of: {', '.join(SELECTIONS)}"
            )
        self.weight_shape = tuple(weight_shape)
        self.k, self.seed, self.layer, self.selection = k, seed, layer, selection
        self.bound = prng.glorot_bound(*fans)
        n = math.prod(weight_shape)
        self.scores = nn.Parameter(prng.initial_scores_torch(seed, layer, n, k, self.bound, device))
        self.lean = lean
        bank = None if lean else prng.bank_torch(seed, layer, n, k, self.bound, device)
        self.register_buffer("bank", bank, persistent=False)
        out = weight_shape[0]
        self.bias = nn.Parameter(torch.zeros(out, device=device)) if bias else None

    def selected_index(self) -> torch.Tensor:
        """Flat [connections] index of the value each connection uses (greedy unless sampling)."""
        return select_index(self.scores, self.selection, sample=self.training)

    def weight(self) -> torch.Tensor:
        """The dense weight this forward pass uses, differentiable w.r.t. the scores."""
        index = self.selected_index()
        if self.lean:
            w = _SelectLean.apply(
                self.scores, index, prng.layer_key(self.seed, self.layer), self.bound
            )
        else:
            w = _SelectValues.apply(self.scores, self.bank, index)
        return w.view(self.weight_shape)

    def extra_repr(self) -> str:
        lean = ", lean" if self.lean else ""
        return f"K={self.k}, seed={self.seed}, layer={self.layer}, selection={self.selection}{lean}"


class SlotLinear(_SlotMixin):
    """A linear layer whose weights are selected among K seeded random values per connection."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int,
        *,
        seed: int,
        layer: int,
        selection: str = "greedy",
        bias: bool = False,
        device: torch.device | str | None = None,
        lean: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, in_features)
        fans = (in_features, out_features)
        self._init_slots(shape, fans, k, seed, layer, selection, bias, device, lean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class SlotConv2d(_SlotMixin):
    """A 2-D convolution (stride, padding, dilation, groups) with slot-selected weights."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        k: int,
        *,
        seed: int,
        layer: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        selection: str = "greedy",
        bias: bool = False,
        device: torch.device | str | None = None,
        lean: bool = False,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ConfigError(
                f"channels ({in_channels} in, {out_channels} out) must be divisible by groups={groups}"
            )
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        rf = kernel_size * kernel_size
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        fans = ((in_channels // groups) * rf, out_channels * rf)
        self._init_slots(shape, fans, k, seed, layer, selection, bias, device, lean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

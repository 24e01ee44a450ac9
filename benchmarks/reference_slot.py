"""A faithful re-implementation of the paper's reference approach, for comparison only.

The reference code keeps the K values of every connection as a [*, K] weight tensor, builds a
one-hot mask of the argmax with a straight-through function, and multiplies:
``w = sum(weight * one_hot(argmax(scores)), -1)`` — three K-sized tensors per layer per step.
Values and scores are copied from a slotpack model so both compute the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slotpack.layers import SlotConv2d, SlotLinear


class _OneHotStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return F.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class ReferenceSlot(nn.Module):
    """Wraps the geometry of a slotpack slot layer with the reference forward pass."""

    def __init__(self, layer: SlotLinear | SlotConv2d) -> None:
        super().__init__()
        shape = (*layer.weight_shape, layer.k)
        self.weight = nn.Parameter(layer.bank.detach().clone().view(shape), requires_grad=False)
        self.scores = nn.Parameter(layer.scores.detach().clone().view(shape))
        self.conv = isinstance(layer, SlotConv2d)
        if self.conv:
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sum(self.weight * _OneHotStraightThrough.apply(self.scores), dim=-1)
        if self.conv:
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w)


def to_reference(model: nn.Sequential) -> nn.Sequential:
    """A copy of a slotpack slot model whose slot layers use the reference approach."""
    return nn.Sequential(
        *[ReferenceSlot(m) if isinstance(m, (SlotLinear, SlotConv2d)) else m for m in model]
    )

"""Torch models from the zoo (slotpack/arch.py): slot networks and their dense float32 twins.

``create("conv6", k=8)`` is the one entry point; ``slotpack train --model conv6`` reads the same
registry. A slot model is its learned twin's layer list passed through ``slotify`` (the zoo is an
ordinary use of it, not a second path), so a trained slot model can seed the twin for
finetuning (``dense_from_slot``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.utils import skip_init

from . import arch as A
from . import prng, resnets
from .errors import ConfigError
from .format import MAX_K
from .layers import EXTRA_STATE, SELECTIONS, SlotConv2d, SlotLinear, score_torch_dtype
from .modules import SUPPORTED, dense_state_dict, slotify

METHODS = ("slot", "learned")
SlotLayer = SlotLinear | SlotConv2d


def _dense_module(layer: A.Linear | A.Conv2d, device) -> nn.Module:
    """The torch layer of a zoo ``layer``, its weight uninitialised and its bias zero: slotify
    drops the weight, ``_generator_init`` fills it for a learned twin."""
    if isinstance(layer, A.Linear):
        args: tuple = (nn.Linear, layer.in_features, layer.out_features, layer.bias)
    else:
        args = (nn.Conv2d, layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                layer.padding, layer.dilation, layer.groups, layer.bias)  # fmt: skip
    # skip_init builds on meta and moves to ``device``: None must mean torch's default device
    module = skip_init(*args, device=torch.empty(0).device if device is None else device)
    if module.bias is not None:
        with torch.no_grad():
            module.bias.zero_()
    return module


@torch.no_grad()
def _generator_init(module: nn.Module, layer: A.Linear | A.Conv2d, index: int, seed: int) -> None:
    """Learned baselines start from Glorot-uniform values drawn from the same generator (slot 0
    of a K=1 bank), so their initialisation is as reproducible as the slot models'."""
    bound = prng.glorot_bound(*layer.fans)
    n = module.weight.numel()
    values = prng.bank_torch(seed, index, n, 1, bound, module.weight.device)
    module.weight.copy_(values.view_as(module.weight))


def _plain_module(layer: A.Layer) -> nn.Module:
    match layer:
        case A.ReLU():
            return nn.ReLU(inplace=True)
        case A.MaxPool2d(kernel_size=ks, stride=st):
            return nn.MaxPool2d(ks, st)
        case A.AvgPool2d(kernel_size=ks, stride=st):
            return nn.AvgPool2d(ks, st)
        case A.BatchNorm2d():
            return nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine)
        case A.Flatten():
            return nn.Flatten()
        case A.Dropout(p=p):
            return nn.Dropout(p)
    raise ConfigError(f"no torch module for layer {layer!r}")


class Net(nn.Sequential):
    """A zoo network; ``arch``, ``method``, ``k``, ``selection`` and ``seed`` say how it was built."""

    def __init__(
        self,
        arch: A.Arch,
        method: str,
        k: int,
        selection: str,
        seed: int,
        device=None,
        lean: bool = False,
        score_dtype: str = "float32",
        init: str = prng.DEFAULT_INIT,
        stick: float | tuple[float, ...] = 0.0,
    ):
        ks = layer_ks(arch, k)
        sticks = (stick,) * len(ks) if isinstance(stick, int | float) else tuple(stick)
        if len(sticks) != len(ks):
            raise ConfigError(f"{arch.name} has {len(ks)} weighted layers; got {len(sticks)} rates")
        modules = [
            _dense_module(layer, device) if isinstance(layer, A.WEIGHTED) else _plain_module(layer)
            for layer in arch.layers
        ]
        super().__init__(*modules)
        if device is not None:
            self.to(device)  # BatchNorm running statistics
        if method == "slot":  # the zoo is an ordinary use of slotify: layer i is weighted layer i
            slotify(
                self, ks, seed, selection=selection, init=init, lean=lean,
                score_dtype=score_dtype, stick=sticks,
            )  # fmt: skip
        else:
            weighted = [layer for layer in arch.layers if isinstance(layer, A.WEIGHTED)]
            for index, (layer, module) in enumerate(
                zip(weighted, self.weighted_layers(), strict=True)
            ):
                _generator_init(module, layer, index, seed)
        self.arch, self.method, self.k, self.selection, self.seed = arch, method, k, selection, seed
        self.lean, self.init = lean, init

    def weighted_layers(self) -> list[nn.Module]:
        """The Linear/Conv2d (slot or dense) modules in generator layer order."""
        return [m for m in self if isinstance(m, (SlotLinear, SlotConv2d, nn.Linear, nn.Conv2d))]


def layer_ks(arch: A.Arch | A.ModuleArch, k: int | tuple[int, ...]) -> tuple[int, ...]:
    """One K per weighted layer: ``k`` for all, or ``k`` itself when it lists one per layer."""
    n = arch.num_weighted
    ks = (k,) * n if isinstance(k, int) else tuple(k)
    if len(ks) != n:
        raise ConfigError(f"{arch.name} has {n} weighted layers; got {len(ks)} values of K")
    return ks


def create(
    name: str,
    k: int | tuple[int, ...] = 8,
    *,
    method: str = "slot",
    selection: str = "greedy",
    seed: int = 0,
    device: torch.device | str | None = None,
    lean: bool = False,
    score_dtype: str = "float32",
    init: str = prng.DEFAULT_INIT,
    stick: float | tuple[float, ...] = 0.0,
) -> nn.Module:
    """Build zoo model ``name`` as a slot network (2 <= K <= 65536) or its dense ``learned`` twin.

    ``lean`` keeps no value bank in memory (slot layers regenerate values from the generator);
    ``score_dtype`` ("float32" or "bfloat16") is the dtype of the slot layers' scores; ``init``
    how initial scores are drawn (one of ``prng.INITS``, §1.7: "onedraw16", the default, draws
    the argmax slot first and orders the others from 16-bit draws, so a reader regenerates the
    reference from half an output and a changed connection's order from ceil(K/4); "uniform":
    K independent draws, runs before format version 2);
    ``stick`` the rate-aware margin (in layer bounds) of the initial argmax slot. ``k`` and
    ``stick`` may list one value per weighted layer.

    Layer-list models (``arch.ZOO``) are a ``Net``; module models (``arch.MODULE_ZOO``: resnet20,
    resnet18) are their torch module, slotified (``slotify``), with the same attributes
    (``arch``, ``method``, ``k``, ``selection``, ``seed``, ``lean``, ``init``)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if selection not in SELECTIONS:
        raise ConfigError(
            f"unknown selection {selection!r}; choose one of: {', '.join(SELECTIONS)}"
        )
    arch = A.spec(name)
    ks = layer_ks(arch, k)
    if method == "slot" and not all(2 <= k_i <= MAX_K for k_i in ks):  # before any allocation
        raise ConfigError(f"K must be >= 2 and <= {MAX_K} (the most a .slot file holds), got {k}")
    if not 0 <= seed < 2**64:
        raise ConfigError(f"seed must be in [0, 2**64), got {seed}")
    score_torch_dtype(score_dtype)
    if isinstance(arch, A.ModuleArch):
        return _module_model(arch, ks, method, selection, seed, device, lean, score_dtype, init,
                             stick)  # fmt: skip
    return Net(arch, method, k, selection, seed, device, lean, score_dtype, init, stick)


def _module_model(
    arch: A.ModuleArch,
    ks: tuple[int, ...],
    method: str,
    selection: str,
    seed: int,
    device,
    lean: bool,
    score_dtype: str,
    init: str,
    stick: float | tuple[float, ...],
) -> nn.Module:
    """A module model: slotify of the dense module, or (``learned``) the dense module with
    Glorot-uniform weights from the generator, as ``Net``'s learned layers. Biases start at
    zero either way, so the seed alone fixes the network (BatchNorm starts at 1 and 0)."""
    with torch.device(device) if device is not None else nullcontext():
        dense = resnets.build(arch.name, arch.num_classes)
    weighted = [m for _, m in dense.named_modules() if type(m) in SUPPORTED]
    if len(weighted) != arch.num_weighted:  # arch.MODULE_ZOO out of step with resnets.py
        raise RuntimeError(f"{arch.name}: {len(weighted)} weighted layers, the registry says "
                           f"{arch.num_weighted}")  # fmt: skip
    sticks = (stick,) * len(ks) if isinstance(stick, int | float) else tuple(stick)
    if len(sticks) != len(ks):
        raise ConfigError(f"{arch.name} has {len(ks)} weighted layers; got {len(sticks)} rates")
    with torch.no_grad():
        for index, module in enumerate(weighted):
            if module.bias is not None:
                module.bias.zero_()
            if method == "learned":
                bound = prng.glorot_bound(*A.Weight(tuple(module.weight.shape)).fans)
                values = prng.bank_torch(seed, index, module.weight.numel(), 1, bound,
                                         module.weight.device)  # fmt: skip
                module.weight.copy_(values.view_as(module.weight))
    model = dense
    if method == "slot":
        model = slotify(dense, ks, seed, selection=selection, init=init, lean=lean,
                        score_dtype=score_dtype, stick=sticks)  # fmt: skip
    model.arch, model.method, model.k, model.selection = arch, method, ks, selection
    model.seed, model.lean, model.init = seed, lean, init
    return model


def is_module_model(model: nn.Module) -> bool:
    """Whether ``model`` is a zoo module model (resnet20, resnet18) rather than a ``Net``."""
    return isinstance(getattr(model, "arch", None), A.ModuleArch)


def dense_from_slot(model: nn.Module) -> nn.Module:
    """A learned twin whose weights are the slot model's selected (greedy) weights: finetuning's start."""
    if model.method != "slot":
        raise ConfigError("dense_from_slot needs a slot model")
    device = next(model.parameters()).device
    if is_module_model(model):
        dense = create(model.arch.name, method="learned", seed=model.seed, device=device)
        dense.load_state_dict(dense_state_dict(model))
        return dense
    dense = Net(model.arch, "learned", model.k, model.selection, model.seed, device)
    model_state = {  # biases and BatchNorm: not the slot layers' scores and records
        k: v
        for k, v in model.state_dict().items()
        if not k.endswith((".scores", f".{EXTRA_STATE}"))
    }
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for slot, twin in zip(model.weighted_layers(), dense.weighted_layers(), strict=True):
            twin.weight.copy_(slot.weight())
    model.train(was_training)
    dense.load_state_dict({**dense.state_dict(), **model_state})
    return dense

"""The paper's model zoo as plain data: layer lists that torch models, manifests and exporters share.

No torch here. ``models.create`` builds modules from these lists; the ``.slot`` manifest and the
ONNX exporter describe the same lists, so a network can be rebuilt without the Python model code.
Weighted layers (Linear, Conv2d) are numbered 0, 1, 2, ... in list order: that number is the
``layer`` argument of the generator (docs/FORMAT.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .errors import RegistryError


@dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int
    bias: bool = False
    op: ClassVar[str] = "linear"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def fans(self) -> tuple[int, int]:
        return self.in_features, self.out_features


@dataclass(frozen=True)
class Conv2d:
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    op: ClassVar[str] = "conv2d"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        k = self.kernel_size
        return (self.out_channels, self.in_channels // self.groups, k, k)

    @property
    def fans(self) -> tuple[int, int]:
        # torch's convention (_calculate_fan_in_and_fan_out): both fans count the receptive field.
        rf = self.kernel_size * self.kernel_size
        return (self.in_channels // self.groups) * rf, self.out_channels * rf


@dataclass(frozen=True)
class Weight:
    """A slot weight of any layer, known only by its shape (weights-only files, §2.8): the fans
    follow torch's convention, dimension 0 the outputs, 1 the inputs, the rest the kernel."""

    shape: tuple[int, ...]
    op: ClassVar[str] = "weight"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def fans(self) -> tuple[int, int]:
        rf = math.prod(self.shape[2:])
        return self.shape[1] * rf, self.shape[0] * rf


@dataclass(frozen=True)
class ReLU:
    op: ClassVar[str] = "relu"


@dataclass(frozen=True)
class MaxPool2d:
    kernel_size: int
    stride: int
    op: ClassVar[str] = "maxpool2d"


@dataclass(frozen=True)
class AvgPool2d:
    kernel_size: int
    stride: int
    op: ClassVar[str] = "avgpool2d"


@dataclass(frozen=True)
class BatchNorm2d:
    num_features: int
    affine: bool = False
    eps: float = 1e-5
    momentum: float = 0.1
    op: ClassVar[str] = "batchnorm2d"


@dataclass(frozen=True)
class Flatten:
    op: ClassVar[str] = "flatten"


@dataclass(frozen=True)
class Dropout:
    p: float
    op: ClassVar[str] = "dropout"


Layer = Linear | Conv2d | ReLU | MaxPool2d | AvgPool2d | BatchNorm2d | Flatten | Dropout
WEIGHTED = (Linear, Conv2d)
LAYER_TYPES: dict[str, type] = {
    cls.op: cls
    for cls in (Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, BatchNorm2d, Flatten, Dropout)
}


def layer_to_dict(layer: Layer) -> dict:
    """``{"op": ..., **fields}``: the form a manifest stores."""
    return {"op": layer.op, **asdict(layer)}


def layer_from_dict(d: dict) -> Layer:
    """Inverse of :func:`layer_to_dict`; unknown ops or fields raise RegistryError."""
    op = d.get("op")
    if op not in LAYER_TYPES:
        raise RegistryError(f"unknown layer op {op!r}; known: {', '.join(sorted(LAYER_TYPES))}")
    cls = LAYER_TYPES[op]
    names = {f.name for f in fields(cls)}
    extra = set(d) - names - {"op"}
    if extra:
        raise RegistryError(f"layer {op!r} has unknown fields {sorted(extra)}")
    return cls(**{k: v for k, v in d.items() if k != "op"})


@dataclass(frozen=True)
class Arch:
    """A named network: its data set, input shape (C, H, W) and layer list."""

    name: str
    dataset: str
    input_shape: tuple[int, int, int]
    layers: tuple[Layer, ...]
    num_classes: int = 10

    @property
    def weighted(self) -> tuple[Linear | Conv2d, ...]:
        return tuple(layer for layer in self.layers if isinstance(layer, WEIGHTED))

    @property
    def num_weighted(self) -> int:
        """Number of weighted layers (the generator's layers 0 .. n-1)."""
        return len(self.weighted)

    @property
    def num_connections(self) -> int:
        """Number of weights (connections) of the weighted layers, biases excluded."""
        return sum(math.prod(layer.weight_shape) for layer in self.weighted)


@dataclass(frozen=True)
class ModuleArch:
    """A zoo network written as torch code (``slotpack.resnets``) instead of a layer list: its
    slot version is ``slotify`` of the dense module, so the generator numbers its Linear/Conv2d
    layers in ``named_modules()`` order, and files of it are weights-only (docs/FORMAT.md §2.8).
    The counts are fixed here (no torch) and checked against the built module by the tests."""

    name: str
    dataset: str
    input_shape: tuple[int, int, int]
    num_weighted: int  # Linear/Conv2d layers slotify replaces
    num_connections: int  # their weights, biases excluded
    num_classes: int = 10


def _mlp_head(in_features: int, hidden: tuple[int, ...], dropout: float) -> list[Layer]:
    layers: list[Layer] = [Flatten()]
    for width in hidden:
        layers += [Linear(in_features, width), ReLU()]
        if dropout:
            layers.append(Dropout(dropout))
        in_features = width
    layers.append(Linear(in_features, 10))
    return layers


def _conv_net(name: str, blocks: tuple[tuple[int, int], ...]) -> Arch:
    """Conv-2/4/6: pairs of 3x3 convolutions, each pair followed by a 2x2 max pool.

    Each block is (channels, padding). The parameter counts the reference code reports (Conv-2
    3,317,952, Conv-4 1,147,072, Conv-6 1,474,752) fix the padding: the first two blocks use none
    (32 -> 28 -> 14 -> 10 -> 5), Conv-6's third block pads by 1 (5 -> 5 -> 2), giving classifier
    inputs of 12,544, 3,200 and 1,024.
    """
    layers: list[Layer] = []
    channels, size = 3, 32
    for width, pad in blocks:
        for _ in range(2):
            layers += [Conv2d(channels, width, 3, padding=pad), ReLU()]
            channels, size = width, size + 2 * pad - 2
        layers.append(MaxPool2d(2, 2))
        size //= 2
    layers += _mlp_head(channels * size * size, (256, 256), dropout=0.5)
    return Arch(name, "cifar10", (3, 32, 32), tuple(layers))


def _vgg19() -> Arch:
    """VGG-19 for CIFAR-10: 16 convolutions with BatchNorm(affine=False), one 512->10 classifier.

    The reference code's average pool (kernel 1, stride 1 after the fifth max pool) is kept so that
    exported graphs match the paper's network layer for layer.
    """
    cfg = (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    )
    layers: list[Layer] = []
    channels = 3
    for item in cfg:
        if item == "M":
            layers.append(MaxPool2d(2, 2))
        else:
            layers += [Conv2d(channels, item, 3, padding=1), BatchNorm2d(item), ReLU()]
            channels = item
    layers += [AvgPool2d(1, 1), Flatten(), Linear(512, 10)]
    return Arch("vgg19", "cifar10", (3, 32, 32), tuple(layers))


ZOO: dict[str, Arch] = {
    "lenet300100": Arch("lenet300100", "mnist", (1, 28, 28), tuple(_mlp_head(784, (300, 100), 0))),
    "conv2": _conv_net("conv2", ((64, 0),)),
    "conv4": _conv_net("conv4", ((64, 0), (128, 0))),
    "conv6": _conv_net("conv6", ((64, 0), (128, 0), (256, 1))),
    "vgg19": _vgg19(),
}


# ResNet-20 (He et al. 2016, CIFAR-10, option-A shortcuts: 19 convolutions and the classifier)
# and ResNet-18 (torchvision's, with a 3x3 stride-1 stem and no max pool: 20 convolutions, three
# of them the 1x1 downsampling shortcuts, and the classifier).
MODULE_ZOO: dict[str, ModuleArch] = {
    "resnet20": ModuleArch("resnet20", "cifar10", (3, 32, 32), 20, 268_336),
    "resnet18": ModuleArch("resnet18", "cifar10", (3, 32, 32), 21, 11_164_352),
}


def names() -> list[str]:
    """Every zoo model name: the layer lists, then the module models."""
    return [*ZOO, *MODULE_ZOO]


def get(name: str) -> Arch:
    """The layer list of zoo entry ``name``; a miss lists the valid names."""
    if name in MODULE_ZOO:
        raise RegistryError(
            f"model {name!r} is torch code (slotpack.resnets), not a layer list; use "
            "slotpack.models.create for the network and weights-only .slot files for it"
        )
    try:
        return ZOO[name]
    except KeyError:
        raise RegistryError(f"unknown model {name!r}; choose one of: {', '.join(ZOO)}") from None


def spec(name: str) -> Arch | ModuleArch:
    """The zoo entry ``name``, layer list or module model; a miss lists every valid name."""
    found = ZOO.get(name) or MODULE_ZOO.get(name)
    if found is None:
        raise RegistryError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    return found


def _window(size: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_shapes(layers: tuple[Layer, ...], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The output shape (without batch) after each layer; ValueError names the first misfit."""
    shape = tuple(input_shape)
    shapes = []
    for pos, layer in enumerate(layers):
        where = f"layer {pos} ({layer.op})"
        if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d, BatchNorm2d)) and len(shape) != 3:
            raise ValueError(f"{where} needs a [C, H, W] input, got {list(shape)}")
        match layer:
            case Conv2d():
                if shape[0] != layer.in_channels:
                    raise ValueError(
                        f"{where} expects {layer.in_channels} channels, gets {shape[0]}"
                    )
                if layer.in_channels % layer.groups or layer.out_channels % layer.groups:
                    raise ValueError(f"{where}: channels not divisible by groups={layer.groups}")
                hw = [
                    _window(s, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
                    for s in shape[1:]
                ]
                shape = (layer.out_channels, *hw)
            case MaxPool2d() | AvgPool2d():
                shape = (
                    shape[0],
                    *(_window(s, layer.kernel_size, layer.stride) for s in shape[1:]),
                )
            case BatchNorm2d():
                if shape[0] != layer.num_features:
                    raise ValueError(f"{where} has {layer.num_features} features, gets {shape[0]}")
            case Flatten():
                shape = (math.prod(shape),)
            case Linear():
                if shape != (layer.in_features,):
                    raise ValueError(f"{where} expects [{layer.in_features}], gets {list(shape)}")
                shape = (layer.out_features,)
        if any(s < 1 for s in shape):
            raise ValueError(f"{where} produces an empty output {list(shape)}")
        shapes.append(shape)
    return shapes

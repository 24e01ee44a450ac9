"""Any ``nn.Module`` as a slot network: ``slotify`` swaps its Linear/Conv layers for slot layers.

``slotify(model, k=8, seed=0)`` replaces, in place, every ``nn.Linear``, ``nn.Conv1d`` and
``nn.Conv2d`` (exactly those types; subclasses such as MultiheadAttention's ``out_proj``, whose
weight their owner reads directly, stay float) with a slot layer of the same forward semantics.
Everything else (BatchNorm, LayerNorm, embeddings, biases) stays a trainable float parameter.

Numbering: the replaced layers are the generator's weighted layers 0, 1, 2, ... in the order of
``model.named_modules()`` (registration order, each module object once), after include/exclude
filtering. That order is deterministic for a given architecture, so the same architecture,
options and seed always give the same values and initial scores.

The rest of this module reads a slot model back: ``slot_layers``, ``param_groups`` for an
optimizer, ``dense_state_dict`` (the original architecture's weights, for finetuning or export),
``selected_indices`` and ``slot_layer_info`` (what a ``.slot`` writer needs). Tensors are named
as in ``model.state_dict()``: a slot layer ``name`` deploys as ``<name>.weight``.
"""

from __future__ import annotations

import fnmatch
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import prng
from .errors import ConfigError
from .format import MAX_K
from .layers import (
    EXTRA_STATE,
    SELECTIONS,
    SlotConv1d,
    SlotConv2d,
    SlotLinear,
    _SlotMixin,
    score_torch_dtype,
)

# The dense types slotify replaces, and the kind name slot_layer_info reports for each.
SUPPORTED: dict[type[nn.Module], str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
}
_KINDS = {SlotLinear: "linear", SlotConv1d: "conv1d", SlotConv2d: "conv2d"}
# Weighted layers slotify has no twin for: explicitly including one is an error.
_WEIGHTED = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)

Predicate = Callable[[str, nn.Module], bool]
Filter = str | Iterable[str] | Predicate | None


def slotify(
    module: nn.Module,
    k: int | Sequence[int],
    seed: int,
    *,
    selection: str = "greedy",
    include: Filter = None,
    exclude: Filter = None,
    init: str = prng.DEFAULT_INIT,
    lean: bool = False,
    score_dtype: str = "float32",
    stick: float | Sequence[float] = 0.0,
) -> nn.Module:
    """Replace ``module``'s Linear/Conv1d/Conv2d layers with slot layers, in place; returns it.

    (When ``module`` itself is a Linear/Conv layer, the new slot layer is returned.)
    ``k`` and ``stick`` are one value for all layers or one per replaced layer in numbering
    order (module docstring). ``include``/``exclude`` are fnmatch patterns on module names (a
    pattern naming a module covers its submodules: ``exclude="fc"``, ``include="layer1.*"``)
    or a predicate ``(name, module) -> bool`` asked about each module; excluded layers stay
    float. An explicitly included weighted layer with no slot twin (ConvTranspose2d, Bilinear)
    raises ConfigError. Each slot layer keeps the replaced layer's bias Parameter (values and
    ``requires_grad``), device and train/eval mode; the dense weight is dropped. Values use the
    paper's Glorot-uniform bound with torch's fan convention (docs/FORMAT.md §1.3).
    ``selection``, ``init``, ``lean``, ``score_dtype`` and ``stick`` are as in ``models.create``.
    """
    _check_options(seed, selection, init, score_dtype)
    if any(isinstance(m, _SlotMixin) for m in module.modules()):
        raise ConfigError(
            "this module already holds slot layers; slotify a dense model once, as a whole, "
            "so that layer numbers stay unique"
        )
    targets = select_layers(module, include, exclude)
    if not targets:
        raise ConfigError(
            "slotify found no nn.Linear, nn.Conv1d or nn.Conv2d to replace (check include/exclude)"
        )
    ks = _per_layer(k, len(targets), "values of K")
    sticks = _per_layer(stick, len(targets), "rate margins")
    for k_i in ks:
        if not (isinstance(k_i, numbers.Integral) and 2 <= k_i <= MAX_K):
            raise ConfigError(
                f"K must be >= 2 and <= {MAX_K} (the most a .slot file holds), got {k_i}"
            )
    for name, old in targets:  # every check before any value is generated
        _check_plain(name, old)
    _check_untied(module, targets)
    options = dict(
        seed=int(seed), selection=selection, lean=lean, score_dtype=score_dtype, init=init
    )
    twins = {
        id(old): _slot_twin(name, old, number, int(ks[number]), sticks[number], options)
        for number, (name, old) in enumerate(targets)
    }
    if id(module) in twins:
        return twins[id(module)]
    for parent in list(module.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in twins:
                parent._modules[child_name] = twins[id(child)]
    return module


def select_layers(
    module: nn.Module, include: Filter = None, exclude: Filter = None
) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs ``slotify`` would replace, in numbering order.

    Raises ConfigError for an include/exclude pattern that names no module, and for an
    explicitly included weighted layer of a type with no slot twin."""
    named = list(module.named_modules())
    names = [name for name, _ in named]
    inc, exc = _matcher(include, "include", names), _matcher(exclude, "exclude", names)
    targets = []
    for name, m in named:
        if exc is not None and exc(name, m)[0]:
            continue
        chosen, explicit = (True, False) if inc is None else inc(name, m)
        if not chosen:
            continue
        if type(m) in SUPPORTED:
            targets.append((name, m))
        elif explicit and isinstance(m, _WEIGHTED):
            kinds = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED)
            raise ConfigError(
                f"cannot slotify {name or '<root>'!r} ({type(m).__name__}): only {kinds} "
                "have slot twins; leave it out of include or exclude it"
            )
    return targets


def slot_layers(model: nn.Module) -> list[tuple[str, _SlotMixin]]:
    """The slot layers of ``model`` with their module names, in ``named_modules()`` order
    (for a slotified model, the numbering order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _SlotMixin)]


def param_groups(
    model: nn.Module,
    score_lr: float,
    float_lr: float,
    score_weight_decay: float = 0.0,
    float_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the slot layers' scores, and every other trainable parameter.

    Each group is a dict with ``name`` ("scores" or "floats"), ``params``, ``lr`` and
    ``weight_decay``, ready for ``torch.optim.SGD(param_groups(...), momentum=0.9)``. Frozen
    parameters (``requires_grad=False``) are left out, and so is a group with no parameters."""
    scores = [m.scores for _, m in slot_layers(model) if m.scores.requires_grad]
    ids = {id(p) for p in scores}
    floats = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [
        {"name": "scores", "params": scores, "lr": score_lr, "weight_decay": score_weight_decay},
        {"name": "floats", "params": floats, "lr": float_lr, "weight_decay": float_weight_decay},
    ]
    return [g for g in groups if g["params"]]


def deployed_index(layer: _SlotMixin) -> torch.Tensor:
    """The flat index (int64) evaluation uses, whatever the layer's mode: the argmax of the
    scores (greedy) or the fixed seeded draw (probabilistic); see ``layers.select_index``."""
    return layer.record.deployed_index(layer.scores)


@torch.no_grad()
def deployed_weight(layer: _SlotMixin) -> torch.Tensor:
    """The dense float32 weight evaluation uses (detached), shaped as the dense layer's."""
    index = deployed_index(layer)
    w = prng.selected_torch(layer.seed, layer.layer, index, layer.k, layer.bound)
    return w.view(layer.weight_shape)


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the dense architecture that was slotified.

    Each slot layer's ``scores`` become ``<name>.weight``, its deployed weight (``deployed_weight``);
    biases, BatchNorm statistics and every other entry are ``model.state_dict()``'s own, in its
    order; slot layers' records (``layers.SlotRecord``) are left out. So
    ``dense.load_state_dict(dense_state_dict(slot), strict=True)`` works, and ``dense`` computes
    in eval mode what ``slot`` computes in eval mode."""
    slots = [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, _SlotMixin)
    ]
    scores = {_join(name, "scores"): m for name, m in slots}
    records = {_join(name, EXTRA_STATE) for name, _ in slots}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key in scores:
            out[key[: -len("scores")] + "weight"] = deployed_weight(scores[key])
        elif key not in records:
            out[key] = value
    return out


def selected_indices(model: nn.Module) -> dict[str, np.ndarray]:
    """Weight name (``<name>.weight``) -> flat uint16 index of the slot each connection deploys
    (``deployed_index``), for every slot layer in ``slot_layers`` order."""
    return {
        _join(name, "weight"): deployed_index(m).cpu().numpy().astype(np.uint16)
        for name, m in slot_layers(model)
    }


@dataclass(frozen=True)
class SlotLayerInfo:
    """What a reader needs to regenerate one slot layer's values (docs/FORMAT.md §1)."""

    name: str  # module name in ``named_modules()``
    weight_name: str  # the dense state_dict key of its weight
    bias_name: str | None  # the state_dict key of its bias, if any
    kind: str  # "linear", "conv1d" or "conv2d"
    number: int  # the generator's ``layer``
    seed: int
    k: int
    weight_shape: tuple[int, ...]
    bound: float  # Glorot-uniform bound, an exact float32
    selection: str  # "greedy" or "probabilistic"
    init: str  # one of prng.INITS
    reference_rule: str  # one of prng.REFERENCE_RULES (§1.8)


def slot_layer_info(model: nn.Module) -> list[SlotLayerInfo]:
    """One ``SlotLayerInfo`` per slot layer, in ``slot_layers`` order."""
    return [
        SlotLayerInfo(
            name=name,
            weight_name=_join(name, "weight"),
            bias_name=_join(name, "bias") if m.bias is not None else None,
            kind=next(kind for cls, kind in _KINDS.items() if isinstance(m, cls)),
            number=m.layer,
            seed=m.seed,
            k=m.k,
            weight_shape=tuple(m.weight_shape),
            bound=m.bound,
            selection=m.selection,
            init=m.init,
            reference_rule=m.reference_rule,
        )
        for name, m in slot_layers(model)
    ]


# --------------------------------------------------------------------------- helpers


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _check_options(seed: int, selection: str, init: str, score_dtype: str) -> None:
    """ConfigError for an option slotify cannot use, before anything is built."""
    if not (isinstance(seed, numbers.Integral) and 0 <= seed < 2**64):
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if selection not in SELECTIONS:
        raise ConfigError(
            f"unknown selection {selection!r}; choose one of: {', '.join(SELECTIONS)}"
        )
    if init not in prng.INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of: {', '.join(prng.INITS)}")
    score_torch_dtype(score_dtype)


def _per_layer(value: Any, n: int, what: str) -> tuple[Any, ...]:
    """``value`` for each of ``n`` layers: one for all, or a sequence of exactly ``n``."""
    if isinstance(value, numbers.Real):
        return (value,) * n
    values = tuple(value)
    if len(values) != n:
        raise ConfigError(f"slotify replaces {n} layers here; got {len(values)} {what}")
    return values


Match = Callable[[str, nn.Module], tuple[bool, bool]]


def _matcher(spec: Filter, what: str, names: list[str]) -> Match | None:
    """``(name, module) -> (matched, named explicitly)`` for an include/exclude ``spec``.

    A pattern matches a module whose name or any ancestor's name it matches; it is explicit
    when it matches the module's own name. A predicate is asked about each module alone."""
    if spec is None:
        return None
    if callable(spec):
        return lambda name, m: (bool(spec(name, m)),) * 2
    patterns = (spec,) if isinstance(spec, str) else tuple(spec)
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"{what} takes module-name patterns or a predicate, got {p!r}")
        if not any(fnmatch.fnmatchcase(name, p) for name in names):
            sample = ", ".join(repr(n) for n in names[1:6])
            raise ConfigError(
                f"{what} pattern {p!r} matches no module name (names look like {sample})"
            )

    def match(name: str, m: nn.Module) -> tuple[bool, bool]:
        parts = name.split(".")
        scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [name]
        hits = [any(fnmatch.fnmatchcase(s, p) for p in patterns) for s in scopes]
        return any(hits), hits[-1]

    return match


def _check_untied(root: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """ConfigError if a target's weight or bias is also another module's parameter: slot
    weights are not Parameters, so slotify would silently untie them."""
    params = Counter(id(p) for _, p in root.named_parameters(remove_duplicate=False))
    modules = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    for name, m in targets:
        for pname, p in m.named_parameters(recurse=False):
            if params[id(p)] != modules[id(m)]:
                raise ConfigError(
                    f"{_join(name, pname)} is shared with another module (tied weights), which "
                    f"slotify would untie; exclude {name or '<root>'!r}"
                )


def _check_plain(name: str, m: nn.Module) -> None:
    """ConfigError if slotify cannot reproduce ``m``'s forward with a slot layer."""
    label = f"{name or '<root>'!r} ({type(m).__name__})"
    if set(m._parameters) != {"weight", "bias"} or m._buffers:
        extra = sorted({*m._parameters, *m._buffers} - {"weight", "bias"})
        raise ConfigError(
            f"cannot slotify {label}: it holds {extra or 'no weight'} besides weight and bias "
            "(a weight_norm or similar reparametrisation?); remove it or exclude the layer"
        )
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
        raise ConfigError(
            f"cannot slotify {label}: it has hooks that its slot twin would not keep; "
            "remove them or exclude the layer"
        )
    if m.weight.dtype != torch.float32:
        raise ConfigError(
            f"cannot slotify {label}: its weight is {m.weight.dtype}; slot values are float32, "
            "so call .float() on the model first"
        )
    mode = getattr(m, "padding_mode", "zeros")
    if mode != "zeros":
        raise ConfigError(
            f"cannot slotify {label}: padding_mode={mode!r}; slot convolutions pad with zeros "
            "only (exclude the layer)"
        )


def _slot_twin(
    name: str, m: nn.Module, number: int, k: int, stick: float, options: dict[str, Any]
) -> _SlotMixin:
    """The slot layer that replaces ``m`` (checked by ``_check_plain``) as layer ``number``."""
    common = dict(layer=number, bias=False, device=m.weight.device, stick=stick, **options)
    twin: _SlotMixin
    if isinstance(m, nn.Linear):
        twin = SlotLinear(m.in_features, m.out_features, k, **common)
    else:
        cls = SlotConv1d if isinstance(m, nn.Conv1d) else SlotConv2d
        twin = cls(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            k,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            **common,
        )
    if twin.weight_shape != tuple(m.weight.shape):  # a slotify bug, never the user's
        raise RuntimeError(f"slot twin of {name!r}: shape {twin.weight_shape} != {m.weight.shape}")
    twin.bias = m.bias  # the same Parameter: the user's values, dtype and requires_grad
    twin.train(m.training)
    return twin

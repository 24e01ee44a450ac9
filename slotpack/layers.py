"""Slot layers: every connection holds K fixed random values; training learns which one to use.

The value bank is regenerated from (seed, layer) on the layer's device and never saved; only the
scores [connections, K] (and an optional bias) are parameters. In lean mode the bank is not even
kept in memory: the forward pass generates only each connection's selected value, and the backward
pass regenerates the K values it needs for the score gradient, block by block (bit-identical
results); on CUDA fused Triton kernels (slotpack.kernels) do each in one pass. A lean greedy layer
does not keep its selected weight for the backward pass either: it regenerates it there. The
forward pass gathers the selected value per connection (no K-times one-hot product); the backward
pass is the straight-through rule
d loss / d score[i, k] = d loss / d w[i] * value[i, k].
Scores may be stored in bfloat16 (half the memory of scores, their gradient and momentum); the
bank, the selected weights and the products above stay float32 until the gradient is stored.

A slot layer records itself in its ``state_dict`` (torch's extra state, key
``<name>._extra_state``) as plain Python values that ``torch.load(weights_only=True)`` reads back:
``{"slotpack": 1, "seed": int, "layer": int, "k": int, "selection": str, "init": str,
"shape": [out, in/groups, kernel...]}`` (``SlotRecord``). With it a bare ``state_dict`` packs
into a ``.slot`` file without the model (``modelfile.pack_state_dict``), and loads only into a
slot layer with the same values (anything else is a CheckpointError naming the field). A
``state_dict`` saved before layers recorded themselves has no such entry and still loads, strict
or not.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, prng
from .errors import CheckpointError, ConfigError
from .format import MAX_K

SELECTIONS = ("greedy", "probabilistic")
SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def score_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--score-dtype`` name; a ConfigError names the valid ones."""
    if name not in SCORE_DTYPES:
        raise ConfigError(f"unknown score dtype {name!r}; choose one of: {', '.join(SCORE_DTYPES)}")
    return SCORE_DTYPES[name]


# Elements per block of the score gradient: bounds the float32 and int64 temporaries of a
# backward pass to a few tens of MiB whatever the layer size.
_GRAD_BLOCK = 1 << 22


def _score_grad(
    grad_w: torch.Tensor, k: int, values: Callable[[int, int], torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """[n, K] ``grad_w[i] * value[i, j]`` in ``dtype``, built in row blocks.

    ``values(a, b)`` gives float32 rows a..b of the bank. The product is rounded to float32 and
    then to ``dtype``, so the stored-bank and lean modes agree bit for bit in either dtype.
    """
    n = grad_w.shape[0]
    grad = torch.empty((n, k), dtype=dtype, device=grad_w.device)
    rows = max(1, _GRAD_BLOCK // k)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        grad[a:b] = values(a, b) * grad_w[a:b].unsqueeze(1)
    return grad


GradReducer = Callable[[torch.Tensor], torch.Tensor]


def _reduced(grad_w: torch.Tensor, reducer: GradReducer | None) -> torch.Tensor:
    # Data-parallel training may average d loss / d w over ranks here, before it becomes the
    # K-times larger score gradient (slotpack.distributed.WeightGradReducer).
    grad_w = grad_w.float()
    return grad_w if reducer is None else reducer(grad_w.contiguous())


class _SelectValues(torch.autograd.Function):
    """w[i] = bank[i, index[i]] forward; straight-through score gradient backward."""

    @staticmethod
    def forward(
        ctx,
        scores: torch.Tensor,
        bank: torch.Tensor,
        index: torch.Tensor,
        reducer: GradReducer | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(bank)
        ctx.dtype, ctx.reducer = scores.dtype, reducer
        return bank.gather(1, index.unsqueeze(1)).squeeze(1)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        (bank,) = ctx.saved_tensors
        grad_w = _reduced(grad_w, ctx.reducer)
        grad = _score_grad(grad_w, bank.shape[1], lambda a, b: bank[a:b], ctx.dtype)
        return grad, None, None, None


class _SelectLean(torch.autograd.Function):
    """The same function as _SelectValues with no stored bank: values come from the generator.

    ``fused``: the fused Triton kernels (slotpack.kernels) instead of the torch half; with
    ``index`` None they also take the argmax of the scores (greedy selection) in the same pass.
    """

    @staticmethod
    def forward(
        ctx,
        scores: torch.Tensor,
        index: torch.Tensor | None,
        seed: int,
        layer: int,
        bound: float,
        reducer: GradReducer | None = None,
        fused: bool = False,
    ) -> torch.Tensor:
        k = scores.shape[1]
        key = prng.layer_key(seed, layer)
        ctx.key, ctx.bound, ctx.k, ctx.dtype = key, bound, k, scores.dtype
        ctx.reducer, ctx.fused = reducer, fused
        if not fused:
            return prng.selected_torch(seed, layer, index, k, bound)
        if index is None:
            return kernels.select_greedy(scores, key, bound)
        return kernels.selected(scores, index, key, bound)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        k, dev = ctx.k, grad_w.device
        grad_w = _reduced(grad_w, ctx.reducer)
        if ctx.fused:
            grad = kernels.score_grad(grad_w, k, ctx.key, ctx.bound, ctx.dtype)
            return grad, None, None, None, None, None, None

        def values(a: int, b: int) -> torch.Tensor:
            return prng.values_range_torch(ctx.key, a * k, b * k, ctx.bound, dev).view(b - a, k)

        return _score_grad(grad_w, k, values, ctx.dtype), None, None, None, None, None, None


# What a lean greedy layer saves for backward in place of its weight (see _with_weight).
_REGENERATE = object()


def _gumbel_argmax(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """argmax(scores + Gumbel noise from uniforms ``u`` (consumed)): a draw from softmax(scores).

    The noise is float32 whatever the score dtype (bfloat16 would coarsen the distribution)."""
    u.clamp_(min=torch.finfo(torch.float32).tiny)
    return (scores.float() - u.log_().neg_().log_()).argmax(1)


def select_index(scores: torch.Tensor, selection: str, sample: bool, draw_key: int) -> torch.Tensor:
    """Index of the chosen value per connection.

    Greedy: argmax. Probabilistic while ``sample`` (training): a fresh draw from softmax(scores)
    by the Gumbel-max trick (one vectorised argmax; the same distribution as torch.multinomial).
    Probabilistic when not sampling (evaluation, packing): one *fixed* draw, whose uniforms come
    from the generator stream ``draw_key``, so every evaluation and the packed file use the same
    network. (The argmax would be a different network from the ones training saw: a layer whose
    scores stay nearly flat learns to work with random draws, not with its top values.)
    """
    with torch.no_grad():
        if selection == "probabilistic":
            if sample:
                return _gumbel_argmax(scores, torch.rand(scores.shape, device=scores.device))
            u = prng.uniform_torch(draw_key, scores.numel(), scores.device).view(scores.shape)
            return _gumbel_argmax(scores, u)
        return scores.argmax(1)


def reference_rule(selection: str, init: str) -> str:
    """How a reader regenerates a layer's reference slot (docs/FORMAT.md §1.8): the fixed draw
    for probabilistic selection, else the initial argmax of the layer's ``init``."""
    if selection == "probabilistic":
        return "draw"
    return "argmax" if init == "uniform" else init  # onedraw, onedraw16


# The key suffix torch gives a module's get_extra_state() in its state_dict, and the version of
# the record a slot layer keeps there (module docstring).
EXTRA_STATE = "_extra_state"
RECORD_VERSION = 1


def record_prefix(key: str) -> str | None:
    """The module prefix (``""`` or ``"<name>."``) of a state_dict key that holds a module's extra
    state, else None: ``"fc._extra_state"`` -> ``"fc."``."""
    if key == EXTRA_STATE:
        return ""
    if key.endswith("." + EXTRA_STATE):
        return key[: -len(EXTRA_STATE)]
    return None


def is_record(value: Any) -> bool:
    """Whether a state_dict value claims to be a slot layer's record (``SlotRecord.from_state``
    then checks it): a dict with the ``"slotpack"`` marker."""
    return isinstance(value, dict) and "slotpack" in value


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and lo <= value < hi


def _record_problem(state: Any) -> str | None:
    """What is wrong with a slot layer's record as read from a file, if anything."""
    if not isinstance(state, dict):
        return f"it is a {type(state).__name__}, not a dict"
    version = state.get("slotpack")
    if type(version) is not int or version != RECORD_VERSION:
        return f"version {version!r:.40}; this slotpack reads version {RECORD_VERSION}"
    names = {"slotpack", *(f.name for f in fields(SlotRecord))}
    if set(state) != names:
        missing, unknown = sorted(names - set(state)), sorted(map(str, set(state) - names))
        return f"missing {missing}" if missing else f"unknown keys {unknown}"
    shape = state["shape"]
    sizes = isinstance(shape, list | tuple) and 2 <= len(shape) <= 5  # as files hold (§2.8)
    checks = {
        "seed": _int_in(state["seed"], 0, 2**64),
        "layer": _int_in(state["layer"], 0, 2**31),
        "k": _int_in(state["k"], 2, MAX_K + 1),
        "selection": state["selection"] in SELECTIONS,
        "init": state["init"] in prng.INITS,
        "shape": sizes and all(_int_in(n, 1, 2**31 + 1) for n in shape),
    }
    bad = next((name for name, ok in checks.items() if not ok), None)
    return None if bad is None else f"{bad} {state[bad]!r:.60} is out of range or of the wrong type"


@dataclass(frozen=True)
class SlotRecord:
    """What a slot layer records about itself in its state_dict (module docstring): everything
    besides its scores that a reader needs to regenerate its values and deployed index."""

    seed: int
    layer: int  # the generator's layer number
    k: int
    selection: str
    init: str
    shape: tuple[int, ...]  # the dense weight's shape

    def to_state(self) -> dict[str, Any]:
        """The record as plain Python values (what ``get_extra_state`` returns)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"slotpack": RECORD_VERSION, **values, "shape": list(self.shape)}

    @classmethod
    def from_state(cls, state: Any) -> SlotRecord:
        """The record a state_dict holds; a CheckpointError names what is malformed."""
        problem = _record_problem(state)
        if problem is not None:
            raise CheckpointError(f"malformed slot layer record: {problem}")
        values = {f.name: state[f.name] for f in fields(cls)}
        return cls(**{**values, "shape": tuple(int(n) for n in state["shape"])})

    @property
    def reference_rule(self) -> str:
        """This layer's reference rule (``reference_rule``)."""
        return reference_rule(self.selection, self.init)

    def deployed_index(self, scores: torch.Tensor) -> torch.Tensor:
        """The flat index (int64) evaluation uses with these ``scores`` [connections, K]: their
        argmax (greedy), or the fixed seeded draw (probabilistic); see ``select_index``."""
        key = prng.draw_key(self.seed, self.layer)
        return select_index(scores, self.selection, sample=False, draw_key=key)

    def mismatch(self, saved: SlotRecord) -> str | None:
        """The first field in which ``saved`` differs from this record, said in words."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(saved, f.name)
            if mine != theirs:
                show = list if f.name == "shape" else repr
                return f"{f.name} {show(theirs)} in the state_dict, {show(mine)} in this model"
        return None


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
        score_dtype: str = "float32",
        init: str = prng.DEFAULT_INIT,
        stick: float = 0.0,
    ) -> None:
        if k < 2:
            raise ConfigError(f"K must be >= 2, got {k}")
        if init not in prng.INITS:
            raise ConfigError(f"unknown init {init!r}; choose one of: {', '.join(prng.INITS)}")
        if not (stick >= 0 and math.isfinite(stick)):
            raise ConfigError(f"the rate margin must be a finite number >= 0, got {stick}")
        if selection not in SELECTIONS:
            raise ConfigError(
                f"unknown selection {selection!r}; choose one of: {', '.join(SELECTIONS)}"
            )
        self.weight_shape = tuple(weight_shape)
        self.k, self.seed, self.layer, self.selection = k, seed, layer, selection
        self.init = init
        dtype = score_torch_dtype(score_dtype)
        self.bound = prng.glorot_bound(*fans)
        n = math.prod(weight_shape)
        # On the meta device, shapes only: a skeleton that takes a checkpoint's tensors (packing).
        meta = device is not None and torch.device(device).type == "meta"
        if meta:
            scores = torch.empty(n, k, device=device)
        else:
            scores = prng.initial_scores_torch(seed, layer, n, k, self.bound, device, init=init)
        if stick and selection == "greedy" and not meta:
            # Rate-aware training: leaving the reference slot (the initial argmax, which a
            # reader regenerates) costs a margin of ``stick`` bounds, so only connections whose
            # gradient insists change, and the delta coding stores fewer changes (§2.6).
            rows = torch.arange(n, device=scores.device)
            scores[rows, scores.argmax(1)] += stick * self.bound
        self.scores = nn.Parameter(scores.to(dtype))
        self.lean = lean
        # Which code a lean layer runs ("auto", "torch", "triton"; slotpack.kernels); results
        # are bit-identical, so this is an execution setting, not part of the model.
        self.kernel = "auto"
        bank = None if lean else prng.bank_torch(seed, layer, n, k, self.bound, device)
        self.register_buffer("bank", bank, persistent=False)
        # Set by data-parallel training to average d loss / d w over ranks (see _reduced).
        self.grad_reducer: GradReducer | None = None
        out = weight_shape[0]
        self.bias = nn.Parameter(torch.zeros(out, device=device)) if bias else None

    @property
    def reference_rule(self) -> str:
        """How a reader regenerates this layer's reference slot (docs/FORMAT.md §1.8)."""
        return reference_rule(self.selection, self.init)

    @property
    def record(self) -> SlotRecord:
        """What this layer records in its state_dict (module docstring)."""
        shape = tuple(int(n) for n in self.weight_shape)
        return SlotRecord(
            int(self.seed), int(self.layer), int(self.k), self.selection, self.init, shape
        )

    def get_extra_state(self) -> dict[str, Any]:
        """This layer's record, as plain values: what its state_dict holds besides tensors."""
        return self.record.to_state()

    def set_extra_state(self, state: Any) -> None:
        """Check a state_dict's record against this layer; nothing is set (seed, number, K,
        selection, init and shape define the layer). A mismatch is a CheckpointError."""
        mismatch = self.record.mismatch(SlotRecord.from_state(state))
        if mismatch is not None:
            raise CheckpointError(
                f"{mismatch}; scores load only into a layer slotified as the one that saved them"
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        try:
            super()._load_from_state_dict(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
        except CheckpointError as exc:  # from set_extra_state: name the layer
            name = prefix[:-1] or "<root>"
            raise CheckpointError(f"slot layer {name!r} (layer {self.layer}): {exc}") from None
        key = prefix + EXTRA_STATE
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # saved before slot layers recorded themselves: still loads

    def selected_index(self) -> torch.Tensor:
        """Flat [connections] index of the value each connection uses now (``select_index``)."""
        key = prng.draw_key(self.seed, self.layer)
        return select_index(self.scores, self.selection, sample=self.training, draw_key=key)

    def weight(self) -> torch.Tensor:
        """The dense weight this forward pass uses, differentiable w.r.t. the scores."""
        if self.lean:
            w = self._lean_weight()
        else:
            index = self.selected_index()
            w = _SelectValues.apply(self.scores, self.bank, index, self.grad_reducer)
        return w.view(self.weight_shape)

    def _with_weight(self, op: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``op(weight)``. A lean greedy layer does not keep the weight for the backward pass of
        ``op`` (4 bytes per connection while the graph lives): it regenerates it there, from
        the scores, which must not change in between (checked, as autograd checks its own)."""
        w = self.weight()
        if not (
            self.lean
            and self.selection == "greedy"
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            return op(w)
        # The hooks must not hold ``w`` itself: only where it lives and what it is.
        storage, dtype, version = w.untyped_storage().data_ptr(), w.dtype, self.scores._version

        def pack(t: torch.Tensor):
            if t.dtype != dtype or t.untyped_storage().data_ptr() != storage:
                return t
            return (_REGENERATE, t.shape, t.stride(), t.storage_offset())

        def unpack(saved):
            if not (isinstance(saved, tuple) and saved[0] is _REGENERATE):
                return saved
            if self.scores._version != version:
                raise RuntimeError(
                    f"the scores of slot layer {self.layer} were modified in place between the "
                    "forward and backward passes, so its weight cannot be regenerated"
                )
            with torch.no_grad():
                return self._lean_weight().as_strided(*saved[1:])

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return op(w)

    # Eager even inside torch.compile: inductor folds the generator's 64-bit constants into
    # index arithmetic that overflows int64, and the kernel choice and its self-check must not be
    # traced. The matmuls and convolutions around it are still compiled. (torch.compiler.disable
    # would import torch._dynamo, 1.7 s, with this module; _disable_dynamo waits for the call.)
    @torch._disable_dynamo
    def _lean_weight(self) -> torch.Tensor:
        fused = kernels.resolve(self.kernel, self.scores.device, self.k) == "triton"
        # The fused kernel takes the greedy argmax itself, in the same pass as the values.
        index = None if fused and self.selection == "greedy" else self.selected_index()
        return _SelectLean.apply(
            self.scores, index, self.seed, self.layer, self.bound, self.grad_reducer, fused
        )

    def extra_repr(self) -> str:
        lean = ", lean" if self.lean else ""
        dtype = "" if self.scores.dtype == torch.float32 else f", scores={self.scores.dtype}"
        return (
            f"K={self.k}, seed={self.seed}, layer={self.layer}, selection={self.selection}"
            f"{lean}{dtype}"
        )


def set_kernel(module: nn.Module, kernel: str) -> int:
    """Make every lean slot layer in ``module`` run ``kernel``; returns how many slot layers."""
    kernels.check_kernel(kernel)
    layers = [m for m in module.modules() if isinstance(m, _SlotMixin)]
    for m in layers:
        m.kernel = kernel
    return len(layers)


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
        score_dtype: str = "float32",
        init: str = prng.DEFAULT_INIT,
        stick: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, in_features)
        fans = (in_features, out_features)
        self._init_slots(
            shape, fans, k, seed, layer, selection, bias, device, lean, score_dtype, init, stick
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_weight(lambda w: F.linear(x, w, self.bias))


def _ntuple(value: int | tuple[int, ...], dims: int, what: str) -> tuple[int, ...]:
    """``value`` repeated ``dims`` times, or the tuple itself when it has ``dims`` entries."""
    t = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(t) != dims or not all(isinstance(v, int) and v > 0 for v in t):
        raise ConfigError(f"{what} must be a positive int or {dims} positive ints, got {value!r}")
    return t


Padding = int | tuple[int, ...] | str


class _SlotConvNd(_SlotMixin):
    """A ``dims``-D convolution (zero padding) with slot-selected weights.

    ``kernel_size``, ``stride`` and ``dilation`` are an int or one int per spatial dimension;
    ``padding`` also "same" or "valid", as in torch. They are kept as given and passed to
    torch's functional convolution, so a slot layer computes what the dense layer would.
    """

    _dims: int
    _conv: Callable[..., torch.Tensor]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        k: int,
        *,
        seed: int,
        layer: int,
        stride: int | tuple[int, ...] = 1,
        padding: Padding = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        selection: str = "greedy",
        bias: bool = False,
        device: torch.device | str | None = None,
        lean: bool = False,
        score_dtype: str = "float32",
        init: str = prng.DEFAULT_INIT,
        stick: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ConfigError(
                f"channels ({in_channels} in, {out_channels} out) must be divisible by groups={groups}"
            )
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ConfigError(
                f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        kernel = _ntuple(kernel_size, self._dims, "kernel_size")
        rf = math.prod(kernel)
        shape = (out_channels, in_channels // groups, *kernel)
        fans = ((in_channels // groups) * rf, out_channels * rf)  # torch's fan convention
        self._init_slots(
            shape, fans, k, seed, layer, selection, bias, device, lean, score_dtype, init, stick
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = type(self)._conv
        return self._with_weight(
            lambda w: conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        )


class SlotConv2d(_SlotConvNd):
    """A 2-D convolution (stride, padding, dilation, groups) with slot-selected weights."""

    _dims = 2
    _conv = staticmethod(F.conv2d)


class SlotConv1d(_SlotConvNd):
    """A 1-D convolution (stride, padding, dilation, groups) with slot-selected weights."""

    _dims = 1
    _conv = staticmethod(F.conv1d)

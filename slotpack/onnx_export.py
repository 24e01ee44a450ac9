"""ONNX for any slotified model: the dense twin through ``torch.onnx.export``, and optionally the
slot weights regenerated inside the graph from the seed and packed indices.

``export_onnx(model, example_input, path)`` traces the dense twin (each slot layer replaced by a
plain layer holding its deployed weight, named ``<name>.weight`` as in the original module), with
torch's TorchScript exporter at the opset the zoo export uses. With ``self_decoding=True`` each
slot weight's initializer is then swapped for the decode subgraph of the zoo export
(``converters.onnx._decode_weight``: one generator spelling), fed by the indices of the model's
weights-only ``.slot`` file (docs/FORMAT.md §2.8), so the file carries seed + indices only.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F_nn
from onnx import helper
from torch import nn

from . import __version__
from . import format as F
from .atomic import write_bytes
from .converters import onnx as C
from .errors import ConfigError
from .layers import SlotConv1d, SlotLinear, _SlotMixin
from .modelfile import pack_module
from .modules import deployed_weight, slot_layers


class _Fixed(nn.Module):
    """A slot layer frozen at its deployed weight: what a Linear/Conv computes, by name."""

    def __init__(self, layer: _SlotMixin) -> None:
        super().__init__()
        self.weight = nn.Parameter(deployed_weight(layer), requires_grad=False)
        self.bias = layer.bias
        self.kind = "linear" if isinstance(layer, SlotLinear) else "conv"
        self.conv = F_nn.conv1d if isinstance(layer, SlotConv1d) else F_nn.conv2d
        if self.kind == "conv":
            self.pads, padding = _explicit(layer)
            self.args = (layer.stride, padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F_nn.linear(x, self.weight, self.bias)
        if self.pads is not None:  # odd "same" padding: one more on the right, as torch does
            x = F_nn.pad(x, self.pads)
        return self.conv(x, self.weight, self.bias, *self.args)


def _explicit(layer: _SlotMixin) -> tuple[list[int] | None, object]:
    """Padding as numbers: the exporter writes "same" as ONNX's auto_pad, which onnxruntime
    refuses with dilation. Returns (F.pad amounts or None, the conv's padding)."""
    if not isinstance(layer.padding, str):
        return None, layer.padding
    spatial = layer.weight_shape[2:]
    if layer.padding == "valid":
        return None, 0
    dilation = (
        layer.dilation if isinstance(layer.dilation, tuple) else (layer.dilation,) * len(spatial)
    )
    totals = [d * (k - 1) for d, k in zip(dilation, spatial, strict=True)]
    if all(t % 2 == 0 for t in totals):
        return None, tuple(t // 2 for t in totals)
    pads: list[int] = []
    for t in reversed(totals):  # F.pad lists the last dimension first
        pads += [t // 2, t - t // 2]
    return pads, 0


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose slot layers are plain layers at their deployed
    weights; its ``state_dict`` is ``dense_state_dict(model)``'s."""
    twin = copy.deepcopy(model).eval()
    for name, layer in slot_layers(twin):
        fixed = _Fixed(layer)
        if not name:
            return fixed
        parent, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, fixed)
    return twin


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: Path | str,
    *,
    self_decoding: bool = False,
    dynamic_batch: bool = True,
    force: bool = False,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``model`` (slotified, evaluated greedy or at its fixed draw) as an ONNX file whose
    input is ``input`` and output ``logits``; returns the path. See the module docstring.

    ``normalisation`` (per-channel mean, std) and ``metadata`` (a JSON object; its "dataset"
    names the data set) become the props the zoo export sets, which ``slotpack eval`` and
    ``predict`` read (``input_mean``, ``input_std``, ``metadata``); both or neither."""
    if (normalisation is None) != (metadata is None):
        raise ConfigError("export_onnx takes normalisation and metadata together, or neither")
    if not slot_layers(model):
        raise ConfigError("the model has no slot layers: slotify it first (slotpack.slotify)")
    proto = _trace(dense_twin(model), example_input, dynamic_batch)
    blob, _ = pack_module(model)
    props = {"slotpack_version": __version__, "self_decoding": str(self_decoding).lower(),
             "source_sha256": hashlib.sha256(blob).hexdigest()}  # fmt: skip
    if normalisation is not None:
        props.update(C._props(*normalisation, metadata))
    if self_decoding:
        slot = F.decode(blob)
        _decode_in_graph(proto, slot)
        props.update(generator=slot.manifest["generator"]["id"], seed=slot.manifest["generator"]["seed"],
                     k=",".join(map(str, slot.ks)))  # fmt: skip
    helper.set_model_props(proto, props)
    proto.producer_name, proto.producer_version = "slotpack", __version__
    onnx.checker.check_model(proto)
    return write_bytes(Path(path), proto.SerializeToString(), force=force)


def _trace(module: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> onnx.ModelProto:
    """``module`` (dense, eval mode) through torch's TorchScript exporter, input ``input`` and
    output ``logits``."""
    axes = {"input": {0: "N"}, "logits": {0: "N"}} if dynamic_batch else None
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Option-A shortcuts slice with step 2, which the tracer cannot fold (it need not).
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            module, (example,), buffer, dynamo=False, opset_version=C.OPSET,
            input_names=["input"], output_names=["logits"], dynamic_axes=axes,
            do_constant_folding=False,  # keeps every weight an initializer under its own name
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def export_run(
    source: Path | str, path: Path | str, *, self_decoding: bool = False, force: bool = False
) -> Path:
    """Export a run folder (its best checkpoint) or checkpoint file of a module model (resnet20,
    resnet18) with ``export_onnx`` (a learned run: its dense network, traced as it is), with the
    data set's input shape, normalisation and the run's metadata, so ``slotpack eval``/``predict``
    take the file as they take zoo exports. (Layer-list models export from their .slot file:
    ``slotpack pack`` first.)"""
    from . import arch as A
    from .checkpoint import load_checkpoint, model_from_checkpoint, run_metadata
    from .datafiles import spec

    ckpt = load_checkpoint(source)
    cfg = ckpt["config"]
    if not isinstance(A.spec(cfg["model"]), A.ModuleArch):
        raise ConfigError(
            f"{ckpt['path']} is a {cfg['model']} run: pack it (slotpack pack RUN -o m.slot) and "
            "export the .slot file"
        )
    if cfg.get("method") != "slot" and self_decoding:
        raise ConfigError(
            f"{ckpt['path']} holds a dense float32 model (--method {cfg.get('method')}); "
            "only slot runs export --self-decoding"
        )
    model = model_from_checkpoint(ckpt, "cpu", lean=True).eval()
    data = spec(model.arch.dataset)
    example = torch.zeros(1, *model.arch.input_shape)
    metadata = run_metadata(ckpt)
    if cfg.get("method") == "slot":
        return export_onnx(model, example, path, self_decoding=self_decoding, force=force,
                           normalisation=(data.mean, data.std), metadata=metadata)  # fmt: skip
    proto = _trace(model, example, dynamic_batch=True)  # the learned twin, as trained
    props = {"slotpack_version": __version__, "self_decoding": "false",
             **C._props(data.mean, data.std, metadata)}  # fmt: skip
    helper.set_model_props(proto, props)
    proto.producer_name, proto.producer_version = "slotpack", __version__
    onnx.checker.check_model(proto)
    return write_bytes(Path(path), proto.SerializeToString(), force=force)


def _decode_in_graph(proto: onnx.ModelProto, slot: F.SlotFile) -> None:
    """Replace each slot weight's initializer by nodes that regenerate it (same name)."""
    graph = proto.graph
    inits = {t.name: i for i, t in enumerate(graph.initializer)}
    g = C._Graph(prefix="slotpack/")
    for w in slot.weights:
        if w.section not in inits:
            raise ConfigError(
                f"the exported graph has no initializer {w.section}: the tracer renamed or "
                "merged it, so it cannot be regenerated in the graph"
            )
        out = C._decode_weight(g, slot, w.number, w.layer, w.section)
        g.nodes.append(helper.make_node("Identity", [out], [w.section]))
    keep = [t for t in graph.initializer if t.name not in {w.section for w in slot.weights}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.initializer.extend(g.model.graph.initializer)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(g.nodes + nodes)  # the weights first: the graph stays topologically sorted

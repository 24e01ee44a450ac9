"""Storage and load times of module models (ResNet-20, ResNet-18, torchvision MobileNetV3-Small):
weights-only .slot files against float32, float16 and int8 ONNX.

    python -m benchmarks.zoo_storage                  # sizes: 3 models x K = 2, 8, 64
    python -m benchmarks.zoo_storage --times          # ResNet-18 K=8 vs VGG-19 K=8 timings

Sizes: the .slot file is the weights-only file slotify's models pack into (docs/FORMAT.md §2.8),
with random indices in the fixed-width ``bits`` encoding (ceil(log2 K) bits per connection
whatever the values) and every other state_dict entry (BatchNorm, biases) as float32. The delta
encoding stores only connections training moved off their seeded initial slot, so its size
depends on the training run and is not measured here. The baselines are the dense network
(torch's default initialisation, eval mode) through torch's ONNX exporter at the project's opset
(constant folding on: BatchNorm folds into the convolutions), that file with every float32
initializer stored as float16 (a Cast back to float32 after each), and onnxruntime's dynamic
int8 quantization of it (``quantize_dynamic``, QInt8 weights).

Times (--times): K=8 slot models with random scores (lean: no value bank). Pack = the model
to file bytes (``modelfile.pack_module`` for ResNet-18, ``pack.pack_model`` for VGG-19); rebuild
= ``slotpack.runtime.load_state_dict`` of the file (numpy); ONNX = onnxruntime session creation
from the file and the first run on one image, for the dense export and the self-decoding one
(which regenerates its weights in the graph). Each time is the median of --repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_record

KS = (2, 8, 64)
MODELS = ("resnet20", "resnet18", "mobilenet_v3_small")


def dense_module(name: str):
    """The dense network called ``name`` (eval mode, 10 classes)."""
    import torch

    from slotpack import resnets

    torch.manual_seed(0)
    if name == "mobilenet_v3_small":
        from torchvision.models import mobilenet_v3_small

        return mobilenet_v3_small(num_classes=10).eval()
    return resnets.build(name).eval()


def slot_bytes(module, k: int, rng: np.random.Generator) -> tuple[bytes, int]:
    """A weights-only file of ``module`` slotified at K=``k`` with random indices (bits)."""
    from slotpack.modelfile import _numpy
    from slotpack.modules import select_layers
    from slotpack.pack import NamedWeight, encode_named

    layers = select_layers(module)
    weights = [
        NamedWeight(f"{name}.weight", tuple(m.weight.shape), k, "onedraw",
                    rng.integers(0, k, m.weight.numel(), dtype=np.uint16))
        for name, m in layers
    ]  # fmt: skip
    names = {w.name for w in weights}
    state = module.state_dict()
    tensors = {key: _numpy(key, v) for key, v in state.items() if key not in names}
    meta = {"model": "benchmark", "dataset": "cifar10", "epoch": 100, "val_acc": 0.9,
            "config": {"k": k, "method": "slot", "selection": "greedy", "seed": 0}}  # fmt: skip
    blob = encode_named(weights, tensors, seed=0, selection="greedy", order=list(state),
                        metadata=meta, index_encoding="bits")  # fmt: skip
    return blob, sum(w.index.size for w in weights)


def onnx_files(module, folder: Path) -> dict[str, int]:
    """Bytes of the float32, float16-initializer and dynamic-int8 ONNX files of ``module``."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slotpack.converters.onnx import OPSET

    f32, f16, i8 = folder / "f32.onnx", folder / "f16.onnx", folder / "int8.onnx"
    with torch.no_grad():
        torch.onnx.export(module, (torch.zeros(1, 3, 32, 32),), f32, dynamo=False,
                          opset_version=OPSET, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})  # fmt: skip
    proto = onnx.load(f32)
    graph, casts, kept = proto.graph, [], []
    for t in graph.initializer:
        if t.data_type != TensorProto.FLOAT:
            kept.append(t)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "_f16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [t.name], to=TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, f16)
    quantize_dynamic(f32, i8, weight_type=QuantType.QInt8)
    return {"onnx_float32": f32.stat().st_size, "onnx_float16": f16.stat().st_size,
            "onnx_int8_dynamic": i8.stat().st_size}  # fmt: skip


def sizes(models: list[str], ks: list[int]) -> dict[str, Any]:
    rows = []
    for name in models:
        module = dense_module(name)
        with tempfile.TemporaryDirectory() as tmp:
            baselines = onnx_files(module, Path(tmp))
        dense_values = sum(v.numel() for v in module.state_dict().values() if v.is_floating_point())
        for k in ks:
            blob, connections = slot_bytes(module, k, np.random.default_rng(k))
            rows.append({"model": name, "k": k, "connections": connections,
                         "dense_values": dense_values, "slot_bits_bytes": len(blob),
                         "bits_per_connection": 8 * len(blob) / connections, **baselines})  # fmt: skip
            print(f"{name:20s} K={k:<3d} {len(blob):>11,d} bytes  "
                  f"float32 onnx {baselines['onnx_float32']:>11,d}", flush=True)  # fmt: skip
    return {"kind": "zoo_storage", "rows": rows}


def _median(fn, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _random_scores(model, seed: int = 0) -> None:
    import torch

    from slotpack.modules import slot_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in slot_layers(model):
            m.scores.copy_(torch.rand(m.scores.shape, generator=g))


def _session_times(path: Path, repeats: int) -> dict[str, float]:
    import onnxruntime as ort

    x = np.zeros((1, 3, 32, 32), np.float32)

    def create():
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    create_s, sess = _median(create, repeats)
    first = time.perf_counter()
    sess.run(None, {sess.get_inputs()[0].name: x})
    return {"session_create_s": create_s, "first_run_s": time.perf_counter() - first,
            "bytes": path.stat().st_size}  # fmt: skip


def times(repeats: int) -> dict[str, Any]:
    import torch

    from slotpack import models
    from slotpack.converters.onnx import export_file
    from slotpack.modelfile import pack_module
    from slotpack.onnx_export import export_onnx
    from slotpack.pack import pack_model
    from slotpack.runtime import load_state_dict

    rows, load = [], {"start": os.getloadavg()}  # other processes on the machine skew times
    for name in ("resnet18", "vgg19"):
        t0 = time.perf_counter()
        model = models.create(name, 8, seed=0, lean=True).eval()
        _random_scores(model)
        build_s = time.perf_counter() - t0
        pack = pack_module if models.is_module_model(model) else pack_model
        pack_s, (blob, info) = _median(lambda m=model, f=pack: f(m), repeats)
        with tempfile.TemporaryDirectory() as tmp:
            slot = Path(tmp) / "m.slot"
            slot.write_bytes(blob)
            rebuild_s, _ = _median(lambda s=slot: load_state_dict(s), repeats)
            onnx = {}
            for mode, self_decoding in (("dense", False), ("self_decoding", True)):
                path = Path(tmp) / f"{mode}.onnx"
                t0 = time.perf_counter()
                if models.is_module_model(model):
                    export_onnx(model, torch.zeros(1, 3, 32, 32), path, self_decoding=self_decoding)
                else:
                    export_file(slot, path, self_decoding=self_decoding)
                export_s = time.perf_counter() - t0
                onnx[mode] = {"export_s": export_s, **_session_times(path, repeats)}
        row = {"model": name, "k": 8, "connections": info.connections, "slot_bytes": len(blob),
               "pack": pack.__module__ + "." + pack.__name__, "build_s": build_s,
               "pack_s": pack_s, "rebuild_s": rebuild_s, "onnx": onnx}  # fmt: skip
        rows.append(row)
        print(f"{name}: pack {pack_s:.2f} s, rebuild {rebuild_s:.2f} s, session dense "
              f"{onnx['dense']['session_create_s']:.2f} s, self-decoding "
              f"{onnx['self_decoding']['session_create_s']:.2f} s", flush=True)  # fmt: skip
    load["end"] = os.getloadavg()
    return {"kind": "zoo_times", "repeats": repeats, "load_average": load, "rows": rows}


def section(storage: list[dict[str, Any]], timing: list[dict[str, Any]]) -> list[str]:
    """The RESULTS.md section for records of kinds "zoo_storage" and "zoo_times"."""
    if not storage and not timing:
        return []
    out = ["## ResNets and MobileNet: weights-only files", ""]
    if storage:
        out += [
            "Weights-only `.slot` files (slotify's models, docs/FORMAT.md §2.8) with indices in "
            "the fixed-width `bits` encoding (random indices; every other tensor float32), "
            "against the dense network's ONNX files: float32 (BatchNorm folded by the "
            "exporter), float16 initializers, and onnxruntime's dynamic int8 quantization. "
            "Delta-coded files are smaller the fewer connections training moves off their "
            "initial slot, so their size depends on the run and is not in this table.",
            "",
            "| model | K | connections | .slot (bits) | bits / connection | float32 .onnx | "
            "float16 .onnx | int8 .onnx | float32 / .slot | int8 / .slot |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in storage:
            for row in r["rows"]:
                s = row["slot_bits_bytes"]
                out.append(
                    f"| {row['model']} | {row['k']} | {row['connections']:,} | {s:,} | "
                    f"{row['bits_per_connection']:.3f} | {row['onnx_float32']:,} | "
                    f"{row['onnx_float16']:,} | {row['onnx_int8_dynamic']:,} | "
                    f"{row['onnx_float32'] / s:.1f}x | {row['onnx_int8_dynamic'] / s:.1f}x |"
                )
        out.append("")
    for r in timing:
        out += [
            f"K=8 models with random scores; seconds, median of {r['repeats']} (first run: "
            f"once), on a shared machine (1-minute load average {_load(r)}). Pack: model to `.slot` bytes; rebuild: `slotpack.runtime.load_state_dict` "
            "(numpy); session: onnxruntime session creation from the file (the self-decoding "
            "graph regenerates its weights there, by constant folding).",
            "",
            "| model | connections | .slot bytes | pack s | rebuild s | dense .onnx bytes | "
            "session s | first run s | self-decoding .onnx bytes | session s | first run s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in r["rows"]:
            d, sd = row["onnx"]["dense"], row["onnx"]["self_decoding"]
            out.append(
                f"| {row['model']} | {row['connections']:,} | {row['slot_bytes']:,} | "
                f"{row['pack_s']:.2f} | {row['rebuild_s']:.2f} | {d['bytes']:,} | "
                f"{d['session_create_s']:.2f} | {d['first_run_s']:.3f} | {sd['bytes']:,} | "
                f"{sd['session_create_s']:.2f} | {sd['first_run_s']:.3f} |"
            )
        out.append("")
    for r in [*storage, *timing]:
        where = r["machine"].get("gpu") or f"{r['machine']['cpu']} ({r['machine']['cores']} cores)"
        out.append(
            f"- `{r['name']}`: `{r['command']}` on {where}, {r['date']}, commit {r['commit']}"
        )
    return out + [""]


def _load(r: dict[str, Any]) -> str:
    load = r.get("load_average")
    return (
        "not recorded" if not load else f"{load['start'][0]:.1f} before, {load['end'][0]:.1f} after"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--k", type=int, nargs="+", default=list(KS))
    p.add_argument("--times", action="store_true", help="the timing record instead of sizes")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.times:
        path = write_record("zoo_times_resnet18_vgg19_k8", times(args.repeats))
    else:
        path = write_record("zoo_storage", sizes(args.models, args.k))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

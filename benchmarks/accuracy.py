"""Train zoo models and record their accuracy: one JSON record per run under results/.

    python -m benchmarks.accuracy --model lenet300100 --k 8 --epochs 30 --root data/
    python -m benchmarks.accuracy --model lenet300100 --method learned --epochs 30 --root data/

Each record holds the full config, every epoch's metrics (training curve), the best-on-validation
epoch and its test accuracy measured in torch, and seconds per epoch on the machine that ran it.
Then the model is deployed and measured again in onnxruntime on the same test images: a slot
model is packed into a .slot file and exported to ONNX; a learned (float32) model is exported
dense and also quantized to int8 with onnxruntime's dynamic quantization. File sizes are recorded.
CIFAR-10 files are also evaluated on the labelled 10k hybrid set when the converted root holds
it. Probabilistic models also get two diagnostics: their argmax network's accuracy and the
accuracy with fresh draws per batch (how they trained), beside the deployed fixed draw's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import write_record
from slotpack import prng
from slotpack.datafiles import AUGMENTS


def deploy(run: Path, root: Path) -> dict:
    """Pack/export the run's best checkpoint, evaluate each artefact in onnxruntime on the test set."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slotpack import data
    from slotpack.atomic import write_bytes
    from slotpack.converters.onnx import export_file
    from slotpack.models import is_module_model
    from slotpack.onnx_export import export_run
    from slotpack.pipeline import dense_onnx
    from slotpack.runtime import evaluate, session
    from slotpack.train import load_model, pack_checkpoint

    model, cfg = load_model(run)
    cfg = cfg.resolved()
    test = data.load(cfg.dataset, root, "test")
    x, y = test.x.numpy(), test.y.numpy()
    files: dict[str, Path] = {}
    if is_module_model(model):  # resnets: weights-only .slot (no graph); ONNX from the run
        if cfg.method == "slot":
            files["slot"] = write_bytes(run / "model.slot", pack_checkpoint(run)[0])
        files["onnx"] = export_run(run, run / "model.onnx", force=True)
        if cfg.method != "slot":
            files["int8_onnx"] = run / "model.int8.onnx"
            quantize_dynamic(files["onnx"], files["int8_onnx"], weight_type=QuantType.QInt8)
    elif cfg.method == "slot":
        files["slot"] = write_bytes(run / "model.slot", pack_checkpoint(run)[0])
        files["onnx"] = run / "model.onnx"
        export_file(files["slot"], files["onnx"], force=True)
    else:
        files["onnx"] = write_bytes(run / "model.onnx", dense_onnx(model))
        files["int8_onnx"] = run / "model.int8.onnx"
        quantize_dynamic(files["onnx"], files["int8_onnx"], weight_type=QuantType.QInt8)
    hybrid = _hybrid(root) if cfg.dataset == "cifar10" else None
    out = {}
    for kind, path in files.items():
        if kind == "slot" and is_module_model(model):  # weights-only: no graph to run
            out[kind] = {"bytes": path.stat().st_size, "index": index_summary(path)}
            continue
        sess = session(path)
        result = evaluate(sess, x, y)
        out[kind] = {
            "bytes": path.stat().st_size,
            "ort_test_acc": result.accuracy,
            "ort_images_per_second": result.images_per_second,
        }
        if kind == "slot":
            out[kind]["index"] = index_summary(path)
        if hybrid is not None:
            out[kind]["hybrid10k_acc"] = evaluate(sess, *hybrid).accuracy
    if cfg.method == "slot" and cfg.selection == "probabilistic":
        out["sampled"] = {**sampled_accuracy(model, test), "argmax_test_acc": _argmax(model, test)}
    return out


def index_summary(path: Path) -> dict:
    """Per-layer index encoding, changed fraction and bits per connection of a .slot file, and
    the size of the same network in the fixed-width encoding."""
    from slotpack import format as F
    from slotpack.inspect import summary
    from slotpack.pack import repack

    slot = F.read(path)
    rows = [r for r in summary(slot)["layers"] if r["k"] is not None]
    keys = ("position", "k", "encoding", "reference", "crossing", "changed", "changed_fraction",
            "bits_per_connection", "connections")  # fmt: skip
    return {
        "layers": [{key: r[key] for key in keys} for r in rows],
        "bits_bytes": len(repack(slot, index_encoding="bits")),
    }


def _hybrid(root: Path):
    """The labelled 10k hybrid CIFAR-10 test set (x, y) when the converted root has it."""
    from benchmarks.hybrid_eval import load_hybrid
    from slotpack.sources import CIFAR10_FOLDER

    if not (root / CIFAR10_FOLDER / "test_hybrid_10k.npz").is_file():
        return None
    x, y, _ = load_hybrid(root)
    return x, y


def _argmax(model, test) -> float:
    """Test accuracy of a probabilistic model's argmax network (each connection's most probable
    value), which is not what it deploys: a diagnostic of how far it is from the trained ones."""
    from slotpack.layers import SlotConv2d, SlotLinear
    from slotpack.train import evaluate

    layers = [m for m in model.modules() if isinstance(m, (SlotLinear, SlotConv2d))]
    for layer in layers:
        layer.selection = "greedy"
    try:
        return evaluate(model, test).accuracy
    finally:
        for layer in layers:
            layer.selection = "probabilistic"


def sampled_accuracy(model, test, draws: int = 5) -> dict:
    """Test accuracy of a probabilistic model evaluated as it trains: a fresh draw of every
    connection's value from softmax(scores) per batch (a .slot file holds one fixed draw)."""
    import torch

    from slotpack import data
    from slotpack.layers import SlotConv2d, SlotLinear

    model.eval()
    for layer in model.modules():  # slot layers sample only in training mode; dropout stays off
        if isinstance(layer, (SlotLinear, SlotConv2d)):
            layer.train()
    accs = []
    with torch.no_grad():
        for draw in range(draws):
            torch.manual_seed(draw)
            correct = 0
            for xb, yb in data.batches(test, 1000, train=False):
                correct += int((model(xb).argmax(1) == yb).sum())
            accs.append(correct / len(test))
    model.eval()
    return {"draws": draws, "test_acc_mean": sum(accs) / draws, "test_acc": accs}


def record(name: str, cfg, out: Path, root: Path, device: str) -> None:
    """Train (unless the run folder is finished), deploy, and write one record."""
    from slotpack.cli import _Bars
    from slotpack.train import iter_metrics, train

    if (out / "result.json").is_file():  # a finished run: measure it again, don't retrain
        result = json.loads((out / "result.json").read_text())
    else:
        result = train(cfg, out, root=root, device=device, reporter=_Bars())
    payload = {
        "kind": "accuracy",
        "config": cfg.resolved().to_dict(),
        "result": result,
        "curve": list(iter_metrics(out)),
    }
    write_record(name, payload)  # the training result is kept even if deploying fails
    payload["deployed"] = deploy(out, root)
    path = write_record(name, payload)
    ort = payload["deployed"]["onnx"]["ort_test_acc"]
    print(
        f"{name}: test {result['test_acc']:.4f} (onnxruntime {ort:.4f}; val {result['val_acc']:.4f}, "
        f"{result['mean_epoch_seconds']:.1f} s/epoch) -> {path}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--k", type=int, nargs="+", default=[8])
    p.add_argument("--method", default="slot", choices=["slot", "learned"])
    p.add_argument("--selection", default="greedy", choices=["greedy", "probabilistic"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", default=None, choices=["constant", "cosine", "step"])
    p.add_argument(
        "--milestones",
        default=None,
        help="epochs where --schedule step multiplies lr by gamma, e.g. 30",
    )
    p.add_argument("--limit", type=int, default=None, help="first N training examples only")
    p.add_argument("--score-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rate", type=float, default=0.0, help="rate-aware margin (train --rate)")
    p.add_argument("--layer-rate", default=None, help="one margin per weighted layer, e.g. 0.5,0,0")
    p.add_argument(
        "--layer-k", default=None, help="one K per weighted layer, e.g. 2,8,8 (train --k 2,8,8)"
    )
    p.add_argument("--init", default=prng.DEFAULT_INIT, choices=prng.INITS)
    p.add_argument("--augment", default=None, choices=AUGMENTS, help="train --augment")
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--runs", type=Path, default=Path("runs/bench"))
    p.add_argument("--device", default="auto")
    p.add_argument("--tag", default="", help="suffix for the record name (e.g. the machine)")
    p.add_argument(
        "--finetune",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also finetune each slot run as a dense model for EPOCHS (the paper's finetuning)",
    )
    args = p.parse_args(argv)

    from slotpack import data
    from slotpack.train import TrainConfig, finetune_config

    root = args.root or data.default_root()
    ks = args.k if args.method == "slot" else [args.k[0]]
    for k in ks:
        for seed in args.seed:
            slots = {  # a learned (float32) config has no slot settings at all
                "k": k,
                "selection": args.selection,
                "score_dtype": args.score_dtype,
                "rate": args.rate,
                "init": args.init,
                "layer_k": tuple(int(v) for v in args.layer_k.split(",")) if args.layer_k else None,
                "layer_rate": (
                    tuple(float(v) for v in args.layer_rate.split(",")) if args.layer_rate else None
                ),
            }
            cfg = TrainConfig(
                model=args.model,
                method=args.method,
                epochs=args.epochs,
                seed=seed,
                lr=args.lr,
                schedule=args.schedule,
                milestones=tuple(int(v) for v in args.milestones.split(","))
                if args.milestones
                else None,
                limit=args.limit,
                augment=args.augment,
                **(slots if args.method == "slot" else {}),
            )
            label = "learned" if args.method == "learned" else f"k{k}-{args.selection}"
            if args.layer_k and args.method == "slot":
                label = f"k{args.layer_k.replace(',', '-')}-{args.selection}"
            if args.score_dtype != "float32":
                label += f"-{args.score_dtype}"
            if args.method == "slot" and args.init != "uniform":
                label += f"-{args.init}"
            if args.rate:
                label += f"-rate{args.rate:g}"
            if args.layer_rate:
                label += f"-rate{args.layer_rate.replace(',', '-')}"
            if args.augment:
                label += f"-{args.augment}"
            schedule = f"_{args.schedule}" if args.schedule else ""  # never the default's name
            if args.milestones:
                schedule += args.milestones.replace(",", "-")
            name = f"accuracy_{args.model}_{label}_e{args.epochs}_s{seed}{schedule}{args.tag}"
            out = args.runs / name
            record(name, cfg, out, root, args.device)
            if args.finetune and args.method == "slot":
                ft = finetune_config(out, epochs=args.finetune, limit=args.limit)
                record(
                    f"{name}_finetuned{args.finetune}",
                    ft,
                    args.runs / f"{name}_finetuned{args.finetune}",
                    root,
                    args.device,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

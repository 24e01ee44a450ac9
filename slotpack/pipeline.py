"""The main job end to end on a small default: train, pack, export, run in onnxruntime, compare.

``slotpack demo`` prints the table this returns: MNIST Lenet-300-100 trained as a K-slot network
and as its float32 twin; the slot model packed into a ``.slot`` file and exported to ONNX twice
(dense float32, and self-decoding: seed plus packed indices), the float32 twin exported dense;
every artefact evaluated on the 10,000 test images in onnxruntime, next to torch's accuracy.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import data
from .atomic import write_bytes
from .errors import CheckpointError
from .train import Reporter, TrainConfig, train


@dataclass(frozen=True)
class DemoRow:
    artefact: str
    path: str
    bytes: int
    ratio: float  # float32 bytes of the same network / these bytes
    torch_acc: float | None
    ort_acc: float


def dense_onnx(model) -> bytes:
    """The ONNX bytes of a dense (learned or finetuned) zoo model: it has no .slot file."""
    from .converters.onnx import export_arrays

    spec = data.spec(model.arch.dataset)
    arrays = {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}
    meta = {"model": model.arch.name, "dataset": model.arch.dataset, "method": model.method}
    onnx_model = export_arrays(
        model.arch.layers,
        arrays,
        input_shape=model.arch.input_shape,
        num_classes=model.arch.num_classes,
        mean=spec.mean,
        std=spec.std,
        metadata=meta,
    )
    return onnx_model.SerializeToString()


def export_checkpoint(path: Path | str, output: Path | str, *, force: bool = False) -> int:
    """Export a float32 run (``--method learned``, or finetuned: its folder or a checkpoint) to a
    dense ONNX file, written atomically; returns its size. A slot run is packed first instead."""
    from .train import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt["config"]["method"] == "slot":
        raise CheckpointError(
            f"{ckpt['path']} holds a slot model; pack it first (`slotpack pack {path} -o "
            "model.slot`) and export the .slot file"
        )
    blob = dense_onnx(model_from_checkpoint(ckpt, "cpu"))
    write_bytes(output, blob, force=force)
    return len(blob)


def _ort_accuracy(path: Path, x, y) -> float:
    from .runtime import evaluate, session

    return evaluate(session(path), x, y).accuracy


MARKER = ".slotpack-demo"  # in a folder the demo created: a rerun may replace its files


def demo(
    out: Path | str = "runs/demo",
    *,
    root: Path | str | None = None,
    k: int = 8,
    epochs: int = 3,
    limit: int | None = None,
    device: str = "auto",
    force: bool = False,
    reporter: Reporter | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[DemoRow]:
    """Run the whole path for Lenet-300-100 on MNIST; one row per artefact.

    ``out`` is created if missing, with a marker file: a later demo into a folder it made
    replaces the earlier demo's files. In any other folder, earlier demo files are replaced only
    with ``force``; nothing else in ``out`` is ever touched. ``progress`` gets a line per step."""
    from .converters.onnx import export_file
    from .sources import mnist_present
    from .train import pack_checkpoint

    note = progress or (lambda _msg: None)
    out = Path(out)
    runs = {"slot": out / f"slot-k{k}", "learned": out / "learned-fp32"}
    slot_path, fp32_path = out / f"lenet-k{k}.slot", out / "lenet-fp32.onnx"
    dense_path, tiny_path = out / f"lenet-k{k}.onnx", out / f"lenet-k{k}.tiny.onnx"
    ours = [*runs.values(), slot_path, fp32_path, dense_path, tiny_path]
    existing = [p for p in ours if p.exists()]
    if existing and not force and not (out / MARKER).is_file():
        raise CheckpointError(
            f"{existing[0]} already exists in a folder slotpack demo did not create; pass --force "
            "to replace the demo's files there, or choose another --out"
        )
    for path in existing:  # only what an earlier demo wrote, never anything else in --out
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if not out.exists():
        out.mkdir(parents=True)
        (out / MARKER).write_text("made by `slotpack demo`; a rerun replaces its files here\n")
    root = Path(root) if root is not None else data.default_root()
    if not mnist_present(root):
        note(f"fetching MNIST into {root} (once)")
    data.fetch("mnist", root, progress=note)
    acc = {}
    images = f"{limit:,} training images" if limit else "51,000 training images"
    plural = "epoch" if epochs == 1 else "epochs"
    what = {"slot": f"the K={k} slot network", "learned": "its float32 twin"}
    for method, run in runs.items():
        note(f"training {what[method]}: {epochs} {plural} on {images} -> {run}")
        slots = {"k": k} if method == "slot" else {}
        cfg = TrainConfig(model="lenet300100", method=method, epochs=epochs, limit=limit, **slots)
        acc[method] = train(cfg, run, root=root, device=device, reporter=reporter)["test_acc"]

    note(f"packing the slot network into {slot_path}")
    blob, info = pack_checkpoint(runs["slot"])
    write_bytes(slot_path, blob)
    note(f"exporting {dense_path.name} (dense), {tiny_path.name} (self-decoding), {fp32_path.name}")
    export_file(slot_path, dense_path)
    export_file(slot_path, tiny_path, self_decoding=True)
    export_checkpoint(runs["learned"], fp32_path, force=True)

    note("evaluating the four files on the 10,000 test images in onnxruntime")
    test = data.load("mnist", root, "test")
    x, y = test.x.numpy(), test.y.numpy()
    float32 = info.float32_size
    rows = [
        ("float32 twin, dense .onnx", fp32_path, acc["learned"]),
        (f"K={k} slot, dense .onnx", dense_path, acc["slot"]),
        (f"K={k} slot, .slot file", slot_path, acc["slot"]),
        (f"K={k} slot, self-decoding .onnx", tiny_path, acc["slot"]),
    ]
    return [
        DemoRow(
            name,
            str(path),
            path.stat().st_size,
            float32 / path.stat().st_size,
            acc,
            _ort_accuracy(path, x, y),
        )
        for name, path, acc in rows
    ]

"""ONNX export: file sizes, session creation, latency and logits equivalence against torch.

    python -m benchmarks.onnx_bench                  # lenet300100, conv6, vgg19 (+ conv2, conv4)
    python -m benchmarks.onnx_bench --root data/         # adds real MNIST rows for Lenet

For each timed model at K=8 (scores drawn at random with a fixed seed; VGG-19's BatchNorm running
statistics calibrated on 256 synthetic inputs, so activations keep their scale through 16 layers):

- sizes of the ``.slot`` file and of both ONNX exports (dense float32, self-decoding);
- onnxruntime session creation from the ``.onnx`` file, median of 3 (the self-decoding graph
  regenerates its weights then, by constant folding);
- per-batch latency, median and p90, for batch 1 and batch 256: onnxruntime on the dense and the
  self-decoding export, and torch eager on the dense learned twin (``models.dense_from_slot``, eval
  mode, ``torch.inference_mode``). All three use the same thread count: ``torch.set_num_threads``
  and onnxruntime's ``intra_op_num_threads`` both set to ``--threads`` (2);
- equivalence of onnxruntime (both exports) with the torch slot model on 256 synthetic normalised
  inputs: max abs diff of the logits, also relative to the torch model's max |logit|, argmax
  agreement, and whether the self-decoding logits equal the dense ones bit for bit; for Lenet
  also on the 10,000 real MNIST test images if ``--root`` holds MNIST (default
  ~/.cache/slotpack/data when it exists). The scores are random, so accuracies there are chance
  level: the rows measure agreement, not quality.

``--equivalence-models`` (conv2, conv4) get the sizes and the equivalence rows only. Inputs are
float32 [N, C, H, W] already normalised; timings include onnxruntime's input checks, not the
normalisation. Record: results/onnx.json.
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

TIMED = ("lenet300100", "conv6", "vgg19")
EQUIVALENCE_ONLY = ("conv2", "conv4")
ENGINES = ("ort_dense", "ort_self_decoding", "torch_eager")


def _default_root() -> Path | None:
    root = Path.home() / ".cache" / "slotpack" / "data"
    return root if root.is_dir() else None


def _slot_model(name: str, k: int, seed: int, calibrate: np.ndarray):
    """A slot model with random scores; BatchNorm statistics from ``calibrate`` in train mode."""
    import torch

    from slotpack import models

    model = models.create(name, k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.weighted_layers():
            m.scores.copy_(torch.rand(m.scores.shape, generator=g))
        if bns:
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # a plain average over the calibration batches
            model.train()
            for chunk in torch.from_numpy(calibrate).split(64):
                model(chunk)
    return model.eval()


def _percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1e3, q))


def _time_calls(fn, runs: int, max_seconds: float, warmup: int = 2) -> dict[str, Any]:
    """Median and p90 of ``runs`` calls (at least 3; fewer than ``runs`` past ``max_seconds``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "runs": len(times),
        "median_ms": _percentile_ms(times, 50),
        "p90_ms": _percentile_ms(times, 90),
    }


def _agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max())
    return {
        "max_abs_diff": diff,
        "logit_scale": scale,  # max |logit| of the torch model
        "relative_diff": diff / scale if scale > 0 else float("inf"),
        "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
    }


def _equivalence(model, sess_dense, sess_self, x: np.ndarray, y: np.ndarray | None, what: str):
    import torch

    from slotpack.runtime import predict

    chunks = [x[i : i + 256] for i in range(0, len(x), 256)]
    with torch.inference_mode():
        ref = torch.cat([model(torch.from_numpy(c)) for c in chunks]).numpy()
    dense = np.concatenate([predict(sess_dense, c) for c in chunks])
    selfdec = np.concatenate([predict(sess_self, c) for c in chunks])
    row = {"inputs": what, "count": len(x), **_agreement(ref, dense)}
    row["self_decoding_identical"] = bool(np.array_equal(selfdec, dense))
    if y is not None:
        row["torch_accuracy"] = float((ref.argmax(1) == y).mean())
        row["ort_accuracy"] = float((dense.argmax(1) == y).mean())
    return row


def measure(
    name: str,
    k: int,
    seed: int,
    threads: int,
    folder: Path,
    *,
    timed: bool,
    mnist_root: Path | None,
    runs_small: int,
    runs_large: int,
    max_seconds: float,
) -> dict[str, Any]:
    import torch

    from slotpack import arch as A
    from slotpack import data, models
    from slotpack import format as F
    from slotpack.converters.onnx import export_file
    from slotpack.pack import pack_model
    from slotpack.runtime import predict, session

    arch = A.get(name)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, *arch.input_shape)).astype(np.float32)
    calibrate = rng.standard_normal((256, *arch.input_shape)).astype(np.float32)
    model = _slot_model(name, k, seed, calibrate)
    blob, info = pack_model(model)
    slot_path = F.write(folder / f"{name}.slot", blob, force=True)
    row: dict[str, Any] = {
        "model": name,
        "k": k,
        "seed": seed,
        "connections": info.connections,
        "slot_bytes": len(blob),
    }
    paths = {}
    for form, self_decoding in (("dense", False), ("self_decoding", True)):
        paths[form] = folder / f"{name}-{form}.onnx"
        t0 = time.perf_counter()
        size, _ = export_file(slot_path, paths[form], self_decoding=self_decoding, force=True)
        row[f"export_{form}_s"] = time.perf_counter() - t0
        row[f"onnx_{form}_bytes"] = size

    sessions, creation, all_runs = {}, {}, {}
    for form, path in paths.items():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            sessions[form] = session(path, threads=threads)
            times.append(time.perf_counter() - t0)
        creation[form], all_runs[form] = statistics.median(times), times
    row["session_create_s"] = creation
    row["session_create_runs_s"] = all_runs

    row["equivalence"] = [
        _equivalence(model, sessions["dense"], sessions["self_decoding"], x, None, "synthetic")
    ]
    if name == "lenet300100" and mnist_root is not None:
        test = data.load("mnist", mnist_root, "test")
        xn = data.normalize(test.x, test.spec).numpy()
        row["equivalence"].append(
            _equivalence(
                model,
                sessions["dense"],
                sessions["self_decoding"],
                xn,
                test.y.numpy(),
                "mnist test",
            )
        )
    if not timed:
        return row

    twin = models.dense_from_slot(model).eval()
    del model  # the slot model's banks (1.3 GB for VGG-19) are not needed for timing

    def torch_call(batch: np.ndarray):
        t = torch.from_numpy(batch)

        def call():
            with torch.inference_mode():
                twin(t)

        return call

    latency: dict[str, dict[str, Any]] = {}
    for batch, runs in ((1, runs_small), (256, runs_large)):
        xb = np.ascontiguousarray(x[:batch])
        calls = {
            "ort_dense": lambda xb=xb: predict(sessions["dense"], xb),
            "ort_self_decoding": lambda xb=xb: predict(sessions["self_decoding"], xb),
            "torch_eager": torch_call(xb),
        }
        latency[str(batch)] = {e: _time_calls(calls[e], runs, max_seconds) for e in ENGINES}
    row["latency"] = latency
    return row


def _table(rows: list[dict[str, Any]]) -> list[str]:
    head = (
        f"{'model':12s} {'.slot':>10s} {'dense.onnx':>11s} {'self.onnx':>10s} "
        f"{'create d/s ms':>15s} {'b1 p50 d/s/torch ms':>22s} {'b256 p50 d/s/torch ms':>25s} "
        f"{'rel diff':>9s} {'agree':>6s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        eq = r["equivalence"][0]
        create = b1 = b256 = ""
        if "latency" in r:
            c = r["session_create_s"]
            create = f"{1e3 * c['dense']:.0f}/{1e3 * c['self_decoding']:.0f}"
            b1, b256 = (
                "/".join(f"{r['latency'][b][e]['median_ms']:.2f}" for e in ENGINES)
                for b in ("1", "256")
            )
        lines.append(
            f"{r['model']:12s} {r['slot_bytes']:10,d} {r['onnx_dense_bytes']:11,d} "
            f"{r['onnx_self_decoding_bytes']:10,d} {create:>15s} {b1:>22s} {b256:>25s} "
            f"{eq['relative_diff']:9.1e} {eq['argmax_agreement']:6.4f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(TIMED))
    p.add_argument("--equivalence-models", nargs="*", default=list(EQUIVALENCE_ONLY))
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs-small", type=int, default=50, help="timed runs at batch 1")
    p.add_argument("--runs-large", type=int, default=20, help="timed runs at batch 256")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="stop timing an engine/batch after this long (at least 3 runs)",
    )
    p.add_argument("--root", type=Path, default=_default_root(), help="data root holding MNIST")
    p.add_argument("--name", default="onnx")
    args = p.parse_args(argv)

    import torch

    from slotpack.sources import mnist_present

    torch.set_num_threads(args.threads)
    root = args.root if args.root is not None and mnist_present(args.root) else None
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, timed in [(m, True) for m in args.models] + [
            (m, False) for m in args.equivalence_models
        ]:
            t0 = time.perf_counter()
            row = measure(
                name,
                args.k,
                args.seed,
                args.threads,
                Path(tmp),
                timed=timed,
                mnist_root=root,
                runs_small=args.runs_small,
                runs_large=args.runs_large,
                max_seconds=args.max_seconds,
            )
            rows.append(row)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print("\n".join(_table(rows)))
    path = write_record(
        args.name,
        {
            "kind": "onnx",
            "threads": args.threads,
            "load_average_at_start": list(load),
            "load_average_at_end": list(os.getloadavg()),
            "mnist_root": str(root) if root else None,
            "rows": rows,
        },
    )
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- RESULTS.md


def section(records: list[dict[str, Any]]) -> list[str]:
    """The RESULTS.md section for records of kind "onnx" (markdown lines)."""
    if not records:
        return []
    out = [
        "## ONNX export and onnxruntime",
        "",
        "K=8 models with random scores (fixed seed; VGG-19's BatchNorm statistics calibrated on "
        "synthetic inputs). `dense` stores float32 weights; `self-decoding` stores the seed and "
        "the packed indices and regenerates the weights when onnxruntime creates the session "
        "(constant folding). Session creation: median of 3, from the `.onnx` file. Latency: per "
        "batch, median and p90 over the runs shown; torch eager runs the dense twin in "
        "`inference_mode`; torch and onnxruntime use the same thread count.",
        "",
        "| model | connections | .slot bytes | dense .onnx | self-decoding .onnx | "
        "vs .slot | session dense ms | session self-decoding ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        for row in r["rows"]:
            c = row["session_create_s"]
            out.append(
                f"| {row['model']} | {row['connections']:,} | {row['slot_bytes']:,} | "
                f"{row['onnx_dense_bytes']:,} | {row['onnx_self_decoding_bytes']:,} | "
                f"{row['onnx_self_decoding_bytes'] / row['slot_bytes']:.3f}x | "
                f"{1e3 * c['dense']:.0f} | {1e3 * c['self_decoding']:.0f} |"
            )
    out += [
        "",
        "| model | batch | threads | onnxruntime dense ms (p90) | onnxruntime self-decoding ms "
        "(p90) | torch eager ms (p90) | runs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        for row in r["rows"]:
            for batch, engines in row.get("latency", {}).items():
                cells = [
                    f"{engines[e]['median_ms']:.2f} ({engines[e]['p90_ms']:.2f})" for e in ENGINES
                ]
                runs = "/".join(str(engines[e]["runs"]) for e in ENGINES)
                out.append(
                    f"| {row['model']} | {batch} | {r['threads']} | {' | '.join(cells)} | {runs} |"
                )
    out += [
        "",
        "Equivalence with the torch slot model (eval mode): max abs diff of the logits, the same "
        "relative to the largest torch logit, argmax agreement, and self-decoding logits against "
        "dense ones. "
        "Scores are random, so MNIST accuracies are chance level: these rows measure agreement.",
        "",
        "| model | inputs | count | max abs diff | max abs logit | relative | argmax agreement | "
        "self-decoding = dense | accuracy torch / onnxruntime |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        for row in r["rows"]:
            for eq in row["equivalence"]:
                acc = (
                    f"{100 * eq['torch_accuracy']:.2f}% / {100 * eq['ort_accuracy']:.2f}%"
                    if "torch_accuracy" in eq
                    else ""
                )
                same = "bit-identical" if eq["self_decoding_identical"] else "DIFFERENT"
                out.append(
                    f"| {row['model']} | {eq['inputs']} | {eq['count']:,} | "
                    f"{eq['max_abs_diff']:.1e} | {eq['logit_scale']:.3g} | "
                    f"{eq['relative_diff']:.1e} | "
                    f"{100 * eq['argmax_agreement']:.2f}% | {same} | {acc} |"
                )
    out.append("")
    for r in records:
        m = r["machine"]
        where = m.get("gpu") or f"{m['cpu']} ({m['cores']} cores)"
        out.append(
            f"- `{r['name']}`: `{r['command']}` on {where}, torch {m.get('torch', '?')}, "
            f"onnxruntime {m.get('onnxruntime', '?')}, {r['date']}, commit {r['commit']}; load "
            f"average at start {r['load_average_at_start'][0]:.2f}"
        )
    return out + [""]


if __name__ == "__main__":
    sys.exit(main())

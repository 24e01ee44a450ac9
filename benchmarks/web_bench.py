"""The browser page (``slotpack export --web``): session creation in headless Chromium.

    python -m benchmarks.web_bench                 # lenet300100 and conv6 at K=8, 3 runs each

For each model (random scores with a fixed seed, as in onnx_bench; Conv-6's BatchNorm statistics
calibrated on synthetic inputs) the page folder is exported and opened in headless Chromium
(benchmarks/browser.py: a local server, a fresh profile per run) on one random image. Recorded:

- session creation in the page (``ort.InferenceSession.create`` of the self-decoding model in
  onnxruntime-web's single-threaded wasm backend, which regenerates the weights by constant
  folding): the first one, which also starts the wasm backend (compiling its 14 MB), i.e. what a
  visitor waits for after the files have loaded, and then ``--again`` more in the same page,
  which measure the session alone; and the page's one inference (medians reported);
- the same session creation in onnxruntime-web under Node.js (same wasm, no page), and in
  onnxruntime in Python (native, one thread) from the same ``model.onnx``;
- whether the page's logits equal Node's bit for bit, and their largest difference from Python's
  relative to the largest logit (x86 kernels round differently, see tests/test_web.py).

Needs Chromium and ``npm ci --prefix runtime/web`` (as the tests do). Record: results/web.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.browser import chromium, run_node, run_page
from benchmarks.common import write_record

MODELS = ("lenet300100", "conv6")


def _version(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        return None


def measure(name: str, k: int, seed: int, runs: int, again: int, folder: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from benchmarks.onnx_bench import _slot_model
    from slotpack import arch as A
    from slotpack import format as F
    from slotpack.converters.web import export_web, find_ort_web
    from slotpack.pack import pack_model
    from slotpack.runtime.session import input_normalisation, normalize

    arch = A.get(name)
    rng = np.random.default_rng(seed)
    calibrate = rng.standard_normal((256, *arch.input_shape)).astype(np.float32)
    model = _slot_model(name, k, seed, calibrate)
    blob, info = pack_model(model)
    del model
    slot_path = F.write(folder / f"{name}.slot", blob, force=True)
    site = folder / name
    done = export_web(slot_path, site)
    image = rng.integers(0, 256, arch.input_shape, dtype=np.uint8)
    row: dict[str, Any] = {
        "model": name,
        "k": k,
        "seed": seed,
        "connections": info.connections,
        "slot_bytes": len(blob),
        "onnx_bytes": done.onnx_bytes,
        "folder_bytes": done.total_bytes,
        "onnxruntime_web": done.ort_version,
    }
    pages = [run_page(site, image.tobytes(), again=again, timeout=900) for _ in range(runs)]
    if not all(p["ok"] for p in pages):
        raise RuntimeError(f"{name}: the page failed: {pages}")
    row["browser_create_ms"] = [p["create_ms"] for p in pages]
    row["browser_create_again_ms"] = [t for p in pages for t in p.get("create_again_ms", [])]
    row["browser_run_ms"] = [p["run_ms"] for p in pages]
    row["user_agent"] = pages[0]["user_agent"]

    sess = ort.InferenceSession(str(site / "model.onnx"), providers=["CPUExecutionProvider"])
    x = normalize(image[None], *input_normalisation(sess))
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    nodes = [run_node(find_ort_web()[0], site / "model.onnx", x, timeout=900) for _ in range(runs)]
    row["node_create_ms"] = [n["create_ms"] for n in nodes]
    row["node_create_again_ms"] = [n["create_again_ms"] for n in nodes]
    row["node"] = nodes[0]["node"]
    row["browser_equals_node_bits"] = all(
        n["logits_bits"] == pages[0]["logits_bits"] for n in nodes
    )
    got = np.asarray(pages[0]["logits_bits"], np.uint32).view(np.float32).reshape(logits.shape)
    row["browser_vs_python_relative_diff"] = float(
        np.abs(got - logits).max() / np.abs(logits).max()
    )
    row["argmax_agrees"] = bool(got.argmax() == logits.argmax())

    times = []
    for _ in range(runs):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        t0 = time.perf_counter()
        ort.InferenceSession(str(site / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        times.append(1e3 * (time.perf_counter() - t0))
    row["python_create_ms"] = times
    return row


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=3, help="page loads (fresh browser each)")
    p.add_argument("--again", type=int, default=2, help="more session creations per page load")
    p.add_argument("--name", default="web")
    args = p.parse_args(argv)

    browser = chromium()
    if browser is None:
        print("no Chromium: apt-get install chromium (or set $SLOTPACK_CHROMIUM)", file=sys.stderr)
        return 2
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            t0 = time.perf_counter()
            rows.append(measure(name, args.k, args.seed, args.runs, args.again, Path(tmp)))
            r = rows[-1]
            print(
                f"{name}: browser session {_median(r['browser_create_ms']):.0f} ms first, "
                f"{_median(r['browser_create_again_ms']):.0f} ms again; node "
                f"{_median(r['node_create_ms']):.0f}/{_median(r['node_create_again_ms']):.0f} ms, "
                f"python {_median(r['python_create_ms']):.0f} ms; page logits = node's bits: "
                f"{r['browser_equals_node_bits']} "
                f"({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    path = write_record(
        args.name,
        {
            "kind": "web",
            "chromium": _version([browser, "--version"]),
            "load_average_at_start": list(load),
            "load_average_at_end": list(os.getloadavg()),
            "rows": rows,
        },
    )
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- RESULTS.md


def section(records: list[dict[str, Any]]) -> list[str]:
    """The RESULTS.md section for records of kind "web" (markdown lines)."""
    if not records:
        return []
    out = [
        "## In the browser (onnxruntime-web, wasm)",
        "",
        "`slotpack export --web` pages in headless Chromium, K=8 models with random scores. "
        "Creating the session regenerates the weights from seed and indices (constant folding of "
        "the self-decoding graph) in onnxruntime-web's single-threaded wasm backend. *first*: the "
        "page's first session, which also starts the wasm backend (what a visitor waits for once "
        "the files are loaded); *again*: further sessions in the same page, the regeneration "
        "alone. The same file in onnxruntime-web under Node.js (first / again) and in native "
        "onnxruntime (Python, one thread) for comparison. Medians. The page's logits equal "
        "Node's bit for bit; they differ from native onnxruntime's in the last bits (x86 kernels "
        "use FMA).",
        "",
        "| model | connections | .slot bytes | model.onnx | page folder | page loads | browser "
        "session ms, first | again | browser inference ms | Node.js session ms, first / again | "
        "native session ms | page = Node bits | vs native (relative) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in records:
        for row in r["rows"]:
            node = f"{_median(row['node_create_ms']):,.0f} / {_median(row['node_create_again_ms']):,.0f}"
            out.append(
                f"| {row['model']} | {row['connections']:,} | {row['slot_bytes']:,} | "
                f"{row['onnx_bytes']:,} | {row['folder_bytes']:,} | {len(row['browser_create_ms'])} | "
                f"{_median(row['browser_create_ms']):,.0f} | "
                f"{_median(row['browser_create_again_ms']):,.0f} | "
                f"{_median(row['browser_run_ms']):.1f} | {node} | "
                f"{_median(row['python_create_ms']):,.0f} | "
                f"{'yes' if row['browser_equals_node_bits'] else 'NO'} | "
                f"{row['browser_vs_python_relative_diff']:.1e} |"
            )
    out.append("")
    for r in records:
        m = r["machine"]
        out.append(
            f"- `{r['name']}`: `{r['command']}` on {m['cpu']} ({m['cores']} cores), "
            f"{r['chromium']}, onnxruntime-web {r['rows'][0]['onnxruntime_web']}, "
            f"Node.js {r['rows'][0]['node']}, {r['date']}, commit {r['commit']}; load average "
            f"at start {r['load_average_at_start'][0]:.2f}"
        )
    return out + [""]


if __name__ == "__main__":
    sys.exit(main())

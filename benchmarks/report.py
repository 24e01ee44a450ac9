"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json (no number is typed by hand).

python -m benchmarks.report
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import fuzz_slot, index_coding, onnx_bench, web_bench, zoo_storage
from benchmarks.common import RESULTS, load_records
from slotpack import arch

OUT = Path(__file__).resolve().parent / "RESULTS.md"
PAPER = {
    ("lenet300100", 8): 98.2,
    ("lenet300100", 2): 97.0,
    ("conv6", 8): 88.4,
    ("conv4", 8): 86.0,
    ("conv2", 8): 78.1,
    ("vgg19", 8): 91.0,
}
PAPER_LEARNED = {
    "lenet300100": 97.9,
    "conv2": 79.3,
    "conv4": 86.5,
    "conv6": 88.0,
}  # as in the issue


def _where(r: dict[str, Any]) -> str:
    m = r["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cores']} cores)"
    return f"{where}, torch {m.get('torch', '?')}"


def _provenance(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        lines.append(
            f"- `{r['name']}`: `{r['command']}` on {_where(r)}, {r['date']}, commit {r['commit']}"
        )
    return lines


def prng_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    out = [
        "## Generator: bit-exactness across devices and speed",
        "",
        "| device | check | values | result |",
        "|---|---|---:|---|",
    ]
    for r in records:
        for c in r["checks"]:
            result = "identical bits" if c["identical"] else "MISMATCH"
            if "relative_max_error" in c:
                result = f"max rel. error {c['relative_max_error']:.1e}"
            out.append(f"| {r['device']} | {c['what']} | {c['count']:,} | {result} |")
    out += ["", "| device | generator | million values / s |", "|---|---|---:|"]
    for r in records:
        for name, v in sorted(r["speed"].items()):
            out.append(f"| {r['device']} | {name} | {v / 1e6:,.0f} |")
    return out + ["", *_provenance(records), ""]


def step_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    out = [
        "## Training step: slotpack against the reference approach",
        "",
        "The reference approach is benchmarks/reference_slot.py, a faithful re-implementation of "
        "`sum(weight * one_hot(argmax(scores)), -1)`; `slotpack` is our gather layer with a "
        "stored bank; `lean` keeps no bank (on CUDA it runs the fused Triton kernels where they "
        "pass their self-check; the `kernel` column says what ran); `lean-torch` is lean on "
        "plain torch ops; `lean+sib` also applies SGD inside the backward "
        "pass (no full score gradient); `lean+sib+bf16` also keeps scores and momentum in "
        "bfloat16 (stochastic rounding); `learned` is the dense float32 twin. Median "
        "of the timed steps (forward, backward, SGD with momentum; batch of random images); rows "
        "with an `alone` time took turns step by step with the other implementations in one "
        "process (this CPU's speed drifts between runs), the others ran alone. Peak "
        "memory over the timed steps, model state included, bank generation excluded: CUDA "
        "max_memory_allocated, or on CPU the peak resident set (records before this "
        "session's step_time.py counted from before the model was built).",
        "",
        "| device | model | K | impl | ms / step | speed vs reference | peak MiB | "
        "memory vs reference |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        rows = [row for row in r["rows"] if "error" not in row]
        ref = {(row["model"], row["k"]): row for row in rows if row["impl"] == "reference"}
        for row in rows:
            base = ref.get((row["model"], row["k"]))
            t = m = "—"
            if base and row is not base:
                t = f"{base['median_ms'] / row['median_ms']:.2f}x"
                m = f"{row['peak_mib'] / base['peak_mib']:.2f}x"
            dev = r["machine"].get("gpu") if row["device"] == "cuda" else "cpu"
            impl = row["impl"] + (" (triton)" if row.get("kernel") == "triton" else "")
            out.append(
                f"| {dev} | {row['model']} | {row['k']} | {impl} | "
                f"{row['median_ms']:.2f} | {t} | {row['peak_mib']:.0f} | {m} |"
            )
    return out + ["", *_provenance(records), ""]


def kernel_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    out = [
        "## Lean layers: fused Triton kernels against torch ops",
        "",
        "One lean slot layer of VGG-19's largest size (benchmarks/kernel_speed.py): the forward "
        "pass (argmax, selected value) and the backward pass (score gradient) as training runs "
        "them, on torch ops or on the fused kernels. `identical`: the kernels' outputs equal the "
        "torch path's bit for bit. Peak: CUDA memory allocated beyond inputs and outputs during "
        "forward + backward.",
        "",
        "| device | connections | K | scores | code | forward ms | backward ms | speed-up | "
        "identical | peak extra MiB |",
        "|---|---:|---:|---|---|---:|---:|---:|---|---:|",
    ]
    missing = set()
    for r in records:
        dev = r["machine"].get("gpu") if r["device"] == "cuda" else "cpu"
        dev += " (Triton interpreter)" if r.get("interpreter") else ""
        for row in r["rows"]:
            peak, speedup = row["peak_extra_mib"], row.get("speedup")
            out.append(
                f"| {dev} | {row['n']:,} | {row['k']} | {row['score_dtype']} | {row['kernel']} | "
                f"{row['forward_ms']:.3f} | {row['backward_ms']:.3f} | "
                f"{'—' if speedup is None else f'{speedup:.1f}x'} | {row.get('identical', '—')} | "
                f"{'—' if peak is None else f'{peak:.0f}'} |"
            )
            if "kernels_unavailable" in row:
                missing.add(f"{dev}: {row['kernels_unavailable']}")
    out += ["", *(f"Kernel rows missing on {m}." for m in sorted(missing))]
    return out + ["", *_provenance(records), ""]


def _method(cfg: dict[str, Any]) -> str:
    if cfg.get("init_from"):
        return "slot, finetuned (dense)"
    if cfg["method"] == "learned":
        return "learned"
    bf16 = ", bfloat16 scores" if cfg.get("score_dtype", "float32") != "float32" else ""
    return f"slot, {cfg['selection']}{bf16}"


def _pct(x: float | None) -> str:
    return f"{100 * x:.2f}%" if x is not None else ""


def accuracy_section(records: list[dict[str, Any]], hybrid: dict[str, dict]) -> list[str]:
    if not records:
        return []
    out = [
        "## Accuracy: torch and onnxruntime",
        "",
        "Test accuracy of the best-on-validation epoch, in torch and in onnxruntime on the deployed "
        "file (slot models: packed to `.slot` and exported to ONNX; float32 models: exported "
        "dense, and quantized to int8 with onnxruntime's dynamic quantization). MNIST: the full "
        "10,000 test images; validation is a fixed 9,000 of the 60,000 training images. "
        "CIFAR-10: validation is a fixed 10% of the training images present; `test` is the "
        "1,000 exact test images; `10k hybrid` is the labelled estimate of ../shared/DATA.md "
        "(9,000 of its images went through lossy JPEG), never the official test accuracy. "
        "Rows trained on a subset of the training set say so.",
        "",
        "| model | method | K | seed | data | epochs | schedule | val | test (torch) | "
        "test (onnxruntime) | int8 (onnxruntime) | 10k hybrid | paper | file bytes | s / epoch | "
        "device |",
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {name: i for i, name in enumerate(arch.ZOO)}
    records = sorted(
        records,
        key=lambda r: (
            order.get(r["config"]["model"], 99),
            _method(r["config"]),
            r["config"]["k"] if r["config"]["method"] == "slot" else 0,
            r["name"],
        ),
    )
    for r in records:
        cfg, res, dep = r["config"], r["result"], r.get("deployed", {})
        slot = cfg["method"] == "slot"
        k = cfg["k"] if slot else ""
        greedy = slot and cfg["selection"] == "greedy"
        paper = PAPER.get((cfg["model"], cfg["k"])) if greedy else None
        if cfg["method"] == "learned" and not cfg.get("init_from"):
            paper = PAPER_LEARNED.get(cfg["model"])
        train_n = res.get("train_count")
        full = {"mnist": 51_000, "cifar10": 45_000}[cfg["dataset"]]
        data_note = cfg["dataset"] + (
            f" (subset: {train_n:,} train)" if train_n and train_n < full else ""
        )
        if "subset" in r["name"] and not train_n:
            data_note = cfg["dataset"] + " (subset: benchmarks/README.md)"
        dev = r["machine"].get("gpu") or "cpu"
        main_file = dep.get("slot") or dep.get("onnx") or {}
        size = f"{main_file['bytes']:,}" if main_file else ""
        ort = (dep.get("onnx") or {}).get("ort_test_acc")
        int8 = (dep.get("int8_onnx") or {}).get("ort_test_acc")
        hyb = (dep.get("slot") or dep.get("onnx") or {}).get("hybrid10k_acc")
        if hyb is None:
            hyb = hybrid.get(r["name"], {}).get("hybrid10k_acc")
        out.append(
            f"| {cfg['model']} | {_method(cfg)} | {k} | {cfg['seed']} | {data_note} | "
            f"{res['epochs']} | "
            f"{cfg['schedule']} lr {cfg['lr']:g} | {_pct(res['val_acc'])} | "
            f"{_pct(res['test_acc'])} on {res['test_count']:,} | {_pct(ort)} | {_pct(int8)} | "
            f"{_pct(hyb)} | {f'{paper:.1f}%' if paper else ''} | "
            f"{size} | "
            f"{res['mean_epoch_seconds']:.1f} | {dev} |"
        )
    sampled = [r for r in records if "sampled" in r.get("deployed", {})]
    if sampled:
        out += [
            "",
            "Probabilistic selection, three ways to pick a network from the trained scores: "
            "the deployed one (one fixed, seeded draw from softmax(scores): what evaluation "
            "uses and the `.slot` file holds; older records, made before this rule, evaluated "
            "the argmax), the argmax network (each connection's most probable value), and the "
            "networks training saw (a fresh draw per batch; mean over draws; not deployable):",
            "",
            "| model | K | epochs | data | deployed (torch) | argmax | fresh draws | draws |",
            "|---|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in sampled:
            smp = r["deployed"]["sampled"]
            n = r["result"].get("train_count")
            out.append(
                f"| {r['config']['model']} | {r['config']['k']} | {r['result']['epochs']} | "
                f"{n or '?'} train | {_pct(r['result']['test_acc'])} | "
                f"{_pct(smp.get('argmax_test_acc'))} | {_pct(smp['test_acc_mean'])} | "
                f"{smp['draws']} |"
            )
    seeds = _seed_summary(records)
    if seeds:
        out += [
            "",
            "Several seeds (mean and spread of torch test accuracy):",
            "",
            "| model | method | K | epochs | seeds | mean | min | max |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *seeds,
        ]
    return out + ["", *_provenance(records), ""]


def _seed_summary(records: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple, list[float]] = {}
    # options added after some records were written, at the value those records ran with
    defaults = {"lean": False, "score_dtype": "float32", "step_in_backward": False}
    for r in records:
        cfg = {**defaults, **r["config"]}
        cfg.pop("seed")
        key = (
            cfg["model"],
            _method(cfg),
            cfg["k"] if cfg["method"] == "slot" else "",
            r["result"]["epochs"],
            json.dumps(cfg, sort_keys=True),
            r["machine"].get("gpu", "cpu"),
        )
        groups.setdefault(key, []).append(r["result"]["test_acc"])
    return [
        f"| {m} | {meth} | {k} | {e} | {len(v)} | {_pct(statistics.mean(v))} | {_pct(min(v))} | {_pct(max(v))} |"
        for (m, meth, k, e, _, _), v in groups.items()
        if len(v) > 1
    ]


def storage_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    out = [
        "## Storage: .slot against float32 baselines",
        "",
        "Bytes of whole files. Float32 baselines hold every dense tensor of the network (the "
        "rebuilt weights of the K=8 model; BatchNorm statistics for VGG-19); ratios are against "
        "float32 values (4 bytes each). gzip/xz/zstd compress the float32 .safetensors file at "
        "their highest levels. Selections are uniform random draws (packed indices cost "
        "ceil(log2 K) bits whatever their values; a .slot file does not compress: see the "
        "`.slot gzip` column).",
        "",
        "| model | K | connections | .slot bytes | bits / conn | vs float32 | .slot gzip | "
        "float32 .pt | float32 .safetensors | float16 | gzip -9 | xz -9 | zstd -19 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        for row in r["rows"]:
            b = row["baselines"]
            comp = [
                f"{b[c]:,}" if c in b else ""
                for c in ("float32_gzip9", "float32_xz9", "float32_zstd19")
            ]
            out.append(
                f"| {row['model']} | {row['k']} | {row['connections']:,} | {row['slot_bytes']:,} | "
                f"{row['bits_per_connection']:.3f} | {row['ratio_vs_float32']:.2f}x | "
                f"{row['slot_gzip9_bytes']:,} | {b['float32_pt']:,} | {b['float32_safetensors']:,} | "
                f"{b['float16_safetensors']:,} | {' | '.join(comp)} |"
            )
    return out + ["", *_provenance(records), ""]


def pack_speed_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    out = [
        "## Pack and rebuild speed",
        "",
        "Medians; rebuild reads the file from disk and verifies every CRC. Peak memory of rebuild "
        "by tracemalloc, against the dense float32 size. `unchunked` is the same rebuild with "
        "one generator/unpacker block per layer.",
        "",
        "| model | K | step | ms | M connections / s | peak MiB | vs dense float32 |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in records:
        for row in r["rows"]:
            peak = (
                f"{row['peak_mib']:.1f} | {row['peak_mib'] / row['dense_float32_mib']:.2f}x"
                if "peak_mib" in row
                else " | "
            )
            out.append(
                f"| {row['model']} | {row['k']} | {row['step']} | {1e3 * row['seconds']:.1f} | "
                f"{row['connections_per_second'] / 1e6:.0f} | {peak} |"
            )
    return out + ["", *_provenance(records), ""]


def pack_run_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    out = [
        "## `slotpack pack` of a run",
        "",
        "The whole command in a fresh process (imports included), medians of repeated runs on a "
        "Lenet-300-100 K=8 checkpoint; `before` is an earlier commit's tree.",
        "",
        "| tree | wall s | CPU s | file bytes | same bytes |",
        "|---|---:|---:|---:|---|",
    ]
    for r in records:
        for row in r["rows"]:
            out.append(
                f"| {row['tree']} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} | "
                f"{row['file_bytes']:,} | {r['same_bytes']} |"
            )
    return out + ["", *_provenance(records), ""]


def install_size_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    out = [
        "## Install size",
        "",
        "`pip install slotpack` (runtime: built wheel, fresh venv) against `slotpack[train]` "
        "(with torch); each side is the files of the distributions it pulls in.",
        "",
        "| runtime | runtime venv folder | full (with torch) | runtime / full | full without CUDA "
        "libraries and triton | runtime / that | torch in runtime |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        out.append(
            f"| {r['runtime_bytes'] / 2**20:,.0f} MiB | {r['runtime_venv_folder_bytes'] / 2**20:,.0f} "
            f"MiB | {r['full_bytes'] / 2**20:,.0f} MiB | {r['ratio']:.3f} | "
            f"{r['full_bytes_without_cuda'] / 2**20:,.0f} MiB | {r['ratio_without_cuda']:.3f} | "
            f"{'importable' if r['torch_importable_in_runtime_venv'] else 'not importable'} |"
        )
    return out + ["", *_provenance(records), ""]


def ddp_section(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    out = [
        "## Data-parallel training (torchrun, gloo on CPU)",
        "",
        "The same run trained by one plain process and by torchrun with 1 and N ranks on one "
        "machine; the cores are split between the ranks. `scores`: DDP all-reduces the "
        "[connections, K] score gradients; `weights`: each slot layer all-reduces its "
        "[connections] weight gradient inside the backward pass, K times less traffic. Images per second of training after "
        "the first epoch. This shows that data-parallel training works and what gloo's "
        "all-reduce costs; the ranks share one machine's 2 cores (each rank gets one thread), "
        "so it is not a scaling measurement. Test accuracies differ in the last digits "
        "because summation order differs and an argmax can flip.",
        "",
        "| model | K | mode | threads / rank | images / s | vs one process | test acc | "
        "replicas identical |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in records:
        cfg = r["config"]
        base = next((row for row in r["rows"] if not row["ddp"]), None)
        for row in r["rows"]:
            rel = f"{row['images_per_second'] / base['images_per_second']:.2f}x" if base else ""
            out.append(
                f"| {cfg['model']} | {cfg['k']} | {row['mode']} | {row['threads_per_rank']} | "
                f"{row['images_per_second']:,.0f} | {rel} | {_pct(row['test_acc'])} | "
                f"{'yes' if row['replicas_identical'] else 'NO'} |"
            )
        out.append("")
        out.append(
            f"Run: {cfg['limit']:,} training images, {cfg['epochs']} epochs, global batch "
            f"{cfg['batch_size']}."
        )
    return out + ["", *_provenance(records), ""]


def render(folder: Path = RESULTS) -> str:
    records = load_records(folder)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_kind.setdefault(r.get("kind", "?"), []).append(r)
    lines = [
        "# slotpack benchmark results",
        "",
        "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; every "
        "number below is in one of those records with the command, machine, date and commit "
        "that produced it. How to rerun each row: benchmarks/README.md.",
        "",
    ]
    hybrid = {h["accuracy_record"]: h for h in by_kind.get("hybrid", [])}
    lines += accuracy_section(by_kind.get("accuracy", []), hybrid)
    lines += storage_section(by_kind.get("storage", []))
    lines += zoo_storage.section(by_kind.get("zoo_storage", []), by_kind.get("zoo_times", []))
    lines += pack_speed_section(by_kind.get("pack_speed", []))
    lines += pack_run_section(by_kind.get("pack_run", []))
    lines += install_size_section(by_kind.get("install_size", []))
    lines += index_coding.section(
        by_kind.get("accuracy", []),
        by_kind.get("index_stats", []),
        by_kind.get("rebuild_time", []),
        by_kind.get("zero_slot", []),
    )
    lines += onnx_bench.section(by_kind.get("onnx", []))
    lines += web_bench.section(by_kind.get("web", []))
    lines += fuzz_slot.section(by_kind.get("fuzz", []))
    lines += step_section(by_kind.get("step_time", []))
    lines += kernel_section(by_kind.get("kernel_speed", []))
    lines += ddp_section(by_kind.get("ddp", []))
    lines += prng_section(by_kind.get("prng", []))
    lines += plots_section(by_kind.get("accuracy", []), by_kind.get("index_stats", []))
    return "\n".join(lines)


def plots_section(records: list[dict[str, Any]], index_stats: list[dict[str, Any]]) -> list[str]:
    """Write the PNG plots next to RESULTS.md and link them; say so if matplotlib is missing."""
    try:
        from benchmarks import plots
    except ImportError:  # pragma: no cover - import of the module itself never fails
        return []
    folder = OUT.parent / "plots"
    folder.mkdir(exist_ok=True)
    try:
        paths = (
            plots.accuracy_vs_bits(records, folder)
            + plots.frontier(records, folder, index_stats)
            + plots.curves(records, folder)
        )
    except ImportError:
        return [
            "## Plots",
            "",
            "Not drawn: install the bench extra (`pip install -e '.[bench]'`).",
            "",
        ]
    return ["## Plots", "", *[f"![{p.stem}](plots/{p.name})" for p in paths], ""]


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

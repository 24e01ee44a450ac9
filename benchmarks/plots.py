"""PNG plots for RESULTS.md, from the same records as its tables (matplotlib: the bench extra).

- ``accuracy_vs_bits_<model>.png``: onnxruntime test accuracy against bits per connection (the
  whole file's size over its connections) for slot models, with the float32 and int8 baselines
  and, for Lenet-300-100, the published Deep Compression point (Han et al. 2016: 40x, 98.42%).
  Seed 0 and float32 scores only; points are joined (and coloured) per training regime
  (training images and epochs), so short and long runs are never drawn as one curve.
- ``frontier_lenet300100.png``: the accuracy-size frontier of Lenet-300-100: every slot run with
  its file in the fixed-width and in the smallest encoding (delta), rate-aware runs by margin,
  and the published compressors as anchors.
- ``curves.png``: validation accuracy per epoch of the headline runs (``HEADLINE`` models, K=8
  or dense, seed 0), labelled with their training regime and device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEEP_COMPRESSION_LENET = (32 / 40, 0.9842)  # 40x smaller than float32, 98.42% (ICLR 2016)
# Published compressors of Lenet-300-100 on MNIST: (label, bits per weight, test accuracy)
LENET_ANCHORS = (
    ("Deep Compression (Han et al. 2016)", 0.80, 0.9842),
    ("Soft weight-sharing (Ullrich et al. 2017)", 0.50, 0.9806),
    ("Entropy-penalized reparam. (Oktay et al. 2020)", 0.26, 0.981),
)
HEADLINE = ("lenet300100", "conv6", "vgg19")


FULL_TRAIN = {"mnist": 51_000, "cifar10": 45_000}  # training images once validation is held out


def _regime(r: dict[str, Any]) -> tuple[int, int]:
    """(training images, epochs): points are only joined within one training regime. Older
    records lack the count; without a --limit and not named a subset, they used the full set."""
    n = r["result"].get("train_count")
    if not n and r["config"].get("limit") is None and "subset" not in r["name"]:
        n = FULL_TRAIN.get(r["config"]["dataset"])
    return int(n or 0), int(r["result"]["epochs"])


def _regime_label(regime: tuple[int, int]) -> str:
    n, epochs = regime
    return f"{epochs} ep" + (f", {n:,} train" if n else "")


def _points(records: list[dict[str, Any]], model: str):
    """Seed-0, float32-score points: slot (bits, acc, K, selection, regime), base (name, bits,
    acc, regime)."""
    slot, base = [], []
    for r in records:
        cfg, dep = r["config"], r.get("deployed") or {}
        if cfg["model"] != model or "onnx" not in dep or cfg["seed"] != 0:
            continue
        if cfg.get("score_dtype", "float32") != "float32" or cfg.get("rate") or cfg.get("layer_k"):
            continue  # rate-aware and per-layer-K runs are drawn on the frontier plot
        if cfg.get("layer_rate"):
            continue  # rate-aware and per-layer-K runs are drawn on the frontier plot
        conns = r.get("connections")
        acc = dep["onnx"]["ort_test_acc"]
        regime = _regime(r)
        if cfg["method"] == "slot" and "slot" in dep:
            bits = 8 * dep["slot"]["bytes"] / conns if conns else None
            slot.append((bits, acc, cfg["k"], cfg["selection"], regime))
        elif cfg["method"] == "learned" and not cfg.get("init_from"):
            base.append(("float32", 32.0, acc, regime))
            if "int8_onnx" in dep:
                base.append(("int8", 8.0, dep["int8_onnx"]["ort_test_acc"], regime))
    return slot, base


def accuracy_vs_bits(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slotpack import arch

    written = []
    for model in arch.ZOO:
        conns = arch.get(model).num_connections
        for r in records:
            r.setdefault("connections", arch.spec(r["config"]["model"]).num_connections)
        slot, base = _points(records, model)
        if not slot:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        regimes = sorted({p[4] for p in slot} | {b[3] for b in base})
        colors = {g: f"C{i % 10}" for i, g in enumerate(regimes)}
        for regime in regimes:
            for selection, marker in (("greedy", "o"), ("probabilistic", "s")):
                pts = sorted(
                    (b, a, k) for b, a, k, s, g in slot if s == selection and b and g == regime
                )
                if not pts:
                    continue
                ax.plot(
                    [p[0] for p in pts],
                    [100 * p[1] for p in pts],
                    marker=marker,
                    color=colors[regime],
                    label=f"slot ({selection}), {_regime_label(regime)}",
                )
                for b, a, k in pts:
                    ax.annotate(
                        f"K={k}",
                        (b, 100 * a),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize=8,
                    )
        for name, bits, acc, regime in base:
            ax.scatter(
                [bits],
                [100 * acc],
                marker="*" if name == "float32" else "X",
                s=120,
                color=colors[regime],
                label=f"{name} baseline, {_regime_label(regime)}",
            )
        if model == "lenet300100":
            ax.scatter(
                [DEEP_COMPRESSION_LENET[0]],
                [100 * DEEP_COMPRESSION_LENET[1]],
                marker="D",
                color="black",
                label="Deep Compression (published)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per connection (whole file)")
        ax.set_ylabel("test accuracy, onnxruntime (%)")
        ax.set_title(f"{model} ({conns:,} connections)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        path = folder / f"accuracy_vs_bits_{model}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def frontier_points(
    records: list[dict[str, Any]], index_stats: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Lenet-300-100 slot runs as (label, bits, acc, seed, kind) rows: kind "plain" for the
    fixed-width file, "delta" for the smallest encoding, "delta, reference ranks" where the file
    came from a writer older than the crossing order (its layers do not say). A network's
    ``index_stats`` record (its run re-packed by the writer of that record's commit) overrides
    the size its accuracy record saw at training time, and adds networks trained before format
    version 2."""
    rows = []
    recorded = {r["name"] for r in records}
    repacked = {Path(r["run"]).name: r for r in index_stats}
    for r in index_stats:  # only networks that no accuracy record deployed (trained before v2)
        cfg = r["config"]
        if cfg["model"] != "lenet300100" or r.get("test_acc") is None:
            continue
        if Path(r["run"]).name in recorded or cfg["selection"] != "greedy":
            continue
        label = f"K={cfg['k']}, {cfg['epochs']} ep, re-packed ({cfg.get('init', 'uniform')} init)"
        rows.append(dict(label=label, bits=r["bits_per_connection"], acc=r["test_acc"],
                         seed=cfg["seed"], kind=_delta_kind(r), rate=cfg.get("rate", 0.0)))  # fmt: skip
    for r in records:
        cfg, dep = r["config"], r.get("deployed") or {}
        if cfg["model"] != "lenet300100" or cfg["method"] != "slot" or "slot" not in dep:
            continue
        if cfg.get("score_dtype", "float32") != "float32" or cfg["selection"] != "greedy":
            continue
        ks = cfg.get("layer_k") or cfg["k"]
        ks = ",".join(map(str, ks)) if isinstance(ks, list) else str(ks)
        rate = cfg.get("layer_rate") or cfg.get("rate")
        rate = ",".join(f"{r:g}" for r in rate) if isinstance(rate, list) else rate
        tag = f"K={ks}" + (f", rate {rate:g}" if isinstance(rate, float) and rate else "")
        tag += f", rate {rate}" if isinstance(rate, str) else ""
        tag += f", {cfg['epochs']} ep" + (", cosine" if cfg.get("schedule") == "cosine" else "")
        tag += ", onedraw16" if cfg.get("init") == "onedraw16" else ""  # the newer reference order
        tag += f", {cfg['augment']}" if cfg.get("augment") not in (None, "none") else ""
        if cfg.get("schedule") == "step" and cfg.get("milestones"):
            tag += ", lr x" + f"{cfg['gamma']:g} at " + ",".join(map(str, cfg["milestones"]))
        acc, index = dep["slot"]["ort_test_acc"], dep["slot"].get("index")
        plain = index["bits_bytes"] if index else dep["slot"]["bytes"]
        rows.append(dict(label=tag, bits=8 * plain / 266_200, acc=acc, seed=cfg["seed"],
                         kind="plain", rate=cfg.get("rate", 0.0)))  # fmt: skip
        if index:
            bits, kind = 8 * dep["slot"]["bytes"] / 266_200, _delta_kind(index)
            if r["name"] in repacked:
                bits = repacked[r["name"]]["bits_per_connection"]
                kind = _delta_kind(repacked[r["name"]])
            rows.append(dict(label=tag, bits=bits, acc=acc, seed=cfg["seed"], kind=kind,
                             rate=cfg.get("rate", 0.0)))  # fmt: skip
    return rows


DELTA_KINDS = ("delta", "delta, reference ranks")


def _delta_kind(index: dict[str, Any]) -> str:
    """ "delta" for files whose writer knew the crossing order (FORMAT §1.8): their layer rows
    record ``crossing``; older writers stored every rank in the reference order."""
    return DELTA_KINDS[0] if any("crossing" in r for r in index["layers"]) else DELTA_KINDS[1]


def frontier(
    records: list[dict[str, Any]], folder: Path, index_stats: list[dict[str, Any]] = ()
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frontier_points(records, index_stats)
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(7.2, 5.6))
    names = {"plain": "slotpack, fixed-width indices",
             "delta": "slotpack, only what training changed (delta)",
             "delta, reference ranks": "slotpack delta, earlier writer (reference-order ranks)"}  # fmt: skip
    for kind, marker, color in (("plain", "o", "C0"), ("delta", "s", "C3"),
                                ("delta, reference ranks", "x", "C1")):  # fmt: skip
        # the fixed-width files of rate-aware runs all sit at log2 K: drawn once, by the plain runs
        pts = [
            r for r in rows if r["kind"] == kind and not (kind == "plain" and "rate" in r["label"])
        ]
        ax.scatter([r["bits"] for r in pts], [100 * r["acc"] for r in pts], marker=marker,
                   color=color, label=names[kind])  # fmt: skip
        for r in pts:
            if r["seed"] == 0:
                ax.annotate(r["label"], (r["bits"], 100 * r["acc"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=6)  # fmt: skip
    for i, (name, bits, acc) in enumerate(LENET_ANCHORS):
        ax.scatter([bits], [100 * acc], marker="D", color=f"C{4 + i}", label=f"{name}, published")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per connection (whole file bytes x 8 / 266,200)")
    ax.set_ylabel("MNIST test accuracy, onnxruntime (%)")
    ax.set_title("Lenet-300-100: accuracy against size (CPU runs)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    path = folder / "frontier_lenet300100.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def curves(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def headline(r: dict[str, Any]) -> bool:  # seed 0, float32 scores, K=8 or dense
        cfg = r["config"]
        slot_ok = cfg["method"] != "slot" or cfg["k"] == 8
        plain = cfg.get("score_dtype", "float32") == "float32" and cfg["seed"] == 0
        return cfg["model"] in HEADLINE and bool(r.get("curve")) and slot_ok and plain

    runs = [r for r in records if headline(r)]
    if not runs:
        return []
    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(5 * len(HEADLINE), 3.6))
    for ax, model in zip(axes, HEADLINE, strict=True):
        for r in runs:
            cfg = r["config"]
            if cfg["model"] != model:
                continue
            label = f"K={cfg['k']} {cfg['selection']}" if cfg["method"] == "slot" else "float32"
            if cfg.get("init_from"):
                label = "finetuned"
            epochs = [c["epoch"] for c in r["curve"]]
            where = r["machine"].get("gpu") or "cpu"
            ax.plot(
                epochs,
                [100 * c["val_acc"] for c in r["curve"]],
                label=f"{label}, {cfg['schedule']}, {_regime_label(_regime(r))}, {where}",
            )
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    path = folder / "curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]

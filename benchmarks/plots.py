"""PNG plots for RESULTS.md, from the same records as its tables (matplotlib: the bench extra).

- ``accuracy_vs_bits_<model>.png``: onnxruntime test accuracy against bits per connection (the
  whole file's size over its connections) for slot models, with the float32 and int8 baselines
  and, for Lenet-300-100, the published Deep Compression point (Han et al. 2016: 40x, 98.42%).
- ``curves.png``: validation accuracy per epoch of the runs named in ``HEADLINE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEEP_COMPRESSION_LENET = (32 / 40, 0.9842)  # 40x smaller than float32, 98.42% (ICLR 2016)
HEADLINE = ("lenet300100", "conv6", "vgg19")


def _points(records: list[dict[str, Any]], model: str):
    slot, base = [], []
    for r in records:
        cfg, dep = r["config"], r.get("deployed") or {}
        if cfg["model"] != model or "onnx" not in dep:
            continue
        conns = r.get("connections")
        acc = dep["onnx"]["ort_test_acc"]
        if cfg["method"] == "slot" and "slot" in dep:
            bits = 8 * dep["slot"]["bytes"] / conns if conns else None
            slot.append((bits, acc, cfg["k"], cfg["selection"]))
        elif cfg["method"] == "learned" and not cfg.get("init_from"):
            base.append(("float32", 32.0, acc))
            if "int8_onnx" in dep:
                base.append(("int8", 8.0, dep["int8_onnx"]["ort_test_acc"]))
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
            r.setdefault("connections", arch.get(r["config"]["model"]).num_connections)
        slot, base = _points(records, model)
        if not slot:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for selection, marker in (("greedy", "o"), ("probabilistic", "s")):
            pts = sorted((b, a, k) for b, a, k, s in slot if s == selection and b)
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [100 * p[1] for p in pts],
                    marker=marker,
                    label=f"slot ({selection})",
                )
                for b, a, k in pts:
                    ax.annotate(
                        f"K={k}",
                        (b, 100 * a),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize=8,
                    )
        for name, bits, acc in base:
            ax.scatter([bits], [100 * acc], marker="*", s=120, label=f"{name} baseline")
        if model == "lenet300100":
            ax.scatter(
                [DEEP_COMPRESSION_LENET[0]],
                [100 * DEEP_COMPRESSION_LENET[1]],
                marker="D",
                label="Deep Compression (published)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per connection (whole file)")
        ax.set_ylabel("test accuracy, onnxruntime (%)")
        ax.set_title(f"{model} ({conns:,} connections)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path = folder / f"accuracy_vs_bits_{model}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def curves(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["config"]["model"] in HEADLINE and r.get("curve")]
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
            ax.plot(
                epochs,
                [100 * c["val_acc"] for c in r["curve"]],
                label=f"{label}, {cfg['schedule']}",
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

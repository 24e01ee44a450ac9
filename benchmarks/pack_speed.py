"""Speed and memory of pack and rebuild (the .slot issue's targets), chunked and unchunked.

    python -m benchmarks.pack_speed                       # lenet300100 and vgg19 at K=8

- ``pack (indices)``: encode_selection: bit packing, CRCs, manifest, self-validation.
- ``pack (model)``: pack_model on a torch slot model: the argmax of every score row, then the above.
- ``rebuild``: read the file from disk, verify CRCs, unpack the indices, generate the selected values.
Medians of several runs; peak memory of rebuild measured with tracemalloc (numpy reports its
buffers to it) and compared with the dense float32 size. ``unchunked`` repeats rebuild with the
block sizes of the generator and the bit unpacker set beyond the layer sizes (one block per layer:
the "before" of chunking).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.common import write_record


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def measure(name: str, k: int, repeat: int, folder: Path) -> list[dict]:
    import torch

    from slotpack import bits, data, models, prng
    from slotpack import format as F
    from slotpack.pack import encode_selection, pack_model
    from slotpack.runtime import rebuild

    model = models.create(name, k, seed=1)
    with torch.no_grad():
        for m in model.weighted_layers():
            m.scores.uniform_()
    model.eval()
    indices = [m.scores.argmax(1).numpy().astype(np.uint16) for m in model.weighted_layers()]
    spec = data.spec(model.arch.dataset)
    tensors = {
        f"{p}.{r}": getattr(m, r).numpy()
        for p, m in enumerate(model)
        if isinstance(m, torch.nn.BatchNorm2d)
        for r in ("running_mean", "running_var")
    }
    n = model.arch.num_connections
    dense_mib = 4 * (n + sum(t.size for t in tensors.values())) / 2**20

    def pack_indices():
        return encode_selection(
            model.arch,
            seed=1,
            k=k,
            selection="greedy",
            indices=indices,
            tensors=tensors,
            mean=spec.mean,
            std=spec.std,
        )

    path = folder / f"{name}-k{k}.slot"
    F.write(path, pack_indices(), force=True)
    rows = [
        {"step": "pack (indices)", "seconds": _median_seconds(pack_indices, repeat)},
        {"step": "pack (model)", "seconds": _median_seconds(lambda: pack_model(model), repeat)},
        {
            "step": "rebuild",
            "seconds": _median_seconds(lambda: rebuild(path), repeat),
            "peak_mib": _peak_mib(lambda: rebuild(path)),
        },
    ]
    saved = prng.NP_BLOCK, bits.BLOCK
    prng.NP_BLOCK = bits.BLOCK = 1 << 40  # one block per layer: no chunking
    try:
        rows.append(
            {
                "step": "rebuild, unchunked",
                "seconds": _median_seconds(lambda: rebuild(path), repeat),
                "peak_mib": _peak_mib(lambda: rebuild(path)),
            }
        )
    finally:
        prng.NP_BLOCK, bits.BLOCK = saved
    for row in rows:
        row.update(
            {
                "model": name,
                "k": k,
                "connections": n,
                "dense_float32_mib": dense_mib,
                "file_bytes": path.stat().st_size,
                "connections_per_second": n / row["seconds"],
            }
        )
        peak = (
            f", peak {row['peak_mib']:.0f} MiB ({row['peak_mib'] / dense_mib:.2f}x dense)"
            if "peak_mib" in row
            else ""
        )
        print(
            f"{name:12s} K={k} {row['step']:20s} {row['seconds'] * 1e3:9.1f} ms "
            f"({row['connections_per_second'] / 1e6:.0f} M connections/s){peak}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["lenet300100", "vgg19"])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += measure(name, args.k, args.repeat, Path(tmp))
    path = write_record("pack_speed", {"kind": "pack_speed", "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Storage: bytes per zoo model and K for .slot against float32, float16 and compressed float32.

    python -m benchmarks.storage                    # every zoo model x K = 2, 4, 8, 16, 64
    python -m benchmarks.storage --models lenet300100 --k 8

Selections are drawn uniformly at random (trained selections are close to uniform, and packed
indices take ceil(log2 K) bits whatever their values); the .slot file is the real one, header,
manifest and realistic metadata included. Float32 baselines hold the rebuilt dense weights of the
K=8 model (every dense tensor of the network): torch ``.pt`` state dict, ``.safetensors``, float16
safetensors, and the float32 safetensors compressed with gzip -9, xz -9 and zstd -19. No torch
model is built, so VGG-19 at K=64 costs no more memory than its dense weights.
"""

from __future__ import annotations

import argparse
import gzip
import io
import lzma
import sys
import time

import numpy as np

from benchmarks.common import write_record

KS = (2, 4, 8, 16, 64)


def _slot_bytes(name: str, k: int, rng: np.random.Generator) -> tuple[bytes, dict]:
    from slotpack import arch as A
    from slotpack import data
    from slotpack.format import section_name
    from slotpack.pack import encode_selection

    arch = A.get(name)
    spec = data.spec(arch.dataset)
    indices = [
        rng.integers(0, k, int(np.prod(layer.weight_shape)), dtype=np.uint16)
        for layer in arch.weighted
    ]
    tensors = {}
    for pos, layer in enumerate(arch.layers):
        if isinstance(layer, A.BatchNorm2d):
            tensors[section_name(pos, "running_mean")] = rng.standard_normal(layer.num_features)
            tensors[section_name(pos, "running_var")] = rng.random(layer.num_features) + 0.5
    meta = {
        "model": name,
        "dataset": arch.dataset,
        "epoch": 100,
        "val_acc": 0.9,
        "test_acc": 0.9,
        "config": {
            "model": name,
            "k": k,
            "method": "slot",
            "selection": "greedy",
            "seed": 0,
            "epochs": 100,
            "batch_size": 128,
            "lr": 0.1,
            "momentum": 0.9,
        },
    }
    blob = encode_selection(
        arch,
        seed=0,
        k=k,
        selection="greedy",
        indices=indices,
        tensors=tensors,
        mean=spec.mean,
        std=spec.std,
        metadata=meta,
    )
    return blob, tensors


def _baselines(arrays: dict[str, np.ndarray], compress: bool) -> dict[str, int]:
    import torch
    from safetensors.numpy import save

    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, buf)
    st32 = save(arrays)
    out = {
        "float32_pt": buf.getbuffer().nbytes,
        "float32_safetensors": len(st32),
        "float16_safetensors": len(save({k: v.astype(np.float16) for k, v in arrays.items()})),
    }
    if compress:
        out["float32_gzip9"] = len(gzip.compress(st32, compresslevel=9))
        out["float32_xz9"] = len(lzma.compress(st32, preset=9))
        try:
            import zstandard

            out["float32_zstd19"] = len(zstandard.ZstdCompressor(level=19).compress(st32))
        except ImportError:
            pass  # the bench extra installs zstandard; without it the column stays empty
    return out


def main(argv: list[str] | None = None) -> int:
    from slotpack import arch as A
    from slotpack import format as F
    from slotpack.runtime import rebuild

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(A.ZOO))
    p.add_argument("--k", type=int, nargs="+", default=list(KS))
    p.add_argument("--no-compress", action="store_true", help="skip gzip/xz/zstd (slow for VGG-19)")
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        connections = A.get(name).num_connections
        baseline = None
        for k in args.k:
            t0 = time.perf_counter()
            blob, tensors = _slot_bytes(name, k, np.random.default_rng(k))
            if baseline is None or k == 8:
                arrays = rebuild(F.decode(blob))
                baseline = _baselines(arrays, compress=not args.no_compress)
                baseline["dense_values"] = int(sum(a.size for a in arrays.values()))
            row = {
                "model": name,
                "k": k,
                "connections": connections,
                "slot_bytes": len(blob),
                "slot_gzip9_bytes": len(gzip.compress(blob, 9)),
                "bits_per_connection": 8 * len(blob) / connections,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"{name:12s} K={k:<3d} {len(blob):>12,d} bytes  {row['bits_per_connection']:.3f} bits/conn",
                flush=True,
            )
        rows_for_model = [r for r in rows if r["model"] == name]
        for r in rows_for_model:
            r["baselines"] = baseline
            r["ratio_vs_float32"] = 4 * baseline["dense_values"] / r["slot_bytes"]
    path = write_record("storage", {"kind": "storage", "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

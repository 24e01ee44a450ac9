"""Generator speed, and bit-exactness of the torch half on a device against the numpy half.

    python -m benchmarks.prng_check --device cpu          # this machine
    python -m benchmarks.prng_check --device cuda         # on a lent GPU: CUDA == numpy

Checks (each recorded with its counts): values for several seeds and layers over many counters,
a whole layer bank, selected-only generation, and a slot layer's forward weight and straight-
through score gradient on the device against numpy / float64 references.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _values_synced(key: int, counters, sync):
    from slotpack import prng

    out = prng.values_torch(key, counters, 0.0625)
    sync()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--count", type=int, default=20_000_000, help="counters per seed")
    args = p.parse_args(argv)

    import torch

    from benchmarks.common import write_record
    from slotpack import prng
    from slotpack.layers import SlotConv2d

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    checks, speed = [], {}
    n = args.count
    prng.values_torch(0, torch.arange(4096, device=dev), 1.0)  # warm-up: kernels, allocator
    sync()
    for seed, layer in ((0, 0), (1234567, 3), (2**64 - 1, 17)):
        key = prng.layer_key(seed, layer)
        counters_np = np.arange(n, dtype=np.uint64)
        ref, t_np = _timed(prng.values_np, key, counters_np, 0.0625)
        counters = torch.arange(n, dtype=torch.int64, device=dev)
        sync()
        got, t_dev = _timed(_values_synced, key, counters, sync)
        same = bool(np.array_equal(ref.view(np.uint32), got.cpu().numpy().view(np.uint32)))
        checks.append({"what": f"values seed={seed} layer={layer}", "count": n, "identical": same})
        speed[f"numpy_values_per_s_seed{seed}"] = n / t_np
        speed[f"torch_{dev.type}_values_per_s_seed{seed}"] = n / t_dev

    bound = prng.glorot_bound(512 * 9, 512 * 9)
    n_conn, k = 512 * 512 * 9, 8
    bank_ref = prng.bank_np(5, 12, n_conn, k, bound)
    bank_dev = prng.bank_torch(5, 12, n_conn, k, bound, dev)
    checks.append(
        {
            "what": "VGG-19 512x512x3x3 bank, K=8",
            "count": n_conn * k,
            "identical": bool(np.array_equal(bank_ref, bank_dev.cpu().numpy())),
        }
    )
    idx = np.random.default_rng(0).integers(0, k, n_conn)
    sel_ref = prng.selected_np(5, 12, idx, k, bound)
    sel_dev = prng.selected_torch(5, 12, torch.from_numpy(idx).to(dev), k, bound)
    checks.append(
        {
            "what": "selected-only generation",
            "count": n_conn,
            "identical": bool(np.array_equal(sel_ref, sel_dev.cpu().numpy())),
        }
    )

    layer = SlotConv2d(64, 128, 3, 8, seed=9, layer=4, padding=1, device=dev)
    w = layer.weight()
    w_ref = prng.selected_np(9, 4, layer.scores.argmax(1).cpu().numpy(), 8, layer.bound)
    checks.append(
        {
            "what": "SlotConv2d greedy weight",
            "count": w.numel(),
            "identical": bool(np.array_equal(w.detach().cpu().numpy().reshape(-1), w_ref)),
        }
    )
    x = torch.randn(4, 64, 16, 16, device=dev)
    out = layer(x)
    r = torch.randn_like(out)
    (out * r).sum().backward()
    w64 = w.detach().double().cpu().requires_grad_(True)
    out64 = torch.nn.functional.conv2d(x.double().cpu(), w64, None, 1, 1)
    (out64 * r.double().cpu()).sum().backward()
    bank64 = prng.bank_np(9, 4, w.numel(), 8, layer.bound).astype(np.float64)
    expected = w64.grad.reshape(-1, 1).numpy() * bank64
    err = np.abs(layer.scores.grad.double().cpu().numpy() - expected).max() / np.abs(expected).max()
    checks.append(
        {
            "what": "straight-through score gradient vs float64",
            "count": expected.size,
            "relative_max_error": float(err),
            "identical": bool(err < 1e-4),
        }
    )

    for c in checks:
        print(f"{'OK ' if c['identical'] else 'BAD'} {c['what']} ({c['count']:,})")
    for name, v in speed.items():
        print(f"{name}: {v / 1e6:.1f} M/s")
    path = write_record(
        f"prng_{dev.type}", {"kind": "prng", "device": str(dev), "checks": checks, "speed": speed}
    )
    print(f"wrote {path}")
    return 0 if all(c["identical"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A lean slot layer's selection and score gradient: fused Triton kernels against torch ops.

    python -m benchmarks.kernel_speed --device cuda

For VGG-19's largest layer (512 x 512 x 3 x 3 = 2,359,296 connections) at each K, times the lean
forward (argmax of the scores, then the selected value per connection) and backward (the [n, K]
score gradient) through ``layers._SelectLean``, exactly what training runs, once with the torch
ops of ``prng`` and once with the kernels of ``slotpack/kernels.py``; checks that both give the
same bits, and records the peak memory each allocates beyond its inputs and outputs. Medians of
``--repeats`` runs after warm-up (CUDA events). Where the kernels cannot run (no CUDA, or they
fail their self-check) only the torch rows are recorded, with the reason.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from benchmarks.common import write_record

N_VGG = 512 * 512 * 9


def _time_ms(fn, repeats: int, dev) -> float:
    import time

    import torch

    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_extra_mib(fn, dev) -> float | None:
    """Peak CUDA memory ``fn`` allocates beyond what is live before it (None on CPU)."""
    import torch

    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def measure(n: int, k: int, score_dtype: str, fused: bool, dev, repeats: int) -> dict[str, Any]:
    import torch

    from slotpack import layers, prng

    seed, layer = 0, 15
    bound = prng.glorot_bound(512 * 9, 512 * 9)
    gen = torch.Generator(device=dev).manual_seed(k)
    dtype = layers.score_torch_dtype(score_dtype)
    scores = torch.rand((n, k), generator=gen, device=dev).to(dtype).requires_grad_()
    grad_w = torch.randn(n, generator=gen, device=dev)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            index = None if fused else scores.argmax(1)
            return layers._SelectLean.apply(scores, index, seed, layer, bound, None, fused)

    def both() -> torch.Tensor:
        index = None if fused else scores.detach().argmax(1)
        w = layers._SelectLean.apply(scores, index, seed, layer, bound, None, fused)
        return torch.autograd.grad(w, scores, grad_w)[0]

    w, grad = forward(), both()  # warm-up (compiles the kernels) and the outputs to compare
    for _ in range(2):
        forward(), both()
    forward_ms = _time_ms(forward, repeats, dev)
    both_ms = _time_ms(both, repeats, dev)
    return {
        "n": n,
        "k": k,
        "score_dtype": score_dtype,
        "kernel": "triton" if fused else "torch",
        "forward_ms": forward_ms,
        "backward_ms": both_ms - forward_ms,
        "forward_backward_ms": both_ms,
        "peak_extra_mib": _peak_extra_mib(both, dev),
        "outputs": (w, grad),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from slotpack import kernels

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--k", type=int, nargs="+", default=[8, 64])
    p.add_argument("--n", type=int, default=N_VGG, help="connections (default: VGG-19's largest)")
    p.add_argument("--score-dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--name", default=None, help="record name (default kernel_speed_<device>)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    for k in args.k:
        why = None if kernels.supported(dev) else f"the kernels do not run on {dev.type}"
        try:
            if why is None:
                kernels.self_check(dev, k)
        except Exception as e:  # noqa: BLE001 - recorded, and the torch rows still run
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        for score_dtype in args.score_dtypes:
            torch_row = measure(args.n, k, score_dtype, False, dev, args.repeats)
            pair = [torch_row]
            if why is None:
                fused = measure(args.n, k, score_dtype, True, dev, args.repeats)
                a, b = torch_row["outputs"], fused["outputs"]
                fused["identical"] = all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
                fused["speedup"] = torch_row["forward_backward_ms"] / fused["forward_backward_ms"]
                pair.append(fused)
            else:
                torch_row["kernels_unavailable"] = why
            for row in pair:
                row.pop("outputs")
                rows.append(row)
                print(
                    f"K={k:<3d} {score_dtype:8s} {row['kernel']:6s} forward {row['forward_ms']:8.3f}"
                    f" ms  backward {row['backward_ms']:8.3f} ms"
                    + (f"  x{row['speedup']:.1f}" if "speedup" in row else "")
                    + (f"  identical={row['identical']}" if "identical" in row else "")
                    + (f"  ({row['kernels_unavailable']})" if "kernels_unavailable" in row else "")
                )
    name = args.name or f"kernel_speed_{dev.type}"
    record = {"kind": "kernel_speed", "device": dev.type, "rows": rows}
    record["interpreter"] = kernels.interpreting()  # Triton's CPU interpreter: a check, not a speed
    print(f"wrote {write_record(name, record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

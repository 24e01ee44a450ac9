"""Training step time and peak memory: slotpack's slot layers against the reference approach.

    python -m benchmarks.step_time --models lenet300100 conv6 --k 8 --device cpu

Each (model, implementation) runs once in its own process so that peak memory is its own: the
peak over the timed steps (the peak counter is reset once the model is built, so generating the
bank does not count) minus the memory in use before the model was built; on CPU resident set
size (VmHWM after a reset through /proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated.
Two steps of the dense twin run first, so that loading kernels is not counted, and the child
runs with a fixed glibc mmap threshold, so freed tensors leave the resident set (its standalone
times are slower for it; the ``median_ms`` times come from the parent, without it). Step times then come from one process in which the
implementations take turns step by step (``median_ms``), because this 2-core machine's speed
drifts by up to 4x between runs; the standalone medians are kept as ``alone_median_ms``. A step is forward + backward + SGD(momentum) on a batch of
random images (never zeros). Implementations: ``slotpack`` (gather + straight-through),
``lean`` (slotpack's lean mode: no stored bank, values regenerated in forward and backward;
on CUDA by the fused Triton kernels of slotpack/kernels.py, elsewhere by torch ops),
``lean-torch`` (lean forced onto the torch ops, to measure what the kernels buy on CUDA),
``lean+sib`` (lean, and the SGD step applied per layer inside the backward pass, so the full
score gradient never exists), ``lean+sib+bf16`` (the same with bfloat16 scores and momentum,
stochastically rounded), ``reference`` (benchmarks/reference_slot.py: sum(weight * one_hot, -1)), ``learned`` (the dense
float32 twin, for scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

IMPLS = ("slotpack", "lean", "lean-torch", "lean+sib", "lean+sib+bf16", "reference", "learned")
_SLOT_OPTIONS = {  # slot implementations: (models.create options, step inside backward, kernel)
    "slotpack": ({}, False, "auto"),
    "lean": ({"lean": True}, False, "auto"),
    "lean-torch": ({"lean": True}, False, "torch"),
    "lean+sib": ({"lean": True}, True, "auto"),
    "lean+sib+bf16": ({"lean": True, "score_dtype": "bfloat16"}, True, "auto"),
}


def _slot_options(impl: str) -> tuple[dict, bool, str]:
    """(models.create options, step inside backward, kernel); the defaults for reference and learned."""
    return _SLOT_OPTIONS.get(impl, ({}, False, "auto"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_env() -> dict[str, str]:
    """Environment of the memory-measuring child: glibc returns every block over 64 KiB to the
    OS at once (no dynamic mmap threshold), so the resident set follows the live tensors."""
    import os

    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _build(model_name: str, impl: str, k: int, dev, x):
    """(model, optimizer, max |reference - slotpack| logits or None) for one implementation."""
    import torch

    from benchmarks.reference_slot import to_reference
    from slotpack import layers, models, optim

    method = "learned" if impl == "learned" else "slot"
    options, in_backward, kernel = _slot_options(impl)
    model = models.create(model_name, k, method=method, seed=0, device=dev, **options)
    layers.set_kernel(model, kernel)
    check = None
    if impl == "reference":
        ours = model
        model = to_reference(models.create(model_name, k, seed=0, device=dev))
        model.eval(), ours.eval()
        with torch.no_grad():
            check = (model(x) - ours(x)).abs().max().item()  # same function, different mechanics
        del ours
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.sgd(params, lr=0.1, momentum=0.9, weight_decay=0.0, in_backward=in_backward)
    return model, opt, check


def _timed_step(model, opt, x, y, amp: bool) -> float:
    """Milliseconds of one forward + backward + SGD step (device events on CUDA)."""
    import torch
    import torch.nn.functional as F

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and x.is_cuda):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _inputs(model_name: str, batch: int, dev):
    import torch

    from slotpack import arch

    torch.manual_seed(0)
    x = torch.randn(batch, *arch.get(model_name).input_shape, device=dev)
    return x, torch.randint(0, 10, (batch,), device=dev)


def measure_one(
    model_name: str, impl: str, k: int, device: str, batch: int, steps: int, warmup: int, amp: bool
) -> dict:
    """Peak memory (and standalone step time) of one implementation in a fresh process."""
    import torch

    dev = torch.device(device)
    x, y = _inputs(model_name, batch, dev)
    # A few steps of the dense twin first, so that loading kernels and libraries (hundreds of MiB
    # of resident pages on CPU) is not counted as the implementation's memory.
    warm, warm_opt, _ = _build(model_name, "learned", k, dev, x)
    for _ in range(2):
        _timed_step(warm, warm_opt, x, y, amp)
    del warm, warm_opt
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    model, opt, check = _build(model_name, impl, k, dev, x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    times = [_timed_step(model, opt, x, y, amp) for _ in range(warmup + steps)][warmup:]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mb()
    return {
        "model": model_name,
        "impl": impl,
        "k": k,
        "device": device,
        "batch": batch,
        "steps": steps,
        "amp": amp and dev.type == "cuda",
        "alone_median_ms": statistics.median(times),
        "peak_mib": peak - base,
        "reference_max_abs_diff": check,
        "kernel": _kernel_used(impl, dev, k),
    }


def _kernel_used(impl: str, dev, k: int) -> str | None:
    """What a lean implementation ran on ``dev``: "triton" or "torch" (None when not lean)."""
    from slotpack import kernels

    options, _, kernel = _slot_options(impl)
    return kernels.resolve(kernel, dev, k) if options.get("lean") else None


def interleaved(
    model_name: str,
    impls: list[str],
    k: int,
    device: str,
    batch: int,
    steps: int,
    warmup: int,
    amp: bool,
) -> dict[str, list[float]]:
    """Step times with the implementations taking turns step by step, in one process.

    This machine's CPU speed drifts by up to 4x between runs of the same process; taking turns
    puts every implementation under the same conditions, so their ratio is what is measured.
    """
    import torch

    dev = torch.device(device)
    x, y = _inputs(model_name, batch, dev)
    built = {impl: _build(model_name, impl, k, dev, x)[:2] for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for i in range(warmup + steps):
        for impl, (model, opt) in built.items():
            ms = _timed_step(model, opt, x, y, amp)
            if i >= warmup:
                times[impl].append(ms)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["lenet300100", "conv6"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--k", type=int, nargs="+", default=[8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help="record name (default step_time_<device>)")
    args = p.parse_args(argv)
    if args.one:
        r = measure_one(
            args.models[0],
            args.impls[0],
            args.k[0],
            args.device,
            args.batch,
            args.steps,
            args.warmup,
            args.amp,
        )
        print(json.dumps(r))
        return 0
    rows = []
    for model in args.models:
        for k in args.k:
            for impl in args.impls:
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.step_time",
                    "--one",
                    "--models",
                    model,
                    "--impls",
                    impl,
                    "--k",
                    str(k),
                    "--device",
                    args.device,
                    "--batch",
                    str(args.batch),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ]
                if args.amp:
                    cmd.append("--amp")
                out = subprocess.run(cmd, capture_output=True, text=True, env=_memory_env())
                if out.returncode != 0:
                    tail = (out.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{model} K={k} {impl}: failed ({tail})", file=sys.stderr)
                    rows.append({"model": model, "impl": impl, "k": k, "error": tail})
                    continue
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            ok = [
                r["impl"]
                for r in rows
                if r.get("model") == model and r["k"] == k and "error" not in r
            ]
            times = interleaved(
                model, ok, k, args.device, args.batch, args.steps, args.warmup, args.amp
            )
            for row in rows:
                if row.get("model") == model and row["k"] == k and row["impl"] in times:
                    t = times[row["impl"]]
                    row.update(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t))
                    print(
                        f"{model:12s} K={k:<3d} {row['impl']:10s} {row['median_ms']:9.2f} ms/step "
                        f"(alone {row['alone_median_ms']:.2f})  peak +{row['peak_mib']:8.1f} MiB",
                        flush=True,
                    )
    from benchmarks.common import write_record

    path = write_record(
        args.name or f"step_time_{args.device}", {"kind": "step_time", "rows": rows}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

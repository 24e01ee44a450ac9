"""Structure-aware fuzzing of every reader path of ``.slot`` files (issue 15).

    python -m benchmarks.fuzz_slot --files 10000 --seed 15 --workers 2
    python -m benchmarks.fuzz_slot --reproduce 15:1234 [--keep case.slot]

Files come from ``fuzz_grammar.generate``: built from the grammar of docs/FORMAT.md §2, most of
them valid or one mutation from valid, so the deep paths run, the rest hostile. Every file goes
through every reader path (``fuzz_checks.check_case``): ``inspect --verify`` and ``inspect``,
``rebuild``, ``unpack`` to .npz, dense and self-decoding ``export``, ``eval`` of the ``.slot``
file and of the self-decoding ``.onnx`` file on synthetic images in onnxruntime. Each must
succeed consistently or raise ``SlotFormatError`` (another ``SlotpackError`` where a valid file
is not supported), never anything else.

Worker processes check batches of files under an address-space limit (RLIMIT_AS), a CPU-time
limit per file (ITIMER_PROF) and a wall-clock watchdog in the parent; a worker that breaks a
limit or dies is replaced. A timeout on a file whose manifest declares more work than ``HEAVY``
generator outputs (connections x K under the argmax and draw rules) counts as "heavy", not as a
failure: what a reader may spend is bounded by the declaration, not the file size. The record
(kind "fuzz") counts outcomes per path, times per file and lists every failure with the case
name (``seed:index``) that regenerates it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.fuzz_checks import HEAVY, PATHS, check_case, declared_work, outcome
from benchmarks.fuzz_grammar import Case, generate, parse_name

__all__ = ["Case", "HEAVY", "PATHS", "check_case", "declared_work", "generate", "run", "section"]

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ workers


def _heavy(record: dict[str, Any], work: int | None) -> None:
    """A timeout on a file that declares much is not a broken promise: mark it "heavy"."""
    record["declared_work"] = work
    if work is not None and work > HEAVY:
        record["outcome"] = "heavy"


class CpuLimit(BaseException):
    """A file used its CPU time (a BaseException, so no handler under test can swallow it)."""


def _raise_cpu_limit(signum, frame):
    raise CpuLimit()


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_case(name: str, work: Path, cpu_limit: float, images: int = 3) -> dict[str, Any]:
    """Generate and check one case under the CPU limit (the caller installs the handler)."""
    t0 = time.perf_counter()
    try:
        case = generate(*parse_name(name))
    except Exception as exc:  # the fuzzer's own bug: reported as such, never as the reader's
        error = "".join(traceback.format_exception(exc)[-4:])[-1500:]
        return {"case": name, "outcome": "generator", "paths": {},
                "failures": [{"path": "generate", "error": error}]}  # fmt: skip
    gen_s = time.perf_counter() - t0
    folder = work / name.replace(":", "_")
    folder.mkdir()
    path = folder / "case.slot"
    path.write_bytes(case.data)
    declared = declared_work(case.data)
    cpu0, wall0 = _cpu(), time.perf_counter()
    record: dict[str, Any] = {
        "case": name, "kind": case.kind, "version": case.version, "mutations": case.mutations,
        "expect": case.expect, "bytes": len(case.data), "generate_s": round(gen_s, 4),
    }  # fmt: skip
    signal.setitimer(signal.ITIMER_PROF, cpu_limit)
    try:
        record.update(check_case(case, path, folder, images=images))
        record["outcome"] = outcome(record)
    except CpuLimit:
        record.update(outcome="timeout", paths={}, failures=[
            {"path": "?", "error": f"over {cpu_limit} s of CPU time"}])  # fmt: skip
        _heavy(record, declared)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    record.setdefault("declared_work", declared)
    record["cpu_s"] = round(_cpu() - cpu0, 4)
    record["wall_s"] = round(time.perf_counter() - wall0, 4)
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return record


def worker(cpu_limit: float, memory_mib: int, work: Path, images: int) -> int:
    """Read case names on stdin, write one JSON result per line; exit after a CPU timeout."""
    import resource

    import onnx  # noqa: F401 - imported before the limit, as in a CLI run
    import onnxruntime  # noqa: F401

    import slotpack.converters.onnx  # noqa: F401
    import slotpack.inspect  # noqa: F401
    import slotpack.runtime  # noqa: F401

    limit = memory_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGPROF, _raise_cpu_limit)
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the results
    results.write("ready\n")
    for line in sys.stdin:
        record = run_case(line.strip(), work, cpu_limit, images)
        results.write(json.dumps(record) + "\n")
        if record["outcome"] in ("timeout", "heavy"):
            return 0  # a fresh worker for the next file: this one was interrupted anywhere
    return 0


class _Worker:
    def __init__(self, args: list[str], log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "MALLOC_ARENA_MAX": "2"}  # fmt: skip
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fuzz_slot", "--worker", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT, env=env,
            text=True, bufsize=1,
        )  # fmt: skip
        if self._line(120) != "ready":
            raise RuntimeError(f"fuzz worker did not start (see {log})")

    def _line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline().strip()

    def ask(self, name: str, timeout: float) -> dict[str, Any]:
        try:
            self.proc.stdin.write(name + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._line(timeout)
        if line is None:
            self.stop()
            return {
                "case": name,
                "outcome": "timeout",
                "paths": {},
                "failures": [
                    {"path": "?", "error": f"no result within {timeout} s wall (worker killed)"}
                ],
            }
        if not line:
            code = self.proc.wait()  # the worker died: a signal (negative) or an exit status
            return {
                "case": name,
                "outcome": "crash",
                "paths": {},
                "failures": [{"path": "?", "error": f"worker died with exit status {code}"}],
            }
        result = json.loads(line)
        if result["outcome"] in ("timeout", "heavy"):
            self.proc.wait(60)  # it exits after a CPU timeout; the caller starts another
        return result

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def run(
    files: int,
    seed: int,
    *,
    workers: int = 2,
    cpu_limit: float = 2.0,
    wall_limit: float = 10.0,
    memory_mib: int = 1024,
    images: int = 3,
    start: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Check files ``start..start+files-1`` of run ``seed`` in ``workers`` processes; the record."""
    names = [f"{seed}:{i}" for i in range(start, start + files)]
    results: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    queue = iter(names)
    restarts = Counter()
    load = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz_slot.") as tmp:
        args = ["--cpu-limit", str(cpu_limit), "--memory-mib", str(memory_mib),
                "--images", str(images), "--tmp", tmp]  # fmt: skip

        def loop(number: int) -> None:
            log = Path(tmp) / f"worker{number}.log"
            w = _Worker(args, log)
            while True:
                with lock:
                    name = next(queue, None)
                if name is None:
                    break
                if not w.alive():
                    w.stop()
                    w = _Worker(args, log)
                    restarts[number] += 1
                r = w.ask(name, wall_limit)
                if r["outcome"] in ("timeout", "heavy", "crash"):
                    r["log"] = log.read_text(errors="replace")[-1500:]
                    for p in Path(tmp).glob(name.replace(":", "_") + "/*"):
                        p.unlink()
                with lock:
                    results[name] = r
                    if progress and len(results) % 100 == 0:
                        rate = len(results) / (time.perf_counter() - t0)
                        print(f"{len(results)}/{files} files, {rate:.1f}/s", file=sys.stderr)
            w.stop()

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - t0
    return summarise([results[n] for n in names], seed=seed, start=start, elapsed=elapsed,
                     limits={"cpu_s": cpu_limit, "wall_s": wall_limit,
                             "address_space_mib": memory_mib},
                     workers=workers, restarts=sum(restarts.values()),
                     load=(load, os.getloadavg()))  # fmt: skip


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 4),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
        "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 4),
        "max": round(ordered[-1], 4),
    }


def summarise(results: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    """The record's payload: counts per outcome, per path, per mutation; times; failures."""
    paths = {p: Counter() for p in PATHS}
    classes = {p: Counter() for p in PATHS}
    expectations, mutations, accepted_after, notes = Counter(), Counter(), Counter(), Counter()
    for r in results:
        for p, o in r["paths"].items():
            paths[p][o.split(":")[0]] += 1
            if ":" in o:
                classes[p][o] += 1
        if r.get("expect") and r["outcome"] in ("accepted", "refused", "failed"):
            agree = r["outcome"] != "failed" or not any(
                f["error"].startswith("the generator") for f in r["failures"]
            )
            expectations[f"{r['expect']}_{'agree' if agree else 'disagree'}"] += 1
        elif r["outcome"] in ("accepted", "refused", "failed"):
            expectations["unknown"] += 1
        for m in r.get("mutations", []):
            mutations[m] += 1
            if r["outcome"] == "accepted":
                accepted_after[m] += 1
        notes.update(r.get("notes", {}))
    failures = [
        {k: r.get(k) for k in ("case", "kind", "mutations", "outcome", "failures", "log") if k in r}
        for r in results
        if r["outcome"] in ("failed", "timeout", "crash", "generator")
    ]
    timed = [r for r in results if "cpu_s" in r and r["outcome"] not in ("timeout", "heavy")]
    heavy = [
        {k: r.get(k) for k in ("case", "mutations", "declared_work", "cpu_s", "wall_s")}
        for r in results
        if r["outcome"] == "heavy"
    ]
    return {
        "kind": "fuzz",
        **{k: v for k, v in info.items() if k not in ("elapsed", "load")},
        "files": len(results),
        "kinds": dict(Counter(r.get("kind", "?") for r in results)),
        "versions": dict(Counter(str(r.get("version", "?")) for r in results)),
        "outcomes": dict(Counter(r["outcome"] for r in results)),
        "paths": {p: dict(c) for p, c in paths.items()},
        "path_errors": {p: dict(c.most_common()) for p, c in classes.items() if c},
        "expectations": dict(expectations),
        "mutations": dict(mutations.most_common()),
        "accepted_after_mutation": dict(accepted_after.most_common()),
        "checks": dict(notes),
        "cpu_s_per_file": _stats([r["cpu_s"] for r in timed]),
        "wall_s_per_file": _stats([r["wall_s"] for r in timed]),
        "over_2s_wall": sum(r.get("wall_s", 0) > 2 for r in results),
        "bytes_per_file": _stats([r["bytes"] for r in results if "bytes" in r]),
        "elapsed_s": round(info.get("elapsed", 0.0), 1),
        "load_average": [list(x) for x in info.get("load", ())],
        "heavy": heavy[:20],
        "failure_count": len(failures),
        "failures": failures[:50],
    }


# ------------------------------------------------------------------------------ RESULTS.md


def section(records: list[dict[str, Any]]) -> list[str]:
    """The RESULTS.md section for records of kind "fuzz" (markdown lines)."""
    if not records:
        return []
    out = [
        "## Hostile files: structure-aware fuzzing",
        "",
        "`benchmarks/fuzz_slot.py` builds `.slot` files from the grammar of docs/FORMAT.md (random "
        "networks, per-layer K and reference rules, bits and delta sections), most of them valid "
        "or one mutation from valid, and runs each through every reader path in a worker under "
        "an address-space limit, a CPU-time limit per file and a wall-clock watchdog. A path "
        "passes when it succeeds with a consistent result (arrays, .npz, graph weights, "
        "onnxruntime against numpy, self-decoding against dense) or refuses the file with "
        "`SlotFormatError` (`unsupported`: another `SlotpackError`, for valid files a path does "
        "not support). Anything else is a failure. `heavy`: a timeout on a file whose manifest "
        f"declares more than {HEAVY:,} generator outputs (a reader's work is bounded by the "
        "declaration, not by the file's size: docs/GUARANTEES.md). Times are per file, all "
        "paths, generation excluded.",
        "",
        "| record | files | accepted | refused | heavy | failures | CPU s (median / max) | "
        "wall s (median / max) | limits |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in records:
        o, c, w, lim = r["outcomes"], r["cpu_s_per_file"], r["wall_s_per_file"], r["limits"]
        out.append(
            f"| `{r['name']}` (seed {r['seed']}) | {r['files']:,} | {o.get('accepted', 0):,} | "
            f"{o.get('refused', 0):,} | {o.get('heavy', 0)} | {r['failure_count']} | "
            f"{c['median']:.3f} / {c['max']:.2f} | "
            f"{w['median']:.3f} / {w['max']:.2f} | {lim['cpu_s']:g} s CPU, {lim['wall_s']:g} s "
            f"wall, {lim['address_space_mib']:,} MiB |"
        )
    out += ["", "| path | ok | refused | unsupported | skipped | failed |",
            "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    last = records[-1]
    for p in PATHS:
        c = last["paths"].get(p, {})
        out.append(
            f"| {p} | {c.get('ok', 0):,} | {c.get('refused', 0):,} | {c.get('unsupported', 0):,} "
            f"| {c.get('skipped', 0):,} | {c.get('failed', 0)} |"
        )
    e = last["expectations"]
    out += [
        "",
        f"In `{last['name']}`, the generator knew the verdict of "
        f"{e.get('valid_agree', 0) + e.get('valid_disagree', 0):,} files as valid and "
        f"{e.get('invalid_agree', 0) + e.get('invalid_disagree', 0):,} as invalid; the reader "
        f"disagreed on {e.get('valid_disagree', 0) + e.get('invalid_disagree', 0)}. "
        f"Indices of {last['checks'].get('indices_checked', 0):,} layers were compared with the "
        f"generator's, and {last['checks'].get('numpy_compared', 0):,} onnxruntime runs with "
        f"numpy, {last['checks'].get('self_decoding_compared', 0):,} self-decoding graphs with "
        f"dense ones.",
        "",
        *[f"- `{r['name']}`: `{r['command']}`, {r['date']}, commit {r['commit']}" for r in records],
        "",
    ]
    return out


# ------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--start", type=int, default=0, help="first file index")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpu-limit", type=float, default=2.0, help="CPU seconds per file")
    parser.add_argument("--wall-limit", type=float, default=10.0, help="watchdog, s per file")
    parser.add_argument("--memory-mib", type=int, default=1024, help="RLIMIT_AS of a worker")
    parser.add_argument("--images", type=int, default=3, help="synthetic images per eval")
    parser.add_argument("--name", default="fuzz_slot", help="record name under results/")
    parser.add_argument("--reproduce", metavar="SEED:INDEX", help="check one case, in-process")
    parser.add_argument("--keep", type=Path, help="with --reproduce: write the file here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.cpu_limit, args.memory_mib, args.tmp, args.images)
    if args.reproduce:
        case = generate(*parse_name(args.reproduce))
        if args.keep:
            args.keep.write_bytes(case.data)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "case.slot"
            path.write_bytes(case.data)
            result = check_case(case, path, Path(tmp), images=args.images)
        info = {
            "case": case.name,
            "kind": case.kind,
            "version": case.version,
            "mutations": case.mutations,
            "expect": case.expect,
            "bytes": len(case.data),
        }
        print(json.dumps({**info, **result}, indent=2))  # fmt: skip
        return 1 if result["failures"] else 0
    from benchmarks.common import write_record

    payload = run(
        args.files, args.seed, workers=args.workers, cpu_limit=args.cpu_limit,
        wall_limit=args.wall_limit, memory_mib=args.memory_mib, images=args.images,
        start=args.start, progress=True,
    )  # fmt: skip
    path = write_record(args.name, payload)
    print(f"{payload['files']} files: {payload['outcomes']}; {payload['failure_count']} failures")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

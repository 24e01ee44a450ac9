"""Hostile .slot files (issue 15): generated files through every reader path, and the issue's
reader probes through the CLI.

The generator and the checks are the fuzzer's (benchmarks/fuzz_slot.py, whose record covers
20,000 files): here a few hundred files run in-process, a few in its worker processes (address-
space limit, CPU limit per file, watchdog), and each probe of the issue once, built in the test.
"""

import itertools
import json
import os
import string
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks import fuzz_slot
from benchmarks.fuzz_checks import HEAVY, check_case, declared_work, outcome
from benchmarks.fuzz_grammar import generate, header
from slotpack import arch as A
from slotpack import bits as B
from slotpack import format as F
from slotpack.cli import main
from slotpack.pack import encode_selection
from slotpack.runtime import rebuild
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
SEED = 1515  # the suite's run of the generator; the benchmark record uses another


# ----------------------------------------------------------------------------- files


def mnist_file(layers: list, *, k: int = 2, encoding: str = "bits") -> bytes:
    """A valid version 2 file of ``layers`` on MNIST-shaped input, every index 0."""
    arch = A.Arch("probe", "mnist", (1, 28, 28), tuple(layers))
    return encode_selection(
        arch, seed=15, k=k, selection="greedy",
        indices=[np.zeros(int(np.prod(w.weight_shape)), int) for w in arch.weighted],
        tensors={}, mean=(0.1307,), std=(0.3081,), metadata={"dataset": "mnist"},
        index_encoding=encoding,
    )  # fmt: skip


def parts(data: bytes) -> tuple[dict, bytes]:
    m_len = int.from_bytes(data[12:16], "little")
    return json.loads(data[32 : 32 + m_len]), data[32 + -(-m_len // 8) * 8 :]


def assemble(text: bytes, payload: bytes) -> bytes:
    """A version 2 file around manifest bytes, lengths and CRCs correct."""
    return header(2, text, payload) + text + bytes(-len(text) % 8) + payload


def canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def cli(*args) -> SimpleNamespace:
    """``slotpack *args`` in-process, with the CPU seconds it took."""
    start = time.process_time()
    result = CliRunner().invoke(main, [str(a) for a in args])
    return SimpleNamespace(
        exit_code=result.exit_code, output=result.output, cpu=time.process_time() - start
    )


def refused_everywhere(path: Path, tmp_path: Path, mnist_root: Path, *needles: str) -> None:
    """Every reading command refuses ``path`` in one line naming ``needles``, within 2 s CPU."""
    for args in (
        ["inspect", "--verify", path],
        ["inspect", path],
        ["unpack", path, "-o", tmp_path / "out.npz"],
        ["export", path, "-o", tmp_path / "out.onnx"],
        ["export", "--self-decoding", path, "-o", tmp_path / "sd.onnx"],
        ["pack", path, "-o", tmp_path / "out.slot"],
        ["eval", path, "--dataset", "mnist", "--limit", 50, "--root", mnist_root],
    ):
        result = cli(*args)
        one_line_error(result, *needles)
        assert result.cpu < 2, (args, result.cpu)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob("sd*"))


# ----------------------------------------------------------------------------- generated files


@pytest.mark.parametrize("chunk", range(5))
def test_generated_files_keep_every_promise(chunk, tmp_path):
    """50 generated files per chunk through every reader path in-process: each path succeeds
    consistently or raises SlotFormatError (another SlotpackError where unsupported), all paths
    agree, and the reader agrees with the generator wherever the spec decides."""
    outcomes, failures = Counter(), []
    for index in range(50 * chunk, 50 * chunk + 50):
        case = generate(SEED, index)
        if (declared_work(case.data) or 0) > HEAVY:  # its time is bounded by what it declares
            outcomes["heavy"] += 1
            continue
        path = tmp_path / "case.slot"
        path.write_bytes(case.data)
        result = check_case(case, path, tmp_path)
        outcomes[outcome(result)] += 1
        failures += [(case.name, case.mutations, f) for f in result["failures"]]
    assert not failures, failures[:3]
    assert outcomes["accepted"] >= 10 and outcomes["refused"] >= 10, outcomes


def test_the_generator_is_deterministic_and_varied():
    cases = [generate(SEED, i) for i in range(40)]
    assert [c.data for c in cases] == [generate(SEED, i).data for i in range(40)]
    assert len({c.data for c in cases}) == 40
    assert {c.kind for c in cases} == {"valid", "near", "hostile"}
    assert {c.version for c in cases} == {1, 2}


def test_workers_check_files_under_their_limits():
    """The benchmark's own machinery: worker processes under RLIMIT_AS and a CPU limit."""
    record = fuzz_slot.run(10, SEED, workers=1, start=300)
    assert record["kind"] == "fuzz" and record["files"] == 10
    assert record["failure_count"] == 0, record["failures"]
    assert set(record["outcomes"]) <= {"accepted", "refused", "heavy"}
    assert record["limits"] == {"cpu_s": 2.0, "wall_s": 10.0, "address_space_mib": 1024}
    assert sum(record["paths"]["inspect"].values()) == 10 - record["outcomes"].get("heavy", 0)


def test_a_file_over_its_time_is_a_timeout_and_its_worker_is_replaced():
    record = fuzz_slot.run(2, SEED, workers=1, cpu_limit=1e-3)
    assert record["outcomes"] == {"timeout": 2}, record["outcomes"]
    assert record["restarts"] == 1  # the second file ran in a fresh worker
    assert [f["case"] for f in record["failures"]] == [f"{SEED}:0", f"{SEED}:1"]
    assert "over 0.001 s of CPU time" in record["failures"][0]["failures"][0]["error"]
    record = fuzz_slot.run(1, SEED, workers=1, wall_limit=0.01)  # the watchdog
    assert record["outcomes"] == {"timeout": 1}
    assert "worker killed" in record["failures"][0]["failures"][0]["error"]


# ----------------------------------------------------------------------------- issue 15 probes


def test_item_1_many_keys_and_one_duplicate_are_refused_in_linear_time(tmp_path, mnist_root):
    """A ~950 KB manifest of 110,000 distinct keys plus one duplicate (it took 356 s)."""
    manifest, payload = parts(mnist_file([A.Flatten(), A.Linear(784, 10)]))
    alphabet = string.digits + string.ascii_letters
    keys = ["".join(t) for t in itertools.islice(itertools.product(alphabet, repeat=3), 110_000)]
    manifest["metadata"] = {key: i % 20 for i, key in enumerate(keys)}
    text = canonical(manifest).replace(b'"metadata":{', b'"metadata":{"000":1,', 1)
    assert 900_000 < len(text) <= F.MAX_MANIFEST_BYTES
    path = tmp_path / "keys.slot"
    path.write_bytes(assemble(text, payload))
    refused_everywhere(path, tmp_path, mnist_root, "duplicate keys ['000']")
    with pytest.raises(F.ManifestError, match="duplicate keys"):
        rebuild(path)


def test_item_3_a_symlink_to_dev_zero_is_refused(tmp_path, mnist_root):
    path = tmp_path / "zero.slot"
    path.symlink_to("/dev/zero")
    refused_everywhere(path, tmp_path, mnist_root, "zero.slot")  # pack: "no checkpoint at"
    one_line_error(cli("inspect", "--verify", path), "zero.slot: not a regular file")


CAPPED_CLI = """
import json, resource, sys, time, traceback
import numpy, onnx, onnxruntime  # imported before the limit, as in tests.helpers.run_capped
import slotpack.cli, slotpack.converters.onnx, slotpack.data, slotpack.runtime
from click.testing import CliRunner

def size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

limit = size() + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = []
for args in json.loads(sys.argv[2]):
    start = time.process_time()
    r = CliRunner().invoke(slotpack.cli.main, args)
    text = r.output
    if r.exit_code not in (0, 2) and r.exc_info:
        text += "".join(traceback.format_exception(*r.exc_info))
    out.append((r.exit_code, text, time.process_time() - start))
print(json.dumps(out))
"""


def reading_commands(path: Path, out: Path, mnist_root: Path) -> list[list]:
    return [
        ["inspect", "--verify", path],
        ["unpack", path, "-o", out / "out.npz"],
        ["export", path, "-o", out / "out.onnx"],
        ["pack", path, "-o", out / "out.slot"],
        ["eval", path, "--dataset", "mnist", "--limit", 300, "--root", mnist_root],
    ]


def sparse_6_gib(path: Path) -> None:
    path.write_bytes(mnist_file([A.Flatten(), A.Linear(784, 10)]))
    os.truncate(path, 6 << 30)
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse: no disk used


def declares_2_31_connections(path: Path) -> None:
    """A valid file of a few hundred bytes (an empty delta section: nothing changed) whose one
    layer has 2^31 connections."""
    manifest, _ = parts(mnist_file([A.Flatten(), A.Linear(784, 10)], encoding="delta"))
    manifest["input"]["shape"] = [1, 1, 1 << 26]
    manifest["layers"][1].update(in_features=1 << 26, out_features=32)
    manifest["num_classes"] = 32
    manifest["sections"][0].update(shape=[1 << 31], length=0, crc32=0, changes=0)
    path.write_bytes(assemble(canonical(manifest), b""))
    assert path.stat().st_size < 1024 and F.read(path).weights[0].count == 1 << 31


def too_wide_for_a_batch(path: Path) -> None:
    """Padding 5,800 at dilation 2,900: 34M values per image, within the reader's bounds."""
    layers = [A.Conv2d(1, 1, 3), A.AvgPool2d(26, 26), A.Flatten(), A.Linear(1, 10)]
    manifest, payload = parts(mnist_file(layers))
    side = 28 + 2 * 5800 - 2 * 2900
    manifest["layers"][0].update(padding=5800, dilation=2900)
    manifest["layers"][1].update(kernel_size=side, stride=side)
    path.write_bytes(assemble(canonical(manifest), payload))


CAPPED_FILES = {
    "f.slot": lambda path: os.mkfifo(path),
    "sparse.slot": sparse_6_gib,
    "much.slot": declares_2_31_connections,
    "wide.slot": too_wide_for_a_batch,
}


@pytest.fixture(scope="module")
def capped(tmp_path_factory, mnist_root) -> dict[str, tuple[list[SimpleNamespace], Path]]:
    """Every reading command on each of CAPPED_FILES, all in one subprocess that may allocate
    1 GiB beyond its imports (RLIMIT_AS): name -> (results, the file's folder afterwards).
    A command that hangs fails the tests at the timeout instead of blocking the suite."""
    commands, where = [], {}
    for name, make in CAPPED_FILES.items():
        folder = tmp_path_factory.mktemp(name.split(".")[0])
        make(folder / name)
        where[name] = (len(commands), folder)
        commands += reading_commands(folder / name, folder, mnist_root)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = json.dumps([[str(a) for a in c] for c in commands])
    done = subprocess.run(
        [sys.executable, "-c", CAPPED_CLI, "1024", args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = [SimpleNamespace(exit_code=c, output=o, cpu=t) for c, o, t in json.loads(done.stdout)]
    return {name: (results[i : i + 5], folder) for name, (i, folder) in where.items()}


def test_item_3_a_sparse_6_gib_file_is_refused_without_reading_it(capped):
    results, folder = capped["sparse.slot"]
    for result in results:
        one_line_error(result, "trailing bytes after the payload")
        assert result.cpu < 2, result
    assert sorted(p.name for p in folder.iterdir()) == ["sparse.slot"]


def test_item_3_a_fifo_is_refused_without_waiting_for_a_writer(capped):
    results, folder = capped["f.slot"]
    for result in results:  # pack takes a non-file for a run folder or checkpoint
        one_line_error(result, "f.slot")
        assert result.cpu < 2, result
        assert "not a regular file" in result.output or "no checkpoint" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["f.slot"]


def test_a_small_file_declaring_2_31_connections_runs_out_of_memory_in_one_line(capped):
    """What a reader spends is bounded by the declaration, not the file size: where memory runs
    out, each command says so in one line and writes nothing."""
    (inspected, *refused), folder = capped["much.slot"]
    assert inspected.exit_code == 0, inspected.output
    needles = ["out of memory rebuilding 1.weight", "out of memory building layer 1",
               "out of memory re-encoding", "do not fit in one in-memory ONNX model"]  # fmt: skip
    for result, needle in zip(refused, needles, strict=True):
        one_line_error(result, needle)
    assert sorted(p.name for p in folder.iterdir()) == ["much.slot"]


def test_activations_within_the_bound_but_too_big_for_a_batch_are_one_line(capped):
    """A batch of 256 of those images asks onnxruntime for hundreds of GiB: out of memory in
    one line (its own error log silenced), not a traceback or a log dump."""
    (*_, evaluated), _ = capped["wide.slot"]
    one_line_error(evaluated, "out of memory running the model on a [256, 1, 28, 28] batch")


def test_item_4_indices_at_least_k_are_refused_by_every_path(tmp_path, mnist_root):
    """K=5 with every index 7 and correct CRCs: `inspect --verify` said "checksums verified"
    and `export --self-decoding` wrote a graph that ran with the out-of-range slots."""
    manifest, _ = parts(mnist_file([A.Flatten(), A.Linear(784, 10)], k=5))
    body = B.pack(np.full(7840, 7), 3)
    (entry,) = manifest["sections"]
    assert entry["length"] == len(body) and manifest["layers"][1]["k"] == 5
    entry["crc32"] = zlib.crc32(body)
    path = tmp_path / "k5.slot"
    path.write_bytes(assemble(canonical(manifest), body))
    refused_everywhere(path, tmp_path, mnist_root, "index is >= K=5")
    with pytest.raises(F.ManifestError, match="index is >= K=5"):
        rebuild(path)


BOMBS = {  # conv (kernel 3, on 28x28) padding and dilation, and what the refusal says
    "padding 6000": (6000, 1, "padding 6000 exceeds dilation * (kernel_size - 1) = 2"),
    "padding 2^30": (1 << 30, 1, "padding 1073741824 exceeds"),
    "padding 6000, dilation 3000": (6000, 3000, "72,673,568 values per image"),
    "padding 2^30, dilation 2^29": (1 << 30, 1 << 29, "(at most 67,108,864)"),
    "padding 2^31, dilation 2^30": (1 << 31, 1 << 30, "(at most 67,108,864)"),
}


@pytest.mark.parametrize("bomb", BOMBS)
def test_item_5_geometry_bombs_are_refused_by_the_reader(bomb, tmp_path, mnist_root):
    """Each asked onnxruntime for gigabytes per image (or overflowed) at eval; now the reader
    bounds padding to dilation * (kernel_size - 1) and every activation to 2^26 values."""
    padding, dilation, needle = BOMBS[bomb]
    side = 28 + 2 * padding - 2 * dilation  # the convolution's output; a pool makes it 1x1
    pool = min(max(side, 26), 1 << 31)
    layers = [A.Conv2d(1, 2, 3), A.AvgPool2d(26, 26), A.Flatten(), A.Linear(2, 10)]
    manifest, payload = parts(mnist_file(layers))
    manifest["layers"][0].update(padding=padding, dilation=dilation)
    manifest["layers"][1].update(kernel_size=pool, stride=pool)
    path = tmp_path / "bomb.slot"
    path.write_bytes(assemble(canonical(manifest), payload))
    refused_everywhere(path, tmp_path, mnist_root, needle)


def test_a_float_field_holding_an_integer_no_double_holds_is_refused(tmp_path, mnist_root):
    """Found by the fuzzer: eps = a 400-digit integer gave an OverflowError traceback."""
    layers = [
        A.Conv2d(1, 2, 3),
        A.BatchNorm2d(2),
        A.AvgPool2d(26, 26),
        A.Flatten(),
        A.Linear(2, 10),
    ]
    arch = A.Arch("probe", "mnist", (1, 28, 28), tuple(layers))
    data = encode_selection(
        arch, seed=15, k=2, selection="greedy", indices=[np.zeros(18, int), np.zeros(20, int)],
        tensors={"1.running_mean": np.zeros(2), "1.running_var": np.ones(2)},
        mean=(0.1307,), std=(0.3081,), metadata={"dataset": "mnist"},
    )  # fmt: skip
    manifest, payload = parts(data)
    manifest["layers"][1]["eps"] = 0.0
    text = canonical(manifest).replace(b'"eps":0.0', b'"eps":' + b"9" * 400)
    path = tmp_path / "eps.slot"
    path.write_bytes(assemble(text, payload))
    refused_everywhere(path, tmp_path, mnist_root, "eps must be a finite number, got an integer")


def test_no_reader_path_unpickles(tmp_path, monkeypatch):
    """A .slot file is JSON, packed integers and IEEE floats: no path ever calls pickle."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a reader path unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    checked = 0
    for index in range(20):
        case = generate(SEED, index)
        if case.expect != "valid" or (declared_work(case.data) or 0) > HEAVY:
            continue
        path = tmp_path / "case.slot"
        path.write_bytes(case.data)
        result = check_case(case, path, tmp_path)
        assert not result["failures"] and result["paths"]["eval"] == "ok", result
        checked += 1
    assert checked >= 3

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
from tests.helpers import one_line_error, one_line_failure, run_capped

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


def test_item_3_a_sparse_6_gib_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.slot"
    path.write_bytes(mnist_file([A.Flatten(), A.Linear(784, 10)]))
    os.truncate(path, 6 << 30)
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse: no disk used
    for args in (["inspect", "--verify", path], ["unpack", path, "-o", tmp_path / "a.npz"]):
        result = run_capped(1024, *args)  # 1 GiB of address space beyond the imports
        one_line_failure(result, "trailing bytes after the payload")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.slot"]


def test_item_3_a_symlink_to_dev_zero_is_refused(tmp_path, mnist_root):
    path = tmp_path / "zero.slot"
    path.symlink_to("/dev/zero")
    refused_everywhere(path, tmp_path, mnist_root, "not a regular file")


FIFO_SCRIPT = """
import json, sys
from click.testing import CliRunner
from slotpack.cli import main
print(json.dumps([
    (r.exit_code, r.output)
    for r in (CliRunner().invoke(main, args) for args in json.loads(sys.argv[1]))
]))
"""


def test_item_3_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, mnist_root):
    path = tmp_path / "f.slot"
    os.mkfifo(path)
    commands = [
        ["inspect", "--verify", str(path)],
        ["unpack", str(path), "-o", str(tmp_path / "a.npz")],
        ["export", str(path), "-o", str(tmp_path / "a.onnx")],
        ["eval", str(path), "--dataset", "mnist", "--limit", "50", "--root", str(mnist_root)],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", FIFO_SCRIPT, json.dumps(commands)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip  # a hang (open() waiting for a writer) fails here instead of blocking the suite
    assert done.returncode == 0, done.stderr
    for code, output in json.loads(done.stdout):
        one_line_error(SimpleNamespace(exit_code=code, output=output), "not a regular file")


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

"""Format version 2 (docs/FORMAT.md §1.7-1.8, §2.6): the initial-choice streams, the delta index
coding, per-layer K, the golden file, round trips, malformed and fuzzed files, version 1 re-encoded.
"""

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slotpack import arch as A
from slotpack import delta as D
from slotpack import format as F
from slotpack import prng
from slotpack.pack import encode_selection, repack
from slotpack.runtime import rebuild

GOLDEN_V2 = Path(__file__).parent / "golden" / "tiny-v2.slot"
SPEC = Path(__file__).parent.parent / "docs" / "FORMAT.md"
HEADER = struct.Struct("<8sHHIIIQ")
SEED = 0x0123456789ABCDEF

TINY = A.Arch(
    "tiny", "toy", (1, 4, 4),
    (A.Conv2d(1, 2, 3, padding=1, bias=True), A.BatchNorm2d(2), A.ReLU(), A.MaxPool2d(2, 2),
     A.Flatten(), A.Linear(8, 3, bias=True)),
    num_classes=3,
)  # fmt: skip
TENSORS = {"0.bias": [0.5, -0.25], "1.running_mean": [0.125, -1.5],
           "1.running_var": [1.0, 2.0], "5.bias": [0.0, 1.0, -3.0]}  # fmt: skip


def golden_indices() -> list[np.ndarray]:
    """Reference slots with a few connections moved to chosen ranks of their crossing order
    (margin 64; the writer finds that margin 8 codes them as short) or reference order."""
    out = []
    for number, (layer, k, rule, moves, crossing) in enumerate(
        [
            (TINY.layers[0], 5, "onedraw16", {2: 1, 3: 1, 7: 1, 9: 2, 11: 1, 14: 1, 16: 1}, 64),
            (TINY.layers[5], 3, "argmax", {0: 1, 1: 2, 2: 1, 23: 2}, None),  # Exp-Golomb gaps
        ]  # fmt: skip
    ):
        n, bound = int(np.prod(layer.weight_shape)), prng.glorot_bound(*layer.fans)
        index = prng.reference_np(SEED, number, n, k, bound, rule).astype(np.int64)
        positions = np.array(list(moves))
        order = prng.reference_order_np(SEED, number, positions, k, bound, rule, crossing)
        index[list(moves)] = order[np.arange(len(moves)), list(moves.values())]
        out.append(index)
    return out


def tiny_v2(index_encoding: str = "delta", indices: list | None = None) -> bytes:
    """The golden file. Its layer 0 keeps the crossing order although, at 18 connections, the
    manifest key costs more than the rank byte it saves (a writer would drop it): the golden
    file shows a reader every stream kind."""
    from unittest import mock

    with mock.patch.object(D, "crossing_key_bytes", lambda margin: 0):
        return _tiny_v2(index_encoding, indices)


def _tiny_v2(index_encoding: str, indices: list | None) -> bytes:
    return encode_selection(
        TINY, seed=SEED, k=(5, 3), selection="greedy", indices=indices or golden_indices(),
        tensors=TENSORS, mean=(0.5,), std=(0.25,), references=("onedraw16", "argmax"),
        index_encoding=index_encoding, metadata={"dataset": "toy", "note": "golden v2"},
    )  # fmt: skip


def split(data: bytes) -> tuple[dict, bytes]:
    m_len = HEADER.unpack_from(data)[3]
    start = 32 + -(-m_len // 8) * 8
    return json.loads(data[32 : 32 + m_len]), data[start:]


def build(manifest: dict, payload: bytes, version: int = 2) -> bytes:
    """A file around an edited manifest and payload, lengths and header CRCs fixed."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    head = HEADER.pack(F.MAGIC, version, 0, len(text), zlib.crc32(text), 0, len(payload))
    head = head[:20] + struct.pack("<I", zlib.crc32(head[:20] + head[24:])) + head[24:]
    return head + text + bytes(-len(text) % 8) + payload


def section(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["sections"] if s["name"] == name)


# ----------------------------------------------------------------------------- streams (§1.7-1.8)


def test_known_answer_vectors_of_the_spec():
    bound = prng.glorot_bound(784, 300)
    assert np.float32(prng.glorot_bound(38, 3)).view(np.uint32) == 0x3EC3DD13
    assert [prng.reference_key(42, 3), prng.maximum_key(42, 3)] == [
        0x262A8DDA69A6816F, 0xC54BF95FCA00B904]  # fmt: skip
    assert [prng.score_key(42, 3), prng.draw_key(42, 3), prng.order_key(42, 3)] == [
        0x390FD325738A1218, 0xAE52295B45871D11, 0x2AF3822A26933FDE]  # fmt: skip
    assert prng._order_grid_np(42, 3, np.arange(2), 5, "onedraw16").T.tolist() == [
        [8616, 57059, 43888, 31794, 32328], [14904, 7077, 50808, 59969, 7148]]  # fmt: skip
    want = {"onedraw": [4, 4, 3, 2, 3, 4, 4, 4], "argmax": [4, 1, 2, 2, 3, 1, 1, 0],
            "draw": [1, 1, 4, 1, 2, 0, 4, 1], "onedraw16": [4, 4, 3, 2, 3, 4, 4, 4]}  # fmt: skip
    orders = {"onedraw": [[4, 3, 2, 1, 0], [4, 1, 2, 3, 0], [3, 2, 1, 4, 0]],
              "onedraw16": [[4, 1, 2, 3, 0], [4, 3, 2, 0, 1], [3, 4, 1, 0, 2]],
              "argmax": [[4, 3, 2, 1, 0], [1, 4, 2, 3, 0], [2, 1, 4, 0, 3]],
              "draw": [[1, 2, 3, 0, 4], [1, 4, 0, 3, 2], [4, 2, 1, 3, 0]]}  # fmt: skip
    for rule in prng.REFERENCE_RULES:
        assert prng.reference_np(42, 3, 8, 5, bound, rule).tolist() == want[rule]
        assert prng.reference_order_np(42, 3, np.arange(3), 5, bound, rule).tolist() == orders[rule]
    crossing = {(0, "onedraw16"): [[4, 2, 1, 0, 3], [4, 2, 0, 1, 3], [3, 1, 2, 0, 4]],
                (0, "onedraw"): [[4, 2, 0, 1, 3], [4, 1, 0, 2, 3], [3, 2, 1, 0, 4]],
                (0, "argmax"): [[4, 2, 0, 1, 3], [1, 4, 3, 0, 2], [2, 4, 3, 0, 1]],
                (1024, "onedraw16"): [[4, 2, 0, 1, 3], [4, 0, 2, 1, 3], [3, 1, 2, 0, 4]],
                (1024, "onedraw"): [[4, 2, 0, 1, 3], [4, 0, 2, 1, 3], [3, 1, 2, 0, 4]],
                (65535, "argmax"): [[4, 2, 0, 1, 3], [1, 0, 3, 4, 2], [2, 4, 3, 0, 1]]}  # fmt: skip
    for (margin, rule), want_order in crossing.items():
        got = prng.reference_order_np(42, 3, np.arange(3), 5, bound, rule, margin)
        assert got.tolist() == want_order
    assert (prng._slot_grid_np(prng.layer_key(42, 3), np.arange(1), 5).ravel().tolist()
            == [3343570, 8056179, 1095336, 10347587, 10949974])  # fmt: skip
    spec = SPEC.read_text()
    assert "`0x3ec3dd13`" in spec and "4 4 3 2 3 4 4 4" in spec and "[1 4 0 3 2]" in spec
    assert "3343570 8056179 1095336 10347587 10949974" in spec
    for order in crossing.values():
        assert " ".join(f"[{' '.join(map(str, row))}]" for row in order) in spec
    assert "`0x2af3822a26933fde`" in spec and "8616 57059 43888 31794 32328" in spec
    assert "[4 1 2 3 0] [4 3 2 0 1] [3 4 1 0 2]" in spec


def test_reference_rules_follow_their_definitions_in_plain_python():
    """§1.8 written out with Python integers, independently of the numpy code."""
    seed, layer, k, n = 7, 2, 6, 50
    bound = prng.glorot_bound(20, 30)
    out = prng.splitmix64_output
    key_r = out(seed ^ 0x4EF0D4A74EF0D4A7, layer)
    halves = [out(key_r, i >> 1) >> 32 if i % 2 == 0 else out(key_r, i >> 1) & 0xFFFFFFFF
              for i in range(n)]  # fmt: skip
    assert prng.reference_np(seed, layer, n, k, bound, "onedraw").tolist() == [
        (h * k) >> 32 for h in halves]  # fmt: skip
    key_s = out(seed ^ 0x5C0E5C0E5C0E5C0E, layer)
    scores = [[np.float32(out(key_s, i * k + j) >> 40) * np.float32(bound) for j in range(k)]
              for i in range(n)]  # fmt: skip
    assert prng.reference_np(seed, layer, n, k, bound, "argmax").tolist() == [
        row.index(max(row)) for row in scores]  # fmt: skip
    key_d = out(seed ^ 0xD2A3D2A3D2A3D2A3, layer)
    draws = [[out(key_d, i * k + j) >> 40 for j in range(k)] for i in range(n)]
    assert prng.reference_np(seed, layer, n, k, bound, "draw").tolist() == [
        row.index(max(row)) for row in draws]  # fmt: skip
    key_o, w = out(seed ^ 0x6F5D6F5D6F5D6F5D, layer), -(-k // 4)
    u = [[(out(key_o, i * w + (j >> 2)) >> (48 - 16 * (j & 3))) & 0xFFFF for j in range(k)]
         for i in range(n)]  # fmt: skip
    ref = prng.reference_np(seed, layer, n, k, bound, "onedraw16").tolist()
    assert ref == [(h * k) >> 32 for h in halves]
    order = prng.reference_order_np(seed, layer, np.arange(n), k, bound, "onedraw16").tolist()
    assert order == [[r] + sorted((j for j in range(k) if j != r), key=lambda j: (-row[j], j))
                     for r, row in zip(ref, u, strict=True)]  # fmt: skip


def _crossing_order_py(seed: int, layer: int, i: int, k: int, rule: str, margin: int,
                       ref: int) -> list[int]:  # fmt: skip
    """The crossing order of §1.8 with Python integers and floats, apart from the numpy code."""
    out = prng.splitmix64_output
    u = [out(out(seed, layer), i * k + j) >> 40 for j in range(k)]
    if rule == "onedraw16":
        key_o, w = out(seed ^ 0x6F5D6F5D6F5D6F5D, layer), -(-k // 4)
        s = [2 * ((out(key_o, i * w + (j >> 2)) >> (48 - 16 * (j & 3))) & 0xFFFF) + 1
             for j in range(k)]  # fmt: skip
        s[ref] = z = 1 << 17
    else:
        key_s = out(seed ^ 0x5C0E5C0E5C0E5C0E, layer)
        s, z = [out(key_s, i * k + j) >> 40 for j in range(k)], 1 << 24
        if rule == "onedraw":
            s[ref] = z

    def top_bits(j: int) -> int:
        n, d = max(0, s[ref] + margin * (z // 256) - s[j]), abs(u[j] - u[ref])
        t = float("inf") if d == 0 else n / d
        return struct.unpack("<Q", struct.pack("<d", t))[0] >> 16

    return [ref] + sorted((j for j in range(k) if j != ref), key=lambda j: (top_bits(j), j))


@pytest.mark.parametrize("rule", ["onedraw16", "onedraw", "argmax"])
def test_crossing_order_follows_its_definition_in_plain_python(rule):
    seed, layer, n = 11, 1, 40
    bound = prng.glorot_bound(20, 30)
    for k, margin in [(3, 0), (6, 37), (9, 65535)]:
        ref = prng.reference_np(seed, layer, n, k, bound, rule).tolist()
        got = prng.reference_order_np(seed, layer, np.arange(n), k, bound, rule, margin)
        assert got.tolist() == [
            _crossing_order_py(seed, layer, i, k, rule, margin, ref[i]) for i in range(n)]


def test_crossing_order_puts_equal_values_last_by_slot(monkeypatch):
    """D_k = 0 makes t_k infinite whatever N_k is (0/0 included), and infinite keys tie by k."""
    monkeypatch.setattr(prng, "_order_grid_np", lambda *a: np.array([[10], [10], [5], [3]],
                                                                    dtype=np.uint64))  # fmt: skip
    monkeypatch.setattr(prng, "_slot_grid_np", lambda *a: np.array([[100], [100], [100], [50]],
                                                                   dtype=np.uint64))  # fmt: skip
    keys = prng._order_keys(0, 0, np.arange(1), 4, "argmax", np.array([0]), 0)
    keys[0, 0] = -1  # the reference
    assert (0xFFFF - (-np.sort(-keys, axis=0)[:3] & 0xFFFF)).ravel().tolist() == [3, 1, 2]


def toy_arch(hidden: int) -> A.Arch:
    """A two-layer toy network for round trips (48 -> hidden -> 3)."""
    layers = (A.Flatten(), A.Linear(48, hidden), A.ReLU(), A.Linear(hidden, 3, bias=True))
    return A.Arch("t", "toy", (3, 4, 4), layers, num_classes=3)


def toy_files(arch: A.Arch, k: int, indices: list, rule: str, encodings: tuple) -> dict:
    """The toy network's file bytes in each index encoding."""
    return {enc: encode_selection(
        arch, seed=1, k=k, selection="greedy", indices=indices, tensors={"3.bias": [1, 2, 3]},
        mean=(0, 0, 0), std=(1, 1, 1), references=(rule, rule), index_encoding=enc,
    ) for enc in encodings}  # fmt: skip


def assert_same_weights(files: dict) -> None:
    """Every file rebuilds to the bits file's dense weights, bit for bit."""
    dense = {enc: rebuild(data) for enc, data in files.items()}
    for name, array in dense["bits"].items():
        for enc in files:
            assert np.array_equal(array.view(np.uint32), dense[enc][name].view(np.uint32))


@pytest.mark.parametrize("k", [3, 8, 64, 65536])
def test_crossing_order_round_trip_and_is_chosen_when_shorter(k):
    """Changes that follow the crossing order (as trained networks' do) get it; the file
    rebuilds to the same weights as its bits twin and is smaller than with reference ranks."""
    rng = np.random.default_rng(k)
    arch = toy_arch(40 if k < 1000 else 2)
    indices, rule = [], "onedraw16"
    for number, layer in enumerate(arch.weighted):
        n, bound = int(np.prod(layer.weight_shape)), prng.glorot_bound(*layer.fans)
        index = prng.reference_np(1, number, n, k, bound, rule).astype(np.int64)
        moved = np.flatnonzero(rng.random(n) < 0.3)
        order = prng.reference_order_np(1, number, moved, k, bound, rule, 96)
        index[moved] = order[np.arange(moved.size), np.where(rng.random(moved.size) < 0.85, 1, 2)]
        indices.append(index)
    files = toy_files(arch, k, indices, rule, ("bits", "delta", "fast"))
    fast = F.decode(files["fast"])  # reference-order ranks only: larger, cheaper to rebuild
    assert all(s.crossing is None for s in fast.sections.values())
    f = F.decode(files["delta"])
    assert f.sections[f.weights[0].section].crossing is not None  # the large layer
    for w in f.weights:  # crossing is stored only when its ranks and manifest key are shorter
        s, plain = f.sections[w.section], fast.sections[w.section].length
        assert s.length + D.crossing_key_bytes(s.crossing) < plain or (
            s.crossing is None and s.length == plain)  # fmt: skip
    for w, want in zip(f.weights, indices, strict=True):
        assert np.array_equal(f.indices(w.section), want)
    assert_same_weights(files)
    assert repack(F.decode(files["bits"])) == files["delta"]
    assert repack(F.decode(files["delta"]), index_encoding="fast") == files["fast"]


@pytest.mark.parametrize("k", [2, 3, 8, 64])
def test_initial_scores_numpy_equals_torch_and_onedraw_argmax_is_the_reference(k):
    import torch

    n = (1 << 20) // k  # a million counters per stream
    bound = prng.glorot_bound(784, 300)
    ref = prng.reference_np(11, 1, n, k, bound, "onedraw")
    assert np.array_equal(ref, prng.reference_torch(11, 1, n, k).numpy())
    for init in prng.INITS:
        a = prng.initial_scores_np(11, 1, n, k, bound, init)
        t = prng.initial_scores_torch(11, 1, n, k, bound, init=init).numpy()
        assert np.array_equal(a.view(np.uint32), t.view(np.uint32))
        assert 0 <= a.min() and a.max() <= np.float32(bound)
        rule = "argmax" if init == "uniform" else init
        assert np.array_equal(prng.reference_np(11, 1, n, k, bound, rule), a.argmax(1))
        assert np.array_equal(torch.from_numpy(a).argmax(1).numpy(), a.argmax(1))
        if init == "onedraw16":  # the others' scores follow the 16-bit draws' order
            order = prng.reference_order_np(11, 1, np.arange(500), k, bound, init)
            assert np.array_equal(np.argsort(-a[:500], axis=1, kind="stable"), order)


@pytest.mark.parametrize("init", ["onedraw", "onedraw16"])
def test_onedraw_has_the_law_of_k_independent_uniform_scores(init):
    k, n, bound = 8, 200_000, 1.0
    s = prng.initial_scores_np(5, 0, n, k, bound, init)
    ref = s.argmax(1)
    counts = np.bincount(ref, minlength=k)
    chi2 = (((counts - n / k) ** 2) / (n / k)).sum()
    assert chi2 < 30  # 7 degrees of freedom: p < 1e-4 past 29
    assert abs(s.max(1).mean() - k / (k + 1)) < 2e-3  # E[max of K uniforms]
    assert abs(s.mean() - 0.5) < 2e-3 and abs(s.var() - 1 / 12) < 1e-3


# ----------------------------------------------------------------------------- golden file


def golden_bytes(data: bytes) -> bytes:
    """The committed golden file; ``SLOTPACK_REGEN_GOLDEN=1`` rewrites it (and the spec's table)."""
    import os

    if os.environ.get("SLOTPACK_REGEN_GOLDEN") == "1":
        GOLDEN_V2.write_bytes(data)
    return GOLDEN_V2.read_bytes()


def spec_table(indices: list[np.ndarray]) -> str:
    rows = ["| layer | K | indices of connections 0, 1, 2, ... |", "|---|---|---|"]
    for pos, k, index in zip((0, 5), (5, 3), indices, strict=True):
        rows.append(f"| {pos} | {k} | {' '.join(map(str, index.tolist()))} |")
    return "\n".join(rows)


def test_golden_v2_bytes_and_the_indices_printed_in_the_spec():
    data = tiny_v2()
    assert data == golden_bytes(data)
    f = F.decode(GOLDEN_V2.read_bytes())
    assert f.version == 2 and f.ks == (5, 3) and f.k is None
    assert [s.encoding for s in f.sections.values() if s.name.endswith("indices")] == ["delta"] * 2
    decoded = [f.indices("0.indices"), f.indices("5.indices")]
    for got, want in zip(decoded, golden_indices(), strict=True):
        assert np.array_equal(got, want)
    assert spec_table(decoded) in SPEC.read_text()


def test_golden_v2_manifest_follows_the_spec_tables():
    manifest, payload = split(GOLDEN_V2.read_bytes())
    assert set(manifest) == F.MANIFEST_KEYS[2]
    weighted = [layer for layer in manifest["layers"] if layer["op"] in ("linear", "conv2d")]
    assert [(w["k"], w["reference"]) for w in weighted] == [(5, "onedraw16"), (3, "argmax")]
    s = section(manifest, "0.indices")  # ranks in the crossing order
    assert set(s) == F.SECTION_KEYS | F.DELTA_KEYS | {"crossing"}
    assert (s["changes"], s["encoding"], s["crossing"]) == (7, "delta", 8)
    s = section(manifest, "5.indices")  # clustered changes: Exp-Golomb codes them shorter
    assert set(s) == F.SECTION_KEYS | F.DELTA_KEYS | {"gap_code"}
    assert (s["changes"], s["gap_code"]) == (4, "expgolomb")


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("k", [2, 3, 8, 64, 65536])
@pytest.mark.parametrize("rule", ["onedraw", "argmax", "draw"])
def test_round_trip_every_encoding(k, rule):
    rng = np.random.default_rng(k)
    arch = toy_arch(20 if k < 1000 else 2)  # K draws per connection for argmax, draw: keep small
    indices = []
    for number, layer in enumerate(arch.weighted):
        n, bound = int(np.prod(layer.weight_shape)), prng.glorot_bound(*layer.fans)
        index = prng.reference_np(1, number, n, k, bound, rule).astype(np.int64)
        moved = rng.random(n) < (0.05, 0.6)[number]
        index[moved] = rng.integers(0, k, moved.sum())
        indices.append(index)
    files = toy_files(arch, k, indices, rule, ("bits", "delta", "auto"))
    for data in files.values():
        f = F.decode(data)
        for w, want in zip(f.weights, indices, strict=True):
            assert np.array_equal(f.indices(w.section), want)
    assert_same_weights(files)
    sizes = {enc: len(data) for enc, data in files.items()}
    assert sizes["auto"] <= min(sizes["bits"], sizes["delta"])
    assert repack(F.decode(files["bits"])) == files["auto"]
    assert repack(F.decode(files["auto"]), index_encoding="bits") == files["bits"]


def test_version_1_files_re_encode_losslessly_and_keep_reading():
    v1 = encode_selection(
        TINY, seed=SEED, k=5, selection="probabilistic",
        indices=[np.arange(18) % 5, (np.arange(24) * 7) % 5], tensors=TENSORS, mean=(0.5,),
        std=(0.25,), version=1,
    )  # fmt: skip
    old = F.decode(v1)
    assert old.version == 1 and [w.reference for w in old.weights] == ["draw", "draw"]
    v2 = repack(old, index_encoding="delta")
    new = F.decode(v2)
    assert new.version == 2 and new.ks == (5, 5)
    for name, array in rebuild(v1).items():
        assert np.array_equal(array.view(np.uint32), rebuild(v2)[name].view(np.uint32))
    assert repack(new, index_encoding="bits") == repack(old, index_encoding="bits")


def test_unchanged_network_costs_no_index_bytes():
    layer = A.Linear(300, 200)
    arch = A.Arch("t", "toy", (1, 1, 300), (A.Flatten(), layer), num_classes=200)
    ref = prng.reference_np(9, 0, 60000, 8, prng.glorot_bound(300, 200), "onedraw")
    data = encode_selection(
        arch, seed=9, k=8, selection="greedy", indices=[ref], tensors={}, mean=(0,), std=(1,),
        references=("onedraw",),
    )  # fmt: skip
    f = F.decode(data)
    assert f.sections["1.indices"].length == 0 and len(data) < 700
    assert np.array_equal(f.indices("1.indices"), ref)


# ----------------------------------------------------------------------------- malformed files


def edit(data: bytes, fn) -> bytes:
    manifest, payload = split(data)
    payload = fn(manifest, bytearray(payload))
    return build(manifest, bytes(payload))


def _recrc(manifest, payload, name):
    s = section(manifest, name)
    s["crc32"] = zlib.crc32(bytes(payload[s["offset"] : s["offset"] + s["length"]]))
    return payload


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda m, p: section(m, "0.indices").update(changes=17) or p, F.LayoutError,
         "4 bytes cannot hold 17 changes"),
        (lambda m, p: section(m, "0.indices").update(changes=6) or p, F.LayoutError,
         "unary stream ends|a rank is|past the layer|padding"),
        (lambda m, p: section(m, "0.indices").update(changes=2) or p, F.LayoutError,
         "bytes after its streams|padding"),
        (lambda m, p: section(m, "0.indices").update(changes=19) or p, F.ManifestError,
         "changes must be an integer in 0..18"),
        (lambda m, p: section(m, "0.indices").update(gap_param=32) or p, F.ManifestError,
         "gap_param must be an integer in 0..31"),
        (lambda m, p: section(m, "5.indices").update(rank_param=16) or p, F.ManifestError,
         "rank_param must be an integer in 0..15"),
        (lambda m, p: section(m, "0.indices").pop("changes") and p, F.ManifestError,
         "missing \\['changes'\\]"),
        (lambda m, p: section(m, "5.indices").update(gap_code="rice") or p, F.ManifestError,
         'gap_code must be "expgolomb" \\(Rice gaps omit the key\\), got \'rice\''),
        (lambda m, p: section(m, "5.indices").update(gap_code="huffman") or p, F.ManifestError,
         "gap_code must be"),
        (lambda m, p: section(m, "0.indices").update(gap_code="expgolomb") or p, F.LayoutError,
         "padding|bytes after|unary stream ends|runs past|past the layer|a rank is"),
        (lambda m, p: section(m, "5.indices").pop("gap_code") and p, F.LayoutError,
         "padding|bytes after|unary stream ends|runs past|past the layer|a rank is"),
        (lambda m, p: section(m, "1.running_mean").update(gap_code="expgolomb") or p,
         F.ManifestError, "unknown \\['gap_code'\\]"),
        (lambda m, p: section(m, "0.indices").update(crossing=65536) or p, F.ManifestError,
         "crossing must be an integer in 0..65535, got 65536"),
        (lambda m, p: section(m, "0.indices").update(crossing=True) or p, F.ManifestError,
         "crossing must be an integer in 0..65535, got True"),
        (lambda m, p: m["layers"][0].update(reference="draw") or p, F.ManifestError,
         "crossing applies to K > 2 and the rules onedraw16, onedraw, argmax, not K=5 with draw"),
        (lambda m, p: section(m, "1.running_mean").update(crossing=0) or p, F.ManifestError,
         "unknown \\['crossing'\\]"),
        (lambda m, p: m["layers"][0].update(k=65537) or p, F.ManifestError, "k must be"),
        (lambda m, p: m["layers"][0].update(reference="best") or p, F.ManifestError,
         "reference 'best' is not one of"),
        (lambda m, p: m["layers"][0].pop("k") and p, F.ManifestError, "missing \\['k'\\]"),
        (lambda m, p: m.update(k=5) or p, F.ManifestError, "unknown \\['k'\\]"),
        (lambda m, p: section(m, "0.bias").update(encoding="delta") or p, F.ManifestError,
         "missing|no layer's indices"),
    ],
)  # fmt: skip
def test_malformed_delta_manifests(change, error, match):
    with pytest.raises(error, match=match):
        F.decode(edit(tiny_v2(), change), verify=False)


def test_delta_in_a_version_1_file_is_refused():
    manifest, payload = split(tiny_v2())
    manifest.update(version=1, k=5, index_bits=3)
    for layer in manifest["layers"]:
        layer.pop("k", None), layer.pop("reference", None)
    with pytest.raises(F.ManifestError, match="not one of bits, float32, float16|unknown"):
        F.decode(build(manifest, payload, version=1))


def test_corrupt_delta_stream_is_refused_without_crc():
    data = bytearray(tiny_v2())
    manifest, payload = split(bytes(data))
    start = len(data) - len(payload) + section(manifest, "5.indices")["offset"]
    for byte in range(section(manifest, "5.indices")["length"]):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[start + byte] ^= 1 << bit
            try:
                f = F.decode(bytes(mutated), verify=False)
            except F.SlotFormatError:
                continue
            assert f.indices("5.indices").max() < 3  # a flip that still parses: valid indices


def test_non_canonical_manifests_are_refused():
    manifest, payload = split(tiny_v2())
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    variants = [
        json.dumps(manifest, sort_keys=True),  # spaces
        json.dumps(dict(reversed(manifest.items())), separators=(",", ":")),  # unsorted keys
        text.replace('"note":"golden v2"', '"note":"golden v2\\u0020"'),  # escaped ASCII
        text.replace('"std":[0.25]', '"std":[2.5e-1]'),  # another spelling of the same number
        text.replace('"std":[0.25]', '"std":[0.250]'),
    ]
    for variant in variants:
        raw = variant.encode()
        head = HEADER.pack(F.MAGIC, 2, 0, len(raw), zlib.crc32(raw), 0, len(payload))
        head = head[:20] + struct.pack("<I", zlib.crc32(head[:20] + head[24:])) + head[24:]
        with pytest.raises(F.ManifestError, match="canonical"):
            F.decode(head + raw + bytes(-len(raw) % 8) + payload)
    meta = {"snowman": "\u2603", "slash": "a/b", "big": 10**30, "tiny": 1e-05, "neg": -0.0}
    data = tiny_v2()
    manifest["metadata"] = meta
    assert F.decode(build(manifest, payload)).manifest["metadata"] == meta
    text = split(build(manifest, payload))
    assert re.search(rb'"snowman":"\\u2603"', build(manifest, payload)) and text and data


def test_integer_limit_does_not_depend_on_the_interpreter():
    manifest, payload = split(tiny_v2())
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    raw = raw.replace('"note":"golden v2"', '"note":' + "9" * 4301).encode()
    head = HEADER.pack(F.MAGIC, 2, 0, len(raw), zlib.crc32(raw), 0, len(payload))
    head = head[:20] + struct.pack("<I", zlib.crc32(head[:20] + head[24:])) + head[24:]
    with pytest.raises(F.ManifestError, match="integer of 4301 digits"):
        F.decode(head + raw + bytes(-len(raw) % 8) + payload)


def test_exp_golomb_streams_follow_the_spec():
    """The spec's example, exact lengths, and round trips at every order on clustered gaps."""
    gaps = np.array([0, 0, 0, 20])
    assert D.eg_encode(gaps, 0) == bytes([0x1E, 0x50])
    rng = np.random.default_rng(5)
    runs = [
        rng.geometric(0.5, 300) - 1,
        rng.geometric(0.002, 40) - 1,
        rng.integers(0, 2**31 - 1, 9),
    ]
    values = np.concatenate(runs)
    for order in range(32):
        data = D.eg_encode(values, order)
        assert len(data) == D.eg_length(values, order)
        got, end = D.eg_decode(np.frombuffer(data, np.uint8), 0, values.size, order, 2**31 * 9)
        assert end == len(data) and np.array_equal(got, values)
    code, param = D.best_code(np.concatenate([np.zeros(500, int), [10**6] * 5]))
    assert code == "expgolomb"  # long runs between clusters: logarithmic cost wins
    assert D.best_code(rng.geometric(0.1, 2000) - 1)[0] == "rice"  # evenly spread changes


def test_exp_golomb_codes_longer_than_31_bits_are_refused():
    """A length of 32 extra bits would describe a gap of 2^32 and more: refused before reading."""
    unary = bytes([0xFF] * 4 + [0x00])  # L = 32, then padding
    with pytest.raises(D.DeltaError, match="longer than 31 bits"):
        D.check(unary + bytes(8), count=2**31, k=2, changes=1, gap_param=0, rank_param=0,
                gap_code="expgolomb")  # fmt: skip


def test_decoding_allocates_no_more_than_the_declared_output():
    """A delta section that declares a huge quotient run is bounded by the layer's count."""
    view = np.full(64, 0xFF, dtype=np.uint8)  # all one-bits: no code ever ends
    with pytest.raises(D.DeltaError, match="unary stream ends after 0 of 3"):
        D.check(view.tobytes(), count=100, k=8, changes=3, gap_param=0, rank_param=0)


# ----------------------------------------------------------------------------- fuzzing


def mutate(data: bytes, ops: list[tuple[int, int]], fix_crcs: bool) -> bytes:
    """``data`` with bytes overwritten at ``ops`` (wrapped), then, if asked and still possible,
    its section CRCs and header refreshed so that the edit reaches the structural checks."""
    out = bytearray(data)
    for where, value in ops:
        out[where % len(out)] = value
    if fix_crcs:
        try:
            manifest, payload = split(bytes(out))
            for s in manifest["sections"]:
                _recrc(manifest, bytearray(payload), s["name"])
            return build(manifest, payload)
        except Exception:  # the edit broke the JSON or header: test the file as it is
            pass
    return bytes(out)


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       st.booleans())  # fmt: skip
def test_fuzz_v2_byte_edits(ops, fix_crcs):
    """Mutated version 2 files (CRCs refreshed or not) give the format's error or valid indices."""
    try:
        f = F.decode(mutate(tiny_v2(), ops, fix_crcs))
    except F.SlotFormatError:
        return
    for w in f.weights:
        assert f.indices(w.section).max() < w.k
    rebuild(f)


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.integers(0, 40), st.integers(0, 31), st.integers(0, 15), st.binary(max_size=40),
       st.sampled_from([2, 3, 5]), st.sampled_from(D.GAP_CODES))  # fmt: skip
def test_fuzz_delta_streams(changes, gap_param, rank_param, body, k, code):
    """Arbitrary delta sections: only DeltaError, and whatever decodes is within bounds."""
    params = dict(changes=changes, gap_param=gap_param, rank_param=rank_param, gap_code=code)
    try:
        D.check(body, count=40, k=k, **params)
    except D.DeltaError:
        return
    out = D.decode(
        body, count=40, k=k, **params, reference=lambda: np.zeros(40, np.uint16),
        slot_at=lambda p, ranks, ref: ranks,  # slot r at rank r, reference 0
    )  # fmt: skip
    assert out.shape == (40,) and int(out.max()) < k
    assert int((out != 0).sum()) == changes

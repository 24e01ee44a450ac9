"""The generator against its spec (docs/FORMAT.md §1): known answers, numpy == torch, statistics."""

import math

import numpy as np
import pytest
import torch

from slotpack import prng

# Published SplitMix64 outputs for seed 1234567 (Vigna's reference implementation).
SPLITMIX_1234567 = [
    6457827717110365317,
    3203168211198807973,
    9817491932198370423,
    4593380528125082431,
    16408922859458223821,
]


def _f32(hexes: str) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes.split()], dtype=np.uint32).view(np.float32)


def test_reference_splitmix64_vectors():
    assert [prng.splitmix64_output(1234567, i) for i in range(5)] == SPLITMIX_1234567
    assert prng.bits_np(1234567, np.arange(5)).tolist() == SPLITMIX_1234567
    got = prng.bits_torch(1234567, torch.arange(5)).tolist()
    assert [g & prng.MASK64 for g in got] == SPLITMIX_1234567


def test_spec_known_answers():
    """The vectors printed in docs/FORMAT.md §1.5."""
    assert prng.layer_key(0, 0) == 0xE220A8397B1DCDAF
    assert prng.layer_key(42, 3) == 0x581CE1FF0E4AE394
    bits = prng.bits_np(prng.layer_key(42, 3), np.arange(4)).tolist()
    assert bits == [0x3304D23DB2A8B503, 0x7AED7332B91656D8, 0x10B6A8F1B7DB329E, 0x9DE44388E4DA2AB4]
    bound = prng.glorot_bound(784, 300)
    assert np.float32(bound).view(np.uint32) == 0x3D985DF4
    expect = _f32("bd374590 bb413813 bd8478c8 3c8e5402 3cba1819 3cccb6e2 bca2efbb bafc4bd6")
    bank = prng.bank_np(42, 3, 2, 4, bound)
    assert bank.reshape(-1).view(np.uint32).tolist() == expect.view(np.uint32).tolist()
    torch_bank = prng.bank_torch(42, 3, 2, 4, bound).numpy()
    assert torch_bank.reshape(-1).view(np.uint32).tolist() == expect.view(np.uint32).tolist()


def test_value_formula_from_bits():
    """§1.3 written out with Python integers and one float32 multiply."""
    key, bound = prng.layer_key(7, 1), prng.glorot_bound(100, 30)
    counters = np.arange(1000)
    bits = prng.bits_np(key, counters)
    u = (bits >> np.uint64(40)).astype(np.int64) - 2**23
    manual = (u.astype(np.float32) * np.float32(bound)) * np.float32(2.0**-23)
    assert np.array_equal(
        manual.view(np.uint32), prng.values_np(key, counters, bound).view(np.uint32)
    )


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 12345, 2**64 - 1])
def test_numpy_equals_torch_on_millions(seed):
    key = prng.layer_key(seed, 5)
    rng = np.random.default_rng(seed % 2**32)
    # Arbitrary counters (not just a range), including huge ones near 2**63.
    counters = np.concatenate([np.arange(2_000_000), rng.integers(0, 2**63 - 1, 500_000)])
    a = prng.values_np(key, counters.astype(np.uint64), 0.0371)
    b = prng.values_torch(key, torch.from_numpy(counters.astype(np.int64)), 0.0371).numpy()
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    bits_a = prng.bits_np(key, counters[-1000:].astype(np.uint64))
    bits_b = prng.bits_torch(key, torch.from_numpy(counters[-1000:].astype(np.int64))).numpy()
    assert np.array_equal(bits_a, bits_b.view(np.uint64))


def test_selected_generates_the_bank_entries():
    n, k, bound = 70_001, 8, prng.glorot_bound(300, 100)
    bank = prng.bank_np(3, 2, n, k, bound)
    index = np.random.default_rng(0).integers(0, k, n)
    sel_np = prng.selected_np(3, 2, index, k, bound)
    sel_t = prng.selected_torch(3, 2, torch.from_numpy(index), k, bound).numpy()
    assert np.array_equal(sel_np, bank[np.arange(n), index])
    assert np.array_equal(sel_np.view(np.uint32), sel_t.view(np.uint32))


def test_layers_and_seeds_give_different_streams():
    a = prng.bank_np(0, 0, 1000, 4, 1.0)
    assert not np.array_equal(a, prng.bank_np(0, 1, 1000, 4, 1.0))
    assert not np.array_equal(a, prng.bank_np(1, 0, 1000, 4, 1.0))


def test_statistics():
    n = 4_000_000
    bound = 1.0
    v = prng.values_np(prng.layer_key(11, 0), np.arange(n, dtype=np.uint64), bound).astype(
        np.float64
    )
    assert v.min() >= -1.0 and v.max() < 1.0
    # Uniform on [-1, 1): mean 0, variance 1/3; 6 standard errors.
    assert abs(v.mean()) < 6 * math.sqrt(1 / 3 / n)
    assert abs(v.var() - 1 / 3) < 6 * math.sqrt(4 / 45 / n)
    # Chi-square over 1024 equal buckets: 1023 degrees of freedom, mean 1023, sd ~45.2.
    counts = np.bincount(((v + 1) * 512).astype(np.int64), minlength=1024)
    expected = n / 1024
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert 1023 - 6 * 45.2 < chi2 < 1023 + 6 * 45.2
    # Neighbouring counters (and neighbouring slots of one connection) are uncorrelated.
    r = np.corrcoef(v[:-1], v[1:])[0, 1]
    assert abs(r) < 6 / math.sqrt(n)
    # The low bit of the 24-bit integer is a fair coin too (no weak low bits).
    low = (np.round(v * 2**23).astype(np.int64) & 1).mean()
    assert abs(low - 0.5) < 6 * math.sqrt(0.25 / n)


def test_glorot_bound_is_float32_exact():
    b = prng.glorot_bound(64 * 9, 128 * 9)
    assert float(np.float32(b)) == b
    assert b == pytest.approx(math.sqrt(6 / (64 * 9 + 128 * 9)), rel=1e-7)
    with pytest.raises(ValueError):
        prng.glorot_bound(0, 3)


def test_initial_scores_in_range_and_distinct_from_values():
    s = prng.initial_scores_torch(0, 0, 10_000, 8, 0.5)
    assert s.min() >= 0 and s.max() < 0.5
    assert abs(s.mean().item() - 0.25) < 0.01
    bank = prng.bank_torch(0, 0, 10_000, 8, 0.5)
    assert abs(np.corrcoef(s.reshape(-1).numpy(), bank.reshape(-1).numpy())[0, 1]) < 0.02


@pytest.mark.parametrize("start,stop", [(0, 1), (5, 70_001), (3 * 2**16 - 7, 5 * 2**16 + 3)])
def test_counter_ranges_equal_explicit_counters_across_blocks(start, stop):
    key, bound = prng.layer_key(3, 2), prng.glorot_bound(50, 20)
    counters = torch.arange(start, stop, dtype=torch.int64)
    ranged = prng.values_range_torch(key, start, stop, bound)
    assert torch.equal(ranged, prng.values_torch(key, counters, bound))
    assert np.array_equal(ranged.numpy(), prng.values_np(key, counters.numpy(), bound))
    bank = prng.bank_torch(9, 1, 30_001, 5, bound)  # 150,005 values: three blocks
    assert np.array_equal(bank.numpy(), prng.bank_np(9, 1, 30_001, 5, bound))

"""The slotpack generator (``splitmix64-v1``): counter-based, random access, bit-exact everywhere.

docs/FORMAT.md is the specification; this module follows it to the bit. One value is

    key   = splitmix64_output(seed, layer)          # the layer-th output of SplitMix64(seed)
    bits  = splitmix64_output(key, i * K + k)       # connection i, slot k
    value = float32((bits >> 40) - 2**23) * float32(bound) * 2**-23   # one float32 rounding

where splitmix64_output(s, c) = mix64(s + (c + 1) * GAMMA mod 2**64). The numpy half is what the
torch-free runtime uses; the torch half (int64 arithmetic, masked shifts) runs on CPU and CUDA.
Both share :func:`_splitmix`, so the only backend-specific code is how a constant and a logical
right shift are spelled. torch is imported lazily: importing this module never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

GENERATOR_ID = "splitmix64-v1"
GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
MANTISSA_BITS = 24  # values lie on a 2**-24 grid of [0, 1), i.e. 2**-23 steps of [-1, 1)
# Scores are not part of any file; they get their own stream so that initial scores never
# correlate with the values they select between.
SCORE_STREAM_SALT = 0x5C0E5C0E5C0E5C0E
# The fixed draw that deploys a probabilistic model has its own stream too.
DRAW_STREAM_SALT = 0xD2A3D2A3D2A3D2A3
# The reference slot of the "onedraw" initialisation (docs/FORMAT.md §1.8): half an output per
# connection, so a reader regenerates the initial choice for less than the cost of its values.
REFERENCE_STREAM_SALT = 0x4EF0D4A74EF0D4A7
# Training only: the maximum initial score of an "onedraw" connection.
MAXIMUM_STREAM_SALT = 0x3A7C3A7C3A7C3A7C
# The order of the other slots under "onedraw16": 16-bit draws, four per output, so a reader
# orders a changed connection's slots for ceil(K/4) outputs instead of K.
ORDER_STREAM_SALT = 0x6F5D6F5D6F5D6F5D
# How a layer's initial scores were drawn, and so how a reader finds the reference slot
# (docs/FORMAT.md §1.7-1.8). "uniform": K independent scores, reference = their argmax (K values
# per connection to regenerate); "onedraw": the argmax slot drawn first (half an output each);
# "onedraw16": as "onedraw", the other slots' scores from 16-bit draws packed four per output.
INITS = ("uniform", "onedraw", "onedraw16")
DEFAULT_INIT = "onedraw16"  # new runs: the cheapest reference and reference order for a reader
ORDER_BITS = 16
# The inits (and greedy reference rules of the same name) whose reference slot is one draw.
ONEDRAW = ("onedraw", "onedraw16")
# numpy halves work on blocks of this many counters: their uint64 temporaries (128 KiB each) stay
# in L2, and small models keep the peak memory of a rebuild under twice their dense size.
NP_BLOCK = 1 << 14


def splitmix64_output(state: int, index: int) -> int:
    """The ``index``-th (0-based) output of SplitMix64 seeded with ``state``, in plain Python."""
    z = (state + (index + 1) * GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def layer_key(seed: int, layer: int) -> int:
    """The 64-bit key of weighted layer number ``layer`` (0-based, in model order)."""
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if layer < 0:
        raise ValueError(f"layer index must be >= 0, got {layer}")
    return splitmix64_output(seed, layer)


def score_key(seed: int, layer: int) -> int:
    """Key of the stream that initialises a layer's scores (training only, never stored)."""
    return layer_key(seed ^ SCORE_STREAM_SALT, layer)


def draw_key(seed: int, layer: int) -> int:
    """Key of the stream of a probabilistic layer's fixed draw (training side, never stored)."""
    return layer_key(seed ^ DRAW_STREAM_SALT, layer)


def reference_key(seed: int, layer: int) -> int:
    """Key of the stream that draws each connection's initial (reference) slot, init "onedraw"."""
    return layer_key(seed ^ REFERENCE_STREAM_SALT, layer)


def order_key(seed: int, layer: int) -> int:
    """Key of the stream of 16-bit draws that order the other slots, init "onedraw16"."""
    return layer_key(seed ^ ORDER_STREAM_SALT, layer)


def maximum_key(seed: int, layer: int) -> int:
    """Key of the stream of the largest initial score, inits "onedraw"/"onedraw16" (training only)."""
    return layer_key(seed ^ MAXIMUM_STREAM_SALT, layer)


def glorot_bound(fan_in: int, fan_out: int) -> float:
    """sqrt(6 / (fan_in + fan_out)) rounded once to float32 (returned as an exact Python float)."""
    if fan_in <= 0 or fan_out <= 0:
        raise ValueError(f"fans must be positive, got fan_in={fan_in}, fan_out={fan_out}")
    return float(np.float32(math.sqrt(6.0 / (fan_in + fan_out))))


@dataclass(frozen=True)
class _Backend:
    """How one array library spells a 64-bit constant and a logical right shift."""

    const: Callable[[int], Any]
    shr: Callable[[Any, int], Any]


def _splitmix(counters: Any, key: int, be: _Backend) -> Any:
    """SplitMix64 outputs for ``counters`` (consumed in place) under ``key``."""
    z = counters
    z += 1
    z *= be.const(GAMMA)
    z += be.const(key)
    return _mix(z, be)


def _mix(z: Any, be: _Backend) -> Any:
    """mix64 of §1.1, in place."""
    z ^= be.shr(z, 30)
    z *= be.const(MIX1)
    z ^= be.shr(z, 27)
    z *= be.const(MIX2)
    z ^= be.shr(z, 31)
    return z


# --------------------------------------------------------------------------- numpy half

_NP = _Backend(const=np.uint64, shr=lambda z, s: z >> np.uint64(s))


def _mix_np(z: np.ndarray) -> np.ndarray:
    return _mix(z, _NP)


def bits_np(key: int, counters: np.ndarray) -> np.ndarray:
    """Raw 64-bit outputs (uint64) for an array of counters; the input is not modified."""
    out = np.asarray(counters, dtype=np.uint64).copy()
    return _splitmix(out, key, _NP)


def _values_block_np(key: int, counters: np.ndarray, bound32: np.float32) -> np.ndarray:
    z = _splitmix(counters, key, _NP)
    z >>= np.uint64(64 - MANTISSA_BITS)
    t = z.view(np.int64)
    t -= 1 << (MANTISSA_BITS - 1)
    v = t.astype(np.float32)
    v *= bound32
    v *= np.float32(2.0 ** -(MANTISSA_BITS - 1))
    return v


def values_np(key: int, counters: np.ndarray, bound: float) -> np.ndarray:
    """float32 values for uint64-castable ``counters`` (any shape), on [-bound, bound)."""
    flat = np.asarray(counters).reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.float32)
    bound32 = np.float32(bound)
    for start in range(0, flat.shape[0], NP_BLOCK):
        block = flat[start : start + NP_BLOCK].astype(np.uint64)
        out[start : start + NP_BLOCK] = _values_block_np(key, block, bound32)
    return out.reshape(np.shape(counters))


def bank_np(seed: int, layer: int, n: int, k: int, bound: float) -> np.ndarray:
    """All K values of every connection of a layer: float32 array [n, k]."""
    counters = np.arange(n * k, dtype=np.uint64)
    return values_np(layer_key(seed, layer), counters, bound).reshape(n, k)


def selected_np(seed: int, layer: int, index: np.ndarray, k: int, bound: float) -> np.ndarray:
    """The selected value of each connection: ``index`` is the flat slot index per connection.

    Only one value per connection is generated (counter i*K + index[i]); the other K-1 never are.
    """
    index = np.asarray(index).reshape(-1)
    key = layer_key(seed, layer)
    out = np.empty(index.shape[0], dtype=np.float32)
    bound32 = np.float32(bound)
    k64 = np.uint64(k)
    for start in range(0, index.shape[0], NP_BLOCK):
        stop = min(start + NP_BLOCK, index.shape[0])
        c = np.arange(start, stop, dtype=np.uint64)
        c *= k64
        c += index[start:stop].astype(np.uint64)
        out[start:stop] = _values_block_np(key, c, bound32)
    return out


def _grid_np(key: int, start: int, stop: int) -> np.ndarray:
    """The 24-bit integers (bits >> 40) of counters start..stop-1 (uint64)."""
    z = _splitmix(np.arange(start, stop, dtype=np.uint64), key, _NP)
    z >>= np.uint64(64 - MANTISSA_BITS)
    return z


def initial_scores_np(
    seed: int, layer: int, n: int, k: int, bound: float, init: str = "uniform"
) -> np.ndarray:
    """The initial scores float32 [n, k] of §1.7 (numpy twin of :func:`initial_scores_torch`)."""
    if init in ONEDRAW:
        return _onedraw_scores_np(seed, layer, n, k, bound, init)
    grid = _grid_np(score_key(seed, layer), 0, n * k).astype(np.float32)
    grid *= np.float32(bound)
    grid *= np.float32(2.0**-MANTISSA_BITS)
    return grid.reshape(n, k)


REFERENCE_RULES = ("argmax", "onedraw", "onedraw16", "draw")


def _halfword_shift(j: int) -> int:
    """Slot j's 16-bit draw is (output j div 4 >> this) & 0xFFFF (§1.8), highest bits first."""
    return 48 - 16 * (j & 3)


def _order_grid_np(seed: int, layer: int, positions: np.ndarray, k: int, rule: str) -> np.ndarray:
    """The initial draws that order a connection's slots (§1.8: 24-bit, 16-bit for "onedraw16"),
    slot-major: uint64 [K, len(positions)], so a maximum over the slots is K-1 elementwise passes."""
    if rule == "onedraw16":  # counter i * ceil(K/4) + (k >> 2)
        w = -(-k // 4)
        outs = (np.arange(1, w + 1, dtype=np.uint64) * np.uint64(GAMMA)) + np.uint64(
            order_key(seed, layer)
        )
        z = _mix_np(outs[:, None] + positions.astype(np.uint64) * np.uint64((w * GAMMA) & MASK64))
        slots = np.arange(k)
        out = z[slots >> 2]  # [K, n]: slot j's output, then its 16 bits (highest first)
        out >>= (np.uint64(48) - np.uint64(16) * (slots & 3).astype(np.uint64))[:, None]
        out &= np.uint64(0xFFFF)
        return out
    return _slot_grid_np(draw_key(seed, layer) if rule == "draw" else score_key(seed, layer),
                         positions, k)  # fmt: skip


def _slot_grid_np(key: int, positions: np.ndarray, k: int) -> np.ndarray:
    """The 24-bit draws ``output(key, i*K + j) >> 40`` of every slot j of ``positions``,
    slot-major: uint64 [K, len(positions)]."""
    # output(key, c) = mix64(key + (c + 1) * GAMMA) with c = i*K + j: the affine part as one
    # broadcast sum of a per-slot and a per-connection term (mod 2**64)
    slots = (np.arange(1, k + 1, dtype=np.uint64) * np.uint64(GAMMA)) + np.uint64(key)
    z = slots[:, None] + positions.astype(np.uint64) * np.uint64((k * GAMMA) & MASK64)
    return _mix_np(z) >> np.uint64(64 - MANTISSA_BITS)


# The crossing order (§1.8): integer scores on this scale (the reference's score, or for
# "argmax" the scores' own 2**24 grid), a margin in 1/256ths of it.
CROSSING_SCALE = {"onedraw16": 1 << 17, "onedraw": 1 << 24, "argmax": 1 << 24}
MAX_MARGIN = 65535
_INF_BITS = 0x7FF0000000000000  # +infinity's binary64 pattern


def _crossing_grid_np(
    seed: int, layer: int, positions: np.ndarray, ref: np.ndarray, k: int, rule: str, margin: int
) -> np.ndarray:
    """Draw-like integers of the crossing order (§1.8), slot-major uint64 [K, len(positions)]:
    ``2**47 - 1 - (bits(t) >> 16)``, so that larger means earlier, as the reference order's draws.

    Every score line s_j + c * v_j of a connection moves with the same c in training (the
    straight-through gradient of slot j is g * v_j); t_j = (S_a + M - S_j) / |U_j - U_a| is how
    far c must go before slot j overtakes the reference a (infinite for an equal value)."""
    if rule not in CROSSING_SCALE:
        raise ValueError(f"reference rule {rule!r} has no crossing order")
    cols = np.arange(positions.size)
    scale = CROSSING_SCALE[rule]
    s = _order_grid_np(seed, layer, positions, k, rule).view(np.int64)
    if rule == "onedraw16":  # 2u + 1: (u + 1/2) * 2**-16 of the reference's score
        s <<= 1
        s |= 1
    if rule in ONEDRAW:
        s[ref, cols] = scale
    top = s[ref, cols] + margin * (scale >> 8)
    np.subtract(top, s, out=s)
    np.maximum(s, 0, out=s)  # numerator N_j = max(0, S_a + M - S_j)
    u = _slot_grid_np(layer_key(seed, layer), positions, k).view(np.int64)
    u -= u[ref, cols]
    np.abs(u, out=u)  # denominator D_j = |U_j - U_a|
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.true_divide(s, u)  # one IEEE double division each (both exact doubles)
    # D_j = 0 gives +inf, or NaN (either sign) for 0/0: as unsigned patterns both are at least
    # +inf's, so a minimum makes every one +inf, the spec's t_j for an equal value.
    draws = t.view(np.uint64)
    np.minimum(draws, np.uint64(_INF_BITS), out=draws)
    draws >>= np.uint64(16)
    np.subtract(np.uint64((1 << 47) - 1), draws, out=draws)
    return draws


def _first_max(keys: np.ndarray) -> np.ndarray:
    """Slot of the largest order key of each column of ``keys`` (see :func:`_keys`)."""
    return 0xFFFF - (keys.max(0) & 0xFFFF)


def _reference_at(
    seed: int, layer: int, positions: np.ndarray, k: int, bound: float, rule: str
) -> np.ndarray:
    if rule in ONEDRAW:  # two connections per output: high half, then low
        pos = positions.astype(np.uint64)
        z = _splitmix(pos >> np.uint64(1), reference_key(seed, layer), _NP)
        odd = (pos & np.uint64(1)).astype(bool)
        z[~odd] >>= np.uint64(32)
        z &= np.uint64(0xFFFFFFFF)
        z *= np.uint64(k)
        z >>= np.uint64(32)
        return z.astype(np.int64)
    if rule not in REFERENCE_RULES:
        raise ValueError(f"unknown reference rule {rule!r}; known: {', '.join(REFERENCE_RULES)}")
    grid = _order_grid_np(seed, layer, positions, k, rule)
    if rule == "argmax":  # the scores' own float32 rounding, so ties fall as torch's argmax
        scores = grid.astype(np.float32)
        scores *= np.float32(bound)
        # non-negative float32s order as their bit patterns do
        grid = scores.view(np.uint32).astype(np.uint64)
    return _first_max(_keys(grid, k))


def reference_np(seed: int, layer: int, n: int, k: int, bound: float, rule: str) -> np.ndarray:
    """The reference slot (uint16) of connections 0..n-1 under ``rule`` (§1.8).

    "argmax": the first maximum of the "uniform" initial scores (K draws per connection);
    "onedraw" and "onedraw16": half a draw per connection; "draw": the first maximum of the
    fixed-draw stream's 24-bit integers (probabilistic models).
    """
    out = np.empty(n, dtype=np.uint16)
    if rule in ONEDRAW:  # contiguous pairs: each output's halves, high first
        key, mask, k64 = reference_key(seed, layer), np.uint64(0xFFFFFFFF), np.uint64(k)
        for a in range(0, n, 2 * NP_BLOCK):
            b = min(n, a + 2 * NP_BLOCK)
            z = _splitmix(np.arange(a // 2, (b + 1) // 2, dtype=np.uint64), key, _NP)
            halves = np.empty(2 * z.size, dtype=np.uint64)
            halves[0::2] = z >> np.uint64(32)
            halves[1::2] = z & mask
            halves *= k64
            halves >>= np.uint64(32)
            out[a:b] = halves[: b - a]
        return out
    step = max(1, NP_BLOCK // k)
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = _reference_at(seed, layer, np.arange(a, b), k, bound, rule)
    return out


def _order_keys(
    seed: int, layer: int, positions: np.ndarray, k: int, rule: str,
    ref: np.ndarray | None = None, crossing: int | None = None,
) -> np.ndarray:  # fmt: skip
    """int64 [K, len]: larger means earlier in the reference order (ignoring the reference), or
    in the crossing order with margin ``crossing`` (which needs the reference slots ``ref``)."""
    if crossing is None:
        return _keys(_order_grid_np(seed, layer, positions, k, rule), k)
    return _keys(_crossing_grid_np(seed, layer, positions, ref, k, rule, crossing), k)


def _keys(draws: np.ndarray, k: int) -> np.ndarray:
    """Order keys (int64, slot-major [K, len]) of draws below 2**47 (uint64, changed in place):
    draw * 2**16 + (2**16 - 1 - slot), so decreasing keys are decreasing draws, then increasing
    slots (K <= 2**16), and the low 16 bits give the slot back."""
    draws <<= np.uint64(16)
    draws |= (np.uint64(0xFFFF) - np.arange(k, dtype=np.uint64))[:, None]
    return draws.view(np.int64)


def reference_order_np(
    seed: int, layer: int, positions: np.ndarray, k: int, bound: float, rule: str,
    crossing: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Each connection's slots in reference order, int64 [len(positions), K] (§1.8): the
    reference slot first, then the others by decreasing initial draw (ties: lower slot first);
    with a margin ``crossing``, the others in the crossing order instead."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    out = np.empty((positions.size, k), dtype=np.int64)
    step = max(1, NP_BLOCK // k)
    for a in range(0, positions.size, step):
        pos = positions[a : a + step]
        ref = _reference_at(seed, layer, pos, k, bound, rule)
        keys = _order_keys(seed, layer, pos, k, rule, ref, crossing)
        keys[ref, np.arange(pos.size)] = -1  # last of the sort, then moved to the front
        out[a : a + step, 0] = ref
        out[a : a + step, 1:] = 0xFFFF - (-np.sort(-keys, axis=0)[:-1].T & 0xFFFF)
    return out


def ranks_np(
    seed: int, layer: int, positions: np.ndarray, slots: np.ndarray, ref: np.ndarray, k: int,
    rule: str, crossing: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Position (1..K-1) of ``slots`` (never the reference ``ref``) in the reference order of
    ``positions`` (the crossing order with margin ``crossing`` if given): one more than the
    other non-reference slots before them."""
    out = np.empty(positions.size, dtype=np.int64)
    step = max(1, NP_BLOCK // k)
    for a in range(0, positions.size, step):
        cols = np.arange(min(step, positions.size - a))
        keys = _order_keys(
            seed, layer, positions[a : a + step], k, rule, ref[a : a + step], crossing
        )
        mine = keys[slots[a : a + step], cols]
        keys[ref[a : a + step], cols] = -1
        out[a : a + step] = 1 + (keys > mine).sum(0)
    return out


# Ranks up to this are found by dropping maxima one at a time (most changes take rank 1 or 2),
# later ones by sorting what is left.
_PEEL = 4


def slots_at_ranks_np(
    seed: int, layer: int, positions: np.ndarray, ranks: np.ndarray, ref: np.ndarray, k: int,
    rule: str, crossing: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Inverse of :func:`ranks_np`: the slot at rank ``ranks`` (1..K-1) of each connection.

    With the reference's key set below all others, rank r is the r-th largest order key, whose
    low 16 bits give its slot: rank 1 (the runner-up, most changes) is one maximum over the
    slots, ranks up to ``_PEEL`` drop the maximum and take the next, later ones sort the rest."""
    out = np.empty(positions.size, dtype=np.int64)
    step = max(1, (NP_BLOCK * 4) // k)
    for a in range(0, positions.size, step):
        keys = _order_keys(
            seed, layer, positions[a : a + step], k, rule, ref[a : a + step], crossing
        )
        want = ranks[a : a + step]
        keys[ref[a : a + step], np.arange(want.size)] = -1
        best = keys.max(0)
        rows = np.flatnonzero(want > 1)
        if rows.size:
            sub, tops = keys.take(rows, axis=1), [best[rows]]  # take: slot-major as keys
            cols = np.arange(rows.size)
            for _ in range(min(_PEEL, k - 1) - 1):  # a rank is at most K-1
                sub[0xFFFF - (tops[-1] & 0xFFFF), cols] = -1  # drop the maximum's slot
                tops.append(sub.max(0))
            w = want[rows]
            near = np.flatnonzero(w <= _PEEL)
            best[rows[near]] = np.stack(tops)[w[near] - 1, near]
            far = np.flatnonzero(w > _PEEL)  # rank _PEEL is now the largest key left
            if far.size:
                left = -np.sort(-sub[:, far].T, axis=1)
                best[rows[far]] = left[np.arange(far.size), w[far] - _PEEL]
        out[a : a + step] = 0xFFFF - (best & 0xFFFF)
    return out


def _onedraw_scores_np(
    seed: int, layer: int, n: int, k: int, bound: float, init: str
) -> np.ndarray:
    """Scores whose argmax is the reference slot (§1.8): see :func:`_onedraw_scores`."""
    ref = reference_np(seed, layer, n, k, bound, init)
    top = _grid_np(maximum_key(seed, layer), 0, n).astype(np.float64)
    if init == "onedraw16":
        unit = np.empty((n, k), dtype=np.float32)
        step = max(1, NP_BLOCK // k)
        for a in range(0, n, step):
            pos = np.arange(a, min(n, a + step))
            unit[a : a + step] = _order_grid_np(seed, layer, pos, k, init).T
        unit += 0.5
        unit *= np.float32(2.0**-ORDER_BITS)
    else:
        unit = _grid_np(score_key(seed, layer), 0, n * k).astype(np.float32).reshape(n, k)
        unit *= np.float32(2.0**-MANTISSA_BITS)
    return _onedraw_scores(np, ref.astype(np.int64), top, unit, k, bound)


def _onedraw_scores(xp: Any, ref: Any, top: Any, unit: Any, k: int, bound: float) -> Any:
    """Shared by both halves. ``top`` (float64) holds 24-bit integers, ``unit`` (float32 [n, K])
    the others' draws in [0, 1): the 2**-24 grid ("onedraw") or 16-bit midpoints ("onedraw16").

    The largest score is bound * w with w = ((top + 1/2) / 2**24) ** (1/K), the law of the
    maximum of K uniforms; the others are float32(m * u), which rounds strictly below m for any
    normal m > 0 and u <= 1 - 2**-17, so the argmax is exactly ``ref``. The joint law is that of
    K independent U[0, bound) scores (for "onedraw16", the others on a grid of 2**16 steps).
    Training only: a reader needs ``ref`` and the draws' order, never these floats (pow may
    differ in its last bit between libraries).
    """
    m = ((top + 0.5) * 2.0**-MANTISSA_BITS) ** (1.0 / k) * bound
    m = m.astype(np.float32) if xp is np else m.to(unit.dtype)
    others = unit
    others *= m[:, None]
    rows = xp.arange(others.shape[0])
    others[rows, ref] = m
    return others


# --------------------------------------------------------------------------- torch half


def _s64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_TORCH = _Backend(const=_s64, shr=lambda z, s: (z >> s) & ((1 << (64 - s)) - 1))


def bits_torch(key: int, counters: torch.Tensor) -> torch.Tensor:
    """Raw outputs as int64 tensors holding the uint64 bits; the input is not modified."""
    import torch

    return _splitmix(counters.to(torch.int64).clone(), key, _TORCH)


def _unit_torch(key: int, counters: torch.Tensor) -> torch.Tensor:
    """Signed 24-bit integers (bits >> 40) - 2**23 as float32 (exact)."""
    import torch

    z = _splitmix(counters, key, _TORCH)
    z = _TORCH.shr(z, 64 - MANTISSA_BITS) - (1 << (MANTISSA_BITS - 1))
    return z.to(torch.float32)


def _torch_block(device: torch.device) -> int:
    # Small blocks keep CPU temporaries in cache; on a GPU they bound the int64 temporaries
    # (a VGG-19 bank at K=64 would otherwise need several 10 GB buffers at once).
    return 1 << 16 if device.type == "cpu" else 1 << 24


def _scaled_block(
    key: int, counters: torch.Tensor, bound: float, offset: float, scale: float
) -> torch.Tensor:
    """float32 ((bits >> 40) - 2**23 + offset) * bound * scale for int64 ``counters`` (consumed)."""
    t = _unit_torch(key, counters)
    if offset:
        t.add_(offset)  # integers below 2**24: exact
    # bound is an exact float32, so this is one correctly rounded float32 multiply; the
    # power-of-two scale after it is exact.
    t.mul_(float(np.float32(bound)))
    t.mul_(scale)
    return t


def _scaled_torch(
    key: int, counters: torch.Tensor, bound: float, offset: float, scale: float
) -> torch.Tensor:
    """``_scaled_block`` over any counters tensor, in device-sized blocks."""
    import torch

    flat = counters.reshape(-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    step = _torch_block(flat.device)
    for start in range(0, flat.shape[0], step):
        block = flat[start : start + step].to(torch.int64).clone()
        out[start : start + step] = _scaled_block(key, block, bound, offset, scale)
    return out.view(counters.shape)


def _scaled_range_torch(
    key: int, start: int, stop: int, bound: float, offset: float, scale: float, device
) -> torch.Tensor:
    """``_scaled_block`` for counters start..stop-1, never holding more than a block of them."""
    import torch

    out = torch.empty(stop - start, dtype=torch.float32, device=device)
    step = _torch_block(out.device)
    for a in range(start, stop, step):
        b = min(stop, a + step)
        block = torch.arange(a, b, dtype=torch.int64, device=device)
        out[a - start : b - start] = _scaled_block(key, block, bound, offset, scale)
    return out


def values_torch(key: int, counters: torch.Tensor, bound: float) -> torch.Tensor:
    """float32 values for int64 ``counters`` on their own device; bit-identical to values_np."""
    return _scaled_torch(key, counters, bound, 0.0, 2.0 ** -(MANTISSA_BITS - 1))


def values_range_torch(
    key: int, start: int, stop: int, bound: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """values_torch for the counters start..stop-1, without materialising them."""
    return _scaled_range_torch(key, start, stop, bound, 0.0, 2.0 ** -(MANTISSA_BITS - 1), device)


def bank_torch(
    seed: int, layer: int, n: int, k: int, bound: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """All K values of every connection, float32 [n, k], generated on ``device``."""
    return values_range_torch(layer_key(seed, layer), 0, n * k, bound, device).view(n, k)


def selected_torch(
    seed: int, layer: int, index: torch.Tensor, k: int, bound: float
) -> torch.Tensor:
    """The selected value of each connection, generating only counter i*K + index[i]."""
    import torch

    index = index.reshape(-1).to(torch.int64)
    counters = torch.arange(index.shape[0], dtype=torch.int64, device=index.device) * k + index
    return values_torch(layer_key(seed, layer), counters, bound)


def uniform_torch(key: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """n float32 values U[0, 1) on the 2**-24 grid from counters 0..n-1 of ``key``."""
    half = float(1 << (MANTISSA_BITS - 1))
    return _scaled_range_torch(key, 0, n, 1.0, half, 2.0**-MANTISSA_BITS, device)


def initial_scores_torch(
    seed: int,
    layer: int,
    n: int,
    k: int,
    bound: float,
    device: torch.device | str | None = None,
    init: str = "uniform",
) -> torch.Tensor:
    """Scores U[0, bound) on the 2**-24 grid, as the reference code's U(0, bound) initialisation.

    ``init="onedraw"`` draws the same law with the argmax slot first, ``"onedraw16"`` also the
    others' order from 16-bit draws (§1.7-1.8)."""
    half = float(1 << (MANTISSA_BITS - 1))
    if init in ONEDRAW:
        import torch

        ref = reference_torch(seed, layer, n, k, device)
        top = _scaled_range_torch(maximum_key(seed, layer), 0, n, 1.0, half, 1.0, device)
        if init == "onedraw16":
            unit = _order_units_torch(seed, layer, n, k, device)
        else:
            unit = _scaled_range_torch(
                score_key(seed, layer), 0, n * k, 1.0, half, 2.0**-MANTISSA_BITS, device
            ).view(n, k)
        return _onedraw_scores(torch, ref, top.double(), unit, k, bound)
    if init != "uniform":
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    key = score_key(seed, layer)
    return _scaled_range_torch(key, 0, n * k, bound, half, 2.0**-MANTISSA_BITS, device).view(n, k)


def _order_units_torch(
    seed: int, layer: int, n: int, k: int, device: torch.device | str | None
) -> torch.Tensor:
    """(u + 1/2) * 2**-16 of the 16-bit draws of init "onedraw16", float32 [n, K] (exact)."""
    import torch

    w, key = -(-k // 4), order_key(seed, layer)
    out = torch.empty(n, k, dtype=torch.float32, device=device)
    step = max(1, _torch_block(out.device) // w)
    for a in range(0, n, step):
        b = min(n, a + step)
        counters = torch.arange(a * w, b * w, dtype=torch.int64, device=device)
        z = _splitmix(counters, key, _TORCH).view(b - a, w).T
        for j in range(k):  # an arithmetic shift: the mask drops the sign bits
            half = (z[j >> 2] >> _halfword_shift(j)) & 0xFFFF
            out[a:b, j] = half.to(torch.float32).add_(0.5).mul_(2.0**-ORDER_BITS)
    return out


def reference_torch(
    seed: int, layer: int, n: int, k: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The "onedraw" (and "onedraw16") reference slot of connections 0..n-1 (int64), as
    :func:`reference_np`."""
    import torch

    key = reference_key(seed, layer)
    out = torch.empty(n, dtype=torch.int64, device=device)
    step = _torch_block(out.device)
    for a in range(0, n, step):
        pos = torch.arange(a, min(n, a + step), dtype=torch.int64, device=device)
        z = _splitmix(pos >> 1, key, _TORCH)
        half = torch.where(pos & 1 == 1, z & 0xFFFFFFFF, _TORCH.shr(z, 32))
        out[a : a + step] = (half * k) >> 32  # < 2**32 * 2**16: no int64 overflow
    return out

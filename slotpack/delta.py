"""The ``delta`` index coding (docs/FORMAT.md §2.6): only the connections that left their
reference slot, numpy only.

Most connections of a trained slot network still use the slot their seeded initial scores chose
(the reference slot, regenerable from the seed: ``prng.reference_np``). A delta section stores

- where the changed connections are: the gaps between them, Rice- or Exp-Golomb-coded (Rice
  suits gaps spread evenly, Exp-Golomb gaps that cluster, as in a first layer whose border pixels
  never change);
- which slot each changed connection uses: its rank in the connection's *reference order* (the
  reference slot first, then the others by decreasing initial draw) or its *crossing order*
  (the others by how far training must move the connection's score lines before they overtake
  the reference), Rice-coded. Small ranks dominate: in the large layers of trained networks
  77-86% of the changes take crossing rank 1, against 40-46% for the reference order's.

Every code is split into a unary stream (Rice quotients, or Exp-Golomb's extra lengths) and a stream
of fixed- or known-width fields, so decoding is a handful of vectorised numpy passes: the zeros of
a unary stream end its codes.
Decoding is bounded by the declared counts: nothing larger than the declared output is allocated
and a stream that does not parse raises :class:`DeltaError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_GAP_PARAM = 31
MAX_RANK_PARAM = 15
GAP_CODES = ("rice", "expgolomb")
MAX_FIELD = 31  # an Exp-Golomb field never needs more bits: gaps are below 2**31
BLOCK = 1 << 14

# Crossing margins a writer tries (§1.8, 1/256ths of the reference's score), on an even sample
# of at most MARGIN_SAMPLE changes and MARGIN_SLOTS slots (K per change) of a layer: the margin
# only steers the predictor, so a sample finds it.
MARGINS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256, 384, 512)
MARGIN_SAMPLE = 1 << 15
MARGIN_SLOTS = 1 << 20

# rank_of(positions, slots, references, crossing) -> each slot's rank 1..K-1 in its reference
# order (crossing None) or its crossing order with that margin;
# slot_at(positions, ranks, references) -> the slot at that rank (its inverse, order known).
RankOf = Callable[[np.ndarray, np.ndarray, np.ndarray, int | None], np.ndarray]
Ranks = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class DeltaError(ValueError):
    """A delta stream does not decode to the declared counts (the format maps it to its error)."""


@dataclass(frozen=True)
class Delta:
    """An encoded delta section: its bytes and the parameters its manifest entry declares."""

    data: bytes
    changes: int
    gap_param: int
    rank_param: int
    gap_code: str = "rice"
    crossing: int | None = None  # the crossing order's margin; None: the reference order


# ------------------------------------------------------------------------- Rice streams


def _unary(q: np.ndarray) -> bytes:
    """Each value as that many one-bits and a terminating zero-bit, packed MSB first."""
    bits = np.ones(int(q.sum()) + q.size, dtype=np.uint8)
    bits[np.cumsum(q + 1) - 1] = 0
    return np.packbits(bits).tobytes()


def _fixed(values: np.ndarray, width: int) -> bytes:
    """Values as ``width``-bit fields, MSB first, packed without gaps (empty for width 0)."""
    if width == 0 or values.size == 0:
        return b""
    out = []
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    for a in range(0, values.size, BLOCK):
        v = values[a : a + BLOCK].astype(np.uint64)
        out.append(((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1))
    return np.packbits(np.concatenate(out)).tobytes()


def rice_length(values: np.ndarray, param: int) -> int:
    """Bytes of the two streams of ``values`` Rice-coded with ``param`` (each padded to bytes)."""
    unary_bits = int((values >> param).sum()) + values.size
    return -(-unary_bits // 8) + -(-values.size * param // 8)


def best_param(values: np.ndarray, limit: int) -> int:
    """The Rice parameter in 0..limit that codes ``values`` in the fewest bytes (ties: smallest)."""
    if values.size == 0:
        return 0
    top = min(limit, max(0, int(values.max()).bit_length()))
    lengths = [rice_length(values, p) for p in range(top + 1)]
    return int(np.argmin(lengths))


def rice_encode(values: np.ndarray, param: int) -> bytes:
    """The unary stream of ``values >> param`` then the ``param``-bit remainders (byte-aligned)."""
    values = values.astype(np.int64)
    rem = values & ((1 << param) - 1)
    return _unary(values >> param) + _fixed(rem, param)


def _read_unary(view: np.ndarray, start: int, count: int, max_bits: int) -> tuple[np.ndarray, int]:
    """``count`` unary codes from byte ``start``; returns the quotients and the next byte."""
    if count == 0:
        return np.zeros(0, dtype=np.int64), start
    nbytes = min(view.size - start, -(-max_bits // 8))
    bits = np.unpackbits(view[start : start + nbytes])
    zeros = np.flatnonzero(bits[:max_bits] == 0)
    if zeros.size < count:
        raise DeltaError(f"a unary stream ends after {zeros.size} of {count} codes")
    zeros = zeros[:count]
    end = int(zeros[-1]) + 1
    if bits[end : -(-end // 8) * 8].any():
        raise DeltaError("the padding after a unary stream is not zero")
    q = np.diff(zeros, prepend=-1) - 1
    return q, start + -(-end // 8)


def _read_fixed(view: np.ndarray, start: int, count: int, width: int) -> tuple[np.ndarray, int]:
    nbytes = -(-count * width // 8)
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64), start
    if start + nbytes > view.size:
        raise DeltaError("a remainder stream runs past the end of the section")
    bits = np.unpackbits(view[start : start + nbytes])
    if bits[count * width :].any():
        raise DeltaError("the padding after a remainder stream is not zero")
    out = np.zeros(count, dtype=np.int64)
    fields = bits[: count * width].reshape(count, width)
    for j in range(width):
        out <<= 1
        out |= fields[:, j]
    return out, start + nbytes


def rice_decode(
    view: np.ndarray, start: int, count: int, param: int, max_total: int
) -> tuple[np.ndarray, int]:
    """``count`` Rice-coded values from byte ``start`` whose quotients add up to at most
    ``max_total >> param`` (the reader's bound); returns the values and the next byte."""
    q, start = _read_unary(view, start, count, (max_total >> param) + count)
    r, start = _read_fixed(view, start, count, param)
    return (q << param) | r, start


def _eg_widths(values: np.ndarray, param: int) -> np.ndarray:
    """Exp-Golomb order ``param``: the extra length L of each value (floor(log2(v + 2**param))
    - param), so that its field holds L + param bits."""
    m = values.astype(np.int64) + (1 << param)
    return np.floor(np.log2(m.astype(np.float64))).astype(np.int64) - param  # exact below 2**52


def eg_length(values: np.ndarray, param: int) -> int:
    """Bytes of the two streams of ``values`` Exp-Golomb-coded with ``param`` (each padded)."""
    extra = _eg_widths(values, param)
    total = int(extra.sum())
    return -(-(total + values.size) // 8) + -(-(total + values.size * param) // 8)


def eg_encode(values: np.ndarray, param: int) -> bytes:
    """The unary stream of the extra lengths L, then each ``v + 2**param`` without its leading
    one-bit in L + ``param`` bits, MSB first (byte-aligned)."""
    extra = _eg_widths(values, param)
    width = extra + param
    m = values.astype(np.int64) + (1 << param)
    out = []
    shifts = np.arange(MAX_FIELD - 1, -1, -1, dtype=np.int64)
    for a in range(0, values.size, BLOCK):
        bits = ((m[a : a + BLOCK, None] >> shifts) & 1).astype(np.uint8)
        keep = shifts[None, :] < width[a : a + BLOCK, None]  # the low `width` bits of each row
        out.append(bits[keep])
    fields = np.packbits(np.concatenate(out)).tobytes() if values.size else b""
    return _unary(extra) + fields


def _read_fields(view: np.ndarray, start: int, widths: np.ndarray) -> tuple[np.ndarray, int]:
    """Fields of the given widths (each <= MAX_FIELD) packed MSB first from byte ``start``."""
    total = int(widths.sum())
    nbytes = -(-total // 8)
    if start + nbytes > view.size:
        raise DeltaError("a field stream runs past the end of the section")
    body = np.zeros(nbytes + 5, dtype=np.uint64)
    body[:nbytes] = view[start : start + nbytes]
    ends = np.cumsum(widths)
    begins = ends - widths
    out = np.zeros(widths.size, dtype=np.uint64)
    for a in range(0, widths.size, BLOCK):  # a 40-bit window covers any field and its offset
        byte = (begins[a : a + BLOCK] >> 3).astype(np.int64)
        window = np.zeros(byte.size, dtype=np.uint64)
        for j in range(5):
            window = (window << np.uint64(8)) | body[byte + j]
        shift = (40 - (begins[a : a + BLOCK] & 7) - widths[a : a + BLOCK]).astype(np.uint64)
        mask = (np.uint64(1) << widths[a : a + BLOCK].astype(np.uint64)) - np.uint64(1)
        out[a : a + BLOCK] = (window >> shift) & mask
    if total % 8 and int(view[start + nbytes - 1]) & ((1 << (8 - total % 8)) - 1):
        raise DeltaError("the padding after a field stream is not zero")
    return out.astype(np.int64), start + nbytes


def eg_decode(
    view: np.ndarray, start: int, count: int, param: int, max_total: int
) -> tuple[np.ndarray, int]:
    """``count`` Exp-Golomb-coded values from byte ``start`` whose sum is at most ``max_total``
    (the reader's bound: each extra length L is at most ``v >> param``, since v >= 2**param *
    (2**L - 1)); returns the values and the next byte."""
    extra, start = _read_unary(view, start, count, (max_total >> param) + count)
    if count and int(extra.max()) + param > MAX_FIELD:
        raise DeltaError(f"an Exp-Golomb code is longer than {MAX_FIELD} bits")
    width = extra + param
    fields, start = _read_fields(view, start, width)
    return (np.int64(1) << width) + fields - (1 << param), start


def best_code(values: np.ndarray) -> tuple[str, int]:
    """The gap code and parameter that take the fewest bytes (ties: Rice, then smaller)."""
    rice = best_param(values, MAX_GAP_PARAM)
    best = (rice_length(values, rice), 0, rice)
    top = min(MAX_GAP_PARAM, max(0, int(values.max()).bit_length())) if values.size else 0
    for p in range(top + 1):
        best = min(best, (eg_length(values, p), 1, p))
    return GAP_CODES[best[1]], best[2]


# ------------------------------------------------------------------------- the section


def encode(
    index: np.ndarray, reference: np.ndarray, k: int, rank_of: RankOf, crossing: bool = True
) -> Delta:
    """The delta section of ``index`` against ``reference`` (same length), smallest parameters:
    ranks in the reference order or (``crossing``) the crossing order of the best margin found.

    At K=2 a changed connection can only use the other slot: there are no rank streams."""
    index = np.asarray(index).reshape(-1)
    changed = np.flatnonzero(index != reference)
    if changed.size == 0:
        return Delta(b"", 0, 0, 0)
    gaps = np.diff(changed, prepend=-1) - 1
    code, g = best_code(gaps)
    gap_bytes = rice_encode(gaps, g) if code == "rice" else eg_encode(gaps, g)
    if k == 2:
        return Delta(gap_bytes, int(changed.size), g, 0, code)
    slots, refs = index[changed].astype(np.int64), reference[changed].astype(np.int64)
    orders: list[int | None] = [None]
    if crossing:
        orders.append(best_margin(changed, slots, refs, k, rank_of))
    best = None
    for order in orders:  # ties: the reference order (cheaper to decode)
        ranks = rank_of(changed, slots, refs, order) - 1
        r = best_param(ranks, MAX_RANK_PARAM)
        size = rice_length(ranks, r) + crossing_key_bytes(order)
        if best is None or size < best[0]:
            best = (size, ranks, r, order)
    _, ranks, r, order = best
    return Delta(gap_bytes + rice_encode(ranks, r), int(changed.size), g, r, code, order)


def crossing_key_bytes(margin: int | None) -> int:
    """What the crossing order adds to the manifest: ``,"crossing":<margin>`` (none for the
    reference order), so that a tiny layer does not trade a byte of ranks for more of JSON."""
    return 0 if margin is None else len(f',"crossing":{margin}')


def best_margin(
    positions: np.ndarray, slots: np.ndarray, refs: np.ndarray, k: int, rank_of: RankOf
) -> int:
    """The crossing margin of :data:`MARGINS` whose ranks code shortest on an even sample of the
    changes (ties: the smaller margin)."""
    sample = max(1, min(MARGIN_SAMPLE, MARGIN_SLOTS // k))
    pick = np.arange(0, positions.size, max(1, -(-positions.size // sample)))
    pos, sl, rf = positions[pick], slots[pick], refs[pick]
    costs = []
    for margin in MARGINS:
        ranks = rank_of(pos, sl, rf, margin) - 1
        costs.append((rice_length(ranks, best_param(ranks, MAX_RANK_PARAM)), margin))
    return min(costs)[1]


def changed_positions(
    data: bytes | memoryview, count: int, changes: int, gap_param: int, gap_code: str = "rice"
) -> tuple[np.ndarray, int]:
    """The changed connections (int64, increasing) and the byte where the rank streams start."""
    view = np.frombuffer(data, dtype=np.uint8)
    decode_gaps = rice_decode if gap_code == "rice" else eg_decode
    gaps, at = decode_gaps(view, 0, changes, gap_param, max(0, count - changes))
    positions = np.cumsum(gaps + 1) - 1
    if changes and int(positions[-1]) >= count:
        raise DeltaError(f"a changed connection lies past the layer's {count} connections")
    return positions, at


def _streams(
    data: bytes | memoryview,
    count: int,
    k: int,
    changes: int,
    gap_param: int,
    rank_param: int,
    gap_code: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The changed positions and their ranks (minus one), checked against every bound."""
    view = np.frombuffer(data, dtype=np.uint8)
    if changes > count:
        raise DeltaError(f"{changes} changed connections declared for {count}")
    if gap_code not in GAP_CODES:
        raise DeltaError(f"unknown gap code {gap_code!r}")
    positions, at = changed_positions(data, count, changes, gap_param, gap_code)
    if k == 2 and rank_param:
        raise DeltaError("K=2 has no rank streams, so rank_param must be 0")
    ranks = np.zeros(changes, dtype=np.int64)
    if k > 2:
        ranks, at = rice_decode(view, at, changes, rank_param, changes * (k - 2))
    if at != view.size:
        raise DeltaError(f"the section has {view.size - at} bytes after its streams")
    if changes and int(ranks.max()) > k - 2:
        raise DeltaError(f"a rank is >= K-1 = {k - 1}")
    return positions, ranks


def check(
    data: bytes | memoryview,
    *,
    count: int,
    k: int,
    changes: int,
    gap_param: int,
    rank_param: int,
    gap_code: str = "rice",
) -> tuple[np.ndarray, np.ndarray]:
    """The changed positions and their ranks (1..K-1); DeltaError unless the section decodes
    (the reader's structural check, which needs no generator)."""
    positions, ranks = _streams(data, count, k, changes, gap_param, rank_param, gap_code)
    return positions, ranks + 1


def expand(
    positions: np.ndarray, ranks: np.ndarray, k: int, reference: np.ndarray, slot_at: Ranks
) -> np.ndarray:
    """The indices (uint16) from the checked streams and the layer's reference slots."""
    index = reference.astype(np.uint16, copy=True)
    if positions.size and k == 2:
        index[positions] = 1 - index[positions]
    elif positions.size:
        index[positions] = slot_at(positions, ranks, index[positions].astype(np.int64))
    return index


def decode(
    data: bytes | memoryview,
    *,
    count: int,
    k: int,
    changes: int,
    gap_param: int,
    rank_param: int,
    reference: Callable[[], np.ndarray],
    slot_at: Ranks,
    gap_code: str = "rice",
) -> np.ndarray:
    """The ``count`` indices (uint16) of a delta section; ``reference()`` gives the reference slots.

    Raises DeltaError if the streams do not decode exactly to ``changes`` changed connections,
    every rank below K and every byte of the section used."""
    positions, ranks = check(
        data,
        count=count,
        k=k,
        changes=changes,
        gap_param=gap_param,
        rank_param=rank_param,
        gap_code=gap_code,
    )
    return expand(positions, ranks, k, reference(), slot_at)

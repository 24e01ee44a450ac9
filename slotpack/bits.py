"""Packing unsigned integers into a stream of fixed-width bit fields (docs/FORMAT.md §2.3).

Fields are written most significant bit first, one after another, and the stream fills bytes from
their most significant bit (numpy's packbits order); the last byte is zero-padded. Work is done in
blocks of BLOCK values (a multiple of 8, so every block starts on a byte boundary), which keeps
temporaries small and in cache: memory stays a small constant over the packed/unpacked arrays.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 1 << 14
MAX_BITS = 16


def bits_for(k: int) -> int:
    """Bits per index for K values: ceil(log2 K)."""
    if k < 2:
        raise ValueError(f"K must be >= 2, got {k}")
    return (k - 1).bit_length()


def packed_length(count: int, bits: int) -> int:
    """Bytes that ``count`` fields of ``bits`` bits take."""
    return math.ceil(count * bits / 8)


def _shifts(bits: int) -> np.ndarray:
    return np.arange(bits - 1, -1, -1, dtype=np.uint16)


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers < 2**bits into ``packed_length(len(values), bits)`` bytes."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    values = np.asarray(values).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"values must lie in [0, 2**{bits})")
    out = np.empty(packed_length(values.size, bits), dtype=np.uint8)
    shifts = _shifts(bits)
    for start in range(0, values.size, BLOCK):
        block = values[start : start + BLOCK].astype(np.uint16)
        fields = ((block[:, None] >> shifts) & 1).astype(np.uint8)
        packed = np.packbits(fields.reshape(-1))
        first = start * bits // 8  # BLOCK is a multiple of 8: blocks start on byte boundaries
        out[first : first + packed.size] = packed
    return out.tobytes()


def unpack(data: bytes | memoryview | np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``count`` integers (uint16) from the packed bytes."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != packed_length(count, bits):
        raise ValueError(f"{raw.size} bytes cannot hold exactly {count} fields of {bits} bits")
    out = np.empty(count, dtype=np.uint16)
    weights = (np.uint16(1) << _shifts(bits)).astype(np.uint16)
    for start in range(0, count, BLOCK):
        n = min(BLOCK, count - start)
        first = start * bits // 8
        chunk = raw[first : first + packed_length(n, bits)]
        fields = np.unpackbits(chunk, count=n * bits).reshape(n, bits).astype(np.uint16)
        out[start : start + n] = fields @ weights
    return out


def padding_is_zero(data: bytes | memoryview, count: int, bits: int) -> bool:
    """True when the unused low bits of the last byte are zero (a canonical stream)."""
    spare = 8 * packed_length(count, bits) - count * bits
    if spare == 0:
        return True
    return (memoryview(data)[-1] & ((1 << spare) - 1)) == 0

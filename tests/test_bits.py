"""Bit packing of indices (docs/FORMAT.md §2.3) against bitarray as an independent oracle."""

import numpy as np
import pytest
from bitarray import bitarray
from bitarray.util import int2ba

from slotpack import bits


@pytest.mark.parametrize(
    "k,expected", [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (16, 4), (64, 6), (65536, 16)]
)
def test_bits_for(k, expected):
    assert bits.bits_for(k) == expected


@pytest.mark.parametrize("width", range(1, 17))
def test_matches_bitarray_and_round_trips(width):
    rng = np.random.default_rng(width)
    for count in (0, 1, 7, 8, 9, bits.BLOCK - 1, bits.BLOCK + 3):
        values = rng.integers(0, 1 << width, count)
        packed = bits.pack(values, width)
        assert len(packed) == bits.packed_length(count, width)
        if count <= 9:  # the independent oracle, field by field (MSB first, big-endian stream)
            oracle = bitarray(endian="big")
            for v in values:
                oracle += int2ba(int(v), length=width, endian="big")
            assert packed == oracle.tobytes()
        assert np.array_equal(bits.unpack(packed, count, width), values)
        assert bits.padding_is_zero(packed, count, width)


def test_blocks_join_seamlessly():
    """Values that straddle the block boundary pack exactly as a bitarray of the whole stream."""
    values = np.random.default_rng(0).integers(0, 8, 3 * bits.BLOCK + 5)
    oracle = bitarray(endian="big")
    oracle.encode({v: int2ba(v, length=3, endian="big") for v in range(8)}, values.tolist())
    assert bits.pack(values, 3) == oracle.tobytes()


def test_rejects_out_of_range_and_bad_lengths():
    with pytest.raises(ValueError):
        bits.pack(np.array([8]), 3)
    with pytest.raises(ValueError):
        bits.pack(np.array([-1]), 3)
    with pytest.raises(ValueError):
        bits.unpack(b"\x00\x00", 10, 3)  # 10 fields of 3 bits need 4 bytes
    with pytest.raises(ValueError):
        bits.bits_for(1)
    assert not bits.padding_is_zero(b"\x01", 2, 3)  # 6 bits used, the low 2 must be zero

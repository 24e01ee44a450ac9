"""The Triton code of slotpack's fused kernels (imported only by ``slotpack.kernels``, on demand).

docs/FORMAT.md's generator spelled in Triton: a counter stays in registers from SplitMix64 to its
float32 value. Roundings are those of the torch half (one float32 multiply by the bound, an exact
power-of-two scale, then one float32 multiply by the gradient), so results agree bit for bit.
"""

import triton
import triton.language as tl

from . import prng

_GAMMA_HI = tl.constexpr(prng.GAMMA >> 32)
_GAMMA_LO = tl.constexpr(prng.GAMMA & 0xFFFFFFFF)
_MIX1_HI = tl.constexpr(prng.MIX1 >> 32)
_MIX1_LO = tl.constexpr(prng.MIX1 & 0xFFFFFFFF)
_MIX2_HI = tl.constexpr(prng.MIX2 >> 32)
_MIX2_LO = tl.constexpr(prng.MIX2 & 0xFFFFFFFF)
_SHIFT = tl.constexpr(64 - prng.MANTISSA_BITS)
_HALF = tl.constexpr(1 << (prng.MANTISSA_BITS - 1))
_SCALE = tl.constexpr(2.0 ** -(prng.MANTISSA_BITS - 1))


@triton.jit
def _const64(hi: tl.constexpr, lo: tl.constexpr):
    return (tl.full((), hi, tl.uint64) << 32) | tl.full((), lo, tl.uint64)


@triton.jit
def _key(key_hi, key_lo):
    # Triton types a scalar argument by its value, so a 64-bit key travels as two halves.
    return (key_hi.to(tl.uint64) << 32) | key_lo.to(tl.uint64)


@triton.jit
def _value(counter, key, bound):
    """float32 value of ``counter`` (int64) under ``key`` (uint64); ``bound`` is float32."""
    z = (counter.to(tl.uint64) + 1) * _const64(_GAMMA_HI, _GAMMA_LO) + key
    z = (z ^ (z >> 30)) * _const64(_MIX1_HI, _MIX1_LO)
    z = (z ^ (z >> 27)) * _const64(_MIX2_HI, _MIX2_LO)
    z = z ^ (z >> 31)
    t = (z >> _SHIFT).to(tl.int64) - _HALF
    return t.to(tl.float32) * bound * _SCALE


@triton.jit(do_not_specialize=["key_hi", "key_lo"])
def select_kernel(
    scores_ptr, index_ptr, out_ptr, n, K, key_hi, key_lo, bound,
    HAS_INDEX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[i] = value[i, index[i]], or value[i, argmax(scores[i])] (first maximum)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < n
    if HAS_INDEX:
        idx = tl.load(index_ptr + rows, mask=live, other=0).to(tl.int64)
    else:
        cols = tl.arange(0, BLOCK_K)
        mask = live[:, None] & (cols[None, :] < K)
        s = tl.load(scores_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=-float("inf"))
        idx = tl.argmax(s.to(tl.float32), axis=1, tie_break_left=True).to(tl.int64)
    w = _value(rows * K + idx, _key(key_hi, key_lo), bound)
    tl.store(out_ptr + rows, w, mask=live)


@triton.jit
def _bfloat16_bits(x):
    """The bfloat16 nearest float32 ``x`` (ties to even; NaN to the canonical NaN) as int16 bits.

    Spelled in integers, as torch's own conversion is, so that Triton's CPU interpreter (whose
    float32 to bfloat16 cast truncates) rounds exactly as a GPU and torch do."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit(do_not_specialize=["key_hi", "key_lo"])
def grad_kernel(
    grad_w_ptr, out_ptr, n, K, key_hi, key_lo, bound,
    BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[i, k] = grad_w[i] * value[i, k]: float32, or bfloat16 bits when BF16 (out is int16)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    live = rows < n
    mask = live[:, None] & (cols[None, :] < K)
    g = tl.load(grad_w_ptr + rows, mask=live, other=0.0)
    counters = rows[:, None] * K + cols[None, :]
    v = _value(counters, _key(key_hi, key_lo), bound) * g[:, None]
    if BF16:
        tl.store(out_ptr + counters, _bfloat16_bits(v), mask=mask)
    else:
        tl.store(out_ptr + counters, v, mask=mask)

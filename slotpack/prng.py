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
    z ^= be.shr(z, 30)
    z *= be.const(MIX1)
    z ^= be.shr(z, 27)
    z *= be.const(MIX2)
    z ^= be.shr(z, 31)
    return z


# --------------------------------------------------------------------------- numpy half

_NP = _Backend(const=np.uint64, shr=lambda z, s: z >> np.uint64(s))


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
    seed: int, layer: int, n: int, k: int, bound: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Scores U[0, bound) on the 2**-24 grid, as the reference code's U(0, bound) initialisation."""
    half = float(1 << (MANTISSA_BITS - 1))
    key = score_key(seed, layer)
    return _scaled_range_torch(key, 0, n * k, bound, half, 2.0**-MANTISSA_BITS, device).view(n, k)

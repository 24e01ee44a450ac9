"""Fused Triton kernels for lean slot layers: the generator, the selection and the products in one pass.

The plain torch path of a lean layer (``prng``'s torch half) spells SplitMix64 as about fifteen
elementwise int64 operations, each a full pass over memory; on a GPU that traffic, not the
arithmetic, is the cost. These kernels keep each counter in registers from counter to float32:

- ``select_greedy``: per connection, argmax over its K scores, then the one selected value
  (reads the scores once, writes [n] float32; no int64 index or counter tensors);
- ``selected``: the value at a given per-connection index (probabilistic selection);
- ``score_grad``: the [n, K] straight-through gradient ``grad_w[i] * value[i, k]`` in the score
  dtype (reads [n] float32, writes [n, K]).

They follow docs/FORMAT.md to the bit, with the same float32 roundings as the torch half, so
their results are identical to it (``self_check`` verifies that on a device before first use;
tests run them in Triton's interpreter on CPU). argmax ties go to the lowest index, as
``torch.argmax``; NaN scores are not supported (training has diverged by then).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import TYPE_CHECKING

from . import prng
from .errors import ConfigError

if TYPE_CHECKING:
    import torch

KERNELS = ("auto", "torch", "triton")


class KernelMismatchError(ConfigError):
    """A Triton kernel gave different bits from the torch generator on this device."""


@functools.cache
def _triton():
    """The triton module, or None where it is not installed or cannot be imported."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return triton


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel(name: str) -> str:
    """``name`` if it is a valid kernel choice, else a ConfigError that lists them."""
    if name not in KERNELS:
        raise ConfigError(f"unknown kernel {name!r}; choose one of: {', '.join(KERNELS)}")
    return name


def supported(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if _triton() is None:
        return False
    return device.type == "cuda" or (interpreting() and device.type == "cpu")


def resolve(kernel: str, device: torch.device, k: int) -> str:
    """The kernel a lean layer with K values per connection uses on ``device``: torch or triton.

    "auto" is Triton where it runs and matches the torch half (``self_check``), else torch with
    a warning; "triton" raises instead of falling back.
    """
    check_kernel(kernel)
    if kernel == "torch":
        return "torch"
    if kernel == "triton":
        if not supported(device):
            missing = "" if _triton() is not None else " (triton is not importable)"
            raise ConfigError(f"--kernel triton needs a CUDA device, got {device.type}{missing}")
        self_check(device, k)
        return "triton"
    return _auto(str(device), k)


@functools.cache
def _auto(device_key: str, k: int) -> str:
    import torch

    device = torch.device(device_key)
    if not supported(device):
        return "torch"
    try:
        self_check(device, k)
    except Exception as e:  # noqa: BLE001 - a kernel that fails here must not stop training
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(
            f"Triton kernels unusable on {device_key}, using torch: {first}", stacklevel=2
        )
        return "torch"
    return "triton"


def _jit():
    """(triton, select_kernel, grad_kernel), imported on first use."""
    from . import triton_kernels as tk

    return _triton(), tk.select_kernel, tk.grad_kernel


# Elements per program: enough work per program to hide latency, few enough registers.
_ELEMS_PER_PROGRAM = 4096


def _blocks(k: int) -> tuple[int, int]:
    triton = _triton()
    block_k = triton.next_power_of_2(k)
    return max(1, _ELEMS_PER_PROGRAM // block_k), block_k


def _key_args(key: int) -> tuple[int, int]:
    return key >> 32, key & 0xFFFFFFFF


def _select(
    scores: torch.Tensor, index: torch.Tensor | None, key: int, bound: float
) -> torch.Tensor:
    import torch

    triton, select_kernel, _ = _jit()
    n, k = scores.shape
    out = torch.empty(n, dtype=torch.float32, device=scores.device)
    if n == 0:
        return out
    block_n, block_k = _blocks(k)
    scores = scores.contiguous()
    idx = scores if index is None else index.reshape(-1).contiguous()
    select_kernel[(triton.cdiv(n, block_n),)](
        scores, idx, out, n, k, *_key_args(key), float(bound),
        HAS_INDEX=index is not None, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def select_greedy(scores: torch.Tensor, key: int, bound: float) -> torch.Tensor:
    """[n] float32: value[i, argmax_k scores[i, k]] of a layer with generator key ``key``."""
    return _select(scores, None, key, bound)


def selected(scores: torch.Tensor, index: torch.Tensor, key: int, bound: float) -> torch.Tensor:
    """[n] float32: value[i, index[i]] (``scores`` gives only the shape [n, K])."""
    return _select(scores, index, key, bound)


def score_grad(
    grad_w: torch.Tensor, k: int, key: int, bound: float, dtype: torch.dtype
) -> torch.Tensor:
    """[n, K] ``grad_w[i] * value[i, k]`` rounded to float32 and then to ``dtype``."""
    import torch

    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"score_grad writes float32 or bfloat16, not {dtype}")
    triton, _, grad_kernel = _jit()
    n = grad_w.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=grad_w.device)
    if n == 0:
        return out
    block_n, block_k = _blocks(k)
    bf16 = dtype == torch.bfloat16
    grad_kernel[(triton.cdiv(n, block_n),)](
        grad_w.float().contiguous(), out.view(torch.int16) if bf16 else out, n, k,
        *_key_args(key), float(bound), BF16=bf16, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


@functools.cache
def _checked(device_key: str, k: int) -> None:
    """Compare every kernel with the torch half once per device and K (KernelMismatchError)."""
    import torch

    device = torch.device(device_key)
    key, bound = prng.layer_key(2**63 + 12345, 3), prng.glorot_bound(300, 100)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Rows not a multiple of a block; float32 and bfloat16 scores and gradients: the compiled
    # variants a layer of this K runs.
    n = 3001 + _blocks(k)[0]
    scores = torch.rand((n, k), generator=gen).to(device)
    scores[::7, 1] = scores[::7, 0]  # ties go to the lowest index
    grad_w = torch.randn(n, generator=gen).to(device)
    bank = prng.values_range_torch(key, 0, n * k, bound, device).view(n, k)
    rows = torch.arange(n, device=device)
    half = scores.to(torch.bfloat16)
    checks = [
        ("select_greedy", select_greedy(scores, key, bound), bank[rows, scores.argmax(1)]),
        ("select_greedy bfloat16", select_greedy(half, key, bound), bank[rows, half.argmax(1)]),
        ("selected", selected(scores, half.argmax(1), key, bound), bank[rows, half.argmax(1)]),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        want = (bank * grad_w[:, None]).to(dtype)
        checks.append((f"score_grad {dtype}", score_grad(grad_w, k, key, bound, dtype), want))
    for name, got, want in checks:
        if not torch.equal(got, want):
            raise KernelMismatchError(
                f"the Triton kernel {name} (K={k}) differs from the torch generator on "
                f"{device_key}; use --kernel torch and report this"
            )


def self_check(device: torch.device, k: int) -> None:
    """Raise KernelMismatchError unless the kernels for K values per connection match the torch
    half bit for bit on ``device`` (once per device and K; compiles what such layers run)."""
    _checked(str(device), k)

"""Runs slotpack's Triton kernels in Triton's CPU interpreter and saves what they return.

Launched by tests/test_kernels.py as ``TRITON_INTERPRET=1 python tests/kernel_interp.py OUT
[MNIST_ROOT RUN]`` (the interpreter is chosen when triton is imported, so it needs its own process);
the test computes the torch references itself and compares. Inputs are seeded, so the test can
rebuild them with ``inputs()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from slotpack import kernels, layers, prng
from slotpack.triton_kernels import _bfloat16_bits

KEYS = (prng.layer_key(2**64 - 1, 5), prng.layer_key(3, 0), 2**63 + 7, 1)
CASES = [(k, key) for k in (2, 3, 8, 64) for key in KEYS[:2]] + [(8, KEYS[2]), (5, KEYS[3])]
N = 777


def _train_config():
    from slotpack.train import TrainConfig

    return TrainConfig(model="lenet300100", k=8, epochs=1, limit=512, eval_limit=256, lean=True,
                       score_dtype="bfloat16")  # fmt: skip


def inputs(k: int, key: int) -> dict[str, torch.Tensor]:
    """Scores (float32 and bfloat16, with ties), an index and a gradient with extreme values."""
    gen = torch.Generator().manual_seed(k * 1000 + key % 997)
    scores = torch.rand((N, k), generator=gen)
    scores[::5, k - 1] = scores[::5, 0]  # ties: the lowest index wins
    scores[::11] = 0.25  # whole rows tied
    grad_w = (
        torch.randn(N, generator=gen) * torch.logspace(-44, 38, N)[torch.randperm(N, generator=gen)]
    )
    grad_w[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38])
    index = torch.randint(0, k, (N,), generator=gen)
    return {
        "scores": scores,
        "scores_bf16": scores.to(torch.bfloat16),
        "grad_w": grad_w,
        "index": index,
    }


def rounding_inputs() -> torch.Tensor:
    """float32 bit patterns around every bfloat16 rounding edge: ties (to even, both ways), the
    largest finite values (which round to inf), zeros, subnormals, inf, NaN payloads, signs."""
    high = torch.tensor([0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x7FC0,
                         0x7FFF, 0x8000, 0x8001, 0xBF80, 0xFF7F, 0xFF80, 0xFFFF])  # fmt: skip
    high = torch.cat(
        [high, torch.randint(0, 1 << 16, (4000,), generator=torch.Generator().manual_seed(1))]
    )
    low = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    bits = (high[:, None] << 16 | low[None, :]).reshape(-1)
    return bits.to(torch.int32).view(torch.float32)  # int64 -> int32 keeps the low 32 bits


@triton.jit
def _rounding_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    tl.store(out_ptr + offs, _bfloat16_bits(tl.load(x_ptr + offs, mask=live)), mask=live)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.int16)
    _rounding_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out.view(torch.bfloat16)


def kernel_outputs() -> dict[str, torch.Tensor]:
    out = {"rounded": _rounded(rounding_inputs())}
    bound = prng.glorot_bound(300, 100)
    for k, key in CASES:
        x = inputs(k, key)
        tag = f"{k}_{key}"
        out[f"greedy_{tag}"] = kernels.select_greedy(x["scores"], key, bound)
        out[f"greedy_bf16_{tag}"] = kernels.select_greedy(x["scores_bf16"], key, bound)
        out[f"selected_{tag}"] = kernels.selected(x["scores"], x["index"], key, bound)
        for dtype in (torch.float32, torch.bfloat16):
            out[f"grad_{dtype}_{tag}"] = kernels.score_grad(x["grad_w"], k, key, bound, dtype)
    return out


def layer_outputs() -> dict[str, torch.Tensor]:
    """Forward and score gradients of lean layers running the kernels (greedy, probabilistic)."""
    out = {}
    for selection in layers.SELECTIONS:
        for dtype in layers.SCORE_DTYPES:
            conv = layers.SlotConv2d(
                6, 8, 3, 5, seed=4, layer=2, padding=1, groups=2, selection=selection,
                lean=True, score_dtype=dtype,
            )  # fmt: skip
            fc = layers.SlotLinear(8 * 36, 10, 8, seed=4, layer=3, selection=selection, lean=True,
                                   score_dtype=dtype)  # fmt: skip
            for m in (conv, fc):
                m.kernel = "triton"
            torch.manual_seed(0)
            x = torch.randn(3, 6, 6, 6)
            fc(torch.relu(conv(x)).flatten(1)).square().sum().backward()
            tag = f"{selection}_{dtype}"
            out[f"conv_grad_{tag}"], out[f"fc_grad_{tag}"] = conv.scores.grad, fc.scores.grad
            conv.eval(), fc.eval()
            out[f"conv_w_{tag}"], out[f"fc_w_{tag}"] = conv.weight(), fc.weight()
    return out


def main(argv: list[str]) -> int:
    assert kernels.interpreting(), "run with TRITON_INTERPRET=1"
    for k in (2, 3, 8):
        kernels.self_check(torch.device("cpu"), k)
    torch.save({**kernel_outputs(), **layer_outputs()}, argv[0])
    if (
        len(argv) > 1
    ):  # MNIST_ROOT RUN: a short lean training run through the kernels, packed to a .slot file
        from slotpack import train

        run = Path(argv[2])
        train.train(_train_config(), run, root=argv[1], device="cpu", kernel="triton")
        (run / "model.slot").write_bytes(train.pack_checkpoint(run / "last.pt")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

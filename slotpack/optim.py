"""The training optimizer: SGD with momentum, for float32 and bfloat16 scores, stepped by the loop
or inside the backward pass.

- bfloat16 parameters (``--score-dtype bfloat16``) get ``BFloat16SGD``: the update is computed in
  float32 and rounded stochastically back to bfloat16, with the momentum kept in bfloat16 the same
  way. Round-to-nearest would drop every update smaller than half a bfloat16 step (2**-9 relative),
  which is most score updates at the usual learning rates; stochastic rounding keeps them in
  expectation. Its random bits come from its own seeded generator, saved with its state.
- ``in_backward``: a slot layer's score gradient is as large as its scores ([connections, K]). A
  plain step needs every layer's gradient at once; ``StepInBackward`` updates each parameter the
  moment its gradient is complete (a post-accumulate-grad hook) and frees that gradient, so at
  most one layer's gradient is alive. Same update on the same gradient: the same results. It
  cannot be combined with DDP, whose all-reduce completes after these hooks would have fired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import CheckpointError

# int32 mask that clears the 16 low bits of a float32: what bfloat16 drops.
_LOW16 = -(1 << 16)
_BLOCK = 1 << 20  # elements per block of BFloat16SGD's float32 temporaries


def round_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 ``x`` (consumed) to bfloat16, rounding up in magnitude with probability equal to the
    dropped fraction: unbiased, ``E[result] == x``."""
    noise = torch.randint(
        0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    bits = x.view(torch.int32).add_(noise).bitwise_and_(_LOW16)
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


class BFloat16SGD(torch.optim.Optimizer):
    """torch.optim.SGD's momentum rule for bfloat16 parameters, with stochastic rounding."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        seed: int,
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._seed = seed % 2**63
        self._generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
        return self._generator

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer") if momentum else None
                first = bool(momentum) and buf is None
                if first:
                    buf = state["momentum_buffer"] = torch.empty_like(p)
                gen = self._gen(p.device)
                flat, grad = p.view(-1), p.grad.reshape(-1)
                mom = buf.view(-1) if buf is not None else None
                # float32 temporaries of one block at a time, not of the whole tensor
                for a in range(0, flat.numel(), _BLOCK):
                    b = min(flat.numel(), a + _BLOCK)
                    g = grad[a:b].to(torch.float32, copy=True)
                    if wd:
                        g.add_(flat[a:b].float(), alpha=wd)
                    if mom is not None:
                        if not first:
                            g = mom[a:b].float().mul_(momentum).add_(g)
                        mom[a:b] = round_stochastic(g.clone(), gen)
                    flat[a:b] = round_stochastic(flat[a:b].float().sub_(g, alpha=lr), gen)

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        if self._generator is not None:
            d["rounding_generator"] = self._generator.get_state()
        return d

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("rounding_generator", None)
        super().load_state_dict(state_dict)
        if gen_state is not None:
            self._generator = None
            self._pending_state = gen_state


def _one(params: list[torch.nn.Parameter], sgd: dict[str, Any], seed: int) -> torch.optim.Optimizer:
    if all(p.dtype == torch.bfloat16 for p in params):
        return BFloat16SGD(params, **sgd, seed=seed)
    if any(p.dtype == torch.bfloat16 for p in params):
        raise TypeError("one optimizer per dtype")  # internal: callers split by dtype
    return torch.optim.SGD(params, **sgd)


class Chain:
    """Several optimizers driven as one (the loop sets ``lr`` through ``param_groups``)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"chain": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("chain")
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise CheckpointError("optimizer state in the checkpoint does not fit this run")
        for opt, part in zip(self.optimizers, parts, strict=True):
            opt.load_state_dict(part)


class StepInBackward(Chain):
    """One optimizer per parameter, stepped from the backward pass; ``step``/``zero_grad`` are
    no-ops for the loop."""

    def __init__(self, params: list[torch.nn.Parameter], sgd: dict[str, Any], seed: int) -> None:
        super().__init__([_one([p], sgd, seed + i) for i, p in enumerate(params)])
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._stepper(opt))
            for p, opt in zip(params, self.optimizers, strict=True)
        ]

    @staticmethod
    def _stepper(opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            opt.step()
            param.grad = None  # the memory this mode exists to save

        return hook

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._hooks:
            h.remove()


Optimizer = torch.optim.Optimizer | Chain


def sgd(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    in_backward: bool = False,
    seed: int = 0,
) -> Optimizer:
    """SGD with momentum over ``params``: float32 ones by torch.optim.SGD, bfloat16 ones by
    BFloat16SGD (rounding seeded by ``seed``); stepped by the loop or inside the backward pass."""
    params = [p for p in params if p.requires_grad]
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if in_backward:
        return StepInBackward(params, kw, seed)
    half = [p for p in params if p.dtype == torch.bfloat16]
    full = [p for p in params if p.dtype != torch.bfloat16]
    parts = [_one(group, kw, seed) for group in (full, half) if group]
    return parts[0] if len(parts) == 1 else Chain(parts)

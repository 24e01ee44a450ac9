"""The optimizer: stochastic rounding to bfloat16, bfloat16 SGD, and stepping inside backward."""

import io

import pytest
import torch

from slotpack import models, optim
from slotpack.errors import CheckpointError


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 2**-10, -3.0 - 3 * 2**-9, 0.1, 1e-30, -7.0])
    draws = torch.stack([optim.round_stochastic(x.clone(), gen) for _ in range(20_000)])
    down = x.to(torch.bfloat16).float()
    for i, v in enumerate(x.tolist()):
        values = set(draws[:, i].float().tolist())
        lo = torch.tensor(v).view(torch.int32).bitwise_and(-(1 << 16)).view(torch.float32)
        hi = torch.nextafter(lo.to(torch.bfloat16), lo.to(torch.bfloat16) * 2).float()
        assert values <= {lo.item(), hi.item()}, (v, values)
        assert abs(draws[:, i].float().mean().item() - v) < 0.02 * abs(v - lo.item()) + 1e-2 * abs(
            hi.item() - lo.item()
        )
    assert torch.equal(optim.round_stochastic(torch.tensor([-7.0]), gen).float(), down[-1:])


def test_bfloat16_sgd_keeps_updates_below_half_a_step():
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = optim.sgd([p], lr=1e-4, momentum=0.0, weight_decay=0.0, seed=1)
    assert isinstance(opt, optim.BFloat16SGD)
    for _ in range(500):
        p.grad = torch.ones_like(p)
        opt.step()
    # 500 updates of 1e-4 (1/40 of a bfloat16 step at 1.0) sum to 0.05; round-to-nearest
    # would have kept every element at exactly 1.0.
    assert abs(p.float().mean().item() - 0.95) < 0.002


def test_bfloat16_sgd_matches_torch_sgd_in_expectation_with_momentum():
    torch.manual_seed(0)
    start = torch.randn(50_000)
    ref = torch.nn.Parameter(start.to(torch.bfloat16).float())
    half = torch.nn.Parameter(start.to(torch.bfloat16))
    kw = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD([ref], **kw)
    half_opt = optim.sgd([half], **kw, seed=3)
    for step in range(20):
        g = torch.sin(start * (step + 1))
        ref.grad, half.grad = g.clone(), g.to(torch.bfloat16)
        ref_opt.step()
        half_opt.step()
    err = half.detach().float() - ref.detach()
    moved = (ref.detach() - start.to(torch.bfloat16).float()).abs().mean().item()
    assert abs(err.mean().item()) < 1e-4  # unbiased: the mean error vanishes
    assert err.abs().mean().item() < 0.1 * moved, (err.abs().mean(), moved)


def test_bfloat16_sgd_resumes_exactly_from_its_state_dict():
    def fresh():
        p = torch.nn.Parameter(torch.linspace(-1, 1, 1000).to(torch.bfloat16))
        return p, optim.sgd([p], lr=0.1, momentum=0.9, weight_decay=1e-3, seed=7)

    def steps(p, opt, first, last):
        for i in range(first, last):
            p.grad = torch.full_like(p, 1e-3 * (i + 1))
            opt.step()

    straight, opt = fresh()
    steps(straight, opt, 0, 6)
    half, opt = fresh()
    steps(half, opt, 0, 3)
    buf = io.BytesIO()
    torch.save({"p": half.detach(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "rounding_generator" in state["opt"]
    resumed, opt = fresh()
    with torch.no_grad():
        resumed.copy_(state["p"])
    opt.load_state_dict(state["opt"])
    steps(resumed, opt, 3, 6)
    assert torch.equal(resumed, straight)


def test_mixed_dtypes_chain_two_optimizers_and_check_their_state():
    model = models.create("lenet300100", 4, score_dtype="bfloat16")
    model[1].bias = torch.nn.Parameter(torch.zeros(300))  # a float32 parameter among bf16 ones
    opt = optim.sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    assert isinstance(opt, optim.Chain)
    assert [type(o) for o in opt.optimizers] == [torch.optim.SGD, optim.BFloat16SGD]
    for group in opt.param_groups:
        group["lr"] = 0.5
    assert all(g["lr"] == 0.5 for o in opt.optimizers for g in o.param_groups)
    with pytest.raises(CheckpointError, match="does not fit"):
        opt.load_state_dict({"chain": [{}]})


@pytest.mark.parametrize("score_dtype", ["float32", "bfloat16"])
def test_step_in_backward_frees_gradients_and_equals_a_plain_step(score_dtype):
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    results = []
    for in_backward in (False, True):
        model = models.create("lenet300100", 4, seed=2, score_dtype=score_dtype)
        opt = optim.sgd(
            model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, in_backward=in_backward
        )
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if in_backward:
                assert all(p.grad is None for p in model.parameters())
        results.append([p.detach().clone() for p in model.parameters()])
    # bfloat16: each parameter has its own rounding generator in one mode, one shared in the
    # other, so only float32 is bit-identical; bfloat16 agrees to within rounding noise.
    for a, b in zip(*results, strict=True):
        if score_dtype == "float32":
            assert torch.equal(a, b)
        else:
            assert (a.float() - b.float()).abs().max() < 0.02

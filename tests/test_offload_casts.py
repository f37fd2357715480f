"""Offloaded weights under autocast cross the host link as the cast the op reads: half the
bytes, the same values, remade after every optimizer step."""

import copy

import pytest
import torch
from torch import nn

import autopart
from multirank import run_ranks

pytestmark = pytest.mark.multirank


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 8)
    )


def _train(precision: str, steps: int):
    """``steps`` SGD steps of the offloaded model and of the plain one under eager autocast,
    then an evaluation call of each; returns the bytes fetched and both sides' results."""
    model = _model()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    wrapped = autopart.Module(
        model, opt, offload=True, microbatches=1, precision=precision, cost="analytic"
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    got, want = [], []
    for step in range(steps):
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(step))
        out = wrapped(x)
        out.float().pow(2).mean().backward()
        with torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
            expected = plain(x)
        expected.float().pow(2).mean().backward()
        got.append(out.detach().float())
        want.append(expected.detach().float())
        for o in (opt, plain_opt):
            o.step()
            o.zero_grad()
    wrapped.eval(), plain.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
        x = torch.randn(3, 64)
        got.append(wrapped(x).float())
        want.append(plain(x).float())
    return wrapped.offload.copied_bytes, got, want


def _casts_cross_the_link(rank: int, world: int) -> None:
    fp32_bytes, _, _ = _train("fp32", 3)
    bf16_bytes, got, want = _train("bf16", 3)
    # The Linear layers' weights and biases go as bf16, the LayerNorm's as fp32.
    assert 0.5 * fp32_bytes < bf16_bytes < 0.55 * fp32_bytes, (bf16_bytes, fp32_bytes)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"call {step}: {(a - b).abs().max()} from eager autocast"


def test_offloaded_weights_cross_as_their_autocast_cast():
    """Bit-equal to eager autocast over three SGD steps (a cast not remade after a step
    would compute with the old weights) and an evaluation call, which is another call
    signature with its own stage."""
    run_ranks(1, _casts_cross_the_link)

"""A one-rank, one-stage, one-microbatch plan runs its stage module directly, without the
pipeline's machinery (`autopart.runtime.pipeline.alone`), and trains exactly as the pipeline
path and plain PyTorch do, through the habits of a training loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autopart
from multirank import run_ranks

pytestmark = pytest.mark.multirank

STEPS = 8


def _counting():
    """Count the calls that took the direct path (the runtime times calls 2 to 4 on the
    pipeline's, so a loop of `STEPS` uses both)."""
    import autopart.runtime.pipeline.calls as calls

    seen = {"alone": 0}
    run = calls.run_alone

    def counted(*args, **kwargs):
        seen["alone"] += 1
        return run(*args, **kwargs)

    calls.run_alone = counted
    return seen


def _loop(wrapped, plain, opt, plain_opt, batches) -> None:
    """Both models through the same loop: dropout on (each step reseeded alike), two
    backwards per step (accumulation), an evaluation call mid-training, a call under the
    caller's bf16 autocast; every output and update compared."""
    for step, ids in enumerate(batches):
        outs = []
        for model in (wrapped, plain):
            torch.manual_seed(step)
            first = model(ids, labels=ids)
            first.loss.backward()
            second = model(ids.flip(0), labels=ids.flip(0))
            (0.5 * second.loss).backward()
            outs.append((first.logits.detach(), second.loss.detach()))
        for got, want in zip(*outs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        opt.step(), plain_opt.step()
        opt.zero_grad(), plain_opt.zero_grad()
        if step == 3:
            wrapped.eval(), plain.eval()
            with torch.no_grad():
                torch.testing.assert_close(wrapped(ids).logits, plain(ids).logits)
            wrapped.train(), plain.train()
        if step == 5:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.manual_seed(99)
                got = wrapped(ids, labels=ids)
                torch.manual_seed(99)
                want = plain(ids, labels=ids)
            assert got.logits.dtype == want.logits.dtype == torch.bfloat16
            torch.testing.assert_close(got.loss, want.loss, rtol=2e-2, atol=1e-3)
    for (name, param), (_, ref) in zip(
        wrapped.model.named_parameters(), plain.named_parameters(), strict=True
    ):
        torch.testing.assert_close(param, ref, rtol=1e-5, atol=1e-6, msg=name)


def _gpt2_trains_alone(rank: int, world: int) -> None:
    from autopart.cli.models import gpt2

    seen = _counting()
    model, _ = gpt2(n_layer=2, n_embd=32, n_head=2, seq=16, vocab=128)  # dropout 0.1
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    wrapped = autopart.Module(model, opt, cost="analytic")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (4, 16), generator=gen) for _ in range(STEPS)]
    _loop(wrapped, plain, opt, plain_opt, batches)
    # 2 calls per step and the autocast and eval ones; the timed calls took the pipeline.
    assert seen["alone"] >= 2 * STEPS - 3, seen


def test_one_stage_on_one_rank_runs_directly_and_trains_like_plain():
    run_ranks(1, _gpt2_trains_alone)


def _batch_norm_alone(rank: int, world: int) -> None:
    """Running statistics updated by the direct path as by the pipeline's: the buffers the
    user's ``state_dict()`` reads equal plain PyTorch's after every step."""
    seen = _counting()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    wrapped = autopart.Module(model, opt, cost="analytic")
    for step in range(STEPS):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for m, o in ((wrapped, opt), (plain, plain_opt)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
        mine, theirs = wrapped.state_dict(), plain.state_dict()
        for key, value in theirs.items():
            torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert seen["alone"] == STEPS - 3, seen


def test_batch_norm_statistics_on_the_direct_path():
    run_ranks(1, _batch_norm_alone)

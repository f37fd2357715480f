"""A call whose batch size each rank can guess does not wait for the ranks to agree on it;
a wrong guess runs the forward again, drawing the same random numbers, and stays exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import autopart
from multirank import run_ranks

pytestmark = pytest.mark.multirank

#: Each call's local batch sizes (rank 0, rank 1).  Call 3 changes rank 1's size only, so
#: rank 0 guesses the sizes of call 2 and is wrong; call 4 changes rank 1's back, and rank 0,
#: whose size stayed the same, guesses call 3's and is wrong again; call 5 is guessed right.
#: Under these sizes each replica runs its own rows, whatever the layout.
SIZES = [(4, 4), (4, 4), (4, 3), (4, 4), (4, 4)]
#: The same pattern, where the uneven call moves a row of rank 1's to rank 0's replica.
MOVING = [(3, 3), (3, 3), (3, 5), (3, 3), (3, 3)]
WIDTH = 8


def _batch(call: int, rank: int, sizes=SIZES) -> torch.Tensor:
    rows = sizes[call][rank]
    return torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(100 * call + rank))


def _dropout_calls(rank: int, world: int) -> None:
    """Outputs under dropout, bit-equal to the plain model on the rank's own rows: the
    wrongly guessed calls must draw the masks one plain forward draws, and leave the
    generator where one forward leaves it (or the next call's masks differ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, 32), nn.Dropout(0.5), nn.Linear(32, WIDTH))
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay the plain model's
    wrapped = autopart.Module(model, opt, stages=1, microbatches=1, cost="analytic")
    torch.manual_seed(1 + rank)
    got = []
    for call in range(len(SIZES)):
        out = wrapped(_batch(call, rank))
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        got.append(out.detach())
    torch.manual_seed(1 + rank)
    for call, out in enumerate(got):
        assert torch.equal(out, plain(_batch(call, rank))), f"call {call} on rank {rank}"
    agreement = wrapped._calls.agreement
    # Calls 2 to 5 have a size this rank saw in the call before: guessed (not waited for).
    guessed = sum(SIZES[c][rank] == SIZES[c - 1][rank] for c in range(1, len(SIZES)))
    assert agreement.guesses == guessed, (agreement.guesses, guessed)
    assert agreement.misses == (2 if rank == 0 else 0), agreement.misses


def test_wrong_guesses_run_the_forward_again_with_the_same_random_draws():
    run_ranks(2, _dropout_calls)


def _uneven_steps(rank: int, world: int) -> None:
    """SGD with momentum over the calls of `MOVING`, equal to DDP of the plain model: in the
    uneven call a row moves between the replicas, so a forward left on the guessed layout
    would compute the wrong rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, 32), nn.GELU(), nn.Linear(32, WIDTH))
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    wrapped = autopart.Module(model, opt, stages=1, microbatches=1, cost="analytic")
    for call in range(len(MOVING)):
        wrapped(_batch(call, rank, MOVING)).pow(2).mean().backward()
        # DDP: each rank's mean loss, gradients averaged over the ranks.
        for r in range(world):
            (plain(_batch(call, r, MOVING)).pow(2).mean() / world).backward()
        first = [p.grad for p in model.parameters()]
        # The sums land in the bucket's buffer: the gradients are views of it (no copy back).
        assert len({g.untyped_storage().data_ptr() for g in first}) == 1
        for o in (opt, plain_opt):
            o.step()
            o.zero_grad()
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"call {call} {name}")
    assert wrapped._calls.agreement.misses == (2 if rank == 0 else 0)
    dist.barrier()


def test_uneven_calls_after_guessed_ones_train_like_ddp():
    run_ranks(2, _uneven_steps)


class _Counted(nn.Module):
    """Changes a buffer in place each call: its forward may not run twice."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _no_guess_with_state(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = _Counted()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    wrapped = autopart.Module(model, opt, stages=1, microbatches=1, cost="analytic")
    for call in range(len(SIZES)):
        wrapped(_batch(call, rank)).sum().backward()
    assert wrapped._calls.agreement.guesses == 0
    # Once per call: a forward run twice (rank 0 would have guessed wrong twice) counts twice.
    assert int(model.net[1].num_batches_tracked) == len(SIZES)


def test_a_model_that_changes_state_in_place_never_guesses():
    run_ranks(2, _no_guess_with_state)


class _Done:
    def wait(self) -> bool:
        return True


def test_a_wrong_guess_stays_wrong_when_settled_again():
    """Settling twice must not turn a miss into agreed sizes (the second call used to
    return the gathered sizes quietly, as if the guess had held)."""
    from autopart.runtime.pipeline.agreement import Misguessed, Pending
    from autopart.runtime.pipeline.signatures import key_number

    key = key_number("ab" * 32)
    gathered = [torch.tensor([4, key, 1]), torch.tensor([3, key, 1])]
    pending = Pending(_Done(), gathered, guess=[4, 4])  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(Misguessed) as miss:
            pending.settle()
        assert miss.value.sizes == [4, 3]
    held = Pending(_Done(), gathered, guess=[4, 3])  # type: ignore[arg-type]
    assert held.settle() == held.settle() == [4, 3]

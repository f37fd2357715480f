"""Every rank agrees on each call's kind and batch sizes, without waiting for it in the common case.

A call's rows are laid out over the ranks by every rank's batch size (an uneven last batch
moves rows between replicas), and all ranks must make the same kind of call (the same
signature, with or without gradients).  One all-gather of three ints per call settles both.
Waiting for it at the start of every call would put a round trip, and every rank's lateness,
in front of each forward; DDP has no such wait.

So where a rank can guess, it does not wait: when its batch has the size it had in the last
call of the same kind, it guesses that every rank's has too, starts the all-gather, runs its
forward on the guessed layout, and settles the guess before its first message to another
rank, its first backward, or the end of its forward, whichever comes first.  Before then
nothing has left the rank: a wrong guess (`Misguessed`) is undone by running the forward
again, with the random generators put back, on the layout every rank now knows.  A call whose
graph changes state in place (batch-norm statistics) cannot be run twice, so it never guesses.
A rank whose batch changed size waits at once, as every rank did before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.runtime.pipeline.signatures import key_number
from autopart.runtime.plan_agreement import agreeing
from autopart.runtime.stage.graph_cut import in_place
from autopart.runtime.transport.distenv import job_group
from autopart.runtime.transport.routing import reaching_every_rank

__all__ = ["Agreement", "Misguessed", "Pending", "guessable"]


class Misguessed(Exception):
    """This rank's guess of the layout was wrong: run the forward again with ``sizes``."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__(f"the ranks' batch sizes are {sizes}")
        self.sizes = sizes


def guessable(graph: Graph) -> bool:
    """Whether a call of ``graph`` may run its forward twice: no op changes a tensor in place."""
    return not any(in_place(node.op) for node in graph.nodes)


@dataclass
class Pending:
    """One call's all-gather of ``(batch size, call key, grad mode)``, checked once."""

    work: dist.Work
    gathered: list[torch.Tensor]
    guess: list[int] | None
    #: Every rank's batch size, once settled and found to match the guess.
    sizes: list[int] | None = None
    #: The error settling found (a miss, ranks that disagree), raised again if asked again.
    failure: Exception | None = None

    def settle(self) -> list[int]:
        """Every rank's batch size; raises `Misguessed` where the guess was wrong, and the
        same error on every later call, so that a wrong guess is never taken for settled."""
        if self.failure is not None:
            raise self.failure
        if self.sizes is None:
            try:
                self.sizes = self._check()
            except (AutopartError, Misguessed) as err:
                self.failure = err
                raise
        return self.sizes

    def _check(self) -> list[int]:
        with reaching_every_rank():
            self.work.wait()
        every = [t.tolist() for t in self.gathered]
        grads = [g for _, _, g in every]
        if len(set(grads)) > 1:
            raise AutopartError(
                "some ranks called the model with gradients enabled and others under "
                f"no_grad ({agreeing(grads)}); every rank must make the same kind of call"
            )
        keys = [k for _, k, _ in every]
        if len(set(keys)) > 1:
            raise AutopartError(
                f"the ranks called the model with different arguments or modes "
                f"({agreeing(keys)}); every rank must make the same kind of call"
            )
        sizes = [size for size, _, _ in every]
        if self.guess is not None and sizes != self.guess:
            raise Misguessed(sizes)
        return sizes


@dataclass
class Agreement:
    """This rank's side of the per-call agreement, and what it knows of earlier calls."""

    rank: int
    device: torch.device
    #: Per call key, every rank's batch size in the last call of that kind.
    last: dict[str, list[int]] = field(default_factory=dict)
    #: Calls that ran on a guess, and guesses that were wrong (for tests and reports).
    guesses: int = 0
    misses: int = 0

    def start(
        self, key: str, size: int, grad: bool, can_guess: bool
    ) -> tuple[list[int], Pending | None]:
        """The sizes to lay the call out by, and the all-gather still to settle where they
        are a guess (None: they are known)."""
        values = [size, key_number(key), int(grad)]
        # Three ints go over the CPU where the group can (no device sync to read them back).
        where = torch.device("cpu") if "gloo" in dist.get_backend(job_group()) else self.device
        mine = torch.tensor(values, dtype=torch.int64, device=where)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        with reaching_every_rank():
            work = dist.all_gather(gathered, mine, group=job_group(), async_op=True)
        assert work is not None
        last = self.last.get(key)
        guess = last if can_guess and last is not None and last[self.rank] == size else None
        pending = Pending(work, gathered, guess)
        if guess is None:
            return pending.settle(), None
        self.guesses += 1
        return list(guess), pending

    def agreed(self, key: str, sizes: list[int], missed: bool = False) -> None:
        self.last[key] = list(sizes)
        self.misses += missed

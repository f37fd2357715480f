"""Per-rank bodies of the training-loop habit tests: several backward calls before one step
(with and without ``no_sync``), several forwards summed into one backward, and evaluation in
the middle of accumulation, each checked against plain PyTorch on every rank's batch (DDP).

Local batches differ in size between ranks (rank r has 3 + r rows) and the optimizer is
plain SGD, so a gradient that is doubled, halved or dropped shows in every comparison.
"""

from __future__ import annotations

import copy

import torch
import torch.utils._pytree as pytree

import autopart
from equivalence import assert_close, grow
from zoo import ZOO


def _batches(example, world: int, seed: int) -> list:
    """One local batch per rank, of 3 + rank rows."""
    gen = torch.Generator().manual_seed(seed)
    return [
        pytree.tree_map(lambda v, r=r: grow(v, 3 + r, gen), (example[1], example[2]))
        for r in range(world)
    ]


def _loss(out) -> torch.Tensor:
    leaf = next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    return leaf.pow(2).mean() if leaf.dim() else leaf


class _Pair:
    """The wrapped model on this rank and the DDP reference on every rank's rows."""

    def __init__(self, rank: int, world: int, name: str, **options) -> None:
        self.example = ZOO[name]()
        self.rank, self.world = rank, world
        model = self.example[0]
        self.reference = copy.deepcopy(model)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.ref_opt = torch.optim.SGD(self.reference.parameters(), lr=0.1)
        self.wrapped = autopart.Module(model, self.opt, **options)
        self.ref_params = dict(self.reference.named_parameters())

    def wrapped_loss(self, batches) -> torch.Tensor:
        args, kwargs = batches[self.rank]
        return _loss(self.wrapped(*args, **kwargs))

    def reference_loss(self, batches) -> torch.Tensor:
        return sum(_loss(self.reference(*a, **kw)) for a, kw in batches) / self.world

    def check_grads(self, what: str) -> None:
        for name, param in self.wrapped.named_parameters():
            canonical = self.wrapped.names[name]
            if self.wrapped.holders.owner(canonical) != self.rank and (
                canonical in self.wrapped.holders.sharded
            ):
                continue  # ZeRO: only the owner keeps the summed gradient
            expected = self.ref_params[name].grad
            got = param.grad if param.grad is not None else torch.zeros_like(param)
            assert_close(got, expected, f"{what}: grad of {name} on rank {self.rank}")

    def step(self, what: str) -> None:
        self.opt.step()
        self.opt.zero_grad()
        self.ref_opt.step()
        self.ref_opt.zero_grad()
        for name, param in self.wrapped.named_parameters():
            assert_close(param.detach(), self.ref_params[name].detach(), f"{what}: {name}")


def loop_habits(rank: int, world: int, name: str, options: dict) -> None:
    pair = _Pair(rank, world, name, **options)
    seeds = iter(range(100))

    # Two synced backward calls before one step.
    for _ in range(2):
        batches = _batches(pair.example, world, next(seeds))
        pair.wrapped_loss(batches).backward()
        pair.reference_loss(batches).backward()
    pair.check_grads("two backward calls")
    pair.step("after two backward calls")

    # no_sync, then two synced calls, with an evaluation in between.
    batches = _batches(pair.example, world, next(seeds))
    with pair.wrapped.no_sync():
        pair.wrapped_loss(batches).backward()
    pair.reference_loss(batches).backward()
    for k in range(2):
        batches = _batches(pair.example, world, next(seeds))
        pair.wrapped_loss(batches).backward()
        pair.reference_loss(batches).backward()
        if k == 0:
            _evaluate(pair, _batches(pair.example, world, next(seeds)))
    pair.check_grads("no_sync then two synced calls")
    pair.step("after mixed accumulation")

    # Two forwards whose losses are summed before one backward.
    first = _batches(pair.example, world, next(seeds))
    second = _batches(pair.example, world, next(seeds))
    (pair.wrapped_loss(first) + 0.5 * pair.wrapped_loss(second)).backward()
    (pair.reference_loss(first) + 0.5 * pair.reference_loss(second)).backward()
    pair.check_grads("two forwards, one backward")
    pair.step("after two forwards")


def _evaluate(pair: _Pair, batches) -> None:
    """An evaluation pass in eval mode under no_grad leaves the accumulated gradients alone."""
    pair.wrapped.eval()
    pair.reference.eval()
    with torch.no_grad():
        args, kwargs = batches[pair.rank]
        got = pair.wrapped(*args, **kwargs)
        expected = pair.reference(*args, **kwargs)
    assert_close(got, expected, f"evaluation output on rank {pair.rank}")
    pair.wrapped.train()
    pair.reference.train()


def batch_norm_counter(rank: int, world: int) -> None:
    """BatchNorm's num_batches_tracked advances once per training call, as in plain PyTorch
    (not once per microbatch, and not never), on whichever stage holds each BatchNorm, and
    state_dict() reports it; evaluation calls leave it alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 8),
        torch.nn.BatchNorm1d(8),
    )
    wrapped = autopart.Module(model, stages=2, microbatches=2)
    for _ in range(3):
        wrapped(torch.randn(4, 4)).pow(2).mean().backward()
    wrapped.eval()
    with torch.no_grad():
        wrapped(torch.randn(4, 4))
    state = wrapped.state_dict()
    for key in ("1.num_batches_tracked", "4.num_batches_tracked"):
        assert int(state[key]) == 3, f"{key} is {int(state[key])} after 3 training calls"

"""Check autopart.Module against plain PyTorch on the same model, data and optimizer.

The reference runs in each process on its own: the unwrapped model sees every rank's local
batch in turn and averages their losses, which gives exactly DistributedDataParallel's
gradients.  The wrapped model sees only this rank's batch.  Outputs (this rank's rows),
gradients of every parameter this rank holds, and parameters after each step must match.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

import autopart
from zoo import ZOO

ATOL = 2e-5
RTOL = 1e-4


@dataclass(frozen=True)
class Case:
    model: str
    stages: int | None
    microbatches: int | None
    optimizer: str  # "sgd" (with momentum) or "adam"
    local_batch: int = 4
    steps: int = 3
    zero: bool = False
    offload: bool | str = False


def grow(value, batch: int, generator: torch.Generator):
    """Fresh rows shaped like a one-sample example value."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != 1:
        return value
    rows = value.repeat(batch, *([1] * (value.dim() - 1)))
    if value.is_floating_point():
        return torch.randn(rows.shape, generator=generator)
    high = int(value.max()) + 1 if value.numel() else 1
    return torch.randint(0, max(high, 2), rows.shape, generator=generator).to(value.dtype)


def rows_of(call, lo: int, hi: int):
    """Rows ``lo:hi`` of every batch tensor in ``(args, kwargs)``."""
    return pytree.tree_map(
        lambda v: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 else v, call
    )


def make_optimizer(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-3)


def loss_of(output) -> torch.Tensor:
    """A loss that touches every floating output: the mean square of tensors, scalars as is."""
    total = torch.zeros(())
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            total = total + (leaf.pow(2).mean() if leaf.dim() else leaf)
    return total


def assert_close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def assert_near(actual, expected, what: str, rel: float) -> None:
    """Close in relative norm: for low-precision runs, where elementwise tolerances loose
    enough for rounding would also pass a zeroed or doubled gradient (both are off by 1.0)."""
    want = expected.detach().double()
    err = float((actual.detach().double() - want).norm() / want.norm().clamp_min(1e-30))
    assert err < rel, f"{what}: relative error {err:.3g} is not below {rel}"


def run_case(rank: int, world: int, case: Case) -> autopart.Module:
    torch.manual_seed(0)
    model, args, kwargs = ZOO[case.model]()
    reference = copy.deepcopy(model)
    opt = make_optimizer(case.optimizer, model.parameters())
    ref_opt = make_optimizer(case.optimizer, reference.parameters())
    wrapped = autopart.Module(
        model,
        opt,
        stages=case.stages,
        microbatches=case.microbatches,
        zero=case.zero,
        offload=case.offload,
    )
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    b = case.local_batch
    for step in range(case.steps):
        gen = torch.Generator().manual_seed(100 + step)
        full = pytree.tree_map(partial(grow, batch=b * world, generator=gen), (args, kwargs))
        mine = rows_of(full, rank * b, (rank + 1) * b)
        out = wrapped(*mine[0], **mine[1])
        loss_of(out).backward()

        ref_outs = []
        for k in range(world):
            a, kw = rows_of(full, k * b, (k + 1) * b)
            ref_outs.append(reference(*a, **kw))
        (sum(loss_of(o) for o in ref_outs) / world).backward()

        _compare_outputs(out, ref_outs, rank, f"{case} step {step} output")
        held = dict(wrapped.named_parameters())
        if step == 0:
            _assert_every_parameter_held(held, reference, case)
        for name, param in held.items():
            expected = ref_params[name].grad
            if expected is None:
                expected = torch.zeros_like(param)
            canonical = wrapped.names[name]
            if case.zero and wrapped.holders.owner(canonical) != rank:
                # ZeRO sums a gradient onto the replica that steps it; the others drop it.
                if canonical in wrapped.holders.sharded:
                    assert param.grad is None, f"{case}: rank {rank} kept the gradient of {name}"
                continue
            got = param.grad if param.grad is not None else torch.zeros_like(param)
            assert_close(got, expected, f"{case} step {step} grad of {name} on rank {rank}")
        if case.stages is not None:
            assert wrapped.plan.num_stages == case.stages, wrapped.plan.num_stages
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        for name, param in held.items():
            assert_close(param.detach(), ref_params[name].detach(), f"{case} step {step} {name}")
    return wrapped


def _assert_every_parameter_held(held, reference, case: Case) -> None:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(held))
    union = set().union(*every)
    expected = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert expected <= union, f"{case}: no rank holds {sorted(expected - union)}"


def _compare_outputs(out, ref_outs, rank: int, what: str) -> None:
    got = pytree.tree_leaves(out)
    per_rank = [pytree.tree_leaves(o) for o in ref_outs]
    assert len(got) == len(per_rank[rank]), f"{what}: structure differs"
    assert type(out) is type(ref_outs[rank]), f"{what}: {type(out)} vs {type(ref_outs[rank])}"
    for i, leaf in enumerate(got):
        expected = per_rank[rank][i]  # a scalar too: this rank's own value, as under DDP
        if isinstance(expected, torch.Tensor):
            assert_close(leaf.detach(), expected.detach(), f"{what} leaf {i}")
        else:
            assert leaf == expected, f"{what} leaf {i}: {leaf} != {expected}"


def run_cases(rank: int, world: int, cases: list[Case]) -> None:
    for case in cases:
        run_case(rank, world, case)

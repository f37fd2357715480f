"""The DDP oracle for models that take real arguments (token ids, padded labels, masks).

Each rank trains the wrapped model on its own local batch, which may differ in size from the
other ranks'.  The reference is the unwrapped model in the same process, run on every rank's
batch in turn with the losses averaged: exactly DistributedDataParallel's gradients.  The
wrapped model's outputs must be this rank's own (its rows, and its own loss), and gradients
and parameters after each SGD step must match.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

import autopart
from equivalence import assert_close
from hf_zoo import HF_ZOO


@dataclass(frozen=True)
class OracleCase:
    model: str
    stages: int | None = None
    microbatches: int | None = None
    steps: int = 2
    #: Rows of rank r's local batch: base + r (unequal on purpose), or per step.
    base_rows: int = 3
    step_rows: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    #: Train on a model's scalar output as it is, not on its square (see `loss_of`).
    direct: bool = False


def loss_of(output, direct: bool = False) -> torch.Tensor:
    """The model's own loss where it returns one, else the mean square of its first tensor
    (the scalar itself with ``direct``: what a schedule that back-propagates the model's own
    loss needs)."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    if direct and isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    first = next(t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor))
    return first.float().pow(2).mean()


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def run_oracle(rank: int, world: int, case: OracleCase) -> None:
    build, make_batch = HF_ZOO[case.model]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    opt = sgd(model.parameters())
    wrapped = autopart.Module(
        model, opt, stages=case.stages, microbatches=case.microbatches, **case.options
    )
    rows = list(case.step_rows) or [case.base_rows] * case.steps
    train_like_ddp(wrapped, reference, make_batch, rows, rank, world, str(case), case.direct)
    if case.stages is not None:
        assert wrapped.plan.num_stages == case.stages
    if "schedule" in case.options:
        assert wrapped.plan.schedule == case.options["schedule"]


def train_like_ddp(
    wrapped, reference, make_batch, rows, rank: int, world: int, label: str, direct: bool = False
):
    """One SGD step per entry of ``rows`` (rank r's local batch has ``rows[step] + r`` rows)
    on the wrapped model and on ``reference``, DDP's average over every rank's batch; outputs,
    gradients and parameters must match after each step."""
    opt, ref_opt = wrapped.optimizer, sgd(reference.parameters())
    ref_params = dict(reference.named_parameters())
    for step, base in enumerate(rows):
        batches = [make_batch(base + r, seed=1000 * step + r) for r in range(world)]
        out = wrapped(*batches[rank][0], **batches[rank][1])
        loss_of(out, direct).backward()
        ref_outs = [reference(*args, **kwargs) for args, kwargs in batches]
        (sum(loss_of(o, direct) for o in ref_outs) / world).backward()
        what = f"{label} step {step} rank {rank}"
        compare_outputs(out, ref_outs[rank], what)
        for name, param in wrapped.named_parameters():
            canonical = wrapped.names[name]
            if canonical in wrapped.holders.sharded and wrapped.holders.owner(canonical) != rank:
                continue  # ZeRO: only the owner keeps the summed gradient
            expected = ref_params[name].grad
            assert expected is not None and param.grad is not None, f"{what}: no grad of {name}"
            assert_close(param.grad, expected, f"{what} grad of {name}")
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        for name, param in wrapped.named_parameters():
            assert_close(param.detach(), ref_params[name].detach(), f"{what} param {name}")
    dist.barrier()


def compare_outputs(out, expected, what: str) -> None:
    got, want = pytree.tree_leaves(out), pytree.tree_leaves(expected)
    tensors = [t for t in want if isinstance(t, torch.Tensor)]
    got_tensors = [t for t in got if isinstance(t, torch.Tensor)]
    assert len(got_tensors) == len(tensors), f"{what}: {len(got_tensors)} vs {len(tensors)}"
    for i, (a, b) in enumerate(zip(got_tensors, tensors, strict=True)):
        assert_close(a.detach(), b.detach(), f"{what} output {i}")


def run_oracles(rank: int, world: int, cases: list[OracleCase]) -> None:
    for case in cases:
        run_oracle(rank, world, case)


def eval_without_labels(
    rank: int, world: int, name: str, stages: int, options: dict | None = None
) -> None:
    """Train a step with labels and dropout on, then evaluate without labels in eval mode:
    the outputs equal the plain model's in eval mode, and repeat exactly; training resumes."""
    from hf_zoo import DROPOUT_ZOO

    build, make_batch = DROPOUT_ZOO[name]
    torch.manual_seed(0)
    model = build()
    opt = sgd(model.parameters())
    wrapped = autopart.Module(model, opt, stages=stages, microbatches=2, **(options or {}))
    args, kwargs = make_batch(3 + rank, seed=rank)
    loss_of(wrapped(*args, **kwargs)).backward()
    opt.step()
    opt.zero_grad()
    reference = copy.deepcopy(model).eval()
    reference.load_state_dict(wrapped.state_dict())  # every stage's trained weights
    wrapped.eval()
    unlabeled = {k: v for k, v in kwargs.items() if k not in ("labels", "targets")}
    with torch.no_grad():
        first = wrapped(*args, **unlabeled)
        second = wrapped(*args, **unlabeled)
        expected = reference(*args, **unlabeled)
    compare_outputs(first, expected, f"{name} eval on rank {rank}")
    for a, b in zip(pytree.tree_leaves(first), pytree.tree_leaves(second), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f"{name}: eval outputs differ between two calls"
    wrapped.train()
    loss = loss_of(wrapped(*args, **kwargs))
    loss.backward()
    assert torch.isfinite(loss)
    dist.barrier()


def eval_each(rank: int, world: int, names: list[str], stages: int) -> None:
    """`eval_without_labels` for each named model in turn, in one launch."""
    for name in names:
        eval_without_labels(rank, world, name, stages)

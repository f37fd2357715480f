"""Per-rank bodies of the 1F1B tests: training-loop habits on a model that computes its own
loss (GPT-2 with padded labels), each checked against plain PyTorch on every rank's batch (DDP).

1F1B back-propagates during the model call, so each habit exercises how the caller's later
``backward()`` meets that work: a scaled loss, accumulation with and without ``no_sync``, a
GradScaler, an evaluation in between, a call without labels (which runs as GPipe), and a
backward that reaches an output other than the loss (an error that loses nothing).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import autopart
from ddp_oracle import compare_outputs
from equivalence import assert_close
from hf_zoo import HF_ZOO


class _Pair:
    def __init__(self, rank: int, world: int, **options) -> None:
        build, self.make_batch = HF_ZOO["gpt2"]
        torch.manual_seed(0)
        model = build()
        self.rank, self.world = rank, world
        self.reference = copy.deepcopy(model)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1)
        self.ref_opt = torch.optim.SGD(self.reference.parameters(), lr=0.1)
        self.wrapped = autopart.Module(model, self.opt, **options)
        self.ref_params = dict(self.reference.named_parameters())
        self.seed = 0

    def batches(self, labels: bool = True) -> list:
        self.seed += 1
        found = []
        for r in range(self.world):
            args, kwargs = self.make_batch(3 + r, seed=100 * self.seed + r)
            if not labels:
                kwargs.pop("labels")
            found.append((args, kwargs))
        return found

    def mine(self, batches):
        args, kwargs = batches[self.rank]
        return self.wrapped(*args, **kwargs)

    def reference_loss(self, batches, loss=lambda out: out.loss) -> torch.Tensor:
        return sum(loss(self.reference(*a, **kw)) for a, kw in batches) / self.world

    def check_grads(self, what: str) -> None:
        for name, param in self.wrapped.named_parameters():
            expected = self.ref_params[name].grad
            got = param.grad if param.grad is not None else torch.zeros_like(param)
            assert_close(got, expected, f"{what}: grad of {name} on rank {self.rank}")

    def step(self, what: str, scaler=None) -> None:
        if scaler is None:
            self.opt.step()
        else:
            scaler.step(self.opt)
            scaler.update()
        self.opt.zero_grad()
        self.ref_opt.step()
        self.ref_opt.zero_grad()
        for name, param in self.wrapped.named_parameters():
            assert_close(param.detach(), self.ref_params[name].detach(), f"{what}: {name}")


def habits(rank: int, world: int, options: dict) -> None:
    pair = _Pair(rank, world, **options)

    # Accumulation over two calls of loss / 2, the first under no_sync.
    for k in range(2):
        batches = pair.batches()
        if k == 0:
            with pair.wrapped.no_sync():
                (pair.mine(batches).loss / 2).backward()
        else:
            (pair.mine(batches).loss / 2).backward()
        (pair.reference_loss(batches) / 2).backward()
    assert pair.wrapped.plan.schedule == "1f1b"
    pair.check_grads("loss / 2 over two calls, the first under no_sync")
    pair.step("after accumulation")

    # Two synced backward calls before one step, with an evaluation in between.
    for k in range(2):
        batches = pair.batches()
        pair.mine(batches).loss.backward()
        pair.reference_loss(batches).backward()
        if k == 0:
            _evaluate(pair)
    pair.check_grads("two synced calls around an evaluation")
    pair.step("after two synced calls")

    # A GradScaler's scaled loss: the step sees the unscaled gradients.
    scaler = autopart.GradScaler("cpu", init_scale=2.0**6)
    batches = pair.batches()
    scaler.scale(pair.mine(batches).loss).backward()
    pair.reference_loss(batches).backward()
    scaler.unscale_(pair.opt)
    pair.check_grads("GradScaler")
    pair.step("after a GradScaler step", scaler)

    # No labels: the loss is computed outside, and this call runs as GPipe.
    batches = pair.batches(labels=False)
    logits = pair.mine(batches).logits
    logits.pow(2).mean().backward()
    pair.reference_loss(batches, lambda out: out.logits.pow(2).mean()).backward()
    pair.check_grads("a call without labels")
    pair.step("after a call without labels")

    # A backward that reaches the logits of a 1f1b call is refused, and loses nothing.
    batches = pair.batches()
    out = pair.mine(batches)
    with pytest.raises(autopart.AutopartError, match="reached output"):
        (out.loss + out.logits.mean()).backward()
    batches = pair.batches()
    pair.mine(batches).loss.backward()
    pair.reference_loss(batches).backward()
    pair.check_grads("a call after the refused backward")
    pair.step("after the refused backward")
    dist.barrier()


def _evaluate(pair: _Pair) -> None:
    """Evaluation in eval mode under no_grad leaves the accumulated gradients alone."""
    batches = pair.batches()
    pair.wrapped.eval()
    pair.reference.eval()
    with torch.no_grad():
        got = pair.mine(batches)
        args, kwargs = batches[pair.rank]
        expected = pair.reference(*args, **kwargs)
    compare_outputs(got, expected, f"evaluation on rank {pair.rank}")
    pair.wrapped.train()
    pair.reference.train()


def activation_memory(rank: int, world: int, workdir: str) -> None:
    """Peak live bytes of this rank's stage over a training step under GPipe and 1F1B,
    with the resident state (parameters, gradients, Adam's moments) counted apart."""
    import json
    from pathlib import Path

    from autopart.cli.models import gpt2
    from autopart.reports.memtrack import LiveBytes

    results = {}
    for schedule in ("gpipe", "1f1b"):
        model, args = gpt2(n_layer=4, n_embd=64, n_head=4, seq=64, vocab=256, dropout=0.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        wrapped = autopart.Module(model, opt, stages=4, microbatches=8, schedule=schedule)
        ids = args[0].repeat(8, 1)
        for _ in range(1):  # gradients and optimizer state exist before the measurement
            wrapped(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        held = list(wrapped.parameters()) + list(wrapped.stage_module.buffers())
        state = sum(p.numel() * p.element_size() for p in held) * 4
        held += [p.grad for p in wrapped.parameters()]
        held += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        with LiveBytes(held) as tracker:
            wrapped(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        assert wrapped.plan.schedule == schedule
        stage = wrapped.plan.stage_of_rank(rank)
        results[schedule] = {
            "predicted": stage.memory_bytes,
            "measured": tracker.peak,
            "state": state,
            "stage": stage.index,
        }
    Path(workdir, f"memory{rank}.json").write_text(json.dumps(results))


def loss_fn_trains_like_ddp(rank: int, world: int, name: str, microbatches: int) -> None:
    """A model that returns a tensor, its loss computed outside and passed as ``loss_fn=``:
    under 1F1B on ``world`` stages, two SGD steps give DDP's gradients and parameters; the
    state dict keeps the model's own names; a call without ``target=`` is a clear error."""
    import torch.nn.functional as F
    import torch.utils._pytree as pytree

    from equivalence import grow
    from zoo import ZOO

    model, example_args, example_kwargs = ZOO[name]()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)

    def loss_fn(out, target):
        return F.mse_loss(out, target)

    wrapped = autopart.Module(
        model, opt, stages=world, microbatches=microbatches, schedule="1f1b", loss_fn=loss_fn
    )
    ref_params = dict(reference.named_parameters())
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        batches = []
        for r in range(world):
            args, kwargs = pytree.tree_map(
                lambda v, r=r, gen=gen: grow(v, 3 + r, gen), (example_args, example_kwargs)
            )
            with torch.no_grad():
                target = torch.randn(reference(*args, **kwargs).shape, generator=gen)
            batches.append((args, kwargs, target))
        args, kwargs, target = batches[rank]
        loss = wrapped(*args, target=target, **kwargs)
        loss.backward()
        expected = sum(loss_fn(reference(*a, **kw), t) for a, kw, t in batches) / world
        expected.backward()
        assert_close(loss.detach(), loss_fn(reference(*args, **kwargs), target).detach(), "loss")
        for pname, param in wrapped.named_parameters():
            got = param.grad if param.grad is not None else torch.zeros_like(param)
            assert_close(got, ref_params[pname].grad, f"step {step}: grad of {pname}")
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    assert wrapped.plan.schedule == "1f1b"
    assert set(wrapped.state_dict()) == set(reference.state_dict())
    with pytest.raises(autopart.AutopartError, match="target="):
        wrapped(*batches[rank][0])
    dist.barrier()


def traced_training(rank: int, world: int, workdir: str, schedule: str) -> None:
    """Four training steps with ``trace=``: calls 2 to 4 are recorded and written by rank 0
    (an evaluation call inside one of them is not)."""
    pair = _Pair(rank, world, stages=2, microbatches=4, schedule=schedule, trace=workdir)
    for step in range(4):
        out = pair.mine(pair.batches())
        if step == 1:  # a no-grad call between a timed forward and its backward is not timed
            with torch.no_grad():
                pair.mine(pair.batches())
        out.loss.backward()
        pair.opt.step()
        pair.opt.zero_grad()
        if step == 0:  # the first step is not timed: it also plans
            assert "nothing measured yet" in str(pair.wrapped.plan_report(show=False))
    report = pair.wrapped.plan_report(show=False)
    if rank == 0:
        pair.wrapped.plan.save(f"{workdir}/plan.json")
        Path(workdir, "report.json").write_text(
            json.dumps(
                {
                    "steps": report.steps,
                    "measured_step": report.measured_step,
                    "stages": [s.measured for s in report.stages],
                    "text": str(report),
                }
            )
        )
    dist.barrier()

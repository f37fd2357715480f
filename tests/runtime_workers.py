"""Per-rank bodies of the runtime feature tests (spawned processes import them from here)."""

from __future__ import annotations

import copy
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import autopart
from autopart.errors import AutopartError
from autopart.runtime.transport.routing import RuntimeCommError
from equivalence import assert_close, assert_near, grow, rows_of
from zoo import ZOO, kwargs_mask

LOCAL = 4
#: bf16 against the bf16 autocast reference, in relative norm: measured 2.5e-3 (a doubled or
#: zeroed gradient is off by 1).
BF16_REL = 0.02


def _batch(example, world: int, seed: int):
    args, kwargs = example[1], example[2]
    gen = torch.Generator().manual_seed(seed)
    return torch.utils._pytree.tree_map(lambda v: grow(v, LOCAL * world, gen), (args, kwargs))


def _reference_loss(reference, full, world: int, loss_fn) -> torch.Tensor:
    total = 0
    for k in range(world):
        a, kw = rows_of(full, k * LOCAL, (k + 1) * LOCAL)
        total = total + loss_fn(reference(*a, **kw))
    return total / world


def _square(out) -> torch.Tensor:
    return out.pow(2).mean()


def _train_step(wrapped_pairs, reference, ref_opt, example, rank: int, world: int, seed: int):
    """One step of each (wrapped, optimizer) pair on this rank's rows, and of the reference
    on every rank's rows, all on the batch drawn from ``seed``."""
    full = _batch(example, world, seed)
    mine = rows_of(full, rank * LOCAL, (rank + 1) * LOCAL)
    for module, optimizer in wrapped_pairs:
        _square(module(*mine[0], **mine[1])).backward()
        optimizer.step()
        optimizer.zero_grad()
    _reference_loss(reference, full, world, _square).backward()
    ref_opt.step()
    ref_opt.zero_grad()


def accumulate_and_clip(rank: int, world: int) -> None:
    """no_sync accumulation, then a global-norm clip, against the same on plain PyTorch."""
    example = ZOO["skip"]()
    model = example[0]
    reference = copy.deepcopy(model)
    wrapped = autopart.Module(model, stages=2, microbatches=2)
    for seed in range(3):
        full = _batch(example, world, seed)
        mine = rows_of(full, rank * LOCAL, (rank + 1) * LOCAL)
        if seed < 2:
            with wrapped.no_sync():
                _square(wrapped(*mine[0], **mine[1])).backward()
        else:
            _square(wrapped(*mine[0], **mine[1])).backward()
        _reference_loss(reference, full, world, _square).backward()
    ref_params = dict(reference.named_parameters())
    for name, param in wrapped.named_parameters():
        assert_close(param.grad, ref_params[name].grad, f"accumulated grad of {name}")
    norm = wrapped.clip_grad_norm_(0.05)
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    assert_close(norm, ref_norm, "global grad norm")
    for name, param in wrapped.named_parameters():
        assert_close(param.grad, ref_params[name].grad, f"clipped grad of {name}")


def state_round_trip(rank: int, world: int, workdir: str) -> None:
    """Full state and optimizer state gathered on every rank load into plain PyTorch."""
    example = ZOO["tied"]()
    model = example[0]
    reference = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    wrapped = autopart.Module(model, opt, stages=2)
    for seed in range(2):
        _train_step([(wrapped, opt)], reference, ref_opt, example, rank, world, seed)

    state = wrapped.state_dict()
    expected = reference.state_dict()
    assert list(state) == list(expected), (list(state), list(expected))
    for key, value in expected.items():
        assert_close(state[key], value, f"state_dict[{key}]")
    only0 = wrapped.state_dict(rank0_only=True)
    assert (len(only0) > 0) == (rank == 0)

    opt_state = wrapped.optimizer_state_dict()
    fresh = copy.deepcopy(reference)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(opt_state)
    ref_sd = ref_opt.state_dict()
    assert opt_state["param_groups"] == ref_sd["param_groups"]
    for index, entry in ref_sd["state"].items():
        for key, value in entry.items():
            assert_close(opt_state["state"][index][key], value, f"optimizer state {index}.{key}")

    # A new wrapper restored from the saved states continues exactly like the reference.
    path = Path(workdir) / "plan.json"
    if rank == 0:
        wrapped.plan.save(path)
    dist.barrier()
    restored_model = copy.deepcopy(example[0])
    restored_opt = torch.optim.Adam(restored_model.parameters(), lr=1e-2)
    restored = autopart.Module(restored_model, restored_opt, plan=path)
    restored.load_state_dict(state)
    full = _batch(example, world, 7)
    mine = rows_of(full, rank * LOCAL, (rank + 1) * LOCAL)
    _square(restored(*mine[0], **mine[1])).backward()
    assert restored.plan == wrapped.plan
    restored.load_optimizer_state_dict(opt_state)
    restored_opt.step()
    _reference_loss(reference, full, world, _square).backward()
    ref_opt.step()
    ref_params = dict(reference.named_parameters())
    for name, param in restored.named_parameters():
        assert_close(param.detach(), ref_params[name].detach(), f"restored {name}")


class _Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.a(x))))


def eval_and_no_grad(rank: int, world: int) -> None:
    """eval() turns dropout off on every stage; no_grad keeps nothing for backward."""
    torch.manual_seed(0)
    model = _Dropped()
    reference = copy.deepcopy(model).eval()
    wrapped = autopart.Module(model, stages=2)
    x = torch.randn(LOCAL * world, 16, generator=torch.Generator().manual_seed(3))
    mine = x[rank * LOCAL : (rank + 1) * LOCAL]
    train_out = wrapped(mine)
    expected = reference(mine)
    from autopart.cost import get_device_spec

    default = get_device_spec("cpu").intra_node_bandwidth
    assert wrapped.plan.device["intra_node_bandwidth"] != default, "links were not measured"
    assert not torch.allclose(train_out, expected), "dropout did not act in training mode"
    wrapped.eval()
    assert_close(wrapped(mine).detach(), expected.detach(), "eval output")
    with torch.no_grad():
        out = wrapped(mine)
    assert out.grad_fn is None and not out.requires_grad
    assert_close(out, expected.detach(), "no_grad output")
    wrapped.train()
    again = wrapped(mine)
    assert not torch.allclose(again, expected), "train() did not turn dropout back on"


def recompute_dropout(rank: int, world: int) -> None:
    """A recomputing stage replays the forward's dropout masks: gradients stay exact."""
    torch.manual_seed(0)
    model = _Dropped()
    wrapped = autopart.Module(model, stages=2, microbatches=2)
    x = torch.randn(LOCAL * world, 16, generator=torch.Generator().manual_seed(3))
    mine = x[rank * LOCAL : (rank + 1) * LOCAL]
    with torch.no_grad():
        wrapped(mine)  # plans on the first call
    wrapped.schedule.stage.recompute = True
    torch.manual_seed(10 + rank)
    out = wrapped(mine)
    _square(out).backward()
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters()}
    # The same step without recomputation, with the same random draws.
    for param in wrapped.parameters():
        param.grad = None
    wrapped.schedule.stage.recompute = False
    torch.manual_seed(10 + rank)
    out2 = wrapped(mine)
    assert_close(out2.detach(), out.detach(), "output with the same seed")
    _square(out2).backward()
    for name, param in wrapped.named_parameters():
        assert_close(param.grad, grads[name], f"grad of {name} with and without recompute")


def bad_inputs(rank: int, world: int) -> None:
    """Calls unlike the first one: captured anew when they can be, a clear error on every
    rank when not, and never the first call's result for other arguments."""
    model, args, kwargs = kwargs_mask()
    wrapped = autopart.Module(model, stages=2)
    x = args[0].repeat(LOCAL, 1, 1)
    mask = kwargs["mask"].repeat(LOCAL, 1)
    wrapped(x, mask=mask)
    try:
        wrapped(x)
    except AutopartError as err:
        assert "mask" in str(err), err
    else:
        raise AssertionError("a call without a required argument was accepted")

    # A changed non-tensor argument: its own graph, so the result is the plain model's.
    plain = _Scaled()
    scaled = autopart.Module(copy.deepcopy(plain), stages=min(world, 2))
    rows = torch.randn(LOCAL, 8)
    assert_close(scaled(rows, scale=1.0), plain(rows, scale=1.0), "scale=1.0")
    assert_close(scaled(rows, scale=3.0), plain(rows, scale=3.0), "scale=3.0 after 1.0")
    # On one rank only: every rank stops with a clear error instead of waiting.
    try:
        scaled(rows, scale=5.0 if rank == world - 1 else 1.0)
    except AutopartError as err:
        assert "different arguments" in str(err), err
    else:
        raise AssertionError("ranks calling the model differently were not stopped")


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, *, scale: float):
        return self.b(self.a(x) * scale)


def dies_after_one_step(rank: int, world: int, workdir: str) -> None:
    """Rank 1 dies after the first step; the others must fail fast with a clear error."""
    _second_step_without_rank1(rank, workdir, 10, lambda: os._exit(17), RuntimeCommError)


def stalls_after_one_step(rank: int, world: int, workdir: str) -> None:
    """Rank 1 stalls (alive, not calling) after the first step, in a process group the
    script made with a long timeout; rank 0 must fail within autopart's ``timeout=``."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))

    def stall() -> None:
        time.sleep(20)
        os._exit(0)

    _second_step_without_rank1(rank, workdir, 4, stall, Exception)


def _second_step_without_rank1(
    rank: int, workdir: str, timeout: float, leave, caught: type[BaseException]
) -> None:
    """Two stages, one step on both ranks; then rank 1 ``leave``s, and rank 0 writes how its
    second step ended (the error it raised, and after how many seconds)."""
    model, args, _ = ZOO["mlp"]()
    wrapped = autopart.Module(model, stages=2, timeout=timeout)
    x = args[0].repeat(LOCAL, 1)
    _square(wrapped(x)).backward()
    if rank == 1:
        leave()
    _record_step(rank, workdir, lambda: _square(wrapped(x)).backward(), caught)


def _record_step(rank: int, workdir: str, step, caught: type[BaseException]) -> None:
    """Run ``step`` and write how it ended (the error it raised, and after how many seconds)
    to ``rank{rank}.json``; then leave at once, without the process group's shutdown."""
    began = time.monotonic()
    try:
        step()
        outcome: dict[str, Any] = {"error": None}
    except caught as err:
        outcome = {"error": f"{type(err).__name__}: {err}"}
    outcome["seconds"] = time.monotonic() - began
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)


class _MasksWhenAsked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, mask):
        h = self.fc(x)
        if mask.any():
            h = h.masked_fill(mask[:, None], 0.0)
        return self.out(h)


def branch_taken_on_one_rank(rank: int, world: int, workdir: str, stages: int) -> None:
    """A step where a batch takes the other side of a branch on values: the rank that runs
    the branch gets the error naming the line; the other fails within ``timeout=`` instead
    of waiting for it.  At 2 stages the branch sees both ranks' rows (one stage replica), so
    both batches take the other side; rank 0 then runs it."""
    torch.manual_seed(0)
    wrapped = autopart.Module(_MasksWhenAsked(), stages=stages, timeout=4)
    x = torch.randn(LOCAL, 8)
    some = torch.tensor([True, False, False, True])
    _square(wrapped(x, some)).backward()
    mask = torch.zeros(LOCAL, dtype=torch.bool) if rank == 1 or stages == 2 else some
    _record_step(rank, workdir, lambda: _square(wrapped(x, mask)).backward(), Exception)


def plan_of_a_launch(rank: int, world: int, workdir: str, launch: int) -> None:
    """Plan ALBERT at 2 stages under bf16 (where link timings once moved the cut) on this
    launch's ranks; rank 0 writes the plan."""
    from bf16_workers import _masked, albert

    torch.manual_seed(0)
    model = albert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = autopart.Module(model, opt, stages=2, precision="bf16")
    with torch.no_grad():
        wrapped(**_masked(LOCAL, seed=rank))
    if rank == 0:
        assert wrapped.plan is not None
        Path(workdir, f"plan{launch}.json").write_text(wrapped.plan.to_json())


def measured_stage_memory(rank: int, world: int, cases: list, workdir: str) -> None:
    """Peak live bytes of this rank's stage over two training steps, next to the prediction."""
    from autopart.cli.models import gpt2
    from autopart.reports.memtrack import LiveBytes

    results = []
    for layers, seq, stages, microbatches, local, offload, precision, zero in cases:
        model, args = gpt2(n_layer=layers, n_embd=64, n_head=4, seq=seq, vocab=256, dropout=0.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        wrapped = autopart.Module(
            model,
            opt,
            stages=stages,
            microbatches=microbatches,
            offload=offload,
            precision=precision,
            zero=zero,
        )
        ids = args[0].repeat(local, 1)
        with torch.no_grad():
            wrapped(ids)  # plan and build the stage outside the measurement
        held = list(wrapped.parameters()) + list(wrapped.stage_module.buffers())
        if offload:
            # Host memory is this machine's memory too: make the host-side gradients and
            # optimizer state exist before measuring, then count only what the device holds.
            wrapped(ids).logits.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            held = list(wrapped.stage_module.buffers())
        with LiveBytes(held) as tracker:
            for _ in range(2):
                wrapped(ids).logits.float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=False)
        stage = wrapped.plan.stage_of_rank(rank)
        state = 0 if offload else sum(p.numel() * p.element_size() for p in held) * 4
        results.append({"predicted": stage.memory_bytes, "measured": tracker.peak, "state": state})
    Path(workdir, f"memory{rank}.json").write_text(json.dumps(results))


def bf16_matches_autocast_reference(rank: int, world: int, offload: bool = False) -> None:
    """precision='bf16' against the same model under native bf16 autocast, in bf16 tolerance."""
    example = ZOO["skip"]()
    model = example[0]
    reference = copy.deepcopy(model)
    wrapped = autopart.Module(model, stages=2, microbatches=2, precision="bf16", offload=offload)
    full = _batch(example, world, 0)
    mine = rows_of(full, rank * LOCAL, (rank + 1) * LOCAL)
    out = wrapped(*mine[0], **mine[1])
    _square(out.float()).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _reference_loss(reference, full, world, lambda o: _square(o.float())).backward()
        expected = reference(*mine[0], **mine[1])
    assert_near(out.float(), expected.float(), "bf16 output", BF16_REL)
    assert wrapped.schedule.autocast is torch.bfloat16
    ref_params = dict(reference.named_parameters())
    for name, param in wrapped.named_parameters():
        assert param.dtype is torch.float32, "master weights must stay fp32"
        assert_near(param.grad, ref_params[name].grad, f"bf16 grad of {name}", BF16_REL)
    # The same step in fp32 differs by more than rounding: autocast really ran.
    fp32_out = copy.deepcopy(reference).float()(*mine[0], **mine[1])
    assert not torch.equal(out.float(), fp32_out.float())


def caller_autocast_matches_reference(rank: int, world: int) -> None:
    """A GPT-2 wrapped with the default precision and trained inside the caller's own
    ``torch.autocast``, as DDP users do, on 2 stages of 2 microbatches: it runs under that
    autocast (its logits come back in bf16 and its SGD updates equal eager autocast's), and
    an evaluation call outside autocast mid-training runs in fp32."""
    from autopart.cli.models import gpt2

    model, _ = gpt2(n_layer=2, n_embd=64, n_head=4, seq=16, vocab=512, dropout=0.0)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    wrapped = autopart.Module(model, opt, stages=2, microbatches=2, cost="analytic")
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        full = torch.randint(0, 512, (LOCAL * world, 16), generator=gen)
        mine = full[rank * LOCAL : (rank + 1) * LOCAL]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = wrapped(mine, labels=mine)
            parts = [
                reference(
                    full[k * LOCAL : (k + 1) * LOCAL], labels=full[k * LOCAL : (k + 1) * LOCAL]
                )
                for k in range(world)
            ]
        out.loss.backward()
        (sum(p.loss for p in parts) / world).backward()
        expected = parts[rank]
        assert out.logits.dtype == expected.logits.dtype == torch.bfloat16, out.logits.dtype
        assert_near(out.loss.detach(), expected.loss.detach(), f"loss {step}", BF16_REL)
        if step == 0:  # evaluation mid-step, outside autocast: fp32, as unwrapped
            wrapped.eval(), reference.eval()
            with torch.no_grad():
                got, want = wrapped(mine).logits, reference(mine).logits
            assert got.dtype == want.dtype == torch.float32, got.dtype
            assert_close(got, want, "fp32 evaluation logits")
            wrapped.train(), reference.train()
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    ref_params = dict(reference.named_parameters())
    for name, param in wrapped.named_parameters():
        assert param.dtype is torch.float32, "master weights must stay fp32"
        update = param.detach() - initial[name]
        assert_near(update, ref_params[name].detach() - initial[name], f"update {name}", BF16_REL)


class _CutAfterLinear(nn.Module):
    """A Linear whose bf16 output a second stage reads with ops autocast leaves alone: those
    run in bf16 in eager autocast only if the value arrives in bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.act = nn.SiLU()
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.act(h) * 3 - h)


def bf16_values_cross_in_their_own_dtype(rank: int, world: int, workdir: str) -> None:
    """Under bf16 a stage reads a bf16 value as eager autocast does, exactly, and the
    activations and their gradients take half the bytes they take in fp32."""
    from autopart.runtime.pipeline.runner import StageRunner
    from autopart.runtime.transport.messages import ACT, GRAD

    sent: list[int] = []
    post = StageRunner._post

    def counting(self, state, message, tensor):
        if message.phase in (ACT, GRAD) and message.dst != self.rank:
            sent.append(tensor.numel() * tensor.element_size())
        return post(self, state, message, tensor)

    StageRunner._post = counting  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(LOCAL * world, 16, generator=gen)
    mine = full[rank * LOCAL : (rank + 1) * LOCAL]
    bytes_by_precision = {}
    for precision in ("bf16", "fp32"):
        torch.manual_seed(0)
        model = _CutAfterLinear()
        reference = copy.deepcopy(model)
        wrapped = autopart.Module(
            model, split_points=["act"], microbatches=1, precision=precision, cost="analytic"
        )
        sent.clear()
        out = wrapped(mine)
        out.float().pow(2).sum().backward()
        bytes_by_precision[precision] = sum(sent)
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected = reference(full)[rank * LOCAL : (rank + 1) * LOCAL]
            assert torch.equal(out.float(), expected.float()), (out, expected)
    if rank == 0:
        Path(workdir, "bytes.json").write_text(json.dumps(bytes_by_precision))


def one_stage_step_memory(rank: int, world: int, workdir: str) -> None:
    """A language model's loss trained on, its logits returned but not, on one stage: the
    peak live bytes of a whole training step (forward and backward) of the wrapped model and
    of the plain one, in fp32 and inside the caller's bf16 autocast."""
    from autopart.cli.models import gpt2
    from autopart.reports.memtrack import LiveBytes

    ids = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(1))
    peaks: dict[str, dict[str, int]] = {}
    for precision in ("fp32", "bf16"):
        model, _ = gpt2(n_layer=1, n_embd=32, n_head=2, seq=32, vocab=4096, dropout=0.0)
        plain = copy.deepcopy(model)
        wrapped = autopart.Module(model, cost="analytic")

        def step(m, bf16=precision == "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = m(ids, labels=ids)
            out.loss.backward()
            return out.logits.dtype

        for _ in range(2):  # planned and built; gradients exist on both sides
            dtypes = {step(wrapped), step(plain)}
        assert len(dtypes) == 1, f"logits come back as {dtypes} under {precision}"
        peaks[precision] = {}
        for name, m, held in (("plain", plain, plain), ("autopart", wrapped, wrapped.stage_module)):
            state = [*held.parameters(), *held.buffers()]
            with LiveBytes([*state, *(p.grad for p in held.parameters())]) as tracker:
                step(m)
            peaks[precision][name] = tracker.peak
    peaks["logits"] = {"fp32": 8 * 32 * 4096 * 4}
    Path(workdir, "peaks.json").write_text(json.dumps(peaks))


def _optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def zero_matches_reference(rank: int, world: int, stages: int, workdir: str) -> None:
    """zero=True trains exactly like plain PyTorch with Adam and splits the optimizer state."""
    example = ZOO["fan_out"]()
    model = example[0]
    reference = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-2)
    wrapped = autopart.Module(model, opt, stages=stages, microbatches=2, zero=True)
    with torch.no_grad():  # plan once; the plain copy runs the same split without ZeRO
        first = _batch(example, world, 0)
        wrapped(*rows_of(first, rank * LOCAL, (rank + 1) * LOCAL)[0])
    same_split = copy.deepcopy(wrapped.plan)
    for stage in same_split.stages:
        stage.zero = False
    plain = autopart.Module(plain_model, plain_opt, plan=same_split)
    ref_params = dict(reference.named_parameters())
    for seed in range(3):
        pairs = [(wrapped, opt), (plain, plain_opt)]
        _train_step(pairs, reference, ref_opt, example, rank, world, seed)
        for name, param in wrapped.named_parameters():
            assert_close(param.detach(), ref_params[name].detach(), f"step {seed} {name}")
    saved = wrapped.optimizer_state_dict()
    expected = ref_opt.state_dict()
    for index, entry in expected["state"].items():
        for key, value in entry.items():
            assert_close(saved["state"][index][key], value, f"optimizer state {index}.{key}")
    full = _batch(example, world, 99)
    mine = rows_of(full, rank * LOCAL, (rank + 1) * LOCAL)
    for module in (wrapped, plain):
        _square(module(*mine[0], **mine[1])).backward()
    result = {
        "replicas": wrapped.plan.stage_of_rank(rank).replicas,
        "zero": _optimizer_state_bytes(opt),
        "plain": _optimizer_state_bytes(plain_opt),
        "largest": max(p.numel() * p.element_size() for p in wrapped.parameters()) * 2,
        "zero_grads": wrapped.memory_report()["gradients"],
        "plain_grads": plain.memory_report()["gradients"],
    }
    Path(workdir, f"zero{rank}.json").write_text(json.dumps(result))


def memory_report_by_category(rank: int, world: int, workdir: str) -> None:
    """memory_report() splits this rank's bytes by category and sees activations grow."""
    from autopart.cli.models import gpt2

    model, args = gpt2(n_layer=2, n_embd=64, n_head=4, seq=64, vocab=256, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    wrapped = autopart.Module(model, opt, stages=2, microbatches=2, track_memory=True)
    reports = []
    for rows in (4, 8):
        ids = args[0].repeat(rows, 1)
        wrapped(ids).logits.pow(2).mean().backward()
        opt.step()
        reports.append(wrapped.memory_report())
    held = sum(p.numel() * p.element_size() for p in wrapped.parameters())
    first, second = reports
    assert second["parameters"] >= held
    assert second["gradients"] == held
    assert second["optimizer_state"] >= 2 * held  # Adam: two moments (plus step counters)
    assert second["activations"] > first["activations"] > 0
    assert second["forward_peak"] >= second["forward_end"]
    assert second["backward_peak"] >= second["forward_end"]
    Path(workdir, f"report{rank}.json").write_text(json.dumps(reports))


def fp16_overflow_skips_everywhere(rank: int, world: int) -> None:
    """An inf gradient on one rank's stage makes every rank skip the step and back off."""
    torch.manual_seed(0)
    model = _Dropped().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = autopart.Module(model, opt, stages=2, precision="fp16")
    scaler = autopart.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(LOCAL, 16, generator=torch.Generator().manual_seed(rank))
    for step in range(2):
        out = wrapped(x)
        assert wrapped.schedule.autocast is torch.float16
        scaler.scale(_square(out.float())).backward()
        if step == 0 and rank == 1:
            next(iter(wrapped.parameters())).grad[0] = float("inf")  # forced overflow
        before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        moved = any(not torch.equal(p, before[n]) for n, p in wrapped.named_parameters())
        if step == 0:
            assert not moved, f"rank {rank} stepped despite an overflow on rank 1"
            assert scaler.get_scale() == scale * 0.5
        else:
            assert moved, f"rank {rank} skipped a clean step"
            assert scaler.get_scale() == scale


class _OnlyCopiesReadMasters(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails if any op other than the host-to-device copy reads a host master parameter."""

    def __init__(self, masters: list[torch.Tensor]) -> None:
        super().__init__()
        self.masters = {t.untyped_storage()._cdata for t in masters}
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reads = [
            t
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata in self.masters
        ]
        if reads:
            assert func in (torch.ops.aten._to_copy.default, torch.ops.aten.detach.default), func
            self.copies += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


def _deep_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(16):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers)


def offload_autocast_casts(rank: int, world: int, workdir: str) -> None:
    """Under bf16 autocast the low-precision casts of offloaded weights are not kept for
    backward either: what forward leaves alive is the same as without the weights."""
    base = _deep_mlp()
    x = torch.randn(LOCAL, 64, generator=torch.Generator().manual_seed(rank))
    found = {}
    for offload in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped = autopart.Module(
            model, opt, stages=2, precision="bf16", offload=offload, track_memory=True
        )
        for _ in range(2):
            wrapped(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        found[str(offload)] = wrapped.memory_report()["activations"]
    found["bf16_weights"] = sum(p.numel() * 2 for p in wrapped.parameters())
    Path(workdir, f"casts{rank}.json").write_text(json.dumps(found))


def offload_residency(rank: int, world: int, workdir: str) -> None:
    """Parameter copies on the device stay within one op's parameters plus the prefetched ones."""
    base = _deep_mlp()
    results = []
    for depth in (0, 1, 2):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped = autopart.Module(
            model, opt, stages=2, microbatches=2, offload=True, prefetch=depth
        )
        x = torch.randn(LOCAL, 64, generator=torch.Generator().manual_seed(rank))
        wrapped(x).pow(2).mean().backward()  # plan and build
        opt.step()
        opt.zero_grad()
        held = list(wrapped.parameters())
        with _OnlyCopiesReadMasters(held) as watch:
            wrapped(x).pow(2).mean().backward()
        opt.step()
        sizes = [p.numel() * p.element_size() for p in held]
        results.append(
            {
                "depth": depth,
                "peak": wrapped.offload.peak,
                "after": wrapped.offload.current,
                "stage_total": sum(sizes),
                "largest_param": max(sizes),
                "largest_group": 64 * 64 * 4 + 64 * 4,  # one Linear: weight and bias
                "copies": watch.copies,
                "report": wrapped.memory_report(),
            }
        )
    Path(workdir, f"residency{rank}.json").write_text(json.dumps(results))


def mixed_offload_plan(rank: int, world: int, model_name: str = "mlp") -> None:
    """A plan whose stages differ, one offloaded and (with replicas) one under ZeRO, trains
    exactly like plain PyTorch, and its state dicts still gather every parameter."""
    from autopart.capture import capture
    from autopart.cost import AnalyticCostModel, get_device_spec
    from autopart.plan.planner import PlanOptions, make_plan

    example = ZOO[model_name]()
    model = example[0]
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    graph = capture(model, *_batch(example, 1, 0))
    options = PlanOptions(devices=world, global_batch=LOCAL * world, stages=2, microbatches=2)
    # A fixed spec, so every rank makes the same plan (the CPU's own spec is measured).
    plan = make_plan(graph, AnalyticCostModel(get_device_spec("h100")), options)
    plan.stages[-1].offload = "params+optimizer"
    for stage in plan.stages:
        stage.zero = stage.replicas > 1 and stage.offload == "none"
    wrapped = autopart.Module(model, opt, plan=plan)
    ref_params = dict(reference.named_parameters())
    for seed in range(3):
        _train_step([(wrapped, opt)], reference, ref_opt, example, rank, world, seed)
        for name, param in wrapped.named_parameters():
            assert_close(param.detach(), ref_params[name].detach(), f"step {seed} {name}")
    mine = plan.stage_of_rank(rank)
    assert (wrapped.offload is not None) == (mine.offload != "none")
    assert bool(wrapped.holders.sharded) == mine.zero
    full = wrapped.state_dict()
    for name, value in reference.state_dict().items():
        assert_close(full[name], value, f"state_dict {name}")


def different_plans(rank: int, world: int) -> None:
    """Ranks handed different plans fail at once with one clear error, instead of hanging."""
    from autopart.capture import capture
    from autopart.cost import AnalyticCostModel, get_device_spec
    from autopart.plan.planner import PlanOptions, make_plan

    example = ZOO["mlp"]()
    graph = capture(example[0], *_batch(example, 1, 0))
    options = PlanOptions(devices=world, global_batch=LOCAL * world, microbatches=1 + rank)
    plan = make_plan(graph, AnalyticCostModel(get_device_spec("h100")), options)
    wrapped = autopart.Module(example[0], plan=plan)
    full = _batch(example, world, 0)
    mine = rows_of(full, rank * LOCAL, (rank + 1) * LOCAL)
    try:
        wrapped(*mine[0], **mine[1])
    except AutopartError as err:
        assert "different plans" in str(err), err
    else:
        raise AssertionError("different plans were accepted")


def zero_bf16_matches_autocast_reference(rank: int, world: int) -> None:
    """ZeRO under native bf16 autocast (no Apex): owners' gradients and the stepped
    parameters match the autocast reference in bf16 tolerance."""
    example = ZOO["skip"]()
    model = example[0]
    reference = copy.deepcopy(model)
    # SGD: the update is the gradient itself, so a wrong one shows (Adam's first step does not).
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in reference.named_parameters()}
    wrapped = autopart.Module(model, opt, stages=1, precision="bf16", zero=True)
    full = _batch(example, world, 0)
    mine = rows_of(full, rank * LOCAL, (rank + 1) * LOCAL)
    _square(wrapped(*mine[0], **mine[1]).float()).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _reference_loss(reference, full, world, lambda o: _square(o.float())).backward()
    ref_params = dict(reference.named_parameters())
    owned = 0
    for name, param in wrapped.named_parameters():
        if param.grad is not None:
            owned += 1
            assert_near(param.grad, ref_params[name].grad, f"grad of {name}", BF16_REL)
    assert 0 < owned < len(list(wrapped.parameters())), owned  # split between the replicas
    opt.step()
    ref_opt.step()
    for name, param in wrapped.named_parameters():
        step, ref_step = param - before[name], ref_params[name] - before[name]
        assert_near(step, ref_step, f"update of {name}", BF16_REL)


class _PeakOutput(nn.Module):
    """A scalar output autopart cannot split into rows (``amax``): it is the row-weighted
    mean of the chunks' values over the global batch, the same on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)

    def forward(self, x):
        y = self.second(torch.tanh(self.first(x)))
        return y, y.amax(), (y.amax() > 0).to(torch.int64)


def unsplit_scalar_is_the_chunk_mean(rank: int, world: int, stages: int) -> None:
    torch.manual_seed(0)
    model = _PeakOutput()
    reference = copy.deepcopy(model)
    wrapped = autopart.Module(model, stages=stages, microbatches=2)
    full = torch.randn(LOCAL * world, 6, generator=torch.Generator().manual_seed(5))
    y, peak, flag = wrapped(full[rank * LOCAL : (rank + 1) * LOCAL])
    replicas = world // stages
    chunks = full.tensor_split(2 * replicas)  # equal local batches: 2 microbatches x replicas
    outputs = [reference(chunk) for chunk in chunks]
    expected = sum(out[1] * len(chunk) for out, chunk in zip(outputs, chunks, strict=True)) / len(
        full
    )
    assert_close(peak.detach(), expected.detach(), f"the chunk mean on rank {rank}")
    assert flag == outputs[0][2], "a non-float scalar is the first chunk's value"
    (peak + y.sum() * 0).backward()
    expected.backward()
    for name, param in wrapped.named_parameters():
        grad = dict(reference.named_parameters())[name].grad
        assert_close(param.grad, grad, f"grad of {name} on rank {rank}")

"""The cases of `gpu_check.py`: sections 1 to 4 (placement, exactness, measured costs,
predicted peak), section 5's self-contained checks, and what its offload cases share.

Each case is a function that returns an `Outcome` (or raises `Skip`, or fails with any other
exception, which the runner records); it builds what it needs and leaves nothing behind, so a
failure in one case cannot change another's numbers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from gpu_models import FAMILIES, Batch, Family, gpt2, logits_of, loss_of, padded, seeded, tensors_in

#: SGD's learning rate: updates well above rounding, so a wrong gradient shows.
LR = 0.1
#: Largest relative error of an update or an output against plain PyTorch (fp32, TF32 off).
EXACT = 1e-4
#: How far a measured peak may be from the plan's prediction (the issue's target is 10%).
PEAK_TOLERANCE = 0.25


class Outcome(NamedTuple):
    ok: bool
    value: str
    detail: str


class Skip(Exception):
    """The case cannot run here (no CUDA, or what it reads did not run); its reason."""


@dataclass(frozen=True)
class Context:
    gpu: bool
    device: torch.device  # the rank's device: where losses and outputs must come back
    tmp: Path  # checkpoints for models built on meta


Case = tuple[str, Callable[[], Outcome]]


def autopart_module(model: nn.Module, optimizer: Any = None, **config: Any) -> nn.Module:
    """`autopart.Module`, imported when a case first runs: `gpu_check.main` has pointed the
    profile cache (read on import) at a fresh directory by then."""
    import autopart

    return autopart.Module(model, optimizer, **config)


def wrap(model: nn.Module, **config: Any) -> nn.Module:
    return autopart_module(model, torch.optim.SGD(model.parameters(), lr=LR), **config)


def train(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[Batch]
) -> list[tuple[float, torch.device]]:
    """Training steps as a user writes them; each loss's value (finite, or an error) and
    device."""
    losses = []
    for batch in batches:
        loss = loss_of(model(*batch.args, **batch.kwargs), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise AssertionError(f"loss {value} is not finite")
        losses.append((value, loss.device))
    return losses


def where(device: str, ctx: Context) -> torch.device:
    return ctx.device if device == "cuda" else torch.device(device)


def placed(family: Family, model_at: str, ctx: Context, name: str) -> tuple[nn.Module, Any]:
    """The model on ``model_at``; one built on meta gets its values from a safetensors file
    of the same seeded model (``save_model`` writes a tied weight once)."""
    if model_at != "meta":
        return seeded(family.build, None).to(where(model_at, ctx)), None
    from safetensors.torch import save_model

    path = ctx.tmp / f"{name}.safetensors"
    save_model(seeded(family.build, None), str(path))
    with torch.device("meta"):
        return seeded(family.build, None), str(path)


# -- shared with the offload section (`gpu_check.OffloadSection`) -----------------------------


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05)


def timed_steps(model, opt, data, device) -> tuple[list[float], list[float]]:
    """MSE training steps on ``(x, y)`` pairs: the losses, and each step's wall time."""
    losses, times = [], []
    for x, y in data:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return losses, times


def peak_outcome(measured: int, predicted: int, what: str, below: bool = False) -> Outcome:
    """Measured bytes against predicted: within `PEAK_TOLERANCE`, or only not above it."""
    ratio = measured / predicted
    ok = ratio <= 1 + PEAK_TOLERANCE and (below or ratio >= 1 - PEAK_TOLERANCE)
    bound = f"at most x{1 + PEAK_TOLERANCE:.2f}" if below else f"within {PEAK_TOLERANCE:.0%}"
    return Outcome(
        ok, f"x{ratio:.2f}", f"{what} {gib(measured)} / predicted {gib(predicted)} (pass {bound})"
    )


def gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.2f} MiB"


@contextlib.contextmanager
def memory_cap(ctx: Context, cap: int):
    """Cap this process's CUDA memory at ``cap`` bytes for the block (nothing on a CPU)."""
    if not ctx.gpu:
        yield
        return
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total, ctx.device)
    try:
        yield
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)


# -- 1. placement matrix ----------------------------------------------------------------------


def matrix_cases(ctx: Context) -> list[Case]:
    """Every family at every placement, the usual one (model on the CPU, batch on the GPU)
    first; two cases with the default cost, which measures on CUDA."""
    models = ("cpu", "cuda", "meta") if ctx.gpu else ("cpu", "meta")
    inputs = ("cuda", "cpu") if ctx.gpu else ("cpu",)
    auto = {("llama", "cpu", "cuda"), ("cnn", "cuda", "cuda")}
    cases = []
    for data_at in inputs:
        for model_at in models:
            for name in FAMILIES:
                cost = "auto" if (name, model_at, data_at) in auto else "analytic"
                label = f"matrix {name} m:{model_at} x:{data_at}"
                label += " cost=auto" if cost == "auto" else ""
                cases.append((label, partial(placement, ctx, name, model_at, data_at, cost)))
    return cases


def placement(ctx: Context, name: str, model_at: str, data_at: str, cost: str) -> Outcome:
    """Two training steps and an evaluation call: losses finite, everything on the device."""
    family = FAMILIES[name]
    if (name, model_at, ctx.gpu) == ("mixtral", "meta", False):
        # Mixtral's router picks histc's dtype by device: int32 for any but the CPU, meta
        # included, so a graph traced on meta runs on CUDA (as on the GPU) but not on a CPU.
        raise Skip("Mixtral traced on meta takes its CUDA branch (int32 histc): GPU only")
    model, checkpoint = placed(family, model_at, ctx, name)
    wrapped = wrap(model, cost=cost, checkpoint=checkpoint)
    batches = [family.batch(seed).to(where(data_at, ctx)) for seed in (1, 2)]
    losses = train(wrapped, wrapped.optimizer, batches)
    wrapped.eval()
    with torch.no_grad():
        out = wrapped(*batches[0].eval_args, **batches[0].eval_kwargs)
    found = {str(d) for _, d in losses} | {str(t.device) for t in tensors_in(out)}
    ok = found == {str(ctx.device)}
    shown = ", ".join(f"{v:.3f}" for v, _ in losses)
    return Outcome(ok, f"{losses[-1][0]:.3f}", f"losses {shown}; loss and outputs on {found}")


# -- 2. exactness against plain PyTorch -------------------------------------------------------


def exact_cases(ctx: Context) -> list[Case]:
    return [(f"exact {name} vs plain", partial(exactness, ctx, name)) for name in EXACT_ONES]


#: The families compared with plain PyTorch.  The CNN runs as one microbatch: BatchNorm
#: normalizes over the rows of a microbatch, so only then is it plain PyTorch's computation.
EXACT_ONES = {"gpt2": {}, "llama": {}, "cnn": {"microbatches": 1}}


def exactness(ctx: Context, name: str) -> Outcome:
    """Three SGD steps from the same values and batches (the model on the CPU, the batch on
    the device), then evaluation: updates and logits against plain PyTorch's."""
    family = FAMILIES[name]
    model = seeded(family.build, 0.0)  # dropout 0: both runs compute the same thing
    reference = copy.deepcopy(model).to(ctx.device)
    initial = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    batches = [family.batch(seed).to(ctx.device) for seed in (1, 2, 3)]
    wrapped = wrap(model, cost="analytic", **EXACT_ONES[name])
    train(wrapped, wrapped.optimizer, batches)
    train(reference, torch.optim.SGD(reference.parameters(), lr=LR), batches)
    update = update_error(dict(wrapped.named_parameters()), reference, initial)
    wrapped.eval()
    reference.eval()
    with torch.no_grad():
        got = logits_of(wrapped(*batches[0].eval_args, **batches[0].eval_kwargs)).cpu()
        want = logits_of(reference(*batches[0].eval_args, **batches[0].eval_kwargs)).cpu()
    output = float((got - want).abs().max() / want.abs().max())
    return Outcome(
        update < EXACT and output < EXACT,
        f"{max(update, output):.1e}",
        f"worst update rel. error {update:.1e}, eval logits max rel. error {output:.1e} "
        f"(pass < {EXACT:g})",
    )


def update_error(got: dict[str, torch.Tensor], reference: nn.Module, initial: dict) -> float:
    """The largest relative norm error of a parameter's update against the reference's: a
    doubled or dropped gradient is off by 1."""
    missing = set(initial) - set(got)
    if missing:
        raise AssertionError(f"parameters missing from the wrapped model: {sorted(missing)[:3]}")
    worst = 0.0
    for name, ref in reference.named_parameters():
        want = ref.detach().cpu().double() - initial[name].double()
        diff = got[name].detach().cpu().double() - initial[name].double() - want
        worst = max(worst, float(diff.norm() / want.norm().clamp_min(1e-30)))
    return worst


# -- 3. measured-cost planning ----------------------------------------------------------------


def measured_cases(ctx: Context, sequential: Callable[[], nn.Module]) -> list[Case]:
    """GPT-2 and the offload section's `nn.Sequential` (4 x 1024 here), on the CPU, with
    the batch on the device."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1024, generator=gen)
    rows = Batch((x,), {}, (x,), target=torch.randint(0, 1024, (64,), generator=gen))
    return [
        ("measured gpt2 m:cpu", lambda: measured(ctx, seeded(gpt2), padded(1))),
        ("measured sequential m:cpu", lambda: measured(ctx, sequential(), rows)),
    ]


def measured(ctx: Context, model: nn.Module, batch: Batch) -> Outcome:
    """The first call (capture, profiling, planning, build) with measured costs, timed, and a
    training step after it: it passes when the loss is finite.  The detail says which cost
    model the plan used, and the first warning on the way."""
    cost = "auto" if ctx.gpu else "measured"  # auto is analytic on a CPU: measure anyway
    warned = Warnings()
    logging.getLogger("autopart").addHandler(warned)
    try:
        wrapped = wrap(model, cost=cost)
        batch = batch.to(ctx.device)
        began = time.perf_counter()
        out = wrapped(*batch.args, **batch.kwargs)
        first = time.perf_counter() - began
    finally:
        logging.getLogger("autopart").removeHandler(warned)
    loss = loss_of(out, batch)
    loss.backward()
    wrapped.optimizer.step()
    plan = wrapped.plan
    fell_back = warned.first or "none"
    return Outcome(
        math.isfinite(float(loss.detach())),
        f"{first:.1f} s",
        f"first call {first:.1f} s; cost_source {plan.cost_source}, {plan.num_stages} stage(s) "
        f"x {plan.microbatches} microbatch(es); autopart warnings: {fell_back}",
    )


class Warnings(logging.Handler):
    """Keeps the first WARNING (or worse) of the ``autopart`` loggers: a fallback to
    analytic costs says so there."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = record.getMessage().splitlines()[0][:120]


# -- 4. predicted peak against measured -------------------------------------------------------


def peak_cases(ctx: Context) -> list[Case]:
    return [("peak gpt2 4x256 pred/meas", lambda: predicted_peak(ctx))]


def predicted_peak(ctx: Context) -> Outcome:
    """GPT-2 of 4 layers x 256 wide, sequences of 128, batch 8, all on the device: the
    allocator's peak over two steps after the build, less what was allocated before the model
    came (what earlier cases left), against the stage's predicted peak."""
    synchronize(ctx)
    baseline = torch.cuda.memory_allocated(ctx.device) if ctx.gpu else 0
    vocab = 50257 if ctx.gpu else 512
    seq = 128 if ctx.gpu else 16
    model = seeded(gpt2, layers=4, hidden=256, positions=seq, vocab=vocab)
    batches = [padded(seed, rows=8, seq=seq, vocab=vocab).to(ctx.device) for seed in (1, 2, 3)]
    wrapped = wrap(model.to(ctx.device), cost="analytic")
    train(wrapped, wrapped.optimizer, batches[:1])
    predicted = wrapped.plan.stages[0].memory_bytes
    if not ctx.gpu:
        raise Skip(f"no CUDA: predicted {gib(predicted)}, nothing measured")
    torch.cuda.reset_peak_memory_stats(ctx.device)
    train(wrapped, wrapped.optimizer, batches[1:])
    peak = torch.cuda.max_memory_allocated(ctx.device) - baseline
    return peak_outcome(peak, predicted, "max_memory_allocated over 2 steps")


def synchronize(ctx: Context) -> None:
    if ctx.gpu:
        torch.cuda.synchronize(ctx.device)


# -- 5. offload's own checks (`gpu_check.OffloadSection` runs them) ---------------------------


def recompute_check(device: torch.device) -> Outcome:
    """Gradients of a dropout model with its stage recomputing equal those without."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 64), nn.Dropout(0.5))
    wrapped = autopart_module(net, stages=1, microbatches=2)
    x = torch.randn(8, 64, device=device)
    with torch.no_grad():
        wrapped(x)
    grads = []
    for recompute in (True, False):
        wrapped.schedule.stage.recompute = recompute
        for param in wrapped.parameters():
            param.grad = None
        torch.manual_seed(7)
        if device.type == "cuda":
            torch.cuda.manual_seed(7)
        wrapped(x).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in wrapped.parameters()])
    worst = max(float((a - b).abs().max()) for a, b in zip(*grads, strict=True))
    return Outcome(worst < 1e-6, f"{worst:.1e}", "largest gradient difference (pass < 1e-6)")


def buffer_check(device: torch.device) -> Outcome:
    """After training, the user's model reports the stage's live BatchNorm statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))
    wrapped = autopart_module(net, stages=1, microbatches=1)
    for _ in range(3):
        wrapped(torch.randn(8, 16, device=device) + 3.0).pow(2).mean().backward()
    stats = net.state_dict()["1.running_mean"]
    live = wrapped.stage_module.get_submodule("1").running_mean
    same = stats.device == live.device and torch.equal(stats, live)
    moved = float(stats.abs().max()) > 0.1  # the initial statistics are zeros
    counted = int(net.state_dict()["1.num_batches_tracked"])
    return Outcome(
        same and moved and counted == 3 and stats.device == device,
        str(stats.device),
        f"running_mean on {stats.device}, the stage's: {same}, moved from zero: {moved}, "
        f"num_batches_tracked {counted} (want 3)",
    )

"""The device script's ``overhead`` section: a model that fits one GPU loses nothing wrapped.

HF GPT-2 124M at its default configuration (12 x 768, vocabulary 50257, dropout on), trained
as a DDP user trains it: inside the caller's own bf16 ``torch.autocast``, AdamW, batch 8 x
1024, model and batch on the GPU, every autopart option at its default (measured costs).  The
plain model and the wrapped one (a deep copy) train side by side, alternating step by step, so
that clocks and temperatures hit both alike; medians of the steps after the first two.

Each contender's peak is what it holds itself (its parameters and AdamW state) plus the most
its own step allocated above what was allocated before it began, so the other contender's
resident state does not count.  Pass, as the overhead issue asks: the step within 1.03x
plain's, the peak within 1.05x; the plan's predicted step within 15 % of the measured one and
its predicted peak within 10 %.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from gpu_cases import Case, Context, Outcome, Skip, autopart_module, gib, synchronize
from gpu_models import _hf, gpt2

STEP_RATIO, PEAK_RATIO = 1.03, 1.05
STEP_PREDICTION, PEAK_PREDICTION = 0.15, 0.10
WARMUP, TIMED = 2, 10


class Overhead:
    """Plain and wrapped GPT-2 measured once; the section's cases read the result."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.rows, self.seq = (8, 1024) if ctx.gpu else (4, 32)
        self.vocab = 50257 if ctx.gpu else 512
        self.result: dict[str, Any] | None = None

    def cases(self) -> list[Case]:
        return [
            ("overhead 1 GPT-2 124M step", self.step),
            ("overhead 2 GPT-2 124M peak", self.peak),
            ("overhead 3 predicted step", self.predicted_step),
            ("overhead 4 predicted peak", self.predicted_peak),
        ]

    def _train(self, model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> int:
        """One training step; the bytes it allocated above what was allocated before it."""
        device = self.ctx.device
        gpu = self.ctx.gpu
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if gpu else 0
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return torch.cuda.max_memory_allocated(device) - before if gpu else 0

    def measure(self) -> dict[str, Any]:
        if self.result is not None:
            return self.result
        device = self.ctx.device
        torch.manual_seed(0)
        if self.ctx.gpu:  # GPT2Config's defaults: 124M
            base = _hf("GPT2LMHeadModel", None, ()).to(device)
        else:
            base = gpt2(layers=2, hidden=64, positions=self.seq, vocab=self.vocab)
        contenders: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
        plain = copy.deepcopy(base)
        contenders["plain"] = (plain, torch.optim.AdamW(plain.parameters(), lr=1e-5))
        opt = torch.optim.AdamW(base.parameters(), lr=1e-5)
        contenders["autopart"] = (autopart_module(base, opt), opt)
        gen = torch.Generator().manual_seed(1)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        above: dict[str, list[int]] = {name: [] for name in contenders}
        for step in range(WARMUP + TIMED):
            ids = torch.randint(0, self.vocab, (self.rows, self.seq), generator=gen).to(device)
            for name, (model, optimizer) in contenders.items():
                synchronize(self.ctx)
                began = time.perf_counter()
                allocated = self._train(model, optimizer, ids)
                synchronize(self.ctx)
                if step >= WARMUP:
                    times[name].append(time.perf_counter() - began)
                    above[name].append(allocated)
        wrapped = contenders["autopart"][0]
        plan = wrapped.plan
        self.result = {
            "step": {name: statistics.median(t) for name, t in times.items()},
            "peak": {
                name: _resident(model, optimizer) + max(above[name])
                for name, (model, optimizer) in contenders.items()
            },
            "predicted step": plan.step_seconds,
            "predicted peak": plan.stages[0].memory_bytes,
            "plan": f"{plan.num_stages} stage(s), {plan.microbatches} microbatch(es), "
            f"recompute {[s.recompute for s in plan.stages]}",
        }
        return self.result

    def step(self) -> Outcome:
        r = self.measure()
        ours, plain = r["step"]["autopart"], r["step"]["plain"]
        detail = f"{1e3 * ours:.1f} ms / plain {1e3 * plain:.1f} ms; {r['plan']}"
        if not self.ctx.gpu:
            raise Skip(f"no CUDA: {detail}")
        return Outcome(ours / plain <= STEP_RATIO, f"x{ours / plain:.3f}", detail)

    def peak(self) -> Outcome:
        r = self.measure()
        ours, plain = r["peak"]["autopart"], r["peak"]["plain"]
        if not self.ctx.gpu:
            raise Skip("no CUDA: max_memory_allocated is measured on a GPU")
        detail = f"{gib(ours)} / plain {gib(plain)} (max_memory_allocated)"
        return Outcome(ours / plain <= PEAK_RATIO, f"x{ours / plain:.3f}", detail)

    def predicted_step(self) -> Outcome:
        r = self.measure()
        measured, predicted = r["step"]["autopart"], r["predicted step"]
        error = (measured - predicted) / measured
        detail = f"predicted {1e3 * predicted:.1f} ms, measured {1e3 * measured:.1f} ms"
        if not self.ctx.gpu:
            raise Skip(f"no CUDA: {detail}")
        return Outcome(abs(error) <= STEP_PREDICTION, f"{error:+.0%}", detail)

    def predicted_peak(self) -> Outcome:
        r = self.measure()
        measured, predicted = r["peak"]["autopart"], r["predicted peak"]
        if not self.ctx.gpu:
            raise Skip(f"no CUDA: predicted {gib(predicted)}, nothing measured")
        error = (measured - predicted) / measured
        detail = f"predicted {gib(predicted)}, measured {gib(measured)}"
        return Outcome(abs(error) <= PEAK_PREDICTION, f"{error:+.0%}", detail)


def _resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The bytes of a model's parameters and its optimizer's state, each storage once."""
    from autopart.reports.memtrack import storage_bytes

    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return storage_bytes([*model.parameters(), *state])

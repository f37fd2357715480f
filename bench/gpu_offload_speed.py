"""The device script's ``floors`` section: offload at the speed of the host link.

HF GPT-2 (``--gpt-layers`` x ``--gpt-width``: 12 x 2048, 709 M parameters, at its default
dropout), bf16 autocast, AdamW, batch 4 x 512; the model and the batch on the CPU; the GPU
capped at ``--gpt-cap-gb`` (6 GB) with ``set_per_process_memory_fraction`` and the planner told
the same; every other option at its default.  Printed beside the offloaded step (median of the
steps after the first): the three floors, each measured in the same run, as the offload issue
defines them, and the plan's predicted step:

* link: the weights twice in bf16 and their gradients once (6 bytes per parameter) at the
  bandwidth of one large pinned copy to the device;
* compute: the same step in plain PyTorch on the GPU, uncapped;
* host optimizer: AdamW's 28 bytes per parameter at the bandwidth of one large host copy.

Pass: the step within 1.5x of the largest floor, and the prediction within 20 %.

With ``profile_dir``, one more offloaded step runs under ``torch.profiler`` and its tables (by
device time and by host time) are written there, to find where the time goes.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpu_cases import Case, Context, Outcome, Skip, autopart_module, gib, memory_cap, synchronize
from gpu_models import _hf

#: The offload issue's acceptance: the step within this factor of the largest floor, and the
#: plan's prediction within this fraction of the measured step.
FLOOR_FACTOR = 1.5
PREDICTION = 0.2
LINK_BYTES, HOST_STEP_BYTES = 6, 28  # per parameter
VOCAB = 50257


class OffloadSpeed:
    """The offloaded step and its floors, measured once and read by the section's cases."""

    def __init__(
        self,
        ctx: Context,
        layers: int,
        width: int,
        seq: int,
        cap_gb: float,
        profile_dir: Path | None = None,
    ) -> None:
        self.ctx, self.layers, self.width, self.seq = ctx, layers, width, seq
        self.profile_dir = profile_dir
        self.cap = int(cap_gb * 2**30)
        gen = torch.Generator().manual_seed(2)
        self.batches = [torch.randint(0, VOCAB, (4, seq), generator=gen) for _ in range(3)]
        self.result: dict[str, Any] | None = None

    def cases(self) -> list[Case]:
        return [
            ("floors 1 GPT-2 offload step", self.step_against_floors),
            ("floors 2 predicted step", self.prediction),
        ]

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        names = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
        sizes = dict(n_layer=self.layers, n_embd=self.width, n_head=16, n_positions=self.seq)
        tokens = dict(bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, vocab_size=VOCAB)
        return _hf("GPT2LMHeadModel", None, names, **sizes, **tokens)

    def steps(self, model: nn.Module, opt: torch.optim.Optimizer, autocast: bool) -> list[float]:
        """Training steps as a user writes them (the batch as given), each one's wall time."""
        times = []
        for ids in self.batches:
            synchronize(self.ctx)
            began = time.perf_counter()
            device_type = self.ctx.device.type
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            synchronize(self.ctx)
            times.append(time.perf_counter() - began)
        return times

    def profile(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """One more step under the profiler; its tables go to ``profile_dir``."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.ctx.gpu:
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            loss = model(self.batches[0], labels=self.batches[0]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            synchronize(self.ctx)
        averages = prof.key_averages()
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        for key in ("self_device_time_total", "self_cpu_time_total", "cpu_time_total"):
            if key == "self_device_time_total" and not self.ctx.gpu:
                continue
            table = averages.table(sort_by=key, row_limit=40, max_name_column_width=60)
            (self.profile_dir / f"offload_profile_{key}.txt").write_text(table)

    def measure(self) -> dict[str, Any]:
        if self.result is not None:
            return self.result
        from autopart.cost.probe import measure_host_link, measure_memory_bandwidth

        device = self.ctx.device
        base = self.model()
        params = sum(p.numel() for p in base.parameters())
        plain = copy.deepcopy(base).to(device)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-5)
        plain_times = self.steps(plain, plain_opt, autocast=True)
        del plain, plain_opt
        synchronize(self.ctx)
        if self.ctx.gpu:
            torch.cuda.empty_cache()
        with memory_cap(self.ctx, self.cap):
            opt = torch.optim.AdamW(base.parameters(), lr=1e-5)
            options = {"device_memory": self.cap} if self.ctx.gpu else {"offload": True}
            wrapped = autopart_module(base, opt, precision="bf16", **options)
            times = self.steps(wrapped, opt, autocast=False)
            if self.profile_dir is not None:
                self.profile(wrapped, opt)
        link = measure_host_link(device)
        host = measure_memory_bandwidth(torch.device("cpu"))
        self.result = {
            "step": statistics.median(times[1:]),
            "floors": {
                "link": LINK_BYTES * params / link,
                "compute": statistics.median(plain_times[1:]),
                "host optimizer": HOST_STEP_BYTES * params / host,
            },
            "predicted": wrapped.plan.step_seconds,
            "plan": ", ".join(
                f"stage {s.index}: offload {s.offload}, recompute {s.recompute}"
                for s in wrapped.plan.stages
            )
            + f", {wrapped.plan.microbatches} microbatch(es)",
            "params": params,
        }
        return self.result

    def step_against_floors(self) -> Outcome:
        r = self.measure()
        name, floor = max(r["floors"].items(), key=lambda kv: kv[1])
        ratio = r["step"] / floor
        floors = ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in r["floors"].items())
        detail = (
            f"{r['params'] / 1e6:.0f} M params under {gib(self.cap)}: step "
            f"{1e3 * r['step']:.0f} ms; floors {floors}; {r['plan']}"
        )
        if not self.ctx.gpu:
            raise Skip(f"no CUDA: {detail}")
        return Outcome(ratio <= FLOOR_FACTOR, f"x{ratio:.2f} of {name}", detail)

    def prediction(self) -> Outcome:
        r = self.measure()
        error = r["predicted"] / r["step"] - 1
        detail = f"predicted {1e3 * r['predicted']:.0f} ms, measured {1e3 * r['step']:.0f} ms"
        if not self.ctx.gpu:
            raise Skip(f"no CUDA: {detail}")
        return Outcome(abs(error) <= PREDICTION, f"{error:+.0%}", detail)

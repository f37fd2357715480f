"""GPipe against 1F1B where memory is tight: what the planner picks, and what each costs.

    .venv/bin/python bench/schedules.py [--steps 15] [--device-memory 40MB]

Two ranks train the demo's GPT at 4 layers, hidden 128, sequence 64 (batch 16, AdamW, the
loss inside the model) in 2 stages of 4 microbatches under a per-device memory cap, planned
twice: with ``schedule="gpipe"`` and with ``schedule="auto"``.  The cap is one under which
GPipe, holding all 4 microbatches, must recompute and 1F1B, holding at most 2, need not.
Both wrapped models live in one process group and train on the same
batches with their steps alternating, so machine noise hits both alike.  Reported per
schedule: the plan (stages, microbatches, recompute per stage), the predicted step time, the
measured median step time, and the measured activation peak of each rank's stage
(`memory_report()`: the forward's peak less the state resident before it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from autopart.cli.demo import build_model, counting_batch
from autopart.runtime.transport.distenv import free_port, set_local_launch_env

BATCH = 16
LAYERS, HIDDEN, SEQ, STAGES, MICROBATCHES = 4, 128, 64, 2, 4


def _worker(rank: int, world: int, port: int, steps: int, memory: str, out: str) -> None:
    set_local_launch_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    import autopart

    wrapped = {}
    for schedule in ("gpipe", "auto"):
        torch.manual_seed(0)
        model, _ = build_model(LAYERS, HIDDEN, SEQ)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        module = autopart.Module(
            model,
            opt,
            device_memory=memory,
            schedule=schedule,
            stages=STAGES,
            microbatches=MICROBATCHES,
            track_memory=True,
        )
        wrapped[schedule] = (module, opt)
    generator = torch.Generator().manual_seed(0)
    local = BATCH // world
    times: dict[str, list[float]] = {name: [] for name in wrapped}
    peaks: dict[str, list[int]] = {name: [] for name in wrapped}
    for step in range(steps + 1):
        ids = counting_batch(BATCH, SEQ, generator)[rank * local : (rank + 1) * local]
        for name, (module, opt) in wrapped.items():
            dist.barrier()
            began = time.perf_counter()
            module(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # gradients stay resident under both schedules
            dist.barrier()
            if step:  # the first step captures and plans
                times[name].append(time.perf_counter() - began)
                report = module.memory_report()
                resident = report["forward_end"] - report["activations"]
                peaks[name].append(report["forward_peak"] - resident)
    every = [None] * world
    dist.all_gather_object(every, {name: max(p) for name, p in peaks.items()})
    if rank == 0:
        result = {}
        for name, (module, _) in wrapped.items():
            plan = module.plan
            result[name] = {
                "schedule": plan.schedule,
                "stages": plan.num_stages,
                "microbatches": plan.microbatches,
                "recompute": [s.recompute for s in plan.stages],
                "predicted": plan.step_seconds,
                "measured": statistics.median(times[name]),
                "activation_peaks": [e[name] for e in every],
            }
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device-memory", default="40MB")
    args = parser.parse_args()
    out = Path(f"/tmp/autopart-bench-schedules-{os.getpid()}")
    mp.start_processes(
        _worker,
        args=(2, free_port(), args.steps, args.device_memory, str(out)),
        nprocs=2,
        start_method="spawn",
    )
    result = json.loads(out.read_text())
    out.unlink()
    print(
        f"GPT {LAYERS} layers x {HIDDEN} hidden, sequence {SEQ}, on 2 ranks, "
        f"{args.device_memory} per device, batch {BATCH}; medians of {args.steps} alternating "
        "steps"
    )
    print(
        "| asked | planned | stages x M | recompute | predicted step | measured step "
        "| activation peak per rank |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for asked, found in result.items():
        recompute = ", ".join("yes" if r else "no" for r in found["recompute"])
        peaks = ", ".join(f"{p / 2**20:.2f} MiB" for p in found["activation_peaks"])
        print(
            f"| {asked} | {found['schedule']} | {found['stages']} x {found['microbatches']} | "
            f"{recompute} | {found['predicted'] * 1e3:.1f} ms | {found['measured'] * 1e3:.1f} ms "
            f"| {peaks} |"
        )


if __name__ == "__main__":
    main()

"""Per-rank memory and step time of the memory-saving modes against none, side by side.

    .venv/bin/python bench/memory_modes.py [--steps 15]

Two ranks (gloo, CPU), one stage with two replicas, a GPT-2 (4 layers, hidden 256, sequence 64,
vocabulary 1024) trained with Adam on random tokens.  For each mode a separate wrapped copy of
the same model runs in the same process group: first the copies alternate untracked steps (the
step-time medians), then each runs two steps with ``track_memory=True`` and reports rank 0's
``memory_report()`` after the second backward: bytes resident on the device by category, the
peaks of live tensor bytes, and what offload keeps in host memory.  Gradients are zeroed in
place (``set_to_none=False``), as a training loop that reuses its gradient buffers does.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from autopart.runtime.transport.distenv import free_port, set_local_launch_env

MODES = {
    "none": {},
    "offload": {"offload": True},
    "zero": {"zero": True},
    "offload+zero": {"offload": True, "zero": True},
}
LOCAL_BATCH = 8


def _worker(rank: int, world: int, port: int, steps: int) -> None:
    set_local_launch_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    import autopart
    from autopart.cli.models import gpt2

    base, _ = gpt2(n_layer=4, n_embd=256, n_head=4, seq=64, vocab=1024, dropout=0.0)
    ids = torch.randint(0, 1024, (LOCAL_BATCH, 64), generator=torch.Generator().manual_seed(rank))
    runs = {}
    for name, options in MODES.items():
        for tracked in (False, True):
            model = copy.deepcopy(base)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            wrapped = autopart.Module(model, opt, stages=1, track_memory=tracked, **options)
            runs[(name, tracked)] = (wrapped, opt)

    def step(wrapped, opt, report: bool = False) -> dict[str, int]:
        wrapped(ids).logits.pow(2).mean().backward()
        found = wrapped.memory_report() if report else {}
        opt.step()
        opt.zero_grad(set_to_none=False)
        return found

    times: dict[str, list[float]] = {name: [] for name in MODES}
    for name in MODES:
        step(*runs[(name, False)])  # warm-up
    for _ in range(steps):
        for name in MODES:
            dist.barrier()
            began = time.perf_counter()
            step(*runs[(name, False)])
            times[name].append(time.perf_counter() - began)
    reports = {}
    for name in MODES:
        wrapped, opt = runs[(name, True)]
        step(wrapped, opt)
        reports[name] = step(wrapped, opt, report=True)
    if rank == 0:
        base_time = statistics.median(times["none"])
        print(
            "| Mode | Device: parameters / gradients / optimizer state | Device peak "
            "(forward / backward bound) | Host | Step | vs none |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for name in MODES:
            r = reports[name]
            median = statistics.median(times[name])
            host = sum(v for k, v in r.items() if k.startswith("host_"))
            print(
                f"| {name} | {_mib(r['parameters'])} / {_mib(r['gradients'])} / "
                f"{_mib(r['optimizer_state'])} | {_mib(r['forward_peak'])} / "
                f"{_mib(r['backward_peak'])} | {_mib(host)} | {median * 1e3:.1f} ms | "
                f"{median / base_time:.3f} |",
                flush=True,
            )
    dist.destroy_process_group()


def _mib(value: int) -> str:
    return f"{value / 2**20:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    mp.start_processes(_worker, args=(2, free_port(), args.steps), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()

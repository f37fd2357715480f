"""Training-step time of autopart against the PyTorch baseline it replaces, side by side.

    .venv/bin/python bench/runtime_overhead.py [--steps 20] [--repeats 3]

Four pairs, each run in one process group with the two contenders alternating step by step,
so machine noise hits both alike; reported as median step times and their ratio:

1. one rank: autopart (1 stage) vs the plain model;
2. two ranks, one stage with two replicas: autopart vs DistributedDataParallel;
3. two ranks, two stages, the same split and microbatch count: autopart vs
   ``torch.distributed.pipelining`` with ``ScheduleGPipe``;
4. the same under 1F1B: autopart's ``schedule="1f1b"`` (the loss inside the model, as 1F1B
   needs) vs ``Schedule1F1B`` with the same loss as its ``loss_fn``.

A step is forward, loss, backward and an SGD step on a stack of Linear+GELU layers; the data
is random.  Times are wall clock per step, measured on rank 0 after a barrier.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from autopart.runtime.transport.distenv import free_port, set_local_launch_env

WIDTH, DEPTH, BATCH, MICROBATCHES = 512, 8, 64, 4


class Stack(nn.Module):
    def __init__(self, width: int = WIDTH, depth: int = DEPTH) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


class StackWithLoss(nn.Module):
    """The same stack returning its loss, for a schedule that back-propagates inside the call."""

    def __init__(self, stack: Stack) -> None:
        super().__init__()
        self.layers = stack.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _loss(self.layers(x))


def _step_fn(module, opt, x):
    def step():
        _loss(module(x)).backward()
        opt.step()
        opt.zero_grad()

    return step


def _loss_step_fn(module, opt, x):
    def step():
        module(x).backward()
        opt.step()
        opt.zero_grad()

    return step


def _pipelining_step(model: Stack, rank: int, world: int, x: torch.Tensor, kind: str):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    half = DEPTH // world
    part = nn.Sequential(*list(model.layers)[rank * half : (rank + 1) * half])
    stage = PipelineStage(part, rank, world, torch.device("cpu"))
    make = Schedule1F1B if kind == "1f1b" else ScheduleGPipe
    schedule = make(stage, n_microbatches=MICROBATCHES, loss_fn=lambda o, t: _loss(o))
    opt = torch.optim.SGD(part.parameters(), lr=1e-3)
    target = torch.zeros(BATCH, WIDTH)

    def step():
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=target)
        opt.step()
        opt.zero_grad()

    return step


def _time_pair(steps: int, first, second) -> tuple[list[float], list[float]]:
    times: tuple[list[float], list[float]] = ([], [])
    for fn in (first, second):
        fn()  # warm-up
    for _ in range(steps):
        for index, fn in enumerate((first, second)):
            dist.barrier()
            began = time.perf_counter()
            fn()
            dist.barrier()
            times[index].append(time.perf_counter() - began)
    return times


def _worker(rank: int, world: int, port: int, steps: int, pair: str, out: str) -> None:
    set_local_launch_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    import autopart

    torch.manual_seed(0)
    model = Stack()
    baseline_model = copy.deepcopy(model)
    local = BATCH // world
    x = torch.randn(BATCH, WIDTH)
    mine = x[rank * local : (rank + 1) * local]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if pair == "single":
        ours = autopart.Module(model, opt, stages=1, microbatches=1)
        base_opt = torch.optim.SGD(baseline_model.parameters(), lr=1e-3)
        baseline = _step_fn(baseline_model, base_opt, mine)
    elif pair == "ddp":
        ours = autopart.Module(model, opt, stages=1, microbatches=1)
        ddp = nn.parallel.DistributedDataParallel(baseline_model)
        baseline = _step_fn(ddp, torch.optim.SGD(ddp.parameters(), lr=1e-3), mine)
    elif pair == "pipe":
        split = [f"layers.{DEPTH // world}"]
        ours = autopart.Module(
            model, opt, split_points=split, microbatches=MICROBATCHES, schedule="gpipe"
        )
        baseline = _pipelining_step(baseline_model, rank, world, x, "gpipe")
    else:
        split = [f"layers.{DEPTH // world}"]
        ours = autopart.Module(
            StackWithLoss(model),
            opt,
            split_points=split,
            microbatches=MICROBATCHES,
            schedule="1f1b",
        )
        baseline = _pipelining_step(baseline_model, rank, world, x, "1f1b")
    step = _loss_step_fn(ours, opt, mine) if pair == "pipe1f1b" else _step_fn(ours, opt, mine)
    ours_times, base_times = _time_pair(steps, step, baseline)
    if rank == 0:
        Path(out).write_text(f"{statistics.median(ours_times)} {statistics.median(base_times)}")
    dist.destroy_process_group()


def _run(pair: str, world: int, steps: int) -> tuple[float, float]:
    port = free_port()
    out = Path(f"/tmp/autopart-bench-{os.getpid()}-{pair}")
    mp.start_processes(
        _worker, args=(world, port, steps, pair, str(out)), nprocs=world, start_method="spawn"
    )
    ours, base = map(float, out.read_text().split())
    out.unlink()
    return ours, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", choices=["single", "ddp", "pipe", "pipe1f1b"], help="run one pair"
    )
    args = parser.parse_args()
    rows = [
        ("1 rank, 1 stage", "plain PyTorch", "single", 1, "<= 1.03"),
        ("2 ranks, 1 stage x 2 replicas", "DDP", "ddp", 2, "<= 1.05"),
        ("2 ranks, 2 stages, GPipe, M=4", "pipelining ScheduleGPipe", "pipe", 2, "<= 1.00"),
        ("2 ranks, 2 stages, 1F1B, M=4", "pipelining Schedule1F1B", "pipe1f1b", 2, "<= 1.00"),
    ]
    print(
        f"model: {DEPTH} x Linear({WIDTH})+GELU, global batch {BATCH}, SGD; medians of "
        f"{args.steps} alternating steps, median over {args.repeats} runs"
    )
    print("| Setup | Baseline | autopart step | baseline step | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, base_name, pair, world, target in rows:
        if args.only and pair != args.only:
            continue
        runs = [_run(pair, world, args.steps) for _ in range(args.repeats)]
        ours = statistics.median(r[0] for r in runs)
        base = statistics.median(r[1] for r in runs)
        ratio = statistics.median(r[0] / r[1] for r in runs)
        print(
            f"| {label} | {base_name} | {ours * 1e3:.2f} ms | {base * 1e3:.2f} ms | "
            f"{ratio:.3f} | {target} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

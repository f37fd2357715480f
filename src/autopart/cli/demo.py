"""`autopart demo`: train a small GPT auto-partitioned across local processes.

The demo launches its own processes (a gloo group on this machine), so nothing but
``autopart demo`` is needed.  The data is synthetic and learnable: each sequence counts up from
a random token in a random stride, so the next token is predictable after two and the loss
falls within a few dozen steps.

Each process plays a device of ``--device-memory`` (4 MB by default): too small for the model
and its AdamW state, so the planner must cut it into pipeline stages.  The model computes its
own loss (``labels=``), so the planner may pick 1F1B.  The measured timeline of a few steps is
written to ``--trace`` (and the predicted one beside it), for Perfetto or chrome://tracing.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from autopart.cli.models import gpt2
from autopart.errors import AutopartError
from autopart.reports.plan_table import print_plan
from autopart.runtime.transport.distenv import free_port, set_local_launch_env

VOCAB = 256


def build_model(layers: int, hidden: int, seq: int, vocab: int = VOCAB):
    return gpt2(n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 16), seq=seq, vocab=vocab)


def counting_batch(rows: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids ``start + stride * t (mod VOCAB)``: learnable, and never the same twice."""
    start = torch.randint(0, VOCAB, (rows, 1), generator=generator)
    stride = torch.randint(1, 4, (rows, 1), generator=generator)
    return (start + stride * torch.arange(seq)) % VOCAB


def run(args: argparse.Namespace) -> int:
    if args.batch_size % args.processes:
        raise AutopartError(
            f"--batch-size {args.batch_size} must be a multiple of --processes {args.processes}"
        )
    settings = {k: v for k, v in vars(args).items() if k != "handler"}
    port = free_port()
    try:
        mp.start_processes(
            _worker, args=(settings, port), nprocs=args.processes, join=True, start_method="spawn"
        )
    except mp.ProcessRaisedException as err:
        last = str(err).strip().splitlines()[-1]
        raise AutopartError(f"a demo process failed: {last}") from None
    return 0


def _worker(rank: int, settings: dict, port: int) -> None:
    set_local_launch_env(rank, settings["processes"], port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        _train(rank, settings)
    finally:
        dist.destroy_process_group()


def _train(rank: int, s: dict) -> None:
    import autopart
    from autopart.config import Config

    console = Console()
    world = s["processes"]
    local = s["batch_size"] // world
    model, _ = build_model(s["layers"], s["hidden"], s["seq"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = Config.from_keywords(
        stages=s["stages"],
        microbatches=s["microbatches"],
        offload=s["offload"],
        zero=s["zero"],
        device_memory=s["device_memory"],
        schedule=s["schedule"],
        trace=s["trace"] or None,
    )
    model = autopart.Module(model, optimizer, config=config)
    generator = torch.Generator().manual_seed(1234)
    losses, rates = [], []
    progress = Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  {task.fields[rate]:,.0f} samples/s"),
        console=console,
        disable=rank != 0,
    )
    with progress:
        task = progress.add_task("train", total=s["steps"], loss=float("nan"), rate=0.0)
        for step in range(s["steps"]):
            tokens = counting_batch(s["batch_size"], s["seq"], generator)
            ids = tokens[rank * local : (rank + 1) * local]
            began = time.perf_counter()
            loss = model(ids, labels=ids).loss  # next-token cross-entropy, inside the model
            loss.backward()
            model.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad()
            elapsed = time.perf_counter() - began
            mean_loss = torch.tensor([loss.item()])
            dist.all_reduce(mean_loss)
            losses.append(mean_loss.item() / world)
            rates.append(s["batch_size"] / elapsed)
            if step == 0 and rank == 0:
                assert model.plan is not None  # made by the first call
                print_plan(model.plan, console)
            progress.update(task, advance=1, loss=losses[-1], rate=rates[-1])
    report = model.plan_report(show=False)  # a collective: every rank's timers
    if rank == 0:
        console.print("the plan's prediction against the runtime's timers (steps 2 to 4):")
        console.print(str(report), markup=False, soft_wrap=True)
        window = max(1, len(losses) // 5)
        first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
        verdict = "fell" if last < first else "did not fall"
        console.print(
            f"loss {verdict}: {first:.3f} (first {window} steps) -> {last:.3f} (last {window}); "
            f"median {statistics.median(rates[1:] or rates):,.0f} samples/s over {world} processes"
        )
        if s["trace"]:
            console.print(
                f"timeline: {s['trace']}/trace.json (measured) and {s['trace']}/predicted.json; "
                "open them in https://ui.perfetto.dev or chrome://tracing"
            )

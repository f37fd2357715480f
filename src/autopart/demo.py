"""`autopart demo`: a small GPT from a `transformers` config, planned for local processes.

The training half (spawning the processes and running the partitioned model) arrives with the
runtime; until then the demo stops after printing the automatically chosen plan.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from autopart.models import gpt2
from autopart.plan.planner import PlanOptions
from autopart.planning import plan_model
from autopart.report import print_plan


def build_model(layers: int, hidden: int, seq: int, vocab: int = 256):
    return gpt2(n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 16), seq=seq, vocab=vocab)


def run(args: argparse.Namespace) -> int:
    console = Console()
    model, example = build_model(args.layers, args.hidden, args.seq)
    options = PlanOptions(
        devices=args.processes,
        global_batch=args.batch_size,
        optimizer="adam",
        stages=args.stages,
    )
    _, plan = plan_model(
        model,
        example,
        options=options,
        device_type="cpu",
        progress=console if console.is_terminal else None,
    )
    print_plan(plan, console)
    console.print(
        "[yellow]training across processes needs the autopart runtime, which has not landed "
        "yet; the demo stops after planning.[/yellow]"
    )
    return 0

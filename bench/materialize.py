"""Host memory per rank: a GPT built on the meta device against plain construction.

    .venv/bin/python bench/materialize.py [--ranks 4] [--layers 16] [--width 1024]

A GPT-2 of about 1 GB of fp32 parameters (16 layers of width 1024, a 50257-token
vocabulary) is trained for one step on ``--ranks`` processes with as many stages, twice:

* ``plain``: every rank builds the model normally, as before meta-device support: each holds
  all of it, though it trains only its stage;
* ``meta``: every rank builds it under ``torch.device("meta")`` and autopart materializes only
  the rank's own stage (values from the model's initializer).

Each rank reports its peak resident set size (``ru_maxrss``, which includes the Python and
torch runtime: the "before the model" column is that peak once torch, transformers and the
process group are up) and the bytes of real parameter and buffer storage it holds after the
step.  The peak also holds the gradients (as large as the parameters) and one step's
activations.
The runs are sequential, each in fresh processes, so neither sees the other's peak.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from autopart.runtime.transport.distenv import free_port, set_local_launch_env

VOCAB, SEQ, ROWS = 50257, 32, 1


def _build(layers: int, width: int, meta: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=layers, n_embd=width, n_head=width // 64, n_positions=SEQ, vocab_size=VOCAB
    )
    if meta:
        with torch.device("meta"):
            return GPT2LMHeadModel(config)
    return GPT2LMHeadModel(config)


def _rank(rank: int, world: int, port: int, mode: str, layers: int, width: int, out) -> None:
    set_local_launch_env(rank, world, port)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
    import transformers  # noqa: F401  (imported before the baseline is taken)

    import autopart

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = _build(layers, width, meta=mode == "meta")
    params = sum(p.numel() for p in model.parameters())
    wrapped = autopart.Module(
        model, lambda ps: torch.optim.SGD(ps, lr=1e-3), stages=world, microbatches=1
    )
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(rank))
    wrapped(ids, labels=ids).loss.backward()
    wrapped.optimizer.step()
    held = sum(
        t.numel() * t.element_size()
        for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
        if not t.is_meta
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.put((mode, rank, params, held, peak, baseline))
    dist.barrier()
    dist.destroy_process_group()


def _run(mode: str, world: int, layers: int, width: int) -> list[tuple]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [
        context.Process(target=_rank, args=(r, world, port, mode, layers, width, queue))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"{mode} rank failed with exit code {proc.exitcode}")
    return sorted(results, key=lambda r: r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = {mode: _run(mode, args.ranks, args.layers, args.width) for mode in ("plain", "meta")}
    params = rows["plain"][0][2]
    gib = 1 << 30
    print(
        f"GPT-2, {args.layers} layers x {args.width}, {params / 1e6:.0f}M parameters "
        f"({params * 4 / gib:.2f} GiB fp32), {args.ranks} ranks x {args.ranks} stages\n"
    )
    print(
        "| rank | before the model | plain: peak RSS | plain: tensors held "
        "| meta: peak RSS | meta: tensors held |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for plain, meta in zip(rows["plain"], rows["meta"], strict=True):
        print(
            f"| {plain[1]} | {meta[5] / gib:.2f} GiB | {plain[4] / gib:.2f} GiB "
            f"| {plain[3] / gib:.2f} GiB | {meta[4] / gib:.2f} GiB | {meta[3] / gib:.2f} GiB |"
        )


if __name__ == "__main__":
    main()

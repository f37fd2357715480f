"""How well the plan predicts what the runtime measures: `Module.plan_report` on CPU.

    .venv/bin/python bench/fidelity.py [--steps 8] [--cost analytic measured]

Each case trains a few steps in its own process group (gloo, one thread per rank), then every
rank calls ``plan_report()``; rank 0 prints the predicted and measured step and the ratio of
each stage's terms (measured / predicted), from the runtime's timers of steps 2 to 4:

* ``demo``: the demo's model and settings (`autopart demo`: GPT 4 x 64, sequence 32, batch 16,
  2 processes with 4 MB "devices", so two stages);
* ``single``, ``ddp``, ``pipeline``: `bench/runtime_overhead.py`'s Linear+GELU stack (8 x 512,
  batch 64) on one rank, on one stage with two replicas, and on two stages of 4 microbatches.

``--cost`` plans each case with the analytic roofline model, with block times measured on
this CPU (`autopart.cost.measured`), or both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from autopart.runtime.transport.distenv import free_port, set_local_launch_env  # noqa: E402

CASES = {
    "demo": 2,
    "single": 1,
    "ddp": 2,
    "pipeline": 2,
}


def _worker(rank: int, world: int, port: int, case: str, cost: str, steps: int, out: str) -> None:
    set_local_launch_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    import autopart
    from autopart.cli.demo import build_model, counting_batch
    from runtime_overhead import BATCH, Stack, _loss

    torch.manual_seed(0)
    if case == "demo":
        model, _ = build_model(4, 64, 32)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        wrapped = autopart.Module(model, opt, device_memory="4MB", cost=cost)
        generator = torch.Generator().manual_seed(1234)

        def step() -> None:
            ids = counting_batch(16, 32, generator)[rank * 8 : (rank + 1) * 8]
            wrapped(ids, labels=ids).loss.backward()
    else:
        model = Stack()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        stages, microbatches = (2, 4) if case == "pipeline" else (1, 1)
        wrapped = autopart.Module(model, opt, stages=stages, microbatches=microbatches, cost=cost)
        x = torch.randn(BATCH, 512)[rank * BATCH // world : (rank + 1) * BATCH // world]

        def step() -> None:
            _loss(wrapped(x)).backward()

    for _ in range(steps):
        step()
        opt.step()
        opt.zero_grad()
    report = wrapped.plan_report(show=False)
    if rank == 0:
        rows = [
            {term: s.ratio(term) for term in ("forward", "backward", "allreduce")}
            for s in report.stages
        ]
        Path(out).write_text(
            json.dumps(
                {
                    "predicted": report.predicted_step,
                    "measured": report.measured_step,
                    "stages": rows,
                    "text": str(report),
                }
            )
        )
    dist.destroy_process_group()


def run(case: str, cost: str, steps: int, tries: int = 2) -> dict:
    """One case in fresh processes; tried again once if it fails (a port taken meanwhile)."""
    for attempt in range(tries):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp, "report.json"))
            world = CASES[case]
            try:
                mp.spawn(_worker, (world, free_port(), case, cost, steps, out), nprocs=world)
            except Exception as err:
                if attempt + 1 == tries:
                    raise
                print(f"{case}/{cost} failed ({err}); once more", file=sys.stderr)
                continue
            return json.loads(Path(out).read_text())
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cost", nargs="+", default=["analytic", "measured"])
    parser.add_argument("--case", nargs="+", default=list(CASES))
    parser.add_argument("--verbose", action="store_true", help="print each full report")
    args = parser.parse_args()
    print(
        "| Case | Cost | Predicted step | Measured step | Error "
        "| Stage terms (measured / predicted) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for case in args.case:
        for cost in args.cost:
            r = run(case, cost, args.steps)
            error = (r["measured"] - r["predicted"]) / r["measured"]
            terms = "; ".join(
                f"s{i}: " + ", ".join(f"{k[0]} x{v:.2f}" for k, v in stage.items() if v is not None)
                for i, stage in enumerate(r["stages"])
            )
            print(
                f"| {case} | {cost} | {r['predicted'] * 1e3:.1f} ms | {r['measured'] * 1e3:.1f} ms "
                f"| {error:+.0%} | {terms} |",
                flush=True,
            )
            if args.verbose:
                print(r["text"])


if __name__ == "__main__":
    main()

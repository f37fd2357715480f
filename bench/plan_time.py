"""Planning time on this machine: capture + analytic costs + search, models on meta.

    .venv/bin/python bench/plan_time.py            # the headline cases
    .venv/bin/python bench/plan_time.py --sweep    # size x devices table (--dtype bfloat16)

Each case runs in a fresh subprocess so that one case's warm caches cannot flatter another;
the reported time is the median of ``--repeats`` runs, measured inside the subprocess around
capture + analytic cost model + ``make_plan`` (what ``plan_model`` does, but with matmuls costed
at the model's parameter dtype; interpreter start-up, imports and model construction excluded).
A case where no plan fits is timed up to the planner's verdict and marked "no plan fits".

GPT-3 175B appears twice: in float32 with Adam it cannot fit 1024 x 80GB under autopart's memory
model (pipeline x data parallelism replicates a whole stage's parameter, gradient and optimizer
state on every replica; see docs/benchmarks.md), so the bfloat16 row is the one that yields a plan.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from examples import models
from autopart.capture import capture
from autopart.cost import AnalyticCostModel, get_device_spec, parse_bytes
from autopart.plan.planner import InfeasiblePlanError, PlanOptions, make_plan

model, args = getattr(models, {factory!r})(*{factory_args!r})
model = model.to(getattr(torch, {dtype!r}))
memory = parse_bytes({memory!r})
options = PlanOptions(devices={devices}, global_batch={batch}, device_memory=memory)
t0 = time.perf_counter()
# plan_model() without its dtype-blind cost model: matmuls are costed at the model's dtype.
graph = capture(model, args)
cost = AnalyticCostModel(get_device_spec({device!r}, memory_bytes=memory), dtype={dtype!r})
try:
    plan = make_plan(graph, cost, options)
except InfeasiblePlanError as error:
    plan, reason = None, str(error)
elapsed = time.perf_counter() - t0
params = sum(p.numel() for p in model.parameters())
if plan is None:
    print(json.dumps(dict(seconds=elapsed, params=params, infeasible=reason)))
else:
    print(json.dumps(dict(seconds=elapsed, params=params, stages=plan.num_stages,
          replicas=[s.replicas for s in plan.stages], microbatches=plan.microbatches,
          step=plan.step_seconds)))
"""

HEADLINE = [
    ("GPT-3 175B", "gpt3_175b", (), "float32", 1024, 1536, "80GB", "a100-80gb", 60.0),
    ("GPT-3 175B", "gpt3_175b", (), "bfloat16", 1024, 1536, "80GB", "a100-80gb", 60.0),
    ("MLP 2.5B (RaNNC tutorial)", "mlp_2_5b", (), "float32", 8, 64, "40GB", "a100-40gb", 10.0),
]

SWEEP_MODELS = [
    ("GPT 1.3B", (24, 2048)),
    ("GPT 6.7B", (32, 4096)),
    ("GPT 13B", (40, 5120)),
    ("GPT 175B", (96, 12288)),
]
SWEEP_DEVICES = [8, 64, 1024]


def run_case(factory, factory_args, dtype, devices, batch, memory, device) -> dict:
    code = CHILD.format(
        root=str(ROOT),
        factory=factory,
        factory_args=tuple(factory_args),
        dtype=dtype,
        devices=devices,
        batch=batch,
        memory=memory,
        device=device,
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_case(repeats: int, *case) -> dict:
    runs = [run_case(*case) for _ in range(repeats)]
    if any("error" in r for r in runs):
        return next(r for r in runs if "error" in r)
    result = dict(runs[0])
    result["seconds"] = statistics.median(r["seconds"] for r in runs)
    result["all_seconds"] = [r["seconds"] for r in runs]
    return result


def runs_of(replicas: list[int]) -> str:
    """``[16, 16, 16, 8]`` -> ``3x16, 8``."""
    groups = [(r, len(list(g))) for r, g in itertools.groupby(replicas)]
    return ", ".join(f"{n}x{r}" if n > 1 else str(r) for r, n in groups)


def cell(r: dict) -> str:
    """Median seconds; an infeasible verdict is timed too, and marked."""
    if "error" in r:
        return f"error: {r['error']}"
    return f"{r['seconds']:.2f}" + (" (no plan fits)" if "infeasible" in r else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="parameter dtype of the sweep's models (the headline cases fix their own)",
    )
    args = parser.parse_args()
    if not args.sweep:
        print(
            "| Model | dtype | Devices | Median planning time (s) | Runs (s) | Target (s) | Plan |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, factory, fargs, dtype, devices, batch, memory, device, target in HEADLINE:
            r = median_case(args.repeats, factory, fargs, dtype, devices, batch, memory, device)
            runs = ", ".join(f"{t:.2f}" for t in r.get("all_seconds", []))
            if "error" in r or "infeasible" in r:
                shape = r.get("infeasible", "")
            else:
                shape = (
                    f"{r['stages']} stages, M={r['microbatches']}, "
                    f"replicas {runs_of(r['replicas'])}, "
                    f"predicted step {r['step']:.3f} s"
                )
            missed = "" if "seconds" in r and r["seconds"] < target else " (missed)"
            print(
                f"| {name} | {dtype} | {devices} x {memory}, batch {batch} | {cell(r)} | {runs} "
                f"| < {target:g}{missed} | {shape} |",
                flush=True,
            )
        return
    print("| Model | Params | " + " | ".join(f"{d} devices (s)" for d in SWEEP_DEVICES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in SWEEP_DEVICES) + " |")
    for name, fargs in SWEEP_MODELS:
        cells = []
        params = None
        for devices in SWEEP_DEVICES:
            r = median_case(
                args.repeats,
                "gpt_sized",
                fargs,
                args.dtype,
                devices,
                2 * devices,
                "80GB",
                "a100-80gb",
            )
            params = r.get("params", params)
            cells.append(cell(r))
        size = f"{params / 1e9:.1f}B" if params else "?"
        print(f"| {name} | {size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Planning time on this machine: capture + analytic costs + search, models on meta.

    .venv/bin/python bench/plan_time.py            # the headline cases
    .venv/bin/python bench/plan_time.py --sweep    # size x devices table (--dtype bfloat16)

Each case runs in a fresh subprocess so that one case's warm caches cannot flatter another;
the reported time is the median of ``--repeats`` runs, measured inside the subprocess around
capture + analytic cost model + ``make_plan`` (what ``plan_model`` does, but with matmuls costed
at the model's parameter dtype; interpreter start-up, imports and model construction excluded).
A case where no plan fits is timed up to the planner's verdict and marked "no plan fits".

GPT-3 175B appears twice, both with fp32 parameters and Adam under the default options (ZeRO
where it helps): trained in fp32, and under bf16 autocast with fp32 master weights
(``precision="bf16"``: matmuls costed in bf16, the low-precision copies charged).
``--planner-memory`` reports the planner's own peak memory (tracemalloc, capture excluded).
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
import json, sys, time, tracemalloc
sys.path.insert(0, {root!r})
import torch
from examples import models
from autopart.capture import capture
from autopart.config import AUTOCAST_DTYPES
from autopart.cost import AnalyticCostModel, get_device_spec, parse_bytes
from autopart.plan.planner import InfeasiblePlanError, PlanOptions, make_plan

model, args = getattr(models, {factory!r})(*{factory_args!r})
model = model.to(getattr(torch, {dtype!r}))
memory = parse_bytes({memory!r})
options = PlanOptions(
    devices={devices}, global_batch={batch}, device_memory=memory, precision={precision!r}
)
t0 = time.perf_counter()
# plan_model() without its dtype-blind cost model: matmuls are costed at the dtype they run in.
graph = capture(model, args)
captured = time.perf_counter()
compute = str(AUTOCAST_DTYPES[{precision!r}] or {dtype!r}).removeprefix("torch.")
cost = AnalyticCostModel(get_device_spec({device!r}, memory_bytes=memory), dtype=compute)
if {trace_memory}:
    tracemalloc.start()
try:
    plan = make_plan(graph, cost, options)
except InfeasiblePlanError as error:
    plan, reason = None, str(error)
elapsed = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] if {trace_memory} else None
params = sum(p.numel() for p in model.parameters())
out = dict(seconds=elapsed, capture=captured - t0, params=params, planner_peak=peak,
           ops=len(graph.nodes))
if plan is None:
    out.update(infeasible=reason)
else:
    peaks = [s.memory_bytes for s in plan.stages]
    out.update(stages=plan.num_stages, replicas=[s.replicas for s in plan.stages],
               microbatches=plan.microbatches, step=plan.step_seconds,
               zero=sum(s.zero for s in plan.stages),
               recompute=sum(s.recompute for s in plan.stages),
               peak=max(peaks), capacity=plan.memory_capacity_bytes)
print(json.dumps(out))
"""

# (name, factory, args, parameter dtype, precision, devices, batch, memory, device, target s)
HEADLINE = [
    ("GPT-3 175B", "gpt3_175b", (), "float32", "fp32", 1024, 1536, "80GB", "a100-80gb", 20.0),
    ("GPT-3 175B", "gpt3_175b", (), "float32", "bf16", 1024, 1536, "80GB", "a100-80gb", 20.0),
    (
        "MLP 2.5B (RaNNC tutorial)",
        "mlp_2_5b",
        (),
        "float32",
        "fp32",
        8,
        64,
        "40GB",
        "a100-40gb",
        10.0,
    ),
]

SWEEP_MODELS = [
    ("GPT 1.3B", (24, 2048)),
    ("GPT 6.7B", (32, 4096)),
    ("GPT 13B", (40, 5120)),
    ("GPT 175B", (96, 12288)),
]
SWEEP_DEVICES = [8, 64, 1024]


def run_case(
    factory, factory_args, dtype, devices, batch, memory, device, precision="fp32", trace=False
) -> dict:
    code = CHILD.format(
        root=str(ROOT),
        factory=factory,
        factory_args=tuple(factory_args),
        dtype=dtype,
        precision=precision,
        devices=devices,
        batch=batch,
        memory=memory,
        device=device,
        trace_memory=trace,
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_case(repeats: int, *case, **keywords) -> dict:
    runs = [run_case(*case, **keywords) for _ in range(repeats)]
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
        "--planner-memory",
        action="store_true",
        help="peak planner memory (tracemalloc, capture excluded) at 24, 48 and 96 GPT-3 layers",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="parameter dtype of the sweep's models (the headline cases fix their own)",
    )
    args = parser.parse_args()
    if args.planner_memory:
        print("| Layers | Ops | Planner peak (MiB) | MiB per 1000 ops |")
        print("| --- | --- | --- | --- |")
        for layers in (24, 48, 96):
            r = run_case(
                "gpt_sized",
                (layers, 12288),
                "float32",
                1024,
                1536,
                "80GB",
                "a100-80gb",
                trace=True,
            )
            mib = r["planner_peak"] / 2**20
            print(
                f"| {layers} | {r['ops']} | {mib:.1f} | {1000 * mib / r['ops']:.2f} |", flush=True
            )
        return
    if not args.sweep:
        print(
            "| Model | Devices | Precision | Median (s) | Runs (s) | Capture (s) | Target (s) "
            "| Plan |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for (
            name,
            factory,
            fargs,
            dtype,
            precision,
            devices,
            batch,
            memory,
            device,
            target,
        ) in HEADLINE:
            r = median_case(
                args.repeats,
                factory,
                fargs,
                dtype,
                devices,
                batch,
                memory,
                device,
                precision=precision,
            )
            runs = ", ".join(f"{t:.2f}" for t in r.get("all_seconds", []))
            if "error" in r or "infeasible" in r:
                shape = r.get("infeasible", r.get("error", ""))
            else:
                shape = (
                    f"{r['stages']} stages, M={r['microbatches']}, "
                    f"replicas {runs_of(r['replicas'])}, ZeRO on {r['zero']}, recompute on "
                    f"{r['recompute']}, peak {r['peak'] / 2**30:.1f} of "
                    f"{r['capacity'] / 2**30:.1f} GiB, predicted step {r['step']:.3g} s"
                )
            missed = "" if "stages" in r and r["seconds"] < target else " (missed)"
            print(
                f"| {name} | {devices} x {memory}, batch {batch} | {precision} | {cell(r)} "
                f"| {runs} | {r.get('capture', 0):.2f} | < {target:g}{missed} | {shape} |",
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

"""Plan quality: predicted step time of autopart's plan against the usual manual partitions.

    .venv/bin/pip install -c requirements/pinned.txt -e '.[bench]'  # DeepSpeed
    .venv/bin/python bench/plan_quality.py

Every plan is costed by the same cost model (analytic, A100-40GB spec) and the same simulated
GPipe step time, so the ratios compare partitions, not cost models.  Baselines cut the model at
layer boundaries (a layer is a top-level module or one entry of a ModuleList), make S stages
with D/S replicas each, and get the best S (over divisors of D) and the best microbatch count:
a generous reading of how they are used.

* even: the same number of layers per stage (torch.distributed.pipelining's usual manual split);
* DeepSpeed `partition_uniform` (layer counts) and `partition_balanced` (parameter counts);
* exhaustive: every contiguous split of autopart's blocks with every replica assignment
  (only where K <= 10 blocks and D <= 8 keep it tractable).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples import models  # noqa: E402

from autopart.capture import capture  # noqa: E402
from autopart.cost import AnalyticCostModel, get_device_spec  # noqa: E402
from autopart.plan.blocks import Block  # noqa: E402
from autopart.plan.planner import (  # noqa: E402
    PlanOptions,
    microbatch_options,
    partition,
    prepare,
)
from exhaustive import exhaustive  # noqa: E402

DEVICE = "a100-40gb"


def layer_key(path: str) -> str:
    """`transformer.h.3.attn` -> `transformer.h.3`; `lm_head` -> `lm_head`."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def layer_blocks(graph, components) -> tuple[list[Block], list[float]]:
    """One block per layer, and each layer's parameter count (DeepSpeed's 'parameters')."""
    starts, keys = [], []
    for i, c in enumerate(components):
        key = layer_key(graph.node(c.anchor).module_path)
        if not keys or key != keys[-1]:
            starts.append(i)
            keys.append(key)
    ends = [*starts[1:], len(components)]
    blocks = [Block(i, s, e) for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    weights = []
    for b in blocks:
        names = {
            p for c in components[b.start : b.end] for n in c.nodes for p in graph.node(n).params
        }
        weights.append(sum(math.prod(graph.params[p].shape) for p in names) or 1)
    return blocks, weights


def uniform_step(coster, bounds: list[int], devices: int, mb_options: list[int]) -> float:
    """Best step time of fixed stage bounds with devices/S replicas each, over microbatches."""
    stages = len(bounds) - 1
    replicas = devices // stages
    index = list(coster.replicas).index(replicas)
    best = math.inf
    for m in mb_options:
        worst = 0.0
        for s in range(stages):
            costs = coster(bounds[s], bounds[s + 1], m)
            t = (m + stages - 1) * costs.slot_seconds[index] + costs.allreduce_seconds[index]
            worst = max(worst, t)
        best = min(best, worst)
    return best


def even_bounds(n: int, parts: int) -> list[int]:
    return [round(i * n / parts) for i in range(parts + 1)]


def baseline(name, coster, n_layers, weights, devices, mb):
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    best = math.inf
    for stages in (s for s in range(1, devices + 1) if devices % s == 0 and s <= n_layers):
        if name == "even":
            bounds = even_bounds(n_layers, stages)
        elif name == "uniform":
            bounds = [int(b) for b in partition_uniform(n_layers, stages)]
        else:
            bounds = [int(b) for b in partition_balanced(weights, stages)]
        if len(set(bounds)) != len(bounds):
            continue
        best = min(best, uniform_step(coster, bounds, devices, mb))
    return best


def evaluate(label, factory, devices, batch):
    model, args = factory()
    graph = capture(model, args)
    cost = AnalyticCostModel(get_device_spec(DEVICE))
    options = PlanOptions(devices=devices, global_batch=batch)
    auto = partition(graph, cost, options).solution.step_seconds
    components, _, _ = prepare(graph, cost, options)
    blocks, weights = layer_blocks(graph, components)
    _, _, layer_coster = prepare(graph, cost, options, blocks=blocks)
    mb = microbatch_options(options)
    row = {"autopart": auto}
    for name in ("even", "uniform", "balanced"):
        row[name] = baseline(name, layer_coster, len(blocks), weights, devices, mb)
    small = PlanOptions(devices=devices, global_batch=batch, target_blocks=8)
    _, small_blocks, small_coster = prepare(graph, cost, small)
    if len(small_blocks) <= 10 and devices <= 8:
        ex = exhaustive(len(small_blocks), devices, small_coster, mb)
        auto_small = partition(graph, cost, small).solution.step_seconds
        row["exhaustive"] = (ex.step_seconds, auto_small)
    return row


def main() -> None:
    cases = [("Unbalanced MLP", models.unbalanced), ("GPT-2 small (124M)", models.gpt2_small)]
    print("Predicted step time (ms); in brackets: baseline / autopart (higher is worse).")
    print()
    print(
        "| Model | Devices | autopart | even split | DS uniform | DS balanced "
        "| exhaustive (K<=10) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, factory in cases:
        for devices in (2, 4, 8):
            r = evaluate(label, factory, devices, batch=32)
            a = r["autopart"]
            cells = [f"{a * 1e3:.3f}"]
            for name in ("even", "uniform", "balanced"):
                cells.append(f"{r[name] * 1e3:.3f} ({r[name] / a:.2f}x)")
            if "exhaustive" in r:
                ex, auto_small = r["exhaustive"]
                cells.append(f"{ex * 1e3:.3f} (autopart on same blocks: {auto_small * 1e3:.3f})")
            else:
                cells.append("n/a")
            print(f"| {label} | {devices} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""What to tell the user when no plan fits: how far off the model is, and what would fit.

The search only says "nothing fits"; this module turns that into a number the user can act
on: the device memory one block needs even alone, or the fewest devices on which some plan
fits.  That count is exact under the planner's memory model, over plans cut at the same
block boundaries and run as GPipe (1F1B, where it applies, holds fewer microbatches, so it
may need fewer): each candidate stage needs the fewest replicas at which it fits (more
replicas mean fewer rows per device, so less activation memory; up to one replica per
sample), and a shortest path over the blocks gives the cheapest sum, at every microbatch
count the search considers.  A plan needs every stage to fit, and such a plan fits on exactly
that many devices, so no smaller count can work and that one does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autopart.cost.units import format_bytes
from autopart.ir import Graph
from autopart.plan.blocks import Block
from autopart.plan.cover import cheapest_cover
from autopart.plan.options import PlanOptions
from autopart.plan.stage_costs import StageCoster


@dataclass(frozen=True)
class FewestDevices:
    """The smallest cluster some plan fits: its stages as (start, end, replicas), and M."""

    devices: int
    stages: tuple[tuple[int, int, int], ...]
    microbatches: int


def fewest_devices(
    coster: StageCoster, num_blocks: int, mb_options: Sequence[int]
) -> FewestDevices | None:
    """The fewest devices on which a plan of ``coster``'s blocks fits (see the module
    docstring); None when some block fits no replica count at all."""
    wide = coster.with_replicas(np.arange(1, coster.global_batch + 1))
    best: FewestDevices | None = None
    for m in sorted(mb_options):
        spans: list[tuple[int, int, int]] = []
        for start in range(num_blocks):
            for end in range(start + 1, num_blocks + 1):
                fits = np.isfinite(wide(start, end, m).slot_seconds)
                if not fits.any():
                    break  # memory only grows with the span
                spans.append((start, end, int(wide.replicas[int(fits.argmax())])))
        spans.sort(key=lambda s: (s[1], s[0]))
        devices, path = cheapest_cover(
            [a for a, _, _ in spans], [b for _, b, _ in spans], [r for _, _, r in spans], num_blocks
        )
        if path and (best is None or devices < best.devices):
            best = FewestDevices(int(devices), tuple(spans[p] for p in path), m)
    return best


def infeasible_message(
    graph: Graph,
    blocks: Sequence[Block],
    coster: StageCoster,
    options: PlanOptions,
    mb_options: Sequence[int],
) -> str:
    """Say how far off the model is: the hardest block, or the devices some plan needs."""
    margin = options.memory_margin
    head = (
        f"no partition of this model fits {options.devices} device(s) with "
        f"{format_bytes(coster.capacity)} usable each ({margin:.0%} margin held back) "
        f"at a global batch of {options.global_batch}."
    )
    fewest = fewest_devices(coster, len(blocks), mb_options)
    if fewest is None:
        wide = coster.with_replicas(np.arange(1, coster.global_batch + 1))
        alone = {b: _least_bytes(wide, b, mb_options, options) for b in range(len(blocks))}
        worst = max(alone, key=lambda b: alone[b])
        return (
            f"{head} Block {worst} ({_where(graph, coster, worst)}) alone needs "
            f"{format_bytes(alone[worst])} per device even with recomputation, so no "
            f"device count helps. Use devices with at least "
            f"{format_bytes(alone[worst] / (1 - margin))}, a smaller batch, a lighter optimizer "
            "(--optimizer sgd)"
            + (", or parameter offload (--offload auto)." if options.offload == "none" else ".")
        )
    replicas = [r for _, _, r in fewest.stages]
    shape = (
        f"a pipeline of {len(replicas)} stage(s) with {_runs(replicas)} replica(s) at "
        f"{fewest.microbatches} microbatch(es) fits on {fewest.devices} device(s)"
    )
    if options.stages is not None and options.stages != len(replicas):
        return (
            f"{head} {shape}, in {len(replicas)} stage(s), not the {options.stages} asked for: "
            "let the planner choose the stage count, or use more or larger devices."
        )
    if fewest.devices <= options.devices:
        return (
            f"{head} {shape}, but on {options.devices} some replica would get no sample of the "
            f"batch at every microbatch count that fits: use a global batch of at least "
            f"{options.devices * fewest.microbatches} or {fewest.devices} device(s)."
        )
    return (
        f"{head} Every block fits on its own, but the model needs more devices: {shape} and "
        f"on no fewer, so use about {fewest.devices} devices, or larger devices, a lighter "
        "optimizer"
        + (", or parameter offload (--offload auto)." if options.offload == "none" else ".")
    )


def _least_bytes(wide: StageCoster, b: int, mb_options: Sequence[int], options) -> float:
    """Peak bytes of block ``b`` alone with recomputation, at its best M and replicas."""
    fp = wide.footprint(b, b + 1)
    peaks = []
    for m in mb_options:
        rows = wide.rows(m)
        usable = rows > 0
        if usable.any():
            for mode in wide.offload_modes:
                peak = wide.memory.peak_bytes(
                    fp, rows, m, wide.replicas, True, offload=mode, zero=bool(options.zero)
                )
                peaks.append(float(peak[usable].min()))
    return min(peaks)


def _runs(replicas: list[int]) -> str:
    """``[12, 12, 12, 8]`` -> ``3 x 12, 8``."""
    groups = [(r, len(list(g))) for r, g in itertools.groupby(replicas)]
    return ", ".join(f"{n} x {r}" if n > 1 else str(r) for r, n in groups)


def _where(graph: Graph, coster: StageCoster, block: int) -> str:
    paths = list(dict.fromkeys(graph.node(n).module_path for n in coster.block_names[block]))
    return ", ".join(p or "<top level>" for p in paths[:3]) + (" …" if len(paths) > 3 else "")

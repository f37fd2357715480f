"""What to tell the user when no plan fits: how far off the model is, and what would fit.

The search only says "nothing fits"; this module turns that into a number the user can act
on: the device memory one block needs even alone, or the device count a greedy pipeline of the
blocks needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from autopart.cost.units import format_bytes
from autopart.ir import Graph
from autopart.plan.blocks import Block
from autopart.plan.stage_costs import StageCoster

if TYPE_CHECKING:
    from autopart.plan.planner import PlanOptions


def infeasible_message(
    graph: Graph,
    blocks: Sequence[Block],
    coster: StageCoster,
    options: PlanOptions,
    mb_options: Sequence[int],
) -> str:
    """Say how far off the model is: the hardest block, and what would fit.

    A greedy contiguous packing of blocks into stages, each on the fewest replicas that fit it
    (more replicas mean fewer rows per device, so less activation memory) at any microbatch count
    the search considers, gives a device count that is about enough; a block that fits no replica
    count even alone gives the device memory that is needed instead.
    """
    margin = options.memory_margin

    def fewest_replicas(start: int, end: int) -> int | None:
        counts = [
            int(fit[0])
            for m in mb_options
            if len(fit := coster.replicas[np.isfinite(coster(start, end, m).slot_seconds)])
        ]
        return min(counts, default=None)

    def fits(start: int, end: int) -> bool:
        return fewest_replicas(start, end) is not None

    def least_bytes(b: int) -> float:
        """Peak bytes of block ``b`` alone with recomputation, at its best M and replicas."""
        fp = coster.footprint(b, b + 1)
        peaks = []
        for m in mb_options:
            rows = coster.rows(m)
            usable = rows > 0
            if usable.any():
                for mode in coster.offload_modes:
                    peak = coster.memory.peak_bytes(
                        fp, rows, m, coster.replicas, True, offload=mode, zero=bool(options.zero)
                    )
                    peaks.append(float(peak[usable].min()))
        return min(peaks)

    head = (
        f"no partition of this model fits {options.devices} device(s) with "
        f"{format_bytes(coster.capacity)} usable each ({margin:.0%} margin held back) "
        f"at a global batch of {options.global_batch}."
    )
    too_big = [b for b in range(len(blocks)) if not fits(b, b + 1)]
    if too_big:
        worst = max(too_big, key=least_bytes)
        needed = max(least_bytes(b) for b in too_big) / (1 - margin)
        return (
            f"{head} Block {worst} ({_where(graph, coster, worst)}) alone needs "
            f"{format_bytes(least_bytes(worst))} per device even with recomputation, so no "
            f"device count helps. Use devices with at least {format_bytes(needed)}, "
            "a smaller batch, a lighter optimizer (--optimizer sgd)"
            + (", or parameter offload (--offload auto)." if options.offload == "none" else ".")
        )
    stages, start, needed = 0, 0, 0
    while start < len(blocks):
        end = start + 1
        while end < len(blocks) and fits(start, end + 1):
            end += 1
        needed += fewest_replicas(start, end) or 0
        stages, start = stages + 1, end
    return (
        f"{head} Every block fits on its own, but the model needs more devices: "
        f"a pipeline of {stages} stage(s) with {needed} replica(s) in all fits, so use about "
        f"{needed} devices, or larger devices, or a lighter optimizer."
    )


def _where(graph: Graph, coster: StageCoster, block: int) -> str:
    paths = list(dict.fromkeys(graph.node(n).module_path for n in coster.block_names[block]))
    return ", ".join(p or "<top level>" for p in paths[:3]) + (" …" if len(paths) > 3 else "")

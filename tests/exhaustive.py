"""Brute force over every split and replica composition: the stage DP's reference in tests.

Exponential in the block count, so only for the small cases where it can prove that
`autopart.plan.stage_dp.search` finds the optimum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import combinations, pairwise

from autopart.plan.stage_dp import Solution, _check, step_seconds
from autopart.plan.stage_table import CostsOf, StageChoice


def exhaustive(
    num_blocks: int,
    devices: int,
    coster: CostsOf,
    microbatch_options: Sequence[int],
    *,
    stages: int | None = None,
) -> Solution | None:
    """Brute force over every split and replica composition; the reference for tests."""
    options = _check(num_blocks, devices, microbatch_options, stages)
    cache: dict[tuple[int, int, int], list[StageChoice]] = {}

    def feasible(start: int, end: int, m: int) -> list[StageChoice]:
        if (start, end, m) not in cache:
            costs = coster(start, end, m)
            cache[start, end, m] = [
                StageChoice(
                    start,
                    end,
                    int(costs.replicas[k]),
                    float(costs.slot_seconds[k]),
                    float(costs.allreduce_seconds[k]),
                    int(costs.memory_bytes[k]),
                    int(costs.mode[k]),
                )
                for k in range(len(costs.replicas))
                if math.isfinite(costs.slot_seconds[k]) and costs.replicas[k] <= devices
            ]
        return cache[start, end, m]

    counts = [stages] if stages is not None else range(1, min(num_blocks, devices) + 1)
    best: Solution | None = None
    for count in counts:
        for m in options:
            for cuts in combinations(range(1, num_blocks), count - 1):
                bounds = (0, *cuts, num_blocks)
                per_stage = [feasible(a, b, m) for a, b in pairwise(bounds)]
                for plan in _compositions(per_stage, devices):
                    seconds = step_seconds(plan, m)
                    if best is None or seconds < best.step_seconds:
                        best = Solution(plan, m, seconds)
    return best


def _compositions(
    per_stage: Sequence[Sequence[StageChoice]], devices: int
) -> Iterator[tuple[StageChoice, ...]]:
    """Every pick of one choice per stage whose replicas add up to exactly ``devices``."""
    if not per_stage:
        if devices == 0:
            yield ()
        return
    for choice in per_stage[0]:
        if choice.replicas <= devices:
            for rest in _compositions(per_stage[1:], devices - choice.replicas):
                yield (choice, *rest)

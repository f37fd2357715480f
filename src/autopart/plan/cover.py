"""The cheapest cover of blocks ``[0, K)`` by contiguous spans: a shortest path over blocks.

Three parts of the planner ask the same question with different weights per span: the fewest
stages that cover the model (weight 1) and the least replica-seconds (the stage DP's bounds),
the fewest units at a target time whatever the stage count (the fewest-devices solver's quick
refusal), and the fewest devices any plan needs (the infeasible message).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def cheapest_cover(
    starts: Sequence[int], ends: Sequence[int], weights: Sequence[float], num_blocks: int
) -> tuple[float, list[int]]:
    """``(total, spans)``: the least sum of weights over spans ``[starts[p], ends[p])`` that
    cover the blocks end to end, and the indices of those spans in order (``inf`` and ``[]``
    when none do).  Spans must be sorted by end, so each start's total is final when read."""
    total = [0.0] + [math.inf] * num_blocks
    back = [-1] * (num_blocks + 1)
    for p, (a, b, w) in enumerate(zip(starts, ends, weights, strict=True)):
        if total[a] + w < total[b]:
            total[b], back[b] = total[a] + w, p
    if not math.isfinite(total[num_blocks]):
        return math.inf, []
    path, i = [], num_blocks
    while i:
        path.append(back[i])
        i = starts[back[i]]
    return total[num_blocks], path[::-1]

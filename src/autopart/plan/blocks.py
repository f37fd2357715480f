"""Coarsen atomic components into at most ~K blocks for the stage DP.

Blocks are contiguous runs of the components' topological order, which makes every block (and
every run of blocks) convex by construction: a path that leaves a contiguous range of a
topological order can never come back into it.  RaNNC gets convexity by checking every merge;
here it cannot be violated.

Within that freedom the coarsening balances time (each block near ``total / K``), respects memory
(a block's parameter state stays under ``block_bytes_cap``, so huge layers get blocks of their own
and K grows as the model needs), and prefers cuts where little data crosses: inside a window
around the balanced position it cuts where the fewest bytes per sample cross.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from autopart.plan.atomic import Component

#: A cut may move this far (as a share of the target block time) to find a cheaper boundary.
CUT_WINDOW = 0.3


@dataclass(frozen=True)
class Block:
    """Components ``[start, end)`` of the component order."""

    index: int
    start: int
    end: int


def coarsen(
    components: Sequence[Component],
    seconds: Sequence[float],
    params: Sequence[frozenset[str]],
    state_bytes: Mapping[str, float],
    cut_bytes: Sequence[float],
    *,
    target_blocks: int,
    block_bytes_cap: float,
) -> list[Block]:
    """Split components into contiguous blocks.

    Args:
        components: in topological order.
        seconds: forward+backward time of each component at a reference batch.
        params: the parameters each component reads.
        state_bytes: parameter, gradient and optimizer bytes of each parameter; a parameter read
            by several components of one block (tied or looped weights) counts once.
        cut_bytes: ``cut_bytes[p]`` is the per-sample traffic of a cut before component ``p``
            (length ``len(components) + 1``).
        target_blocks: the K to aim for when memory allows.
        block_bytes_cap: largest state a block may hold unless one component alone exceeds it.
    """
    n = len(components)
    times = np.asarray(seconds, dtype=float)
    target = max(float(times.sum()) / max(target_blocks, 1), 1e-12)
    blocks: list[Block] = []
    start = 0
    while start < n:
        end = _balanced_end(times, params, state_bytes, start, target, block_bytes_cap)
        if end < n:
            end = _cheapest_cut(times, cut_bytes, start, end, target)
        blocks.append(Block(index=len(blocks), start=start, end=end))
        start = end
    return blocks


def _balanced_end(
    times: np.ndarray,
    params: Sequence[frozenset[str]],
    state_bytes: Mapping[str, float],
    start: int,
    target: float,
    cap: float,
) -> int:
    """First end past ``start`` where time reaches the target or the memory cap would be hit."""
    total_t = 0.0
    total_b = 0.0
    held: set[str] = set()
    end = start
    while end < len(times):
        new = params[end] - held
        next_t = total_t + times[end]
        next_b = total_b + sum(state_bytes[p] for p in new)
        if end > start and (next_b > cap or next_t > target * (1 + CUT_WINDOW / 2)):
            break
        total_t, total_b = next_t, next_b
        held |= new
        end += 1
        if total_t >= target:
            break
    return end


def _cheapest_cut(
    times: np.ndarray, cut_bytes: Sequence[float], start: int, end: int, target: float
) -> int:
    """Move the cut back to where the least data crosses, without shrinking the block too far.

    The window is a share of the block's own time when the memory cap ended it early, so that
    memory-bound blocks (one huge layer each) still end at the layer's cheap boundary."""
    acc = np.cumsum(times[start:end])
    reference = min(target, float(acc[-1]))
    best = end
    for pos in range(end - 1, start, -1):
        if acc[pos - start - 1] < reference * (1 - CUT_WINDOW):
            break
        if cut_bytes[pos] < cut_bytes[best]:
            best = pos
    return best

"""Coarsen atomic components into at most ~K blocks for the stage DP.

Blocks are contiguous runs of the components' topological order, which makes every block (and
every run of blocks) convex by construction: a path that leaves a contiguous range of a
topological order can never come back into it.  RaNNC gets convexity by checking every merge;
here it cannot be violated.

Within that freedom the coarsening balances time (each block near ``total / K``), respects memory
(a block's parameter state stays under ``block_bytes_cap``, so huge layers get blocks of their own
and K grows as the model needs), and cuts where a human would: the stage DP only ever cuts
between blocks, so every block boundary is a candidate stage boundary.

Where a human cuts is read from the model's own structure.  A *repeated layer* is a module whose
path ends in an index (``transformer.h.3``, ``model.layers.7``, ``net.2``: the children of a
`ModuleList` or `Sequential`).  Inside one, a boundary may fall only between the layer's direct
children (never inside an attention, an MLP or a norm), and only where no more bytes per
sample cross than at the layer's cheapest boundary (its ends, or between attention and MLP in a
transformer layer, where only the residual stream crosses).
Among the allowed boundaries near the balanced position, a block ends at the one where the
fewest bytes cross, then at the shallowest (between layers rather than inside one), then at the
one nearest the balanced position.  A block grows past its time target to reach an allowed
boundary when none is near, so blocks are at least about half a layer when the target asks for
less.  When memory ends a block early, it ends at an allowed boundary before that point: the
cheapest, then the shallowest, then the latest.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from autopart.plan.atomic import Component

#: A cut may move this far (as a share of the target block time) to find a cheaper boundary.
CUT_WINDOW = 0.3

#: Cut sizes within this ratio of each other count as equally cheap.
CUT_TOLERANCE = 1.01

#: A repeated layer's path: up to the first index (``transformer.h.3``, or ``3`` at top level).
_INDEXED = re.compile(r"^((?:.*?\.)??\d+)(?:\.|$)")


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
    paths: Sequence[str] | None = None,
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
        paths: each component's module path, which gives the repeated layers and the depth of
            every boundary; without them every boundary is allowed and equally deep.
    """
    n = len(components)
    times = np.asarray(seconds, dtype=float)
    cuts = np.asarray(cut_bytes, dtype=float)
    names = list(paths) if paths is not None else [""] * n
    allowed = allowed_boundaries(names, cuts)
    depth = [0] + [_common_depth(a, b) for a, b in itertools.pairwise(names)] + [0]
    target = max(float(times.sum()) / max(target_blocks, 1), 1e-12)
    blocks: list[Block] = []
    start = 0
    while start < n:
        balanced, limit = _balanced_end(
            times, params, state_bytes, allowed, start, target, block_bytes_cap
        )
        end = limit
        if limit < n or (balanced is not None and balanced < n):
            end = _best_cut(times, cuts, allowed, depth, start, balanced, limit, target)
        blocks.append(Block(index=len(blocks), start=start, end=end))
        start = end
    return blocks


def allowed_boundaries(paths: Sequence[str], cuts: np.ndarray) -> np.ndarray:
    """``allowed[p]``: a block may end before component ``p``.  Inside a repeated layer only
    the boundaries between its direct children (attention | MLP, not inside either, nor inside
    a norm) that are as cheap as the layer's cheapest are; outside layers, every one is."""
    n = len(paths)
    allowed = np.ones(n + 1, dtype=bool)
    layer = [m.group(1) if (m := _INDEXED.match(p)) else None for p in paths]
    start = 0
    while start < n:
        end = start + 1
        while end < n and layer[end] == layer[start]:
            end += 1
        key = layer[start]
        if key is not None and end - start > 1:
            cheapest = float(cuts[start : end + 1].min())
            depth = key.count(".") + 1
            for p in range(start + 1, end):
                shallow = _common_depth(paths[p - 1], paths[p]) <= depth
                allowed[p] = shallow and cuts[p] <= cheapest * CUT_TOLERANCE
        start = end
    return allowed


def _common_depth(a: str, b: str) -> int:
    """How many module-path segments two components share: 0 between top-level modules,
    more the deeper inside one module the boundary between them lies."""
    depth = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y or not x:
            break
        depth += 1
    return depth


def _balanced_end(
    times: np.ndarray,
    params: Sequence[frozenset[str]],
    state_bytes: Mapping[str, float],
    allowed: np.ndarray,
    start: int,
    target: float,
    cap: float,
) -> tuple[int | None, int]:
    """``(end, limit)``: the first end past ``start`` where time reaches the target (None when
    memory ends the block first), and how far the search for a cut may look: to the memory cap,
    or to the first allowed boundary past the window around the target."""
    total_t = 0.0
    total_b = 0.0
    held: set[str] = set()
    end = start
    balanced = None
    while end < len(times):
        new = params[end] - held
        next_b = total_b + sum(state_bytes[p] for p in new)
        if end > start and next_b > cap:
            break
        total_t, total_b = total_t + times[end], next_b
        held |= new
        end += 1
        if balanced is None and total_t >= target:
            balanced = end
        if total_t > target * (1 + CUT_WINDOW) and allowed[end]:
            break
    return balanced, end


def _best_cut(
    times: np.ndarray,
    cuts: np.ndarray,
    allowed: np.ndarray,
    depth: Sequence[int],
    start: int,
    balanced: int | None,
    limit: int,
    target: float,
) -> int:
    """Where the block from ``start`` ends, given its balanced end and how far it may look
    (see the module docstring)."""
    acc = np.concatenate([[0.0], np.cumsum(times[start:limit])])
    positions = np.arange(start + 1, limit + 1)
    spent = acc[positions - start]
    ok = allowed[positions]
    if balanced is None:
        # Memory ended the block: as large as it can be, at the shallowest cheap boundary.
        pool = ok if ok.any() else np.ones(len(positions), dtype=bool)
        return int(max(_cheapest(positions[pool], cuts), key=lambda p: (-depth[p], p)))
    near = np.abs(spent - target) <= CUT_WINDOW * target
    pool = near & ok
    if not pool.any():
        # No allowed boundary near the target: the nearest one in time, else any near one.
        pool = ok if ok.any() else near | (positions == limit)
        distance = np.where(pool, np.abs(spent - target), np.inf)
        pool = distance == distance.min()
    return int(
        min(
            _cheapest(positions[pool], cuts), key=lambda p: (depth[p], abs(acc[p - start] - target))
        )
    )


def _cheapest(positions: np.ndarray, cuts: np.ndarray) -> list[int]:
    """The positions where (within `CUT_TOLERANCE`) the fewest bytes cross."""
    least = float(cuts[positions].min())
    return [int(p) for p in positions if cuts[p] <= least * CUT_TOLERANCE]

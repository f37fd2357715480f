"""The stage DP's solver for long device axes: the fewest devices for a target step time.

The exact DP (`autopart.plan.stage_dp._solve`) keeps, for every prefix of blocks, the best
step time on every device count, so its work grows with the square of the device count: fine
up to 64, hopeless at 1024 devices in units of one, which is what a pipeline of ~100 one-layer
stages with ~10 replicas each needs.  This solver turns the problem around.  For a target time
``J`` each candidate stage needs at least ``need(J)`` replicas to run its slot within ``J``
(none if it cannot), and the fewest devices for ``count`` stages covering every block is a
shortest-path DP over blocks alone.  That count only falls as ``J`` grows, so a search over
the sorted candidate times finds the smallest ``J`` whose plan needs at most ``D`` devices; a
64-way search over a batch of targets at a time takes three or four DP passes.

The plan found may leave devices over; they go, one at a time, to the stage whose slot they
shorten most (or, when none gets faster, lengthen least), since every device is used.  That
step is greedy, so the result can be slightly slower than the exact DP's on the same inputs
(the tests bound the gap); the step time reported is the plan's own.
"""

from __future__ import annotations

import numpy as np

from autopart.plan.cover import cheapest_cover
from autopart.plan.stage_table import Table

#: Targets tried per DP pass.
FANOUT = 64


def solve(
    table: Table, count: int, units: np.ndarray, total: int, bound: float, fill: float
) -> tuple[float, list[tuple[int, int]]] | None:
    """The ``count``-stage plan on exactly ``total`` units found as above, if it is strictly
    faster than ``bound``: (J, [(span, replica index)]), like the exact solver."""
    cost = fill * table.slot + table.allreduce
    under = cost < bound
    if not under.any():
        return None
    # Cheap refusal first: even at the loosest target, with any number of stages, too many
    # devices (most (S, M) the search asks about end here).
    need = np.where(under.any(axis=1), units[under.argmax(axis=1)], np.inf)
    fewest, _ = cheapest_cover(
        table.start.tolist(), table.end.tolist(), need.tolist(), table.num_blocks
    )
    if fewest > total:
        return None
    # Per span, the fastest time within the first k replica counts: non-increasing in k, so the
    # fewest replicas that reach a target is a search in it.
    reach = np.minimum.accumulate(cost, axis=1)
    values = np.unique(cost[under])
    # The answer's index lies in [low, high]; high is the smallest index known to fit
    # (len(values): none known).
    low, high = 0, len(values)
    while low < high:
        picks = np.unique(np.linspace(low, high - 1, min(FANOUT, high - low)).astype(np.int64))
        feasible = _fewest_units(table, reach, units, values[picks], count) <= total
        if not feasible.any():
            low = high
            break
        first = int(np.argmax(feasible))
        high = int(picks[first])
        low = int(picks[first - 1]) + 1 if first else high
    if high == len(values):
        return None
    spans = _backtrack(table, reach, units, float(values[high]), count)
    return _spend_leftover(cost, units, total, spans, bound)


def _need(reach: np.ndarray, units: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``[target, span]``: the fewest units that run each span within each target (inf: none)."""
    need = np.full((len(targets), reach.shape[0]), np.inf)
    for p, row in enumerate(reach):
        k = np.searchsorted(-row, -targets, side="left")  # first k with row[k] <= target
        hit = k < len(row)
        need[hit, p] = units[k[hit]]
    return need


def _fewest_units(
    table: Table, reach: np.ndarray, units: np.ndarray, targets: np.ndarray, count: int
) -> np.ndarray:
    """Per target, the fewest units that ``count`` stages covering every block need."""
    return _layers(table, _need(reach, units, targets), count)[-1][:, table.num_blocks]


def _layers(table: Table, need: np.ndarray, count: int) -> list[np.ndarray]:
    """``layers[s][t, i]``: the fewest units ``s`` stages covering blocks ``[0, i)`` need
    at target ``t``, for ``s`` in ``0..count`` (``need`` is ``[target, span]``)."""
    heads = np.flatnonzero(np.r_[True, table.end[1:] != table.end[:-1]])
    ends = table.end[heads]
    first = np.full((need.shape[0], table.num_blocks + 1), np.inf)
    first[:, 0] = 0.0
    layers = [first]
    for _ in range(count):
        through = layers[-1][:, table.start] + need
        layer = np.full_like(first, np.inf)
        layer[:, ends] = np.minimum.reduceat(through, heads, axis=1)
        layers.append(layer)
    return layers


def _backtrack(
    table: Table, reach: np.ndarray, units: np.ndarray, target: float, count: int
) -> list[tuple[int, int]]:
    """The spans and replica indices of the fewest-units plan at ``target``."""
    need = _need(reach, units, np.array([target]))
    layers = [layer[0] for layer in _layers(table, need, count)]
    spans = []
    i = table.num_blocks
    for s in range(count, 0, -1):
        through = np.where(table.end == i, layers[s - 1][table.start] + need[0], np.inf)
        p = int(np.argmin(through))
        k = int(np.searchsorted(units, need[0, p]))
        spans.append((p, k))
        i = int(table.start[p])
    return spans[::-1]


def _spend_leftover(
    cost: np.ndarray, units: np.ndarray, total: int, picks: list[tuple[int, int]], bound: float
) -> tuple[float, list[tuple[int, int]]] | None:
    """Give the devices the plan leaves over to its stages, one unit at a time (see the module
    docstring; units must step by one); None when no stage can take them or the plan ends up
    no faster than ``bound``."""
    spans = np.array([p for p, _ in picks])
    index = np.array([k for _, k in picks])
    left = total - int(units[index].sum())
    top = len(units) - 1
    while left > 0:
        now = cost[spans, index]
        after = np.where(index < top, cost[spans, np.minimum(index + 1, top)], np.inf)
        if not np.isfinite(after).any():
            return None
        # The step after giving stage s one more unit: its new slot against everyone else's.
        order = np.argsort(now)
        others = np.full(len(now), now[order[-1]])
        if len(now) > 1:
            others[order[-1]] = now[order[-2]]
        else:
            others[:] = -np.inf
        step = np.maximum(after, others)
        # The lowest step; among equals, the stage the unit speeds up most.
        take = int(np.lexsort((after - now, step))[0])
        index[take] += 1
        left -= 1
    seconds = float(cost[spans, index].max())
    if not seconds < bound:
        return None
    return seconds, [(int(p), int(k)) for p, k in zip(spans, index, strict=True)]

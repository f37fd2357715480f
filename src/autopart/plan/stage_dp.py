"""Stage dynamic program: split the blocks into pipeline stages and give each its replicas.

The model arrives coarsened into ``K`` blocks in topological order.  A plan cuts them into ``S``
consecutive stages, gives stage ``s`` its own data-parallel replica count ``r_s`` with
``sum(r_s) == D`` (every device is used), and picks the microbatch count ``M`` and the
schedule.  Its simulated step time is

    J = max_s [fill(schedule, S, M) * slot_s + allreduce_s]

where ``fill`` comes from simulating the schedule's action lists (`autopart.schedules`):
``M + S - 1`` slots of fill and drain for GPipe and 1F1B alike, after which each stage
allreduces its gradients.  The schedules differ in memory: a stage is costed with the
microbatches its schedule keeps in flight, the most over the schedule's stages (all ``M`` for
GPipe; ``min(S, M)`` for 1F1B, exact for its first stage and an upper bound for the others),
rounded up to a power of two (`_charged`).

The fill factor depends on the final stage count, so the DP runs once per
``(S, M, schedule)``.  Three things keep that affordable at ``K ~ 100`` blocks and 64 replica units:

* stage costs are fetched once per ``(start, end, M)``, and a start stops growing its end as soon
  as a stage fits no replica count, since memory only grows with the span;
* every ``(S, M)`` is solved against the best step time found so far: stage options that are not
  strictly faster are dropped, and ``(M + S - 1)`` times a lower bound on every plan's max slot
  (the slowest unavoidable slot, or the least replica-seconds covering the blocks spread over
  the devices, `Table.floor`) skips the pair, and ends the search over ``S`` once every ``M``
  is skipped;
* before the exact DP, cheap min-plus passes over the surviving options bound how many replica
  units any prefix and suffix can take; that rules ``(S, M)`` out outright or narrows the device
  axis of the exact DP to the few counts that can still sum to ``D``.

Past ``MAX_EXACT_UNITS`` units the exact DP is replaced by the fewest-devices solver
(`autopart.plan.bottleneck`), which is not exact but close (the tests bound the gap).

Candidates are visited in order of preference (fewer stages, then fewer microbatches, then
GPipe before 1F1B, which constrains the caller's loss), and only a strictly faster plan replaces
the best one, so ties are broken that way and the result is deterministic.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autopart.plan import bottleneck
from autopart.plan.stage_table import CostsOf, StageChoice, Table
from autopart.schedules import fill_slots, in_flight

log = logging.getLogger(__name__)

#: The longest unit axis the exact DP searches (see `search`).
MAX_EXACT_UNITS = 64


@dataclass(frozen=True)
class Solution:
    """The chosen stages (in order), the microbatch count, the schedule and the resulting step
    time."""

    stages: tuple[StageChoice, ...]
    microbatches: int
    step_seconds: float
    schedule: str = "gpipe"


def step_seconds(
    stages: Sequence[StageChoice], microbatches: int, schedule: str = "gpipe"
) -> float:
    """The objective: the schedule's fill and drain of every stage, then its allreduce."""
    if not stages:
        raise ValueError("a plan needs at least one stage")
    fill = fill_slots(schedule, len(stages), microbatches)
    return max(fill * s.slot_seconds + s.allreduce_seconds for s in stages)


def search(
    num_blocks: int,
    devices: int,
    coster: CostsOf,
    microbatch_options: Sequence[int],
    *,
    stages: int | None = None,
    replica_unit: int = 1,
    schedules: Sequence[str] = ("gpipe",),
) -> Solution | None:
    """The fastest plan, or None when no plan fits memory.

    Exact over the coster's replica counts, which must all be multiples of ``replica_unit``
    (counts above ``devices`` are ignored), up to ``MAX_EXACT_UNITS`` units; beyond that, on
    every count from one unit up, the fewest-devices solver (`autopart.plan.bottleneck`).
    ``stages`` forces the stage count; a single-element ``microbatch_options`` forces the
    microbatch count; every schedule in ``schedules`` is tried.
    """
    options = _check(num_blocks, devices, microbatch_options, stages)
    if replica_unit < 1 or devices % replica_unit:
        raise ValueError(f"replica_unit {replica_unit} does not divide {devices} devices")
    began = time.perf_counter()
    tables: dict[tuple[int, int], Table] = {}

    def table(m: int, held: int) -> Table:
        if (m, held) not in tables:
            tables[(m, held)] = Table.build(num_blocks, coster, m, devices, held)
        return tables[(m, held)]

    # The first table the search visits (one stage, the fewest microbatches) gives the axis.
    first = options[0]
    replicas = table(first, _charged(max(in_flight(schedules[0], 1, first)), first)).replicas
    if np.any(replicas % replica_unit):
        raise ValueError(f"replica counts {replicas.tolist()} are not multiples of {replica_unit}")
    units = replicas // replica_unit
    total = devices // replica_unit
    usable = replicas <= devices
    if not usable.any():
        return None
    most = min(num_blocks, total // int(units[usable].min()))
    # The exact DP's work grows with the square of the unit axis; past MAX_EXACT_UNITS the
    # fewest-devices solver takes over (`autopart.plan.bottleneck`), on unit steps only.
    stepwise = np.array_equal(units, np.arange(1, len(units) + 1))
    solver = bottleneck.solve if total > MAX_EXACT_UNITS and stepwise else _solve
    counts = range(1, most + 1) if stages is None else [stages] if stages <= most else []

    best: Solution | None = None
    bound = math.inf
    solved = 0
    for count in counts:
        live = False
        for m, name in itertools.product(options, schedules):
            fill = fill_slots(name, count, m)
            candidate = table(m, _charged(max(in_flight(name, count, m)), m))
            if fill * candidate.floor(devices) >= bound:
                continue
            live = True
            if count < candidate.fewest_stages:
                continue
            solved += 1
            found = solver(candidate, count, units, total, bound, fill)
            if found is not None:
                bound, picks = found
                chosen = tuple(candidate.choice(p, k) for p, k in picks)
                best = Solution(chosen, m, step_seconds(chosen, m, name), name)
        if not live:
            break
    log.debug(
        "stage DP: %d blocks, %d units, %d (S, M) solved, %d stage costs, %.2fs",
        num_blocks,
        total,
        solved,
        sum(t.calls for t in tables.values()),
        time.perf_counter() - began,
    )
    return best


def _charged(held: int, microbatches: int) -> int:
    """The in-flight count a stage is costed at: ``held`` rounded up to a power of two (at most
    ``microbatches``), so that the search builds a few tables per microbatch count rather than
    one per stage count.  An upper bound, so a plan that fits here fits; the plan records
    each stage's exact count."""
    return min(microbatches, 1 << (held - 1).bit_length())


def _check(
    num_blocks: int, devices: int, microbatch_options: Sequence[int], stages: int | None
) -> list[int]:
    """Validate the common arguments; return the microbatch options, deduplicated and sorted."""
    if num_blocks < 1 or devices < 1:
        raise ValueError(f"need at least one block and one device, got {num_blocks}, {devices}")
    options = sorted(set(microbatch_options))
    if not options or options[0] < 1:
        raise ValueError(f"microbatch options must be positive, got {list(microbatch_options)}")
    if stages is not None and stages < 1:
        raise ValueError(f"stages must be positive, got {stages}")
    return options


def _solve(
    table: Table, count: int, units: np.ndarray, total: int, bound: float, fill: float
) -> tuple[float, list[tuple[int, int]]] | None:
    """The best ``count``-stage plan strictly faster than ``bound``: (J, [(span, replica)]).

    ``V[s][i, d]`` is the least max stage cost of ``s`` stages covering blocks ``[0, i)`` on ``d``
    replica units; a stage option enters only if it costs less than ``bound``.
    """
    k_blocks = table.num_blocks
    cost = fill * table.slot + table.allreduce
    ok = cost < bound
    window = _unit_windows(table, ok, count, units, total)
    if window is None:
        return None
    low, high = window

    e_p, e_r = np.nonzero(ok)  # grouped by stage end (see Table)
    e_j, e_i, e_u, e_c = table.start[e_p], table.end[e_p], units[e_r], cost[e_p, e_r]
    first = np.full((k_blocks + 1, total + 1), np.inf)
    first[0, 0] = -np.inf  # zero stages cost nothing; max(-inf, c) == c
    layers = [first]
    reached = np.zeros(k_blocks + 1, dtype=bool)
    reached[0] = True
    for s in range(1, count + 1):
        valid = np.isfinite(low[s]) & (low[s] <= high[s])
        sel = valid[e_i] & reached[e_j]
        if not sel.any():
            return None
        j, i, u, c = e_j[sel], e_i[sel], e_u[sel], e_c[sel]
        lo = np.where(valid, low[s], 0).astype(np.int64)
        span = np.where(valid, high[s] - low[s], -1).astype(np.int64)
        steps = np.arange(int(span.max()) + 1)
        # Previous device counts d - u, clipped onto inf padding on either side.
        prev = np.clip(lo[i][:, None] + steps - u[:, None], -1, total + 1) + 1
        padded = np.full((k_blocks + 1, total + 3), np.inf)
        padded[:, 1:-1] = layers[-1]
        cand = np.maximum(padded[j[:, None], prev], c[:, None])
        heads = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])
        best = np.minimum.reduceat(cand, heads, axis=0)
        ends = i[heads]
        g, t = np.nonzero(steps <= span[ends][:, None])
        layer = np.full((k_blocks + 1, total + 1), np.inf)
        layer[ends[g], lo[ends[g]] + t] = best[g, t]
        layers.append(layer)
        reached = np.isfinite(layer).any(axis=1)
    seconds = float(layers[count][k_blocks, total])
    if not seconds < bound:
        return None

    picks: list[tuple[int, int]] = []
    i, d = k_blocks, total
    for s in range(count, 0, -1):
        a, b = np.searchsorted(e_i, [i, i + 1])
        u = e_u[a:b]
        fits = u <= d
        prev = layers[s - 1][e_j[a:b], np.where(fits, d - u, 0)]
        vals = np.where(fits, np.maximum(prev, e_c[a:b]), np.inf)
        e = a + int(np.flatnonzero(vals == layers[s][i, d])[0])
        picks.append((int(e_p[e]), int(e_r[e])))
        i, d = int(e_j[e]), d - int(e_u[e])
    return seconds, picks[::-1]


def _unit_windows(
    table: Table, ok: np.ndarray, count: int, units: np.ndarray, total: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounds on the replica units that ``s`` stages ending at block ``i`` can hold in a plan.

    From the fewest and most units each span can take among its allowed options, min-plus and
    max-plus passes give the unit range of every prefix (``s`` stages up to ``i``) and suffix
    (the other ``count - s`` stages from ``i``).  A prefix can only be part of a full plan if it
    holds at least its own minimum and leaves room for the suffix's minimum (likewise maximum),
    so ``low[s, i] <= d <= high[s, i]``.  None when no plan can sum to ``total`` units at all.
    """
    rows = np.flatnonzero(ok.any(axis=1))
    if not len(rows):
        return None
    width = ok.shape[1]
    fewest = units[ok[rows].argmax(axis=1)].astype(np.float64)
    most = units[width - 1 - ok[rows, ::-1].argmax(axis=1)].astype(np.float64)
    k_blocks = table.num_blocks
    size = k_blocks + 1
    span_min = np.full((size, size), np.inf)
    span_max = np.full((size, size), -np.inf)
    span_min[table.start[rows], table.end[rows]] = fewest
    span_max[table.start[rows], table.end[rows]] = most

    def passes(init: int, forward: bool) -> tuple[np.ndarray, np.ndarray]:
        lo = np.full((count + 1, size), np.inf)
        hi = np.full((count + 1, size), -np.inf)
        lo[0, init] = hi[0, init] = 0
        for s in range(1, count + 1):
            if forward:
                lo[s] = (lo[s - 1][:, None] + span_min).min(axis=0)
                hi[s] = (hi[s - 1][:, None] + span_max).max(axis=0)
            else:
                lo[s] = (span_min + lo[s - 1][None, :]).min(axis=1)
                hi[s] = (span_max + hi[s - 1][None, :]).max(axis=1)
        return lo, hi

    fwd_lo, fwd_hi = passes(0, forward=True)
    if not fwd_lo[count, k_blocks] <= total <= fwd_hi[count, k_blocks]:
        return None
    bwd_lo, bwd_hi = passes(k_blocks, forward=False)
    # Row s of the reversed backward passes covers the count - s stages after the prefix.
    low = np.maximum(fwd_lo, total - bwd_hi[::-1])
    high = np.minimum(fwd_hi, total - bwd_lo[::-1])
    return low, high

"""Pipeline timelines as Chrome traces (Perfetto, chrome://tracing): predicted and measured.

Both kinds have one row per rank, and name their events alike: ``F3`` / ``B3`` for the
forward / backward of microbatch 3 (`autopart.schedules.Action`), ``R3`` for its recomputed
forward, and ``allreduce`` for the sum of a stage's gradients over its replicas; the predicted
one also marks with an instant ``send`` where a stage hands a value on.  So a predicted and a
measured trace of the same plan can be laid side by side.

* `predicted_trace` simulates the plan's action lists with the plan's per-stage times
  (`autopart.schedules.simulate`): a recomputing stage runs its forward again (``R3``) before
  each backward, and the all-reduce follows the stage's last backward, as the stage DP
  charges it.  Both traces time an action's work from when its inputs have arrived, so
  waiting shows as gaps.
* `Recorder` collects what one rank measured (`autopart.Module(..., trace=...)`), and
  `merge` joins every rank's events into one trace.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autopart.plan.plan import Plan
from autopart.schedules import simulate

#: Chrome traces count in microseconds.
_US = 1e6


def predicted_trace(plan: Plan) -> dict[str, Any]:
    """The plan's step as a Chrome trace: every rank's actions at the predicted times."""
    stages = plan.stages
    forward = [s.forward_seconds for s in stages]
    backward = [s.backward_seconds + (s.forward_seconds if s.recompute else 0.0) for s in stages]
    spans = simulate(plan.schedule, len(stages), plan.microbatches, forward, backward)
    events: list[dict[str, Any]] = []
    last_end = [0.0] * len(stages)
    for span in spans:
        last_end[span.stage] = max(last_end[span.stage], span.end)
        stage = stages[span.stage]
        start = span.start
        for rank in stage.ranks:
            if stage.recompute and not span.action.is_forward:  # the forward again, first
                start = span.start + stage.forward_seconds
                name = f"R{span.action.microbatch}"
                events.append(_span(name, span.start, start, rank, "compute"))
            events.append(_span(str(span.action), start, span.end, rank, "compute"))
            if (span.action.is_forward and span.stage < len(stages) - 1) or (
                not span.action.is_forward and span.stage > 0
            ):
                events.append(_instant("send", span.end, rank))
    for stage in stages:
        if stage.allreduce_seconds > 0:
            start = last_end[stage.index]
            for rank in stage.ranks:
                end = start + stage.allreduce_seconds
                events.append(_span("allreduce", start, end, rank, "comm"))
    return _trace(events, plan, "predicted")


class Recorder:
    """One rank's measured events, timed against the wall clock so that ranks line up."""

    def __init__(self, rank: int, synchronize=None) -> None:
        self.rank = rank
        self.events: list[dict[str, Any]] = []
        #: Called before each clock read, so a device's queued work is counted (CUDA).
        self.synchronize = synchronize

    def now(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        return time.time()

    @contextlib.contextmanager
    def span(self, name: str, category: str = "compute") -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.events.append(_span(name, start, self.now(), self.rank, category))


def merge(per_rank: list[list[dict[str, Any]]], plan: Plan) -> dict[str, Any]:
    """Every rank's recorded events in one trace, the earliest at time 0."""
    events = [e for rank_events in per_rank for e in rank_events]
    origin = min((e["ts"] for e in events), default=0.0)
    for event in events:
        event["ts"] -= origin
    return _trace(events, plan, "measured")


def write(trace: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace))
    return path


def _span(name: str, start: float, end: float, rank: int, category: str) -> dict[str, Any]:
    return {
        "name": name,
        "cat": category,
        "ph": "X",
        "ts": start * _US,
        "dur": max(end - start, 0.0) * _US,
        "pid": 0,
        "tid": rank,
    }


def _instant(name: str, at: float, rank: int) -> dict[str, Any]:
    return {"name": name, "cat": "comm", "ph": "i", "s": "t", "ts": at * _US, "pid": 0, "tid": rank}


def _trace(events: list[dict[str, Any]], plan: Plan, kind: str) -> dict[str, Any]:
    names = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"autopart ({kind})"}}]
    for stage in plan.stages:
        for rank in stage.ranks:
            label = f"rank {rank} (stage {stage.index})"
            names.append(
                {"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": label}}
            )
    return {
        "traceEvents": names + sorted(events, key=lambda e: (e["tid"], e["ts"])),
        "displayTimeUnit": "ms",
        "otherData": {"kind": kind, "schedule": plan.schedule, "microbatches": plan.microbatches},
    }

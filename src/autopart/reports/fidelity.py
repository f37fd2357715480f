"""The plan's predictions against what the runtime measured: `Module.plan_report`.

A plan is only as good as its cost model, so after a few training steps the runtime's own
timers (the timed calls of `autopart.runtime.pipeline.calls`, the same spans ``trace=`` draws) are
set beside what the plan predicted, stage by stage:

* **forward**: one microbatch's forward on one replica (``F`` spans);
* **backward**: one microbatch's backward, with its recomputation where the stage recomputes
  (``B`` and ``R`` spans; the plan's backward plus, when recomputing, its forward again);
* **allreduce**: the stage's gradient sum, once per synced step (``allreduce`` spans: with the
  sum overlapped with backward, only the part left after backward ends is timed);
* **peak**: the stage's peak device memory, where it was measured (CUDA's allocator peak, or
  the live tensor bytes that ``track_memory=True`` counts on CPU);
* **step**: the whole step, the slowest rank's forward start to its gradients summed.

The measured time of an action runs from when its inputs have arrived to its end, so waiting
for a neighbour shows in the step, not in the stage's times.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from autopart.cost.units import format_bytes
from autopart.plan.plan import Plan

#: The terms of a stage's report, in the order they are printed.
TERMS = ("forward", "backward", "allreduce", "peak")


@dataclass(frozen=True)
class StageFidelity:
    """One stage's predicted and measured terms (seconds, peak bytes); None: not measured."""

    index: int
    replicas: int
    predicted: dict[str, float]
    measured: dict[str, float | None]

    def ratio(self, term: str) -> float | None:
        """Measured over predicted, or None where either is missing or zero."""
        got, want = self.measured.get(term), self.predicted.get(term)
        return got / want if got is not None and want else None


@dataclass(frozen=True)
class PlanReport:
    stages: list[StageFidelity]
    predicted_step: float
    measured_step: float | None
    #: How many timed steps the measurements average.
    steps: int

    @property
    def step_error(self) -> float | None:
        """(measured - predicted) / measured for the step, or None before any timed step."""
        if not self.measured_step:
            return None
        return (self.measured_step - self.predicted_step) / self.measured_step

    def __str__(self) -> str:
        if not self.steps:
            return (
                "plan report: nothing measured yet; the runtime times training steps 2 to 4 "
                "(forward and backward), so run at least 4 first"
            )
        header = ["stage", "replicas"] + [f"{t} pred / meas" for t in TERMS]
        rows = [header]
        for stage in self.stages:
            cells = [str(stage.index), str(stage.replicas)]
            for term in TERMS:
                show = format_bytes if term == "peak" else _ms
                got = stage.measured.get(term)
                ratio = stage.ratio(term)
                cells.append(
                    f"{show(stage.predicted[term])} / "
                    + ("-" if got is None else show(got))
                    + (f" (x{ratio:.2f})" if ratio is not None else "")
                )
            rows.append(cells)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        error = self.step_error
        lines.append(
            f"step: predicted {_ms(self.predicted_step)}, measured "
            f"{_ms(self.measured_step or 0.0)} over {self.steps} step(s)"
            + (f" (prediction {error:+.0%} of measured)" if error is not None else "")
        )
        return "\n".join(lines)


def build_report(plan: Plan, per_rank: list[dict[str, Any]]) -> PlanReport:
    """The report from every rank's measurements: ``{"events", "steps", "peak"}`` each (see
    `Module.plan_report`)."""
    stages = []
    for stage in plan.stages:
        mine = [per_rank[r] for r in stage.ranks]
        backward = stage.backward_seconds + (stage.forward_seconds if stage.recompute else 0.0)
        predicted = {
            "forward": stage.forward_seconds,
            "backward": backward,
            "allreduce": stage.allreduce_seconds,
            "peak": float(stage.memory_bytes),
        }
        peaks = [m["peak"] for m in mine if m["peak"] is not None]
        measured: dict[str, float | None] = {
            "forward": _mean_span(mine, ("F",)),
            "backward": _per_microbatch(mine, ("B", "R")),
            "allreduce": _mean_named(mine, "allreduce") if stage.replicas > 1 else 0.0,
            "peak": float(max(peaks)) if peaks else None,
        }
        stages.append(StageFidelity(stage.index, stage.replicas, predicted, measured))
    per_step = [max(steps) for steps in zip(*(m["steps"] for m in per_rank), strict=False)]
    return PlanReport(
        stages=stages,
        predicted_step=plan.step_seconds,
        measured_step=statistics.median(per_step) if per_step else None,
        steps=len(per_step),
    )


def _durations(ranks: list[dict[str, Any]], prefixes: tuple[str, ...]) -> list[float]:
    """Seconds of every compute span whose name is a prefix and a microbatch number."""
    return [
        e["dur"] / 1e6
        for m in ranks
        for e in m["events"]
        if e["cat"] == "compute" and e["name"][:1] in prefixes and e["name"][1:].isdigit()
    ]


def _mean_span(ranks: list[dict[str, Any]], prefixes: tuple[str, ...]) -> float | None:
    spans = _durations(ranks, prefixes)
    return statistics.mean(spans) if spans else None


def _per_microbatch(ranks: list[dict[str, Any]], prefixes: tuple[str, ...]) -> float | None:
    """The backward of one microbatch with its recomputation: B and R spans summed per
    microbatch, averaged."""
    backs = len(_durations(ranks, prefixes[:1]))
    total = sum(_durations(ranks, prefixes))
    return total / backs if backs else None


def _mean_named(ranks: list[dict[str, Any]], name: str) -> float | None:
    """The mean of the spans called ``name``: per gradient sum (steps under ``no_sync`` have
    none)."""
    spans = [e["dur"] / 1e6 for m in ranks for e in m["events"] if e["name"] == name]
    return statistics.mean(spans) if spans else None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"

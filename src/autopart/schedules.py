"""Pipeline schedules as data: each stage's ordered list of actions, and what follows from it.

A schedule is a function of ``(stages, microbatches)`` that gives every stage the order in which
it runs the forward and the backward of each microbatch.  Three readers use the same lists, so
they cannot disagree:

* the runtime executes them (`autopart.runtime.pipeline.runner`), and derives from them the order in
  which each rank posts its messages (`autopart.runtime.transport.messages`);
* the stage DP takes its fill factor from `fill_slots`;
* the memory model takes the microbatches in flight per stage from `in_flight`.

The last two are closed forms that each schedule declares beside its generator, because the
planner asks for them at hundreds of stages and thousands of microbatches, where walking the
lists would take longer than the search.  The tests hold each closed form to what `simulate`
and the lists give (`simulated_fill`, `counted_in_flight`), so they cannot drift apart.

Nothing here touches ``torch.distributed``: the lists are checked in one process
(`simulate` finds deadlocks), and `autopart show --trace` draws them.

The schedules:

* ``gpipe``: every forward, then every backward, the latest microbatch first.  Every stage
  keeps all ``M`` microbatches' activations until its backward starts.
* ``1f1b``: stage ``s`` of ``S`` runs ``S - s - 1`` forwards to fill the pipeline, then
  alternates one forward and one backward, then drains.  It keeps at most ``S - s``
  microbatches in flight, and with even stages it has GPipe's bubble, ``S - 1`` slots.
  Its backward of microbatch ``m`` runs before the caller has the step's loss, so it needs each
  microbatch's loss gradient from the model itself (`autopart.ir.loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from autopart.config import Choice
from autopart.errors import AutopartError


class Direction(Choice):
    """Which way a stage runs a microbatch; also names a pass over every microbatch
    (GPipe's forward pass inside the call, its backward inside ``loss.backward()``)."""

    FORWARD = "F"
    BACKWARD = "B"


FORWARD, BACKWARD = Direction.FORWARD, Direction.BACKWARD


class ScheduleError(AutopartError):
    """A schedule's action lists cannot run: a deadlock or an unknown schedule."""


@dataclass(frozen=True)
class Action:
    """The forward (``F``) or backward (``B``) of microbatch ``microbatch`` on one stage."""

    kind: Direction
    microbatch: int

    @property
    def is_forward(self) -> bool:
        return self.kind == FORWARD

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def _gpipe(stages: int, microbatches: int, stage: int) -> list[Action]:
    forward = [Action(FORWARD, m) for m in range(microbatches)]
    return forward + [Action(BACKWARD, m) for m in reversed(range(microbatches))]


def _one_f_one_b(stages: int, microbatches: int, stage: int) -> list[Action]:
    warmup = min(stages - stage - 1, microbatches)
    order = [Action(FORWARD, m) for m in range(warmup)]
    for m in range(microbatches - warmup):
        order += [Action(FORWARD, warmup + m), Action(BACKWARD, m)]
    order += [Action(BACKWARD, m) for m in range(microbatches - warmup, microbatches)]
    return order


@dataclass(frozen=True)
class Schedule:
    """A schedule: the generator of one stage's action list, and the two numbers the planner
    reads from the lists, in closed form."""

    #: ``(stages, microbatches, stage) -> actions``.
    generate: Callable[[int, int, int], list[Action]]
    #: ``(stages, microbatches) -> slots``: what `simulated_fill` gives.
    fill: Callable[[int, int], float]
    #: ``(stages, microbatches, stage) -> microbatches``: what `counted_in_flight` gives.
    held: Callable[[int, int, int], int]


#: Every schedule by name.
SCHEDULES: dict[str, Schedule] = {
    "gpipe": Schedule(_gpipe, lambda s, m: m + s - 1, lambda s, m, stage: m),
    "1f1b": Schedule(_one_f_one_b, lambda s, m: m + s - 1, lambda s, m, stage: min(s - stage, m)),
}


def _schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


@cache
def actions(name: str, stages: int, microbatches: int, stage: int) -> tuple[Action, ...]:
    """Stage ``stage``'s actions in one step, in the order it runs them."""
    schedule = _schedule(name)
    if not 0 <= stage < stages or microbatches < 1:
        raise ScheduleError(
            f"no stage {stage} of {stages} with {microbatches} microbatches in a schedule"
        )
    return tuple(schedule.generate(stages, microbatches, stage))


def forward_only(microbatches: int) -> tuple[Action, ...]:
    """A call that records no gradients: every forward, in order, on every schedule."""
    return tuple(Action(FORWARD, m) for m in range(microbatches))


def in_flight(name: str, stages: int, microbatches: int) -> tuple[int, ...]:
    """Per stage, the most microbatches forwarded but not yet backwarded at any moment:
    how many microbatches' activations the stage holds at its peak."""
    held = _schedule(name).held
    return tuple(held(stages, microbatches, stage) for stage in range(stages))


def counted_in_flight(name: str, stages: int, microbatches: int) -> tuple[int, ...]:
    """`in_flight` counted from the action lists: the truth its closed form is tested against."""
    counts = []
    for stage in range(stages):
        live = most = 0
        for action in actions(name, stages, microbatches, stage):
            live += 1 if action.is_forward else -1
            most = max(most, live)
        counts.append(most)
    return tuple(counts)


@dataclass(frozen=True)
class Span:
    """One action of one stage in a simulated step, from ``start`` to ``end`` seconds."""

    stage: int
    action: Action
    start: float
    end: float


#: How many actions' sends a rank keeps in flight: before each action it waits until what it
#: sent ``SEND_LAG`` actions back has been received (`autopart.runtime.pipeline.runner`).
SEND_LAG = 2


def simulate(
    name: str,
    stages: int,
    microbatches: int,
    forward: Sequence[float],
    backward: Sequence[float],
    link: float = 0.0,
    send_lag: int | None = SEND_LAG,
) -> list[Span]:
    """Run the action lists against each other with per-stage forward and backward times.

    Stage ``s``'s forward of ``m`` waits for stage ``s - 1``'s, and its backward of ``m`` for
    stage ``s + 1``'s and for its own forward of ``m``; ``link`` seconds pass on every hop
    between stages.  Each stage runs its list strictly in order and, with ``send_lag``, starts
    an action only once the stage it sent to ``send_lag`` actions back has started the action
    that receives it (as the runtime waits on its sends).  That the run ends at all is the
    proof that the lists cannot deadlock: a stage that waits on a later action of its own
    schedule, or on a cycle of stages, is a `ScheduleError`.
    """
    lists = [actions(name, stages, microbatches, s) for s in range(stages)]
    started: dict[tuple[int, Action], float] = {}
    done: dict[tuple[int, Action], float] = {}
    position = [0] * stages
    clock = [0.0] * stages
    spans: list[Span] = []
    remaining = sum(len(a) for a in lists)
    while remaining:
        progressed = False
        for s in range(stages):
            while position[s] < len(lists[s]):
                action = lists[s][position[s]]
                ready = _ready(s, stages, action, done, link)
                if send_lag and position[s] >= send_lag and ready is not None:
                    sent = _receiver(s, stages, lists[s][position[s] - send_lag])
                    ready = (
                        None
                        if sent and sent not in started
                        else max(ready, started[sent] if sent else 0.0)
                    )
                if ready is None:
                    break
                start = max(clock[s], ready)
                started[(s, action)] = start
                took = forward[s] if action.is_forward else backward[s]
                clock[s] = start + took
                done[(s, action)] = clock[s]
                spans.append(Span(s, action, start, clock[s]))
                position[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [
                f"stage {s} at {lists[s][position[s]]}"
                for s in range(stages)
                if position[s] < len(lists[s])
            ]
            raise ScheduleError(f"schedule {name!r} deadlocks: {', '.join(stuck)} wait forever")
    return spans


def _receiver(stage: int, stages: int, action: Action) -> tuple[int, Action] | None:
    """The action of the neighbouring stage that receives what ``action`` sends, if any."""
    if action.is_forward:
        return (stage + 1, action) if stage < stages - 1 else None
    return (stage - 1, action) if stage > 0 else None


def _ready(
    stage: int, stages: int, action: Action, done: dict[tuple[int, Action], float], link: float
) -> float | None:
    """When ``action`` may start on ``stage``, or None while something it needs has not run."""
    m = action.microbatch
    needs: list[tuple[tuple[int, Action], float]] = []
    if action.is_forward:
        if stage > 0:
            needs.append(((stage - 1, action), link))
    else:
        needs.append(((stage, Action(FORWARD, m)), 0.0))
        if stage < stages - 1:
            needs.append(((stage + 1, action), link))
    times = []
    for key, delay in needs:
        if key not in done:
            return None
        times.append(done[key] + delay)
    return max(times, default=0.0)


def fill_slots(name: str, stages: int, microbatches: int) -> float:
    """The step of even stages in units of one microbatch's forward plus backward: what the
    stage DP multiplies each stage's slot by.  ``M + S - 1`` for GPipe and 1F1B alike."""
    return _schedule(name).fill(stages, microbatches)


def simulated_fill(name: str, stages: int, microbatches: int) -> float:
    """`fill_slots` from `simulate`: the truth its closed form is tested against."""
    spans = simulate(name, stages, microbatches, [1.0] * stages, [2.0] * stages)
    return max(span.end for span in spans) / 3.0

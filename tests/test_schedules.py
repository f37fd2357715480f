"""Schedules as data, checked in one process: every list is complete and ordered, the lists
of all stages run against each other without deadlock, and what the planner reads from them
(fill, microbatches in flight) is right."""

from __future__ import annotations

import itertools

import pytest

from autopart import schedules
from autopart.schedules import BACKWARD, FORWARD, Action, ScheduleError

SHAPES = list(itertools.product(range(1, 6), range(1, 10)))


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize(("stages", "microbatches"), SHAPES)
def test_every_list_runs_each_microbatch_once_forward_before_backward(name, stages, microbatches):
    for stage in range(stages):
        order = schedules.actions(name, stages, microbatches, stage)
        assert sorted(map(str, order)) == sorted(
            f"{kind}{m}" for kind in (FORWARD, BACKWARD) for m in range(microbatches)
        )
        position = {a: i for i, a in enumerate(order)}
        for m in range(microbatches):
            assert position[Action(FORWARD, m)] < position[Action(BACKWARD, m)]
        forwards = [a.microbatch for a in order if a.is_forward]
        assert forwards == sorted(forwards), "forwards run in microbatch order"


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize(("stages", "microbatches"), SHAPES)
def test_lists_respect_dependencies_and_fill_is_the_bubble(name, stages, microbatches):
    spans = schedules.simulate(name, stages, microbatches, [1.0] * stages, [2.0] * stages)
    end = {(s.stage, s.action): s.end for s in spans}
    for s in spans:
        m = s.action.microbatch
        if s.action.is_forward and s.stage > 0:
            assert s.start >= end[(s.stage - 1, s.action)]
        if not s.action.is_forward:
            assert s.start >= end[(s.stage, Action(FORWARD, m))]
            if s.stage < stages - 1:
                assert s.start >= end[(s.stage + 1, s.action)]
    assert schedules.simulated_fill(name, stages, microbatches) == microbatches + stages - 1
    assert schedules.fill_slots(name, stages, microbatches) == microbatches + stages - 1


@pytest.mark.parametrize(("stages", "microbatches"), SHAPES)
def test_in_flight_counts(stages, microbatches):
    assert schedules.counted_in_flight("gpipe", stages, microbatches) == (microbatches,) * stages
    assert schedules.counted_in_flight("1f1b", stages, microbatches) == tuple(
        min(stages - s, microbatches) for s in range(stages)
    )
    for name in schedules.SCHEDULES:
        assert schedules.in_flight(name, stages, microbatches) == schedules.counted_in_flight(
            name, stages, microbatches
        )


def test_a_list_that_waits_on_a_later_stage_is_a_deadlock(monkeypatch):
    """The last stage backwards microbatch 1 before forwarding it: the simulation, not a hang,
    says so, naming where every stuck stage waits."""

    def broken(stages, microbatches, stage):
        order = schedules.SCHEDULES["1f1b"].generate(stages, microbatches, stage)
        if stage == stages - 1:
            order = [Action(BACKWARD, 1), *[a for a in order if a != Action(BACKWARD, 1)]]
        return order

    base = schedules.SCHEDULES["1f1b"]
    wrapped = schedules.Schedule(broken, base.fill, base.held)
    monkeypatch.setitem(schedules.SCHEDULES, "broken", wrapped)
    schedules.actions.cache_clear()
    with pytest.raises(ScheduleError, match=r"deadlocks: .*stage 2 at B1"):
        schedules.simulate("broken", 3, 4, [1.0] * 3, [2.0] * 3)
    schedules.actions.cache_clear()


def test_link_time_delays_every_hop():
    spans = schedules.simulate("1f1b", 2, 2, [1.0, 1.0], [1.0, 1.0], link=0.5)
    assert max(s.end for s in spans) == pytest.approx(2 * 2 + 2 * 1 + 2 * 0.5)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ScheduleError, match="unknown schedule 'zb'"):
        schedules.actions("zb", 2, 2, 0)

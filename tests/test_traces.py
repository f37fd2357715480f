"""Timelines as Chrome traces: the predicted one from a plan (`autopart show --trace`) and the
measured one (`trace=`), parsed back and checked against the schedule's action lists."""

import json

import pytest

import schedule_workers
from autopart import schedules
from autopart.cli import main
from autopart.plan.plan import Plan
from multirank import run_ranks


def _rows(trace: dict) -> dict[int, list[dict]]:
    """Each rank's complete events, in time order."""
    rows: dict[int, list[dict]] = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            rows.setdefault(event["tid"], []).append(event)
    return {tid: sorted(events, key=lambda e: e["ts"]) for tid, events in rows.items()}


def _check_structure(trace: dict, plan: Plan, repeats: int) -> None:
    labels = {
        e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and "tid" in e
    }
    rows = _rows(trace)
    assert sorted(rows) == list(range(plan.devices)) == sorted(labels)
    for stage in plan.stages:
        order = schedules.actions(plan.schedule, plan.num_stages, plan.microbatches, stage.index)
        for rank in stage.ranks:
            assert labels[rank] == f"rank {rank} (stage {stage.index})"
            names = [e["name"] for e in rows[rank] if e["name"][0] in "FB"]
            assert names == [str(a) for a in order] * repeats, f"rank {rank}: {names}"
            for event in rows[rank]:
                assert event["ts"] >= 0 and event["dur"] >= 0
            ends = [e["ts"] + e["dur"] for e in rows[rank]]
            starts = [e["ts"] for e in rows[rank]]
            assert all(s >= e - 1e-3 for s, e in zip(starts[1:], ends, strict=False)), (
                "one rank's actions never overlap"
            )


@pytest.mark.multirank
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_measured_and_predicted_traces_follow_the_action_lists(tmp_path, schedule):
    run_ranks(2, schedule_workers.traced_training, str(tmp_path), schedule, timeout_s=120)
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.schedule == schedule and plan.num_stages == 2
    measured = json.loads((tmp_path / "trace.json").read_text())
    assert measured["otherData"]["kind"] == "measured"
    _check_structure(measured, plan, repeats=3)
    predicted = json.loads((tmp_path / "predicted.json").read_text())
    _check_structure(predicted, plan, repeats=1)
    # The CLI writes the same predicted trace from the saved plan.
    out = tmp_path / "show.json"
    assert main(["show", "--trace", str(out), str(tmp_path / "plan.json")]) == 0
    assert json.loads(out.read_text()) == predicted
    # The plan report reads the same timers: its forward per stage is the mean F span of the
    # stage's rank, its step spans at least that rank's actions in one step.
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 3 and "pred / meas" in report["text"]
    rows = _rows(measured)
    for stage, got in zip(plan.stages, report["stages"], strict=True):
        (rank,) = stage.ranks
        forwards = [e["dur"] / 1e6 for e in rows[rank] if e["name"][0] == "F"]
        assert got["forward"] == pytest.approx(sum(forwards) / len(forwards), rel=1e-9)
        assert got["backward"] > 0
        busy = sum(e["dur"] for e in rows[rank] if e["name"][0] in "FBR") / 1e6 / 3
        assert report["measured_step"] >= busy
    # Stage 1 forwards microbatch 0 only after stage 0 did, in both pictures.
    for trace in (measured, predicted):
        rows = _rows(trace)
        first = {tid: next(e for e in events if e["name"] == "F0") for tid, events in rows.items()}
        assert first[1]["ts"] >= first[0]["ts"] + first[0]["dur"] - 1e-3

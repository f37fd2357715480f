"""autopart.Module's DDP-style features, each on real processes over gloo."""

import json
import os
import subprocess
import sys

import pytest

import runtime_workers as workers
from multirank import run_ranks, run_ranks_unjoined

pytestmark = pytest.mark.multirank


def test_no_sync_accumulation_and_global_clip():
    run_ranks(2, workers.accumulate_and_clip)


def test_state_dicts_round_trip_into_plain_pytorch_and_plan_reuse(tmp_path):
    run_ranks(2, workers.state_round_trip, str(tmp_path))


def test_eval_and_no_grad():
    run_ranks(2, workers.eval_and_no_grad)


def test_recompute_replays_dropout():
    run_ranks(2, workers.recompute_dropout)


def test_different_plans_on_different_ranks_fail_clearly():
    run_ranks(2, workers.different_plans)


def test_bad_inputs_fail_clearly_on_every_rank():
    run_ranks(2, workers.bad_inputs)


def test_a_dead_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    codes = run_ranks_unjoined(2, workers.dies_after_one_step, str(tmp_path), timeout_s=60)
    assert codes[1] == 17
    assert codes[0] == 0, f"rank 0 exited with {codes[0]} (None: it hung)"
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["error"] is not None, "rank 0 trained on as if nothing happened"
    assert "rank 1" in outcome["error"] or "died" in outcome["error"], outcome["error"]
    assert outcome["seconds"] < 15


def test_a_stalled_rank_fails_the_others_within_the_timeout_of_a_user_made_group(tmp_path):
    """The test harness makes the process group itself, with a 60 s timeout; autopart's
    ``timeout=4`` must still bound every wait (issue: it waited the group's timeout)."""
    codes = run_ranks_unjoined(2, workers.stalls_after_one_step, str(tmp_path), timeout_s=60)
    assert codes == [0, 0], codes
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["error"] is not None, "rank 0 trained on without its peer"
    assert outcome["seconds"] < 12, outcome


@pytest.mark.parametrize("stages", [1, 2])
def test_a_batch_taking_the_other_side_of_a_branch_stops_every_rank(tmp_path, stages):
    codes = run_ranks_unjoined(2, workers.branch_taken_on_one_rank, str(tmp_path), stages)
    assert codes == [0, 0], codes
    runs_it = 1 if stages == 1 else 0
    mine, other = (
        json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (runs_it, 1 - runs_it)
    )
    assert mine["error"] and "BranchTaken" in mine["error"], mine
    assert "if mask.any():" in mine["error"], mine
    assert other["error"] is not None and other["seconds"] < 12, other


LAUNCHES = 10


@pytest.mark.slow
def test_the_same_inputs_give_the_same_plan_in_every_launch(tmp_path, monkeypatch):
    """Plans read measured numbers (the CPU, the links); measured once per machine and kept,
    they are the same in every launch, with other work running on the machine."""
    monkeypatch.setenv("AUTOPART_CACHE_DIR", str(tmp_path / "cache"))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for launch in range(LAUNCHES):
            run_ranks(2, workers.plan_of_a_launch, str(tmp_path), launch)
    finally:
        hog.kill()
    plans = [(tmp_path / f"plan{launch}.json").read_text() for launch in range(LAUNCHES)]
    assert all(plan == plans[0] for plan in plans), [json.loads(p)["stages"] for p in plans]
    assert "measured inputs" in json.loads(plans[0])["notes"][-1]


def test_mpirun_environment_is_read():
    code = (
        "import torch.distributed as dist\n"
        "from autopart.runtime.transport.distenv import ensure_initialized\n"
        "ensure_initialized(10)\n"
        "print(dist.get_rank(), dist.get_world_size())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(
        OMPI_COMM_WORLD_RANK="0",
        OMPI_COMM_WORLD_SIZE="1",
        OMPI_COMM_WORLD_LOCAL_RANK="0",
        MASTER_PORT=str(__import__("multirank").free_port()),
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]


def test_bf16_autocast_matches_reference():
    run_ranks(2, workers.bf16_matches_autocast_reference)


def test_caller_autocast_is_honoured_and_matches_eager_autocast():
    run_ranks(2, workers.caller_autocast_matches_reference)


def test_bf16_values_cross_stages_in_the_dtype_their_op_produced(tmp_path):
    run_ranks(2, workers.bf16_values_cross_in_their_own_dtype, str(tmp_path))
    sent = json.loads((tmp_path / "bytes.json").read_text())
    assert sent["fp32"] > 0 and sent["bf16"] * 2 == sent["fp32"], sent


@pytest.mark.slow
def test_albert_under_bf16_at_every_cut_equals_eager_autocast():
    import bf16_workers

    run_ranks(2, bf16_workers.albert_bf16_at_every_cut, timeout_s=600)


def test_one_stage_step_costs_no_memory_over_plain(tmp_path):
    """The logits a loss came from are returned but not trained on.  A training step of the
    wrapped model on one stage peaks within 5 % of plain PyTorch's (the logits are 4 MiB of
    a 19 MiB peak here: a copy of them, or a gradient buffer for them, fails), in fp32 and
    inside the caller's bf16 autocast, where the logits come back in bf16 as unwrapped."""
    run_ranks(1, workers.one_stage_step_memory, str(tmp_path))
    peaks = json.loads((tmp_path / "peaks.json").read_text())
    print("peak live bytes of one training step (pytest -s shows it):", peaks)
    assert peaks["logits"]["fp32"] > 0.2 * peaks["fp32"]["plain"], peaks
    for precision in ("fp32", "bf16"):
        assert peaks[precision]["autopart"] <= 1.05 * peaks[precision]["plain"], peaks


def test_zero_under_bf16_autocast_matches_reference():
    run_ranks(2, workers.zero_bf16_matches_autocast_reference)


@pytest.mark.parametrize("world,stages", [(2, 1), (3, 2)])
def test_zero_matches_reference_and_splits_optimizer_state_and_gradients(world, stages, tmp_path):
    run_ranks(world, workers.zero_matches_reference, stages, str(tmp_path))
    for rank in range(world):
        r = json.loads((tmp_path / f"zero{rank}.json").read_text())
        # Whole tensors are assigned, so a share can exceed an even split by one tensor.
        assert r["zero"] <= r["plain"] / r["replicas"] + r["largest"], (rank, r)
        # Gradients at rest are split the same way (ZeRO-2); "largest" is two tensors' worth.
        assert r["zero_grads"] <= r["plain_grads"] / r["replicas"] + r["largest"] / 2, (rank, r)
        if r["replicas"] > 1:
            assert r["zero"] < r["plain"], (rank, r)
            assert r["zero_grads"] < r["plain_grads"], (rank, r)


def test_memory_report_by_category(tmp_path):
    run_ranks(2, workers.memory_report_by_category, str(tmp_path))
    assert (tmp_path / "report1.json").exists()


def test_fp16_overflow_on_one_rank_skips_the_step_on_all():
    run_ranks(2, workers.fp16_overflow_skips_everywhere)

"""1F1B end to end, in real processes: it trains like DDP at 2-4 ranks, with and without
message tags, on Hugging Face models and on the loss forms autopart splits into rows; and the
habits of real training loops hold under it (`schedule_workers`)."""

import json

import pytest

import loop_workers
import schedule_workers
from ddp_oracle import OracleCase, run_oracles
from multirank import run_ranks

pytestmark = [pytest.mark.multirank]

ONE_F_ONE_B = {"schedule": "1f1b"}


def _cases(world: int) -> list[OracleCase]:
    if world == 2:
        return [
            OracleCase("bert_mlm", 2, 3, options=ONE_F_ONE_B),
            OracleCase("loss_batchmean", 2, 3, options=ONE_F_ONE_B, direct=True),
            OracleCase("loss_sum_over_items", 2, 2, options=ONE_F_ONE_B, direct=True),
            OracleCase("gpt2", 2, 4, step_rows=(3, 1), options=ONE_F_ONE_B),  # uneven last batch
            OracleCase("gpt2", 2, 4, options={**ONE_F_ONE_B, "offload": True}),
        ]
    if world == 3:
        return [OracleCase("llama", 2, 4, options=ONE_F_ONE_B)]
    if world == 5:
        # The encoder's output and mask skip from stage 1 to stages 3 and 4: a skip's sends
        # must not be waited on before the pass ends, or ranks 1-3 wait on each other.
        return [OracleCase("t5", 5, 8, options=ONE_F_ONE_B)]
    return [
        OracleCase("gpt2_deep", 4, 8, options=ONE_F_ONE_B),
        OracleCase("gpt2", 2, 4, options={**ONE_F_ONE_B, "zero": True}),  # 2 replicas each
    ]


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_1f1b_trains_like_ddp(world):
    """Without tags, as NCCL matches point-to-point messages: by posting order alone."""
    run_ranks(world, run_oracles, _cases(world), timeout_s=180)


@pytest.mark.slow
def test_1f1b_trains_like_ddp_with_tags(monkeypatch):
    monkeypatch.setenv("AUTOPART_P2P_TAGS", "1")
    run_ranks(2, run_oracles, [_cases(2)[0], _cases(2)[-2]], timeout_s=180)


def test_1f1b_training_loop_habits():
    run_ranks(2, schedule_workers.habits, {"stages": 2, "microbatches": 4, **ONE_F_ONE_B})


@pytest.mark.slow
def test_1f1b_holds_fewer_microbatches_and_the_memory_model_knows(tmp_path):
    """4 stages, 8 microbatches: stage s holds at most S - s microbatches under 1F1B, so its
    activation peak is at most (S - s) / M of GPipe's plus one microbatch; the memory model
    predicts each stage's peak within 15 % under both schedules."""
    run_ranks(4, schedule_workers.activation_memory, str(tmp_path), timeout_s=240)
    stages, microbatches = 4, 8
    for rank in range(4):
        result = json.loads((tmp_path / f"memory{rank}.json").read_text())
        for schedule, found in result.items():
            error = abs(found["predicted"] - found["measured"]) / found["measured"]
            print(f"rank {rank} {schedule}: {found} ({error:.1%} off)")
            assert error <= 0.15, f"rank {rank} {schedule}: predicted {found} ({error:.1%} off)"
        s = result["gpipe"]["stage"]
        gpipe = result["gpipe"]["measured"] - result["gpipe"]["state"]
        one_f_one_b = result["1f1b"]["measured"] - result["1f1b"]["state"]
        bound = (stages - s) / microbatches * gpipe + gpipe / microbatches
        assert 0 < one_f_one_b <= bound, (
            f"stage {s}: 1F1B activations {one_f_one_b:,} above (S - s)/M of GPipe's "
            f"{gpipe:,} plus one microbatch ({bound:,.0f})"
        )


@pytest.mark.parametrize(("name", "world", "microbatches"), [("tied", 2, 4), ("skip", 4, 8)])
def test_a_loss_outside_the_model_runs_1f1b_through_loss_fn(name, world, microbatches):
    """A weight tied across two stages; and a differentiable value that skips from the first
    of four stages to the last."""
    run_ranks(world, schedule_workers.loss_fn_trains_like_ddp, name, microbatches, timeout_s=120)


def test_1f1b_accumulation_habits_under_zero():
    """One stage, two ZeRO replicas, the loss inside the model: two synced backward calls
    before a step, no_sync mixed with synced calls, two forwards summed into one backward."""
    run_ranks(
        2,
        loop_workers.loop_habits,
        "loss_inside",
        {"stages": 1, "microbatches": 2, "zero": True, **ONE_F_ONE_B},
        timeout_s=120,
    )

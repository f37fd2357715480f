"""1F1B end to end, in real processes: it trains like DDP at 2-4 ranks, with and without
message tags, on Hugging Face models and on the loss forms autopart splits into rows; and the
habits of real training loops hold under it (`schedule_workers`)."""

import pytest

import schedule_workers
from ddp_oracle import OracleCase, run_oracles
from multirank import run_ranks

pytestmark = [pytest.mark.multirank]

ONE_F_ONE_B = {"schedule": "1f1b"}


def _cases(world: int) -> list[OracleCase]:
    if world == 2:
        return [
            OracleCase("gpt2", 2, 4, options=ONE_F_ONE_B),
            OracleCase("bert_mlm", 2, 3, options=ONE_F_ONE_B),
            OracleCase("loss_batchmean", 2, 3, options=ONE_F_ONE_B, direct=True),
            OracleCase("loss_sum_over_items", 2, 2, options=ONE_F_ONE_B, direct=True),
            OracleCase("gpt2", 2, 4, step_rows=(3, 1), options=ONE_F_ONE_B),  # uneven last batch
        ]
    if world == 3:
        return [
            OracleCase("llama", 2, 4, options=ONE_F_ONE_B),
            OracleCase("t5", 3, 2, options=ONE_F_ONE_B),
        ]
    return [OracleCase("gpt2_deep", 4, 8, options=ONE_F_ONE_B)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_1f1b_trains_like_ddp(world):
    """Without tags, as NCCL matches point-to-point messages: by posting order alone."""
    run_ranks(world, run_oracles, _cases(world), timeout_s=180)


@pytest.mark.slow
def test_1f1b_trains_like_ddp_with_tags(monkeypatch):
    monkeypatch.setenv("AUTOPART_P2P_TAGS", "1")
    run_ranks(2, run_oracles, _cases(2)[:2], timeout_s=180)


def test_1f1b_training_loop_habits():
    run_ranks(2, schedule_workers.habits, {"stages": 2, "microbatches": 4, **ONE_F_ONE_B})

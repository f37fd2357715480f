"""Training-loop habits give DDP's gradients: backward twice before step (no ``no_sync``),
``no_sync`` mixed with synced calls, evaluation in the middle, and two forwards summed into one
backward; with one stage, with two, with a weight tied across stages, and under ZeRO."""

import pytest

import loop_workers
from multirank import run_ranks

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


@pytest.mark.parametrize(
    "name, options",
    [
        ("skip", {"stages": 2, "microbatches": 2}),
        ("tied", {"stages": 2, "microbatches": 2}),
        ("mlp", {"stages": 1, "microbatches": 2}),
        ("mlp", {"stages": 1, "microbatches": 1, "zero": True}),
    ],
    ids=["two-stages", "tied-across-stages", "replicas", "zero"],
)
def test_accumulation_habits_match_ddp(name, options):
    run_ranks(2, loop_workers.loop_habits, name, options, timeout_s=120)

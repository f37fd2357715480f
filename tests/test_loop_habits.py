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


def test_the_users_model_sees_the_stage_buffers_after_a_device_move():
    """Moving a stage to a device replaces its buffers; the user's model must follow, or
    its state_dict() keeps the initial BatchNorm statistics.  The move is simulated on the
    CPU by replacing the stage's buffers as `Module.to` does."""
    import copy

    import torch

    from autopart.runtime.pipeline.builder import _share_buffers

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    stage = copy.deepcopy(model)
    stage[1]._buffers["running_mean"] = stage[1].running_mean.clone().add_(1.0)
    _share_buffers(stage, model)
    assert model[1].running_mean is stage[1].running_mean
    assert float(model.state_dict()["1.running_mean"][0]) == 1.0


def test_batch_norm_counts_training_calls():
    run_ranks(2, loop_workers.batch_norm_counter)

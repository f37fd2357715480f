"""autopart.Module matches plain PyTorch (DDP semantics) on real processes over gloo."""

import itertools

import pytest

from equivalence import Case, run_cases
from multirank import run_ranks
from zoo import ZOO

pytestmark = pytest.mark.multirank

MODELS = sorted(ZOO)
# BatchNorm normalizes over the rows one replica runs in one microbatch; that equals DDP only
# when those rows are exactly a rank's local batch: one stage, one microbatch.
BATCH_STATISTICS = {"resnet_cnn"}


def _covering_cases(world: int) -> list[Case]:
    """Every zoo model once, rotating stage counts, microbatches and optimizers, plus the MLP
    under every stage count (and on two ranks every microbatch count)."""
    cases = []
    for i, name in enumerate(MODELS):
        stages = 1 + (i + world) % world
        if name in BATCH_STATISTICS:
            cases.append(Case(name, 1, 1, ("sgd", "adam")[i % 2]))
            continue
        cases.append(Case(name, stages, (1, 2, 4)[i % 3], ("sgd", "adam")[i % 2]))
    if world <= 2:
        sweep = list(itertools.product(range(1, world + 1), (1, 2, 4)))
    else:  # every stage count, microbatch counts rotating, to keep the run short
        sweep = [(stages, (1, 2, 4)[stages % 3]) for stages in range(1, world + 1)]
    for j, (stages, mb) in enumerate(sweep):
        cases.append(Case("mlp", stages, mb, ("sgd", "adam")[(j + world) % 2], steps=2))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_plain_pytorch(world):
    """Without tags, as NCCL matches point-to-point messages: by posting order alone."""
    run_ranks(world, run_cases, _covering_cases(world), timeout_s=120)


@pytest.mark.slow
@pytest.mark.parametrize("world", [4])
def test_matches_plain_pytorch_with_tags(world, monkeypatch):
    """The same cases with every message tagged (a debugging aid on gloo) give the same
    results: tags change nothing, because the order already matches.  Four ranks only, whose
    cases cover the others' layouts (replicas, skips, ties), to keep the suite's time."""
    monkeypatch.setenv("AUTOPART_P2P_TAGS", "1")
    run_ranks(world, run_cases, _covering_cases(world), timeout_s=120)

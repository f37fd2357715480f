"""Who this process is in the job, fixed once the ranks agree on a plan."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autopart.plan.plan import Plan, StagePlan

__all__ = ["RankContext"]


@dataclass(frozen=True)
class RankContext:
    """This rank, the world, its device and the plan every rank runs: what the runtime's
    pieces share, built once on the first call and passed to each."""

    rank: int
    world: int
    device: torch.device
    plan: Plan

    @property
    def stage(self) -> StagePlan:
        """This rank's stage of the plan."""
        return self.plan.stage_of_rank(self.rank)

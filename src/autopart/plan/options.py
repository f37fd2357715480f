"""What the planner is asked: the cluster, the batch, and every user choice it plans for.

`PlanOptions.from_config` derives them from the user's `autopart.config.Config`; the
planner's own knobs (memory margin, block count, host memory) are set beside it."""

from __future__ import annotations

from dataclasses import dataclass

from autopart.config import SCHEDULES, Config, Offload, check_prefetch, check_zero
from autopart.errors import AutopartError
from autopart.plan.memory import OPTIMIZER_FACTORS

__all__ = ["PlanOptions"]


@dataclass(frozen=True)
class PlanOptions:
    devices: int
    global_batch: int
    optimizer: str = "adam"
    memory_margin: float = 0.1
    device_memory: int | None = None
    stages: int | None = None
    microbatches: int | None = None
    split_points: tuple[str, ...] | None = None
    target_blocks: int = 32
    #: Blocks may end at any op, not only where a human would cut (`autopart.plan.blocks`);
    #: the planner's last resort when nothing fits.
    free_cuts: bool = False
    #: The most microbatches the search tries; None: up to the global batch.
    max_microbatches: int | None = None
    #: True, False, or "auto" (split optimizer state over replicas only where needed to fit).
    zero: bool | str = "auto"
    #: "none", "params", "params+optimizer" (every stage), or "auto" (where it is needed).
    offload: str = "none"
    #: Parameters an offloaded stage copies ahead of use (the runtime's prefetch depth).
    prefetch: int = 1
    #: Host memory per node for what offload keeps there; None: not checked.
    host_memory: int | None = None
    #: What the stages are costed at (recorded in the plan; the cost model is chosen for it).
    precision: str = "fp32"
    #: The pipeline schedule, or "auto": every one that applies, the fastest wins.
    schedule: str = "auto"

    @staticmethod
    def from_config(
        config: Config, *, devices: int, global_batch: int, optimizer: str, **tuning
    ) -> PlanOptions:
        """The planner's options for ``config`` on a cluster of ``devices`` at
        ``global_batch``; ``tuning`` sets the planner's own knobs (margin, blocks, host memory)."""
        offload = "auto" if config.offload == "auto" else Offload.of(config.offload).value
        if offload == "auto" and "offload" not in config.given and not tuning.get("host_memory"):
            # The default "auto" offloads only where the host's memory is known.
            offload = Offload.NONE.value
        return PlanOptions(
            devices=devices,
            global_batch=global_batch,
            optimizer=optimizer,
            device_memory=config.device_memory,  # type: ignore[arg-type]
            stages=config.stages,
            microbatches=config.microbatches,
            split_points=config.split_points,
            zero=config.zero,
            offload=offload,
            prefetch=config.prefetch,
            precision=config.precision,
            schedule=config.schedule,
            **tuning,
        )

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise AutopartError(f"devices must be at least 1, got {self.devices}")
        if self.global_batch < 1:
            raise AutopartError(
                f"the global batch size must be at least 1, got {self.global_batch}"
            )
        if self.optimizer not in OPTIMIZER_FACTORS:
            raise AutopartError(
                f"unknown optimizer {self.optimizer!r}; use one of {sorted(OPTIMIZER_FACTORS)}"
            )
        if self.offload != "auto":
            Offload.of(self.offload)
        check_zero(self.zero)
        if self.host_memory is not None and self.host_memory <= 0:
            raise AutopartError(f"host memory must be positive, got {self.host_memory}")
        check_prefetch(self.prefetch)
        if self.schedule not in SCHEDULES:
            raise AutopartError(
                f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}"
            )
        if not 0 <= self.memory_margin < 1:
            raise AutopartError(f"memory margin must be in [0, 1), got {self.memory_margin}")
        if self.stages is not None and not 1 <= self.stages <= self.devices:
            raise AutopartError(f"stages must be between 1 and {self.devices}, got {self.stages}")
        if self.microbatches is not None and not 1 <= self.microbatches <= self.global_batch:
            raise AutopartError(
                f"microbatches must be between 1 and the global batch ({self.global_batch}), "
                f"got {self.microbatches}"
            )

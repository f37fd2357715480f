"""The plan: plain data that says which ranks run which part of the model.

A plan is the planner's only output and the runtime's only input about partitioning, so it holds
everything the runtime needs (node names per stage, ranks, microbatches, recomputation) plus the
predictions a user wants to read.  It is saved as indented JSON and carries the fingerprint of the
graph it was made for: loading it for another model fails with a clear error instead of silently
running a wrong partition.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autopart.errors import AutopartError

PLAN_FORMAT_VERSION = 1

#: Where a stage keeps its parameters (and optimizer state): on the device, or in host memory.
OFFLOAD_MODES = ("none", "params", "params+optimizer")


def offload_option(value: bool | str | None) -> str:
    """The canonical name of an ``offload=`` argument: ``True`` offloads parameters and
    optimizer state, ``"auto"`` lets the planner offload only the stages that need it."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "params+optimizer"
    if value in OFFLOAD_MODES or value == "auto":
        return value
    raise AutopartError(
        f"unknown offload {value!r}; use False, True, 'params', 'params+optimizer' or 'auto'"
    )


def check_zero_option(value: bool | str) -> None:
    """``zero=`` is True, False, or ``"auto"`` (the planner splits only where it must)."""
    if value not in (True, False, "auto"):
        raise AutopartError(f"unknown zero {value!r}; use True, False or 'auto'")


class PlanError(AutopartError):
    """A plan file that is corrupt, from another version, or made for another model."""


@dataclass
class StagePlan:
    """One pipeline stage and the ranks that run its replicas."""

    index: int
    ranks: list[int]
    nodes: list[str]
    module_paths: list[str]
    params: list[str]
    memory_bytes: int
    forward_seconds: float
    backward_seconds: float
    recompute: bool
    microbatch_rows: int
    allreduce_seconds: float = 0.0
    offload: str = "none"
    #: Whether the replicas split the optimizer state and gradients (ZeRO).
    zero: bool = False
    #: Predicted host memory per rank that offload uses (0 without offload).
    host_bytes: int = 0

    @property
    def replicas(self) -> int:
        return len(self.ranks)


@dataclass
class Plan:
    """A complete partition of one model over ``devices`` ranks."""

    fingerprint: str
    global_batch_size: int
    microbatches: int
    devices: int
    device: dict[str, Any]
    optimizer: str
    memory_capacity_bytes: int
    stages: list[StagePlan]
    step_seconds: float
    samples_per_second: float
    cost_source: str = "analytic"
    version: int = PLAN_FORMAT_VERSION
    notes: list[str] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_of_rank(self, rank: int) -> StagePlan:
        for stage in self.stages:
            if rank in stage.ranks:
                return stage
        raise PlanError(f"rank {rank} is not in the plan (made for {self.devices} devices)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        version = data.get("version")
        if version != PLAN_FORMAT_VERSION:
            raise PlanError(
                f"plan format version {version!r} is not supported (expected "
                f"{PLAN_FORMAT_VERSION}); re-run `autopart plan` to make a new one"
            )
        try:
            stages = [StagePlan(**s) for s in data["stages"]]
            plan = cls(**{**data, "stages": stages})
        except (KeyError, TypeError) as err:
            raise PlanError(f"plan is missing or has unexpected fields: {err}") from err
        plan.check_consistent()
        return plan

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise PlanError(f"cannot read plan {path}: {err.strerror}") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan {path} is not valid JSON ({err}); it may be corrupt") from err
        return cls.from_dict(data)

    def check_consistent(self) -> None:
        """Reject plans whose ranks do not cover 0..devices-1 exactly once."""
        ranks = sorted(r for s in self.stages for r in s.ranks)
        if ranks != list(range(self.devices)):
            raise PlanError(
                f"plan ranks {ranks} do not cover 0..{self.devices - 1} exactly once; "
                "the file is corrupt or was edited by hand"
            )
        if self.microbatches < 1 or self.global_batch_size < 1:
            raise PlanError("plan has a non-positive batch size or microbatch count")
        for stage in self.stages:
            if stage.offload not in OFFLOAD_MODES:
                raise PlanError(
                    f"stage {stage.index} has offload {stage.offload!r}, not one of "
                    f"{', '.join(OFFLOAD_MODES)}; the file is corrupt or was edited by hand"
                )

    def validate_for(self, fingerprint: str, world_size: int | None = None) -> None:
        """Fail unless this plan was made for the graph with ``fingerprint`` (and world size)."""
        if fingerprint != self.fingerprint:
            raise PlanError(
                "plan was made for a different model (graph fingerprint "
                f"{self.fingerprint[:12]}…, this model is {fingerprint[:12]}…); "
                "re-plan, or pass the plan that belongs to this model"
            )
        if world_size is not None and world_size != self.devices:
            raise PlanError(
                f"plan was made for {self.devices} devices but {world_size} ranks are running; "
                "re-plan for this world size"
            )

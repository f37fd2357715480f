"""The plan: plain data that says which ranks run which part of the model.

A plan is the planner's only output and the runtime's only input about partitioning, so it holds
everything the runtime needs (node names per stage, ranks, microbatches, recomputation) plus the
predictions a user wants to read.  It is saved as indented JSON and carries the fingerprint of the
graph it was made for: loading it for another model fails with a clear error instead of silently
running a wrong partition.  Since a saved plan can be edited by hand, `Plan.validate_for` also
checks its structure against the graph (every op placed, every parameter held) before it runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autopart.config import Offload
from autopart.errors import AutopartError
from autopart.ir import Graph, NodeKind
from autopart.schedules import SCHEDULES

PLAN_FORMAT_VERSION = 1

#: What every "this plan does not fit the graph" error tells the user to do.
_REPLAN = "the plan is corrupt or was edited by hand; re-plan to make a new one"


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
    offload: Offload = Offload.NONE
    #: Whether the replicas split the optimizer state and gradients (ZeRO).
    zero: bool = False
    #: Predicted host memory per rank that offload uses (0 without offload).
    host_bytes: int = 0
    #: Parameters an offloaded stage copies ahead of use, as costed (0 where nothing is
    #: offloaded; 1, the default depth, in plans saved before this field).
    prefetch: int = 1
    #: Predicted optimizer step over state kept in host memory (0 where it is on the device).
    host_step_seconds: float = 0.0

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
    #: "fp32", or "bf16" / "fp16" (autocast, fp32 masters): what the stages were costed at.
    precision: str = "fp32"
    #: The pipeline schedule the step time was costed for.
    schedule: str = "gpipe"
    #: Why the planner did not consider every schedule ("" when it did).
    schedule_note: str = ""

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
        """Reject plans whose stages are out of order or whose ranks do not cover 0..devices-1
        exactly once: what can be checked without the model's graph."""
        for position, stage in enumerate(self.stages):
            if stage.index != position:
                raise PlanError(
                    f"the plan's stage {position} says it is stage {stage.index}; stages must be "
                    f"numbered 0..{self.num_stages - 1} in pipeline order; {_REPLAN}"
                )
            if not stage.ranks:
                raise PlanError(f"stage {stage.index} has no ranks to run it; {_REPLAN}")
        ranks = sorted(r for s in self.stages for r in s.ranks)
        if ranks != list(range(self.devices)):
            raise PlanError(
                f"plan ranks {ranks} do not cover 0..{self.devices - 1} exactly once; "
                "the file is corrupt or was edited by hand"
            )
        if self.microbatches < 1 or self.global_batch_size < 1:
            raise PlanError("plan has a non-positive batch size or microbatch count")
        for stage in self.stages:
            if stage.offload not in [m.value for m in Offload]:
                raise PlanError(
                    f"stage {stage.index} has offload {stage.offload!r}, not one of "
                    f"{', '.join(m.value for m in Offload)}; the file is corrupt or was edited "
                    "by hand"
                )
            stage.offload = Offload(stage.offload)
            if stage.prefetch < 0:
                raise PlanError(f"stage {stage.index} has a negative prefetch; {_REPLAN}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise PlanError(f"plan precision {self.precision!r} is unknown; {_REPLAN}")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"plan schedule {self.schedule!r} is unknown; {_REPLAN}")

    def validate_for(
        self, graph: Graph, world_size: int | None = None, *, idle_stages: bool = False
    ) -> None:
        """Fail, naming the first inconsistency, unless this plan can run ``graph`` on
        ``world_size`` ranks.

        The runtime trusts the plan: it builds each stage from the stage's node list and trains
        the parameters in its ``params`` list, so a hand-edited list would fail deep in the
        runtime (an op no stage computes) or, worse, silently leave a parameter untrained.
        These are the guarantees the planner gives, checked in time linear in graph and plan.
        ``idle_stages`` accepts stages without ops: a graph placed on another graph's plan
        (a later call signature) may leave one idle.
        """
        if graph.fingerprint != self.fingerprint:
            raise PlanError(
                "plan was made for a different model (graph fingerprint "
                f"{self.fingerprint[:12]}…, this model is {graph.fingerprint[:12]}…); "
                "re-plan, or pass the plan that belongs to this model"
            )
        if world_size is not None and world_size != self.devices:
            raise PlanError(
                f"plan was made for {self.devices} devices but {world_size} ranks are running; "
                "re-plan for this world size"
            )
        self.check_consistent()
        _check_rows(self)
        kinds = {node.name: node.kind for node in graph.nodes}
        owner = _place_batch_ops(self, graph, kinds, idle_stages)
        _check_inputs(self, graph, kinds, owner)
        _check_params(self, graph)


def _check_rows(plan: Plan) -> None:
    """Each replica gets rows of every microbatch, as many as the planner recorded."""
    batch, count = plan.global_batch_size, plan.microbatches
    per_microbatch = -(-batch // count)
    for stage in plan.stages:
        if stage.replicas * count > batch:
            raise PlanError(
                f"stage {stage.index} has {stage.replicas} replicas, so {count} microbatches "
                f"need a global batch of at least {stage.replicas * count}, but the plan is for "
                f"{batch}; {_REPLAN}"
            )
        rows = -(-per_microbatch // stage.replicas)
        if stage.microbatch_rows != rows:
            raise PlanError(
                f"stage {stage.index} has {stage.microbatch_rows} rows per microbatch, but a "
                f"global batch of {batch} in {count} microbatches over {stage.replicas} "
                f"replicas gives {rows}; {_REPLAN}"
            )


def _place_batch_ops(
    plan: Plan, graph: Graph, kinds: dict[str, NodeKind], idle_stages: bool
) -> dict[str, int]:
    """The stage of every batch op, after checking each is in exactly one stage and every
    stage has one; parameter-only ops may repeat across stages, since each stage computes
    the ones it reads."""
    owner: dict[str, int] = {}
    for stage in plan.stages:
        listed: set[str] = set()
        for name in stage.nodes:
            kind = kinds.get(name)
            if kind is None:
                raise PlanError(
                    f"stage {stage.index} lists op {name!r}, which this model's graph does not "
                    f"have; {_REPLAN}"
                )
            if name in listed:
                raise PlanError(f"stage {stage.index} lists op {name!r} twice; {_REPLAN}")
            listed.add(name)
            if kind in (NodeKind.INPUT, NodeKind.OUTPUT):
                raise PlanError(
                    f"stage {stage.index} lists {name!r}, the model's {kind.value}, which no "
                    f"stage computes; {_REPLAN}"
                )
            if kind is NodeKind.BATCH:
                if name in owner:
                    raise PlanError(
                        f"op {name!r} is in stages {owner[name]} and {stage.index}, but each "
                        f"batch op runs in exactly one stage; {_REPLAN}"
                    )
                owner[name] = stage.index
    for node in graph.nodes:
        if node.kind is NodeKind.BATCH and node.name not in owner:
            raise PlanError(
                f"op {node.name!r} is in no stage, so nothing would compute it; {_REPLAN}"
            )
    busy = set(owner.values())
    for stage in plan.stages:
        if stage.index not in busy and not idle_stages:
            raise PlanError(f"stage {stage.index} computes no batch op; {_REPLAN}")
    return owner


def _check_inputs(
    plan: Plan, graph: Graph, kinds: dict[str, NodeKind], owner: dict[str, int]
) -> None:
    """What a stage reads but does not compute must come from an earlier stage or the caller:
    parameter-only values are never sent (each stage computes its own), and the schedule only
    waits on earlier stages, so a value from a later one would hang the pipeline."""
    for stage in plan.stages:
        members = set(stage.nodes)
        for name in stage.nodes:
            for src in graph.node(name).inputs:
                if src in members:
                    continue
                if kinds[src] is NodeKind.PARAM_ONLY:
                    raise PlanError(
                        f"stage {stage.index} needs parameter-only value {src!r} (read by "
                        f"{name!r}) but does not compute it; {_REPLAN}"
                    )
                if owner.get(src, stage.index) > stage.index:
                    raise PlanError(
                        f"stage {stage.index} reads {src!r} (for {name!r}) from the later stage "
                        f"{owner[src]}, but values only flow to later stages; {_REPLAN}"
                    )


def _check_params(plan: Plan, graph: Graph) -> None:
    """A stage holds exactly the parameters and buffers its ops read.

    The runtime sums and steps a parameter on the ranks whose stages list it: a missing one
    would still be read but never trained there, an extra one would join sums and steps of a
    gradient its stage never computes.  With every op placed, every parameter an op reads is
    then held; one that no op reads (an unused layer) is held by no stage, as the planner
    leaves it, and has no gradient to lose."""
    for stage in plan.stages:
        held: set[str] = set()
        for name in stage.params:
            if name in held:
                raise PlanError(f"stage {stage.index} lists parameter {name!r} twice; {_REPLAN}")
            held.add(name)
        read = {p for name in stage.nodes for p in graph.node(name).params}
        if missing := sorted(read - held):
            raise PlanError(
                f"stage {stage.index} does not hold parameter {missing[0]!r}{_more(missing)}, "
                f"which its ops read, so it would not be trained; {_REPLAN}"
            )
        if extra := sorted(held - read):
            known = extra[0] in graph.params
            why = "which none of its ops read" if known else "which this model does not have"
            raise PlanError(
                f"stage {stage.index} holds parameter {extra[0]!r}{_more(extra)}, {why}; {_REPLAN}"
            )


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""

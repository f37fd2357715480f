"""The planner: graph + cost model + cluster -> ``Plan``.

Three phases, as in RaNNC: atomic components, block coarsening, then the stage DP over blocks x
devices.  The DP minimizes the simulated GPipe step time under the per-device memory constraint;
``split_points`` replaces the coarsening with the user's cuts and lets the same DP choose replicas
and microbatches, so a manual plan is costed by the same model as an automatic one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from autopart.config import AUTOCAST_DTYPES, Offload
from autopart.cost import CostModel
from autopart.cost.units import format_bytes
from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.ir.loss import find_loss
from autopart.plan.atomic import Component, atomic_components
from autopart.plan.blocks import Block, coarsen
from autopart.plan.infeasible import infeasible_message
from autopart.plan.memory import (
    HOST_CAST_TRAFFIC,
    HOST_STEP_TRAFFIC,
    OPTIMIZER_FACTORS,
    MemoryModel,
)
from autopart.plan.options import PlanOptions
from autopart.plan.plan import Plan, StagePlan
from autopart.plan.stage_costs import StageCoster
from autopart.plan.stage_dp import Solution, search
from autopart.plan.traffic import RangeTraffic, cut_bytes
from autopart.schedules import in_flight

log = logging.getLogger(__name__)

#: How many times partition() doubles target_blocks when no plan fits the automatic blocks.
MAX_REFINEMENTS = 2


class InfeasiblePlanError(AutopartError):
    """No partition of the model fits the devices' memory."""


@dataclass(frozen=True)
class Partition:
    """The planner's intermediate products, kept for tests and reports."""

    components: list[Component]
    blocks: list[Block]
    coster: StageCoster
    solution: Solution
    #: Why the search did not try every schedule ("" when it did).
    schedule_note: str = ""


def make_plan(graph: Graph, cost_model: CostModel, options: PlanOptions) -> Plan:
    """Partition ``graph`` over ``options.devices`` devices; raise if nothing fits."""
    plan = plan_from_partition(graph, cost_model, options, partition(graph, cost_model, options))
    log.info("planned %d stage(s) x %d microbatch(es)", plan.num_stages, plan.microbatches)
    return plan


def prepare(
    graph: Graph,
    cost_model: CostModel,
    options: PlanOptions,
    blocks: Sequence[Block] | None = None,
) -> tuple[list[Component], list[Block], StageCoster]:
    """Components, blocks (automatic, manual from ``split_points``, or given) and their coster."""
    capacity = (options.device_memory or cost_model.device.memory_bytes) * (
        1 - options.memory_margin
    )
    memory = MemoryModel(OPTIMIZER_FACTORS[options.optimizer], prefetch=options.prefetch)
    components = atomic_components(graph)
    if blocks is None and options.split_points:
        blocks = manual_blocks(graph, components, options.split_points)
    elif blocks is None:
        unit_of = {c.anchor: i for i, c in enumerate(components)}
        cuts = cut_bytes(graph, unit_of, len(components))
        blocks = _auto_blocks(graph, components, cuts, cost_model, memory, options, capacity)
    blocks = list(blocks)
    block_nodes = [_nodes_of(graph, components[b.start : b.end]) for b in blocks]
    block_of = {c.anchor: b.index for b in blocks for c in components[b.start : b.end]}
    coster = StageCoster(
        graph,
        block_nodes,
        RangeTraffic(graph, block_of, len(blocks)),
        cost_model,
        memory,
        capacity_bytes=capacity,
        global_batch=options.global_batch,
        devices=options.devices,
        replicas=np.arange(1, options.devices + 1),
        offload=options.offload,
        zero=options.zero,
        autocast=str(dtype) if (dtype := AUTOCAST_DTYPES[options.precision]) else None,
        host_step_traffic=HOST_STEP_TRAFFIC[options.optimizer]
        + (HOST_CAST_TRAFFIC if dtype else 0),
    )
    return components, blocks, coster


def partition(graph: Graph, cost_model: CostModel, options: PlanOptions) -> Partition:
    """Search the automatic (or manual) blocks; refine automatic ones if nothing fits.

    Blocks are never split by the search, so blocks that are each too big for one stage (state
    near the coarsening's memory cap plus their activations) can make a feasible model look
    infeasible.  Before giving up, the search retries on finer blocks: ``target_blocks``
    doubled, up to ``MAX_REFINEMENTS`` times, and then blocks free to end at any op
    (``free_cuts``: inside an MLP, say), each only while it yields more blocks.
    """
    part, blocks, coster = _partition_once(graph, cost_model, options)
    finer = [
        replace(options, target_blocks=options.target_blocks << k)
        for k in range(1, 1 + MAX_REFINEMENTS)
    ]
    attempts = [] if options.split_points else [*finer, replace(finer[-1], free_cuts=True)]
    for tried in attempts:
        if part is not None:
            break
        log.info(
            "no plan on %d blocks; retrying with target_blocks=%d%s",
            len(blocks),
            tried.target_blocks,
            ", cuts anywhere" if tried.free_cuts else "",
        )
        found, found_blocks, found_coster = _partition_once(graph, cost_model, tried)
        if len(found_blocks) > len(blocks):
            part, blocks, coster = found, found_blocks, found_coster
    if part is None:
        raise InfeasiblePlanError(
            infeasible_message(graph, blocks, coster, options, microbatch_options(options))
        )
    return part


def _partition_once(
    graph: Graph, cost_model: CostModel, options: PlanOptions
) -> tuple[Partition | None, list[Block], StageCoster]:
    components, blocks, coster = prepare(graph, cost_model, options)
    stages = len(blocks) if options.split_points else options.stages
    if stages is not None and stages > min(len(blocks), options.devices):
        raise AutopartError(
            f"cannot make {stages} stages from {len(blocks)} blocks on {options.devices} devices"
        )
    mb_options = microbatch_options(options)
    log.info("stage DP: %d blocks, %d devices, M in %s", len(blocks), options.devices, mb_options)
    schedules, note = schedules_for(graph, options.schedule)
    solution = search(
        len(blocks),
        options.devices,
        coster,
        mb_options,
        stages=stages,
        schedules=schedules,
    )
    if solution is None:
        return None, blocks, coster
    return Partition(components, blocks, coster, solution, note), blocks, coster


def schedules_for(graph: Graph, schedule: str) -> tuple[tuple[str, ...], str]:
    """The schedules the search tries for ``schedule``, and why 1F1B is not among them
    ("" when it is).  1F1B needs the model's own loss (`autopart.ir.loss`)."""
    if schedule == "gpipe":
        return ("gpipe",), "gpipe was asked for"
    found = find_loss(graph)
    if isinstance(found, str):
        if schedule == "1f1b":
            raise AutopartError(
                f"schedule '1f1b' needs the model to compute its loss, and {found}; or use "
                "schedule='gpipe'"
            )
        return ("gpipe",), f"1f1b does not apply: {found}"
    return (("1f1b",), "") if schedule == "1f1b" else (("gpipe", "1f1b"), "")


def plan_from_partition(
    graph: Graph, cost_model: CostModel, options: PlanOptions, part: Partition
) -> Plan:
    sol = part.solution
    stages = []
    next_rank = 0
    for index, choice in enumerate(sol.stages):
        mode = part.coster.modes[choice.mode]
        nodes = _dedupe(n for b in part.coster.block_names[choice.start : choice.end] for n in b)
        rows = int(
            part.coster.rows(sol.microbatches)[list(part.coster.replicas).index(choice.replicas)]
        )
        fwd, bwd = part.coster.seconds(choice.start, choice.end, rows)
        footprint = part.coster.footprint(choice.start, choice.end)
        # The search charged every stage the most microbatches any stage holds; record what
        # this one holds under the schedule.
        held = in_flight(sol.schedule, len(sol.stages), sol.microbatches)[index]
        host_step = (
            part.coster.host_step_seconds(footprint)
            if mode.offload == Offload.PARAMS_OPTIMIZER
            else 0.0
        )
        memory = part.coster.memory.peak_bytes(
            footprint,
            np.array([rows]),
            sol.microbatches,
            np.array([choice.replicas]),
            mode.recompute,
            offload=mode.offload,
            zero=mode.zero,
            in_flight=held,
        )
        stages.append(
            StagePlan(
                index=index,
                ranks=list(range(next_rank, next_rank + choice.replicas)),
                nodes=nodes,
                module_paths=_dedupe(graph.node(n).module_path for n in nodes),
                params=sorted(part.coster.stage_params(choice.start, choice.end)),
                memory_bytes=int(memory[0]),
                forward_seconds=fwd,
                backward_seconds=bwd,
                recompute=mode.recompute,
                microbatch_rows=rows,
                allreduce_seconds=float(choice.allreduce_seconds) - host_step,
                host_step_seconds=host_step,
                offload=mode.offload,
                zero=mode.zero,
                prefetch=options.prefetch if mode.offload != Offload.NONE else 0,
                host_bytes=int(
                    part.coster.memory.host_bytes(
                        footprint,
                        choice.replicas,
                        mode.offload,
                        mode.zero,
                    )
                ),
            )
        )
        next_rank += choice.replicas
    _check_host_memory(stages, cost_model.device.devices_per_node, options)
    spec = cost_model.device
    return Plan(
        fingerprint=graph.fingerprint,
        global_batch_size=options.global_batch,
        microbatches=sol.microbatches,
        devices=options.devices,
        device=asdict(spec),
        optimizer=options.optimizer,
        memory_capacity_bytes=int(part.coster.capacity),
        stages=stages,
        step_seconds=sol.step_seconds,
        samples_per_second=options.global_batch / sol.step_seconds if sol.step_seconds else 0.0,
        cost_source=cost_model.source,
        precision=options.precision,
        schedule=sol.schedule,
        schedule_note=part.schedule_note,
    )


def _check_host_memory(stages: list[StagePlan], per_node: int, options: PlanOptions) -> None:
    """Offloaded state lives in the memory of the host, which a node's ranks share."""
    if options.host_memory is None:
        return
    usable = options.host_memory * (1 - options.memory_margin)
    nodes: dict[int, int] = {}
    for stage in stages:
        for rank in stage.ranks:
            nodes[rank // per_node] = nodes.get(rank // per_node, 0) + stage.host_bytes
    node, used = max(nodes.items(), key=lambda item: item[1])
    if used > usable:
        raise InfeasiblePlanError(
            f"the plan offloads {format_bytes(used)} to the host memory of node {node}, which "
            f"has {format_bytes(usable)} usable ({options.memory_margin:.0%} margin held back); "
            "use more devices, offload less (--offload params keeps optimizer state on the "
            "device), or --zero to split what is offloaded over replicas"
        )


def _auto_blocks(graph, components, cuts, cost_model, memory, options, capacity) -> list[Block]:
    ref_rows = max(1, options.global_batch // options.devices)
    seconds = [
        sum(cost_model.block_seconds([graph.node(n) for n in c.nodes], ref_rows))
        for c in components
    ]
    params = [frozenset(p for n in c.nodes for p in graph.node(n).params) for c in components]
    state = {
        name: spec.nbytes * _state_factor(spec, memory, offloaded=options.offload != "none")
        for name, spec in graph.params.items()
    }
    return coarsen(
        components,
        seconds,
        params,
        state,
        cuts,
        target_blocks=options.target_blocks,
        block_bytes_cap=capacity / 2,
        paths=None if options.free_cuts else [graph.node(c.anchor).module_path for c in components],
    )


def _state_factor(spec, memory: MemoryModel, offloaded: bool) -> float:
    """Device bytes per parameter byte between steps; offloaded parameters need none."""
    if spec.is_buffer:
        return 1.0
    if offloaded:
        return 0.0
    return 2.0 + memory.optimizer_factor if spec.requires_grad else 1.0


def manual_blocks(
    graph: Graph, components: Sequence[Component], split_points: Sequence[str]
) -> list[Block]:
    starts = [0]
    for path in split_points:
        prefix = path.rstrip(".")
        first = next(
            (
                i
                for i, c in enumerate(components)
                if (mp := graph.node(c.anchor).module_path) == prefix or mp.startswith(prefix + ".")
            ),
            None,
        )
        if first is None:
            known = _dedupe(graph.node(c.anchor).module_path for c in components)
            raise AutopartError(
                f"split point {path!r} matches no module with batch ops; "
                f"module paths include: {', '.join(p for p in known[:12] if p)}"
            )
        if first <= starts[-1]:
            raise AutopartError(
                f"split point {path!r} does not come after the previous one; list split "
                "points in the order the model runs them"
            )
        starts.append(first)
    ends = [*starts[1:], len(components)]
    return [
        Block(index=i, start=s, end=e) for i, (s, e) in enumerate(zip(starts, ends, strict=True))
    ]


def microbatch_options(options: PlanOptions) -> list[int]:
    """The microbatch counts the search tries: the powers of two and the divisors of the
    batch (even microbatches), up to ``max_microbatches`` (default: the batch itself, since a
    pipeline of ~100 stages needs more microbatches than stages)."""
    if options.microbatches is not None:
        return [options.microbatches]
    batch = options.global_batch
    limit = min(options.max_microbatches or batch, batch)
    powers = {2**k for k in range(int(math.log2(limit)) + 1)}
    divisors = {d for d in range(1, limit + 1) if batch % d == 0}
    return sorted(powers | divisors)


def _nodes_of(graph: Graph, components: Sequence[Component]) -> list[str]:
    names = {n for c in components for n in c.nodes}
    return sorted(names, key=graph.index)


def _dedupe(items) -> list:
    return list(dict.fromkeys(items))

"""Every rank ends up running the same plan: given, or made on rank 0 and broadcast.

A plan made here is costed on this job's own links (a short benchmark every rank joins) and,
where a stage may offload, the host link; rank 0 plans for the global batch and broadcasts the
JSON.  A given plan must agree with the keywords the user set explicitly, and every rank must
have been given the same one: a mismatch would hang in the first step, not fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autopart.config import AUTOCAST_DTYPES, Config, check_plan_agrees
from autopart.cost import (
    CostModel,
    DeviceSpec,
    MeasuredCostModel,
    analytic_cost_model,
    get_device_spec,
    local_device_spec,
)
from autopart.cost.bandwidth import remembered_links
from autopart.cost.probe import host_memory_bytes, measure_host_link, measure_memory_bandwidth
from autopart.cost.remembered import kept_in, machine_key, remembered
from autopart.device import device_name
from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.plan.plan import Plan
from autopart.plan.planner import PlanOptions, make_plan
from autopart.runtime.transport.distenv import job_group
from autopart.runtime.transport.routing import all_gather_ints

log = logging.getLogger(__name__)


def optimizer_kind(optimizer: torch.optim.Optimizer | None) -> str:
    """The planner's name for how much state ``optimizer`` keeps per parameter."""
    if optimizer is None:
        return "none"
    if isinstance(optimizer, torch.optim.SGD):
        momentum = max(g.get("momentum", 0.0) for g in optimizer.param_groups)
        return "sgd-momentum" if momentum else "sgd"
    return "adam"  # Adam, AdamW and most others keep two moments; plan for that much


def agree_on_plan(
    graph: Graph,
    config: Config,
    optimizer: torch.optim.Optimizer | None,
    local_batch: int,
    device: torch.device,
) -> Plan:
    """The plan every rank runs (a collective: all ranks call it)."""
    if config.plan is not None:
        plan = config.plan if isinstance(config.plan, Plan) else Plan.load(config.plan)
        source = "the given Plan" if isinstance(config.plan, Plan) else str(Path(config.plan))
        check_plan_agrees(plan, config, source)
        _check_same_plan(plan)
        return plan
    world = dist.get_world_size()
    global_batch = sum(size for (size,) in all_gather_ints([local_batch], device))
    spec = _measured_spec(device, config.device_memory, world)  # type: ignore[arg-type]
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = _make_plan(graph, config, optimizer, global_batch, spec, device).to_json()
        except AutopartError as err:
            box[0] = err
        except Exception as err:  # every rank waits on this broadcast: never leave them hanging
            box[0] = AutopartError(f"planning failed on rank 0: {type(err).__name__}: {err}")
    dist.broadcast_object_list(box, src=0, group=job_group())
    if isinstance(box[0], AutopartError):
        raise type(box[0])(str(box[0]))
    return Plan.from_dict(json.loads(box[0]))


def _make_plan(
    graph: Graph,
    config: Config,
    optimizer: torch.optim.Optimizer | None,
    global_batch: int,
    spec: DeviceSpec,
    device: torch.device,
) -> Plan:
    # On a CPU device the host's memory is the device's own: the default "auto" offloads
    # nothing there (asked for explicitly, it runs, as the tests of offload do).
    offloading = config.offload != "none" and (
        device.type == "cuda" or config.offload != "auto" or "offload" in config.given
    )
    if offloading:  # only the planning rank needs the host link's speed
        key = machine_key("host", device_name(device))
        link = remembered(
            key,
            lambda: {
                "bandwidth": measure_host_link(device),
                "host_memory": measure_memory_bandwidth(torch.device("cpu")),
            },
        )
        spec = dataclasses.replace(
            spec,
            host_link_bandwidth=link["bandwidth"],
            host_memory_bandwidth=link["host_memory"],
        )
    options = PlanOptions.from_config(
        config,
        devices=dist.get_world_size(),
        global_batch=global_batch,
        optimizer=optimizer_kind(optimizer),
        host_memory=host_memory_bytes() if offloading else None,
    )
    plan = make_plan(graph, _cost_model(graph, config, spec, device), options)
    measured = [
        what
        for what, used in (
            ("the CPU", device.type == "cpu"),
            ("the links between ranks", dist.get_world_size() > 1),
            ("the host link", offloading),
        )
        if used
    ]
    if measured:
        plan.notes.append(
            f"measured inputs ({', '.join(measured)}) were read from {kept_in()}, where the "
            "first launch on this machine kept them: delete it to measure again"
        )
    return plan


def _cost_model(graph: Graph, config: Config, spec: DeviceSpec, device: torch.device) -> CostModel:
    """Measured costs where asked, or by default on CUDA for a model with real values (the
    analytic model otherwise): RaNNC's plans are good because it profiles on the device."""
    module = graph.fx_module
    real = module is not None and not any(
        t.is_meta for t in itertools.chain(module.parameters(), module.buffers())
    )
    measured = config.cost == "measured" or (
        config.cost == "auto" and device.type == "cuda" and real
    )
    if not measured:
        return analytic_cost_model(graph, spec, AUTOCAST_DTYPES[config.precision])
    if not real:
        raise AutopartError(
            "cost='measured' runs the model's blocks, but this model has no values on this "
            "rank yet (it was built on the meta device); use cost='analytic' or 'auto'"
        )
    analytic = analytic_cost_model(graph, spec, AUTOCAST_DTYPES[config.precision])
    try:
        return MeasuredCostModel(
            graph, device, spec=spec, autocast=AUTOCAST_DTYPES[config.precision], fallback=analytic
        )
    except AutopartError as err:  # measuring is an optimization: planning goes on without it
        log.warning("%s; planning with analytic costs instead", err)
        return analytic


def _measured_spec(device: torch.device, memory: int | None, world: int) -> DeviceSpec:
    """The device's spec with this job's own links measured (a collective, all ranks)."""
    if device.type == "cuda":
        spec = local_device_spec(device)
        if memory is not None:
            spec = dataclasses.replace(spec, memory_bytes=memory)
    else:
        spec = get_device_spec("cpu", memory_bytes=memory)
    if world < 2:
        return spec
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    links = remembered_links(job_group(), local_world, sizes=(1 << 16, 1 << 20), iters=2)
    return links.apply(spec, cross_node=local_world < world)


def _check_same_plan(plan: Plan) -> None:
    """Every rank must run the same plan; a different one would hang, not fail."""
    world = dist.get_world_size()
    if world == 1:
        return
    digests: list[Any] = [None] * world
    dist.all_gather_object(
        digests, hashlib.sha256(plan.to_json().encode()).hexdigest(), group=job_group()
    )
    if len(set(digests)) > 1:
        raise AutopartError(
            f"the ranks were given different plans ({agreeing(digests)}); make the plan once "
            "and pass the same file to all"
        )


def agreeing(values: list) -> str:
    """Which ranks agree with which, from one value per rank: ``ranks 0,2 / 1 agree``."""
    groups: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    listed = " / ".join(",".join(map(str, ranks)) for ranks in sorted(groups.values()))
    return f"ranks {listed} agree among themselves"

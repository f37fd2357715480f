"""From a model to a plan: capture, cost, partition.

`plan_model` does all three, for the CLI.  `autopart.Module` captures on its own (it keeps the
graph to run it) and measures its links first, then calls `make_plan` with
`analytic_cost_model` (`autopart.runtime.plan_agreement`); each phase is still its own module
and can be driven separately.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from rich.console import Console

from autopart.capture import capture
from autopart.config import AUTOCAST_DTYPES
from autopart.cost import (
    CostModel,
    MeasuredCostModel,
    analytic_cost_model,
    get_device_spec,
)
from autopart.ir import Graph
from autopart.plan.plan import Plan
from autopart.plan.planner import PlanOptions, make_plan

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _phase(console: Console | None, text: str) -> Iterator[None]:
    if console is None:
        yield
        return
    with console.status(text):
        yield


def cost_model_for(
    graph: Graph,
    cost: str,
    device_type: str,
    device_memory: int | None,
    precision: str = "fp32",
) -> CostModel:
    spec = get_device_spec(device_type, memory_bytes=device_memory)
    if cost == "analytic":
        return analytic_cost_model(graph, spec, AUTOCAST_DTYPES[precision])
    if cost == "measured":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return MeasuredCostModel(graph, device, spec=spec)
    raise ValueError(f"unknown cost source {cost!r}; use 'analytic' or 'measured'")


def plan_model(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any] | None = None,
    *,
    options: PlanOptions,
    device_type: str = "h100",
    cost: str = "analytic",
    progress: Console | None = None,
) -> tuple[Graph, Plan]:
    """Capture ``model`` on its example inputs and plan it with ``options``."""
    with _phase(progress, "capturing the model graph…"):
        graph = capture(model, args, kwargs)
    log.info("captured %d nodes, %d parameters", len(graph.nodes), len(graph.params))
    with _phase(progress, f"costing ops ({cost})…"):
        cost_model = cost_model_for(
            graph, cost, device_type, options.device_memory, options.precision
        )
    with _phase(progress, "searching stages x replicas…"):
        plan = make_plan(graph, cost_model, options)
    return graph, plan

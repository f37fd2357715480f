"""`Plan.validate_for` against captured graphs: the planner's plans pass, hand edits do not.

A saved plan is trusted by the runtime, so each corruption here is one a hand edit could make;
the error must name what is wrong.  The valid plans of the whole zoo guard against rejecting
what the planner itself makes.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from functools import cache

import pytest
import torch
from torch import nn

from autopart.capture import capture
from autopart.cost import AnalyticCostModel, get_device_spec
from autopart.ir import Graph, NodeKind
from autopart.plan.plan import Plan, PlanError, StagePlan
from autopart.plan.planner import PlanOptions, make_plan
from handmade import linear_chain
from zoo import ZOO

DEVICES = 3
BATCH = 12


@cache
def _graph(name: str) -> Graph:
    return capture(*ZOO[name]())


def _plan(graph: Graph, stages: int) -> Plan:
    cost = AnalyticCostModel(get_device_spec("h100"))
    return make_plan(graph, cost, PlanOptions(devices=DEVICES, global_batch=BATCH, stages=stages))


def _batch_ops(graph: Graph, stage: StagePlan) -> list[str]:
    return [n for n in stage.nodes if graph.node(n).kind is NodeKind.BATCH]


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_planner_plans_are_valid(name, stages):
    graph = _graph(name)
    plan = _plan(graph, stages)
    plan.validate_for(graph, DEVICES)
    # What a rank validates is the plan rank 0 sent it as JSON.
    Plan.from_dict(json.loads(plan.to_json())).validate_for(graph, DEVICES)


def test_tied_weight_read_by_two_stages_is_held_by_both():
    graph = _graph("tied")
    plan = _plan(graph, 3)
    holders = [s.index for s in plan.stages if "emb.weight" in s.params]
    assert holders == [0, 2]
    plan.validate_for(graph, DEVICES)


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.spare = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.used(x))


def test_a_parameter_no_op_reads_may_be_held_by_no_stage():
    graph = capture(_Unused(), (torch.randn(1, 8),))
    assert "spare.weight" in graph.params
    plan = _plan(graph, 2)
    assert all("spare.weight" not in s.params for s in plan.stages)
    plan.validate_for(graph, DEVICES)


def _drop_param(plan: Plan, graph: Graph) -> str:
    name = plan.stages[1].params.pop(0)
    return f"stage 1 does not hold parameter {name!r}"


def _unknown_param(plan: Plan, graph: Graph) -> str:
    plan.stages[0].params.append("ghost.weight")
    return "stage 0 holds parameter 'ghost.weight', which this model does not have"


def _foreign_param(plan: Plan, graph: Graph) -> str:
    name = plan.stages[2].params[0]
    plan.stages[0].params.append(name)
    return f"stage 0 holds parameter {name!r}, which none of its ops read"


def _param_twice(plan: Plan, graph: Graph) -> str:
    name = plan.stages[0].params[0]
    plan.stages[0].params.append(name)
    return f"stage 0 lists parameter {name!r} twice"


def _drop_batch_op(plan: Plan, graph: Graph) -> str:
    name = _batch_ops(graph, plan.stages[1])[0]
    plan.stages[1].nodes.remove(name)
    return f"op {name!r} is in no stage"


def _batch_op_in_two_stages(plan: Plan, graph: Graph) -> str:
    name = _batch_ops(graph, plan.stages[0])[0]
    plan.stages[1].nodes.append(name)
    return f"op {name!r} is in stages 0 and 1"


def _op_twice(plan: Plan, graph: Graph) -> str:
    name = plan.stages[2].nodes[0]
    plan.stages[2].nodes.append(name)
    return f"stage 2 lists op {name!r} twice"


def _unknown_op(plan: Plan, graph: Graph) -> str:
    plan.stages[2].nodes.append("ghost_op")
    return "stage 2 lists op 'ghost_op', which this model's graph does not have"


def _input_in_a_stage(plan: Plan, graph: Graph) -> str:
    name = graph.inputs[0]
    plan.stages[1].nodes.insert(0, name)
    return f"stage 1 lists {name!r}, the model's input"


def _empty_stage(plan: Plan, graph: Graph) -> str:
    last, before = plan.stages[2], plan.stages[1]
    before.nodes += last.nodes
    before.params = sorted({*before.params, *last.params})
    last.nodes, last.params = [], []
    return "stage 2 computes no batch op"


def _value_from_a_later_stage(plan: Plan, graph: Graph) -> str:
    moved = _batch_ops(graph, plan.stages[0])[-1]
    plan.stages[0].nodes.remove(moved)
    plan.stages[2].nodes.insert(0, moved)
    reader = next(n for n in plan.stages[1].nodes if moved in graph.node(n).inputs)
    return f"stage 1 reads {moved!r} (for {reader!r}) from the later stage 2"


def _wrong_fingerprint(plan: Plan, graph: Graph) -> str:
    plan.fingerprint = "0" * 64
    return "plan was made for a different model"


def _ranks_not_a_partition(plan: Plan, graph: Graph) -> str:
    plan.stages[1].ranks = [0]
    return "plan ranks [0, 0, 2] do not cover 0..2 exactly once"


def _stages_out_of_order(plan: Plan, graph: Graph) -> str:
    plan.stages[0].index, plan.stages[1].index = 1, 0
    return "the plan's stage 0 says it is stage 1"


def _no_ranks(plan: Plan, graph: Graph) -> str:
    plan.stages[1].ranks = []
    return "stage 1 has no ranks"


def _wrong_rows(plan: Plan, graph: Graph) -> str:
    plan.stages[0].microbatch_rows += 1
    rows = plan.stages[0].microbatch_rows
    return f"stage 0 has {rows} rows per microbatch, but a global batch of {BATCH}"


def _too_many_microbatches(plan: Plan, graph: Graph) -> str:
    plan.microbatches = BATCH + 1
    return f"{BATCH + 1} microbatches need a global batch of at least {BATCH + 1}"


def _no_microbatches(plan: Plan, graph: Graph) -> str:
    plan.microbatches = 0
    return "non-positive batch size or microbatch count"


def _unknown_offload(plan: Plan, graph: Graph) -> str:
    plan.stages[2].offload = "disk"
    return "stage 2 has offload 'disk'"


CORRUPTIONS: list[Callable[[Plan, Graph], str]] = [
    _drop_param,
    _unknown_param,
    _foreign_param,
    _param_twice,
    _drop_batch_op,
    _batch_op_in_two_stages,
    _op_twice,
    _unknown_op,
    _input_in_a_stage,
    _empty_stage,
    _value_from_a_later_stage,
    _wrong_fingerprint,
    _ranks_not_a_partition,
    _stages_out_of_order,
    _no_ranks,
    _wrong_rows,
    _too_many_microbatches,
    _no_microbatches,
    _unknown_offload,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_plan_is_rejected_by_name(corrupt):
    graph = _graph("mlp")
    plan = copy.deepcopy(_plan(graph, 3))
    expected = corrupt(plan, graph)
    with pytest.raises(PlanError) as info:
        plan.validate_for(graph, DEVICES)
    assert expected in str(info.value)


def test_missing_parameter_only_op_is_rejected():
    """Each stage computes the parameter-only values it reads; they are never sent."""
    graph = _graph("param_derived")
    plan = copy.deepcopy(_plan(graph, 3))
    gate = next(n for n in plan.stages[1].nodes if graph.node(n).kind is NodeKind.PARAM_ONLY)
    plan.stages[1].nodes.remove(gate)
    with pytest.raises(PlanError, match=f"stage 1 needs parameter-only value '{gate}'"):
        plan.validate_for(graph, DEVICES)


def test_wrong_world_size_is_rejected():
    graph = _graph("mlp")
    with pytest.raises(PlanError, match=f"made for {DEVICES} devices but 4 ranks"):
        _plan(graph, 2).validate_for(graph, 4)


def test_large_plans_validate_in_linear_time():
    """A quadratic check would take minutes here; a linear one well under a second."""
    depth = 100_000
    graph = linear_chain([2] * (depth + 1))
    half = depth // 2
    stages = [
        StagePlan(
            index=i,
            ranks=[i],
            nodes=[f"linear_{k}" for k in span],
            module_paths=[],
            params=sorted(f"layers.{k}.weight" for k in span),
            memory_bytes=1,
            forward_seconds=1.0,
            backward_seconds=1.0,
            recompute=False,
            microbatch_rows=4,
        )
        for i, span in enumerate([range(half), range(half, depth)])
    ]
    plan = Plan("handmade", 8, 2, 2, {}, "adam", 1, stages, 1.0, 8.0)
    began = time.perf_counter()
    plan.validate_for(graph, 2)
    assert time.perf_counter() - began < 2.0

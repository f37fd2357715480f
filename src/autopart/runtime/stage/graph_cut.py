"""Cut the captured graph into one executable module per stage.

A stage module is a ``torch.fx.GraphModule`` holding only the stage's nodes.  It takes the
values the stage receives (user inputs and values made by earlier stages) as placeholders, in
`StageIO.inputs` order, and returns a tuple of the values other stages or the caller need, in
`StageIO.outputs` order.  Its parameters are the user's own ``nn.Parameter`` objects (fx
copies attribute references from the captured module, which shares them with the model), so
the user's optimizer keeps working on them.

Export bakes the training flag into every mode-dependent op; ``train()``/``eval()`` therefore
switch graphs, not flags: each mode is a call signature with its own capture
(`autopart.runtime.pipeline.signatures`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from autopart.device import retarget
from autopart.errors import AutopartError
from autopart.ir import Graph, NodeKind
from autopart.plan.plan import Plan


class StageBuildError(AutopartError):
    """The plan cannot be turned into stage modules for this graph."""


@dataclass(frozen=True)
class StageIO:
    """What one stage receives and what it hands on, as graph value names."""

    index: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def stage_ios(graph: Graph, plan: Plan) -> list[StageIO]:
    """Inputs and outputs of every stage; each batch op belongs to exactly one stage."""
    owner: dict[str, int] = {}
    for stage in plan.stages:
        for name in stage.nodes:
            if graph.node(name).kind is NodeKind.BATCH:
                if name in owner:
                    raise StageBuildError(
                        f"op {name} is in stages {owner[name]} and {stage.index}; the plan is "
                        "corrupt, re-plan"
                    )
                owner[name] = stage.index
    delivered = graph.delivered()
    for name in delivered:
        kind = graph.node(name).kind
        if kind is NodeKind.PARAM_ONLY:
            raise StageBuildError(
                f"the model returns {name}, which is computed from parameters only; return it "
                "from a separate method, or make it depend on the input"
            )
    needed_later: dict[str, set[int]] = {}
    ios = []
    for stage in plan.stages:
        # A split scalar is combined by the caller from the rows its terms deliver.
        nodes = [name for name in stage.nodes if name not in graph.reductions]
        members = set(nodes)
        inputs = []
        for name in nodes:
            for src in graph.node(name).inputs:
                if src not in members and src not in inputs:
                    if graph.node(src).kind is NodeKind.PARAM_ONLY:
                        raise StageBuildError(
                            f"stage {stage.index} needs parameter-only value {src} but does not "
                            "compute it; the plan is corrupt, re-plan"
                        )
                    inputs.append(src)
                    needed_later.setdefault(src, set()).add(stage.index)
        ios.append((stage, nodes, inputs))
    graph_outputs = set(delivered)
    result = []
    for stage, nodes, inputs in ios:
        outputs = [
            name
            for name in nodes
            if owner.get(name) == stage.index
            and (name in graph_outputs or needed_later.get(name, set()) - {stage.index})
        ]
        result.append(StageIO(stage.index, tuple(nodes), tuple(inputs), tuple(outputs)))
    return result


def build_stage_module(graph: Graph, io: StageIO, device: torch.device) -> fx.GraphModule:
    """An executable module for one stage on ``device``, sharing parameters with the
    captured model.

    The captured graph names the CPU in the ops that make or move tensors (``arange``,
    ``to``, an autocast region's device type; `autopart.device`): they are pointed at
    ``device``, where the plain model would have run them."""
    source: fx.GraphModule = graph.fx_module
    if source is None:
        raise StageBuildError("the graph has no captured module to execute; capture it again")
    members = set(io.nodes)
    new = fx.Graph()
    env: dict[str, fx.Node] = {}
    produced = {node.name: node for node in source.graph.nodes}
    for name in io.inputs:
        env[name] = new.placeholder(name)
        if "val" in produced[name].meta:  # the example value, for probes of the stage's ops
            env[name].meta["val"] = produced[name].meta["val"]
    for node in source.graph.nodes:
        if node.name in members:
            for dep in node.all_input_nodes:
                if dep.op == "get_attr" and dep.name not in env:
                    env[dep.name] = new.node_copy(dep, lambda n: env[n.name])
            env[node.name] = new.node_copy(node, lambda n: env[n.name])
    new.output(tuple(env[name] for name in io.outputs))
    module = fx.GraphModule(source, new)
    retarget(module, device)
    return module


def state_updates(graph: Graph, plan: Plan) -> dict[int, tuple[str, ...]]:
    """Per stage, the in-place buffer updates that no op reads back, with the parameter-only
    values they need, in graph order.

    BatchNorm's ``num_batches_tracked += 1`` is such an op: it reads only a buffer, so it is a
    parameter-only op, and no other op needs it, so no stage would compute it.  Each goes to the
    stages that run the other ops of its module, and runs once per forward call there, which is
    what plain PyTorch counts (not once per microbatch).
    """
    consumed = {src for node in graph.nodes for src in node.inputs} | set(graph.outputs)
    updates = [
        node
        for node in graph.nodes
        if node.kind is NodeKind.PARAM_ONLY and node.name not in consumed and in_place(node.op)
    ]
    if not updates:
        return {}
    paths = [{graph.node(n).module_path for n in stage.nodes} for stage in plan.stages]
    closure = graph.param_only_closure()
    found: dict[int, set[str]] = {}
    for node in updates:
        stages = [s for s, held in enumerate(paths) if node.module_path in held] or [0]
        needed = closure[node.name]
        for index in stages:
            found.setdefault(index, set()).update(needed)
    return {
        index: tuple(n.name for n in graph.nodes if n.name in names)
        for index, names in found.items()
    }


def in_place(op: str) -> bool:
    """ATen spells in-place ops with a trailing underscore: ``aten.add_.Tensor``."""
    parts = op.split(".")
    return len(parts) >= 2 and parts[0] == "aten" and parts[1].endswith("_")

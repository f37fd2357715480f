"""Building the `Graph` IR from a trace: node kinds (batch, parameter-only, input), the
parameters each node reads, per-sample specs and stats from the two meta runs, and the graph's
fingerprint."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx
import torch.fx.config
import torch.utils._pytree as pytree

from autopart.capture.analysis import _Analysis, _leaf_signature
from autopart.capture.common import _module_path, _op_name, _storage_id
from autopart.capture.inputs import _Inputs, _is_tensor
from autopart.capture.meta_runner import _MetaRunner
from autopart.capture.params import _Params
from autopart.capture.scalar_outputs import reductions_of
from autopart.capture.tracing import _placeholders, _Trace
from autopart.ir import (
    Graph,
    Node,
    NodeKind,
    NodeStats,
    OutputLeaf,
    structural_fingerprint,
)


def _kinds(gm: torch.fx.GraphModule, user_inputs: Iterable[str]) -> dict[str, NodeKind]:
    """Dataflow kinds: anything reachable from a user input is batch work (shape arithmetic
    included); the rest reads only parameters, buffers and constants."""
    users = set(user_inputs)
    kinds: dict[str, NodeKind] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name in users:
                kinds[node.name] = NodeKind.INPUT
        elif node.op == "output":
            kinds[node.name] = NodeKind.OUTPUT
        elif node.op != "get_attr":
            fed = any(
                kinds.get(n.name) in (NodeKind.INPUT, NodeKind.BATCH) for n in node.all_input_nodes
            )
            kinds[node.name] = NodeKind.BATCH if fed else NodeKind.PARAM_ONLY
    return kinds


def _build_graph(model: torch.nn.Module, trace: _Trace, inputs: _Inputs) -> Graph:
    gm = trace.gm
    params = _Params.of(model)
    kinds = _kinds(gm, trace.sources)
    batch = trace.static_batch or max(inputs.batch, 2)
    runner = _MetaRunner(gm)
    next_runner = _MetaRunner(trace.gm_next) if trace.gm_next is not None else runner
    other = next_runner.run(trace.feed(*inputs.meta(batch + 1)))
    node_params, module_params = _read_params(gm, runner, params)
    analysis = _Analysis(
        kinds=kinds,
        other={name: _leaf_signature(value) for name, value in other.items()},
        batch=batch,
        other_batch=batch + 1,
        seen={_storage_id(t) for t in runner.twins.values()},
        module_params=module_params,
    )
    del other
    runner.run(trace.feed(*inputs.meta(batch)), analysis.visit, measure=True)

    nodes = [
        Node(
            name=node.name,
            op=_op_name(node, gm),
            kind=kinds[node.name],
            inputs=tuple(dict.fromkeys(n.name for n in node.all_input_nodes if n.name in kinds)),
            params=node_params.get(node.name, ()),
            outputs=analysis.specs.get(node.name, ()),
            module_path=_module_path(node),
            stats=analysis.stats.get(node.name, NodeStats()),
            container=_container(node, len(analysis.specs.get(node.name, ()))),
        )
        for node in gm.graph.nodes
        if node.name in kinds
    ]
    output = next(iter(gm.graph.find_nodes(op="output")))
    leaves, spec = _output_structure(gm, output)
    returned = [n.name for n in pytree.tree_leaves(output.args) if isinstance(n, torch.fx.Node)]
    outputs = [name for name in returned if name in kinds]
    user_inputs = [name for name in _placeholders(gm) if name in trace.sources]
    return Graph(
        nodes=nodes,
        params=params.specs,
        inputs=user_inputs,
        outputs=outputs,
        fingerprint=structural_fingerprint(nodes, params.specs, user_inputs, outputs),
        capture_method=trace.method,
        fx_module=gm,
        input_sources={name: trace.sources[name] for name in user_inputs},
        static_batch=trace.static_batch,
        reductions=reductions_of(gm),
        output_leaves=leaves,
        output_spec=spec,
    )


def _container(node: torch.fx.Node, leaves: int) -> str | None:
    """How a value's leaves are held: the runtime rebuilds the value from them."""
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return type(value).__name__
    return "tuple" if value is None and leaves > 1 else None


def _output_structure(
    gm: torch.fx.GraphModule, output: torch.fx.Node
) -> tuple[tuple[OutputLeaf, ...], pytree.TreeSpec]:
    """The output's leaves and the spec that rebuilds the model's own structure: the one
    capture restored on the module (a ModelOutput, a dict), else the output node's own."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        flat, spec = list(output.args[0]), info.out_spec
    else:
        flat, spec = pytree.tree_flatten(output.args[0])
    leaves = tuple(
        OutputLeaf(n.name) if isinstance(n, torch.fx.Node) else OutputLeaf(None, n) for n in flat
    )
    return leaves, spec


def _read_params(
    gm: torch.fx.GraphModule, runner: _MetaRunner, params: _Params
) -> tuple[dict[str, tuple[str, ...]], dict[str, list[torch.Tensor]]]:
    """Canonical names of the parameters, buffers and constants each node reads, and the meta
    twins an fx leaf-module call reads (it takes them implicitly, not as arguments)."""
    node_params: dict[str, tuple[str, ...]] = {}
    module_params: dict[str, list[torch.Tensor]] = {}
    for node in gm.graph.nodes:
        names = [
            params.resolve(n.target, runner.real_attrs[n.target])
            for n in node.all_input_nodes
            if n.op == "get_attr" and _is_tensor(runner.real_attrs[n.target])
        ]
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            real = dict(module.named_parameters(remove_duplicate=False))
            real.update(module.named_buffers(remove_duplicate=False))
            names += [params.resolve(f"{node.target}.{k}", v) for k, v in real.items()]
            twins = runner.module_state[node.target].values()
            module_params[node.name] = list({id(t): t for t in twins}.values())
        node_params[node.name] = tuple(dict.fromkeys(names))
    return node_params, module_params

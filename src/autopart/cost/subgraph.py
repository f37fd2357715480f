"""Cut a set of nodes out of a captured ``torch.fx.GraphModule`` and run it on its own.

Measured costs time a block of the model without the rest of it, so the block becomes a small
GraphModule whose placeholders are the values it reads from outside: user inputs, lifted
parameters and buffers (``torch.export``'s ``ExportedProgram.graph_module`` layout), activations
made by other blocks, and tensor attributes (``ExportedProgram.module()`` layout, or an fx trace).
Its output is the tuple of values that something outside the block uses.

Inputs are made fresh for every batch size from each outside node's ``meta["val"]`` (the fake
tensor or symbolic scalar that ``torch.export`` records), with the batch symbol set to the batch
and any other symbol to the example value it was captured with.  Tensor attributes are copied
with their real values (an index table or a mask stays valid); other inputs are random floats,
integer zeros (a valid index for any embedding or gather) and boolean ones (masks keep every
position, so no softmax sees a fully masked row).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx

from autopart.errors import AutopartError
from autopart.ir import TensorSpec

#: fx ops that do work; placeholders, attribute reads and the output only name values.
COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass
class Subgraph:
    """An executable block: ``module(*inputs)`` returns the tuple of values used outside it.

    ``sources`` are the nodes of the original graph whose values the placeholders take, in
    placeholder order.
    """

    module: torch.fx.GraphModule
    sources: list[torch.fx.Node]
    names: list[str]


def extract_subgraph(gm: torch.fx.GraphModule, names: Collection[str]) -> Subgraph:
    """The nodes of ``gm`` named ``names`` as a standalone GraphModule.

    Placeholders, attribute reads and the output among ``names`` are not work and are skipped:
    a block reads them as inputs.
    """
    by_name = {node.name: node for node in gm.graph.nodes}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise AutopartError(
            f"nodes {', '.join(unknown[:5])} are not in the captured fx module; the graph IR and "
            "graph.fx_module must come from the same capture"
        )
    wanted = {name for name in names if by_name[name].op in COMPUTE_OPS}
    ordered = [node for node in gm.graph.nodes if node.name in wanted]
    if not ordered:
        raise AutopartError(f"nodes {sorted(names)[:5]} contain no op to run")

    sources: list[torch.fx.Node] = []
    attributes: dict[str, Any] = {}
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in ordered:
        for source in node.all_input_nodes:
            if source in env or source.name in wanted:
                continue
            value = _fetch_attr(gm, source.target) if source.op == "get_attr" else None
            if source.op == "get_attr" and not isinstance(value, torch.Tensor):
                attributes[source.target] = copy.deepcopy(value)
                env[source] = graph.get_attr(source.target)
            else:
                env[source] = graph.placeholder(source.name)
                sources.append(source)
    for node in ordered:
        if node.op == "call_module":
            attributes[node.target] = copy.deepcopy(_fetch_attr(gm, node.target))
        env[node] = graph.node_copy(node, env.__getitem__)
    used_outside = [
        env[node] for node in ordered if any(user.name not in wanted for user in node.users)
    ]
    graph.output(tuple(used_outside))
    module = torch.fx.GraphModule(attributes, graph)
    return Subgraph(module=module, sources=sources, names=[node.name for node in ordered])


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def differentiable_nodes(gm: torch.fx.GraphModule) -> frozenset[str]:
    """Names of the nodes whose values autograd differentiates in training.

    A value is differentiable if it is floating point and depends on a parameter (a placeholder
    or attribute that requires grad).  Block inputs made for these nodes require grad, so the
    measured backward computes the gradients a real step sends to the previous stage.
    """
    result: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            needs = isinstance(value, torch.Tensor) and value.requires_grad
        elif node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            needs = isinstance(value, torch.Tensor) and value.requires_grad
        elif node.op in COMPUTE_OPS:
            needs = _is_floating(node.meta.get("val")) and any(
                source.name in result for source in node.all_input_nodes
            )
        else:
            needs = False
        if needs:
            result.add(node.name)
    return frozenset(result)


def _is_floating(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() or value.is_complex()
    if isinstance(value, (list, tuple)):
        return any(_is_floating(v) for v in value)
    return False


class InputMaker:
    """Concrete block inputs at a batch size, from the fake values capture recorded."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        batch_symbols: frozenset[sympy.Symbol],
        differentiable: frozenset[str],
        specs: Mapping[str, Sequence[TensorSpec]] | None = None,
    ) -> None:
        """``specs``: the IR's output specs by node, for nodes that passes after capture
        added without ``meta["val"]`` (the scalar-loss rewrite's)."""
        self._gm = gm
        self._batch_symbols = batch_symbols
        self._differentiable = differentiable
        self._specs = specs or {}

    def make(
        self, subgraph: Subgraph, batch: int, device: torch.device
    ) -> tuple[list[Any], list[torch.Tensor]]:
        """``(inputs, leaves)``: the placeholder values and the tensors among them needing grad."""
        inputs: list[Any] = []
        leaves: list[torch.Tensor] = []
        for source in subgraph.sources:
            grad = source.name in self._differentiable
            if source.op == "get_attr":
                real = _fetch_attr(self._gm, source.target)
                value = real.detach().to(device, copy=True)
            else:
                specs = self._specs.get(source.name, ())
                if "val" in source.meta:
                    value = self._materialize(source.name, source.meta["val"], batch, device)
                elif len(specs) == 1 and specs[0].dtype != "symint":
                    value = _from_spec(specs[0], batch, device)
                else:
                    raise AutopartError(
                        f"node {source.name!r} has no meta['val'] to make a block input from; "
                        "measured costs need a graph captured by torch.export"
                    )
            inputs.append(value)
            if grad:
                leaves.extend(_require_grad(value))
        return inputs, leaves

    def _materialize(self, name: str, fake: Any, batch: int, device: torch.device) -> Any:
        if isinstance(fake, torch.Tensor):
            shape = [self._concrete(name, size, batch) for size in fake.shape]
            if fake.is_floating_point() or fake.is_complex():
                return torch.randn(shape, dtype=fake.dtype, device=device)
            if fake.dtype is torch.bool:
                return torch.ones(shape, dtype=fake.dtype, device=device)
            return torch.zeros(shape, dtype=fake.dtype, device=device)
        if isinstance(fake, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self._concrete(name, fake, batch)
        if isinstance(fake, (list, tuple)):
            return type(fake)(self._materialize(name, v, batch, device) for v in fake)
        if fake is None or isinstance(fake, (int, float, bool)):
            return fake
        raise AutopartError(
            f"cannot make a block input for node {name!r} from a {type(fake).__name__}"
        )

    def _concrete(self, name: str, size: Any, batch: int) -> Any:
        """A symbolic size with the batch symbol set to ``batch``, others at their hint."""
        if not isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return size
        expr = size.node.expr
        shape_env = size.node.shape_env
        # newer torch renamed var_to_val (the example value of each backed symbol)
        if hasattr(shape_env, "backed_var_to_val"):
            hints = shape_env.backed_var_to_val
        else:
            hints = shape_env.var_to_val
        values = {}
        for symbol in expr.free_symbols:
            if symbol in self._batch_symbols:
                values[symbol] = batch
            elif symbol in hints:
                values[symbol] = hints[symbol]
            else:
                raise AutopartError(
                    f"node {name!r} has a data-dependent size ({expr}) that measured costs cannot "
                    "reproduce; use analytic costs for this model"
                )
        result = expr.xreplace(values)
        kind = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(size)]
        return kind(result)


def _from_spec(spec: TensorSpec, batch: int, device: torch.device) -> torch.Tensor:
    shape = list(spec.shape)
    if spec.batch_dim is not None:
        shape[spec.batch_dim] *= batch
    dtype = getattr(torch, spec.dtype.removeprefix("torch."))
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.ones(shape, dtype=dtype, device=device)


def _require_grad(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            return [value.requires_grad_()]
        return []
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _require_grad(v)]
    return []

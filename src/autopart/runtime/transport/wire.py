"""The dtype each value travels between stages in: the one its op produced.

Under autocast an op's output may be narrower than the captured graph says (a Linear's is
bf16 where the capture, run without autocast, recorded fp32).  Sending it widened would change
what the next stage computes: the op that reads it would run on fp32 where eager autocast runs
it on bf16, and the gradients would differ from DDP's.  So both ends of every message must
agree on the producing op's dtype before any message is posted.  They find it the same way on
every rank: by running the whole captured graph once under the precision's autocast on fake
tensors (`torch._subclasses.fake_tensor.FakeTensorMode`) of the rank's device type, which
computes nothing and allocates nothing but propagates dtypes exactly as autocast does.  A
graph that cannot run on fake tensors keeps its captured dtypes, with a note in the log: the
values stay exact, only wider.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from autopart.device import retarget
from autopart.ir import Graph, NodeKind
from autopart.runtime.transport import routing
from autopart.runtime.transport.routing import ValueShape

log = logging.getLogger(__name__)

__all__ = ["produced_dtypes", "wire_shapes"]

#: Rows the probe feeds: more than one, so that no batch dimension is squeezed away.
_ROWS = 2


def produced_dtypes(
    graph: Graph, device: torch.device, autocast: torch.dtype
) -> dict[str, tuple[torch.dtype | None, ...]]:
    """Each node's output dtypes (one per leaf, None for a non-tensor) under ``autocast`` on
    ``device``'s type; empty when the graph cannot be run on fake tensors."""
    source = graph.fx_module
    if source is None:
        return {}
    module = fx.GraphModule(source, _copy_graph(source.graph))
    retarget(module, device)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    found: dict[str, tuple[torch.dtype | None, ...]] = {}
    try:
        inputs = [_fake_input(graph, node, device, mode) for node in _placeholders(module)]
        with mode, torch.autocast(device.type, dtype=autocast):
            _Probe(module, device, mode, found).run(*inputs)
    except Exception as err:  # any op the fake run cannot do: the captured dtypes stand
        log.info("under autocast, values cross stages in their captured dtypes (%s)", err)
        return {}
    return found


class _Probe(fx.Interpreter):
    """Runs a graph on fake twins of its tensors, recording every node's output dtypes."""

    def __init__(self, module, device, mode, found) -> None:
        super().__init__(module)
        self.device, self.mode, self.found = device, mode, found

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        return _twin(value, self.device, self.mode) if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        leaves = pytree.tree_leaves(out)
        self.found[n.name] = tuple(v.dtype if isinstance(v, torch.Tensor) else None for v in leaves)
        return out


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    copied = fx.Graph()
    copied.graph_copy(graph, {})
    copied._codegen = graph._codegen
    return copied


def _placeholders(module: fx.GraphModule) -> list[fx.Node]:
    return list(module.graph.find_nodes(op="placeholder"))


def _twin(tensor: torch.Tensor, device: torch.device, mode: FakeTensorMode) -> torch.Tensor:
    with mode:
        fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
    return fake.requires_grad_(tensor.requires_grad)


def _fake_input(graph: Graph, node: fx.Node, device: torch.device, mode: FakeTensorMode) -> Any:
    """A fake batch of `_ROWS` rows for a user input, from its spec in the IR."""
    ir = graph.node(node.name)
    if ir.kind is not NodeKind.INPUT or len(ir.outputs) != 1:
        raise ValueError(f"input {node.name} has no single spec to stand in for")
    spec = ir.outputs[0]
    if spec.affine is not None:
        return routing.affine_value(spec, _ROWS)
    if routing.is_scalar(spec):  # a plain value: any of its type
        return {"float": 1.0, "symfloat": 1.0, "bool": True, "symbool": True}.get(spec.dtype, 1)
    shape = list(spec.shape)
    if spec.batch_dim is not None:
        shape[spec.batch_dim] *= _ROWS
    with mode:
        return torch.zeros(shape, dtype=routing.torch_dtype(spec.dtype), device=device)


def wire_shapes(
    shapes: dict[str, ValueShape],
    graph: Graph,
    device: torch.device,
    autocast: torch.dtype,
    delivered: list[str],
) -> dict[str, ValueShape]:
    """``shapes`` with each floating leaf that crosses stages in the dtype its op produces
    under ``autocast`` (`transport.wire`); what the caller gets back keeps the captured one."""
    produced = produced_dtypes(graph, device, autocast)
    result = {}
    for name, shape in shapes.items():
        dtypes = produced.get(name)
        if name in delivered or dtypes is None or len(dtypes) != len(shape.leaves):
            result[name] = shape
            continue
        leaves = tuple(
            dataclasses.replace(spec, dtype=str(dtype))
            if dtype is not None and dtype.is_floating_point and "float" in spec.dtype
            else spec
            for spec, dtype in zip(shape.leaves, dtypes, strict=True)
        )
        result[name] = dataclasses.replace(shape, leaves=leaves)
    return result

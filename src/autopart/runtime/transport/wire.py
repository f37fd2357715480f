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
import hashlib
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from autopart.device import retarget
from autopart.errors import AutopartError
from autopart.ir import Graph, NodeKind, TensorSpec
from autopart.runtime.transport import routing
from autopart.runtime.transport.distenv import job_group
from autopart.runtime.transport.routing import ValueShape

log = logging.getLogger(__name__)

__all__ = ["captured_dtype", "cast_for_wire", "produced_dtypes", "wire_shapes"]

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
        # Every tensor the graph reads, leaf modules' included, is a fake twin on the device
        # (this rank may hold other stages' on the host or on meta); no autocast cast cache,
        # so no fake weight copy outlives the run.
        probe = _Probe(module, found, device, mode)
        state = {
            f"module.{name}": _twin(tensor, device, mode)
            # Each tensor once: functional_call ties a shared one's other names to it.
            for name, tensor in (*module.named_parameters(), *module.named_buffers())
        }
        with mode, torch.autocast(device.type, dtype=autocast, cache_enabled=False):
            torch.func.functional_call(probe, state, tuple(inputs), strict=False)
    except Exception as err:  # any op the fake run cannot do: the captured dtypes stand
        log.info("under autocast, values cross stages in their captured dtypes (%s)", err)
        return {}
    return found


class _Probe(torch.nn.Module):
    """Runs a graph module node by node, recording every node's output dtypes."""

    def __init__(self, module: fx.GraphModule, found: dict, device, mode) -> None:
        super().__init__()
        self.module = module
        self.found, self.device, self.mode = found, device, mode

    def forward(self, *inputs: Any) -> Any:
        return _Recorder(self.module, self.found, self.device, self.mode).run(*inputs)


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, found: dict, device, mode) -> None:
        super().__init__(module)
        self.found, self.device, self.mode = found, device, mode

    def fetch_attr(self, target: str) -> Any:
        """Constants the capture kept as plain attributes are twinned too."""
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return _twin(value, self.device, self.mode)
        return value

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
    shapes: dict[str, ValueShape], graph: Graph, device: torch.device, autocast: torch.dtype
) -> dict[str, ValueShape]:
    """``shapes`` with each floating batch leaf in the dtype its op produces under
    ``autocast``.  Every rank must agree on them, or a buffer would not fit its message: any
    rank's probe failing, or ranks disagreeing, leaves the captured dtypes on every rank (a
    collective).  The caller widens what it hands back (`captured_dtype`)."""
    produced = produced_dtypes(graph, device, autocast)
    result = {}
    for name, shape in shapes.items():
        dtypes = produced.get(name)
        if dtypes is None or len(dtypes) != len(shape.leaves):
            result[name] = shape
            continue
        leaves = tuple(
            dataclasses.replace(spec, dtype=str(dtype))
            if dtype is not None and dtype.is_floating_point and _narrowable(spec)
            else spec
            for spec, dtype in zip(shape.leaves, dtypes, strict=True)
        )
        result[name] = dataclasses.replace(shape, leaves=leaves)
    table = repr(sorted((n, tuple(s.dtype for s in v.leaves)) for n, v in result.items()))
    digest = hashlib.sha256(table.encode()).hexdigest() if produced else ""
    if dist.get_world_size() > 1:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, digest, group=job_group())
        if len(set(every)) > 1 or "" in every:
            log.info("the ranks found different dtypes under autocast; values keep theirs")
            return shapes
    return result if digest else shapes


def captured_dtype(graph: Graph, name: str, leaf: int) -> torch.dtype:
    """The dtype the model gave value ``name``'s leaf at capture: what the caller gets."""
    return routing.torch_dtype(routing.value_shape(graph, name).leaves[leaf].dtype)


def cast_for_wire(tensor: torch.Tensor, spec: TensorSpec, name: str) -> torch.Tensor:
    """``tensor`` in its message's dtype: widened if need be, never narrowed (a value wider
    than the probe found means the probe was wrong, and narrowing it would lose bits)."""
    dtype = routing.torch_dtype(spec.dtype)
    floating = tensor.is_floating_point() and dtype.is_floating_point
    if floating and torch.finfo(tensor.dtype).bits > torch.finfo(dtype).bits:
        raise AutopartError(
            f"{name} is {tensor.dtype} here, wider than the {dtype} its readers expect "
            "under autocast; this is a bug in autopart, please report it (precision='fp32' "
            "avoids it)"
        )
    return tensor.to(dtype)


def _narrowable(spec: TensorSpec) -> bool:
    """Batch leaves only: a value without a batch dimension is all-reduced in its own dtype."""
    return "float" in spec.dtype and spec.is_batch and spec.affine is None

"""What each node holds per sample: the two meta runs (batch ``a`` and ``a + 1``) are compared
leaf by leaf to find each value's batch dimension, and the FLOPs, bytes accessed and bytes
autograd saves are recorded per node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.fx.config
import torch.utils._pytree as pytree

from autopart.capture.common import _SCALAR_DTYPES, _storage_id
from autopart.capture.inputs import _is_tensor
from autopart.capture.meta_runner import _Executed
from autopart.capture.row_layout import with_outer
from autopart.ir import (
    NodeKind,
    NodeStats,
    TensorSpec,
)


def _leaf_signature(value: Any) -> list[Any]:
    """What the second run must record of a value: tensor shapes and scalar values."""
    return [tuple(v.shape) if _is_tensor(v) else v for v in pytree.tree_leaves(value)]


def _spec(value: Any, other: Any, batch: int, other_batch: int) -> TensorSpec | None:
    """The per-sample spec of one leaf value, from its counterpart at another batch size.

    A dimension that differs between the runs carries the batch; per sample it holds its
    growth per added sample (``batch * seq`` flattened becomes ``seq``).  Scalars that differ
    are shape arithmetic on the batch: ``symint`` and the like."""
    if _is_tensor(value):
        shape = list(value.shape)
        batch_dim = None
        if isinstance(other, tuple) and len(other) == len(shape):
            for dim, (here, there) in enumerate(zip(shape, other, strict=True)):
                if here != there:
                    batch_dim = dim if batch_dim is None else batch_dim
                    shape[dim] = (there - here) // (other_batch - batch)
        return TensorSpec(tuple(shape), str(value.dtype), batch_dim)
    if type(value) in _SCALAR_DTYPES:
        varies = other is not None and other != value
        kind = _SCALAR_DTYPES[type(value)]
        if not varies:
            return TensorSpec((), kind)
        per_sample = (other - value) / (other_batch - batch)
        return TensorSpec((), f"sym{kind}", affine=(per_sample, value - per_sample * batch))
    return None


@dataclass
class _Analysis:
    """Per-node specs and stats, gathered while the graph runs at the capture batch.

    Each saved storage is counted once, at the first node that saves it, and parameters'
    storages never count.  A storage belongs to the batch when the value that first produced
    it does; one created inside an op (a dropout mask, softmax output) follows the op's kind.
    """

    kinds: dict[str, NodeKind]
    other: dict[str, Any]
    batch: int
    other_batch: int
    seen: set[int]  # storages already counted, starting with the parameters'
    module_params: dict[str, list[torch.Tensor]]
    specs: dict[str, tuple[TensorSpec, ...]] = field(default_factory=dict)
    stats: dict[str, NodeStats] = field(default_factory=dict)
    tensor_batch: dict[int, bool] = field(default_factory=dict)
    storage_batch: dict[int, bool] = field(default_factory=dict)

    def visit(
        self, node: torch.fx.Node, inputs: list[Any], value: Any, executed: _Executed | None
    ) -> None:
        if node.op == "get_attr":
            return
        leaves = pytree.tree_leaves(value)
        others = self.other.get(node.name)
        if others is None or len(others) != len(leaves):
            others = [None] * len(leaves)
        specs = []
        for leaf, other in zip(leaves, others, strict=True):
            spec = _spec(leaf, other, self.batch, self.other_batch)
            if spec is None:
                continue
            specs.append(spec)
            if _is_tensor(leaf):
                self.tensor_batch[id(leaf)] = spec.is_batch
                self.storage_batch.setdefault(_storage_id(leaf), spec.is_batch)
        self.specs[node.name] = tuple(with_outer(node, specs, leaves, self.specs))
        if executed is not None:
            self.stats[node.name] = self._stats(node, inputs, leaves, executed)

    def _stats(
        self, node: torch.fx.Node, inputs: list[Any], outputs: list[Any], executed: _Executed
    ) -> NodeStats:
        in_batch = self.kinds[node.name] == NodeKind.BATCH
        tensors = {id(t): t for t in inputs if _is_tensor(t)}
        params = self.module_params.get(node.name, [])
        grad_inputs = sum(t.requires_grad for t in (*tensors.values(), *params))
        tensors.update((id(t), t) for t in outputs if _is_tensor(t))
        accessed = [0, sum(_nbytes(t) for t in params)]  # [batch-scaled, fixed]
        for key, t in tensors.items():
            accessed[not self.tensor_batch.get(key, False)] += _nbytes(t)
        saved = [0, 0]
        for key, nbytes in executed.saved:
            if key not in self.seen:
                self.seen.add(key)
                saved[not self.storage_batch.get(key, in_batch)] += nbytes
        b = self.batch
        return NodeStats(
            flops_per_sample=executed.flops / b if in_batch else 0.0,
            flops_fixed=0.0 if in_batch else float(executed.flops),
            bytes_per_sample=accessed[0] / b,
            bytes_fixed=float(accessed[1]),
            saved_per_sample=saved[0] / b,
            saved_fixed=float(saved[1]),
            grad_inputs=grad_inputs,
        )


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

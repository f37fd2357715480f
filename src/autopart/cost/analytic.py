"""Roofline costs from the FLOPs and bytes capture recorded for every node.

Each op runs as fast as its slower resource allows, compute or memory, plus a fixed launch cost:

    forward  = max(flops / peak, bytes / memory_bandwidth) + kernel_latency
    backward = max(grad_inputs * flops / peak, 2 * bytes / memory_bandwidth)
               + grad_inputs * kernel_latency

with ``flops = flops_per_sample * batch + flops_fixed`` and bytes likewise.  Backward computes one
gradient per differentiable input, each about as expensive as the forward (a matmul's input and
weight gradients are one matmul each) and each its own kernel; it reads the saved inputs and the
output gradient and writes the input gradients, about twice the forward's traffic.  A node with
no gradient inputs has no backward.

Nodes that do no work (no FLOPs and no bytes: views, ``getitem``, shape arithmetic) launch no
kernel and cost nothing.  Parameter-only nodes do not depend on the batch, so only their fixed
part counts; input and output nodes are not ops and cost nothing.

The planner sums thousands of nodes for many batch sizes, so all of it is numpy over arrays built
once: `BlockTimer` turns any grouping of nodes (components, blocks) into prefix sums, after which
the time of any contiguous run of groups is two lookups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from autopart.cost.spec import DeviceSpec, dtype_name
from autopart.ir import Graph, Node, NodeKind

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NodeArrays:
    """The stats of a node sequence as parallel arrays, the input of every analytic sum."""

    flops_per_sample: np.ndarray
    flops_fixed: np.ndarray
    bytes_per_sample: np.ndarray
    bytes_fixed: np.ndarray
    grad_inputs: np.ndarray

    @classmethod
    def of(cls, nodes: Sequence[Node]) -> NodeArrays:
        columns = np.zeros((5, len(nodes)))
        for i, node in enumerate(nodes):
            if node.kind in (NodeKind.INPUT, NodeKind.OUTPUT):
                continue
            s = node.stats
            batch_scaled = node.kind is not NodeKind.PARAM_ONLY
            columns[:, i] = (
                s.flops_per_sample if batch_scaled else 0.0,
                s.flops_fixed,
                s.bytes_per_sample if batch_scaled else 0.0,
                s.bytes_fixed,
                s.grad_inputs,
            )
        return cls(*columns)


def compute_dtype(graph: Graph) -> str:
    """The dtype most parameter bytes are in: the one matmuls run at, for the roofline."""
    totals: dict[str, int] = {}
    for spec in graph.params.values():
        if "float" in spec.dtype and not spec.is_buffer:
            totals[spec.dtype] = totals.get(spec.dtype, 0) + spec.nbytes
    return max(totals, key=lambda dtype: totals[dtype]) if totals else "torch.float32"


def analytic_cost_model(
    graph: Graph, spec: DeviceSpec, autocast: torch.dtype | None = None
) -> AnalyticCostModel:
    """The roofline model of ``spec``, at the dtype matmuls run in: ``autocast``'s, or the
    dtype of most parameter bytes."""
    return AnalyticCostModel(spec, dtype=str(autocast) if autocast else compute_dtype(graph))


class AnalyticCostModel:
    """Roofline costs of nodes on ``device`` with matmuls in ``dtype``."""

    source = "analytic"

    def __init__(self, device: DeviceSpec, dtype: str = "float32") -> None:
        self.device = device
        self.dtype = dtype_name(dtype)
        self._peak = device.peak(self.dtype)

    def block_seconds(self, nodes: Sequence[Node], batch: int) -> tuple[float, float]:
        forward, backward = self.array_seconds(NodeArrays.of(nodes), batch)
        return float(forward.sum()), float(backward.sum())

    def node_seconds(self, nodes: Sequence[Node], batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-node ``(forward, backward)`` seconds."""
        return self.array_seconds(NodeArrays.of(nodes), batch)

    def array_seconds(self, arrays: NodeArrays, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-node ``(forward, backward)`` seconds of precomputed `NodeArrays`."""
        spec = self.device
        flops = arrays.flops_per_sample * batch + arrays.flops_fixed
        nbytes = arrays.bytes_per_sample * batch + arrays.bytes_fixed
        launches = (flops > 0) | (nbytes > 0)
        grads = arrays.grad_inputs
        forward = np.maximum(flops / self._peak, nbytes / spec.memory_bandwidth)
        forward += spec.kernel_latency_s * launches
        backward_bytes = 2.0 * nbytes * (grads > 0)
        backward = np.maximum(grads * flops / self._peak, backward_bytes / spec.memory_bandwidth)
        backward += spec.kernel_latency_s * grads * launches
        return forward, backward

    def timer(self, units: Sequence[Sequence[Node]]) -> BlockTimer:
        return BlockTimer(self, units)


class BlockTimer:
    """Forward and backward seconds of contiguous runs of units (groups of nodes), fast.

    ``units`` is any grouping of nodes, e.g. the planner's components (a node shared by several
    components, such as a duplicated parameter-only op, counts in each).  Construction is
    O(#nodes) once; the first query at a batch size costs O(#nodes) numpy work and caches prefix
    sums for that batch; every later query at that batch is O(1) per range, and accepts arrays
    of range bounds to answer many ranges in one call.
    """

    def __init__(self, model: AnalyticCostModel, units: Sequence[Sequence[Node]]) -> None:
        self.model = model
        self.num_units = len(units)
        index: dict[str, int] = {}
        unique: list[Node] = []
        occurrences: list[int] = []
        owners: list[int] = []
        for unit, nodes in enumerate(units):
            for node in nodes:
                if node.name not in index:
                    index[node.name] = len(unique)
                    unique.append(node)
                occurrences.append(index[node.name])
                owners.append(unit)
        self._arrays = NodeArrays.of(unique)
        self._occurrences = np.asarray(occurrences, dtype=np.int64)
        self._owners = np.asarray(owners, dtype=np.int64)
        self._prefix: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def unit_seconds(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(forward, backward)`` seconds of every unit at ``batch``."""
        forward, backward = self.prefix(batch)
        return np.diff(forward), np.diff(backward)

    def prefix(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative ``(forward, backward)`` seconds: ``[0]`` is 0, ``[k]`` covers units < k."""
        if batch not in self._prefix:
            node_fwd, node_bwd = self.model.array_seconds(self._arrays, batch)
            forward, backward = (
                np.concatenate(([0.0], np.cumsum(self._per_unit(per_node))))
                for per_node in (node_fwd, node_bwd)
            )
            self._prefix[batch] = (forward, backward)
        return self._prefix[batch]

    def range_seconds(
        self, start: ArrayLike, end: ArrayLike, batch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(forward, backward)`` seconds of units ``start <= u < end`` (scalars or arrays)."""
        forward, backward = self.prefix(batch)
        lo, hi = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
        return forward[hi] - forward[lo], backward[hi] - backward[lo]

    def _per_unit(self, per_node: np.ndarray) -> np.ndarray:
        return np.bincount(
            self._owners, weights=per_node[self._occurrences], minlength=self.num_units
        )

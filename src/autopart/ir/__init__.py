"""The graph IR: what the planner knows about a captured model.

The IR is plain data so that the planner can be run and tested without torch.distributed or a
device.  Sizes are stored *per sample* for values that carry the batch dimension (``batch_dim`` is
not None), so the planner can cost any microbatch size by multiplying; non-batch values (masks,
position tables, parameter-derived tensors) have fixed sizes.

``Graph.fx_module`` keeps the captured ``torch.fx.GraphModule`` (batch dimension symbolic where
capture managed it) for the parts that must execute the graph: measured costing and the runtime.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPE_BYTES = {
    "torch.float64": 8,
    "torch.float32": 4,
    "torch.float16": 2,
    "torch.bfloat16": 2,
    "torch.int64": 8,
    "torch.int32": 4,
    "torch.int16": 2,
    "torch.int8": 1,
    "torch.uint8": 1,
    "torch.bool": 1,
    "torch.complex64": 8,
    "torch.complex128": 16,
    "torch.float8_e4m3fn": 1,
    "torch.float8_e5m2": 1,
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype written as ``str(torch.dtype)``."""
    return _DTYPE_BYTES.get(dtype, 4)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor value. ``shape`` is at one sample when ``batch_dim`` is set.

    A scalar that is shape arithmetic on the batch (dtype ``symint``) records ``affine``:
    ``(per_sample, fixed)`` with value ``per_sample * rows + fixed``, so the runtime can
    rebuild it for whatever rows a stage replica holds instead of shipping another replica's.

    ``outer`` says how the batch dimension is laid out: as ``(outer, rows, rest)`` flattened.
    It is 1 where each row's entries are together; a sequence-first ``(seq, batch, vocab)``
    viewed as ``(seq * batch, vocab)`` has ``outer == seq``: its rows are interleaved.
    """

    shape: tuple[int, ...]
    dtype: str
    batch_dim: int | None = None
    affine: tuple[float, float] | None = None
    outer: int = 1

    @property
    def is_batch(self) -> bool:
        return self.batch_dim is not None

    def numel(self, batch: int = 1) -> int:
        n = math.prod(self.shape)
        return n * batch if self.is_batch else n

    def nbytes(self, batch: int = 1) -> int:
        return self.numel(batch) * dtype_bytes(self.dtype)


@dataclass(frozen=True)
class ParamSpec:
    """A parameter or buffer, under its canonical name; ``aliases`` are tied names."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    is_buffer: bool = False
    requires_grad: bool = True
    aliases: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_bytes(self.dtype)


class NodeKind(str, enum.Enum):
    """How a node relates to the batch, which decides where the planner may put it."""

    INPUT = "input"  # a user input (positional or keyword)
    BATCH = "batch"  # depends on a batch-carrying input: one atomic component each
    PARAM_ONLY = "param_only"  # computed only from parameters, buffers or constants: duplicated
    OUTPUT = "output"  # the graph's return


@dataclass(frozen=True)
class NodeStats:
    """Analytic per-node numbers recorded at capture, per sample for the batch-scaled part.

    ``*_per_sample`` scale with the microbatch size; ``*_fixed`` do not (e.g. a mask's bytes).
    ``saved_*`` are the bytes autograd saves for backward, attributed to the node that saves them
    (each storage counted once, parameters excluded).  ``grad_inputs`` counts the differentiable
    inputs (activations and parameters) that get a gradient, the multiplier of backward FLOPs.
    """

    flops_per_sample: float = 0.0
    flops_fixed: float = 0.0
    bytes_per_sample: float = 0.0
    bytes_fixed: float = 0.0
    saved_per_sample: float = 0.0
    saved_fixed: float = 0.0
    grad_inputs: int = 0


@dataclass(frozen=True)
class Node:
    """One op of the captured graph."""

    name: str
    op: str
    kind: NodeKind
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    outputs: tuple[TensorSpec, ...]
    module_path: str
    stats: NodeStats = NodeStats()
    #: "tuple" or "list" when the value is a sequence of leaves (``split`` returns a list);
    #: None for a single leaf.
    container: str | None = None

    @property
    def is_batch(self) -> bool:
        return self.kind in (NodeKind.BATCH, NodeKind.INPUT)

    def output_bytes(self, batch: int = 1) -> int:
        return sum(t.nbytes(batch) for t in self.outputs)


@dataclass(frozen=True)
class OutputLeaf:
    """One leaf of the model's output: the graph value ``value``, or else ``constant``."""

    value: str | None
    constant: Any = None


@dataclass
class Graph:
    """A captured model: nodes in topological order, parameters, inputs and outputs.

    ``inputs`` are the user-input nodes in call order; ``input_sources`` says where each comes
    from in the user's call (``args[0]``, ``kwargs['attention_mask']``, ``args[1][0]``), so
    the runtime can route a microbatch's arguments to them.  ``static_batch`` is None when
    ``fx_module`` accepts any batch size, else the only batch size it was specialized to.
    """

    nodes: list[Node]
    params: dict[str, ParamSpec]
    inputs: list[str]
    outputs: list[str]
    fingerprint: str
    capture_method: str
    fx_module: Any = field(default=None, repr=False, compare=False)
    input_sources: dict[str, str] = field(default_factory=dict)
    static_batch: int | None = None
    #: Scalar outputs split into per-row terms, by the name of the node that combines them.
    reductions: dict[str, ScalarReduction] = field(default_factory=dict)
    #: The model's output, flattened: each leaf a value name (`OutputLeaf.value`) or a
    #: constant; `output_spec` (a pytree spec) rebuilds the model's own structure around them.
    output_leaves: tuple[OutputLeaf, ...] = ()
    output_spec: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self._index = {n.name: i for i, n in enumerate(self.nodes)}

    def param_only_closure(self) -> dict[str, frozenset[str]]:
        """Each parameter-only value with every parameter-only value it is computed from
        (itself included): what a stage that reads it must compute, since such values are
        never sent between stages."""
        closure: dict[str, frozenset[str]] = {}
        for node in self.nodes:
            if node.kind is NodeKind.PARAM_ONLY:
                deps = {node.name}
                for src in node.inputs:
                    deps |= closure.get(src, frozenset())
                closure[node.name] = frozenset(deps)
        return closure

    def delivered(self) -> list[str]:
        """The values the stages hand to the caller: the outputs, with each split scalar
        replaced by the batch values its terms read (the caller combines them)."""
        names: list[str] = []
        for name in self.outputs:
            reduction = self.reductions.get(name)
            names.extend(reduction.inputs() if reduction else (name,))
        return list(dict.fromkeys(names))

    def index(self, name: str) -> int:
        return self._index[name]

    def node(self, name: str) -> Node:
        return self.nodes[self._index[name]]

    def consumers(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for src in n.inputs:
                users[src].append(n.name)
        return users

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params.values())


def structural_fingerprint(
    nodes: list[Node], params: dict[str, ParamSpec], inputs: list[str], outputs: list[str]
) -> str:
    """A sha256 of what the planner's decisions depend on, so a saved plan can be matched to a
    model: ops, edges, shapes and parameters; not the analytic stats, which may be refined."""
    payload = {
        "nodes": [
            [
                n.name,
                n.op,
                n.kind.value,
                list(n.inputs),
                list(n.params),
                [[list(t.shape), t.dtype, t.batch_dim] for t in n.outputs],
                n.module_path,
            ]
            for n in nodes
        ],
        "params": [
            [p.name, list(p.shape), p.dtype, p.is_buffer, p.requires_grad, list(p.aliases)]
            for p in sorted(params.values(), key=lambda p: p.name)
        ],
        "inputs": inputs,
        "outputs": outputs,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class RowTerm:
    """One term ``coef · ΣN / den`` of a scalar output split into per-row parts (see
    `autopart.capture.scalar_outputs`).  ``N`` is the batch value ``numerator``; ``den`` is the sum
    of the batch value ``denominator``, or ``numel(N) · mean_scale`` for a mean, or 1 for a sum,
    and is further multiplied by the non-batch input ``divisor`` when one is named."""

    numerator: str
    denominator: str | None = None
    mean_scale: float | None = None
    divisor: str | None = None
    coef: float = 1.0

    @property
    def is_plain_sum(self) -> bool:
        return self.denominator is None and self.mean_scale is None and self.divisor is None

    def scaled(self, factor: float) -> RowTerm:
        return dataclasses.replace(self, coef=self.coef * factor)

    def with_divisor(self, name: str) -> RowTerm:
        return dataclasses.replace(self, divisor=name)

    def over(self, denominator: str, coef: float) -> RowTerm:
        """This plain sum divided by the plain sum ``coef · Σdenominator``."""
        return dataclasses.replace(self, denominator=denominator, coef=self.coef / coef)

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.numerator, self.denominator, self.divisor) if n)

    def value(self, values: dict[str, Any]) -> Any:
        rows = values[self.numerator]
        total = rows.sum()
        if self.denominator is not None:
            total = total / values[self.denominator].sum()
        elif self.mean_scale is not None:
            total = total / (rows.numel() * self.mean_scale)
        if self.divisor is not None:
            total = total / values[self.divisor]
        return total * self.coef if self.coef != 1.0 else total


@dataclass(frozen=True)
class ScalarReduction:
    """A scalar output as the sum of its `RowTerm` s, returned as ``dtype``."""

    terms: tuple[RowTerm, ...]
    dtype: str

    def inputs(self) -> tuple[str, ...]:
        """The values the terms read, each once, in a fixed order."""
        return tuple(dict.fromkeys(n for t in self.terms for n in t.names()))

    def combine(self, values: dict[str, Any]) -> Any:
        total = sum(term.value(values) for term in self.terms)
        return total.to(getattr(torch, self.dtype.removeprefix("torch.")))

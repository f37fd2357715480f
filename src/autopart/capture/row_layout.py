"""How each value lays out its rows (`autopart.ir.TensorSpec.outer`).

The meta runs tell which dimension of a value grows with the batch, but not how its entries
are ordered: ``(batch, seq)`` and ``(seq, batch)`` both flatten to ``seq * batch`` entries,
the first row after row, the second with the rows interleaved.  Cutting the second into
microbatches by contiguous blocks would hand rows to the wrong places, so the order is
followed from the inputs: only a reshape changes it (a ``view`` keeps the flat order, so the
entries before the batch stay before it), every other op keeps the order of its inputs'
batch dimension, unless it gives the batch dimension more entries per row than its inputs
have (an opaque flatten: followed as a reshape).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from autopart.errors import CaptureError
from autopart.ir import TensorSpec

__all__ = ["with_outer"]

aten = torch.ops.aten

_RESHAPES = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.view_copy.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten._reshape_alias.default,
    torch.reshape,
    torch.flatten,
    torch.unflatten,
}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}


def with_outer(
    node: torch.fx.Node,
    specs: list[TensorSpec],
    value: list[Any],
    inputs: dict[str, tuple[TensorSpec, ...]],
) -> list[TensorSpec]:
    """``specs`` (of ``node``'s leaves ``value``) with each batch leaf's ``outer`` set from
    the specs of the node's inputs."""
    fed = [s for arg in node.all_input_nodes for s in inputs.get(arg.name, ()) if s.is_batch]
    if not fed or not any(s.is_batch for s in specs):
        return specs
    outer = max(s.outer for s in fed)
    if _is_reshape(node) or _merges_rows(specs, fed):
        source = next(
            a for a in node.all_input_nodes if any(s.is_batch for s in inputs.get(a.name, ()))
        )
        before = _outer_entries(source, inputs.get(source.name, ()))
        if before is not None and len(value) == 1 and isinstance(value[0], torch.Tensor):
            dim = specs[0].batch_dim
            assert dim is not None
            ahead = math.prod(int(size) for size in value[0].shape[:dim])
            if before % ahead:
                raise CaptureError(
                    f"cannot follow the batch through {node.name} ({node.target}): it reshapes "
                    "the batch dimension into pieces of other dimensions; keep the batch a "
                    "dimension of its own"
                )
            outer = before // ahead
    return [s if not s.is_batch else _replace_outer(s, outer) for s in specs]


def _merges_rows(specs: list[TensorSpec], fed: list[TensorSpec]) -> bool:
    """Does an op outside the known reshapes (a leaf module's ``nn.Flatten``, a ``ravel``)
    give its output's batch dimension more entries per row than any input's has?  Then it
    merged dimensions into the batch, and is followed as a reshape."""
    out = [s.shape[s.batch_dim] for s in specs if s.batch_dim is not None]
    return max(out, default=1) > max(
        (s.shape[s.batch_dim] for s in fed if s.batch_dim is not None), default=1
    )


def _is_reshape(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    return node.op == "call_function" and node.target in _RESHAPES


def _outer_entries(source: torch.fx.Node, specs: tuple[TensorSpec, ...]) -> int | None:
    """How many entries come before each row's in the flat order of ``source``'s value."""
    if len(specs) != 1 or not specs[0].is_batch:
        return None
    dim = specs[0].batch_dim
    assert dim is not None
    return math.prod(int(size) for size in specs[0].shape[:dim]) * specs[0].outer


def _replace_outer(spec: TensorSpec, outer: int) -> TensorSpec:
    if spec.outer == outer:
        return spec
    return TensorSpec(spec.shape, spec.dtype, spec.batch_dim, spec.affine, outer)

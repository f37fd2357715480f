"""The gradient of the model's loss, for schedules that run backward inside the model call.

1F1B back-propagates microbatch ``m`` before the caller has the step's loss.  The step's
gradient is linear in the gradient ``g`` the caller puts on its loss, so the pipeline runs
with ``g = 1``, keeps what that gives apart from the gradients already accumulated
(`DeferredGrads`), and the caller's ``backward()`` adds ``g`` times it (`Calls`).  Every rank
must then put the same ``g`` on its loss (``loss / k``, a GradScaler's scale): DDP averages
``g_r · ∇loss_r`` over ranks, which is ``g`` times the mean only when the ``g_r`` agree, so
the ranks compare theirs and refuse to differ.

The gradient of the loss at ``g = 1`` with respect to one microbatch's outputs
(`LossGrads.rows_grad`), as GPipe's backward would have received it from the caller:

* a loss split into per-row terms ``Σ coef · ΣN / den`` (`autopart.capture.scalar_outputs`) gives
  each row of ``N`` owned by rank ``r`` the gradient ``coef / (den_r · W)``: rank ``r``'s own
  loss divides by its own denominator, and DDP divides by the world ``W``.  Each rank
  computes its ``den_r`` from its inputs before the pipeline runs (`LossSource.for_call`),
  and one all-gather gives every rank all of them; where the denominators are element
  counts and row arithmetic only, every rank computes all of them from the row counts;
* a whole scalar loss, combined as a row-weighted mean of the chunks, gets its usual share of
  a mean gradient of 1.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from autopart.ir import Graph
from autopart.ir.loss import LossOutput
from autopart.runtime.stage.graph_cut import StageIO, build_stage_module
from autopart.runtime.transport import routing
from autopart.runtime.transport.layout import BatchLayout, Rows
from autopart.runtime.transport.routing import ValueShape, all_gather_floats


class LossGrads:
    """One call's loss gradients at ``g = 1``, for every microbatch this rank back-propagates."""

    def __init__(
        self,
        loss: LossOutput,
        shapes: dict[str, ValueShape],
        layout: BatchLayout,
        factors: dict[str, list[float]],
        device: torch.device,
    ) -> None:
        self.shapes = shapes
        self.layout = layout
        #: Per numerator value, the gradient of each owner rank's rows.
        self.factors = factors
        #: The mean gradient of a whole (unsplit) loss, as GPipe's all-reduce would give it.
        self.means: dict[tuple[str, int], torch.Tensor] = (
            {(loss.name, 0): torch.ones((), dtype=torch.float64, device=device)}
            if loss.reduction is None
            else {}
        )

    def rows_grad(self, name: str, li: int, leaf: Any, m: int, rows: Rows) -> torch.Tensor | None:
        """The loss gradient of rows ``rows`` of output ``name`` in microbatch ``m``, or None
        when the loss does not read it."""
        factors = self.factors.get(name)
        if factors is None or li != 0:
            return None
        spec = self.shapes[name].leaves[0]
        grad = torch.zeros_like(leaf)
        for owner, owned in self.layout.owners(m).items():
            lo, hi = max(owned[0], rows[0]), min(owned[1], rows[1])
            if lo < hi:
                routing.row_view(grad, spec, rows, (lo, hi)).fill_(factors[owner])
        return grad


class LossSource:
    """What one call signature's graph needs to give `LossGrads`: its loss output and the
    module that computes each rank's denominators from its inputs."""

    def __init__(self, graph: Graph, loss: LossOutput, device: torch.device) -> None:
        self.graph = graph
        self.loss = loss
        self.device = device
        reduction = loss.reduction
        self.terms = reduction.terms if reduction is not None else ()
        self.denominators = [t.denominator for t in self.terms if t.denominator is not None]
        #: Whether the denominators are element counts and row arithmetic only (a plain mean,
        #: a sum, a batch mean): then no rank needs another's values.
        self.from_rows = not self.denominators and all(
            t.divisor is None or t.divisor not in graph.inputs for t in self.terms
        )
        self.module = None
        if self.denominators:
            io = StageIO(
                -1,
                loss.denominator_nodes,
                loss.denominator_inputs,
                tuple(dict.fromkeys(self.denominators)),
            )
            self.module = build_stage_module(graph, io, device)

    def for_call(
        self,
        local_inputs: dict[str, Any],
        layout: BatchLayout,
        rank: int,
        shapes: dict[str, ValueShape],
    ) -> LossGrads:
        """This call's `LossGrads`: every rank's denominators, from one all-gather."""
        world = len(layout.offsets) - 1
        sizes = [hi - lo for lo, hi in map(layout.rows_of, range(world))]
        if self.from_rows:  # every rank's denominators follow from its row count alone
            every = [self._local_denominators(local_inputs, rows) for rows in sizes]
        else:
            mine = self._local_denominators(local_inputs, sizes[rank])
            every = all_gather_floats(mine, self.device) if world > 1 else [mine]
        factors: dict[str, list[float]] = defaultdict(lambda: [0.0] * world)
        for i, term in enumerate(self.terms):
            for rank in range(world):
                den = every[rank][i] * world  # 0 when a rank's labels are all ignored:
                share = term.coef / den if den else math.copysign(math.inf, term.coef)
                factors[term.numerator][rank] += share  # inf, and NaN gradients, as DDP gets
        return LossGrads(self.loss, shapes, layout, dict(factors), self.device)

    def _local_denominators(self, local_inputs: dict[str, Any], rows: int) -> list[float]:
        """This rank's ``den`` of every term, over its own rows."""
        sums: dict[str, float] = {}
        if self.module is not None:
            with torch.no_grad():
                values = self.module(*[local_inputs[n] for n in self.loss.denominator_inputs])
            names = dict.fromkeys(self.denominators)
            sums = {n: float(v.sum()) for n, v in zip(names, values, strict=True)}
        found = []
        for term in self.terms:
            if term.denominator is not None:
                den = sums[term.denominator]
            elif term.mean_scale is not None:
                spec = self.graph.node(term.numerator).outputs[0]
                den = spec.numel(rows) * term.mean_scale
            else:
                den = 1.0
            if term.divisor is not None:
                den *= float(self._divisor(term.divisor, local_inputs, rows))
            found.append(den)
        return found

    def _divisor(self, name: str, local_inputs: dict[str, Any], rows: int) -> Any:
        """A divisor's value on this rank: a non-batch input, or the row count's arithmetic."""
        if name in local_inputs:
            return local_inputs[name]
        return routing.affine_value(self.graph.node(name).outputs[0], rows)


class DeferredGrads:
    """Keeps what the pipeline back-propagates at ``g = 1`` apart from the gradients already
    accumulated, until the caller's ``backward()`` gives ``g``.

    Gradients that are all zero (``zero_grad(set_to_none=False)``) hold nothing to keep: they
    are released for the pass, so the pipeline's gradients take their memory, and come back as
    zeros after it (when the activations are gone), so that a parameter the pass leaves without
    a gradient still has its zero, as under DDP.  Only gradients accumulated over earlier calls
    are kept aside, which costs a second copy of them until ``backward()``."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        grads = [p.grad for p in params]
        present = [g for g in grads if g is not None]
        # One device sync for all of them, not one per parameter.
        nonzero = iter(torch.stack([g.any() for g in present]).tolist() if present else [])
        self.kept: list[torch.Tensor | None] = []
        self.zeroed: list[bool] = []
        for p, grad in zip(params, grads, strict=True):
            has = grad is not None and bool(next(nonzero))
            self.kept.append(grad if has else None)
            self.zeroed.append(grad is not None and not has)
            p.grad = None
        self.computed: list[torch.Tensor | None] = []

    def settle(self) -> None:
        """After the pipeline ran: take its gradients, and put the accumulated ones back."""
        self.computed = [p.grad for p in self.params]
        for p, kept, zeroed in zip(self.params, self.kept, self.zeroed, strict=True):
            p.grad = torch.zeros_like(p) if zeroed else kept
        self.kept = []

    def apply(self, scale: float) -> None:
        """Add ``scale`` times the pipeline's gradients to the accumulated ones."""
        for p, grad in zip(self.params, self.computed, strict=True):
            if grad is None:
                continue
            if scale != 1.0:
                grad.mul_(scale)
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        self.computed = []

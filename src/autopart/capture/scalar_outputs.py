"""Scalar outputs rewritten as sums over rows, so that every rank gets what DDP gives it.

A pipeline runs the global batch in chunks (microbatch × replica) that need not line up with
the ranks' local batches, while DistributedDataParallel gives each rank the loss of its own
local batch and averages the gradients over ranks.  One number per chunk cannot be split back
into ranks, and weighting chunks by their rows is wrong for the losses people train with:
a token-mean cross-entropy over padded labels divides by the tokens that count, not by rows.

So at capture, a scalar output whose last steps are recognized is rewritten as

    value = Σ_i coef_i · ΣN_i / den_i

where each numerator ``N_i`` is a batch tensor of per-row contributions (a ``reduction='none'``
loss, or the rows of the tensor a ``mean``/``sum`` reduced) and ``den_i`` is a sum of per-row
weights ``ΣD_i`` (the non-ignored tokens, or their class weights), the element count (means)
or 1 (sums), optionally divided by a non-batch input (Hugging Face's ``num_items_in_batch``).
The graph returns ``N_i`` and ``D_i`` like any batch output, their rows travel to the rank that
owns them, and the caller's side computes the value from that rank's rows only: the same
number, and through autograd the same gradients, as the plain model on that rank's batch.

The graph keeps one node in the scalar's place, a `RowCombine` call that computes the value
from its terms, so the captured module still returns what the model returns.  A scalar output
that is not recognized keeps its old treatment (a row-weighted mean of the chunks' values) and
capture warns, naming the op, since that is exact only when it really is a mean over rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

from autopart.ir import RowTerm, ScalarReduction

log = logging.getLogger(__name__)

aten = torch.ops.aten

#: Loss ops with a ``reduction`` argument (0 none, 1 mean, 2 sum), and its position.
_REDUCTION_ARG = {
    aten.mse_loss.default: 2,
    aten.l1_loss.default: 2,
    aten.smooth_l1_loss.default: 2,
    aten.huber_loss.default: 2,
    aten.soft_margin_loss.default: 2,
    aten.binary_cross_entropy.default: 3,
    aten.binary_cross_entropy_with_logits.default: 4,
    aten.kl_div.default: 2,
}
#: Class-index losses: the mean divides by the weights of the targets that are not ignored.
_CLASS_LOSSES = {
    aten.cross_entropy_loss.default: (2, 3, 4),  # weight, reduction, ignore_index positions
    aten.nll_loss.default: (2, 3, 4),
    aten.nll_loss_nd.default: (2, 3, 4),
}
_PASS_THROUGH = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.alias.default,
    aten.squeeze.default,
    aten.view.default,
    aten.reshape.default,
}
_MEANS = {aten.mean.default, aten.mean.dim}
_SUMS = {aten.sum.default, aten.sum.dim_IntList}
_MEAN, _SUM = 1, 2


class RowCombine:
    """The graph node in a scalar output's place: computes the value from its terms' tensors,
    passed in `ScalarReduction.inputs` order."""

    def __init__(self, reduction: ScalarReduction) -> None:
        self.reduction = reduction
        self.__name__ = "row_combine"
        self.__module__ = "autopart"

    def __call__(self, *tensors: Any) -> torch.Tensor:
        return self.reduction.combine(dict(zip(self.reduction.inputs(), tensors, strict=True)))


def rewrite_scalar_outputs(gm: torch.fx.GraphModule, user_inputs: Iterable[str]) -> None:
    """Replace each recognized batch-dependent scalar output of ``gm`` by a `RowCombine` node
    over per-row terms; warn about the ones that are not recognized."""
    users = set(user_inputs)
    batch = _batch_dependent(gm, users)
    output = next(iter(gm.graph.find_nodes(op="output")))
    changed = False
    for node in dict.fromkeys(output.all_input_nodes):
        value = node.meta.get("val")
        if node.name not in batch or not isinstance(value, torch.Tensor) or value.dim() != 0:
            continue
        rewriter = _Rewriter(gm.graph, batch, users, node)
        terms = rewriter.terms(node)
        if terms is None:
            log.warning(
                "the model returns a scalar (%s, from %s) that autopart cannot split into "
                "per-row parts; it is combined over microbatches as a mean over rows, which "
                "is exact only if it is one",
                node.name,
                rewriter.stopped_at,
            )
            continue
        with gm.graph.inserting_before(output):
            reduction = ScalarReduction(tuple(terms), str(value.dtype))
            combine = gm.graph.call_function(
                RowCombine(reduction), tuple(rewriter.node(n) for n in reduction.inputs())
            )
        combine.meta["val"] = value
        node.replace_all_uses_with(combine, delete_user_cb=lambda user: user is output)
        _erase_unused(gm.graph, rewriter.visited)
        changed = True
    if changed:
        gm.recompile()


def reductions_of(gm: torch.fx.GraphModule) -> dict[str, ScalarReduction]:
    """The `ScalarReduction` of every `RowCombine` node, by node name."""
    return {
        node.name: node.target.reduction
        for node in gm.graph.nodes
        if node.op == "call_function" and isinstance(node.target, RowCombine)
    }


def _batch_dependent(gm: torch.fx.GraphModule, users: set[str]) -> set[str]:
    found: set[str] = set()
    for node in gm.graph.nodes:
        is_input = node.op == "placeholder" and node.name in users
        computed = node.op in ("call_function", "call_method", "call_module")
        if is_input or (computed and any(n.name in found for n in node.all_input_nodes)):
            found.add(node.name)
    return found


class _Rewriter:
    """Walks back from one scalar through the ops it recognizes, inserting term nodes."""

    def __init__(
        self, graph: torch.fx.Graph, batch: set[str], users: set[str], root: torch.fx.Node
    ) -> None:
        self.graph = graph
        self.batch = batch
        self.users = users
        self.root = root
        self.visited: list[torch.fx.Node] = []
        self.stopped_at = ""
        self._nodes = {n.name: n for n in graph.nodes}

    def node(self, name: str) -> torch.fx.Node:
        return self._nodes[name]

    def _new(self, anchor: torch.fx.Node, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        with self.graph.inserting_after(anchor):
            made = self.graph.call_function(target, args, kwargs)
        self._nodes[made.name] = made
        return made

    def _at_root(self, target: Any, *args: Any) -> torch.fx.Node:
        """A new node just before the scalar: every value it can read exists by then."""
        with self.graph.inserting_before(self.root):
            made = self.graph.call_function(target, args)
        self._nodes[made.name] = made
        return made

    def _is_fixed(self, value: Any) -> bool:
        """A number, or a scalar tensor that does not depend on the batch (a buffer, a
        parameter, a value computed from them): the same on every rank."""
        if _is_number(value):
            return True
        if not isinstance(value, torch.fx.Node) or value.name in self.batch:
            return False
        meta = value.meta.get("val")
        return isinstance(meta, torch.Tensor) and meta.dim() == 0

    def _times(self, terms: list[RowTerm] | None, factor: Any, op: Any) -> list[RowTerm] | None:
        """Terms multiplied (``op`` mul) or divided (``op`` div) by a fixed factor; a tensor
        factor joins each numerator inside the graph, so autograd sees it (a learned loss
        weight gets its gradient)."""
        if terms is None:
            return None
        if _is_number(factor):
            return _scaled(terms, float(factor) if op is aten.mul.Tensor else 1.0 / float(factor))
        made = []
        for term in terms:
            rows = self._at_root(op, self.node(term.numerator), factor)
            made.append(dataclasses.replace(term, numerator=rows.name))
        return made

    def _constant_term(self, terms: list[RowTerm], value: Any, sign: float) -> RowTerm:
        """A fixed value as a mean over rows: ``ones_like(N) · value``, averaged, is the value
        on every rank, and its gradient reaches a parameter it came from."""
        ones = self._at_root(aten.ones_like.default, self.node(terms[0].numerator))
        rows = self._at_root(aten.mul.Tensor, ones, value)
        return RowTerm(numerator=rows.name, mean_scale=1.0, coef=sign)

    def _through(self, node: Any) -> Any:
        while isinstance(node, torch.fx.Node) and node.target in _PASS_THROUGH:
            self.visited.append(node)
            node = node.args[0]
        return node

    def _fail(self, node: Any) -> None:
        target = getattr(node, "target", node)
        self.stopped_at = f"op {target}" if isinstance(node, torch.fx.Node) else repr(node)
        return None

    def terms(self, node: torch.fx.Node) -> list[RowTerm] | None:
        """``node``'s value as terms, or None (``stopped_at`` says where recognition ended)."""
        self.visited.append(node)
        if node.op != "call_function":
            return self._fail(node)
        target, args = node.target, node.args
        if target in _PASS_THROUGH:
            return self.terms(args[0]) if isinstance(args[0], torch.fx.Node) else None
        if target in (aten.neg.default,):
            return _scaled(self.terms(args[0]), -1.0)
        if target in (aten.mul.Tensor, aten.mul.Scalar):
            a, b = args[0], args[1]
            if self._is_fixed(b) and isinstance(a, torch.fx.Node):
                return self._times(self.terms(a), b, aten.mul.Tensor)
            if self._is_fixed(a) and isinstance(b, torch.fx.Node):
                return self._times(self.terms(b), a, aten.mul.Tensor)
            return self._fail(node)
        if target in (aten.div.Tensor, aten.div.Scalar):
            return self._divide(node)
        if target in (aten.add.Tensor, aten.sub.Tensor):
            return self._add(node)
        if target in _MEANS or target in _SUMS:
            return self._reduce(node)
        if target in _CLASS_LOSSES:
            return self._class_loss(node)
        if target in _REDUCTION_ARG:
            return self._loss(node, _REDUCTION_ARG[target])
        return self._fail(node)

    def _divide(self, node: torch.fx.Node) -> list[RowTerm] | None:
        a, b = node.args[0], self._through(node.args[1])
        if not isinstance(a, torch.fx.Node):
            return self._fail(node)
        if self._is_fixed(b):
            return self._times(self.terms(a), b, aten.div.Tensor)
        if not isinstance(b, torch.fx.Node):
            return self._fail(node)
        top = self.terms(a)
        if top is None:
            return None
        divisor = b.meta.get("val")
        per_rank = b.op == "placeholder" and b.name in self.users and _is_scalar_tensor(divisor)
        # A batch size (``x.size(0)``, KL's 'batchmean'): shape arithmetic the caller's side
        # rebuilds from its own rows, so each rank divides by its own batch size.
        per_rank = per_rank or (b.name in self.batch and isinstance(divisor, torch.SymInt))
        if per_rank:
            if any(t.divisor is not None for t in top):
                return self._fail(node)
            return [t.with_divisor(b.name) for t in top]
        if b.name not in self.batch:
            return self._fail(b)
        bottom = self.terms(b)
        if bottom is None:
            return None
        if len(bottom) != 1 or not bottom[0].is_plain_sum or not all(t.is_plain_sum for t in top):
            return self._fail(node)
        den = bottom[0]
        return [t.over(den.numerator, den.coef) for t in top]

    def _add(self, node: torch.fx.Node) -> list[RowTerm] | None:
        a, b = node.args[0], node.args[1]
        alpha = float(node.kwargs.get("alpha", 1.0))
        if node.target is aten.sub.Tensor:
            alpha = -alpha
        if self._is_fixed(b) and isinstance(a, torch.fx.Node):
            left = self.terms(a)
            return None if left is None else [*left, self._constant_term(left, b, alpha)]
        if self._is_fixed(a) and isinstance(b, torch.fx.Node) and alpha == 1.0:
            right = self.terms(b)
            return None if right is None else [*right, self._constant_term(right, a, 1.0)]
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            return self._fail(node)
        left, right = self.terms(a), self.terms(b)
        if left is None or right is None:
            return None
        return left + (_scaled(right, alpha) or [])

    def _reduce(self, node: torch.fx.Node) -> list[RowTerm] | None:
        x = node.args[0]
        value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if value is None or x.name not in self.batch:
            return self._fail(node)
        dims = node.args[1] if len(node.args) > 1 else None
        if dims not in (None, []) and sorted(d % value.dim() for d in dims) != list(
            range(value.dim())
        ):
            return self._fail(node)  # a partial reduction leaves a tensor, not the scalar
        rows, scale = self._rows(x, value)
        if node.target in _MEANS:
            return [RowTerm(numerator=rows.name, mean_scale=scale)]
        return [RowTerm(numerator=rows.name)]

    def _rows(self, x: torch.fx.Node, value: torch.Tensor) -> tuple[torch.fx.Node, float]:
        """``x`` summed over every dim but the batch one, and how many elements that summed
        per entry: a full tensor would cost activation-sized traffic to the owning rank."""
        batch_dims = [d for d, size in enumerate(value.shape) if not isinstance(size, int)]
        if len(batch_dims) != 1 or value.dim() == 1:
            return x, 1.0
        others = [d for d in range(value.dim()) if d != batch_dims[0]]
        scale = float(math.prod(int(value.shape[d]) for d in others))
        return self._new(x, aten.sum.dim_IntList, x, others), scale

    def _none_reduction(self, node: torch.fx.Node, index: int) -> tuple[torch.fx.Node, int]:
        args = list(node.args)
        reduction = int(args[index]) if len(args) > index else node.kwargs.get("reduction", _MEAN)
        while len(args) <= index:
            args.append(_DEFAULTS[node.target][len(args)])
        args[index] = 0
        kwargs = {k: v for k, v in node.kwargs.items() if k != "reduction"}
        return self._new(node, node.target, *args, **kwargs), reduction

    def _loss(self, node: torch.fx.Node, index: int) -> list[RowTerm] | None:
        if node.name not in self.batch:
            return self._fail(node)
        rows, reduction = self._none_reduction(node, index)
        if reduction == _SUM:
            return [RowTerm(numerator=rows.name)]
        if reduction == _MEAN:
            return [RowTerm(numerator=rows.name, mean_scale=1.0)]
        return self._fail(node)

    def _class_loss(self, node: torch.fx.Node) -> list[RowTerm] | None:
        weight_at, reduction_at, ignore_at = _CLASS_LOSSES[node.target]
        target = node.args[1]
        target_value = target.meta.get("val") if isinstance(target, torch.fx.Node) else None
        if target_value is None or node.name not in self.batch:
            return self._fail(node)
        if target_value.is_floating_point():  # class probabilities: a plain mean
            return self._loss(node, reduction_at)
        weight = _arg(node, weight_at, "weight", None)
        ignore = _arg(node, ignore_at, "ignore_index", -100)
        rows, reduction = self._none_reduction(node, reduction_at)
        if reduction == _SUM:
            return [RowTerm(numerator=rows.name)]
        if reduction != _MEAN:
            return self._fail(node)
        counted = self._new(rows, aten.ne.Scalar, target, ignore)
        den = self._new(counted, aten._to_copy.default, counted, dtype=torch.float32)
        if weight is not None:
            index = self._new(den, aten.clamp_min.default, target, 0)
            picked = self._new(index, aten.index.Tensor, weight, [index])
            den = self._new(picked, aten.mul.Tensor, picked, den)
        return [RowTerm(numerator=rows.name, denominator=den.name)]


#: Positional defaults up to the ``reduction`` argument, to fill in before setting it.
_DEFAULTS = {
    **{op: [None, None, _MEAN] for op in _REDUCTION_ARG},
    **{op: [None, None, None, _MEAN] for op in _CLASS_LOSSES},
    aten.binary_cross_entropy.default: [None, None, None, _MEAN],
    aten.binary_cross_entropy_with_logits.default: [None, None, None, None, _MEAN],
}


def _arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_scalar_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scaled(terms: list[RowTerm] | None, factor: float) -> list[RowTerm] | None:
    return None if terms is None else [t.scaled(factor) for t in terms]


def _erase_unused(graph: torch.fx.Graph, chain: list[torch.fx.Node]) -> None:
    """Drop the old scalar's ops where nothing reads them any more."""
    for node in chain:
        if node.graph is graph and not node.users and node.op == "call_function":
            graph.erase_node(node)

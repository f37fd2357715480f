"""Which of the model's outputs is the training loss, and whether 1F1B can back-propagate it
microbatch by microbatch.

1F1B runs the backward of microbatch ``m`` while later microbatches are still going forward,
long before the caller calls ``loss.backward()``.  It can, because the gradient of the step
is linear in the gradient ``g`` the caller puts on the loss: the runtime back-propagates
``g = 1`` during forward and multiplies by the caller's ``g`` when backward comes
(`autopart.runtime.pipeline.loss_grads`).  For that it must know, at forward time:

* which output is the loss: the model's only output when that is a floating scalar, or the
  scalar under the key ``loss`` (as Hugging Face's ``ModelOutput`` has it).  A scalar beside
  other outputs and not named so (a metric, say) is not taken for the loss;
* the gradient of the loss with respect to each of its per-row parts.  A split loss
  (`autopart.capture.scalar_outputs`) ``Σ coef · ΣN / den`` divides by a per-rank denominator, such
  as the count of labels that are not ignored.  That denominator must be computable from the
  inputs alone (no parameter), so that every rank can compute its own before the pipeline runs.

When any of this fails the model does not qualify, and `find_loss` says why: ``"auto"``
then plans GPipe and the plan report carries the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.utils._pytree as pytree

from autopart.ir import Graph, NodeKind, ScalarReduction


@dataclass(frozen=True)
class LossOutput:
    """The model's loss: output value ``name``, split (``reduction``) or whole."""

    name: str
    reduction: ScalarReduction | None
    #: Per split term with a denominator value, the nodes computing it from the inputs
    #: (graph order, inputs excluded) and the inputs they read.
    denominator_nodes: tuple[str, ...] = ()
    denominator_inputs: tuple[str, ...] = ()


def find_loss(graph: Graph) -> LossOutput | str:
    """The model's loss output, or a sentence saying why 1F1B cannot use one."""
    candidates = _scalar_outputs(graph)
    if not candidates:
        return (
            "the model returns no scalar loss; pass labels the model computes its loss from, "
            "or loss_fn="
        )
    named = [name for name, path in candidates if path.rsplit(".", 1)[-1] == "loss"]
    if len(named) == 1:
        name = named[0]
    elif len(candidates) == 1 and len(graph.output_leaves) == 1:
        name = candidates[0][0]  # the model returns its loss and nothing else
    else:
        listed = ", ".join(path or "the output" for _, path in candidates)
        return (
            f"the model returns scalars ({listed}) beside other outputs, and none is named "
            "'loss', so which one is trained on is not known; return the loss alone, or under "
            "the key 'loss', or pass loss_fn="
        )
    reduction = graph.reductions.get(name)
    if reduction is None:
        return LossOutput(name, None)
    for term in reduction.terms:
        if term.divisor is not None:
            node = graph.node(term.divisor)
            if node.kind is not NodeKind.INPUT and node.outputs[0].affine is None:
                return f"the loss divides by {term.divisor}, which the pipeline computes"
    denominators = [t.denominator for t in reduction.terms if t.denominator is not None]
    nodes, inputs = _ancestors(graph, denominators)
    if isinstance(nodes, str):
        return nodes
    return LossOutput(name, reduction, tuple(nodes), tuple(inputs))


def _scalar_outputs(graph: Graph) -> list[tuple[str, str]]:
    """The floating scalar outputs as (value name, path in the output structure)."""
    if graph.output_spec is None:
        return []
    positions = pytree.tree_unflatten(list(range(len(graph.output_leaves))), graph.output_spec)
    paths = {
        index: pytree.keystr(path).strip(".[]'\"")
        for path, index in pytree.tree_flatten_with_path(positions)[0]
    }
    found: list[tuple[str, str]] = []
    for index, leaf in enumerate(graph.output_leaves):
        if leaf.value is None or leaf.value in {name for name, _ in found}:
            continue
        node = graph.node(leaf.value)
        if node.kind is NodeKind.INPUT or len(node.outputs) != 1:
            continue
        spec = node.outputs[0]
        if (
            spec.shape == () and not spec.is_batch and spec.dtype.startswith("torch.float")
        ) or leaf.value in graph.reductions:
            found.append((leaf.value, paths.get(index, str(index))))
    return found


def _ancestors(graph: Graph, names: list[str]) -> tuple[list[str] | str, list[str]]:
    """The nodes that compute ``names`` from the inputs, or why they need more than inputs."""
    wanted: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in wanted:
            continue
        wanted.add(name)
        node = graph.node(name)
        if node.params:
            return (
                f"the loss divides by {names[0]}, which reads parameters or buffers "
                f"({node.params[0]}), so no rank can compute it before the pipeline runs",
                [],
            )
        stack.extend(node.inputs)
    ordered = [n.name for n in graph.nodes if n.name in wanted]
    inputs = [n for n in ordered if graph.node(n).kind is NodeKind.INPUT]
    return [n for n in ordered if graph.node(n).kind is not NodeKind.INPUT], inputs

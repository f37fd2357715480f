"""Between the caller and the pipeline: inputs routed in, outputs handed back, and the
autograd node that joins them.

The forward pass of every microbatch runs inside ``forward``; the outputs handed back are
joined to one custom autograd node (`_Bridge`), whose backward runs the pipeline's backward for
every microbatch (``run_backward``).  The outputs come back in the model's own structure, with
each split scalar combined from this rank's rows of its terms (`autopart.capture.scalar_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.runtime.pipeline.runner import StageRunner
from autopart.runtime.transport import routing

#: Runs the pipeline's backward: (output order, differentiable leaf positions, their grads).
RunBackward = Callable[[list[str], list[int], tuple[torch.Tensor, ...]], None]


def local_batch(dims: dict[str, int | None], given: dict[str, Any], known: bool = True) -> int:
    """This rank's rows: the size of the first argument that carries the batch, in the
    dimension capture found for it (``dims``, by source); -1 when no argument is known
    unless ``known`` (a new call signature passes its batch elsewhere: capture finds it)."""
    for source, value in given.items():
        dim = dims.get(source)
        if dim is not None and isinstance(value, torch.Tensor) and value.dim() > dim:
            return int(value.shape[dim])
    if not known:
        return -1
    raise AutopartError(
        "this call has none of the arguments that carry the batch when the model was "
        f"captured ({', '.join(s for s, d in dims.items() if d is not None)}); call the model "
        "with the same arguments on every step"
    )


def by_source(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by where they sit in it (``args[0]``, ``kwargs['labels']``), the
    names capture gave its inputs' sources."""
    return {
        ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:]): value  # type: ignore[attr-defined]
        for path, value in pytree.tree_flatten_with_path((args, kwargs))[0]
    }


def route_inputs(graph: Graph, given: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """This call's inputs by graph input name, tensors on the device; an argument that
    differs in kind from the captured call is an error naming it."""
    local = {}
    for name, source in graph.input_sources.items():
        if source not in given and any(key.startswith(source) for key in given):
            raise AutopartError(
                f"{source} was a tensor when the model was captured, got a container; "
                "pass the same kinds of arguments on every step"
            )
        if source not in given:
            raise AutopartError(
                f"this call has no {source}, but the model was captured with it; call the "
                "model with the same arguments on every step"
            )
        value = given[source]
        spec = graph.node(name).outputs[0] if graph.node(name).outputs else None
        if spec is not None and not routing.is_scalar(spec):
            if not isinstance(value, torch.Tensor):
                raise AutopartError(
                    f"{source} was a tensor when the model was captured, got {type(value).__name__}"
                )
            value = value.to(device)
        local[name] = value
    return local


def package(
    schedule: StageRunner,
    outputs: dict[str, list[Any]],
    run_backward: RunBackward | None,
    anchor: torch.Tensor,
) -> Any:
    """The call's result: the outputs in the model's structure, the floating ones joined to
    one autograd node when ``run_backward`` is given (a call that records gradients)."""
    order = list(outputs)
    flat = [leaf for name in order for leaf in outputs[name]]
    if run_backward is not None:
        differentiable = [
            i
            for i, leaf in enumerate(flat)
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
        ]
        bridged = _Bridge.apply(
            run_backward, order, differentiable, anchor, *[flat[i] for i in differentiable]
        )
        for i, value in zip(differentiable, bridged, strict=True):
            flat[i] = value
    position = 0
    for name in order:
        count = len(outputs[name])
        outputs[name] = flat[position : position + count]
        position += count
    return hand_back(schedule, outputs)


def hand_back(schedule: StageRunner, outputs: dict[str, list[Any]]) -> Any:
    """The outputs, by delivered value and leaf, in the model's own structure."""
    values = {name: schedule.shapes[name].pack(leaves) for name, leaves in outputs.items()}
    return restructure(schedule.graph, values)


def restructure(graph: Graph, values: dict[str, Any]) -> Any:
    """The model's own output structure (tensor, tuple, dict, ModelOutput) around ``values``;
    each split scalar is combined here from this rank's rows of its terms, so it is this
    rank's own value, as under DDP, and its gradient flows back through those rows."""
    for name, reduction in graph.reductions.items():
        if name not in values:
            values[name] = reduction.combine(values)
    leaves = [
        values[leaf.value] if leaf.value is not None else leaf.constant
        for leaf in graph.output_leaves
    ]
    return pytree.tree_unflatten(leaves, graph.output_spec)


def package_interleaved(
    schedule: StageRunner,
    outputs: dict[str, list[Any]],
    loss: str,
    finish: Callable[[torch.Tensor], None],
    anchor: torch.Tensor,
) -> Any:
    """The result of a call whose backward already ran in the pipeline (1F1B): the loss
    ``loss`` carries one autograd node, whose backward hands the caller's gradient of it to
    ``finish``.  The other floating outputs are joined to the node too, so that a gradient
    reaching one of them (the loss is not all the caller trains on) is an error rather than
    lost."""
    graph = schedule.graph
    values = {name: schedule.shapes[name].pack(leaves) for name, leaves in outputs.items()}
    for name, reduction in graph.reductions.items():
        values[name] = reduction.combine(values)
    others = list(
        dict.fromkeys(
            leaf.value
            for leaf in graph.output_leaves
            if leaf.value is not None
            and leaf.value != loss
            and isinstance(values.get(leaf.value), torch.Tensor)
            and values[leaf.value].is_floating_point()
        )
    )
    joined = _AfterInterleaved.apply(
        finish, others, anchor, values[loss], *[values[name] for name in others]
    )
    values.update(zip([loss, *others], joined, strict=True))
    return restructure(graph, values)


class _AfterInterleaved(torch.autograd.Function):
    """The loss of a call whose backward ran inside the call: backward only scales it."""

    @staticmethod
    def forward(ctx, finish, others, anchor, loss, *tensors):
        ctx.finish, ctx.others = finish, others
        ctx.set_materialize_grads(False)
        return (loss.detach(), *[t.detach() for t in tensors])

    @staticmethod
    def backward(ctx, loss_grad, *grads):
        reached = [name for name, grad in zip(ctx.others, grads, strict=True) if grad is not None]
        if reached or loss_grad is None:
            what = f"output {reached[0]}" if reached else "an output other than the loss"
            raise AutopartError(
                f"backward() reached {what}: under the 1f1b schedule the pipeline "
                "back-propagates the model's loss during the call, so only the loss can be "
                "trained on; compute the whole loss inside the model (or pass loss_fn=), or "
                "use schedule='gpipe'"
            )
        finish, ctx.finish = ctx.finish, None
        if finish is None:
            raise AutopartError(
                "backward() ran twice through the loss of one 1f1b call; call the model again "
                "for another backward"
            )
        finish(loss_grad)
        return (None, None, None, None, *[None] * len(grads))


class _Bridge(torch.autograd.Function):
    """Joins the outputs of a pipelined forward to one node whose backward runs the pipeline."""

    @staticmethod
    def forward(ctx, run_backward, order, differentiable, anchor, *tensors):
        ctx.run_backward, ctx.order, ctx.differentiable = run_backward, order, differentiable
        # An output the caller does not train on gets no gradient, not one of zeros as large
        # as the output (the logits of a language model: gigabytes).
        ctx.set_materialize_grads(False)
        # The values themselves, not copies (an output as large as the logits costs its size
        # again): a detached alias is a new tensor, so the node becomes its own, and it shares
        # the version counter, so an in-place change of an output that backward reads fails
        # as it would unwrapped.
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.run_backward(ctx.order, ctx.differentiable, grads)
        ctx.run_backward = None
        return (None, None, None, None, *[None] * len(grads))

"""A plan with nothing to coordinate: the stage module runs as the model would.

On one rank, with one stage of one replica, one microbatch, and neither offload nor
recomputation, the stage module is the whole model and a call needs none of the pipeline's
machinery: no rows to route, no messages to itself, no autograd node to join the outputs, no
second pass in backward.  The outputs keep their own autograd graph, so the caller's
``backward()`` runs straight through the stage, as it does unwrapped, and there is no gradient
sum to make.  What the pipeline does to a value on the way back is done here too (an output
in its captured dtype outside the caller's autocast, a size the capture found affine in the
rows), so that both paths hand back the same values: the runtime still takes the pipeline for
the training calls it times (`autopart.runtime.pipeline.calls`).
"""

from __future__ import annotations

from typing import Any

import torch

from autopart.ir import NodeKind
from autopart.runtime.pipeline.runner import StageRunner
from autopart.runtime.transport import routing

__all__ = ["run_alone", "runs_alone"]


def runs_alone(runner: StageRunner) -> bool:
    """Whether ``runner``'s plan leaves nothing to coordinate (see the module's text)."""
    plan, stage = runner.plan, runner.stage
    return (
        plan.devices == 1
        and plan.num_stages == 1
        and plan.microbatches == 1
        and runner.offload is None
        and not stage.recompute
        and not stage.zero
    )


def run_alone(
    runner: StageRunner, local_inputs: dict[str, Any], grad: bool, rows: int
) -> dict[str, list[Any]]:
    """Each delivered output's leaves, from one run of the stage module on the whole batch
    of ``rows`` rows."""
    if runner.state_update is not None:
        with torch.no_grad():
            runner.state_update()
    inputs = []
    for name in runner.io.inputs:
        spec = runner.shapes[name].leaves[0]
        value = local_inputs[name]
        if spec.affine is not None:
            value = routing.affine_value(spec, rows)
        elif spec.is_batch and isinstance(value, torch.Tensor):
            value = routing.from_tensor(value.detach(), spec)  # as the pipeline sends rows
        inputs.append([value])
    with torch.set_grad_enabled(grad):
        results = runner.run_module(inputs)
    produced = dict(zip(runner.io.outputs, results, strict=True))
    outputs: dict[str, list[Any]] = {}
    for name in runner.outputs:
        if runner.graph.node(name).kind is NodeKind.INPUT:
            value = local_inputs[name]
            outputs[name] = [value.detach() if isinstance(value, torch.Tensor) else value]
            continue
        outputs[name] = [
            _handed_back(runner, name, li, spec, leaf, rows)
            for li, (spec, leaf) in enumerate(
                zip(runner.shapes[name].leaves, produced[name], strict=True)
            )
        ]
    return outputs


def _handed_back(runner: StageRunner, name: str, li: int, spec, leaf: Any, rows: int) -> Any:
    """A leaf as the pipeline hands it back (`StageRunner.gather_outputs`)."""
    if spec.affine is not None:
        return routing.affine_value(spec, rows)
    if spec.is_batch:
        return runner.handed_back(leaf, name, li) if isinstance(leaf, torch.Tensor) else leaf
    # A value without rows: the pipeline's row-weighted mean over one chunk is the value.
    value = routing.to_tensor(leaf, spec).to(routing.torch_dtype(spec.dtype))
    return value.item() if routing.is_scalar(spec) else value

"""One call's state between its forward and its backward.

Per microbatch, what its backward needs: the rows, the received inputs, the outputs (or, for a
recomputing stage, the RNG state to run the forward again with); per pass, its sends still in
flight, its inbox, and the shares of outputs without a batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from autopart.ir import Graph, NodeKind
from autopart.runtime.transport.layout import BatchLayout, Rows
from autopart.runtime.transport.messages import FORWARD, Inbox, Key


@dataclass
class Microbatch:
    """What backward needs of one microbatch's forward."""

    rows: Rows
    inputs: list[list[Any]]
    outputs: list[list[Any]] | None  # None when the stage recomputes in backward
    rng_state: tuple[torch.Tensor, ...] | None = None


@dataclass
class StepState:
    """One forward call, kept until its backward."""

    layout: BatchLayout
    local_inputs: dict[str, Any]
    #: The pass running now: ``forward``/``backward`` (GPipe) or a schedule's name.
    which: str = FORWARD
    microbatches: dict[int, Microbatch] = field(default_factory=dict)
    #: Sends whose receivers take them only after the pass (outputs, the caller's rows).
    pending: list = field(default_factory=list)
    #: The sends of each of the latest actions, oldest first (`SEND_LAG`).
    sent: list[list] = field(default_factory=list)
    mailbox: dict[Key, torch.Tensor] = field(default_factory=dict)  # sent to this rank itself
    inbox: Inbox | None = None
    #: This rank's share of each whole (non-batch) output leaf, summed for the all-reduce.
    shares: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


def track_inputs(graph: Graph, names, inputs) -> None:
    """Make received activations leaves that collect gradients for the sending stage."""
    for name, leaves in zip(names, inputs, strict=True):
        if graph.node(name).kind is NodeKind.INPUT:
            continue
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                leaf.requires_grad_()

"""One call's state between its forward and its backward.

Per microbatch, what its backward needs: the rows, the received inputs, the outputs (or, for a
recomputing stage, the RNG state to run the forward again with); per pass, its sends still in
flight, its inbox, and the shares of outputs without a batch dimension.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from autopart.ir import Graph, NodeKind, TensorSpec
from autopart.runtime.transport.layout import BatchLayout, Rows
from autopart.runtime.transport.messages import FORWARD, Inbox, Key
from autopart.runtime.transport.routing import torch_dtype


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
    #: Output gradients the caller did not give (an output it did not train on), posted to
    #: this rank itself as broadcast zeros: by id, with a weak reference to tell them apart.
    absent: dict[int, Any] = field(default_factory=dict)
    inbox: Inbox | None = None
    #: This rank's share of each whole (non-batch) output leaf, summed for the all-reduce.
    shares: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    #: Settles a guessed layout (`runtime.pipeline.agreement`): called before anything
    #: leaves the rank, so that a wrong guess can be run again.  None once settled.
    settle: Callable[[], Any] | None = None

    def agree(self) -> None:
        if self.settle is not None:
            self.settle()
            self.settle = None

    def absent_grad(self, spec: TensorSpec, rows: Rows, device: torch.device) -> torch.Tensor:
        """Zeros standing for an output gradient the caller did not give, shaped like
        ``rows`` of the output: a broadcast view, so that a message to this rank itself
        allocates nothing, and remembered so that the stage skips it (one posted to another
        rank arrives as real zeros)."""
        shape = list(spec.shape)
        assert spec.batch_dim is not None  # only batch outputs have output-gradient messages
        shape[spec.batch_dim] *= rows[1] - rows[0]
        dtype = torch_dtype(spec.dtype)
        zeros = torch.zeros((), dtype=dtype, device=device).expand(shape)
        self.absent[id(zeros)] = weakref.ref(zeros)
        return zeros

    def is_absent(self, tensor: torch.Tensor) -> bool:
        ref = self.absent.get(id(tensor))
        return ref is not None and ref() is tensor


def track_inputs(graph: Graph, names, inputs) -> None:
    """Make received activations leaves that collect gradients for the sending stage."""
    for name, leaves in zip(names, inputs, strict=True):
        if graph.node(name).kind is NodeKind.INPUT:
            continue
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                leaf.requires_grad_()

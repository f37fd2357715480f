"""One rank's stage replica, running its schedule's action list (`autopart.schedules`).

Each rank runs one replica of one stage, and executes its actions in order: a forward posts
every send as soon as its value exists and blocks only on receives from earlier stages; a
backward blocks only on gradients from later stages.  `autopart.schedules.simulate` shows that
the lists cannot deadlock against each other, so no barrier is needed.  Which messages a rank
posts, and in what order, follows from the same lists (`autopart.runtime.transport.messages`);
receives follow each sender's order, so nothing depends on tags, which NCCL ignores.

GPipe runs in two passes around the caller: the forward actions inside the model call, the
backward ones inside ``loss.backward()``, with the caller's output gradients.  1F1B runs its
whole list inside the model call, since its backwards interleave with its forwards; the
gradient each microbatch's backward starts from comes from the model's own loss
(`autopart.runtime.pipeline.loss_grads`), and the caller's ``backward()`` only scales the result.

The messages of a pass are `autopart.runtime.transport.messages`'s (caller rows, activations,
outputs and their gradients); an output without a batch dimension is no message: every rank gets the
row-weighted mean of the chunks' values from one all-reduce per call.

Gradients follow DistributedDataParallel: every rank's output gradient is divided by the
world size, so the sum that each stage's replica group all-reduces is the mean over ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import fx

from autopart.device import replayed_rng, rng_state
from autopart.ir import Graph, NodeKind
from autopart.ir.loss import find_loss
from autopart.plan.plan import Plan
from autopart.reports.trace import Recorder
from autopart.runtime.pipeline.loss_grads import LossGrads, LossSource
from autopart.runtime.pipeline.step_state import Microbatch, StepState, track_inputs
from autopart.runtime.pipeline.whole_outputs import add_share, combine_whole
from autopart.runtime.stage.graph_cut import StageIO
from autopart.runtime.stage.offload import ParamOffload
from autopart.runtime.transport import routing
from autopart.runtime.transport.distenv import job_group
from autopart.runtime.transport.layout import BatchLayout, Rows
from autopart.runtime.transport.messages import (
    ACT,
    BACKWARD,
    FORWARD,
    GRAD,
    INPUT,
    OUT,
    OUT_GRAD,
    Inbox,
    Key,
    Message,
    Messages,
    differentiable,
)
from autopart.runtime.transport.wire import captured_dtype, cast_for_wire, wire_shapes
from autopart.schedules import SEND_LAG, Action


class StageRunner:
    """Runs this rank's stage replica under the plan's schedule."""

    def __init__(
        self,
        graph: Graph,
        plan: Plan,
        ios: list[StageIO],
        module: fx.GraphModule,
        rank: int,
        device: torch.device,
        autocast: torch.dtype | None = None,
        offload: ParamOffload | None = None,
        upward: dist.ProcessGroup | None = None,
        native_outputs: bool = False,
    ) -> None:
        self.graph = graph
        self.autocast = autocast
        #: Outputs come back in the dtype their op produced (the caller's autocast), not the
        #: dtype the model was captured with.
        self.native_outputs = native_outputs
        self.offload = offload
        self.plan = plan
        self.module = module
        self.rank = rank
        self.device = device
        self.world = plan.devices
        self.stage = plan.stage_of_rank(rank)
        #: Every rank's stage index: which sends go to a neighbouring stage.
        self.stage_index = {r: stage.index for stage in plan.stages for r in stage.ranks}
        self.io = ios[self.stage.index]
        self.outputs = graph.delivered()
        producer = {name for io in ios for name in io.outputs}
        read = {name for io in ios for name in io.inputs}
        crossing = sorted({*producer, *read, *self.outputs}, key=graph.index)
        self.shapes = {name: routing.value_shape(graph, name) for name in crossing}
        if autocast is not None:  # values travel in the dtype their op produced
            self.shapes = wire_shapes(self.shapes, graph, device, autocast)
        self.messages = Messages(graph, plan, ios, self.shapes, upward)
        #: The output leaves without a batch dimension, in one order on every rank.
        self.whole = [
            (name, li)
            for name in self.outputs
            if graph.node(name).kind is not NodeKind.INPUT
            for li, spec in enumerate(self.shapes[name].leaves)
            if not spec.is_batch and spec.affine is None
        ]
        #: Buffer updates that run once per call (`stage_module.state_updates`), if any.
        self.state_update: fx.GraphModule | None = None
        #: The model's loss, when the plan's schedule back-propagates inside the call and
        #: can use it; else why not (`autopart.ir.loss`).  GPipe needs neither.
        found = find_loss(graph) if plan.schedule != "gpipe" else "the plan's schedule is gpipe"
        self.loss_reason = found if isinstance(found, str) else None
        self.loss = LossSource(graph, found, device) if not isinstance(found, str) else None
        #: Times each action while a trace is being recorded (`autopart.reports.trace`).
        self.recorder: Recorder | None = None

    def _timed(self, name: str):
        """Times the work of an action, after what it waits for has arrived."""
        return self.recorder.span(name) if self.recorder else contextlib.nullcontext()

    # -- message plumbing --------------------------------------------------------------------

    def _post(self, state: StepState, message: Message, tensor: torch.Tensor) -> None:
        if message.dst == self.rank:
            state.mailbox[message.key] = tensor
        else:
            state.agree()
            tag, group = self.messages.tag_of(message), self.messages.group_of(message)
            neighbour = abs(self.stage_index[message.dst] - self.stage.index) == 1
            waited = message.phase in (ACT, GRAD) and neighbour
            routing.send(
                tensor, message.dst, tag, state.sent[-1] if waited else state.pending, group
            )

    def _next_action(self, state: StepState) -> None:
        """Before each action: finish the sends of the action `SEND_LAG` back, so that what
        they hold (an activation, an input gradient) is freed with the microbatch.

        Only sends to the neighbouring stages are waited on: an activation is taken by the
        next stage's forward of the same microbatch, and an input gradient by the previous
        stage's backward, and neither depends on any later action of this rank
        (`autopart.schedules.simulate` runs the lists with this lag and finds no deadlock).
        A value that skips stages would be taken by a stage that may first need this rank's
        later backwards (a skip connection's gradient), so it stays in ``pending`` until the
        pass ends, as outputs do (their owners take them after their own pass).  The lag
        leaves the reader time to get there first."""
        while len(state.sent) >= SEND_LAG:
            routing.wait_all(state.sent.pop(0))
        state.sent.append([])

    def _finish_sends(self, state: StepState) -> None:
        for sends in state.sent:
            routing.wait_all(sends)
        state.sent.clear()
        routing.wait_all(state.pending)

    def _fetch(self, state: StepState, key: Key, src: int) -> torch.Tensor:
        if src == self.rank:
            return state.mailbox.pop(key)
        state.agree()
        assert state.inbox is not None  # a pass opens its inbox before it receives
        return state.inbox.receive(key, src)

    def _holders(self, name: str, layout: BatchLayout, m: int) -> dict[int, Rows]:
        return self.messages.holders(name, layout, m)

    def _sends(self, layout: BatchLayout, which: str) -> list[Message]:
        return self.messages.sends(self.rank, layout, which)

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        local_inputs: dict[str, Any],
        layout: BatchLayout,
        grad: bool,
        loss: LossGrads | None = None,
        settle: Callable[[], Any] | None = None,
    ) -> StepState:
        """Run this rank's forward actions, posting sends as values appear; with ``loss``
        (a schedule whose backwards interleave), its whole action list.  ``settle`` checks
        a guessed ``layout`` before the first message or backward (`StepState.agree`)."""
        which = self.plan.schedule if grad and loss is not None else FORWARD
        state = StepState(layout, local_inputs, which, settle=settle)
        state.inbox = Inbox(self.messages, layout, which, self.rank, self.device)
        if self.state_update is not None:
            with torch.no_grad():
                self.state_update()
        self._send_inputs(state)
        # A call that runs as GPipe under a plan costed for 1F1B (it has no loss to start
        # the backwards from) would hold all M microbatches on stages sized for fewer:
        # recomputing keeps only each microbatch's inputs.
        fallback = self.plan.schedule != "gpipe" and which == FORWARD
        recompute = grad and (self.stage.recompute or fallback)
        for action in self.messages.actions(self.rank, layout, which):
            self._next_action(state)
            if action.is_forward:
                self._forward_one(state, action, grad, recompute)
            else:
                assert loss is not None  # only an interleaved pass has backwards
                state.agree()
                self._backward_one(state, action, loss.means, loss)
        return state

    def _forward_one(self, state: StepState, action: Action, grad: bool, recompute: bool) -> None:
        m = action.microbatch
        rows = state.layout.replicas(m, self.stage.ranks)[self.rank]
        inputs = [self._receive(state, name, m, rows) for name in self.io.inputs]
        rng = rng_state(self.device) if recompute else None
        if grad and not recompute:
            track_inputs(self.graph, self.io.inputs, inputs)
        with self._timed(str(action)):
            with torch.set_grad_enabled(grad and not recompute):
                outputs = self.run_module(inputs)
            self._send_outputs(state, outputs, action, rows)
        if grad:
            state.microbatches[m] = Microbatch(rows, inputs, None if recompute else outputs, rng)

    def run_module(self, inputs: list[list[Any]]) -> list[list[Any]]:
        """The stage module on one microbatch's input leaves, under the call's autocast (and
        offload's fetches): its output leaves, per output."""
        args = [self.shapes[n].pack(v) for n, v in zip(self.io.inputs, inputs, strict=True)]
        cast = torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        )
        with cast, self.offload.forward() if self.offload else contextlib.nullcontext():
            results = self.module(*args)
        return [self.shapes[n].unpack(v) for n, v in zip(self.io.outputs, results, strict=True)]

    def _send_inputs(self, state: StepState) -> None:
        held = state.layout.rows_of(self.rank)
        for message in self._sends(state.layout, state.which):
            if message.phase == INPUT:
                spec = self.shapes[message.name].leaves[0]
                value = state.local_inputs[message.name]
                piece = routing.take_rows(value, spec, held, message.rows).detach()
                self._post(state, message, piece)

    def _receive(self, state: StepState, name: str, m: int, rows: Rows) -> list[Any]:
        is_input = self.graph.node(name).kind is NodeKind.INPUT
        if is_input and not self.shapes[name].leaves[0].is_batch:
            return [state.local_inputs[name]]
        phase = INPUT if is_input else ACT
        holders = self._holders(name, state.layout, m)
        leaves = []
        for li, spec in enumerate(self.shapes[name].leaves):
            if spec.affine is not None:
                leaves.append(routing.affine_value(spec, rows[1] - rows[0]))
                continue
            pieces = [
                self._fetch(state, (phase, m, name, li), move.src)
                for move in routing.moves_for(spec, holders, {self.rank: rows})
            ]
            leaves.append(routing.from_tensor(routing.join(pieces, spec), spec))
        return leaves

    def _send_outputs(self, state: StepState, outputs, action: Action, rows: Rows) -> None:
        m = action.microbatch
        values = dict(zip(self.io.outputs, outputs, strict=True))
        for name, li in self.whole:
            if name in values:
                holders = self._holders(name, state.layout, 0)
                add_share(
                    state.shares,
                    (name, li),
                    self.shapes[name].leaves[li],
                    values[name][li],
                    m,
                    rows,
                    self.rank == min(holders),
                )
        tensors: dict[tuple[str, int], torch.Tensor] = {}
        for message in self.messages.sends_in(self.rank, state.layout, state.which, action):
            spec = self.shapes[message.name].leaves[message.leaf]
            where = (message.name, message.leaf)
            if where not in tensors:
                # A value travels in the dtype its op produced (`transport.wire`).
                leaf = routing.to_tensor(values[message.name][message.leaf], spec).detach()
                tensors[where] = cast_for_wire(leaf, spec, message.name)
            piece = routing.take_rows(tensors[where], spec, rows, message.rows)
            self._post(state, message, piece)

    # -- the model's outputs on every rank ---------------------------------------------------

    def gather_outputs(self, state: StepState) -> dict[str, list[Any]]:
        """Each output for this rank: its own rows, or the batch mean of a non-batch value."""
        layout = state.layout
        own = layout.rows_of(self.rank)
        result: dict[str, list[Any]] = {}
        for name in self.outputs:
            if self.graph.node(name).kind is NodeKind.INPUT:
                result[name] = [state.local_inputs[name]]
                continue
            leaves = []
            for li, spec in enumerate(self.shapes[name].leaves):
                if spec.affine is not None:
                    leaves.append(routing.affine_value(spec, _count(own)))
                elif spec.is_batch:
                    pieces = []
                    for m in range(layout.microbatches):
                        owned = layout.owners(m).get(self.rank)
                        if owned is None:
                            continue
                        holders = self._holders(name, layout, m)
                        pieces += [
                            self._fetch(state, (OUT, m, name, li), mv.src)
                            for mv in routing.moves_for(spec, holders, {self.rank: owned})
                        ]
                    leaves.append(self.handed_back(routing.join(pieces, spec), name, li))
                else:
                    leaves.append(None)  # from the all-reduce below
            result[name] = leaves
        assert state.inbox is not None
        state.inbox.finish()
        self._finish_sends(state)
        combined = combine_whole(
            state.shares, self.whole, self.shapes, state.layout.global_batch, self.device
        )
        for (name, li), value in combined.items():
            result[name][li] = value
        return result

    def handed_back(self, leaf: torch.Tensor, name: str, li: int) -> torch.Tensor:
        """A batch output leaf in the dtype the caller gets: its op's under the caller's
        autocast, as unwrapped; else the dtype the model was captured with."""
        if self.native_outputs:
            return leaf
        return leaf.to(captured_dtype(self.graph, name, li))

    # -- backward ----------------------------------------------------------------------------

    def backward(
        self,
        state: StepState,
        grads: dict[str, list[Any]],
        before_last: Callable[[], None] | None = None,
    ) -> None:
        """GPipe's second pass: back-propagate every microbatch from ``grads``, this rank's
        output gradients.  ``before_last`` runs before the last microbatch's backward, whose
        gradients are final."""
        layout = state.layout
        state.which = BACKWARD
        state.inbox = Inbox(self.messages, layout, BACKWARD, self.rank, self.device)
        means = self._send_output_grads(state, grads)
        order = self.messages.actions(self.rank, layout, BACKWARD)
        for index, action in enumerate(order):
            if index == len(order) - 1 and before_last is not None:
                before_last()
            self._next_action(state)
            self._backward_one(state, action, means, None)
        assert state.inbox is not None
        state.inbox.finish()
        self._finish_sends(state)

    def _backward_one(
        self,
        state: StepState,
        action: Action,
        means: dict[tuple[str, int], torch.Tensor],
        loss: LossGrads | None,
    ) -> None:
        """One microbatch's backward.  The gradients of the caller's outputs come from the
        caller (GPipe: ``OUT_GRAD`` messages) or, with ``loss``, from the model's loss."""
        m = action.microbatch
        mb = state.microbatches[m]
        outputs = mb.outputs
        if outputs is None:
            with self._timed(f"R{m}"):
                outputs = self._recompute(mb)
        tensors, tensor_grads = [], []
        for name, leaves in zip(self.io.outputs, outputs, strict=True):
            for li, (spec, leaf) in enumerate(zip(self.shapes[name].leaves, leaves, strict=True)):
                if not differentiable(spec):
                    continue
                total = self._output_grad(state, name, li, spec, leaf, m, mb.rows, means, loss)
                if total is not None and isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    tensors.append(leaf)
                    tensor_grads.append(total)
        with self._timed(str(action)):
            if tensors:
                # Under 1F1B this runs inside the call, maybe in the caller's autocast,
                # which a backward must not run under.
                with torch.autocast(self.device.type, enabled=False), self._offloaded():
                    torch.autograd.backward(tensors, tensor_grads)
            self._send_input_grads(state, mb, action)
        del state.microbatches[m]

    def _offloaded(self):
        return self.offload.backward() if self.offload else contextlib.nullcontext()

    def _recompute(self, mb: Microbatch) -> list[list[Any]]:
        track_inputs(self.graph, self.io.inputs, mb.inputs)
        assert mb.rng_state is not None  # a recomputing stage saved it in forward
        with replayed_rng(mb.rng_state, self.device), torch.enable_grad():
            return self.run_module(mb.inputs)

    def _send_output_grads(self, state: StepState, grads) -> dict[tuple[str, int], torch.Tensor]:
        """Post this rank's output gradients to their producers; average the scalar ones."""
        own = state.layout.rows_of(self.rank)
        means: dict[tuple[str, int], torch.Tensor] = {}
        keys = [k for k in self.whole if differentiable(self.shapes[k[0]].leaves[k[1]])]
        if keys:  # every rank's gradient of the whole outputs, averaged in one all-reduce
            totals = [
                torch.as_tensor(grads[name][li], dtype=torch.float64, device=self.device)
                if grads[name][li] is not None
                else torch.zeros(
                    self.shapes[name].leaves[li].shape, dtype=torch.float64, device=self.device
                )
                for name, li in keys
            ]
            flat = torch.cat([t.flatten() for t in totals])
            if self.world > 1:
                dist.all_reduce(flat, group=job_group())
            start = 0
            for key, total in zip(keys, totals, strict=True):
                means[key] = flat[start : start + total.numel()].view(total.shape) / self.world
                start += total.numel()
        for message in self._sends(state.layout, BACKWARD):
            if message.phase == OUT_GRAD:
                spec = self.shapes[message.name].leaves[message.leaf]
                grad = grads[message.name][message.leaf]
                if grad is None:  # the caller did not train on this output
                    zeros = state.absent_grad(spec, message.rows, self.device)
                    self._post(state, message, zeros)
                    continue
                # In the output's dtype on the wire, as eager's cast back to it would make it.
                if self.world > 1:
                    grad = grad / self.world
                grad = grad.to(routing.torch_dtype(spec.dtype))
                piece = routing.take_rows(grad, spec, own, message.rows).contiguous()
                self._post(state, message, piece)
        return means

    def _output_grad(
        self, state, name, li, spec, leaf, m, rows, means, loss
    ) -> torch.Tensor | None:
        """The summed gradient of one output leaf of this stage in microbatch ``m``; None
        when nothing reads it (an output that is not the loss, under 1F1B)."""
        layout = state.layout
        holders = self._holders(name, layout, m)
        sources = [(GRAD, self.messages.needers(name, layout, m))]
        if name in self.outputs and spec.is_batch and loss is None:
            sources.append((OUT_GRAD, layout.owners(m)))
        pieces = [
            (move.rows, self._fetch(state, (phase, m, name, li), move.dst))
            for phase, needers in sources
            for move in routing.moves_for(spec, holders, needers)
            if move.src == self.rank
        ]
        pieces = [(r, p) for r, p in pieces if not state.is_absent(p)]
        own = loss.rows_grad(name, li, leaf, m, rows) if loss is not None else None
        if own is None and not pieces and (name, li) not in means:
            return None
        if own is None and len(pieces) == 1 and pieces[0][0] == rows and (name, li) not in means:
            return pieces[0][1].to(leaf.dtype)  # one reader of every row: nothing to sum
        total = own if own is not None else torch.zeros_like(leaf)
        for piece_rows, piece in pieces:
            routing.row_view(total, spec, rows, piece_rows).add_(routing.blocks(piece, spec))
        if (name, li) in means:
            share = _count(rows) / layout.global_batch
            total += (means[(name, li)] * share).to(total.dtype)
        return total

    def _send_input_grads(self, state: StepState, mb: Microbatch, action: Action) -> None:
        values = dict(zip(self.io.inputs, mb.inputs, strict=True))
        for message in self.messages.sends_in(self.rank, state.layout, state.which, action):
            if message.phase == GRAD:
                spec = self.shapes[message.name].leaves[message.leaf]
                leaf = values[message.name][message.leaf]
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                piece = routing.take_rows(grad, spec, mb.rows, message.rows).contiguous()
                self._post(state, message, piece)


def _count(rows: Rows) -> int:
    return rows[1] - rows[0]

"""Every point-to-point message of a step, in the order its sender posts it, and receiving
them in that order.

NCCL matches the messages between two ranks by the order they were posted, not by tag.  So the
sender's order is made data: `Messages.sends` lists, for any rank, the messages it posts in one
pass (GPipe's forward or backward, or a whole 1F1B step), following the rank's action list
(`autopart.schedules`), and the schedule posts exactly those, in exactly that order.  A
receiver does not consume messages in its sender's order (a later stage wants an activation
before the labels that came first; an owner collects outputs only after its own stage ran), so
`Inbox` receives from each peer strictly in that peer's posting order and keeps what arrives
early until it is asked for.  A message never waits for one posted after it, so this adds no
waiting that the schedule did not already have.

Messages to a higher rank and messages to a lower rank travel in two process groups.  NCCL
runs the sends and receives between two ranks on one stream per communicator, in posting order;
with both directions on one communicator, a rank's send could wait behind its own receive of
the peer's message that waits behind the peer's receive of that send.  Apart, each direction is
one ordered queue, which the sender's order alone keeps consistent.

Tags are not needed for matching.  ``AUTOPART_P2P_TAGS=1`` adds them anyway (on gloo, a
message then also has to carry the expected tag), as a debugging aid.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

import torch
import torch.distributed as dist

from autopart import schedules
from autopart.ir import Graph, NodeKind, TensorSpec
from autopart.plan.plan import Plan
from autopart.runtime.stage.graph_cut import StageIO
from autopart.runtime.transport import routing
from autopart.runtime.transport.distenv import job_group
from autopart.runtime.transport.layout import BatchLayout, Rows, transfers
from autopart.runtime.transport.routing import ValueShape
from autopart.schedules import BACKWARD, FORWARD, Action


class Phase(IntEnum):
    """What a message carries (its place in `Key`)."""

    INPUT = 0  # the caller's rows, to the first stage that reads them
    ACT = 1  # an activation, to a later stage
    OUT = 2  # an output, to the rank that returns it
    GRAD = 3  # an activation's gradient, back to the stage that made it
    OUT_GRAD = 4  # an output's gradient, from the caller, to the stage that made the output


INPUT, ACT, OUT, GRAD, OUT_GRAD = Phase
PHASE_NAMES = {
    INPUT: "input rows",
    ACT: "activation",
    OUT: "output",
    GRAD: "gradient",
    OUT_GRAD: "output gradient",
}


def pass_name(which: str) -> str:
    """A pass in words: GPipe's forward or backward pass, or a schedule's whole step."""
    words: dict[str, str] = {FORWARD: "forward", BACKWARD: "backward"}
    return words.get(which, f"{which} step")


Key = tuple[Phase, int, str, int]  # phase, microbatch, value name, leaf index


@dataclass(frozen=True)
class Message:
    """Rows ``rows`` of leaf ``leaf`` of value ``name`` in microbatch ``m``, from ``src`` to
    ``dst``; ``rows`` is ``(0, 0)`` for a leaf without a batch dimension (sent whole)."""

    phase: Phase
    m: int
    name: str
    leaf: int
    src: int
    dst: int
    rows: Rows

    @property
    def key(self) -> Key:
        return (self.phase, self.m, self.name, self.leaf)


def tags_enabled() -> bool:
    return os.environ.get("AUTOPART_P2P_TAGS", "0") == "1"


class Messages:
    """Who holds and who needs each value crossing ranks, and every rank's sends."""

    def __init__(
        self,
        graph: Graph,
        plan: Plan,
        ios: list[StageIO],
        shapes: dict[str, ValueShape],
        upward: dist.ProcessGroup | None = None,
    ) -> None:
        self.graph = graph
        #: The process group of messages to a higher rank (the default group: to a lower one).
        self.upward = upward
        self.plan = plan
        self.ios = ios
        self.shapes = shapes
        self.world = plan.devices
        self.producer = {name: io.index for io in ios for name in io.outputs}
        self.readers: dict[str, list[int]] = {}
        for io in ios:
            for name in io.inputs:
                self.readers.setdefault(name, []).append(io.index)
        self.outputs = graph.delivered()
        # ``shapes`` holds every value that crosses ranks, in graph order.
        self.value_id = {name: i for i, name in enumerate(shapes)}
        self._cache: dict[tuple[BatchLayout, int, str], list[tuple[Action | None, Message]]] = {}
        self._by_action: dict[tuple[BatchLayout, int, str], dict[Action, list[Message]]] = {}
        self.tags = tags_enabled()

    def is_input(self, name: str) -> bool:
        return self.graph.node(name).kind is NodeKind.INPUT

    def holders(self, name: str, layout: BatchLayout, m: int) -> dict[int, Rows]:
        if self.is_input(name):
            return layout.owners(m)
        return layout.replicas(m, self.plan.stages[self.producer[name]].ranks)

    def needers(self, name: str, layout: BatchLayout, m: int) -> dict[int, Rows]:
        found: dict[int, Rows] = {}
        for index in self.readers.get(name, []):
            found.update(layout.replicas(m, self.plan.stages[index].ranks))
        return found

    def group_of(self, message: Message) -> dist.ProcessGroup | None:
        return self.upward if message.src < message.dst else job_group()

    def tag_of(self, message: Message) -> int:
        if not self.tags:
            return 0
        return routing.tag(message.phase, message.m, self.value_id[message.name], message.leaf)

    def sends(self, rank: int, layout: BatchLayout, which: str) -> list[Message]:
        """The messages ``rank`` posts in one pass, in order: ``forward`` or ``backward`` (the
        two halves of GPipe, around the caller's loss), or a schedule's name for a pass that
        runs its whole action list (1F1B: forwards and backwards interleaved)."""
        return [message for _, message in self._pass(rank, layout, which)]

    def sends_in(self, rank: int, layout: BatchLayout, which: str, action: Action) -> list[Message]:
        """The messages of `sends` that ``action`` posts."""
        key = (layout, rank, which)
        if key not in self._by_action:
            grouped: dict[Action, list[Message]] = defaultdict(list)
            for owner, message in self._pass(rank, layout, which):
                if owner is not None:
                    grouped[owner].append(message)
            self._by_action[key] = grouped
        return self._by_action[key].get(action, [])

    def actions(self, rank: int, layout: BatchLayout, which: str) -> tuple[Action, ...]:
        """The actions ``rank`` runs in pass ``which``."""
        microbatches = layout.microbatches
        if which == FORWARD:
            return schedules.forward_only(microbatches)
        stage = self.plan.stage_of_rank(rank).index
        name = "gpipe" if which == BACKWARD else which
        order = schedules.actions(name, len(self.plan.stages), microbatches, stage)
        return tuple(a for a in order if not a.is_forward) if which == BACKWARD else order

    def _pass(
        self, rank: int, layout: BatchLayout, which: str
    ) -> list[tuple[Action | None, Message]]:
        key = (layout, rank, which)
        if key not in self._cache:
            if len(self._cache) > 64:  # layouts change only with batch sizes
                self._cache.clear()
                self._by_action.clear()
            found: list[tuple[Action | None, Message]] = []
            if which == BACKWARD:
                found += [(None, m) for m in self._output_grads(rank, layout)]
            else:
                found += [(None, m) for m in self._input_rows(rank, layout)]
            for action in self.actions(rank, layout, which):
                build = self._forward_of if action.is_forward else self._backward_of
                found += [(action, m) for m in build(rank, layout, action.microbatch)]
            self._cache[key] = found
        return self._cache[key]

    def _input_rows(self, rank: int, layout: BatchLayout) -> Iterator[Message]:
        """The caller's rows, all of them first: no rank ever waits for them."""
        for name in self.readers:
            spec = self.shapes[name].leaves[0]
            if not self.is_input(name) or not spec.is_batch:
                continue  # every rank passes its own copy of a non-batch input
            for m in range(layout.microbatches):
                for move in transfers(layout.owners(m), self.needers(name, layout, m)):
                    if move.src == rank:
                        yield Message(INPUT, m, name, 0, rank, move.dst, move.rows)

    def _forward_of(self, rank: int, layout: BatchLayout, m: int) -> Iterator[Message]:
        stage = self.plan.stage_of_rank(rank)
        for name in self.ios[stage.index].outputs:
            holders = self.holders(name, layout, m)
            for li, spec in enumerate(self.shapes[name].leaves):
                if spec.affine is not None:
                    continue  # rebuilt by each needer from its own row count
                targets = [(ACT, self.needers(name, layout, m))]
                if name in self.outputs and spec.is_batch:  # others: one all-reduce
                    targets.append((OUT, layout.owners(m)))
                for phase, needers in targets:
                    for move in routing.moves_for(spec, holders, needers):
                        if move.src == rank:
                            yield Message(phase, m, name, li, rank, move.dst, move.rows)

    def _output_grads(self, rank: int, layout: BatchLayout) -> Iterator[Message]:
        """The caller's gradients of its rows of the outputs, back to their producers."""
        for name in self.outputs:
            if self.is_input(name):
                continue
            for li, spec in enumerate(self.shapes[name].leaves):
                if not differentiable(spec) or not spec.is_batch:
                    continue
                for m in range(layout.microbatches):
                    owned = layout.owners(m).get(rank)
                    if owned is None:
                        continue
                    holders = self.holders(name, layout, m)
                    for move in routing.moves_for(spec, holders, {rank: owned}):
                        yield Message(OUT_GRAD, m, name, li, rank, move.src, move.rows)

    def _backward_of(self, rank: int, layout: BatchLayout, m: int) -> Iterator[Message]:
        stage = self.plan.stage_of_rank(rank)
        rows = layout.replicas(m, stage.ranks)[rank]
        for name in self.ios[stage.index].inputs:
            if self.is_input(name):
                continue
            holders = self.holders(name, layout, m)
            for li, spec in enumerate(self.shapes[name].leaves):
                if not differentiable(spec):
                    continue
                for move in routing.moves_for(spec, holders, {rank: rows}):
                    yield Message(GRAD, m, name, li, rank, move.src, move.rows)


def differentiable(spec: TensorSpec) -> bool:
    return not routing.is_scalar(spec) and routing.torch_dtype(spec.dtype).is_floating_point


@dataclass
class Inbox:
    """This rank's receives in one pass: from each peer in that peer's posting order."""

    messages: Messages
    layout: BatchLayout
    which: str
    rank: int
    device: torch.device
    _queues: dict[int, Iterator[Message]] = field(default_factory=dict)
    _early: dict[tuple[int, Key], torch.Tensor] = field(default_factory=dict)
    _received: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def receive(self, key: Key, src: int) -> torch.Tensor:
        """The message ``key`` from ``src``, receiving whatever ``src`` posted before it."""
        early = self._early.pop((src, key), None)
        if early is not None:
            return early
        queue = self._queues.get(src)
        if queue is None:
            sent = self.messages.sends(src, self.layout, self.which)
            queue = self._queues[src] = iter([m for m in sent if m.dst == self.rank])
        for message in queue:
            spec = self.messages.shapes[message.name].leaves[message.leaf]
            buffer = routing.empty_like_spec(spec, message.rows[1] - message.rows[0], self.device)
            what = f"{PHASE_NAMES[message.phase]} of {message.name}"
            tag = self.messages.tag_of(message)
            routing.recv(buffer, src, tag, what, self.messages.group_of(message))
            if message.key == key:
                return buffer
            self._early[(src, message.key)] = buffer
        raise routing.RuntimeCommError(
            f"rank {self.rank} expected {PHASE_NAMES[key[0]]} of {key[2]} (microbatch {key[1]}) "
            f"from rank {src}, which does not send it in this {pass_name(self.which)} pass; this "
            "is a bug in autopart's schedule, please report it"
        )

    def finish(self) -> None:
        """Check that every message posted to this rank in the pass was consumed: one left
        behind would be matched, by order, to a receive of the next pass."""
        left = list(self._early)
        for src, queue in self._queues.items():
            left += [(src, m.key) for m in queue]
        if left:
            (src, key), count = left[0], len(left)
            raise routing.RuntimeCommError(
                f"rank {self.rank} left {count} message(s) of this {pass_name(self.which)} pass "
                f"unread, the first the {PHASE_NAMES[key[0]]} of {key[2]} from rank {src}; this "
                "is a bug in autopart's schedule, please report it"
            )

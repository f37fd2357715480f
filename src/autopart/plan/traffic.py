"""Bytes that cross the boundaries of every contiguous range of units.

The planner cuts a topologically ordered sequence of units (components, then blocks) into
contiguous ranges.  A contiguous range of a topological order is always convex, so the stage graph
stays acyclic; what differs between cuts is the traffic.  ``RangeTraffic`` precomputes, for every
range ``[i, j)``, the bytes it receives (values made before ``i`` and used inside, model inputs
included) and sends (values made inside and used at ``j`` or later, model outputs included), each
split into a per-sample part and a fixed part.  A value that skips stages is counted once for each
stage that uses it, which is how the runtime sends it: directly, not through the stages between.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from autopart.ir import Graph, NodeKind


def cut_bytes(graph: Graph, unit_of: Mapping[str, int], num_units: int) -> np.ndarray:
    """``cut[p]``: the bytes of one sample (plus fixed bytes) that units before ``p`` send to
    units at or after it, for every ``p`` in ``0..num_units``: `RangeTraffic.cut_bytes` for
    all positions at once, in memory linear in the unit count (the coarsening reads only this,
    over every op of the model)."""
    change = np.zeros(num_units + 2)
    for node, producer, users in _crossings(graph, unit_of, num_units):
        if producer >= 0:
            # The value crosses every cut after its producer, up to its last user.
            size = sum(_value_bytes(node))
            change[producer + 1] += size
            change[max(users) + 1] -= size
    return np.cumsum(change)[: num_units + 1]


def _crossings(graph: Graph, unit_of: Mapping[str, int], num_units: int):
    """Each value some other unit reads: ``(node, producer, users)``, the producer ``-1`` for a
    model input and the users the other units that read it (``num_units``: the output)."""
    consumers = graph.consumers()
    for node in graph.nodes:
        if node.kind is NodeKind.INPUT:
            producer = -1
        elif node.kind is NodeKind.BATCH:
            producer = unit_of[node.name]
        else:
            continue
        users = set()
        for user in consumers[node.name]:
            kind = graph.node(user).kind
            if kind is NodeKind.OUTPUT:
                users.add(num_units)
            elif kind is NodeKind.BATCH and unit_of[user] != producer:
                users.add(unit_of[user])
        if users:
            yield node, producer, users


class RangeTraffic:
    """``recv[i, j]`` and ``send[i, j]`` (per-sample and fixed bytes) for units ``i <= . < j``."""

    def __init__(self, graph: Graph, unit_of: Mapping[str, int], num_units: int) -> None:
        k = num_units
        shape = (k + 1, k + 1)
        send_w = np.zeros((2, k + 1, k + 1))
        recv = np.zeros((2, *shape))
        for node, producer, users in _crossings(graph, unit_of, k):
            size = np.array(_value_bytes(node))
            last = max(users)
            if producer >= 0:
                send_w[:, producer, producer + 1 : last + 1] += size[:, None]
            previous = producer
            for use in sorted(users):
                if use >= k:
                    break
                recv[:, previous + 1 : use + 1, use + 1 :] += size[:, None, None]
                previous = use
        self.send = np.flip(np.cumsum(np.flip(send_w, axis=1), axis=1), axis=1)
        self.recv = recv

    def recv_bytes(self, i: int, j: int, batch: int) -> float:
        return float(self.recv[0, i, j] * batch + self.recv[1, i, j])

    def send_bytes(self, i: int, j: int, batch: int) -> float:
        return float(self.send[0, i, j] * batch + self.send[1, i, j])

    def cut_bytes(self, position: int, batch: int = 1) -> float:
        """Bytes sent from units before ``position`` to units at or after it."""
        return self.send_bytes(0, position, batch)


def _value_bytes(node) -> tuple[float, float]:
    per_sample = sum(t.nbytes(1) for t in node.outputs if t.is_batch)
    fixed = sum(t.nbytes() for t in node.outputs if not t.is_batch)
    return float(per_sample), float(fixed)

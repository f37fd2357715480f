"""The runtime's pure parts, in one process: row layouts and transfers, ZeRO shard
assignment, what each stage receives and hands on, and every rank's posting order."""

from __future__ import annotations

import itertools

import pytest
import torch

from autopart.capture import capture
from autopart.config import Offload
from autopart.ir import NodeKind
from autopart.plan.plan import Plan, StagePlan
from autopart.runtime.data_parallel.zero import assign_shards
from autopart.runtime.stage.graph_cut import stage_ios
from autopart.runtime.transport.layout import BatchLayout, split_rows, transfers
from autopart.runtime.transport.messages import ACT, BACKWARD, FORWARD, GRAD, Messages
from autopart.runtime.transport.routing import value_shape


@pytest.mark.parametrize(("lo", "hi", "parts"), [(0, 10, 3), (4, 5, 1), (2, 9, 7), (0, 3, 5)])
def test_split_rows_is_tensor_split(lo, hi, parts):
    pieces = split_rows(lo, hi, parts)
    expected = torch.arange(lo, hi).tensor_split(parts)
    assert [list(range(a, b)) for a, b in pieces] == [t.tolist() for t in expected]


def test_transfers_deliver_every_needed_row_once():
    holders = {0: (0, 5), 1: (5, 8), 2: (8, 13)}
    needers = {3: (0, 7), 4: (7, 13)}
    moves = transfers(holders, needers)
    assert all(m.rows[0] < m.rows[1] for m in moves)
    for dst, (lo, hi) in needers.items():
        got = sorted(r for m in moves if m.dst == dst for r in range(*m.rows))
        assert got == list(range(lo, hi))
    for m in moves:  # each comes from a rank that holds it
        assert holders[m.src][0] <= m.rows[0] and m.rows[1] <= holders[m.src][1]


def test_a_layout_partitions_rows_by_rank_microbatch_and_replica():
    layout = BatchLayout.of([3, 4, 2], 2)
    assert layout.global_batch == 9
    for m in range(2):
        owned = sorted(r for rows in layout.owners(m).values() for r in range(*rows))
        assert owned == list(range(*layout.microbatch(m)))
        chunks = layout.replicas(m, [5, 6])
        rows = sorted(r for piece in chunks.values() for r in range(*piece))
        assert rows == owned and set(chunks) == {5, 6}


def test_shards_cover_every_parameter_once_and_balance_bytes():
    from autopart.ir import ParamSpec

    sizes = [100, 80, 60, 40, 30, 20, 10]
    specs = {f"p{i}": ParamSpec(f"p{i}", (n,), "torch.float32") for i, n in enumerate(sizes)}
    stage = _stage(0, [0, 1, 2], list(specs))
    owner = assign_shards(stage, specs)
    assert set(owner) == set(specs) and set(owner.values()) == {0, 1, 2}
    load = {r: sum(specs[n].nbytes for n, o in owner.items() if o == r) for r in (0, 1, 2)}
    assert max(load.values()) - min(load.values()) <= max(s.nbytes for s in specs.values())


def _stage(index, ranks, params, nodes=(), rows=1) -> StagePlan:
    return StagePlan(index, ranks, list(nodes), [], params, 0, 0.0, 0.0, False, rows)


@pytest.fixture(scope="module")
def two_stages():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    graph = capture(model, (torch.randn(2, 4),))
    batch = [n.name for n in graph.nodes if n.kind is NodeKind.BATCH]
    cut = batch.index(next(n for n in batch if "relu" in n)) + 1
    owner = {n.name: n for n in graph.nodes}
    stages = []
    for index, (nodes, ranks) in enumerate([(batch[:cut], [0, 1]), (batch[cut:], [2])]):
        params = sorted({p for n in nodes for p in owner[n].params})
        stages.append(_stage(index, ranks, params, nodes, rows=-(-3 // len(ranks))))
    plan = Plan(graph.fingerprint, 6, 2, 3, {}, "sgd", 0, stages, 0.0, 0.0)
    plan.validate_for(graph, 3)
    return graph, plan


def test_stage_ios_connect_each_input_to_an_earlier_stage(two_stages):
    graph, plan = two_stages
    ios = stage_ios(graph, plan)
    made = set()
    for io in ios:
        for name in io.inputs:
            kind = graph.node(name).kind
            assert kind is NodeKind.INPUT or name in made, f"stage {io.index} reads {name} early"
        made.update(io.outputs)
    assert set(graph.delivered()) <= made | {
        n.name for n in graph.nodes if n.kind is NodeKind.INPUT
    }


def test_every_pairs_messages_are_posted_in_microbatch_order(two_stages):
    """NCCL matches by posting order: between two ranks, activations go forward in
    microbatch order and their gradients come back in reverse, and each message a rank
    posts is one another rank expects (the inbox of the receiver is built from the same
    lists)."""
    graph, plan = two_stages
    ios = stage_ios(graph, plan)
    names = {n for io in ios for n in (*io.inputs, *io.outputs)} | set(graph.delivered())
    shapes = {n: value_shape(graph, n) for n in names}
    messages = Messages(graph, plan, ios, shapes, None)
    layout = BatchLayout.of([2, 2, 2], 2)
    assert all(s.offload is Offload.NONE for s in plan.stages)
    sent = {}
    for rank, which in itertools.product(range(3), (FORWARD, BACKWARD)):
        posted = messages.sends(rank, layout, which)
        for src, dst in {(m.src, m.dst) for m in posted}:
            order = [m.m for m in posted if (m.src, m.dst) == (src, dst) and m.phase in (ACT, GRAD)]
            assert order == sorted(order, reverse=which == BACKWARD), (rank, which, order)
        sent[rank, which] = posted
    acts = [m for m in sent[0, FORWARD] + sent[1, FORWARD] if m.phase == ACT]
    grads = [m for m in sent[2, BACKWARD] if m.phase == GRAD]
    assert acts and grads and {(m.dst, m.m) for m in acts} == {(2, 0), (2, 1)}
    assert {(m.src, m.dst, m.m, m.rows) for m in acts} == {
        (m.dst, m.src, m.m, m.rows) for m in grads
    }


def test_interleaved_rows_are_taken_and_joined_by_row():
    """A ``(seq * batch, vocab)`` value of a sequence-first model: row b is every
    ``batch``-th entry.  Taking rows must pick those, not a contiguous slice."""
    from autopart.ir import TensorSpec
    from autopart.runtime.transport.routing import join, row_view, take_rows

    seq, batch, vocab = 3, 4, 2
    by_row = torch.arange(seq * batch * vocab, dtype=torch.float32).view(seq, batch, vocab)
    flat = by_row.reshape(seq * batch, vocab)
    spec = TensorSpec((seq, vocab), "torch.float32", batch_dim=0, outer=seq)
    got = take_rows(flat, spec, (0, batch), (1, 3))
    assert torch.equal(got, by_row[:, 1:3].reshape(-1, vocab))
    pieces = [take_rows(flat, spec, (0, batch), r) for r in ((0, 1), (1, 3), (3, 4))]
    assert torch.equal(join(pieces, spec), flat)
    target = torch.zeros_like(flat)
    row_view(target, spec, (0, batch), (2, 4)).fill_(1.0)
    assert torch.equal(target.view(seq, batch, vocab)[:, 2:].sum(), torch.tensor(12.0))
    assert float(target.sum()) == 12.0


def test_the_autocast_probe_runs_a_model_with_tied_weights():
    """ALBERT ties its decoder bias to another name: the probe must still run, or every
    value crosses stages widened to fp32."""
    from autopart.runtime.transport.wire import produced_dtypes

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    model[2].bias = model[0].bias
    graph = capture(model, (torch.randn(2, 4),))
    found = produced_dtypes(graph, torch.device("cpu"), torch.bfloat16)
    assert found and torch.bfloat16 in found[graph.outputs[0]], found

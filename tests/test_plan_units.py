"""Planner pieces on hand-made graphs: atomic components, traffic, blocks, plan files."""

import itertools
import json

import pytest

from autopart.ir import Node, NodeKind, ParamSpec
from autopart.plan.atomic import atomic_components
from autopart.plan.blocks import coarsen
from autopart.plan.plan import Plan, PlanError, StagePlan
from autopart.plan.traffic import RangeTraffic, cut_bytes
from handmade import act, graph, linear_chain


def skip_graph():
    """x -> a -> b -> c -> add(c, a) -> output; `a` skips over b and c."""
    n = [
        Node("x", "input", NodeKind.INPUT, (), (), act(8), ""),
        Node("a", "op", NodeKind.BATCH, ("x",), (), act(10), "a"),
        Node("b", "op", NodeKind.BATCH, ("a",), (), act(20), "b"),
        Node("c", "op", NodeKind.BATCH, ("b",), (), act(10), "c"),
        Node("add", "op", NodeKind.BATCH, ("c", "a"), (), act(10), "add"),
        Node("output", "output", NodeKind.OUTPUT, ("add",), (), (), ""),
    ]
    return graph(n)


def test_param_only_ops_are_duplicated_into_each_consumer():
    w = ParamSpec("w", (4, 4), "torch.float32")
    nodes = [
        Node("x", "input", NodeKind.INPUT, (), (), act(4), ""),
        Node("wt", "aten.t", NodeKind.PARAM_ONLY, (), ("w",), (), "shared"),
        Node("wt2", "aten.mul", NodeKind.PARAM_ONLY, ("wt",), (), (), "shared"),
        Node("m1", "aten.mm", NodeKind.BATCH, ("x", "wt2"), (), act(4), "l1"),
        Node("m2", "aten.mm", NodeKind.BATCH, ("m1", "wt"), (), act(4), "l2"),
        Node("output", "output", NodeKind.OUTPUT, ("m2",), (), (), ""),
    ]
    comps = atomic_components(graph(nodes, {"w": w}))
    assert [c.anchor for c in comps] == ["m1", "m2"]
    assert comps[0].nodes == ("wt", "wt2", "m1")
    assert comps[1].nodes == ("wt", "m2")


def test_traffic_counts_skip_values_once_per_using_range():
    g = skip_graph()
    unit = {"a": 0, "b": 1, "c": 2, "add": 3}
    t = RangeTraffic(g, unit, 4)
    f32 = 4
    # Range [1, 3) = {b, c} receives a (10) and sends c (10); a skips it to reach add.
    assert t.recv_bytes(1, 3, batch=1) == 10 * f32
    assert t.send_bytes(1, 3, batch=1) == 10 * f32
    # Range [3, 4) = {add} receives c and a directly.
    assert t.recv_bytes(3, 4, batch=2) == 2 * 20 * f32
    # Range [0, 1) = {a} receives the input x and sends a (to b, and to add).
    assert t.recv_bytes(0, 1, batch=1) == 8 * f32
    assert t.send_bytes(0, 1, batch=1) == 10 * f32
    # The last range sends the model output.
    assert t.send_bytes(3, 4, batch=1) == 10 * f32
    # Cutting before c: b (20) and a (10) cross.
    assert t.cut_bytes(2) == 30 * f32
    # The linear table the coarsening reads agrees at every position.
    assert cut_bytes(g, unit, 4).tolist() == [t.cut_bytes(p) for p in range(5)]


def test_coarsen_balances_time_and_covers_all_components():
    g = linear_chain([16] * 41)
    comps = atomic_components(g)
    blocks = coarsen(
        comps,
        [1.0] * 40,
        [frozenset()] * 40,
        {},
        [0.0] * 41,
        target_blocks=8,
        block_bytes_cap=float("inf"),
    )
    assert [b.end - b.start for b in blocks] == [5] * 8
    assert blocks[0].start == 0 and blocks[-1].end == 40
    assert all(a.end == b.start for a, b in itertools.pairwise(blocks))


def test_coarsen_moves_cuts_to_cheap_boundaries():
    comps = atomic_components(linear_chain([16] * 9))
    cuts = [0.0, 9, 9, 1, 9, 9, 9, 9, 0.0]
    blocks = coarsen(
        comps, [1.0] * 8, [frozenset()] * 8, {}, cuts, target_blocks=2, block_bytes_cap=1e18
    )
    assert blocks[0].end == 3


def test_coarsen_memory_cap_gives_big_components_their_own_block():
    comps = atomic_components(linear_chain([16] * 5))
    params = [frozenset({f"p{i}"}) for i in range(4)]
    state = {f"p{i}": 10.0 for i in range(4)}
    blocks = coarsen(
        comps, [1.0] * 4, params, state, [0.0] * 5, target_blocks=1, block_bytes_cap=15.0
    )
    assert len(blocks) == 4


def test_coarsen_counts_shared_parameters_once():
    comps = atomic_components(linear_chain([16] * 5))
    params = [frozenset({"shared"})] * 4
    blocks = coarsen(
        comps, [1.0] * 4, params, {"shared": 10.0}, [0.0] * 5, target_blocks=1, block_bytes_cap=15.0
    )
    assert len(blocks) == 1


def _plan(devices=2):
    stages = [
        StagePlan(0, [0], ["a"], ["a"], ["w"], 100, 0.1, 0.2, False, 4),
        StagePlan(1, list(range(1, devices)), ["b"], ["b"], [], 50, 0.1, 0.2, True, 4),
    ]
    return Plan("abc123", 8, 2, devices, {"name": "cpu"}, "adam", 1000, stages, 1.0, 8.0)


def test_plan_json_round_trip(tmp_path):
    plan = _plan(3)
    path = tmp_path / "p.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["stages"][1]["ranks"] == [1, 2]
    assert Plan.load(path) == plan


def _plan_graph(fingerprint: str = "abc123"):
    """The graph `_plan` fits: op ``a`` reads weight ``w``, op ``b`` reads ``a``."""
    nodes = [
        Node("x", "input", NodeKind.INPUT, (), (), act(4), ""),
        Node("a", "op", NodeKind.BATCH, ("x",), ("w",), act(4), "a"),
        Node("b", "op", NodeKind.BATCH, ("a",), (), act(4), "b"),
        Node("output", "output", NodeKind.OUTPUT, ("b",), (), (), ""),
    ]
    g = graph(nodes, {"w": ParamSpec("w", (4, 4), "torch.float32")})
    g.fingerprint = fingerprint
    return g


def test_plan_for_another_model_is_rejected():
    _plan().validate_for(_plan_graph(), world_size=2)
    with pytest.raises(PlanError, match="different model"):
        _plan().validate_for(_plan_graph("ffff"))
    with pytest.raises(PlanError, match="4 ranks"):
        _plan().validate_for(_plan_graph(), world_size=4)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d["stages"][0].update(ranks=[1]), "exactly once"),
        (lambda d: d["stages"][1].update(ranks=[]), "stage 1 has no ranks"),
        (lambda d: d["stages"][1].update(index=0), "stage 1 says it is stage 0"),
        (lambda d: d.pop("stages"), "missing"),
    ],
)
def test_corrupt_plans_are_rejected(tmp_path, mutate, message):
    data = json.loads(_plan().to_json())
    mutate(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_truncated_plan_file_is_rejected(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(_plan().to_json()[:50])
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)


def _footprint(**sizes):
    from autopart.plan.memory import StageFootprint

    base = dict.fromkeys(StageFootprint.__dataclass_fields__, 0.0)
    return StageFootprint(**{**base, **sizes})


def test_memory_model_charges_what_each_offload_mode_leaves_on_the_device():
    from autopart.plan.memory import MemoryModel

    mib = 2**20
    fp = _footprint(
        param_bytes=100 * mib,
        trainable_bytes=96 * mib,
        buffer_bytes=4 * mib,
        saved_per_sample=1 * mib,
        largest_group_bytes=10 * mib,
        largest_param_bytes=8 * mib,
    )
    model = MemoryModel(optimizer_factor=2.0, prefetch=2)

    def peak(offload, zero=False, replicas=1, rows=8):
        got = model.peak_bytes(fp, [rows], 1, [replicas], False, offload=offload, zero=zero)
        return float(got[0]) / mib

    # On the device: parameters, gradients, two Adam moments, the activations, one bucket.
    assert peak("none", replicas=2) == 100 + 96 + 192 + 8 + 25
    assert peak("none", zero=True, replicas=2) == 100 + 96 + 96 + 8 + 25
    # Offloaded: buffers, one op's parameters and gradients, two parameters prefetched.
    working = 4 + 2 * 10 + 2 * 8
    assert peak("params+optimizer") == working + 8
    # The optimizer state stays; the step brings parameters and gradients back beside it.
    assert peak("params") == 100 + 96 + 192
    assert peak("params", rows=400) == working + 192 + 400


def test_allowed_boundaries_follow_repeated_layers_at_any_depth():
    """Inside a repeated layer a block may end only between its children and where no more
    bytes cross than at its cheapest boundary; a bare Sequential's layers are ``0``, ``1``."""
    import numpy as np

    from autopart.plan.blocks import allowed_boundaries

    for prefix in ("", "transformer.h."):
        paths = [
            f"{prefix}0.attn.q",
            f"{prefix}0.attn.k",  # inside attention
            f"{prefix}0",  # the residual add
            f"{prefix}0.mlp.fc",
            f"{prefix}0.mlp.proj",  # inside the MLP
            f"{prefix}1.attn.q",
        ]
        cuts = np.array([1.0, 1.0, 3.0, 1.0, 1.0, 4.0, 1.0])
        allowed = allowed_boundaries(paths, cuts).tolist()
        # Before 1 and 4: inside a child; before 2: between children, but more crosses than
        # at the layer's cheapest; before 3 (attention | MLP) and 5 (the next layer): allowed.
        assert allowed == [True, False, False, True, False, True, True], prefix


def test_autocast_saved_bytes_keep_parameter_only_ops_and_halve_matmuls():
    """Under bf16 autocast a matmul's saved input is half as wide and its weight's bf16 copy is
    saved; an op on parameters alone keeps its captured bytes (none may go missing)."""
    import torch

    from autopart.capture import capture
    from autopart.ir import NodeKind
    from autopart.plan.autocast import autocast_saved

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(16, 16)
            self.scale = torch.nn.Parameter(torch.ones(16))

        def forward(self, x):
            return self.linear(x) * (self.scale * 2).exp()

    graph = capture(Scaled(), (torch.randn(2, 16),))
    saved = autocast_saved(graph, "torch.bfloat16")
    assert set(saved) == {n.name for n in graph.nodes}
    matmuls = 0
    for node in graph.nodes:
        plain = (node.stats.saved_per_sample, node.stats.saved_fixed)
        if node.kind is NodeKind.PARAM_ONLY:
            assert saved[node.name] == plain
        if node.op in ("aten.linear.default", "aten.addmm.default"):
            matmuls += 1
            assert saved[node.name][0] == plain[0] / 2
            assert saved[node.name][1] == plain[1] / 2 + 16 * 16 * 2  # the weight's bf16 copy
    assert matmuls == 1
    assert any(n.kind is NodeKind.PARAM_ONLY and n.stats.saved_fixed for n in graph.nodes)

import dataclasses

import numpy as np
import pytest

from autopart.cost import BUILTIN_SPECS, AnalyticCostModel, BlockTimer
from autopart.errors import AutopartError
from autopart.ir import Node, NodeKind, NodeStats, TensorSpec

H100 = BUILTIN_SPECS["h100"]
LATENCY = H100.kernel_latency_s


def make_node(name, kind=NodeKind.BATCH, **stats):
    return Node(
        name=name,
        op="aten.linear.default",
        kind=kind,
        inputs=(),
        params=(),
        outputs=(TensorSpec((1, 16), "torch.float32", batch_dim=0),),
        module_path="layer",
        stats=NodeStats(**stats),
    )


def test_compute_bound_node():
    node = make_node("mm", flops_per_sample=1e12, bytes_per_sample=1e3, grad_inputs=2)
    model = AnalyticCostModel(H100, dtype="bfloat16")
    forward, backward = model.block_seconds([node], batch=4)
    peak = H100.peak("bfloat16")
    assert forward == pytest.approx(4e12 / peak + LATENCY)
    assert backward == pytest.approx(2 * 4e12 / peak + 2 * LATENCY)


def test_memory_bound_node():
    node = make_node("add", flops_per_sample=1e3, bytes_per_sample=1e9, grad_inputs=1)
    forward, backward = AnalyticCostModel(H100).block_seconds([node], batch=2)
    assert forward == pytest.approx(2e9 / H100.memory_bandwidth + LATENCY)
    assert backward == pytest.approx(2 * 2e9 / H100.memory_bandwidth + LATENCY)


def test_backward_scales_with_grad_inputs_and_is_zero_without_them():
    model = AnalyticCostModel(H100)
    one = make_node("a", flops_per_sample=1e12, grad_inputs=1)
    three = make_node("b", flops_per_sample=1e12, grad_inputs=3)
    none = make_node("c", flops_per_sample=1e12, grad_inputs=0)
    fwd, bwd_one = model.block_seconds([one], 1)
    _, bwd_three = model.block_seconds([three], 1)
    assert bwd_one == pytest.approx(fwd)
    assert bwd_three == pytest.approx(3 * (fwd - LATENCY) + 3 * LATENCY)
    assert model.block_seconds([none], 1)[1] == 0.0


def test_views_cost_nothing():
    view = make_node("view", grad_inputs=1)
    assert AnalyticCostModel(H100).block_seconds([view], 8) == (0.0, 0.0)


def test_block_is_the_sum_of_its_nodes():
    model = AnalyticCostModel(H100)
    a = make_node("a", flops_per_sample=1e11, bytes_per_sample=1e6, grad_inputs=2)
    b = make_node("b", flops_per_sample=1e3, bytes_per_sample=1e9, grad_inputs=1)
    both = model.block_seconds([a, b], 16)
    alone = [model.block_seconds([n], 16) for n in (a, b)]
    assert both[0] == pytest.approx(alone[0][0] + alone[1][0])
    assert both[1] == pytest.approx(alone[0][1] + alone[1][1])


def test_batch_scaling_and_fixed_parts():
    model = AnalyticCostModel(H100)
    node = make_node("mm", flops_per_sample=1e12, flops_fixed=1e12, grad_inputs=1)
    t1 = model.block_seconds([node], 1)[0] - LATENCY
    t8 = model.block_seconds([node], 8)[0] - LATENCY
    assert t8 == pytest.approx(t1 * 9 / 2)


def test_param_only_nodes_cost_their_fixed_part_once():
    model = AnalyticCostModel(H100)
    transposed = make_node(
        "t", kind=NodeKind.PARAM_ONLY, flops_per_sample=1e12, bytes_fixed=1e9, grad_inputs=1
    )
    small, large = (model.block_seconds([transposed], b) for b in (1, 64))
    assert small == large
    assert small[0] == pytest.approx(1e9 / H100.memory_bandwidth + LATENCY)


def test_inputs_and_outputs_cost_nothing():
    model = AnalyticCostModel(H100)
    for kind in (NodeKind.INPUT, NodeKind.OUTPUT):
        node = make_node("x", kind=kind, bytes_per_sample=1e9, grad_inputs=1)
        assert model.block_seconds([node], 4) == (0.0, 0.0)


def test_unknown_dtype_is_an_error():
    with pytest.raises(AutopartError, match="float64"):
        AnalyticCostModel(H100, dtype="torch.float64")


def test_block_timer_matches_block_seconds():
    model = AnalyticCostModel(H100)
    rng = np.random.default_rng(0)
    nodes = [
        make_node(
            f"n{i}",
            flops_per_sample=float(rng.uniform(0, 1e11)),
            bytes_per_sample=float(rng.uniform(0, 1e8)),
            grad_inputs=int(rng.integers(0, 3)),
        )
        for i in range(50)
    ]
    shared = dataclasses.replace(nodes[0], name="shared", kind=NodeKind.PARAM_ONLY)
    shared = dataclasses.replace(shared, stats=NodeStats(flops_fixed=1e10, grad_inputs=1))
    units = [[shared, *nodes[i : i + 5]] for i in range(0, 50, 5)]
    timer = BlockTimer(model, units)
    for batch in (1, 7):
        fwd, bwd = timer.unit_seconds(batch)
        for k, unit in enumerate(units):
            assert (fwd[k], bwd[k]) == pytest.approx(model.block_seconds(unit, batch))
        start, end = 2, 7
        flat = [n for unit in units[start:end] for n in unit]
        assert timer.range_seconds(start, end, batch) == pytest.approx(
            model.block_seconds(flat, batch)
        )
        many_fwd, _ = timer.range_seconds(np.array([0, 3]), np.array([10, 4]), batch)
        assert many_fwd == pytest.approx([fwd.sum(), fwd[3]])
    assert model.timer(units).num_units == 10


def test_block_timer_handles_large_graphs():
    """20,000 nodes in 2,000 units: prefix sums over every batch and ranges stay consistent."""
    model = AnalyticCostModel(H100)
    nodes = [make_node(f"n{i}", flops_per_sample=1e9, grad_inputs=1) for i in range(20_000)]
    units = [nodes[i : i + 10] for i in range(0, len(nodes), 10)]
    timer = BlockTimer(model, units)
    for batch in range(1, 33):
        timer.prefix(batch)
    fwd, _ = timer.range_seconds(np.arange(1000), np.arange(1000) + 1000, 5)
    assert np.allclose(fwd, fwd[0])  # identical units: every 1000-unit range costs the same
    whole, _ = timer.range_seconds(np.array([0]), np.array([2000]), 5)
    assert whole[0] == pytest.approx(2 * fwd[0])

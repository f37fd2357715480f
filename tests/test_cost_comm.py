import numpy as np
import pytest

from autopart.cost import (
    BUILTIN_SPECS,
    allreduce_seconds,
    allreduce_seconds_array,
    crosses_nodes,
    p2p_seconds,
    p2p_seconds_array,
)

H100 = BUILTIN_SPECS["h100"]


def test_allreduce_is_free_for_one_replica():
    assert allreduce_seconds(1e9, 1, H100, cross_node=False) == 0.0


def test_allreduce_ring_formula():
    r, size = 4, 1e9
    transfer = 2 * (r - 1) / r * size / H100.intra_node_bandwidth
    expected = transfer + 2 * (r - 1) * H100.link_latency_s
    assert allreduce_seconds(size, r, H100, cross_node=False) == pytest.approx(expected)


def test_allreduce_grows_with_bytes_and_is_slower_across_nodes():
    small = allreduce_seconds(1e6, 8, H100, cross_node=False)
    large = allreduce_seconds(1e9, 8, H100, cross_node=False)
    assert 0 < small < large
    assert allreduce_seconds(1e9, 8, H100, cross_node=True) > 5 * large


def test_crosses_nodes_by_replica_count():
    assert not crosses_nodes(8, H100)
    assert crosses_nodes(9, H100)
    assert crosses_nodes(np.array([1, 8, 16]), H100).tolist() == [False, False, True]


def test_vectorized_allreduce_matches_scalar():
    replicas = np.array([1, 2, 4, 8, 16, 64])
    times = allreduce_seconds_array(5e8, replicas, H100)
    for r, t in zip(replicas, times, strict=True):
        assert t == pytest.approx(allreduce_seconds(5e8, int(r), H100, bool(r > 8)))
    assert times[0] == 0.0
    assert times[-1] > times[-2]  # more ring steps, same inter-node bandwidth


def test_p2p():
    assert p2p_seconds(0, H100, cross_node=False) == 0.0
    intra = p2p_seconds(1e8, H100, cross_node=False)
    assert intra == pytest.approx(H100.link_latency_s + 1e8 / H100.intra_node_bandwidth)
    assert p2p_seconds(1e8, H100, cross_node=True) > intra
    both = p2p_seconds_array(np.array([1e8, 1e8]), H100, np.array([False, True]))
    assert both[0] == pytest.approx(intra)
    assert both[1] > both[0]

import datetime
import json
import multiprocessing

import pytest
import torch.distributed as dist

from autopart.cost import BUILTIN_SPECS, LinkMeasurement, measure_links
from autopart.errors import AutopartError

WORLD = 2
JOIN_TIMEOUT_S = 60


def _worker(rank, store, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=20),
    )
    try:
        result = measure_links(sizes=(1 << 14, 1 << 20), iters=2)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result.__dict__))
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_measure_links_on_two_gloo_ranks(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    store = tmp_path / "store"
    procs = [ctx.Process(target=_worker, args=(r, store, tmp_path)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, "a rank hung"
    assert [p.exitcode for p in procs] == [0] * WORLD

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert results[0] == results[1]  # every rank reports the same numbers
    links = LinkMeasurement(**results[0])
    assert links.world_size == WORLD
    assert links.p2p_bandwidth > 1e6
    assert links.allreduce_bandwidth > 1e6
    assert links.p2p_latency_s >= 0

    spec = links.apply(BUILTIN_SPECS["h100"], cross_node=False)
    assert spec.intra_node_bandwidth == min(links.p2p_bandwidth, links.allreduce_bandwidth)
    assert spec.inter_node_bandwidth == BUILTIN_SPECS["h100"].inter_node_bandwidth
    crossed = links.apply(BUILTIN_SPECS["h100"], cross_node=True)
    assert crossed.inter_node_bandwidth == spec.intra_node_bandwidth


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(AutopartError, match="process group"):
        measure_links()

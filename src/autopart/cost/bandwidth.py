"""Link bandwidth and latency measured on a live process group.

Datasheet link numbers are upper bounds and the placeholders for unknown hardware are guesses,
so a job that is already running can measure its links and plan with those.  Two measurements,
each at a few message sizes so that latency and bandwidth separate (time = latency + bytes /
bandwidth, fitted by least squares):

* point-to-point: a ping-pong between ranks 0 and 1 of the group (the pipeline's stage-to-stage
  send), half the round trip being one send;
* allreduce over the whole group, fitted to the ring model of `autopart.cost.comm` so that the
  result plugs back into it ("bus bandwidth" in nccl-tests terms).

Every rank of the group must call `measure_links`; all of them return the same numbers (each
time is the maximum over ranks).  Whether the links measured are intra- or inter-node depends on
where the group's ranks run: `LinkMeasurement.apply` writes them into the matching fields.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from autopart.cost.remembered import machine_key, recall, remember
from autopart.cost.spec import DeviceSpec
from autopart.device import synchronize
from autopart.errors import AutopartError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkMeasurement:
    """Measured links of a group of ``world_size`` ranks (bandwidths in B/s per direction)."""

    world_size: int
    p2p_bandwidth: float
    p2p_latency_s: float
    allreduce_bandwidth: float
    allreduce_latency_s: float

    def apply(self, spec: DeviceSpec, cross_node: bool) -> DeviceSpec:
        """``spec`` with the intra- (or inter-) node bandwidth and the link latency replaced.

        A spec has one bandwidth per link for both sends and allreduce, so it takes the slower
        of the two measurements and the larger latency: plans stay on the safe side.
        """
        bandwidth = min(self.p2p_bandwidth, self.allreduce_bandwidth)
        field = "inter_node_bandwidth" if cross_node else "intra_node_bandwidth"
        latency = max(self.p2p_latency_s, self.allreduce_latency_s)
        changes: dict[str, Any] = {field: bandwidth, "link_latency_s": latency}
        return dataclasses.replace(spec, **changes)


def measure_links(
    group: dist.ProcessGroup | None = None,
    sizes: Sequence[int] = (1 << 20, 16 << 20),
    iters: int = 3,
) -> LinkMeasurement:
    """Measure point-to-point and allreduce links of ``group`` (default: the world).

    ``sizes`` are message sizes in bytes; ``iters`` timed repeats per size follow one warm-up.
    Collective: every rank of the group must call it with the same arguments.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise AutopartError("measure_links needs an initialized torch.distributed process group")
    world = dist.get_world_size(group)
    if world < 2:
        raise AutopartError("measure_links needs a process group of at least 2 ranks")
    if not sizes or iters < 1:
        raise AutopartError("measure_links needs at least one message size and iters >= 1")
    device = _comm_device(group)
    rank = dist.get_rank(group)
    members = group or dist.group.WORLD
    assert members is not None  # the process group is initialized
    first = dist.get_global_rank(members, 0)
    second = dist.get_global_rank(members, 1)

    p2p, allreduce = [], []
    for size in sizes:
        buffer = torch.zeros(max(size // 4, 1), dtype=torch.float32, device=device)
        p2p.append(_ping_pong(buffer, rank, first, second, iters, group, device))
        allreduce.append(_allreduce(buffer, iters, group, device))
    # Every rank reports the same numbers: the slowest rank's times.
    times = torch.tensor(p2p + allreduce, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    p2p_times = times[: len(sizes)].tolist()
    allreduce_times = times[len(sizes) :].tolist()

    nbytes = np.array([max(size // 4, 1) * 4 for size in sizes], dtype=float)
    p2p_bw, p2p_lat = _fit(nbytes, np.array(p2p_times))
    steps = 2.0 * (world - 1)
    ring_bw, ring_intercept = _fit(nbytes * steps / world, np.array(allreduce_times))
    result = LinkMeasurement(
        world_size=world,
        p2p_bandwidth=p2p_bw,
        p2p_latency_s=p2p_lat,
        allreduce_bandwidth=ring_bw,
        allreduce_latency_s=ring_intercept / steps,
    )
    log.info("measured links: %s", result)
    return result


#: The measured fields of a `LinkMeasurement`, in the order they are broadcast.
_LINK_FIELDS = ("p2p_bandwidth", "p2p_latency_s", "allreduce_bandwidth", "allreduce_latency_s")


def remembered_links(
    group: dist.ProcessGroup | None, local_world: int, **measuring: Any
) -> LinkMeasurement:
    """`measure_links` taken once per machine and job shape, then kept
    (`autopart.cost.remembered`): every rank gets the first rank's kept numbers, or all join
    a measurement when it has none.  Collective."""
    world = dist.get_world_size(group)
    members = group or dist.group.WORLD
    assert members is not None
    first = dist.get_global_rank(members, 0)
    key = machine_key("links", dist.get_backend(group), world, local_world)
    kept = recall(key) if dist.get_rank() == first else None
    values = [float(kept is not None), *((kept or {}).get(f, 0.0) for f in _LINK_FIELDS)]
    shared = torch.tensor(values, dtype=torch.float64, device=_comm_device(group))
    dist.broadcast(shared, src=first, group=group)
    if shared[0]:
        return LinkMeasurement(world, *shared[1:].tolist())
    result = measure_links(group, **measuring)
    if dist.get_rank() == first:  # later launches read what is kept: use it from now on
        kept = remember(key, {f: getattr(result, f) for f in _LINK_FIELDS})
        result = LinkMeasurement(world, *(kept[f] for f in _LINK_FIELDS))
    return result


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL moves CUDA tensors; every other backend here moves CPU tensors."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ping_pong(
    buffer: torch.Tensor,
    rank: int,
    first: int,
    second: int,
    iters: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> float:
    """Median one-way seconds of sending ``buffer`` between group ranks 0 and 1 (0 elsewhere)."""
    samples = []
    for i in range(iters + 1):
        _barrier(group, device)
        start = time.perf_counter()
        if rank == 0:
            dist.send(buffer, dst=second, group=group)
            dist.recv(buffer, src=second, group=group)
        elif rank == 1:
            dist.recv(buffer, src=first, group=group)
            dist.send(buffer, dst=first, group=group)
        synchronize(device)
        if i > 0:
            samples.append((time.perf_counter() - start) / 2)
    return statistics.median(samples) if rank in (0, 1) else 0.0


def _allreduce(
    buffer: torch.Tensor, iters: int, group: dist.ProcessGroup | None, device: torch.device
) -> float:
    samples = []
    for i in range(iters + 1):
        _barrier(group, device)
        start = time.perf_counter()
        dist.all_reduce(buffer, group=group)
        synchronize(device)
        if i > 0:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _barrier(group: dist.ProcessGroup | None, device: torch.device) -> None:
    """A tiny allreduce: unlike ``dist.barrier`` it needs no device hint under NCCL."""
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    synchronize(device)


def _fit(nbytes: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """``(bandwidth, latency)`` of ``seconds = latency + nbytes / bandwidth``.

    With one size, or when noise makes the slope non-positive, the latency is taken as 0 and the
    bandwidth from the largest message.
    """
    if len(nbytes) > 1:
        slope, intercept = np.polyfit(nbytes, seconds, 1)
        if slope > 0:
            return float(1.0 / slope), float(max(intercept, 0.0))
    largest = int(np.argmax(nbytes))
    return float(nbytes[largest] / max(seconds[largest], 1e-12)), 0.0

"""Specs for the devices this process can see, measured rather than looked up.

CPUs differ too much for a table, so ``cpu`` is measured: one short matmul for FLOP/s, one large
copy for memory bandwidth, total RAM (capped by a cgroup limit when running in a container).  It
takes well under a second, and is kept on disk (`autopart.cost.remembered`) so that every
launch plans with the same numbers.  The same measurements
serve for a GPU that has no built-in spec.  Link bandwidths cannot be measured without peers, so
they are conservative placeholders; `autopart.cost.bandwidth.measure_links` measures them on a
live process group.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from autopart.cost.remembered import machine_key, remembered
from autopart.cost.spec import DTYPES, DeviceSpec
from autopart.device import device_name, pinned, synchronize

log = logging.getLogger(__name__)

_MATMUL_N = 512
_COPY_BYTES = 64 << 20
_REPEATS = 5
_CPU_OP_LATENCY_S = 5e-6  # eager PyTorch dispatch of one op
_GLOO_LATENCY_S = 50e-6  # one small gloo message over loopback TCP
_CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


@functools.cache
def cpu_spec() -> DeviceSpec:
    """This machine's CPU as a device, for planning the multi-process CPU runs (demo, tests).

    Half-precision peaks equal the float32 one: CPUs without AMX run them no faster.  Links are
    gloo over loopback TCP inside the machine and 10 GbE between machines.
    """
    cpu = torch.device("cpu")

    def measure() -> dict[str, float]:
        return {
            "flops": measure_matmul_flops(cpu, torch.float32),
            "bandwidth": measure_memory_bandwidth(cpu),
        }

    # Ranks measure at once: the numbers are this many processes' share of the machine.
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    measured = remembered(machine_key("cpu", device_name(cpu), f"{ranks}ranks"), measure)
    flops, bandwidth = measured["flops"], measured["bandwidth"]
    spec = DeviceSpec(
        name="cpu",
        memory_bytes=host_memory_bytes(),
        peak_flops=dict.fromkeys(DTYPES, flops),
        memory_bandwidth=bandwidth,
        intra_node_bandwidth=5e9,
        inter_node_bandwidth=1.25e9,
        devices_per_node=os.cpu_count() or 1,
        host_link_bandwidth=bandwidth,
        host_memory_bandwidth=bandwidth,
        kernel_latency_s=_CPU_OP_LATENCY_S,
        link_latency_s=_GLOO_LATENCY_S,
    )
    log.info(
        "cpu: %.1f GFLOP/s float32, %.1f GB/s memory, %.1f GB RAM",
        flops / 1e9,
        bandwidth / 1e9,
        spec.memory_bytes / 1e9,
    )
    return spec


def measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a square matmul over a few repeats (one warm-up)."""
    n = _MATMUL_N
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _best_seconds(device, lambda: torch.mm(a, b))
    return 2 * n**3 / seconds


def measure_memory_bandwidth(device: torch.device) -> float:
    """Best bytes/s of a large device-to-device copy (each byte is read once, written once)."""
    src = torch.empty(_COPY_BYTES, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = _best_seconds(device, lambda: dst.copy_(src))
    return 2 * _COPY_BYTES / seconds


def measure_host_link(device: torch.device) -> float:
    """Best bytes/s of a copy from pinned host memory to ``device``: what offload's
    prefetches get.  On the CPU it is the memory bandwidth of a plain copy."""
    if device.type != "cuda":
        return measure_memory_bandwidth(device) / 2
    src = pinned(torch.empty(_COPY_BYTES, dtype=torch.uint8), device)
    dst = torch.empty(_COPY_BYTES, dtype=torch.uint8, device=device)
    seconds = _best_seconds(device, lambda: dst.copy_(src, non_blocking=True))
    return _COPY_BYTES / seconds


def _best_seconds(device: torch.device, fn) -> float:
    fn()
    best = float("inf")
    for _ in range(_REPEATS):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def host_memory_bytes() -> int:
    """Physical RAM, or the container's cgroup v2 limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = _CGROUP_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total

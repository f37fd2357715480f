"""Time models of the two collectives the plan uses: stage-to-stage sends and gradient allreduce.

Both are latency + bytes / bandwidth.  Allreduce is NCCL's and gloo's ring: each replica sends and
receives ``2 (r - 1) / r`` of the buffer in ``2 (r - 1)`` steps, so its time barely grows with the
replica count while the slowest link of the ring sets the bandwidth.  A ring that spans nodes runs
at the per-device inter-node bandwidth.

The ``*_array`` variants take numpy arrays (of replica counts, byte counts or cross-node flags)
and broadcast, because the stage DP evaluates every replica count of a stage at once; the scalar
functions are thin wrappers over them, so both always agree.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from autopart.cost.spec import DeviceSpec


def crosses_nodes(replicas: ArrayLike, spec: DeviceSpec) -> np.ndarray:
    """Whether ``replicas`` devices, packed onto as few nodes as possible, span several nodes."""
    return np.asarray(replicas) > spec.devices_per_node


def p2p_seconds(nbytes: float, spec: DeviceSpec, cross_node: bool) -> float:
    """Time to send ``nbytes`` from one device to another (0 when there is nothing to send)."""
    return float(p2p_seconds_array(nbytes, spec, cross_node))


def p2p_seconds_array(nbytes: ArrayLike, spec: DeviceSpec, cross_node: ArrayLike) -> np.ndarray:
    size = np.asarray(nbytes, dtype=float)
    bandwidth = np.where(cross_node, spec.inter_node_bandwidth, spec.intra_node_bandwidth)
    return np.where(size > 0, spec.link_latency_s + size / bandwidth, 0.0)


def allreduce_seconds(nbytes: float, replicas: int, spec: DeviceSpec, cross_node: bool) -> float:
    """Ring allreduce of ``nbytes`` over ``replicas`` devices (0 for a single replica)."""
    return float(allreduce_seconds_array(nbytes, replicas, spec, cross_node))


def allreduce_seconds_array(
    nbytes: ArrayLike,
    replicas: ArrayLike,
    spec: DeviceSpec,
    cross_node: ArrayLike | None = None,
) -> np.ndarray:
    """Vectorized `allreduce_seconds`; ``cross_node=None`` decides it by `crosses_nodes`."""
    r = np.asarray(replicas, dtype=float)
    if cross_node is None:
        cross_node = crosses_nodes(r, spec)
    bandwidth = np.where(cross_node, spec.inter_node_bandwidth, spec.intra_node_bandwidth)
    steps = 2.0 * (r - 1.0)
    share = np.divide(steps, r, out=np.zeros_like(r), where=r > 0)
    seconds = share * np.asarray(nbytes, dtype=float) / bandwidth + steps * spec.link_latency_s
    return np.where(r > 1, seconds, 0.0)

"""Cost every candidate stage for the stage DP: time per microbatch slot, allreduce, memory.

A candidate stage is a run of blocks ``[start, end)`` at ``M`` microbatches, of which the
schedule keeps ``in_flight`` forwarded at once (all ``M`` by default, as GPipe does); the DP
asks for all candidate replica counts at once, so everything here is vectorized over
replicas.  Block times come from the cost model (analytic or measured) and are summed per
stage, as RaNNC's fast mode does; they are computed once per distinct microbatch size and
kept as prefix sums.

Each candidate is tried in every way it may run: with or without recomputation, and, where
allowed, with its parameters (and optimizer state) in host memory and with its optimizer state
and gradients split over its replicas (ZeRO).  The fastest that fits wins; on a tie, the
earliest of (on device before offloaded, without ZeRO before with, no recomputation first).
ZeRO is charged no extra time: reducing each gradient to its owner and gathering the updated
parameters move what one allreduce moves.  An offloaded stage copies its parameters to the
device in every microbatch's forward, again in its recomputation and its backward, and sends
each microbatch's gradients back: the copies to the device overlap compute (side stream), the
gradients going back do not.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from autopart.config import Offload
from autopart.cost import CostModel, DeviceSpec, allreduce_seconds_array, p2p_seconds_array
from autopart.ir import Graph, dtype_bytes
from autopart.plan.autocast import autocast_saved, cast_weights
from autopart.plan.memory import HOST_GRAD_TRAFFIC, MemoryModel, StageFootprint
from autopart.plan.stage_table import StageCosts
from autopart.plan.traffic import RangeTraffic


class StageCoster:
    """Callable ``(start, end, microbatches) -> StageCosts`` over the candidate replica counts."""

    def __init__(
        self,
        graph: Graph,
        block_nodes: Sequence[Sequence[str]],
        traffic: RangeTraffic,
        cost_model: CostModel,
        memory: MemoryModel,
        *,
        capacity_bytes: float,
        global_batch: int,
        devices: int,
        replicas: np.ndarray,
        offload: str = "none",
        zero: bool | str = False,
        autocast: str | None = None,
        host_step_traffic: float = 0.0,
    ) -> None:
        self.graph = graph
        #: Host memory bytes an optimizer step over offloaded state moves per parameter byte.
        self.host_step_traffic = host_step_traffic
        #: Saved bytes per node as the stage runs them: under autocast, narrower, with the
        #: weights' low-precision copies (`autopart.plan.autocast`).
        self._saved = (
            autocast_saved(graph, autocast)
            if autocast
            else {n.name: (n.stats.saved_per_sample, n.stats.saved_fixed) for n in graph.nodes}
        )
        #: Each weight's bytes over the host link when offloaded: its cast's where autocast
        #: casts every read of it.
        narrow = dtype_bytes(autocast) if autocast else 0
        cast = cast_weights(graph) if autocast else frozenset()
        self._link = {
            name: spec.nbytes * (narrow / dtype_bytes(spec.dtype) if name in cast else 1.0)
            for name, spec in graph.params.items()
        }
        self.block_names = [list(names) for names in block_nodes]
        self.block_nodes = [[graph.node(n) for n in names] for names in block_nodes]
        self.traffic = traffic
        self.cost_model = cost_model
        self.memory = memory
        self.capacity = capacity_bytes
        self.global_batch = global_batch
        self.replicas = np.asarray(replicas, dtype=np.int64)
        self.spec: DeviceSpec = cost_model.device
        self.cross_node_p2p = devices > self.spec.devices_per_node
        offload_modes = tuple(Offload) if offload == "auto" else (Offload(offload),)
        zero_modes = (False, True) if zero == "auto" else (bool(zero),)
        #: The ways a stage may run, in order of preference; the search picks by index.
        self.modes = [
            RunMode(recompute, mode, zero)
            for mode, zero, recompute in itertools.product(offload_modes, zero_modes, (False, True))
        ]
        self.offload_modes = offload_modes
        self._block_params = [
            frozenset(p for node in nodes for p in node.params) for nodes in self.block_nodes
        ]
        self._prefix_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rows_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.footprint = cache(self._footprint)

    def __call__(
        self, start: int, end: int, microbatches: int, in_flight: int | None = None
    ) -> StageCosts:
        # Not cached: the search asks for each stage once, and keeping every answer (one array
        # per replica count) would hold memory the search no longer reads.
        return self._stage_costs(start, end, microbatches, in_flight)

    def host_step_seconds(self, fp: StageFootprint) -> float:
        """An optimizer step over a stage's state in host memory, at its bandwidth."""
        return self.host_step_traffic * fp.trainable_bytes / self.spec.host_memory_bandwidth

    def offloaded_slot(
        self, fp: StageFootprint, compute: np.ndarray, recompute: bool
    ) -> np.ndarray:
        """A microbatch of an offloaded stage: its compute, or the weights' copies to the
        device (forward, a recomputation, backward) where those take longer; the gradients'
        copies back overlap it too, on their own stream (the link carries both directions at
        once).  Then the host adds the gradients into ``.grad``, which nothing overlaps."""
        link = self.spec.host_link_bandwidth
        copies = (3 if recompute else 2) * fp.link_bytes / link
        overlapped = np.maximum(np.maximum(compute, copies), fp.link_grad_bytes / link)
        host_add = HOST_GRAD_TRAFFIC * fp.trainable_bytes / self.spec.host_memory_bandwidth
        return overlapped + host_add

    def with_replicas(self, replicas: np.ndarray) -> StageCoster:
        """The same stages costed over other replica counts (to ask what more devices need):
        only the row counts depend on the replica axis, so everything else is shared."""
        other = copy.copy(self)
        other.replicas = np.asarray(replicas, dtype=np.int64)
        other._rows_cache = {}
        return other

    def rows(self, microbatches: int) -> np.ndarray:
        """Samples per replica per microbatch; 0 where a replica would get no sample."""
        per_mb = -(-self.global_batch // microbatches)
        rows = -(-per_mb // self.replicas)
        return np.where(self.replicas * microbatches <= self.global_batch, rows, 0)

    def _distinct_rows(self, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
        if microbatches not in self._rows_cache:
            self._rows_cache[microbatches] = np.unique(self.rows(microbatches), return_inverse=True)
        return self._rows_cache[microbatches]

    def seconds(self, start: int, end: int, rows: int) -> tuple[float, float]:
        fwd, bwd = self._prefix(rows)
        return float(fwd[end] - fwd[start]), float(bwd[end] - bwd[start])

    def stage_params(self, start: int, end: int) -> frozenset[str]:
        return frozenset().union(*self._block_params[start:end])

    def _prefix(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        if rows not in self._prefix_cache:
            times = np.array([self.cost_model.block_seconds(n, rows) for n in self.block_nodes])
            zero = np.zeros((1, 2))
            acc = np.cumsum(np.vstack([zero, times]), axis=0)
            self._prefix_cache[rows] = (acc[:, 0], acc[:, 1])
        return self._prefix_cache[rows]

    def _footprint(self, start: int, end: int) -> StageFootprint:
        params = [self.graph.params[p] for p in self.stage_params(start, end)]
        nodes = [n for block in self.block_nodes[start:end] for n in block]
        largest_ps = max(
            (sum(t.nbytes(1) for t in n.outputs if t.is_batch) for n in nodes), default=0
        )
        largest_fx = max(
            (sum(t.nbytes() for t in n.outputs if not t.is_batch) for n in nodes), default=0
        )
        t = self.traffic
        groups = [sum(self.graph.params[p].nbytes for p in n.params) for n in nodes]
        delivered = set(self.graph.delivered())
        outputs = [s for n in nodes if n.name in delivered for s in n.outputs]
        return StageFootprint(
            param_bytes=sum(p.nbytes for p in params),
            trainable_bytes=sum(p.nbytes for p in params if p.requires_grad and not p.is_buffer),
            saved_per_sample=sum(self._saved[n.name][0] for n in nodes),
            saved_fixed=sum(self._saved[n.name][1] for n in nodes),
            recv_per_sample=float(t.recv[0, start, end]),
            recv_fixed=float(t.recv[1, start, end]),
            send_per_sample=float(t.send[0, start, end]),
            send_fixed=float(t.send[1, start, end]),
            largest_output_per_sample=float(largest_ps),
            largest_output_fixed=float(largest_fx),
            buffer_bytes=sum(p.nbytes for p in params if p.is_buffer),
            largest_group_bytes=float(max(groups, default=0)),
            largest_param_bytes=float(max((p.nbytes for p in params), default=0)),
            output_per_sample=float(sum(s.nbytes(1) for s in outputs if s.is_batch)),
            output_fixed=float(sum(s.nbytes() for s in outputs if not s.is_batch)),
            link_bytes=sum(self._link[p.name] for p in params if not p.is_buffer),
            link_grad_bytes=sum(
                self._link[p.name] for p in params if p.requires_grad and not p.is_buffer
            ),
        )

    def _stage_costs(
        self, start: int, end: int, microbatches: int, in_flight: int | None
    ) -> StageCosts:
        fp = self.footprint(start, end)
        rows = self.rows(microbatches)
        usable = rows > 0
        # Many replica counts share a row count: cost each distinct one once.
        distinct, where = self._distinct_rows(microbatches)
        times = np.array([self.seconds(start, end, int(r)) if r else (0.0, 0.0) for r in distinct])
        fwd, bwd = times[where, 0], times[where, 1]
        recv = fp.recv_per_sample * rows + fp.recv_fixed
        send = fp.send_per_sample * rows + fp.send_fixed
        # Activations go out in forward and their gradients come back in backward.
        comm = 2 * (
            p2p_seconds_array(recv, self.spec, self.cross_node_p2p)
            + p2p_seconds_array(send, self.spec, self.cross_node_p2p)
        )
        compute = {False: fwd + bwd, True: 2 * fwd + bwd}
        slots, peaks, tails = [], [], []
        for mode in self.modes:
            peak = self.memory.peak_bytes(
                fp,
                rows,
                microbatches,
                self.replicas,
                mode.recompute,
                offload=mode.offload,
                zero=mode.zero,
                in_flight=in_flight,
            )
            slot = compute[mode.recompute]
            tail = 0.0
            if mode.offload != Offload.NONE:
                slot = self.offloaded_slot(fp, slot, mode.recompute)
            if mode.offload == Offload.PARAMS_OPTIMIZER:  # the step runs in host memory
                tail = self.host_step_seconds(fp)
            fits = usable & (peak <= self.capacity)
            slots.append(np.where(fits, slot + comm, np.inf))
            tails.append(tail)
            peaks.append(peak)
        # A mode is chosen by its time per step over the microbatches: slot plus its share of
        # the step's tail (the first of equals wins: the order of preference).
        per_step = np.stack(slots) + np.array(tails)[:, None] / microbatches
        best = np.argmin(per_step, axis=0)
        pick = np.arange(len(rows))
        allreduce = allreduce_seconds_array(fp.trainable_bytes, self.replicas, self.spec)
        return StageCosts(
            replicas=self.replicas,
            slot_seconds=np.stack(slots)[best, pick],
            allreduce_seconds=allreduce + np.array(tails)[best],
            memory_bytes=np.stack(peaks)[best, pick].astype(np.int64),
            mode=best.astype(np.int64),
        )


@dataclass(frozen=True)
class RunMode:
    """How a stage runs: the choices the planner makes per stage besides its blocks and
    replicas.  A new knob is a field here and a term in `StageCoster._stage_costs`."""

    recompute: bool
    offload: Offload
    zero: bool

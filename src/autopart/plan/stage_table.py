"""The stage DP's table: every candidate stage that fits some replica count at one microbatch
count, as arrays, with the bounds the search prunes by (`Table.floor`).  The exact DP
(`autopart.plan.stage_dp`) and the fewest-devices solver (`autopart.plan.bottleneck`) both
read it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from autopart.plan.cover import cheapest_cover

__all__ = ["CostsOf", "StageChoice", "StageCosts", "Table"]


@dataclass(frozen=True)
class StageCosts:
    """Costs of one candidate stage [start, end) at M microbatches, for every replica count."""

    #: int64, the candidate replica counts (ascending), the same for every call.
    replicas: np.ndarray
    #: float64, per-microbatch forward+backward(+recompute)+p2p time of one replica;
    #: ``inf`` where the stage does not fit memory.
    slot_seconds: np.ndarray
    #: float64, time of the gradient allreduce among r replicas (0 for r == 1).
    allreduce_seconds: np.ndarray
    #: int64, predicted peak bytes per device.
    memory_bytes: np.ndarray
    #: int, how the stage runs: an index into the coster's run modes (recompute, offload,
    #: ZeRO), which the search carries along without reading.
    mode: np.ndarray


class CostsOf(Protocol):
    """Costs a candidate stage; may be expensive, so the search calls it once per triple."""

    def __call__(
        self, start: int, end: int, microbatches: int, in_flight: int | None = None
    ) -> StageCosts: ...


@dataclass(frozen=True)
class StageChoice:
    """One stage of a solution: blocks [start, end) on ``replicas`` devices."""

    start: int
    end: int
    replicas: int
    slot_seconds: float
    allreduce_seconds: float
    memory_bytes: int
    #: How the stage runs: an index into the coster's run modes.
    mode: int = 0


@dataclass(frozen=True)
class Table:
    """Every stage that fits some replica count at one microbatch count, as (span, replica) arrays.

    Spans are sorted by (end, start) and replicas ascend, so the nonzero entries of any
    (span, replica) mask come out grouped by stage end, which the DP's reductions rely on.
    """

    num_blocks: int
    microbatches: int
    replicas: np.ndarray  # int64[R]
    start: np.ndarray  # int64[P]
    end: np.ndarray  # int64[P]
    slot: np.ndarray  # float64[P, R]; inf where it does not fit or r > devices
    allreduce: np.ndarray  # float64[P, R]
    memory: np.ndarray  # int64[P, R]
    mode: np.ndarray  # int8[P, R]
    #: Some stage must hold each block; the slowest of those blocks' fastest slots, a lower
    #: bound on every plan's max slot.  ``inf`` when some block fits no stage at all.
    slowest_slot: float
    #: The least device-seconds per slot that stages covering every block take (replicas x
    #: slot, summed over the stages): the devices share it, so no plan's max slot is below
    #: ``least_work / devices``.
    least_work: float
    #: The fewest stages that cover every block with stages that fit (ignoring devices);
    #: ``num_blocks + 1`` when none do.
    fewest_stages: int
    calls: int

    @classmethod
    def build(cls, num_blocks: int, coster: CostsOf, m: int, devices: int, held: int) -> Table:
        spans: list[tuple[int, int]] = []
        costs: list[StageCosts] = []
        replicas: np.ndarray | None = None
        calls = 0
        for start in range(num_blocks):
            for end in range(start + 1, num_blocks + 1):
                c = coster(start, end, m, held)
                calls += 1
                replicas = _check_costs(c, replicas)
                if not np.isfinite(c.slot_seconds).any():
                    break  # memory only grows with the span: no longer stage from here fits
                spans.append((start, end))
                costs.append(c)
        assert replicas is not None  # num_blocks >= 1, so the coster was called
        order = sorted(range(len(spans)), key=lambda p: (spans[p][1], spans[p][0]))
        width = len(replicas)

        def stack(field: str, dtype: type) -> np.ndarray:
            rows = [getattr(costs[p], field) for p in order]
            return np.array(rows, dtype=dtype).reshape(len(order), width)

        starts = np.array([spans[p][0] for p in order], dtype=np.int64)
        ends = np.array([spans[p][1] for p in order], dtype=np.int64)
        slot = np.where(replicas <= devices, stack("slot_seconds", np.float64), np.inf)
        blocks = np.arange(num_blocks)
        holds = (starts[:, None] <= blocks) & (blocks < ends[:, None])
        fastest = np.where(holds, slot.min(axis=1, initial=np.inf)[:, None], np.inf)
        first, last = starts.tolist(), ends.tolist()  # sorted by end, as the cover needs
        fewest, _ = cheapest_cover(first, last, [1.0] * len(first), num_blocks)
        span_work = (slot * replicas).min(axis=1, initial=np.inf).tolist()
        least_work, _ = cheapest_cover(first, last, span_work, num_blocks)
        return cls(
            num_blocks=num_blocks,
            microbatches=m,
            replicas=replicas,
            start=starts,
            end=ends,
            slot=slot,
            allreduce=stack("allreduce_seconds", np.float64),
            memory=stack("memory_bytes", np.int64),
            mode=stack("mode", np.int8),
            slowest_slot=float(fastest.min(axis=0, initial=np.inf).max()),
            least_work=least_work,
            fewest_stages=int(fewest) if math.isfinite(fewest) else num_blocks + 1,
            calls=calls,
        )

    def floor(self, devices: int) -> float:
        """A lower bound on every plan's max slot on ``devices`` devices."""
        return max(self.slowest_slot, self.least_work / devices)

    def choice(self, p: int, k: int) -> StageChoice:
        return StageChoice(
            start=int(self.start[p]),
            end=int(self.end[p]),
            replicas=int(self.replicas[k]),
            slot_seconds=float(self.slot[p, k]),
            allreduce_seconds=float(self.allreduce[p, k]),
            memory_bytes=int(self.memory[p, k]),
            mode=int(self.mode[p, k]),
        )


def _check_costs(costs: StageCosts, replicas: np.ndarray | None) -> np.ndarray:
    """The replica axis every call must share; catches a coster that changes it mid-search."""
    got = np.asarray(costs.replicas, dtype=np.int64)
    if replicas is None:
        if got.ndim != 1 or not len(got) or got[0] < 1 or np.any(np.diff(got) <= 0):
            raise ValueError(f"replica counts must be positive and ascending, got {got}")
        replicas = got
    elif not np.array_equal(got, replicas):
        raise ValueError("the coster returned different replica counts for different stages")
    for name in ("slot_seconds", "allreduce_seconds", "memory_bytes", "mode"):
        if np.shape(getattr(costs, name)) != replicas.shape:
            raise ValueError(f"{name} does not have one entry per replica count")
    return replicas

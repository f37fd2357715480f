"""Which rank holds which batch rows, and which slices must move between ranks.

Rows are numbered globally: rank ``k``'s local batch is rows ``offsets[k]:offsets[k+1]`` of the
global batch.  The global batch is cut into microbatches, and each microbatch is cut again
among a stage's replicas, both as ``torch.tensor_split`` cuts it.  A value moves from the ranks
that hold its rows to the ranks that need them as the intersections of the two row ranges,
so stages with different replica counts exchange exactly the rows they must.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

Rows = tuple[int, int]


def split_rows(lo: int, hi: int, parts: int) -> list[Rows]:
    """``[lo, hi)`` cut into ``parts`` contiguous pieces, the first ones one longer."""
    size, extra = divmod(hi - lo, parts)
    pieces, start = [], lo
    for i in range(parts):
        stop = start + size + (i < extra)
        pieces.append((start, stop))
        start = stop
    return pieces


@dataclass(frozen=True)
class Transfer:
    """Rows ``rows`` of a value go from rank ``src`` to rank ``dst``."""

    src: int
    dst: int
    rows: Rows


def transfers(holders: dict[int, Rows], needers: dict[int, Rows]) -> list[Transfer]:
    """Every non-empty overlap between a holder's rows and a needer's rows."""
    moves = []
    for dst, (nlo, nhi) in sorted(needers.items()):
        for src, (hlo, hhi) in sorted(holders.items(), key=lambda kv: kv[1]):
            lo, hi = max(nlo, hlo), min(nhi, hhi)
            if lo < hi:
                moves.append(Transfer(src, dst, (lo, hi)))
    return moves


@dataclass(frozen=True)
class BatchLayout:
    """Row ownership for one call: ranks' local batches, microbatches, stage replicas."""

    offsets: tuple[int, ...]
    microbatches: int

    @staticmethod
    def of(local_sizes: list[int], microbatches: int) -> BatchLayout:
        offsets = [0]
        for size in local_sizes:
            offsets.append(offsets[-1] + size)
        return BatchLayout(tuple(offsets), microbatches)

    @property
    def global_batch(self) -> int:
        return self.offsets[-1]

    def rows_of(self, rank: int) -> Rows:
        """The global rows of ``rank``'s local batch."""
        return self.offsets[rank], self.offsets[rank + 1]

    @cached_property
    def _microbatch_rows(self) -> list[Rows]:
        return split_rows(0, self.global_batch, self.microbatches)

    def microbatch(self, m: int) -> Rows:
        return self._microbatch_rows[m]

    def owners(self, m: int) -> dict[int, Rows]:
        """Each rank's own rows inside microbatch ``m`` (ranks with none are left out)."""
        lo, hi = self.microbatch(m)
        owned = {}
        for rank in range(len(self.offsets) - 1):
            a, b = max(lo, self.offsets[rank]), min(hi, self.offsets[rank + 1])
            if a < b:
                owned[rank] = (a, b)
        return owned

    def replicas(self, m: int, ranks: list[int]) -> dict[int, Rows]:
        """The rows each replica of a stage (its ``ranks``) runs in microbatch ``m``."""
        lo, hi = self.microbatch(m)
        return dict(zip(ranks, split_rows(lo, hi, len(ranks)), strict=True))

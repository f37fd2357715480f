"""Who holds which parameter, and summing gradients over the ranks that hold it.

A parameter lives on every replica of each stage that reads it: usually one stage, but tied
weights (an embedding reused as the LM head) and values computed from a parameter can be read
by several.  After backward each holder has a partial gradient (its rows, its stage's use), and
the full gradient is their sum over all holder ranks, so there is one process group per
distinct set of holders.  Groups are created in the same order on every rank, as
``torch.distributed.new_group`` requires.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from autopart.runtime.context import RankContext
from autopart.runtime.data_parallel.overlap import OverlappedAllReduce
from autopart.runtime.transport.distenv import job_group, new_group

#: The most bytes one broadcast of freshly initialized values carries.
BROADCAST_BUCKET_BYTES = 64 * 2**20


class Holders:
    """Parameter placement from a plan, with one process group per holder set."""

    def __init__(
        self,
        ctx: RankContext,
        trainable: dict[str, torch.Tensor],
        shards: dict[str, int] | None = None,
        updated: dict[str, list[int]] | None = None,
    ) -> None:
        plan, self.rank, self.device = ctx.plan, ctx.rank, ctx.device
        ranks_of: dict[str, set[int]] = defaultdict(set)
        for stage in plan.stages:
            for name in stage.params:
                ranks_of[name].update(stage.ranks)
        for name, ranks in (updated or {}).items():  # buffers only once-per-call ops touch
            ranks_of[name].update(ranks)
        self.ranks_of = {name: tuple(sorted(r)) for name, r in ranks_of.items()}
        self.local = [n for n in ctx.stage.params if n in trainable]
        self.stage_ranks = ctx.stage.ranks
        self.trainable = trainable
        self.groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for holders in sorted(set(self.ranks_of.values())):
            if len(holders) > 1:
                self.groups[holders] = new_group(list(holders))

        replica_only = [
            trainable[n] for n in self.local if self.ranks_of[n] == tuple(sorted(self.stage_ranks))
        ]
        group = self.groups.get(tuple(sorted(self.stage_ranks)))
        # Under ZeRO a replica-only gradient ends up on its shard's owner alone.
        self.sharded = {
            n: shards[n]
            for n in self.local
            if shards and n in shards and self.ranks_of[n] == tuple(sorted(self.stage_ranks))
        }
        owners = {id(trainable[n]): r for n, r in self.sharded.items()} if shards else None
        self.overlap = (
            OverlappedAllReduce(replica_only, group, owners) if group is not None else None
        )
        self._overlapped = {id(p) for p in replica_only} if group is not None else set()

    def local_params(self) -> list[torch.Tensor]:
        """This rank's trainable parameters, each once."""
        return [self.trainable[name] for name in self.local]

    def holds(self, name: str) -> bool:
        """Whether this rank holds the tensor of canonical name ``name`` (one no stage reads
        is rank 0's)."""
        return self.rank in self.ranks_of.get(name, (0,))

    def owner(self, name: str) -> int:
        """The one rank that speaks for a parameter in norms and state dicts."""
        if name in self.sharded:
            return self.sharded[name]
        return self.ranks_of.get(name, (0,))[0]

    def arm_overlap(self) -> None:
        """Call before the last microbatch's backward: replica sums start as grads finish."""
        if self.overlap is not None:
            self.overlap.arm()

    def unsum_synced(self) -> None:
        """Turn gradients that a synced backward left (the same sum on every holder) back into
        this holder's share, so that the next sum over holders counts them once.

        DDP gets accumulation without ``no_sync`` right because it all-reduces the whole
        ``.grad`` and divides by the world: the synced part comes back unchanged and the new
        part averaged.  Here gradients are summed, not averaged, so the synced part is divided
        by the holder count first.  ZeRO-sharded gradients live on their owner alone and are
        only reduced onto it again, which already counts them once."""
        for name in self.local:
            grad = self.trainable[name].grad
            holders = len(self.ranks_of[name])
            if grad is not None and holders > 1 and name not in self.sharded:
                grad.div_(holders)

    def all_reduce_grads(self, overlapped: bool = False) -> None:
        """Sum the partial gradients of this rank's parameters over their holders; with
        ``overlapped``, the replica-only ones were launched by `arm_overlap` already."""
        if overlapped and self.overlap is not None:
            self.overlap.finish()
        buckets: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
        for name in self.local:
            holders = self.ranks_of[name]
            param = self.trainable[name]
            if overlapped and id(param) in self._overlapped:
                continue
            if len(holders) > 1:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                buckets[holders].append(param.grad)
        for holders in sorted(buckets):
            grads = buckets[holders]
            # On the device: a holder set can span an offloaded stage (gradients in host
            # memory) and one that is not, and a collective needs one device on every rank.
            flat = _flatten_dense_tensors(grads).to(self.device)
            dist.all_reduce(flat, group=self.groups[holders])
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(synced)

    def broadcast_from_first(self, tensors: dict[str, torch.Tensor]) -> None:
        """Give every holder of each tensor the first holder's value (freshly initialized
        values differ from rank to rank), in buckets of at most `BROADCAST_BUCKET_BYTES` per
        holder set and dtype, each where its tensors live (an offloaded stage's in host
        memory, over gloo, never all on the device at once)."""
        buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[]])
        filled: dict[tuple, int] = defaultdict(int)  # bytes in each chain's last bucket
        for name in sorted(tensors):
            holders, value = self.ranks_of.get(name, ()), tensors[name]
            if len(holders) < 2:
                continue
            key = (holders, str(value.dtype), str(value.device))
            if filled[key] >= BROADCAST_BUCKET_BYTES:
                buckets[key].append([])
                filled[key] = 0
            buckets[key][-1].append(value)
            filled[key] += value.numel() * value.element_size()
        for key in sorted(buckets):
            for values in buckets[key]:
                flat = _flatten_dense_tensors([v.detach() for v in values])
                dist.broadcast(flat, src=key[0][0], group=self.groups[key[0]])
                with torch.no_grad():
                    for value, first in zip(
                        values, _unflatten_dense_tensors(flat, values), strict=True
                    ):
                        value.copy_(first)

    def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """The norm of the full gradient, each parameter counted once over all ranks.
        Each gradient is reduced where it lives (offloaded ones in host memory)."""
        own = [
            grad
            for n in self.local
            if self.owner(n) == self.rank and (grad := self.trainable[n].grad) is not None
        ]
        infinite = norm_type == float("inf")
        parts = [
            (g.abs().max() if infinite else g.double().abs().pow(norm_type).sum())
            .double()
            .to(self.device)
            for g in own
        ]
        local = torch.zeros(1, dtype=torch.float64, device=self.device)
        if parts:
            stacked = torch.stack(parts)
            local[0] = stacked.max() if infinite else stacked.sum()
        dist.all_reduce(
            local, op=dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM, group=job_group()
        )
        return (local[0] if infinite else local[0].pow(1.0 / norm_type)).float()

"""Sum a stage's gradients over its replicas while backward is still running, as DDP does.

Parameters are put in fixed buckets of one dtype (1 MB first, then about 25 MB, in reverse
order, since backward reaches the last layers first), identical on every replica.  During the
backward of the last microbatch, a hook fires when a parameter's gradient is final; once every
parameter of the next bucket in line is final, its gradients are copied into the bucket's flat
buffer and the all-reduce starts asynchronously.  Launching strictly in bucket order keeps the
collective order identical on every replica.

Under ZeRO (``owners`` given) a bucket is not all-reduced: each parameter's gradient is summed
onto the one replica that steps it (a reduce per owner, over the owner's contiguous part of the
bucket), and the other replicas drop it, so gradients at rest are split over the replicas too.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20
#: DDP's choice too: a small first bucket, so that communication starts early in backward.
FIRST_BUCKET_BYTES = 1 * 2**20


class OverlappedAllReduce:
    """Bucketed asynchronous gradient all-reduce over one process group."""

    def __init__(
        self,
        params: list[torch.Tensor],
        group: dist.ProcessGroup,
        owners: dict[int, int] | None = None,
    ) -> None:
        self.group = group
        self.owners = owners
        self.buckets: list[list[torch.Tensor]] = []
        size, cap = 0, FIRST_BUCKET_BYTES
        for param in reversed(params):
            kind = (param.dtype, param.device)
            if (
                not self.buckets
                or size >= cap
                or kind != (self.buckets[-1][0].dtype, self.buckets[-1][0].device)
            ):
                cap = FIRST_BUCKET_BYTES if not self.buckets else BUCKET_BYTES
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(param)
            size += param.numel() * param.element_size()
        if owners is not None:  # each owner's gradients contiguous within its bucket
            self.buckets = [sorted(b, key=lambda p: owners[id(p)]) for b in self.buckets]
        # One flat buffer per bucket, kept across steps: no allocation on the hot path.
        self._flat = [
            torch.empty(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device)
            for b in self.buckets
        ]
        self._hooks: list = []
        self._ready: set[int] = set()
        self._launched: list[list] = []

    def arm(self) -> None:
        """Start listening: the next gradient accumulation of each parameter is its last."""
        self._ready.clear()
        self._launched.clear()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_ready) for b in self.buckets for p in b
        ]

    def _on_ready(self, param: torch.Tensor) -> None:
        self._ready.add(id(param))
        self._launch(force=False)

    def _launch(self, force: bool) -> None:
        while len(self._launched) < len(self.buckets):
            index = len(self._launched)
            bucket = self.buckets[index]
            if not force and not all(id(p) in self._ready for p in bucket):
                return
            flat = self._flat[index]
            offset = 0
            for param in bucket:
                size = param.numel()
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                flat[offset : offset + size].copy_(param.grad.reshape(-1))
                offset += size
            self._launched.append(self._reduce(bucket, flat))

    def _reduce(self, bucket: list[torch.Tensor], flat: torch.Tensor) -> list:
        if self.owners is None:
            return [dist.all_reduce(flat, group=self.group, async_op=True)]
        works, offset, owners = [], 0, self.owners
        for owner, members in itertools.groupby(bucket, key=lambda p: owners[id(p)]):
            size = sum(p.numel() for p in members)
            part = flat[offset : offset + size]
            works.append(dist.reduce(part, dst=owner, group=self.group, async_op=True))
            offset += size
        return works

    def finish(self) -> None:
        """Launch what is left, wait for everything, and write the sums back."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._launch(force=True)
        me = dist.get_rank()
        for works, bucket, flat in zip(self._launched, self.buckets, self._flat, strict=True):
            for work in works:
                work.wait()
            offset = 0
            for param in bucket:
                size = param.numel()
                grad = param.grad
                assert grad is not None  # filled when the bucket was launched
                if self.owners is None or self.owners[id(param)] == me:
                    grad.copy_(flat[offset : offset + size].view_as(grad))
                else:
                    param.grad = None
                offset += size
        self._launched.clear()

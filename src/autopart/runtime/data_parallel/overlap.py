"""Sum a stage's gradients over its replicas while backward is still running, as DDP does.

Parameters are put in fixed buckets of one dtype (1 MB first, then about 25 MB, in reverse
order, since backward reaches the last layers first), identical on every replica.  During the
backward of the last microbatch, a hook fires when a parameter's gradient is final: it is
copied into its place in the bucket's flat buffer and becomes a view of it, and once every
parameter of the next bucket in line is final, the all-reduce starts asynchronously.
Launching strictly in bucket order keeps the collective order identical on every replica.

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
        #: Where each parameter's gradient lives in its bucket's buffer: (bucket, view).
        self._slot: dict[int, tuple[int, torch.Tensor]] = {}
        for index, (bucket, flat) in enumerate(zip(self.buckets, self._flat, strict=True)):
            offset = 0
            for param in bucket:
                view = flat[offset : offset + param.numel()].view_as(param)
                self._slot[id(param)] = (index, view)
                offset += param.numel()
        self._hooks: list = []
        self._missing: list[int] = []
        self._launched: list[list] = []

    def arm(self) -> None:
        """Start listening: the next gradient accumulation of each parameter is its last."""
        self._missing = [len(b) for b in self.buckets]
        self._launched.clear()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_ready) for b in self.buckets for p in b
        ]

    def _on_ready(self, param: torch.Tensor) -> None:
        index, _ = self._slot[id(param)]
        self._into_bucket(param)
        self._missing[index] -= 1
        self._launch(force=False)

    def _into_bucket(self, param: torch.Tensor) -> None:
        """Make the parameter's gradient a view of its place in the bucket (copied there as
        it becomes final, as DDP's ``gradient_as_bucket_view``): the sum lands in ``.grad``
        with no copy back, and a gradient accumulated in place stays there."""
        _, view = self._slot[id(param)]
        grad = param.grad
        if grad is None:
            view.zero_()
        elif grad.data_ptr() != view.data_ptr():
            view.copy_(grad)
        param.grad = view

    def _launch(self, force: bool) -> None:
        while len(self._launched) < len(self.buckets):
            index = len(self._launched)
            if not force and self._missing[index] > 0:
                return
            if self._missing[index] > 0:  # never accumulated in this backward
                for param in self.buckets[index]:
                    self._into_bucket(param)
            self._launched.append(self._reduce(self.buckets[index], self._flat[index]))

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
        """Launch what is left and wait for everything: the sums are in ``.grad`` already.
        Under ZeRO a replica drops the gradients it does not own and keeps its own apart
        from the bucket, so that gradients at rest are split over the replicas."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._launch(force=True)
        me = dist.get_rank()
        for works, bucket in zip(self._launched, self.buckets, strict=True):
            for work in works:
                work.wait()
            if self.owners is not None:  # at rest, each replica holds only what it steps
                for param in bucket:
                    grad = param.grad
                    mine = self.owners[id(param)] == me
                    param.grad = grad.clone() if mine and grad is not None else None
        self._launched.clear()

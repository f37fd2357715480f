"""Sum a stage's gradients over its replicas while backward is still running, as DDP does.

Parameters are put in fixed buckets of one dtype (1 MB first, then about 25 MB, in reverse
order, since backward reaches the last layers first), identical on every replica.  During the
backward of the last microbatch, a hook fires when a parameter's gradient is final; once every
parameter of the next bucket in line is final, its gradients are copied into the bucket's flat
buffer and the all-reduce starts asynchronously.  Launching strictly in bucket order keeps the
collective order identical on every replica.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20
#: DDP's choice too: a small first bucket, so that communication starts early in backward.
FIRST_BUCKET_BYTES = 1 * 2**20


class OverlappedAllReduce:
    """Bucketed asynchronous gradient all-reduce over one process group."""

    def __init__(self, params: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        self.group = group
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
        # One flat buffer per bucket, kept across steps: no allocation on the hot path.
        self._flat = [
            torch.empty(sum(p.numel() for p in b), dtype=b[0].dtype, device=b[0].device)
            for b in self.buckets
        ]
        self._hooks: list = []
        self._ready: set[int] = set()
        self._launched: list[tuple] = []

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
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._launched.append(work)

    def finish(self) -> None:
        """Launch what is left, wait for everything, and write the sums back."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._launch(force=True)
        for work, bucket, flat in zip(self._launched, self.buckets, self._flat, strict=True):
            work.wait()
            offset = 0
            for param in bucket:
                size = param.numel()
                param.grad.copy_(flat[offset : offset + size].view_as(param.grad))
                offset += size
        self._launched.clear()

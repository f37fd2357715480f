"""Sum a stage's gradients over its replicas while backward is still running, as DDP does.

Parameters are put in fixed buckets (about 25 MB, in reverse order, since backward reaches the
last layers first), identical on every replica.  During the backward of the last microbatch, a
hook fires when a parameter's gradient is final; once every parameter of the next bucket in
line is final, that bucket is flattened and its all-reduce starts asynchronously.  Launching
strictly in bucket order keeps the collective order identical on every replica.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 2**20


class OverlappedAllReduce:
    """Bucketed asynchronous gradient all-reduce over one process group."""

    def __init__(self, params: list[torch.Tensor], group: dist.ProcessGroup) -> None:
        self.group = group
        self.buckets: list[list[torch.Tensor]] = []
        size = BUCKET_BYTES
        for param in reversed(params):
            if size >= BUCKET_BYTES:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(param)
            size += param.numel() * param.element_size()
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
            bucket = self.buckets[len(self._launched)]
            if not force and not all(id(p) in self._ready for p in bucket):
                return
            for param in bucket:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            grads = [p.grad for p in bucket]
            flat = _flatten_dense_tensors(grads)
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._launched.append((work, flat, grads))

    def finish(self) -> None:
        """Launch what is left, wait for everything, and write the sums back."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._launch(force=True)
        for work, flat, grads in self._launched:
            work.wait()
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(synced)
        self._launched.clear()

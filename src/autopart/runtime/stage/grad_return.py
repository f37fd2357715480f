"""Gradients of offloaded parameters, sent back to host memory without stopping the device.

Each device copy of an offloaded parameter gets its gradient in backward.  Handing it to
autograd as a host tensor would copy it synchronously, one parameter at a time: every copy
waits for the device to drain its queue, so the device idles while the host queues the next
kernels, and a pageable destination halves the link's speed.  Instead the copy's backward
hands autograd nothing for the host parameter and queues the gradient here: on CUDA it is
copied into page-locked memory on a side stream of its own (after the compute that made it),
which overlaps the rest of backward, and the queue is drained once, when the stage's backward
ends.  Draining waits for the last copy, sums the gradients each parameter got (a parameter
read by several ops gets one per op, as autograd would sum them before accumulating), widens
the ones that crossed the link in autocast's dtype, and accumulates them into the host
parameters with one ``torch.autograd.backward`` over the leaves: the same ``AccumulateGrad``
as before, so ``.grad`` layouts, gradient accumulation over calls and post-accumulate hooks
(the overlapped all-reduce of a replicated stage) behave as they did.
"""

from __future__ import annotations

import torch
from torch import nn

from autopart.device import copy_stream

__all__ = ["GradReturn"]


class GradReturn:
    """The queue of gradients on their way from the device back to host parameters."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = copy_stream(device)
        self._queued: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._last: torch.cuda.Event | None = None

    def send(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        """Start moving ``grad`` (of a device copy of ``param``) to host memory."""
        if self._stream is None:  # the device is the host: nothing to move
            self._queued.append((param, grad))
            return
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)  # the copy starts once the gradient is made
        with torch.cuda.stream(self._stream):
            host = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
            host.copy_(grad, non_blocking=True)
            grad.record_stream(self._stream)  # its memory is not reused before the copy ends
            self._last = torch.cuda.Event()
            self._last.record(self._stream)
        self._queued.append((param, host))

    def drain(self) -> None:
        """Wait for the copies and accumulate each parameter's gradient into ``.grad``."""
        if not self._queued:
            return
        if self._last is not None:
            self._last.synchronize()
            self._last = None
        totals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for param, grad in self._queued:
            grad = grad.to(param.dtype)
            seen = totals.get(id(param))
            totals[id(param)] = (param, grad if seen is None else seen[1] + grad)
        self._queued = []
        params = [p for p, _ in totals.values()]
        torch.autograd.backward(params, [g for _, g in totals.values()])

    def discard(self) -> None:
        """Drop what a failed backward left queued (the step is lost anyway)."""
        if self._last is not None:
            self._last.synchronize()
        self._queued, self._last = [], None

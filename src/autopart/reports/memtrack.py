"""Count the bytes of live tensor storage, on any device, the CPU included.

``torch.cuda.max_memory_allocated`` exists only on CUDA, and MemTracker in
``torch.distributed._tools`` refuses a module called more than once per iteration, which is
exactly what microbatching does.  This tracker watches every op's outputs through a dispatch
mode and frees their bytes when the storage dies, so the peak it reports is the peak of live
tensor bytes: what the planner's memory model predicts.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes(already_live) as t: ...``; then ``t.peak`` and ``t.current`` in bytes."""

    def __init__(self, already_live: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        for tensor in already_live:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_id(t) for t in pytree.tree_leaves((args, kwargs))}
        for leaf in pytree.tree_leaves(out):
            # A view or an in-place result lives in its input's storage: nothing new.
            if isinstance(leaf, torch.Tensor) and _storage_id(leaf) not in inputs:
                self._track(leaf)
        return out


def _storage_id(value) -> int | None:
    if not isinstance(value, torch.Tensor) or value.device.type == "meta":
        return None
    return value.untyped_storage()._cdata


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())

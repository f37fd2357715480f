"""The call's example inputs: which carry the batch (dim 0 equal to the first tensor's), their
sources as ``args[i]`` / ``kwargs['k']`` paths, and stand-ins at other batch sizes (real rows for
tracing, storage-free meta tensors for the meta runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.fx.config
import torch.utils._pytree as pytree

from autopart.errors import CaptureError


@dataclass(frozen=True)
class _Inputs:
    """The user's example call, with the batch size it carries."""

    args: tuple
    kwargs: dict[str, Any]
    batch: int

    @staticmethod
    def of(args: tuple, kwargs: dict[str, Any]) -> _Inputs:
        if not isinstance(args, tuple):
            raise CaptureError(f"capture() takes the positional arguments as a tuple, got {args!r}")
        first = next((t for t in pytree.tree_leaves((args, kwargs)) if _is_tensor(t)), None)
        if first is None or first.dim() == 0:
            raise CaptureError(
                "capture() needs a tensor argument whose dim 0 is the batch; "
                "pass example inputs with a batch dimension"
            )
        return _Inputs(args, kwargs, int(first.shape[0]))

    def is_batch(self, value: Any) -> bool:
        return _is_tensor(value) and value.dim() > 0 and value.shape[0] == self.batch

    def sources(self) -> list[str]:
        """Where each leaf of the call sits: ``args[0]``, ``kwargs['mask']``, ``args[1][0]``."""
        paths = [path for path, _ in pytree.tree_flatten_with_path((self.args, self.kwargs))[0]]
        return [("args" if p[0].idx == 0 else "kwargs") + pytree.keystr(p[1:]) for p in paths]

    def resized(self, batch: int) -> tuple[tuple, dict[str, Any]]:
        """Real example inputs with the batch rows repeated (or cut) to ``batch``."""

        def resize(value: Any) -> Any:
            if not self.is_batch(value):
                return value
            rows = torch.arange(batch, device=value.device) % self.batch
            out = value.detach().index_select(0, rows)
            return out.requires_grad_() if value.requires_grad else out

        return pytree.tree_map(resize, (self.args, self.kwargs))

    def meta(self, batch: int) -> tuple[tuple, dict[str, Any]]:
        """Storage-free stand-ins at ``batch``, for executing the graph on the meta device."""

        def stand_in(value: Any) -> Any:
            if not _is_tensor(value):
                return value
            shape = (batch, *value.shape[1:]) if self.is_batch(value) else value.shape
            return torch.empty(shape, dtype=value.dtype, device="meta")

        return pytree.tree_map(stand_in, (self.args, self.kwargs))


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)

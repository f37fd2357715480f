"""The call's example inputs: which carry the batch and in which dimension
(`autopart.capture.batch_dims`), their sources as ``args[i]`` / ``kwargs['k']`` paths, and
stand-ins at other batch sizes (real rows for tracing, storage-free meta tensors for the meta
runs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.fx.config
import torch.utils._pytree as pytree

from autopart.capture.batch_dims import BatchDims, find_batch_dims
from autopart.errors import CaptureError


@dataclass(frozen=True)
class _Inputs:
    """The user's example call, the batch size it carries, and each leaf's batch dimension
    (in ``pytree`` order of ``(args, kwargs)``; None for a leaf without one)."""

    args: tuple
    kwargs: dict[str, Any]
    batch: int
    dims: tuple[int | None, ...]

    @staticmethod
    def of(
        model: torch.nn.Module,
        args: tuple,
        kwargs: dict[str, Any],
        given: BatchDims | None = None,
        *,
        run: bool = True,
    ) -> _Inputs:
        if not isinstance(args, tuple):
            raise CaptureError(f"capture() takes the positional arguments as a tuple, got {args!r}")
        batch, dims = find_batch_dims(model, args, kwargs, given, run=run)
        return _Inputs(args, kwargs, batch, dims)

    def leaf_dims(self) -> list[tuple[Any, int | None]]:
        """Each leaf with its batch dimension."""
        return list(zip(pytree.tree_leaves((self.args, self.kwargs)), self.dims, strict=True))

    def sources(self) -> list[str]:
        """Where each leaf of the call sits: ``args[0]``, ``kwargs['mask']``, ``args[1][0]``."""
        paths = [path for path, _ in pytree.tree_flatten_with_path((self.args, self.kwargs))[0]]
        return [("args" if p[0].idx == 0 else "kwargs") + pytree.keystr(p[1:]) for p in paths]

    def marks(self, mark: Any) -> tuple[tuple, dict[str, Any]]:
        """The call's structure with ``{dim: mark}`` at each batch leaf and None elsewhere:
        export's ``dynamic_shapes``."""
        return self._map(lambda value, dim: None if dim is None else {dim: mark})

    def resized(self, batch: int) -> tuple[tuple, dict[str, Any]]:
        """Real example inputs with the batch rows repeated (or cut) to ``batch``."""

        def resize(value: Any, dim: int | None) -> Any:
            if dim is None:
                return value
            rows = torch.arange(batch, device=value.device) % self.batch
            out = value.detach().index_select(dim, rows)
            return out.requires_grad_() if value.requires_grad else out

        return self._map(resize)

    def meta(self, batch: int) -> tuple[tuple, dict[str, Any]]:
        """Storage-free stand-ins at ``batch``, for executing the graph on the meta device."""

        def stand_in(value: Any, dim: int | None) -> Any:
            if not _is_tensor(value):
                return value
            shape = list(value.shape)
            if dim is not None:
                shape[dim] = batch
            return torch.empty(shape, dtype=value.dtype, device="meta")

        return self._map(stand_in)

    def _map(self, fn: Callable[[Any, int | None], Any]) -> tuple[tuple, dict[str, Any]]:
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        mapped = [fn(leaf, dim) for leaf, dim in zip(leaves, self.dims, strict=True)]
        return pytree.tree_unflatten(mapped, spec)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)

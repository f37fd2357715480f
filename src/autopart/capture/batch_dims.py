"""Which dimension of each input carries the batch.

Most models take the batch in dimension 0, but PyTorch's own recurrent and Transformer layers
default to ``(seq, batch, ...)``, and a recurrent state is ``(layers, batch, hidden)``.  DDP
does not care; cutting a batch into microbatches does, and cutting the wrong dimension would
train something else without a word.  So the dimension is found, not assumed:

* the candidates are the dimensions of the first tensor argument, 0 first; for a candidate of
  size B, every other tensor carries the batch in the same dimension if its size there is B,
  else in its only dimension of size B, else not at all;
* a candidate is tried by running the model (evaluation mode, no gradients, the random state
  kept) on the example's first two rows along those dimensions and on each of them alone:
  every submodule output that carries rows must be the single rows' outputs put together.
  A sequence cut fails this (a recurrence, a causal mask or positions restart), a batch cut
  passes;
* the first candidate no output contradicts wins; where every one is contradicted (a model
  that reads its own batch size) or cannot run on one row, dimension 0 is taken, with a
  warning.  A tensor with several dimensions of the batch's size, none in the first tensor's
  place, is an error: which one is meant cannot be told.

A model with no values to run (built on meta, or seen through an empty view for a later call
signature) takes dimension 0, or what the caller knows (``batch_dims=``): the user's override,
or the dimensions found by the first capture.  Override keys are argument names (``"src"``)
or sources (``"args[0]"``, ``"kwargs['mask']"``); a value is a dimension or None (no batch).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from autopart.device import capture_device, replayed_rng, rng_state
from autopart.errors import CaptureError

__all__ = ["BatchDims", "find_batch_dims", "for_call"]

log = logging.getLogger("autopart.capture")

#: Argument name or source -> the dimension carrying the batch, or None for none.
BatchDims = Mapping[str, int | None]

#: How far a row's fingerprint may move between two rows run together and alone (a different batch
#: size may pick other kernels); a wrong cut moves it by the order of the value itself.
_TOLERANCE = 2e-2


def find_batch_dims(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    given: BatchDims | None = None,
    *,
    run: bool = True,
) -> tuple[int, tuple[int | None, ...]]:
    """The batch size and each leaf's batch dimension (in ``pytree`` order of ``(args,
    kwargs)``); ``run=False`` when the inputs or the model hold no real values."""
    leaves = pytree.tree_leaves((args, kwargs))
    keys = _leaf_keys(model, args, kwargs)
    tensors = [i for i, leaf in enumerate(leaves) if _is_batchable(leaf)]
    if not tensors:
        raise CaptureError(
            "the model must be called with a tensor that carries the batch; pass example "
            "inputs with a batch dimension"
        )
    fixed = _given(given or {}, keys, leaves)
    if any(d is not None for d in fixed.values()):
        first = next(i for i in tensors if fixed.get(i) is not None)
        candidates = [fixed[first]]
    else:
        first = tensors[0]
        sizes = leaves[first].shape
        candidates = [d for d in range(len(sizes)) if sizes[d] >= 2] or [0]
        if sizes[0] < 2 or not run or not _has_values(leaves):
            candidates = [0]
    chosen = []
    for dim in candidates:
        assert dim is not None
        batch = int(leaves[first].shape[dim])
        dims = tuple(
            fixed[i]
            if i in fixed
            else _match(leaf, batch, dim, keys[i][0])
            if i in tensors
            else None
            for i, leaf in enumerate(leaves)
        )
        chosen.append((batch, dims))
        if len(candidates) == 1 or _rows_are_independent(model, args, kwargs, dims):
            return batch, dims
    log.warning(
        "could not confirm which dimension of %s (shape %s) carries the batch: the model "
        "computes other values for the rows when the batch is cut along any of them; "
        "taking dimension 0 (say otherwise with batch_dims=)",
        keys[first][0],
        tuple(leaves[first].shape),
    )
    return chosen[0]


def for_call(
    dims: BatchDims, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
) -> dict[str, int | None]:
    """The entries of ``dims`` that name an input of this call: dimensions known from an
    earlier call (which may have had labels this one lacks) apply where they can."""
    keys = {key for pair in _leaf_keys(model, args, kwargs) for key in pair}
    return {key: dim for key, dim in dims.items() if key in keys}


def _has_values(leaves: list[Any]) -> bool:
    """Tensors with values to compare: not meta, not fake (a traced or pretend device)."""
    return not any(
        isinstance(t, torch.Tensor) and (t.is_meta or isinstance(t, FakeTensor)) for t in leaves
    )


def _is_batchable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _match(value: torch.Tensor, batch: int, dim: int, source: str) -> int | None:
    """The dimension of ``value`` that carries a batch of ``batch`` rows, the first tensor's
    carrying it in ``dim``: that same dimension, else its only one of that size."""
    if dim < value.dim() and value.shape[dim] == batch:
        return dim
    found = [d for d, size in enumerate(value.shape) if size == batch]
    if len(found) > 1:
        raise CaptureError(
            f"cannot tell which dimension of {source} (shape {tuple(value.shape)}) carries the "
            f"batch of {batch} rows: dimensions {found} all have that size. Say which: "
            f"autopart.Module(..., batch_dims={{{source!r}: dim}}) (None if it has no batch)"
        )
    return found[0] if found else None


def _leaf_keys(
    model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
) -> list[tuple[str, str]]:
    """Each leaf's (source, argument name): ``("args[0]", "src")``."""
    try:
        names = list(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except TypeError:
        names = []
    keys = []
    for path, _ in pytree.tree_flatten_with_path((args, kwargs))[0]:
        source = ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])  # type: ignore[attr-defined]
        top = path[1]
        if path[0].idx == 0:  # type: ignore[attr-defined]
            index = top.idx  # type: ignore[attr-defined]
            name = names[index] if index < len(names) else source
        else:
            name = str(top.key)  # type: ignore[attr-defined]
        keys.append((source, name))
    return keys


def _given(
    given: BatchDims, keys: list[tuple[str, str]], leaves: list[Any]
) -> dict[int, int | None]:
    """The override's dimension for each leaf it names; an unknown key or a dimension out of
    range is an error."""
    fixed: dict[int, int | None] = {}
    used = set()
    for i, (source, name) in enumerate(keys):
        key = source if source in given else name if name in given else None
        if key is None:
            continue
        used.add(key)
        dim = given[key]
        if dim is not None and (
            not _is_batchable(leaves[i]) or not -leaves[i].dim() <= dim < leaves[i].dim()
        ):
            shape = tuple(leaves[i].shape) if isinstance(leaves[i], torch.Tensor) else leaves[i]
            raise CaptureError(f"batch_dims gives dimension {dim} for {source}, of shape {shape}")
        fixed[i] = None if dim is None else dim % leaves[i].dim()
    unknown = sorted(set(given) - used)
    if unknown:
        names = sorted({name for _, name in keys})
        raise CaptureError(
            f"batch_dims names {', '.join(unknown)}, which the call does not have; its "
            f"arguments are {', '.join(names)}"
        )
    return fixed


def _rows_are_independent(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    dims: tuple[int | None, ...],
) -> bool:
    """No submodule output that carries rows differs between the first two rows and each
    of them alone (False too when the model cannot run on one row).  Two rows tell a batch
    from a sequence as well as the whole example does, at a fraction of its cost: a large
    model on the CPU runs two rows twice, not its whole batch three times."""
    leaves, spec = pytree.tree_flatten((args, kwargs))

    def part(start: int, length: int) -> tuple[tuple, dict[str, Any]]:
        cut = [
            leaf if d is None else leaf.narrow(d, start, length)
            for leaf, d in zip(leaves, dims, strict=True)
        ]
        return pytree.tree_unflatten(cut, spec)

    try:
        runs = [_outputs(model, *part(start, length)) for start, length in ((0, 2), (0, 1), (1, 1))]
    except Exception as exc:  # one row is a batch the model was not written for
        log.debug("the model cannot run on single rows of the batch: %s", exc)
        return False
    return not any(
        _contradicts(whole, first, second, (2, 1, 1))
        for whole, first, second in zip(*runs, strict=False)
    )


def _outputs(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[list[Any]]:
    """Every submodule call's tensor outputs, in call order, in evaluation mode."""
    recorded: list[list[Any]] = []

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        recorded.append([t.detach() for t in pytree.tree_leaves(output) if _is_batchable(t)])

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model.eval()
        device = capture_device(model)
        with torch.no_grad(), replayed_rng(rng_state(device), device):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return recorded


def _contradicts(
    whole: list[torch.Tensor],
    first: list[torch.Tensor],
    second: list[torch.Tensor],
    rows: tuple[int, int, int],
) -> bool:
    """Does some output put together from the single rows differ from the pair's, along each
    dimension whose sizes are the rows of the three runs?"""
    for a, b, c in zip(whole, first, second, strict=False):
        if a.dim() != b.dim() or a.dim() != c.dim() or not a.is_floating_point():
            continue
        for d in range(a.dim()):
            if (a.shape[d], b.shape[d], c.shape[d]) != rows:
                continue
            rest = [a.shape[k] for k in range(a.dim()) if k != d]
            if rest != [b.shape[k] for k in range(a.dim()) if k != d]:
                continue
            if not _same_rows(a, torch.cat([b, c], dim=d), d):
                return True
    return False


def _same_rows(a: torch.Tensor, b: torch.Tensor, dim: int) -> bool:
    weights = _weights(a.numel() // a.shape[dim], a.device)
    fa = a.movedim(dim, 0).reshape(a.shape[dim], -1).float() @ weights
    fb = b.movedim(dim, 0).reshape(b.shape[dim], -1).float() @ weights
    if not bool(torch.isfinite(fa).all()):
        return True  # nothing to learn from infinities
    scale = float(fa.abs().max()) + 1e-6
    return float((fa - fb).abs().max()) <= _TOLERANCE * scale


@functools.lru_cache(maxsize=64)
def _weights(length: int, device: torch.device) -> torch.Tensor:
    """A fixed, uneven weighting of a row's elements: a row's fingerprint (a normalized row
    sums to zero; these weights do not)."""
    return torch.sin(1.0 + 0.7 * torch.arange(length, dtype=torch.float32)).to(device)

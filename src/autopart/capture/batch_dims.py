"""Which dimension of each input carries the batch.

Most models take the batch in dimension 0, but PyTorch's own recurrent and Transformer layers
default to ``(seq, batch, ...)``, and a recurrent state is ``(layers, batch, hidden)``.  DDP
does not care; cutting a batch into microbatches does, and cutting the wrong dimension would
train something else without a word.  So the dimension is found, not assumed:

* the candidates are the dimensions of the first tensor argument (0 first) that hold two rows
  or more, then those that hold one (a batch of one row cannot be told apart by running the
  model; such a dimension is taken only when every other is contradicted).  A tensor whose
  first dimension holds one row takes dimension 0, as before;
* for a candidate of size B, every other tensor carries the batch in each of its dimensions of
  size B (the first tensor's own dimension first), or not at all;
* an assignment is tried by running the model on two rows and on each alone
  (`autopart.capture.row_check`); the first candidate with an assignment no output contradicts
  wins (the first such assignment, unless it is not the conventional one and another passes
  too: then which one is meant cannot be told, and the error names the input);
* where every candidate is contradicted (a model that reads its own batch size) or cannot run
  on one row, dimension 0 is taken, with a warning that says why.

A model with no values to run (built on meta, or seen through a view for a later call
signature) takes dimension 0, or what the caller knows (``batch_dims=``): the user's override,
or the dimensions found by the first capture.  Override keys are argument names (``"src"``)
or sources (``"args[0]"``, ``"kwargs['mask']"``); a value is a dimension or None (no batch).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from autopart.capture.row_check import rows_are_independent
from autopart.errors import CaptureError

__all__ = ["BatchDims", "argument_names", "find_batch_dims", "for_call"]

log = logging.getLogger("autopart.capture")

#: Argument name or source -> the dimension carrying the batch, or None for none.
BatchDims = Mapping[str, int | None]

#: The most assignments of ambiguous inputs tried for one candidate dimension.
_MAX_ASSIGNMENTS = 8


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
    keys = argument_names(model, args, kwargs)
    fixed = _given(given or {}, keys, leaves)
    tensors = [i for i, leaf in enumerate(leaves) if _is_batchable(leaf)]
    anchors = [i for i in tensors if fixed.get(i, -1) is not None]
    if not anchors:
        raise CaptureError(
            "the model must be called with a tensor that carries the batch; pass example "
            "inputs with a batch dimension"
        )
    first = anchors[0]
    shape = leaves[first].shape
    can_run = run and _has_values(leaves)
    if first in fixed:
        candidates: list[int] = [fixed[first]]  # type: ignore[list-item]
    elif shape[0] < 2 or not can_run:
        candidates = [0]
    else:
        candidates = [d for d in range(len(shape)) if shape[d] >= 2]
        candidates += [d for d in range(len(shape)) if shape[d] == 1]
    reasons = []
    for dim in candidates:
        batch = int(shape[dim])
        options = [
            [fixed[i]]
            if i in fixed
            else _options(leaf, batch, dim)
            if i in tensors and i != first
            else [dim]
            if i == first
            else [None]
            for i, leaf in enumerate(leaves)
        ]
        conventional = tuple(o[0] for o in options)
        if not can_run and batch >= 2:
            unclear = [i for i, o in enumerate(options) if len([d for d in o if d is not None]) > 1]
            if any(options[i][0] != dim for i in unclear):
                raise _ambiguous(keys, leaves, options, batch, [])
        if batch < 2 or not can_run or (len(candidates) == 1 and _count(options) == 1):
            return batch, conventional
        ok, why = rows_are_independent(model, args, kwargs, conventional)
        if ok:
            return batch, conventional
        reasons.append(f"dimension {dim}: {why}")
        if _count(options) > _MAX_ASSIGNMENTS:
            raise _ambiguous(keys, leaves, options, batch, [])
        passed = []
        for dims in itertools.islice(itertools.product(*options), 1, None):
            ok, why = rows_are_independent(model, args, kwargs, dims)
            passed += [dims] if ok else []
            reasons.append(f"dimension {dim}: {why}")
        if len(passed) == 1:
            return batch, passed[0]
        if passed:
            raise _ambiguous(keys, leaves, options, batch, passed)
    fallback = candidates[0] if first in fixed else 0
    log.warning(
        "could not confirm which dimension of %s (shape %s) carries the batch (%s); taking "
        "dimension %d (say otherwise with batch_dims=)",
        keys[first][0],
        tuple(shape),
        "; ".join(dict.fromkeys(reasons)),
        fallback,
    )
    batch = int(shape[fallback])
    return batch, tuple(
        fixed[i]
        if i in fixed
        else fallback
        if i == first
        else _options(leaf, batch, fallback)[0]
        if i in tensors
        else None
        for i, leaf in enumerate(leaves)
    )


def _options(value: torch.Tensor, batch: int, dim: int) -> list[int | None]:
    """The dimensions of ``value`` that may carry a batch of ``batch`` rows, the first
    tensor's carrying it in ``dim``: that same dimension first, and last None (a ``(T, T)``
    mask where T is the batch size); None alone where none has the size.  With one row,
    only one guess is made (nothing can tell them apart)."""
    found: list[int | None] = [d for d, size in enumerate(value.shape) if size == batch]
    if dim in found:
        found.remove(dim)
        found.insert(0, dim)
    if batch < 2:
        found = found[:1]
    return [*found, None] if found and batch >= 2 else found or [None]


def _count(options: list[list[int | None]]) -> int:
    return math.prod(len(o) for o in options)


def _ambiguous(
    keys: list[tuple[str, str]],
    leaves: list[Any],
    options: list[list[int | None]],
    batch: int,
    passed: list[tuple[int | None, ...]],
) -> CaptureError:
    """The error for an input whose batch dimension cannot be told: the one the assignments
    that passed disagree on, else the one with the most candidate dimensions."""
    differ = [i for i in range(len(leaves)) if len({dims[i] for dims in passed}) > 1]
    i = differ[0] if differ else max(range(len(options)), key=lambda k: len(options[k]))
    source = keys[i][0]
    found = [d for d in options[i] if d is not None]
    return CaptureError(
        f"cannot tell which dimension of {source} (shape {tuple(leaves[i].shape)}) carries the "
        f"batch of {batch} rows: dimensions {found} all have that size. Say which: "
        f"autopart.Module(..., batch_dims={{{source!r}: dim}}) (None if it has no batch)"
    )


def for_call(
    dims: BatchDims, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
) -> dict[str, int | None]:
    """The entries of ``dims`` that name an input of this call: dimensions known from an
    earlier call (which may have had labels this one lacks) apply where they can."""
    keys = {key for pair in argument_names(model, args, kwargs) for key in pair}
    return {key: dim for key, dim in dims.items() if key in keys}


def _has_values(leaves: list[Any]) -> bool:
    """Tensors with values to compare: not meta, not fake (a traced or pretend device)."""
    return not any(
        isinstance(t, torch.Tensor) and (t.is_meta or isinstance(t, FakeTensor)) for t in leaves
    )


def _is_batchable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def argument_names(
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
        used |= {source, name}
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

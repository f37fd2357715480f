"""Does a cut of the batch along given dimensions keep the model's rows independent?

The model runs (evaluation mode, no gradients, the random state kept) on two rows of the
example and on each of them alone; every submodule output that carries rows must be the
single rows' outputs put together.  A sequence cut fails this (a recurrence, a causal mask,
positions restart), a batch cut passes.  Two rows that differ are taken (left padding makes
the first rows of a sequence alike), and each output is reduced at once to one fingerprint per
row, so a large model's outputs are not kept: two rows at full length, run twice.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.utils._pytree as pytree

from autopart.device import capture_device, replayed_rng, rng_state

__all__ = ["rows_are_independent"]

log = logging.getLogger("autopart.capture")

#: How far a row's fingerprint may move between two rows run together and alone (another
#: batch size may pick other kernels); a wrong cut moves it by the order of the value itself.
_TOLERANCE = 2e-2

#: Per submodule call, per float output: its shape, and its per-row fingerprints along each
#: dimension that has as many entries as the run has rows.
Prints = list[tuple[torch.Size, dict[int, torch.Tensor]]]


def rows_are_independent(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    dims: tuple[int | None, ...],
) -> tuple[bool, str]:
    """Whether no output contradicts the cut along ``dims`` (one per leaf of ``(args,
    kwargs)``), and why not."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    second = _a_different_row(leaves, dims)

    def rows(*picked: int) -> tuple[tuple, dict[str, Any]]:
        index = torch.tensor(picked)
        cut = [
            leaf if d is None else leaf.index_select(d, index.to(leaf.device))
            for leaf, d in zip(leaves, dims, strict=True)
        ]
        return pytree.tree_unflatten(cut, spec)

    try:
        pair = _prints(model, *rows(0, second), rows=2)
        alone = [_prints(model, *rows(r), rows=1) for r in (0, second)]
    except Exception as exc:  # one row is a batch the model was not written for
        return False, f"the model cannot run on one row ({type(exc).__name__}: {exc})"
    # The model's own outputs come last (its hook runs after its submodules'): when none of
    # them changes shape between two rows and one, they lost the rows (a sequence pooled
    # away), so these were not the batch's.
    if pair and alone[0]:
        shapes = [(a, b) for (a, _), (b, _) in zip(pair[-1], alone[0][-1], strict=False) if len(a)]
        if shapes and all(a == b for a, b in shapes):
            return (
                False,
                f"the model's outputs (shape {tuple(shapes[0][0])}) do not keep these rows",
            )
    for together, first, last in zip(pair, *alone, strict=False):
        for (shape, both), (shape1, one), (shape2, two) in zip(together, first, last, strict=False):
            for d, prints in both.items():
                rest = [s for k, s in enumerate(shape) if k != d]
                if d not in one or d not in two or len(shape1) != len(shape):
                    continue
                if rest != [s for k, s in enumerate(shape1) if k != d] or shape1 != shape2:
                    continue
                if not _close(prints, torch.cat([one[d], two[d]])):
                    return False, "rows cut along these dimensions are not computed alone"
    return True, ""


def _a_different_row(leaves: list[Any], dims: tuple[int | None, ...]) -> int:
    """The first row unlike row 0 in some input (row 1 when all are alike)."""
    sizes = [leaf.shape[d] for leaf, d in zip(leaves, dims, strict=True) if d is not None]
    for r in range(1, min(sizes, default=2)):
        for leaf, d in zip(leaves, dims, strict=True):
            if d is not None and not torch.equal(leaf.select(d, r), leaf.select(d, 0)):
                return r
    return 1


def _prints(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], rows: int) -> list[Prints]:
    """For each submodule call, in call order: each float output's per-row fingerprints
    along every dimension of ``rows`` entries."""
    recorded: list[Prints] = []

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        recorded.append(
            [
                (
                    t.shape,
                    {d: _fingerprint(t.detach(), d) for d in range(t.dim()) if t.shape[d] == rows},
                )
                for t in pytree.tree_leaves(output)
                if _comparable(t)
            ]
        )

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


def _comparable(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dim() > 0
        and value.is_floating_point()
        and not value.is_nested
        and value.layout is torch.strided
    )


def _fingerprint(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Per row along ``dim``: a fixed, uneven weighting of its finite values (a normalized
    row sums to zero; these weights do not), and how many are not finite."""
    rows = t.movedim(dim, 0).reshape(t.shape[dim], -1).float()
    weights = torch.sin(1.0 + 0.7 * torch.arange(rows.shape[1], device=rows.device))
    finite = torch.isfinite(rows)
    values = torch.where(finite, rows, torch.zeros((), device=rows.device)) @ weights
    return torch.stack([values, (~finite).sum(1).float()], 1)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not torch.equal(a[:, 1], b[:, 1]):  # infinities in other places
        return False
    scale = float(a[:, 0].abs().max()) + 1e-6
    return float((a[:, 0] - b[:, 0]).abs().max()) <= _TOLERANCE * scale

"""Python branches on tensor values (``if mask.any():``, ``if labels.nonzero().size(0) > 0:``).

`torch.export` cannot trace a branch whose condition depends on the values in a tensor.  Such
a model is exported again with `torch.export.draft_export`, which runs the example call on real
values, follows the path that call takes, and keeps each assumption it made as a runtime assert
in the graph.  Those asserts are kept (the other checks tracers insert are stripped, see
`autopart.capture.tracing`) and turned into `check_branch` calls: a later batch that would take
another path stops with an `AutopartError` naming the line, never trains the wrong path.

A model on the meta device has no values to follow, so it still gets the capture error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols

from autopart.device import replayed_rng, rng_state
from autopart.errors import AutopartError, CaptureError

__all__ = [
    "BranchTaken",
    "check_branch",
    "check_example_path",
    "draft_export",
    "is_data_dependent",
    "keep_as_branch",
    "mark_branches",
]

log = logging.getLogger("autopart.capture")


class BranchTaken(AutopartError):
    """A batch took another path through a data-dependent branch than the captured one."""


@torch.fx.wrap
def check_branch(condition: Any, message: str) -> None:
    """Stop when a condition the captured path assumed does not hold for this batch."""
    if not bool(condition):
        raise BranchTaken(message)


def is_data_dependent(exc: BaseException) -> bool:
    """Did export fail on a branch that reads a tensor's values?"""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        if isinstance(current, GuardOnDataDependentSymNode):
            return True
        if "data-dependent" in str(current) or "data dependent" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def draft_export(
    model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], shapes: Any
) -> torch.export.ExportedProgram:
    """`torch.export.draft_export`, keeping the batch symbolic: guards on it become deferred
    asserts (stripped like export's own), and symbolic storage offsets are not compared with
    the real ones (see `_offsets_left_symbolic`)."""
    with _offsets_left_symbolic():
        return torch.export.draft_export(
            model,
            args,
            kwargs,
            dynamic_shapes=shapes,
            prefer_deferred_runtime_asserts_over_guards=True,
        )


@contextlib.contextmanager
def _offsets_left_symbolic() -> Iterator[None]:
    """Draft export checks every op's fake result against the real one.  Comparing the
    storage offset of a view into a batch-sized buffer (``qkv[1]``: ``E * seq * batch``) with
    the real number adds a guard that fixes the batch size (torch 2.13 compares offsets
    whatever its ``storage_offset`` flag says); sizes are still compared."""
    from torch._subclasses import fake_utils

    original = fake_utils._check_fake_real_tensors

    def check(real_out: Any, fake_out: Any, context: str = "", *args: Any, **kw: Any) -> None:
        if isinstance(fake_out.storage_offset(), torch.SymInt):
            torch._prims.utils.compare_tensor_meta(
                real_out, fake_out, check_sizes=True, check_strides=False, allow_rhs_unbacked=True
            )
            return
        original(real_out, fake_out, context, *args, **kw)

    fake_utils._check_fake_real_tensors = check
    try:
        yield
    finally:
        fake_utils._check_fake_real_tensors = original


def keep_as_branch(node: torch.fx.Node) -> bool:
    """An ``_assert_scalar`` on a value read from data (an unbacked symbol): draft export's
    record of a branch, kept where other checks are stripped."""
    if node.target is not torch.ops.aten._assert_scalar.default or not node.args:
        return False
    condition = node.args[0]
    value = condition.meta.get("val") if isinstance(condition, torch.fx.Node) else None
    return isinstance(value, torch.SymBool) and bool(free_unbacked_symbols(value))


def mark_branches(gm: torch.fx.GraphModule, report: Any) -> list[str]:
    """Turn the kept asserts of a draft export into `check_branch` calls whose message names
    the branches the captured path took; returns those branches as ``file:line: code``."""
    branches = _branch_lines(report)
    where = "; ".join(branches) or "a branch on tensor values"
    message = (
        f"this batch takes another path than the one autopart captured at `{where}`: the "
        "captured graph only holds the path the example batch took. The condition is checked "
        "on the rows a stage runs at once (a microbatch), which may take another path than "
        "your whole local batch would. What to do: make the branch take the same path for "
        "every batch (for a Hugging Face model, set the config option that decides it, e.g. "
        "problem_type), write it with torch.where / torch.cond, or pass microbatches=1"
    )
    changed = False
    for node in list(gm.graph.nodes):
        if keep_as_branch(node):
            node.target = check_branch
            node.args = (node.args[0], message)
            changed = True
    if changed:
        gm.recompile()
    return branches


def check_example_path(
    gm: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any], branches: list[str]
) -> None:
    """Run the captured path on the example itself: it must be the path the example takes.
    (Draft export does not always evaluate a branch on parameters' values as eager does.)"""
    device = next((t.device for t in pytree.tree_leaves((args, kwargs)) if _is_tensor(t)), None)
    device = device or torch.device("cpu")
    # Buffers the run updates in place (batch-norm statistics) are put back: capture must
    # leave the model as it found it.
    buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad(), replayed_rng(rng_state(device), device):
            gm(*args, **kwargs)
    except BranchTaken as exc:
        raise CaptureError(
            f"the captured path through `{'; '.join(branches) or 'a branch on tensor values'}` "
            "is not the one the example batch takes, so the branch cannot be captured"
        ) from exc
    finally:
        with torch.no_grad():
            for name, value in gm.named_buffers():
                value.copy_(buffers[name])


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _branch_lines(report: Any) -> list[str]:
    names = dict(getattr(report, "str_to_filename", {}) or {})
    lines: list[str] = []
    for failure in getattr(report, "failures", ()):
        data = getattr(failure, "data", None)
        if str(getattr(failure, "failure_type", "")).split(".")[-1] != "DATA_DEPENDENT_ERROR":
            continue
        stack = (data or {}).get("user_stack") or []
        if not stack:
            continue
        frame = stack[-1]
        filename = names.get(frame.get("filename"))
        where = f"{os.path.basename(filename)}:" if filename else "line "
        lines.append(f"{where}{frame.get('line')}: {frame.get('loc')}")
    return list(dict.fromkeys(lines))

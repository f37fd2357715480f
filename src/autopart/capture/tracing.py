"""Tracing: `torch.export` (non-strict, batch dimension symbolic) first, `torch.fx` when export
fails.  Also the passes that make a trace fit the runtime: the model's own output structure
restored around a flat tuple of leaves, ``**kwargs`` keywords given names, ``squeeze`` kept
from dropping a one-row batch, and export's runtime assertions stripped."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.fx.config
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from autopart.capture.branches import (
    check_example_path,
    draft_export,
    keep_as_branch,
    mark_branches,
)
from autopart.capture.common import _COMPARISONS, _PLAIN, LeafSpec, log
from autopart.capture.inputs import _Inputs, _is_tensor


@dataclass
class _Trace:
    """A traced graph plus what it takes to feed it the user's inputs."""

    gm: torch.fx.GraphModule
    method: str
    sources: dict[str, str]  # user-input placeholder name -> where it comes from in the call
    feed: Callable[[tuple, dict[str, Any]], list[Any]]  # call -> one value per placeholder
    static_batch: int | None = None
    # A second capture at static_batch + 1, when the batch could not be kept symbolic.
    gm_next: torch.fx.GraphModule | None = None


def _trace_export(
    model: torch.nn.Module, inputs: _Inputs, *, strict: bool, draft: bool = False
) -> _Trace:
    """Export with the batch symbolic; ``draft`` for a model that branches on tensor values
    (`autopart.capture.branches`)."""
    batch = max(inputs.batch, 2)  # export specializes sizes 0 and 1
    gm = _export(model, inputs, batch, dynamic=True, strict=strict, draft=draft)
    placeholders = gm.graph.find_nodes(op="placeholder")
    sources = {n.name: source for n, source in zip(placeholders, inputs.sources(), strict=True)}
    specialized = [
        node.name
        for node, (_, dim) in zip(placeholders, inputs.leaf_dims(), strict=True)
        if dim is not None and is_concrete_int(node.meta["val"].shape[dim])
    ]

    def feed(args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        return pytree.tree_leaves((args, kwargs))

    trace = _Trace(gm, "export", sources, feed)
    if specialized:
        log.warning(
            "the model specializes the batch size (inputs %s); the captured graph only runs at "
            "batch %d",
            ", ".join(specialized),
            batch,
        )
        trace.gm = _export(model, inputs, batch, dynamic=False, strict=strict, draft=draft)
        trace.gm_next = _export(model, inputs, batch + 1, dynamic=False, strict=strict, draft=draft)
        trace.static_batch = batch
    return trace


def _export(
    model: torch.nn.Module,
    inputs: _Inputs,
    batch: int,
    *,
    dynamic: bool,
    strict: bool,
    draft: bool,
) -> torch.fx.GraphModule:
    args, kwargs = inputs.resized(batch)
    shapes = None
    with _named_keywords(model, kwargs):
        if dynamic:
            marks = inputs.marks(torch.export.Dim.AUTO)
            bound = inspect.signature(model.forward).bind(*marks[0], **marks[1])
            shapes = dict(bound.arguments)
        program, outputs, report = _export_program(model, args, kwargs, shapes, strict, draft)
    # Stripping before unlifting saves recompiling the (possibly huge) generated code twice.
    _strip_checks(program.graph_module, recompile=False, branches=draft)
    if "check_guards" in inspect.signature(program.module).parameters:
        gm = program.module(check_guards=False)
    else:
        gm = program.module()
        _strip_checks(gm, recompile=False, branches=draft)
    if report is not None:
        branches = mark_branches(gm, report)
        check_example_path(gm, args, kwargs, branches)
        log.warning(
            "%s branches on tensor values (%s); captured the path the example batch takes, "
            "and a batch that takes another stops with an error",
            type(model).__name__,
            "; ".join(branches) or "see the debug log",
        )
    outputs.restore_structure(gm)
    return gm


@contextmanager
def _named_keywords(model: torch.nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
    """Give keywords that reach ``forward`` through ``**kwargs`` (Hugging Face's
    ``num_items_in_batch``, ``output_hidden_states``) a parameter of their own while exporting:
    export matches dynamic shapes to the signature and cannot match them inside ``**kwargs``."""
    signature = inspect.signature(model.forward)
    params = list(signature.parameters.values())
    var = next((p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = [k for k in kwargs if k not in signature.parameters]
    if var is None or not extra:
        yield
        return
    original = model.forward
    named = [p for p in params if p is not var]
    named += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in extra]

    def forward(*args: Any, **kw: Any) -> Any:
        return original(*args, **kw)

    forward.__signature__ = signature.replace(parameters=named)  # type: ignore[attr-defined]
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def _export_program(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    shapes: Any,
    strict: bool,
    draft: bool,
) -> tuple[torch.export.ExportedProgram, _OutputLeaves, Any]:
    """The exported program, its outputs' structure, and with ``draft`` the report of
    `torch.export.draft_export` (`autopart.capture.branches`), else None."""
    outputs = _OutputLeaves()
    with outputs.flattening(model), _quiet_export():
        if not draft:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=strict)
            return program, outputs, None
        # Draft export prints its whole report and graph: kept for the debug log.
        held = io.StringIO()
        with contextlib.redirect_stderr(held):
            program = draft_export(model, args, kwargs, shapes)
        log.debug("torch.export.draft_export output:\n%s", held.getvalue())
        return program, outputs, program._report


class _OutputLeaves:
    """Export the model's output as a flat tuple of what a graph can return, and give the
    graph module the model's own structure back afterwards.

    Models return objects that export cannot (a Hugging Face ``DynamicCache``, which
    ``use_cache=True`` adds by default, or any class pytree does not know).  Such an object
    holds nothing a pipeline can carry between stages and nothing training needs, so it is
    returned as ``None`` in its place, with a warning; tensors, plain values and every
    container pytree knows (tuples, dicts, ``ModelOutput``) come back as the model built them.
    """

    def __init__(self) -> None:
        self.spec: pytree.TreeSpec | None = None

    @contextmanager
    def flattening(self, model: torch.nn.Module) -> Iterator[None]:
        handle = model.register_forward_hook(self._flatten)
        try:
            yield
        finally:
            handle.remove()

    def _flatten(self, module: torch.nn.Module, args: Any, output: Any) -> tuple:
        leaves, self.spec = pytree.tree_flatten_with_path(output)
        kept = []
        for path, leaf in leaves:
            if _is_tensor(leaf) or isinstance(leaf, _PLAIN):
                kept.append(leaf)
                continue
            log.info(
                "the model returns a %s at output%s, which cannot travel between pipeline "
                "stages; autopart returns None there",
                type(leaf).__name__,
                pytree.keystr(path),
            )
            kept.append(None)
        return tuple(kept)

    def restore_structure(self, gm: torch.fx.GraphModule) -> None:
        codegen = gm.graph._codegen
        info = getattr(codegen, "pytree_info", None)
        if self.spec is not None and info is not None:
            codegen.pytree_info = info._replace(out_spec=self.spec)
        gm.recompile()


@contextmanager
def _quiet_export() -> Iterator[None]:
    """Export with less work and less noise.

    Recording a Python stack trace per traced op is a large share of export time on big
    models and the IR does not use them.  On failure torch dumps partial graphs to stderr,
    which would bury our one-paragraph explanation: that output is held back and logged at
    debug level, or passed on unchanged when export succeeds.
    """
    config = torch.fx.config
    old_traces = getattr(config, "do_not_emit_stack_traces", None)
    torch_log = logging.getLogger("torch")
    old_level = torch_log.level
    held = io.StringIO()
    if old_traces is not None:
        config.do_not_emit_stack_traces = True
    torch_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(held):
            yield
    except Exception:
        log.debug("torch.export output:\n%s", held.getvalue())
        raise
    else:
        sys.stderr.write(held.getvalue())
    finally:
        torch_log.setLevel(old_level)
        if old_traces is not None:
            config.do_not_emit_stack_traces = old_traces


class _LeafTracer(torch.fx.Tracer):
    """An fx tracer that also keeps the user's chosen modules as opaque calls."""

    def __init__(self, leaves: Sequence[LeafSpec]) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf for leaf in leaves if isinstance(leaf, type))
        self.leaf_names = {leaf for leaf in leaves if isinstance(leaf, str)}

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaf_types)
            or module_qualified_name in self.leaf_names
            or super().is_leaf_module(m, module_qualified_name)
        )


def _trace_fx(model: torch.nn.Module, inputs: _Inputs, leaves: Sequence[LeafSpec]) -> _Trace:
    signature = inspect.signature(model.forward)
    given = signature.bind(*inputs.args, **inputs.kwargs).arguments
    # Arguments the user did not pass keep their defaults: without this, fx would trace them as
    # proxies and take `if mask is not None` branches the real call never takes.
    concrete = {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in given and p.default is not inspect.Parameter.empty
    }
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    _strip_checks(gm)
    params = list(signature.parameters)
    positional = {name: i for i, name in enumerate(params[: len(inputs.args)])}
    sources = {}
    for placeholder, name in zip(_placeholders(gm), params, strict=True):
        if name in given:
            index = positional.get(name)
            sources[placeholder] = f"args[{index}]" if index is not None else f"kwargs[{name!r}]"

    def feed(args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())

    return _Trace(gm, "fx", sources, feed)


def _keep_batch_in_squeeze(gm: torch.fx.GraphModule) -> None:
    """Make ``squeeze()`` drop only the dims that were 1 at capture.

    Export assumes a symbolic batch is at least 2, so ``logits.squeeze()`` (Hugging Face's
    regression loss) is captured as keeping it; but a microbatch chunk of one row would then
    lose its batch dimension, and rows could no longer be sent or joined.  The values are
    the same either way: a squeeze only reshapes."""
    changed = False
    for node in gm.graph.nodes:
        if node.target is not torch.ops.aten.squeeze.default:
            continue
        value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        if not _is_tensor(value):
            continue
        if all(isinstance(size, int) for size in value.shape):
            continue  # no symbolic (batch) dimension to protect
        dims = [d for d, size in enumerate(value.shape) if isinstance(size, int) and size == 1]
        node.target = torch.ops.aten.squeeze.dims
        node.args = (node.args[0], dims)
        changed = True
    if changed:
        gm.recompile()


#: Casts that return their input itself when it already has the dtype asked for.
_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout)


def _return_before_upcasts(gm: torch.fx.GraphModule) -> None:
    """Return a value, not its cast to the dtype it had at capture, when the cast is also
    read by other ops.

    ``logits.float()`` of fp32 logits returns the same tensor, so the trace cannot tell
    whether the model returned ``logits`` or the cast: the output points at the cast.  Under
    the caller's autocast the two differ (bf16 logits, their fp32 copy for the loss), and the
    common pattern (Hugging Face's: upcast inside the loss, return the logits) returns the
    value itself, half the bytes.  The values are equal either way (the cast only widens);
    a cast read by nothing but the output (``return x.float()``) stays."""
    output = gm.graph.output_node()
    changed = False

    def before(arg: Any) -> Any:
        nonlocal changed
        if not (isinstance(arg, torch.fx.Node) and arg.target in _CASTS):
            return arg
        source = arg.args[0]
        cast, value = arg.meta.get("val"), getattr(source, "meta", {}).get("val")
        same = _is_tensor(cast) and _is_tensor(value) and cast.dtype == value.dtype
        if not same or arg.kwargs.get("copy") or set(arg.users) == {output}:
            return arg
        changed = True
        return source

    output.args = torch.fx.node.map_arg(output.args, before)
    if changed:
        gm.graph.lint()
        gm.recompile()


def _placeholders(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.find_nodes(op="placeholder")]


def _strip_checks(
    gm: torch.fx.GraphModule, *, recompile: bool = True, branches: bool = False
) -> None:
    """Drop the runtime checks tracers insert (guards, dtype and specialization asserts): they
    compute nothing, and leaving them in would give the planner nodes that belong nowhere.
    The subgraphs of higher-order ops (a ``no_grad`` or autocast region) are stripped too:
    their checks name the device of the trace, which is not where a stage runs.  With
    ``branches`` (a draft export) its records of branches on data stay; export's own asserts
    on values read from data go (``u1 >= 2`` from the batch's range of 2 and more would stop
    a microbatch of one row)."""
    for child in gm.children():
        if isinstance(child, torch.fx.GraphModule):
            _strip_checks(child, recompile=True, branches=branches)
    checks = [
        node
        for node in gm.graph.nodes
        if _is_check(node) and not node.users and not (branches and keep_as_branch(node))
    ]
    feeding = {arg for node in checks for arg in node.all_input_nodes}
    for node in reversed(checks):
        gm.graph.erase_node(node)
    # The comparisons fx feeds into its specialization asserts are dead now.
    for node in feeding:
        if not node.users and node.op == "call_function" and node.target in _COMPARISONS:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        gm.delete_submodule("_guards_fn")
    if checks and recompile:
        gm.recompile()


def _is_check(node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return node.target == "_guards_fn"
    return node.op == "call_function" and node.target in _CHECKS


def _check_targets() -> frozenset[Any]:
    aten = torch.ops.aten
    names = [
        ("_assert_tensor_metadata", "default"),
        ("_assert_scalar", "default"),
        ("_assert_async", "default"),
        ("_assert_async", "msg"),
        ("sym_constrain_range", "default"),
        ("sym_constrain_range_for_size", "default"),
    ]
    ops = [getattr(getattr(aten, op, None), overload, None) for op, overload in names]
    python = [torch._assert, torch.fx._symbolic_trace._assert_is_none]
    return frozenset(op for op in (*ops, *python) if op is not None)


_CHECKS = _check_targets()

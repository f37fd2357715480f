"""Capture a PyTorch model into the graph IR.

`torch.export` (non-strict) is the primary tracer: it sees through Python, yields ATen ops with
the module each came from, and can keep the batch dimension symbolic, so one graph serves every
microbatch size the runtime feeds.  `torch.fx.symbolic_trace` is the fallback for models export
rejects, since it tolerates some Python that export does not (and lets users mark leaf modules).

Shapes and costs come from executing the graph twice on the ``meta`` device: at the capture batch
``a`` (measuring FLOPs, bytes and the tensors autograd saves) and at ``a + 1`` (shapes only).
Comparing the two runs tells which dimension of every value carries the batch and what it holds
per sample, uniformly for symbolic exports, static exports and fx graphs.  Running on meta keeps
capture free of real compute and memory, so a model built under ``torch.device("meta")`` with
hundreds of billions of parameters can be captured on a laptop.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import linecache
import logging
import operator
import os
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.fx.config
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils.flop_counter import FlopCounterMode

from autopart.errors import CaptureError
from autopart.ir import (
    Graph,
    Node,
    NodeKind,
    NodeStats,
    ParamSpec,
    TensorSpec,
    structural_fingerprint,
)
from autopart.scalar_outputs import reductions_of, rewrite_scalar_outputs

log = logging.getLogger(__name__)

METHODS = ("auto", "export", "fx")
LeafSpec = str | type[torch.nn.Module]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_DEVICE_TYPES = {"cpu", "cuda", "mps", "xpu", "hpu", "meta"}
_SCALAR_DTYPES = {bool: "bool", int: "int", float: "float"}
_COMPARISONS = (operator.eq, operator.ne)
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout)


def capture(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    method: str = "auto",
    strict: bool = False,
    leaf_modules: Sequence[LeafSpec] = (),
) -> Graph:
    """Capture ``model`` called as ``model(*args, **kwargs)`` into a `Graph`.

    The batch size is dim 0 of the first tensor argument; every tensor input whose dim 0 equals
    it carries the batch.  ``method`` is ``"export"``, ``"fx"`` or ``"auto"`` (export, then fx
    when export fails); ``strict`` is passed to `torch.export.export`.  ``leaf_modules`` (types
    or qualified names) are kept as single opaque calls by the fx tracer.  Raises `CaptureError`
    naming the failing op and module when the model cannot be captured.

    The returned ``Graph.fx_module`` is called like the model and accepts any batch size.  If
    the model pins the batch size (export cannot keep it symbolic), capture falls back to static
    exports at batch ``b`` and ``b + 1``: per-sample shapes and batch dims still come from the
    difference, but ``fx_module`` then only runs at ``Graph.static_batch == b``.
    """
    if method not in METHODS:
        raise CaptureError(f"unknown capture method {method!r}; use one of {', '.join(METHODS)}")
    inputs = _Inputs.of(args, dict(kwargs or {}))
    failures: list[tuple[str, BaseException]] = []
    trace = None
    if method in ("auto", "export"):
        try:
            trace = _trace_export(model, inputs, strict=strict)
        except Exception as exc:
            failures.append(("torch.export", exc))
    if trace is None and method in ("auto", "fx"):
        try:
            trace = _trace_fx(model, inputs, leaf_modules)
        except Exception as exc:
            failures.append(("torch.fx", exc))
        else:
            if failures:
                log.warning(
                    "torch.export failed (%s); captured with torch.fx", _first_line(failures[0][1])
                )
    if trace is None:
        raise _capture_error(model, failures, strict) from failures[0][1]
    for gm in (trace.gm, trace.gm_next):
        if gm is not None:
            _keep_batch_in_squeeze(gm)
            rewrite_scalar_outputs(gm, trace.sources)
    return _build_graph(model, trace, inputs)


# --------------------------------------------------------------------------------------------
# Example inputs


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


# --------------------------------------------------------------------------------------------
# Tracing


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


def _trace_export(model: torch.nn.Module, inputs: _Inputs, *, strict: bool) -> _Trace:
    batch = max(inputs.batch, 2)  # export specializes sizes 0 and 1
    gm = _export(model, inputs, batch, dynamic=True, strict=strict)
    placeholders = gm.graph.find_nodes(op="placeholder")
    flat = pytree.tree_leaves((inputs.args, inputs.kwargs))
    sources = {n.name: source for n, source in zip(placeholders, inputs.sources(), strict=True)}
    specialized = [
        node.name
        for node, value in zip(placeholders, flat, strict=True)
        if inputs.is_batch(value) and is_concrete_int(node.meta["val"].shape[0])
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
        trace.gm = _export(model, inputs, batch, dynamic=False, strict=strict)
        trace.gm_next = _export(model, inputs, batch + 1, dynamic=False, strict=strict)
        trace.static_batch = batch
    return trace


def _export(
    model: torch.nn.Module, inputs: _Inputs, batch: int, *, dynamic: bool, strict: bool
) -> torch.fx.GraphModule:
    args, kwargs = inputs.resized(batch)
    shapes = None
    with _named_keywords(model, kwargs):
        if dynamic:
            auto = torch.export.Dim.AUTO
            marks = pytree.tree_map(
                lambda v: {0: auto} if inputs.is_batch(v) else None, (inputs.args, inputs.kwargs)
            )
            bound = inspect.signature(model.forward).bind(*marks[0], **marks[1])
            shapes = dict(bound.arguments)
        program, outputs = _export_program(model, args, kwargs, shapes, strict)
    # Stripping before unlifting saves recompiling the (possibly huge) generated code twice.
    _strip_checks(program.graph_module, recompile=False)
    if "check_guards" in inspect.signature(program.module).parameters:
        gm = program.module(check_guards=False)
    else:
        gm = program.module()
        _strip_checks(gm, recompile=False)
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
    model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], shapes: Any, strict: bool
) -> tuple[torch.export.ExportedProgram, _OutputLeaves]:
    outputs = _OutputLeaves()
    with _quiet_export(), outputs.flattening(model):
        program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=strict)
    return program, outputs


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


def _placeholders(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.find_nodes(op="placeholder")]


def _strip_checks(gm: torch.fx.GraphModule, *, recompile: bool = True) -> None:
    """Drop the runtime checks tracers insert (guards, dtype and specialization asserts): they
    compute nothing, and leaving them in would give the planner nodes that belong nowhere."""
    checks = [node for node in gm.graph.nodes if _is_check(node) and not node.users]
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


# --------------------------------------------------------------------------------------------
# Parameters


@dataclass
class _Params:
    """Canonical names of the model's parameters and buffers; tied names collapse to one."""

    specs: dict[str, ParamSpec]
    by_id: dict[int, str]
    by_name: dict[str, str]

    @staticmethod
    def of(model: torch.nn.Module) -> _Params:
        entries = [(n, t, False) for n, t in model.named_parameters(remove_duplicate=False)]
        entries += [(n, t, True) for n, t in model.named_buffers(remove_duplicate=False)]
        by_id: dict[int, str] = {}
        aliases: dict[str, list[str]] = {}
        first: dict[str, tuple[torch.Tensor, bool]] = {}
        for name, tensor, is_buffer in entries:
            canonical = by_id.setdefault(id(tensor), name)
            if canonical == name:
                first[name] = (tensor, is_buffer)
                aliases[name] = []
            else:
                aliases[canonical].append(name)
        specs = {
            name: ParamSpec(
                name=name,
                shape=tuple(tensor.shape),
                dtype=str(tensor.dtype),
                is_buffer=is_buffer,
                requires_grad=not is_buffer and tensor.requires_grad,
                aliases=tuple(aliases[name]),
            )
            for name, (tensor, is_buffer) in first.items()
        }
        by_name = {alias: name for name, spec in specs.items() for alias in (name, *spec.aliases)}
        return _Params(specs, by_id, by_name)

    def resolve(self, name: str, tensor: torch.Tensor) -> str:
        """The canonical name of an attribute the graph reads; unknown tensors are constants
        the tracer lifted, recorded as non-trainable buffers under their attribute name."""
        canonical = self.by_id.get(id(tensor)) or self.by_name.get(name)
        if canonical is None:
            canonical = name
            self.specs[name] = ParamSpec(
                name, tuple(tensor.shape), str(tensor.dtype), is_buffer=True, requires_grad=False
            )
            self.by_id[id(tensor)] = name
        return canonical


# --------------------------------------------------------------------------------------------
# Executing on meta


def _meta_twin(tensor: torch.Tensor) -> torch.Tensor:
    twin = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    trainable = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
    return twin.requires_grad_() if trainable else twin


def _on_meta(value: Any) -> Any:
    """Point device arguments (``arange(..., device='cpu')``, ``x.to('cuda')``) at meta."""
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, str) and value.split(":")[0] in _DEVICE_TYPES:
        return "meta"
    return value


@dataclass
class _Executed:
    """What executing one node did: its value, its FLOPs and the storages autograd saved for
    backward, as (storage key, bytes); FLOPs and saved storages only on a measuring run."""

    value: Any
    flops: int = 0
    saved: list[tuple[int, int]] = field(default_factory=list)


class _OutTensor(NamedTuple):
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    requires_grad: bool
    alias: int | None  # index of the input tensor whose storage this output views


class _SameAs(NamedTuple):
    index: int  # the op returned this input tensor itself (in-place ops, no-op casts)


@dataclass(frozen=True)
class _Replay:
    """An op's effect recorded relative to its inputs, reused for later calls with identical
    input metadata: a 96-block transformer then costs one meta execution per distinct op,
    not per node.  Saved storages are ``("arg", i)``, ``("out", j)`` or ``("new", k)``, the
    k-th storage the op created internally, of ``new_bytes[k]`` bytes."""

    spec: pytree.TreeSpec
    leaves: tuple[Any, ...]
    flops: int
    saved: tuple[tuple[str, int], ...]
    new_bytes: tuple[int, ...]

    @staticmethod
    def record(
        inputs: list[torch.Tensor], value: Any, flops: int, saved: list[torch.Tensor]
    ) -> _Replay | None:
        in_storages = [_storage_id(t) for t in inputs]
        in_ids = [id(t) for t in inputs]
        leaves, spec = pytree.tree_flatten(value)
        recorded: list[Any] = []
        for leaf in leaves:
            if _is_tensor(leaf) and id(leaf) in in_ids:
                recorded.append(_SameAs(in_ids.index(id(leaf))))
            elif _is_tensor(leaf):
                sid = _storage_id(leaf)
                alias = in_storages.index(sid) if sid in in_storages else None
                if alias is not None and inputs[alias].dtype != leaf.dtype:
                    return None  # a dtype-reinterpreting view: rare, not worth replaying
                recorded.append(
                    _OutTensor(
                        tuple(leaf.shape),
                        leaf.stride(),
                        leaf.storage_offset(),
                        leaf.dtype,
                        leaf.requires_grad,
                        alias,
                    )
                )
            elif isinstance(leaf, _PLAIN):
                recorded.append(leaf)
            else:
                return None
        out_storages = [_storage_id(t) if _is_tensor(t) else None for t in leaves]
        refs = []
        created: dict[int, int] = {}
        new_bytes: list[int] = []
        for tensor in saved:
            sid = _storage_id(tensor)
            if sid in in_storages:
                refs.append(("arg", in_storages.index(sid)))
            elif sid in out_storages:
                refs.append(("out", out_storages.index(sid)))
            else:
                if sid not in created:
                    created[sid] = len(new_bytes)
                    new_bytes.append(tensor.untyped_storage().nbytes())
                refs.append(("new", created[sid]))
        return _Replay(spec, tuple(recorded), flops, tuple(refs), tuple(new_bytes))

    def apply(
        self, inputs: list[torch.Tensor], fresh: Iterator[int], anchor: torch.Tensor
    ) -> _Executed:
        made: list[Any] = []
        for leaf in self.leaves:
            if isinstance(leaf, _SameAs):
                made.append(inputs[leaf.index])
            elif isinstance(leaf, _OutTensor):
                made.append(_materialize(leaf, inputs, anchor))
            else:
                made.append(leaf)
        new_keys = [next(fresh) for _ in self.new_bytes]
        saved = []
        for kind, ref in self.saved:
            if kind == "new":
                saved.append((new_keys[ref], self.new_bytes[ref]))
            else:
                storage = (inputs[ref] if kind == "arg" else made[ref]).untyped_storage()
                saved.append((storage._cdata, storage.nbytes()))
        return _Executed(pytree.tree_unflatten(made, self.spec), self.flops, saved)


def _materialize(
    leaf: _OutTensor, inputs: list[torch.Tensor], anchor: torch.Tensor
) -> torch.Tensor:
    """A stand-in for a recorded output that autograd treats like the real one: a view of the
    input it aliased, or a fresh non-leaf (so a later in-place op on it is legal), joined to
    the autograd graph through ``anchor``; neither op saves anything for backward."""
    if leaf.alias is not None:
        return inputs[leaf.alias].as_strided(leaf.shape, leaf.stride, leaf.offset)
    tensor = torch.empty_strided(leaf.shape, leaf.stride, dtype=leaf.dtype, device="meta")
    return tensor + anchor if leaf.requires_grad else tensor


def _replay_key(node: torch.fx.Node, inputs: list[Any], spec: pytree.TreeSpec) -> Hashable | None:
    """Everything an op's output metadata and autograd behaviour can depend on, or None when
    the call cannot be keyed (a module call, an argument that is not plain data)."""
    if node.op == "call_module":
        return None
    storages: dict[int, int] = {}
    parts = []
    for leaf in inputs:
        if _is_tensor(leaf):
            first = storages.setdefault(_storage_id(leaf), len(storages))
            parts.append(
                (
                    tuple(leaf.shape),
                    leaf.stride(),
                    leaf.storage_offset(),
                    leaf.dtype,
                    leaf.requires_grad,
                    first,
                )
            )
        elif isinstance(leaf, _PLAIN):
            parts.append((type(leaf), leaf))
        else:
            return None
    return (node.op, node.target, spec, tuple(parts))


Visitor = Callable[[torch.fx.Node, list[Any], Any, "_Executed | None"], None]


class _MetaRunner:
    """Executes a graph module on meta tensors, one node at a time, with meta twins of its
    parameters (tied ones share a twin) so nothing real is read or allocated.

    A measuring run counts FLOPs and the tensors autograd saves per node; everything it
    creates stays referenced until the runner goes, so storage keys stay unique.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        twins: dict[int, torch.Tensor] = {}

        def twin(tensor: torch.Tensor) -> torch.Tensor:
            key = id(tensor)
            if key not in twins:
                twins[key] = _meta_twin(tensor)
            return twins[key]

        self.attrs: dict[str, Any] = {}
        self.real_attrs: dict[str, Any] = {}
        self.module_state: dict[str, dict[str, torch.Tensor]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = operator.attrgetter(node.target)(gm)
                self.real_attrs[node.target] = value
                self.attrs[node.target] = twin(value) if _is_tensor(value) else value
            elif node.op == "call_module":
                module = gm.get_submodule(node.target)
                state = dict(module.named_parameters(remove_duplicate=False))
                state.update(module.named_buffers(remove_duplicate=False))
                self.module_state[node.target] = {k: twin(v) for k, v in state.items()}
        self.twins = twins
        self.keep: list[torch.Tensor] = []
        self.fresh = itertools.count(-1, -1)  # keys of replayed internal storages
        self.anchor = torch.zeros((), device="meta", requires_grad=True)
        self._counter: FlopCounterMode | None = None
        self._pending: list[torch.Tensor] = []  # saved by autograd during the current op
        self._replays: dict[Hashable, _Replay | None] = {}

    def run(
        self, feed: list[Any], visit: Visitor | None = None, *, measure: bool = False
    ) -> dict[str, Any]:
        """Values of every node by name; ``visit(node, inputs, value, executed)`` runs after
        each, with the flattened (args, kwargs) of an op (``[]`` and None for placeholders,
        attributes and the output)."""
        self._counter = FlopCounterMode(display=False) if measure else None
        self._replays = {}
        env: dict[torch.fx.Node, Any] = {}
        values = iter(feed)
        with contextlib.ExitStack() as stack:
            if self._counter is None:
                stack.enter_context(torch.no_grad())
            else:
                stack.enter_context(torch.enable_grad())
                hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
                stack.enter_context(hooks)
            for node in self.gm.graph.nodes:
                inputs: list[Any] = []
                executed = None
                if node.op == "placeholder":
                    value = next(values)
                elif node.op == "get_attr":
                    value = self.attrs[node.target]
                elif node.op == "output":
                    value = torch.fx.node.map_arg(node.args[0], env.__getitem__)
                else:
                    call = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                    leaves, spec = pytree.tree_flatten(call)
                    inputs = [_on_meta(leaf) for leaf in leaves]
                    executed = self._execute(node, inputs, spec)
                    value = executed.value
                env[node] = value
                if visit is not None:
                    visit(node, inputs, value, executed)
        return {node.name: value for node, value in env.items()}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._pending.append(tensor)
        return tensor

    def _execute(self, node: torch.fx.Node, inputs: list[Any], spec: pytree.TreeSpec) -> _Executed:
        """Run (or replay) a node given the leaves and structure of its (args, kwargs)."""
        key = _replay_key(node, inputs, spec)
        tensors = [t for t in inputs if _is_tensor(t)]
        replay = self._replays.get(key) if key is not None else None
        if replay is not None:
            return replay.apply(tensors, self.fresh, self.anchor)
        counter, pending = self._counter, self._pending
        pending.clear()
        if counter is None:
            value, flops = self._call(node, *pytree.tree_unflatten(inputs, spec)), 0
        else:
            # Counting per executed op (entering resets the count) keeps replays, which
            # create stand-in tensors, out of the slow Python dispatch of the counter.
            with counter:
                value = self._call(node, *pytree.tree_unflatten(inputs, spec))
            flops = counter.get_total_flops()
        self.keep.extend(pending)
        saved = [(_storage_id(t), t.untyped_storage().nbytes()) for t in pending]
        if key is not None:
            self._replays[key] = _Replay.record(tensors, value, flops, pending)
        return _Executed(value, flops, saved)

    def _call(self, node: torch.fx.Node, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run one node on meta; a node that must read values (a leaf module with
        data-dependent control flow, ``.item()``) runs once on zero-filled CPU tensors."""
        try:
            return self._invoke(node, args, kwargs, self.module_state.get(node.target))
        except Exception as exc:
            meta_error = exc
        log.info(
            "%s (node %s) cannot run on meta (%s); costing it on zero-filled CPU tensors",
            _op_name(node, self.gm),
            node.name,
            _first_line(meta_error),
        )
        try:
            inputs = pytree.tree_map(_zeros_on_cpu, (args, kwargs))
            state = self.module_state.get(node.target)
            if state is not None:
                state = {name: _zeros_on_cpu(t) for name, t in state.items()}
            return pytree.tree_map(_meta_like, self._invoke(node, *inputs, state))
        except Exception:
            where = _module_path(node) or "the model's top level"
            raise CaptureError(
                f"cannot analyse op {_op_name(node, self.gm)} (node {node.name}) in module "
                f"'{where}': {_first_line(meta_error)}. It fails on the meta device and on "
                "zero-filled inputs; ops that need real data cannot be costed at capture: move "
                "them out of forward."
            ) from meta_error

    def _invoke(
        self,
        node: torch.fx.Node,
        args: tuple,
        kwargs: dict[str, Any],
        state: dict[str, torch.Tensor] | None,
    ) -> Any:
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            if node.target in ("cpu", "cuda"):
                return args[0]
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        module = self.gm.get_submodule(node.target)
        return torch.func.functional_call(module, state, args, kwargs, strict=False)


def _zeros_on_cpu(value: Any) -> Any:
    if not _is_tensor(value) or value.device.type != "meta":
        return _on_cpu(value)
    zeros = torch.zeros(value.shape, dtype=value.dtype)
    return zeros.requires_grad_() if value.requires_grad else zeros


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.device) or (isinstance(value, str) and value == "meta"):
        return torch.device("cpu")
    return value


def _meta_like(value: Any) -> Any:
    if not _is_tensor(value) or value.device.type == "meta":
        return value
    twin = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return twin.requires_grad_() if value.requires_grad else twin


# --------------------------------------------------------------------------------------------
# Shapes per sample and analytic stats


def _leaf_signature(value: Any) -> list[Any]:
    """What the second run must record of a value: tensor shapes and scalar values."""
    return [tuple(v.shape) if _is_tensor(v) else v for v in pytree.tree_leaves(value)]


def _spec(value: Any, other: Any, batch: int, other_batch: int) -> TensorSpec | None:
    """The per-sample spec of one leaf value, from its counterpart at another batch size.

    A dimension that differs between the runs carries the batch; per sample it holds its
    growth per added sample (``batch * seq`` flattened becomes ``seq``).  Scalars that differ
    are shape arithmetic on the batch: ``symint`` and the like."""
    if _is_tensor(value):
        shape = list(value.shape)
        batch_dim = None
        if isinstance(other, tuple) and len(other) == len(shape):
            for dim, (here, there) in enumerate(zip(shape, other, strict=True)):
                if here != there:
                    batch_dim = dim if batch_dim is None else batch_dim
                    shape[dim] = (there - here) // (other_batch - batch)
        return TensorSpec(tuple(shape), str(value.dtype), batch_dim)
    if type(value) in _SCALAR_DTYPES:
        varies = other is not None and other != value
        kind = _SCALAR_DTYPES[type(value)]
        if not varies:
            return TensorSpec((), kind)
        per_sample = (other - value) / (other_batch - batch)
        return TensorSpec((), f"sym{kind}", affine=(per_sample, value - per_sample * batch))
    return None


@dataclass
class _Analysis:
    """Per-node specs and stats, gathered while the graph runs at the capture batch.

    Each saved storage is counted once, at the first node that saves it, and parameters'
    storages never count.  A storage belongs to the batch when the value that first produced
    it does; one created inside an op (a dropout mask, softmax output) follows the op's kind.
    """

    kinds: dict[str, NodeKind]
    other: dict[str, Any]
    batch: int
    other_batch: int
    seen: set[int]  # storages already counted, starting with the parameters'
    module_params: dict[str, list[torch.Tensor]]
    specs: dict[str, tuple[TensorSpec, ...]] = field(default_factory=dict)
    stats: dict[str, NodeStats] = field(default_factory=dict)
    tensor_batch: dict[int, bool] = field(default_factory=dict)
    storage_batch: dict[int, bool] = field(default_factory=dict)

    def visit(
        self, node: torch.fx.Node, inputs: list[Any], value: Any, executed: _Executed | None
    ) -> None:
        if node.op == "get_attr":
            return
        leaves = pytree.tree_leaves(value)
        others = self.other.get(node.name)
        if others is None or len(others) != len(leaves):
            others = [None] * len(leaves)
        specs = []
        for leaf, other in zip(leaves, others, strict=True):
            spec = _spec(leaf, other, self.batch, self.other_batch)
            if spec is None:
                continue
            specs.append(spec)
            if _is_tensor(leaf):
                self.tensor_batch[id(leaf)] = spec.is_batch
                self.storage_batch.setdefault(_storage_id(leaf), spec.is_batch)
        self.specs[node.name] = tuple(specs)
        if executed is not None:
            self.stats[node.name] = self._stats(node, inputs, leaves, executed)

    def _stats(
        self, node: torch.fx.Node, inputs: list[Any], outputs: list[Any], executed: _Executed
    ) -> NodeStats:
        in_batch = self.kinds[node.name] == NodeKind.BATCH
        tensors = {id(t): t for t in inputs if _is_tensor(t)}
        params = self.module_params.get(node.name, [])
        grad_inputs = sum(t.requires_grad for t in (*tensors.values(), *params))
        tensors.update((id(t), t) for t in outputs if _is_tensor(t))
        accessed = [0, sum(_nbytes(t) for t in params)]  # [batch-scaled, fixed]
        for key, t in tensors.items():
            accessed[not self.tensor_batch.get(key, False)] += _nbytes(t)
        saved = [0, 0]
        for key, nbytes in executed.saved:
            if key not in self.seen:
                self.seen.add(key)
                saved[not self.storage_batch.get(key, in_batch)] += nbytes
        b = self.batch
        return NodeStats(
            flops_per_sample=executed.flops / b if in_batch else 0.0,
            flops_fixed=0.0 if in_batch else float(executed.flops),
            bytes_per_sample=accessed[0] / b,
            bytes_fixed=float(accessed[1]),
            saved_per_sample=saved[0] / b,
            saved_fixed=float(saved[1]),
            grad_inputs=grad_inputs,
        )


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# --------------------------------------------------------------------------------------------
# Building the IR


def _kinds(gm: torch.fx.GraphModule, user_inputs: Iterable[str]) -> dict[str, NodeKind]:
    """Dataflow kinds: anything reachable from a user input is batch work (shape arithmetic
    included); the rest reads only parameters, buffers and constants."""
    users = set(user_inputs)
    kinds: dict[str, NodeKind] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name in users:
                kinds[node.name] = NodeKind.INPUT
        elif node.op == "output":
            kinds[node.name] = NodeKind.OUTPUT
        elif node.op != "get_attr":
            fed = any(
                kinds.get(n.name) in (NodeKind.INPUT, NodeKind.BATCH) for n in node.all_input_nodes
            )
            kinds[node.name] = NodeKind.BATCH if fed else NodeKind.PARAM_ONLY
    return kinds


def _build_graph(model: torch.nn.Module, trace: _Trace, inputs: _Inputs) -> Graph:
    gm = trace.gm
    params = _Params.of(model)
    kinds = _kinds(gm, trace.sources)
    batch = trace.static_batch or max(inputs.batch, 2)
    runner = _MetaRunner(gm)
    next_runner = _MetaRunner(trace.gm_next) if trace.gm_next is not None else runner
    other = next_runner.run(trace.feed(*inputs.meta(batch + 1)))
    node_params, module_params = _read_params(gm, runner, params)
    analysis = _Analysis(
        kinds=kinds,
        other={name: _leaf_signature(value) for name, value in other.items()},
        batch=batch,
        other_batch=batch + 1,
        seen={_storage_id(t) for t in runner.twins.values()},
        module_params=module_params,
    )
    del other
    runner.run(trace.feed(*inputs.meta(batch)), analysis.visit, measure=True)

    nodes = [
        Node(
            name=node.name,
            op=_op_name(node, gm),
            kind=kinds[node.name],
            inputs=tuple(dict.fromkeys(n.name for n in node.all_input_nodes if n.name in kinds)),
            params=node_params.get(node.name, ()),
            outputs=analysis.specs.get(node.name, ()),
            module_path=_module_path(node),
            stats=analysis.stats.get(node.name, NodeStats()),
        )
        for node in gm.graph.nodes
        if node.name in kinds
    ]
    output = next(iter(gm.graph.find_nodes(op="output")))
    returned = [n.name for n in pytree.tree_leaves(output.args) if isinstance(n, torch.fx.Node)]
    outputs = [name for name in returned if name in kinds]
    user_inputs = [name for name in _placeholders(gm) if name in trace.sources]
    return Graph(
        nodes=nodes,
        params=params.specs,
        inputs=user_inputs,
        outputs=outputs,
        fingerprint=structural_fingerprint(nodes, params.specs, user_inputs, outputs),
        capture_method=trace.method,
        fx_module=gm,
        input_sources={name: trace.sources[name] for name in user_inputs},
        static_batch=trace.static_batch,
        reductions=reductions_of(gm),
    )


def _read_params(
    gm: torch.fx.GraphModule, runner: _MetaRunner, params: _Params
) -> tuple[dict[str, tuple[str, ...]], dict[str, list[torch.Tensor]]]:
    """Canonical names of the parameters, buffers and constants each node reads, and the meta
    twins an fx leaf-module call reads (it takes them implicitly, not as arguments)."""
    node_params: dict[str, tuple[str, ...]] = {}
    module_params: dict[str, list[torch.Tensor]] = {}
    for node in gm.graph.nodes:
        names = [
            params.resolve(n.target, runner.real_attrs[n.target])
            for n in node.all_input_nodes
            if n.op == "get_attr" and _is_tensor(runner.real_attrs[n.target])
        ]
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            real = dict(module.named_parameters(remove_duplicate=False))
            real.update(module.named_buffers(remove_duplicate=False))
            names += [params.resolve(f"{node.target}.{k}", v) for k, v in real.items()]
            twins = runner.module_state[node.target].values()
            module_params[node.name] = list({id(t): t for t in twins}.values())
        node_params[node.name] = tuple(dict.fromkeys(names))
    return node_params, module_params


def _op_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_method":
        return f"method.{node.target}"
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target))
        return f"module.{cls.__module__}.{cls.__qualname__}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator", "builtins": ""}.get(module, module)
    name = getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else name


def _module_path(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return _normalize_path(str(list(stack.values())[-1][0]))


def _normalize_path(path: str) -> str:
    """Module paths as `named_modules()` spells them, whichever tracer wrote them
    (non-strict export: ``h.0.attn``; dynamo: ``L['self'].h[0].attn``)."""
    if path.startswith("_empty_nn_module_stack"):
        return ""
    previous = None
    while previous != path:
        previous = path
        path = re.sub(r"getattr\(([^()]*), '([^']*)'\)", r"\1.\2", path)
    path = re.sub(r"^(?:L\['self'\]|self)(?=$|[.\[])", "", path)
    path = re.sub(r"\[(?:'([^']*)'|(\d+))\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".")


# --------------------------------------------------------------------------------------------
# Errors


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _locate(exc: BaseException, model: torch.nn.Module) -> tuple[str, str, str] | None:
    """The innermost frame of model code in the exception chain, as (module path, module
    class, source line): the traceback still holds each frame's ``self``."""
    modules = {id(m): name for name, m in model.named_modules()}
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        frames = []
        tb = error.__traceback__
        while tb is not None:
            frames.append((tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
        for frame, lineno in reversed(frames):
            owner = frame.f_locals.get("self")
            filename = frame.f_code.co_filename
            if id(owner) in modules and not filename.startswith(_TORCH_DIR):
                line = linecache.getline(filename, lineno).strip()
                return modules[id(owner)], type(owner).__name__, line
    return None


def _capture_error(
    model: torch.nn.Module, failures: list[tuple[str, BaseException]], strict: bool
) -> CaptureError:
    where = next(filter(None, (_locate(exc, model) for _, exc in failures)), None)
    if where is None:
        subject = f"cannot capture {type(model).__name__}"
        leaf = "mark the failing submodule as a leaf (capture(..., leaf_modules=[...]))"
    else:
        path, cls, line = where
        module = f"module '{path}' ({cls})" if path else f"the top-level forward ({cls})"
        subject = f"cannot capture {type(model).__name__}: `{line}` in {module} is not traceable"
        name = repr(path) if path else cls
        leaf = f"mark it as a leaf so fx calls it opaquely (capture(..., leaf_modules=[{name}]))"
    reasons = "\n".join(f"  {tracer}: {_first_line(exc)}" for tracer, exc in failures)
    advice = (
        "What to do: replace data-dependent Python control flow with tensor ops "
        f"(torch.where, torch.cond); or {leaf}; or wrap a free function fx cannot trace with "
        f"torch.fx.wrap; or retry with strict={not strict}."
    )
    return CaptureError(f"{subject}.\n{reasons}\n{advice}")

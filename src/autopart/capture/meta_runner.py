"""Executing a captured graph on the meta device, node by node, with meta twins of its
parameters: shapes, FLOPs and saved bytes without real compute or memory.  Ops whose output
metadata only depends on their inputs' metadata are replayed from a cache, so a 96-layer model
costs one execution per distinct op; an op that cannot run on meta runs on zero-filled CPU
tensors instead."""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.fx.config
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from autopart.capture.branches import check_branch
from autopart.capture.common import _PLAIN, _module_path, _op_name, _storage_id, log
from autopart.capture.errors import _first_line
from autopart.capture.inputs import _is_tensor
from autopart.device import DEVICE_TYPES, map_devices
from autopart.errors import CaptureError


def _meta_twin(tensor: torch.Tensor) -> torch.Tensor:
    twin = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    trainable = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
    return twin.requires_grad_() if trainable else twin


def _on_meta(value: Any) -> Any:
    """Point device arguments (``arange(..., device='cpu')``, ``x.to('cuda')``) at meta."""
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, str) and value.split(":")[0] in DEVICE_TYPES:
        return "meta"
    return value


def _device_on_meta(value: Any) -> Any:
    """Inside a higher-order op's body only devices move to meta: its strings are autocast's
    device types, and autocast has none for meta (the region runs on meta tensors anyway)."""
    return torch.device("meta") if isinstance(value, torch.device) else value


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
                if isinstance(value, torch.fx.GraphModule):  # a higher-order op's body
                    value = copy.deepcopy(value)
                    map_devices(value, _device_on_meta)
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
            # A size read from data (``nonzero``) is costed at its largest: every element.
            stack.enter_context(_all_nonzero())
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
                    # A higher-order op's strings are autocast's device types: kept.
                    point = (
                        _device_on_meta
                        if isinstance(node.target, torch._ops.HigherOrderOperator)
                        else _on_meta
                    )
                    inputs = [point(leaf) for leaf in leaves]
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
            if node.target is check_branch:
                return None  # a branch is decided by values, which meta tensors do not have
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            if node.target in ("cpu", "cuda"):
                return args[0]
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        module = self.gm.get_submodule(node.target)
        return torch.func.functional_call(module, state, args, kwargs, strict=False)


def _all_nonzero() -> contextlib.AbstractContextManager[None]:
    config = torch.fx.experimental._config
    if not hasattr(config, "meta_nonzero_assume_all_nonzero"):
        return contextlib.nullcontext()
    return config.patch(meta_nonzero_assume_all_nonzero=True)


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

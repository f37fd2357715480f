"""Parameter offload: a stage's parameters live in host memory and visit the device per op.

The stage module is rewritten so that every op reading an offloaded parameter reads a fresh
device copy instead, made by a fetch op placed just before it; the copy dies after the op (fx
drops values after their last use).  Autograd would keep the copies alive until backward when
an op saves its weight, so while a stage runs, saved-tensor hooks replace a saved copy (or a
view of one, or under autocast a view of its low-precision cast) by a handle, and backward
fetches it again when it unpacks the handle.  Each copy's gradient goes back to the host
parameter asynchronously and accumulates there when the stage's backward ends (`grad_return`).

Copies are prefetched ahead of use, in the order the fetch ops run in forward and in the
reverse of the order weights were saved in backward, as far ahead as ``depth`` times the
largest copy's bytes allows (the memory the plan charges for them): many small copies (biases,
norms) travel together, a large one alone.  On CUDA the host side is pinned and copies run on
a side stream, so they overlap compute; elsewhere they are plain copies.

Under autocast, an op that reads a weight only through autocast's cast (a matmul's) is given
a copy of the weight's cast, made once per optimizer step in host memory: half the bytes over
the link, the same values (`read_dtypes`).  Copies are known by their slot: the parameter's
name, with ``@bfloat16`` (say) for its cast.

Buffers (batch-norm statistics) stay on the device: ops update them in place.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from autopart.device import copy_stream, pinned
from autopart.runtime.stage.grad_return import GradReturn
from autopart.runtime.stage.host_casts import HostCasts
from autopart.runtime.stage.read_dtypes import read_as_cast

#: Autograd nodes of ops whose output is a view of their input: a saved tensor reached from a
#: parameter copy through these (and one dtype cast) can be rebuilt from a fresh copy.
_VIEW_NODES = frozenset(
    {
        "AliasBackward0",
        "ExpandBackward0",
        "PermuteBackward0",
        "TBackward0",
        "TransposeBackward0",
        "UnsafeViewBackward0",
        "ViewBackward0",
    }
)


@dataclass(frozen=True)
class _Saved:
    """A saved tensor that was (a view of) a parameter copy, or of its cast to ``dtype``."""

    key: str
    size: torch.Size
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class _Live:
    """A device copy, known by its storage so that any alias of it can be found again."""

    sid: int
    storage: weakref.ref
    size: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype


class ParamOffload:
    """Host-resident parameters of one stage module and their short-lived device copies."""

    def __init__(
        self,
        module: fx.GraphModule,
        device: torch.device,
        depth: int = 1,
        autocast: torch.dtype | None = None,
        casts: HostCasts | None = None,
    ) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be at least 0, got {depth}")
        self.device = device
        self.depth = depth
        self.host: dict[str, nn.Parameter] = {}
        for node in module.graph.find_nodes(op="get_attr"):
            value = _attr(module, node.target)
            if isinstance(value, nn.Parameter) and node.target not in self.host:
                if value.device.type != "cpu" or (device.type == "cuda" and not value.is_pinned()):
                    value.data = pinned(value, device)
                self.host[node.target] = value
        self.casts = casts if casts is not None else HostCasts()
        self.forward_order = _insert_fetches(module, self, autocast)
        self._bytes = {slot: self._slot_bytes(slot) for slot in self.forward_order}
        #: Bytes the copies made ahead of use may hold on the device at once.
        self.budget = depth * max(self._bytes.values(), default=0)
        self.grads = GradReturn(device)
        self._stream = copy_stream(device)
        self._live: dict[int, str] = {}  # storage id of a live copy -> its slot
        self._sizes: dict[int, int] = {}
        self._copies: dict[str, _Live] = {}  # slot -> its live copy
        self._inflight: dict[str, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._inflight_bytes = 0
        self._order: list[str] = []
        self._cursor = 0
        self._saved_order: list[str] = []
        self.current = 0
        self.peak = 0
        #: Bytes copied to the device so far (for bandwidth reports).
        self.copied_bytes = 0

    def parameters(self) -> list[nn.Parameter]:
        return list(self.host.values())

    def stepped(self) -> None:
        """The optimizer changed the parameters: their host casts are out of date."""
        self.casts.stepped()

    def source(self, slot: str) -> torch.Tensor:
        """What a copy of ``slot`` is made from: the host parameter, or its cast."""
        name, _, dtype = slot.partition("@")
        param = self.host[name]
        if not dtype:
            return param.detach()
        return self.casts.of(slot, param, getattr(torch, dtype), self.device)

    def _slot_bytes(self, slot: str) -> int:
        name, _, dtype = slot.partition("@")
        param = self.host[name]
        size = getattr(torch, dtype).itemsize if dtype else param.element_size()
        return param.numel() * size

    # -- the two phases ----------------------------------------------------------------------

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Run a stage forward (or a recomputation): fetch in graph order, save handles."""
        self._begin(self.forward_order)
        self._saved_order = []
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._end()

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        """Run a stage backward: handles unpack in about the reverse of the order saved."""
        self._begin(list(reversed(self._saved_order)))
        try:
            yield
            self.grads.drain()
        finally:
            self.grads.discard()
            self._end()

    def reset_peak(self) -> None:
        self.peak = self.current

    def _begin(self, order: list[str]) -> None:
        self._order, self._cursor = order, 0
        self._prefetch()

    def _end(self) -> None:
        self._inflight.clear()
        self._inflight_bytes = 0
        self._order, self._cursor = [], 0

    # -- copies ------------------------------------------------------------------------------

    def take(self, key: str) -> torch.Tensor:
        """The device copy of parameter ``key``: prefetched, still alive, or made now."""
        try:
            position = self._order.index(key, self._cursor)
        except ValueError:
            position = None
        pending = self._inflight.pop(key, None)
        if pending is not None:
            self._inflight_bytes -= self._bytes.get(key, 0)
        else:
            alive = self._alive(key)
            pending = (alive, None) if alive is not None else self._copy(key)
        copy, event = pending
        if event is not None:  # the copy ran on the side stream: order compute after it
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            copy.record_stream(stream)
        if position is not None:
            self._cursor = position + 1
            self._prefetch()
        return copy

    def _alive(self, key: str) -> torch.Tensor | None:
        """A new tensor on the live copy's storage, if some alias still keeps it alive."""
        live = self._copies.get(key)
        storage = live.storage() if live is not None else None
        if live is None or storage is None:
            return None
        empty = torch.empty(0, dtype=live.dtype, device=self.device)
        return empty.set_(storage, 0, live.size, live.stride)

    def _prefetch(self) -> None:
        """Copy the next slots in order while their bytes fit the budget (the first one
        always does: a depth of 1 holds the largest copy)."""
        for key in itertools.islice(self._order, self._cursor, None):
            if key in self._inflight or key in self._copies:
                continue
            size = self._bytes.get(key, 0)
            if self._inflight_bytes + size > self.budget:
                return
            self._inflight[key] = self._copy(key)
            self._inflight_bytes += size

    def _copy(self, key: str) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        host = self.source(key)
        event = None
        if self._stream is not None:
            # No wait on the compute stream: the copy must run ahead of the ops queued there.
            # Its memory comes from the allocator on this stream, and the host side changes
            # only in the optimizer step, after every copy has been used or dropped.
            with torch.cuda.stream(self._stream):
                copy = host.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            copy = host.to(self.device, copy=True)
        storage = copy.untyped_storage()
        sid = storage._cdata
        self._copies[key] = _Live(sid, weakref.ref(storage), copy.size(), copy.stride(), copy.dtype)
        self._live[sid] = key
        self._sizes[sid] = storage.nbytes()
        self.current += storage.nbytes()
        self.copied_bytes += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, sid, key)
        return copy, event

    def _freed(self, sid: int, key: str) -> None:
        self._live.pop(sid, None)
        self.current -= self._sizes.pop(sid, 0)
        if key in self._copies and self._copies[key].sid == sid:
            del self._copies[key]

    def returned(self, grad: torch.Tensor, key: str) -> None:
        """A copy's gradient, for its host parameter: a cast's crosses the link in the cast's
        dtype (half the bytes) and is widened in host memory, as autocast widens it."""
        self.grads.send(self.host[key.partition("@")[0]], grad)

    # -- saved tensors -----------------------------------------------------------------------

    def _pack(self, tensor: torch.Tensor):
        if tensor.is_meta or tensor.layout is not torch.strided:
            return tensor
        key = self._live.get(tensor.untyped_storage()._cdata)
        dtype = None
        if key is None:
            key, dtype = self._cast_of(tensor), tensor.dtype
        if key is None:
            return tensor
        self._saved_order.append(key)
        return _Saved(key, tensor.size(), tensor.stride(), int(tensor.storage_offset()), dtype)

    def _cast_of(self, tensor: torch.Tensor) -> str | None:
        """The parameter whose copy ``tensor`` is a whole cast of (or a view of one), as
        autocast makes for matmuls; found by walking back the autograd graph."""
        node, casts = tensor.grad_fn, 0
        for _ in range(4):
            if node is None:
                return None
            if isinstance(node, _Fetch._backward_cls):
                whole = self.source(node.key).numel() * tensor.element_size()
                full = tensor.untyped_storage().nbytes() == whole
                return node.key if casts == 1 and full else None
            name = type(node).__name__
            if name == "ToCopyBackward0":
                casts += 1
            elif name not in _VIEW_NODES:
                return None
            parents = [n for n, _ in node.next_functions if n is not None]
            if len(parents) != 1:
                return None
            node = parents[0]
        return None

    def _unpack(self, packed):
        if not isinstance(packed, _Saved):
            return packed
        copy = self.take(packed.key)
        if packed.dtype is not None:
            copy = copy.to(packed.dtype)
        return copy.as_strided(packed.size, packed.stride, packed.offset)


class _Fetch(torch.autograd.Function):
    """Host parameter -> device copy; the copy's gradient goes back to the host parameter
    outside autograd (`GradReturn`).  The parameter is not an input: autograd would run its
    accumulator, and the hooks waiting for its gradient, with nothing in it.  A gradless
    stand-in (``requires_grad`` as the parameter's) makes the copy require grad instead."""

    @staticmethod
    def forward(ctx, stand_in, offload: ParamOffload, key: str):
        ctx.offload, ctx.key = offload, key
        return offload.take(key)

    @staticmethod
    def backward(ctx, grad):
        ctx.offload.returned(grad, ctx.key)
        return None, None, None


class _FetchOp:
    """The callable a fetch node of the stage graph runs."""

    def __init__(self, offload: ParamOffload, key: str) -> None:
        self.offload = offload
        self.key = key
        self.__name__ = "autopart_fetch_" + key.replace(".", "_").replace("@", "_as_")
        self.__module__ = __name__

    def __call__(self, host: torch.Tensor) -> torch.Tensor:
        stand_in = _STAND_IN[host.requires_grad]
        return _Fetch.apply(stand_in, self.offload, self.key)


#: The inputs `_Fetch` gets in place of a parameter that requires grad, and of a frozen one.
_STAND_IN = {True: torch.empty(0, requires_grad=True), False: torch.empty(0)}


def _insert_fetches(
    module: fx.GraphModule, offload: ParamOffload, autocast: torch.dtype | None
) -> list[str]:
    """Give every op that reads an offloaded parameter its own fetch, placed just before it
    (of the parameter's cast where the op reads only that); return the slots in the order
    the fetches run."""
    order = []
    for node in list(module.graph.nodes):
        if node.op in ("get_attr", "placeholder", "output"):
            continue
        reads = [d for d in dict.fromkeys(node.all_input_nodes) if _offloaded(d, offload)]
        slots = [
            f"{dep.target}@{str(autocast).removeprefix('torch.')}"
            if autocast is not None and read_as_cast(module, node, dep, offload.device, autocast)
            else str(dep.target)
            for dep in reads
        ]
        for dep, slot in zip(reads, slots, strict=True):
            with module.graph.inserting_before(node):
                fetch = module.graph.call_function(_FetchOp(offload, slot), (dep,))
            node.replace_input_with(dep, fetch)
            order.append(slot)
    module.recompile()
    return order


def _offloaded(node: fx.Node, offload: ParamOffload) -> bool:
    return node.op == "get_attr" and node.target in offload.host


def _attr(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


class StepOnDevice:
    """``offload="params"``: the optimizer state stays on the device, so the step runs there.

    The stage's parameters and gradients visit the device for the step (after backward, when
    the activations are gone) and the new values go back to the host copies.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], device: torch.device
    ) -> None:
        self.params = params
        self.device = device
        self._host: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
        optimizer.register_step_pre_hook(lambda *_: self._to_device())
        optimizer.register_step_post_hook(lambda *_: self._to_host())

    def _to_device(self) -> None:
        self._host = []
        for param in self.params:
            host, grad = param.data, param.grad
            param.grad = None
            param.data = host.to(self.device, non_blocking=True)
            if grad is not None:
                param.grad = grad.to(self.device, non_blocking=True)
            self._host.append((param, host, grad))

    def _to_host(self) -> None:
        for param, host, grad in self._host:
            host.copy_(param.data)
            param.grad = None
            param.data = host
            param.grad = grad
        self._host = []

"""Costs measured by running blocks of the captured graph on a real device.

Analytic costs miss what only running shows (kernel choice, fusion-less eager overheads, cache
effects), so the planner can instead time every block it considers: the block is cut out of the
captured module (`autopart.cost.subgraph`), fed random inputs at the requested batch, and run
forward and backward ``warmup + iters`` times; the median of the last ``iters`` counts.  CUDA
times come from events after a synchronize, CPU times from ``time.perf_counter``.  Peak memory
comes from ``torch.cuda.max_memory_allocated`` on CUDA and is ``None`` on CPU.  Results are cached
on disk (`autopart.cost.profiles`), so re-planning the same model measures nothing.

The contract this module assumes of ``Graph.fx_module`` (what capture must provide):

* It is a ``torch.fx.GraphModule`` captured by ``torch.export`` with the batch dimension
  symbolic: either ``ExportedProgram.module()`` (parameters and buffers are ``get_attr`` nodes;
  their real values are copied, recommended) or ``ExportedProgram.graph_module`` (parameters,
  buffers and constants are placeholders; random values of their shape stand in).
* Every IR node the planner passes has the name of an fx node of *that* module.  Note that
  ``ExportedProgram.module()`` renames some placeholders (a user input ``input`` becomes
  ``input_1``) and adds a ``_guards_fn`` node, so the IR must be built from the module stored.
* IR ``INPUT`` nodes are named as the fx placeholders of the user inputs, and the dimension
  ``outputs[0].batch_dim`` of their ``meta["val"]`` is a symbol: that symbol is the batch.  Other
  symbols (a dynamic sequence length, say) are held at the example value of the capture.
* Every fx node a block reads from outside, other than ``get_attr``, carries ``meta["val"]`` (a
  fake tensor, a symbolic scalar, or a tuple of them), as ``torch.export`` records.
* Blocks run on copies: the captured module is never modified or moved to the device.  Its ops
  name the CPU as their device (`autopart.device`); a block's copy is pointed at the device it
  runs on, so the model may be anywhere.

A block that cannot be measured at some size (an op the cut-out block cannot run alone, a
device out of memory) does not stop planning, and one warning names it: it is costed in
proportion to rows from the largest size it was measured at, or, measured at none, by
``fallback`` (the analytic model by default) scaled by how measured times compared with the
fallback's on the blocks that did run, so that measured and fallen-back blocks stay
comparable in one search.  ``source`` then says how many blocks fell back.  A failure that
leaves the device unusable (a CUDA device-side assert) still stops planning.

Backward differentiates with respect to every block input that depends on a parameter and to the
parameters themselves, as a training step does, with ``torch.autograd.grad`` so that nothing
accumulates between iterations.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sympy
import torch

from autopart.cost.analytic import AnalyticCostModel
from autopart.cost.devices import local_device_spec
from autopart.cost.model import CostModel
from autopart.cost.profiles import BlockProfile, ProfileCache, ProfileKey
from autopart.cost.spec import DeviceSpec
from autopart.cost.subgraph import (
    COMPUTE_OPS,
    InputMaker,
    differentiable_nodes,
    extract_subgraph,
)
from autopart.device import device_name, retarget
from autopart.errors import AutopartError
from autopart.ir import Graph, Node, NodeKind

log = logging.getLogger(__name__)

#: Where profiles are kept between runs: ``AUTOPART_CACHE_DIR``, else the user's cache.
DEFAULT_CACHE_DIR = Path(os.environ.get("AUTOPART_CACHE_DIR", "~/.cache/autopart/profiles"))

T = TypeVar("T")


class UnmeasurableBlock(AutopartError):
    """Running a block on the device failed; the block is costed by the fallback instead."""


class MeasuredCostModel:
    """Times node sets of ``graph.fx_module`` on ``device``; see the module docstring."""

    source = "measured"

    def __init__(
        self,
        graph: Graph,
        device: torch.device | str = "cpu",
        cache_dir: str | Path | None = None,
        warmup: int = 1,
        iters: int = 2,
        spec: DeviceSpec | None = None,
        autocast: torch.dtype | None = None,
        fallback: CostModel | None = None,
    ) -> None:
        """``spec`` describes ``device`` to the planner (memory, links); by default it is the
        matching built-in or a measurement (`autopart.cost.devices.local_device_spec`).
        ``autocast`` runs the blocks under native autocast at that dtype, as the runtime
        runs them under ``precision="bf16"``/``"fp16"``.  ``fallback`` costs the blocks that
        cannot be measured."""
        if graph.fx_module is None:
            raise AutopartError(
                "measured costs need a captured module, but graph.fx_module is None (the model "
                "was not captured with torch.export, or the graph was loaded without it); use "
                "analytic costs or capture the model in this process"
            )
        if warmup < 0 or iters < 1:
            raise AutopartError(f"need warmup >= 0 and iters >= 1, got {warmup} and {iters}")
        self.graph = graph
        self.torch_device = _resolve(torch.device(device))
        self.device = spec if spec is not None else local_device_spec(self.torch_device)
        self.warmup = warmup
        self.iters = iters
        self.cache = ProfileCache(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
        self._module = graph.fx_module
        self._fx_ops = {node.name: node.op for node in self._module.graph.nodes}
        self._inputs = InputMaker(
            self._module,
            _batch_symbols(graph, self._module),
            differentiable_nodes(self._module),
            {node.name: node.outputs for node in graph.nodes},
        )
        self.autocast = autocast
        self.fallback = fallback or AnalyticCostModel(
            self.device, dtype=str(autocast) if autocast else "float32"
        )
        #: Failed measurements by (first node, last node, batch), and the blocks warned of.
        self._failed: dict[tuple[str, str, int], UnmeasurableBlock] = {}
        self._warned: set[tuple[str, str]] = set()
        #: Measured and fallback seconds of the blocks measured so far (their ratio scales
        #: the fallback's costs of blocks measured at no size).
        self._measured_total = 0.0
        self._fallback_total = 0.0
        # Profiles under autocast are other profiles: the dtype is part of the cache key.
        self._device_name = device_name(self.torch_device) + (f"+{autocast}" if autocast else "")

    def block_seconds(self, nodes: Sequence[Node], batch: int) -> tuple[float, float]:
        """Measured at powers of two, straight lines between them: the search asks for many
        row counts (every replica count at every microbatch count), and profiling each would
        take minutes where a few sizes take seconds."""
        low = 1 << (max(batch, 1).bit_length() - 1)
        try:
            below = self.profile(nodes, low)
        except UnmeasurableBlock as err:
            self._warn(nodes, err, "from the analytic model, scaled to the measured blocks")
            forward, backward = self.fallback.block_seconds(nodes, batch)
            scale = self._measured_total / self._fallback_total if self._fallback_total else 1.0
            return forward * scale, backward * scale
        if batch == low:
            return below.forward_seconds, below.backward_seconds
        try:
            above = self.profile(nodes, 2 * low)
        except UnmeasurableBlock as err:
            self._warn(nodes, err, f"in proportion to rows from batch {low}")
            scale = batch / low
            return below.forward_seconds * scale, below.backward_seconds * scale
        share = (batch - low) / low
        return (
            below.forward_seconds + share * (above.forward_seconds - below.forward_seconds),
            below.backward_seconds + share * (above.backward_seconds - below.backward_seconds),
        )

    def _warn(self, nodes: Sequence[Node], err: UnmeasurableBlock, how: str) -> None:
        span = (nodes[0].name, nodes[-1].name)
        if span not in self._warned:
            self._warned.add(span)
            self.source = f"measured ({len(self._warned)} block(s) partly estimated)"
            log.warning("%s; costing that block %s instead", err, how)

    def profile(self, nodes: Sequence[Node], batch: int) -> BlockProfile:
        """Seconds and peak memory of ``nodes`` at ``batch``, from the cache when present;
        raises `UnmeasurableBlock` (again, without retrying) where measuring failed."""
        names = [node.name for node in nodes]
        if all(name in self._fx_ops and self._fx_ops[name] not in COMPUTE_OPS for name in names):
            return BlockProfile(0.0, 0.0, None)  # only inputs and outputs: nothing runs
        failed = (names[0], names[-1], batch)
        if failed in self._failed:
            raise self._failed[failed]
        key = ProfileKey.of(self.graph.fingerprint, names, batch, self._device_name)
        profile = self.cache.get(key)
        if profile is None:
            try:
                profile = self._run(names, batch)
            except UnmeasurableBlock as err:
                self._failed[failed] = err
                raise
            log.debug("measured %d nodes at batch %d: %s", len(names), batch, profile)
            self.cache.put(key, profile)
        forward, backward = self.fallback.block_seconds(nodes, batch)
        self._measured_total += profile.forward_seconds + profile.backward_seconds
        self._fallback_total += forward + backward
        return profile

    def _run(self, names: list[str], batch: int) -> BlockProfile:
        """Measure on the device, bypassing the cache."""
        device = self.torch_device
        subgraph = extract_subgraph(self._module, names)
        cuda = device.type == "cuda"
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():
            if cuda:
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            module: torch.nn.Module | None = None
            inputs: list[Any] = []
            leaves: list[torch.Tensor] = []
            failure = None
            try:
                module = subgraph.module.to(device)
                retarget(module, device)
                inputs, leaves = self._inputs.make(subgraph, batch, device)
                leaves += [p for p in module.parameters() if p.requires_grad]
                forward, backward = [], []
                for i in range(self.warmup + self.iters):
                    f, b = self._step(module, inputs, leaves)
                    if i >= self.warmup:
                        forward.append(f)
                        backward.append(b)
            except Exception as err:
                failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            if failure is not None:
                module, inputs, leaves = None, [], []  # the traceback is gone with ``err``
                what = (
                    f"measuring {len(subgraph.names)} nodes ({subgraph.names[0]} .. "
                    f"{subgraph.names[-1]}) at batch {batch} on {device} failed: {failure}"
                )
                if cuda:
                    _recover(device, what)
                raise UnmeasurableBlock(what)
            peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
        return BlockProfile(statistics.median(forward), statistics.median(backward), peak)

    def _step(
        self, module: torch.nn.Module, inputs: list[Any], leaves: list[torch.Tensor]
    ) -> tuple[float, float]:
        cast = torch.autocast(
            self.torch_device.type, dtype=self.autocast, enabled=self.autocast is not None
        )
        with torch.enable_grad(), cast:
            forward, outputs = self._timed(lambda: module(*inputs))
        needs_grad = [t for t in _tensors(outputs) if t.requires_grad]
        if not needs_grad:
            return forward, 0.0
        grads = [torch.randn_like(t) for t in needs_grad]
        backward, _ = self._timed(
            lambda: torch.autograd.grad(needs_grad, leaves, grads, allow_unused=True)
        )
        return forward, backward

    def _timed(self, fn: Callable[[], T]) -> tuple[float, T]:
        if self.torch_device.type != "cuda":
            start = time.perf_counter()
            result = fn()
            return time.perf_counter() - start, result
        torch.cuda.synchronize(self.torch_device)
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        start_event.record()
        result = fn()
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event) / 1e3, result


def _recover(device: torch.device, what: str) -> None:
    """Give back what a failed run allocated, and stop if the device itself is broken (a
    device-side assert poisons the CUDA context: nothing after it could run)."""
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception as err:
        raise AutopartError(
            f"{what}, and the device is unusable since ({err}); plan with cost='analytic'"
        ) from err


def _batch_symbols(graph: Graph, module: torch.fx.GraphModule) -> frozenset[sympy.Symbol]:
    """The symbols of the batch dimension, read off the placeholders of the IR's inputs."""
    fx_nodes = {node.name: node for node in module.graph.nodes}
    symbols: set[sympy.Symbol] = set()
    inputs = [n for n in graph.nodes if n.kind is NodeKind.INPUT]
    for node in inputs:
        fake = fx_nodes[node.name].meta.get("val") if node.name in fx_nodes else None
        for spec in node.outputs[:1]:
            dim = spec.batch_dim
            if not isinstance(fake, torch.Tensor) or dim is None or dim >= fake.dim():
                continue
            size = fake.shape[dim]
            if isinstance(size, torch.SymInt):
                symbols |= size.node.expr.free_symbols
    if not symbols:
        raise AutopartError(
            "measured costs need graph.fx_module captured by torch.export with a symbolic batch "
            f"dimension, but none of the input nodes ({', '.join(n.name for n in inputs)}) has "
            "one in the fx module; use analytic costs for this model"
        )
    return frozenset(symbols)


def _resolve(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []

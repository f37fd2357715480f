"""Capture a PyTorch model into the graph IR.

`torch.export` (non-strict) is the primary tracer: it sees through Python, yields ATen ops with
the module each came from, and can keep the batch dimension symbolic, so one graph serves every
microbatch size the runtime feeds.  `torch.fx.symbolic_trace` is the fallback for models export
rejects, since it tolerates some Python that export does not (and lets users mark leaf modules).
A model that branches on tensor values, which neither can trace, is captured along the path its
example takes, with that path checked on every later batch (`autopart.capture.branches`).

Shapes and costs come from executing the graph twice on the ``meta`` device: at the capture batch
``a`` (measuring FLOPs, bytes and the tensors autograd saves) and at ``a + 1`` (shapes only).
Comparing the two runs tells which dimension of every value carries the batch and what it holds
per sample, uniformly for symbolic exports, static exports and fx graphs.  Running on meta keeps
capture free of real compute and memory, so a model built under ``torch.device("meta")`` with
hundreds of billions of parameters can be captured on a laptop.

Capture does not depend on placement: the example inputs are moved to the model's device for
tracing (a model on the CPU called with inputs on the GPU, or the other way round), and every
device the trace baked into its ops is then written as the CPU (`autopart.device`), so the
same model gives the same graph wherever it and its inputs were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autopart.capture.batch_dims import BatchDims
from autopart.capture.branches import is_data_dependent
from autopart.capture.build import _build_graph
from autopart.capture.common import METHODS, LeafSpec, log
from autopart.capture.errors import _capture_error, _first_line
from autopart.capture.inputs import _Inputs
from autopart.capture.scalar_outputs import rewrite_scalar_outputs
from autopart.capture.tracing import (
    _keep_batch_in_squeeze,
    _return_before_upcasts,
    _trace_export,
    _trace_fx,
)
from autopart.device import canonicalize, capture_device, to_device
from autopart.errors import CaptureError
from autopart.ir import Graph

__all__ = ["METHODS", "BatchDims", "LeafSpec", "capture"]


def capture(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    method: str = "auto",
    strict: bool = False,
    leaf_modules: Sequence[LeafSpec] = (),
    batch_dims: BatchDims | None = None,
    run_model: bool = True,
) -> Graph:
    """Capture ``model`` called as ``model(*args, **kwargs)`` into a `Graph`.

    Which dimension of each input carries the batch is found by running the model on two
    rows of the example and on each alone (`autopart.capture.batch_dims`), or given by
    ``batch_dims`` (argument name or source -> dimension, None for no batch); ``run_model=False``
    says the model's values are not its own (a view of uninitialized copies), so they are not
    run to find the dimensions.  ``method`` is
    ``"export"``, ``"fx"`` or ``"auto"`` (export, then fx when export fails, then a draft
    export that keeps branches on tensor values as checked asserts); ``strict`` is passed to
    `torch.export.export`.  ``leaf_modules`` (types or qualified names) are kept as single
    opaque calls by the fx tracer.  Raises `CaptureError` naming the failing op and module
    when the model cannot be captured.

    The returned ``Graph.fx_module`` is called like the model and accepts any batch size; its
    ops name the CPU as their device (`autopart.device.retarget` points them elsewhere).  If
    the model pins the batch size (export cannot keep it symbolic), capture falls back to static
    exports at batch ``b`` and ``b + 1``: per-sample shapes and batch dims still come from the
    difference, but ``fx_module`` then only runs at ``Graph.static_batch == b``.
    """
    if method not in METHODS:
        raise CaptureError(f"unknown capture method {method!r}; use one of {', '.join(METHODS)}")
    traced_on = capture_device(model)
    call = to_device((args, dict(kwargs or {})), traced_on)
    inputs = _Inputs.of(model, *call, batch_dims, run=run_model and traced_on.type != "meta")
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
    if trace is None and _branches_on_values(failures, strict, traced_on):
        try:
            trace = _trace_export(model, inputs, strict=False, draft=True)
        except Exception as exc:
            failures.append(("torch.export.draft_export", exc))
    if trace is None:
        raise _capture_error(model, failures, strict) from failures[0][1]
    for gm in (trace.gm, trace.gm_next):
        if gm is not None:
            canonicalize(gm, traced_on)
            _keep_batch_in_squeeze(gm)
            _return_before_upcasts(gm)
            rewrite_scalar_outputs(gm, trace.sources)
    return _build_graph(model, trace, inputs)


def _branches_on_values(
    failures: list[tuple[str, BaseException]], strict: bool, traced_on: torch.device
) -> bool:
    """Export failed on a branch that reads tensor values, and there are values to follow
    (`autopart.capture.branches`): not on meta, nor under strict export."""
    exported = [exc for tracer, exc in failures if tracer == "torch.export"]
    return (
        bool(exported)
        and not strict
        and traced_on.type != "meta"
        and is_data_dependent(exported[0])
    )

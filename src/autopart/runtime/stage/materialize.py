"""Give a meta-device model real tensors for this rank's stage only.

A model built under ``torch.device("meta")`` has shapes but no storage, so capture and
planning run on it for free.  After planning, each rank allocates just the parameters and
buffers its stage reads (and rank 0 the few the graph never reads, so that state dicts stay
complete); every other tensor stays on meta and takes no memory.

Values come from a checkpoint where it has them, and from the model's own initializer
otherwise.  Whether a value arrived is checked, not assumed: each new tensor starts filled
with a sentinel (NaN, or an integer or bool bit pattern no initializer writes), and any that
still holds it afterwards is an error naming the tensor.  So a buffer that was computed in
``__init__`` (and lost on meta) and that no initializer recomputes cannot pass silently.

Replacing a tensor means swapping the object everywhere it is referenced: in the model (under
each tied name, so ties survive), in the captured graph module, and in the optimizer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.plan.plan import Plan
from autopart.runtime.stage.graph_cut import state_updates
from autopart.runtime.stage.tensor_sources import TensorSource, open_checkpoint

log = logging.getLogger(__name__)

InitFn = Callable[[nn.Module], None]

#: How much of a checkpoint is read into memory at once before it is copied into place.
READ_BATCH_BYTES = 256 * 2**20


class MaterializeError(AutopartError):
    """A meta tensor this rank needs could not be given a value."""


@dataclass(frozen=True)
class Materialized:
    """What `materialize` did: the new tensor for each replaced one (by ``id``), and the
    canonical names whose values came from the initializer (replicas must agree on them)."""

    replaced: dict[int, torch.Tensor]
    initialized: tuple[str, ...]


def has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def device_view(
    model: nn.Module, device: torch.device, keep: Iterable[torch.Tensor] = ()
) -> Iterator[dict[int, torch.Tensor]]:
    """Swap every parameter, buffer and tensor attribute of a model on several devices that
    is not on ``device`` (nor in ``keep``) for a twin there, then put them back.  Capture runs
    in this view, because export needs one device throughout: on meta for a partly
    materialized model (so does the initializer, so that it writes only the tensors being
    materialized), on the CPU for one whose stage is on the GPU already.  Twins hold no values
    (export makes fake tensors of parameters and buffers).  Yields the original tensor of each
    twin (by ``id``), to `rebind` to."""
    kept = {id(t) for t in keep}
    twins: dict[int, torch.Tensor] = {}
    originals: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for module in model.modules():
        attributes = {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
        for table in (module._parameters, module._buffers, attributes):
            for key, value in table.items():
                if value is None or value.device == device or id(value) in kept:
                    continue
                twin = twins.get(id(value))
                if twin is None:
                    twin = torch.empty_like(value, device=device)
                    if isinstance(value, nn.Parameter):
                        twin = nn.Parameter(twin, requires_grad=value.requires_grad)
                    twins[id(value)] = twin
                    originals[id(twin)] = value
                target: dict[str, Any] = module.__dict__ if table is attributes else table
                swapped.append((target, key, value))
                target[key] = twin
    try:
        yield originals
    finally:
        for where, key, value in swapped:
            where[key] = value


def on_meta(values: Any) -> Any:
    """Meta stand-ins for the tensors among ``values`` (a model's call arguments)."""
    return pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, values)


def needed_names(graph: Graph, plan: Plan, rank: int) -> set[str]:
    """Canonical names of the tensors this rank reads: its stage's, those of once-per-call
    buffer updates it runs, and on rank 0 those no stage reads."""
    names = set(plan.stage_of_rank(rank).params)
    for index, nodes in state_updates(graph, plan).items():
        if rank in plan.stages[index].ranks:
            for node in nodes:
                names.update(graph.node(node).params)
    if rank == 0:
        placed = {name for stage in plan.stages for name in stage.params}
        names.update(set(graph.params) - placed)
    return names


def materialize(
    model: nn.Module,
    graph: Graph,
    names: Iterable[str],
    device: torch.device,
    *,
    checkpoint: str | None = None,
    init_fn: InitFn | None = None,
    initialize: bool = True,
) -> Materialized:
    """Allocate every meta tensor among ``names`` on ``device`` and fill it.  Without
    ``initialize`` (a later capture, whose parameters are real and trained by now) the
    initializer must not run, so a tensor that needs it is an error."""
    roots = [model, graph.fx_module]
    current = _tensors_by_name(roots, graph)
    replaced: dict[int, torch.Tensor] = {}
    fresh: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        old = current.get(name)
        if old is None or not old.is_meta:
            continue
        new = _allocate(old, device)
        replaced[id(old)] = new
        fresh[name] = new
    if not fresh:
        return Materialized({}, ())
    rebind(roots, replaced)
    source = open_checkpoint(checkpoint) if checkpoint is not None else None
    wanted = {}
    if source is not None and checkpoint is not None:
        persistent = set(model.state_dict(keep_vars=True))
        wanted = _keys_in(source, fresh, graph, persistent, checkpoint)
    # Empty tensors need no value; the rest the checkpoint lacks come from the initializer,
    # which runs first because it writes every tensor it knows, loaded ones included.
    pending = [name for name in fresh if name not in wanted and fresh[name].numel()]
    if pending:
        if initialize:
            # Real tensors keep their values.
            with device_view(model, torch.device("meta"), keep=fresh.values()):
                _initialize(model, init_fn, device)
        unfilled = [name for name in pending if _holds_sentinel(fresh[name])]
        listed = f"{', '.join(unfilled[:5])}{' ...' if len(unfilled) > 5 else ''}"
        if unfilled and not initialize:
            raise MaterializeError(
                f"this call reads {len(unfilled)} tensor(s) that this rank's stage did not "
                f"read in the first call, and that are still on the meta device: {listed}. "
                "Make the first call one that reads them (or build them outside the meta "
                "device)"
            )
        if unfilled:
            raise MaterializeError(
                f"{len(unfilled)} tensor(s) of this rank's stage have no value after "
                f"materialization: {listed}. They were on the meta device, "
                + ("the checkpoint lacks them, " if checkpoint is not None else "")
                + "and the model's initializer (reset_parameters(), or _init_weights for "
                "Hugging Face models) does not set them. Pass init_fn= to set them, load them "
                "with checkpoint=, or build them outside the meta device"
            )
    if source is not None and checkpoint is not None:
        _copy(source, wanted, fresh, checkpoint)
    loaded = wanted
    log.info(
        "materialized %d tensor(s) on %s (%d from the checkpoint)", len(fresh), device, len(loaded)
    )
    return Materialized(replaced, tuple(pending))


def rebind(roots: Iterable[nn.Module], replaced: dict[int, torch.Tensor]) -> None:
    """Point every parameter, buffer and tensor attribute found in ``roots`` at its
    replacement; each alias of a tied tensor gets the same new object."""
    for root in roots:
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for key, value in table.items():
                    if value is not None and id(value) in replaced:
                        table[key] = replaced[id(value)]  # type: ignore[assignment]
            for key, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and id(value) in replaced:
                    module.__dict__[key] = replaced[id(value)]  # not registered anew


def rebind_optimizer(
    optimizer: torch.optim.Optimizer, groups: list[list], replaced: dict[int, torch.Tensor]
) -> None:
    """The optimizer (and the copy of its original groups) over the new parameters."""
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    for original in groups:
        original[:] = [replaced.get(id(p), p) for p in original]
    for param in [p for p in optimizer.state if id(p) in replaced]:
        optimizer.state[replaced[id(param)]] = optimizer.state.pop(param)


def _tensors_by_name(roots: list[nn.Module], graph: Graph) -> dict[str, torch.Tensor]:
    """Each canonical name's tensor: the model's parameters and buffers under any alias, and
    the constants that only the captured module holds."""
    by_alias = {
        alias: name for name, spec in graph.params.items() for alias in (name, *spec.aliases)
    }
    found: dict[str, torch.Tensor] = {}
    for root in roots:
        for module_name, module in root.named_modules(remove_duplicate=False):
            prefix = module_name + "." if module_name else ""
            entries = [*module._parameters.items(), *module._buffers.items()]
            entries += [(k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
            for key, value in entries:
                canonical = by_alias.get(prefix + key)
                if value is not None and canonical is not None:
                    found.setdefault(canonical, value)
    return found


def _allocate(old: torch.Tensor, device: torch.device) -> torch.Tensor:
    data = torch.empty(old.shape, dtype=old.dtype, device=device)
    _fill_sentinel(data)
    if isinstance(old, nn.Parameter):
        return nn.Parameter(data, requires_grad=old.requires_grad)
    return data


def _fill_sentinel(tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    elif tensor.dtype == torch.bool:
        tensor.view(torch.uint8).fill_(0xFF)  # neither False (0) nor True (1)
    else:
        tensor.fill_(_int_sentinel(tensor.dtype))


def _holds_sentinel(tensor: torch.Tensor) -> bool:
    with torch.no_grad():
        if tensor.is_floating_point() or tensor.is_complex():
            return bool(torch.isnan(tensor).any())
        if tensor.dtype == torch.bool:
            return bool((tensor.view(torch.uint8) == 0xFF).any())
        return bool((tensor == _int_sentinel(tensor.dtype)).any())


def _int_sentinel(dtype: torch.dtype) -> int:
    """The most negative value, or for unsigned types (whose minimum, 0, initializers write)
    the largest."""
    info = torch.iinfo(dtype)
    return info.min if info.min < 0 else info.max


def _keys_in(
    source: TensorSource,
    fresh: dict[str, torch.Tensor],
    graph: Graph,
    persistent: set[str],
    path: str,
) -> dict[str, str]:
    """The checkpoint key of each fresh tensor it holds (under any tied name); a parameter
    or persistent buffer it lacks is an error naming it."""
    keys = source.keys()
    wanted: dict[str, str] = {}
    missing = []
    for name in fresh:
        aliases = (name, *graph.params[name].aliases)
        key = next((a for a in aliases if a in keys), None)
        if key is not None:
            wanted[name] = key
        elif any(a in persistent for a in aliases):
            missing.append(name)
    if missing:
        raise MaterializeError(
            f"checkpoint {path} lacks {len(missing)} tensor(s) of this rank's stage: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; it was saved for "
            "another model or another configuration of it"
        )
    return wanted


def _copy(
    source: TensorSource, wanted: dict[str, str], fresh: dict[str, torch.Tensor], path: str
) -> None:
    """Copy in batches of about `READ_BATCH_BYTES`, so a rank never holds its whole stage
    twice (once read, once materialized)."""
    batch: list[str] = []
    size = 0
    for name in wanted:
        batch.append(name)
        size += fresh[name].numel() * fresh[name].element_size()
        if size >= READ_BATCH_BYTES:
            _copy_batch(source, {n: wanted[n] for n in batch}, fresh, path)
            batch, size = [], 0
    if batch:
        _copy_batch(source, {n: wanted[n] for n in batch}, fresh, path)


def _copy_batch(
    source: TensorSource, wanted: dict[str, str], fresh: dict[str, torch.Tensor], path: str
) -> None:
    values = source.read(list(wanted.values()))
    with torch.no_grad():
        for name, key in wanted.items():
            value, target = values.pop(key), fresh[name]
            if tuple(value.shape) != tuple(target.shape):
                raise MaterializeError(
                    f"checkpoint {path} holds {key} with shape {tuple(value.shape)}, the model "
                    f"has {tuple(target.shape)}; it was saved for another configuration"
                )
            target.copy_(value)


def _initialize(model: nn.Module, init_fn: InitFn | None, device: torch.device) -> None:
    """Run the initializer over the whole model; on meta tensors it does nothing, so only
    this rank's fresh tensors get values.  The caller's RNG stream is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            if init_fn is not None:
                init_fn(model)
            else:
                default_initializer(model)
        except AutopartError:
            raise
        except Exception as err:  # the user's initializer, on a partly-meta model
            raise MaterializeError(
                f"initializing this rank's stage failed: {type(err).__name__}: {err}. The "
                "initializer runs over the whole model, with other stages' tensors on meta; "
                "it must not read values from them"
            ) from err


def default_initializer(model: nn.Module) -> None:
    """Hugging Face's own initialization where the model has it, else ``reset_parameters()``
    (or ``_reset_parameters()``) of every module, which is what construction runs."""
    if callable(getattr(model, "initialize_weights", None)) and hasattr(model, "_init_weights"):
        # Construction on meta already marked every module initialized; clear the marks.
        for module in model.modules():
            module.__dict__.pop("_is_hf_initialized", None)
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.__dict__.pop("_is_hf_initialized", None)
        model.initialize_weights()  # type: ignore[operator]
        return
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None) or getattr(
            module, "_reset_parameters", None
        )
        if callable(reset):
            reset()

"""Sharded checkpoints: each rank saves and loads only its own stage, with
``torch.distributed.checkpoint`` (DCP).

`get_state_dict` and `set_state_dict` have the shape of
``torch.distributed.checkpoint.state_dict``'s functions of the same names, so code written
for FSDP or torch pipelining works unchanged:

    msd, osd = autopart.get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    ...
    msd, osd = autopart.get_state_dict(model, optimizer)   # another plan, another world
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    autopart.set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)

The dicts use the unwrapped model's names (tied weights under each of their names), so a
checkpoint reshards freely: the keys are the same whatever the plan, and each rank asks for
its own.  Replicas of a stage offer the same keys, and DCP writes each once.  Optimizer
state is keyed by parameter name (DCP's flattened form), and ``param_groups`` list every
parameter of the original groups, so they are the same on all ranks.

`save_checkpoint` and `load_checkpoint` wrap the calls above with the checks a training job
needs: a save goes to a temporary directory that is renamed into place only after every rank
has written, so an interrupted save never leaves a checkpoint that loads as if complete; a
load refuses, by name, a checkpoint that lacks this model's tensors or holds other shapes.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from autopart.runtime.stage.tensor_sources import CheckpointError
from autopart.runtime.transport.distenv import job_group

if TYPE_CHECKING:
    from autopart.module import Module


def get_state_dict(
    model: Module, optimizers: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's stage: its tensors (the live ones, so a DCP load writes into them) and
    its optimizer's state.  Collective: every rank calls it."""
    model._require_setup("get_state_dict")
    tensors = _local_tensors(model)
    if optimizers is None:
        return tensors, {}
    _init_optimizer_state(model, optimizers)
    return tensors, model.local_optimizer.shard(_param_names(model))


def set_state_dict(
    model: Module,
    optimizers: torch.optim.Optimizer | None = None,
    *,
    model_state_dict: dict[str, Any],
    optim_state_dict: dict[str, Any] | None = None,
) -> None:
    """Load this rank's part of the dicts; keys of other stages are ignored, and a tensor of
    this stage that the dict lacks, or holds in another shape, is an error naming it."""
    model._require_setup("set_state_dict")
    local = _local_tensors(model)
    missing = sorted(set(local) - set(model_state_dict))
    if missing:
        raise CheckpointError(
            f"the state dict lacks {len(missing)} tensor(s) of this rank's stage: "
            f"{', '.join(missing[:5])}; it was saved for another model"
        )
    with torch.no_grad():
        for key, target in local.items():
            value = model_state_dict[key]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"the state dict holds {key} with shape {tuple(value.shape)}, the model "
                    f"has {tuple(target.shape)}; it was saved for another configuration"
                )
            if value.data_ptr() != target.data_ptr():
                target.copy_(value)
    if optimizers is None or not optim_state_dict:
        return
    model.local_optimizer.load_shard(optim_state_dict, _param_names(model))


def save_checkpoint(
    path: str | Path, model: Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Write a sharded checkpoint to ``path`` (a directory), replacing one already there
    only once the new one is complete."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    msd, osd = get_state_dict(model, optimizer)
    box = [f"{path.name}.partial-{uuid.uuid4().hex[:8]}"]
    dist.broadcast_object_list(box, src=0, group=job_group())
    partial = path.parent / box[0]
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(partial))
    # Every rank's shards are written, and rank 0 wrote the metadata last.
    dist.barrier(group=job_group())
    if dist.get_rank() == 0:
        if path.exists():
            retired = path.parent / f"{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(retired)
            partial.rename(path)
            shutil.rmtree(retired)
        else:
            partial.rename(path)
    dist.barrier(group=job_group())


def load_checkpoint(
    path: str | Path, model: Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Restore this rank's stage from a checkpoint of `save_checkpoint` (or of ``dcp.save``
    over `get_state_dict`'s dicts), under any plan and world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not (path / ".metadata").exists():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no .metadata): its save did not finish, or "
            "it is not a distributed checkpoint"
        )
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    msd, osd = get_state_dict(model, optimizer)
    wrong = []
    for key, tensor in msd.items():
        meta = stored.get(f"model.{key}")
        if meta is None or tuple(getattr(meta, "size", ())) != tuple(tensor.shape):
            wrong.append(key)
    if wrong:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {len(wrong)} tensor(s) of this rank's "
            f"stage are missing or have another shape ({', '.join(wrong[:5])}); it was saved "
            "for another model or configuration"
        )
    if optimizer is not None and not any(key.startswith("optim.") for key in stored):
        raise CheckpointError(f"checkpoint {path} holds no optimizer state")
    state = {"model": msd, "optim": osd} if optimizer is not None else {"model": msd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:
        raise CheckpointError(f"loading checkpoint {path} failed: {err}") from err
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def _local_tensors(model: Module) -> dict[str, torch.Tensor]:
    """This rank's entries of the unwrapped model's state dict."""
    found = {}
    for key, tensor in model.model.state_dict().items():
        if model.holders.holds(model.names.get(key, key)) and not tensor.is_meta:
            found[key] = tensor
    return found


def _param_names(model: Module) -> dict[int, str]:
    return {id(param): name for name, param in model.model.named_parameters()}


def _init_optimizer_state(model: Module, optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer that has not stepped its state, so that a load has tensors to fill:
    one step with zero gradients at learning rate 0, as torch's ``get_state_dict`` does.
    Every rank decides together, because the step runs the ZeRO collectives.  (SGD without
    momentum keeps no state, so for it this step happens on every call, and changes nothing.)"""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fresh = not optimizer.state and all(p.grad is None for p in params)
    flag = torch.tensor([int(fresh)], device=model.device)
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=job_group())
    if not int(flag):  # some rank has stepped: its state is there to load into
        return
    for param in params:
        param.grad = torch.zeros_like(param)
    rates = [group.get("lr") for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        if "lr" in group:
            rate = group["lr"]
            group["lr"] = torch.zeros_like(rate) if isinstance(rate, torch.Tensor) else 0.0
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        if rate is not None:
            group["lr"] = rate
    optimizer.zero_grad(set_to_none=True)

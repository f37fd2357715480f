"""What this rank holds, by category, for `autopart.Module.memory_report`.

Resident tensors are counted by storage (`autopart.reports.memtrack.storage_bytes`), so views and
tied weights count once; what offload keeps in host memory is reported apart, under ``host_*``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from autopart.runtime.stage.offload import ParamOffload


def resident(
    stage_module: nn.Module,
    params: Iterable[torch.Tensor],
    offload: ParamOffload | None,
    optimizer: torch.optim.Optimizer | None,
    state_on_host: bool,
) -> dict[str, list[torch.Tensor]]:
    """This rank's resident tensors by category; what offload keeps in host memory is under
    ``host_parameters``, ``host_gradients`` and ``host_optimizer_state``."""
    offloaded = {id(p) for p in offload.parameters()} if offload else set()
    found: dict[str, list[torch.Tensor]] = {
        "parameters": list(stage_module.buffers()),
        "gradients": [],
        "optimizer_state": [],
    }
    if offload is not None:
        found.update(host_parameters=[], host_gradients=[], host_optimizer_state=[])
    for param in params:
        where = "host_" if id(param) in offloaded else ""
        found[where + "parameters"].append(param)
        if param.grad is not None:
            found[where + "gradients"].append(param.grad)
    state = optimizer.state.values() if optimizer is not None else []
    found["host_optimizer_state" if state_on_host else "optimizer_state"] += [
        v for st in state for v in st.values() if isinstance(v, torch.Tensor)
    ]
    return found


def on_device(found: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    """The device-resident tensors among ``found``, in one list."""
    return [t for kind, tensors in found.items() if not kind.startswith("host_") for t in tensors]

"""The optimizer step of a stage whose parameters and optimizer state live in host memory.

torch's optimizers pick their implementation by device: on CUDA the multi-tensor ``foreach``
path, on the CPU a Python loop over parameters, one small op after another.  A stage offloaded
with its optimizer state (``offload="params+optimizer"``) steps on the host because autopart
put it there, not because the user chose the CPU, so its step gets the implementation made for
that place: torch's fused CPU kernels (``fused=True``; vectorized and multi-threaded, one pass
over each parameter's values, gradient and state), which run at the host's memory bandwidth
(`bench/host_optimizer.py`).  A group the user set ``foreach``, ``fused`` or ``differentiable``
on keeps the user's choice, and the state dict reports the user's setting, not this one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["FUSED_ON_HOST", "fuse_host_step"]

#: torch optimizers with a fused CPU kernel (``torch._fused_*_``) for every group setting.
FUSED_ON_HOST: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
    torch.optim.Adagrad,
)


def fuse_host_step(optimizer: torch.optim.Optimizer) -> list[int]:
    """Switch the groups of ``optimizer`` that step only host parameters, with settings the
    user left at their defaults, to torch's fused CPU kernel; returns their indices."""
    if type(optimizer) not in FUSED_ON_HOST:
        return []
    fused = []
    for index, group in enumerate(optimizer.param_groups):
        chosen = group.get("foreach") is not None or group.get("fused") is not None
        if chosen or group.get("differentiable") or not _on_host(group["params"]):
            continue
        group["fused"] = True
        fused.append(index)
    if fused:
        optimizer.register_step_pre_hook(_sparse_unfused)
    return fused


def _sparse_unfused(optimizer: torch.optim.Optimizer, *_: object) -> None:
    """The fused kernels take dense gradients only: a group that got a sparse one (an
    ``nn.Embedding(sparse=True)``) goes back to the user's implementation."""
    for group in optimizer.param_groups:
        if group.get("fused") and any(
            p.grad is not None and p.grad.is_sparse for p in group["params"]
        ):
            group["fused"] = None


def _on_host(params: Iterable[torch.Tensor]) -> bool:
    """Dense floating-point CPU tensors only: what the fused CPU kernels take."""
    params = list(params)
    return bool(params) and all(
        p.device.type == "cpu" and p.is_floating_point() and p.layout is torch.strided
        for p in params
    )

"""Outputs without a batch dimension (a scalar autopart could not split into rows): every
rank gets the row-weighted mean of the chunks' values, from one all-reduce per call.

Each producer adds its share as it runs a microbatch: a float's value times the chunk's rows,
anything else only from the first chunk (the lowest rank of microbatch 0).  Summed over the
ranks and divided by the global batch, that is the mean, or the first chunk's value.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from autopart.ir import TensorSpec
from autopart.runtime.transport import routing
from autopart.runtime.transport.distenv import job_group
from autopart.runtime.transport.layout import Rows
from autopart.runtime.transport.routing import ValueShape

Key = tuple[str, int]


def add_share(
    shares: dict[Key, torch.Tensor],
    key: Key,
    spec: TensorSpec,
    leaf: Any,
    m: int,
    rows: Rows,
    first_holder: bool,
) -> None:
    value = routing.to_tensor(leaf, spec).detach()
    if value.is_floating_point():
        share = value.double() * (rows[1] - rows[0])
    elif m == 0 and first_holder:
        share = _as_real(value)
    else:
        return
    shares[key] = shares[key] + share if key in shares else share


def combine_whole(
    shares: dict[Key, torch.Tensor],
    whole: list[Key],
    shapes: dict[str, ValueShape],
    global_batch: int,
    device: torch.device,
) -> dict[Key, Any]:
    """Every rank's value of each whole output leaf, from one all-reduce of the shares."""
    if not whole:
        return {}
    specs = [shapes[name].leaves[li] for name, li in whole]
    zeros = [_as_real(torch.zeros(s.shape, dtype=routing.torch_dtype(s.dtype))) for s in specs]
    parts = [
        shares.get(key, zero).to(device).double().flatten()
        for key, zero in zip(whole, zeros, strict=True)
    ]
    flat = torch.cat(parts)
    if dist.get_world_size() > 1:
        dist.all_reduce(flat, group=job_group())
    combined: dict[Key, Any] = {}
    start = 0
    for key, spec, zero in zip(whole, specs, zeros, strict=True):
        piece = flat[start : start + zero.numel()].view(zero.shape)
        start += zero.numel()
        dtype = routing.torch_dtype(spec.dtype)
        if dtype.is_floating_point:
            value = (piece / global_batch).to(dtype)
        elif dtype.is_complex:
            value = torch.view_as_complex(piece.contiguous()).to(dtype)
        else:
            value = piece.round().to(dtype)
        combined[key] = value.item() if routing.is_scalar(spec) else value
    return combined


def _as_real(value: torch.Tensor) -> torch.Tensor:
    """A complex value as its real and imaginary parts, which a float64 all-reduce carries."""
    return torch.view_as_real(value) if value.is_complex() else value

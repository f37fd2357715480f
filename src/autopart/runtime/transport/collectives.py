"""Gather the parts of a state dict that each rank owns.

Two ways, with different costs:

* `gather_to_all`: every rank gets everything (one ``all_gather_object``), so each rank holds
  the whole model for a moment: the price of a full ``state_dict()`` on every rank;
* `stream_to_rank0`: the owners send their parts to rank 0 one rank at a time, in rank order,
  and rank 0 merges each before it receives the next.  No other rank ever holds more than
  its own part, and rank 0 holds its result plus one part in flight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from autopart.runtime.transport.distenv import job_group


def gather(mine: dict, rank0_only: bool, device: torch.device) -> dict | None:
    """Everyone's parts merged; None on the ranks that, under ``rank0_only``, get nothing."""
    if dist.get_world_size() == 1:
        return dict(mine)
    return stream_to_rank0(mine, device) if rank0_only else gather_to_all(mine)


def gather_to_all(mine: dict) -> dict:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine, group=job_group())
    merged: dict = {}
    for part in gathered:
        merged.update(part)
    return merged


def stream_to_rank0(mine: dict, device: torch.device) -> dict | None:
    """Rank 0's merge of every rank's part; each other rank sends its own and gets None.
    Ranks with an empty part send nothing but a count of zero, so rank 0 knows to skip."""
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(
        counts, torch.tensor([len(mine)], dtype=torch.int64, device=device), group=job_group()
    )
    if rank != 0:
        if mine:
            dist.send_object_list([mine], dst=0, group=job_group())
        return None
    merged = dict(mine)
    for src in range(1, world):
        if int(counts[src]):
            box: list[Any] = [None]
            dist.recv_object_list(box, src=src, group=job_group())
            merged.update(box[0])
            box[0] = None
    return merged


def to_cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value

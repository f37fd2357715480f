"""Run a function on several real processes joined by a gloo process group."""

from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world: int, fn, *args, timeout_s: float = 60.0) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned processes; re-raise any failure."""
    mp.start_processes(
        _entry,
        args=(world, free_port(), timeout_s, fn, args),
        nprocs=world,
        join=True,
        start_method="spawn",
    )


def _entry(rank: int, world: int, port: int, timeout_s: float, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()

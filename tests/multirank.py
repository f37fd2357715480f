"""Run a function on several real processes joined by a gloo process group.

``free_port`` is re-exported for tests that start launchers themselves."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autopart.runtime.distenv import free_port, set_local_launch_env

__all__ = ["free_port", "run_ranks", "run_ranks_unjoined"]


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
    set_local_launch_env(rank, world, port)
    torch.set_num_threads(1)  # several ranks share the machine's cores
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears its connections down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def run_ranks_unjoined(world: int, fn, *args, timeout_s: float = 60.0) -> list[int | None]:
    """Start ``fn(rank, world, *args)`` on ``world`` processes that set up their own process
    group (through the launcher's environment variables, as under torchrun), and wait for all
    of them without stopping the others when one dies.  Returns their exit codes (None: still
    running at ``timeout_s`` and killed)."""
    context = mp.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=_entry_unjoined, args=(rank, world, port, fn, args))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    codes = []
    for process in processes:
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
            codes.append(None)
        else:
            codes.append(process.exitcode)
    return codes


def _entry_unjoined(rank: int, world: int, port: int, fn, args) -> None:
    set_local_launch_env(rank, world, port)
    fn(rank, world, *args)

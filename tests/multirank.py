"""Run a function on several real processes joined by a gloo process group.

Processes start from a fork server that has imported torch and transformers once, so each rank
starts in a fraction of a second instead of importing them again (as ``spawn`` would); the
server is a fresh interpreter, so no rank inherits the test runner's state.  autopart itself is
imported in each rank, after the rank takes the caller's environment (``spawn`` semantics: a
test's ``monkeypatch.setenv`` reaches its ranks, and import-time settings such as
``AUTOPART_TIMEOUT`` are read from it).

``free_port`` is here for tests that start launchers themselves."""

from __future__ import annotations

import datetime
import importlib
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_ranks", "run_ranks_unjoined"]

#: What the fork server imports before it forks any rank.
PRELOAD = ["torch", "torch.distributed", "transformers", "numpy"]


def _context():
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def free_port() -> int:
    from autopart.runtime.transport.distenv import free_port as find

    return find()


def run_ranks(world: int, fn, *args, timeout_s: float = 60.0) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned processes; re-raise any failure."""
    _context()  # the preload list, before the server starts
    mp.start_processes(
        _entry,
        args=(world, free_port(), timeout_s, _name(fn), args, dict(os.environ)),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )


def _entry(rank: int, world: int, port: int, timeout_s: float, name, args, env) -> None:
    fn = _take(env, name)
    from autopart.runtime.transport.distenv import set_local_launch_env

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
    context = _context()
    port = free_port()
    processes = [
        context.Process(
            target=_entry_unjoined, args=(rank, world, port, _name(fn), args, dict(os.environ))
        )
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


def _entry_unjoined(rank: int, world: int, port: int, name, args, env) -> None:
    fn = _take(env, name)
    from autopart.runtime.transport.distenv import set_local_launch_env

    set_local_launch_env(rank, world, port)
    fn(rank, world, *args)


def _name(fn) -> tuple[str, str]:
    return fn.__module__, fn.__qualname__


def _take(env: dict[str, str], name: tuple[str, str]):
    """This process's environment becomes the caller's, as under ``spawn``; then the rank's
    function is imported (with autopart), so that what they read at import sees it."""
    os.environ.clear()
    os.environ.update(env)
    module, qualname = name
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found

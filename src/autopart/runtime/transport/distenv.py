"""Join the process group the launcher set up: torchrun, mpirun, or a single process.

torchrun exports ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; Open MPI exports
``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK`` and nothing about a rendezvous, so the
address defaults to this host (set ``MASTER_ADDR`` for several nodes).  A lone process with no
launcher gets a one-rank group, so the same script runs unlaunched.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: Seconds a rank waits on a peer before failing; short enough that a dead rank is noticed.
DEFAULT_TIMEOUT_S = float(os.environ.get("AUTOPART_TIMEOUT", "300"))


def _from_mpi() -> None:
    mapping = {
        "RANK": "OMPI_COMM_WORLD_RANK",
        "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
        "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK",
    }
    for ours, theirs in mapping.items():
        if ours not in os.environ and theirs in os.environ:
            os.environ[ours] = os.environ[theirs]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


#: The group autopart's own collectives run on (None: the default group) and its timeout.
_JOB: dict[str, Any] = {"group": None, "timeout": None, "made_for": None}


def ensure_initialized(timeout_s: float | None = None) -> None:
    """Initialize ``torch.distributed`` from the environment unless the caller already did.

    Every collective and message of autopart's waits at most ``timeout_s`` on a peer (or
    ``AUTOPART_TIMEOUT``): on the default group when autopart makes it, else on a group of
    its own over every rank, since the caller's group has the caller's timeout."""
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    if dist.is_initialized():
        made_for = (id(dist.group.WORLD), timeout)  # a new default group needs its own
        if dist.get_world_size() > 1 and _JOB.get("made_for") != made_for:
            ranks = list(range(dist.get_world_size()))
            group = dist.new_group(ranks, timeout=timeout)
            _JOB.update(group=group, timeout=timeout, made_for=made_for)
        return
    _JOB.update(group=None, timeout=timeout, made_for=None)
    # Gloo as well on GPUs: offloaded stages sum their gradients in host memory.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:
        _from_mpi()
    if "RANK" in os.environ:
        log.info("joining process group (%s) as rank %s", backend, os.environ["RANK"])
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )


def job_group() -> dist.ProcessGroup | None:
    """The group for autopart's collectives over every rank (None: the default group)."""
    return _JOB["group"]


def new_group(ranks: list[int]) -> dist.ProcessGroup:
    """A process group over ``ranks`` that waits on a peer no longer than the job does."""
    return dist.new_group(ranks, timeout=_JOB["timeout"])


def free_port() -> int:
    """A TCP port on this host that nothing listens on now, for a local rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_local_launch_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun would export for one rank of a one-node group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )

"""Measurements of this machine, taken once and kept, so that plans are reproducible.

A plan reads measured numbers (the CPU's FLOP/s and memory bandwidth, the links between this
job's ranks, the host-to-device link).  Timing them again at every launch gives slightly
different numbers each time, and a cut that sits near a tie then moves from launch to launch,
which makes a run unrepeatable.  So each measurement is kept on disk under a key that names what
was measured (the machine, the device, the job's shape) and read back by later launches: the
same model, options and world give the same plan.  The plan's notes say which measured inputs it
used and when they were taken.  Set ``AUTOPART_REMEASURE=1`` for one launch, or delete the
directory (``AUTOPART_CACHE_DIR``/machine, by default ``~/.cache/autopart/profiles/machine``),
to measure again, after a hardware change say.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["kept_in", "machine_key", "recall", "remember", "remembered"]


def kept_in() -> Path:
    """Where the measurements are kept."""
    return _directory()


def _directory() -> Path:
    root = Path(os.environ.get("AUTOPART_CACHE_DIR", "~/.cache/autopart/profiles"))
    return root.expanduser() / "machine"


def machine_key(*parts: object) -> str:
    """A key naming this host, its processor, the software and settings that change what a
    measurement reads (torch's version, the visible GPUs, NCCL's settings), and ``parts``:
    what was measured and the job's shape.  Long keys are hashed."""
    settings = sorted(
        f"{k}={v}"
        for k, v in os.environ.items()
        if k.startswith("NCCL_") or k == "CUDA_VISIBLE_DEVICES"
    )
    words = [socket.gethostname(), platform.machine(), _processor(), torch_version(), *settings]
    words += [str(p) for p in parts]
    text = "-".join(w.replace("/", "_").replace(" ", "_") for w in words if w)
    if len(text) <= 150:
        return text
    return f"{text[:100]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def torch_version() -> str:
    return str(torch.__version__)


def _processor() -> str:
    """The CPU's model name, where Linux says it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def recall(key: str) -> dict[str, float] | None:
    """The numbers kept under ``key``, or None (never measured, or unreadable)."""
    path = _directory() / f"{key}.json"
    try:
        record = json.loads(path.read_text())
        return {k: float(v) for k, v in record["values"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remember(key: str, values: dict[str, float]) -> dict[str, float]:
    """Keep ``values`` under ``key`` unless some process kept others first (several ranks
    of a launch measure at once); returns what is kept, so that all of them use the same."""
    directory = _directory()
    partial = directory / f"{key}.{os.getpid()}.partial"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        record = {"values": values, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        partial.write_text(json.dumps(record, indent=1))
        os.link(partial, directory / f"{key}.json")  # fails if another process kept its own
    except FileExistsError:
        if recall(key) is None or os.environ.get("AUTOPART_REMEASURE"):
            partial.replace(directory / f"{key}.json")  # unreadable, or asked to measure anew
    except OSError as err:  # an unwritable cache costs a measurement next time, nothing more
        log.info("could not keep the measurement %s: %s", key, err)
    finally:
        partial.unlink(missing_ok=True)
    return recall(key) or values


def remembered(key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The numbers kept under ``key``, measuring and keeping them the first time."""
    values = None if os.environ.get("AUTOPART_REMEASURE") else recall(key)
    return values if values is not None else remember(key, measure())

"""Measured block profiles and the on-disk cache that keeps them between runs.

Measuring a block costs real device time and the planner asks about the same blocks again on the
next run, so every result is stored as a small JSON file.  One file per key (graph fingerprint,
node set, batch, device) means ranks or runs that measure at the same time never rewrite each
other's results, and a write is atomic (temporary file, then rename), so a crash leaves no
half-written profile.  A file that cannot be read or does not match its key is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Bumped when what a profile means changes, so older files are measured again.
PROFILE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BlockProfile:
    """Measured seconds of one block, and its peak device memory when the device reports it.

    ``peak_bytes`` covers everything the block held at once: its inputs, parameters,
    activations and gradients (None on CPU, where PyTorch does not track allocations).
    """

    forward_seconds: float
    backward_seconds: float
    peak_bytes: int | None


@dataclass(frozen=True)
class ProfileKey:
    """What a profile depends on: the model, the exact node set, the batch and the device."""

    fingerprint: str
    nodes_hash: str
    batch: int
    device: str

    @classmethod
    def of(cls, fingerprint: str, names: list[str], batch: int, device: str) -> ProfileKey:
        digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
        return cls(fingerprint=fingerprint, nodes_hash=digest, batch=batch, device=device)

    def relative_path(self) -> Path:
        device = re.sub(r"[^A-Za-z0-9._-]+", "_", self.device)
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", self.fingerprint)[:32] or "unnamed"
        return Path(model) / device / f"b{self.batch}-{self.nodes_hash[:32]}.json"


class ProfileCache:
    """JSON files under ``directory``, one per `ProfileKey`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, key: ProfileKey) -> Path:
        return self.directory / key.relative_path()

    def get(self, key: ProfileKey) -> BlockProfile | None:
        path = self.path(key)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as err:
            log.debug("ignoring unreadable profile %s: %s", path, err)
            return None
        if data.get("version") != PROFILE_FORMAT_VERSION or data.get("key") != asdict(key):
            log.debug("ignoring profile %s made for another key or version", path)
            return None
        try:
            return BlockProfile(**data["profile"])
        except (KeyError, TypeError) as err:
            log.debug("ignoring malformed profile %s: %s", path, err)
            return None

    def put(self, key: ProfileKey, profile: BlockProfile) -> None:
        """Store ``profile``; a cache that cannot be written only costs a re-measurement."""
        path = self.path(key)
        record = {"version": PROFILE_FORMAT_VERSION, "key": asdict(key), "profile": asdict(profile)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        except OSError as err:
            log.warning("cannot write profile cache %s: %s", path, err)
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, path)
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            log.warning("cannot write profile cache %s: %s", path, err)

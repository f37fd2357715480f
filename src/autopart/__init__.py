"""autopart: automatic pipeline x data-parallel partitioning for unmodified PyTorch models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from autopart.errors import AutopartError

if TYPE_CHECKING:  # what users' type checkers see; at run time each is imported on first use
    from autopart.checkpointing import (
        get_state_dict,
        load_checkpoint,
        save_checkpoint,
        set_state_dict,
    )
    from autopart.config import Config
    from autopart.module import Module
    from autopart.plan.plan import Plan
    from autopart.scaler import GradScaler

__all__ = [
    "AutopartError",
    "Config",
    "GradScaler",
    "Module",
    "Plan",
    "get_state_dict",
    "load_checkpoint",
    "save_checkpoint",
    "set_state_dict",
]
__version__ = "0.1.0"

#: Where each lazily imported public name lives.
_LAZY = {
    "Config": "autopart.config",
    "GradScaler": "autopart.scaler",
    "Module": "autopart.module",
    "Plan": "autopart.plan.plan",
    "get_state_dict": "autopart.checkpointing",
    "load_checkpoint": "autopart.checkpointing",
    "save_checkpoint": "autopart.checkpointing",
    "set_state_dict": "autopart.checkpointing",
}


def __getattr__(name: str) -> object:
    # Imported lazily so that `import autopart` (and the CLI's --help) stays fast.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autopart' has no attribute {name!r}")

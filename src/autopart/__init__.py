"""autopart: automatic pipeline x data-parallel partitioning for unmodified PyTorch models."""

from autopart.errors import AutopartError

__all__ = [
    "AutopartError",
    "GradScaler",
    "Module",
    "Plan",
    "get_state_dict",
    "load_checkpoint",
    "save_checkpoint",
    "set_state_dict",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily so that `import autopart` (and the CLI's --help) stays fast.
    if name == "Module":
        from autopart.module import Module

        return Module
    if name == "GradScaler":
        from autopart.scaler import GradScaler

        return GradScaler
    if name == "Plan":
        from autopart.plan.plan import Plan

        return Plan
    if name in ("get_state_dict", "set_state_dict", "save_checkpoint", "load_checkpoint"):
        from autopart import checkpointing

        return getattr(checkpointing, name)
    raise AttributeError(f"module 'autopart' has no attribute {name!r}")

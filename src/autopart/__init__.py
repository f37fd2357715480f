"""autopart: automatic pipeline x data-parallel partitioning for unmodified PyTorch models."""

from autopart.errors import AutopartError

__all__ = ["AutopartError"]
__version__ = "0.1.0"

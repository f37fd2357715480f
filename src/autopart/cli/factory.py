"""Load a model factory named on the command line as ``FILE.py:NAME`` or ``module.path:NAME``.

A factory returns ``(model, args)`` or ``(model, args, kwargs)`` with example inputs of one
sample; it may build the model on the ``meta`` device so huge models cost no memory.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from autopart.errors import AutopartError


class FactoryError(AutopartError):
    """The factory could not be found, imported, or returned the wrong thing."""


def load_factory(spec: str):
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise FactoryError(f"expected FILE.py:FACTORY or module.path:FACTORY, got {spec!r}")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise FactoryError(f"model file {target!r} does not exist")
        module_name = f"autopart_user_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(module_name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise FactoryError(f"model file {target!r} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[module_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:
            raise FactoryError(f"importing {target} failed: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise FactoryError(f"cannot import module {target!r}: {err}") from err
    factory = getattr(module, name, None)
    if not callable(factory):
        raise FactoryError(f"{target} has no callable named {name!r}")
    return factory


def call_factory(spec: str) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    """Build the model and its example inputs from ``spec``."""
    factory = load_factory(spec)
    try:
        result = factory()
    except Exception as err:
        raise FactoryError(f"{spec}() raised {type(err).__name__}: {err}") from err
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise FactoryError(
            f"{spec}() must return (model, args) or (model, args, kwargs), "
            f"got {type(result).__name__}"
        )
    model, args, *rest = result
    kwargs = rest[0] if rest else {}
    if not isinstance(model, torch.nn.Module):
        raise FactoryError(
            f"{spec}() returned {type(model).__name__} as the model, not an nn.Module"
        )
    if not isinstance(args, tuple):
        args = (args,)
    if not isinstance(kwargs, dict):
        raise FactoryError(f"{spec}() returned {type(kwargs).__name__} as kwargs, not a dict")
    return model, args, kwargs

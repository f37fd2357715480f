"""Canonical names of a model's parameters and buffers: tied names collapse to the first, and
constants the tracer lifted are recorded as buffers under their attribute name."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.fx.config

from autopart.ir import (
    ParamSpec,
)


@dataclass
class _Params:
    """Canonical names of the model's parameters and buffers; tied names collapse to one."""

    specs: dict[str, ParamSpec]
    by_id: dict[int, str]
    by_name: dict[str, str]

    @staticmethod
    def of(model: torch.nn.Module) -> _Params:
        entries = [(n, t, False) for n, t in model.named_parameters(remove_duplicate=False)]
        entries += [(n, t, True) for n, t in model.named_buffers(remove_duplicate=False)]
        by_id: dict[int, str] = {}
        aliases: dict[str, list[str]] = {}
        first: dict[str, tuple[torch.Tensor, bool]] = {}
        for name, tensor, is_buffer in entries:
            canonical = by_id.setdefault(id(tensor), name)
            if canonical == name:
                first[name] = (tensor, is_buffer)
                aliases[name] = []
            else:
                aliases[canonical].append(name)
        specs = {
            name: ParamSpec(
                name=name,
                shape=tuple(tensor.shape),
                dtype=str(tensor.dtype),
                is_buffer=is_buffer,
                requires_grad=not is_buffer and tensor.requires_grad,
                aliases=tuple(aliases[name]),
            )
            for name, (tensor, is_buffer) in first.items()
        }
        by_name = {alias: name for name, spec in specs.items() for alias in (name, *spec.aliases)}
        return _Params(specs, by_id, by_name)

    def resolve(self, name: str, tensor: torch.Tensor) -> str:
        """The canonical name of an attribute the graph reads; unknown tensors are constants
        the tracer lifted, recorded as non-trainable buffers under their attribute name."""
        canonical = self.by_id.get(id(tensor)) or self.by_name.get(name)
        if canonical is None:
            canonical = name
            self.specs[name] = ParamSpec(
                name, tuple(tensor.shape), str(tensor.dtype), is_buffer=True, requires_grad=False
            )
            self.by_id[id(tensor)] = name
        return canonical

"""Low-precision casts of offloaded parameters, made in host memory once per optimizer step.

Under autocast an op that reads a weight only through autocast's cast gets a copy of the cast
(`read_dtypes`): half the bytes over the link.  The cast is made on the host when first asked
for after the parameters changed, and kept (page-locked for a GPU) until they change again.
"""

from __future__ import annotations

import torch

__all__ = ["HostCasts"]


class HostCasts:
    """Low-precision casts of host parameters, one per slot, shared by every call signature's
    stage on this rank; remade after an optimizer step (counted here, as the fused steps do
    not bump version counters) or an in-place change the parameter's version counter shows."""

    def __init__(self) -> None:
        self.steps = 0
        self._made: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    def stepped(self) -> None:
        self.steps += 1

    def of(
        self, slot: str, param: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        stamp = (self.steps, param._version)
        made = self._made.get(slot)
        if made is not None and made[0] == stamp:
            return made[1]
        if made is not None:
            cast = made[1]
        else:  # page-locked for a GPU, as the parameters are
            cast = torch.empty(param.shape, dtype=dtype, pin_memory=device.type == "cuda")
        with torch.no_grad():
            cast.copy_(param)
        self._made[slot] = (stamp, cast)
        return cast

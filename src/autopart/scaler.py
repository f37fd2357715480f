"""`autopart.GradScaler`: fp16 loss scaling whose overflow check spans every stage and rank.

``torch.amp.GradScaler`` checks for inf/nan in the gradients one process holds.  Under
pipeline parallelism each rank holds one stage's gradients, so one stage could overflow while
another steps, and the parameters would drift apart.  This scaler takes the maximum of the
found-inf flags over all ranks before the step, so every rank skips the same steps and
lowers its scale together.  Use it exactly like the PyTorch one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autopart.runtime.transport.distenv import job_group


class GradScaler(torch.amp.GradScaler):
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self._enabled or not dist.is_initialized():
            return
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        local = sum(float(flag.item()) for flag in found.values())
        assert self._scale is not None  # unscale_ ran, so the scale exists
        flag = torch.tensor([local], dtype=torch.float32, device=self._scale.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=job_group())
        agreed = torch.full((), float(flag.item() > 0), device=self._scale.device)
        if found:
            for device, value in found.items():
                found[device] = agreed.to(value.device)
        else:
            found[agreed.device] = agreed

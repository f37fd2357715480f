"""ZeRO: the replicas of a stage split its optimizer state and its gradients between them.

Each trainable parameter of a stage is assigned to one of the stage's replicas (largest first,
to the least loaded; the same on every rank because it depends only on the plan).  A replica's
optimizer holds only its share, so optimizer-state memory per rank falls by the replica count;
after the step, each owner broadcasts its updated parameters to the other replicas.  Each
gradient is summed onto its owner alone (`autopart.runtime.data_parallel.overlap`), as under ZeRO-2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from autopart.ir import ParamSpec
from autopart.plan.plan import StagePlan


def assign_shards(stage: StagePlan, specs: dict[str, ParamSpec]) -> dict[str, int]:
    """The replica rank that owns each trainable parameter of ``stage``."""
    load = dict.fromkeys(stage.ranks, 0)
    owner = {}
    names = [n for n in stage.params if n in specs]
    for name in sorted(names, key=lambda n: (-specs[n].nbytes, n)):
        rank = min(load, key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += specs[name].nbytes
    return owner


class ShardedStep:
    """Broadcasts each replica's freshly stepped parameters to the stage's other replicas."""

    def __init__(
        self,
        owner: dict[str, int],
        params: dict[str, torch.Tensor],
        group: dist.ProcessGroup | None,
    ) -> None:
        self.group = group
        self.by_owner: dict[int, list[torch.Tensor]] = {}
        for name in sorted(owner):
            if name in params:
                self.by_owner.setdefault(owner[name], []).append(params[name])

    def after_step(self) -> None:
        """Share the owners' new values; drop the gradients this rank's optimizer never
        steps, since its ``zero_grad`` cannot reach them and they would pile up."""
        if self.group is None:
            return
        me = dist.get_rank()
        for src, params in self.by_owner.items():
            if src != me:
                for param in params:
                    param.grad = None
        with torch.no_grad():
            for src in sorted(self.by_owner):
                tensors = [p.data for p in self.by_owner[src]]
                flat = _flatten_dense_tensors(tensors)
                dist.broadcast(flat, src=src, group=self.group)
                for tensor, synced in zip(
                    tensors, _unflatten_dense_tensors(flat, tensors), strict=True
                ):
                    tensor.copy_(synced)

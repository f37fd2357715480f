"""The user's optimizer, cut down to what this rank steps, and its state dicts.

The optimizer the user built over the whole model is rewritten in place: its groups keep only
the parameters this rank steps (its stage's, or under ZeRO its shard of them), and hooks are
added where the plan needs them: `StepOnDevice` for ``offload="params"`` (the step runs on the
device though the parameters live in host memory), `ShardedStep` for ZeRO (each replica
broadcasts its shard after the step).  The original groups are kept, because state dicts speak
of the unwrapped model's optimizer: indices over every parameter of every group.
"""

from __future__ import annotations

from typing import Any

import torch

from autopart.config import Offload
from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.plan.plan import Plan
from autopart.runtime.context import RankContext
from autopart.runtime.data_parallel.holders import Holders
from autopart.runtime.data_parallel.zero import ShardedStep, assign_shards
from autopart.runtime.stage.host_step import fuse_host_step
from autopart.runtime.stage.offload import ParamOffload, StepOnDevice
from autopart.runtime.transport.collectives import gather, to_cpu


class LocalOptimizer:
    """What this rank's optimizer steps, who speaks for each parameter's state, and the
    optimizer state dict in the unwrapped model's terms."""

    def __init__(
        self,
        ctx: RankContext,
        optimizer: torch.optim.Optimizer | None,
        original_groups: list[list[torch.Tensor]],
        graph: Graph,
        holders: Holders,
        trainable: dict[str, torch.Tensor],
        offload: ParamOffload | None,
    ) -> None:
        self.optimizer = optimizer
        self.original_groups = original_groups
        plan, rank, self.rank, self.device = ctx.plan, ctx.rank, ctx.rank, ctx.device
        self.stage = ctx.stage
        self.local_ids = {id(trainable[n]) for n in holders.local}
        shards = assign_shards(self.stage, graph.params) if self.stage.zero else None
        self.state_owner = _state_owners(plan, graph, trainable)
        self.stepped_ids = self.local_ids
        if shards is not None and optimizer is not None:
            self.stepped_ids = {id(trainable[n]) for n in holders.local if shards.get(n) == rank}
        #: Groups whose step autopart switched to the fused host kernel (their state dicts
        #: still say what the user chose).
        self.fused_groups: list[int] = []
        if optimizer is None:
            return
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in self.stepped_ids]
        for param in list(optimizer.state):
            if id(param) not in self.stepped_ids:
                del optimizer.state[param]
        if self.stage.offload == Offload.PARAMS_OPTIMIZER:
            self.fused_groups = fuse_host_step(optimizer)
        if offload is not None:  # the host casts of its parameters are remade after a step
            optimizer.register_step_post_hook(lambda *_: offload.stepped())
        if self.stage.offload == Offload.PARAMS and offload is not None:
            # First: its post-step hook brings the parameters home before ZeRO shares them.
            stepped = [p for p in offload.parameters() if id(p) in self.stepped_ids]
            StepOnDevice(optimizer, stepped, self.device)
        if shards is not None:
            step = ShardedStep(
                shards,
                {n: trainable[n] for n in holders.local},
                holders.groups.get(tuple(self.stage.ranks)),
            )
            optimizer.register_step_post_hook(lambda *_: step.after_step())

    def require(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise AutopartError("autopart.Module was created without an optimizer")
        return self.optimizer

    def state_dict(self, rank0_only: bool = False) -> dict[str, Any]:
        """The optimizer state as the unwrapped model's optimizer would write it."""
        opt = self.require()
        flat = [p for g in self.original_groups for p in g]
        index = {id(p): i for i, p in enumerate(flat)}
        mine = {
            index[id(param)]: {k: to_cpu(v) for k, v in state.items()}
            for param, state in opt.state.items()
            if self.state_owner.get(id(param)) == self.rank
        }
        merged = gather(mine, rank0_only, self.device)
        if merged is None:
            return {}
        groups, start = [], 0
        for i, original in enumerate(self.original_groups):
            settings = self._settings(i)
            groups.append({**settings, "params": list(range(start, start + len(original)))})
            start += len(original)
        return {"state": dict(sorted(merged.items())), "param_groups": groups}

    def load_settings(self, groups: list[dict[str, Any]]) -> None:
        """The saved groups' settings (learning rate, betas, ...); their parameters stay."""
        opt = self.require()
        if len(groups) != len(self.original_groups):
            raise AutopartError(
                f"optimizer state has {len(groups)} parameter groups, the optimizer has "
                f"{len(self.original_groups)}; it was saved for another optimizer"
            )
        for i, (saved, group) in enumerate(zip(groups, opt.param_groups, strict=True)):
            group.update({k: v for k, v in saved.items() if k != "params"})
            if i in self.fused_groups:
                group["fused"] = True

    def _settings(self, index: int) -> dict[str, Any]:
        """Group ``index``'s settings as the user's optimizer has them."""
        group = self.require().param_groups[index]
        settings = {k: v for k, v in group.items() if k != "params"}
        if index in self.fused_groups:
            settings["fused"] = None
        return settings

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        opt = self.require()
        self.load_settings(state_dict.get("param_groups", []))
        flat = [p for g in self.original_groups for p in g]
        opt.state.clear()
        for i, state in state_dict.get("state", {}).items():
            param = flat[int(i)]
            if id(param) in self.stepped_ids:
                opt.state[param] = self.placed_state(param, state)

    def shard(self, names: dict[int, str]) -> dict[str, Any]:
        """This rank's share of the optimizer state dict for a sharded checkpoint: the state of
        the parameters it steps, and every group's settings, each by parameter name."""
        opt = self.require()
        state = {
            names[id(param)]: dict(values)
            for param, values in opt.state.items()
            if id(param) in self.stepped_ids and id(param) in names
        }
        groups = [
            {**self._settings(i), "params": [names[id(p)] for p in original if id(p) in names]}
            for i, original in enumerate(self.original_groups)
        ]
        return {"state": state, "param_groups": groups}

    def load_shard(self, state_dict: dict[str, Any], names: dict[int, str]) -> None:
        """Load what `shard` wrote (any rank's, any plan's): settings, and the state of the
        parameters this rank steps, placed where it steps them."""
        opt = self.require()
        self.load_settings(state_dict.get("param_groups", []))
        saved = state_dict.get("state", {})
        for param in [p for g in self.original_groups for p in g]:
            name = names.get(id(param))
            if id(param) in self.stepped_ids and name in saved:
                opt.state[param] = self.placed_state(param, saved[name])

    def placed_state(self, param: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
        """Optimizer state for ``param`` where this rank's step keeps it: under
        offload="params" on the device, though the parameter itself is in host memory."""
        device = self.device if self.stage.offload == Offload.PARAMS else param.device
        return {
            k: v.to(device) if isinstance(v, torch.Tensor) and v.dim() else v
            for k, v in state.items()
        }


def _state_owners(plan: Plan, graph: Graph, trainable: dict[str, torch.Tensor]) -> dict[int, int]:
    """For each parameter (by id), the rank whose optimizer state speaks for it: the first
    holder, or under ZeRO the owner of its shard in the first stage that holds it."""
    owners: dict[int, int] = {}
    for stage in sorted(plan.stages, key=lambda s: min(s.ranks), reverse=True):
        shards = assign_shards(stage, graph.params) if stage.zero else {}
        for name in stage.params:
            if name in trainable:
                owners[id(trainable[name])] = shards.get(name, min(stage.ranks))
    return owners

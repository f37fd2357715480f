"""`autopart.Module`: one line turns a single-device model into a pipelined, replicated one.

The wrapper plans on its first call, because only then does it know the inputs: it captures
the model on this rank's batch, agrees on a plan with every rank (`runtime.plan_agreement`),
materializes a meta-built model's part (`runtime.pipeline.builder`), builds this rank's stage, and
cuts
the optimizer down to it (`runtime.data_parallel.local_optimizer`).  From then on the plan is the
only input
that says what runs where; the keywords live in a `Config` and are not read again.  Each call
runs the forward of every microbatch (`runtime.pipeline.runner`) and hands back outputs joined to
one
autograd node (`runtime.pipeline.bridge`), whose backward runs the pipeline's backward and sums each
gradient over the ranks holding its parameter (`runtime.data_parallel.holders`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopart.capture.with_loss import TARGET, WithLoss
from autopart.config import Config, Offload
from autopart.device import local_device, peak_bytes, without_autocast
from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.plan.plan import Plan
from autopart.reports.fidelity import PlanReport, build_report
from autopart.reports.memtrack import storage_bytes
from autopart.runtime import memory_report
from autopart.runtime.context import RankContext
from autopart.runtime.data_parallel.holders import Holders
from autopart.runtime.data_parallel.local_optimizer import LocalOptimizer
from autopart.runtime.data_parallel.zero import assign_shards
from autopart.runtime.pipeline import bridge
from autopart.runtime.pipeline.builder import StageBuilder, canonical_names
from autopart.runtime.pipeline.calls import Calls
from autopart.runtime.pipeline.signatures import CallPrecision, call_key
from autopart.runtime.plan_agreement import agree_on_plan
from autopart.runtime.stage.materialize import InitFn, has_meta
from autopart.runtime.stage.offload import ParamOffload
from autopart.runtime.transport.collectives import gather, to_cpu
from autopart.runtime.transport.distenv import ensure_initialized, job_group

log = logging.getLogger(__name__)

#: Builds the optimizer from the model's parameters (which may be on the meta device).
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Module(nn.Module):
    """A model partitioned into pipeline stages × data-parallel replicas over all ranks.

    The keywords are `autopart.config.Config`'s fields (see there); ``config=`` passes one
    whole.  ``optimizer`` may be a factory, called with the model's parameters."""

    # Kept in ``__dict__``, out of the module tree: only this rank's parameters are ours.
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    stage_module: nn.Module

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
        *,
        config: Config | None = None,
        stages: int | None = None,
        microbatches: int | None = None,
        split_points: list[str] | None = None,
        device_memory: int | str | None = None,
        plan: Plan | str | Path | None = None,
        precision: str | None = None,
        zero: bool | str | None = None,
        offload: bool | str | None = None,
        prefetch: int | None = None,
        schedule: str | None = None,
        cost: str | None = None,
        track_memory: bool | None = None,
        trace: str | Path | None = None,
        leaf_modules: list[str] | None = None,
        batch_dims: dict[str, int | None] | None = None,
        timeout: float | None = None,
        checkpoint: str | Path | None = None,
        init_fn: InitFn | None = None,
        loss_fn: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        keywords = dict(locals())
        for name in ("self", "model", "optimizer", "config", "__class__"):
            keywords.pop(name, None)
        if config is not None and any(v is not None for v in keywords.values()):
            raise AutopartError("pass either config= or keywords, not both")
        self.config = config or Config.from_keywords(**keywords)
        sourced = self.config.checkpoint is not None or self.config.init_fn is not None
        if sourced and not has_meta(model):
            raise AutopartError(
                "checkpoint= and init_fn= give values to a model built on the meta device, "
                "and this model has none there; load a real model's weights with "
                "load_state_dict() before wrapping it"
            )
        if self.config.loss_fn is not None:
            model = WithLoss(model, self.config.loss_fn)
        if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(list(model.parameters()))  # over meta parameters is fine
        ensure_initialized(self.config.timeout)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = local_device()
        # Kept out of the module tree: only this rank's parameters are reported as ours.
        self.__dict__["model"] = model
        self.__dict__["optimizer"] = optimizer
        groups = [list(g["params"]) for g in optimizer.param_groups] if optimizer else []
        self._stages = StageBuilder(model, optimizer, groups, self.config, self.device)
        self.plan: Plan | None = None
        self.graph: Graph | None = None
        self.offload: ParamOffload | None = None
        self._sync = True

    # -- setup on the first call -------------------------------------------------------------

    def _setup(
        self, key: str, args: tuple, kwargs: dict[str, Any], precision: CallPrecision
    ) -> None:
        config = self.config
        if precision.from_caller and "precision" not in config.given:
            # Planned for what the calls will run: the caller's autocast.  The option stays
            # as given, for the calls made outside it.
            config = dataclasses.replace(config, precision=precision.name())
        with without_autocast(self.device):
            self._plan(args, kwargs, config)
        self._build(key, precision)

    def _plan(self, args: tuple, kwargs: dict[str, Any], config: Config) -> None:
        self.graph = self._stages.capture(args, kwargs)
        self._stages.agree_on_dims(self.graph)
        self.plan = agree_on_plan(
            self.graph,
            config,
            self.optimizer,
            bridge.local_batch(self._stages.input_dims, bridge.by_source(args, kwargs)),
            self.device,
        )
        self.plan.validate_for(self.graph, self.world)

    def _build(self, key: str, precision: CallPrecision) -> None:
        assert self.graph is not None and self.plan is not None
        ctx = RankContext(self.rank, self.world, self.device, self.plan)
        stage = ctx.stage
        initialized = self._stages.materialize(self.graph, self.plan, first=True)
        self.schedule = self._stages.build(self.graph, self.plan, self.training, precision)
        self.offload = self.schedule.offload
        self.__dict__["stage_module"] = self.schedule.module
        updated = self._stages.add_state_update(self.schedule, stage)
        self.names = canonical_names(self.model, self.graph)
        trainable: dict[str, torch.Tensor] = {
            canonical: param
            for name, param in self.model.named_parameters(remove_duplicate=False)
            if (canonical := self.names.get(name)) is not None and param.requires_grad
        }
        shards = assign_shards(stage, self.graph.params) if stage.zero else None
        self.holders = Holders(ctx, trainable, shards, updated)
        if initialized:  # random values: every holder takes the first holder's, as DDP does
            self.holders.broadcast_from_first(self.local_tensors(initialized))
        self.local_optimizer = LocalOptimizer(
            ctx,
            self.optimizer,
            self._stages.original_groups,
            self.graph,
            self.holders,
            trainable,
            self.offload,
        )
        self._calls = Calls(
            ctx,
            self._stages,
            self.holders,
            (key, self.schedule),
            lambda: self._sync,
            self._on_device,
            self.config.track_memory,
            self.config.trace,
        )
        log.info("rank %d runs stage %d of %d", self.rank, stage.index, self.plan.num_stages)

    def local_tensors(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """This rank's real parameters and buffers among ``names``, by canonical name."""
        found = {}
        for name, tensor in (
            *self.model.named_parameters(remove_duplicate=False),
            *self.model.named_buffers(remove_duplicate=False),
        ):
            canonical = self.names.get(name)
            if canonical in names and not tensor.is_meta:
                found[canonical] = tensor
        return found

    # -- the call ----------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.config.loss_fn is not None and TARGET not in kwargs:
            raise AutopartError(
                f"this model was wrapped with loss_fn=, so it is called as model(..., "
                f"{TARGET}=y) and returns loss_fn(output, y); pass {TARGET}="
            )
        precision = CallPrecision.of_call(self.config.precision, self.device)
        key = call_key(self.training, args, kwargs, precision)
        if self.plan is None:
            self._setup(key, args, kwargs, precision)
        return self._calls.run(key, args, kwargs, self.training, precision)

    # -- DDP-style methods -------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the next synced backward sums everything."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        self.model.train(mode)
        if "stage_module" in self.__dict__:
            self.stage_module.train(mode)
        return self

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate=True):
        self._require_setup("named_parameters")
        for name, param in self.model.named_parameters(
            prefix=prefix, remove_duplicate=remove_duplicate
        ):
            if id(param) in self.local_optimizer.local_ids:
                yield name, param

    def parameters(self, recurse: bool = True):
        for _, param in self.named_parameters():
            yield param

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the norm of the full gradient over all stages and ranks, and return it."""
        self._require_setup("clip_grad_norm_")
        total = self.holders.grad_norm(norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(coef.to(param.grad.device))
        return total

    def state_dict(  # type: ignore[override]
        self, *args, rank0_only: bool = False, **kwargs
    ) -> dict[str, torch.Tensor]:
        """The full model state dict, gathered from the ranks that train each part: on every
        rank (each then holds the whole model), or with ``rank0_only`` streamed to rank 0 one
        rank's part at a time (`runtime.transport.collectives`), the others getting ``{}``."""
        self._require_setup("state_dict")
        keys = self.model.state_dict(keep_vars=True)
        mine = {
            key: to_cpu(value)
            for key, value in keys.items()
            if self.holders.owner(self.names.get(key, key)) == self.rank
        }
        merged = gather(mine, rank0_only, self.device)
        if merged is None:
            return {}
        return {key: merged[key] for key in keys}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a full state dict into this rank's tensors.  Of a meta-built model, the other
        stages' tensors stay on meta: copying into them is the no-op torch warns about."""
        if assign and self._stages.meta_built:
            raise AutopartError(
                "load_state_dict(assign=True) would put every stage's tensors on this rank and "
                "cut them off from the stage that trains them; load without assign"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*to a meta parameter in the current model")
            return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def optimizer_state_dict(self, rank0_only: bool = False) -> dict[str, Any]:
        """The optimizer state as the unwrapped model's optimizer would write it."""
        self._require_setup("optimizer_state_dict")
        return self.local_optimizer.state_dict(rank0_only)

    def load_optimizer_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._require_setup("load_optimizer_state_dict")
        self.local_optimizer.load_state_dict(state_dict)

    # -- memory ------------------------------------------------------------------------------

    def _resident(self) -> dict[str, list[torch.Tensor]]:
        assert self.plan is not None
        on_host = self.plan.stage_of_rank(self.rank).offload == Offload.PARAMS_OPTIMIZER
        return memory_report.resident(
            self.stage_module, self.parameters(), self.offload, self.optimizer, on_host
        )

    def _on_device(self) -> list[torch.Tensor]:
        return memory_report.on_device(self._resident())

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds now by category, and the peaks of the last tracked step.

        ``parameters`` (with buffers), ``gradients`` and ``optimizer_state`` are what is
        resident now.  With ``track_memory=True``: ``forward_peak`` is the peak of live tensor
        bytes during the last forward, ``activations`` what that forward left alive for
        backward (``forward_end`` less the resident state), and ``backward_peak`` the bytes at
        the end of forward plus the most that backward allocated on top (an upper bound: it
        does not subtract the activations backward frees as it goes).

        With offload, ``host_*`` count what lives in host memory, and ``offload_peak`` is the
        peak of parameter copies on the device since the last forward began.
        """
        self._require_setup("memory_report")
        report = {kind: storage_bytes(tensors) for kind, tensors in self._resident().items()}
        if self.offload is not None:
            report["offload_peak"] = self.offload.peak
        report.update(self._calls.memory)
        return report

    def plan_report(self, *, show: bool = True) -> PlanReport:
        """The plan's predicted forward, backward, allreduce and peak memory per stage, and its
        step time, beside what the runtime measured in training steps 2 to 4
        (`autopart.reports.fidelity`).

        A collective: every rank calls it (their measurements are gathered), and rank 0 prints
        it unless ``show=False``.  Peak memory is measured on CUDA, and on CPU with
        ``track_memory=True``.
        """
        self._require_setup("plan_report")
        peak = peak_bytes(self.device)
        if peak is None and self._calls.memory:
            peak = max(self._calls.memory.get(k, 0) for k in ("forward_peak", "backward_peak"))
        events = self._calls.timed_events  # set once the last timed call is over
        steps = self._calls.step_seconds if events else []
        mine = {"events": events, "steps": steps, "peak": peak}
        every: list[Any] = [mine]
        if self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine, group=job_group())
        assert self.plan is not None
        report = build_report(self.plan, every)
        if show and self.rank == 0:
            print(report)
        return report

    def _require_setup(self, what: str) -> None:
        if self.plan is None:
            raise AutopartError(
                f"{what}() needs the partition, which is made on the first forward call; "
                "run one forward pass first"
            )

"""This rank's stage, from model to runnable schedule, for every call signature.

`StageBuilder` captures the model (on meta when it was built there), materializes this rank's
tensors of a meta-built model (`runtime.stage.materialize`), and builds the stage module of a graph
under a plan: on the device, or with its parameters in host memory where the plan offloads the
stage, with the buffers shared back into the user's model and the once-per-call buffer updates
attached.  It reads nothing but the plan for what to build.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopart.capture import capture
from autopart.capture.batch_dims import argument_names, for_call
from autopart.config import Config, Offload
from autopart.device import CANONICAL
from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.plan.plan import Plan, StagePlan
from autopart.runtime.pipeline.runner import StageRunner
from autopart.runtime.pipeline.signatures import CallPrecision
from autopart.runtime.stage.graph_cut import StageIO, build_stage_module, stage_ios, state_updates
from autopart.runtime.stage.materialize import (
    device_view,
    has_meta,
    materialize,
    needed_names,
    on_meta,
    rebind,
    rebind_optimizer,
)
from autopart.runtime.stage.offload import HostCasts, ParamOffload
from autopart.runtime.transport.distenv import job_group, new_group

log = logging.getLogger(__name__)


class StageBuilder:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        original_groups: list[list[torch.Tensor]],
        config: Config,
        device: torch.device,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.original_groups = original_groups
        self.config = config
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        #: Decided once: every rank must take the same collective path, whatever it holds now.
        self.meta_built = has_meta(model)
        #: Messages to higher ranks get a process group of their own (`runtime.transport.messages`).
        self.upward: dist.ProcessGroup | None = None
        #: Tensors of the stage modules built so far: the ones this rank keeps on its device.
        self.held: set[int] = set()
        #: Each input's batch dimension, by source (``args[0]``), as the first capture found
        #: it: later captures see the model through an empty view and cannot run it.
        self.input_dims: dict[str, int | None] = {}
        #: Host casts of offloaded parameters, shared by every call signature's stage.
        self.casts = HostCasts()

    def capture(self, args: tuple, kwargs: dict[str, Any]) -> Graph:
        devices = {t.device for t in (*self.model.parameters(), *self.model.buffers())}
        leaves = self.config.leaf_modules or ()
        dims = {**self.input_dims, **(self.config.batch_dims or {})}
        if self.input_dims:  # a later call: its inputs may be fewer than the first call's
            dims = for_call(dims, self.model, args, kwargs)
        # Export needs one device: all on meta for a model wholly or partly there, the CPU
        # for a later call signature (this rank's stage is on its device already).
        view = torch.device("meta") if has_meta(self.model) else CANONICAL
        if view.type != "meta" and len(devices) == 1:
            graph = capture(self.model, args, kwargs, leaf_modules=leaves, batch_dims=dims or None)
        else:  # the view's values are copies, some uninitialized: not run to find dimensions
            call = on_meta((args, kwargs)) if view.type == "meta" else (args, kwargs)
            with device_view(self.model, view) as originals:
                graph = capture(
                    self.model, *call, leaf_modules=leaves, batch_dims=dims or None, run_model=False
                )
            rebind([graph.fx_module], originals)
        names = dict(argument_names(self.model, args, kwargs))
        for name, source in graph.input_sources.items():
            spec = graph.node(name).outputs
            dim = spec[0].batch_dim if spec else None
            self.input_dims.setdefault(source, dim)
            self.input_dims.setdefault(names.get(source, source), dim)
        if graph.static_batch is not None:
            raise AutopartError(
                "the model fixes its batch size (it could only be captured at one batch size), "
                "so it cannot be cut into microbatches; remove the hard-coded batch size, or, if "
                "the batch is not dimension 0 of every input (a sequence-first model built on "
                "meta), say where it is: batch_dims={'src': 1}"
            )
        return graph

    def agree_on_dims(self, graph: Graph) -> None:
        """Every rank found the same batch dimensions (each ran the check on its own rows);
        otherwise the ranks would cut different tensors, so every rank stops, naming both."""
        if self.world == 1:
            return
        mine = sorted(
            (source, graph.node(name).outputs[0].batch_dim if graph.node(name).outputs else None)
            for name, source in graph.input_sources.items()
        )
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine, group=job_group())
        if any(found != every[0] for found in every):
            differ = next(r for r, found in enumerate(every) if found != every[0])
            raise AutopartError(
                f"the ranks found different batch dimensions for the model's inputs (rank 0: "
                f"{every[0]}; rank {differ}: {every[differ]}), each from its own batch; say "
                "which with batch_dims={'name': dim}"
            )

    def materialize(self, graph: Graph, plan: Plan, first: bool) -> tuple[str, ...]:
        """Real tensors for this rank's part of a meta-built model; returns the names whose
        values came from the initializer.  Only the first capture materializes parameters;
        a later one has only its own constants to fill."""
        if not self.meta_built:
            return ()
        stage = plan.stage_of_rank(self.rank)
        where = torch.device("cpu") if stage.offload != Offload.NONE else self.device
        failure: AutopartError | None = None
        try:
            done = materialize(
                self.model,
                graph,
                needed_names(graph, plan, self.rank),
                where,
                checkpoint=self.config.checkpoint if first else None,
                init_fn=self.config.init_fn,
                initialize=first,
            )
        except AutopartError as err:  # one stage's problem: every rank must stop with it
            failure = err
        raise_on_every_rank(failure, self.world)
        if self.optimizer is not None:
            rebind_optimizer(self.optimizer, self.original_groups, done.replaced)
        return done.initialized

    def build(
        self, graph: Graph, plan: Plan, training: bool, precision: CallPrecision
    ) -> StageRunner:
        """This rank's stage of ``graph`` under ``plan``, ready to run at ``precision``."""
        if self.upward is None and self.world > 1:
            self.upward = new_group(list(range(self.world)))
        ios = stage_ios(graph, plan)
        stage = plan.stage_of_rank(self.rank)
        module = build_stage_module(graph, ios[stage.index], self.device)
        autocast = precision.autocast
        offload = None
        if stage.offload != Offload.NONE:
            if self.world > 1 and "gloo" not in dist.get_backend():
                raise AutopartError(
                    f"stage {stage.index} offloads its parameters, and their gradients are "
                    f"summed in host memory, which backend {dist.get_backend()!r} cannot do; "
                    "initialize the process group with backend='cpu:gloo,cuda:nccl' (or let "
                    "autopart initialize it)"
                )
            # Parameters already in host memory (an earlier call signature's) stay there.
            offload = ParamOffload(module, self.device, stage.prefetch, autocast, self.casts)
            _move_buffers(module, self.device)
        else:
            module.to(self.device)
        _share_buffers(module, self.model)
        self.held |= {id(t) for t in (*module.parameters(), *module.buffers())}
        _release_others(self.model, self.held)
        module.train(training)
        return StageRunner(
            graph,
            plan,
            ios,
            module,
            self.rank,
            self.device,
            autocast,
            offload,
            self.upward,
            native_outputs=precision.from_caller,
        )

    def add_state_update(self, schedule: StageRunner, stage: StagePlan) -> dict[str, list]:
        """Give ``schedule`` its stage's once-per-call buffer updates; returns, for each buffer
        they update, the ranks of the stages that update it (they hold its value)."""
        updates = state_updates(schedule.graph, schedule.plan)
        mine = updates.get(stage.index)
        if mine:
            io = StageIO(stage.index, mine, (), ())
            update = build_stage_module(schedule.graph, io, self.device).to(self.device)
            self.held |= {id(t) for t in (*update.parameters(), *update.buffers())}
            _share_buffers(update, self.model)
            schedule.state_update = update
        ranks: dict[str, list] = {}
        for index, names in updates.items():
            for name in names:
                for buffer in schedule.graph.node(name).params:
                    ranks.setdefault(buffer, []).extend(schedule.plan.stages[index].ranks)
        return ranks


def canonical_names(model: nn.Module, graph: Graph) -> dict[str, str]:
    """Every parameter and buffer name of the model, mapped to the graph's canonical name."""
    names = {}
    for canonical, spec in graph.params.items():
        names[canonical] = canonical
        for alias in spec.aliases:
            names[alias] = canonical
    for name, _ in model.named_parameters(remove_duplicate=False):
        names.setdefault(name, name)
    for name, _ in model.named_buffers(remove_duplicate=False):
        names.setdefault(name, name)
    return names


def raise_on_every_rank(failure: AutopartError | None, world: int) -> None:
    """Raise ``failure`` here, and on every other rank the first rank's failure, so that a
    problem one stage has stops all ranks instead of leaving them to time out."""
    if world > 1:
        failures: list[Any] = [None] * world
        dist.all_gather_object(
            failures, None if failure is None else str(failure), group=job_group()
        )
        first = next(((r, f) for r, f in enumerate(failures) if f is not None), None)
        if first is not None and failure is None:
            raise AutopartError(f"rank {first[0]} failed: {first[1]}")
    if failure is not None:
        raise failure


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    """Buffers go to the device; offloaded parameters stay where `ParamOffload` put them."""
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.to(device)


def _release_others(model: nn.Module, held: set[int]) -> None:
    """Move the model's tensors that this rank's stage does not hold off any accelerator.

    A user who moved the whole model to the GPU before wrapping it (as with DDP) would
    otherwise keep every other stage's parameters there, and an offloaded stage's would stay
    twice; the plan's memory counts neither.  They go to host memory, where the values stay
    readable; a meta-built model's stay on meta.  ``held``: the ids of the tensors of every
    stage module this rank built (one per call signature)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in held or tensor.device.type in ("cpu", "meta"):
            continue
        tensor.data = tensor.data.cpu()
        if tensor.grad is not None:
            tensor.grad = tensor.grad.cpu()


def _share_buffers(stage: nn.Module, model: nn.Module) -> None:
    """Point the user's model at the stage's buffers.  Moving a module to a device replaces
    its buffers (parameters keep their objects), so without this the user's model would keep
    the CPU copies: ``state_dict()`` would return the initial BatchNorm statistics and
    ``load_state_dict()`` would not reach the stage."""
    owned = dict(model.named_buffers(remove_duplicate=False))
    for name, buffer in stage.named_buffers(remove_duplicate=False):
        if name in owned and owned[name] is not buffer:
            path, _, leaf = name.rpartition(".")
            model.get_submodule(path)._buffers[leaf] = buffer

"""`autopart.Module`: one line turns a single-device model into a pipelined, replicated one.

The wrapper plans on its first call, because only then does it know the inputs: it captures
the model on this rank's batch, plans on rank 0 for the global batch and broadcasts the plan,
then builds this rank's stage.  Every rank keeps the user's model object (its parameters are
the ones the stages use), but only the parameters of its own stage are trained here; the
optimizer is rewritten in place to hold exactly those.

Autograd: the forward pass of every microbatch runs inside ``forward``; the outputs handed back
are joined to one custom autograd node, whose backward runs the pipeline's backward for every
microbatch and then sums gradients over the ranks holding each parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

from autopart.capture import capture
from autopart.cost import (
    AnalyticCostModel,
    DeviceSpec,
    get_device_spec,
    local_device_spec,
    parse_bytes,
)
from autopart.cost.bandwidth import measure_links
from autopart.cost.probe import host_memory_bytes, measure_host_link
from autopart.errors import AutopartError
from autopart.ir import Graph
from autopart.memtrack import LiveBytes, storage_bytes
from autopart.plan.plan import Plan, StagePlan, check_zero_option, offload_option
from autopart.plan.planner import PlanOptions, make_plan
from autopart.planning import compute_dtype
from autopart.runtime import routing
from autopart.runtime.distenv import ensure_initialized, local_device
from autopart.runtime.gradients import Holders
from autopart.runtime.layout import BatchLayout
from autopart.runtime.materialize import (
    InitFn,
    has_meta,
    materialize,
    meta_view,
    needed_names,
    on_meta,
    rebind,
    rebind_optimizer,
)
from autopart.runtime.offload import ParamOffload, StepOnDevice
from autopart.runtime.schedule import GPipeSchedule, StepState
from autopart.runtime.signatures import call_key, derive_plan, key_number
from autopart.runtime.stage_module import StageIO, build_stage_module, stage_ios, state_updates
from autopart.runtime.state_gather import gather, to_cpu
from autopart.runtime.zero import ShardedStep, assign_shards

log = logging.getLogger(__name__)

#: Builds the optimizer from the model's parameters (which may be on the meta device).
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def optimizer_kind(optimizer: torch.optim.Optimizer | None) -> str:
    """The planner's name for how much state ``optimizer`` keeps per parameter."""
    if optimizer is None:
        return "none"
    if isinstance(optimizer, torch.optim.SGD):
        momentum = max(g.get("momentum", 0.0) for g in optimizer.param_groups)
        return "sgd-momentum" if momentum else "sgd"
    return "adam"  # Adam, AdamW and most others keep two moments; plan for that much


class Module(nn.Module):
    """A model partitioned into pipeline stages × data-parallel replicas over all ranks."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
        *,
        stages: int | None = None,
        microbatches: int | None = None,
        split_points: list[str] | None = None,
        device_memory: int | str | None = None,
        plan: Plan | str | Path | None = None,
        precision: str | None = None,
        zero: bool | str = False,
        offload: bool | str = False,
        prefetch: int = 1,
        track_memory: bool = False,
        timeout: float | None = None,
        checkpoint: str | Path | None = None,
        init_fn: InitFn | None = None,
    ) -> None:
        super().__init__()
        if (checkpoint is not None or init_fn is not None) and not has_meta(model):
            raise AutopartError(
                "checkpoint= and init_fn= give values to a model built on the meta device, "
                "and this model has none there; load a real model's weights with "
                "load_state_dict() before wrapping it"
            )
        self._sources = (str(checkpoint) if checkpoint is not None else None, init_fn)
        self._meta_built = has_meta(model)
        if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(list(model.parameters()))  # over meta parameters is fine
        self._offload = offload_option(offload)
        if prefetch < 0:
            raise AutopartError(f"prefetch must be 0 or more parameters ahead, got {prefetch}")
        self._prefetch = prefetch
        self.offload: ParamOffload | None = None
        self._track_memory = track_memory
        self._memory: dict[str, int] = {}
        check_zero_option(zero)
        self._zero = zero
        self._autocast = _autocast_dtype(precision)
        ensure_initialized(timeout)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = local_device()
        # Kept out of the module tree: only this rank's parameters are reported as ours.
        self.__dict__["model"] = model
        self.__dict__["optimizer"] = optimizer
        self._options = dict(
            stages=stages,
            microbatches=microbatches,
            split_points=tuple(split_points) if split_points else None,
            device_memory=device_memory,
        )
        self._given_plan = plan
        self.plan: Plan | None = None
        self.graph: Graph | None = None
        self._sync = True
        #: Whether the gradients hold a sum over holders that no backward has added to yet.
        self._grads_synced = False
        self._anchor = torch.zeros((), requires_grad=True)
        self._original_groups = (
            [list(g["params"]) for g in optimizer.param_groups] if optimizer else []
        )

    # -- setup on the first call -------------------------------------------------------------

    def _capture(self, args: tuple, kwargs: dict[str, Any]) -> Graph:
        if has_meta(self.model):  # wholly or partly on meta: capture it all there
            with meta_view(self.model) as originals:
                graph = capture(self.model, *on_meta((args, kwargs)))
            rebind([graph.fx_module], originals)
        else:
            graph = capture(self.model, args, kwargs)
        if graph.static_batch is not None:
            raise AutopartError(
                "the model fixes its batch size (it could only be captured at one batch size), "
                "so it cannot be cut into microbatches; remove the hard-coded batch size"
            )
        return graph

    def _add_signature(self, key: str, args: tuple, kwargs: dict[str, Any]) -> GPipeSchedule:
        """A call unlike every earlier one: its own graph, on the first call's placement."""
        graph = self._capture(args, kwargs)
        plan = derive_plan(self.plan, graph)
        plan.validate_for(graph, self.world, idle_stages=True)
        self._materialize(graph, plan, first=False)  # the constants of its own capture
        schedule = self._build_schedule(graph, plan)
        self._add_state_update(schedule, plan.stage_of_rank(self.rank))
        self._schedules[key] = schedule
        log.info(
            "rank %d captured another call signature (%d so far)", self.rank, len(self._schedules)
        )
        return schedule

    def _add_state_update(self, schedule: GPipeSchedule, stage: StagePlan) -> dict[str, list]:
        """Give ``schedule`` its stage's once-per-call buffer updates; returns, for each buffer
        they update, the ranks of the stages that update it (they hold its value)."""
        updates = state_updates(schedule.graph, schedule.plan)
        mine = updates.get(stage.index)
        if mine:
            io = StageIO(stage.index, mine, (), ())
            schedule.state_update = build_stage_module(schedule.graph, io, self.device).to(
                self.device
            )
            _share_buffers(schedule.state_update, self.model)
        ranks: dict[str, list] = {}
        for index, names in updates.items():
            for name in names:
                for buffer in schedule.graph.node(name).params:
                    ranks.setdefault(buffer, []).extend(schedule.plan.stages[index].ranks)
        return ranks

    def _build_schedule(self, graph: Graph, plan: Plan) -> GPipeSchedule:
        """This rank's stage of ``graph`` under ``plan``, on the device (its parameters in
        host memory where the stage offloads), ready to run."""
        ios = stage_ios(graph, plan)
        stage = plan.stage_of_rank(self.rank)
        module = build_stage_module(graph, ios[stage.index], self.device)
        offload = None
        if stage.offload != "none":
            if self.world > 1 and "gloo" not in dist.get_backend():
                raise AutopartError(
                    f"stage {stage.index} offloads its parameters, and their gradients are "
                    f"summed in host memory, which backend {dist.get_backend()!r} cannot do; "
                    "initialize the process group with backend='cpu:gloo,cuda:nccl' (or let "
                    "autopart initialize it)"
                )
            # Parameters already in host memory (an earlier call signature's) stay there.
            offload = ParamOffload(module, self.device, self._prefetch)
            _move_buffers(module, self.device)
        else:
            module.to(self.device)
        _share_buffers(module, self.model)
        module.train(self.training)
        return GPipeSchedule(
            graph, plan, ios, module, self.rank, self.device, self._autocast, offload, self._upward
        )

    def _setup(self, key: str, args: tuple, kwargs: dict[str, Any]) -> None:
        self.graph = self._capture(args, kwargs)
        self.plan = self._agree_on_plan(self._local_batch(args, kwargs))
        self.plan.validate_for(self.graph, self.world)
        stage = self.plan.stage_of_rank(self.rank)
        initialized = self._materialize(self.graph, self.plan, first=True)
        # Messages to higher ranks get a process group of their own (`runtime.messages`).
        self._upward = dist.new_group(list(range(self.world))) if self.world > 1 else None
        self.schedule = self._build_schedule(self.graph, self.plan)
        self.offload = self.schedule.offload
        self.__dict__["stage_module"] = self.schedule.module
        self._schedules = {key: self.schedule}
        updated = self._add_state_update(self.schedule, stage)
        self._names = _canonical_names(self.model, self.graph)
        trainable = {
            canonical: param
            for name, param in self.model.named_parameters(remove_duplicate=False)
            if (canonical := self._names.get(name)) is not None and param.requires_grad
        }
        shards = assign_shards(stage, self.graph.params) if self._sharded(stage) else None
        self.holders = Holders(self.plan, self.rank, trainable, self.device, shards, updated)
        if initialized:  # random values: every holder takes the first holder's, as DDP does
            self.holders.broadcast_from_first(self._local_tensors(initialized))
        self._local_ids = {id(trainable[n]) for n in self.holders.local}
        self._state_owner = self._optimizer_state_owners(trainable)
        self._stepped_ids = self._local_ids
        if shards is not None and self.optimizer is not None:
            self._stepped_ids = {
                id(trainable[n]) for n in self.holders.local if shards.get(n) == self.rank
            }
        self._restrict_optimizer()
        if stage.offload == "params" and self.optimizer is not None:
            # First: its post-step hook brings the parameters home before ZeRO shares them.
            stepped = [p for p in self.offload.parameters() if id(p) in self._stepped_ids]
            StepOnDevice(self.optimizer, stepped, self.device)
        if shards is not None and self.optimizer is not None:
            step = ShardedStep(
                shards,
                {n: trainable[n] for n in self.holders.local},
                self.holders.groups.get(tuple(stage.ranks)),
            )
            self.optimizer.register_step_post_hook(lambda *_: step.after_step())
        log.info("rank %d runs stage %d of %d", self.rank, stage.index, self.plan.num_stages)

    def _materialize(self, graph: Graph, plan: Plan, first: bool) -> tuple[str, ...]:
        """Real tensors for this rank's part of a meta-device model (`runtime.materialize`);
        returns the names whose values came from the initializer.  Only the first capture
        materializes parameters; a later one has only its own constants to fill."""
        if not self._meta_built:  # the same on every rank, unlike what each holds by now
            return ()
        checkpoint, init_fn = self._sources
        stage = plan.stage_of_rank(self.rank)
        where = torch.device("cpu") if stage.offload != "none" else self.device
        failure: AutopartError | None = None
        try:
            done = materialize(
                self.model,
                graph,
                needed_names(graph, plan, self.rank),
                where,
                checkpoint=checkpoint if first else None,
                init_fn=init_fn,
                initialize=first,
            )
        except AutopartError as err:  # one stage's problem: every rank must stop with it
            failure = err
        _raise_on_every_rank(failure, self.world)
        if self.optimizer is not None:
            rebind_optimizer(self.optimizer, self._original_groups, done.replaced)
        return done.initialized

    def _local_tensors(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers among ``names``, by canonical name."""
        found = {}
        for name, tensor in (
            *self.model.named_parameters(remove_duplicate=False),
            *self.model.named_buffers(remove_duplicate=False),
        ):
            canonical = self._names.get(name)
            if canonical in names and not tensor.is_meta:
                found[canonical] = tensor
        return found

    def _local_batch(self, args, kwargs) -> int:
        first = next(
            (t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None
        )
        if first is None or first.dim() == 0:
            raise AutopartError("call the model with at least one tensor whose dim 0 is the batch")
        return int(first.shape[0])

    def _agree_on_plan(self, local_batch: int) -> Plan:
        if self._given_plan is not None:
            given = self._given_plan
            plan = given if isinstance(given, Plan) else Plan.load(given)
            self._check_same_plan(plan)
            return plan
        sizes = [size for (size,) in _all_gather_ints([local_batch], self.device)]
        spec = self._measured_spec()
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = self._make_plan(sum(sizes), spec).to_json()
            except AutopartError as err:
                box[0] = err
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], AutopartError):
            raise type(box[0])(str(box[0]))
        return Plan.from_dict(json.loads(box[0]))

    def _check_same_plan(self, plan: Plan) -> None:
        """Every rank must run the same plan; a different one would hang, not fail."""
        if self.world == 1:
            return
        digests = [None] * self.world
        dist.all_gather_object(digests, hashlib.sha256(plan.to_json().encode()).hexdigest())
        if len(set(digests)) > 1:
            raise AutopartError(
                f"the ranks were given different plans ({_agreeing(digests)}); make the plan "
                "once and pass the same file to all"
            )

    def _measured_spec(self) -> DeviceSpec:
        """The device's spec with this job's own links measured (a collective, all ranks)."""
        memory = self._options["device_memory"]
        if self.device.type == "cuda":
            spec = local_device_spec(self.device)
            if memory is not None:
                spec = dataclasses.replace(spec, memory_bytes=parse_bytes(memory))
        else:
            spec = get_device_spec("cpu", memory_bytes=memory)
        if self.world < 2:
            return spec
        links = measure_links(sizes=(1 << 16, 1 << 20), iters=2)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        return links.apply(spec, cross_node=local_world < self.world)

    def _make_plan(self, global_batch: int, spec: DeviceSpec) -> Plan:
        if self._offload != "none":  # only the planning rank needs the host link's speed
            spec = dataclasses.replace(spec, host_link_bandwidth=measure_host_link(self.device))
        options = PlanOptions(
            devices=self.world,
            global_batch=global_batch,
            optimizer=optimizer_kind(self.optimizer),
            stages=self._options["stages"],
            microbatches=self._options["microbatches"],
            split_points=self._options["split_points"],
            zero=self._zero,
            offload=self._offload,
            prefetch=self._prefetch,
            host_memory=host_memory_bytes() if self._offload != "none" else None,
        )
        dtype = str(self._autocast) if self._autocast is not None else compute_dtype(self.graph)
        return make_plan(self.graph, AnalyticCostModel(spec, dtype=dtype), options)

    def _sharded(self, stage: StagePlan) -> bool:
        """ZeRO where the plan chose it, or everywhere when the caller asked for it."""
        return stage.zero or self._zero is True

    def _optimizer_state_owners(self, trainable: dict[str, torch.Tensor]) -> dict[int, int]:
        """For each parameter (by id), the rank whose optimizer state speaks for it: the first
        holder, or under ZeRO the owner of its shard in the first stage that holds it."""
        owners: dict[int, int] = {}
        for stage in sorted(self.plan.stages, key=lambda s: min(s.ranks), reverse=True):
            shards = assign_shards(stage, self.graph.params) if self._sharded(stage) else {}
            for name in stage.params:
                if name in trainable:
                    owners[id(trainable[name])] = shards.get(name, min(stage.ranks))
        return owners

    def _restrict_optimizer(self) -> None:
        if self.optimizer is None:
            return
        keep = self._stepped_ids
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in keep]
        for param in list(self.optimizer.state):
            if id(param) not in keep:
                del self.optimizer.state[param]

    # -- the call ----------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key = call_key(self.training, args, kwargs)
        if self.plan is None:
            self._setup(key, args, kwargs)
        local_batch = self._local_batch(args, kwargs)
        sizes = [local_batch]
        if self.world > 1:  # one collective agrees on the batch layout and the call
            every = _all_gather_ints([local_batch, key_number(key)], self.device)
            sizes = [size for size, _ in every]
            keys = [number for _, number in every]
            if len(set(keys)) > 1:
                raise AutopartError(
                    f"the ranks called the model with different arguments or modes "
                    f"({_agreeing(keys)}); every rank must make the same kind of call"
                )
        schedule = self._schedules.get(key) or self._add_signature(key, args, kwargs)
        local = self._route_inputs(schedule.graph, args, kwargs)
        layout = BatchLayout.of(sizes, self._microbatches_for(sum(sizes)))
        grad = torch.is_grad_enabled()
        if schedule.offload is not None:
            schedule.offload.reset_peak()
        tracker = (
            LiveBytes(_flat(self._on_device())) if self._track_memory else contextlib.nullcontext()
        )
        with _comm_errors(self.rank, "forward"), tracker:
            state = schedule.forward(local, layout, grad)
            outputs = schedule.gather_outputs(state)
        if self._track_memory:
            resident = storage_bytes(_flat(self._on_device()))
            self._memory = {
                "forward_peak": tracker.peak,
                "forward_end": tracker.current,
                "activations": max(tracker.current - resident, 0),
            }
        return self._package(schedule, outputs, state if grad else None)

    def _microbatches_for(self, rows: int) -> int:
        """The plan's microbatch count, or fewer for a global batch too small to give every
        replica of every stage rows in each microbatch (an uneven last batch)."""
        widest = max(stage.replicas for stage in self.plan.stages)
        if rows < widest:
            raise AutopartError(
                f"this call's global batch has {rows} rows, fewer than the {widest} replicas of "
                "a stage, so some replica would get none; use at least that many rows over all "
                "ranks (drop_last=True drops such a last batch)"
            )
        return min(self.plan.microbatches, rows // widest)

    def _resident(self) -> dict[str, list[torch.Tensor]]:
        """This rank's resident tensors by category; what offload keeps in host memory is
        under ``host_parameters``, ``host_gradients`` and ``host_optimizer_state``."""
        offloaded = {id(p) for p in self.offload.parameters()} if self.offload else set()
        state_on_host = self.plan.stage_of_rank(self.rank).offload == "params+optimizer"
        found: dict[str, list[torch.Tensor]] = {
            "parameters": list(self.stage_module.buffers()),
            "gradients": [],
            "optimizer_state": [],
        }
        if self.offload is not None:
            found.update(host_parameters=[], host_gradients=[], host_optimizer_state=[])
        for param in self.parameters():
            where = "host_" if id(param) in offloaded else ""
            found[where + "parameters"].append(param)
            if param.grad is not None:
                found[where + "gradients"].append(param.grad)
        state = self.optimizer.state.values() if self.optimizer is not None else []
        found["host_optimizer_state" if state_on_host else "optimizer_state"] += [
            v for st in state for v in st.values() if isinstance(v, torch.Tensor)
        ]
        return found

    def _on_device(self) -> dict[str, list[torch.Tensor]]:
        return {k: v for k, v in self._resident().items() if not k.startswith("host_")}

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
        if self._memory:
            report.update(self._memory)
        return report

    def _route_inputs(self, graph: Graph, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        given = {
            ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:]): value
            for path, value in pytree.tree_flatten_with_path((args, kwargs))[0]
        }
        local = {}
        for name, source in graph.input_sources.items():
            if source not in given and any(key.startswith(source) for key in given):
                raise AutopartError(
                    f"{source} was a tensor when the model was captured, got a container; "
                    "pass the same kinds of arguments on every step"
                )
            if source not in given:
                raise AutopartError(
                    f"this call has no {source}, but the model was captured with it; call the "
                    "model with the same arguments on every step"
                )
            value = given[source]
            spec = graph.node(name).outputs[0] if graph.node(name).outputs else None
            if spec is not None and not routing.is_scalar(spec):
                if not isinstance(value, torch.Tensor):
                    raise AutopartError(
                        f"{source} was a tensor when the model was captured, got "
                        f"{type(value).__name__}"
                    )
                value = value.to(self.device)
            local[name] = value
        return local

    def _package(
        self, schedule: GPipeSchedule, outputs: dict[str, list[Any]], state: StepState | None
    ) -> Any:
        order = list(outputs)
        flat = [leaf for name in order for leaf in outputs[name]]
        if state is not None:
            differentiable = [
                i
                for i, leaf in enumerate(flat)
                if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
            ]
            bridged = _Bridge.apply(
                self,
                (schedule, state),
                order,
                differentiable,
                self._anchor,
                *[flat[i] for i in differentiable],
            )
            for i, value in zip(differentiable, bridged, strict=True):
                flat[i] = value
        values = {}
        position = 0
        for name in order:
            count = len(outputs[name])
            values[name] = schedule.shapes[name].pack(flat[position : position + count])
            position += count
        return _restructure(schedule.graph, values)

    def _backward(
        self, schedule: GPipeSchedule, state: StepState, order, differentiable, grads
    ) -> None:
        per_value: dict[str, list[Any]] = {}
        flat_grads: dict[int, torch.Tensor] = dict(zip(differentiable, grads, strict=True))
        position = 0
        for name in order:
            count = len(schedule.shapes[name].leaves)
            per_value[name] = [flat_grads.get(position + i) for i in range(count)]
            position += count
        tracker = LiveBytes() if self._track_memory else contextlib.nullcontext()
        overlap = self._sync and self.holders.overlap is not None
        arm = self.holders.arm_overlap if overlap else None
        if self._grads_synced:  # a second backward before step(), as DDP allows
            self.holders.unsum_synced()
            self._grads_synced = False
        with _comm_errors(self.rank, "backward"), tracker:
            schedule.backward(state, per_value, before_last=arm)
            if self._sync:
                self.holders.all_reduce_grads(overlapped=overlap)
                self._grads_synced = True
        if self._track_memory and self._memory:
            self._memory["backward_peak"] = self._memory["forward_end"] + tracker.peak

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
            if id(param) in self._local_ids:
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

    def state_dict(self, *args, rank0_only: bool = False, **kwargs) -> dict[str, torch.Tensor]:
        """The full model state dict, gathered from the ranks that train each part: on every
        rank (each then holds the whole model), or with ``rank0_only`` streamed to rank 0 one
        rank's part at a time (`runtime.state_gather`), the others getting ``{}``."""
        self._require_setup("state_dict")
        keys = self.model.state_dict(keep_vars=True)
        mine = {
            key: to_cpu(value)
            for key, value in keys.items()
            if self.holders.owner(self._names.get(key, key)) == self.rank
        }
        merged = gather(mine, rank0_only, self.device)
        if merged is None:
            return {}
        return {key: merged[key] for key in keys}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a full state dict into this rank's tensors.  Of a meta-built model, the other
        stages' tensors stay on meta: copying into them is the no-op torch warns about."""
        if assign and has_meta(self.model):
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
        opt = self._require_optimizer()
        index = {id(p): i for i, p in enumerate(p for g in self._original_groups for p in g)}
        mine = {
            index[id(param)]: {k: to_cpu(v) for k, v in state.items()}
            for param, state in opt.state.items()
            if self._state_owner.get(id(param)) == self.rank
        }
        merged = gather(mine, rank0_only, self.device)
        if merged is None:
            return {}
        groups, start = [], 0
        for group, original in zip(opt.param_groups, self._original_groups, strict=True):
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": list(range(start, start + len(original)))})
            start += len(original)
        return {"state": dict(sorted(merged.items())), "param_groups": groups}

    def load_optimizer_state_dict(self, state_dict: dict[str, Any]) -> None:
        opt = self._require_optimizer()
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self._original_groups):
            raise AutopartError(
                f"optimizer state has {len(groups)} parameter groups, the optimizer has "
                f"{len(self._original_groups)}; it was saved for another optimizer"
            )
        flat = [p for g in self._original_groups for p in g]
        for saved, group in zip(groups, opt.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        opt.state.clear()
        for i, state in state_dict.get("state", {}).items():
            param = flat[int(i)]
            if id(param) in self._stepped_ids:
                opt.state[param] = self._placed_state(param, state)

    def _placed_state(self, param: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
        """Optimizer state for ``param`` where this rank's step keeps it: under
        offload="params" on the device, though the parameter itself is in host memory."""
        on_device = self.plan.stage_of_rank(self.rank).offload == "params"
        device = self.device if on_device else param.device
        return {
            k: v.to(device) if isinstance(v, torch.Tensor) and v.dim() else v
            for k, v in state.items()
        }

    def _require_setup(self, what: str) -> None:
        if self.plan is None:
            raise AutopartError(
                f"{what}() needs the partition, which is made on the first forward call; "
                "run one forward pass first"
            )

    def _require_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise AutopartError("autopart.Module was created without an optimizer")
        return self.optimizer


class _Bridge(torch.autograd.Function):
    """Joins the outputs of a pipelined forward to one node whose backward runs the pipeline."""

    @staticmethod
    def forward(ctx, owner, state, order, differentiable, anchor, *tensors):
        ctx.owner, ctx.state, ctx.order, ctx.differentiable = owner, state, order, differentiable
        return tuple(t.detach().clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.owner._backward(*ctx.state, ctx.order, ctx.differentiable, grads)
        ctx.state = None
        return (None, None, None, None, None, *[None] * len(grads))


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    """Buffers go to the device; offloaded parameters stay where `ParamOffload` put them."""
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.to(device)


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


def _flat(by_kind: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    return [t for tensors in by_kind.values() for t in tensors]


@contextlib.contextmanager
def _comm_errors(rank: int, phase: str) -> Iterator[None]:
    """Turn torch.distributed's errors (a peer died, a timeout) into one clear message."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, AutopartError):
            raise
        raise routing.RuntimeCommError(
            f"rank {rank} failed in {phase}: {routing.first_line(err)}"
        ) from err


def _autocast_dtype(precision: str | None) -> torch.dtype | None:
    """Mixed precision by native autocast; the parameters stay fp32 (they are the masters)."""
    if precision in (None, "fp32", "float32"):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp16", "float16"):
        return torch.float16  # scale the loss with autopart.GradScaler
    raise AutopartError(f"unknown precision {precision!r}; use None (fp32), 'bf16' or 'fp16'")


def _canonical_names(model: nn.Module, graph: Graph) -> dict[str, str]:
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


def _restructure(graph: Graph, values: dict[str, Any]) -> Any:
    """The model's own output structure (tensor, tuple, dict, ModelOutput) around ``values``;
    each split scalar is combined here from this rank's rows of its terms, so it is this
    rank's own value, as under DDP, and its gradient flows back through those rows."""
    for name, reduction in graph.reductions.items():
        values[name] = reduction.combine(values)
    output = next(iter(graph.fx_module.graph.find_nodes(op="output")))
    codegen = graph.fx_module.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        leaves = [values[n.name] if isinstance(n, torch.fx.Node) else n for n in output.args[0]]
        return pytree.tree_unflatten(leaves, info.out_spec)
    return pytree.tree_map(
        lambda n: values[n.name] if isinstance(n, torch.fx.Node) else n, output.args[0]
    )


def _raise_on_every_rank(failure: AutopartError | None, world: int) -> None:
    """Raise ``failure`` here, and on every other rank the first rank's failure, so that a
    problem one stage has stops all ranks instead of leaving them to time out."""
    if world > 1:
        failures: list[Any] = [None] * world
        dist.all_gather_object(failures, None if failure is None else str(failure))
        first = next(((r, f) for r, f in enumerate(failures) if f is not None), None)
        if first is not None and failure is None:
            raise AutopartError(f"rank {first[0]} failed: {first[1]}")
    if failure is not None:
        raise failure


def _agreeing(values: list) -> str:
    """Which ranks agree with which, from one value per rank: ``ranks 0,2 / 1 agree``."""
    groups: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    listed = " / ".join(",".join(map(str, ranks)) for ranks in sorted(groups.values()))
    return f"ranks {listed} agree among themselves"


def _all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values``, in rank order."""
    world = dist.get_world_size()
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    try:
        dist.all_gather(every, mine)
    except RuntimeError as err:
        raise routing.RuntimeCommError(
            f"rank {dist.get_rank()} could not reach every rank: {routing.first_line(err)}. "
            "A rank has probably died or raised; see its own error"
        ) from err
    return [t.tolist() for t in every]

"""Each call of the wrapped model, from arguments to outputs and back through backward.

A call first agrees with every rank on its kind and batch sizes (one all-gather, which the
forward does not wait for where the sizes can be guessed: `runtime.pipeline.agreement`), finds its
schedule (a new kind of call is captured once and placed on the first plan's stages,
`runtime.pipeline.signatures`), runs the forward of every microbatch, and hands back outputs joined
to one autograd node (`runtime.pipeline.bridge`).  That node's backward runs the pipeline's backward
and then, unless the caller is inside ``no_sync``, sums each gradient over the ranks holding its
parameter, as DDP does; a second backward before the step first undoes the earlier sum's
duplication (`Holders.unsum_synced`).

Under 1F1B the pipeline's backward runs inside the call, from the model's own loss
(`runtime.pipeline.loss_grads`); what it computes is kept apart (`DeferredGrads`), and the caller's
backward only scales it by the gradient it puts on the loss before the same sums.

Training calls 2 to 1 + `TRACE_CALLS` are timed, action by action and whole steps (forward
to the end of backward's gradient sum): `Module.plan_report` sets them against the plan's
prediction, and with ``trace=`` every rank's actions go to a Chrome trace
(`autopart.reports.trace`). The first call is left out: it also captures and plans.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autopart.device import reset_peak, restore_rng, rng_state, synchronize, without_autocast
from autopart.errors import AutopartError
from autopart.reports import trace
from autopart.reports.memtrack import LiveBytes, storage_bytes
from autopart.reports.trace import Recorder
from autopart.runtime.context import RankContext
from autopart.runtime.data_parallel.holders import Holders
from autopart.runtime.pipeline import bridge
from autopart.runtime.pipeline.agreement import Agreement, Misguessed, Pending, guessable
from autopart.runtime.pipeline.alone import run_alone, runs_alone
from autopart.runtime.pipeline.builder import StageBuilder, raise_on_every_rank
from autopart.runtime.pipeline.loss_grads import DeferredGrads
from autopart.runtime.pipeline.runner import StageRunner
from autopart.runtime.pipeline.signatures import CallPrecision, derive_plan
from autopart.runtime.pipeline.step_state import StepState
from autopart.runtime.plan_agreement import agreeing
from autopart.runtime.transport.distenv import job_group
from autopart.runtime.transport.layout import BatchLayout
from autopart.runtime.transport.routing import all_gather_floats, all_gather_ints, comm_errors

log = logging.getLogger(__name__)

#: Training calls timed (after the first).
TRACE_CALLS = 3


class Calls:
    def __init__(
        self,
        ctx: RankContext,
        stages: StageBuilder,
        holders: Holders,
        first: tuple[str, StageRunner],
        sync: Callable[[], bool],
        resident: Callable[[], list[torch.Tensor]],
        track_memory: bool,
        trace: str | None = None,
    ) -> None:
        self.stages = stages
        self.plan = ctx.plan
        self.holders = holders
        self.schedules = dict([first])
        #: Per call key, whether its forward may run on a guessed layout (`agreement`).
        self._guessable = {first[0]: guessable(first[1].graph)}
        self.agreement = Agreement(ctx.rank, ctx.device)
        self.sync = sync
        self.resident = resident
        self.track_memory = track_memory
        self.rank, self.world, self.device = ctx.rank, ctx.world, ctx.device
        #: Whether the gradients hold a sum over holders that no backward has added to yet.
        self.grads_synced = False
        #: The peaks of the last tracked step (`Module.memory_report`).
        self.memory: dict[str, int] = {}
        self._anchor = torch.zeros((), requires_grad=True)
        self._warned: set[StageRunner] = set()
        #: Where the measured timeline goes (None: nowhere), and this rank's recording of it.
        self.trace = trace
        waits = functools.partial(synchronize, self.device)
        self.recorder: Recorder | None = Recorder(self.rank, waits)
        self._training_calls = 0
        #: The timed calls' actions (trace events) and step seconds, once they are over.
        self.timed_events: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []
        self._step_began: float | None = None

    def run(
        self,
        key: str,
        args: tuple,
        kwargs: dict[str, Any],
        training: bool,
        precision: CallPrecision,
    ) -> Any:
        given = bridge.by_source(args, kwargs)
        size = bridge.local_batch(self.stages.input_dims, given, known=False)
        grad = torch.is_grad_enabled()
        sizes, pending = [size], None
        if self.world > 1:  # one collective agrees on the batch layout and the call
            can_guess = key in self.schedules and self._guessable[key]
            sizes, pending = self.agreement.start(key, size, grad, can_guess)
        schedule = self.schedules.get(key) or self._add_signature(
            key, args, kwargs, training, precision
        )
        if -1 in sizes:  # the batch came in arguments the capture of this call has found
            sizes = [bridge.local_batch(self.stages.input_dims, given)]
            if self.world > 1:
                sizes = [row[0] for row in all_gather_ints(sizes, self.device)]
        local = bridge.route_inputs(schedule.graph, given, self.device)
        # A call without gradients is not timed, and leaves the timing of a training call
        # whose backward is still to come (same schedule) as it was.
        recorder = schedule.recorder
        if grad:
            schedule.recorder = self._recording()
            self._step_began = schedule.recorder.now() if schedule.recorder else None
        else:
            schedule.recorder = None
        if schedule.recorder is None and not self.track_memory and runs_alone(schedule):
            schedule.recorder = recorder if not grad else None
            return bridge.hand_back(schedule, run_alone(schedule, local, grad, sum(sizes)))
        interleaved = grad and self._interleaves(schedule)
        if schedule.offload is not None:
            schedule.offload.reset_peak()
        tracker = LiveBytes(self.resident()) if self.track_memory else None
        rng = rng_state(self.device) if pending is not None else None
        try:
            with comm_errors(self.rank, "forward"), tracker or nullcontext():
                try:
                    state, outputs, deferred = self._forward(
                        schedule, local, sizes, grad, interleaved, pending
                    )
                except Misguessed as miss:  # nothing has left this rank: run it again
                    assert rng is not None
                    restore_rng(rng, self.device)
                    sizes = miss.sizes
                    self.agreement.agreed(key, sizes, missed=True)
                    state, outputs, deferred = self._forward(
                        schedule, local, sizes, grad, interleaved, None
                    )
        finally:
            if not grad:
                schedule.recorder = recorder
        if self.world > 1:
            self.agreement.agreed(key, sizes)
        if tracker is not None:
            resident = storage_bytes(self.resident())
            self.memory = {
                "forward_peak": tracker.peak,
                "forward_end": tracker.current,
                "activations": max(tracker.current - resident, 0),
            }
        if deferred is not None:
            assert schedule.loss is not None

            def finish(loss_grad: torch.Tensor) -> None:
                self._finish_interleaved(deferred, loss_grad)

            name = schedule.loss.loss.name
            return bridge.package_interleaved(schedule, outputs, name, finish, self._anchor)

        def run_backward(order: list[str], differentiable: list[int], grads: tuple) -> None:
            self._backward(schedule, state, order, differentiable, grads)

        return bridge.package(schedule, outputs, run_backward if grad else None, self._anchor)

    def _forward(
        self,
        schedule: StageRunner,
        local: dict[str, Any],
        sizes: list[int],
        grad: bool,
        interleaved: bool,
        pending: Pending | None,
    ) -> tuple[StepState, dict[str, list[Any]], DeferredGrads | None]:
        """The forward pass (under 1F1B the whole pass) of every microbatch on ``sizes``'s
        layout; a guessed layout is settled before anything leaves this rank."""
        layout = BatchLayout.of(sizes, self._microbatches_for(sum(sizes)))
        deferred = DeferredGrads(self.holders.local_params()) if interleaved else None
        try:
            loss = None
            if interleaved:
                assert schedule.loss is not None  # `_interleaves` checked it
                loss = schedule.loss.for_call(local, layout, self.rank, schedule.shapes)
            settle = pending.settle if pending is not None else None
            state = schedule.forward(local, layout, grad, loss, settle)
            if pending is not None:
                pending.settle()
            outputs = schedule.gather_outputs(state)
        finally:  # the gradients accumulated so far come back even if the call failed
            if deferred is not None:
                deferred.settle()
        return state, outputs, deferred

    def _interleaves(self, schedule: StageRunner) -> bool:
        """Whether this call runs its backward inside the call (1F1B): only where the plan
        says so and the call returns a loss it can use; otherwise it runs as GPipe."""
        if schedule.plan.schedule == "gpipe":
            return False
        if schedule.loss is None:
            if schedule not in self._warned:
                self._warned.add(schedule)
                log.warning(
                    "the plan's schedule is %s, but this call cannot run it (%s); it runs as "
                    "gpipe, recomputing each microbatch's activations in backward so that "
                    "holding all of them stays near the plan's memory",
                    schedule.plan.schedule,
                    schedule.loss_reason,
                )
            return False
        return True

    def _finish_interleaved(self, deferred: DeferredGrads, loss_grad: torch.Tensor) -> None:
        """The caller's backward of a 1F1B call: its gradient on the loss scales what the
        pipeline computed at 1, and the sum over holders follows as in `_backward`."""
        scale = float(loss_grad.detach().double())
        with comm_errors(self.rank, "backward"):
            if self.world > 1:
                every = [v[0] for v in all_gather_floats([scale], self.device)]
                if len(set(every)) > 1:
                    raise AutopartError(
                        f"the ranks put different gradients on their losses ({agreeing(every)}); "
                        "under the 1f1b schedule every rank must scale its loss alike (the "
                        "same loss / k, the same GradScaler), or use schedule='gpipe'"
                    )
            sync = self.sync()
            if self.grads_synced:  # a second backward before step(), as DDP allows
                self.holders.unsum_synced()
                self.grads_synced = False
            deferred.apply(scale)
            if sync:
                # The same buckets as GPipe's overlapped sum, launched at once: under ZeRO
                # each gradient is reduced onto its owner, as `unsum_synced` expects.
                overlap = self.holders.overlap is not None
                if overlap:
                    self.holders.arm_overlap()
                with self._timed("allreduce"):
                    self.holders.all_reduce_grads(overlapped=overlap)
                self.grads_synced = True
        self._write_trace()

    def _recording(self) -> Recorder | None:
        """The recorder for this training call: calls 2 to 1 + `TRACE_CALLS` are traced (the
        first one also captures and plans, so the device's memory peak restarts at the
        second: `Module.plan_report` reads it)."""
        if self.recorder is None:
            return None
        self._training_calls += 1
        if self._training_calls == 2:
            reset_peak(self.device)
        return self._traced()

    def _traced(self) -> Recorder | None:
        """The recorder while the latest training call is one to trace, else None."""
        return self.recorder if 1 < self._training_calls <= 1 + TRACE_CALLS else None

    def _timed(self, name: str):
        recorder = self._traced()
        return recorder.span(name, "comm") if recorder else nullcontext()

    def _write_trace(self) -> None:
        """After a timed call's backward: its step time; after the last one's, every rank's
        events to rank 0, which writes the measured trace and, beside it, the plan's
        predicted one (with ``trace=``)."""
        recorder = self._traced()
        if recorder is None:
            return
        if self._step_began is not None:
            self.step_seconds.append(recorder.now() - self._step_began)
            self._step_began = None
        if self._training_calls != 1 + TRACE_CALLS:
            return
        self.timed_events, self.recorder = recorder.events, None
        if self.trace is None:
            return
        every: list = [None] * self.world
        if self.world > 1:
            dist.gather_object(
                self.timed_events, every if self.rank == 0 else None, dst=0, group=job_group()
            )
        else:
            every = [self.timed_events]
        if self.rank == 0:
            measured = trace.write(trace.merge(every, self.plan), Path(self.trace, "trace.json"))
            trace.write(trace.predicted_trace(self.plan), Path(self.trace, "predicted.json"))
            log.warning("autopart: wrote the measured timeline to %s", measured)

    def _add_signature(
        self,
        key: str,
        args: tuple,
        kwargs: dict[str, Any],
        training: bool,
        precision: CallPrecision,
    ) -> StageRunner:
        """A call unlike every earlier one: its own graph, on the first call's placement."""
        failure = None
        try:
            with without_autocast(self.device):
                graph = self.stages.capture(args, kwargs)
        except AutopartError as err:  # ranks may capture differently placed models
            failure = err
        raise_on_every_rank(failure, self.world)
        self.stages.agree_on_dims(graph)
        plan = derive_plan(self.plan, graph)
        plan.validate_for(graph, self.world, idle_stages=True)
        self.stages.materialize(graph, plan, first=False)  # the constants of its own capture
        schedule = self.stages.build(graph, plan, training, precision)
        self.stages.add_state_update(schedule, plan.stage_of_rank(self.rank))
        self.schedules[key] = schedule
        self._guessable[key] = guessable(graph)
        log.info("rank %d captured another call signature (%d)", self.rank, len(self.schedules))
        return schedule

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

    def _backward(
        self, schedule: StageRunner, state: StepState, order, differentiable, grads
    ) -> None:
        per_value: dict[str, list[Any]] = {}
        flat_grads: dict[int, torch.Tensor] = dict(zip(differentiable, grads, strict=True))
        position = 0
        for name in order:
            count = len(schedule.shapes[name].leaves)
            per_value[name] = [flat_grads.get(position + i) for i in range(count)]
            position += count
        tracker = LiveBytes() if self.track_memory else None
        sync = self.sync()
        overlap = sync and self.holders.overlap is not None
        arm = self.holders.arm_overlap if overlap else None
        if self.grads_synced:  # a second backward before step(), as DDP allows
            self.holders.unsum_synced()
            self.grads_synced = False
        with comm_errors(self.rank, "backward"), tracker or nullcontext():
            schedule.backward(state, per_value, before_last=arm)
            if sync:
                with self._timed("allreduce"):
                    self.holders.all_reduce_grads(overlapped=overlap)
                self.grads_synced = True
        if tracker is not None and self.memory:
            self.memory["backward_peak"] = self.memory["forward_end"] + tracker.peak
        self._write_trace()

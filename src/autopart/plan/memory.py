"""The memory model of one stage replica: what must fit on each device.

Per device, a stage holds:

* its parameters and buffers, their gradients, and the optimizer state
  (``optimizer_factor`` x trainable bytes: Adam/AdamW 2, SGD with momentum 1, plain SGD 0),
  the optimizer state split over the stage's replicas under ZeRO (``zero``).  ZeRO also splits
  the gradients, but only once backward has summed them: during backward every replica holds
  its whole partial gradient, so that is what the peak charges;
* activations for every microbatch in flight, as many as the schedule's action list keeps
  forwarded but not yet backwarded (`autopart.schedules.in_flight`): all ``M`` under GPipe, at
  most ``S - s`` on stage ``s`` under 1F1B.  Without recomputation each keeps what autograd
  saves plus the stage's received inputs; with recomputation each keeps only its received inputs,
  and one microbatch at a time is re-run, so its saved tensors are charged once.  The model's
  outputs a stage produces (logits, say) go to their owners only after the pass, so a schedule
  that frees a microbatch before the pass ends still holds every microbatch's outputs;
* transient working memory: the largest single op output and its gradient;
* communication buffers: one microbatch of sent and received values, and one gradient bucket
  for the allreduce when the stage has replicas.

With parameter offload (``offload``: an `autopart.config.Offload`) the parameters live
in host memory and only the in-flight working set is on the device: the op running now (its
parameters and their gradients, ``largest_group_bytes`` at most) and ``prefetch`` parameters
copied ahead.  Buffers stay.  Gradients are summed on the host, so no allreduce bucket.  Under
``"params"`` the optimizer state stays on the device and the step runs there, with the stage's
parameters and gradients brought back for it: that is a second peak, after the activations are
gone.  Under ``"params+optimizer"`` the device holds no optimizer state at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: DDP's default gradient bucket; the allreduce holds at most one such buffer.
ALLREDUCE_BUCKET_BYTES = 25 * 2**20

OPTIMIZER_FACTORS = {"adam": 2.0, "adamw": 2.0, "sgd-momentum": 1.0, "sgd": 0.0, "none": 0.0}

#: Host memory traffic of one optimizer step, per byte of fp32 parameter: Adam reads the
#: parameter, its gradient and two moments and writes three (28 bytes per parameter); SGD with
#: momentum reads three and writes two; plain SGD reads two and writes one.
HOST_STEP_TRAFFIC = {"adam": 7.0, "adamw": 7.0, "sgd-momentum": 5.0, "sgd": 3.0, "none": 0.0}

#: Each microbatch's gradients of an offloaded stage, added into the host ``.grad`` when the
#: stage's backward ends: read the gradient that came over the link, read and write ``.grad``
#: (per byte of fp32 parameter; the widening of a bf16 gradient is within the first read).
HOST_GRAD_TRAFFIC = 3.0

#: Under autocast, the host casts of offloaded weights are remade after each step: read
#: fp32, write half (at most every weight).
HOST_CAST_TRAFFIC = 1.5


@dataclass(frozen=True)
class StageFootprint:
    """Microbatch-independent sizes of one stage, per sample where they scale."""

    param_bytes: float
    trainable_bytes: float
    saved_per_sample: float
    saved_fixed: float
    recv_per_sample: float
    recv_fixed: float
    send_per_sample: float
    send_fixed: float
    largest_output_per_sample: float
    largest_output_fixed: float
    buffer_bytes: float = 0.0
    largest_group_bytes: float = 0.0
    largest_param_bytes: float = 0.0
    #: The model's outputs this stage produces, handed to their owners after the pass.
    output_per_sample: float = 0.0
    output_fixed: float = 0.0
    #: Bytes an offloaded stage moves over the host link per pass over its weights, and for
    #: their gradients (under autocast, matmul weights at the low width).
    link_bytes: float = 0.0
    link_grad_bytes: float = 0.0


@dataclass(frozen=True)
class MemoryModel:
    optimizer_factor: float
    prefetch: int = 1

    def state_bytes(self, fp: StageFootprint) -> float:
        """Parameters, gradients and the full optimizer state (no ZeRO split)."""
        return fp.param_bytes + fp.trainable_bytes * (1.0 + self.optimizer_factor)

    def peak_bytes(
        self,
        fp: StageFootprint,
        rows: np.ndarray,
        microbatches: int,
        replicas: np.ndarray,
        recompute: bool,
        offload: str = "none",
        zero: bool = False,
        in_flight: int | None = None,
    ) -> np.ndarray:
        """Predicted peak bytes per device, vectorized over candidate (rows, replicas);
        ``in_flight`` microbatches hold activations at once (default: all ``microbatches``)."""
        held = microbatches if in_flight is None else in_flight
        rows = np.asarray(rows, dtype=float)
        saved = fp.saved_per_sample * rows + fp.saved_fixed
        recv = fp.recv_per_sample * rows + fp.recv_fixed
        send = fp.send_per_sample * rows + fp.send_fixed
        activations = held * recv + saved if recompute else held * (saved + recv)
        # Microbatches freed before the pass ends still hold their outputs until it does.
        activations = activations + (microbatches - held) * (
            fp.output_per_sample * rows + fp.output_fixed
        )
        transient = 2.0 * (fp.largest_output_per_sample * rows + fp.largest_output_fixed)
        optimizer: float | np.ndarray = fp.trainable_bytes * self.optimizer_factor
        if zero:
            optimizer = optimizer / np.asarray(replicas, dtype=float)
        running = activations + transient + recv + send
        if offload == "none":
            bucket = np.where(
                np.asarray(replicas) > 1, min(fp.trainable_bytes, ALLREDUCE_BUCKET_BYTES), 0.0
            )
            return fp.param_bytes + fp.trainable_bytes + optimizer + running + bucket
        working = 2.0 * fp.largest_group_bytes + self.prefetch * fp.largest_param_bytes
        if offload == "params+optimizer":
            return fp.buffer_bytes + working + running
        step = fp.param_bytes + fp.trainable_bytes + optimizer
        return np.maximum(fp.buffer_bytes + working + optimizer + running, step)

    def host_bytes(self, fp: StageFootprint, replicas: int, offload: str, zero: bool) -> float:
        """Host memory one replica's offload uses: the parameters and their gradients (summed
        there in full), and under ``"params+optimizer"`` the optimizer state (its ZeRO share)."""
        if offload == "none":
            return 0.0
        held = fp.param_bytes - fp.buffer_bytes + fp.trainable_bytes
        if offload == "params+optimizer":
            held += fp.trainable_bytes * self.optimizer_factor / (replicas if zero else 1)
        return held

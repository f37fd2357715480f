"""Everything a user chooses, in one frozen, validated value: `Config`.

`autopart.Module`'s keywords, the command line and the demo each build one; the planner's
options derive from it (`autopart.plan.planner.PlanOptions.from_config`).  After planning, the
runtime reads none of it: every choice it acts on is in the `Plan`, which records what it was
costed with.  A plan loaded from disk must agree with the keywords given explicitly
(`Config.given`), or it is refused (`check_plan_agrees`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from autopart.cost.units import parse_bytes
from autopart.errors import AutopartError


class Choice(str, Enum):
    """A named choice that is also its string, so ``"bf16"`` and ``Precision.BF16`` are
    interchangeable (in comparisons, dict keys, JSON and messages)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: str, what: str) -> Any:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(member.value) for member in cls)
            raise AutopartError(f"unknown {what} {value!r}; use one of {names}") from None


class Precision(Choice):
    """What the stages compute in: fp32, or bf16 / fp16 under autocast (fp32 master weights)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Schedule(Choice):
    """The pipeline schedule; ``auto`` lets the planner choose among those that apply."""

    AUTO = "auto"
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"


class CostSource(Choice):
    """Where the planner's stage times come from; ``auto``: measured on CUDA, else analytic."""

    AUTO = "auto"
    ANALYTIC = "analytic"
    MEASURED = "measured"


class Offload(Choice):
    """Where a stage keeps its parameters (and optimizer state)."""

    NONE = "none"
    PARAMS = "params"
    PARAMS_OPTIMIZER = "params+optimizer"

    @classmethod
    def of(cls, value: bool | str | None) -> Offload:
        if value is None or value is False:
            return cls.NONE
        if value is True:
            return cls.PARAMS_OPTIMIZER
        try:
            return cls(value)
        except ValueError:
            raise AutopartError(
                f"unknown offload {value!r}; use False, True, 'params', 'params+optimizer' "
                "or 'auto'"
            ) from None


#: Precision names, with their aliases.
PRECISIONS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
PRECISIONS.update(fp16="fp16", float16="fp16")

#: The dtype autocast runs each precision at (fp32: no autocast, the parameters' own).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

#: Pipeline schedules; "auto" lets the planner choose among the ones that apply.
SCHEDULES = tuple(s.value for s in Schedule)

#: Where the planner's stage times come from (`Config.cost`).
COSTS = tuple(c.value for c in CostSource)


def check_batch_dims(value: Any) -> dict[str, int | None]:
    """``batch_dims=`` as a fresh dict of argument name (or source) -> dimension or None."""
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and (v is None or (isinstance(v, int) and not isinstance(v, bool)))
        for k, v in value.items()
    ):
        raise AutopartError(
            f"batch_dims must map argument names to a dimension or None, like "
            f"{{'src': 1, 'hidden': 1}}; got {value!r}"
        )
    return dict(value)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The user's choices for one wrapped model.  None means "let the planner choose"."""

    stages: int | None = None
    """Pipeline stages (by default the planner picks the count)."""

    microbatches: int | None = None
    """Microbatches per step (by default the planner picks)."""

    split_points: tuple[str, ...] | None = None
    """Module paths where stages begin (``("layers.6", ...)``), instead of automatic cuts."""

    device_memory: int | str | None = None
    """Memory per device to plan for (bytes, or ``"40GB"``); None: the device's own."""

    plan: Any = None
    """A `Plan` or the path of a saved one: skips planning and runs it as it was costed."""

    precision: Precision | str = Precision.FP32
    """``"fp32"``, or ``"bf16"`` / ``"fp16"`` under native autocast with fp32 master weights."""

    zero: bool | str = "auto"
    """Split optimizer state and gradients over a stage's replicas: True, False or "auto"
    (the default: only on the stages that need it to fit or to run faster)."""

    offload: Offload | str = "auto"
    """Keep parameters in host memory: an `Offload` (True is params+optimizer) or "auto" (the
    default: only on the stages that need it, and only where the host's memory is known and
    is not the device's own: on CUDA devices)."""

    prefetch: int = 1
    """How far ahead of use an offloaded stage copies parameters to the device: copies in
    flight may hold this many times the stage's largest parameter's bytes."""

    schedule: Schedule | str = Schedule.AUTO
    """The pipeline schedule: "auto", "gpipe" or "1f1b"."""

    cost: CostSource | str = CostSource.AUTO
    """Where stage times come from: "measured" (each block profiled on this device, cached by
    model and device, `autopart.cost.measured`), "analytic" (the roofline model), or "auto":
    measured on CUDA, analytic elsewhere and for a model built on meta (nothing to run)."""

    leaf_modules: tuple[str, ...] | None = None
    """Module paths (``("encoder.layer.3.gate",)``) captured whole, as one opaque op that runs
    on one stage: for a submodule whose Python control flow cannot be traced."""

    batch_dims: dict[str, int | None] | None = None
    """Which dimension of each argument carries the batch (``{"src": 1, "hidden": 1}``; None
    for an argument without one), by argument name or source (``"args[0]"``).  By default
    capture finds it by running the model on two rows of the first batch and on each alone
    (`autopart.capture.batch_dims`)."""

    timeout: float | None = None
    """Seconds a rank waits on a dead peer before failing; None: ``AUTOPART_TIMEOUT`` or 300."""

    track_memory: bool = False
    """Measure live tensor bytes during each step, for `memory_report()`."""

    trace: str | None = None
    """A directory: record a few training steps' timeline on every rank and write it there
    as a Chrome trace (`autopart.reports.trace`); None: ``AUTOPART_TRACE``, or no trace."""

    checkpoint: str | None = None
    """Where a meta-device model's values come from: safetensors, torch.save or DCP."""

    init_fn: Callable[[Any], None] | None = None
    """Initializes a meta-device model's materialized tensors, instead of its own initializer."""

    loss_fn: Callable[[Any, Any], Any] | None = None
    """``loss_fn(output, target)``: the model is then called as ``model(..., target=y)`` and
    returns the loss, captured with it, so that 1F1B can run (`autopart.capture.with_loss`)."""

    given: frozenset[str] = field(default=frozenset(), compare=False)
    """The fields the user set explicitly (`from_keywords` fills it): a loaded plan must
    agree with these."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize once, here
        if self.split_points is not None:
            set_(self, "split_points", tuple(self.split_points) or None)
        if self.leaf_modules is not None:
            set_(self, "leaf_modules", tuple(self.leaf_modules) or None)
        if self.batch_dims is not None:
            set_(self, "batch_dims", check_batch_dims(self.batch_dims))
        if self.device_memory is not None:
            set_(self, "device_memory", parse_bytes(self.device_memory))
        if self.precision not in PRECISIONS:
            raise AutopartError(
                f"unknown precision {self.precision!r}; use 'fp32', 'bf16' or 'fp16'"
            )
        set_(self, "precision", Precision(PRECISIONS[self.precision]))
        check_zero(self.zero)
        set_(self, "offload", "auto" if self.offload == "auto" else Offload.of(self.offload))
        check_prefetch(self.prefetch)
        set_(self, "schedule", Schedule.parse(self.schedule, "schedule"))
        set_(self, "cost", CostSource.parse(self.cost, "cost"))
        for name in ("stages", "microbatches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AutopartError(f"{name} must be at least 1, got {value}")
        if self.checkpoint is not None:
            set_(self, "checkpoint", str(Path(self.checkpoint)))
        trace = self.trace if self.trace is not None else os.environ.get("AUTOPART_TRACE")
        set_(self, "trace", str(Path(trace)) if trace else None)

    @classmethod
    def from_keywords(cls, **keywords: Any) -> Config:
        """A config from keyword arguments, remembering which were given (not None)."""
        names = {f.name for f in fields(cls)} - {"given"}
        unknown = set(keywords) - names
        if unknown:
            raise AutopartError(f"unknown option(s) {', '.join(sorted(unknown))}")
        given = frozenset(k for k, v in keywords.items() if v is not None)
        return cls(**{k: v for k, v in keywords.items() if v is not None}, given=given)


@functools.cache
def option_docs() -> dict[str, str]:
    """Each `Config` field's docstring, by field name: the one description of an option, which
    the command line's help repeats."""
    tree = ast.parse(inspect.getsource(Config))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for field_node, doc in itertools.pairwise(body):
        is_doc = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
        if isinstance(field_node, ast.AnnAssign) and is_doc:
            name = field_node.target.id  # type: ignore[union-attr]
            docs[name] = " ".join(str(doc.value.value).split())
    return docs


def check_zero(value: bool | str) -> None:
    """``zero=`` is True, False, or ``"auto"`` (the planner splits only where it must)."""
    if value not in (True, False, "auto"):
        raise AutopartError(f"unknown zero {value!r}; use True, False or 'auto'")


def check_prefetch(value: int) -> None:
    if value < 0:
        raise AutopartError(f"prefetch must be 0 or more parameters ahead, got {value}")


def check_plan_agrees(plan: Any, config: Config, source: str) -> None:
    """Refuse a loaded plan that contradicts a keyword the user gave explicitly: it would
    otherwise run as costed while the user believes otherwise."""
    found = []
    if "stages" in config.given and plan.num_stages != config.stages:
        found.append(f"{plan.num_stages} stages, not stages={config.stages}")
    if "microbatches" in config.given and plan.microbatches != config.microbatches:
        found.append(f"{plan.microbatches} microbatches, not microbatches={config.microbatches}")
    if "precision" in config.given and plan.precision != config.precision:
        found.append(f"precision {plan.precision!r}, not {config.precision!r}")
    scheduled = "schedule" in config.given and config.schedule != "auto"
    if scheduled and plan.schedule != config.schedule:
        found.append(f"schedule {plan.schedule!r}, not {config.schedule!r}")
    if "zero" in config.given and config.zero != "auto":
        wrong = [s.index for s in plan.stages if s.replicas > 1 and s.zero != config.zero]
        if wrong:
            found.append(f"zero={not config.zero} on stage(s) {wrong}, not zero={config.zero}")
    if "offload" in config.given and config.offload != "auto":
        wrong = [s.index for s in plan.stages if s.offload != config.offload]
        if wrong:
            wanted = Offload.of(config.offload).value
            found.append(f"other offload on stage(s) {wrong}, not offload={wanted!r}")
    if "prefetch" in config.given:
        wrong = [
            s.index
            for s in plan.stages
            if s.offload != Offload.NONE and s.prefetch != config.prefetch
        ]
        if wrong:
            found.append(f"another prefetch on stage(s) {wrong}, not prefetch={config.prefetch}")
    if found:
        raise AutopartError(
            f"the plan from {source} says {'; '.join(found)}. It runs as it was costed: drop "
            "the conflicting keywords, or re-plan with them"
        )

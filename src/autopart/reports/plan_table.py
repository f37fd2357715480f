"""Render a plan for people: a table per stage and a one-line summary."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from autopart.cost.units import format_bytes
from autopart.plan.plan import Plan


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _modules(paths: list[str], limit: int = 3) -> str:
    named = [p for p in paths if p] or ["<top level>"]
    if len(named) <= limit:
        return ", ".join(named)
    return f"{named[0]} … {named[-1]} ({len(named)} modules)"


def plan_table(plan: Plan) -> Table:
    device = plan.device.get("name", "?")
    table = Table(
        title=f"autopart plan: {plan.num_stages} stage(s) on {plan.devices} x {device}, "
        f"batch {plan.global_batch_size} in {plan.microbatches} microbatch(es), "
        f"schedule {plan.schedule}"
    )
    for col, justify in (
        ("stage", "right"),
        ("ranks", "left"),
        ("modules", "left"),
        ("ops", "right"),
        ("rows/mb", "right"),
        ("fwd", "right"),
        ("bwd", "right"),
        ("allreduce", "right"),
        ("memory", "right"),
        ("recompute", "center"),
        ("offload", "center"),
        ("host", "right"),
        ("zero", "center"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in plan.stages:
        table.add_row(
            str(s.index),
            _ranks(s.ranks),
            _modules(s.module_paths),
            str(len(s.nodes)),
            str(s.microbatch_rows),
            format_seconds(s.forward_seconds),
            format_seconds(s.backward_seconds),
            format_seconds(s.allreduce_seconds),
            format_bytes(s.memory_bytes),
            "yes" if s.recompute else "no",
            _offload(s),
            format_bytes(s.host_bytes) if s.host_bytes else "-",
            "yes" if s.zero else "no",
        )
    table.caption = (
        f"predicted step {format_seconds(plan.step_seconds)}, "
        f"{plan.samples_per_second:,.1f} samples/s; memory cap "
        f"{format_bytes(plan.memory_capacity_bytes)} per device; costs: {plan.cost_source}"
    )
    if plan.schedule_note:
        table.caption += f"\nschedule: {plan.schedule_note}"
    return table


def _offload(stage) -> str:
    """What a stage keeps in host memory, and its host optimizer step's time."""
    if stage.offload == "none":
        return "no"
    if stage.host_step_seconds:
        return f"{stage.offload} (step {format_seconds(stage.host_step_seconds)})"
    return str(stage.offload)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    # Logs and pipes get rich's 80 columns, too narrow for the module names.
    if not console.is_terminal and console.width < 140:
        console = Console(file=console.file, width=140)
    console.print(plan_table(plan))

"""The `autopart` command line.

Each subcommand has its own handler that imports what it needs lazily, so `autopart --help`
stays instant.  Errors derived from `AutopartError` are printed as a single line and exit with
code 1: users never see a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from autopart import __version__
from autopart.config import SCHEDULES, Offload, Precision, option_docs
from autopart.errors import AutopartError

OFFLOAD_CHOICES = (*(m.value for m in Offload), "auto")
#: The options shared with `autopart.Module` are described once, on `Config`'s fields.
DOCS = option_docs()

log = logging.getLogger("autopart")


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from autopart.cli.factory import call_factory
    from autopart.cli.planning import plan_model
    from autopart.config import Config
    from autopart.cost import parse_bytes
    from autopart.plan.planner import PlanOptions
    from autopart.reports.plan_table import print_plan

    console = Console(stderr=True)
    model, example_args, example_kwargs = call_factory(args.model)
    split_points = None
    if args.split_points:
        split_points = tuple(p.strip() for p in args.split_points.split(",") if p.strip())
    config = Config(
        stages=args.stages,
        microbatches=args.microbatches,
        split_points=split_points,
        device_memory=args.device_memory,
        precision=args.precision,
        zero={"on": True, "off": False}.get(args.zero, args.zero),
        offload=args.offload or "auto",
        prefetch=args.prefetch,
        schedule=args.schedule,
        given=frozenset({"offload"} if args.offload else ()),
    )
    options = PlanOptions.from_config(
        config,
        devices=args.devices,
        global_batch=args.batch_size or args.devices,
        optimizer=args.optimizer,
        memory_margin=args.margin,
        target_blocks=args.blocks,
        host_memory=parse_bytes(args.host_memory) if args.host_memory else None,
    )
    _, plan = plan_model(
        model,
        example_args,
        example_kwargs,
        options=options,
        device_type=args.device_type,
        cost=args.cost,
        progress=console if console.is_terminal else None,
    )
    print_plan(plan)
    if args.json:
        plan.save(args.json)
        print(f"plan saved to {args.json}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from autopart.plan.plan import Plan
    from autopart.reports import trace
    from autopart.reports.plan_table import print_plan

    plan = Plan.load(args.plan)
    print_plan(plan)
    if args.trace:
        path = trace.write(trace.predicted_trace(plan), args.trace)
        print(f"predicted timeline written to {path} (open it in https://ui.perfetto.dev)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from autopart.cli.demo import run

    return run(args)


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="capture, cost and partition a model; print the plan")
    plan.add_argument(
        "model",
        help="FILE.py:FACTORY or module.path:FACTORY; FACTORY() returns (model, args[, kwargs]) "
        "with example inputs of one sample (the model may live on the meta device)",
    )
    plan.add_argument("--devices", type=int, required=True, help="number of devices to plan for")
    plan.add_argument(
        "--device-memory", help="memory per device, e.g. 80GB or 40GiB (default: the device type's)"
    )
    plan.add_argument(
        "--device-type",
        default="h100",
        help="built-in spec (h100, h200, a100-40gb, a100-80gb, v100, cpu) or a TOML/JSON spec file",
    )
    plan.add_argument("--batch-size", type=int, help="global batch size (default: --devices)")
    plan.add_argument(
        "--optimizer", default="adam", choices=["adam", "adamw", "sgd", "sgd-momentum", "none"]
    )
    plan.add_argument("--stages", type=int, help=DOCS["stages"])
    plan.add_argument(
        "--zero",
        nargs="?",
        const="on",
        default="auto",
        choices=["on", "off", "auto"],
        help="plan for ZeRO: optimizer state and gradients split over each stage's replicas "
        "(auto, the default: only on the stages that need it to fit)",
    )
    plan.add_argument(
        "--offload",
        choices=OFFLOAD_CHOICES,
        help="keep parameters (and optimizer state) in host memory: on every stage, or auto: "
        "only on the stages that do not fit otherwise (the default, where --host-memory is "
        "given; without it, none)",
    )
    plan.add_argument("--prefetch", type=int, default=1, help=DOCS["prefetch"])
    plan.add_argument(
        "--precision", default="fp32", choices=[p.value for p in Precision], help=DOCS["precision"]
    )
    plan.add_argument(
        "--host-memory",
        help="host memory per node for offloaded state, e.g. 512GB (default: not checked)",
    )
    plan.add_argument("--microbatches", type=int, help=DOCS["microbatches"])
    plan.add_argument("--schedule", default="auto", choices=SCHEDULES, help=DOCS["schedule"])
    plan.add_argument(
        "--split-points", help="comma-separated module paths where stages start (a manual plan)"
    )
    plan.add_argument("--margin", type=float, default=0.1, help="share of memory held back")
    plan.add_argument("--blocks", type=int, default=32, help="target number of blocks (K)")
    plan.add_argument("--cost", default="analytic", choices=["analytic", "measured"])
    plan.add_argument("--json", metavar="OUT", help="save the plan as JSON to OUT")
    plan.set_defaults(handler=_plan)


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="train a small GPT auto-partitioned across local processes")
    demo.add_argument("--processes", type=int, default=2, help="local processes (ranks)")
    demo.add_argument("--layers", type=int, default=4, help="transformer layers")
    demo.add_argument("--hidden", type=int, default=64, help="hidden size")
    demo.add_argument("--seq", type=int, default=32, help="sequence length")
    demo.add_argument("--batch-size", type=int, default=16, help="global batch size")
    demo.add_argument("--steps", type=int, default=40, help="training steps")
    demo.add_argument("--stages", type=int, help=DOCS["stages"])
    demo.add_argument("--microbatches", type=int, help=DOCS["microbatches"])
    demo.add_argument(
        "--offload",
        default="none",
        choices=OFFLOAD_CHOICES,
        help="keep parameters (and optimizer state) in host memory",
    )
    demo.add_argument(
        "--zero", action="store_true", help="split optimizer state and gradients over replicas"
    )
    demo.add_argument(
        "--device-memory",
        default="4MB",
        help="memory each process plans for as its device (default 4MB: the model needs stages)",
    )
    demo.add_argument("--schedule", default="auto", choices=SCHEDULES, help=DOCS["schedule"])
    demo.add_argument(
        "--trace",
        default="autopart-trace",
        help="directory for the measured and predicted timelines ('' for none)",
    )
    demo.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopart",
        description="Partition a PyTorch model into pipeline stages x data-parallel replicas, "
        "and train it across processes.",
    )
    parser.add_argument("--version", action="version", version=f"autopart {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv)")
    sub = parser.add_subparsers(dest="command", metavar="{plan,demo,show}", required=True)
    _add_plan_parser(sub)
    _add_demo_parser(sub)
    show = sub.add_parser("show", help="print a saved plan as a table")
    show.add_argument("plan", help="path to a plan JSON file")
    show.add_argument(
        "--trace", metavar="OUT", help="also write the predicted timeline as a Chrome trace"
    )
    show.set_defaults(handler=_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except AutopartError as err:
        print(f"autopart: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autopart: interrupted", file=sys.stderr)
        return 130

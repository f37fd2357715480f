"""The `autopart` command line.

Each subcommand lives in its own function; errors derived from `AutopartError` are printed as a
single line and turn into exit code 1, so users never see a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from autopart import __version__
from autopart.errors import AutopartError, NotImplementedYet

log = logging.getLogger("autopart")

Handler = Callable[[argparse.Namespace], int]


def _not_implemented(feature: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        raise NotImplementedYet(f"`autopart {args.command}` is not implemented yet: {feature}")

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopart",
        description="Partition a PyTorch model into pipeline stages x data-parallel replicas, "
        "and train it across processes.",
    )
    parser.add_argument("--version", action="version", version=f"autopart {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv)")
    sub = parser.add_subparsers(dest="command", metavar="{plan,demo,show}", required=True)

    plan = sub.add_parser("plan", help="capture, cost and partition a model; print the plan")
    plan.add_argument("model", help="FILE.py:FACTORY or module.path:factory")
    plan.set_defaults(handler=_not_implemented("the planner has not landed"))

    demo = sub.add_parser("demo", help="train a small GPT auto-partitioned across local processes")
    demo.set_defaults(handler=_not_implemented("the runtime has not landed"))

    show = sub.add_parser("show", help="print a saved plan as a table")
    show.add_argument("plan", help="path to a plan JSON file")
    show.set_defaults(handler=_not_implemented("the plan format has not landed"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except NotImplementedYet as err:
        print(f"autopart: {err}", file=sys.stderr)
        return 2
    except AutopartError as err:
        print(f"autopart: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autopart: interrupted", file=sys.stderr)
        return 130

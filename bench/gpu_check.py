"""Everything autopart must do on one GPU, checked in one run that prints a table last.

    PYTHONPATH=src python3 bench/gpu_check.py [--only SECTION[,SECTION]] [--cpu-dry-run]

GPU time is short and lent once, so one script runs every check, its sections' time budgets
adding up to about 9 minutes (`BUDGETS`; not yet timed on the H200).  Each case is wrapped: an
exception is a FAIL row with the error's first line (its traceback is printed above the
table), and the run goes on; each section has a time budget past which its remaining cases are
SKIP ("out of time").  Each case's line is printed as it ends.  The exit status is 1 when any
case fails, 2 without a GPU (and without ``--cpu-dry-run``).

Sections (``--only`` takes their names):

``matrix``
    Tiny Hugging Face GPT-2, Llama, BERT, T5, Mixtral (4 experts, 2 per token) and a
    ResNet-style CNN (its loss computed outside), each with the model on ``cpu`` / ``cuda`` /
    ``meta`` (values from a safetensors ``checkpoint=``) x the batch on ``cpu`` / ``cuda``: two
    SGD steps and an ``eval()`` call under ``no_grad``; the losses are finite, and losses and
    outputs come back on ``cuda:0``.  Analytic costs, but for two cases with the default.
``exact``
    GPT-2, Llama and the CNN (model on the CPU, batch on the GPU), dropout 0, fp32, TF32 off:
    each parameter's update over 3 SGD steps and the eval logits afterwards equal those of a
    deep copy trained in plain PyTorch on the same GPU (relative error under 1e-4, so that a
    doubled or dropped gradient fails).
``measured``
    The first call's wall time with the default cost (measured on CUDA) for GPT-2 and an
    ``nn.Sequential`` on the CPU, batch on the GPU; the plan's cost source, and any warning.
``peak``
    GPT-2 (4 x 256, sequences of 128, batch 8) on the GPU: ``max_memory_allocated`` over two
    steps against the plan's predicted stage peak (pass within 25%; the target is 10%).
``overhead``
    HF GPT-2 124M at its defaults inside the caller's bf16 autocast, AdamW, batch 8 x 1024,
    all on the GPU: the wrapped model's step and ``max_memory_allocated`` peak against plain
    PyTorch's, alternating (pass within 1.03x and 1.05x), and the plan's predicted step and
    peak against the measured ones (pass within 15 % and 10 %); see `gpu_overhead`.
``offload``
    A stack of ``--layers`` Linear(``--width``) + ReLU (12 x 8192: 3.2 GB of fp32 parameters,
    6.4 GB with gradients) under ``torch.cuda.set_per_process_memory_fraction`` at two thirds
    of that (``--cap-gb``), the planner told the same: (1) without offload the planner finds
    no plan and plain PyTorch runs out of memory; (2) ``offload=True`` trains, with each
    update equal to plain PyTorch's on the CPU; (3) step time against plain PyTorch uncapped,
    and host-to-device bandwidth; (4) the offloaded stage's predicted peak against the
    measured; (5) recomputation replays the device RNG under dropout; (6) BatchNorm buffers
    live on the device and the user's ``state_dict()`` sees them; (7) a model moved to the GPU
    before wrapping, with a plan that offloads, leaves the device after the first call.
``floors``
    HF GPT-2 709M under bf16 autocast on a GPU capped at 6 GB, model and batch on the CPU,
    default options: the offloaded step against the link, compute and host-optimizer floors
    (pass within 1.5x of the largest), and the plan's predicted step (pass within 20 %);
    see `gpu_offload_speed`.

``--cpu-dry-run`` runs what a CPU can (models and batches on ``cpu`` / ``meta``, plain
PyTorch on the CPU as reference, the offload steps small and uncapped), and SKIPs the rows
that need CUDA memory, so the script itself is tested where there is no GPU (the tests do);
its numbers measure nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gpu_cases import (
    EXACT,
    Case,
    Context,
    Outcome,
    Skip,
    autopart_module,
    buffer_check,
    exact_cases,
    gib,
    matrix_cases,
    measured_cases,
    memory_cap,
    peak_cases,
    peak_outcome,
    recompute_check,
    sgd,
    synchronize,
    timed_steps,
    update_error,
)
from gpu_models import linear_stack
from gpu_offload_speed import OffloadSpeed
from gpu_overhead import Overhead

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

#: Seconds a section may run before its remaining cases are skipped: about 9 minutes in all.
BUDGETS = {
    "matrix": 160,
    "exact": 30,
    "measured": 50,
    "peak": 25,
    "overhead": 60,
    "offload": 100,
    "floors": 120,
}
#: The most one case may run: a hung case fails rather than eat the rest of the run.
CASE_LIMIT_S = 100
DETAIL = 100  # characters of detail a table row shows
TRACEBACK_LINES = 40  # the end of each failure's traceback, printed above the table


@dataclass(frozen=True)
class Row:
    name: str
    result: str  # PASS, FAIL or SKIP
    value: str
    seconds: float
    detail: str


class Runner:
    """Runs the cases, each under a time limit and on its own: what one raises is its row."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.rows: list[Row] = []
        self.tracebacks: list[str] = []

    def section(self, name: str, cases: list[Case]) -> None:
        budget = BUDGETS[name]
        print(f"== {name} ({len(cases)} cases, {budget} s)")
        began = time.perf_counter()
        for label, case in cases:
            if time.perf_counter() - began > budget:
                self.record(Row(label, "SKIP", "", 0.0, f"out of time ({budget} s for {name})"))
            else:
                self.record(self.run(label, case))

    def run(self, label: str, case) -> Row:
        began = time.perf_counter()
        try:
            with time_limit(CASE_LIMIT_S):
                ok, value, detail = case()
            result = "PASS" if ok else "FAIL"
        except Skip as why:
            result, value, detail = "SKIP", "", str(why)
        except Exception as err:
            lines = traceback.format_exc().splitlines()[-TRACEBACK_LINES:]
            self.tracebacks.append("\n".join([f"-- {label}", *lines]))
            result, value, detail = "FAIL", "", first_line(err)
        finally:
            self.clean_up()
        return Row(label, result, value, time.perf_counter() - began, detail)

    def record(self, row: Row) -> None:
        self.rows.append(row)
        print(f"{row.result} {row.name} [{row.seconds:.1f} s] {row.value} {row.detail}")

    def clean_up(self) -> None:
        """Free what the case left, so the next one's memory numbers start clean."""
        gc.collect()
        if self.gpu:
            torch.cuda.empty_cache()

    def summary(self) -> str:
        counts = {r: sum(row.result == r for row in self.rows) for r in ("PASS", "FAIL", "SKIP")}
        width = max(len(row.name) for row in self.rows)
        lines = [
            "== summary: " + ", ".join(f"{n} {r}" for r, n in counts.items()),
            f"{'check':<{width}}  result  {'value':>10}  {'time':>6}  detail",
        ]
        for row in self.rows:
            lines.append(
                f"{row.name:<{width}}  {row.result:<6}  {row.value:>10}  "
                f"{row.seconds:5.1f}s  {row.detail[:DETAIL]}"
            )
        return "\n".join(lines)


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"the case ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- 5. offload under a memory cap -------------------------------------------------------------


@dataclass(frozen=True)
class OffloadRun:
    """What the offloaded training under the cap measured, for the cases that report it."""

    times: list[float]
    copied: int
    peak: int
    predicted: int


class OffloadSection:
    """Section 5's cases share one model, its data and the offloaded run's measurements."""

    def __init__(self, ctx: Context, args: argparse.Namespace) -> None:
        self.ctx = ctx
        self.args = args
        gen = torch.Generator().manual_seed(1)
        shape = (args.rows, args.width)
        self.data = [
            (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
            for _ in range(args.steps)
        ]
        need = 2 * args.layers * (args.width + 1) * args.width * 4  # parameters and gradients
        self.cap = int(args.cap_gb * 2**30) if args.cap_gb else 2 * need // 3
        self.run: OffloadRun | None = None

    @cached_property
    def base(self) -> nn.Sequential:
        return linear_stack(self.args.layers, self.args.width)

    def cases(self) -> list[Case]:
        device = self.ctx.device
        return [
            ("offload 1 planner w/o offload", self.planner_refuses),
            ("offload 1 plain under the cap", self.plain_runs_out),
            ("offload 2 trains = plain updates", self.trains_under_cap),
            ("offload 3 step vs plain", self.step_time),
            ("offload 3 host link", self.host_link),
            ("offload 4 peak pred/meas", self.peak),
            ("offload 5 recompute RNG", partial(recompute_check, device)),
            ("offload 6 BatchNorm buffers", partial(buffer_check, device)),
            ("offload 7 moved to GPU first", self.moved_first),
        ]

    def planner_refuses(self) -> Outcome:
        from autopart.capture import capture
        from autopart.cost import AnalyticCostModel, get_device_spec, local_device_spec
        from autopart.plan.planner import InfeasiblePlanError, PlanOptions, make_plan

        spec = local_device_spec(self.ctx.device) if self.ctx.gpu else get_device_spec("h100")
        graph = capture(self.base, (self.data[0][0][:1],))
        options = PlanOptions(devices=1, global_batch=self.args.rows, device_memory=self.cap)
        try:
            make_plan(graph, AnalyticCostModel(spec), options)
        except InfeasiblePlanError as err:
            return Outcome(True, "infeasible", str(err))
        return Outcome(False, "fits", "a plan fits the cap without offload")

    def plain_runs_out(self) -> Outcome:
        if not self.ctx.gpu:
            raise Skip("no CUDA: no cap")
        try:
            with memory_cap(self.ctx, self.cap):
                plain = copy.deepcopy(self.base).to(self.ctx.device)
                timed_steps(plain, sgd(plain.parameters()), self.data[:1], self.ctx.device)
        except torch.cuda.OutOfMemoryError:
            return Outcome(True, "OOM", f"out of memory under {gib(self.cap)}, as it must")
        return Outcome(False, "trained", f"plain PyTorch trained under {gib(self.cap)}")

    def trains_under_cap(self) -> Outcome:
        """Offload under the cap, against the same SGD steps in plain PyTorch on the same
        device, uncapped (the same kernels: a CPU reference differs by rounding where an
        update is small against its weight)."""
        device = self.ctx.device
        model = copy.deepcopy(self.base)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        synchronize(self.ctx)
        baseline = torch.cuda.memory_allocated(device) if self.ctx.gpu else 0
        with memory_cap(self.ctx, self.cap):
            wrapped = autopart_module(
                model, sgd(model.parameters()), offload=True, microbatches=1, device_memory=self.cap
            )
            with torch.no_grad():
                wrapped(self.data[0][0].to(device))  # plan and build, outside the timing
            if self.ctx.gpu:
                torch.cuda.reset_peak_memory_stats(device)
            copied = wrapped.offload.copied_bytes
            losses, times = timed_steps(wrapped, wrapped.optimizer, self.data, device)
            peak = torch.cuda.max_memory_allocated(device) - baseline if self.ctx.gpu else 0
        predicted = wrapped.plan.stages[0].memory_bytes
        self.run = OffloadRun(times, wrapped.offload.copied_bytes - copied, peak, predicted)
        reference = copy.deepcopy(self.base).to(device)
        ref_losses, _ = timed_steps(reference, sgd(reference.parameters()), self.data, device)
        worst = update_error(dict(wrapped.named_parameters()), reference, initial)
        del reference
        return Outcome(
            worst < EXACT,
            f"{worst:.1e}",
            f"worst update rel. error {worst:.1e} (pass < {EXACT:g}); losses "
            f"{losses[-1]:.5f} vs plain {ref_losses[-1]:.5f}",
        )

    def measured_run(self) -> OffloadRun:
        if self.run is None:
            raise Skip("the offloaded training (step 2) did not run")
        return self.run

    def step_time(self) -> Outcome:
        run = self.measured_run()
        plain = copy.deepcopy(self.base).to(self.ctx.device)
        _, plain_times = timed_steps(plain, sgd(plain.parameters()), self.data, self.ctx.device)
        offload = statistics.median(run.times[1:] or run.times)
        uncapped = statistics.median(plain_times[1:] or plain_times)
        return Outcome(
            True,
            f"x{offload / uncapped:.2f}",
            f"step: offload {offload * 1e3:.0f} ms, plain PyTorch uncapped {uncapped * 1e3:.0f} ms",
        )

    def host_link(self) -> Outcome:
        from autopart.cost.probe import measure_host_link

        run = self.measured_run()
        raw = measure_host_link(self.ctx.device)
        achieved = run.copied / sum(run.times)
        return Outcome(
            True,
            f"{raw / 1e9:.1f} GB/s",
            f"one large pinned copy {raw / 1e9:.1f} GB/s; offload moved "
            f"{gib(run.copied / len(run.times))} a step, {achieved / 1e9:.1f} GB/s",
        )

    def peak(self) -> Outcome:
        run = self.measured_run()
        if not self.ctx.gpu:
            raise Skip(f"no CUDA: predicted {gib(run.predicted)}, nothing measured")
        return peak_outcome(run.peak, run.predicted, "max_memory_allocated")

    def moved_first(self) -> Outcome:
        """The model moved to the GPU before wrapping, with a plan that offloads: after the
        first call the host-placed parameters must have left the device."""
        from autopart.config import Offload

        device = self.ctx.device
        synchronize(self.ctx)
        baseline = torch.cuda.memory_allocated(device) if self.ctx.gpu else 0
        model = copy.deepcopy(self.base).to(device)
        wrapped = autopart_module(
            model, sgd(model.parameters()), offload=True, microbatches=1, device_memory=self.cap
        )
        with torch.no_grad():
            wrapped(self.data[0][0].to(device))
        synchronize(self.ctx)
        resident = torch.cuda.memory_allocated(device) - baseline if self.ctx.gpu else 0
        stage = wrapped.plan.stages[0]
        if stage.offload == Offload.NONE:
            return Outcome(False, "", "the plan does not offload")
        timed_steps(wrapped, wrapped.optimizer, self.data[:1], device)
        if not self.ctx.gpu:
            raise Skip(f"no CUDA: trained; predicted {gib(stage.memory_bytes)}, nothing measured")
        return peak_outcome(resident, stage.memory_bytes, "allocated after the first call", True)


# -- the run -----------------------------------------------------------------------------------


def sections(ctx: Context, args: argparse.Namespace) -> dict[str, list[Case]]:
    offload = OffloadSection(ctx, args)
    small = partial(linear_stack, 4, 1024)
    return {
        "matrix": matrix_cases(ctx),
        "exact": exact_cases(ctx),
        "measured": measured_cases(ctx, small),
        "peak": peak_cases(ctx),
        "overhead": Overhead(ctx).cases(),
        "offload": offload.cases(),
        "floors": OffloadSpeed(
            ctx, args.gpt_layers, args.gpt_width, args.gpt_seq, args.gpt_cap_gb, args.profile_dir
        ).cases(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated sections: " + ", ".join(BUDGETS))
    parser.add_argument("--layers", type=int, default=12, help="offload: Linear layers")
    parser.add_argument("--width", type=int, default=8192, help="offload: their width")
    parser.add_argument("--rows", type=int, default=64, help="offload: batch rows")
    parser.add_argument("--steps", type=int, default=3, help="offload: training steps")
    parser.add_argument("--cap-gb", type=float, help="GPU memory cap (default: 2/3 of need)")
    parser.add_argument("--gpt-layers", type=int, default=12, help="floors: GPT-2 layers")
    parser.add_argument("--gpt-width", type=int, default=2048, help="floors: GPT-2 width")
    parser.add_argument("--gpt-seq", type=int, default=512, help="floors: sequence length")
    parser.add_argument("--gpt-cap-gb", type=float, default=6.0, help="floors: GPU memory cap")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
        help="floors: write a profile of one offloaded step here (default: $OUT, if set)",
    )
    parser.add_argument("--cpu-dry-run", action="store_true", help="check the script on a CPU")
    args = parser.parse_args()
    args.only = args.only.split(",") if args.only else list(BUDGETS)
    unknown = set(args.only) - set(BUDGETS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    if args.cpu_dry_run:
        args.layers, args.width, args.rows = 4, 128, 8
        args.gpt_layers, args.gpt_width, args.gpt_seq = 2, 64, 32
    return args


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # read back through a tail, as it goes
    args = parse_args()
    gpu = not args.cpu_dry_run
    if gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        # Measured costs start cold, so the measured section times a real profiling run.
        os.environ["AUTOPART_CACHE_DIR"] = str(Path(tmp) / "profiles")
        import transformers

        name = torch.cuda.get_device_name(device) if gpu else "cpu (dry run)"
        print(f"device {name}; torch {torch.__version__}; transformers {transformers.__version__}")
        ctx = Context(gpu, device, Path(tmp))
        runner = Runner(gpu)
        for section, cases in sections(ctx, args).items():
            if section in args.only:
                runner.section(section, cases)
    if dist.is_initialized():  # else torch warns at exit, after the table
        dist.destroy_process_group()
    print("\n".join(runner.tracebacks))
    print(runner.summary())
    return 1 if any(row.result == "FAIL" for row in runner.rows) else 0


if __name__ == "__main__":
    sys.exit(main())

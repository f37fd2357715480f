"""Offload on a real GPU whose memory is capped below what the model needs to train.

    python bench/gpu_check.py [--layers 12] [--width 8192] [--steps 3]

One process, one GPU.  The model is a stack of ``--layers`` square Linear+ReLU layers
(12 x 8192: 3.2 GB of fp32 parameters, so parameters + gradients + Adam state are 12.9 GB).
``torch.cuda.set_per_process_memory_fraction`` caps this process at ``--cap-gb`` (default: a
third of that), and the planner is told the same capacity.  The script shows, in order:

1. without offload, the planner reports that no plan fits (and a plain training step on the
   GPU runs out of memory under the cap);
2. with ``offload=True`` the model trains, and its losses equal those of the same model, data
   and optimizer in plain PyTorch on the CPU;
3. the step time of offload against plain PyTorch on the same GPU without the cap, and the
   host-to-device bandwidth: a raw pinned copy, and what offload achieved per step;
4. the planner's predicted peak for the offloaded stage next to
   ``torch.cuda.max_memory_allocated``.

TF32 is off so the GPU and CPU runs compute in the same precision.  It exits 2 without a GPU.
``--cpu-dry-run`` runs the same steps on the CPU with a small model and without the cap or
any CUDA measurement, so the script itself can be checked where there is no GPU (the tests do);
its numbers measure nothing about offload on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def build(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks)


def batches(steps: int, rows: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(rows, width, generator=gen), torch.randn(rows, width, generator=gen))
        for _ in range(steps)
    ]


def train(model, opt, data, device) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for x, y in data:
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return losses, times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cap-gb", type=float, help="GPU memory cap (default: a third of need)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="check the script on a CPU")
    args = parser.parse_args()
    if args.cpu_dry_run:
        args.layers, args.width, args.rows = 4, 128, 8
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a machine with a GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import autopart
    from autopart.capture import capture
    from autopart.cost import AnalyticCostModel, get_device_spec, local_device_spec
    from autopart.cost.probe import measure_host_link
    from autopart.cost.units import format_bytes
    from autopart.plan.planner import InfeasiblePlanError, PlanOptions, make_plan

    gpu = not args.cpu_dry_run
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        name, total = "cpu (dry run: no cap, no CUDA measurements)", 0
    base = build(args.layers, args.width)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    need = 4 * weights  # parameters, gradients, two Adam moments
    cap = int(args.cap_gb * 2**30) if args.cap_gb else need // 3
    data = batches(args.steps, args.rows, args.width)
    print(f"device: {name}, {format_bytes(total)}; torch {torch.__version__}")
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}): parameters "
        f"{format_bytes(weights)}, with gradients and Adam state {format_bytes(need)}; "
        f"cap {format_bytes(cap)}"
    )

    # 1. Without offload: the planner says no, and so does the GPU.
    spec = local_device_spec(device) if gpu else get_device_spec("h100")
    graph = capture(base, (data[0][0][:1],))
    options = PlanOptions(devices=1, global_batch=args.rows, device_memory=cap)
    try:
        make_plan(graph, AnalyticCostModel(spec), options)
        print("1. planner without offload: a plan fits (unexpected)")
    except InfeasiblePlanError as err:
        print(f"1. planner without offload: infeasible: {str(err)[:160]}...")
    if gpu:
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
        plain = copy.deepcopy(base).to(device)
        try:
            train(plain, torch.optim.Adam(plain.parameters(), lr=1e-4), data[:1], device)
            print("   plain PyTorch under the cap: trained (unexpected)")
        except torch.cuda.OutOfMemoryError:
            print("   plain PyTorch under the cap: out of memory")
        del plain
        torch.cuda.empty_cache()

    # 2. With offload, under the cap.
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    wrapped = autopart.Module(model, opt, offload=True, microbatches=1, device_memory=cap)
    with torch.no_grad():
        wrapped(data[0][0].to(device))  # plan (for this batch) and build, outside the timing
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    copied = wrapped.offload.copied_bytes
    losses, times = train(wrapped, opt, data, device)
    peak = torch.cuda.max_memory_allocated(device) if gpu else 0
    copied = wrapped.offload.copied_bytes - copied
    stage = wrapped.plan.stages[0]
    reference = copy.deepcopy(base)
    ref_losses, _ = train(
        reference, torch.optim.Adam(reference.parameters(), lr=1e-4), data, torch.device("cpu")
    )
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    print(f"2. offload under the cap: losses {[f'{v:.6f}' for v in losses]}")
    print(f"   CPU reference:          losses {[f'{v:.6f}' for v in ref_losses]}")
    print(f"   largest relative difference {worst:.2e} ({'equal' if worst < 1e-4 else 'DIFFER'})")
    del wrapped, model, opt

    # 3. Step time against plain PyTorch on the same GPU without the cap, and bandwidth.
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    plain = copy.deepcopy(base).to(device)
    _, plain_times = train(plain, torch.optim.Adam(plain.parameters(), lr=1e-4), data, device)
    del plain
    raw = measure_host_link(device)
    offload_step = statistics.median(times[1:] or times)
    plain_step = statistics.median(plain_times[1:] or plain_times)
    print(
        f"3. step: offload {offload_step * 1e3:.0f} ms, plain PyTorch (no cap) "
        f"{plain_step * 1e3:.0f} ms: offload costs {offload_step / plain_step:.2f}x"
    )
    print(
        f"   host-to-device: one large copy {raw / 1e9:.1f} GB/s; offload moved "
        f"{format_bytes(copied / len(times))} per step, {copied / sum(times) / 1e9:.1f} GB/s"
    )
    measured = (
        f"torch.cuda.max_memory_allocated {format_bytes(peak)} "
        f"({(stage.memory_bytes - peak) / peak:+.1%})"
        if gpu
        else "nothing measured (no CUDA)"
    )
    print(f"4. offloaded stage: predicted peak {format_bytes(stage.memory_bytes)}, {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

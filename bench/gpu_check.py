"""Offload on a real GPU whose memory is capped below what the model needs to train.

    python bench/gpu_check.py [--layers 12] [--width 8192] [--steps 3]

One process, one GPU.  The model is a stack of ``--layers`` square Linear+ReLU layers
(12 x 8192: 3.2 GB of fp32 parameters, so parameters + gradients are 6.4 GB; SGD keeps no
state).
``torch.cuda.set_per_process_memory_fraction`` caps this process at ``--cap-gb`` (default: two
thirds of that), and the planner is told the same capacity.  The script shows, in order:

1. without offload, the planner reports that no plan fits (and a plain training step on the
   GPU runs out of memory under the cap);
2. with ``offload=True`` the model trains, and each parameter's update over the steps equals
   that of the same model, data and optimizer (SGD, whose update is the gradient itself) in
   plain PyTorch on the CPU, in relative norm; a doubled or dropped gradient is off by 1;
3. the step time of offload against plain PyTorch on the same GPU without the cap, and the
   host-to-device bandwidth: a raw pinned copy, and what offload achieved per step;
4. the planner's predicted peak for the offloaded stage next to
   ``torch.cuda.max_memory_allocated``;
5. recomputation replays the device RNG: with dropout, gradients with recomputation equal
   those without, from the same seed;
6. BatchNorm buffers live on the device and the user's model sees them: after training, its
   ``state_dict()`` holds the stage's running statistics, not the initial ones.

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


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05)


def relative_update_error(model, reference, initial) -> float:
    """The largest relative norm error of a parameter's update against the reference's."""
    worst = 0.0
    got = dict(model.named_parameters())
    for name, ref in reference.named_parameters():
        want = (ref.detach() - initial[name]).double()
        diff = got[name].detach().cpu().double() - initial[name].double() - want
        worst = max(worst, float(diff.norm() / want.norm().clamp_min(1e-30)))
    return worst


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
    parser.add_argument("--cap-gb", type=float, help="GPU memory cap (default: 2/3 of need)")
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
    need = 2 * weights  # parameters and gradients (plain SGD keeps no state)
    cap = int(args.cap_gb * 2**30) if args.cap_gb else 2 * need // 3
    data = batches(args.steps, args.rows, args.width)
    print(f"device: {name}, {format_bytes(total)}; torch {torch.__version__}")
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}): parameters "
        f"{format_bytes(weights)}, with gradients {format_bytes(need)}; "
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
            train(plain, sgd(plain.parameters()), data[:1], device)
            print("   plain PyTorch under the cap: trained (unexpected)")
        except torch.cuda.OutOfMemoryError:
            print("   plain PyTorch under the cap: out of memory")
        del plain
        torch.cuda.empty_cache()

    # 2. With offload, under the cap.
    model = copy.deepcopy(base)
    initial = {name: p.detach().clone() for name, p in base.named_parameters()}
    opt = sgd(model.parameters())
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
    ref_losses, _ = train(reference, sgd(reference.parameters()), data, torch.device("cpu"))
    worst = relative_update_error(model, reference, initial)
    print(f"2. offload under the cap: losses {[f'{v:.6f}' for v in losses]}")
    print(f"   CPU reference:          losses {[f'{v:.6f}' for v in ref_losses]}")
    print(f"   parameter updates: largest relative error {worst:.2e} ")
    print(f"   ({'equal' if worst < 1e-3 else 'DIFFER'})")
    del wrapped, model, opt

    # 3. Step time against plain PyTorch on the same GPU without the cap, and bandwidth.
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    plain = copy.deepcopy(base).to(device)
    _, plain_times = train(plain, sgd(plain.parameters()), data, device)
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
    print(f"5. recompute with dropout: {recompute_check(autopart, device)}")
    print(f"6. BatchNorm buffers: {buffer_check(autopart, device)}")
    return 0


def recompute_check(autopart, device: torch.device) -> str:
    """Gradients of a dropout model with its stage recomputing equal those without."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 64), nn.Dropout(0.5))
    wrapped = autopart.Module(net, stages=1, microbatches=2)
    x = torch.randn(8, 64, device=device)
    with torch.no_grad():
        wrapped(x)
    grads = []
    for recompute in (True, False):
        wrapped.schedule.stage.recompute = recompute
        for param in wrapped.parameters():
            param.grad = None
        torch.manual_seed(7)
        if device.type == "cuda":
            torch.cuda.manual_seed(7)
        wrapped(x).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in wrapped.parameters()])
    worst = max(float((a - b).abs().max()) for a, b in zip(*grads, strict=True))
    return f"largest gradient difference {worst:.2e} ({'equal' if worst < 1e-6 else 'DIFFER'})"


def buffer_check(autopart, device: torch.device) -> str:
    """After training, the user's model reports the stage's live BatchNorm statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))
    wrapped = autopart.Module(net, stages=1, microbatches=1)
    for _ in range(3):
        wrapped(torch.randn(8, 16, device=device) + 3.0).pow(2).mean().backward()
    stats = net.state_dict()["1.running_mean"]
    live = wrapped.stage_module.get_submodule("1").running_mean
    same = stats.device == live.device and torch.equal(stats, live)
    moved = float(stats.abs().max()) > 0.1  # the initial statistics are zeros
    counted = int(net.state_dict()["1.num_batches_tracked"])
    ok = same and moved and counted == 3
    return (
        f"running_mean on {stats.device}, the stage's: {same}, moved from zero: {moved}, "
        f"num_batches_tracked {counted} ({'equal' if ok else 'DIFFER'})"
    )


if __name__ == "__main__":
    sys.exit(main())

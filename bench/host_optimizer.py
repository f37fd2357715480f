"""The host optimizer step of an offloaded stage against torch's AdamW on the same parameters.

    .venv/bin/python bench/host_optimizer.py [--layers 6] [--width 1024] [--steps 7]

One process, one rank.  A GPT-2-shaped model is wrapped with ``offload=True`` (parameters and
AdamW state in host memory) and trained one step so that every parameter has a gradient; then
``optimizer.step()`` of the wrapped model (autopart's host step, hooks included) is timed
against ``torch.optim.AdamW`` over copies of the same parameters and gradients in each of its
CPU implementations: the default (a per-parameter loop on the CPU), ``foreach=True`` and
``fused=True``.  The contenders alternate step by step; medians are reported, beside the
host-memory floor: the 28 bytes per parameter AdamW must read and write (parameter, gradient
and two moments read, three written) at the bandwidth of one large copy.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import autopart
from autopart.cli.models import gpt2
from autopart.cost.probe import measure_memory_bandwidth
from autopart.runtime.transport.distenv import free_port, set_local_launch_env

#: Bytes AdamW reads and writes per fp32 parameter: p, g, m, v read; p, m, v written.
ADAMW_BYTES = 28


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    set_local_launch_env(0, 1, free_port())
    os.environ.setdefault("AUTOPART_CACHE_DIR", "/tmp/autopart-bench-cache")
    model, (sample,) = gpt2(
        n_layer=args.layers, n_embd=args.width, n_head=16, seq=64, vocab=8192, dropout=0.0
    )
    baselines = {
        "torch AdamW (default)": {},
        "torch AdamW foreach": {"foreach": True},
        "torch AdamW fused": {"fused": True},
    }
    copies = {name: copy.deepcopy(model) for name in baselines}
    wrapped = autopart.Module(
        model, torch.optim.AdamW(model.parameters(), lr=1e-4), offload=True, cost="analytic"
    )
    ids = sample.repeat(2, 1)
    wrapped(ids, labels=ids).loss.backward()
    assert wrapped.plan is not None and wrapped.plan.stages[0].offload.value != "none"
    grads = {n: p.grad for n, p in wrapped.named_parameters()}
    optimizers = {"autopart (offload=True)": wrapped.optimizer}
    for name, options in baselines.items():
        for pname, param in copies[name].named_parameters():
            param.grad = grads[pname].clone()
        optimizers[name] = torch.optim.AdamW(copies[name].parameters(), lr=1e-4, **options)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for step in range(args.steps + 1):  # the first step makes the state: not timed
        for name, optimizer in optimizers.items():
            began = time.perf_counter()
            optimizer.step()
            if step:
                times[name].append(time.perf_counter() - began)
    params = sum(p.numel() for p in model.parameters())
    floor = ADAMW_BYTES * params / measure_memory_bandwidth(torch.device("cpu"))
    ours = statistics.median(times["autopart (offload=True)"])
    print(f"{params / 1e6:.1f} M parameters, {torch.get_num_threads()} threads")
    print("| step | median ms | autopart / this |")
    print("| --- | --- | --- |")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"| {name} | {1e3 * median:.1f} | {ours / median:.2f} |")
    print(
        f"| host-memory floor ({ADAMW_BYTES} B/param at one copy's bandwidth) | "
        f"{1e3 * floor:.1f} | {ours / floor:.2f} |"
    )


if __name__ == "__main__":
    main()

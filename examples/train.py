"""The one-line change, end to end: an ordinary training script wrapped by autopart.

    torchrun --nproc-per-node 2 examples/train.py --steps 20

Every rank builds the same model and reads its own slice of each batch; autopart plans on the
first call and trains the stages across the ranks torchrun started.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autopart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model = autopart.Module(model, optimizer, stages=args.stages)  # the added line

    rank, world = dist.get_rank(), dist.get_world_size()
    teacher = torch.Generator().manual_seed(1)
    projection = torch.randn(32, 4, generator=teacher)
    data = torch.Generator().manual_seed(2)
    for step in range(args.steps):
        x = torch.randn(args.batch_size * world, 32, generator=data)
        y = (x @ projection).argmax(dim=1)
        mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        loss = F.cross_entropy(model(x[mine]), y[mine])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step == 0 or step == args.steps - 1):
            print(f"step {step} loss {loss.item():.4f} plan {model.plan.num_stages} stage(s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

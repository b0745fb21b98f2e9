"""A small data-parallel training for the framework tests (tests/mpi.rs), as a user writes it.

It sets none of the rendezvous variables: init_process_group's default `env://` reads RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which ferry sets in every task of a container step
(or torchrun sets for its workers). Gloo on CPUs, so it runs on nodes without GPUs.

Usage: python3 train.py [CHECKPOINT_DIR]
Prints one line per rank: `rank R of N on HOST local L loss X params P`; the loss is the
final model's loss averaged over every rank's data and P a sum over the model's parameters,
so both are the same on every rank when the ranks trained together. Rank 0 saves the
model's state into CHECKPOINT_DIR/model.pt and prints `saved PATH`.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

STEPS = 5


def main():
    checkpoint_dir = sys.argv[1] if len(sys.argv) > 1 else None
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batch
    x = torch.randn(64, 8, generator=data)
    y = x.sum(dim=1, keepdim=True)

    for _ in range(STEPS):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()  # DDP averages the gradients
        optimizer.step()

    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(model(x), y)
    dist.all_reduce(loss)
    loss /= world
    params = sum(p.detach().sum().item() for p in model.parameters())
    # One write per line, newline included: the ranks of a node share one stdout, and
    # print's text and end are two writes when Python's output is unbuffered.
    say = lambda line: print(line + "\n", end="", flush=True)  # noqa: E731
    say(
        f"rank {rank} of {world} on {socket.gethostname()} "
        f"local {os.environ.get('LOCAL_RANK', '?')} loss {loss.item():.6f} params {params:.6f}"
    )
    if rank == 0 and checkpoint_dir:
        path = os.path.join(checkpoint_dir, "model.pt")
        torch.save(model.module.state_dict(), path)
        say(f"saved {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A torch.distributed all_reduce over every rank: proves the launcher's rendezvous works.

Each rank contributes rank + 1, so the sum is world·(world+1)/2 on every rank. Uses gloo
(CPU) unless CUDA is present, then NCCL. Each rank also prints its OMP_NUM_THREADS and torch's
intra-op thread count (the launcher derives the first from the CPUs Slurm gave the node).
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist


def main() -> None:
    """Join the process group, all_reduce, print one line per rank."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if backend == "nccl" else "cpu"
    x = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(x)
    line = (f"allreduce rank={rank}/{world} node_rank={os.environ.get('NODE_RANK')} host={socket.gethostname()} "
            f"master={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} sum={x.item():g} "
            f"expected={world * (world + 1) / 2:g} omp={os.environ.get('OMP_NUM_THREADS', '')} "
            f"torch_threads={torch.get_num_threads()}\n")
    # One write of the whole line: ranks of a node share stdout, and with PYTHONUNBUFFERED print()
    # writes the text and its newline separately, so lines of two ranks could run together.
    sys.stdout.write(line)
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

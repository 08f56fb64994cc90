"""The process group and the few collectives the trainer uses.

    info = init_distributed(timeout_s)       # torchrun's environment, or one process
    barrier(); all_reduce_sum(t); any_rank(flag)

gloo on CPU, NCCL on GPUs, chosen automatically. The engines that train on top
of it: `pretrain.engine`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return DistInfo(rank, world, local, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; identity for one process). float64 on CPU for exactness."""
    out = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank (every rank gets the same answer)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)

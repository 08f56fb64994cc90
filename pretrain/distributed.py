"""The process group and the few collectives the trainer uses.

    info = init_distributed(timeout_s)       # torchrun's environment, or one process
    barrier(); all_reduce_sum(t); any_rank(flag)

On GPUs the group has two backends, `cpu:gloo,cuda:nccl`: tensors on the GPU (the
engines' collectives, the per-step loss sums) go over NCCL, CPU tensors (the flags of
`any_rank`, evaluation totals) over gloo; NCCL alone cannot reduce a CPU tensor. On CPU
it is gloo. The engines that train on top of it: `pretrain.engine`.
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


def group_backend(device_type: str) -> str:
    """The process group's backend for a job on `device_type` ("cuda" or "cpu")."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_distributed(timeout_s: int = 600, backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run alone.
    `backend`: default `group_backend` of the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend or group_backend(device.type),
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return DistInfo(rank, world, local, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; identity for one process), on the backend of the tensor's
    device. Loss sums are float64 so that the token-weighted mean does not depend on
    the world size beyond the last bits."""
    out = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank (every rank gets the same answer); a CPU
    tensor over gloo, so it never waits on the GPU stream."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)

"""The training engines behind one interface, built by one factory: `build_engine`.

    engine = build_engine(model, cfg, info)           # distributed.backend: none | fsdp | deepspeed
    loss = engine.forward(input_ids, reset, labels)   # (B, S) ids, targets -> mean loss
    logits = engine.forward(input_ids, reset)          # without labels: (B, S, V) logits
    engine.backward(loss / grad_accum)                 # once per micro batch
    grad_norm, stepped = engine.step(lr, skip=False)   # the accumulation boundary
    engine.save(folder); engine.load(folder, with_optimizer=True)

Backends: "none" and "fsdp" (`torch_engine.TorchEngine`: torch AdamW, DCP
checkpoints), "deepspeed" (`deepspeed_engine.DeepSpeedEngine`: ZeRO 1/2/3,
DeepSpeed's checkpoint). Checkpoint formats: `pretrain.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import TrainConfig
from ..distributed import DistInfo
from .common import lm_loss
from .deepspeed_engine import DeepSpeedEngine
from .torch_engine import TorchEngine


class Engine(Protocol):
    module: nn.Module

    def forward(self, input_ids: torch.Tensor, reset: torch.Tensor | None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The mean next-token loss given `labels` (the LM head fused with the loss,
        model/head.py: no (B, S, V) logits kept), else the logits."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float, skip: bool = False) -> tuple[float, bool]:
        """Clip, check and update; returns (global grad norm before clipping, stepped).
        A non-finite norm, or `skip`, drops this step's gradients and updates nothing."""
        ...

    def local_shards(self) -> list[torch.Tensor]:
        """This rank's disjoint share of the (master) weights."""
        ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path, with_optimizer: bool = True) -> None: ...


def build_engine(model: nn.Module, cfg: TrainConfig, info: DistInfo) -> Engine:
    """The engine of `cfg.distributed.backend` around `model` (wrapped in place)."""
    if cfg.distributed.backend == "deepspeed":
        return DeepSpeedEngine(model, cfg, info)
    return TorchEngine(model, cfg, info)


__all__ = ["DeepSpeedEngine", "Engine", "TorchEngine", "build_engine", "lm_loss"]

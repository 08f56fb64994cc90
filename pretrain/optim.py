"""AdamW with parameter groups, and the learning-rate schedule.

The schedule is a pure function of the step, so its checkpointed state is the
step itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimizerConfig, ScheduleConfig


def param_kind(module: nn.Module, name: str, param: nn.Parameter) -> str:
    """'embedding', 'norm', 'bias' or 'weight' for a parameter of `module`.

    Biases include gate biases; 'norm' covers norm scales and other vectors
    (such as the mLSTM's learnable skip)."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if name == "bias" or name.endswith("bias"):
        return "bias"
    if "norm" in type(module).__name__.lower() or param.ndim <= 1:
        return "norm"
    return "weight"


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Two groups: with weight decay and without (kinds in cfg.no_decay)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            kind = param_kind(module, name, param)
            (no_decay if kind in cfg.no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class AdamW(torch.optim.AdamW):
    """torch's AdamW that keeps its own implementation choice (fused or foreach) when a
    state saved by another one is loaded: `load_state_dict` replaces every group's
    settings with the saved ones, and checkpoints written before the fused update was
    chosen say foreach. The math and the saved state are the same either way."""

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        impl = [(g.get("foreach"), g.get("fused")) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (foreach, fused) in zip(self.param_groups, impl):
            group["foreach"], group["fused"] = foreach, fused


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain (not sharded
    DTensor) floating tensors on CPU or CUDA. On one CPU core it updates the 125M
    preset's 339 tensors in 0.21 s against 0.85 s for the foreach update."""
    return all(type(p) in (torch.Tensor, nn.Parameter) and p.device.type in ("cpu", "cuda")
               and p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`: the fused kernel where it applies, else foreach."""
    groups = param_groups(model, cfg)
    fused = _fused_ok([p for g in groups for p in g["params"]])
    return AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                 foreach=None if fused else True, fused=True if fused else None)


def lr_at(step: int, total_steps: int, lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then
    cosine to lr * min_lr_ratio, or WSD (constant, then linear decay over the
    last decay_fraction of the steps), or constant."""
    lo = lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return lr
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * progress))
    decay_start = int(total_steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return lr + (lo - lr) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

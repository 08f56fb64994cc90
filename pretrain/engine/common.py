"""What every engine shares: the loss, and the model preparation before wrapping.

Activation checkpointing wraps each block's forward (parameter names unchanged,
so checkpoints do not depend on it); compile compiles each block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DistributedConfig


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, S, V), labels (B, S), -100 ignored."""
    return nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100
    )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (parameter names stay unchanged)."""
    for block in model.blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def prepare_model(model: nn.Module, d: DistributedConfig) -> None:
    """distributed.activation_checkpointing and distributed.compile, in place."""
    if d.activation_checkpointing:
        enable_activation_checkpointing(model)
    if d.compile:
        for block in model.blocks:
            block.compile(backend=d.compile_backend)

"""xLSTM language models: the NeurIPS xLSTM[a:b] stack and the xLSTM-7B ("large") one.

Public entries:
    load_model_config(path_or_dict) -> XLSTMConfig | LargeConfig
    build_model(cfg, device=None, dtype=None) -> XLSTMLM | LargeLM
    count_parameters(model), flops_per_token(cfg, seq_len), weight_decay_groups(model, wd)
    model(idx, state=None, *, reset=None, return_state=False), model.step(idx, state),
    model.generate(prompt, max_new_tokens, temperature=, top_k=, top_p=, seed=)
"""

from __future__ import annotations

import torch

from .config import (
    LargeConfig,
    MLSTMBlockConfig,
    ModelConfig,
    SLSTMBlockConfig,
    XLSTMConfig,
    config_to_dict,
    load_model_config,
)
from .flops import flops_per_token
from .generate import sample_next
from .large import LargeLM
from .layers import CausalConv1d, HeadwiseLinear
from .xlstm import XLSTMLM

LM = XLSTMLM | LargeLM


def build_model(
    cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LM:
    """Build and initialize the model of `cfg` on `device` (``"meta"``: shapes only,
    no memory; materialize later with ``to_empty(device=...)`` + ``reset_parameters()``)."""
    with torch.device(device if device is not None else "cpu"):
        model = XLSTMLM(cfg) if isinstance(cfg, XLSTMConfig) else LargeLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (a tied LM head counts once)."""
    return sum(p.numel() for p in model.parameters())


def weight_decay_groups(
    model: torch.nn.Module, weight_decay: float, decay_embedding: bool = False
) -> list[dict]:
    """Optimizer param groups as in the official package: weight decay on the
    weights of projections, block-diagonal projections and convs (and the LM
    head when untied); none on biases, norms, the skip, sLSTM R and gate
    biases, and (unless `decay_embedding`) the embedding and a head tied to it."""
    embedding = model.embedding.weight
    decay = {
        id(mod.weight): mod.weight
        for mod in model.modules()
        if isinstance(mod, (torch.nn.Linear, HeadwiseLinear, CausalConv1d))
    }
    if decay_embedding:
        decay[id(embedding)] = embedding
    else:
        decay.pop(id(embedding), None)
    rest = [p for p in model.parameters() if id(p) not in decay]
    return [
        {"params": list(decay.values()), "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]

__all__ = [
    "LargeConfig",
    "LargeLM",
    "MLSTMBlockConfig",
    "ModelConfig",
    "SLSTMBlockConfig",
    "XLSTMConfig",
    "XLSTMLM",
    "build_model",
    "config_to_dict",
    "count_parameters",
    "flops_per_token",
    "load_model_config",
    "sample_next",
    "weight_decay_groups",
]

"""xLSTM language models: the NeurIPS xLSTM[a:b] stack and the xLSTM-7B ("large") one.

Public entries:
    load_model_config(path_or_dict) -> XLSTMConfig | LargeConfig
    build_model(cfg, device=None, dtype=None) -> XLSTMLM | LargeLM
    count_parameters(model), flops_per_token(cfg, seq_len)
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
]

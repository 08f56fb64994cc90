"""State-dict adapter from the official NX-AI `xlstm` package to our models.

`from_official_state_dict(cfg, sd)` maps the state dict of the official
NeurIPS ``xLSTMLMModel`` (cfg: XLSTMConfig) or of ``xLSTMLarge`` with
``weight_mode="single"`` (cfg: LargeConfig; the format of the released
NX-AI/xLSTM-7b weights) to a state dict that ``load_state_dict`` of our model
takes. Only tensors are touched; the official package is not imported.

Differences the mapping absorbs:
- official NeurIPS LayerNorm / group-norm weights are stored as offsets
  (scale = 1 + w); ours store the scale;
- the official sLSTM layer feeds its module named ``fgate`` into the input-gate
  slot and ``igate`` into the forget-gate slot (the names are swapped, the
  math is not): our ``igate`` takes their ``fgate`` and vice versa;
- official sLSTM recurrent kernel (vanilla layout) is (NH, 4*DH_out, DH_in)
  and its bias (4, NH, DH) flattened; ours are R: (NH, 4, DH_in, DH_out),
  bias: (NH, 4, DH);
- official conv weight (D, 1, K); ours (D, K).
"""

from __future__ import annotations

import torch

from .config import LargeConfig, ModelConfig, XLSTMConfig

StateDict = dict[str, torch.Tensor]


def from_official_state_dict(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """Official state dict -> ours, for the architecture of `cfg`."""
    out = _neurips(cfg, sd) if isinstance(cfg, XLSTMConfig) else _large(cfg, sd)
    if cfg.tie_weights:
        out.pop("lm_head.weight", None)
        out["lm_head.weight"] = out["embedding.weight"]
    return out


def _neurips(cfg: XLSTMConfig, sd: StateDict) -> StateDict:
    out: StateDict = {
        "embedding.weight": sd["token_embedding.weight"],
        "lm_head.weight": sd["lm_head.weight"],
        "out_norm.weight": 1.0 + sd["xlstm_block_stack.post_blocks_norm.weight"],
    }
    for j, kind in enumerate(cfg.block_types):
        src, dst = f"xlstm_block_stack.blocks.{j}.", f"blocks.{j}."
        out[dst + "norm.weight"] = 1.0 + sd[src + "xlstm_norm.weight"]
        if kind == "m":
            s, d = src + "xlstm.", dst + "mlstm."
            for name in ("proj_up", "q_proj", "k_proj", "v_proj", "proj_down"):
                out[d + f"{name}.weight"] = sd[s + f"{name}.weight"]
                if s + f"{name}.bias" in sd:
                    out[d + f"{name}.bias"] = sd[s + f"{name}.bias"]
            out[d + "conv.weight"] = sd[s + "conv1d.conv.weight"][:, 0, :]
            out[d + "conv.bias"] = sd[s + "conv1d.conv.bias"]
            for gate in ("igate", "fgate"):
                out[d + f"{gate}.weight"] = sd[s + f"mlstm_cell.{gate}.weight"]
                out[d + f"{gate}.bias"] = sd[s + f"mlstm_cell.{gate}.bias"]
            out[d + "outnorm.weight"] = 1.0 + sd[s + "mlstm_cell.outnorm.weight"]
            out[d + "skip"] = sd[s + "learnable_skip"]
        else:
            s, d = src + "xlstm.", dst + "slstm."
            nh = cfg.slstm.num_heads
            dh = cfg.embedding_dim // nh
            out[d + "conv.weight"] = sd[s + "conv1d.conv.weight"][:, 0, :]
            out[d + "conv.bias"] = sd[s + "conv1d.conv.bias"]
            out[d + "igate.weight"] = sd[s + "fgate.weight"]  # swapped names, see module doc
            out[d + "fgate.weight"] = sd[s + "igate.weight"]
            out[d + "zgate.weight"] = sd[s + "zgate.weight"]
            out[d + "ogate.weight"] = sd[s + "ogate.weight"]
            rec = sd[s + "slstm_cell._recurrent_kernel_"].reshape(nh, 4, dh, dh)  # [h, g, out, in]
            out[d + "R"] = rec.transpose(-1, -2).contiguous()  # [h, g, in, out]
            out[d + "bias"] = sd[s + "slstm_cell._bias_"].reshape(4, nh, dh).transpose(0, 1).contiguous()
            out[d + "outnorm.weight"] = 1.0 + sd[s + "group_norm.weight"]
            out[dst + "ffn_norm.weight"] = 1.0 + sd[src + "ffn_norm.weight"]
            out[dst + "ffn.proj_up.weight"] = sd[src + "ffn.proj_up.weight"]
            out[dst + "ffn.proj_down.weight"] = sd[src + "ffn.proj_down.weight"]
    return out


def _large(cfg: LargeConfig, sd: StateDict) -> StateDict:
    out: StateDict = {
        "embedding.weight": sd["embedding.weight"],
        "lm_head.weight": sd["lm_head.weight"],
        "out_norm.weight": sd["backbone.out_norm.weight"],
    }
    names = {  # ours -> theirs, inside one block
        "mlstm_norm": "norm_mlstm",
        "mlstm.q": "mlstm_layer.q",
        "mlstm.k": "mlstm_layer.k",
        "mlstm.v": "mlstm_layer.v",
        "mlstm.ogate": "mlstm_layer.ogate_preact",
        "mlstm.igate": "mlstm_layer.igate_preact",
        "mlstm.fgate": "mlstm_layer.fgate_preact",
        "mlstm.outnorm": "mlstm_layer.multihead_norm",
        "mlstm.proj_down": "mlstm_layer.out_proj",
        "ffn_norm": "norm_ffn",
        "ffn.gate": "ffn.proj_up_gate",
        "ffn.up": "ffn.proj_up",
        "ffn.down": "ffn.proj_down",
    }
    if cfg.use_bias:
        out["out_norm.bias"] = sd["backbone.out_norm.bias"]
    for j in range(cfg.num_blocks):
        for ours, theirs in names.items():
            for suffix in ("weight", "bias"):
                key = f"backbone.blocks.{j}.{theirs}.{suffix}"
                if key in sd:
                    out[f"blocks.{j}.{ours}.{suffix}"] = sd[key]
    return out

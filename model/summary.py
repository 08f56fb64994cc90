"""Architecture summary, parameter count and FLOPs per token of a preset.

    python -m model.summary configs/xlstm71-350m.yaml [--seq-len S]

prints the module tree, the block layout, a parameter breakdown, the forward
FLOPs per token and, last, the line ``parameters: N``. The model is built on
the meta device, so the 7B preset costs no memory.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .config import ModelConfig, XLSTMConfig, load_model_config
from .flops import flops_per_token


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def summarize(cfg: ModelConfig, seq_len: int | None = None) -> str:
    """The text `python -m model.summary` prints."""
    from . import build_model, count_parameters

    seq_len = seq_len or cfg.context_length
    model = build_model(cfg, device="meta")
    n_params = count_parameters(model)
    n_embed = model.embedding.weight.numel()
    n_head = 0 if cfg.tie_weights else model.lm_head.weight.numel()
    lines = [repr(model), ""]
    if isinstance(cfg, XLSTMConfig):
        kinds = cfg.block_types
        ratio = f"xLSTM[{kinds.count('m')}:{kinds.count('s')}]"
        lines.append(f"architecture: NeurIPS {ratio}, {cfg.num_blocks} blocks, sLSTM at {sorted(cfg.slstm_at)}")
        lines.append(f"  embedding_dim {cfg.embedding_dim}, mLSTM inner dim {cfg.mlstm_inner_dim}, "
                     f"mLSTM heads {cfg.mlstm.num_heads}, sLSTM heads {cfg.slstm.num_heads}, "
                     f"gated MLP dim {cfg.ffn_dim}")
    else:
        lines.append(f"architecture: large (xLSTM-7B type), {cfg.num_blocks} mLSTM blocks")
        lines.append(f"  embedding_dim {cfg.embedding_dim}, heads {cfg.num_heads}, qk dim {cfg.qk_dim}, "
                     f"v dim {cfg.v_dim}, SwiGLU dim {cfg.ffn_dim}")
    lines.append(f"  vocab {cfg.vocab_size}, context {cfg.context_length}, tied head: {cfg.tie_weights}")
    lines.append(f"embedding: {n_embed:,}  blocks: {n_params - n_embed - n_head:,}  lm head: {n_head:,}")
    fpt = flops_per_token(cfg, seq_len)
    lines.append(f"flops per token (forward, seq_len {seq_len}): {fpt:,} ({_human(fpt)}); "
                 f"training ~3x: {_human(3 * fpt)}")
    lines.append(f"parameters: {n_params}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.summary", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML preset with a model: section")
    parser.add_argument("--seq-len", type=int, default=None, help="length for FLOPs (default: context_length)")
    args = parser.parse_args(argv)
    try:
        cfg = load_model_config(args.config)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with torch.no_grad():
        print(summarize(cfg, args.seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FLOPs per token of a model config (what the trainer uses for MFU).

Forward FLOPs per token = 2 x (weights used in a multiply-add per token) +
the mLSTM cell's own work in its chunkwise form; see `flops_per_token`.
"""

from __future__ import annotations

from .config import LargeConfig, ModelConfig


def mlstm_cell_flops(num_heads: int, dqk: int, dv: int, chunk: int) -> int:
    """Forward FLOPs per token of the chunkwise mLSTM op, all heads.

    Per head, with L the chunk length: the intra-chunk (L x L) tiles
    q k^T and (.) v cost 2 L dqk + 2 L dv; the carried state read
    q^T C and q^T n cost 2 dqk dv + 2 dqk; the state update C += k v^T,
    n += k costs 2 dqk dv + 2 dqk. Gates, stabilizer and normalizer are
    O(L) elementwise work and left out.
    """
    return num_heads * (2 * chunk * (dqk + dv) + 4 * dqk * dv + 4 * dqk)


def matmul_weights(cfg: ModelConfig) -> int:
    """Weights that take part in a multiply-add per token (projections, block-
    diagonal projections, conv taps, sLSTM recurrent matrices, LM head; a tied
    head counts although its weight is shared with the embedding lookup)."""
    d, V = cfg.embedding_dim, cfg.vocab_size
    total = d * V  # LM head
    if isinstance(cfg, LargeConfig):
        qk, v, nh, h = cfg.qk_dim, cfg.v_dim, cfg.num_heads, cfg.ffn_dim
        per_block = 2 * d * qk + 2 * d * v + 2 * d * nh + v * d + 3 * d * h
        return total + cfg.num_blocks * per_block
    e, m, s = cfg.mlstm_inner_dim, cfg.mlstm, cfg.slstm
    mlstm = d * 2 * e + 3 * e * m.qkv_proj_blocksize + 2 * 3 * e * m.num_heads + e * m.conv_kernel_size + e * d
    dh = d // s.num_heads
    slstm = d * s.conv_kernel_size + 4 * d * dh + 4 * s.num_heads * dh * dh + 3 * d * cfg.ffn_dim
    for kind in cfg.block_types:
        total += mlstm if kind == "m" else slstm
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token at training length `seq_len`:

        2 * matmul_weights(cfg) + sum over mLSTM blocks of mlstm_cell_flops(...)

    with the chunk length min(cfg.chunk_size, seq_len). Training (forward +
    backward) is about 3x this; MFU = 3 * flops_per_token * tokens/s / peak.
    """
    chunk = min(cfg.chunk_size, seq_len)
    if isinstance(cfg, LargeConfig):
        nh = cfg.num_heads
        cell = cfg.num_blocks * mlstm_cell_flops(nh, cfg.qk_dim // nh, cfg.v_dim // nh, chunk)
    else:
        nh = cfg.mlstm.num_heads
        dh = cfg.mlstm_inner_dim // nh
        cell = cfg.block_types.count("m") * mlstm_cell_flops(nh, dh, dh, chunk)
    return 2 * matmul_weights(cfg) + cell

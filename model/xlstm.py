"""The NeurIPS 2024 xLSTM[a:b] language model (Beck et al., "xLSTM: Extended Long
Short-Term Memory"), read top to bottom:

    tokens -> embedding -> blocks (mLSTM or sLSTM, residual) -> LayerNorm -> LM head

mLSTM block (pre up-projection), with d = embedding dim, e = inner dim (2 d):
    x_in = LN(x);  (u, z) = split(W_up x_in)                  u, z: (B, S, e)
    c = SiLU(conv(u));  q = Wq c, k = Wk c (block-diagonal);  v = Wv u
    i~, f~ = W_i [q, k, v], W_f [q, k, v]                    (B, S, NH)
    h = GroupNorm_heads(mLSTM(q, k, v, i~, f~)) + skip * c
    x = x + W_down(h * SiLU(z))

sLSTM block (post up-projection):
    x_in = LN(x);  c = SiLU(conv(x_in))
    i~, f~ = Wi c, Wf c;  z~, o~ = Wz x_in, Wo x_in (block-diagonal, per head) + bias
    x = x + GroupNorm_heads(sLSTM(i~, f~, z~, o~; R))
    x = x + W_down(act(W_gate LN(x)) * W_up LN(x))               (gated MLP)

The cell math is in `xlstm_kernels` (mlstm_chunkwise / mlstm_step, slstm_sequence /
slstm_step); every block carries a recurrent state for generation:
mLSTM (conv buffer, (C, n, m)), sLSTM (conv buffer, (h, c, n, m)).
Initialization mirrors the official `xlstm` package (`reset_parameters`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import xlstm_kernels

from .config import XLSTMConfig
from .generate import GenerationMixin
from .head import LMHead
from .layers import (
    CausalConv1d,
    HeadwiseLinear,
    LayerNorm,
    MultiHeadNorm,
    gate_linear,
    norm_skip_gate,
    small_init_,
    wang_init_,
)

BlockState = tuple  # (conv buffer (B, K-1, D'), cell state tuple)


class MLSTMLayer(nn.Module):
    """Up-projection, conv, mLSTM cell, output gate, down-projection (no norm, no residual)."""

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.cfg = cfg
        d, e, m = cfg.embedding_dim, cfg.mlstm_inner_dim, cfg.mlstm
        self.num_heads = m.num_heads
        self.proj_up = nn.Linear(d, 2 * e, bias=cfg.bias)
        self.conv = CausalConv1d(e, m.conv_kernel_size)
        blocks = e // m.qkv_proj_blocksize
        self.q_proj = HeadwiseLinear(e, blocks, bias=cfg.bias)
        self.k_proj = HeadwiseLinear(e, blocks, bias=cfg.bias)
        self.v_proj = HeadwiseLinear(e, blocks, bias=cfg.bias)
        self.igate = nn.Linear(3 * e, m.num_heads)
        self.fgate = nn.Linear(3 * e, m.num_heads)
        self.outnorm = MultiHeadNorm(m.num_heads, e // m.num_heads, eps=cfg.norm_eps)
        self.skip = nn.Parameter(torch.ones(e))
        self.proj_down = nn.Linear(e, d, bias=cfg.bias)

    def reset_parameters(self) -> None:
        d = self.cfg.embedding_dim
        small_init_(self.proj_up.weight, d)
        wang_init_(self.proj_down.weight, d, self.cfg.num_blocks)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(proj.weight, d)
        for lin in (self.proj_up, self.proj_down, self.q_proj, self.k_proj, self.v_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.conv.reset_parameters()
        nn.init.zeros_(self.igate.weight)  # input gate: bias ~ N(0, 0.1)
        nn.init.normal_(self.igate.bias, std=0.1)
        nn.init.zeros_(self.fgate.weight)  # forget gate: bias linspace(3, 6) over heads
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        self.outnorm.reset_parameters()
        nn.init.ones_(self.skip)

    def forward(
        self, x: torch.Tensor, state: BlockState | None, reset: torch.Tensor | None, step: bool
    ) -> tuple[torch.Tensor, BlockState]:
        """x: (B, S, d) -> (B, S, d); step=True: S == 1 and one mlstm_step."""
        conv_state, cell_state = (None, None) if state is None else state
        u, z = self.proj_up(x).chunk(2, dim=-1)  # (B, S, e) each
        c, conv_state = self.conv(u, conv_state, reset)
        c = F.silu(c)
        q, k, v = self.q_proj(c), self.k_proj(c), self.v_proj(u)
        # both gates in one pass over q, k, v (the weights stay two Linears: same state dict)
        gates = gate_linear(q, k, v, torch.cat([self.igate.weight, self.fgate.weight]),
                            torch.cat([self.igate.bias, self.fgate.bias]))
        i, f = gates.split(self.num_heads, dim=-1)  # (B, S, NH) each

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, e) -> (B, NH, S, e / NH)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v, i, f = heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2)
        eps, backend = self.cfg.cell_eps, self.cfg.backend
        if step:
            h, cell_state = xlstm_kernels.mlstm_step(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], cell_state,
                eps=eps, backend=backend,
            )
            h = h[:, :, None]
        else:
            h, cell_state = xlstm_kernels.mlstm_chunkwise(
                q, k, v, i, f, chunk_size=self.cfg.chunk_size, initial_state=cell_state,
                return_last_state=True, reset=reset, eps=eps, backend=backend,
                recompute_states=self.cfg.recompute_states,
            )
        h = norm_skip_gate(h.transpose(1, 2), c, z, self.outnorm, self.skip)  # (B, S, e)
        return self.proj_down(h), (conv_state, cell_state)


class SLSTMLayer(nn.Module):
    """Conv, block-diagonal gate projections, sLSTM cell, per-head norm."""

    def __init__(self, cfg: XLSTMConfig, block_idx: int):
        super().__init__()
        self.cfg, self.block_idx = cfg, block_idx
        d, s = cfg.embedding_dim, cfg.slstm
        self.num_heads, self.head_dim = s.num_heads, d // s.num_heads
        self.conv = CausalConv1d(d, s.conv_kernel_size)
        self.igate = HeadwiseLinear(d, s.num_heads)
        self.fgate = HeadwiseLinear(d, s.num_heads)
        self.zgate = HeadwiseLinear(d, s.num_heads)
        self.ogate = HeadwiseLinear(d, s.num_heads)
        self.bias = nn.Parameter(torch.zeros(s.num_heads, 4, self.head_dim))  # gates (i, f, z, o)
        self.R = nn.Parameter(torch.zeros(s.num_heads, 4, self.head_dim, self.head_dim))
        self.outnorm = MultiHeadNorm(s.num_heads, self.head_dim, eps=cfg.norm_eps)

    def extra_repr(self) -> str:
        return f"R: {tuple(self.R.shape)} (heads, gates i f z o, DH, DH), bias: {tuple(self.bias.shape)}"

    def reset_parameters(self) -> None:
        d, n = self.cfg.embedding_dim, self.cfg.num_blocks
        self.conv.reset_parameters()
        for proj in (self.igate, self.fgate, self.zgate, self.ogate):
            small_init_(proj.weight, d)
        nn.init.zeros_(self.R)
        # forget gate bias "powerlaw_blockdependent": -(-5 + 12 (j / (DH-1))^(0.3 + 1.3 r)),
        # r = block_idx / (num_blocks - 1); the other gate biases are zero
        r = self.block_idx / (n - 1) if n > 1 else 0.0
        j = torch.arange(self.head_dim, dtype=torch.float32) / max(self.head_dim - 1, 1)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[:, 1] = 5.0 - 12.0 * j ** (0.3 + 1.3 * r)
        self.outnorm.reset_parameters()

    def forward(
        self, x: torch.Tensor, state: BlockState | None, reset: torch.Tensor | None, step: bool
    ) -> tuple[torch.Tensor, BlockState]:
        """x: (B, S, d) -> (B, S, d)."""
        conv_state, cell_state = (None, None) if state is None else state
        c, conv_state = self.conv(x, conv_state, reset)
        c = F.silu(c)
        gates = torch.stack([self.igate(c), self.fgate(c), self.zgate(x), self.ogate(x)], dim=2)
        gates = gates.unflatten(-1, (self.num_heads, self.head_dim))  # (B, S, 4, NH, DH)
        gates = gates.permute(0, 3, 1, 2, 4) + self.bias[:, None]  # (B, NH, S, 4, DH)
        if step:
            h, cell_state = xlstm_kernels.slstm_step(gates[:, :, 0], self.R, cell_state, backend=self.cfg.backend)
            h = h[:, :, None]
        else:
            h, cell_state = xlstm_kernels.slstm_sequence(
                gates, self.R, initial_state=cell_state, return_last_state=True, reset=reset,
                backend=self.cfg.backend,
            )
        return self.outnorm(h.transpose(1, 2)), (conv_state, cell_state)


class GatedMLP(nn.Module):
    """W_down(act(gate) * up), (gate, up) = split(W_up x)."""

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.embedding_dim, cfg.ffn_dim
        self.proj_up = nn.Linear(d, 2 * h, bias=cfg.bias)
        self.proj_down = nn.Linear(h, d, bias=cfg.bias)
        self.act = F.gelu if cfg.slstm.ffn_act == "gelu" else F.silu

    def reset_parameters(self) -> None:
        small_init_(self.proj_up.weight, self.cfg.embedding_dim)
        wang_init_(self.proj_down.weight, self.cfg.embedding_dim, self.cfg.num_blocks)
        for lin in (self.proj_up, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, d) -> (B, S, d)
        gate, up = self.proj_up(x).chunk(2, dim=-1)
        return self.proj_down(self.act(gate) * up)


class MLSTMBlock(nn.Module):
    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.embedding_dim, eps=cfg.norm_eps)
        self.mlstm = MLSTMLayer(cfg)

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.mlstm.reset_parameters()

    def forward(self, x, state=None, reset=None, step=False):
        y, state = self.mlstm(self.norm(x), state, reset, step)
        return x + y, state


class SLSTMBlock(nn.Module):
    def __init__(self, cfg: XLSTMConfig, block_idx: int):
        super().__init__()
        self.norm = LayerNorm(cfg.embedding_dim, eps=cfg.norm_eps)
        self.slstm = SLSTMLayer(cfg, block_idx)
        self.ffn_norm = LayerNorm(cfg.embedding_dim, eps=cfg.norm_eps)
        self.ffn = GatedMLP(cfg)

    def reset_parameters(self) -> None:
        for part in (self.norm, self.slstm, self.ffn_norm, self.ffn):
            part.reset_parameters()

    def forward(self, x, state=None, reset=None, step=False):
        y, state = self.slstm(self.norm(x), state, reset, step)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), state


class XLSTMLM(GenerationMixin, nn.Module):
    """NeurIPS xLSTM language model. Block i is sLSTM iff i in cfg.slstm_at."""

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.blocks = nn.ModuleList(
            SLSTMBlock(cfg, j) if kind == "s" else MLSTMBlock(cfg)
            for j, kind in enumerate(cfg.block_types)
        )
        self.out_norm = LayerNorm(cfg.embedding_dim, eps=cfg.norm_eps)
        self.lm_head = LMHead(cfg.embedding_dim, cfg.vocab_size)
        if cfg.tie_weights:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init (as the official package): small init for embedding,
        LM head and input projections, Wang init for projections into the
        residual, gate biases as documented in each layer, norms to one."""
        d = self.cfg.embedding_dim
        small_init_(self.embedding.weight, d)
        if not self.cfg.tie_weights:
            small_init_(self.lm_head.weight, d)
        for block in self.blocks:
            block.reset_parameters()
        self.out_norm.reset_parameters()

    def forward(
        self,
        idx: torch.Tensor,
        state: list[BlockState] | None = None,
        *,
        reset: torch.Tensor | None = None,
        return_state: bool = False,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[BlockState]]:
        """idx: (B, S) token ids -> logits (B, S, V) (float32 if the model is).

        state: per-block states from an earlier call (None: start empty);
        reset: bool (B, S), True at the first token of each packed document;
        labels: (B, S) next-token targets (-100: ignored): then the mean cross-entropy
        (float32 scalar) is returned instead of the logits, computed with the head fused
        with the loss so that no (B, S, V) logits are kept (model/head.py).
        """
        return self._run(idx, state, reset, return_state, step=False, labels=labels)

    def step(self, idx: torch.Tensor, state: list[BlockState] | None) -> tuple[torch.Tensor, list[BlockState]]:
        """One token per sequence with the recurrent ops: idx (B,) -> logits (B, V), new state."""
        logits, state = self._run(idx[:, None], state, None, True, step=True)
        return logits[:, 0], state

    def _run(self, idx, state, reset, return_state, step, labels=None):
        x = self.embedding(idx)
        new_state = []
        for j, block in enumerate(self.blocks):
            x, s = block(x, None if state is None else state[j], reset, step)
            new_state.append(s)
        out = self.lm_head(self.out_norm(x), labels)  # logits, or the loss given labels
        return (out, new_state) if return_state else out

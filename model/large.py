"""The xLSTM-7B ("large") language model (Beck et al. 2025, "xLSTM 7B: A Recurrent
LLM for Fast and Efficient Inference"), read top to bottom:

    tokens -> embedding -> blocks -> RMSNorm -> LM head -> 30 tanh(logits / 30)

block:
    x = x + mLSTMLayer(RMSNorm(x))
    x = x + W_down(SiLU(W_gate RMSNorm(x)) * W_up RMSNorm(x))         (SwiGLU)

mLSTMLayer, with d = embedding dim, qk dim = d/2, v dim = d (all heads together):
    q, k, v, o~ = Wq x, Wk x, Wv x, Wo x                  dense projections
    i~, f~ = 15 tanh(W_i x / 15), 15 tanh(W_f x / 15)       (B, S, NH), soft-capped
    h = LayerNorm_heads(mLSTM(q, k, v, i~, f~))
    y = W_out(sigmoid(o~) * h)

State for generation: (C, n, m) per block, no conv. Initialization mirrors the
official training code (xlstm-jax, mlstm_v1 layer): small init for embedding,
LM head, q, k, v and the SwiGLU input projections; Wang init for the two
projections into the residual; zero weights for the gates and the output
gate; input-gate bias -10, forget-gate bias linspace(3, 6) over heads. `init: torch` in
the config keeps PyTorch's defaults instead (which suits which scale: configs/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import xlstm_kernels

from .config import LargeConfig
from .generate import GenerationMixin
from .head import LMHead
from .layers import MultiHeadNorm, RMSNorm, small_init_, soft_cap, wang_init_

CellState = tuple  # (C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH))


class MLSTMLayer(nn.Module):
    def __init__(self, cfg: LargeConfig):
        super().__init__()
        self.cfg = cfg
        d, nh, bias = cfg.embedding_dim, cfg.num_heads, cfg.use_bias
        self.num_heads = nh
        self.q = nn.Linear(d, cfg.qk_dim, bias=bias)
        self.k = nn.Linear(d, cfg.qk_dim, bias=bias)
        self.v = nn.Linear(d, cfg.v_dim, bias=bias)
        self.ogate = nn.Linear(d, cfg.v_dim, bias=bias)
        self.igate = nn.Linear(d, nh, bias=True)
        self.fgate = nn.Linear(d, nh, bias=True)
        self.outnorm = MultiHeadNorm(nh, cfg.v_dim // nh, eps=cfg.norm_eps, bias=bias)
        self.proj_down = nn.Linear(cfg.v_dim, d, bias=bias)

    def reset_parameters(self) -> None:
        cfg = self.cfg
        d = cfg.embedding_dim
        for lin in (self.q, self.k, self.v):
            small_init_(lin.weight, d)
        nn.init.zeros_(self.ogate.weight)
        wang_init_(self.proj_down.weight, d, cfg.num_blocks)
        for lin in (self.q, self.k, self.v, self.ogate, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.igate.weight)
        nn.init.constant_(self.igate.bias, cfg.igate_bias_init)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(*cfg.fgate_bias_init, self.num_heads))
        self.outnorm.reset_parameters()

    def forward(
        self, x: torch.Tensor, state: CellState | None, reset: torch.Tensor | None, step: bool
    ) -> tuple[torch.Tensor, CellState]:
        """x: (B, S, d) -> (B, S, d); step=True: S == 1 and one mlstm_step."""
        cap, eps, backend = self.cfg.gate_soft_cap, self.cfg.cell_eps, self.cfg.backend

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, NH*DH) -> (B, NH, S, DH)
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # both skinny gate projections as one matmul (the weights stay two Linears)
        gates = F.linear(x, torch.cat([self.igate.weight, self.fgate.weight]),
                         torch.cat([self.igate.bias, self.fgate.bias]))
        i, f = soft_cap(gates, cap).transpose(1, 2).split(self.num_heads, dim=1)  # (B, NH, S) each
        if step:
            h, state = xlstm_kernels.mlstm_step(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], state,
                eps=eps, backend=backend,
            )
            h = h[:, :, None]
        else:
            h, state = xlstm_kernels.mlstm_chunkwise(
                q, k, v, i, f, chunk_size=self.cfg.chunk_size, initial_state=state,
                return_last_state=True, reset=reset, eps=eps, backend=backend,
                recompute_states=self.cfg.recompute_states,
            )
        h = self.outnorm(h.transpose(1, 2))  # (B, S, v dim)
        return self.proj_down(torch.sigmoid(self.ogate(x)) * h), state


class SwiGLU(nn.Module):
    def __init__(self, cfg: LargeConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.embedding_dim, cfg.ffn_dim
        self.gate = nn.Linear(d, h, bias=cfg.use_bias)
        self.up = nn.Linear(d, h, bias=cfg.use_bias)
        self.down = nn.Linear(h, d, bias=cfg.use_bias)

    def reset_parameters(self) -> None:
        d = self.cfg.embedding_dim
        small_init_(self.gate.weight, d)
        small_init_(self.up.weight, d)
        wang_init_(self.down.weight, d, self.cfg.num_blocks)
        for lin in (self.gate, self.up, self.down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, d) -> (B, S, d)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LargeBlock(nn.Module):
    def __init__(self, cfg: LargeConfig):
        super().__init__()
        self.mlstm_norm = RMSNorm(cfg.embedding_dim, eps=cfg.norm_eps, bias=cfg.use_bias)
        self.mlstm = MLSTMLayer(cfg)
        self.ffn_norm = RMSNorm(cfg.embedding_dim, eps=cfg.norm_eps, bias=cfg.use_bias)
        self.ffn = SwiGLU(cfg)

    def reset_parameters(self) -> None:
        for part in (self.mlstm_norm, self.mlstm, self.ffn_norm, self.ffn):
            part.reset_parameters()

    def forward(self, x, state=None, reset=None, step=False):
        y, state = self.mlstm(self.mlstm_norm(x), state, reset, step)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), state


class LargeLM(GenerationMixin, nn.Module):
    """xLSTM-7B architecture language model."""

    def __init__(self, cfg: LargeConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.blocks = nn.ModuleList(LargeBlock(cfg) for _ in range(cfg.num_blocks))
        self.out_norm = RMSNorm(cfg.embedding_dim, eps=cfg.norm_eps, bias=cfg.use_bias)
        self.lm_head = LMHead(cfg.embedding_dim, cfg.vocab_size, cfg.logit_soft_cap)
        if cfg.tie_weights:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.cfg.init == "torch":  # PyTorch's own defaults, module by module
            for mod in self.modules():
                if isinstance(mod, nn.Linear) and not (self.cfg.tie_weights and mod is self.lm_head):
                    nn.Linear.reset_parameters(mod)
                elif isinstance(mod, nn.Embedding):
                    nn.Embedding.reset_parameters(mod)
                elif isinstance(mod, (RMSNorm, MultiHeadNorm)):
                    mod.reset_parameters()
            return
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
        state: list[CellState] | None = None,
        *,
        reset: torch.Tensor | None = None,
        return_state: bool = False,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[CellState]]:
        """idx: (B, S) -> soft-capped logits (B, S, V); state, reset and labels (the loss
        instead of the logits) as `XLSTMLM.forward`."""
        return self._run(idx, state, reset, return_state, step=False, labels=labels)

    def step(self, idx: torch.Tensor, state: list[CellState] | None) -> tuple[torch.Tensor, list[CellState]]:
        """One token per sequence: idx (B,) -> logits (B, V), new state."""
        logits, state = self._run(idx[:, None], state, None, True, step=True)
        return logits[:, 0], state

    def _run(self, idx, state, reset, return_state, step, labels=None):
        x = self.embedding(idx)
        new_state = []
        for j, block in enumerate(self.blocks):
            x, s = block(x, None if state is None else state[j], reset, step)
            new_state.append(s)
        out = self.lm_head(self.out_norm(x), labels)  # soft-capped logits, or the loss
        return (out, new_state) if return_state else out


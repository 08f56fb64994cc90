"""State-dict adapter between our models and the official NX-AI `xlstm` package.

`from_official_state_dict(cfg, sd)` maps the state dict of the official
NeurIPS ``xLSTMLMModel`` (cfg: XLSTMConfig) or of ``xLSTMLarge`` with
``weight_mode="single"`` (cfg: LargeConfig; the layout of the released
NX-AI/xLSTM-7b weights) to ours; `to_official_state_dict` is the inverse.
Only tensors are touched; the official package is not imported.

`mapping(cfg)` lists every pair (our key, their key, theirs->ours, ours->theirs).
Differences it absorbs:
- official NeurIPS LayerNorm / group-norm weights are offsets (scale = 1 + w);
  ours store the scale;
- the official sLSTM layer feeds its module named ``fgate`` into the input-gate
  slot and ``igate`` into the forget-gate slot (the names are swapped, the
  math is not): our ``igate`` is their ``fgate`` and vice versa;
- official sLSTM recurrent kernel (vanilla layout) (NH, 4*DH_out, DH_in) and
  bias (4*NH*DH,) in gate-major order; ours R: (NH, 4, DH_in, DH_out) and
  bias (NH, 4, DH);
- official conv weight (D, 1, K); ours (D, K).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .config import LargeConfig, ModelConfig, XLSTMConfig

StateDict = dict[str, torch.Tensor]
Fn = Callable[[torch.Tensor], torch.Tensor]
Pair = tuple[str, str, Fn, Fn]  # (ours, theirs, theirs -> ours, ours -> theirs)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _plus_one(t: torch.Tensor) -> torch.Tensor:
    return t + 1.0


def _minus_one(t: torch.Tensor) -> torch.Tensor:
    return t - 1.0


def _conv_in(t: torch.Tensor) -> torch.Tensor:
    return t[:, 0, :]


def _conv_out(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, :]


def mapping(cfg: ModelConfig) -> Iterator[Pair]:
    """Every parameter pair of the architecture of `cfg` (the LM head only when untied)."""
    if isinstance(cfg, XLSTMConfig):
        yield from _neurips(cfg)
    else:
        yield from _large(cfg)


def from_official_state_dict(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """Official state dict -> ours (what our model's ``load_state_dict`` takes)."""
    out = {ours: to_ours(sd[theirs]) for ours, theirs, to_ours, _ in mapping(cfg) if theirs in sd}
    if cfg.tie_weights:
        out["lm_head.weight"] = out["embedding.weight"]
    return out


def to_official_state_dict(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """Our state dict -> the official one."""
    out = {theirs: to_theirs(sd[ours]) for ours, theirs, _, to_theirs in mapping(cfg) if ours in sd}
    if cfg.tie_weights:
        out["lm_head.weight"] = out[_embedding_key(cfg)]
    return out


def _embedding_key(cfg: ModelConfig) -> str:
    return "token_embedding.weight" if isinstance(cfg, XLSTMConfig) else "embedding.weight"


def _neurips(cfg: XLSTMConfig) -> Iterator[Pair]:
    nh = cfg.slstm.num_heads
    dh = cfg.embedding_dim // nh

    def r_in(t):  # (NH, 4*DH_out, DH_in) -> (NH, 4, DH_in, DH_out)
        return t.reshape(nh, 4, dh, dh).transpose(-1, -2).contiguous()

    def r_out(t):
        return t.transpose(-1, -2).reshape(nh, 4 * dh, dh).contiguous()

    def b_in(t):  # (4*NH*DH,) gate-major -> (NH, 4, DH)
        return t.reshape(4, nh, dh).transpose(0, 1).contiguous()

    def b_out(t):
        return t.transpose(0, 1).reshape(-1).contiguous()

    yield "embedding.weight", "token_embedding.weight", _same, _same
    if not cfg.tie_weights:
        yield "lm_head.weight", "lm_head.weight", _same, _same
    yield "out_norm.weight", "xlstm_block_stack.post_blocks_norm.weight", _plus_one, _minus_one
    for j, kind in enumerate(cfg.block_types):
        src, dst = f"xlstm_block_stack.blocks.{j}.", f"blocks.{j}."
        yield dst + "norm.weight", src + "xlstm_norm.weight", _plus_one, _minus_one
        if kind == "m":
            s, d = src + "xlstm.", dst + "mlstm."
            for name in ("proj_up", "q_proj", "k_proj", "v_proj", "proj_down"):
                yield d + f"{name}.weight", s + f"{name}.weight", _same, _same
                if cfg.bias:
                    yield d + f"{name}.bias", s + f"{name}.bias", _same, _same
            yield d + "conv.weight", s + "conv1d.conv.weight", _conv_in, _conv_out
            yield d + "conv.bias", s + "conv1d.conv.bias", _same, _same
            for gate in ("igate", "fgate"):
                yield d + f"{gate}.weight", s + f"mlstm_cell.{gate}.weight", _same, _same
                yield d + f"{gate}.bias", s + f"mlstm_cell.{gate}.bias", _same, _same
            yield d + "outnorm.weight", s + "mlstm_cell.outnorm.weight", _plus_one, _minus_one
            yield d + "skip", s + "learnable_skip", _same, _same
        else:
            s, d = src + "xlstm.", dst + "slstm."
            yield d + "conv.weight", s + "conv1d.conv.weight", _conv_in, _conv_out
            yield d + "conv.bias", s + "conv1d.conv.bias", _same, _same
            yield d + "igate.weight", s + "fgate.weight", _same, _same  # swapped names, see above
            yield d + "fgate.weight", s + "igate.weight", _same, _same
            yield d + "zgate.weight", s + "zgate.weight", _same, _same
            yield d + "ogate.weight", s + "ogate.weight", _same, _same
            yield d + "R", s + "slstm_cell._recurrent_kernel_", r_in, r_out
            yield d + "bias", s + "slstm_cell._bias_", b_in, b_out
            yield d + "outnorm.weight", s + "group_norm.weight", _plus_one, _minus_one
            yield dst + "ffn_norm.weight", src + "ffn_norm.weight", _plus_one, _minus_one
            for name in ("proj_up", "proj_down"):
                yield dst + f"ffn.{name}.weight", src + f"ffn.{name}.weight", _same, _same
                if cfg.bias:
                    yield dst + f"ffn.{name}.bias", src + f"ffn.{name}.bias", _same, _same


def _large(cfg: LargeConfig) -> Iterator[Pair]:
    yield "embedding.weight", "embedding.weight", _same, _same
    if not cfg.tie_weights:
        yield "lm_head.weight", "lm_head.weight", _same, _same
    norms = {"mlstm_norm": "norm_mlstm", "ffn_norm": "norm_ffn"}
    linears = {  # ours -> theirs inside a block: (name, has a bias)
        "mlstm.q": ("mlstm_layer.q", cfg.use_bias),
        "mlstm.k": ("mlstm_layer.k", cfg.use_bias),
        "mlstm.v": ("mlstm_layer.v", cfg.use_bias),
        "mlstm.ogate": ("mlstm_layer.ogate_preact", cfg.use_bias),
        "mlstm.igate": ("mlstm_layer.igate_preact", True),
        "mlstm.fgate": ("mlstm_layer.fgate_preact", True),
        "mlstm.proj_down": ("mlstm_layer.out_proj", cfg.use_bias),
        "ffn.gate": ("ffn.proj_up_gate", cfg.use_bias),
        "ffn.up": ("ffn.proj_up", cfg.use_bias),
        "ffn.down": ("ffn.proj_down", cfg.use_bias),
    }
    yield "out_norm.weight", "backbone.out_norm.weight", _same, _same
    if cfg.use_bias:
        yield "out_norm.bias", "backbone.out_norm.bias", _same, _same
    for j in range(cfg.num_blocks):
        src, dst = f"backbone.blocks.{j}.", f"blocks.{j}."
        for ours, theirs in norms.items():
            yield dst + f"{ours}.weight", src + f"{theirs}.weight", _same, _same
            if cfg.use_bias:
                yield dst + f"{ours}.bias", src + f"{theirs}.bias", _same, _same
        yield dst + "mlstm.outnorm.weight", src + "mlstm_layer.multihead_norm.weight", _same, _same
        if cfg.use_bias:
            yield dst + "mlstm.outnorm.bias", src + "mlstm_layer.multihead_norm.bias", _same, _same
        for ours, (theirs, has_bias) in linears.items():
            yield dst + f"{ours}.weight", src + f"{theirs}.weight", _same, _same
            if has_bias:
                yield dst + f"{ours}.bias", src + f"{theirs}.bias", _same, _same


# ------------------------------------------------------------------ the official models


def build_official_model(cfg: ModelConfig) -> torch.nn.Module:
    """The official package's model of `cfg` (float32), for tests and benchmarks
    only: NeurIPS `xLSTMLMModel` (mLSTM parallel form, sLSTM vanilla backend) or
    `xLSTMLarge` with its native PyTorch kernels. Imports `xlstm` lazily; our
    models never need it."""
    return _official_neurips(cfg) if isinstance(cfg, XLSTMConfig) else _official_large(cfg)


def _official_neurips(cfg: XLSTMConfig) -> torch.nn.Module:
    """The official xLSTMLMModel of `cfg`: mLSTM cell in its parallel form,
    sLSTM on the vanilla (pure PyTorch) backend, float32."""
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMLMModel,
        xLSTMLMModelConfig,
    )

    m, s = cfg.mlstm, cfg.slstm
    ocfg = xLSTMLMModelConfig(
        vocab_size=cfg.vocab_size,
        embedding_dim=cfg.embedding_dim,
        num_blocks=cfg.num_blocks,
        context_length=cfg.context_length,
        slstm_at=list(cfg.slstm_at),
        tie_weights=cfg.tie_weights,
        bias=cfg.bias,
        mlstm_block=mLSTMBlockConfig(
            mlstm=mLSTMLayerConfig(
                conv1d_kernel_size=m.conv_kernel_size,
                qkv_proj_blocksize=m.qkv_proj_blocksize,
                num_heads=m.num_heads,
                proj_factor=m.proj_factor,
            )
        ),
        slstm_block=sLSTMBlockConfig(
            slstm=sLSTMLayerConfig(
                backend="vanilla",
                num_heads=s.num_heads,
                conv1d_kernel_size=s.conv_kernel_size,
                bias_init="powerlaw_blockdependent",
                dtype="float32",
            ),
            feedforward=FeedForwardConfig(
                proj_factor=s.ffn_proj_factor, act_fn=s.ffn_act, bias=cfg.bias
            ),
        ),
    )
    model = xLSTMLMModel(ocfg)
    model.reset_parameters()
    return model


def _official_large(cfg: LargeConfig) -> torch.nn.Module:
    """The official xLSTMLarge with its native PyTorch kernels (chunkwise)."""
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    ocfg = xLSTMLargeConfig(
        embedding_dim=cfg.embedding_dim,
        num_heads=cfg.num_heads,
        num_blocks=cfg.num_blocks,
        vocab_size=cfg.vocab_size,
        use_bias=cfg.use_bias,
        norm_eps=cfg.norm_eps,
        qk_dim_factor=cfg.qk_dim_factor,
        v_dim_factor=cfg.v_dim_factor,
        chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native",
        step_kernel="native",
        mode="train",
        chunk_size=cfg.chunk_size,
        return_last_states=True,
        autocast_kernel_dtype="float32",
        eps=cfg.cell_eps,
        ffn_proj_factor=cfg.ffn_proj_factor,
        ffn_round_up_to_multiple_of=cfg.ffn_round_up_to,
        gate_soft_cap=cfg.gate_soft_cap,
        output_logit_soft_cap=cfg.logit_soft_cap,
        weight_mode="single",
    )
    return xLSTMLarge(ocfg)

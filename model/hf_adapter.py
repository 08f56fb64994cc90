"""Adapter between our large (xLSTM-7B) architecture and `transformers`' xLSTM
(`xLSTMForCausalLM`, ``model_type: "xlstm"``, the layout of the published
NX-AI/xLSTM-7b weights): config fields and parameter names, both ways.

Only configs and tensors are touched; `transformers` is not imported here
(`load_folder` reads safetensors files).

    check_hf_supported(cfg)                    # ValueError naming what cannot be expressed
    hf_config = to_hf_config(cfg, bos_id=1, eos_id=2, pad_id=3)   # config.json content
    cfg = from_hf_config(hf_config)            # LargeConfig (ValueError if not expressible)
    for ours, theirs in hf_names(cfg): ...     # one tensor each, same shape and dtype
    hf_sd = to_hf_state_dict(cfg, our_sd);  our_sd = from_hf_state_dict(cfg, hf_sd)
    for ours, (theirs, rows) in hf_sources(cfg, hf_keys): ...      # import, fused layouts too
    model = load_folder(path)                  # --to safetensors or transformers folder -> ours

Names: transformers' model is ``backbone.embeddings``, ``backbone.blocks.<j>.*``
(the official `xlstm` package's mLSTMBlock names: ``norm_mlstm``,
``mlstm_layer.{q,k,v,ogate_preact,igate_preact,fgate_preact,multihead_norm,out_proj}``,
``norm_ffn``, ``ffn.{proj_up_gate,proj_up,proj_down}``), ``backbone.out_norm``
and ``lm_head``; every pair maps a tensor to a tensor of the same shape (both
store norm scales, not offsets). The block names are shared with
`model.official` (the official ``xLSTMLarge``), whose embedding is called
``embedding`` instead. With ``weight_mode: "fused"`` (one q/k/v/o-gate
projection ``qkv_opreact``, one i/f-gate projection ``ifgate_preact``, one
``ffn.proj_up_gate_z``) an import reads row ranges of the fused tensors.

What transformers' config cannot express is refused rather than guessed: the
NeurIPS architecture (no transformers model), q/k or v widths that are not
multiples of 64 (transformers rounds them up to 64), gate or logit soft caps
turned off, a missing output norm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import LargeConfig, ModelConfig, XLSTMConfig, check_model_config
from .official import _large as _official_large_pairs

HF_MODEL_TYPE = "xlstm"
HF_ARCHITECTURE = "xLSTMForCausalLM"
HF_EMBEDDING = "backbone.embeddings.weight"
OFFICIAL_EMBEDDING = "embedding.weight"

StateDict = dict[str, torch.Tensor]
Rows = tuple[int, int] | None  # a row range [start, end) of the source tensor, None: all


def _round_up(x: float, multiple: int) -> int:
    return int(((x + multiple - 1) // multiple) * multiple)


def check_hf_supported(cfg: ModelConfig) -> None:
    """Raise ValueError (naming the key) if `cfg` has no exact transformers xLSTM equivalent."""
    if isinstance(cfg, XLSTMConfig):
        raise ValueError(
            "model.arch: 'xlstm' (the NeurIPS xLSTM[a:b] with sLSTM/mLSTM blocks) has no "
            "transformers model; transformers' xLSTM is the large (xLSTM-7B) architecture. "
            "Allowed: arch 'large' for --to hf; use --to safetensors for this model"
        )
    for name, width in (("qk_dim_factor", cfg.qk_dim), ("v_dim_factor", cfg.v_dim)):
        factor = getattr(cfg, name)
        if cfg.embedding_dim * factor != width or width % 64:
            raise ValueError(
                f"model.{name}: embedding_dim * {name} = {cfg.embedding_dim * factor:g} is not a "
                "multiple of 64; transformers' xLSTM rounds that width up to a multiple of 64, "
                "so the weights would not fit. Allowed values: factors giving multiples of 64"
            )
    for name in ("gate_soft_cap", "logit_soft_cap"):
        if getattr(cfg, name) is None:
            raise ValueError(
                f"model.{name}: null (no soft cap) cannot be expressed in transformers' xLSTM "
                "config; allowed values: a positive number"
            )


def to_hf_config(
    cfg: LargeConfig,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    dtype: str = "float32",
    kernel_dtype: str | None = None,
) -> dict[str, Any]:
    """transformers' ``config.json`` for `cfg` (its own field names).

    `kernel_dtype`: the mLSTM kernel's compute dtype (``autocast_kernel_dtype``);
    default: `dtype`, so a float32 export computes in float32 (transformers'
    own default is bfloat16)."""
    check_hf_supported(cfg)
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embedding_dim,
        "embedding_dim": cfg.embedding_dim,
        "num_hidden_layers": cfg.num_blocks,
        "num_blocks": cfg.num_blocks,
        "num_heads": cfg.num_heads,
        "use_bias": cfg.use_bias,
        "norm_reduction_force_float32": True,
        "tie_word_embeddings": cfg.tie_weights,
        "add_out_norm": True,
        "norm_eps": cfg.norm_eps,
        "qk_dim_factor": cfg.qk_dim_factor,
        "v_dim_factor": cfg.v_dim_factor,
        "chunkwise_kernel": "chunkwise--native_autograd",
        "sequence_kernel": "native_sequence__native",
        "step_kernel": "native",
        "mode": "inference",
        "chunk_size": cfg.chunk_size,
        "return_last_states": True,
        "autocast_kernel_dtype": kernel_dtype or dtype,
        "eps": cfg.cell_eps,
        "inference_state_dtype": "float32",
        "ffn_proj_factor": cfg.ffn_proj_factor,
        "ffn_round_up_to_multiple_of": cfg.ffn_round_up_to,
        "gate_soft_cap": cfg.gate_soft_cap,
        "output_logit_soft_cap": cfg.logit_soft_cap,
        "weight_mode": "single",
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "max_position_embeddings": cfg.context_length,  # informational: no positions
        "dtype": dtype,
    }


def from_hf_config(hf: Mapping[str, Any], **overrides: Any) -> LargeConfig:
    """Our LargeConfig for a transformers xLSTM ``config.json`` (defaults as
    transformers'). `overrides`: our fields that transformers does not store
    (context_length, backend, ...). ValueError naming the field if ours cannot express it."""
    if hf.get("model_type", HF_MODEL_TYPE) != HF_MODEL_TYPE:
        raise ValueError(
            f"config.json: model_type {hf.get('model_type')!r} is not transformers' xLSTM; "
            f"allowed values: {HF_MODEL_TYPE!r}"
        )
    if not hf.get("add_out_norm", True):
        raise ValueError("config.json: add_out_norm false (no output norm) is not supported; "
                         "allowed values: true")
    mode = hf.get("weight_mode", "single")
    if mode not in ("single", "fused"):
        raise ValueError(f"config.json: weight_mode {mode!r}; allowed values: 'single', 'fused'")
    d = hf.get("hidden_size") or hf.get("embedding_dim") or 4096
    fields = {
        "vocab_size": hf.get("vocab_size", 50304),
        "embedding_dim": d,
        "num_blocks": hf.get("num_hidden_layers") or hf.get("num_blocks") or 32,
        "num_heads": hf.get("num_heads", 8),
        "qk_dim_factor": float(hf.get("qk_dim_factor", 0.5)),
        "v_dim_factor": float(hf.get("v_dim_factor", 1.0)),
        "ffn_proj_factor": float(hf.get("ffn_proj_factor", 2.667)),
        "ffn_round_up_to": hf.get("ffn_round_up_to_multiple_of", 64),
        "gate_soft_cap": hf.get("gate_soft_cap", 15.0),
        "logit_soft_cap": hf.get("output_logit_soft_cap", 30.0),
        "tie_weights": bool(hf.get("tie_word_embeddings", False)),
        "use_bias": bool(hf.get("use_bias", False)),
        "norm_eps": float(hf.get("norm_eps", 1e-6)),
        "cell_eps": float(hf.get("eps", 1e-6)),
        "chunk_size": hf.get("chunk_size", 64),
    }
    if hf.get("max_position_embeddings"):
        fields["context_length"] = int(hf["max_position_embeddings"])
    fields.update(overrides)
    cfg = LargeConfig(**fields)
    check_model_config(cfg)
    check_hf_supported(cfg)
    return cfg


def hf_names(cfg: LargeConfig) -> Iterator[tuple[str, str]]:
    """(our key, transformers key) for every tensor of `cfg` (``weight_mode: single``);
    the LM head only when untied. Shapes are equal pair by pair."""
    check_hf_supported(cfg)
    for ours, theirs, _to_ours, _to_theirs in _official_large_pairs(cfg):
        yield ours, HF_EMBEDDING if theirs == OFFICIAL_EMBEDDING else theirs


def to_hf_state_dict(cfg: LargeConfig, sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Our state dict -> transformers' (a tied head is left to transformers to tie)."""
    return {theirs: sd[ours] for ours, theirs in hf_names(cfg)}


def _fused_rows(cfg: LargeConfig) -> dict[str, tuple[str, Rows]]:
    """Inside one block: our tensor -> (fused transformers tensor, row range)."""
    qk, v, nh, ffn = cfg.qk_dim, cfg.v_dim, cfg.num_heads, cfg.ffn_dim
    out: dict[str, tuple[str, Rows]] = {}
    for name, lo, hi in (("q", 0, qk), ("k", qk, 2 * qk), ("v", 2 * qk, 2 * qk + v),
                         ("ogate", 2 * qk + v, 2 * qk + 2 * v)):
        for part in ("weight", "bias"):
            out[f"mlstm.{name}.{part}"] = (f"mlstm_layer.qkv_opreact.{part}", (lo, hi))
    for name, lo, hi in (("igate", 0, nh), ("fgate", nh, 2 * nh)):
        for part in ("weight", "bias"):
            out[f"mlstm.{name}.{part}"] = (f"mlstm_layer.ifgate_preact.{part}", (lo, hi))
    for name, lo, hi in (("gate", 0, ffn), ("up", ffn, 2 * ffn)):
        for part in ("weight", "bias"):
            out[f"ffn.{name}.{part}"] = (f"ffn.proj_up_gate_z.{part}", (lo, hi))
    return out


def hf_sources(cfg: LargeConfig, keys: Iterable[str]) -> Iterator[tuple[str, tuple[str, Rows]]]:
    """For an import: (our key, (source key, row range)) for every tensor of our
    model, given the tensor names `keys` present in a transformers (or official
    ``xLSTMLarge``) checkpoint, ``single`` or ``fused`` weight mode. A tied
    model reads the embedding once (our ``lm_head.weight`` is the same tensor).
    KeyError naming the first missing tensor."""
    have = set(keys)
    fused = _fused_rows(cfg)
    embedding = HF_EMBEDDING if HF_EMBEDDING in have or OFFICIAL_EMBEDDING not in have \
        else OFFICIAL_EMBEDDING
    for ours, theirs in hf_names(cfg):
        source: tuple[str, Rows] = (embedding if theirs == HF_EMBEDDING else theirs, None)
        if source[0] not in have and ours.startswith("blocks."):
            _, j, inner = ours.split(".", 2)
            if inner in fused:
                name, rows = fused[inner]
                source = (f"backbone.blocks.{j}.{name}", rows)
        if source[0] not in have:
            raise KeyError(f"{theirs}: missing (needed for our {ours})")
        yield ours, source


def from_hf_state_dict(cfg: LargeConfig, sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers' (or official xLSTMLarge, single or fused) state dict -> ours."""
    out: StateDict = {}
    for ours, (theirs, rows) in hf_sources(cfg, sd.keys()):
        t = sd[theirs]
        out[ours] = t if rows is None else t[rows[0]:rows[1]]
    if cfg.tie_weights:
        out["lm_head.weight"] = out["embedding.weight"]
    return out


def describe_hf_mapping(cfg: LargeConfig) -> list[tuple[str, str]]:
    """The name mapping as a list (for documentation and error messages)."""
    return list(hf_names(cfg))


# ----------------------------------------------------------------------------- loading


def empty_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model of `cfg` with uninitialized memory on `device` (a tied head stays tied)."""
    from . import build_model

    model = build_model(cfg, device="meta").to_empty(device=device)
    if cfg.tie_weights:  # to_empty makes new parameters, one per module
        model.lm_head.weight = model.embedding.weight
    return model


def _safetensors_files(folder: Path) -> dict[str, Path]:
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), single)
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_folder(folder: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Our model (eval mode) from a folder of safetensors weights, one tensor at a
    time, with nothing but `model` and `safetensors`: a folder written by
    ``pretrain.convert --to safetensors`` (config.yaml, our names) or a
    transformers xLSTM folder (config.json, transformers' names)."""
    from safetensors import safe_open

    from .config import load_model_config

    folder = Path(folder)
    files = _safetensors_files(folder)
    if (folder / "config.yaml").is_file():
        cfg = load_model_config(folder / "config.yaml")
        sources: dict[str, tuple[str, Rows]] = {k: (k, None) for k in files}
    else:
        cfg = from_hf_config(json.loads((folder / "config.json").read_text()))
        sources = dict(hf_sources(cfg, files))
    model = empty_model(cfg, device)
    handles: dict[Path, Any] = {}
    with torch.no_grad():
        params = model.state_dict()
        missing = sorted(k for k in params if k not in sources
                         and not (cfg.tie_weights and k == "lm_head.weight"))
        if missing:
            raise KeyError(f"{folder}: tensors missing: {missing[:5]}")
        for key, target in params.items():
            if key not in sources:
                continue
            name, rows = sources[key]
            if files[name] not in handles:
                handles[files[name]] = safe_open(str(files[name]), framework="pt")
            sl = handles[files[name]].get_slice(name)
            t = sl[:] if rows is None else sl[rows[0]:rows[1]]
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(f"{folder}: {name} has shape {tuple(t.shape)}, the config "
                                 f"gives {tuple(target.shape)} for {key}")
            target.copy_(t)
    return model.eval()


__all__ = [
    "HF_ARCHITECTURE",
    "HF_EMBEDDING",
    "HF_MODEL_TYPE",
    "check_hf_supported",
    "describe_hf_mapping",
    "empty_model",
    "from_hf_config",
    "from_hf_state_dict",
    "hf_names",
    "hf_sources",
    "load_folder",
    "to_hf_config",
    "to_hf_state_dict",
]

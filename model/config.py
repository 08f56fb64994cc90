"""Model configs: one dataclass per architecture, loaded and checked from YAML.

Two architectures share this module:

- ``arch: xlstm``: the NeurIPS 2024 xLSTM[a:b] language model (mLSTM blocks
  with pre up-projection, sLSTM blocks with post up-projection at the indices
  in ``slstm_at``), `XLSTMConfig`;
- ``arch: large``: the mLSTM-only xLSTM-7B architecture, `LargeConfig`.

A preset is a YAML file whose ``model:`` section holds one of them; other
top-level sections (trainer, data, ...) are not read here. `load_model_config`
is the one public loader: it rejects unknown keys (naming the closest valid
one), values of the wrong type, and shapes that cannot work, each with a
``ValueError`` that names the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

Backend = Literal["auto", "torch", "triton"]


def round_up(x: float, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x (x may be fractional)."""
    return int(math.ceil(x / multiple) * multiple)


@dataclass
class MLSTMBlockConfig:
    """NeurIPS mLSTM block (pre up-projection)."""

    num_heads: int = 4
    """Heads of the mLSTM cell; they split the up-projected (inner) dim."""
    proj_factor: float = 2.0
    """inner dim = round_up(proj_factor * embedding_dim, round_up_to)."""
    round_up_to: int = 64
    conv_kernel_size: int = 4
    """Causal depthwise conv on the mLSTM path."""
    qkv_proj_blocksize: int = 4
    """q, k, v are block-diagonal projections with blocks of this size."""


@dataclass
class SLSTMBlockConfig:
    """NeurIPS sLSTM block (post up-projection: sLSTM, then a gated MLP)."""

    num_heads: int = 4
    conv_kernel_size: int = 4
    """Causal depthwise conv feeding the input and forget gates."""
    ffn_proj_factor: float = 1.3
    """Gated MLP width = round_up(ffn_proj_factor * embedding_dim, round_up_to)
    (the paper's factor 4/3; the official configs write 1.3, same width)."""
    ffn_act: Literal["gelu", "swish"] = "gelu"
    round_up_to: int = 64


@dataclass
class XLSTMConfig:
    """The NeurIPS xLSTM[a:b] language model."""

    arch: Literal["xlstm"] = "xlstm"
    vocab_size: int = 50304
    embedding_dim: int = 768
    num_blocks: int = 24
    slstm_at: list[int] = field(default_factory=list)
    """Block indices (0-based) that are sLSTM blocks; the rest are mLSTM."""
    context_length: int = 2048
    tie_weights: bool = False
    bias: bool = False
    """Biases in the projections (gates always have one)."""
    norm_eps: float = 1e-5
    mlstm: MLSTMBlockConfig = field(default_factory=MLSTMBlockConfig)
    slstm: SLSTMBlockConfig = field(default_factory=SLSTMBlockConfig)
    backend: Backend = "auto"
    """Kernel backend passed to the `xlstm_kernels` ops."""
    chunk_size: int = 64
    """Chunk length of the chunkwise mLSTM op."""
    recompute_states: bool = False
    """Triton mLSTM: rebuild the chunk states in the backward instead of saving them."""
    cell_eps: float = 1e-6
    """eps in the mLSTM normalizer."""

    @property
    def mlstm_inner_dim(self) -> int:
        return round_up(self.mlstm.proj_factor * self.embedding_dim, self.mlstm.round_up_to)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.slstm.ffn_proj_factor * self.embedding_dim, self.slstm.round_up_to)

    @property
    def block_types(self) -> list[str]:
        """'m' or 's' for every block, in order."""
        return ["s" if i in set(self.slstm_at) else "m" for i in range(self.num_blocks)]


@dataclass
class LargeConfig:
    """The xLSTM-7B ("large") architecture: mLSTM-only, RMSNorm, SwiGLU."""

    arch: Literal["large"] = "large"
    vocab_size: int = 50304
    embedding_dim: int = 4096
    num_blocks: int = 32
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to: int = 64
    gate_soft_cap: float | None = 15.0
    """Gate pre-activations g become cap * tanh(g / cap); None turns it off."""
    logit_soft_cap: float | None = 30.0
    init: Literal["xlstm7b", "torch"] = "xlstm7b"
    """Weight init: "xlstm7b" (the official 7B recipe: small/Wang normal inits, zero gate
    weights, input-gate bias `igate_bias_init`, forget-gate biases `fgate_bias_init`) or
    "torch" (PyTorch's defaults for every Linear and Embedding: Kaiming-uniform weights,
    uniform biases, N(0, 1) embedding; norms at one). Which suits which scale, as measured by
    benchmarks/quality.py: configs/README.md, "Init by scale"."""
    igate_bias_init: float = -10.0
    fgate_bias_init: list[float] = field(default_factory=lambda: [3.0, 6.0])
    """Forget-gate biases are linspace(start, end) over the heads."""
    context_length: int = 8192
    tie_weights: bool = False
    use_bias: bool = False
    norm_eps: float = 1e-6
    backend: Backend = "auto"
    chunk_size: int = 64
    recompute_states: bool = False
    cell_eps: float = 1e-6

    @property
    def qk_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.embedding_dim * self.ffn_proj_factor, self.ffn_round_up_to)


ModelConfig = XLSTMConfig | LargeConfig
ARCHS: dict[str, type] = {"xlstm": XLSTMConfig, "large": LargeConfig}


# ----------------------------------------------------------------------------- loading


def load_model_config(source: str | Path | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """Read and check a model config.

    source: a YAML path (its ``model:`` section is read, the rest ignored), a
    mapping holding a ``model`` key (same), the model section itself (``arch``
    defaults to ``xlstm``), or a config object (checked and returned).
    Raises ValueError naming the offending key and its allowed values.
    """
    if isinstance(source, (XLSTMConfig, LargeConfig)):
        check_model_config(source)
        return source
    if isinstance(source, (str, Path)):
        with open(source) as fh:
            doc = yaml.safe_load(fh)
        if not isinstance(doc, Mapping) or "model" not in doc:
            raise ValueError(f"{source}: expected a top-level 'model:' section")
        section = doc["model"]
    elif isinstance(source, Mapping):
        section = source["model"] if "model" in source else source
    else:
        raise ValueError(f"source: expected a YAML path or a mapping, got {type(source).__name__}")
    if not isinstance(section, Mapping):
        raise ValueError(f"model: expected a mapping, got {type(section).__name__}")
    arch = section.get("arch", "xlstm")
    if arch not in ARCHS:
        raise ValueError(f"model.arch: got {arch!r}, allowed values: {sorted(ARCHS)}")
    cfg = _build(ARCHS[arch], section, "model")
    check_model_config(cfg)
    return cfg


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain dict of a config (what goes into a checkpoint or a tracking run)."""
    return dataclasses.asdict(cfg)


def _build(cls: type, data: Mapping[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}.{key}: unknown key{hint} allowed keys: {names}")
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        allowed = list(typing.get_args(tp))
        if value not in allowed:
            raise ValueError(f"{where}: got {value!r}, allowed values: {allowed}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(inner, value, where)
        except ValueError as err:
            raise ValueError(f"{err} (or null)") from None
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list of {inner.__name__}, got {value!r}")
        return [_coerce(inner, v, f"{where}[{j}]") for j, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected a bool (true or false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")  # a bug in this module


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _need_divides(where: str, name: str, heads: int, dim_name: str, dim: int) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(
            f"{where}.{name}: {dim_name}={dim} is not divisible by {name}={heads}; "
            f"allowed values: {_divisors(dim)}"
        )


def _need_positive(where: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{where}.{name}: got {value!r}, allowed values: > 0")


def check_model_config(cfg: ModelConfig) -> None:
    """Shape checks that the types alone cannot express."""
    _need_positive(
        "model",
        vocab_size=cfg.vocab_size,
        embedding_dim=cfg.embedding_dim,
        num_blocks=cfg.num_blocks,
        context_length=cfg.context_length,
        chunk_size=cfg.chunk_size,
        norm_eps=cfg.norm_eps,
    )
    if isinstance(cfg, XLSTMConfig):
        m, s = cfg.mlstm, cfg.slstm
        _need_positive("model.mlstm", proj_factor=m.proj_factor, round_up_to=m.round_up_to,
                       conv_kernel_size=m.conv_kernel_size, qkv_proj_blocksize=m.qkv_proj_blocksize)
        _need_positive("model.slstm", ffn_proj_factor=s.ffn_proj_factor, round_up_to=s.round_up_to,
                       conv_kernel_size=s.conv_kernel_size)
        n = cfg.num_blocks
        for j in cfg.slstm_at:
            if not 0 <= j < n:
                raise ValueError(
                    f"model.slstm_at: index {j} is outside the stack of num_blocks={n}; "
                    f"allowed values: 0..{n - 1}"
                )
        if len(set(cfg.slstm_at)) != len(cfg.slstm_at):
            raise ValueError(f"model.slstm_at: repeated index in {cfg.slstm_at}; allowed values: distinct indices 0..{n - 1}")
        if len(cfg.slstm_at) < n:  # there are mLSTM blocks
            _need_divides("model.mlstm", "num_heads", m.num_heads, "embedding_dim", cfg.embedding_dim)
            inner = cfg.mlstm_inner_dim
            _need_divides("model.mlstm", "num_heads", m.num_heads, "inner dim", inner)
            _need_divides("model.mlstm", "qkv_proj_blocksize", m.qkv_proj_blocksize, "inner dim", inner)
        if cfg.slstm_at:
            _need_divides("model.slstm", "num_heads", s.num_heads, "embedding_dim", cfg.embedding_dim)
    else:
        _need_positive("model", num_heads=cfg.num_heads, qk_dim_factor=cfg.qk_dim_factor,
                       v_dim_factor=cfg.v_dim_factor, ffn_proj_factor=cfg.ffn_proj_factor)
        _need_divides("model", "num_heads", cfg.num_heads, "embedding_dim", cfg.embedding_dim)
        _need_divides("model", "num_heads", cfg.num_heads, "qk dim", cfg.qk_dim)
        _need_divides("model", "num_heads", cfg.num_heads, "v dim", cfg.v_dim)
        if len(cfg.fgate_bias_init) != 2:
            raise ValueError(f"model.fgate_bias_init: got {cfg.fgate_bias_init!r}, allowed values: [start, end]")
        for name in ("gate_soft_cap", "logit_soft_cap"):
            value = getattr(cfg, name)
            if value is not None and value <= 0:
                raise ValueError(f"model.{name}: got {value!r}, allowed values: > 0 or null")

"""The one resolved training config: YAML preset + dotted overrides, checked
before any compute.

    cfg = load_train_config("configs/tiny.yaml", ["optimizer.lr=3e-3", "train.steps=20"])

Every section is a dataclass; unknown keys (with the closest valid name),
wrong types and inconsistent values fail with one ValueError line naming the
key. The `model:` section is checked by `model.load_model_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model import ModelConfig, config_to_dict, load_model_config
from model.config import _build as build_dataclass  # the shared dataclass checker


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Shard source specs (folder, glob, brace range, http(s) URL, `pipe:` command);
    several are mixed by `train_weights`."""
    train_weights: list[float] | None = None
    """Mixing weights of the `train` sources (null: equal)."""
    val: str | None = None
    """Validation shard source spec, or null for no validation."""
    tokenizer: str = ""
    """Folder of the SentencePiece tokenizer (copied into every checkpoint)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    packing: Literal["pack", "concat"] = "pack"
    """pack: documents packed with an EOS between them, the recurrent state reset
    at each document start; concat: plain concatenation, no resets."""
    num_workers: int = 0
    shuffle_buffer: int = 1024
    on_error: Literal["raise", "skip"] = "raise"


@dataclass
class TrainSection:
    steps: int = 100
    """Optimizer steps in the whole run."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank."""
    grad_accum: int | None = 1
    """Micro batches per optimizer step on each rank; null: derived at load time as
    global_batch_size / (micro_batch_size x data-parallel size), so one preset serves
    any world size that divides its global batch."""
    grad_clip: float | None = 1.0
    log_every: int = 10
    max_nonfinite_steps: int = 3
    """Stop with an error after this many non-finite steps in a row."""
    seed: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias", "embedding"])
    """Parameter kinds without weight decay: norm, bias (gate biases included),
    embedding."""


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optimizer.lr."""
    decay_fraction: float = 0.2
    """wsd: the last fraction of the steps that decays linearly."""


@dataclass
class DistributedConfig:
    backend: Literal["none", "fsdp", "deepspeed"] = "none"
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1, 2 or 3."""
    precision: Literal["bf16", "fp32", "bf16_pure"] = "fp32"
    """bf16: bf16 compute with fp32 master weights, optimizer state and reductions;
    bf16_pure: parameters, gradients and optimizer state in bf16 (half the memory,
    for runs that do not fit otherwise; fsdp and none only)."""
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile each block."""
    compile_backend: str = "inductor"
    """torch.compile backend (e.g. inductor, aot_eager)."""
    timeout_s: int = 600
    """Collective timeout: a dead rank takes the job down after this long."""
    meta_init: bool = False
    """Build the model on the meta device and initialize it shard by shard after
    wrapping (for models larger than one process's memory; fsdp only)."""


@dataclass
class CheckpointConfig:
    every: int = 50
    keep: int = 2
    dir: str | None = None
    """Default: <run_dir>/checkpoints."""


@dataclass
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; null: MLFLOW_TRACKING_URI, else a local store in the run dir."""
    experiment: str = "xlstm-pretrain"
    run_name: str | None = None


@dataclass
class EvalConfig:
    every: int = 0
    """Validation every N steps (0: only at the end)."""
    batches: int = 8
    """Validation micro batches per rank."""


@dataclass
class HardwareConfig:
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; null: measured with a matmul at start."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    @property
    def model_config(self) -> ModelConfig:
        return load_model_config(self.model)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = config_to_dict(self.model_config)
        return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=VALUE' -> (['a', 'b', 'c'], VALUE parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected KEY.SUB=VALUE")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r}: empty key part")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = doc
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return doc


def load_train_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None,
    world_size: int | None = None,
) -> TrainConfig:
    """Read, override and check a training config. `world_size` (default: the
    WORLD_SIZE environment variable, else 1) is used for the batch arithmetic."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"config: file {str(path)!r} does not exist")
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"config {path}: expected a mapping at the top level")
    else:
        doc = copy.deepcopy(dict(source))
    doc = apply_overrides(doc, list(overrides or []))
    if "model" not in doc:
        raise ValueError("model: missing section, allowed values: a model config (see configs/)")
    model_section = doc.pop("model")
    model_cfg = load_model_config({"model": model_section})
    # TrainConfig's own sections are checked like the model's; the model is kept resolved
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kwargs: dict[str, Any] = {"model": config_to_dict(model_cfg)}
    for key, value in doc.items():
        if key not in sections:
            close = difflib.get_close_matches(str(key), list(sections), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key}: unknown section{hint} allowed: {list(sections)}")
        if key == "run_dir":
            if not isinstance(value, str):
                raise ValueError(f"run_dir: expected a string, got {value!r}")
            kwargs[key] = value
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        kwargs[key] = build_dataclass(sections[key].default_factory, value, key)
    cfg = TrainConfig(**kwargs)
    check_train_config(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def check_train_config(cfg: TrainConfig, world_size: int) -> None:
    """Consistency checks that the types alone cannot express."""
    t, d = cfg.train, cfg.distributed
    dp = world_size  # every rank is data-parallel (FSDP and ZeRO shard, they do not split the model)
    if t.grad_accum is None and t.micro_batch_size >= 1:
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ValueError(
                f"train.grad_accum: null needs global_batch_size divisible by micro_batch_size x "
                f"data-parallel size, got {t.global_batch_size} and {t.micro_batch_size} x {dp} = {per_step}"
            )
        t.grad_accum = t.global_batch_size // per_step  # resolved here: the trainer sees an int
    for name in ("steps", "global_batch_size", "micro_batch_size", "grad_accum", "log_every"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name}: got {getattr(t, name)}, allowed values: >= 1")
    if t.global_batch_size != t.micro_batch_size * t.grad_accum * dp:
        raise ValueError(
            f"train.global_batch_size: got {t.global_batch_size}, but micro_batch_size x grad_accum x "
            f"data-parallel size = {t.micro_batch_size} x {t.grad_accum} x {dp} = "
            f"{t.micro_batch_size * t.grad_accum * dp}"
        )
    if d.backend == "deepspeed" and d.zero_stage not in (1, 2, 3):
        raise ValueError(f"distributed.zero_stage: got {d.zero_stage}, allowed values: 1, 2, 3")
    if d.precision == "bf16_pure" and d.backend == "deepspeed":
        raise ValueError("distributed.precision: bf16_pure is for fsdp and none; allowed with deepspeed: bf16, fp32")
    if d.meta_init and d.backend != "fsdp":
        raise ValueError(f"distributed.meta_init: needs distributed.backend fsdp, got {d.backend!r}")
    if d.backend == "none" and world_size > 1:
        raise ValueError(
            f"distributed.backend: got 'none' with {world_size} processes, allowed values: fsdp, deepspeed"
        )
    if cfg.data.seq_len < 1:
        raise ValueError(f"data.seq_len: got {cfg.data.seq_len}, allowed values: >= 1")
    context = int(cfg.model["context_length"])
    if cfg.data.seq_len > context:
        raise ValueError(
            f"data.seq_len: got {cfg.data.seq_len}, above model.context_length={context}; "
            f"allowed values: 1..{context}"
        )
    if cfg.data.seq_len < context:
        _notice(f"data.seq_len={cfg.data.seq_len} is below model.context_length={context}: "
                f"the model never trains on its full context")
    if cfg.checkpoint.keep < 2:
        raise ValueError(f"checkpoint.keep: got {cfg.checkpoint.keep}, allowed values: >= 2")
    if cfg.checkpoint.every < 1:
        raise ValueError(f"checkpoint.every: got {cfg.checkpoint.every}, allowed values: >= 1")
    if cfg.schedule.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps: got {cfg.schedule.warmup_steps}, allowed values: >= 0")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise ValueError(f"schedule.min_lr_ratio: got {cfg.schedule.min_lr_ratio}, allowed values: 0..1")
    if not 0 < cfg.schedule.decay_fraction <= 1:
        raise ValueError(f"schedule.decay_fraction: got {cfg.schedule.decay_fraction}, allowed values: (0, 1]")
    kinds = {"norm", "bias", "embedding"}
    for kind in cfg.optimizer.no_decay:
        if kind not in kinds:
            raise ValueError(f"optimizer.no_decay: got {kind!r}, allowed values: {sorted(kinds)}")
    if len(cfg.optimizer.betas) != 2:
        raise ValueError(f"optimizer.betas: got {cfg.optimizer.betas}, allowed values: [beta1, beta2]")
    if not cfg.data.train:
        raise ValueError("data.train: missing, allowed values: a list of shard source specs (folder, glob, URL, pipe:)")
    if cfg.data.train_weights is not None and len(cfg.data.train_weights) != len(cfg.data.train):
        raise ValueError(
            f"data.train_weights: got {len(cfg.data.train_weights)} weights for {len(cfg.data.train)} sources"
        )
    if not cfg.data.tokenizer:
        raise ValueError("data.tokenizer: missing, allowed values: a tokenizer folder")
    line = data_epochs_notice(cfg)
    if line:
        _notice(line)


class InputError(ValueError):
    """A config or input error raised on purpose: reported in one line, exit 2."""


def check_inputs(cfg: TrainConfig) -> None:
    """Every local data source and the tokenizer folder exist (one InputError line naming
    the first missing path). Run before any process group starts, and by slurm.submit
    before it queues a job; remote sources are left to the retries of opening them."""
    from data.sources import missing_local

    for key, specs in (("data.train", cfg.data.train), ("data.val", [cfg.data.val] if cfg.data.val else [])):
        for spec in specs:
            path = missing_local(spec)
            if path is not None:
                raise InputError(f"{key}: {path} does not exist")
    tok = Path(cfg.data.tokenizer)
    if not tok.exists():
        raise InputError(f"data.tokenizer: {tok} does not exist (expected a tokenizer folder)")


class ConfigError(ValueError):
    """A config that does not load or whose inputs are missing; `str(err)` is the one
    line every entry point prints before it exits 2 (`config error: ...`)."""


def load_checked_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None,
    world_size: int | None = None, *, inputs: bool = True,
) -> TrainConfig:
    """`load_train_config`, then (`inputs`) `check_inputs`: the one check that the trainer,
    `pretrain.launch`, `slurm.submit` and the batch script run before any process starts.
    Raises ConfigError with the line to print."""
    try:
        cfg = load_train_config(source, overrides, world_size=world_size)
        if inputs:
            check_inputs(cfg)
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None
    return cfg


def _notice(line: str) -> None:
    """One warning line on stderr, from rank 0 only (every rank loads the config)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"config: warning: {line}", file=sys.stderr, flush=True)


def manifest_tokens(spec: str) -> int | None:
    """Training tokens of one data source per its local `manifest.json` (a folder
    holding one, or the manifest's path), else None (globs, URLs, no manifest)."""
    path = Path(spec)
    if path.is_dir():
        path = path / "manifest.json"
    if path.name != "manifest.json" or not path.is_file():
        return None
    try:
        with open(path) as fh:
            return int(json.load(fh)["totals"]["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def data_epochs_notice(cfg: TrainConfig) -> str | None:
    """A line when the token budget (steps x global batch x seq_len) needs more tokens
    than a data source holds: the epochs it implies for that source (its mixing weight's
    share of the budget over its tokens). None when every source suffices or none is known."""
    budget = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
    weights = cfg.data.train_weights or [1.0] * len(cfg.data.train)
    total_w = sum(weights) or 1.0
    worst: tuple[float, str, int] | None = None
    for spec, w in zip(cfg.data.train, weights):
        tokens = manifest_tokens(spec)
        if not tokens:
            continue
        epochs = budget * (w / total_w) / tokens
        if epochs > 1 and (worst is None or epochs > worst[0]):
            worst = (epochs, spec, tokens)
    if worst is None:
        return None
    epochs, spec, tokens = worst
    return (f"train.steps: the token budget of {budget:,} tokens reads {spec} ({tokens:,} tokens) "
            f"{epochs:.2f} times: {epochs:.2f} epochs, the data repeats")


def save_resolved(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)

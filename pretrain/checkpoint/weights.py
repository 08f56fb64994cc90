"""Model weights of every folder kind, and the one loader: `load_model(path)`.

    model, source = load_model(path)        # checkpoint folder or root, --to safetensors, transformers
    weights = read_weights(checkpoint)       # lazy mapping, our parameter names
    write_weights_only(out, cfg, get, tok)   # the imported kind: --resume OUT --fresh-optimizer

Kinds (docs/design.md, "Checkpoint layout"): a trainer checkpoint with
``model_optim/`` (DCP, read one tensor at a time) or ``deepspeed/`` (ZeRO,
consolidated fp32); a folder of safetensors in our names (config.yaml); a
transformers xLSTM folder (config.json, their names, fused layouts too). Only
safetensors and weights-only loads; every refusal is a `CheckpointError` naming
the folder, file, key or field at fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from data.tokenizer import Tokenizer
from model import ModelConfig, build_model, config_to_dict, hf_adapter, load_model_config

from . import dcp
from . import deepspeed as ds
from .dcp import DCPWeights
from .layout import (
    MARKER,
    STATE_FILE,
    CheckpointError,
    find_checkpoint,
    finish_folder,
    read_trainer_state,
)

SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROVENANCE = "xlstm_pretrain.json"
ST_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Tensors of one safetensors file or of a sharded set (an index file), lazily."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index, single = folder / INDEX_NAME, folder / SAFETENSORS_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {k: folder / v for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as fh:
                files = {k: single for k in fh.keys()}  # noqa: SIM118 - not a dict
        else:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.pt"))
            hint = (f"; {', '.join(pickles)} are pickles, which are never loaded "
                    "(convert them to safetensors first)") if pickles else ""
            raise CheckpointError(f"{folder}: no {SAFETENSORS_NAME} or {INDEX_NAME}{hint}")
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {index.name} but missing")
        self.folder, self._files = folder, files
        self._handles: dict[Path, Any] = {}

    def _open(self, key: str):
        file = self._files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._open(key).get_slice(key)
        codes = {v: k for k, v in ST_CODES.items()}
        return tuple(sl.get_shape()), codes[sl.get_dtype()]

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi (first dim) of a tensor, without reading the rest."""
        return self._open(key).get_slice(key)[lo:hi]

    def metadata(self) -> dict[str, str]:
        first = next(iter(self._files))
        return self._open(first).metadata() or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._open(key).get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class _Renamed(Mapping[str, torch.Tensor]):
    """Our names over a source with other names: our key -> (source key, row range)."""

    def __init__(self, base: SafetensorsWeights, sources: dict[str, tuple[str, Any]]) -> None:
        self.base, self.sources = base, sources

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        src, rows = self.sources[key]
        shape, dtype = self.base.shape_dtype(src)
        return ((rows[1] - rows[0], *shape[1:]) if rows else shape), dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        src, rows = self.sources[key]
        return self.base[src] if rows is None else self.base.rows(src, *rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


def shape_dtype(weights: Mapping[str, torch.Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    if hasattr(weights, "shape_dtype"):
        return weights.shape_dtype(key)
    t = weights[key]
    return tuple(t.shape), t.dtype


def read_weights(folder: str | Path) -> Mapping[str, torch.Tensor]:
    """Model tensors (our parameter names) of a complete checkpoint folder of
    either backend, in one process with no process group: ``model_optim/``
    (DCP: lazy, one tensor per access) or ``deepspeed/`` (consolidated fp32)."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise CheckpointError(f"{folder}: no {MARKER} marker; an incomplete checkpoint is never loaded")
    if (folder / dcp.SUBDIR).is_dir():
        return DCPWeights(folder / dcp.SUBDIR)
    if (folder / ds.SUBDIR).is_dir():
        try:
            return ds.load_weights(folder)
        except Exception as err:  # noqa: BLE001 - any failure names the folder
            raise CheckpointError(f"{folder}/deepspeed: unreadable DeepSpeed checkpoint ({err})") from err
    raise CheckpointError(f"{folder}: neither model_optim/ (FSDP / one process) nor deepspeed/ in it")


@dataclass
class Source:
    """A model to convert: config, lazy tensors in our names, tokenizer, provenance."""

    cfg: ModelConfig
    weights: Mapping[str, torch.Tensor]
    tokenizer: Path | None
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)  # trainer_state.json of a checkpoint

    def __getitem__(self, key: str) -> Any:
        """`source["step"]`: the trainer state of a checkpoint (what `load_model` callers read)."""
        return self.state[key]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every state-dict key of the model of `cfg` with its shape (no memory: meta device)."""
    model = build_model(cfg, device="meta")
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """CheckpointError if the tensors are not exactly those of the config (names, shapes)."""
    want = expected_shapes(cfg)
    have = set(weights)
    if cfg.tie_weights:
        have.add("lm_head.weight")
    missing = sorted(set(want) - have)
    extra = sorted(have - set(want))
    bad = [f"{k}: config gives {want[k][0]}, {where} has {shape_dtype(weights, k)[0]}"
           for k in sorted(set(want) & set(weights)) if shape_dtype(weights, k)[0] != want[k][0]]
    if missing or extra or bad:
        parts = ([f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}"] if missing else [])
        parts += [f"tensors the config has no place for {extra[:4]}"] if extra else []
        parts += bad[:4]
        raise CheckpointError(f"{where}: the config ({cfg.arch}, embedding_dim {cfg.embedding_dim}, "
                           f"{cfg.num_blocks} blocks) does not match the tensors: " + "; ".join(parts))


def tensor_of(weights: Mapping[str, torch.Tensor], cfg: ModelConfig, key: str) -> torch.Tensor:
    if key == "lm_head.weight" and cfg.tie_weights and key not in weights:
        return weights["embedding.weight"]
    return weights[key]


def open_checkpoint(path: str | Path) -> Source:
    """A trainer checkpoint (folder or root) as a `Source`."""
    folder = find_checkpoint(path).path
    state = read_trainer_state(folder)
    try:
        cfg = load_model_config(state["config"]["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / STATE_FILE}: no usable model config ({err})") from err
    weights = read_weights(folder)
    check_weights(cfg, weights, str(folder))
    tok = folder / "tokenizer"
    info = {"source": str(folder.resolve()), "step": state.get("step"),
            "tokens_seen": state.get("tokens_seen"), "run_id": state.get("run_id"),
            "tracking": state.get("config", {}).get("tracking"),
            "run_dir": state.get("config", {}).get("run_dir")}
    return Source(cfg, weights, tok if (tok / "tokenizer.model").is_file() else None, info, folder, state)


def open_hf(path: str | Path, tokenizer: str | Path | None = None) -> Source:
    """A transformers xLSTM folder as a `Source` (our names)."""
    folder = Path(path)
    conf_file = folder / "config.json"
    if not conf_file.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a transformers model folder)")
    hf_conf = json.loads(conf_file.read_text())
    ours = None
    prov_file = folder / PROVENANCE
    if prov_file.is_file():  # written by --to hf: our exact config (backend, init, context)
        ours = json.loads(prov_file.read_text()).get("model")
    try:
        cfg = hf_adapter.from_hf_config(hf_conf)
        if ours is not None:
            exact = load_model_config(ours)
            if hf_adapter.to_hf_config(exact) | {"dtype": None, "autocast_kernel_dtype": None} == \
                    hf_adapter.to_hf_config(cfg) | {"dtype": None, "autocast_kernel_dtype": None}:
                cfg = exact
    except ValueError as err:
        raise CheckpointError(f"{conf_file}: {err}") from err
    base = SafetensorsWeights(folder)
    try:
        sources = dict(hf_adapter.hf_sources(cfg, base.keys()))
    except KeyError as err:
        raise CheckpointError(f"{folder}: the config does not match the tensors: {err.args[0]}") from err
    weights = _Renamed(base, sources)
    extra = sorted(set(base) - {s for s, _ in sources.values()})
    if extra:
        raise CheckpointError(f"{folder}: the config does not match the tensors: tensors the config "
                           f"has no place for {extra[:4]}")
    check_weights(cfg, weights, str(folder))
    tok = Path(tokenizer) if tokenizer else folder
    info = {"source": str(folder.resolve()), "format": "hf"}
    if ours is not None and prov_file.is_file():
        info.update({k: v for k, v in json.loads(prov_file.read_text()).items() if k != "model"})
    return Source(cfg, weights, tok if (tok / "tokenizer.model").is_file() else None, info, folder)


def open_safetensors(path: str | Path, tokenizer: str | Path | None = None) -> Source:
    """A folder written by ``--to safetensors`` as a `Source`."""
    folder = Path(path)
    conf = folder / "config.yaml"
    if not conf.is_file():
        raise CheckpointError(f"{folder}: no config.yaml (not a folder written by --to safetensors)")
    try:
        cfg = load_model_config(conf)
    except ValueError as err:
        raise CheckpointError(f"{conf}: {err}") from err
    weights = SafetensorsWeights(folder)
    check_weights(cfg, weights, str(folder))
    tok = Path(tokenizer) if tokenizer else folder / "tokenizer"
    info = {"source": str(folder.resolve()), "format": "safetensors"}
    if (folder / PROVENANCE).is_file():
        info.update({k: v for k, v in json.loads((folder / PROVENANCE).read_text()).items()
                     if k != "model"})
    return Source(cfg, weights, tok if (tok / "tokenizer.model").is_file() else None, info, folder)


def detect_format(path: str | Path) -> str:
    """'ckpt', 'hf' or 'safetensors' for a folder (CheckpointError if none fits)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    if (path / "config.yaml").is_file() and ((path / SAFETENSORS_NAME).is_file()
                                             or (path / INDEX_NAME).is_file()):
        return "safetensors"
    if (path / "config.json").is_file():
        return "hf"
    return "ckpt"


def open_source(path: str | Path, fmt: str | None = None, tokenizer: str | Path | None = None,
                deepspeed: bool = True) -> Source:
    """Any supported model folder as a `Source`; `fmt` None: detected."""
    fmt = fmt or detect_format(path)
    if fmt == "ckpt":
        folder = find_checkpoint(path).path
        if not deepspeed and not (folder / dcp.SUBDIR).is_dir():
            raise CheckpointError(f"{folder}/{dcp.SUBDIR}: missing (a DeepSpeed checkpoint? use "
                                  "pretrain.convert, or load_model(..., deepspeed=True))")
        src = open_checkpoint(path)
        if tokenizer:
            src.tokenizer = Path(tokenizer)
        return src
    if fmt == "hf":
        return open_hf(path, tokenizer)
    if fmt == "safetensors":
        return open_safetensors(path, tokenizer)
    raise CheckpointError(f"--from {fmt}: allowed values: ckpt, hf, safetensors")


def load_model(path: str | Path, device: str | torch.device = "cpu", *, fmt: str | None = None,
               tokenizer: str | Path | None = None, deepspeed: bool = False) -> tuple[torch.nn.Module, Source]:
    """Our model (eval mode) of any supported folder, filled one tensor at a time, in
    one process with no process group; and its `Source` (`source["step"]` reads the
    trainer state of a checkpoint). A DeepSpeed checkpoint is consolidated in memory
    (the whole fp32 model at once, `deepspeed` imported) only with `deepspeed=True`."""
    src = open_source(path, fmt, tokenizer, deepspeed=deepspeed)
    model = hf_adapter.empty_model(src.cfg, device)
    with torch.no_grad():
        for key, target in model.state_dict().items():
            target.copy_(tensor_of(src.weights, src.cfg, key))
    return model.eval(), src


@contextlib.contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Write into OUT.tmp, rename to OUT when the body finished."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: exists; pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The `data.Tokenizer` of a folder holding tokenizer.model: a project tokenizer
    folder, or a transformers folder (whose tokenizer.json is transformers' own
    format, not our metadata, and is then not read)."""
    folder = Path(folder)
    meta: dict[str, Any] = {}
    meta_file = folder / "tokenizer.json"
    if meta_file.is_file():
        try:
            doc = json.loads(meta_file.read_text())
        except ValueError:
            doc = {}
        if isinstance(doc, dict) and "model" not in doc and "sha256" in doc:
            meta = doc
    return Tokenizer((folder / "tokenizer.model").read_bytes(), meta)


def write_weights_only(out: Path, cfg: ModelConfig, get: Callable[[str], torch.Tensor], tokenizer,
                     info: dict[str, Any] | None = None, step: int = 0,
                     overwrite: bool = False) -> Path:
    """A complete trainer checkpoint folder holding only model weights (no optimizer,
    data or RNG state): what ``--resume OUT --fresh-optimizer`` continues from.
    `get(key)` gives each tensor (our names) when it is written; `tokenizer`: a
    `data.Tokenizer`."""
    with staged(out, overwrite) as tmp:
        dcp.write_model(tmp / dcp.SUBDIR, {k: s for k, (s, _) in expected_shapes(cfg).items()}, get)
        tokenizer.save_to(str(tmp / "tokenizer"))
        train_cfg = {"model": config_to_dict(cfg), "data": {"tokenizer": str(Path(out) / "tokenizer")}}
        with open(tmp / "config.yaml", "w") as fh:
            fh.write("# model section of an imported checkpoint; train with\n"
                     f"#   python -m pretrain.train --config YOUR.yaml --resume {out} "
                     "--fresh-optimizer\n# where YOUR.yaml has this model: section.\n")
            yaml.safe_dump(train_cfg, fh, sort_keys=False)
        state = {"step": step, "tokens_seen": 0, "run_id": None, "world_size": 1, "data": None,
                 "backend": "none", "weights_only": True, "imported": info or {},
                 "config": train_cfg}
        finish_folder(tmp, step, state)
    return out



"""Checkpoint conversion: to Hugging Face `transformers` and safetensors, and back.

    python -m pretrain.convert CKPT_DIR --to hf OUT_DIR            # large architecture
    python -m pretrain.convert CKPT_DIR --to safetensors OUT_DIR   # every architecture
    python -m pretrain.convert HF_DIR --from hf --to ours OUT_DIR  # e.g. NX-AI/xLSTM-7b
    options: --dtype auto|float32|bfloat16|float16, --max-shard-size 5GB,
             --tokenizer DIR (a SentencePiece tokenizer folder), --overwrite

Sources (``--from``; detected when omitted):

- ``ckpt``: a complete checkpoint folder of the trainer (or a checkpoint root:
  its latest complete one), written by any backend at any world size:
  ``model_optim/`` (torch.distributed.checkpoint, FSDP or one process) is read
  one tensor at a time; ``deepspeed/`` (ZeRO 1/2/3) through
  `pretrain.deepspeed_engine.load_deepspeed_weights` (consolidated fp32, the
  whole model at once: DeepSpeed's layout gives no per-tensor access).
  Everything goes through `read_checkpoint_weights(folder)`.
- ``hf``: a transformers xLSTM folder (config.json + model.safetensors or
  sharded with model.safetensors.index.json; ``weight_mode`` single or fused;
  the official xLSTMLarge names are accepted too).
- ``safetensors``: a folder written by ``--to safetensors``.

Targets (``--to``):

- ``hf``: config.json (transformers' field names, ``model_type: xlstm``),
  generation_config.json, model.safetensors (sharded with an index above
  ``--max-shard-size``), tokenizer.model + tokenizer_config.json +
  tokenizer.json (transformers' ``TokenizersBackend``, checked to encode as our
  tokenizer does), and xlstm_pretrain.json (our full model config and where it
  came from). ``AutoModelForCausalLM.from_pretrained(OUT)`` and
  ``AutoTokenizer.from_pretrained(OUT)`` load it offline. Large architecture only.
- ``safetensors``: our own names: config.yaml (``model:`` section),
  model.safetensors (sharded likewise), tokenizer/ (our tokenizer folder),
  xlstm_pretrain.json, README.md. Loaded by `model` alone
  (`model.hf_adapter.load_folder`, or build_model + load_state_dict).
- ``ours``: a checkpoint folder (COMPLETE marker, trainer_state.json at step 0,
  model_optim/ with the weights in float32 and no optimizer state, tokenizer/,
  config.yaml) that the trainer continues from with
  ``--resume OUT_DIR --fresh-optimizer`` (any backend: none, fsdp, deepspeed at
  every ZeRO stage), from step 0 with a fresh optimizer and schedule.

Tensors are read and written one at a time where the formats allow (DCP,
safetensors; the output of ``--to ours`` is written by DCP one file per
tensor); peak memory is then about the largest tensor, plus the whole model for
a DeepSpeed source. Measured on the 1.3B large preset (1.42B parameters, 5.7 GB
of float32 weights, a 16 GB checkpoint with AdamW state): ``--to hf`` and
``--to safetensors`` peak at 1.2 GB RSS (1.0 GB anonymous), ``--from hf --to
ours`` at 0.2 GB anonymous (its 5.6 GB of file-backed RSS are the safetensors'
memory-mapped pages, page cache that the kernel reclaims). Only safetensors and ``weights_only`` loads: DCP's
``.metadata`` pickle is read with an unpickler that admits only DCP's own
metadata classes. The output is written to ``OUT.tmp`` and renamed when
complete. Every refusal is a `ConvertError` whose message names the folder,
file, key or field at fault.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from tqdm import tqdm

from model import (
    ModelConfig,
    build_model,
    config_to_dict,
    hf_adapter,
    load_model_config,
)

from .checkpoint import (
    MARKER,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    DCPWeights,
    quiet_dcp,
    write_json_atomic,
)
from .extras import require

if TYPE_CHECKING:
    from data.tokenizer import Tokenizer

SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROVENANCE = "xlstm_pretrain.json"
DEFAULT_SHARD = "5GB"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class ConvertError(RuntimeError):
    """An input that cannot be converted; the message names what is wrong."""


# ============================================================================ reading


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Tensors of one safetensors file or of a sharded set (an index file), lazily."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

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
            raise ConvertError(f"{folder}: no {SAFETENSORS_NAME} or {INDEX_NAME}{hint}")
        for file in set(files.values()):
            if not file.is_file():
                raise ConvertError(f"{file}: listed in {index.name} but missing")
        self.folder, self._files = folder, files
        self._handles: dict[Path, Any] = {}

    def _open(self, key: str):
        from safetensors import safe_open

        file = self._files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._open(key).get_slice(key)
        codes = {v: k for k, v in _ST_CODES.items()}
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


def _shape_dtype(weights: Mapping[str, torch.Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    if hasattr(weights, "shape_dtype"):
        return weights.shape_dtype(key)
    t = weights[key]
    return tuple(t.shape), t.dtype


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder: `path` itself (it must hold the COMPLETE
    marker) or, for a checkpoint root, its latest complete checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path}: no such checkpoint folder")
    if (path / MARKER).is_file():
        return path
    looks_like_one = any((path / n).exists() for n in (STATE_FILE, "model_optim", "deepspeed"))
    found = None if looks_like_one else CheckpointManager(path).latest()
    if found is None:
        raise ConvertError(
            f"{path}: no {MARKER} marker (an incomplete checkpoint, e.g. killed while writing, is "
            "never converted)" + ("" if looks_like_one else " and no complete step-*/ folder in it")
        )
    return found.path


def read_checkpoint_weights(folder: str | Path) -> Mapping[str, torch.Tensor]:
    """Model tensors (our parameter names) of a complete checkpoint folder of
    either backend, in one process with no process group: ``model_optim/``
    (DCP: lazy, one tensor per access) or ``deepspeed/`` (consolidated fp32)."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise ConvertError(f"{folder}: no {MARKER} marker; an incomplete checkpoint is never converted")
    if (folder / "model_optim").is_dir():
        try:
            return DCPWeights(folder / "model_optim")
        except CheckpointError as err:  # refusals of this module are ConvertErrors
            raise ConvertError(str(err)) from err
    if (folder / "deepspeed").is_dir():
        try:
            from .deepspeed_engine import load_deepspeed_weights
        except ImportError as err:
            raise ConvertError(f"{folder}/deepspeed: a DeepSpeed checkpoint, but the DeepSpeed "
                               f"backend cannot be imported here ({err})") from err
        try:
            return load_deepspeed_weights(folder)
        except Exception as err:  # noqa: BLE001 - any failure names the folder
            raise ConvertError(f"{folder}/deepspeed: unreadable DeepSpeed checkpoint ({err})") from err
    raise ConvertError(f"{folder}: neither model_optim/ (FSDP / one process) nor deepspeed/ in it")


@dataclass
class Source:
    """A model to convert: config, lazy tensors in our names, tokenizer, provenance."""

    cfg: ModelConfig
    weights: Mapping[str, torch.Tensor]
    tokenizer: Path | None
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every state-dict key of the model of `cfg` with its shape (no memory: meta device)."""
    model = build_model(cfg, device="meta")
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """ConvertError if the tensors are not exactly those of the config (names, shapes)."""
    want = expected_shapes(cfg)
    have = set(weights)
    if cfg.tie_weights:
        have.add("lm_head.weight")
    missing = sorted(set(want) - have)
    extra = sorted(have - set(want))
    bad = [f"{k}: config gives {want[k][0]}, {where} has {_shape_dtype(weights, k)[0]}"
           for k in sorted(set(want) & set(weights)) if _shape_dtype(weights, k)[0] != want[k][0]]
    if missing or extra or bad:
        parts = ([f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}"] if missing else [])
        parts += [f"tensors the config has no place for {extra[:4]}"] if extra else []
        parts += bad[:4]
        raise ConvertError(f"{where}: the config ({cfg.arch}, embedding_dim {cfg.embedding_dim}, "
                           f"{cfg.num_blocks} blocks) does not match the tensors: " + "; ".join(parts))


def _get(weights: Mapping[str, torch.Tensor], cfg: ModelConfig, key: str) -> torch.Tensor:
    if key == "lm_head.weight" and cfg.tie_weights and key not in weights:
        return weights["embedding.weight"]
    return weights[key]


def open_checkpoint(path: str | Path) -> Source:
    """A trainer checkpoint (folder or root) as a `Source`."""
    from .checkpoint import read_trainer_state

    folder = resolve_checkpoint(path)
    try:
        state = read_trainer_state(folder)
    except Exception as err:  # noqa: BLE001
        raise ConvertError(str(err)) from err
    try:
        cfg = load_model_config(state["config"]["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{folder / STATE_FILE}: no usable model config ({err})") from err
    weights = read_checkpoint_weights(folder)
    check_weights(cfg, weights, str(folder))
    tok = folder / "tokenizer"
    info = {"source": str(folder.resolve()), "step": state.get("step"),
            "tokens_seen": state.get("tokens_seen"), "run_id": state.get("run_id"),
            "tracking": state.get("config", {}).get("tracking"),
            "run_dir": state.get("config", {}).get("run_dir")}
    return Source(cfg, weights, tok if (tok / "tokenizer.model").is_file() else None, info, folder)


def open_hf(path: str | Path, tokenizer: str | Path | None = None) -> Source:
    """A transformers xLSTM folder as a `Source` (our names)."""
    folder = Path(path)
    conf_file = folder / "config.json"
    if not conf_file.is_file():
        raise ConvertError(f"{folder}: no config.json (not a transformers model folder)")
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
        raise ConvertError(f"{conf_file}: {err}") from err
    base = SafetensorsWeights(folder)
    try:
        sources = dict(hf_adapter.hf_sources(cfg, base.keys()))
    except KeyError as err:
        raise ConvertError(f"{folder}: the config does not match the tensors: {err.args[0]}") from err
    weights = _Renamed(base, sources)
    extra = sorted(set(base) - {s for s, _ in sources.values()})
    if extra:
        raise ConvertError(f"{folder}: the config does not match the tensors: tensors the config "
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
        raise ConvertError(f"{folder}: no config.yaml (not a folder written by --to safetensors)")
    try:
        cfg = load_model_config(conf)
    except ValueError as err:
        raise ConvertError(f"{conf}: {err}") from err
    weights = SafetensorsWeights(folder)
    check_weights(cfg, weights, str(folder))
    tok = Path(tokenizer) if tokenizer else folder / "tokenizer"
    info = {"source": str(folder.resolve()), "format": "safetensors"}
    if (folder / PROVENANCE).is_file():
        info.update({k: v for k, v in json.loads((folder / PROVENANCE).read_text()).items()
                     if k != "model"})
    return Source(cfg, weights, tok if (tok / "tokenizer.model").is_file() else None, info, folder)


def detect_format(path: str | Path) -> str:
    """'ckpt', 'hf' or 'safetensors' for a folder (ConvertError if none fits)."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path}: no such folder")
    if (path / "config.yaml").is_file() and ((path / SAFETENSORS_NAME).is_file()
                                             or (path / INDEX_NAME).is_file()):
        return "safetensors"
    if (path / "config.json").is_file():
        return "hf"
    return "ckpt"


def open_source(path: str | Path, fmt: str | None = None, tokenizer: str | Path | None = None) -> Source:
    """Any supported model folder as a `Source`; `fmt` None: detected."""
    fmt = fmt or detect_format(path)
    if fmt == "ckpt":
        src = open_checkpoint(path)
        if tokenizer:
            src.tokenizer = Path(tokenizer)
        return src
    if fmt == "hf":
        return open_hf(path, tokenizer)
    if fmt == "safetensors":
        return open_safetensors(path, tokenizer)
    raise ConvertError(f"--from {fmt}: allowed values: ckpt, hf, safetensors")


def load_model_from(path: str | Path, fmt: str | None = None, device: str = "cpu",
                    tokenizer: str | Path | None = None) -> tuple[torch.nn.Module, Source]:
    """Our model (eval mode) of any supported folder, filled one tensor at a time."""
    src = open_source(path, fmt, tokenizer)
    model = hf_adapter.empty_model(src.cfg, device)
    params = model.state_dict()
    with torch.no_grad():
        for key, target in params.items():
            target.copy_(_get(src.weights, src.cfg, key))
    return model.eval(), src


# ============================================================================ writing


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvertError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


@dataclass
class Entry:
    """One tensor to write: its name in the file, shape, dtype, and how to get it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def _write_safetensors_file(path: Path, entries: list[Entry], metadata: dict[str, str],
                            bar: tqdm) -> None:
    """Stream one safetensors file: the header from shapes alone, then each tensor
    in turn (only one in memory)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _ST_CODES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for e in entries:
            t = e.get().detach().to("cpu", e.dtype).contiguous()
            if tuple(t.shape) != e.shape:
                raise ConvertError(f"{e.name}: got shape {tuple(t.shape)}, expected {e.shape}")
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            bar.update(e.nbytes)
            del t
        fh.flush()
        os.fsync(fh.fileno())


def write_safetensors(folder: Path, entries: list[Entry], max_shard_bytes: int,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    when the total is above `max_shard_bytes` (the transformers convention). Returns file names."""
    total = sum(e.nbytes for e in entries)
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    meta = {"format": "pt", **(metadata or {})}
    # bytes written; shown on a terminal only (tqdm's disable=None)
    with tqdm(total=total, desc="convert", unit="B", unit_scale=True, disable=None) as bar:
        if len(shards) == 1:
            _write_safetensors_file(folder / SAFETENSORS_NAME, entries, meta, bar)
            return [SAFETENSORS_NAME]
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            _write_safetensors_file(folder / name, shard, meta, bar)
            weight_map.update({e.name: name for e in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_NAME]


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Write into OUT.tmp, rename to OUT when the body finished."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"{out}: exists; pass --overwrite to replace it")
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


def _out_dtype(src: Source, key: str, dtype: torch.dtype | None) -> torch.dtype:
    stored = _shape_dtype(src.weights, "embedding.weight" if key == "lm_head.weight"
                          and key not in src.weights else key)[1]
    return dtype if dtype is not None and stored.is_floating_point else stored


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The `data.Tokenizer` of a folder holding tokenizer.model: a project tokenizer
    folder, or a transformers folder (whose tokenizer.json is transformers' own
    format, not our metadata, and is then not read)."""
    from data.tokenizer import Tokenizer  # noqa: F811 - the runtime import

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


def _tokenizer_or_refuse(src: Source, target: str) -> Tokenizer:
    where = src.path or "the source"
    if src.tokenizer is None or not (src.tokenizer / "tokenizer.model").is_file():
        looked = src.tokenizer or (src.path / "tokenizer" if src.info.get("step") is not None
                                   else src.path)
        raise ConvertError(
            f"{where}: tokenizer missing ({looked}/tokenizer.model not found); --to {target} needs "
            "the SentencePiece tokenizer (pass --tokenizer DIR with the tokenizer folder)"
        )
    try:
        tok = load_tokenizer(src.tokenizer)
    except Exception as err:  # noqa: BLE001
        raise ConvertError(f"{src.tokenizer}: unreadable tokenizer ({err})") from err
    if tok.vocab_size > src.cfg.vocab_size:
        raise ConvertError(f"{src.tokenizer}: tokenizer has {tok.vocab_size} tokens, more than the "
                           f"model's vocab_size {src.cfg.vocab_size}")
    return tok


def _provenance(src: Source, fmt: str, dtype: torch.dtype | None) -> dict[str, Any]:
    return {"model": config_to_dict(src.cfg), "converted_to": fmt, "converted_at": time.time(),
            "dtype": str(dtype or "as stored").replace("torch.", ""),
            **{k: v for k, v in src.info.items() if v is not None}}


def write_hf_tokenizer(tok, folder: Path, model_max_length: int) -> None:
    """tokenizer.model + tokenizer_config.json + tokenizer.json that ``AutoTokenizer``
    loads offline; checked against `tok`."""
    (folder / "tokenizer.model").write_bytes(tok.model_proto)
    sp = tok.sp
    special = {"unk_token": sp.id_to_piece(tok.unk_id), "bos_token": sp.id_to_piece(tok.bos_id),
               "eos_token": sp.id_to_piece(tok.eos_id), "pad_token": sp.id_to_piece(tok.pad_id)}
    conf = {"tokenizer_class": "TokenizersBackend", **special, "add_bos_token": False,
            "add_eos_token": False, "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
            "legacy": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    AutoTokenizer = require("transformers", "pretrain.convert --to hf").AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    hf_tok.save_pretrained(str(folder))
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        saved.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(saved, indent=2) + "\n")
    probe = ("def main(argv):\n    return  0\n\n\tx = [1, 2]  # héllo ∑ 漢字\n"
             " leading space, trailing space \n")
    got = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(
        probe, add_special_tokens=False)["input_ids"]
    if got != tok.encode(probe):
        raise ConvertError(f"{folder}: transformers' tokenizer does not encode as ours "
                           f"({got[:10]} vs {tok.encode(probe)[:10]})")


def to_hf(src: Source, out: Path, dtype: torch.dtype | None = None,
          max_shard_bytes: int = parse_size(DEFAULT_SHARD), overwrite: bool = False) -> Path:
    """Write `src` as a transformers xLSTM folder (see the module docstring)."""
    try:
        require("transformers", "pretrain.convert --to hf")
    except ModuleNotFoundError as err:
        raise ConvertError(str(err)) from err
    try:
        hf_adapter.check_hf_supported(src.cfg)
    except ValueError as err:
        raise ConvertError(f"{src.path}: --to hf: {err}") from err
    tok = _tokenizer_or_refuse(src, "hf")
    cfg = src.cfg
    entries = []
    for ours, theirs in hf_adapter.hf_names(cfg):
        shape, _ = _shape_dtype(src.weights, ours)
        entries.append(Entry(theirs, shape, _out_dtype(src, ours, dtype),
                             lambda k=ours: _get(src.weights, cfg, k)))
    out_dtype = str(entries[0].dtype).replace("torch.", "")
    with _staged(out, overwrite) as tmp:
        write_safetensors(tmp, entries, max_shard_bytes)
        hf_conf = hf_adapter.to_hf_config(cfg, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                          pad_id=tok.pad_id, dtype=out_dtype)
        (tmp / "config.json").write_text(json.dumps(hf_conf, indent=2) + "\n")
        gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        write_hf_tokenizer(tok, tmp, cfg.context_length)
        write_json_atomic(tmp / PROVENANCE, _provenance(src, "hf", dtype))
    return out


_README = """# {name}

xLSTM model weights in safetensors (our own parameter names), converted by
`python -m pretrain.convert` from {source}.

- `config.yaml`: the model config (`model:` section, arch `{arch}`)
- `{weights}`: the weights
- `tokenizer/`: the SentencePiece tokenizer (`data.Tokenizer.load`)

Load with the `model` package alone:

```python
from model.hf_adapter import load_folder
model = load_folder("{name}")          # or, by hand:

from model import build_model, load_model_config
from safetensors.torch import load_file
model = build_model(load_model_config("{name}/config.yaml"))
model.load_state_dict(load_file("{name}/model.safetensors"))   # unsharded case
```
"""


def to_safetensors(src: Source, out: Path, dtype: torch.dtype | None = None,
                   max_shard_bytes: int = parse_size(DEFAULT_SHARD), overwrite: bool = False) -> Path:
    """Write `src` in our own names (every architecture; see the module docstring)."""
    tok = _tokenizer_or_refuse(src, "safetensors")
    cfg = src.cfg
    entries = []
    for key, (shape, _) in expected_shapes(cfg).items():  # a tied head is written too
        entries.append(Entry(key, shape, _out_dtype(src, key, dtype),
                             lambda k=key: _get(src.weights, cfg, k)))
    with _staged(out, overwrite) as tmp:
        files = write_safetensors(tmp, entries, max_shard_bytes, {"arch": cfg.arch})
        with open(tmp / "config.yaml", "w") as fh:
            yaml.safe_dump({"model": config_to_dict(cfg)}, fh, sort_keys=False)
        tok.save_to(str(tmp / "tokenizer"))
        write_json_atomic(tmp / PROVENANCE, _provenance(src, "safetensors", dtype))
        (tmp / "README.md").write_text(_README.format(
            name=out.name, source=src.info.get("source", "?"), arch=cfg.arch,
            weights=files[-1] if len(files) > 1 else files[0]))
    return out


def _write_dcp_model(folder: Path, cfg: ModelConfig, get: Callable[[str], torch.Tensor]) -> None:
    """A DCP checkpoint {"model": state dict} written one tensor per file, each
    produced by `get(key)` only when DCP writes it (float32)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class LazyPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            key = write_item.index.fqn[len("model."):]
            return get(key).detach().to("cpu", torch.float32).contiguous()

    shapes = expected_shapes(cfg)
    plan = {"model": {k: torch.empty(s, dtype=torch.float32, device="meta")
                      for k, (s, _) in shapes.items()}}
    writer = FileSystemWriter(str(folder), single_file_per_rank=False, thread_count=1,
                              per_thread_copy_ahead=0)
    with quiet_dcp():
        dcp.save(plan, storage_writer=writer, planner=LazyPlanner(), no_dist=True)


def write_checkpoint(out: Path, cfg: ModelConfig, get: Callable[[str], torch.Tensor], tokenizer,
                     info: dict[str, Any] | None = None, step: int = 0,
                     overwrite: bool = False) -> Path:
    """A complete trainer checkpoint folder holding only model weights (no optimizer,
    data or RNG state): what ``--resume OUT --fresh-optimizer`` continues from.
    `get(key)` gives each tensor (our names) when it is written; `tokenizer`: a
    `data.Tokenizer`."""
    with _staged(out, overwrite) as tmp:
        _write_dcp_model(tmp / "model_optim", cfg, get)
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
        write_json_atomic(tmp / STATE_FILE, state)
        with open(tmp / MARKER, "w") as fh:
            fh.write(f"{step}\n")
            fh.flush()
            os.fsync(fh.fileno())
    return out


def to_ours(src: Source, out: Path, overwrite: bool = False) -> Path:
    """Write `src` as a trainer checkpoint (float32 weights, no optimizer state)."""
    tok = _tokenizer_or_refuse(src, "ours")
    return write_checkpoint(out, src.cfg, lambda k: _get(src.weights, src.cfg, k), tok,
                            info={k: v for k, v in src.info.items() if v is not None},
                            overwrite=overwrite)


def convert(src_path: str | Path, to: str, out: str | Path, *, fmt: str | None = None,
            dtype: str = "auto", max_shard_size: str | int = DEFAULT_SHARD,
            tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """The CLI's work as a function; returns the output folder."""
    if to not in ("hf", "safetensors", "ours"):
        raise ConvertError(f"--to {to}: allowed values: hf, safetensors, ours")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: allowed values: auto, {', '.join(DTYPES)}")
    src = open_source(src_path, fmt, tokenizer)
    out = Path(out)
    if out.resolve() == Path(src_path).resolve():
        raise ConvertError(f"{out}: the output folder must differ from the input")
    dt = None if dtype == "auto" else DTYPES[dtype]
    if to == "hf":
        return to_hf(src, out, dt, parse_size(max_shard_size), overwrite)
    if to == "safetensors":
        return to_safetensors(src, out, dt, parse_size(max_shard_size), overwrite)
    return to_ours(src, out, overwrite)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="checkpoint folder or root, transformers folder, or safetensors folder")
    ap.add_argument("out", help="output folder (written as OUT.tmp, then renamed)")
    ap.add_argument("--to", required=True, choices=["hf", "safetensors", "ours"])
    ap.add_argument("--from", dest="fmt", choices=["ckpt", "hf", "safetensors"], default=None,
                    help="source format (default: detected)")
    ap.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16, float16")
    ap.add_argument("--max-shard-size", default=DEFAULT_SHARD,
                    help="safetensors files above this are sharded with an index (default 5GB)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder to use instead of the source's")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(args.src, args.to, args.out, fmt=args.fmt, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                      overwrite=args.overwrite)
    except (ConvertError, CheckpointError) as err:
        print(f"[convert] error: {err}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[convert] wrote {out} (--to {args.to}, {size / 1e6:.1f} MB) in "
          f"{time.perf_counter() - t0:.1f}s; peak RSS {peak_rss_mb():.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ConvertError",
    "DCPWeights",
    "SafetensorsWeights",
    "Source",
    "check_weights",
    "convert",
    "detect_format",
    "expected_shapes",
    "load_model_from",
    "load_tokenizer",
    "open_source",
    "read_checkpoint_weights",
    "resolve_checkpoint",
    "to_hf",
    "to_ours",
    "to_safetensors",
    "write_checkpoint",
    "write_safetensors",
]

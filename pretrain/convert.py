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
  one tensor at a time; ``deepspeed/`` (ZeRO 1/2/3) consolidated in fp32, the
  whole model at once (DeepSpeed's layout gives no per-tensor access). Every
  source is read by `pretrain.checkpoint` (`open_source`, `read_weights`).
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
memory-mapped pages, page cache that the kernel reclaims). Only safetensors and
``weights_only`` loads. The output is written to ``OUT.tmp`` and renamed when
complete. Every refusal (a `CheckpointError`) names the folder, file, key or
field at fault.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from data.tokenizer import Tokenizer
from model import config_to_dict, hf_adapter

from .checkpoint import (
    CheckpointError,
    load_tokenizer,
    open_source,
    write_json_atomic,
    write_weights_only,
)
from .checkpoint.weights import (
    INDEX_NAME,
    PROVENANCE,
    SAFETENSORS_NAME,
    ST_CODES,
    Source,
    expected_shapes,
    shape_dtype,
    staged,
    tensor_of,
)
from .extras import require

DEFAULT_SHARD = "5GB"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(CheckpointError):
    """An input that cannot be converted; the message names what is wrong."""


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
        header[e.name] = {"dtype": ST_CODES[e.dtype], "shape": list(e.shape),
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


def _out_dtype(src: Source, key: str, dtype: torch.dtype | None) -> torch.dtype:
    stored = shape_dtype(src.weights, "embedding.weight" if key == "lm_head.weight"
                          and key not in src.weights else key)[1]
    return dtype if dtype is not None and stored.is_floating_point else stored


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
        shape, _ = shape_dtype(src.weights, ours)
        entries.append(Entry(theirs, shape, _out_dtype(src, ours, dtype),
                             lambda k=ours: tensor_of(src.weights, cfg, k)))
    out_dtype = str(entries[0].dtype).replace("torch.", "")
    with staged(out, overwrite) as tmp:
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
                             lambda k=key: tensor_of(src.weights, cfg, k)))
    with staged(out, overwrite) as tmp:
        files = write_safetensors(tmp, entries, max_shard_bytes, {"arch": cfg.arch})
        with open(tmp / "config.yaml", "w") as fh:
            yaml.safe_dump({"model": config_to_dict(cfg)}, fh, sort_keys=False)
        tok.save_to(str(tmp / "tokenizer"))
        write_json_atomic(tmp / PROVENANCE, _provenance(src, "safetensors", dtype))
        (tmp / "README.md").write_text(_README.format(
            name=out.name, source=src.info.get("source", "?"), arch=cfg.arch,
            weights=files[-1] if len(files) > 1 else files[0]))
    return out


def to_ours(src: Source, out: Path, overwrite: bool = False) -> Path:
    """Write `src` as a trainer checkpoint (float32 weights, no optimizer state)."""
    tok = _tokenizer_or_refuse(src, "ours")
    return write_weights_only(out, src.cfg, lambda k: tensor_of(src.weights, src.cfg, k), tok,
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


__all__ = ["ConvertError", "convert", "main", "to_hf", "to_ours", "to_safetensors", "write_safetensors"]

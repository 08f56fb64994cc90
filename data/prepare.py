"""Tokenize raw text (whatever `data.readers` reads) into shards with a manifest (CLI: `--help`).

Output: `OUT/shard-000000.tar ...` (training), `OUT/val/shard-000000.tar ...` (validation,
when --val-fraction > 0) in `data.tarshard`'s format, and `OUT/manifest.json` (per shard:
samples, tokens, bytes, sha256, xxh3_128; totals; the tokenizer's hash; the command).

Determinism: documents get a global index in input order (files sorted, then position
in file); a document goes to validation when a seeded hash of its index is below the
fraction; a stream starts a new shard once it holds `shard_tokens` tokens. Workers
tokenize, results are consumed in order: 1 or N workers give identical shards.

Restart: after each finished shard, `manifest.partial.json` (atomically replaced) records
it with its sha256 and the last document index it holds. A rerun with the same arguments
keeps every recorded shard whose file still has that digest (a prefix per stream) and
tokenizes only the rest. Shards are written as `*.tar.tmp` and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .readers import ReadStats, expand_inputs, iter_documents, progress_bar
from .tarshard import ShardWriter, file_sha256, token_dtype
from .tokenizer import Tokenizer, _atomic_write

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
FORMAT = "xlstm-token-shards/1"


def _is_val(index: int, fraction: float, seed: int) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(struct.pack("<qq", seed, index), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


# -- tokenization workers ------------------------------------------------------
_WORKER_TOK: Tokenizer | None = None


def _init_worker(proto: bytes) -> None:
    global _WORKER_TOK
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_TOK = Tokenizer(proto)


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.uint32) for x in _WORKER_TOK.encode(texts)]


def _write_json(path: str, obj: dict) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class _Stream:
    """One output stream (train or val): a shard writer and the finished entries."""

    def __init__(self, folder: str, ext: str, shard_tokens: int, kept: list[dict]):
        self.folder, self.ext, self.shard_tokens = folder, ext, shard_tokens
        os.makedirs(folder, exist_ok=True)
        self.done = list(kept)
        self.resume_after = kept[-1]["last_doc"] if kept else -1
        self.writer: ShardWriter | None = None
        self.first_doc = 0
        self.last_doc = -1

    def add(self, index: int, tokens: np.ndarray, source: str) -> bool:
        """Add one document; True when this closed a shard."""
        if self.writer is None:
            path = os.path.join(self.folder, f"shard-{len(self.done):06d}.tar")
            self.writer = ShardWriter(path, self.ext)
            self.first_doc = index
        self.writer.add(f"{index:012d}", tokens, source)
        self.last_doc = index
        if self.writer.tokens >= self.shard_tokens:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.writer is not None:
            entry = self.writer.close()
            entry.update(first_doc=self.first_doc, last_doc=self.last_doc)
            self.done.append(entry)
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _totals(entries: list[dict]) -> dict:
    return {"shards": len(entries), "samples": sum(e["samples"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries)}


def _verified_prefix(folder: str, entries: list[dict]) -> list[dict]:
    kept = []
    for e in entries:
        path = os.path.join(folder, e["name"])
        if not os.path.exists(path) or os.path.getsize(path) != e["bytes"] \
                or file_sha256(path) != e["sha256"]:
            break
        kept.append(e)
    return kept


def prepare(inputs: list[str] | str, tokenizer: str | Tokenizer, out_dir: str, *,
            text_field: str = "text", text_mode: str = "file", shard_tokens: int = 1 << 24,
            val_fraction: float = 0.0, workers: int = 1, on_error: str = "raise",
            seed: int = 0, max_documents: int | None = None, batch_chars: int = 1 << 20,
            progress: bool = True, command: list[str] | None = None) -> dict:
    """Tokenize `inputs` into shards under `out_dir`; return the manifest (also written).

    `inputs`: paths, folders or globs (text, JSONL[.gz|.zst], parquet), and WebDataset
    tar shards of text, local or `pipe:`/http(s) URLs, brace-expanded (`data.readers`).
    `max_documents` caps the documents read (handy for a quick demo corpus).
    Raises `data.readers.InputError` on bad input unless `on_error="skip"`,
    and `ValueError` when the input holds no document.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    paths = expand_inputs(inputs)
    ext, _ = token_dtype(tok.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    val_dir = os.path.join(out_dir, "val")
    args = {"inputs": paths, "tokenizer_sha256": tok.sha256, "text_field": text_field,
            "text_mode": text_mode, "shard_tokens": int(shard_tokens),
            "val_fraction": float(val_fraction), "seed": int(seed),
            "max_documents": max_documents, "on_error": on_error}
    fingerprint = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()

    kept_train: list[dict] = []
    kept_val: list[dict] = []
    partial_path = os.path.join(out_dir, PARTIAL)
    final_path = os.path.join(out_dir, MANIFEST)
    for path in (partial_path, final_path):  # a killed run, or a finished one
        try:
            old = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if old.get("fingerprint") == fingerprint:
            kept_train = _verified_prefix(out_dir, old.get("shards", []))
            kept_val = _verified_prefix(val_dir, old.get("val_shards", old.get(
                "val", {}).get("shards", [])))  # the partial manifest's, or the final one's
            break
    train = _Stream(out_dir, ext, shard_tokens, kept_train)
    val = _Stream(val_dir, ext, shard_tokens, kept_val)
    resumed = len(kept_train) + len(kept_val)
    if progress and resumed:
        print(f"resuming: {len(kept_train)} train and {len(kept_val)} val shards verified",
              file=sys.stderr)

    stats = ReadStats()
    counts = {"tokenized_documents": 0, "tokenized_tokens": 0, "skipped_resumed": 0, "empty_after_tokenize": 0}

    def save_partial():
        _write_json(partial_path, {"fingerprint": fingerprint, "shards": train.done,
                                   "val_shards": val.done})

    def batches() -> Iterator[tuple[list[tuple[int, str, bool]], list[str]]]:
        meta: list[tuple[int, str, bool]] = []
        texts: list[str] = []
        size = 0
        docs = iter_documents(paths, text_field=text_field, text_mode=text_mode,
                              on_error=on_error, stats=stats)
        for index, (text, source) in enumerate(docs):
            if max_documents is not None and index >= max_documents:
                break
            is_val = _is_val(index, val_fraction, seed)
            if index <= (val if is_val else train).resume_after:
                counts["skipped_resumed"] += 1
                continue
            meta.append((index, source, is_val))
            texts.append(text)
            size += len(text)
            if size >= batch_chars or len(texts) >= 4096:
                yield meta, texts
                meta, texts, size = [], [], 0
        if texts:
            yield meta, texts

    pool = None
    if workers > 1:
        ctx = get_context("fork" if sys.platform == "linux" else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok.model_proto,))
        results = _ordered_map(pool, batches(), window=2 * workers)
    else:
        _init_worker(tok.model_proto)
        results = ((meta, _encode_batch(texts)) for meta, texts in batches())

    # two bars on a terminal: input files read, tokens written
    files_bar = progress_bar(progress, total=len(paths), unit="file", desc="prepare")
    tokens_bar = progress_bar(progress, unit="tok", unit_scale=True, desc="tokens", position=1)
    t0 = time.time()
    try:
        for meta, encoded in results:
            for (index, source, is_val), ids in zip(meta, encoded):
                if ids.size == 0:
                    counts["empty_after_tokenize"] += 1
                    continue
                counts["tokenized_documents"] += 1
                counts["tokenized_tokens"] += int(ids.size)
                if (val if is_val else train).add(index, ids, source):
                    save_partial()
            files_bar.update(stats.files + stats.unreadable_files - files_bar.n)
            tokens_bar.update(counts["tokenized_tokens"] - tokens_bar.n)
        train.close()
        val.close()
    except BaseException:
        train.abort()
        val.abort()
        raise
    finally:
        tokens_bar.close()
        files_bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if not train.done and not val.done:
        raise ValueError(f"empty input: no documents with tokens in {len(paths)} files "
                         f"({stats.problems() or 'nothing to read'})")
    # remove shards of an earlier, longer run with other arguments
    for folder, stream in ((out_dir, train), (val_dir, val)):
        names = {e["name"] for e in stream.done}
        for f in os.listdir(folder):
            if f.startswith("shard-") and (f.endswith(".tar.tmp") or
                                           (f.endswith(".tar") and f not in names)):
                os.remove(os.path.join(folder, f))
    if not val.done and os.path.isdir(val_dir) and not os.listdir(val_dir):
        os.rmdir(val_dir)
    summary = {**asdict(stats), **counts, "resumed_shards": resumed}
    manifest = {
        "format": FORMAT, "fingerprint": fingerprint, "token_ext": ext,
        "token_dtype": "uint16" if ext == "u16" else "uint32",
        "tokenizer": {k: getattr(tok, k) for k in ("sha256", "vocab_size", "padded_vocab_size",
                                                   "eos_id", "bos_id", "pad_id", "unk_id")},
        "args": {k: v for k, v in args.items() if k != "inputs"},
        "inputs": {"files": len(paths),
                   "sha256_of_list": hashlib.sha256("\n".join(paths).encode()).hexdigest()},
        "shards": train.done, "totals": _totals(train.done),
        "command": list(command) if command is not None else list(sys.argv),
        "summary": summary,
    }
    if val.done:
        manifest["val"] = {"folder": "val", "shards": val.done, "totals": _totals(val.done)}
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    if os.path.exists(partial_path):
        os.remove(partial_path)
    if progress:
        _print_summary(manifest, time.time() - t0)
    return manifest


prepare_shards = prepare


def _ordered_map(pool, items, window: int):
    """Like pool.imap, but reads `items` in this thread and keeps at most `window` in flight."""
    from collections import deque

    pending: deque = deque()
    for meta, texts in items:
        pending.append((meta, pool.apply_async(_encode_batch, (texts,))))
        if len(pending) >= window:
            m, r = pending.popleft()
            yield m, r.get()
    while pending:
        m, r = pending.popleft()
        yield m, r.get()


def _print_summary(m: dict, dt: float) -> None:
    s, t = m["summary"], m["totals"]
    print(f"prepare: {t['shards']} shards, {t['samples']} docs, {t['tokens']} tokens"
          + (f"; val {m['val']['totals']['samples']} docs" if "val" in m else "")
          + f"; read {s['bytes'] / 1e6:.1f} MB in {dt:.1f}s", file=sys.stderr)
    problems = {k: s[k] for k in ("unreadable_files", "bad_lines", "missing_field",
                                  "non_utf8", "empty_documents", "empty_after_tokenize")
                if s.get(k)}
    if problems:
        print(f"prepare: problems: {problems}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files, folders, globs, or WebDataset text shards (.tar, pipe:, http)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--out", required=True)
    p.add_argument("--text-field", default="text")
    p.add_argument("--text-mode", choices=["file", "paragraph", "line"], default="file",
                   help="plain text: one document per file, per blank-line block, per line")
    p.add_argument("--shard-tokens", type=int, default=1 << 24)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    prepare(a.input, a.tokenizer, a.out, text_field=a.text_field, text_mode=a.text_mode,
            shard_tokens=a.shard_tokens, val_fraction=a.val_fraction, workers=a.workers,
            on_error=a.on_error, seed=a.seed, max_documents=a.max_documents,
            progress=not a.quiet,
            command=["python", "-m", "data.prepare", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

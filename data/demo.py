"""A small real corpus for the demo: the Python standard library's own source files.

    python -m data.demo --out runs/demo-data [--vocab-size 512] [--max-files 400]

trains a tokenizer (seconds) and writes shards with a validation split.
"""

from __future__ import annotations

import argparse
import os
import random
import sysconfig

from .prepare import prepare
from .tokenizer import train_tokenizer


def stdlib_sources(max_files: int | None = 400, seed: int = 0) -> list[str]:
    """A seeded sample of the stdlib's .py files (tests and site-packages left out), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "test", "tests",
                                          "idle_test", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    files.sort()
    if max_files is not None and len(files) > max_files:
        files = sorted(random.Random(seed).sample(files, max_files))
    return files


def make_demo_corpus(out_dir: str, *, vocab_size: int = 512, max_files: int = 400,
                     max_sentences: int = 20_000, shard_tokens: int = 1 << 17,
                     val_fraction: float = 0.05, workers: int = 1, seed: int = 0,
                     progress: bool = True) -> tuple[str, str]:
    """Train `out_dir/tokenizer` and write `out_dir/shards` from stdlib sources.

    Returns (tokenizer_dir, shards_dir); a rerun reuses what is complete.
    """
    files = stdlib_sources(max_files, seed)
    tok_dir, shard_dir = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "shards")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        train_tokenizer(files, tok_dir, vocab_size=vocab_size, max_sentences=max_sentences,
                        seed=seed, progress=progress)
    if not os.path.exists(os.path.join(shard_dir, "manifest.json")):
        prepare(files, tok_dir, shard_dir, text_mode="file", shard_tokens=shard_tokens,
                val_fraction=val_fraction, workers=workers, seed=seed, progress=progress,
                command=["data.demo.make_demo_corpus", out_dir])
    return tok_dir, shard_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--max-files", type=int, default=400)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    tok, shards = make_demo_corpus(a.out, vocab_size=a.vocab_size, max_files=a.max_files,
                                   workers=a.workers)
    print(f"tokenizer: {tok}\nshards: {shards}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

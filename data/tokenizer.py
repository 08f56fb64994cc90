"""SentencePiece tokenizers: training, the `Tokenizer` wrapper, and a CLI (`train|encode|decode`).

A tokenizer folder holds `tokenizer.model` (the SentencePiece proto) and
`tokenizer.json` (special ids, vocabulary size, the padded size the model uses,
the sha256 of the model file, and how it was trained).

Training normalizes nothing (identity rule, whitespace kept, newline is a
piece, byte fallback on), so `decode(encode(text)) == text` for any text,
code included.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from .readers import ReadStats, expand_inputs, iter_documents, progress_bar

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
# Fixed special ids, recorded in tokenizer.json and checked on load.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def padded_size(vocab_size: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that holds `vocab_size` entries."""
    multiple = max(1, int(multiple))
    return -(-vocab_size // multiple) * multiple


class Tokenizer:
    """A loaded SentencePiece model with the project's fixed special ids.

    `vocab_size` is the tokenizer's own size; `padded_vocab_size` (a multiple
    of `pad_multiple`, recorded in tokenizer.json) is what the model's
    embedding and output layer should use. Ids >= vocab_size are never produced.
    """

    def __init__(self, model_proto: bytes, meta: dict | None = None,
                 pad_multiple: int | None = None):
        self._proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.meta = dict(meta or {})
        self.pad_multiple = int(self.meta.get("pad_multiple", 64) if pad_multiple is None
                                else pad_multiple)
        for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
            if name in self.meta and self.meta[name] != (want := getattr(self, name)):
                raise ValueError(f"tokenizer.json says {name}={self.meta[name]}, model has {want}")

    # -- loading and saving -------------------------------------------------
    @classmethod
    def load(cls, path: str, pad_multiple: int | None = None) -> Tokenizer:
        """Load from a tokenizer folder (or a `.model` file directly)."""
        model_path = path if path.endswith(".model") else os.path.join(path, MODEL_FILE)
        meta_path = os.path.join(os.path.dirname(model_path), META_FILE)
        meta = json.loads(Path(meta_path).read_text()) if os.path.exists(meta_path) else {}
        return cls(Path(model_path).read_bytes(), meta, pad_multiple)

    def save_to(self, out_dir: str) -> str:
        """Write tokenizer.model and tokenizer.json into `out_dir` (atomically); return it."""
        os.makedirs(out_dir, exist_ok=True)
        _atomic_write(os.path.join(out_dir, MODEL_FILE), self._proto)
        _atomic_write(os.path.join(out_dir, META_FILE),
                      (json.dumps(self.describe(), indent=2, sort_keys=True) + "\n").encode())
        return out_dir

    def describe(self) -> dict:
        """tokenizer.json: the training metadata, the special ids, the sizes, the sha256."""
        return {**self.meta, **{k: getattr(self, k) for k in (
            "unk_id", "bos_id", "eos_id", "pad_id", "vocab_size", "pad_multiple",
            "padded_vocab_size", "sha256")}}

    # -- properties: model_proto bytes, sha256 a hex str, the rest ints ----------
    model_proto = property(lambda self: self._proto)
    sha256 = property(lambda self: hashlib.sha256(self._proto).hexdigest())
    vocab_size = property(lambda self: self.sp.get_piece_size())
    padded_vocab_size = property(lambda self: padded_size(self.vocab_size, self.pad_multiple))
    bos_id = property(lambda self: self.sp.bos_id())
    eos_id = property(lambda self: self.sp.eos_id())
    pad_id = property(lambda self: self.sp.pad_id())
    unk_id = property(lambda self: self.sp.unk_id())

    # -- encoding -----------------------------------------------------------
    def encode(self, text: str | list[str], *, add_bos: bool = False, add_eos: bool = False,
               num_threads: int = 1) -> list[int] | list[list[int]]:
        """Token ids of one string (list[int]) or of a batch (list[list[int]])."""
        return self.sp.encode(text, out_type=int, add_bos=add_bos, add_eos=add_eos,
                              num_threads=num_threads)

    def decode(self, ids) -> str | list[str]:
        """Text of one id sequence, or a list of texts for a batch (list of sequences).

        Accepts lists, numpy arrays and tensors (1-D: one text, 2-D: a batch).
        Pad, bos and eos ids are dropped.
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(x) for x in ids]
        drop = {self.pad_id, self.bos_id, self.eos_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in drop])

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, padded={self.padded_vocab_size}, "
                f"sha256={self.sha256[:12]})")


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sample_sentences(paths: list[str], *, max_sentences: int, seed: int,
                     sentence_chars: int = 2048, text_field: str = "text",
                     text_mode: str = "file", progress: bool = True,
                     stats: ReadStats | None = None) -> list[str]:
    """Reservoir-sample up to `max_sentences` training sentences over all inputs.

    A "sentence" is a run of whole lines of a document, at most
    `sentence_chars` long, so newlines and indentation are learned.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    stats = stats if stats is not None else ReadStats()
    bar = progress_bar(progress, total=len(paths), unit="file", desc="sampling")
    for text, _src in iter_documents(paths, text_field=text_field, text_mode=text_mode,
                                     on_error="skip", stats=stats):
        for chunk in _chunks(text, sentence_chars):
            seen += 1
            if len(reservoir) < max_sentences:
                reservoir.append(chunk)
            else:
                j = rng.randrange(seen)
                if j < max_sentences:
                    reservoir[j] = chunk
        if not bar.disable:  # per document: skip the formatting when nobody sees it
            bar.update(stats.files + stats.unreadable_files - bar.n)
            bar.set_postfix(sentences=seen, kept=len(reservoir), refresh=False)
    bar.update(len(paths) - bar.n)
    bar.close()
    if progress:
        print(f"sampling: {seen} sentences read, {len(reservoir)} kept", file=sys.stderr)
    return reservoir


def _chunks(text: str, limit: int) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    for line in text.split("\n"):
        line = line[:limit]
        if size + len(line) + 1 > limit and buf:
            yield "\n".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line) + 1
    if buf and any(x.strip() for x in buf):
        yield "\n".join(buf)


def train_tokenizer(inputs: list[str] | str, out_dir: str, *, vocab_size: int = 512,
                    model_type: str = "bpe", max_sentences: int = 50_000, seed: int = 0,
                    pad_multiple: int = 64, text_field: str = "text", text_mode: str = "file",
                    num_threads: int | None = None, character_coverage: float = 0.9995,
                    progress: bool = True) -> Tokenizer:
    """Train a SentencePiece model on (a seeded sample of) `inputs`; save it to `out_dir`.

    Inputs are paths, folders or globs of any format `data.readers` reads.
    Byte fallback and digit splitting are on, special ids are fixed
    (unk 0, bos 1, eos 2, pad 3). A vocabulary of 512 on 50k sentences
    trains in a few seconds.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be bpe or unigram, got {model_type!r}")
    paths = expand_inputs(inputs)
    sentences = sample_sentences(paths, max_sentences=max_sentences, seed=seed,
                                 text_field=text_field, text_mode=text_mode, progress=progress)
    if not sentences:
        raise ValueError(f"no text in {len(paths)} input files")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    t0 = time.time()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, split_digits=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
        character_coverage=character_coverage, max_sentence_length=1 << 16,
        input_sentence_size=0, shuffle_input_sentence=False, hard_vocab_limit=False,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    meta = {"model_type": model_type, "seed": seed, "pad_multiple": pad_multiple,
            "trained_on": {"files": len(paths), "sentences": len(sentences),
                           "max_sentences": max_sentences, "inputs": list(
                               [inputs] if isinstance(inputs, str) else inputs)}}
    tok = Tokenizer(model.getvalue(), meta)
    tok.save_to(out_dir)
    if progress:
        print(f"trained {model_type} vocab {tok.vocab_size} (padded {tok.padded_vocab_size}) "
              f"on {len(sentences)} sentences in {time.time() - t0:.1f}s -> {out_dir}",
              file=sys.stderr)
    return tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a SentencePiece tokenizer")
    t.add_argument("--input", nargs="+", required=True, help="files, folders or globs")
    t.add_argument("--vocab-size", type=int, default=512)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--out", required=True)
    t.add_argument("--max-sentences", type=int, default=50_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--pad-multiple", type=int, default=64)
    t.add_argument("--text-field", default="text")
    t.add_argument("--text-mode", choices=["file", "paragraph", "line"], default="file")
    t.add_argument("--threads", type=int, default=None)
    for name in ("encode", "decode"):
        s = sub.add_parser(name, help=f"{name} for inspection")
        s.add_argument("--tokenizer", required=True)
        s.add_argument("items", nargs="*", help="texts (encode) or ids (decode); stdin if none")
    a = p.parse_args(argv)
    if a.cmd == "train":
        train_tokenizer(a.input, a.out, vocab_size=a.vocab_size, model_type=a.model_type,
                        max_sentences=a.max_sentences, seed=a.seed, pad_multiple=a.pad_multiple,
                        text_field=a.text_field, text_mode=a.text_mode, num_threads=a.threads)
        return 0
    tok = Tokenizer.load(a.tokenizer)
    if a.cmd == "encode":
        texts = a.items or [sys.stdin.read()]
        for ids in tok.encode(texts):
            print(" ".join(map(str, ids)))
    else:
        ids = a.items or sys.stdin.read().split()
        print(tok.decode([int(x) for x in ids]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Data: tokenizers, token shards, and the streaming loader the trainer eats from.

`data` imports no other project package. Everything a trainer needs:

Tokenizer (`data.tokenizer`)
----------------------------
    tok = Tokenizer.load(dir)                  # tokenizer.model + tokenizer.json
    tok.encode("text") -> list[int];  tok.encode(["a", "b"]) -> list[list[int]]
    tok.decode(ids) -> str;           tok.decode([[...], [...]]) -> list[str]
    tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id   # fixed: 1, 2, 3, 0
    tok.vocab_size          # the tokenizer's size
    tok.padded_vocab_size   # multiple of pad_multiple (64): use for embedding/logits
    tok.save_to(dir)        # e.g. next to a checkpoint; tok.sha256 identifies it
    train_tokenizer(inputs, out_dir, vocab_size=512, model_type="bpe",
                    max_sentences=50_000, seed=0, pad_multiple=64) -> Tokenizer
CLI: `python -m data.tokenizer train|encode|decode ...`.

Shards (`data.prepare`)
-----------------------
    prepare_shards(inputs, tokenizer_dir, out_dir, text_field="text", text_mode="file",
                   shard_tokens=1 << 24, val_fraction=0.0, workers=1, on_error="raise",
                   max_documents=None) -> manifest dict     # = data.prepare.prepare
writes `out/shard-NNNNNN.tar` (WebDataset: `<key>.tokens.u16` raw little-endian
ids of one document without BOS/EOS, `<key>.source.txt`), `out/val/...` when
val_fraction > 0, and `out/manifest.json` (per shard: samples, tokens, bytes,
sha256, xxh3_128; totals; tokenizer hash; command). Deterministic and restartable.
Inputs: text, JSONL, parquet, and WebDataset tar shards of text (`.txt` members, or
`.json` ones with the text field), local, `pipe:` or http(s), brace-expanded.
CLI: `python -m data.prepare --input GLOB... --tokenizer DIR --out DIR ...`.

Demo corpus (the standard library's own sources), without subprocesses:
    make_demo_corpus(out_dir, vocab_size=512, max_files=400) -> (tokenizer_dir, shards_dir)

Loader (`data.loader`)
----------------------
    loader = build_loader({"sources": "shards/", "seq_len": 2048, "micro_batch_size": 8,
                           "rank": r, "world_size": w, "num_workers": 2, "seed": 0,
                           "packing": "pack"})      # or LoaderConfig(...)
    for batch in loader: ...
Sources: a folder (its manifest), a glob, brace ranges (`shard-{000000..000099}.tar`,
WebDataset's conventions, `::` joins lists), `http(s)://` URLs, `pipe:CMD` (opened with
`webdataset.gopen`), or a list of `{"url": ..., "weight": 0.7}` mixed by weight;
`DIR#val` or `.../manifest.json#val` names the validation shards.

Each batch is a `data.Batch`, compact: the ids in the width the shards store them.
    ids      (B*S+1,) uint16 (int32 when the vocabulary exceeds 65536), the packed
             stream, pinned when CUDA is there; batch.rows() is its (B, S+1) view
    starts   (k,) int64 stream positions where a document begins; end: where padding begins
The trainer expands it on its device after the copy (a few small kernels there, none
of the 17 bytes per token on the host):
    input_ids, reset, labels = batch.to(device)      # non_blocking from the pinned buffer
    input_ids  LongTensor (B, S)
    labels     LongTensor (B, S)   next-token targets, already shifted
    reset      BoolTensor (B, S)   True where the recurrent state must be zeroed
                                   (pass to xlstm_kernels.mlstm_chunkwise(..., reset=reset))
(`batch["input_ids"]` etc. expand it on the host, for tests and inspection.)
Rows are cut from a stream `doc0 EOS doc1 EOS ...`: the loader takes S+1 tokens per
row and returns input_ids = row[:-1], labels = row[1:]; consecutive rows overlap by one
token, so every token is an input exactly once. The loss must use
`ignore_index=-100` (`data.IGNORE_INDEX`):
  * packing="pack": reset is True at the first token of every document and at
    position 0 of every row; the label of the position holding an EOS (which would
    predict the next document's first token across a reset) is -100. The loss is
    then exactly the sum of each document's own loss run alone (doc + EOS).
  * packing="concat": plain concatenation, reset all False, no label masked.
  * With finite `epochs`, the last batch of a reader is padded with pad_id, label -100.
With `return_meta=True` a batch also has "meta": per row, the document pieces it holds.

Resume: `state = loader.state_dict()` (a `data.state.LoaderState` as a JSON-able
dict, version 2, every field documented there; a collective when world_size > 1: it
all-gathers the ranks' parts, so call it on every rank, e.g. at checkpoint time;
identical on all ranks) and `loader.load_state_dict(state)` on a fresh loader, at the
same or another world size / worker count. States of version 1 (checkpoints written
before 2026-12) still load; another version is an error.

How exactly-once resume works: `data.state` (its docstring, then the state's
fields one by one).

Reading: a local shard is mapped (zero-copy views of the ids); a stream (HTTP, `pipe:`)
is parsed as it arrives, holding one read buffer and one sample, never the whole
shard; one tar parser does both (`data.tarshard`). A local file's mapping, index and a
digest verified against the manifest (its xxh3-128 when it has one and `xxhash` is
installed, else its sha256) are kept per process while the file's identity (device,
inode, size, mtime_ns, ctime_ns) is unchanged, so a later epoch neither re-parses nor
re-hashes it. With `num_workers > 0` each worker packs ids (uint16 when the vocabulary
allows, else int32) into a shared-memory ring; the DataLoader pipe only carries document
starts and states, and the main process copies each batch out of the ring.

Faults: a truncated or corrupt shard raises `ShardError` naming the shard and byte
offset (a digest mismatch against the manifest is caught before any sample of a local
shard is used; a stream's, at its end);
`on_error="skip"` skips the rest of that shard with a warning and counts it in
`loader.stats["skipped_shards"]` (names in `stats["skipped"]`). Unreachable URLs are
retried `retries` times with exponential backoff, then `SourceError` names them; an HTTP
body cut off mid-shard is reopened at its offset with a Range request. In infinite mode,
a source whose shards all fail raises instead of spinning.
"""

from __future__ import annotations

_EXPORTS = {
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer", "padded_size": "tokenizer",
    "prepare_shards": "prepare", "make_demo_corpus": "demo",
    "LoaderConfig": "loader", "SourceSpec": "loader", "TokenLoader": "loader",
    "build_loader": "loader", "merge_states": "loader", "IGNORE_INDEX": "loader",
    "Batch": "loader",
    "LoaderState": "state",
    "ShardError": "tarshard", "SourceError": "sources", "InputError": "readers",
    "expand_source": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # lazy, so `python -m data.tokenizer` does not pay for importing torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")

"""Data: tokenizers, token shards, and the streaming loader the trainer eats from.

`data` imports no other project package; data/README.md maps its modules and shows
the calls. This docstring is the contract.

Each batch is a `data.Batch` (fields and shapes: its docstring), compact: the ids in
the width the shards store them, plus the positions where documents start.
`batch.to(device)` copies them and expands them there (`batch["input_ids"]` etc.: on
the host, for tests and inspection):
    input_ids  LongTensor (B, S)
    reset      BoolTensor (B, S)   True where the recurrent state must be zeroed
                                   (pass to xlstm_kernels.mlstm_chunkwise(..., reset=reset))
    labels     LongTensor (B, S)   next-token targets, already shifted
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

Resume: `state = loader.state_dict()` (a `data.state.LoaderState` as a JSON-able
dict; a collective when world_size > 1, identical on all ranks) and
`loader.load_state_dict(state)` on a fresh loader, at the same or another world size
/ worker count: every remaining sample exactly once (`data.state` says how). States of
versions 1 and 2 (older checkpoints) still load and keep their shuffle order; another
version is an error.

Faults: a truncated or corrupt shard raises `ShardError` naming the shard and byte
offset (a digest mismatch: before any sample of a local shard is used, at the end of a
stream); `on_error="skip"` skips the rest of it, warns and counts it in `loader.stats`.
Unreachable URLs are retried with backoff, then `SourceError` names them.
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

"""Datasets of the project's own lm-eval tasks, built from held-out token shards.

The task YAMLs beside this file name these functions as ``custom_dataset``;
lm-eval calls them with the task metadata that `pretrain.evaluate` passes to
its TaskManager:

    heldout_shards   shard spec of held-out documents (default: the checkpoint's
                     validation shards, ``data.val``)
    tokenizer        tokenizer folder that decodes them (the checkpoint's)
    num_examples     examples per task (default 200)
    seed             sampling seed (default 1234)

Nothing is downloaded. Each function returns ``{"test": datasets.Dataset}``;
documents are the shards' token ids decoded to text. The tasks:

- ``xlstm_nextword`` (multiple choice, 4 options, chance 25%): a passage cut
  just before a word, the true word and three distractor words drawn from the
  same documents by frequency, each as many tokens long as the true word when
  it continues this passage (so a model with no knowledge cannot prefer the
  gold by length); the gold position is random. A model that knows the text prefers the true word; one with
  random weights scores near 25%.
- ``xlstm_cloze`` (LAMBADA-style loglikelihood): predict the last word of a
  line from the text before it; acc = the greedy continuation is exactly the
  word (chance ~0), perplexity of the word.
- ``xlstm_nextline`` (greedy generation until a newline): the next line of
  a passage, given its indentation; exact match (chance ~0).
- ``xlstm_heldout_ppl`` (rolling loglikelihood): word / byte perplexity and
  bits per byte of whole documents (capped in length).
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from typing import Any

WORD = re.compile(r"(?<![\w.])[A-Za-z_][A-Za-z0-9_]{2,}\b")
LINE_END_WORD = re.compile(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_]{2,})\n")
CONTEXT_CHARS = 600
MIN_CONTEXT = 120
DOC_CHARS = 3000


@functools.lru_cache(maxsize=4)
def _documents(shards: str, tokenizer: str, max_docs: int) -> tuple[str, ...]:
    """Texts of up to `max_docs` documents of `shards` (in shard order)."""
    from data.sources import expand_source, open_shard
    from data.tarshard import iter_samples
    from data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    out: list[str] = []
    for url in expand_source(shards).urls:
        raw = open_shard(url)
        try:
            for _key, ids, _off in iter_samples(raw, url):
                text = tok.decode(ids.tolist())
                if len(text) > 2 * MIN_CONTEXT:
                    out.append(text)
                if len(out) >= max_docs:
                    return tuple(out)
        finally:
            raw.close()
    if not out:
        raise ValueError(f"heldout_shards {shards!r}: no documents long enough for the tasks")
    return tuple(out)


def _args(kwargs: dict[str, Any]) -> tuple[str, str, int, int]:
    shards, tokenizer = kwargs.get("heldout_shards"), kwargs.get("tokenizer")
    if not shards or not tokenizer:
        raise ValueError("the xlstm_* tasks need metadata heldout_shards and tokenizer "
                         "(python -m pretrain.evaluate passes them; or --metadata in lm_eval)")
    return str(shards), str(tokenizer), int(kwargs.get("num_examples", 200)), \
        int(kwargs.get("seed", 1234))


def _context(text: str, start: int) -> str:
    """The text before `start`, at most CONTEXT_CHARS, starting at a line if one begins early."""
    lo = max(0, start - CONTEXT_CHARS)
    ctx = text[lo:start]
    nl = ctx.find("\n")
    if lo > 0 and 0 <= nl < len(ctx) // 2:
        ctx = ctx[nl + 1:]
    return ctx


def _spread(rng: random.Random, items: list, n: int) -> list:
    return items if len(items) <= n else rng.sample(items, n)


def _dataset(rows: list[dict[str, Any]], what: str):
    import datasets

    if not rows:
        raise ValueError(f"{what}: the held-out documents gave no examples")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def nextword(**kwargs: Any):
    """xlstm_nextword: {context, choices (4 words), gold (index)}."""
    shards, tokenizer, n, seed = _args(kwargs)
    from data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    docs = _documents(shards, tokenizer, max(8, n))
    rng = random.Random(seed)
    counts: Counter = Counter(m.group() for d in docs for m in WORD.finditer(d))
    by_len: dict[int, list[str]] = {}
    for w in counts:
        by_len.setdefault(len(tok.encode(w)), []).append(w)
    picks = []
    per_doc = max(1, -(-n // len(docs)))
    for d in docs:
        ms = [m for m in WORD.finditer(d) if m.start() >= MIN_CONTEXT]
        picks += [(d, m) for m in _spread(rng, ms, per_doc)]
    rng.shuffle(picks)
    rows = []
    for d, m in picks:
        word = m.group()
        context = _context(d, m.start())
        lead = context[-16:].split("\n")[-1]  # the tokens a continuation is cut from

        def size(w: str, lead: str = lead) -> int:  # tokens of w as a continuation
            return len(tok.encode(lead + w)) - len(tok.encode(lead))

        target = size(word)
        pool = [w for k in (-1, 0, 1) for w in by_len.get(len(tok.encode(word)) + k, [])
                if w != word]
        pool = _spread(rng, pool, 400)
        pool = [w for w in pool if size(w) == target]
        if len(pool) < 3:
            continue
        weights = [counts[w] for w in pool]
        wrong: list[str] = []
        while len(wrong) < 3:
            w = rng.choices(pool, weights)[0]
            if w not in wrong:
                wrong.append(w)
        gold = rng.randrange(4)
        choices = wrong[:gold] + [word] + wrong[gold:]
        rows.append({"context": context, "choices": choices, "gold": gold})
        if len(rows) >= n:
            break
    return _dataset(rows, "xlstm_nextword")


def cloze(**kwargs: Any):
    """xlstm_cloze: {context, target} with target the last word of a line."""
    shards, tokenizer, n, seed = _args(kwargs)
    docs = _documents(shards, tokenizer, max(8, n))
    rng = random.Random(seed + 1)
    per_doc = max(1, -(-n // len(docs)))
    rows = []
    for d in docs:
        ms = [m for m in LINE_END_WORD.finditer(d) if m.start(1) >= MIN_CONTEXT]
        rows += [{"context": _context(d, m.start(1)), "target": m.group(1)}
                 for m in _spread(rng, ms, per_doc)]
    rng.shuffle(rows)
    return _dataset(rows[:n], "xlstm_cloze")


def nextline(**kwargs: Any):
    """xlstm_nextline: {context (ends with the line's indentation), target (the line)}."""
    shards, tokenizer, n, seed = _args(kwargs)
    docs = _documents(shards, tokenizer, max(8, n))
    rng = random.Random(seed + 2)
    per_doc = max(1, -(-n // len(docs)))
    rows = []
    for d in docs:
        cands = []
        at = 0
        for line in d.split("\n"):
            body = line.lstrip()
            indent = len(line) - len(body)
            if at >= MIN_CONTEXT and 8 <= len(body) <= 80:
                cands.append((at + indent, body.rstrip()))
            at += len(line) + 1
        rows += [{"context": _context(d, s), "target": body} for s, body in _spread(rng, cands, per_doc)]
    rng.shuffle(rows)
    return _dataset(rows[:n], "xlstm_nextline")


def heldout_ppl(**kwargs: Any):
    """xlstm_heldout_ppl: {text} whole documents, at most DOC_CHARS characters."""
    shards, tokenizer, n, seed = _args(kwargs)
    docs = _documents(shards, tokenizer, max(8, n))
    rows = [{"text": d[:DOC_CHARS]} for d in docs[: max(1, n // 4)]]
    return _dataset(rows, "xlstm_heldout_ppl")

"""Streaming, packing, exactly-once resumable loader over token shards.

See the package docstring (`data/__init__.py`) for the batch contract and the
resume design. In short:

* Each source's shards are "units". Epoch e of source s visits them in a
  seeded permutation; *position* p of epoch e means unit `perm_{s,e}[p]`.
* The loader runs N = world_size * max(1, num_workers) *slots* (one per
  rank and dataloader worker); slot j reads positions j, j+N, j+2N, ... of
  each epoch (its "stride"), after any explicit work items it was given.
* Inside a unit, samples pass a seeded *window shuffle*: windows of K
  consecutive samples, each emitted in the permutation seeded by
  (seed, source, epoch, position, window start). A window is restorable
  from (window start, number emitted), so the shuffle buffer costs nothing
  in the state.
* A slot packs the documents it draws (mixing sources by weight with a
  counter-based RNG) into rows and emits whole micro-batches; every batch
  carries the slot's state *after* it, and the main process keeps the state
  of the last batch it handed out per slot.
* The state is the list of all N slot states (a few numbers each) plus the
  world size and worker count: that *is* the global position. Loading it
  with the same world size and worker count restores every slot as it was
  (bitwise the same stream). Loading it with another shape turns it into the
  exact set of remaining work (unread windows, partly-read documents,
  untouched units) and deals that round-robin to the new slots; every
  remaining sample of the epoch is then read exactly once.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import os
import pickle
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .sources import Shards, SourceError, expand_source, local_path, map_local, open_shard
from .tarshard import ShardError, iter_samples

STATE_KIND = "xlstm-data-state"
STATE_VERSION = 1
PACKING = ("pack", "concat")
IGNORE_INDEX = -100
_MIX_BLOCK = 4096


@dataclass
class SourceSpec:
    """One source: a spec string (see `data.sources`), a mixing weight and a name."""

    url: str
    weight: float = 1.0
    name: str | None = None


@dataclass
class LoaderConfig:
    """Everything that defines the stream. Build with `LoaderConfig.from_dict(d)` or directly.

    sources: a spec string, a list of them, or dicts/`SourceSpec` with `url`,
        `weight` (relative mixing weight) and `name`.
    seq_len, micro_batch_size: each batch is (micro_batch_size, seq_len).
    rank, world_size: this process's place among the data-parallel ranks.
    num_workers: torch DataLoader worker processes per rank (0: in-process).
    packing: "pack" (reset at document starts, cross-document targets ignored)
        or "concat" (plain concatenation with EOS between documents).
    shuffle_buffer: window K of the within-shard shuffle (<= 1: shard order).
    shuffle_shards: seeded shard order per epoch (False: spec order every epoch).
    epochs: None streams forever; an int ends after that many epochs (the
        last batch of each slot is padded: input pad_id, label -100).
    on_error: "raise" or "skip" (skip a corrupt/unreachable shard, warn, count).
    prefetch_factor, batches_per_transfer: each worker sends groups of this many
        micro-batches (fewer messages), and keeps prefetch_factor groups in flight.
    """

    sources: Any
    seq_len: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    seed: int = 0
    packing: str = "pack"
    shuffle_buffer: int = 1024
    shuffle_shards: bool = True
    epochs: int | None = None
    eos_id: int = 2
    pad_id: int = 3
    vocab_size: int | None = None
    on_error: str = "raise"
    retries: int = 3
    retry_backoff: float = 0.5
    timeout: float = 30.0
    verify_sha256: bool = True
    prefetch_factor: int = 4
    batches_per_transfer: int = 4
    pin_memory: bool = False
    return_meta: bool = False

    @classmethod
    def from_dict(cls, d: dict | LoaderConfig, **overrides) -> LoaderConfig:
        if isinstance(d, LoaderConfig):
            return dataclasses.replace(d, **overrides)
        d = {**d, **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown loader config keys: {sorted(unknown)}")
        return cls(**d)

    def source_specs(self) -> list[SourceSpec]:
        src = self.sources
        if isinstance(src, (str, SourceSpec, dict)):
            src = [src]
        out = []
        for i, s in enumerate(src):
            if isinstance(s, str):
                s = SourceSpec(s)
            elif isinstance(s, dict):
                s = SourceSpec(**s)
            out.append(SourceSpec(s.url, float(s.weight), s.name or f"source{i}"))
        return out

    def check(self) -> None:
        if self.packing not in PACKING:
            raise ValueError(f"packing must be one of {PACKING}, got {self.packing!r}")
        if self.seq_len < 1 or self.micro_batch_size < 1:
            raise ValueError("seq_len and micro_batch_size must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in world of size {self.world_size}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be raise or skip, got {self.on_error!r}")


def _copy(x):
    """Deep copy of a JSON-like state (dicts, lists, scalars): much cheaper than deepcopy."""
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_copy(v) for v in x]
    return int(x) if isinstance(x, np.integer) else x


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


# -- one slot: reading, shuffling, mixing, packing --------------------------------
class _SourceReader:
    """The sample stream of one source inside one slot."""

    def __init__(self, slot: _Slot, s: int, st: dict):
        self.slot, self.s, self.st = slot, s, st
        self.cfg = slot.cfg
        self.shards: Shards = slot.shards[s]
        self.units = len(self.shards.urls)
        self._gen: Iterator | None = None
        self.exhausted = bool(st.get("exhausted", False))

    # the unit (url) at position p of epoch e
    def url(self, e: int, p: int) -> str:
        return self.shards.urls[self.slot.perm(self.s, e)[p]]

    def _next_item(self) -> dict | None:
        st = self.st
        while st["items"]:
            it = st["items"][0]
            if "run" in it:
                a, b, step = it["run"]
                if a >= b:
                    st["items"].pop(0)
                    continue
                it["run"] = [a + step, b, step]
                return {"e": it["e"], "p": a, "r": [[0, -1]]}
            return st["items"].pop(0)
        j, n = self.slot.st["j"], self.slot.st["N"]
        while self.cfg.epochs is None or st["epoch"] < self.cfg.epochs:
            p = j + st["cursor"] * n
            if p < self.units:
                st["cursor"] += 1
                return {"e": st["epoch"], "p": p, "r": [[0, -1]]}
            st["epoch"] += 1
            st["cursor"] = 0
        return None

    def _samples(self, cur: dict, verify: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """(sample index, tokens) of the item's included samples from coordinate cur['w'].

        Local files are read whole (zero-copy ids; index and digest checked once per
        process while the file is unchanged); HTTP and pipe sources are streamed.
        """
        url = self.url(cur["e"], cur["p"])
        sha = self.shards.sha256.get(url) if (verify and self.cfg.verify_sha256) else None
        path = local_path(url)
        if path is not None and os.path.isfile(path):
            yield from self._mapped_samples(url, cur, sha)
            return
        f = open_shard(url, retries=self.cfg.retries, backoff=self.cfg.retry_backoff,
                       timeout=self.cfg.timeout, on_retry=self.slot.on_retry)
        try:
            coord = 0
            ranges = cur["r"]
            for idx, (_key, tokens, _off) in enumerate(
                    iter_samples(f, url, vocab_size=self.slot.vocab_size(self.s),
                                 expect_sha256=sha)):
                if not any(lo <= idx and (hi < 0 or idx < hi) for lo, hi in ranges):
                    if all(hi >= 0 and idx >= hi for _lo, hi in ranges) and sha is None:
                        return  # past the last range; no digest to finish
                    continue
                if coord >= cur["w"]:
                    yield idx, tokens
                coord += 1
        finally:
            f.close()

    def _mapped_samples(self, url: str, cur: dict, sha: str | None
                        ) -> Iterator[tuple[int, np.ndarray]]:
        """`_samples` of a local shard: the same samples, errors and order as the stream."""
        cfg = self.cfg
        shard = map_local(url, retries=cfg.retries, backoff=cfg.retry_backoff,
                          on_retry=self.slot.on_retry, vocab_size=self.slot.vocab_size(self.s),
                          expect_sha256=sha)
        n, ranges, w = shard.n, cur["r"], cur["w"]
        if len(ranges) == 1 and ranges[0][1] < 0:
            idxs: Any = range(max(0, ranges[0][0]) + w, n)
        else:
            keep = np.zeros(n, dtype=bool)
            for lo, hi in ranges:
                keep[max(0, lo):n if hi < 0 else hi] = True
            idxs = np.flatnonzero(keep)[w:].tolist()
        tokens = shard.tokens
        for idx in idxs:
            yield idx, tokens(idx)
        # a cut or corrupt shard fails where a stream reader would reach the problem
        if shard.error is not None and (sha is not None or
                                        any(hi < 0 or hi > n for _lo, hi in ranges)):
            raise shard.error

    def _docs(self) -> Iterator[tuple[tuple, np.ndarray]]:
        st, cfg = self.st, self.cfg
        k = max(1, int(cfg.shuffle_buffer))
        barren = 0  # units in a row that gave nothing (empty, or skipped after errors)
        while True:
            cur = st["cur"]
            if cur is None:
                it = self._next_item()
                if it is None:
                    return
                cur = st["cur"] = {**it, "w": 0, "m": 0, "n": 0}
            barren += 1
            if barren > 2 * self.units + 2:
                raise RuntimeError(f"source {self.s}: {barren} shards in a row gave no sample "
                                   f"(last error: {self.slot.st['stats']['last_error']})")
            try:
                stream = self._samples(cur)
                while True:
                    window = []
                    for x in stream:
                        window.append(x)
                        if len(window) >= k:
                            break
                    if not window:
                        break
                    size = cur["n"] = len(window)
                    perm = (_rng(cfg.seed, 7, self.s, cur["e"], cur["p"], cur["w"])
                            .permutation(size).tolist() if k > 1 else range(size))
                    s, e, p = self.s, cur["e"], cur["p"]
                    first, t = cur["r"][0][0], cur.get("t", 0)  # a partly-read first sample
                    if cur["m"] < size:
                        barren = 0
                    while (m := cur["m"]) < size:
                        cur["m"] = m + 1
                        idx, tokens = window[perm[m]]
                        yield (s, e, p, idx), tokens, (t if idx == first else 0)
                    cur["w"] += size
                    cur["m"] = cur["n"] = 0
            except (ShardError, SourceError, OSError) as e:
                if cfg.on_error != "skip":
                    raise
                self.slot.skipped(e)
            st["cur"] = None

    def next_doc(self):
        if self._gen is None:
            self._gen = self._docs()
        try:
            return next(self._gen)
        except StopIteration:
            self.exhausted = self.st["exhausted"] = True  # kept, so a resume draws the same
            return None


class _Slot:
    """One reader of the global stream (a rank, or one dataloader worker of a rank)."""

    def __init__(self, cfg: LoaderConfig, shards: list[Shards], weights: list[float],
                 state: dict):
        self.cfg, self.shards, self.weights = cfg, shards, weights
        self.st = state
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._mix_block: tuple[int, np.ndarray] | None = None
        self.readers = [_SourceReader(self, s, state["src"][s]) for s in range(len(shards))]

    def vocab_size(self, s: int) -> int | None:
        return self.cfg.vocab_size or self.shards[s].vocab_size

    def perm(self, s: int, e: int) -> np.ndarray:
        key = (s, e)
        if key not in self._perms:
            n = len(self.shards[s].urls)
            self._perms[key] = (_rng(self.cfg.seed, 3, s, e).permutation(n)
                                if self.cfg.shuffle_shards else np.arange(n))
            if len(self._perms) > 8:
                self._perms.pop(next(iter(self._perms)))
        return self._perms[key]

    def on_retry(self, url, err) -> None:
        self.st["stats"]["retries"] += 1

    def skipped(self, err: Exception) -> None:
        stats = self.st["stats"]
        stats["skipped_shards"] += 1
        stats["last_error"] = str(err)
        name = getattr(err, "shard", None) or str(err).split(" ")[0]
        stats["skipped"] = (stats.get("skipped", []) + [name])[-16:]  # the last 16 names
        warnings.warn(f"data: skipping shard: {err}", RuntimeWarning, stacklevel=2)

    def _choose(self) -> _SourceReader | None:
        if len(self.readers) == 1:
            return None if self.readers[0].exhausted else self.readers[0]
        alive = [r for r in self.readers if not r.exhausted]
        if len(alive) <= 1:
            return alive[0] if alive else None
        k = self.st["mix"]
        b = k // _MIX_BLOCK
        if self._mix_block is None or self._mix_block[0] != b:
            self._mix_block = (b, _rng(self.cfg.seed, 5, self.st["gen"], self.st["j"], b)
                               .random(_MIX_BLOCK))
        u = self._mix_block[1][k % _MIX_BLOCK]
        self.st["mix"] = k + 1
        w = np.cumsum([self.weights[r.s] for r in alive])
        return alive[int(np.searchsorted(w, u * w[-1], side="right"))]

    def _draw(self) -> tuple | None:
        """The next document: ((source, epoch, position, index), tokens, token offset)."""
        if len(self.readers) == 1:  # one source: no mixing draw
            r = self.readers[0]
            return None if r.exhausted else r.next_doc()
        while True:
            r = self._choose()
            if r is None:
                return None
            d = r.next_doc()
            if d is not None:
                return d

    def _read_one(self, key: tuple) -> np.ndarray:
        s, e, p, idx = key
        r = self.readers[s]
        cur = {"e": e, "p": p, "r": [[idx, idx + 1]], "w": 0}
        for _i, tokens in r._samples(cur, verify=False):
            return tokens
        raise ShardError(r.url(e, p), None, f"sample {idx} is missing on resume")

    def batches(self, alloc=None) -> Iterator[tuple[tuple | None, bytes, int]]:
        """Yield (compact batch, pickled state after it, batches so far) forever, or until
        the epochs are read; the last item has no batch (None), only the final state.

        A compact batch is (ids, starts, end, meta): ids, the (B*S+1,) packed stream of the
        rows, a new int64 array, or the buffer `alloc()` returns (a worker packs straight
        into shared memory); starts, the stream positions where a document begins; end,
        where padding begins (B*S+1 when there is none); meta (`return_meta`) or None.
        `_finish` turns it into the contract's tensors.
        """
        cfg, st = self.cfg, self.st
        b, s = cfg.micro_batch_size, cfg.seq_len
        need = b * s + 1
        eos, pad = cfg.eos_id, cfg.pad_id
        meta = cfg.return_meta
        stats = st["stats"]
        pending = None  # (key, tokens, offset) carried into the next batch
        if st["carry"] is not None:
            c = st["carry"]
            key = tuple(c[:4])
            try:
                pending = (key, self._read_one(key), c[4])
            except (ShardError, SourceError, OSError) as e:
                if cfg.on_error != "skip":
                    raise
                self.skipped(e)
        draw, empty, i64 = self._draw, np.empty, np.int64
        while not st["done"]:
            flat = empty(need, dtype=i64) if alloc is None else alloc()
            starts = []
            pos = 0
            segs = []
            from_carry = pending is not None
            while pos < need:
                if pending is None:
                    pending = draw()
                    if pending is None:
                        break
                key, tokens, off = pending
                n = len(tokens) + 1  # the document and its EOS
                take = min(n - off, need - pos)
                hi = off + take
                if hi == n:  # the document ends in this batch: its EOS too
                    flat[pos:pos + take - 1] = tokens[off:]
                    flat[pos + take - 1] = eos
                else:
                    flat[pos:pos + take] = tokens[off:hi]
                if off == 0:
                    starts.append(pos)
                if meta:
                    segs.append((pos, key, off, take))
                pos += take
                # the last token of a batch is also the first of the next (rows overlap by one)
                pending = (key, tokens, hi - 1) if pos == need else None
            if pos < need:  # the stream has ended (finite epochs)
                st["done"] = True
                st["carry"] = None
                if pos == 0 or (pos == 1 and from_carry):
                    break  # nothing new: that token was already the last target
                flat[pos:] = pad
            else:
                st["carry"] = [*pending[0], pending[2]]
            stats["batches"] += 1
            stats["tokens"] += b * s
            batch = (flat, starts, pos, self._meta(segs) if meta else None)
            yield batch, pickle.dumps(st, protocol=pickle.HIGHEST_PROTOCOL), stats["batches"]
        # the final state (counters), no batch
        yield None, pickle.dumps(st, protocol=pickle.HIGHEST_PROTOCOL), stats["batches"]

    def _meta(self, segs: list[tuple]) -> list[list[tuple]]:
        """Per row, the document pieces it holds: (source, epoch, shard url, sample index,
        token lo, token hi, offset in the row)."""
        b, s = self.cfg.micro_batch_size, self.cfg.seq_len
        meta = []
        for r in range(b):
            lo, hi = r * s, r * s + s + 1
            row = []
            for pos, key, off, take in segs:
                a, z = max(pos, lo), min(pos + take, hi)
                if a < z:
                    s_, e, p, i = key
                    row.append((s_, e, self.readers[s_].url(e, p), i, off + a - pos,
                                off + z - pos, a - lo))
            meta.append(row)
        return meta


def _compact_dtype(cfg: LoaderConfig, shards: list[Shards]) -> np.dtype:
    """The most compact dtype that holds every id, EOS and pad: what workers send."""
    top = max(cfg.eos_id, cfg.pad_id) + 1
    vocabs = [cfg.vocab_size or sh.vocab_size for sh in shards]
    if all(v is not None for v in vocabs):
        top = max(top, *vocabs)
        if top <= 1 << 16:
            return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _fresh_slot(j: int, n: int, nsrc: int, gen: int = 0) -> dict:
    return {"j": j, "N": n, "gen": gen, "mix": 0, "carry": None, "done": False,
            "src": [{"items": [], "epoch": 0, "cursor": 0, "cur": None} for _ in range(nsrc)],
            "stats": {"batches": 0, "tokens": 0, "skipped_shards": 0, "retries": 0,
                      "last_error": None}}


# -- redistribution: a state of N slots -> the work of N' new slots ----------------
def _coords_to_ranges(ranges: list[list[int]], coords: list[int]) -> list[list[int]]:
    """Sample indices of item coordinates `coords` (sorted), as [lo, lo+1] ranges."""
    out, coord, ci = [], 0, 0
    for lo, hi in ranges:
        if ci >= len(coords):
            break
        span = (hi - lo) if hi >= 0 else None
        while ci < len(coords) and (span is None or coords[ci] < coord + span):
            i = lo + coords[ci] - coord
            out.append([i, i + 1])
            ci += 1
        coord += span or 0
    return out


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in ranges:
        if out and out[-1][1] == lo and lo >= 0:
            out[-1][1] = hi
        else:
            out.append([lo, hi])
    return out


def _tail_ranges(ranges: list[list[int]], start: int) -> list[list[int]]:
    """Ranges of the item coordinates >= start."""
    out, coord = [], 0
    for lo, hi in ranges:
        span = (hi - lo) if hi >= 0 else None
        if span is not None and coord + span <= start:
            coord += span
            continue
        skip = max(0, start - coord)
        out.append([lo + skip, hi])
        if span is not None:
            coord += span
    return out


def _remaining_work(state: dict, units: list[int], shuffle_buffer: int, seed: int
                    ) -> list[list[dict]]:
    """Per source: the ordered list of work items nobody has consumed yet."""
    slots = state["slots"]
    nsrc = len(units)
    work: list[list[dict]] = [[] for _ in range(nsrc)]
    emax = [max(sl["src"][s]["epoch"] for sl in slots) for s in range(nsrc)]
    k = max(1, int(shuffle_buffer))
    for sl in slots:
        if sl["carry"] is not None:
            s, e, p, idx, off = sl["carry"]
            work[s].append({"e": e, "p": p, "r": [[idx, idx + 1]], "t": off})
        for s in range(nsrc):
            ss = sl["src"][s]
            cur = ss["cur"]
            if cur is not None:
                left = []
                if cur["n"]:
                    perm = (_rng(seed, 7, s, cur["e"], cur["p"], cur["w"]).permutation(cur["n"])
                            if k > 1 else np.arange(cur["n"]))
                    left = sorted(cur["w"] + int(i) for i in perm[cur["m"]:])
                    tail_from = cur["w"] + cur["n"]
                else:
                    tail_from = cur["w"]
                r = _merge_ranges(_coords_to_ranges(cur["r"], left)
                                  + _tail_ranges(cur["r"], tail_from))
                if r:
                    item = {"e": cur["e"], "p": cur["p"], "r": r}
                    if "t" in cur and r[0][0] == cur["r"][0][0]:
                        item["t"] = cur["t"]
                    work[s].append(item)
            work[s].extend(copy.deepcopy(ss["items"]))
            j, n = sl["j"], sl["N"]
            if sl["done"]:
                continue
            first = j + ss["cursor"] * n
            if first < units[s]:
                work[s].append({"e": ss["epoch"], "run": [first, units[s], n]})
            for e in range(ss["epoch"] + 1, emax[s] + 1):
                if j < units[s]:
                    work[s].append({"e": e, "run": [j, units[s], n]})
    for s in range(nsrc):
        work[s].sort(key=lambda it: it["e"])  # stable: keeps each epoch's order
    return work


def _deal(work: list[dict], n: int) -> list[list[dict]]:
    """Round-robin the items (runs expanded) over n slots; re-compress whole units to runs."""
    flat = []
    for it in work:
        if "run" in it:
            a, b, step = it["run"]
            flat.extend({"e": it["e"], "p": p} for p in range(a, b, step))
        else:
            flat.append(it)
    per: list[list[dict]] = [[] for _ in range(n)]
    for i, it in enumerate(flat):
        per[i % n].append(it)
    return [_compress(items) for items in per]


def _compress(items: list[dict]) -> list[dict]:
    """Turn consecutive whole units of one epoch with a common stride into runs."""
    out: list[dict] = []
    run: list[int] = []
    run_e = None
    for it in items + [None]:
        whole = it is not None and "r" not in it
        if run and (not whole or it["e"] != run_e or it["p"] <= run[-1] or
                    (len(run) > 1 and it["p"] - run[-1] != run[1] - run[0])):
            step = run[1] - run[0] if len(run) > 1 else 1
            out.append({"e": run_e, "run": [run[0], run[-1] + 1, step]})
            run = []
        if whole:
            run_e = it["e"]
            run.append(it["p"])
        elif it is not None:
            out.append(it)
    return out


# -- the dataset each dataloader worker iterates --------------------------------------
_MESSAGE_BATCHES = 16  # a worker's message holds whole groups: about this many batches,
_MESSAGE_BYTES = 1 << 20  # or about this many bytes of ids, whichever is fewer (>= 1 group)


class _Ring:
    """Shared memory through which workers hand packed ids to the main process.

    Worker w owns `depth` slots of `per` batches each: its g-th message is packed in
    place into slot g % depth, and the message itself carries only the small parts
    (document starts, states). The main process widens each batch into new int64
    tensors and, once all of a message's are, counts it as consumed; a worker waits
    before reusing a slot the main process has not consumed yet (the DataLoader's own
    prefetch limit normally keeps it from ever waiting). This keeps the bulk of the data
    out of the worker -> main pipe, which costs more than the packing itself.
    """

    def __init__(self, workers: int, depth: int, per: int, need: int, dtype: np.dtype):
        self.depth, self.per, self.need, self.dtype = depth, per, need, np.dtype(dtype)
        store = torch.int16 if self.dtype.itemsize == 2 else torch.int32
        self.ids = torch.empty((workers, depth, per, need), dtype=store).share_memory_()
        # consumed[w]: messages of worker w the main process is done with; [-1]: closed
        self.flags = torch.zeros(workers + 1, dtype=torch.int64).share_memory_()

    def view(self, w: int) -> np.ndarray:
        """Worker w's slots, (depth, per, need) of the compact dtype."""
        return self.ids[w].numpy().view(self.dtype)

    def wait(self, w: int, g: int, ppid: int) -> bool:
        """Block until message g of worker w may be packed; False: the reader has gone."""
        flags = self.flags.numpy()
        delay = 1e-5
        while g - flags[w] >= self.depth:
            if flags[-1] or os.getppid() != ppid:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)
        return True


class _SlotDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker iterates: (worker id, message number, [(compact batch
    without its ids | None, pickled state, batches), ...]), `groups` whole groups of
    batches per message (fewer at the end); the ids of message g of worker w are in
    the ring's slot g % depth."""

    def __init__(self, cfg: LoaderConfig, shards, weights, slots: list, phase: int,
                 ring: _Ring, groups: int):
        self.cfg, self.shards, self.weights = cfg, shards, weights
        self.slots, self.phase = slots, phase  # this rank's slot states, by local index
        self.ring, self.groups = ring, groups

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        nw = len(self.slots)
        w = 0 if info is None else info.id
        local = (w + self.phase) % nw
        slot = _Slot(self.cfg, self.shards, self.weights, _state_of(self.slots[local]))
        ring, group = self.ring, max(1, self.cfg.batches_per_transfer)
        view, ppid = ring.view(w), os.getppid()
        out: list = []
        at = [0]  # the message being filled
        whole = 0  # groups complete in it

        def alloc():
            if not out and not ring.wait(w, at[0], ppid):
                raise _ReaderGone
            return view[at[0] % ring.depth, len(out)]

        try:
            for bt, st, count in slot.batches(alloc):
                out.append((None if bt is None else (None, *bt[1:]), st, count))  # ids: ring
                # groups end at multiples of `group` of the slot's own batch count, so a
                # resume in the middle of a group continues the same interleaving of workers
                whole += bt is None or count % group == 0
                if bt is None or whole == self.groups:
                    yield w, at[0], out
                    out = []
                    at[0] += 1
                    whole = 0
            if out:
                yield w, at[0], out
        except _ReaderGone:
            return


class _ReaderGone(Exception):
    """The main process stopped reading (or died): a worker ends its stream quietly."""


def _state_of(x: dict | bytes) -> dict:
    """A private copy of a slot state kept as a dict or as its pickle (as batches carry it)."""
    return pickle.loads(x) if isinstance(x, bytes) else _copy(x)


def _finish(batch: tuple, b: int, s: int, pack: bool, pin: bool = False) -> dict:
    """Compact batch (see `_Slot.batches`) -> the contract's tensors, in the process that
    hands it out: input_ids, labels (int64 (b, s), labels -100 where ignored), reset
    (bool (b, s)), and "meta" when asked for. One widening copy (none when the ids are
    already int64) and one copy for the labels; the masks touch only the few document
    starts and the padding."""
    ids, starts, end, meta = batch
    if ids.itemsize == 2:  # uint16 from a worker: torch widens it faster than numpy
        ids = torch.from_numpy(ids).to(torch.int64).numpy()
    elif ids.itemsize != 8:  # int32 from a worker
        ids = ids.astype(np.int64)
    n = b * s
    labels = ids[1:].copy()
    if end <= n:  # padding from stream position `end`: no target there
        labels[max(end - 1, 0):] = IGNORE_INDEX
    reset = np.zeros(n, dtype=bool)
    if pack:
        for p in starts:  # a document starts at p: reset there, no target across it
            if p:
                labels[p - 1] = IGNORE_INDEX
            if p < n:
                reset[p] = True
        reset[::s] = True
    out = {"input_ids": torch.from_numpy(ids[:n].reshape(b, s)),
           "labels": torch.from_numpy(labels.reshape(b, s)),
           "reset": torch.from_numpy(reset.reshape(b, s))}
    if pin:
        out = {k: v.pin_memory() for k, v in out.items()}
    if meta is not None:
        out["meta"] = meta
    return out


def _collate_none(x):
    return x


class TokenLoader:
    """Iterable of packed batches for one rank; `state_dict()` is the global position.

    Iterating again continues where the last batch handed out left off.
    """

    def __init__(self, config: LoaderConfig | dict):
        cfg = LoaderConfig.from_dict(config)
        cfg.check()
        self.cfg = cfg
        specs = cfg.source_specs()
        self.names = [s.name for s in specs]
        self.weights = [s.weight for s in specs]
        self.shards = [expand_source(s.url, retries=cfg.retries, backoff=cfg.retry_backoff,
                                     timeout=cfg.timeout) for s in specs]
        self.nw = max(1, cfg.num_workers)
        self.n_slots = cfg.world_size * self.nw
        if cfg.epochs is None:
            for name, sh in zip(self.names, self.shards):
                if len(sh.urls) < self.n_slots:
                    raise ValueError(
                        f"source {name!r} has {len(sh.urls)} shards but the loader runs "
                        f"{self.n_slots} readers (world_size x workers): write more, smaller "
                        "shards, or use fewer workers")
        self.fingerprint = self._fingerprint()
        self.content = self._content_fingerprint()
        self._global = {"slots": [_fresh_slot(j, self.n_slots, len(specs))
                                  for j in range(self.n_slots)]}
        self._phase = 0

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for sh in self.shards:  # shard names only: the same shards may move (disk, http, pipe)
            h.update(json.dumps([u.rstrip("/").rsplit("/", 1)[-1] for u in sh.urls]).encode())
        return h.hexdigest()[:24]

    def _content_fingerprint(self) -> str | None:
        """Digest of the shards' sha256 when every shard has one (from manifests)."""
        h = hashlib.sha256()
        for sh in self.shards:
            if len(sh.sha256) != len(sh.urls):
                return None
            h.update(json.dumps([sh.sha256[u] for u in sh.urls]).encode())
        return h.hexdigest()[:24]

    # -- iteration ---------------------------------------------------------------
    def _my_slots(self) -> list[int]:
        r = self.cfg.rank
        return list(range(r * self.nw, (r + 1) * self.nw))

    def __iter__(self) -> Iterator[dict]:
        mine = self._my_slots()
        cfg = self.cfg
        b, s, pack = cfg.micro_batch_size, cfg.seq_len, cfg.packing == "pack"
        pin = cfg.pin_memory and torch.cuda.is_available()
        slots = self._global["slots"]
        if cfg.num_workers == 0:  # in-process: one slot, no DataLoader in between
            j = mine[0]
            slot = _Slot(cfg, self.shards, self.weights, _state_of(slots[j]))
            for batch, st, _count in slot.batches():
                slots[j] = st  # the state after the last batch handed out
                if batch is not None:
                    yield _finish(batch, b, s, pack, pin)
            return
        group = max(1, cfg.batches_per_transfer)
        dtype = _compact_dtype(cfg, self.shards)
        groups = max(1, min(_MESSAGE_BATCHES // group,  # groups per message
                            _MESSAGE_BYTES // (group * (b * s + 1) * dtype.itemsize)))
        ring = _Ring(cfg.num_workers, max(2, cfg.prefetch_factor) + 2, groups * group,
                     b * s + 1, dtype)
        ds = _SlotDataset(cfg, self.shards, self.weights,
                          [self._global["slots"][j] for j in mine], self._phase, ring, groups)
        source = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=cfg.num_workers, collate_fn=_collate_none,
            prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
        views = [ring.view(w) for w in range(cfg.num_workers)]
        consumed = ring.flags.numpy()
        phase0 = self._phase  # worker w reads local slot (w + phase0) % nw
        messages = iter(source)  # held here: a `for` would drop it (shutting the workers down)
        try:  # before the `finally` below told them to stop waiting
            # A message holds several groups. The DataLoader hands messages out round-robin
            # over the workers still running; groups are handed out in that same order, so
            # the stream is the one of one group per message.
            queued: list[collections.deque] = [collections.deque() for _ in views]
            running = list(range(len(views)))
            w, more = 0, True
            while running:
                while not queued[w] and more:
                    try:
                        mw, g, items = next(messages)
                    except StopIteration:
                        more = False
                        break
                    grp: list = []
                    for i, item in enumerate(items):  # split into groups
                        grp.append((i, item))
                        if item[0] is None or item[2] % group == 0 or i == len(items) - 1:
                            queued[mw].append((g, grp, i == len(items) - 1))
                            grp = []
                ended = not queued[w]
                if queued[w]:
                    g, grp, last = queued[w].popleft()
                    local = (w + phase0) % self.nw
                    for i, (bt, st, count) in grp:
                        batch = None if bt is None else _finish((views[w][g % ring.depth, i],
                                                                 *bt[1:]), b, s, pack, pin)
                        if last and i == grp[-1][0]:
                            consumed[w] = g + 1  # its ids are all widened: the slot is free
                        slots[mine[local]] = st  # the state after the last batch handed out
                        if batch is None:  # the reader finished: its final state, no batch
                            self._phase = (local + 1) % self.nw
                            ended = True
                            continue
                        self._phase = (local + 1) % self.nw if count % group == 0 else local
                        yield batch
                nxt = [v for v in running if v > w] or running  # the next worker in turn
                if ended:
                    running.remove(w)
                    nxt = [v for v in nxt if v != w] or running
                if running:
                    w = nxt[0]
        finally:
            ring.flags[-1] = 1  # workers waiting for a slot stop, then the DataLoader ends
            del messages

    # -- state -------------------------------------------------------------------
    def local_state_dict(self) -> dict:
        """This rank's part of the state (its slots); combine ranks with `merge_states`."""
        mine = self._my_slots()
        return {"kind": STATE_KIND + "/part", "version": STATE_VERSION, "rank": self.cfg.rank,
                **self._header(), "phase": self._phase,
                "slots": {str(j): _state_of(self._global["slots"][j]) for j in mine}}

    def _header(self) -> dict:
        c = self.cfg
        return {"fingerprint": self.fingerprint, "content": self.content,
                "world_size": c.world_size,
                "num_workers": c.num_workers, "seed": c.seed, "seq_len": c.seq_len,
                "micro_batch_size": c.micro_batch_size, "packing": c.packing,
                "shuffle_buffer": c.shuffle_buffer, "shuffle_shards": c.shuffle_shards,
                "sources": self.names, "units": [len(s.urls) for s in self.shards]}

    def state_dict(self, gather=None) -> dict:
        """The global data position: identical on every rank, JSON-able, small.

        With world_size > 1 this is a collective: it all-gathers the ranks' parts
        with `gather(obj) -> list` (default: torch.distributed.all_gather_object).
        """
        part = self.local_state_dict()
        if self.cfg.world_size == 1:
            return merge_states([part])
        if gather is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("state_dict() with world_size > 1 needs torch.distributed "
                                   "(or a gather function, or local_state_dict + merge_states)")

            def gather(obj):
                out = [None] * dist.get_world_size()
                dist.all_gather_object(out, obj)
                return out
        return merge_states(gather(part))

    def load_state_dict(self, state: dict) -> None:
        """Resume from a global state saved at any world size / worker count."""
        if state.get("kind") != STATE_KIND:
            raise ValueError("not a data loader state (use state_dict(), not a local part)")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("data state was saved over other shards "
                             f"({state['fingerprint']} != {self.fingerprint})")
        if state.get("content") and self.content and state["content"] != self.content:
            raise ValueError("data state was saved over shards with the same names but other "
                             "contents (manifest digests differ)")
        for k in ("seed", "shuffle_shards", "sources"):
            if state[k] != self._header()[k]:
                raise ValueError(f"data state has {k}={state[k]!r}, loader has "
                                 f"{self._header()[k]!r}")
        same = all(state[k] == self._header()[k] for k in
                   ("world_size", "num_workers", "seq_len", "micro_batch_size", "packing",
                    "shuffle_buffer"))
        if same:
            self._global = {"slots": copy.deepcopy(state["slots"])}
            self._phase = int(state["phases"][self.cfg.rank])
            return
        units = [len(s.urls) for s in self.shards]
        work = _remaining_work(state, units, state["shuffle_buffer"], state["seed"])
        gen = max(sl["gen"] for sl in state["slots"]) + 1
        slots = [_fresh_slot(j, self.n_slots, len(units), gen) for j in range(self.n_slots)]
        emax = [max(sl["src"][s]["epoch"] for sl in state["slots"]) for s in range(len(units))]
        limit = self.cfg.epochs
        for s in range(len(units)):
            todo = [it for it in work[s] if limit is None or it["e"] < limit]
            for j, items in enumerate(_deal(todo, self.n_slots)):
                slots[j]["src"][s]["items"] = items
                slots[j]["src"][s]["epoch"] = emax[s] + 1
        totals = _sum_stats(state["slots"])
        for k in ("skipped_shards", "retries", "batches", "tokens", "skipped"):
            slots[0]["stats"][k] = totals[k]
        self._global = {"slots": slots}
        self._phase = 0

    @property
    def stats(self) -> dict:
        """This rank's counters: batches, tokens, skipped_shards, skipped (shard names),
        retries, last_error. They live in the state, so they survive a resume."""
        return _sum_stats([_state_of(self._global["slots"][j]) for j in self._my_slots()])


def _sum_stats(slots: list[dict]) -> dict:
    out = {"batches": 0, "tokens": 0, "skipped_shards": 0, "retries": 0, "last_error": None,
           "skipped": []}
    for sl in slots:
        for k in ("batches", "tokens", "skipped_shards", "retries"):
            out[k] += sl["stats"][k]
        out["last_error"] = sl["stats"]["last_error"] or out["last_error"]
        out["skipped"] += sl["stats"].get("skipped", [])
    return out


def merge_states(parts: list[dict]) -> dict:
    """Combine the ranks' `local_state_dict()`s into the global state."""
    parts = sorted(parts, key=lambda p: p["rank"])
    head = {k: v for k, v in parts[0].items() if k not in ("slots", "rank", "phase", "kind")}
    if [p["rank"] for p in parts] != list(range(head["world_size"])):
        raise ValueError(f"need one part per rank 0..{head['world_size'] - 1}, "
                         f"got {[p['rank'] for p in parts]}")
    slots = {}
    for p in parts:
        slots.update({int(j): s for j, s in p["slots"].items()})
    return {"kind": STATE_KIND, **head, "phases": [p["phase"] for p in parts],
            "slots": [slots[j] for j in range(len(slots))]}


def build_loader(config: LoaderConfig | dict, **overrides) -> TokenLoader:
    """A `TokenLoader` from a config dataclass or dict (overrides win)."""
    return TokenLoader(LoaderConfig.from_dict(config, **overrides))

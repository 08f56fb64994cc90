"""Streaming, packing, exactly-once resumable loader over token shards.

The contract: the package docstring; the state and its redistribution: `data.state`.
Here: slots that read, shuffle, mix and pack (`_Slot`), the workers' shared-memory ring
(`_Ring`), the `Batch` handed out, and `TokenLoader`."""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import pickle
import time
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from .sources import Shards, SourceError, expand_source, local_path, open_shard, retry
from .state import (
    STATE_KIND,
    STATE_VERSION,
    DocRef,
    LoaderState,
    SlotState,
    SlotStats,
    Unit,
    deal,
    remaining_work,
    rng,
    slot_from_dict,
    window_order,
)
from .tarshard import ShardError, TarStream, map_shard

PACKING = ("pack", "concat")
IGNORE_INDEX = -100
_MIX_BLOCK = 4096
_SHORT = 2048  # documents of fewer tokens on average are packed from a copy of their run
# the state's shape: the same resumes bitwise, another redistributes the remaining work
_SHAPE = ("world_size", "num_workers", "seq_len", "micro_batch_size", "packing", "shuffle_buffer")


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
    verify_sha256: check each shard against its manifest's digest (xxh3-128 if listed).
    prefetch_factor, batches_per_transfer: each worker sends groups of this many
        micro-batches (fewer messages), and keeps prefetch_factor groups in flight.
    pin_memory: batches' ids in pinned memory when CUDA is available (None or True;
        False: never), so `Batch.to(cuda)` copies asynchronously."""

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
    pin_memory: bool | None = None
    return_meta: bool = False

    @classmethod
    def from_dict(cls, d: dict | LoaderConfig, **overrides) -> LoaderConfig:
        if isinstance(d, LoaderConfig):
            return dataclasses.replace(d, **overrides)
        d = {**d, **overrides}
        if unknown := set(d) - {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"unknown loader config keys: {sorted(unknown)}")
        return cls(**d)

    def source_specs(self) -> list[SourceSpec]:
        src = [self.sources] if isinstance(self.sources, (str, SourceSpec, dict)) else self.sources
        src = [SourceSpec(s) if isinstance(s, str) else SourceSpec(**s) if isinstance(s, dict)
               else s for s in src]
        return [SourceSpec(s.url, float(s.weight), s.name or f"source{i}")
                for i, s in enumerate(src)]

    def check(self) -> None:
        if self.packing not in PACKING:
            raise ValueError(f"packing must be one of {PACKING}, got {self.packing!r}")
        if self.seq_len < 1 or self.micro_batch_size < 1:
            raise ValueError("seq_len and micro_batch_size must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in world of size {self.world_size}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be raise or skip, got {self.on_error!r}")


def _state_of(x: SlotState | bytes) -> SlotState:
    """A private copy of a slot state kept as is or pickled (as batches carry it)."""
    return pickle.loads(x if isinstance(x, bytes) else pickle.dumps(x))


# -- one slot: reading, shuffling, mixing, packing --------------------------------
class _SourceReader:
    """The sample stream of one source inside one slot."""

    def __init__(self, slot: _Slot, s: int):
        self.slot, self.s, self.cfg, self.st = slot, s, slot.cfg, slot.st.sources[s]
        self.shards: Shards = slot.shards[s]
        self.units = len(self.shards.urls)
        # the next `_Run`, or None (then `exhausted` is set, so a resume draws the same)
        self.next_doc, self.run = functools.partial(next, self._runs(), None), None

    def url(self, e: int, p: int) -> str:
        """The unit (url) at position p of epoch e."""
        return self.shards.urls[self.slot.perm(self.s, e)[p]]

    def _next_unit(self) -> Unit | None:
        st = self.st
        while st.items:
            it = st.items[0]
            if it.run is not None:
                a, b, step = it.run
                if a >= b:
                    st.items.pop(0)
                    continue
                it.run = [a + step, b, step]
                return Unit(it.epoch, a)
            return st.items.pop(0)
        j, n = self.slot.st.index, self.slot.st.count
        while self.cfg.epochs is None or st.epoch < self.cfg.epochs:
            p = j + st.cursor * n
            if p < self.units:
                st.cursor += 1
                return Unit(st.epoch, p)
            st.epoch += 1
            st.cursor = 0
        return None

    def _windows(self, cur: Unit, k: int, verify: bool = True) -> Iterator[tuple[list, list]]:
        """The unit's included samples from `cur.window_start`, up to `k` at a time: (their
        indices, their tokens); a local shard mapped (`tarshard.map_shard`), any other
        streamed (`_streamed`)."""
        cfg = self.cfg
        url = self.url(cur.epoch, cur.position)
        digest = self.shards.digest(url) if (verify and cfg.verify_sha256) else None
        vocab, ranges, skip = self.slot.vocabs[self.s], cur.ranges, cur.window_start
        path = local_path(url)
        if path is None or not os.path.isfile(path):
            stream = self._streamed(url, vocab, digest, ranges, skip)
            while window := list(itertools.islice(stream, k)):
                yield [i for i, _ in window], [ids for _, ids in window]
            return
        shard = retry(url, lambda: map_shard(path, url, vocab_size=vocab, digest=digest),
                      cfg.retries, cfg.retry_backoff, self.slot.on_retry)
        n, keep = shard.n, np.zeros(shard.n, dtype=bool)
        for lo, hi in ranges:
            keep[max(0, lo):n if hi < 0 else hi] = True
        idxs = np.flatnonzero(keep)[skip:].tolist()
        for w in range(0, len(idxs), k):
            a, part = idxs[w], idxs[w:w + k]  # consecutive indices: a slice of the views
            yield part, (shard.views[a:a + len(part)] if part[-1] - a < len(part)
                         else list(map(shard.views.__getitem__, part)))
        # a cut or corrupt shard fails where a sequential reader would reach the problem
        if shard.error is not None and (digest is not None or
                                        any(hi < 0 or hi > n for _lo, hi in ranges)):
            raise shard.error

    def _streamed(self, url: str, vocab: int | None, digest: tuple[str, str] | None,
                  ranges: list[list[int]], skip: int) -> Iterator[tuple[int, np.ndarray]]:
        """`_samples` of a shard read as a stream: up to the end of `ranges` (to the end of
        the shard when a digest is to be checked)."""
        cfg = self.cfg
        last = None if any(hi < 0 for _lo, hi in ranges) else max(hi for _lo, hi in ranges)
        f = open_shard(url, retries=cfg.retries, backoff=cfg.retry_backoff,
                       timeout=cfg.timeout, on_retry=self.slot.on_retry)
        try:
            r = 0
            for i, (_key, ids, _off) in enumerate(TarStream(f, url, vocab_size=vocab,
                                                            digest=digest)):
                if last is not None and i >= last and digest is None:
                    return
                while r < len(ranges) and 0 <= ranges[r][1] <= i:
                    r += 1
                if r < len(ranges) and i >= ranges[r][0]:
                    if skip:
                        skip -= 1
                    else:
                        yield i, ids
        finally:
            f.close()

    def _runs(self) -> Iterator[_Run]:
        """Each shuffle window's documents not emitted yet, as one `_Run` (see `_Slot._draw`)."""
        st, cfg = self.st, self.cfg
        k = max(1, int(cfg.shuffle_buffer))
        barren = 0  # units in a row that gave nothing (empty, or skipped after errors)
        while True:
            cur = st.current
            if cur is None:
                cur = st.current = self._next_unit()
                if cur is None:
                    st.exhausted = True
                    return
            barren += 1
            if barren > 2 * self.units + 2:
                raise RuntimeError(f"source {self.s}: {barren} shards in a row gave no sample "
                                   f"(last error: {self.slot.st.stats.last_error})")
            try:
                for idxs, views in self._windows(cur, k):
                    size = cur.window_size = len(idxs)
                    if cur.emitted < size:
                        barren = 0
                        order = window_order(cfg.seed, self.s, cur, k, self.slot.version)
                        order = order[cur.emitted:]  # a partly-read first sample: from token t
                        yield _Run((self.s, cur.epoch, cur.position), cur, [idxs[o] for o in order],
                                   [views[o] for o in order], self.slot.eos1, cur.ranges[0][0],
                                   cur.token_offset)
                    cur.window_start += size
                    cur.emitted = cur.window_size = 0
            except (ShardError, SourceError, OSError) as e:
                if cfg.on_error != "skip":
                    raise
                self.slot.skipped(e)
            st.current = None


class _Run:
    """A unit's documents as one stream, each with its EOS, packed in slices: a window's rest,
    or the carry. ends[j]: where document j's EOS ends (lists: bisect is fast); starts: where
    documents begin (not sample `cut`, read from token t on); base[j]: where document j's
    token 0 would be; emitted: first + begun; packing: from q to stop; stream: the run
    copied once when its documents are short (then a slice per batch), else None."""

    def __init__(self, key: tuple, unit: Unit, samples: list, views: list, eos1, cut=-1, t=0):
        j = samples.index(cut) if t and cut in samples else -1
        if j >= 0:
            views[j] = views[j][t:]
        ends = np.cumsum(lens := np.fromiter(map(len, views), np.int64, len(views)) + 1)
        self.ends, self.base = ends.tolist(), (begins := ends - lens).tolist()
        self.begins = begins if j < 0 else np.delete(begins, j)  # starts, for slices
        self.starts = self.base if j < 0 else self.begins.tolist()
        self.base[j] -= t * (j >= 0)  # (j = -1: no sample cut)
        self.key, self.unit, self.samples, self.first = key, unit, samples, unit.emitted
        self.views, self.q, self.stop, self.stream = views, 0, self.ends[-1], None
        # short documents: a copy per token more, a copy per document and batch fewer
        raw = eos1.tobytes().join((*views, b"")) if self.stop < _SHORT * len(views) else b""
        if len(raw) == self.stop * eos1.itemsize:  # (and views of EOS's dtype)
            self.stream = np.frombuffer(raw, eos1.dtype)


class _Slot:
    """One reader of the global stream (a rank, or one dataloader worker of a rank)."""

    def __init__(self, cfg: LoaderConfig, shards: list[Shards], weights: list[float],
                 state: SlotState, version: int = STATE_VERSION):
        self.cfg, self.shards, self.weights, self.st = cfg, shards, weights, state
        self.version = version  # of the state it resumed from: names the window order
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._mix_block: tuple[tuple, list[int]] | None = None
        self.vocabs = [cfg.vocab_size or sh.vocab_size for sh in shards]
        self.eos1 = np.array([cfg.eos_id], np.uint16 if cfg.eos_id < 1 << 16 else np.uint32)
        self.readers = [_SourceReader(self, s) for s in range(len(shards))]

    def perm(self, s: int, e: int) -> np.ndarray:
        key = (s, e)
        if key not in self._perms:
            n = len(self.shards[s].urls)
            self._perms[key] = (rng(self.cfg.seed, 3, s, e).permutation(n)
                                if self.cfg.shuffle_shards else np.arange(n))
            if len(self._perms) > 8:
                self._perms.pop(next(iter(self._perms)))
        return self._perms[key]

    def on_retry(self, url, err) -> None:
        self.st.stats.retries += 1

    def skipped(self, err: Exception) -> None:
        stats = self.st.stats
        stats.skipped_shards += 1
        stats.last_error = str(err)
        name = getattr(err, "shard", None) or str(err).split(" ")[0]
        stats.skipped = (stats.skipped + [name])[-16:]  # the last 16 names
        warnings.warn(f"data: skipping shard: {err}", RuntimeWarning, stacklevel=2)

    def _draw(self, room: int = 1) -> _Run | None:
        """The next documents: the run of the first, open to the end of the last of those in
        a row from its source that begin in `room` (a counter-based draw of the source for
        each; its whole window when it is the only source left), or None."""
        st = self.st
        while alive := [r for r in self.readers if not r.st.exhausted]:
            k, picks = st.mix_draws, None
            if len(alive) > 1:  # which of `alive` each draw of k's block picks, by weight
                key = (k // _MIX_BLOCK, [r.s for r in alive])
                if self._mix_block is None or self._mix_block[0] != key:
                    u = rng(self.cfg.seed, 5, st.generation, st.index, key[0]).random(_MIX_BLOCK)
                    w = np.cumsum([self.weights[r.s] for r in alive])
                    self._mix_block = (key, np.searchsorted(w, u * w[-1], side="right").tolist())
                picks = self._mix_block[1]
            r = alive[0] if picks is None else alive[picks[k % _MIX_BLOCK]]
            st.mix_draws += picks is not None  # counted even when its reader has ended
            if (d := r.run) is None or d.stop == d.ends[-1]:
                if (d := r.next_doc()) is None:
                    continue
                r.run, d.stop = d, 0
            m = len(d.samples) - 1 if picks is None else bisect_right(d.ends, d.stop)
            while True:
                d.stop, d.unit.emitted, m = d.ends[m], d.first + m + 1, m + 1
                if m == len(d.samples) or d.ends[m - 1] >= d.q + room or (
                        (k := st.mix_draws % _MIX_BLOCK) == 0 or alive[picks[k]] is not r):
                    return d
                st.mix_draws += 1
        return None

    def batches(self, alloc, snapshot: bool = True, make=None) -> Iterator[Any]:
        """Yield (packed batch, state after it, batches so far) until the epochs are read
        (forever with epochs=None), then (None, the final state, batches). The state is
        pickled when `snapshot` (a worker's batches run ahead of the consumer), else the
        live object (in-process: the generator stands still while its batch is used).
        A packed batch is (ids, starts, end, meta): ids, the (B*S+1,) stream packed into
        the buffer `alloc()` returns (a worker's: shared memory); starts, where documents begin
        (an int64 array); end, where padding begins (B*S+1: none); meta or None.
        With `make` (in-process), yield `make(*packed batch)` instead, and no final item."""
        cfg, st, stats = self.cfg, self.st, self.st.stats
        meta, eos, need = cfg.return_meta, cfg.eos_id, cfg.micro_batch_size * cfg.seq_len + 1
        run = None  # the run being packed: the next batch starts at its `q`
        if (c := st.carry) is not None:  # the document the last batch cut, from its token
            try:
                r, key = self.readers[c.source], (c.source, c.epoch, c.position)
                unit = Unit(c.epoch, c.position, [[c.sample, c.sample + 1]])
                _, views = next(r._windows(unit, 1, verify=False), (None, None))
                if not views:
                    raise ShardError(r.url(*key[1:]), None, f"sample {c.sample} missing on resume")
                run = _Run(key, unit, [c.sample], views, self.eos1, c.sample, c.token_offset)
            except (ShardError, SourceError, OSError) as e:
                if cfg.on_error != "skip":
                    raise
                self.skipped(e)
        freeze = functools.partial(pickle.dumps, protocol=-1) if snapshot else (lambda x: x)
        while not st.done:
            flat = buf if type(buf := alloc()) is np.ndarray else buf.numpy()
            starts, segs, pos, from_carry = [], [], 0, run is not None
            while pos < need:
                if (run is None or run.q == run.stop) and (run := self._draw(need - pos)) is None:
                    break
                q, ends, z = run.q, run.ends, min(run.stop, run.q + need - pos)
                i, e = bisect_right(ends, q), bisect_right(ends, z - 1)  # documents of q, z - 1
                if run.stream is not None:
                    flat[pos:pos + z - q] = run.stream[q:z]
                else:  # long documents, a few per batch: from their views
                    v, p, at = run.views[i][q - (ends[i - 1] if i else 0):], q, pos
                    for j in range(i, e + 1):  # v: document j from stream position p on
                        if (y := ends[j] - 1) >= z:  # its EOS (at y) in a later batch
                            flat[at:at + z - p] = v[:z - p]
                            break
                        flat[at:at + y - p], flat[at + y - p] = v, eos
                        at, v, p = at + y + 1 - p, run.views[j + 1] if j < e else v, y + 1
                lo, hi = bisect_left(run.starts, q), bisect_left(run.starts, z)
                starts.append(run.begins[lo:hi] + (pos - q))
                if meta:  # per document piece: (position, key, token offset, length)
                    segs += [(pos + a - q, (*run.key, run.samples[j]), a - run.base[j],
                              min(z, ends[j]) - a)
                             for j in range(i, e + 1) for a in [max(q, ends[j - 1] if j else 0)]]
                pos, run.q = pos + z - q, z
            if pos < need:  # the stream has ended (finite epochs)
                st.done, st.carry = True, None
                if pos == 0 or (pos == 1 and from_carry):
                    break  # nothing new: that token was already the last target
                flat[pos:] = cfg.pad_id
            else:  # the last token of a batch is also the first of the next (rows overlap)
                run.q, run.unit.emitted = z - 1, run.first + e + 1  # z - 1: in document e
                st.carry = DocRef(*run.key, run.samples[e], z - 1 - run.base[e])
            stats.batches, stats.tokens = stats.batches + 1, stats.tokens + need - 1
            starts = starts[0] if len(starts) == 1 else np.concatenate(starts)
            packed = (buf, starts, pos, self._meta(segs) if meta else None)
            yield make(*packed) if make else (packed, freeze(st), stats.batches)
        if make is None:
            yield None, freeze(st), stats.batches  # the final state (counters), no batch

    def _meta(self, segs: list[tuple]) -> list[list[tuple]]:
        """Per row, the document pieces it holds: (source, epoch, shard url, sample index,
        token lo, token hi, offset in the row)."""
        s = self.cfg.seq_len
        meta: list[list[tuple]] = [[] for _ in range(self.cfg.micro_batch_size)]
        for pos, (src, e, p, i), off, take in segs:
            for r, row in enumerate(meta):  # row r is stream positions [r*s, r*s + s + 1)
                a, z = max(pos, r * s), min(pos + take, r * s + s + 1)
                if a < z:
                    row.append((src, e, self.readers[src].url(e, p), i, off + a - pos,
                                off + z - pos, a - r * s))
        return meta


def _compact_dtype(cfg: LoaderConfig, shards: list[Shards]) -> np.dtype:
    """The most compact dtype that holds every id, EOS and pad: what workers send."""
    vocabs = [cfg.vocab_size or sh.vocab_size for sh in shards]
    small = None not in vocabs and max(cfg.eos_id + 1, cfg.pad_id + 1, *vocabs) <= 1 << 16
    return np.dtype(np.uint16 if small else np.int32)


# -- the dataset each dataloader worker iterates --------------------------------------
_MESSAGE_BATCHES = 16  # a worker's message holds whole groups: about this many batches,
_MESSAGE_BYTES = 1 << 20  # or about this many bytes of ids, whichever is fewer (>= 1 group)


class _Ring:
    """Shared memory through which workers hand packed ids to the main process: the bulk
    of the data stays out of the worker -> main pipe, which costs more than the packing.
    Against a plain DataLoader moving a tensor per group of batches it measured 2.8-10x
    at 1-4 workers on 2 cores (benchmarks/results/data_throughput-2026-12-07a-cpu.md).
    Worker w owns `depth` slots of `per` batches: its g-th message is packed in place into
    slot g % depth and carries only document starts and states. The main process copies
    each batch out and then counts the message consumed; a worker waits before reusing
    a slot not consumed yet (the DataLoader's prefetch limit normally prevents it)."""

    def __init__(self, workers: int, depth: int, per: int, need: int, dtype: np.dtype):
        self.depth, self.dtype = depth, np.dtype(dtype)
        store = torch.int16 if self.dtype.itemsize == 2 else torch.int32
        self.ids = torch.empty((workers, depth, per, need), dtype=store).share_memory_()
        # consumed[w]: messages of worker w the main process is done with; [-1]: closed
        self.flags = torch.zeros(workers + 1, dtype=torch.int64).share_memory_()

    def view(self, w: int) -> np.ndarray:
        """Worker w's slots, (depth, per, need) of the compact dtype."""
        return self.ids[w].numpy().view(self.dtype)

    def wait(self, w: int, g: int, ppid: int) -> bool:
        """Block until message g of worker w may be packed; False: the reader has gone."""
        flags, delay = self.flags.numpy(), 1e-5
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
                 ring: _Ring, groups: int, version: int):
        self.cfg, self.shards, self.weights, self.version = cfg, shards, weights, version
        self.slots, self.phase = slots, phase  # this rank's slot states, by local index
        self.ring, self.groups = ring, groups

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = 0 if info is None else info.id
        local = (w + self.phase) % len(self.slots)
        slot = _Slot(self.cfg, self.shards, self.weights, _state_of(self.slots[local]),
                     self.version)
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
        except _ReaderGone:  # (the slot's last item, no batch, ends the last message)
            return


class _ReaderGone(Exception):
    """The main process stopped reading (or died): a worker ends its stream quietly."""


_TORCH_DTYPE = {np.dtype(np.uint16): torch.uint16, np.dtype(np.int32): torch.int32}


class Tensors(NamedTuple):
    """A batch on its device, in the order `engine.forward` takes them: input_ids
    (B, S) int64, reset (B, S) bool, labels (B, S) int64 (-100 where ignored)."""

    input_ids: torch.Tensor
    reset: torch.Tensor
    labels: torch.Tensor


@dataclass(slots=True)
class Batch:
    """One micro-batch as the loader hands it out: the packed ids in the width the shards
    store, and what the reset mask and the ignored labels are made from. `to(device)`
    widens it and builds labels and reset there (see the package docstring).
    ids: (B*S+1,) uint16 (int32 when the vocabulary exceeds 65536 or is unknown), the
        packed stream; pinned when the loader pins. Row r is ids[r*S : r*S+S+1] (`rows()`:
        consecutive rows share one token).
    starts: (k,) int64, the stream positions where a document begins.
    end: the stream position where padding begins (B*S+1: none).
    shape: (B, S).
    pack: packing == "pack" (reset at document starts and row starts; no target across
        a document boundary); False: concat (no reset, no ignored target but padding).
    meta: with `return_meta`, per row the document pieces it holds; else None."""

    ids: torch.Tensor
    starts: torch.Tensor
    end: int
    shape: tuple[int, int]
    pack: bool
    meta: list | None = None

    def rows(self) -> torch.Tensor:
        """(B, S+1): row r of the batch, inputs row[:-1] and labels row[1:] (a view)."""
        b, s = self.shape
        return self.ids.as_strided((b, s + 1), (s, 1))

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Tensors:
        """Copy the narrow ids to `device` (asynchronously from a pinned buffer), widen them
        to int64 there and build labels and the reset mask there: a few small kernels
        instead of 8 + 8 + 1 bytes per token made and moved by the host."""
        b, s = self.shape
        n = b * s
        ids, device = self.ids, torch.device(device)
        if ids.dtype == torch.uint16 and device.type != "cpu":
            # moved as int16 bits: every backend copies those (uint16 support varies)
            ids = ids.view(torch.int16).to(device, non_blocking=non_blocking).long() & 0xFFFF
        else:
            ids = ids.to(device, non_blocking=non_blocking).long()  # (n+1,)
        target = ids.clone()  # target[p]: the label of input p-1 (target[0] is dropped)
        if self.end <= n:  # padding from stream position `end`: no target there
            target[max(self.end, 1):] = IGNORE_INDEX
        reset = torch.zeros(n + 1, dtype=torch.bool, device=ids.device)
        if self.pack:  # a document starts at p: reset there, no target across it
            starts = self.starts.to(ids.device, non_blocking=non_blocking)
            target[starts] = IGNORE_INDEX
            reset[starts] = True
            reset[:n:s] = True
        return Tensors(ids[:n].view(b, s), reset[:n].view(b, s), target[1:].view(b, s))

    def __getitem__(self, key: str):
        """The batch expanded on the host, by name ("input_ids", "labels", "reset"), or
        "meta": for tests and inspection (the trainer calls `to`)."""
        return self.meta if key == "meta" else getattr(self.to("cpu"), key)


def _batch(packed: tuple, b: int, s: int, pack: bool, pin: bool, copy: bool = False
           ) -> Batch:
    """A packed batch (see `_Slot.batches`) -> `Batch`. `copy`: the ids lie in a worker's
    ring slot, which is reused: copy them out (into pinned memory when `pin`)."""
    ids, starts, end, meta = packed
    if copy:
        out = torch.empty(ids.shape, dtype=_TORCH_DTYPE[ids.dtype], pin_memory=pin)
        out.numpy()[:] = ids
        ids = out
    elif isinstance(ids, np.ndarray):  # packed into a plain array (not pinned)
        ids = torch.from_numpy(ids)
    # from numpy: a fifth of torch.tensor(list)'s cost, which was most of a batch's
    return Batch(ids, torch.from_numpy(np.array(starts, dtype=np.int64)), end, (b, s), pack,
                 meta)


def _collate_none(x):
    return x


class TokenLoader:
    """Iterable of packed batches for one rank; `state_dict()` is the global position.
    Iterating again continues where the last batch handed out left off."""

    def __init__(self, config: LoaderConfig | dict):
        self.cfg = cfg = LoaderConfig.from_dict(config)
        cfg.check()
        specs = cfg.source_specs()
        self.names = [s.name for s in specs]
        self.weights = [s.weight for s in specs]
        self.shards = [expand_source(s.url, retries=cfg.retries, backoff=cfg.retry_backoff,
                                     timeout=cfg.timeout) for s in specs]
        self.nw = max(1, cfg.num_workers)
        self.n_slots = cfg.world_size * self.nw
        self.mine = range(cfg.rank * self.nw, (cfg.rank + 1) * self.nw)  # this rank's slots
        if cfg.epochs is None:
            for name, sh in zip(self.names, self.shards):
                if len(sh.urls) < self.n_slots:
                    raise ValueError(
                        f"source {name!r} has {len(sh.urls)} shards but the loader runs "
                        f"{self.n_slots} readers (world_size x workers): write more, smaller "
                        "shards, or use fewer workers")
        # shard names only (the same shards may move: disk, http, pipe); and the manifests'
        # digests when every shard has one
        self.fingerprint = _digest([[u.rstrip("/").rsplit("/", 1)[-1] for u in sh.urls]
                                    for sh in self.shards])
        self.content = None if any(len(sh.sha256) != len(sh.urls) for sh in self.shards) \
            else _digest([[sh.sha256[u] for u in sh.urls] for sh in self.shards])
        self._slots: list[SlotState | bytes] = [  # pickled: as the batches carry them
            SlotState.fresh(j, self.n_slots, len(specs)) for j in range(self.n_slots)]
        self._phase = 0
        self.version = STATE_VERSION  # a resumed state's (its window order): see data.state

    # -- iteration ---------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        mine, cfg = self.mine, self.cfg
        b, s, pack = cfg.micro_batch_size, cfg.seq_len, cfg.packing == "pack"
        pin = cfg.pin_memory is not False and torch.cuda.is_available()
        dtype, slots = _compact_dtype(cfg, self.shards), self._slots
        if cfg.num_workers == 0:  # in-process: one slot, no DataLoader in between
            j = mine[0]
            slot = _Slot(cfg, self.shards, self.weights, _state_of(slots[j]), self.version)
            slots[j] = slot.st  # live: the generator stands still while a batch is used
            tdt, need, shape = _TORCH_DTYPE[dtype], b * s + 1, (b, s)
            alloc = ((lambda: torch.empty(need, dtype=tdt, pin_memory=True)) if pin else
                     functools.partial(np.empty, need, dtype))  # a tenth of torch.empty's cost

            def make(ids, starts, end, meta, tensor=torch.from_numpy):
                # starts: a fresh int64 array; from numpy: a fifth of torch.tensor(list)'s cost
                return Batch(ids if pin else tensor(ids), tensor(starts), end, shape, pack, meta)
            yield from slot.batches(alloc, snapshot=False, make=make)
            return
        group = max(1, cfg.batches_per_transfer)
        groups = max(1, min(_MESSAGE_BATCHES // group,  # groups per message
                            _MESSAGE_BYTES // (group * (b * s + 1) * dtype.itemsize)))
        ring = _Ring(cfg.num_workers, max(2, cfg.prefetch_factor) + 2, groups * group,
                     b * s + 1, dtype)
        ds = _SlotDataset(cfg, self.shards, self.weights,
                          [slots[j] for j in mine], self._phase, ring, groups, self.version)
        source = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=cfg.num_workers, collate_fn=_collate_none,
            prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
        views = [ring.view(w) for w in range(cfg.num_workers)]
        consumed = ring.flags.numpy()
        phase0 = self._phase  # worker w reads local slot (w + phase0) % nw
        # held here: a `for` would drop it (shutting the workers down) before the `finally`
        # below told them to stop waiting; None once they all ended
        messages = itertools.chain(iter(source), itertools.repeat(None))
        try:
            # A message holds several groups. The DataLoader hands messages out round-robin
            # over the workers still running; groups are handed out in that same order, so
            # the stream is the one of one group per message. A group ends at a multiple of
            # `group` of its slot's batch count, or at the end of a message.
            queued: list[collections.deque] = [collections.deque() for _ in views]
            running = collections.deque(range(len(views)))  # in turn: running[0] is next
            while running:
                w = running[0]
                while not queued[w] and (msg := next(messages)) is not None:
                    mw, g, items = msg  # queued: (message, place in it, item, its last)
                    queued[mw].extend((g, i, it, i == len(items) - 1) for i, it in enumerate(items))
                ended = not queued[w]
                local = (w + phase0) % self.nw
                while queued[w]:  # worker w's next group
                    g, i, (bt, st, count), last = queued[w].popleft()
                    batch = None if bt is None else _batch(
                        (views[w][g % ring.depth, i], *bt[1:]), b, s, pack, pin, copy=True)
                    if last:
                        consumed[w] = g + 1  # its ids are all copied out: the slot is free
                    slots[mine[local]] = st  # the state after the last batch handed out
                    if batch is None:  # the reader finished: its final state, no batch
                        self._phase = (local + 1) % self.nw
                        ended = True
                        break
                    self._phase = (local + 1) % self.nw if count % group == 0 else local
                    yield batch
                    if count % group == 0 or last:
                        break
                running.popleft() if ended else running.rotate(-1)
        finally:
            ring.flags[-1] = 1  # workers waiting for a slot stop, then the DataLoader ends
            del messages

    # -- state -------------------------------------------------------------------
    def local_state_dict(self) -> dict:
        """This rank's part of the state (its slots); combine ranks with `merge_states`."""
        return {"kind": STATE_KIND + "/part", "version": self.version, "rank": self.cfg.rank,
                **self._header(), "phase": self._phase,
                "slots": {str(j): dataclasses.asdict(_state_of(self._slots[j]))
                          for j in self.mine}}

    def _header(self) -> dict:
        return {"fingerprint": self.fingerprint, "content": self.content,
                **{k: getattr(self.cfg, k) for k in (*_SHAPE, "seed", "shuffle_shards")},
                "sources": self.names, "units": [len(s.urls) for s in self.shards]}

    def state_dict(self, gather=None) -> dict:
        """The global data position (`data.state.LoaderState` as a dict): identical on
        every rank, JSON-able, small.
        With world_size > 1 this is a collective: it all-gathers the ranks' parts
        with `gather(obj) -> list` (default: torch.distributed.all_gather_object)."""
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

    def load_state_dict(self, state: dict | LoaderState) -> None:
        """Resume from a global state saved at any world size / worker count (a dict of
        state version 1 or 2, or a `LoaderState`)."""
        st = LoaderState.from_dict(state)
        self.version = st.version
        head = self._header()
        if st.fingerprint != self.fingerprint:
            raise ValueError("data state was saved over other shards "
                             f"({st.fingerprint} != {self.fingerprint})")
        if st.content and self.content and st.content != self.content:
            raise ValueError("data state was saved over shards with the same names but other "
                             "contents (manifest digests differ)")
        for k in ("seed", "shuffle_shards", "sources"):
            if getattr(st, k) != head[k]:
                raise ValueError(f"data state has {k}={getattr(st, k)!r}, loader has {head[k]!r}")
        if all(getattr(st, k) == head[k] for k in _SHAPE):
            self._slots = list(st.slots)
            self._phase = int(st.phases[self.cfg.rank])
            return
        units = [len(s.urls) for s in self.shards]
        work = remaining_work(st, units)
        gen = max(sl.generation for sl in st.slots) + 1
        slots = [SlotState.fresh(j, self.n_slots, len(units), gen) for j in range(self.n_slots)]
        limit = self.cfg.epochs
        for s in range(len(units)):
            emax = max(sl.sources[s].epoch for sl in st.slots)
            todo = [u for u in work[s] if limit is None or u.epoch < limit]
            for j, items in enumerate(deal(todo, self.n_slots)):
                slots[j].sources[s].items = items
                slots[j].sources[s].epoch = emax + 1
        slots[0].stats = dataclasses.replace(_sum_stats(st.slots), last_error=None)
        self._slots = slots
        self._phase = 0

    @property
    def stats(self) -> dict:
        """This rank's counters: batches, tokens, skipped_shards, skipped (shard names),
        retries, last_error. They live in the state, so they survive a resume."""
        return dataclasses.asdict(_sum_stats([_state_of(self._slots[j])
                                              for j in self.mine]))


def _digest(lists: list[list[str]]) -> str:
    h = hashlib.sha256()
    for x in lists:
        h.update(json.dumps(x).encode())
    return h.hexdigest()[:24]


def _sum_stats(slots: list[SlotState]) -> SlotStats:
    xs, counts = [sl.stats for sl in slots], ("batches", "tokens", "skipped_shards", "retries")
    return SlotStats(*(sum(getattr(x, k) for x in xs) for k in counts),
                     next((x.last_error for x in reversed(xs) if x.last_error), None),
                     [name for x in xs for name in x.skipped])


def merge_states(parts: list[dict]) -> dict:
    """Combine the ranks' `local_state_dict()`s into the global state (as a dict)."""
    parts = sorted(parts, key=lambda p: p["rank"])
    head = {k: v for k, v in parts[0].items() if k not in ("slots", "rank", "phase", "kind")}
    if [p["rank"] for p in parts] != list(range(head["world_size"])):
        raise ValueError(f"need one part per rank 0..{head['world_size'] - 1}, "
                         f"got {[p['rank'] for p in parts]}")
    if len({p["version"] for p in parts}) > 1:
        raise ValueError(f"ranks resumed from states of other versions: "
                         f"{[p['version'] for p in parts]}")
    slots = {int(j): s for p in parts for j, s in p["slots"].items()}
    return LoaderState(**head, phases=[p["phase"] for p in parts],
                       slots=[slot_from_dict(slots[j]) for j in range(len(slots))]).to_dict()


def build_loader(config: LoaderConfig | dict, **overrides) -> TokenLoader:
    """A `TokenLoader` from a config dataclass or dict (overrides win)."""
    return TokenLoader(LoaderConfig.from_dict(config, **overrides))

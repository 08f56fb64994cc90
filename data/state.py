"""The loader's resume state: typed, versioned, JSON-able; and its redistribution.

`LoaderState` is the global data position; `TokenLoader.state_dict()` returns it as
`LoaderState.to_dict()`, stored as JSON. Versions 2 and 3 are this layout; version 1
(dicts with one-letter keys, written before 2026-12) still loads, as version 2; any other
version is an error. The version also names the order of the shuffle windows
(`window_order`): 3 sorts the window by keys hashed from its place (a seventh of the
cost), 1 and 2 seeded a numpy generator per window. A loader resumed from a state keeps
that state's order (and writes its version), so an old checkpoint resumes the stream it
started.

Exactly-once resume. Each source's shards are *units*; epoch e visits them in a
permutation seeded by (seed, source, e). The loader has N = world_size * max(1,
num_workers) readers ("slots"); slot j reads positions j, j+N, j+2N, ... of every epoch.
Inside a unit, K = shuffle_buffer consecutive samples are read, then emitted in an
order fixed by (seed, source, epoch, position, window start) (`window_order`): the
shuffle buffer is restorable from two numbers. A slot draws documents (the source chosen by weight with
a counter-based RNG), packs them and yields whole batches, each with the slot's state
after it; the main process keeps the state of the last batch it handed out (prefetched
ones do not count). Same world size and workers: every slot resumes as it was, bitwise.
Another shape: `remaining_work` turns the state into the exact work nobody has consumed
(unemitted window samples, the rest of partly-read units, the cut document from its token
offset, untouched units of the current epochs), `deal` hands it round-robin to the new
slots, and later epochs use the new stride. Leftover pieces of partly-read units are
index ranges (at most a shuffle window per unit): a few KB for tens of readers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

STATE_KIND = "xlstm-data-state"
STATE_VERSION = 3
VERSIONS = (1, 2, 3)  # the versions `LoaderState.from_dict` reads
WHOLE = [0, -1]  # a sample range: the whole unit


def rng(*key: int) -> np.random.Generator:
    """A counter-based generator for a tuple of ints (seed, purpose, ...)."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@dataclass(slots=True)
class Unit:
    """A shard of one source to read, whole or in part, and (while being read) where its
    shuffle window stands.

    epoch: the source's epoch it belongs to.
    position: its place in that epoch's shard permutation.
    ranges: [lo, hi) sample indices of the shard to read, in order; hi = -1: to its end.
    token_offset: tokens of the first sample of `ranges` already handed out (a document
        cut by a batch end before a resume at another shape continues here); else 0.
    run: [start, stop, step]: stands for the whole units at positions
        range(start, stop, step) of `epoch` (position, ranges, token_offset unused).
    window_start: samples of `ranges` before the open shuffle window (K samples, emitted
        in the order `window_order` draws from (seed, source, epoch, position, window_start)).
    emitted: samples of the open window already emitted.
    window_size: samples in the open window (0: none open).
    """

    epoch: int
    position: int = 0
    ranges: list[list[int]] = field(default_factory=lambda: [list(WHOLE)])
    token_offset: int = 0
    run: list[int] | None = None
    window_start: int = 0
    emitted: int = 0
    window_size: int = 0


@dataclass(slots=True)
class SourceState:
    """One source as one slot reads it.

    epoch: the epoch of the slot's own stride.
    cursor: stride positions taken in that epoch (the next is index + cursor * count).
    current: the unit being read (None between units).
    items: work dealt at a resume at another shape; read before the stride goes on.
    exhausted: nothing is left for this slot (finite epochs).
    """

    epoch: int = 0
    cursor: int = 0
    current: Unit | None = None
    items: list[Unit] = field(default_factory=list)
    exhausted: bool = False


@dataclass(slots=True)
class DocRef:
    """The document the last batch ended in: sample `sample` of the unit at `position`
    of `epoch` of source `source`; the next batch starts at token `token_offset` (the
    last token of a batch is also the first of the next: rows overlap by one)."""

    source: int
    epoch: int
    position: int
    sample: int
    token_offset: int


@dataclass(slots=True)
class SlotStats:
    """Counters that survive a resume: batches and tokens (B*S each) handed out, shards
    skipped (`on_error="skip"`) with the last 16 names, open retries, the last error."""

    batches: int = 0
    tokens: int = 0
    skipped_shards: int = 0
    retries: int = 0
    last_error: str | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass(slots=True)
class SlotState:
    """One reader of the global stream (a rank, or one DataLoader worker of a rank).

    index, count: this slot is `index` of `count` (= world_size x max(1, workers)).
    generation: resumes at another shape so far (seeds the mixing draws anew).
    mix_draws: source-mixing draws made (the draws are counter-based).
    carry: the document cut by the end of the last batch, or None.
    done: the stream has ended (finite epochs).
    sources: per source, where this slot reads it.
    """

    index: int
    count: int
    generation: int = 0
    mix_draws: int = 0
    carry: DocRef | None = None
    done: bool = False
    sources: list[SourceState] = field(default_factory=list)
    stats: SlotStats = field(default_factory=SlotStats)

    @classmethod
    def fresh(cls, index: int, count: int, sources: int, generation: int = 0) -> SlotState:
        return cls(index, count, generation, sources=[SourceState() for _ in range(sources)])

    def __reduce__(self):
        # every batch carries a pickle of its slot's state: as plain tuples it costs about
        # what the dicts of version 1 did (the dataclasses themselves: 7x that)
        def unit(u: Unit | None) -> tuple | None:
            return None if u is None else (u.epoch, u.position, u.ranges, u.token_offset,
                                           u.run, u.window_start, u.emitted, u.window_size)
        c, x = self.carry, self.stats
        return _slot_from_tuples, (
            self.index, self.count, self.generation, self.mix_draws,
            None if c is None else (c.source, c.epoch, c.position, c.sample, c.token_offset),
            self.done, [(s.epoch, s.cursor, unit(s.current), [unit(u) for u in s.items],
                         s.exhausted) for s in self.sources],
            (x.batches, x.tokens, x.skipped_shards, x.retries, x.last_error, x.skipped))


def _slot_from_tuples(index, count, generation, mix_draws, carry, done, sources, stats
                      ) -> SlotState:
    def unit(t: tuple | None) -> Unit | None:
        return None if t is None else Unit(*t)
    return SlotState(index, count, generation, mix_draws,
                     None if carry is None else DocRef(*carry), done,
                     [SourceState(e, c, unit(cur), [unit(u) for u in items], x)
                      for e, c, cur, items, x in sources], SlotStats(*stats))


@dataclass
class LoaderState:
    """The global data position: every slot's state plus what defines the stream.

    fingerprint: digest of the shard names of every source (shards may move).
    content: digest of their manifest digests, when every shard has one (else None).
    world_size, num_workers, seq_len, micro_batch_size, packing, shuffle_buffer: the
        shape it was saved at (the same shape resumes bitwise; another redistributes).
    seed, shuffle_shards, sources (names), units (shards per source): must match.
    phases: per rank, the local slot whose batch comes next.
    slots: the `world_size x max(1, num_workers)` slot states, by index.
    """

    fingerprint: str
    content: str | None
    world_size: int
    num_workers: int
    seed: int
    seq_len: int
    micro_batch_size: int
    packing: str
    shuffle_buffer: int
    shuffle_shards: bool
    sources: list[str]
    units: list[int]
    phases: list[int]
    slots: list[SlotState]
    kind: str = STATE_KIND
    version: int = STATE_VERSION  # 2 or 3: the layout and the window order (`window_order`)

    def to_dict(self) -> dict:
        """JSON-able: what `TokenLoader.state_dict()` returns and a checkpoint stores."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | LoaderState) -> LoaderState:
        """Parse a saved state of version 2 or 3, or convert one of version 1 (to 2)."""
        if isinstance(d, LoaderState):
            return copy.deepcopy(d)
        if d.get("kind") != STATE_KIND:
            raise ValueError("not a data loader state (use state_dict(), not a local part)")
        version = d.get("version")
        if type(version) is not int or version not in VERSIONS:
            raise ValueError(f"data loader state version {version!r}: this loader reads "
                             f"versions {', '.join(map(str, VERSIONS))}")
        if version == 1:
            return _from_v1(d)
        return cls(**{**d, "slots": [slot_from_dict(s) for s in d["slots"]]})


def slot_from_dict(d: dict) -> SlotState:
    return SlotState(**{
        **d, "carry": None if d["carry"] is None else DocRef(**d["carry"]),
        "stats": SlotStats(**d["stats"]),
        "sources": [SourceState(**{**s, "current": s["current"] and Unit(**s["current"]),
                                   "items": [Unit(**u) for u in s["items"]]})
                    for s in d["sources"]]})


def _from_v1(d: dict) -> LoaderState:
    """Version 1: slots {j, N, gen, mix, carry: [s, e, p, idx, off], done, src: [{items,
    epoch, cursor, cur, exhausted?}], stats}; units {e, p, r, t?, w, m, n} or {e, run}."""
    def unit(u: dict) -> Unit:
        return Unit(u["e"], u.get("p", 0), u.get("r", [list(WHOLE)]), u.get("t", 0),
                    u.get("run"), u.get("w", 0), u.get("m", 0), u.get("n", 0))

    slots = [SlotState(
        sl["j"], sl["N"], sl["gen"], sl["mix"],
        None if sl["carry"] is None else DocRef(*sl["carry"]), sl["done"],
        [SourceState(ss["epoch"], ss["cursor"], None if ss["cur"] is None else unit(ss["cur"]),
                     [unit(u) for u in ss["items"]], bool(ss.get("exhausted", False)))
         for ss in sl["src"]],
        SlotStats(**sl["stats"])) for sl in d["slots"]]
    keep = [f.name for f in dataclasses.fields(LoaderState)
            if f.name not in ("slots", "kind", "version")]
    return LoaderState(**{k: d[k] for k in keep}, slots=slots, version=2)  # same order


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


def window_order(seed: int, source: int, u: Unit, k: int, version: int = STATE_VERSION
                 ) -> list[int]:
    """The order in which the open window of `u` (shuffle window `k`) emits its samples.
    Version 3: its samples sorted (stably) by 64-bit keys, the shake-128 stream of
    (seed, source, epoch, position, window start) (about 3 us for 30 samples); versions
    1-2: numpy's permutation from a generator seeded per window by `rng(seed, 7, ...)`
    (about 20 us: most of it the seeding)."""
    if k <= 1:
        return list(range(u.window_size))
    if version < 3:
        return rng(seed, 7, source, u.epoch, u.position, u.window_start).permutation(
            u.window_size).tolist()
    key = struct.pack("<5Q", *(x & 0xFFFFFFFFFFFFFFFF for x in
                               (seed, source, u.epoch, u.position, u.window_start)))
    keys = np.frombuffer(hashlib.shake_128(key).digest(8 * u.window_size), dtype="<u8")
    return keys.argsort(kind="stable").tolist()


def remaining_work(state: LoaderState, units: list[int]) -> list[list[Unit]]:
    """Per source: the ordered units (whole or partial) nobody has consumed yet."""
    nsrc = len(units)
    work: list[list[Unit]] = [[] for _ in range(nsrc)]
    emax = [max(sl.sources[s].epoch for sl in state.slots) for s in range(nsrc)]
    k = max(1, int(state.shuffle_buffer))
    for sl in state.slots:
        if sl.carry is not None:
            c = sl.carry
            work[c.source].append(Unit(c.epoch, c.position, [[c.sample, c.sample + 1]],
                                       c.token_offset))
        for s in range(nsrc):
            ss = sl.sources[s]
            cur = ss.current
            if cur is not None:
                left = sorted(cur.window_start + i
                              for i in window_order(state.seed, s, cur, k,
                                                    state.version)[cur.emitted:])
                r = _merge_ranges(_coords_to_ranges(cur.ranges, left) + _tail_ranges(
                    cur.ranges, cur.window_start + cur.window_size))
                if r:  # the partly-written first document only if it is still in
                    t = cur.token_offset if r[0][0] == cur.ranges[0][0] else 0
                    work[s].append(Unit(cur.epoch, cur.position, r, t))
            work[s].extend(copy.deepcopy(ss.items))
            if sl.done:
                continue
            first = sl.index + ss.cursor * sl.count
            if first < units[s]:
                work[s].append(Unit(ss.epoch, run=[first, units[s], sl.count]))
            for e in range(ss.epoch + 1, emax[s] + 1):
                if sl.index < units[s]:
                    work[s].append(Unit(e, run=[sl.index, units[s], sl.count]))
    for s in range(nsrc):
        work[s].sort(key=lambda u: u.epoch)  # stable: keeps each epoch's order
    return work


def deal(work: list[Unit], n: int) -> list[list[Unit]]:
    """Round-robin the units (runs expanded) over n slots; re-compress whole units to runs."""
    flat: list[tuple[Unit, bool]] = []  # (unit, whole)
    for u in work:
        if u.run is not None:
            flat.extend((Unit(u.epoch, p), True) for p in range(*u.run))
        else:
            flat.append((u, False))
    return [_compress(flat[i::n]) for i in range(n)]


def _compress(items: list[tuple[Unit, bool]]) -> list[Unit]:
    """Turn consecutive whole units of one epoch with a common stride into runs."""
    out: list[Unit] = []
    run: list[int] = []
    run_e = 0
    for u, whole in [*items, (None, False)]:
        if run and (not whole or u.epoch != run_e or u.position <= run[-1] or
                    (len(run) > 1 and u.position - run[-1] != run[1] - run[0])):
            step = run[1] - run[0] if len(run) > 1 else 1
            out.append(Unit(run_e, run=[run[0], run[-1] + 1, step]))
            run = []
        if whole:
            run_e = u.epoch
            run.append(u.position)
        elif u is not None:
            out.append(u)
    return out

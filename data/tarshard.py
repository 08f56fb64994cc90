"""WebDataset tar shards of token ids: the writer, and the one reader with its checks.

A sample is one document: `<key>.tokens.u16` (or `.u32`), the raw little-endian ids,
and `<key>.source.txt`, where it came from; any tar reader reads them. The writer is
`webdataset.TarWriter` with fixed metadata, so the same samples give the same bytes.

One tar parser (`_walk`), over bytes in memory: a local file is mapped whole
(`map_shard`), a stream (HTTP, `pipe:`) parsed a chunk at a time (`TarStream`). It is
ours, not tarfile's or webdataset's, because every problem must name the shard and the
byte offset (tests/test_data_tarshard.py holds both uses to a sequential reference).
Two ways, one answer: `_bulk` reads a plain, intact tar (as data.prepare writes, or a
stream's piece of one) with numpy over all its headers at once, and answers only where
that is provably the sequential walk's answer; anything else (long names, damage) takes
one Python step per header, which names the problem. The bulk way pays on shards of many
short documents: 0.5-0.7 us per header against 1.6-1.9 us for the Python walk it replaced
(300-3000 documents of ~700 tokens; such a corpus's first epoch: 1.6x less CPU), and ties
it at 30 documents (~2 us; benchmarks/results/data_throughput-2026-12-07d-cpu.md).
Mappings, indexes, views and verified digests are kept per process by file identity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.strings as S

BLOCK = 512
TOKEN_EXT = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}
DIGESTS = ("xxh3_128", "sha256")  # the loader checks the first one a manifest entry has


class ShardError(RuntimeError):
    """A shard is truncated or corrupt; `.shard` and `.offset` say where."""

    def __init__(self, shard: str, offset: int | None, msg: str):
        self.shard, self.offset, self.msg = shard, offset, msg
        where = f" at byte offset {offset}" if offset is not None else ""
        super().__init__(f"{shard}{where}: {msg}")


def token_dtype(vocab_size: int) -> tuple[str, np.dtype]:
    """The compact dtype for ids below `vocab_size`: ('u16', <u2) or ('u32', <u4)."""
    return ("u16", TOKEN_EXT["u16"]) if vocab_size <= 1 << 16 else ("u32", TOKEN_EXT["u32"])


def hasher(algo: str):
    """A new hashlib-like object: "sha256", or "xxh3_128" (needs the `xxhash` package)."""
    return importlib.import_module("xxhash").xxh3_128() if algo == "xxh3_128" else hashlib.new(algo)


def have_digest(algo: str) -> bool:
    """Whether `hasher(algo)` works here (xxh3_128 needs the `xxhash` package)."""
    return algo != "xxh3_128" or importlib.util.find_spec("xxhash") is not None


class ShardWriter:
    """Write one tar shard to `<path>.tmp`, renamed to `path` by `close()` (`abort()`
    removes it); counts and digests what it writes, so the manifest needs no second read."""

    def __init__(self, path: str, ext: str = "u16"):
        from webdataset import TarWriter

        self.path, self.ext, self.dtype, self.tmp = path, ext, TOKEN_EXT[ext], path + ".tmp"
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._h = {a: hasher(a) for a in DIGESTS if have_digest(a)}
        self.samples = self.tokens = self.bytes = 0
        self._tar = TarWriter(self, user="", group="", mode=0o644, mtime=0, encoder=False)

    def write(self, data: bytes) -> int:
        """The archive's bytes, from `TarWriter`: written, hashed and counted."""
        self._f.write(data)
        for h in self._h.values():
            h.update(data)
        self.bytes += len(data)
        return len(data)

    def add(self, key: str, tokens: np.ndarray, source: str) -> None:
        """One document: its ids (any integer array, stored as `ext`) and where it came from."""
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._tar.write({"__key__": key, f"tokens.{self.ext}": arr.tobytes(),
                         "source.txt": source.encode("utf-8", errors="replace")})
        self.samples += 1
        self.tokens += int(arr.size)

    def close(self) -> dict:
        """Finish the archive, fsync, rename into place; return its manifest entry."""
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"name": os.path.basename(self.path), "samples": self.samples,
                "tokens": self.tokens, "bytes": self.bytes,
                **{a: h.hexdigest() for a, h in self._h.items()}}

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _octal(field: bytes, name: str, offset: int) -> int:
    try:
        return int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)
    except ValueError:
        raise ShardError(name, offset, f"corrupt tar header (bad number {field!r})") from None


# the fields of a 512-byte header that the reader uses: name, size, checksum, type flag,
# magic ("ustar" for a ustar header) and the ustar name prefix
_HEADER = struct.Struct("100s24x12s12x8sc100x5s83x155s12x")


def _member_name(name: bytes, magic: bytes, prefix: bytes) -> str:
    mname = name.rstrip(b"\0").decode("utf-8", "replace")
    if magic == b"ustar" and (prefix := prefix.rstrip(b"\0")):
        mname = prefix.decode("utf-8", "replace") + "/" + mname
    return mname


def split_key(member: str) -> tuple[str, str]:
    """WebDataset convention: key is the path up to the first dot of the basename."""
    d, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


_ZERO = bytes(BLOCK)
_REGULAR, _LONG = (b"0", b"\0"), (b"L", b"x", b"g")  # tar type flags


# -- the parser ----------------------------------------------------------------------
@dataclass
class _Index:
    """Where the samples of a tar held in memory lie (built by `_walk`): sample i's ids
    are elements lo[i]:hi[i] of the buffer viewed as `<u4` where wide[i], else `<u2`."""

    n: int  # usable samples; the arrays may hold one more (see `_walk`)
    lo: np.ndarray  # int64 (n,)
    hi: np.ndarray  # int64 (n,)
    wide: np.ndarray | None  # bool (n,); None when every sample is <u2
    member: np.ndarray  # int64 (n,): header offset of each sample's tokens member
    peak: np.ndarray  # int64 (n,): the largest id of each sample (-1 when empty)
    long_keys: dict[int, str]  # keys that came from a GNU/pax long name, by sample
    error: tuple[int | None, str] | None  # (offset, message) of the problem after sample n-1
    stop: int = 0  # partial walks: where the next walk starts (the open sample's first header)
    ended: bool = True  # the end-of-archive marker was read (partial walks)
    verified: tuple[str, str] | None = None  # (algorithm, digest) the file was checked against


BULK_WALKS = [0]  # shards `_bulk` indexed (tests/test_data_tarshard.py: it is not dead code)
_USTAR = int.from_bytes(b"\0ustar\0\0", "little")  # bytes 256-263 of a header, 257-261 kept
_OCTAL = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # weights of an 11-digit octal number
_SUM = np.r_[_OCTAL[5:] + 1, 1, 1]  # checksum field @ _SUM: its number + its bytes' sum


def _bulk(buf, size: int, partial: bool) -> tuple | None:
    """`_walk` of a plain, intact tar (or a stream's piece of one) by numpy over all its
    headers at once: the arrays `_indexed` takes, `stop` and `ended`; else None. The
    headers are taken to be the blocks with "ustar" at byte 257, and there is an answer
    only when the walk would read exactly those: the first at 0, each member's data ending
    at the next, the last's at a zero block (a piece: at or past its end); each a regular
    file with canonical octal numbers, a good checksum, no ustar prefix, an ASCII name
    without NULs; every sample (a run of one key) one `tokens.u16`/`.u32` member of whole
    ids and no other `tokens.*` member."""
    nb = size // BLOCK
    at = np.flatnonzero(np.frombuffer(buf, "<u8", nb * 64)[32::64] & 0xFFFFFFFFFF00 == _USTAR)
    if not at.size or at[0]:
        return None
    h = np.frombuffer(buf, dtype=np.uint8, count=nb * BLOCK).reshape(nb, BLOCK)[at]
    g = h[:, 124:157]  # size, mtime, checksum, type
    msize = g[:, :11] @ _OCTAL - 48 * 1227133513  # "0" is 48; 1227133513: _OCTAL.sum()
    nxt = (msize + 2 * BLOCK - 1) // BLOCK + at
    end = int(nxt[-1])
    read = at.size - (end > nb)  # the headers the walk reads: not one whose data is cut
    used = np.bitwise_or.reduce(h[:, :100], 0)  # a column no name uses is left out
    raw = np.ascontiguousarray(h[:, :np.flatnonzero(used)[-1] + 1 if used.any() else 1])
    names = raw.view(f"S{raw.shape[1]}")[:, 0]  # numpy drops trailing NULs, as the walk
    length = S.str_len(names)
    if (not read or not (end < nb or partial) or (nxt[:-1] != at[1:]).any()
            or max((g[:, :11] - np.uint8(48)).max(), (g[:, 24:30] - np.uint8(48)).max()) > 7
            or ((g[:, (11, 30, 31)] | 32) != 32).any()  # octal digits, then NUL or space
            or ((g[:, 32] != 48) & (g[:, 32] != 0)).any()  # type flag "0" or NUL
            or h.view(np.uint64)[:, 43:63].any()  # bytes 344-503: no ustar prefix
            or (h.sum(1, dtype=np.uint32) + (8 * 32 + 48 * 37449) != g[:, 24:32] @ _SUM).any()
            or used.max() > 127 or np.count_nonzero(raw) != length.sum()
            or end < nb and np.frombuffer(buf, np.uint8, BLOCK, end * BLOCK).any()):
        return None
    start = S.rfind(names, b"/") + 1  # a key ends at the first dot of the basename,
    cut = S.find(S.add(names, b"."), b".", start)  # or at the name's end
    keys = (raw * (np.arange(raw.shape[1]) < cut[:, None])).view(names.dtype)[:, 0]
    whole = length == cut + 11
    u32 = (S.startswith(names, b".tokens.u32", cut) & whole)[:read]
    tok = (S.startswith(names, b".tokens.u16", cut) & whole)[:read] | u32
    sample = np.cumsum(np.concatenate(([0], keys[1:] != keys[:-1])))[:read]  # per header
    n = int(sample[-1]) + (end < nb)  # the samples listed: not one still open
    width = 2 + 2 * u32
    if ((start == 1).any()  # `split_key` drops a lone leading "/": the walk reads those
            or (tok != S.startswith(names, b".tokens.", cut)[:read]).any()
            or (msize[:read] % width)[tok].any()
            or (np.bincount(sample[tok], minlength=n + 1)[:n] != 1).any()):
        return None
    tok &= sample < n
    member, width = at[:read][tok] * BLOCK, width[tok]
    return (member + BLOCK, msize[:read][tok] // width, width, member,
            (end + 1) * BLOCK if end < nb else int(at[np.searchsorted(sample, n)]) * BLOCK,
            end < nb)


def _walk(buf, size: int, name: str, base: int = 0, partial: bool = False,
          bulk: bool = True) -> _Index:
    """Parse the headers of a tar held in memory, as a sequential reader would: the listed
    samples are those it yields before it meets a problem, `error` is that problem (or
    None); the sample open at the problem is listed one past `n` when its ids were seen,
    so the vocabulary check (`_check_ids`) meets it first. `_bulk` answers when it can (not
    with `bulk=False`), else one Python step per header (~4 us, its checksum included).
    `buf` may be a stream's piece starting with a header at stream offset `base` (errors
    count from the stream's start); `partial`: more may follow, so running out of bytes is
    no error: the samples complete before the last one begun are listed and `stop` is
    that one's first header (a later member may still belong to it)."""
    if bulk and (found := _bulk(buf, size, partial)) is not None:
        BULK_WALKS[0] += 1
        return _indexed(buf, *found[:4], len(found[0]), {}, None, *found[4:])
    toks: list[tuple[int, int, int, int]] = []  # per sample: byte offset of its ids,
    # their count, their width (2 or 4 bytes), and the header offset of its tokens member
    long_keys: dict[int, str] = {}  # keys that came from a GNU/pax long name, by sample
    err: tuple[int | None, str] | None = None
    key: str | None = None  # the open sample, its tokens member, its first header
    tok: tuple[int, int, int, int] | None = None
    at = off = 0
    named_at: int | None = None  # the first of the long-name headers before a member
    long_name: str | None = None
    ended, stop = False, None
    try:
        while True:
            if (left := size - off) < BLOCK:
                if partial:
                    break
                if left == 0:
                    raise ShardError(name, base + off, "truncated: no end-of-archive marker")
                raise ShardError(name, base + size, f"truncated: wanted {BLOCK} bytes, "
                                 f"stream ends after {left}")
            mname, fsize, fsum, kind, magic, prefix = _HEADER.unpack_from(buf, off)
            if buf[off:off + BLOCK] == _ZERO:
                ended, stop = True, off + BLOCK
                break
            if _octal(fsum, name, base + off) != sum(buf[off:off + BLOCK]) - sum(fsum) + 256:
                raise ShardError(name, base + off, "corrupt tar header (checksum mismatch)")
            msize = _octal(fsize, name, base + off)
            data_at = off + BLOCK
            nxt = data_at + msize + (-msize % BLOCK)
            if msize and nxt > size:
                if partial:
                    break
                if size == data_at:
                    raise ShardError(name, base + data_at,
                                     f"truncated: member at {base + off} has no data")
                raise ShardError(name, base + size, f"truncated: wanted {nxt - data_at} "
                                 f"bytes, stream ends after {size - data_at}")
            if kind in _REGULAR:
                k, ext = split_key(_member_name(mname, magic, prefix) if long_name is None
                                   else long_name)
                if k != key:
                    if key is not None:
                        if tok is None:
                            raise ShardError(name, base + at,
                                             f"sample {key!r} has no tokens member")
                        toks.append(tok)
                    key, tok, at = k, None, off
                    stop = off if named_at is None else named_at
                    if long_name is not None:
                        long_keys[len(toks)] = k
                long_name = named_at = None
                if ext.startswith("tokens."):
                    if (dt := TOKEN_EXT.get(ext[7:])) is None:
                        raise ShardError(name, base + off, f"unknown token type {ext!r}")
                    if msize % dt.itemsize:
                        raise ShardError(name, base + off, f"corrupt sample {k!r}: {msize} "
                                         f"bytes is not a whole number of {dt.itemsize}-byte ids")
                    tok = (data_at, msize // dt.itemsize, dt.itemsize, off)
            elif kind in _LONG:
                if named_at is None:
                    named_at = off
                data = bytes(buf[data_at:data_at + msize])
                if kind == _LONG[0]:  # GNU long name for the next member
                    long_name = data.rstrip(b"\0").decode("utf-8", "replace")
                else:  # pax headers: take a path= record, ignore the rest
                    for rec in data.split(b"\n"):
                        if b" path=" in rec:
                            long_name = rec.split(b" path=", 1)[1].decode("utf-8", "replace")
            off = nxt
        if partial and not ended:  # the open sample waits for more bytes
            if key is None:
                stop = off if named_at is None else named_at
            key = tok = None
        elif key is not None and tok is None:
            raise ShardError(name, base + at, f"sample {key!r} has no tokens member")
    except ShardError as e:
        err = (e.offset, e.msg)
    n = len(toks)
    if key is not None and tok is not None:  # the last sample, or the one open at the error
        toks.append(tok)
        n += err is None
    return _indexed(buf, *np.array(toks, dtype=np.int64).reshape(-1, 4).T, n, long_keys, err,
                    size if stop is None else stop, ended or not partial)


def _indexed(buf, start_a: np.ndarray, count_a: np.ndarray, width_a: np.ndarray,
             member_a: np.ndarray, n: int, long_keys: dict[int, str],
             err: tuple[int | None, str] | None, stop: int, ended: bool) -> _Index:
    """The `_Index` of tokens members at `member_a`, ids at byte `start_a` (int64 (m,))."""
    hi_a = (lo_a := start_a // width_a) + count_a
    peak = np.full(len(start_a), -1, dtype=np.int64)
    for w in (2, 4):
        sel = np.flatnonzero((width_a == w) & (count_a > 0))
        if sel.size:  # the max of each sample's ids, in one pass over [lo, hi) segments
            cuts = np.stack([lo_a[sel], hi_a[sel]], 1).ravel()
            ids = np.frombuffer(buf, dtype=f"<u{w}", count=int(cuts[-1]))
            peak[sel] = np.maximum.reduceat(ids, cuts[:-1])[0::2]
    return _Index(n, lo_a, hi_a, (width_a == 4) if 4 in width_a else None, member_a, peak,
                  long_keys, err, stop, ended)


def _check_ids(name: str, buf, index: _Index, vocab_size: int | None, base: int = 0
               ) -> tuple[int, ShardError | None]:
    """(usable samples, the error after them): the walk's, or the first id out of range."""
    n = index.n
    error = None if index.error is None else ShardError(name, *index.error)
    if vocab_size is not None and index.peak.size and int(index.peak.max()) >= vocab_size:
        i = int(np.argmax(index.peak >= vocab_size))  # == n: the sample open at the error
        n = min(n, i)
        error = ShardError(name, base + int(index.member[i]),
                           f"corrupt sample {_key_of(buf, index, i)!r}: "
                           f"id {int(index.peak[i])} >= vocab size {vocab_size}")
    return n, error


def _mismatch(name: str, size: int, algo: str) -> ShardError:
    # a mismatch of any digest is one of the sha256, of the same bytes: name the manifest's
    return ShardError(name, None, f"sha256 mismatch after {size} bytes "
                      f"(corrupt data; {algo} differs from the manifest's)")


_INDEX: OrderedDict[tuple, _Index] = OrderedDict()  # file identity -> index, LRU
_INDEX_SAMPLES = [0]  # samples held in _INDEX
INDEX_CACHE_SAMPLES = 1 << 20  # at most this many samples' entries are kept (~35 MB)
_MAPS: OrderedDict[tuple, tuple] = OrderedDict()  # file identity -> (its mapping, {(name,
# vocab): its MappedShard when it has no error}), LRU
MAPS_KEPT = 64  # each holds a file descriptor (Python's mmap keeps one)


def clear_cache() -> None:
    """Forget every cached index, mapping and verified digest of this process."""
    _INDEX.clear()
    _INDEX_SAMPLES[0] = 0
    _MAPS.clear()


class MappedShard:
    """A local shard mapped: `views[i]` (`tokens(i)`) is a zero-copy, read-only (count,)
    `<u2` or `<u4` view of sample i's ids in the shard's bytes. `n` samples are usable;
    `error` (a `ShardError` or None) is what reading past them must raise."""

    def __init__(self, name: str, buf, index: _Index, n: int, error: ShardError | None):
        self.name, self.n, self.error, self._buf, self._index = name, n, error, buf, index
        u2 = np.frombuffer(buf, dtype=TOKEN_EXT["u16"], count=len(buf) // 2)
        lo, hi = index.lo[:n].tolist(), index.hi[:n].tolist()
        if index.wide is None:
            self.views = [u2[a:z] for a, z in zip(lo, hi)]
        else:
            u4 = np.frombuffer(buf, dtype=TOKEN_EXT["u32"], count=len(buf) // 4)
            self.views = [(u4 if w else u2)[a:z]
                          for a, z, w in zip(lo, hi, index.wide[:n].tolist())]

    def tokens(self, i: int) -> np.ndarray:
        """Sample i's ids (`views[i]`)."""
        return self.views[i]

    def key(self, i: int) -> str:
        """Sample i's key (the member name up to the first dot of its basename)."""
        return _key_of(self._buf, self._index, i)


def _key_of(buf, index: _Index, i: int) -> str:
    if i in index.long_keys:
        return index.long_keys[i]
    name, _size, _sum, _kind, magic, prefix = _HEADER.unpack_from(buf, int(index.member[i]))
    return split_key(_member_name(name, magic, prefix))[0]


def map_shard(path: str, name: str | None = None, *, vocab_size: int | None = None,
              digest: tuple[str, str] | None = None) -> MappedShard:
    """Open a local shard for random access: mapped (read-only, pages populated up front),
    indexed and checked once per process while the file's identity is unchanged (the last
    `MAPS_KEPT` mappings are kept too). `digest`: (algorithm, hex) from the manifest (see
    `DIGESTS`); a mismatch raises `ShardError` here, before any sample is used (a
    structural problem of the shard instead: it says where). Problems that only cut the
    shard short come back as `.error`, raised after the `.n` good samples. Shards are
    replaced by renaming (`data.prepare` does), never rewritten in place under a reader.
    """
    name = name or path
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    entry = _MAPS.get(ident)
    if entry is None:
        with open(path, "rb", buffering=0) as f:
            buf = memoryview(mmap.mmap(
                f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                prot=mmap.PROT_READ) if st.st_size else b"")
        entry = _MAPS[ident] = (buf, {})
        if len(_MAPS) > MAPS_KEPT:
            _MAPS.popitem(last=False)
    else:
        _MAPS.move_to_end(ident)
    buf, shards = entry
    index = _INDEX.get(ident)
    if index is None:
        index = _INDEX[ident] = _walk(buf, len(buf), name)
        _INDEX_SAMPLES[0] += index.n
        while _INDEX_SAMPLES[0] > INDEX_CACHE_SAMPLES and len(_INDEX) > 1:
            _INDEX_SAMPLES[0] -= _INDEX.popitem(last=False)[1].n
    else:
        _INDEX.move_to_end(ident)
    sh = shards.get((name, vocab_size))
    if sh is None or sh._index is not index:  # a shard with an error is made anew per use
        sh = MappedShard(name, buf, index, *_check_ids(name, buf, index, vocab_size))
        if sh.error is None:
            shards[name, vocab_size] = sh
    if digest is not None and index.verified != digest:  # kept with the index (same LRU)
        h = hasher(digest[0])
        h.update(buf)
        if h.hexdigest() != digest[1]:  # a structural problem says where: raised instead
            raise sh.error or _mismatch(name, len(buf), digest[0])
        index.verified = digest
    return sh


class TarStream:
    """The samples of a shard read as a stream (HTTP, `pipe:`, any `.read(n)` object), in
    order, in bounded memory: iterating yields `(key, ids, header offset)` per sample (ids:
    a read-only copy), then raises the shard's problem, if any, where a sequential reader
    meets it. It holds the sample being read and one `chunk` (`held`: the most at once). A
    digest (algorithm, hex) is checked at the end: samples before a mismatch are out."""

    def __init__(self, raw, name: str, *, vocab_size: int | None = None,
                 digest: tuple[str, str] | None = None, chunk: int = 1 << 20):
        self.raw, self.name, self.vocab_size, self.digest = raw, name, vocab_size, digest
        self.chunk, self.held = chunk, 0

    def _read(self, offset: int) -> bytes:
        try:
            return self.raw.read(self.chunk)
        except ShardError:
            raise
        except Exception as e:  # e.g. a connection reset: name the shard and the offset
            raise ShardError(self.name, offset, f"read failed: {e!r}") from e

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, int]]:
        name, h = self.name, None if self.digest is None else hasher(self.digest[0])
        buf, base, eof = b"", 0, False  # buf starts at stream offset `base`
        while True:
            data = self._read(base + len(buf))
            eof = not data
            if h is not None:
                h.update(data)
            buf += data
            self.held = max(self.held, len(buf))
            index = _walk(buf, len(buf), name, base=base, partial=not eof)
            n, error = _check_ids(name, buf, index, self.vocab_size, base)
            sh = MappedShard(name, buf, index, n, error)
            for i in range(n):
                ids = sh.tokens(i).copy()
                ids.flags.writeable = False
                yield sh.key(i), ids, base + int(index.member[i])
            if error is not None:
                raise error
            if index.ended:
                size = base + len(buf)
                while not eof and h is not None:  # the rest, for the digest
                    data = self._read(size)
                    eof = not data
                    h.update(data)
                    size += len(data)
                if h is not None and h.hexdigest() != self.digest[1]:
                    raise _mismatch(name, size, self.digest[0])
                return
            buf, base = buf[index.stop:], base + index.stop


def iter_samples(raw, name: str, *, vocab_size: int | None = None,
                 expect_sha256: str | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """`TarStream` of a stream, with its sha256 from the manifest checked at the end."""
    yield from TarStream(raw, name, vocab_size=vocab_size,
                         digest=None if expect_sha256 is None else ("sha256", expect_sha256))

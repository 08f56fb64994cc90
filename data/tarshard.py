"""WebDataset tar shards of token ids: a deterministic writer and two checked readers.

A sample is one document: `<key>.tokens.u16` (or `.u32`), the raw
little-endian token ids, and `<key>.source.txt`, where it came from. Any tar
reader (tarfile, GNU tar, `webdataset.WebDataset`) reads these shards; the
ids are `numpy.frombuffer(data, "<u2")`.

The writer emits plain ustar headers with fixed metadata (mtime 0, uid 0,
mode 0644), so the same samples give byte-identical shards. The readers parse
headers themselves so every problem names the shard and the byte offset: a bad
header checksum, a truncated member, an odd-sized token array, an id out of
range, or (when the manifest's sha256 is known) a digest mismatch.

Two readers, one set of checks:
- `iter_samples(stream, ...)` reads any `.read(n)` stream (HTTP, `pipe:`) in one
  pass; a digest mismatch is caught at the end of the stream.
- `map_shard(path, ...)` reads a local file with one call into a pooled buffer
  (files above `MMAP_ABOVE` are mapped instead) and hands out zero-copy,
  read-only views of the ids. Its index (where each sample's ids lie, the largest
  id of each) and a digest it has verified are kept per process, keyed by the
  file's identity (device, inode, size, mtime_ns, ctime_ns), so reading the shard
  again (the next epoch) neither re-parses nor re-hashes it; a file whose identity
  changed is checked anew, and a digest that did not match is never kept. The
  digest is checked before any sample of the shard is handed out. On the same
  bytes both readers give the same samples and the same errors (message, offset).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BLOCK = 512
TOKEN_EXT = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}


class ShardError(RuntimeError):
    """A shard is truncated or corrupt; `.shard` and `.offset` say where."""

    def __init__(self, shard: str, offset: int | None, msg: str):
        self.shard, self.offset, self.msg = shard, offset, msg
        where = f" at byte offset {offset}" if offset is not None else ""
        super().__init__(f"{shard}{where}: {msg}")


def token_dtype(vocab_size: int) -> tuple[str, np.dtype]:
    """The compact dtype for ids below `vocab_size`: ('u16', <u2) or ('u32', <u4)."""
    return ("u16", TOKEN_EXT["u16"]) if vocab_size <= 1 << 16 else ("u32", TOKEN_EXT["u32"])


def _header(name: str, size: int) -> bytes:
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"member name too long for ustar: {name!r}")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class ShardWriter:
    """Write one tar shard to `<path>.tmp`, renamed to `path` by `close()`.

    Tracks samples, tokens, bytes and the sha256 of everything written, so the
    manifest entry costs no second read. `abort()` removes the temporary file.
    """

    def __init__(self, path: str, ext: str = "u16"):
        self.path, self.ext = path, ext
        self.dtype = TOKEN_EXT[ext]
        self.tmp = path + ".tmp"
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._sha = hashlib.sha256()
        self.samples = self.tokens = self.bytes = 0

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.bytes += len(data)

    def _member(self, name: str, data: bytes) -> None:
        self._write(_header(name, len(data)))
        self._write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._write(b"\0" * pad)

    def add(self, key: str, tokens: np.ndarray, source: str) -> None:
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._member(f"{key}.tokens.{self.ext}", arr.tobytes())
        self._member(f"{key}.source.txt", source.encode("utf-8", errors="replace"))
        self.samples += 1
        self.tokens += int(arr.size)

    def close(self) -> dict:
        """Finish the archive, fsync, rename into place; return its manifest entry."""
        self._write(b"\0" * (2 * BLOCK))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"name": os.path.basename(self.path), "samples": self.samples,
                "tokens": self.tokens, "bytes": self.bytes, "sha256": self._sha.hexdigest()}

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _Buffered:
    """Exact reads over any `.read(n)` stream, counting the offset and hashing."""

    def __init__(self, raw, name: str, hash_it: bool):
        self.raw, self.name = raw, name
        self.buf = b""
        self.pos = 0  # offset in buf
        self.offset = 0  # bytes consumed from the start of the stream
        self.sha = hashlib.sha256() if hash_it else None

    def _fill(self, need: int) -> bool:
        while len(self.buf) - self.pos < need:
            try:
                chunk = self.raw.read(max(1 << 20, need))
            except ShardError:
                raise
            except Exception as e:  # e.g. a connection reset: name the shard and the offset
                raise ShardError(self.name, self.offset + len(self.buf) - self.pos,
                                 f"read failed: {e!r}") from e
            if not chunk:
                return False
            if self.sha is not None:
                self.sha.update(chunk)
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
        return True

    def read(self, n: int) -> bytes | None:
        """Exactly n bytes, or None at a clean end (nothing left); raises when cut short."""
        if not self._fill(n):
            if len(self.buf) == self.pos:
                return None
            left = len(self.buf) - self.pos
            raise ShardError(self.name, self.offset + left,
                             f"truncated: wanted {n} bytes, stream ends after {left}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        self.offset += n
        return out

    def drain(self) -> None:
        """Read to the end (so the digest covers the whole stream)."""
        self.offset += len(self.buf) - self.pos
        self.buf, self.pos = b"", 0
        while True:
            try:
                chunk = self.raw.read(1 << 20)
            except ShardError:
                raise
            except Exception as e:
                raise ShardError(self.name, self.offset, f"read failed: {e!r}") from e
            if not chunk:
                break
            self.offset += len(chunk)
            if self.sha is not None:
                self.sha.update(chunk)


def _octal(field: bytes, name: str, offset: int) -> int:
    s = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(s or b"0", 8)
    except ValueError:
        raise ShardError(name, offset, f"corrupt tar header (bad number {field!r})") from None


def _header_name(h: bytes) -> str:
    """The member name in a 512-byte tar header (ustar prefix joined)."""
    mname = h[:100].rstrip(b"\0").decode("utf-8", "replace")
    prefix = h[345:500].rstrip(b"\0")
    if h[257:262] == b"ustar" and prefix:
        mname = prefix.decode("utf-8", "replace") + "/" + mname
    return mname


def iter_members(raw, name: str, *, expect_sha256: str | None = None
                 ) -> Iterator[tuple[str, bytes, int]]:
    """Yield `(member name, data, header offset)` of the regular files of a tar stream."""
    s = _Buffered(raw, name, hash_it=expect_sha256 is not None)
    long_name: str | None = None
    while True:
        off = s.offset
        h = s.read(BLOCK)
        if h is None:
            raise ShardError(name, off, "truncated: no end-of-archive marker")
        if h == b"\0" * BLOCK:
            s.drain()
            break
        stored = _octal(h[148:156], name, off)
        if stored != sum(h[:148]) + 256 + sum(h[156:]):
            raise ShardError(name, off, "corrupt tar header (checksum mismatch)")
        size = _octal(h[124:136], name, off)
        kind = h[156:157]
        data = s.read(size + (-size % BLOCK)) if size else b""
        if data is None:
            raise ShardError(name, s.offset, f"truncated: member at {off} has no data")
        data = data[:size]
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"x", b"g"):  # pax headers: take a path= record, ignore the rest
            for rec in data.split(b"\n"):
                if b" path=" in rec:
                    long_name = rec.split(b" path=", 1)[1].decode("utf-8", "replace")
            continue
        if kind not in (b"0", b"\0"):
            continue
        if long_name is not None:
            mname, long_name = long_name, None
        else:
            mname = _header_name(h)
        yield mname, data, off
    if expect_sha256 is not None and s.sha.hexdigest() != expect_sha256:
        raise ShardError(name, None, f"sha256 mismatch after {s.offset} bytes "
                         f"(corrupt data; manifest says {expect_sha256[:16]}...)")


def split_key(member: str) -> tuple[str, str]:
    """WebDataset convention: key is the path up to the first dot of the basename."""
    d, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def iter_samples(raw, name: str, *, vocab_size: int | None = None,
                 expect_sha256: str | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield `(key, token ids, offset)` per sample, in shard order (other fields ignored)."""
    key = None
    tokens = None
    at = 0
    for mname, data, off in iter_members(raw, name, expect_sha256=expect_sha256):
        k, ext = split_key(mname)
        if k != key:
            if key is not None:
                if tokens is None:
                    raise ShardError(name, at, f"sample {key!r} has no tokens member")
                yield key, tokens, at
            key, tokens, at = k, None, off
        if ext.startswith("tokens."):
            dt = TOKEN_EXT.get(ext[7:])
            if dt is None:
                raise ShardError(name, off, f"unknown token type {ext!r}")
            if len(data) % dt.itemsize:
                raise ShardError(name, off, f"corrupt sample {k!r}: {len(data)} bytes is "
                                 f"not a whole number of {dt.itemsize}-byte ids")
            tokens = np.frombuffer(data, dtype=dt)
            if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
                raise ShardError(name, off, f"corrupt sample {k!r}: id {int(tokens.max())} "
                                 f">= vocab size {vocab_size}")
    if key is not None:
        if tokens is None:
            raise ShardError(name, at, f"sample {key!r} has no tokens member")
        yield key, tokens, at


# -- local shards: one read each, an index built and a digest checked once per process --
_ZERO = bytes(BLOCK)


@dataclass
class _Index:
    """Where the samples of one shard file lie; built by `_walk`, cached by file identity.

    Sample i's ids are elements lo[i]:hi[i] of the file viewed as `<u4` where wide[i],
    else as `<u2`.
    """

    n: int  # usable samples; the arrays may hold one more (see `_walk`)
    lo: np.ndarray  # int64 (n,)
    hi: np.ndarray  # int64 (n,)
    wide: np.ndarray | None  # bool (n,); None when every sample is <u2
    member: np.ndarray  # int64 (n,): header offset of each sample's tokens member
    peak: np.ndarray  # int64 (n,): the largest id of each sample (-1 when empty)
    long_keys: dict[int, str]  # keys that came from a GNU/pax long name, by sample
    error: tuple[int | None, str] | None  # (offset, message) of the problem after sample n-1


def _walk(buf, size: int, name: str) -> _Index:
    """Parse the headers of a whole tar file in memory, with the checks of `iter_samples`.

    The listed samples are exactly those `iter_samples` would yield before it raised;
    `error` is what it would raise (or None). Header checksums are checked for all
    headers at once at the end; the first failing one cuts the list where the stream
    reader would have stopped.
    """
    keys: list[str] = []  # per closed sample (and, last, the one left open at an error)
    start: list[int] = []
    count: list[int] = []
    wide: list[bool] = []
    member: list[int] = []
    hdr: list[int] = []  # per header: its offset, the checksum it stores, samples closed
    stored: list[int] = []  # before it, and the open sample's tokens member (key, tok)
    closed: list[int] = []
    opened: list[tuple | None] = []
    err: tuple[int | None, str] | None = None
    key: str | None = None
    tok: tuple[int, int, bool, int] | None = None
    at = off = 0
    long_name: str | None = None
    long_at: set[int] = set()  # samples whose key came from a long name
    from_long = key_long = False  # this member's name / the open sample's key was long

    def close(key: str, tok: tuple[int, int, bool, int] | None, at: int) -> None:
        """Record the finished sample `key` (its tokens member `tok`, header at `at`)."""
        if tok is None:
            raise ShardError(name, at, f"sample {key!r} has no tokens member")
        keys.append(key)
        start.append(tok[0])
        count.append(tok[1])
        wide.append(tok[2])
        member.append(tok[3])
    try:
        while True:
            left = size - off
            if left < BLOCK:
                if left == 0:
                    raise ShardError(name, off, "truncated: no end-of-archive marker")
                raise ShardError(name, size, f"truncated: wanted {BLOCK} bytes, "
                                 f"stream ends after {left}")
            h = bytes(buf[off:off + BLOCK])
            if h == _ZERO:
                break
            chk = _octal(h[148:156], name, off)
            hdr.append(off)
            stored.append(chk)
            closed.append(len(keys))
            opened.append(None if tok is None else (key, tok, key_long))
            msize = _octal(h[124:136], name, off)
            kind = h[156:157]
            data_at = off + BLOCK
            nxt = data_at + msize + (-msize % BLOCK)
            if msize and nxt > size:
                if size == data_at:
                    raise ShardError(name, data_at, f"truncated: member at {off} has no data")
                raise ShardError(name, size, f"truncated: wanted {nxt - data_at} bytes, "
                                 f"stream ends after {size - data_at}")
            if kind == b"L":
                long_name = bytes(buf[data_at:data_at + msize]).rstrip(b"\0").decode(
                    "utf-8", "replace")
                off = nxt
                continue
            if kind in (b"x", b"g"):
                for rec in bytes(buf[data_at:data_at + msize]).split(b"\n"):
                    if b" path=" in rec:
                        long_name = rec.split(b" path=", 1)[1].decode("utf-8", "replace")
                off = nxt
                continue
            if kind not in (b"0", b"\0"):
                off = nxt
                continue
            from_long = long_name is not None
            if from_long:
                mname, long_name = long_name, None
            else:
                mname = _header_name(h)
            k, ext = split_key(mname)
            if k != key:
                if key is not None:
                    close(key, tok, at)
                key, tok, at = k, None, off
                key_long = from_long
                if from_long:
                    long_at.add(len(keys))
            if ext.startswith("tokens."):
                dt = TOKEN_EXT.get(ext[7:])
                if dt is None:
                    raise ShardError(name, off, f"unknown token type {ext!r}")
                if msize % dt.itemsize:
                    raise ShardError(name, off, f"corrupt sample {k!r}: {msize} bytes is "
                                     f"not a whole number of {dt.itemsize}-byte ids")
                tok = (data_at, msize // dt.itemsize, dt.itemsize == 4, off)
            off = nxt
        if key is not None:
            close(key, tok, at)
    except ShardError as e:
        err = (e.offset, e.msg)
    n = len(keys)
    # the sample in progress at an error: its ids are checked against the vocab first
    pending = (key, tok, key_long) if err is not None and tok is not None else None
    if hdr:  # header checksums, all at once: sum of the block with the field as spaces
        blocks = np.frombuffer(buf, dtype=np.uint8, count=hdr[-1] + BLOCK).reshape(-1, BLOCK)
        h = blocks[np.asarray(hdr, dtype=np.int64) // BLOCK]  # headers sit on block bounds
        got = (h.sum(1, dtype=np.int64) - h[:, 148:156].sum(1, dtype=np.int64) + 8 * 32)
        bad = np.flatnonzero(got != np.asarray(stored, dtype=np.int64))
        if bad.size:
            i = int(bad[0])
            n, pending = closed[i], opened[i]
            keys, start, count, wide, member = (keys[:n], start[:n], count[:n], wide[:n],
                                                member[:n])
            err = (hdr[i], "corrupt tar header (checksum mismatch)")
    if pending is not None:
        k, tok, long = pending
        keys.append(k)
        start.append(tok[0])
        count.append(tok[1])
        wide.append(tok[2])
        member.append(tok[3])
        if long:
            long_at.add(n)
    start_a = np.asarray(start, dtype=np.int64)
    count_a = np.asarray(count, dtype=np.int64)
    wide_a = np.asarray(wide, dtype=bool)
    lo_a = np.where(wide_a, start_a // 4, start_a // 2)
    hi_a = lo_a + count_a
    peak = np.full(len(keys), -1, dtype=np.int64)
    for is_wide, dt in ((False, TOKEN_EXT["u16"]), (True, TOKEN_EXT["u32"])):
        sel = np.flatnonzero((wide_a == is_wide) & (count_a > 0))
        if sel.size:  # the max of each sample's ids, in one pass over [lo, hi) segments
            cuts = np.stack([lo_a[sel], hi_a[sel]], 1).ravel()
            ids = np.frombuffer(buf, dtype=dt, count=int(cuts[-1]))
            peak[sel] = np.maximum.reduceat(ids, cuts[:-1])[0::2]
    long_keys = {i: k for i, k in enumerate(keys) if i in long_at}
    return _Index(n, lo_a, hi_a, wide_a if wide_a.any() else None,
                  np.asarray(member, dtype=np.int64), peak, long_keys, err)


_INDEX: OrderedDict[tuple, _Index] = OrderedDict()  # file identity -> index, LRU
_INDEX_SAMPLES = [0]  # samples held in _INDEX
INDEX_CACHE_SAMPLES = 1 << 20  # at most this many samples' entries are kept (~35 MB)
_VERIFIED: dict[tuple, str] = {}  # file identity -> the sha256 it was checked to have
_VERIFIED_MAX = 1 << 20
MMAP_ABOVE = 64 << 20  # shards larger than this are mapped; smaller ones read in one call


_POOL: list[np.ndarray] = []  # read buffers, handed out again once no view of them is alive
_POOL_MAX = 4
_POOL_LOCK = threading.Lock()


def _read_whole(f, size: int) -> np.ndarray:
    """The file's `size` bytes as a uint8 (size,) array, read into a pooled buffer.

    Reading into memory that was used before costs no page faults (a fresh buffer
    of a few MB costs more to fault in than to fill). A pooled buffer is reused only
    when nothing but the pool refers to it: every view of it (ids of a sample still
    in a shuffle window, say) holds a reference, so live data is never overwritten.
    """
    with _POOL_LOCK:
        buf = None
        for b in _POOL:  # references of a free one: the pool's, `b`, getrefcount's argument
            if b.size >= size and sys.getrefcount(b) <= 3 and (buf is None or b.size < buf.size):
                buf = b
        if buf is None:
            buf = np.empty(max(size + size // 4, 1 << 20), dtype=np.uint8)
            if len(_POOL) < _POOL_MAX:
                _POOL.append(buf)
            else:  # replace a free one, if any; else this buffer is not pooled
                for i in range(len(_POOL)):
                    if sys.getrefcount(_POOL[i]) <= 2:  # the pool's and the argument
                        _POOL[i] = buf
                        break
        out = buf[:size]  # a view: holds `buf` until the shard's last view is gone
    got = 0
    view = memoryview(out)
    while got < size:
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    return out[:got]


def clear_cache() -> None:
    """Forget every cached index and verified digest of this process (benchmarks, tests)."""
    _INDEX.clear()
    _INDEX_SAMPLES[0] = 0
    _VERIFIED.clear()
    with _POOL_LOCK:
        _POOL.clear()


class MappedShard:
    """A local shard held in memory: `tokens(i)` is a zero-copy view of sample i's ids.

    `n` samples are usable; `error` (a `ShardError` or None) is what reading past
    them must raise (the shard is cut or corrupt there).
    """

    def __init__(self, name: str, buf, index: _Index, n: int, error: ShardError | None):
        self.name, self.n, self.error = name, n, error
        self._buf, self._index = buf, index
        self._u2 = np.frombuffer(buf, dtype=TOKEN_EXT["u16"], count=len(buf) // 2)
        self._u4 = (np.frombuffer(buf, dtype=TOKEN_EXT["u32"], count=len(buf) // 4)
                    if index.wide is not None else None)
        for a in (self._u2, self._u4):  # views into a shared (pooled) buffer: read-only
            if a is not None:
                a.flags.writeable = False
        self._lo = index.lo[:n].tolist()
        self._hi = index.hi[:n].tolist()
        self._wide = index.wide[:n].tolist() if index.wide is not None else None

    def tokens(self, i: int) -> np.ndarray:
        """Sample i's ids: a read-only (count,) `<u2` or `<u4` view into the shard's bytes."""
        if self._wide is not None and self._wide[i]:
            return self._u4[self._lo[i]:self._hi[i]]
        return self._u2[self._lo[i]:self._hi[i]]

    def key(self, i: int) -> str:
        """Sample i's key (the member name up to the first dot of its basename)."""
        return _key_of(self._buf, self._index, i)


def _key_of(buf, index: _Index, i: int) -> str:
    if i in index.long_keys:
        return index.long_keys[i]
    h = bytes(buf[int(index.member[i]):int(index.member[i]) + BLOCK])
    mname = h[:100].rstrip(b"\0").decode("utf-8", "replace")
    prefix = h[345:500].rstrip(b"\0")
    if h[257:262] == b"ustar" and prefix:
        mname = prefix.decode("utf-8", "replace") + "/" + mname
    return split_key(mname)[0]


def map_shard(path: str, name: str | None = None, *, vocab_size: int | None = None,
              expect_sha256: str | None = None) -> MappedShard:
    """Open a local shard for random access, with the checks of `iter_samples`.

    The file is read in one call (mapped when larger than `MMAP_ABOVE`). Its
    index and a verified digest are reused while the file's identity is unchanged.
    A digest mismatch raises `ShardError` here, before any sample is used (a
    structural problem of the same shard is raised instead: it says where).
    Problems that only cut the shard short come back as `.error`, to be raised
    after the `.n` good samples, as a stream reader would.
    """
    name = name or path
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if st.st_size > MMAP_ABOVE:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            buf = _read_whole(f, st.st_size)
            if len(buf) != st.st_size:  # changed under us: index what is there, never cache
                ident = None
    size = len(buf)
    buf = memoryview(buf)
    index = _INDEX.get(ident) if ident is not None else None
    if index is None:
        index = _walk(buf, size, name)
        if ident is not None:
            _INDEX[ident] = index
            _INDEX_SAMPLES[0] += index.n
            while _INDEX_SAMPLES[0] > INDEX_CACHE_SAMPLES and len(_INDEX) > 1:
                _INDEX_SAMPLES[0] -= _INDEX.popitem(last=False)[1].n
    else:
        _INDEX.move_to_end(ident)
    n = index.n
    error = None if index.error is None else ShardError(name, *index.error)
    if vocab_size is not None and index.peak.size and int(index.peak.max()) >= vocab_size:
        i = int(np.argmax(index.peak >= vocab_size))  # == n: the sample open at the error
        n = min(n, i)
        error = ShardError(name, int(index.member[i]),
                           f"corrupt sample {_key_of(buf, index, i)!r}: "
                           f"id {int(index.peak[i])} >= vocab size {vocab_size}")
    if expect_sha256 is not None and (ident is None or _VERIFIED.get(ident) != expect_sha256):
        digest = hashlib.sha256(buf).hexdigest()
        if digest != expect_sha256:
            raise error or ShardError(name, None, f"sha256 mismatch after {size} bytes "
                                      f"(corrupt data; manifest says {expect_sha256[:16]}...)")
        if ident is not None:
            if len(_VERIFIED) >= _VERIFIED_MAX:  # a bound, not an LRU: it only costs a re-hash
                _VERIFIED.clear()
            _VERIFIED[ident] = digest
    return MappedShard(name, buf, index, n, error)

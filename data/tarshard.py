"""WebDataset tar shards of token ids: a deterministic writer and a checked streaming reader.

A sample is one document: `<key>.tokens.u16` (or `.u32`), the raw
little-endian token ids, and `<key>.source.txt`, where it came from. Any tar
reader (tarfile, GNU tar, `webdataset.WebDataset`) reads these shards; the
ids are `numpy.frombuffer(data, "<u2")`.

The writer emits plain ustar headers with fixed metadata (mtime 0, uid 0,
mode 0644), so the same samples give byte-identical shards. The reader parses
headers itself so every problem names the shard and the byte offset: a bad
header checksum, a truncated member, an odd-sized token array, an id out of
range, or (when the manifest's sha256 is known) a digest mismatch at the end.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np

BLOCK = 512
TOKEN_EXT = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}


class ShardError(RuntimeError):
    """A shard is truncated or corrupt; `.shard` and `.offset` say where."""

    def __init__(self, shard: str, offset: int | None, msg: str):
        self.shard, self.offset = shard, offset
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
            mname = h[:100].rstrip(b"\0").decode("utf-8", "replace")
            prefix = h[345:500].rstrip(b"\0")
            if h[257:262] == b"ustar" and prefix:
                mname = prefix.decode("utf-8", "replace") + "/" + mname
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

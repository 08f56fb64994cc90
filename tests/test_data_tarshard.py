"""The shard readers (`map_shard`, `TarStream`) against a sequential reference reader,
its per-process caches, the writer, and the workers' shared-memory ring.

The reference (below: the sequential tar reader `data` had until 2026-12, kept here as
the oracle) reads a stream header by header: for every shard, intact or damaged, the
reader must hand out the same samples and fail with the same message at the same byte
offset.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import tarfile
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from data_fixtures import doc_hashes, reassemble, samples_of, shard_paths, shards_dir

from data import ShardError, build_loader, tarshard
from data import loader as loader_mod
from data.tarshard import (
    BLOCK,
    TOKEN_EXT,
    ShardWriter,
    TarStream,
    _member_name,
    _octal,
    clear_cache,
    iter_samples,
    map_shard,
    split_key,
)


# -- the reference: a sequential reader ----------------------------------------------
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


def _ref_members(raw, name: str, *, expect_sha256: str | None = None
                 ) -> Iterator[tuple[str, bytes, int]]:
    """Yield `(member name, data, header offset)` of the regular files of a tar stream."""
    s = _Buffered(raw, name, hash_it=expect_sha256 is not None)
    long_name: str | None = None
    while True:
        off = s.offset
        h = s.read(BLOCK)
        if h is None:
            raise ShardError(name, off, "truncated: no end-of-archive marker")
        if h == bytes(BLOCK):
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
            mname = _member_name(h[:100], h[257:262], h[345:500])
        yield mname, data, off
    if expect_sha256 is not None and s.sha.hexdigest() != expect_sha256:
        raise ShardError(name, None, f"sha256 mismatch after {s.offset} bytes "
                         f"(corrupt data; manifest says {expect_sha256[:16]}...)")


def _ref_samples(raw, name: str, *, vocab_size: int | None = None,
                 expect_sha256: str | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yield `(key, token ids, offset)` per sample, in shard order (other fields ignored)."""
    key = None
    tokens = None
    at = 0
    for mname, data, off in _ref_members(raw, name, expect_sha256=expect_sha256):
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




def _stream(data: bytes, vocab: int | None):
    got, err = [], None
    try:
        for key, ids, _off in _ref_samples(io.BytesIO(data), "s", vocab_size=vocab):
            got.append((key, ids.dtype.str, ids.tobytes()))
    except ShardError as e:
        err = (e.offset, e.msg)
    return got, err


def _mapped(path: str, vocab: int | None):
    clear_cache()
    try:
        sh = map_shard(path, "s", vocab_size=vocab)
    except ShardError as e:
        return [], (e.offset, e.msg)
    got = [(sh.key(i), sh.tokens(i).dtype.str, sh.tokens(i).tobytes()) for i in range(sh.n)]
    return got, None if sh.error is None else (sh.error.offset, sh.error.msg)


def _odd_shard(path: str) -> None:
    """A tar that data.prepare never writes: GNU and pax long names, u32 ids, an extra
    member, an empty document, a sample without ids."""
    rng = np.random.default_rng(0)

    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    for fmt, suffix in ((tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")):
        with tarfile.open(f"{path}-{suffix}.tar", "w", format=fmt) as tf:
            for i in range(12):
                key = f"doc{i:03d}" if i % 3 else "d/" + "x" * 120 + f"{i:03d}"  # long names
                ids = rng.integers(0, 700 if i == 7 else 500, size=int(rng.integers(0, 90)))
                ext = "u32" if i % 4 == 1 else "u16"
                add(tf, f"{key}.tokens.{ext}", ids.astype("<u4" if ext == "u32" else "<u2")
                    .tobytes())
                add(tf, f"{key}.source.txt", b"where it came from")
                if i == 5:
                    add(tf, f"{key}.extra.json", b"{}")
            add(tf, "lonely.source.txt", b"no ids")  # a sample without a tokens member


def _damage(data: bytearray, rng: random.Random) -> bytearray:
    how = rng.choice(["flip", "truncate", "headers", "zero-block", "none"])
    if how == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        data = data[:rng.randrange(len(data) + 1)]
    elif how == "headers":
        for _ in range(3):
            data[rng.randrange(min(len(data), 2048))] ^= rng.randrange(1, 256)
    elif how == "zero-block":
        i = rng.randrange(len(data) // 512) * 512
        data[i:i + 512] = bytes(512)
    return data


def _read(data: bytes, vocab: int | None, chunk: int):
    got, err = [], None
    try:  # read in pieces of `chunk` bytes: samples and headers cut at every place
        for key, ids, _off in TarStream(io.BytesIO(data), "s", vocab_size=vocab, chunk=chunk):
            got.append((key, ids.dtype.str, ids.tobytes()))
    except ShardError as e:
        err = (e.offset, e.msg)
    return got, err


def test_reader_matches_the_sequential_reference_on_damaged_shards(tmp_path):
    _odd_shard(str(tmp_path / "odd"))
    sources = shard_paths(shards_dir())[:4] + [str(tmp_path / "odd-gnu.tar"),
                                               str(tmp_path / "odd-pax.tar")]
    rng = random.Random(0)
    victim = str(tmp_path / "victim.tar")
    errors = 0
    for trial in range(300):
        src = sources[trial % len(sources)]
        data = _damage(bytearray(open(src, "rb").read()), rng)
        with open(victim, "wb") as f:
            f.write(data)
        vocab = rng.choice([None, 512, 300])
        want = _stream(bytes(data), vocab)
        assert _mapped(victim, vocab) == want, (trial, src, vocab, want[1])
        chunk = rng.choice([1 << 20, 512, rng.randrange(1, 3000)])
        assert _read(bytes(data), vocab, chunk) == want, (trial, src, vocab, chunk, want[1])
        errors += want[1] is not None
    assert 60 < errors < 290  # both kinds were exercised


def test_odd_tars_read_like_tarfile(tmp_path):
    _odd_shard(str(tmp_path / "odd"))
    for fmt in ("gnu", "pax"):
        path = str(tmp_path / f"odd-{fmt}.tar")
        sh = map_shard(path)
        with tarfile.open(path) as tf:
            names = [m.name for m in tf.getmembers() if ".tokens." in m.name]
        assert [sh.key(i) for i in range(sh.n)] == [n.split(".tokens.")[0] for n in names]
        assert "has no tokens member" in str(sh.error)  # the lonely sample at the end
        with pytest.raises(ShardError, match="id 6[0-9][0-9] >= vocab size 600"):
            s = map_shard(path, vocab_size=600)
            assert s.n == 7
            raise s.error


def test_digest_checked_before_any_sample_and_once_per_unchanged_file(tmp_path, monkeypatch):
    folder = str(tmp_path / "shards")
    shutil.copytree(shards_dir(), folder)
    path = shard_paths(folder)[3]
    good = ("sha256", hashlib.sha256(open(path, "rb").read()).hexdigest())
    calls = []
    real = tarshard.hasher
    monkeypatch.setattr(tarshard, "hasher", lambda *a: calls.append(1) or real(*a))
    clear_cache()
    n = map_shard(path, digest=good).n
    map_shard(path, digest=good)
    assert len(calls) == 1  # the second open trusts the digest it checked
    map_shard(path)
    assert len(calls) == 1
    data = bytearray(open(path, "rb").read())
    data[512] ^= 1  # the first id of the first sample: a valid id, a wrong digest
    time.sleep(0.01)
    with open(path, "wb") as f:  # same size, new mtime/ctime: checked again
        f.write(data)
    with pytest.raises(ShardError, match="sha256 mismatch") as ei:
        map_shard(path, digest=good)
    assert len(calls) == 2 and ei.value.shard == path
    with pytest.raises(ShardError, match="sha256 mismatch"):  # and never trusted after that
        map_shard(path, digest=good)
    assert len(calls) == 3
    # the fast per-run digest finds the same damage, and says what the manifest's sha256 says
    with pytest.raises(ShardError, match="sha256 mismatch.*xxh3_128 differs"):
        map_shard(path, digest=("xxh3_128", "0" * 32))
    assert map_shard(path).n == n  # without a digest to check it reads as before


def test_views_outlive_their_shard_and_are_read_only():
    clear_cache()
    paths = shard_paths(shards_dir())
    first = map_shard(paths[0])
    kept = [first.tokens(i) for i in range(first.n)]
    want = [k.copy() for k in kept]
    del first
    for p in paths[1:] * 3:  # many more shards read while `kept` is alive
        sh = map_shard(p)
        assert sh.n and sh.tokens(0).size >= 0
    assert all(np.array_equal(a, b) for a, b in zip(kept, want))
    assert not any(k.flags.writeable for k in kept)
    _key, ids, _off = next(iter(TarStream(io.BytesIO(open(paths[0], "rb").read()), "s")))
    assert not ids.flags.writeable


def test_writer_is_byte_deterministic_and_its_digests_are_the_files(tmp_path):
    """webdataset's TarWriter with fixed metadata: the same samples, the same bytes."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=int(rng.integers(0, 300))) for _ in range(40)]
    entries = []
    for name in ("a", "b"):
        w = ShardWriter(str(tmp_path / f"{name}.tar"))
        for i, d in enumerate(docs):
            w.add(f"{i:06d}", d, f"file{i}.txt:{i}")
        entries.append(w.close())
    a, b = (open(tmp_path / f"{n}.tar", "rb").read() for n in "ab")
    assert a == b and entries[0]["sha256"] == entries[1]["sha256"]
    assert entries[0]["sha256"] == hashlib.sha256(a).hexdigest()
    assert entries[0]["bytes"] == len(a) and entries[0]["tokens"] == sum(map(len, docs))
    if "xxh3_128" in entries[0]:
        assert map_shard(str(tmp_path / "a.tar"), digest=("xxh3_128", entries[0]["xxh3_128"])).n \
            == len(docs)
    with tarfile.open(tmp_path / "a.tar") as tf:  # plain tar: fixed metadata
        members = tf.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)}
    sh = map_shard(str(tmp_path / "a.tar"))
    assert [sh.key(i) for i in range(sh.n)] == [f"{i:06d}" for i in range(len(docs))]
    assert all(np.array_equal(sh.tokens(i), d) for i, d in enumerate(docs))
    # and the compatibility reader of pretrain/evaluate.py gives the same
    got = [(k, t.tolist()) for k, t, _ in iter_samples(io.BytesIO(a), "a", expect_sha256=
                                                        entries[0]["sha256"])]
    assert got == [(f"{i:06d}", d.tolist()) for i, d in enumerate(docs)]


def test_writer_and_reader_agree_on_u32(tmp_path):
    path = str(tmp_path / "wide.tar")
    w = ShardWriter(path, ext="u32")
    docs = [np.arange(n, dtype=np.int64) * 70001 for n in (0, 1, 5, 1000)]
    for i, d in enumerate(docs):
        w.add(f"{i:04d}", d, "src")
    w.close()
    sh = map_shard(path)
    assert sh.error is None and sh.n == len(docs)
    for i, d in enumerate(docs):
        assert sh.tokens(i).dtype == np.dtype("<u4") and np.array_equal(sh.tokens(i), d)


@pytest.mark.multiprocess
def test_workers_waiting_on_a_full_ring_give_the_same_stream(monkeypatch, tmp_path):
    """Ring slots fewer than the DataLoader keeps in flight: workers must wait for the main
    process, and the stream must not change. Also: shards without a manifest (vocab
    unknown) travel as int32."""
    folder = str(tmp_path / "bare")
    os.makedirs(folder)
    for p in shard_paths(shards_dir()):
        shutil.copy(p, folder)
    base = {"sources": folder, "seq_len": 64, "micro_batch_size": 4, "seed": 1,
            "shuffle_buffer": 16, "epochs": 1, "return_meta": True}
    want = list(build_loader({**base, "num_workers": 0}))
    real_ring = loader_mod._Ring

    def tight(workers, depth, group, need, dtype):
        assert np.dtype(dtype) == np.int32
        return real_ring(workers, 1, group, need, dtype)

    workers = {**base, "num_workers": 2, "prefetch_factor": 4, "batches_per_transfer": 3}
    two = list(build_loader(workers))
    monkeypatch.setattr(loader_mod, "_Ring", tight)
    got = list(build_loader(workers))
    monkeypatch.undo()
    assert len(got) == len(two)
    for a, b in zip(got, two):
        for k in ("input_ids", "labels", "reset"):
            assert torch.equal(a[k], b[k])
    # and every document of the epoch exactly once, as in-process
    docs, problems = doc_hashes(reassemble(got))
    assert not problems
    assert docs == doc_hashes(reassemble(want))[0] == {
        (name, i, 0, 0): h for (name, i), h in samples_of(folder).items()}


@pytest.mark.multiprocess
def test_stopping_early_with_waiting_workers_shuts_down_quickly(monkeypatch):
    real_ring = loader_mod._Ring
    monkeypatch.setattr(loader_mod, "_Ring", lambda w, d, g, n, dt: real_ring(w, 1, g, n, dt))
    ld = build_loader({"sources": shards_dir(), "seq_len": 64, "micro_batch_size": 4,
                       "num_workers": 2, "seed": 0, "shuffle_buffer": 16})
    for _ in range(2):
        it = iter(ld)
        for _ in range(5):
            next(it)
        time.sleep(0.3)  # the workers fill their ring slot and wait
        t0 = time.perf_counter()
        del it
        assert time.perf_counter() - t0 < 3.0  # not the DataLoader's 5 s kill timeout
    assert ld.stats["batches"] == 10


def test_a_remote_shard_larger_than_the_read_buffer_streams_a_sample_at_a_time():
    """Over real HTTP: the shard is read in 4 KiB pieces, and the reader never holds
    more than one piece and the sample being read (not the shard, ~30x a piece here)."""
    from data_fixtures import HttpServer

    from data.sources import open_shard

    folder = shards_dir()
    path = shard_paths(folder)[0]
    chunk, size = 4096, os.path.getsize(path)
    with tarfile.open(path) as tf:  # the largest sample: its members with their headers
        members: dict[str, int] = {}
        for m in tf.getmembers():
            k = split_key(m.name)[0]
            members[k] = members.get(k, 0) + BLOCK + m.size + (-m.size % BLOCK)
    with HttpServer(folder) as srv:
        raw = open_shard(f"{srv.url}/{os.path.basename(path)}")
        stream = TarStream(raw, path, chunk=chunk)
        got = [(k, ids.tobytes()) for k, ids, _off in stream]
        raw.close()
    sh = map_shard(path)
    assert got == [(sh.key(i), sh.tokens(i).tobytes()) for i in range(sh.n)]
    assert size > 20 * chunk and len(got) > 10
    assert chunk < stream.held <= chunk + max(members.values()) + BLOCK


# -- the bulk walk (`_bulk`): the sequential walk's index, or no answer ---------------
def _index_fields(ix) -> list:
    return [ix.n, *(None if a is None else (a.dtype.str, a.tolist())
                    for a in (ix.lo, ix.hi, ix.wide, ix.member, ix.peak)),
            ix.long_keys, ix.error, ix.stop, ix.ended]


def _walks(data: bytes, partial: bool = False) -> tuple[bool, list]:
    """(whether `_walk` took the bulk path, its index); asserts it is the sequential one's."""
    before = tarshard.BULK_WALKS[0]
    got = _index_fields(tarshard._walk(data, len(data), "s", partial=partial))
    bulk = tarshard.BULK_WALKS[0] - before
    assert bulk == (tarshard._bulk(data, len(data), partial) is not None)
    assert got == _index_fields(tarshard._walk(data, len(data), "s", partial=partial,
                                               bulk=False))
    return bool(bulk), got


def _short_docs(path: str, docs: int, ext: str, seed: int, folders: bool = False) -> list:
    rng = np.random.default_rng(seed)
    w = ShardWriter(path, ext=ext)
    out = []
    for i in range(docs):  # empty documents too; u32 ids beyond 16 bits
        ids = rng.integers(0, 70000 if ext == "u32" else 512, size=int(rng.integers(0, 40)))
        key = f"part{i % 3}.x/{i:07d}" if folders else f"{i:07d}"
        w.add(key, ids, f"doc {i}")
        out.append((key, ids))
    w.close()
    return out


def _refit(data: bytearray, off: int) -> None:
    """The checksum of the header at `off`, made right after a field was changed."""
    h = data[off:off + BLOCK]
    data[off + 148:off + 156] = b"%06o\0 " % (sum(h[:148]) + 8 * 32 + sum(h[156:]))


def test_bulk_walk_takes_plain_shards_and_gives_the_sequential_index(tmp_path):
    for p in shard_paths(shards_dir()):  # data.prepare's shards
        assert _walks(open(p, "rb").read())[0], p
    for docs, ext, folders in ((1, "u16", False), (3000, "u16", False), (700, "u32", False),
                               (300, "u16", True), (50, "u32", True)):
        path = str(tmp_path / f"{docs}-{ext}.tar")
        want = _short_docs(path, docs, ext, docs, folders)
        data = open(path, "rb").read()
        assert _walks(data)[0]
        # a stream's pieces: each starts at a header (a sample's first) and ends anywhere
        offsets = [o for _n, _d, o in _ref_members(io.BytesIO(data), "s")]
        taken = [_walks(data[at:at + size], partial=True)[0]
                 for at in (0, offsets[min(6, len(offsets) - 2)])
                 for size in [*range(0, len(data), 5 + len(data) // 60), len(data)]]
        assert sum(taken) > 0.8 * len(taken)
        sh = (clear_cache(), map_shard(path))[1]
        assert [(sh.key(i), sh.tokens(i).tolist()) for i in range(sh.n)] == [
            (k, d.tolist()) for k, d in want]


def test_bulk_walk_leaves_every_other_tar_to_the_sequential_walk(tmp_path):
    path = str(tmp_path / "plain.tar")
    _short_docs(path, 40, "u16", 1)
    plain = open(path, "rb").read()
    offsets = [o for _n, _d, o in _ref_members(io.BytesIO(plain), "s")]
    cases = {}
    # a member's data holding a copy of a header at a block bound: a false candidate
    cases["header in data"] = plain[:offsets[5] + BLOCK] + plain[:BLOCK] + plain[
        offsets[5] + 2 * BLOCK:]
    for what, at, value in (("size without zeros", 124, b"12\0\0\0\0\0\0\0\0\0\0"),
                            ("size with spaces", 124, b"     000012 "),
                            ("ustar prefix", 345, b"dir"), ("directory", 156, b"5"),
                            ("unknown token type", 8, b"tokens.u64"),
                            ("odd id bytes", 124, b"00000000003\0"),
                            ("leading slash", 0, b"/0000001.tokens.u16")):
        data = bytearray(plain)
        off = offsets[3]  # the tokens member of sample 1
        data[off + at:off + at + len(value)] = value
        _refit(data, off)
        cases[what] = bytes(data)
    for what, value in (("utf-8 key", "é".encode()), ("NUL in the key", b"\0\0")):
        data = bytearray(plain)
        for off in offsets[2:4]:  # both members of sample 1: its key "0000001" -> "00000?"
            data[off + 5:off + 7] = value
            _refit(data, off)
        cases[what] = bytes(data)
    data = bytearray(plain)
    data[offsets[3] + 300] ^= 1  # a bad checksum
    cases["bad checksum"] = bytes(data)
    data = bytearray(plain)  # a sample without its tokens member: renamed to source2
    data[offsets[3] + 8:offsets[3] + 18] = b"source2.tx"
    _refit(data, offsets[3])
    cases["no tokens member"] = bytes(data)
    end = _walks(plain)[1][8] - BLOCK  # the end-of-archive block
    for cut in (0, 100, BLOCK, offsets[7] + 3, end, end + 100):
        cases[f"cut at {cut}"] = plain[:cut]
    _odd_shard(str(tmp_path / "odd"))
    for fmt in ("gnu", "pax"):  # long names
        cases[fmt] = open(tmp_path / f"odd-{fmt}.tar", "rb").read()
    with tarfile.open(tmp_path / "two.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("a.tokens.u16", "a.tokens.u16", "b.tokens.u16"):  # one sample, 2 ids
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"\1\0"))
    cases["two tokens members"] = open(tmp_path / "two.tar", "rb").read()
    errors = 0
    for what, data in cases.items():
        bulk, got = _walks(data)
        assert not bulk, what
        errors += got[7] is not None
        if what in ("header in data", "size without zeros", "size with spaces", "utf-8 key",
                    "NUL in the key", "leading slash"):  # tars the walk reads whole
            assert got[0] == 40 and got[7] is None, what
    assert _walks(plain)[0]  # and the plain shard itself is taken
    assert errors >= 10

"""Shard sources: expand a source spec into shard URLs, and open one shard as a byte stream.

A spec is one string:
- a local folder (its `manifest.json` lists the shards, else every `*.tar`),
  a `manifest.json` path, a glob, or a path with brace ranges
  (`shards/shard-{000000..000099}.tar`, `{a,b}` lists too);
- an `http://` / `https://` URL, brace-expanded, or ending in `.json` to name
  a manifest whose shards lie beside it;
- `pipe:COMMAND`, brace-expanded into one command per shard
  (`pipe:aws s3 cp s3://b/shard-{0000..0099}.tar -`); the command's stdout is the shard.

Local files are read whole (`map_local`: zero-copy ids; index and digest checked once
per process while the file is unchanged); HTTP and pipe sources are streamed
(`open_shard`), since they cannot be re-read or mapped.

Opening retries with exponential backoff (`retries` times), then raises
`SourceError` naming the URL; an HTTP body cut off mid-way is reopened at its
offset with a Range request (same retries), so a flaky link costs no data. A pipe command that exits non-zero fails the
shard with its exit status.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from .tarshard import MappedShard, ShardError, map_shard

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


class SourceError(RuntimeError):
    """A shard could not be opened after all retries."""


def brace_expand(s: str) -> list[str]:
    """Expand `{000..012}` numeric ranges (zero-padded to the width written) and `{a,b}` lists."""
    m = _RANGE.search(s)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        out = []
        for i in range(int(lo), int(hi) + step, step):
            out.extend(brace_expand(s[:m.start()] + str(i).zfill(width) + s[m.end():]))
        return out
    m = _LIST.search(s)
    if m:
        out = []
        for part in m.group(1).split(","):
            out.extend(brace_expand(s[:m.start()] + part + s[m.end():]))
        return out
    return [s]


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


@dataclass
class Shards:
    """The expanded shard list of one source, with what its manifest says (if any)."""

    urls: list[str]
    sha256: dict[str, str] = field(default_factory=dict)  # url -> digest from the manifest
    vocab_size: int | None = None
    manifest: str | None = None


def _fetch(url: str, retries: int, backoff: float, timeout: float) -> bytes:
    f = open_shard(url, retries=retries, backoff=backoff, timeout=timeout)
    try:
        return f.read()
    finally:
        f.close()


def _from_manifest(path_or_url: str, text: bytes, val: bool = False) -> Shards:
    m = json.loads(text)
    part = m.get("val", {}) if val else m
    base = path_or_url.rsplit("/", 1)[0] if "/" in path_or_url else "."
    folder = part.get("folder") if val else None
    if folder:
        base = f"{base}/{folder}"
    urls, sha = [], {}
    for e in part.get("shards", []):
        u = f"{base}/{e['name']}"
        urls.append(u)
        sha[u] = e["sha256"]
    vocab = m.get("tokenizer", {}).get("vocab_size")
    return Shards(urls, sha, vocab, path_or_url)


def _val_folder(manifest_path: str) -> str | None:
    try:
        with open(manifest_path) as f:
            return json.load(f).get("val", {}).get("folder")
    except (OSError, ValueError):
        return None


def expand_source(spec: str, *, retries: int = 3, backoff: float = 0.5,
                  timeout: float = 30.0) -> Shards:
    """Expand one spec string into its shard list (see module doc). Raises when it is empty."""
    val = False
    if spec.endswith("#val"):  # the validation shards of a manifest or prepared folder
        spec, val = spec[:-4], True
    if spec.startswith("file://"):
        spec = spec[7:]
    if spec.startswith("pipe:"):
        out = Shards(brace_expand(spec))
    elif _is_url(spec):
        if spec.endswith(".json"):
            out = _from_manifest(spec, _fetch(spec, retries, backoff, timeout), val)
        else:
            out = Shards(brace_expand(spec))
    elif os.path.isdir(spec) or spec.endswith(".json"):
        mpath = spec if spec.endswith(".json") else os.path.join(spec, "manifest.json")
        folder = spec.rstrip("/")
        parent = os.path.join(os.path.dirname(folder), "manifest.json")
        if os.path.exists(mpath):
            with open(mpath, "rb") as f:
                out = _from_manifest(mpath, f.read(), val)
        elif os.path.exists(parent) and _val_folder(parent) == os.path.basename(folder):
            with open(parent, "rb") as f:  # OUT/val of data.prepare: listed by OUT/manifest.json
                out = _from_manifest(parent, f.read(), True)
        else:
            out = Shards(sorted(glob.glob(os.path.join(spec, "*.tar"))))
    else:
        paths: list[str] = []
        for p in brace_expand(spec):
            paths.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p])
        out = Shards(paths)
        # shards written by data.prepare: take digests and vocab from the manifest beside them
        folders = {os.path.dirname(p) or "." for p in paths}
        if len(folders) == 1:
            mpath = os.path.join(folders.pop(), "manifest.json")
            if os.path.exists(mpath):
                with open(mpath, "rb") as f:
                    m = _from_manifest(mpath, f.read())
                by_name = {os.path.basename(u): d for u, d in m.sha256.items()}
                out.sha256 = {p: by_name[os.path.basename(p)] for p in paths
                              if os.path.basename(p) in by_name}
                out.vocab_size, out.manifest = m.vocab_size, mpath
    if not out.urls:
        raise SourceError(f"source {spec!r} names no shards")
    return out


class _PipeStream:
    def __init__(self, cmd: str):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        self.offset += len(data)
        if not data or (n is not None and n >= 0 and len(data) < n):
            # at the end: a failing command must not look like a clean, short shard
            rc = self.proc.wait()
            if rc != 0:
                raise ShardError(f"pipe:{self.cmd}", self.offset,
                                 f"pipe command exited with status {rc}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()


class _HttpStream:
    """An HTTP(S) body that survives a dropped connection: it reopens with a Range request
    at the current offset (with backoff, `retries` times) and goes on."""

    def __init__(self, url: str, retries: int, backoff: float, timeout: float, on_retry):
        self.url, self.retries, self.backoff, self.timeout = url, retries, backoff, timeout
        self.on_retry = on_retry
        self.pos = 0
        self.total: int | None = None  # from Content-Length: a short body is a cut, not an end
        self.resp = self._open(0)

    def _open(self, start: int):
        delay, last = self.backoff, None
        for attempt in range(self.retries + 1):
            try:
                headers = {"Range": f"bytes={start}-"} if start else {}
                resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                              timeout=self.timeout)
                if start and resp.status != 206:  # no range support: skip what we have
                    left = start
                    while left > 0:
                        chunk = resp.read(min(left, 1 << 20))
                        if not chunk:
                            raise ShardError(self.url, start, "short body on reopening")
                        left -= len(chunk)
                length = resp.headers.get("Content-Length")
                if length is not None and resp.status in (200, 206):
                    self.total = (start if resp.status == 206 else 0) + int(length)
                return resp
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                last = e
                if attempt < self.retries:
                    if self.on_retry is not None:
                        self.on_retry(self.url, e)
                    time.sleep(delay)
                    delay *= 2
        raise SourceError(f"cannot open {self.url} after {self.retries + 1} attempts: {last}")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:  # read all, in pieces (each one checked)
            parts = []
            while part := self.read(1 << 20):
                parts.append(part)
            return b"".join(parts)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                data = self.resp.read(n)
                if not data and n and self.total is not None and self.pos < self.total:
                    raise http.client.IncompleteRead(b"", self.total - self.pos)
                self.pos += len(data)
                return data
            except (OSError, http.client.HTTPException) as e:
                if attempt == self.retries:
                    raise ShardError(self.url, self.pos, f"read failed: {e!r}") from e
                if self.on_retry is not None:
                    self.on_retry(self.url, e)
                time.sleep(delay)
                delay *= 2
                self.resp.close()
                self.resp = self._open(self.pos)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.resp.close()


def open_shard(url: str, *, retries: int = 3, backoff: float = 0.5, timeout: float = 30.0,
               on_retry=None):
    """Open a shard for sequential reading: an object with `.read(n)` and `.close()`."""
    if url.startswith("pipe:"):
        return _PipeStream(url[5:])
    if _is_url(url):
        return _HttpStream(url, retries, backoff, timeout, on_retry)
    return _retry_local(url, lambda: open(url.removeprefix("file://"), "rb"), retries, backoff,
                        on_retry)


def _retry_local(url: str, opener, retries: int, backoff: float, on_retry):
    """`opener()`, retried with doubling backoff on OSError (not on a missing file, which
    does not come back); SourceError naming `url` when every attempt failed."""
    delay = backoff
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return opener()
        except OSError as e:
            last = e
            if isinstance(e, FileNotFoundError):
                break
            if attempt < retries:
                if on_retry is not None:
                    on_retry(url, e)
                time.sleep(delay)
                delay *= 2
    raise SourceError(f"cannot open {url} after {retries + 1} attempts: {last}")


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (plain path or `file://`), else None."""
    if url.startswith("pipe:") or _is_url(url):
        return None
    return url.removeprefix("file://")


def map_local(url: str, *, retries: int = 3, backoff: float = 0.5, on_retry=None,
              vocab_size: int | None = None, expect_sha256: str | None = None) -> MappedShard:
    """`tarshard.map_shard` of a local shard, with `open_shard`'s retries on OSError."""
    path = local_path(url)
    if path is None:
        raise ValueError(f"not a local shard: {url!r}")
    return _retry_local(
        url, lambda: map_shard(path, url, vocab_size=vocab_size, expect_sha256=expect_sha256),
        retries, backoff, on_retry)

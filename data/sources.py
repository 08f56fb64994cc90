"""Shard sources: expand a source spec into shard URLs, and open one shard as a byte stream.

A spec is one string, in WebDataset's conventions: a local folder (its `manifest.json`
lists the shards, else every `*.tar`), a `manifest.json`, a glob or a brace-expanded path
(`shards/shard-{000000..000099}.tar`, `{a,b}`; `::` joins several); an http(s) URL,
brace-expanded, or a `.json` manifest with its shards beside it; `pipe:COMMAND`, one
command per shard (`pipe:aws s3 cp s3://b/shard-{0000..0099}.tar -`); any of these +
`#val`: the validation shards its manifest lists. Brace expansion is `braceexpand`
without webdataset's `${WDS_...}` substitution: a `pipe:` keeps its shell variables.

Opening is `webdataset.gopen` (`WDS_SECURE=1` refuses `pipe:`; a command that exits
non-zero fails the shard with its status), except http(s), where gopen's curl cannot
resume a body cut off mid-way: ours reopens it at its offset with a Range request. Both
retry with doubling backoff; then opening raises `SourceError` naming the URL, reading
`ShardError` naming the URL and offset.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .tarshard import ShardError, have_digest


class SourceError(RuntimeError):
    """A shard could not be opened after all retries."""


def brace_expand(spec: str) -> list[str]:
    """Shard URLs of `spec`: `::`-separated parts, each brace-expanded (`{000..012}`
    ranges keep the zero padding written, `{a,b}` lists)."""
    from braceexpand import braceexpand

    return [u for part in spec.split("::") for u in braceexpand(part)]


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


@dataclass
class Shards:
    """The expanded shard list of one source, with what its manifest says (if any)."""

    urls: list[str]
    sha256: dict[str, str] = field(default_factory=dict)  # url -> digest from the manifest
    vocab_size: int | None = None
    manifest: str | None = None
    xxh3: dict[str, str] = field(default_factory=dict)  # url -> xxh3-128 from the manifest

    def digest(self, url: str) -> tuple[str, str] | None:
        """(algorithm, hex digest) to check a shard against: the manifest's xxh3-128 when
        it has one (ten times faster to check) and `xxhash` is installed, else its sha256."""
        if url in self.xxh3 and have_digest("xxh3_128"):
            return "xxh3_128", self.xxh3[url]
        return ("sha256", self.sha256[url]) if url in self.sha256 else None


def _from_manifest(path_or_url: str, text: bytes, val: bool = False) -> Shards:
    m = json.loads(text)
    part = m.get("val", {}) if val else m
    base = path_or_url.rsplit("/", 1)[0] if "/" in path_or_url else "."
    if val and part.get("folder"):
        base = f"{base}/{part['folder']}"
    entries = [(f"{base}/{e['name']}", e) for e in part.get("shards", [])]
    return Shards([u for u, _e in entries], {u: e["sha256"] for u, e in entries},
                  m.get("tokenizer", {}).get("vocab_size"), path_or_url,
                  {u: e["xxh3_128"] for u, e in entries if "xxh3_128" in e})


def _val_folder(manifest_path: str) -> str | None:
    try:
        return json.loads(Path(manifest_path).read_text()).get("val", {}).get("folder")
    except (OSError, ValueError):
        return None


def expand_source(spec: str, *, retries: int = 3, backoff: float = 0.5,
                  timeout: float = 30.0) -> Shards:
    """Expand one spec string into its shard list (see module doc). Raises when it is empty."""
    def manifest(url: str, val: bool = False) -> Shards:
        f = open_shard(url, retries=retries, backoff=backoff, timeout=timeout)
        try:  # in pieces: each read of an HTTP body is retried on its own
            return _from_manifest(url, b"".join(iter(f.read, b"")), val)
        finally:
            f.close()

    val = spec.endswith("#val")  # the validation shards of a manifest or prepared folder
    spec = spec.removesuffix("#val").removeprefix("file://")
    if spec.startswith("pipe:"):
        out = Shards(brace_expand(spec))
    elif _is_url(spec):
        out = manifest(spec, val) if spec.endswith(".json") else Shards(brace_expand(spec))
    elif os.path.isdir(spec) or spec.endswith(".json"):
        mpath = spec if spec.endswith(".json") else os.path.join(spec, "manifest.json")
        folder = spec.rstrip("/")
        parent = os.path.join(os.path.dirname(folder), "manifest.json")
        if os.path.exists(mpath):
            out = manifest(mpath, val)
        elif os.path.exists(parent) and _val_folder(parent) == os.path.basename(folder):
            out = manifest(parent, True)  # OUT/val of data.prepare: OUT/manifest.json lists it
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
                m = manifest(mpath)
                for mine, theirs in ((out.sha256, m.sha256), (out.xxh3, m.xxh3)):
                    by_name = {os.path.basename(u): d for u, d in theirs.items()}
                    mine.update({p: by_name[os.path.basename(p)] for p in paths
                                 if os.path.basename(p) in by_name})
                out.vocab_size, out.manifest = m.vocab_size, mpath
    if not out.urls:
        raise SourceError(f"source {spec!r} names no shards")
    return out


class _Pipe:
    """`webdataset.gopen` of a `pipe:` URL whose failure names the exit status: at the end
    of its output the command is waited for, and a non-zero status is a `ShardError`."""

    def __init__(self, url: str):
        from webdataset import gopen

        self.url, self.offset = url, 0
        self.pipe = gopen(url, "rb")

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.pipe.read(n)
            if not data:  # the end: a failing command must not look like a short shard
                self.pipe.close()
        except OSError:
            raise ShardError(self.url, self.offset, "pipe command exited with status "
                             f"{self.pipe.proc.wait()}") from None
        self.offset += len(data)
        return data

    def close(self) -> None:
        if self.pipe.proc.poll() is None:
            self.pipe.proc.kill()
        with contextlib.suppress(OSError):  # killed, or failed: reported, or not read to the end
            self.pipe.close()


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
        def attempt():
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
        return retry(self.url, attempt, self.retries, self.backoff, self.on_retry,
                     (OSError, http.client.HTTPException))

    def read(self, n: int = 1 << 20) -> bytes:
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
        return _Pipe(url)
    if _is_url(url):
        return _HttpStream(url, retries, backoff, timeout, on_retry)
    from webdataset import gopen

    return retry(url, lambda: gopen(url, "rb"), retries, backoff, on_retry)


def retry(url: str, opener, retries: int, backoff: float, on_retry,
          errors: tuple[type[Exception], ...] = (OSError,)):
    """`opener()`, retried with doubling backoff on `errors` (not on a missing file, which
    does not come back); SourceError naming `url` when every attempt failed."""
    delay = backoff
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return opener()
        except errors as e:
            last = e
            if isinstance(e, FileNotFoundError):
                break
            if attempt < retries:
                if on_retry is not None:
                    on_retry(url, e)
                time.sleep(delay)
                delay *= 2
    raise SourceError(f"cannot open {url} after {retries + 1} attempts: {last}")


def missing_local(spec: str) -> str | None:
    """The first local path of source `spec` that does not exist (a glob that matches
    nothing counts), else None. Remote sources (http(s), `pipe:`) are not checked here:
    they may come back, so they are retried when opened."""
    path = local_path(spec.removesuffix("#val"))  # None: remote
    for part in [] if path is None else brace_expand(path):
        if not (glob.glob(part) if glob.has_magic(part) else os.path.exists(part)):
            return part
    return None


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (plain path or `file://`), else None."""
    if url.startswith("pipe:") or _is_url(url):
        return None
    return url.removeprefix("file://")

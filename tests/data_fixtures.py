"""Shared, real inputs for the data tests: the standard library's own source files.

Everything is built once per test process (cached) under one temporary folder:
a small SentencePiece tokenizer, and tokenized shards of a few dozen stdlib files.
"""

from __future__ import annotations

import atexit
import functools
import glob
import hashlib
import http.server
import os
import shutil
import sysconfig
import tempfile
import threading

ROOT = tempfile.mkdtemp(prefix="xlstm-data-tests-")
atexit.register(shutil.rmtree, ROOT, True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_files(n: int, skip: int = 0) -> list[str]:
    """n real text files: top-level stdlib modules, sorted by name (same on every machine)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    files = [f for f in files if os.path.getsize(f) > 2000]
    assert len(files) >= n + skip, f"only {len(files)} stdlib files"
    return files[skip:skip + n]


@functools.cache
def tokenizer_dir() -> str:
    from data.tokenizer import train_tokenizer

    out = os.path.join(ROOT, "tok")
    train_tokenizer(stdlib_files(60), out, vocab_size=512, max_sentences=3000, seed=0,
                    progress=False)
    return out


@functools.cache
def shards_dir(files: int = 24, shard_tokens: int = 6000) -> str:
    """Paragraph documents of `files` stdlib modules, many small shards, plus a manifest."""
    from data.prepare import prepare

    out = os.path.join(ROOT, f"shards-{files}-{shard_tokens}")
    prepare(stdlib_files(files), tokenizer_dir(), out, text_mode="paragraph",
            shard_tokens=shard_tokens, progress=False)
    return out


def shard_paths(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "shard-*.tar")))


def samples_of(folder: str) -> dict[tuple[str, int], bytes]:
    """{(shard basename, sample index): sha256 of its token ids (as int64)} read with tarfile."""
    import tarfile

    import numpy as np

    out = {}
    for path in shard_paths(folder):
        with tarfile.open(path) as tf:
            names = [m for m in tf.getmembers() if m.name.endswith(".tokens.u16")]
            for i, m in enumerate(names):
                ids = np.frombuffer(tf.extractfile(m).read(), "<u2").astype(np.int64)
                out[(os.path.basename(path), i)] = hashlib.sha256(ids.tobytes()).digest()
    return out


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class HttpServer:
    """A real HTTP server on 127.0.0.1 serving `folder`, in a thread."""

    def __init__(self, folder: str):
        handler = functools.partial(QuietHandler, directory=folder)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves files with Range support; the first `drops` answers per file are cut off
    in the middle of the body (the connection is dropped)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = os.path.join(self.server.folder, self.path.lstrip("/"))
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        with self.server.lock:
            cut = self.server.drops.get(self.path, self.server.default_drops) > 0
            if cut:
                self.server.drops[self.path] = self.server.drops.get(
                    self.path, self.server.default_drops) - 1
                self.server.cuts += 1
        if cut:
            self.wfile.write(body[: int(len(body) * self.server.keep)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class FlakyHttpServer(HttpServer):
    """Like HttpServer, but every file's first `drops` responses break off after the
    fraction `keep` of their body."""

    def __init__(self, folder: str, drops: int = 1, keep: float = 0.5):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
        self.httpd.folder, self.httpd.drops, self.httpd.default_drops = folder, {}, drops
        self.httpd.lock, self.httpd.cuts, self.httpd.keep = threading.Lock(), 0, keep
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


def reassemble(batches) -> dict[tuple[str, int, int], list]:
    """From batches with `meta`, rebuild every document from the input positions.

    Returns {(shard basename, sample index, epoch, source): [(lo, hi, token ids)]},
    pieces sorted by lo.
    Rows overlap by one token, so each token of the stream is an *input* exactly
    once: only positions 0..S-1 of a row are taken.
    """
    docs: dict = {}
    for b in batches:
        ids = b["input_ids"].numpy()
        s = ids.shape[1]
        for r, row in enumerate(b["meta"]):
            for src, epoch, url, idx, lo, hi, at in row:
                n = min(hi - lo, s - at)
                if n > 0:
                    key = (os.path.basename(url), idx, epoch, src)
                    docs.setdefault(key, []).append((lo, lo + n, ids[r, at:at + n].copy()))
    for v in docs.values():
        v.sort(key=lambda x: x[0])
    return docs


def doc_hashes(docs: dict, eos: int = 2) -> tuple[dict, list]:
    """({(shard, index, epoch, source): sha256 of the document's ids}, [problems]).

    A document must come as pieces that tile it with no gap or overlap; its
    trailing EOS is dropped (the tokenizer never produces the EOS id itself).
    """
    import numpy as np

    out, problems = {}, []
    for key, parts in docs.items():
        at = 0
        for lo, hi, _toks in parts:
            if lo != at:
                problems.append((key, "gap or overlap", at, lo))
            at = hi
        ids = np.concatenate([t for _lo, _hi, t in parts]).astype(np.int64)
        if ids.size and ids[-1] == eos:
            ids = ids[:-1]
        out[key] = hashlib.sha256(ids.tobytes()).digest()
    return out, problems


def synthetic_shards(folder: str, shards: int = 6, docs: int = 10, seed: int = 0,
                     vocab_size: int = 1000) -> str:
    """Small shards of seeded random documents (4..200 ids each), written with `tarfile`
    (ustar, fixed metadata: the same bytes on every machine and with any writer of ours),
    and a `manifest.json` with their sha256; returns `folder`."""
    import io
    import json
    import tarfile

    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    entries = []
    for i in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for d in range(docs):
                ids = rng.integers(4, vocab_size, size=int(rng.integers(4, 200)), dtype="<u2")
                for name, data in ((f"{i:03d}{d:04d}.tokens.u16", ids.tobytes()),
                                   (f"{i:03d}{d:04d}.source.txt", f"synthetic {i} {d}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uname = info.gname = ""
                    tf.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        name = f"shard-{i:06d}.tar"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        entries.append({"name": name, "samples": docs, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"format": "xlstm-token-shards/1", "shards": entries,
                   "tokenizer": {"vocab_size": vocab_size}}, f, indent=1)
    return folder

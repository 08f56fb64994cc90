"""Shard writer: determinism, worker independence, restart after a kill, formats, bad input."""

from __future__ import annotations

import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from data_fixtures import REPO, stdlib_files, tokenizer_dir

from data import InputError, Tokenizer, prepare_shards
from data.readers import iter_documents
from data.tarshard import file_sha256


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(p) and p.endswith(".tar"):
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def _stable(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    m.pop("command")
    m.pop("summary")
    return m


def test_deterministic_and_independent_of_workers(tmp_path):
    files = stdlib_files(30)
    kw = dict(text_mode="paragraph", shard_tokens=20_000, val_fraction=0.1, progress=False)
    m1 = prepare_shards(files, tokenizer_dir(), str(tmp_path / "a"), workers=1, **kw)
    m2 = prepare_shards(files, tokenizer_dir(), str(tmp_path / "b"), workers=1, **kw)
    m3 = prepare_shards(files, tokenizer_dir(), str(tmp_path / "c"), workers=2, **kw)
    a = _files(str(tmp_path / "a"))
    assert len([k for k in a if k.startswith("val/")]) >= 1 and len(a) >= 5
    assert a == _files(str(tmp_path / "b")) == _files(str(tmp_path / "c"))
    assert _stable(m1) == _stable(m2) == _stable(m3)
    assert not glob.glob(str(tmp_path / "*" / "*.tmp"))
    # a rerun of a finished job verifies the shards and tokenizes nothing
    again = prepare_shards(files, tokenizer_dir(), str(tmp_path / "a"), workers=1, **kw)
    n = m1["totals"]["shards"] + m1["val"]["totals"]["shards"]
    assert again["summary"]["resumed_shards"] == n
    assert again["summary"]["tokenized_documents"] == 0
    assert _files(str(tmp_path / "a")) == a and _stable(again) == _stable(m1)


def test_manifest_matches_tokenizer_and_files(tmp_path):
    files = stdlib_files(12)
    out = str(tmp_path / "s")
    m = prepare_shards(files, tokenizer_dir(), out, text_mode="file", shard_tokens=30_000,
                       val_fraction=0.25, workers=2, progress=False)
    tok = Tokenizer.load(tokenizer_dir())
    texts = [t for t, _ in iter_documents(files, text_mode="file")]
    expect = sum(len(x) for x in tok.encode(texts))
    assert m["totals"]["tokens"] + m["val"]["totals"]["tokens"] == expect
    assert m["totals"]["samples"] + m["val"]["totals"]["samples"] == len(texts)
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["token_dtype"] == "uint16"
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk == json.loads(json.dumps(m))
    for part, folder in ((m, out), (m["val"], os.path.join(out, "val"))):
        for e in part["shards"]:
            path = os.path.join(folder, e["name"])
            assert os.path.getsize(path) == e["bytes"] and file_sha256(path) == e["sha256"]
            with tarfile.open(path) as tf:
                toks = [m_ for m_ in tf.getmembers() if m_.name.endswith(".tokens.u16")]
                srcs = [m_ for m_ in tf.getmembers() if m_.name.endswith(".source.txt")]
                assert len(toks) == len(srcs) == e["samples"]
                n = sum(len(np.frombuffer(tf.extractfile(t).read(), "<u2")) for t in toks)
                assert n == e["tokens"]
                assert tf.extractfile(srcs[0]).read().decode() in files
    # documents are in input order, keys are their global index
    first = os.path.join(out, m["shards"][0]["name"])
    with tarfile.open(first) as tf:
        keys = [n.split(".")[0] for n in tf.getnames()]
    assert keys == sorted(keys) and len(set(keys)) * 2 == len(keys)


@pytest.mark.slow
def test_killed_prepare_resumes_to_the_same_shards(tmp_path):
    files = stdlib_files(150)
    args = dict(text_mode="paragraph", shard_tokens=8_000, val_fraction=0.05)
    ref = str(tmp_path / "ref")
    prepare_shards(files, tokenizer_dir(), ref, progress=False, **args)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "data.prepare", "--input", *files, "--tokenizer",
           tokenizer_dir(), "--out", out, "--text-mode", "paragraph", "--shard-tokens", "8000",
           "--val-fraction", "0.05", "--quiet"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env)
    partial = os.path.join(out, "manifest.partial.json")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.load(open(partial))["shards"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "manifest.json")), "finished before the kill"
    done = json.load(open(partial))
    # nothing half-written under a final name: every shard there is a recorded, whole one
    recorded = {e["name"]: e["sha256"] for e in done["shards"]}
    for p in glob.glob(os.path.join(out, "shard-*.tar")):
        name = os.path.basename(p)
        if name in recorded:
            assert file_sha256(p) == recorded[name]
        else:  # written and renamed, killed before the partial manifest named it
            assert tarfile.open(p).getnames()
    # a damaged shard is not trusted: it is rewritten
    victim = os.path.join(out, done["shards"][1]["name"])
    with open(victim, "r+b") as f:
        f.seek(700)
        f.write(b"\xff\xff")
    m = prepare_shards(files, tokenizer_dir(), out, progress=False, **args)
    assert m["summary"]["resumed_shards"] >= 1
    assert m["summary"]["skipped_resumed"] >= 1
    assert _files(out) == _files(ref)
    assert not os.path.exists(partial)
    assert not glob.glob(os.path.join(out, "*.tmp"))


def _real_docs(n: int) -> list[str]:
    texts = []
    for f in stdlib_files(3):
        for block in open(f, encoding="utf-8").read().split("\n\n"):
            lines = [x for x in block.split("\n") if x.strip()]  # no blank line inside
            if lines:
                texts.append("\n".join(lines))
    return texts[:n]


def test_formats_jsonl_gzip_zstd_parquet_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = _real_docs(60)
    tok = Tokenizer.load(tokenizer_dir())
    expect = sum(len(x) for x in tok.encode(docs))
    lines = "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"body": docs}), str(tmp_path / "d.parquet"))
    (tmp_path / "e.txt").write_text("\n\n".join(docs))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"):
        m = prepare_shards([str(tmp_path / name)], tokenizer_dir(), str(tmp_path / f"o-{name}"),
                           text_field="body", progress=False)
        assert m["totals"]["samples"] == 60 and m["totals"]["tokens"] == expect, name
    m = prepare_shards([str(tmp_path / "e.txt")], tokenizer_dir(), str(tmp_path / "o-e"),
                       text_mode="paragraph", progress=False)
    assert m["totals"]["samples"] == 60 and m["totals"]["tokens"] == expect
    m = prepare_shards([str(tmp_path / "e.txt")], tokenizer_dir(), str(tmp_path / "o-f"),
                       text_mode="file", progress=False)
    assert m["totals"]["samples"] == 1
    src = [s for _t, s in iter_documents([str(tmp_path / "a.jsonl")], text_field="body")]
    assert src[2] == f"{tmp_path / 'a.jsonl'}:3"


def test_bad_input_named_or_skipped_and_counted(tmp_path):
    good = json.dumps({"text": "def ok():\n    pass\n"}) + "\n"
    p = tmp_path / "bad.jsonl"
    p.write_bytes((good + "{not json\n" + good + json.dumps({"other": 1}) + "\n").encode()
                  + b'{"text": "caf\xe9 is not UTF-8"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not JSON"):
        prepare_shards([str(p)], tokenizer_dir(), str(tmp_path / "o1"), progress=False)
    assert not glob.glob(str(tmp_path / "o1" / "*.tar*"))  # nothing half-done left behind
    m = prepare_shards([str(p)], tokenizer_dir(), str(tmp_path / "o2"), on_error="skip",
                       progress=False)
    s = m["summary"]
    assert (s["bad_lines"], s["missing_field"], s["non_utf8"]) == (1, 1, 1)
    assert m["totals"]["samples"] == 3
    # field missing -> named error without skip
    q = tmp_path / "nofield.jsonl"
    q.write_text(good + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(InputError, match=r"nofield\.jsonl:2: no string field 'text'"):
        prepare_shards([str(q)], tokenizer_dir(), str(tmp_path / "o3"), progress=False)
    # unreadable (corrupt gzip) file, named; skipped and counted with skip
    z = tmp_path / "broken.jsonl.gz"
    z.write_bytes(b"this is not gzip at all")
    with pytest.raises(InputError, match=r"broken\.jsonl\.gz: cannot read"):
        prepare_shards([str(z)], tokenizer_dir(), str(tmp_path / "o4"), progress=False)
    m = prepare_shards([str(z), str(p)], tokenizer_dir(), str(tmp_path / "o5"),
                       on_error="skip", progress=False)
    assert m["summary"]["unreadable_files"] == 1
    with pytest.raises(InputError, match="missing.txt: cannot read"):
        prepare_shards([str(tmp_path / "missing.txt")], tokenizer_dir(), str(tmp_path / "o6"),
                       progress=False)
    # empty input is an error, never an empty shard set
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty input"):
        prepare_shards([str(tmp_path / "empty.txt")], tokenizer_dir(), str(tmp_path / "o7"),
                       progress=False)
    with pytest.raises(ValueError, match="no input files"):
        prepare_shards([str(tmp_path / "nothing-*.jsonl")], tokenizer_dir(),
                       str(tmp_path / "o8"), progress=False)


def test_demo_corpus_from_stdlib(tmp_path):
    from data import make_demo_corpus

    t0 = time.time()
    tok_dir, shards = make_demo_corpus(str(tmp_path / "demo"), max_files=60,
                                       shard_tokens=50_000, progress=False)
    assert time.time() - t0 < 60
    m = json.load(open(os.path.join(shards, "manifest.json")))
    assert m["totals"]["shards"] >= 4 and "val" in m
    assert Tokenizer.load(tok_dir).sha256 == m["tokenizer"]["sha256"]


def _run(cmd: list[str], env: dict, terminal: bool) -> tuple[int, str]:
    """Run cmd with stderr (and stdout) on a pipe, or on a pseudo-terminal; its output."""
    if not terminal:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        return r.returncode, r.stdout + r.stderr
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    # a terminal of 24 x 100 characters (a fresh pty has size 0 x 0: an empty bar)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=180), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("tool", ["prepare", "tokenizer"])
def test_progress_bars_on_a_terminal_only(tmp_path, tool):
    files = stdlib_files(4)
    if tool == "prepare":
        cmd = [sys.executable, "-m", "data.prepare", "--input", *files, "--tokenizer",
               tokenizer_dir(), "--out", str(tmp_path / "out"), "--text-mode", "paragraph"]
        summary = "prepare: "
    else:
        cmd = [sys.executable, "-m", "data.tokenizer", "train", "--input", *files,
               "--vocab-size", "420", "--max-sentences", "300", "--out", str(tmp_path / "tok")]
        summary = "trained bpe vocab"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TQDM_DISABLE")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    bar = "file/s"  # the rate tqdm shows on the files bar
    rc, term = _run(cmd, env, terminal=True)
    assert rc == 0, term
    assert bar in term and "\r" in term and summary in term  # a person sees the bars
    for e, terminal in (({}, False), ({"CI": "true"}, False), ({"CI": "true"}, True)):
        rc, out = _run(cmd, {**env, **e}, terminal)
        assert rc == 0, out
        # a log (a pipe, or CI even on a terminal) gets the summary and no bar
        assert summary in out
        assert bar not in out and "\r" not in out.replace("\r\n", "\n"), (e, terminal, out)


def test_webdataset_text_shards_as_input(tmp_path):
    """Existing WebDataset shards of text (.txt members, .json ones with a text field), as
    a local brace list, `pipe:` commands and http URLs: the same documents, in order."""
    import webdataset as wds
    from data_fixtures import HttpServer

    from data.tarshard import map_shard

    texts = [open(f, encoding="utf-8").read() for f in stdlib_files(6)]
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(3):
        with wds.TarWriter(str(folder / f"text-{i:04d}.tar")) as w:
            w.write({"__key__": f"doc{i}a", "txt": texts[2 * i]})
            w.write({"__key__": f"doc{i}b", "json": {"text": texts[2 * i + 1], "id": i}})
    braces = "text-{0000..0002}.tar"
    tok = Tokenizer.load(tokenizer_dir())

    def documents(spec: str, name: str) -> list[str]:
        out = str(tmp_path / name)
        m = prepare_shards([spec], tokenizer_dir(), out, progress=False)
        assert m["summary"]["files"] == 3 and m["summary"]["documents"] == 6
        docs = []
        for e in m["shards"]:
            sh = map_shard(os.path.join(out, e["name"]), digest=("sha256", e["sha256"]))
            docs += [tok.decode(sh.tokens(i)) for i in range(sh.n)]
        return docs

    assert documents(f"{folder}/{braces}", "local") == texts
    assert documents(f"pipe:cat {folder}/{braces}", "pipe") == texts
    with HttpServer(str(folder)) as srv:
        assert documents(f"{srv.url}/{braces}", "http") == texts
    # a sample without text is named (or skipped and counted); a failing command too
    with wds.TarWriter(str(folder / "text-0003.tar")) as w:
        w.write({"__key__": "empty", "cls": 3})
    with pytest.raises(InputError, match=r"text-0003.tar:empty: no .txt or .json member"):
        prepare_shards([f"{folder}/text-{{0000..0003}}.tar"], tokenizer_dir(),
                       str(tmp_path / "bad"), progress=False)
    m = prepare_shards([f"{folder}/text-{{0000..0003}}.tar"], tokenizer_dir(),
                       str(tmp_path / "skip"), on_error="skip", progress=False)
    assert m["summary"]["missing_field"] == 1 and m["summary"]["documents"] == 6
    with pytest.raises(InputError, match="exited with status"):
        prepare_shards([f"pipe:cat {folder}/missing.tar"], tokenizer_dir(),
                       str(tmp_path / "gone"), progress=False)

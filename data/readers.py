"""Reading raw documents: plain text, JSONL (plain, gzip, zstd), parquet, and
WebDataset tar shards of text (any `.tar` path, `pipe:` or http(s) URL, opened as the
loader opens shards; per sample its `.txt` member, else the text field of its `.json`).

Every reader yields `(text, source)` in a deterministic order, `source` naming the file
and line (or row). Problems are counted in a `ReadStats` and raised (`on_error="raise"`:
`InputError` naming file and line) or skipped. Bytes that are not UTF-8 are replaced
(U+FFFD) and counted.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

TEXT_MODES = ("file", "paragraph", "line")


class InputError(RuntimeError):
    """Bad input that the caller asked not to skip (names file and line)."""


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    unreadable_files: int = 0
    bad_lines: int = 0
    missing_field: int = 0
    non_utf8: int = 0
    empty_documents: int = 0

    def problems(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k not in ("files", "documents", "bytes") and v}


def progress_bar(enabled: bool = True, **kw):
    """A `tqdm` bar on stderr for a person who waits: shown only on a terminal (tqdm's
    `disable=None`), never when `enabled` is False or under CI (`CI` set and not
    false), so logs get no carriage-return noise. `kw` goes to `tqdm` (total, unit...)."""
    from tqdm import tqdm

    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return tqdm(file=sys.stderr, disable=True if (ci or not enabled) else None,
                dynamic_ncols=True, **kw)


def expand_inputs(patterns: list[str] | str) -> list[str]:
    """Expand globs (`**` recursive), folders and brace lists into a sorted,
    de-duplicated list of files and URLs; ValueError when it is empty."""
    from .sources import brace_expand, local_path

    out: set[str] = set()
    specs = [patterns] if isinstance(patterns, str) else patterns
    for pat in (p for spec in specs for p in brace_expand(spec)):
        if local_path(pat) is None:  # pipe: or http(s)
            out.add(pat)
        elif os.path.isdir(pat):
            for root, _dirs, files in os.walk(pat):
                out.update(os.path.join(root, f) for f in files)
        elif glob.has_magic(pat):
            out.update(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
        else:
            out.add(pat)  # a missing plain path is reported when it is opened
    if not out:
        raise ValueError(f"no input files match {patterns!r}")
    return sorted(out)


def _kind(path: str) -> tuple[str, str]:
    """(compression, format) from the file name."""
    name = path.lower()
    if path.startswith(("pipe:", "http://", "https://")):
        return "", "wds"
    comp = ""
    for ext, c in ((".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd")):
        if name.endswith(ext):
            comp, name = c, name[: -len(ext)]
            break
    if name.endswith(".tar"):  # tarfile reads a compressed one itself
        return "", "wds"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return comp, "jsonl"
    if name.endswith(".parquet"):
        return comp, "parquet"
    return comp, "text"


def _open_binary(path: str, comp: str):
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the wrapper
    if comp == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if comp == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def _decode(data: bytes, stats: ReadStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.non_utf8 += 1
        return data.decode("utf-8", errors="replace")


def _fail(msg: str, on_error: str, stats: ReadStats, counter: str) -> None:
    setattr(stats, counter, getattr(stats, counter) + 1)
    if on_error != "skip":
        raise InputError(msg)


def iter_documents(paths: list[str], *, text_field: str = "text", text_mode: str = "file",
                   on_error: str = "raise", stats: ReadStats | None = None
                   ) -> Iterator[tuple[str, str]]:
    """Yield `(text, source)` for every document of `paths`, in order.

    text_mode applies to plain text files: `file` (one document per file),
    `paragraph` (blocks separated by blank lines) or `line` (one per line).
    Empty documents are dropped and counted.
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        comp, fmt = _kind(path)
        try:
            fh = _open_binary(path, comp) if fmt in ("jsonl", "text") else None
        except OSError as e:
            _fail(f"{path}: cannot read: {e}", on_error, stats, "unreadable_files")
            continue
        stats.files += 1
        try:
            if fmt == "parquet":
                gen = _iter_parquet(path, text_field, on_error, stats)
            elif fmt == "wds":
                gen = _iter_wds(path, text_field, on_error, stats)
            elif fmt == "jsonl":
                gen = _iter_jsonl(fh, path, text_field, on_error, stats)
            else:
                gen = _iter_text(fh, path, text_mode, stats)
            for text, source in gen:
                if not text or not text.strip():
                    stats.empty_documents += 1
                    continue
                stats.documents += 1
                yield text, source
        except (OSError, EOFError) as e:  # e.g. a corrupt gzip stream
            _fail(f"{path}: cannot read: {e}", on_error, stats, "unreadable_files")
        finally:
            if fh is not None:
                fh.close()


def _json_text(text: str, where: str, field, on_error, stats) -> str | None:
    """The string `field` of a JSON object, or None (failed: raised or counted)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(f"{where}: not JSON: {e.msg}", on_error, stats, "bad_lines")
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        _fail(f"{where}: no string field {field!r}", on_error, stats, "missing_field")
        return None
    return obj[field]


def _iter_jsonl(fh, path, field, on_error, stats):
    lines = fh if hasattr(fh, "peek") else io.BufferedReader(fh, 1 << 20)
    for lineno, raw in enumerate(lines, start=1):
        stats.bytes += len(raw)
        if raw.strip():
            text = _json_text(_decode(raw, stats), f"{path}:{lineno}", field, on_error, stats)
            if text is not None:
                yield text, f"{path}:{lineno}"


def _iter_wds(url, field, on_error, stats):
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_expander

    from .sources import SourceError, open_shard
    from .tarshard import ShardError

    try:
        stream = open_shard(url)
    except SourceError as e:
        raise OSError(str(e)) from e
    try:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            where = f"{url}:{sample['__key__']}"
            raw = sample.get("txt", sample.get("json"))
            if raw is None:
                _fail(f"{where}: no .txt or .json member", on_error, stats, "missing_field")
                continue
            stats.bytes += len(raw)
            text = _decode(raw, stats)
            if "txt" not in sample:
                text = _json_text(text, where, field, on_error, stats)
            if text is not None:
                yield text, where
    except (tarfile.TarError, ValueError, ShardError) as e:  # not a tar, cut, failed pipe
        raise OSError(f"not a readable tar shard: {e}") from e
    finally:
        stream.close()


def _iter_text(fh, path, mode, stats):
    data = fh.read()
    stats.bytes += len(data)
    text = _decode(data, stats)
    if mode == "file":
        yield text, path
        return
    lines = text.split("\n")
    if mode == "line":
        for i, line in enumerate(lines, start=1):
            yield line, f"{path}:{i}"
        return
    for text, run in itertools.groupby(enumerate(lines, start=1), lambda x: bool(x[1].strip())):
        if text:  # a block of non-blank lines, named by its first
            run = list(run)
            yield "\n".join(line for _i, line in run), f"{path}:{run[0][0]}"


def _iter_parquet(path, field, on_error, stats):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types
        _fail(f"{path}: cannot read parquet: {e}", on_error, stats, "unreadable_files")
        return
    if field not in pf.schema_arrow.names:
        _fail(f"{path}: parquet has no column {field!r}", on_error, stats, "missing_field")
        return
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                _fail(f"{path}:row {row}: {field!r} is not a string", on_error, stats,
                      "missing_field")
                continue
            stats.bytes += len(value)
            yield value, f"{path}:row{row}"

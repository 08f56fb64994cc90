"""MLflow tracking for the trainer: rank 0 only, never blocks or kills training.

One class, :class:`Tracker`. ``Tracker.create(rank=...)`` gives rank 0 a live tracker and
every other rank a no-op one with the same methods, so the trainer never branches.

What the live tracker does
--------------------------
* **Store.** ``uri`` (or ``MLFLOW_TRACKING_URI``) names a tracking server or store. With
  neither, a local SQLite store ``<run_dir>/mlflow.db`` with artifacts under
  ``<run_dir>/mlartifacts`` is used: it needs no server (``mlflow ui --backend-store-uri
  sqlite:///<run_dir>/mlflow.db`` shows it). MLflow 3.x refuses the old ``./mlruns`` file
  store unless ``MLFLOW_ALLOW_FILE_STORE=true``; it is only the fallback when SQLAlchemy is
  not installed (``mlflow-skinny`` alone), and then that variable is set for this process.
* **metrics.jsonl.** Every :meth:`Tracker.log_metrics` call appends one JSON line
  ``{"step": N, ...}`` to ``<run_dir>/metrics.jsonl`` synchronously and flushed, whatever
  MLflow does. Non-finite values are written as ``null`` (strict JSON).
* **Background I/O.** All MLflow calls run on one daemon thread fed by a queue. Metrics go
  out batched with ``log_batch`` (at most every ``flush_interval`` seconds). MLflow's HTTP
  client is made to fail fast (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``,
  ``MLFLOW_HTTP_REQUEST_TIMEOUT=10`` unless already set); the thread retries itself with
  exponential backoff (``min_backoff`` .. ``max_backoff``).
* **Outages.** A server unreachable at start or lost mid-run costs one warning per outage
  (and one line when it is back), never an exception: points stay buffered in order and
  are sent when it returns. At :meth:`Tracker.close` whatever could not be sent (metrics,
  params, tags, artifacts) is written to ``<run_dir>/mlflow_pending.json`` and sent by the
  next tracker created for the same run. Close does not wait out an outage: one try if
  the server is already known to be away, else up to three quick tries (all within the
  close timeout), then the pending file. A forked child never closes the parent's run.
* **Run record.** The run id is written to ``<run_dir>/mlflow_run.json`` once the run
  exists. A resume (``resume_step`` given) without a ``run_id`` (the checkpoint was written
  before the server ever answered) continues the recorded run when the store is the same.
* **Resume, nothing logged twice.** ``run_id`` given: that run is continued and set back
  to RUNNING. With ``resume_step``:

  - ``metrics.jsonl`` lines with ``step > resume_step`` (and a torn last line) are dropped,
    rewritten atomically (temp file + ``os.replace``);
  - when the run is attached, the run's latest metric per key is read once (MLflow keeps
    the latest point per key by step, so this is the per-key max step already stored, one
    ``get_run`` call). That step is a per-key *watermark*: a point is only sent when its
    step is above the watermark, which then moves up. Steps the killed run logged after
    its checkpoint are recomputed identically by the resumed run and are not sent again;
  - points of ``metrics.jsonl`` (up to ``resume_step``) that the run does not have yet,
    e.g. buffered when the previous process was SIGKILLed, are back-filled (with the
    pending file's points first, which keep their original timestamps).

  Consequence: one value per (metric key, step), steps increasing per key; a second value
  for a step a key already has is not sent.
* **Params.** Nested dicts are flattened with dots; values longer than MLflow's limit
  (6000 characters) are truncated; keys are made valid. On resume the run's params are read
  first: identical values are skipped, a changed value (MLflow refuses to change a param)
  is skipped with one warning naming the keys.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import os
import queue as queue_mod
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "flatten_params"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PENDING_FILE = "mlflow_pending.json"
RUN_RECORD_FILE = "mlflow_run.json"
LOCAL_DB_FILE = "mlflow.db"
LOCAL_ARTIFACT_DIR = "mlartifacts"
LOCAL_FILE_STORE_DIR = "mlruns"

# MLflow's limits (mlflow.utils.validation); fixed here so the no-op path imports nothing.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ARTIFACT_TRIES = 8
CLOSE_TRIES = 3

# error codes that mean "this request is wrong", not "the server is away": never retried
_PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "BAD_REQUEST",
        "INVALID_REQUEST",
        "MALFORMED_REQUEST",
    }
)

_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def _clean_key(key: Any) -> str:
    """A key MLflow accepts: allowed characters only, no empty/'.'/'..' path parts."""
    k = _BAD_KEY_CHARS.sub("_", str(key)).strip()
    parts = [("__" if p == ".." else p) for p in k.split("/") if p not in ("", ".")]
    return ("/".join(parts) or "_")[:MAX_KEY_LENGTH]


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return json.dumps(list(value), default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping to ``{"a.b.c": "value"}`` with string values.

    Lists and tuples become one JSON value; an empty nested mapping becomes ``"{}"``.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_params(value, prefix=f"{name}."))
            else:
                out[name] = "{}"
        else:
            out[name] = _param_value(value)
    return out


def _to_float(value: Any) -> float:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    return float(value)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _truncate_metrics_file(path: Path, resume_step: int) -> None:
    """Drop lines with step > resume_step (and unparsable ones) atomically."""
    if not path.exists():
        return
    kept: list[str] = []
    changed = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                changed = True
                continue
            if step > resume_step or not line.endswith("\n"):
                changed = True
                continue
            kept.append(line)
    if changed:
        _atomic_write_text(path, "".join(kept))


def _read_metrics_file(path: Path, max_step: int | None) -> list[tuple[str, float, int, int]]:
    """(key, value, timestamp_ms, step) of every finite value in metrics.jsonl."""
    points: list[tuple[str, float, int, int]] = []
    if not path.exists():
        return points
    now = int(time.time() * 1000)
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                step = int(row.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if max_step is not None and step > max_step:
                continue
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    points.append((_clean_key(key), float(value), now, step))
    return points


class Tracker:
    """Experiment tracking for the trainer. This base class is the no-op tracker.

    Use :meth:`create`: rank 0 gets a live MLflow tracker, other ranks this no-op one, with
    the same methods, so callers never branch on the rank.
    """

    run_id: str | None = None

    @classmethod
    def create(
        cls,
        *,
        rank: int,
        run_dir: str | Path,
        uri: str | None,
        experiment: str,
        run_name: str | None,
        run_id: str | None = None,
        resume_step: int | None = None,
        tags: dict[str, str] | None = None,
        flush_interval: float = 2.0,
        min_backoff: float = 1.0,
        max_backoff: float = 30.0,
        start_wait: float = 15.0,
        max_buffered_points: int = 1_000_000,
    ) -> Tracker:
        """A live tracker on rank 0, a no-op one elsewhere.

        Args:
            rank: global rank of this process.
            run_dir: the run folder (``metrics.jsonl``, pending file, local store go here).
            uri: tracking URI; None means ``MLFLOW_TRACKING_URI`` or else a local store.
            experiment: experiment name (created if missing).
            run_name: display name of a new run.
            run_id: continue this MLflow run (resume).
            resume_step: step of the checkpoint resumed from; later steps are dropped from
                ``metrics.jsonl`` and not sent again.
            tags: run tags (git commit, world size, backend, ...).
            flush_interval: seconds between metric batches.
            min_backoff: first retry delay after a failure, seconds.
            max_backoff: largest retry delay, seconds.
            start_wait: how long ``create`` waits for the run to exist (so ``run_id`` is set
                at once when the store answers); it never fails because of it.
            max_buffered_points: bound on metric points held during an outage; beyond it
                new points only go to ``metrics.jsonl`` (and are back-filled on resume).
        """
        if rank != 0:
            return Tracker()
        return _LiveTracker(
            run_dir=Path(run_dir),
            uri=uri,
            experiment=experiment,
            run_name=run_name,
            run_id=run_id,
            resume_step=resume_step,
            tags=tags or {},
            flush_interval=flush_interval,
            min_backoff=min_backoff,
            max_backoff=max_backoff,
            start_wait=start_wait,
            max_buffered_points=max_buffered_points,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (a nested mapping is flattened with dots)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log metric values for a step; never blocks on MLflow, never raises."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder as run artifacts."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything logged so far is sent; True if it was."""
        return True

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Send what can be sent within ``timeout``, end the run with ``status``."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")


class _Retryable(Exception):
    """The store did not answer; try again later."""


class _FlushRequest:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False


def _is_permanent(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in _PERMANENT_ERRORS


class _LiveTracker(Tracker):
    """Rank 0's tracker: see the module docstring."""

    def __init__(
        self,
        *,
        run_dir: Path,
        uri: str | None,
        experiment: str,
        run_name: str | None,
        run_id: str | None,
        resume_step: int | None,
        tags: dict[str, str],
        flush_interval: float,
        min_backoff: float,
        max_backoff: float,
        start_wait: float,
        max_buffered_points: int,
    ) -> None:
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self._local = self._resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.resume_step = resume_step
        self._flush_interval = flush_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._max_points = max_buffered_points
        self._t0_ms = int(time.time() * 1000)
        self._pid = os.getpid()  # a forked child (data workers) must not close the run

        # state shared with the worker thread (buffers are guarded by _lock)
        self._lock = threading.Lock()
        self._queue: queue_mod.Queue = queue_mod.Queue()
        self._points: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[tuple[str, str | None]] = []
        self._watermark: dict[str, int] = {}
        self._existing_params: dict[str, str] = {}
        self._prefix_points: list[tuple[str, float, int, int]] = []
        self._pending_loaded = False
        self._attached = False
        self._abandoned = False
        self._finished = False
        self._down_since: float | None = None
        self._first_attempt = threading.Event()
        self._closed = False
        self._client: Any = None
        self._warned: set[str] = set()
        self._artifact_failures: dict[str, int] = {}
        self.run_id = None

        self._metrics_path = self.run_dir / METRICS_FILE
        self._pending_path = self.run_dir / PENDING_FILE
        self._record_path = self.run_dir / RUN_RECORD_FILE
        self._target_run_id = run_id
        if run_id is None and resume_step is not None:
            self._target_run_id = self._recorded_run_id()
        if resume_step is not None:
            try:
                _truncate_metrics_file(self._metrics_path, resume_step)
            except OSError as e:
                self._warn_once("jsonl-trunc", "could not truncate %s: %s", self._metrics_path, e)
        self._load_pending()
        self.run_id = self._target_run_id  # a resumed run exists even if the store is away
        self._tags.update({_clean_key(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()})
        try:
            self._jsonl = open(self._metrics_path, "a", encoding="utf-8")
        except OSError as e:
            self._jsonl = None
            self._warn_once("jsonl-open", "cannot open %s: %s", self._metrics_path, e)

        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        self._first_attempt.wait(start_wait)

    # ------------------------------------------------------------------ setup helpers

    def _resolve_uri(self, uri: str | None) -> tuple[str, bool]:
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        if uri:
            return uri, False
        try:
            import alembic  # noqa: F401  (the SQL store needs both; mlflow-skinny has neither)
            import sqlalchemy  # noqa: F401

            db = (self.run_dir / LOCAL_DB_FILE).resolve()
            return f"sqlite:///{db}", True
        except ImportError:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            return (self.run_dir / LOCAL_FILE_STORE_DIR).resolve().as_uri(), True

    def _recorded_run_id(self) -> str | None:
        try:
            rec = json.loads(self._record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if rec.get("uri") == self.uri and rec.get("run_id"):
            return str(rec["run_id"])
        return None

    def _load_pending(self) -> None:
        try:
            data = json.loads(self._pending_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self._warn_once("pending-read", "ignoring unreadable %s: %s", self._pending_path, e)
            return
        pend_run = data.get("run_id")
        resuming = self.resume_step is not None or self._target_run_id is not None
        same_run = pend_run is None or self._target_run_id in (None, pend_run)
        if data.get("uri") != self.uri or not resuming or not same_run:
            # not ours to send (another store, another run, or a fresh start): set aside
            stale = self._pending_path.with_name(f"mlflow_pending.stale-{int(time.time())}.json")
            log.warning("tracking: %s (run %s at %s) is not for this run; moved to %s",
                        self._pending_path, pend_run, data.get("uri"), stale.name)
            try:
                os.replace(self._pending_path, stale)
            except OSError:
                pass
            return
        if self._target_run_id is None:
            self._target_run_id = pend_run
        pts = [
            (str(k), float(v), int(ts), int(s))
            for k, v, ts, s in data.get("metrics", [])
            if self.resume_step is None or int(s) <= self.resume_step
        ]
        self._prefix_points = pts
        self._params.update(data.get("params", {}))
        self._tags.update(data.get("tags", {}))
        self._artifacts.extend((p, a) for p, a in data.get("artifacts", []))
        self._pending_loaded = True

    def _warn_once(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("tracking: " + msg, *args)

    # ------------------------------------------------------------------ public API

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Queue parameters (flattened, values cut to MLflow's length limit)."""
        if self._closed:
            return
        try:
            flat = {}
            for k, v in flatten_params(params).items():
                if len(v) > MAX_PARAM_VAL_LENGTH:
                    self._warn_once(f"long-{k}", "param %s is %d chars, truncated to %d",
                                    k, len(v), MAX_PARAM_VAL_LENGTH)
                    v = v[:MAX_PARAM_VAL_LENGTH]
                flat[_clean_key(k)] = v
            self._queue.put(("params", flat))
        except Exception as e:  # noqa: BLE001 - tracking never kills the run
            self._warn_once("params", "log_params failed: %r", e)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append a metrics.jsonl line (flushed) and queue the points for MLflow."""
        if self._closed:
            return
        try:
            step = int(step)
            values: dict[str, float] = {}
            for k, v in metrics.items():
                if k == "step":
                    self._warn_once("step-key", "metric named 'step' ignored")
                    continue
                try:
                    values[str(k)] = _to_float(v)
                except (TypeError, ValueError):
                    self._warn_once(f"nonfloat-{k}", "metric %s=%r is not a number; dropped", k, v)
            ts = int(time.time() * 1000)
            if self._jsonl is not None:
                row = {"step": step}
                row.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
                try:
                    self._jsonl.write(json.dumps(row) + "\n")
                    self._jsonl.flush()
                except (OSError, ValueError) as e:
                    self._warn_once("jsonl-write", "cannot write %s: %s", self._metrics_path, e)
            self._queue.put(("metrics", step, values, ts))
        except Exception as e:  # noqa: BLE001
            self._warn_once("metrics", "log_metrics failed: %r", e)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or folder for upload (it is read when sent, so keep it in place)."""
        if self._closed:
            return
        self._queue.put(("artifact", str(Path(path).resolve()), artifact_path))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue run tags."""
        if self._closed:
            return
        clean = {_clean_key(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}
        self._queue.put(("tags", clean))

    def flush(self, timeout: float = 10.0) -> bool:
        """Ask the worker to send now, wait up to ``timeout``; True if all was sent."""
        if self._closed or not self._thread.is_alive():
            return False
        req = _FlushRequest()
        self._queue.put(("flush", req))
        return req.event.wait(timeout) and req.ok

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Flush what can be flushed in ``timeout`` seconds, end the run, keep the rest.

        ``status`` is FINISHED, FAILED or KILLED. Unsent items go to the pending file.
        """
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        if self._jsonl is not None:
            try:
                self._jsonl.flush()
                os.fsync(self._jsonl.fileno())
                self._jsonl.close()
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + max(0.0, timeout)
        self._queue.put(("close", status, deadline))
        self._thread.join(max(0.0, timeout) + 1.0)
        if not self._finished:  # stuck in a request (or died): keep what is not sent
            with self._lock:
                self._abandoned = True
                self._drain_nowait()
                self._write_pending()
            log.warning("tracking: close did not complete in %.0fs; unsent data kept in %s",
                        timeout, self._pending_path)

    def _atexit(self) -> None:
        self.close("FAILED", timeout=5.0)

    # ------------------------------------------------------------------ worker thread

    def _has_work(self) -> bool:
        return bool(not self._attached or self._points or self._params or self._tags
                    or self._artifacts)

    def _take(self, item: tuple) -> None:
        """Move one queue item into the buffers (caller holds the lock)."""
        kind = item[0]
        if kind == "metrics":
            _, step, values, ts = item
            if len(self._points) + len(values) > self._max_points:
                self._warn_once("overflow", "more than %d points buffered; newer ones only in "
                                "metrics.jsonl until resume", self._max_points)
                return
            self._points.extend((_clean_key(k), v, ts, step) for k, v in values.items())
        elif kind == "params":
            self._params.update(item[1])
        elif kind == "tags":
            self._tags.update(item[1])
        elif kind == "artifact":
            self._artifacts.append((item[1], item[2]))

    def _drain_nowait(self) -> list[tuple]:
        """Buffer everything queued; return control items (flush/close)."""
        control = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue_mod.Empty:
                return control
            if item[0] in ("flush", "close"):
                control.append(item)
            else:
                self._take(item)

    def _worker(self) -> None:
        backoff = self._min_backoff
        next_try = 0.0
        flushes: list[_FlushRequest] = []
        close_req = None
        try:
            while close_req is None:
                now = time.monotonic()
                wait = max(0.0, next_try - now) if (self._has_work() or flushes) else None
                try:
                    item = self._queue.get(timeout=wait) if wait != 0.0 else None
                except queue_mod.Empty:
                    item = None
                with self._lock:
                    control = []
                    if item is not None:  # first, to keep the queue's order
                        if item[0] in ("flush", "close"):
                            control.append(item)
                        else:
                            self._take(item)
                    control.extend(self._drain_nowait())
                for c in control:
                    if c[0] == "flush":
                        flushes.append(c[1])
                        next_try = 0.0
                    else:
                        close_req = c
                if close_req is not None:
                    break
                if time.monotonic() < next_try or not (self._has_work() or flushes):
                    continue
                ok = self._attempt(deadline=None)
                self._first_attempt.set()
                if ok:
                    backoff = self._min_backoff
                    next_try = time.monotonic() + self._flush_interval
                    if self._pending_loaded and not self._has_work():
                        self._pending_loaded = False  # its content is sent now
                        try:
                            self._pending_path.unlink()
                        except OSError:
                            pass
                else:
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2.0, self._max_backoff)
                if flushes and (not ok or not self._has_work()):
                    for f in flushes:
                        f.ok = ok
                        f.event.set()
                    flushes = []
            self._finish(close_req[1], close_req[2], flushes)
        except Exception as e:  # noqa: BLE001 - last resort: the thread must not die silently
            log.warning("tracking: worker stopped on an unexpected error: %r", e, exc_info=True)
            with self._lock:
                if not self._abandoned:
                    self._write_pending()
        finally:
            self._first_attempt.set()
            for f in flushes:
                f.event.set()

    def _finish(self, status: str, deadline: float, flushes: list[_FlushRequest]) -> None:
        """Close-time flush: send until done or the deadline; do not wait out an outage
        (one try if the store was already away, else CLOSE_TRIES with a short backoff)."""
        tries = 1 if self._down_since is not None else CLOSE_TRIES
        backoff = 0.25
        ok = False
        for i in range(tries):
            ok = self._attempt(deadline=deadline)
            if (ok and not self._has_work()) or self._abandoned or i == tries - 1:
                break
            if not ok:
                if time.monotonic() + backoff >= deadline:
                    break
                time.sleep(backoff)
                backoff *= 2.0
        for f in flushes:
            f.ok = ok and not self._has_work()
            f.event.set()
        if self._abandoned:
            return
        if ok and self._attached:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as e:  # noqa: BLE001
                log.warning("tracking: could not end run %s as %s: %s", self.run_id, status, e)
        with self._lock:
            if self._abandoned:
                return
            if self._has_work():
                self._write_pending()
                n = len(self._points)
                log.warning("tracking: %d metric points (and any params/artifacts) not sent; "
                            "kept in %s for the next tracker of this run", n, self._pending_path)
            elif self._pending_path.exists():
                try:
                    self._pending_path.unlink()
                except OSError:
                    pass
            self._finished = True

    def _write_pending(self) -> None:
        """Write unsent items (caller holds the lock)."""
        points = list(self._prefix_points) + list(self._points)
        if not (points or self._params or self._tags or self._artifacts):
            return
        data = {
            "version": 1,
            "uri": self.uri,
            "run_id": self.run_id or self._target_run_id,
            "metrics": [list(p) for p in points],
            "params": self._params,
            "tags": self._tags,
            "artifacts": [list(a) for a in self._artifacts],
        }
        try:
            _atomic_write_text(self._pending_path, json.dumps(data))
        except OSError as e:
            log.warning("tracking: cannot write %s: %s", self._pending_path, e)

    def _attempt(self, deadline: float | None) -> bool:
        """One round: attach the run, send tags, params, metrics, artifacts. True if ok."""
        try:
            if not self._attached:
                self._attach()
            self._send_tags()
            self._send_params()
            self._send_metrics(deadline)
            self._send_artifacts(deadline)
        except Exception as e:  # noqa: BLE001 - _Retryable, or an error we did not expect
            if not isinstance(e, _Retryable):
                self._warn_once(f"unexpected-{type(e).__name__}",
                                "unexpected MLflow error (will retry): %r", e)
            if self._down_since is None:
                self._down_since = time.monotonic()
                with self._lock:
                    n = len(self._points)
                log.warning("tracking: MLflow at %s unreachable (%s); buffering (%d points so "
                            "far, all also in %s) and retrying in the background",
                            self.uri, e, n, self._metrics_path)
            return False
        if self._down_since is not None:
            log.warning("tracking: MLflow at %s reachable again after %.0fs; buffered data sent",
                        self.uri, time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the client; store-unreachable errors become _Retryable."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if _is_permanent(e):
                raise
            raise _Retryable(str(e).splitlines()[0][:300] if str(e) else repr(e)) from e

    def _attach(self) -> None:
        from mlflow.entities import LifecycleStage
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = self._call(MlflowClient, tracking_uri=self.uri)
        client = self._client
        run = None
        if self._target_run_id is not None:
            try:
                run = self._call(client.get_run, self._target_run_id)
            except _Retryable:
                raise
            except Exception as e:  # noqa: BLE001 - permanent: the run is not in this store
                log.warning("tracking: run %s not found at %s (%s); starting a new run",
                            self._target_run_id, self.uri, e)
            if run is not None and run.info.lifecycle_stage == LifecycleStage.DELETED:
                log.warning("tracking: run %s is deleted; starting a new run", run.info.run_id)
                run = None
            if run is not None:
                self._call(client.update_run, run.info.run_id, status="RUNNING")
                metric_objs = getattr(run.data, "_metric_objs", None)
                if metric_objs is None:
                    metric_objs = [
                        max(self._call(client.get_metric_history, run.info.run_id, k),
                            key=lambda m: m.step)
                        for k in run.data.metrics
                    ]
                self._watermark = {m.key: int(m.step) for m in metric_objs}
                self._existing_params = dict(run.data.params)
        if run is None:
            exp = self._call(client.get_experiment_by_name, self.experiment)
            if exp is not None and exp.lifecycle_stage == LifecycleStage.DELETED:
                self._call(client.restore_experiment, exp.experiment_id)
            if exp is None:
                loc = (self.run_dir / LOCAL_ARTIFACT_DIR).resolve().as_uri() if self._local else None
                try:
                    exp_id = self._call(client.create_experiment, self.experiment,
                                        artifact_location=loc)
                except _Retryable:
                    raise
                except Exception:  # noqa: BLE001 - created meanwhile by someone else
                    exp_id = self._call(client.get_experiment_by_name, self.experiment
                                        ).experiment_id
            else:
                exp_id = exp.experiment_id
            run = self._call(client.create_run, exp_id, start_time=self._t0_ms,
                             run_name=self.run_name)
            self._watermark = {}
            self._existing_params = {}
        self.run_id = run.info.run_id
        try:
            _atomic_write_text(self._record_path, json.dumps(
                {"run_id": self.run_id, "uri": self.uri, "experiment": self.experiment}))
        except OSError as e:
            self._warn_once("record", "cannot write %s: %s", self._record_path, e)
        # back-fill: pending points first (original timestamps), then metrics.jsonl up to
        # the resume step; sorted by step so the per-key watermark drops what is there.
        prefix = list(self._prefix_points)
        if self.resume_step is not None:
            have = {(k, s) for k, _, _, s in prefix}
            for p in _read_metrics_file(self._metrics_path, self.resume_step):
                if p[3] > self._watermark.get(p[0], -(2**62)) and (p[0], p[3]) not in have:
                    prefix.append(p)
        prefix = [p for p in prefix if p[3] > self._watermark.get(p[0], -(2**62))]
        prefix.sort(key=lambda p: p[3])
        with self._lock:
            self._points.extendleft(reversed(prefix))
            self._prefix_points = []
            self._attached = True

    def _send_tags(self) -> None:
        from mlflow.entities import RunTag

        with self._lock:
            items = list(self._tags.items())
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            try:
                self._call(self._client.log_batch, self.run_id,
                           tags=[RunTag(k, v) for k, v in chunk], synchronous=True)
            except _Retryable:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("tracking: tags rejected by MLflow, dropped: %s", e)
            with self._lock:
                for k, v in chunk:
                    if self._tags.get(k) == v:
                        del self._tags[k]

    def _send_params(self) -> None:
        from mlflow.entities import Param

        with self._lock:
            items = list(self._params.items())
        new, changed = [], []
        for k, v in items:
            old = self._existing_params.get(k)
            if old is None:
                new.append((k, v))
            elif old != v:
                changed.append(k)
        if changed:
            log.warning("tracking: %d params differ from run %s and are not changed (MLflow "
                        "keeps the first value): %s", len(changed), self.run_id,
                        ", ".join(changed[:20]) + (" ..." if len(changed) > 20 else ""))
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = new[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            try:
                self._call(self._client.log_batch, self.run_id,
                           params=[Param(k, v) for k, v in chunk], synchronous=True)
                self._existing_params.update(chunk)
            except _Retryable:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("tracking: params rejected by MLflow, dropped: %s", e)
        with self._lock:
            for k, v in items:
                if self._params.get(k) == v:
                    del self._params[k]

    def _send_metrics(self, deadline: float | None) -> None:
        from mlflow.entities import Metric

        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            wm = dict(self._watermark)
            batch: list[Metric] = []
            consumed = 0
            with self._lock:
                for key, value, ts, step in self._points:
                    if len(batch) >= MAX_METRICS_PER_BATCH:
                        break
                    consumed += 1
                    if step <= wm.get(key, -(2**62)):
                        continue  # the run has this step already (resume)
                    wm[key] = step
                    batch.append(Metric(key, value, ts, step))
            if consumed == 0:
                return
            if batch:
                try:
                    self._call(self._client.log_batch, self.run_id, metrics=batch,
                               synchronous=True)
                except _Retryable:
                    raise
                except Exception as e:  # noqa: BLE001
                    log.warning("tracking: %d metric points rejected by MLflow, dropped: %s",
                                len(batch), e)
            with self._lock:
                if self._abandoned:
                    return
                for _ in range(consumed):
                    self._points.popleft()
                self._watermark = wm

    def _send_artifacts(self, deadline: float | None) -> None:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            with self._lock:
                if not self._artifacts:
                    return
                path, artifact_path = self._artifacts[0]
            p = Path(path)
            try:
                if p.is_dir():
                    self._call(self._client.log_artifacts, self.run_id, str(p), artifact_path)
                elif p.is_file():
                    self._call(self._client.log_artifact, self.run_id, str(p), artifact_path)
                else:
                    log.warning("tracking: artifact %s no longer exists; dropped", p)
            except _Retryable as e:
                # an upload that keeps failing while the store answers is dropped at last
                n = self._artifact_failures.get(path, 0) + 1
                self._artifact_failures[path] = n
                if n < MAX_ARTIFACT_TRIES:
                    raise
                log.warning("tracking: artifact %s failed %d times, dropped: %s", p, n, e)
            except Exception as e:  # noqa: BLE001
                log.warning("tracking: artifact %s rejected, dropped: %s", p, e)
            with self._lock:
                if self._abandoned:
                    return
                self._artifacts.pop(0)

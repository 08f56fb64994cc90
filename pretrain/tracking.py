"""MLflow tracking for the trainer: rank 0 only, never blocks or kills training.

``Tracker.create(rank=...)`` gives rank 0 a live tracker and every other rank a no-op one
with the same methods. Store: ``uri``, else ``MLFLOW_TRACKING_URI``, else ``<run_dir>/mlflow.db``
(artifacts under ``<run_dir>/mlartifacts``), or ``<run_dir>/mlruns`` without SQLAlchemy
(mlflow-skinny; ``MLFLOW_ALLOW_FILE_STORE`` is then set). ``<run_dir>/metrics.jsonl`` is the
local record. What MLflow's async logging does and what this module adds (the run attached
on a thread, resend after an outage, the pending file, no duplicate steps on resume):
docs/design.md, "Tracking".
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "flatten_params"]

log = logging.getLogger(__name__)

METRICS_FILE, PENDING_FILE, RUN_RECORD_FILE = "metrics.jsonl", "mlflow_pending.json", "mlflow_run.json"
MAX_PARAM_LENGTH, MAX_TAG_LENGTH, MAX_KEY_LENGTH = 6000, 8000, 250  # mlflow.utils.validation
MAX_METRICS_PER_REQUEST = 1000  # one request per log_batch call: it succeeds or fails whole
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
             "INVALID_STATE", "BAD_REQUEST", "INVALID_REQUEST", "MALFORMED_REQUEST"}
Point = tuple[str, float, int, int]  # key, value, timestamp ms, step


def _clean_key(key: Any) -> str:
    """A key MLflow accepts: allowed characters only, no empty/'.'/'..' path parts."""
    k = re.sub(r"[^\w\-. :/]", "_", str(key)).strip()
    parts = [("__" if p == ".." else p) for p in k.split("/") if p not in ("", ".")]
    return ("/".join(parts) or "_")[:MAX_KEY_LENGTH]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists as JSON, an empty mapping as ``"{}"``."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, Mapping):
            out[name] = "{}"
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = str(value)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of every well-formed, newline-terminated line of metrics.jsonl."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
            int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if line.endswith("\n"):
            out.append((line, row))
    return out


class Tracker:
    """The no-op tracker (ranks other than 0); `create` gives rank 0 a live one."""

    run_id: str | None = None

    @classmethod
    def create(cls, *, rank: int, run_dir: str | Path, uri: str | None, experiment: str,
               run_name: str | None, run_id: str | None = None, resume_step: int | None = None,
               tags: dict[str, str] | None = None, flush_interval: float = 2.0,
               min_backoff: float = 1.0, max_backoff: float = 30.0, start_wait: float = 15.0) -> Tracker:
        """rank 0: a live tracker writing ``<run_dir>/metrics.jsonl`` and to MLflow; ``run_id``
        continues that run; ``resume_step``: the checkpoint's step (later points are dropped
        and not sent again); ``flush_interval``: seconds between sends (metrics are batched);
        ``start_wait``: seconds ``create`` waits for the run to exist. Other ranks: no-op."""
        if rank != 0:
            return Tracker()
        return _LiveTracker(Path(run_dir), uri, experiment, run_name, run_id, resume_step, tags or {},
                            flush_interval, min_backoff, max_backoff, start_wait)

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool:
        """Send now; True when everything was sent within ``timeout`` seconds."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the run id (`create(run_id=...)` continues that run)."""
        return {"run_id": self.run_id}

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """End the run as FINISHED, FAILED or KILLED; keep what could not be sent."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


class _Unreachable(Exception):
    """The store did not answer; try again later."""


class _LiveTracker(Tracker):
    def __init__(self, run_dir: Path, uri: str | None, experiment: str, run_name: str | None,
                 run_id: str | None, resume_step: int | None, tags: dict[str, str], flush_interval: float,
                 min_backoff: float, max_backoff: float, start_wait: float) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        logging.getLogger("mlflow.utils.async_logging").setLevel(logging.CRITICAL)  # ours warns once
        self.run_dir, self.experiment, self.run_name, self.resume_step = run_dir, experiment, run_name, resume_step
        self.uri, self._local = self._resolve_uri(uri)
        self._interval, self._backoff = flush_interval, (min_backoff, max_backoff)
        self._t0_ms, self._pid = int(time.time() * 1000), os.getpid()
        self._metrics_path, self._pending_path = run_dir / METRICS_FILE, run_dir / PENDING_FILE
        self._record_path = run_dir / RUN_RECORD_FILE
        self._lock, self._cond, self._wake = threading.Lock(), threading.Condition(), threading.Event()
        self._points: list[Point] = []
        self._params: dict[str, str] = {}
        self._tags = {_clean_key(k): str(v)[:MAX_TAG_LENGTH] for k, v in tags.items()}
        self._artifacts: list[tuple[str, str | None]] = []
        self._watermark: dict[str, int] = {}
        self._run_params: dict[str, str] = {}
        self._client: Any = None
        self._attached = self._closing = self._abandoned = self._finished = self._from_pending = False
        self._down_since: float | None = None
        self._rounds = [0, 0, False]  # started, done, last ok
        self._warned: set[str] = set()
        self._artifact_tries: dict[str, int] = {}
        self.run_id = run_id
        if run_id is None and resume_step is not None:
            self.run_id = self._recorded_run_id()
        if resume_step is not None:  # drop the lines the resumed job will write again
            rows = _jsonl_rows(self._metrics_path)
            kept = "".join(line for line, row in rows if int(row["step"]) <= resume_step)
            if self._metrics_path.exists() and kept != self._metrics_path.read_text(encoding="utf-8"):
                _write_atomic(self._metrics_path, kept)
        self._backfill = self._load_pending()
        self._jsonl = open(self._metrics_path, "a", encoding="utf-8")
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        self._first.wait(start_wait)

    def _resolve_uri(self, uri: str | None) -> tuple[str, bool]:
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        if uri:
            return uri, False
        try:
            import alembic  # noqa: F401  (the SQL store needs both; mlflow-skinny has neither)
            import sqlalchemy  # noqa: F401

            return f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}", True
        except ImportError:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            return (self.run_dir / "mlruns").resolve().as_uri(), True

    def _recorded_run_id(self) -> str | None:
        try:
            rec = json.loads(self._record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return str(rec["run_id"]) if rec.get("uri") == self.uri and rec.get("run_id") else None

    def _load_pending(self) -> list[Point]:
        """What a previous tracker of this run could not send, or [] (a pending file of
        another store, run, or a fresh start is set aside)."""
        try:
            pend = json.loads(self._pending_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        resuming = self.resume_step is not None or self.run_id is not None
        if pend.get("uri") != self.uri or not resuming or self.run_id not in (None, pend.get("run_id")):
            stale = self._pending_path.with_name(f"mlflow_pending.stale-{int(time.time())}.json")
            log.warning("tracking: %s (run %s at %s) is not for this run; moved to %s",
                        self._pending_path, pend.get("run_id"), pend.get("uri"), stale.name)
            os.replace(self._pending_path, stale)
            return []
        self.run_id = self.run_id or pend.get("run_id")
        self._params.update(pend.get("params", {}))
        self._tags.update(pend.get("tags", {}))
        self._artifacts += [(p, a) for p, a in pend.get("artifacts", [])]
        self._from_pending = True
        return [(str(k), float(v), int(ts), int(s)) for k, v, ts, s in pend.get("metrics", [])
                if self.resume_step is None or int(s) <= self.resume_step]

    def _warn_once(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("tracking: " + msg, *args)

    # ------------------------------------------------------------------ the trainer's calls

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {_clean_key(k): v[:MAX_PARAM_LENGTH] for k, v in flatten_params(params).items()}
        with self._lock:
            self._params.update(flat)
        self._wake.set()

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """One metrics.jsonl line (flushed), and the points buffered for MLflow."""
        if self._closing:
            return
        values = {}
        for k, v in metrics.items():
            try:
                values[str(k)] = float(v.item() if hasattr(v, "item") else v)
            except (TypeError, ValueError):
                self._warn_once(f"nan-{k}", "metric %s=%r is not a number; dropped", k, v)
        ts = int(time.time() * 1000)
        try:
            self._jsonl.write(json.dumps({"step": int(step), **{k: v if math.isfinite(v) else None
                                                                 for k, v in values.items()}}) + "\n")
            self._jsonl.flush()
        except (OSError, ValueError) as e:
            self._warn_once("jsonl", "cannot write %s: %s", self._metrics_path, e)
        with self._lock:
            self._points += [(_clean_key(k), v, ts, int(step)) for k, v in values.items()]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or folder, uploaded on the thread (read then: keep it in place)."""
        with self._lock:
            self._artifacts.append((str(Path(path).resolve()), artifact_path))
        self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        if self._closing or not self._thread.is_alive():
            return False
        with self._cond:
            target = self._rounds[0] + 1
            self._wake.set()
            done = self._cond.wait_for(lambda: self._rounds[1] >= target, timeout)
            return done and self._rounds[2] and not self._has_work()

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        if self._closing or os.getpid() != self._pid:  # a forked child never ends the run
            return
        self._close_args = (status, time.monotonic() + timeout)  # read by the thread once closing
        self._closing = True
        atexit.unregister(self._atexit)
        try:
            os.fsync(self._jsonl.fileno())
            self._jsonl.close()
        except (OSError, ValueError):
            pass
        self._wake.set()
        self._thread.join(timeout + 1.0)
        with self._lock:
            if not self._finished:  # stuck in a request: keep what is not sent
                self._abandoned = True
                self._write_pending()
                log.warning("tracking: close did not complete in %.0fs; unsent data kept in %s",
                            timeout, self._pending_path)

    def _atexit(self) -> None:
        self.close("FAILED", timeout=5.0)

    # ------------------------------------------------------------------ the thread

    def _has_work(self) -> bool:
        return bool(not self._attached or self._points or self._params or self._tags or self._artifacts)

    def _worker(self) -> None:
        delay = 0.0
        backoff = self._backoff[0]
        while not self._closing:
            if delay:
                self._wake.wait(delay)
            self._wake.clear()
            if self._closing:
                break
            with self._cond:
                self._rounds[0] += 1
            ok = self._attempt()
            self._first.set()
            delay, backoff = (self._interval, self._backoff[0]) if ok else (backoff, min(2 * backoff, self._backoff[1]))
            if ok and self._from_pending and not self._has_work():
                self._from_pending = False  # its content is sent now
                self._pending_path.unlink(missing_ok=True)
            with self._cond:
                self._rounds[1:] = [self._rounds[1] + 1, ok]
                self._cond.notify_all()
        self._finish(*self._close_args)

    def _finish(self, status: str, deadline: float) -> None:
        """Send until done or the deadline, end the run, keep the rest in the pending file."""
        ok, wait = False, 0.25
        for _ in range(1 if self._down_since is not None else 3):
            ok = self._attempt()
            if (ok and not self._has_work()) or self._abandoned or time.monotonic() + wait >= deadline:
                break
            time.sleep(wait)
            wait *= 2
        if ok and self._attached and not self._abandoned:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as e:  # noqa: BLE001
                log.warning("tracking: could not end run %s as %s: %s", self.run_id, status, e)
        with self._lock:
            if self._abandoned:
                return
            if self._has_work():
                self._write_pending()
                log.warning("tracking: %d metric points (and any params/artifacts) not sent; kept in "
                            "%s for the next tracker of this run", len(self._points), self._pending_path)
            else:
                self._pending_path.unlink(missing_ok=True)
            self._finished = True

    def _write_pending(self) -> None:
        """Unsent items to the pending file (caller holds the lock)."""
        points = self._backfill + self._points
        if points or self._params or self._tags or self._artifacts:
            _write_atomic(self._pending_path, json.dumps({
                "version": 1, "uri": self.uri, "run_id": self.run_id, "metrics": [list(p) for p in points],
                "params": self._params, "tags": self._tags, "artifacts": [list(a) for a in self._artifacts]}))

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A client call; an unreachable store becomes _Unreachable, a refusal is raised as is."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if getattr(e, "error_code", None) in PERMANENT:
                raise
            raise _Unreachable(str(e).splitlines()[0][:300] if str(e) else repr(e)) from e

    def _attempt(self) -> bool:
        """One round: attach the run, send tags, params, metrics, artifacts. True if all went."""
        try:
            if not self._attached:
                self._attach()
            self._send()
        except Exception as e:  # noqa: BLE001 - _Unreachable, or an error we did not expect
            if not isinstance(e, _Unreachable):
                self._warn_once(f"x-{type(e).__name__}", "unexpected MLflow error (will retry): %r", e)
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("tracking: MLflow at %s unreachable (%s); buffering (all points also in "
                            "%s) and retrying in the background", self.uri, e, self._metrics_path)
            return False
        if self._down_since is not None:
            log.warning("tracking: MLflow at %s reachable again after %.0fs; buffered data sent",
                        self.uri, time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _attach(self) -> None:
        """Continue run_id (set back to RUNNING; its latest step per key is the watermark)
        or create a run; then queue the back-fill the run lacks."""
        from mlflow.tracking import MlflowClient

        self._client = self._client or MlflowClient(tracking_uri=self.uri)
        c, run = self._client, None
        if self.run_id is not None:
            try:
                run = self._call(c.get_run, self.run_id)
            except _Unreachable:
                raise
            except Exception as e:  # noqa: BLE001 - permanent: not in this store
                log.warning("tracking: run %s not found at %s (%s); starting a new run", self.run_id, self.uri, e)
            if run is not None and run.info.lifecycle_stage == "deleted":
                log.warning("tracking: run %s is deleted; starting a new run", self.run_id)
                run = None
        if run is not None:
            self._call(c.update_run, run.info.run_id, status="RUNNING")
            latest = [max(self._call(c.get_metric_history, run.info.run_id, k), key=lambda m: m.step)
                      for k in run.data.metrics]
            self._watermark = {m.key: int(m.step) for m in latest}
            self._run_params = dict(run.data.params)
        else:
            exp = self._call(c.get_experiment_by_name, self.experiment)
            if exp is not None and exp.lifecycle_stage == "deleted":
                self._call(c.restore_experiment, exp.experiment_id)
            if exp is None:
                where = (self.run_dir / "mlartifacts").resolve().as_uri() if self._local else None
                try:
                    exp_id = self._call(c.create_experiment, self.experiment, artifact_location=where)
                except _Unreachable:
                    raise
                except Exception:  # noqa: BLE001 - created meanwhile by someone else
                    exp_id = self._call(c.get_experiment_by_name, self.experiment).experiment_id
            else:
                exp_id = exp.experiment_id
            run = self._call(c.create_run, exp_id, start_time=self._t0_ms, run_name=self.run_name)
        self.run_id = run.info.run_id
        _write_atomic(self._record_path, json.dumps({"run_id": self.run_id, "uri": self.uri,
                                                     "experiment": self.experiment}))
        backfill, have = list(self._backfill), {(k, s) for k, _, _, s in self._backfill}
        if self.resume_step is not None:
            now = int(time.time() * 1000)
            backfill += [(_clean_key(k), float(v), now, int(row["step"]))
                         for _, row in _jsonl_rows(self._metrics_path) if int(row["step"]) <= self.resume_step
                         for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                         and not isinstance(v, bool) and (_clean_key(k), int(row["step"])) not in have]
        with self._lock:
            self._points[:0] = sorted(backfill, key=lambda p: p[3])
            self._backfill, self._attached = [], True

    def _send(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        c = self._client
        with self._lock:
            tags, params = dict(self._tags), dict(self._params)
        changed = sorted(k for k, v in params.items() if self._run_params.get(k, v) != v)
        if changed:
            log.warning("tracking: %d params differ from run %s and are not changed (MLflow keeps the "
                        "first value): %s", len(changed), self.run_id, ", ".join(changed[:20]))
        new = {k: v for k, v in params.items() if k not in self._run_params}
        if tags or new:
            try:
                self._call(c.log_batch, self.run_id, params=[Param(k, v) for k, v in new.items()],
                           tags=[RunTag(k, v) for k, v in tags.items()])
                self._run_params.update(new)
            except _Unreachable:
                raise
            except Exception as e:  # noqa: BLE001 - refused by the store: never accepted later
                log.warning("tracking: params or tags rejected by MLflow, dropped: %s", e)
        with self._lock:
            for src, dst in ((tags, self._tags), (params, self._params)):
                for k, v in src.items():
                    if dst.get(k) == v:
                        del dst[k]
        while True:  # metrics: MLflow's async queue sends, we keep them until it succeeded
            with self._lock:
                batch = self._points[:MAX_METRICS_PER_REQUEST]
            if not batch:
                break
            wm, send = dict(self._watermark), []
            for key, value, ts, step in batch:
                if step > wm.get(key, -(2**62)):  # the run has this step already (resume)
                    wm[key] = step
                    send.append(Metric(key, value, ts, step))
            if send:
                self._call(lambda s=send: c.log_batch(self.run_id, metrics=s, synchronous=False).wait())
            with self._lock:
                del self._points[:len(batch)]
                self._watermark = wm
        while self._artifacts:
            path, artifact_path = self._artifacts[0]
            p = Path(path)
            try:
                if p.exists():
                    self._call(c.log_artifacts if p.is_dir() else c.log_artifact, self.run_id, path, artifact_path)
                else:
                    log.warning("tracking: artifact %s no longer exists; dropped", p)
            except _Unreachable as e:  # an upload that keeps failing while the store answers: dropped
                self._artifact_tries[path] = self._artifact_tries.get(path, 0) + 1
                if self._artifact_tries[path] < 8:
                    raise
                log.warning("tracking: artifact %s failed 8 times, dropped: %s", p, e)
            with self._lock:
                self._artifacts.pop(0)

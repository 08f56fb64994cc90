"""pretrain.tracking: MLflow tracker against a local store and a real `mlflow server`.

Server tests start `mlflow server` on 127.0.0.1 (free port, sqlite store and artifact
folder under tmp_path), poll /health, and kill its whole process group at teardown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, free_port

from pretrain.tracking import PENDING_FILE, RUN_RECORD_FILE, Tracker, flatten_params

REPO = Path(__file__).resolve().parents[1]
FAST = {"flush_interval": 0.2, "min_backoff": 0.2, "max_backoff": 1.0}


def loss_at(step: int) -> float:
    """The value every test logs for `loss` at a step (a resumed run recomputes it)."""
    return 1.0 / step + 0.5


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the tests that do not stop it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_server(tmp_path: Path):
    """A server the test starts, kills and restarts itself (not started here)."""
    server = MlflowServer(tmp_path / "server")
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def jsonl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_sent(tracker: Tracker, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tracker.flush(timeout=10):
            return
        time.sleep(0.2)
    raise AssertionError("tracker did not manage to send its buffer")


def log_steps(tracker: Tracker, steps: range) -> float:
    """Log `loss` and `lr` for the steps; return the longest call in seconds."""
    worst = 0.0
    for s in steps:
        t = time.perf_counter()
        tracker.log_metrics(s, {"loss": loss_at(s), "lr": 1e-3})
        worst = max(worst, time.perf_counter() - t)
    return worst


def outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]


# --------------------------------------------------------------------------- no server


def test_flatten_params() -> None:
    flat = flatten_params({"model": {"d": 64, "blocks": [0, 2], "x": {}}, "lr": 1e-3, "n": None})
    assert flat == {
        "model.d": "64",
        "model.blocks": "[0, 2]",
        "model.x": "{}",
        "lr": "0.001",
        "n": "None",
    }


def test_other_ranks_get_a_no_op(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    t = Tracker.create(rank=1, run_dir=run_dir, uri=None, experiment="e", run_name="r")
    assert type(t) is Tracker and t.run_id is None
    t.log_params({"a": 1})
    t.log_metrics(1, {"loss": 1.0})
    t.log_artifact(tmp_path / "missing")
    assert t.flush()
    t.close()
    assert not run_dir.exists()


def test_local_store_without_server(tmp_path: Path) -> None:
    import torch

    run_dir = tmp_path / "run"
    art_dir = tmp_path / "tok"
    art_dir.mkdir()
    (art_dir / "tok.model").write_text("vocab")
    (tmp_path / "config.yaml").write_text("model: {d: 64}\n")
    t = Tracker.create(rank=0, run_dir=run_dir, uri=None, experiment="local", run_name="r1",
                       tags={"git_commit": "abc123", "world_size": "1"}, **FAST)
    assert t.run_id is not None  # the local store answers at once
    t.log_params({"model": {"d": 64, "name": "tiny"}, "long": "v" * 7000})
    t.log_metrics(1, {"loss": torch.tensor(2.5), "lr": 1e-3, "bad": "x", "inf": math.inf})
    t.log_metrics(2, {"loss": 2.0, "lr": 2e-3})
    t.log_artifact(tmp_path / "config.yaml")
    t.log_artifact(art_dir, artifact_path="tokenizer")
    t.close()

    assert (run_dir / "mlflow.db").exists()
    assert jsonl_rows(run_dir) == [
        {"step": 1, "loss": 2.5, "lr": 1e-3, "inf": None},
        {"step": 2, "loss": 2.0, "lr": 2e-3},
    ]
    client = client_for(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["model.d"] == "64" and run.data.params["model.name"] == "tiny"
    assert run.data.params["long"] == "v" * 6000
    assert run.data.tags["git_commit"] == "abc123"
    assert history(client, t.run_id) == [(1, 2.5), (2, 2.0)]
    [(step, value)] = history(client, t.run_id, "inf")  # the SQL store clamps inf to max
    assert step == 1 and value >= sys.float_info.max
    assert {f.path for f in client.list_artifacts(t.run_id)} == {"config.yaml", "tokenizer"}
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").resolve().as_uri())
    assert (Path(run.info.artifact_uri.removeprefix("file://")) / "tokenizer/tok.model").exists()
    assert not (run_dir / PENDING_FILE).exists()


def test_local_file_store_when_sqlalchemy_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlflow-skinny alone has no SQL store: the local store is then ./mlruns in the run
    dir (MLflow 3 wants MLFLOW_ALLOW_FILE_STORE for it, the tracker sets it)."""
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # `import sqlalchemy` fails
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_dir = tmp_path / "run"
    t = Tracker.create(rank=0, run_dir=run_dir, uri=None, experiment="e", run_name="r", **FAST)
    log_steps(t, range(1, 4))
    t.close()
    assert t.run_id is not None and not (run_dir / "mlflow.db").exists()
    client = client_for((run_dir / "mlruns").as_uri())
    assert history(client, t.run_id) == [(s, loss_at(s)) for s in range(1, 4)]
    assert client.get_run(t.run_id).info.status == "FINISHED"


def test_store_away_costs_a_warning_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens at the URI: create, logging and close are quick; the resumed run's
    id stays known; what was not sent is kept in the pending file; a fresh start later in
    the same folder sets that file aside instead of sending it to the wrong run."""
    caplog.set_level(logging.WARNING, logger="pretrain.tracking")
    run_dir = tmp_path / "run"
    (tmp_path / "config.yaml").write_text("a: 1\n")
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    t = Tracker.create(rank=0, run_dir=run_dir, uri=uri, experiment="e", run_name="r",
                       run_id="0123456789abcdef", resume_step=0, **FAST)
    assert t.run_id == "0123456789abcdef"
    t.log_params({"seed": 1})
    t.log_artifact(tmp_path / "config.yaml")
    assert log_steps(t, range(1, 6)) < 0.5
    assert not t.flush(timeout=5)
    t.close("KILLED", timeout=30)
    assert time.monotonic() - t0 < 10
    assert len(outage_warnings(caplog)) == 1
    pending = json.loads((run_dir / PENDING_FILE).read_text())
    assert pending["run_id"] == "0123456789abcdef" and pending["uri"] == uri
    assert [(m[0], m[3]) for m in pending["metrics"] if m[0] == "loss"] == [
        ("loss", s) for s in range(1, 6)]  # fmt: skip
    assert pending["params"] == {"seed": "1"}
    assert pending["artifacts"] == [[str((tmp_path / "config.yaml").resolve()), None]]
    assert [r["step"] for r in jsonl_rows(run_dir)] == [1, 2, 3, 4, 5]

    fresh = Tracker.create(rank=0, run_dir=run_dir, uri=uri, experiment="e", run_name="r2",
                           start_wait=0.0, **FAST)
    assert fresh.run_id is None
    fresh.close(timeout=5)
    assert not (run_dir / PENDING_FILE).exists()
    assert len(list(run_dir.glob("mlflow_pending.stale-*.json"))) == 1


def test_hung_store_never_blocks_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts connections and never answers (a hung host): requests time
    out on the worker thread only; create honours start_wait, close honours its timeout."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run_dir = tmp_path / "run"
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # connections complete in the backlog, nobody reads them
        uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
        t0 = time.monotonic()
        t = Tracker.create(rank=0, run_dir=run_dir, uri=uri, experiment="e", run_name="r",
                           start_wait=0.5, **FAST)
        assert time.monotonic() - t0 < 1.5
        assert log_steps(t, range(1, 21)) < 0.5
        t0 = time.monotonic()
        t.close(timeout=1.0)
        assert time.monotonic() - t0 < 3.5
        pending = json.loads((run_dir / PENDING_FILE).read_text())
        assert sorted({m[3] for m in pending["metrics"]}) == list(range(1, 21))
        assert pending["run_id"] is None


@pytest.mark.slow
def test_sigkill_then_resume_backfills_and_dedups(tmp_path: Path) -> None:
    """A SIGKILLed process with unsent points; the resume sends each step exactly once."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pretrain.tracking import Tracker
        def loss_at(s): return 1.0 / s + 0.5
        t = Tracker.create(rank=0, run_dir={str(run_dir)!r}, uri=None, experiment="e",
                           run_name="r", flush_interval=3600.0)
        for s in range(1, 5): t.log_metrics(s, {{"loss": loss_at(s)}})
        assert t.flush(60)
        for s in range(5, 9): t.log_metrics(s, {{"loss": loss_at(s)}})  # not sent yet
        print(t.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_id = proc.stdout.split()[-1]
    client = client_for(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert [s for s, _ in history(client, run_id)] == [1, 2, 3, 4]
    assert json.loads((run_dir / RUN_RECORD_FILE).read_text())["run_id"] == run_id

    # the checkpoint was at step 6; its run id is taken from the run record
    t = Tracker.create(rank=0, run_dir=run_dir, uri=None, experiment="e", run_name="r",
                       resume_step=6, **FAST)
    assert t.run_id == run_id
    assert [r["step"] for r in jsonl_rows(run_dir)] == [1, 2, 3, 4, 5, 6]
    log_steps(t, range(7, 11))
    t.close()
    assert history(client, run_id) == [(s, loss_at(s)) for s in range(1, 11)]
    assert [r["step"] for r in jsonl_rows(run_dir)] == list(range(1, 11))
    assert client.get_run(run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------- real server


@pytest.mark.integration
def test_server_params_metrics_artifacts(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # uri=None: env decides
    run_dir = tmp_path / "run"
    (tmp_path / "config.yaml").write_text("model: {d: 64}\n")
    t = Tracker.create(rank=0, run_dir=run_dir, uri=None, experiment="srv", run_name="basic",
                       tags={"git_commit": "abc123", "world_size": "2", "backend": "fsdp"},
                       **FAST)
    assert t.run_id is not None
    cfg = {"model": {"d": 64, "blocks": [1, 3]}, "optim": {"lr": 1e-3}}
    t.log_params(cfg)
    t.log_params(cfg)  # same values again: fine
    log_steps(t, range(1, 21))
    t.log_artifact(tmp_path / "config.yaml")
    t.close()

    assert not (run_dir / "mlflow.db").exists()
    client = client_for(mlflow_server.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.d": "64", "model.blocks": "[1, 3]", "optim.lr": "0.001"}
    assert {k: run.data.tags[k] for k in ("git_commit", "world_size", "backend")} == {
        "git_commit": "abc123", "world_size": "2", "backend": "fsdp"}  # fmt: skip
    assert history(client, t.run_id) == [(s, loss_at(s)) for s in range(1, 21)]
    assert [s for s, _ in history(client, t.run_id, "lr")] == list(range(1, 21))
    assert [f.path for f in client.list_artifacts(t.run_id)] == ["config.yaml"]
    local = client.download_artifacts(t.run_id, "config.yaml", str(tmp_path / "dl"))
    assert Path(local).read_text() == "model: {d: 64}\n"
    assert jsonl_rows(run_dir) == [{"step": s, "loss": loss_at(s), "lr": 1e-3} for s in
                                   range(1, 21)]


@pytest.mark.integration
def test_resume_continues_same_run(
    mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps 6..8 were logged after the step-5 checkpoint, then the job died; the resumed
    job recomputes them: each step is in MLflow and metrics.jsonl exactly once."""
    caplog.set_level(logging.WARNING, logger="pretrain.tracking")
    run_dir = tmp_path / "run"
    params = {"optim": {"lr": 1e-3}, "seed": 1}
    a = Tracker.create(rank=0, run_dir=run_dir, uri=mlflow_server.uri, experiment="resume",
                       run_name="r", **FAST)
    a.log_params(params)
    log_steps(a, range(1, 9))
    wait_sent(a)
    a.close("KILLED")
    client = client_for(mlflow_server.uri)
    assert client.get_run(a.run_id).info.status == "KILLED"

    b = Tracker.create(rank=0, run_dir=run_dir, uri=mlflow_server.uri, experiment="resume",
                       run_name="r", run_id=a.run_id, resume_step=5, **FAST)
    assert b.run_id == a.run_id
    assert client.get_run(a.run_id).info.status == "RUNNING"
    assert [r["step"] for r in jsonl_rows(run_dir)] == [1, 2, 3, 4, 5]
    b.log_params(params)  # same values: no error
    b.log_params({"seed": 2, "new": "x"})  # a changed value is kept as it was, with a warning
    log_steps(b, range(6, 13))
    b.close()

    run = client.get_run(a.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.001", "seed": "1", "new": "x"}
    assert history(client, a.run_id) == [(s, loss_at(s)) for s in range(1, 13)]
    assert [s for s, _ in history(client, a.run_id, "lr")] == list(range(1, 13))
    assert [r["step"] for r in jsonl_rows(run_dir)] == list(range(1, 13))
    assert any("differ" in r.getMessage() and "seed" in r.getMessage() for r in caplog.records)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1


@pytest.mark.integration
def test_server_outages_buffer_and_recover(
    own_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Down at start, killed mid-run (SIGKILL), restarted, killed again (SIGTERM) before
    close: logging stays fast, one warning per outage, everything arrives exactly once."""
    caplog.set_level(logging.WARNING, logger="pretrain.tracking")
    run_dir = tmp_path / "run"
    uri = own_server.uri

    # 1. server not there at start: no run yet, no error, calls return at once
    t0 = time.monotonic()
    a = Tracker.create(rank=0, run_dir=run_dir, uri=uri, experiment="outage", run_name="r",
                       tags={"backend": "fsdp"}, **FAST)
    assert time.monotonic() - t0 < 10
    assert a.run_id is None
    a.log_params({"seed": 1})
    assert log_steps(a, range(1, 4)) < 0.5
    assert len(outage_warnings(caplog)) == 1
    own_server.start()
    wait_sent(a)
    assert a.run_id is not None
    client = client_for(uri)
    assert [s for s, _ in history(client, a.run_id)] == [1, 2, 3]

    # 2. server killed mid-run, training goes on, restart on the same port and store
    own_server.stop(signal.SIGKILL)
    worst = log_steps(a, range(4, 7))
    time.sleep(1.0)  # the worker tries (and fails) meanwhile
    worst = max(worst, log_steps(a, range(7, 10)))
    assert worst < 0.5
    assert len(outage_warnings(caplog)) == 2
    own_server.start()
    wait_sent(a)
    assert history(client, a.run_id) == [(s, loss_at(s)) for s in range(1, 10)]
    assert len(outage_warnings(caplog)) == 2
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 2

    # 3. server gone again (SIGTERM) before the job stops: close is quick, keeps the rest
    own_server.stop(signal.SIGTERM)
    assert log_steps(a, range(10, 13)) < 0.5
    t0 = time.monotonic()
    a.close("KILLED", timeout=30)
    assert time.monotonic() - t0 < 15
    pending = json.loads((run_dir / PENDING_FILE).read_text())
    assert pending["run_id"] == a.run_id
    assert sorted({m[3] for m in pending["metrics"]}) == [10, 11, 12]

    # 4. the requeued job resumes from the step-11 checkpoint: the pending points of
    #    steps 10, 11 are sent, step 12 is recomputed by the job itself
    own_server.start()
    b = Tracker.create(rank=0, run_dir=run_dir, uri=uri, experiment="outage", run_name="r",
                       run_id=a.run_id, resume_step=11, **FAST)
    assert b.run_id == a.run_id
    log_steps(b, range(12, 15))
    b.close()
    assert not (run_dir / PENDING_FILE).exists()
    run = client.get_run(a.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"seed": "1"} and run.data.tags["backend"] == "fsdp"
    assert history(client, a.run_id) == [(s, loss_at(s)) for s in range(1, 15)]
    assert [s for s, _ in history(client, a.run_id, "lr")] == list(range(1, 15))
    assert [r["step"] for r in jsonl_rows(run_dir)] == list(range(1, 15))
    assert len(outage_warnings(caplog)) == 3

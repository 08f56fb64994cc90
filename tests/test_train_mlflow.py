"""The trainer against a real `mlflow server` on 127.0.0.1: the server dies mid-run
and comes back, training never stops, every step arrives once, and a resumed run
continues the same MLflow run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import pytest
from mlflow_server import MlflowServer
from trainrun import ROOT, command, env, overrides, run

from pretrain.demo import wait_for_step

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextlib.contextmanager
def paused(proc: subprocess.Popen):
    """The trainer stopped (SIGSTOP) while the server goes or comes: the outage then falls
    mid-run however fast the steps are (a run that ended while the server was starting
    keeps its metrics in the pending file, for the next tracker of the run)."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_server_outage_and_resume_keep_one_run(tmp_path, corpus):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        run_dir = tmp_path / "run"
        args = overrides(run_dir, corpus, "data.seq_len=256", "train.steps=40", "checkpoint.every=20",
                         "tracking.experiment=outage", procs=1)
        proc = subprocess.Popen(command(0, args), env=env(MLFLOW_TRACKING_URI=server.uri), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_step(run_dir / "metrics.jsonl", 8, proc)
        with paused(proc):
            server.stop()  # the server goes away mid-run
        wait_for_step(run_dir / "metrics.jsonl", 16, proc)  # training goes on
        with paused(proc):
            server.start()
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]

        client = MlflowClient(tracking_uri=server.uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "outage"]
        (first,) = client.search_runs([exp.experiment_id])
        run_id = first.info.run_id
        assert first.data.params["optimizer.lr"] == "0.003"
        assert first.data.tags["backend"] == "none"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        assert steps == list(range(1, 41))  # every step once, the outage included
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "tokenizer", "summary.json"} <= names

        # continue the same job for 10 more steps: the same run, steps continue
        run(command(0, [*args, "train.steps=50"]), MLFLOW_TRACKING_URI=server.uri)
        assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
        steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        assert steps == list(range(1, 51))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        server.stop()

"""Helpers for tests that run the real trainer: commands, environments, kills, logs.

Used by test_train.py and the backend/launcher/conversion tests; the `corpus`
fixture (tokenizer + shards of the demo corpus) is in conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
def overrides(run_dir: Path, corpus, *extra: str, procs: int = 2) -> list[str]:
    """Global batch 4 = micro batch 2 x grad_accum x procs."""
    tok, shards = corpus
    return [
        f"run_dir={run_dir}", f"data.train=[{shards}]", f"data.val={shards / 'val'}",
        f"data.tokenizer={tok}", "data.seq_len=64", "train.micro_batch_size=2",
        "train.global_batch_size=4", f"train.grad_accum={4 // (2 * procs)}", "train.log_every=1", "checkpoint.every=10",
        "schedule.warmup_steps=2", "optimizer.lr=3e-3", "eval.batches=2",
        "hardware.peak_flops=1e11", *extra,
    ]


def command(nproc: int, args: list[str], resume: str = "auto", config: str = "tiny.yaml") -> list[str]:
    """`python -m pretrain.train` (nproc 0) or torchrun with nproc processes."""
    head = [sys.executable, "-m", "pretrain.train"] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "pretrain.train"]
    return [*head, "--config", str(ROOT / "configs" / config), "--resume", resume, *args]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out.pop("MLFLOW_TRACKING_URI", None)  # a local store unless the test names a server
    out.update(extra)
    return out


def run(cmd: list[str], expect: int = 0, **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(**env_extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int, **env_extra: str) -> None:
    """Start training, SIGKILL every process of it as soon as checkpoint `step` is complete."""
    proc = subprocess.Popen(cmd, env=env(**env_extra), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "checkpoints" / f"step-{step:06d}" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, f"training ended (exit {proc.returncode}) before step {step}"
        assert time.time() < deadline, "timed out waiting for the checkpoint"
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    kill_tree(proc, signal.SIGKILL)


def kill_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal the launcher and every descendant at once (torchrun puts its workers
    in sessions of their own, so a process-group kill would miss them)."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def mlflow_loss_steps(run_dir: Path) -> tuple[list[str], list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    return [r.info.run_id for r in runs], sorted(m.step for m in history)

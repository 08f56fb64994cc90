"""slurm/ against a real Slurm: munged, slurmctld and two `slurmd -N` on 127.0.0.1, started
by a fixture under a temp dir and torn down leaving no process; a real `mlflow server`.

Every job trains the tiny preset on 2 nodes x 1 CPU rank (gloo, FSDP), 10 steps. The
uninterrupted `sbatch --wait` run is the reference: a preempted (signal, checkpoint,
requeue, resume) job, the submitit job and a hard-killed then resubmitted job must log the
same loss at every step, bitwise, and MLflow must hold one run with each step once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, free_port
from trainrun import ROOT, losses, overrides

from slurm.cluster import LocalCluster, missing_binaries

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 10
SBATCH = str(ROOT / "slurm" / "pretrain.sbatch")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)}): apt-get install -y slurm-wlm munge")
    c = LocalCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=1).start()
    yield c
    c.stop()
    assert not c._ours(), "a process of the test cluster outlived its tear-down"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s
    s.stop()


def job_env(cluster: LocalCluster, server: MlflowServer, **extra: str) -> dict[str, str]:
    """The rendezvous port is a free one, not the job-id default: another test cluster on
    this machine (a parallel CI run) numbers its jobs from 1 too."""
    return cluster.client_env(XLSTM_PYTHON=sys.executable, MLFLOW_TRACKING_URI=server.uri,
                              OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                              XLSTM_MASTER_PORT=str(free_port()), **extra)


def train_args(run_dir: Path, corpus, *extra: str) -> list[str]:
    return overrides(run_dir, corpus, "distributed.backend=fsdp", f"train.steps={STEPS}",
                     "checkpoint.every=5", f"tracking.experiment={run_dir.name}", *extra, procs=2)


def sbatch(cluster, server, tmp_path: Path, run_dir: Path, corpus, *opts: str, config: str = "",
           env_extra: dict | None = None) -> str:
    cmd = ["sbatch", "--parsable", "-N", "2", f"--output={tmp_path}/%x-%j.out", *opts, SBATCH,
           config or str(ROOT / "configs" / "tiny.yaml"), *train_args(run_dir, corpus)]
    out = subprocess.run(cmd, cwd=ROOT, env=job_env(cluster, server, **(env_extra or {})),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(cluster: LocalCluster, job: str) -> dict[str, str]:
    text = cluster.scontrol("show", "job", "-o", job).stdout
    return dict(f.split("=", 1) for f in text.split() if "=" in f)


def wait_job(cluster: LocalCluster, job: str, timeout: float = 240.0) -> dict[str, str]:
    """Wait for the job's end. A requeued job is left to Slurm's own release (the cluster's
    cred_expire=5 makes that ~8 s): forcing it out early with `StartTime=now` races slurmd's
    credential revocation (a launch credential from the same second as the old run's
    revocation is refused) and the job then ends FAILED with no output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(cluster, job)
        if info.get("JobState", "") in TERMINAL:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end: {job_info(cluster, job)}\n{cluster.logs()}")


def wait_for(predicate, what: str, timeout: float = 180.0, job=None, cluster=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if job and job_info(cluster, job).get("JobState") in TERMINAL:
            raise AssertionError(f"job {job} ended before {what}: {job_info(cluster, job)}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_step(run_dir: Path) -> int:
    try:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    except (OSError, ValueError):
        return 0
    return max((r["step"] for r in rows if "loss" in r), default=0)


def log_of(tmp_path: Path, job: str) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob(f"*-{job}.out")))


def mlflow_check(server: MlflowServer, experiment: str, expected: dict[int, float]) -> None:
    """One run in the experiment; each step's loss once, equal to `expected`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == pytest.approx(expected, rel=1e-6)
    assert runs[0].info.status == "FINISHED"


def trainer_pid(job: str, rank: int) -> int | None:
    """The pid of the trainer process of `rank` in Slurm job `job`."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"RANK={rank}".encode()}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = set((d / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if b"pretrain.train" in cmd and want <= env:
            return int(d.name)
    return None


@pytest.fixture(scope="module")
def straight(cluster, server, corpus, tmp_path_factory):
    """The uninterrupted job, run with `sbatch --wait`: (run dir, per-step losses, log)."""
    tmp = tmp_path_factory.mktemp("straight")
    run_dir = tmp / "straight"
    cmd = ["sbatch", "--wait", "-N", "2", f"--output={tmp}/%x-%j.out", SBATCH,
           str(ROOT / "configs" / "tiny.yaml"), *train_args(run_dir, corpus)]
    out = subprocess.run(cmd, cwd=ROOT, env=job_env(cluster, server), capture_output=True,
                         text=True, timeout=300)
    job = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)
    log = log_of(tmp, job)
    assert out.returncode == 0, out.stdout + out.stderr + log
    return run_dir, losses(run_dir), job, log


# --------------------------------------------------------------------------- sbatch

def test_sbatch_two_nodes_trains_to_completion(straight, cluster, server):
    run_dir, loss, job, log = straight
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < loss[1] - 0.5
    assert "2 node(s) x 1 rank(s), rendezvous 127.0.0.1:" in log and "training finished" in log
    assert "resumed from" not in log
    info = job_info(cluster, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0"  # ended normally: not requeued
    mlflow_check(server, run_dir.name, loss)


def test_sbatch_preempted_job_requeues_itself_and_resumes(straight, cluster, server, corpus, tmp_path):
    run_dir = tmp_path / "preempted"
    job = sbatch(cluster, server, tmp_path, run_dir, corpus)
    wait_for(lambda: logged_step(run_dir) >= 2, "step 2", job=job, cluster=cluster)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], env=cluster.client_env(),
                   check=True, timeout=30)
    info = wait_job(cluster, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log}\n{cluster.logs()}"
    assert "got SIGUSR2" in log and "requeue 1 of 10" in log and "training finished" in log
    resumed = int(re.search(r"start at step (\d+) \(resumed", log).group(1))
    assert 2 <= resumed < STEPS
    assert losses(run_dir) == straight[1]  # bitwise, every step
    mlflow_check(server, run_dir.name, straight[1])


def test_time_limit_signals_checkpoints_requeues_and_completes(straight, cluster, server, corpus, tmp_path):
    """Slurm's own time-limit path: nothing is sent by the test. `--time=3` with
    `--signal=B:USR2@150` makes slurmctld signal the batch shell once 30 s have passed, at its
    next periodic check (up to a minute later). The step-5 checkpoint write is held for 100 s
    (XLSTM_TEST_SAVE_DELAY), so the signal always lands in a live run whatever the check's
    phase, and every run stops (about 125 s in) well before its 180 s limit. A signal before
    step 5 stops that run earlier; the next run then meets the held write again: either way
    the job requeues at least once and completes with the reference losses."""
    run_dir = tmp_path / "timelimit"
    job = sbatch(cluster, server, tmp_path, run_dir, corpus, "--time=3", "--signal=B:USR2@150",
                 env_extra={"XLSTM_TEST_SAVE_DELAY": "5:100"})
    info = wait_job(cluster, job, timeout=900)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, f"{info}\n{log}\n{cluster.logs()}"
    assert "TIMEOUT" not in info["JobState"] and "got SIGUSR2" in log and "requeue 1 of 10" in log, log
    assert "training finished" in log and "start at step" in log and "(resumed" in log, log
    assert losses(run_dir) == straight[1]  # bitwise, every step
    mlflow_check(server, run_dir.name, straight[1])


def test_budget_exceeded_then_hard_kill_then_resubmit(straight, cluster, server, corpus, tmp_path):
    run_dir = tmp_path / "budget"
    # 1. no requeue left: stops with a checkpoint and says so, not requeued. The signal comes
    #    before any rank has started: it is sent again until a trainer has it, never lost
    a = sbatch(cluster, server, tmp_path, run_dir, corpus, env_extra={"XLSTM_MAX_REQUEUES": "0"})
    wait_for(lambda: "rendezvous" in log_of(tmp_path, a), "the job's start", job=a, cluster=cluster)
    subprocess.run(["scancel", "--batch", "--signal=USR2", a], env=cluster.client_env(),
                   check=True, timeout=30)
    info = wait_job(cluster, a)
    log = log_of(tmp_path, a)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", log
    assert info["Restarts"] == "0"
    assert "requeue budget exceeded" in log and "XLSTM_MAX_REQUEUES=0" in log, log
    assert "start at step 0" in log and "passed to the trainer" in log, log
    stopped = int(re.search(r"checkpoint at step (\d+) written", log).group(1))
    assert 1 <= stopped < 5, log
    # 2. resubmitted: resumes; killed hard (SIGKILL to everything) after the step-5 checkpoint
    #    (its step-10 checkpoint write is held for a minute, so it cannot finish first)
    b = sbatch(cluster, server, tmp_path, run_dir, corpus,
               env_extra={"XLSTM_TEST_SAVE_DELAY": "10:60"})
    done5 = run_dir / "checkpoints" / "step-000005" / "COMPLETE"
    wait_for(done5.exists, "the step-5 checkpoint", job=b, cluster=cluster)
    # SIGKILL to every process of the training step at once (a plain `scancel` of the job
    # would send SIGTERM first, and the trainer would checkpoint on that)
    subprocess.run(["scancel", "--signal=KILL", f"{b}.0"], env=cluster.client_env(), check=True,
                   timeout=30)
    info = wait_job(cluster, b)
    log = log_of(tmp_path, b)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "training failed" in log and "not requeued" in log, log
    assert f"start at step {stopped} (resumed" in log, log
    # 3. resubmitted again: resumes from the last complete checkpoint and finishes
    c = sbatch(cluster, server, tmp_path, run_dir, corpus)
    info = wait_job(cluster, c)
    log = log_of(tmp_path, c)
    assert info["JobState"] == "COMPLETED", log
    assert "start at step 5 (resumed" in log, log  # the last complete checkpoint
    assert losses(run_dir) == straight[1]
    mlflow_check(server, run_dir.name, straight[1])


def test_dead_rank_takes_the_job_down(cluster, server, corpus, tmp_path):
    run_dir = tmp_path / "dead"
    job = sbatch(cluster, server, tmp_path, run_dir, corpus)
    wait_for(lambda: logged_step(run_dir) >= 2, "step 2", job=job, cluster=cluster)
    pid = trainer_pid(job, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    info = wait_job(cluster, job, timeout=120)
    assert time.monotonic() - t0 < 90
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert "training failed" in log and "not requeued" in log


def test_clear_failures(cluster, server, corpus, tmp_path):
    env = job_env(cluster, server)
    args = train_args(tmp_path / "x", corpus)
    # more nodes than the partition has: Slurm's own message (sbatch), plus a hint (submit)
    out = subprocess.run(["sbatch", "-N", "3", SBATCH, "configs/tiny.yaml", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Batch job submission failed" in out.stderr
    out = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "configs/tiny.yaml",
                          "--nodes", "3", *args, "train.global_batch_size=6"], cwd=ROOT, env=env,
                         capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sbatch rejected the job" in out.stderr
    assert "More processors requested than permitted" in out.stderr
    assert "hint: more nodes (or CPUs) than the partition has" in out.stderr
    # a missing config: the launcher says so before anything is queued
    out = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "configs/nope.yaml",
                          "--nodes", "2", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "config configs/nope.yaml does not exist" in out.stderr
    # ... and a job given one ends at once with the reason, not requeued
    job = sbatch(cluster, server, tmp_path, tmp_path / "nope", corpus, config="configs/nope.yaml")
    info = wait_job(cluster, job, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert "config configs/nope.yaml does not exist" in log_of(tmp_path, job)


# --------------------------------------------------------------------------- submitit

def submit(cluster, server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm.submit", *args], cwd=ROOT,
                          env=job_env(cluster, server), capture_output=True, text=True,
                          timeout=timeout)


def test_submitit_preempted_job_requeues_and_resumes(straight, cluster, server, corpus, tmp_path):
    run_dir = tmp_path / "submitit"
    out = submit(cluster, server, "--config", "configs/tiny.yaml", "--nodes", "2",
                 "--cpus-per-task", "1", "--folder", str(tmp_path / "sub" / "%j"),
                 *train_args(run_dir, corpus))
    assert out.returncode == 0, out.stdout + out.stderr
    job = re.search(r"job (\d+) submitted \(2 node\(s\) x 1 rank\(s\)\)", out.stdout).group(1)
    assert f"log: {tmp_path / 'sub' / job}" in out.stdout and "MLflow: " + server.uri in out.stdout
    wait_for(lambda: logged_step(run_dir) >= 2, "step 2", job=job, cluster=cluster)
    # what Slurm does at --signal=USR2@N: the signal to every step of the job
    subprocess.run(["scancel", "--signal=USR2", job], env=cluster.client_env(), check=True,
                   timeout=30)
    info = wait_job(cluster, job)
    log = "".join(p.read_text() for p in sorted((tmp_path / "sub" / job).glob("*.out")))
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "checkpoint written; requeue 1 of 10" in log and "training finished" in log
    assert losses(run_dir) == straight[1]
    mlflow_check(server, run_dir.name, straight[1])


def test_submit_dry_run_matches_the_template(corpus, tmp_path):
    out = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "configs/tiny.yaml",
                          "--nodes", "2", "--time", "02:00:00", "--dry-run",
                          *train_args(tmp_path / "dry", corpus)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    template = Path(SBATCH).read_text()
    for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert line in script and line in template
    assert "#SBATCH --nodes=2" in script and "#SBATCH --time=120" in script
    delay = re.search(r"#SBATCH --signal=B:USR2@(\d+)", template).group(1)
    assert f"#SBATCH --signal=USR2@{delay}" in script
    assert "srun " in script and "--kill-on-bad-exit=1" in script
    assert "--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d" in script
    assert "-m pretrain.rank --config" in script and "--resume auto" in script
    assert "--resume auto" in template and "--nnodes=\"$1\"" in template
    assert not (tmp_path / "dry").exists()  # nothing submitted, nothing written


def test_submit_local_runs_to_completion(corpus, tmp_path):
    run_dir = tmp_path / "local"
    args = overrides(run_dir, corpus, "train.steps=4", procs=1)
    out = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "configs/tiny.yaml",
                          "--local", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1",
                                               PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "'status': 'finished'" in out.stdout
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "step-000004" / "COMPLETE").exists()


def test_submit_local_signal_with_no_requeue_left_stops_with_a_checkpoint(corpus, tmp_path):
    """submitit's checkpoint path on the local executor: its timeout signal (USR2, sent
    `--signal-delay-s` before `--time`) reaches the ranks through TrainTask.checkpoint, the
    trainer checkpoints, and with no requeue left the job fails saying so."""
    run_dir = tmp_path / "local-budget"
    args = overrides(run_dir, corpus, "train.steps=100000", "checkpoint.every=100000", procs=1)
    out = subprocess.run([sys.executable, "-m", "slurm.submit", "--config", "configs/tiny.yaml",
                          "--local", "--time", "1", "--signal-delay-s", "40", "--max-requeues", "0",
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "requeue budget exceeded" in out.stderr and "--max-requeues 0" in out.stderr, out.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 100000 and sorted(losses(run_dir)) == list(range(1, state["step"] + 1))

"""Fault drills (issue 16): real kills, real signals, a real full disk (tmpfs, 2 ranks), a
real MLflow server killed and restarted while a run goes, torn, bit-flipped and foreign
checkpoints, bad input paths, and the launcher (`python -m pretrain.launch`) passing the
trainer's exit codes on while a real crash stays torchrun's report.

Every drill asserts what the README's "Reliability" table says: no corrupt checkpoint is
ever loaded (the `loaded ...` line names a sound one), no training sample is lost or
repeated (the losses of every step equal an uninterrupted run's bitwise, and so does the
final data position), the MLflow run is intact (one run, every step once) and each
failure is named in one line without a traceback. Runs are shared between drills: one
uninterrupted reference per world size, copies of its run folder for the checkpoint drills.
About 8 minutes on 2 busy shared cores; the disk drill needs root to mount a tmpfs
(CI runs as root; XLSTM_STRICT=1 turns its skip into a failure).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow_server import MlflowServer
from trainrun import ROOT, command, env, hooked, losses, mlflow_loss_steps, overrides, run

from pretrain import train
from pretrain.checkpoint import CheckpointManager, load_model, read_trainer_state, verify_files

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EVERY, STEPS = 6, 12  # checkpoints at 6 and 12: few steps keep the drills to minutes
MID, LAST = f"step-{EVERY:06d}", f"step-{STEPS:06d}"


def args_for(run_dir: Path, corpus, *extra: str, procs: int = 1) -> list[str]:
    return overrides(run_dir, corpus, f"train.steps={STEPS}", f"checkpoint.every={EVERY}", *extra, procs=procs)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus) -> Path:
    """The uninterrupted one-process reference run."""
    run_dir = tmp_path_factory.mktemp("faults") / "straight"
    run(command(0, args_for(run_dir, corpus)))
    return run_dir


@pytest.fixture(scope="module")
def straight2(tmp_path_factory, corpus) -> Path:
    """The uninterrupted two-rank FSDP reference run."""
    run_dir = tmp_path_factory.mktemp("faults") / "straight2"
    run(command(2, args_for(run_dir, corpus, "distributed.backend=fsdp", procs=2)))
    return run_dir


def launch(nproc: int, args: list[str]) -> list[str]:
    """The documented multi-process launch: `python -m pretrain.launch --nproc_per_node=N -- ARGS`."""
    return [sys.executable, "-m", "pretrain.launch", f"--nproc_per_node={nproc}", "--",
            "--config", str(ROOT / "configs" / "tiny.yaml"), "--resume", "auto", *args]


def copy_run(src: Path, dst: Path) -> Path:
    """A second run folder holding `src`'s checkpoints, metrics and local MLflow store:
    what the reference run left, for a drill to damage."""
    shutil.copytree(src, dst)
    return dst


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text[-3000:]
    return [x for x in text.splitlines() if "error" in x.lower() and "config: warning" not in x]


def assert_same_training(run_dir: Path, reference: Path, mlflow: bool = True) -> None:
    """Every step's loss bitwise as in `reference`, the same final data position, one
    MLflow run with every step once."""
    a, b = losses(reference), losses(run_dir)
    assert sorted(b) == list(range(1, STEPS + 1)) and a == b
    final = f"checkpoints/{LAST}"
    assert read_trainer_state(run_dir / final)["data"] == read_trainer_state(reference / final)["data"]
    if mlflow:
        run_ids, steps = mlflow_loss_steps(run_dir)
        assert len(run_ids) == 1 and steps == list(range(1, STEPS + 1))


def loaded_sound(stdout: str) -> list[str]:
    """The checkpoints a run says it loaded; each one complete and whole."""
    paths = [line.split("loaded ", 1)[1].split(" (", 1)[0] for line in stdout.splitlines()
             if line.startswith("[train] loaded ")]
    for p in paths:
        assert (Path(p) / "COMPLETE").is_file()
        verify_files(Path(p))
    return paths


# ------------------------------------------------------------------------- bad input


def test_missing_paths_fail_in_one_line_before_anything_starts(tmp_path, corpus, capsys):
    import torch.distributed

    from pretrain.launch import main as launch_main
    from slurm import submit

    tok, shards = corpus
    cases = [(f"data.train=[{tmp_path}/no/such/dir]", f"data.train: {tmp_path}/no/such/dir does not exist"),
             (f"data.val={tmp_path}/no/val", f"data.val: {tmp_path}/no/val does not exist"),
             (f"data.tokenizer={tmp_path}/no/tok", f"data.tokenizer: {tmp_path}/no/tok does not exist")]
    for bad, message in cases:
        args = [*args_for(tmp_path / "bad", corpus), bad]
        assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), *args]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert line.startswith(f"config error: {message}")
        assert not torch.distributed.is_initialized() and not (tmp_path / "bad").exists()
        # the launcher checks the same before anything is queued (--dry-run: it would print the script)
        assert submit.main(["--config", "configs/tiny.yaml", "--nodes", "1", "--dry-run", *args]) == 2
        out = capsys.readouterr()
        assert "#SBATCH" not in out.out
        (line,) = error_lines(out.err)
        assert line.startswith(f"config error: {message}")
        # and pretrain.launch, before torchrun starts any rank
        assert launch_main(["--nproc_per_node=1", "--", "--config", str(ROOT / "configs" / "tiny.yaml"),
                            *args]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert line.startswith(f"config error: {message}")
        assert not (tmp_path / "bad").exists()


@pytest.mark.multiprocess
def test_tokenizer_larger_than_the_model_is_one_line_from_rank_0(tmp_path, corpus):
    """Through the launcher with 2 ranks: an input error found by every rank (after the
    process group exists) is rank 0's one line and exit 2, not torchrun's crash report;
    a real crash (every rank raises a ValueError) is still torchrun's whole report."""
    args = args_for(tmp_path / "vocab", corpus, "distributed.backend=fsdp", procs=2)
    out = run(launch(2, [*args, "model.vocab_size=64"]), expect=2)
    (line,) = error_lines(out.stdout + out.stderr)  # no traceback, no torchrun failure table
    assert line.startswith("[train] error: model.vocab_size: 64 is smaller than the tokenizer's"), out.stderr
    assert "[launch]" not in out.stderr  # every rank ended on purpose: no rank was killed (pretrain.rank)
    out = run(launch(2, args), expect=1, XLSTM_TEST_SAVE_DELAY="not-a-step")  # Faults.from_env raises
    assert "ValueError: invalid literal for int()" in out.stderr  # the ranks' own tracebacks
    assert "ChildFailedError" in out.stderr and "Root Cause (first observed failure)" in out.stderr
    out = run([sys.executable, "-m", "pretrain.launch", "--nproc_per_node=2", *args], expect=2)  # no `--`
    (line,) = error_lines(out.stdout + out.stderr)
    assert line.startswith("launch error: no `--` before the trainer's arguments; usage: python -m pretrain.launch")


# ------------------------------------------------------------------------- checkpoints


def test_truncated_file_in_latest_checkpoint_is_named_then_fallback(straight, tmp_path, corpus):
    run_dir = copy_run(straight, tmp_path / "torn")
    part = run_dir / "checkpoints" / LAST / "model_optim" / "__0_0.distcp"
    part.write_bytes(part.read_bytes()[:1000])  # a torn write
    args = args_for(run_dir, corpus)
    out = run(command(0, args), expect=2)
    (line,) = error_lines(out.stderr)
    assert f"checkpoint {part.parent.parent} cannot be loaded: {part} is corrupt" in line
    assert line.endswith("add --fallback-on-corrupt")
    out = run(command(0, ["--fallback-on-corrupt", *args]))
    assert loaded_sound(out.stdout) == [str(run_dir / "checkpoints" / MID)]
    (warning,) = [x for x in out.stderr.splitlines() if "[train] warning" in x]
    assert f"{part} is corrupt" in warning and "trying the previous checkpoint" in warning
    assert (run_dir / "checkpoints" / f"{LAST}.corrupt").is_dir()  # set aside, never loaded again
    assert_same_training(run_dir, straight)


def test_bit_flip_in_a_checkpoint_part_is_named(straight, tmp_path):
    """A part with one bit flipped keeps its size: its xxh3 digest in files.json names it."""
    from pretrain.checkpoint import CheckpointError

    ckpt = shutil.copytree(straight / "checkpoints" / LAST, tmp_path / LAST)
    verify_files(ckpt)  # as written: sound
    part = ckpt / "model_optim" / "__0_0.distcp"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x10
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        verify_files(ckpt)
    assert str(err.value).startswith(f"{part} is corrupt: xxh3 ") and "written (same size" in str(err.value)


def test_torn_latest_pointer_is_ignored(straight, tmp_path, corpus):
    run_dir = copy_run(straight, tmp_path / "pointer")
    (run_dir / "checkpoints" / "latest").write_bytes(b"step-0000\xff\x00")  # torn mid-write
    out = run(command(0, args_for(run_dir, corpus)))  # nothing left to train: loads, evaluates
    assert loaded_sound(out.stdout) == [str(run_dir / "checkpoints" / LAST)]
    (warning,) = [x for x in out.stderr.splitlines() if "warning" in x and "config: warning" not in x]
    assert "latest names" in warning and "not a complete checkpoint; using" in warning
    assert_same_training(run_dir, straight)


def test_checkpoint_of_another_model_config_is_refused(straight, tmp_path, corpus):
    run_dir = copy_run(straight, tmp_path / "other")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    out = run(command(0, args_for(run_dir, corpus, "model.embedding_dim=64")), expect=2)
    (line,) = error_lines(out.stderr)
    assert "written by another model config (model.embedding_dim: 128 there, 64 here)" in line
    assert "--fallback-on-corrupt" not in line  # not corrupt: no fallback suggested
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


@pytest.mark.multiprocess
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_disk_full_while_checkpointing_then_resume_after_freeing_space(straight2, tmp_path, corpus):
    """A real full disk under 2 FSDP ranks, through the launcher: a tmpfs with room for one
    checkpoint and a half as the checkpoint folder."""
    size = sum(f.stat().st_size for f in (straight2 / "checkpoints" / MID).rglob("*") if f.is_file())
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 4096 * 4096}", "tmpfs", str(mnt)],
                   check=True)
    try:
        run_dir = tmp_path / "full"
        args = args_for(run_dir, corpus, f"checkpoint.dir={mnt}", "distributed.backend=fsdp", procs=2)
        out = run(launch(2, args), expect=train.EXIT_DISK_FULL)
        (line,) = error_lines(out.stdout + out.stderr)
        assert line.startswith(f"[train] error: no space left on device (ENOSPC) writing checkpoint step {STEPS} "
                               f"to {mnt}: about ") and "bytes needed" in line
        assert "--resume auto" in line
        assert sorted(p.name for p in mnt.iterdir()) == ["latest", MID]  # no partial .tmp folder
        verify_files(mnt / MID)
        load_model(mnt / MID)  # the previous checkpoint is intact and loads
        subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(mnt)], check=True)  # space freed
        out = run(launch(2, args))
        assert loaded_sound(out.stdout) == [str(mnt / MID)]
        a, b = losses(straight2), losses(run_dir)
        assert a == b and sorted(b) == list(range(1, STEPS + 1))
        assert read_trainer_state(mnt / LAST)["data"] == read_trainer_state(straight2 / "checkpoints" / LAST)["data"]
        run_ids, steps = mlflow_loss_steps(run_dir)
        assert len(run_ids) == 1 and steps == list(range(1, STEPS + 1))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------------- signals and kills


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"training ended (exit {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def logged_step(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return 0
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return max((r.get("step", 0) for r in rows if "loss" in r), default=0)


def test_sigterm_in_checkpoint_write_signal_storm_and_mlflow_server_killed(straight, tmp_path, corpus):
    """One run stopped three times over, against a real MLflow server that is SIGKILLed
    mid-run and restarted: SIGTERM while checkpoint 6 is being written (a hook holds the
    write open), then SIGTERM + SIGUSR1 + SIGUSR2 in a row, then to the end."""
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        run_dir = tmp_path / "signals"
        args = args_for(run_dir, corpus, "tracking.experiment=drills")
        mlflow_env = env(MLFLOW_TRACKING_URI=server.uri)
        written = run_dir / "checkpoints" / f"{MID}.tmp" / "rng" / "rank-00000.pt"
        proc = subprocess.Popen(hooked(command(0, args), save_delay=(EVERY, 15.0)), env=mlflow_env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(written.is_file, proc, f"checkpoint {EVERY}'s parts")
        proc.send_signal(signal.SIGTERM)  # while the checkpoint is being written
        server.stop(signal.SIGKILL)  # and the tracking server dies
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == train.EXIT_RESUMABLE, out[-2000:] + err[-3000:]
        (stop,) = [x for x in out.splitlines() if "stop requested" in x]
        assert "(signal 15)" in stop
        assert not list((run_dir / "checkpoints").glob("*.tmp"))

        proc = subprocess.Popen(command(0, args), env=mlflow_env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: logged_step(run_dir) >= EVERY + 3, proc, f"step {EVERY + 3}")
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):  # a storm: three in a row
            proc.send_signal(sig)
        out2, err = proc.communicate(timeout=300)
        assert proc.returncode == train.EXIT_RESUMABLE, out2[-2000:] + err[-3000:]
        assert len([x for x in out2.splitlines() if "stop requested" in x]) == 1
        assert "Traceback" not in err
        assert len(loaded_sound(out2)) == 1  # checked before keep-2 prunes it

        server.start()  # the server is back for the last leg
        out3 = run(command(0, args), MLFLOW_TRACKING_URI=server.uri).stdout
        assert len(loaded_sound(out3)) == 1
        assert_same_training(run_dir, straight, mlflow=False)
        client = MlflowClient(tracking_uri=server.uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "drills"]
        (mrun,) = client.search_runs([exp.experiment_id])
        assert sorted(m.step for m in client.get_metric_history(mrun.info.run_id, "loss")) == \
            list(range(1, STEPS + 1))
        assert client.get_run(mrun.info.run_id).info.status == "FINISHED"
    finally:
        server.stop()


@pytest.mark.multiprocess
def test_kill9_of_one_rank_at_a_random_step(straight2, tmp_path, corpus):
    reference = straight2
    seed = int(os.environ.get("XLSTM_FAULTS_SEED", random.randrange(1 << 30)))  # to replay a draw
    rng = random.Random(seed)
    at = rng.randint(2, STEPS - 3)
    run_dir = tmp_path / "kill9"
    cmd = command(2, args_for(run_dir, corpus, "distributed.backend=fsdp", procs=2))
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: logged_step(run_dir) >= at, proc, f"step {at}")
    workers = [p for p in psutil.Process(proc.pid).children() if "pretrain.train" in p.cmdline()]
    assert len(workers) == 2
    victim = rng.choice(workers)
    victim.send_signal(signal.SIGKILL)
    print(f"SIGKILL to rank pid {victim.pid} at step {logged_step(run_dir)} (drawn: {at}, "
          f"XLSTM_FAULTS_SEED={seed})")
    assert proc.wait(timeout=300) != 0
    done = CheckpointManager(run_dir / "checkpoints").complete()
    assert [c.step for c in done] in ([], [EVERY])
    out = run(cmd)
    assert f"start at step {done[-1].step if done else 0}" in out.stdout
    assert len(loaded_sound(out.stdout)) == len(done)
    assert_same_training(run_dir, reference, mlflow=bool(done))
    if not done:  # killed before any checkpoint: a fresh start, and so a new MLflow run
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        newest = max(runs, key=lambda r: r.info.start_time)
        assert len(runs) == 2 and newest.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(newest.info.run_id, "loss")) == \
            list(range(1, STEPS + 1))


def test_mlflow_server_killed_and_restarted_while_the_run_goes(tmp_path, corpus):
    """The real MLflow server SIGKILLed mid-run and started again (same port, same store)
    while the same run still goes: every metric of every step reaches the server once,
    the run ends FINISHED with its params, tags and artifacts, and training never waited
    for the server (steps were logged locally while it was down)."""
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "server")
    server.start()
    proc = None
    try:
        run_dir = tmp_path / "mlflow"
        args = args_for(run_dir, corpus, "tracking.experiment=drill", "tracking.run_name=drill")
        out_file, err_file = tmp_path / "train.out", tmp_path / "train.err"
        with open(out_file, "w") as out, open(err_file, "w") as err:
            # checkpoint 6's write held open 8 s: the run still goes when the tracker (every
            # 2 s) first finds the server gone, however fast the steps are
            proc = subprocess.Popen(hooked(command(0, args), save_delay=(EVERY, 8.0)),
                                    env=env(MLFLOW_TRACKING_URI=server.uri), cwd=ROOT, stdout=out, stderr=err)
        record = run_dir / "mlflow_run.json"  # the run exists on the server
        wait_for(lambda: record.is_file() and logged_step(run_dir) >= 2, proc, "the MLflow run and step 2")
        server.stop(signal.SIGKILL)
        down_at = logged_step(run_dir)
        wait_for(lambda: logged_step(run_dir) >= down_at + 3 and "unreachable" in err_file.read_text(), proc,
                 f"step {down_at + 3} and the tracker's report of the server gone")
        # hold the trainer (SIGSTOP) while the server restarts, so that the restart happens
        # while the run still goes however fast the steps are; it continues from there
        psutil.Process(proc.pid).suspend()
        up_at = logged_step(run_dir)
        try:
            server.start()
        finally:
            psutil.Process(proc.pid).resume()
        assert up_at < STEPS, "the run ended before the server was back"
        proc.wait(timeout=300)
        out, err = out_file.read_text(), err_file.read_text()
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        assert up_at - down_at >= 3  # trained on while the server was down: no waiting for it
        (down,) = [x for x in err.splitlines() if "unreachable" in x]
        (back,) = [x for x in err.splitlines() if "reachable again" in x]
        assert server.uri in down and "buffering" in down and "buffered data sent" in back
        assert "Traceback" not in err

        client = MlflowClient(tracking_uri=server.uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "drill"]
        (mrun,) = client.search_runs([exp.experiment_id])
        got = client.get_run(mrun.info.run_id)
        assert got.info.status == "FINISHED" and got.info.run_name == "drill"
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        keys = sorted({k for r in rows for k in r if k != "step"})
        assert sorted(got.data.metrics) == keys and "loss" in keys and "val_loss" in keys
        for key in keys:  # every point of metrics.jsonl once on the server, with its value
            want = sorted((r["step"], r[key]) for r in rows if key in r)
            history = sorted((m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, key))
            assert history == want, key
        assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, STEPS + 1))
        assert got.data.params["train.steps"] == str(STEPS) and got.data.params["tracking.experiment"] == "drill"
        assert got.data.tags["world_size"] == "1" and got.data.tags["backend"] == "none"
        assert {"git_commit", "parameters"} <= set(got.data.tags)
        assert "config.yaml" in {a.path for a in client.list_artifacts(mrun.info.run_id)}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        server.stop()


def test_a_finished_trainer_ignores_stop_signals_until_it_exits():
    """A stop signal that comes while a finished run's Python shuts down must not kill it
    (Python resets the handlers it set to the default, termination): `python -m
    pretrain.train` ignores USR1/USR2 once main() has returned, so pretrain.rank (which
    forwards only to a process that catches the signal) holds it, and one sent anyway is
    ignored."""
    code = (
        "import os, signal, sys\n"
        "from pretrain.trainer import StopSignal\n"
        "from pretrain.train import ignore_stop_signals\n"
        "from pretrain.rank import _catches\n"
        "StopSignal()\n"
        "assert _catches(os.getpid(), signal.SIGUSR2)\n"
        "ignore_stop_signals()\n"
        "assert not _catches(os.getpid(), signal.SIGUSR2)\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print('alive')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stderr
    source = (ROOT / "pretrain" / "train.py").read_text()
    assert "code = main(keep_memory=True)\n    ignore_stop_signals()\n    sys.exit(code)" in source

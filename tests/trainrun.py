"""Helpers for tests that run the real trainer: commands, environments, kills, logs.

Used by test_train.py and the backend/launcher/conversion/evaluation tests; the `corpus`
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


def random_checkpoint(tmp: Path, model_cfg: dict, tok_dir: Path, seed: int = 0) -> Path:
    """A complete checkpoint folder of a freshly initialized model (no training)."""
    import torch

    from data.tokenizer import Tokenizer
    from model import build_model, load_model_config
    from pretrain.checkpoint import write_weights_only

    cfg = load_model_config(model_cfg)
    torch.manual_seed(seed)
    sd = build_model(cfg).state_dict()
    return write_weights_only(tmp, cfg, lambda k: sd[k], Tokenizer.load(str(tok_dir)),
                                    overwrite=True)


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


def hooked(cmd: list[str], **faults) -> list[str]:
    """`command(0, ...)` run through pretrain.train.main with the hook object
    `pretrain.trainer.Faults(**faults)` (fault injection passed in, not read from the environment)."""
    assert cmd[1:3] == ["-m", "pretrain.train"], cmd
    code = ("import sys; from pretrain import train; from pretrain.trainer import Faults; "
            f"sys.exit(train.main(sys.argv[1:], hooks=Faults(**{faults!r})))")
    return [cmd[0], "-c", code, *cmd[3:]]


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


# ---------------------------------------------------------------- optimizer state checks


def dcp_state(path: Path) -> dict:
    """The whole state of a `model_optim/` DCP folder as full tensors, in this process
    ({"model": ..., "optim": {"state": {fqn: {...}}, "param_groups": [...]}})."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from pretrain.checkpoint.dcp import quiet_dcp, safe_dcp_reader

    with quiet_dcp():
        return _load_state_dict_from_keys(storage_reader=safe_dcp_reader(path))


# AdamW's implementation choice, made by each run for its own parameters (fused for plain
# tensors, foreach for FSDP's DTensors: pretrain/optim.py), not training state
IMPLEMENTATION_KEYS = ("foreach", "fused")


def assert_same_state(a, b, where: str = "") -> None:
    """Nested dicts/lists equal, tensors bitwise (dtype and shape included); the
    optimizer's implementation keys are not compared."""
    import torch

    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys differ"
        for k in a:
            if ".param_groups[" in where and k in IMPLEMENTATION_KEYS:
                continue
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def resave(folder: Path, out: Path, backend: str) -> None:
    """Under torchrun (or one process): the trainer's engine at this world size
    loads checkpoint `folder` (model and optimizer) as a resume does and writes
    its state again to out/model_optim, without a step in between."""
    import torch

    from model import build_model, load_model_config
    from pretrain.checkpoint import read_trainer_state
    from pretrain.config import load_train_config
    from pretrain.distributed import init_distributed
    from pretrain.engine import build_engine

    info = init_distributed()
    cfg_dict = read_trainer_state(folder)["config"]
    t = cfg_dict["train"]
    t["grad_accum"] = t["global_batch_size"] // (t["micro_batch_size"] * info.world_size)
    cfg_dict["distributed"]["backend"] = backend
    cfg = load_train_config(cfg_dict, world_size=info.world_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(load_model_config(cfg.model),
                        device="meta" if cfg.distributed.meta_init else info.device)
    engine = build_engine(model, cfg, info)
    engine.load(folder)
    out.mkdir(parents=True, exist_ok=True)
    engine.save(out)


def run_resave(folder: Path, out: Path, nproc: int, backend: str) -> None:
    """`resave` with nproc processes (0: one plain process)."""
    head = [sys.executable] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    run([*head, str(Path(__file__)), "--resave", str(folder), str(out), backend])


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--resave":
        sys.path.insert(0, str(ROOT))
        import torch.distributed

        resave(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    else:
        sys.exit("usage: torchrun --nproc_per_node=N tests/trainrun.py --resave CKPT OUT BACKEND")

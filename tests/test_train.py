"""The trainer end to end: real torchrun processes over gloo, real SIGKILLs,
real shards, the local MLflow store. Losses are compared bitwise."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from trainrun import (
    ROOT,
    assert_same_state,
    command,
    dcp_state,
    env,
    hooked,
    kill_after_checkpoint,
    kill_tree,
    losses,
    mlflow_loss_steps,
    overrides,
    run,
    run_resave,
)

from pretrain import train
from pretrain.checkpoint import CheckpointManager, load_model

pytestmark = pytest.mark.slow


@pytest.mark.multiprocess
def test_fsdp_sigkill_resume_is_bitwise_exact(tmp_path, corpus):
    straight = tmp_path / "straight"
    run(command(2, overrides(straight, corpus, "distributed.backend=fsdp", "train.steps=30")))
    broken = tmp_path / "broken"
    cmd = command(2, overrides(broken, corpus, "distributed.backend=fsdp", "train.steps=30"))
    kill_after_checkpoint(cmd, broken, 10)
    out = run(cmd)
    assert "start at step 10" in out.stdout
    a, b = losses(straight), losses(broken)
    assert sorted(a) == list(range(1, 31)) and sorted(b) == list(range(1, 31))
    assert a == b  # bitwise: the same floats at every step
    run_ids, steps = mlflow_loss_steps(broken)
    assert len(run_ids) == 1 and steps == list(range(1, 31))  # one run, each step once


@pytest.mark.multiprocess
def test_fsdp_world_size_change(tmp_path, corpus):
    """2 -> 1 and 1 -> 2 processes: weights identical after load, training goes on;
    the state loaded at the new world size, written again with no step in between,
    is the saved one tensor by tensor (weights, AdamW's exp_avg, exp_avg_sq and step
    of every parameter, the parameter groups)."""
    for first, second, name in ((2, 1, "two_to_one"), (0, 2, "one_to_two")):
        run_dir = tmp_path / name

        def args(nproc: int, steps: int, run_dir: Path = run_dir) -> list[str]:
            backend = "fsdp" if nproc else "none"
            return overrides(run_dir, corpus, f"distributed.backend={backend}", f"train.steps={steps}",
                             procs=max(1, nproc))

        run(command(first, args(first, 10)))
        saved = CheckpointManager(run_dir / "checkpoints").latest()
        assert saved.step == 10
        model, _ = load_model(saved.path)
        expected = sum(p.double().pow(2).sum() for p in model.parameters()).item()
        before = losses(run_dir)
        out = run(command(second, args(second, 14)))
        got = float(re.search(r"parameter sum of squares (\S+)", out.stdout).group(1))
        assert got == pytest.approx(expected, rel=1e-12)
        after = losses(run_dir)
        assert sorted(after) == list(range(1, 15))
        assert all(after[s] == before[s] for s in range(1, 11))
        assert after[11] < before[1] - 0.5  # continues from the trained weights, not from scratch
        state = json.loads((CheckpointManager(run_dir / "checkpoints").latest().path
                            / "trainer_state.json").read_text())
        assert state["data"]["world_size"] == max(1, second) and state["step"] == 14
        resaved = tmp_path / f"{name}_resaved"
        run_resave(saved.path, resaved, second, "fsdp" if second else "none")
        before_state = dcp_state(saved.path / "model_optim")
        after_state = dcp_state(resaved / "model_optim")
        names = {n for n, _ in model.named_parameters()}
        adam = before_state["optim"]["state"]
        assert set(adam) == names and all(set(adam[n]) == {"exp_avg", "exp_avg_sq", "step"} for n in names)
        assert all(float(adam[n]["step"]) == 10 and adam[n]["exp_avg_sq"].abs().sum() > 0 for n in names)
        assert_same_state(before_state, after_state, name)


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, corpus):
    run_dir = tmp_path / "run"
    cmd = command(0, overrides(run_dir, corpus, "train.steps=20", "checkpoint.every=5", procs=1))
    proc = subprocess.Popen(hooked(cmd, save_delay=(10, 60.0)), env=env(), cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = run_dir / "checkpoints" / "step-000010.tmp"
    deadline = time.time() + 300
    while not (partial / "rng").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc, signal.SIGKILL)
    manager = CheckpointManager(run_dir / "checkpoints")
    assert manager.latest().step == 5 and partial.is_dir() and not (partial / "COMPLETE").exists()
    out = run(cmd)
    assert "start at step 5" in out.stdout
    assert [c.step for c in manager.complete()] == [15, 20] and not partial.exists()


def test_nonfinite_loss_skipped_then_stops(tmp_path, corpus):
    run_dir = tmp_path / "skip"
    out = run(hooked(command(0, overrides(run_dir, corpus, "train.steps=6", procs=1)), nan_steps=(3,)))
    assert "non-finite loss or gradients, update skipped (1 in a row)" in out.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["skipped_steps"] == 1 and train_rows[2]["loss"] is None
    model, _ = load_model(CheckpointManager(run_dir / "checkpoints").latest().path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    stop_dir = tmp_path / "stop"
    out = run(hooked(command(0, overrides(stop_dir, corpus, "train.steps=10", "train.max_nonfinite_steps=3",
                                          procs=1)), nan_steps=(2, 3, 4)), expect=1)
    assert "3 non-finite steps in a row (train.max_nonfinite_steps=3); stopping at step 4" in out.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["optimizer.lrr=1"], "optimizer.lrr: unknown key; did you mean 'lr'?"),
        (["train.steps=ten"], "train.steps: expected an int, got 'ten'"),
        (["train.grad_accum=3"], "train.global_batch_size: got 4, but micro_batch_size x grad_accum x data-parallel size = 2 x 3 x 1 = 6"),
        (["distributed.backend=deepspeed", "distributed.zero_stage=4"],
         "distributed.zero_stage: got 4, allowed values: 1, 2, 3"),
        (["trian.steps=1"], "trian: unknown section; did you mean 'train'?"),
        (["model.slstm_at=[9]"], "model.slstm_at: index 9 is outside the stack"),
        (["schedule.kind=linear"], "schedule.kind: got 'linear', allowed values"),
    ],
)
def test_bad_config_is_one_line_and_starts_nothing(tmp_path, corpus, capsys, extra, message):
    code = train.main(["--config", str(ROOT / "configs" / "tiny.yaml"),
                       *overrides(tmp_path / "bad", corpus, *extra, procs=1)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not torch.distributed.is_initialized() and not (tmp_path / "bad").exists()


@pytest.mark.multiprocess
def test_meta_init_is_world_size_independent(tmp_path, corpus):
    """Meta-device construction with sharded initialization: 2 processes and 1 give
    the same weights (lr 0 keeps the initial ones), with the documented gate biases."""
    weights = []
    for nproc in (2, 1):
        run_dir = tmp_path / f"meta{nproc}"
        run(command(nproc, overrides(
            run_dir, corpus, "distributed.backend=fsdp", "distributed.meta_init=true",
            "train.steps=1", "optimizer.lr=0", "optimizer.weight_decay=0", "model.vocab_size=512",
            "model.embedding_dim=128", "model.num_heads=2", "model.num_blocks=2", procs=nproc,
        ), config="large-1.3b.yaml"))
        model, _ = load_model(CheckpointManager(run_dir / "checkpoints").latest().path)
        weights.append(model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    fbias = weights[0]["blocks.0.mlstm.fgate.bias"]
    assert torch.allclose(fbias, torch.linspace(3.0, 6.0, fbias.numel()))
    assert all(torch.isfinite(w).all() for w in weights[0].values())

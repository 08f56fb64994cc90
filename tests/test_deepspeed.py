"""The DeepSpeed backend end to end: real torchrun processes over gloo (DeepSpeed's
CPU accelerator), real SIGKILLs of the whole tree, losses compared bitwise.

DeepSpeed JIT-builds a shared-memory communication op on its first run (about
40 s); TORCH_EXTENSIONS_DIR points at the repository's gitignored .cache/ so
that happens once per machine, not once per run.

Run alone:  OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_deepspeed.py
The file is also a script: `torchrun --nproc_per_node=1 tests/test_deepspeed.py
--check-engine CHECKPOINT` checks the engine in-process (see `check_engine`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainrun import ROOT, command, env, kill_after_checkpoint, losses, overrides, run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 16  # 10 steps, a checkpoint, a SIGKILL, a resume, 6 more
DS_ENV = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                 str(ROOT / ".cache" / "torch_extensions")),
          "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def ds_args(run_dir: Path, corpus, stage: int, precision: str, procs: int = 2) -> list[str]:
    return overrides(run_dir, corpus, "distributed.backend=deepspeed",
                     f"distributed.zero_stage={stage}", f"distributed.precision={precision}",
                     f"train.steps={STEPS}", procs=procs)


@pytest.fixture(scope="module")
def zero2_straight(tmp_path_factory, corpus) -> Path:
    """16 straight steps, ZeRO-2 fp32, 2 processes (checkpoints at 10 and 16)."""
    run_dir = tmp_path_factory.mktemp("ds") / "zero2_straight"
    run(command(2, ds_args(run_dir, corpus, 2, "fp32")), **DS_ENV)
    return run_dir


def _sigkill_resume(tmp_path: Path, corpus, stage: int, precision: str, straight: Path) -> None:
    broken = tmp_path / "broken"
    cmd = command(2, ds_args(broken, corpus, stage, precision))
    kill_after_checkpoint(cmd, broken, 10, **DS_ENV)
    assert not (broken / "checkpoints" / f"step-{STEPS:06d}").exists()
    out = run(cmd, **DS_ENV)
    assert "start at step 10" in out.stdout
    a, b = losses(straight), losses(broken)
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == list(range(1, STEPS + 1))
    assert a == b  # bitwise: the same floats at every step
    saved = broken / "checkpoints" / f"step-{STEPS:06d}" / "deepspeed"
    assert json.loads((saved / "meta.json").read_text())["zero_stage"] == stage
    assert len(list((saved / "state").glob("*optim_states.pt"))) == 2  # one partition per rank


def test_zero2_sigkill_resume_is_bitwise_exact(tmp_path, corpus, zero2_straight):
    _sigkill_resume(tmp_path, corpus, 2, "fp32", zero2_straight)


def test_zero3_bf16_sigkill_resume_is_bitwise_exact(tmp_path, corpus):
    straight = tmp_path / "straight"
    run(command(2, ds_args(straight, corpus, 3, "bf16")), **DS_ENV)
    _sigkill_resume(tmp_path, corpus, 3, "bf16", straight)


def test_world_size_change_through_universal_checkpoint(tmp_path, corpus, zero2_straight):
    """A ZeRO-2 checkpoint of 2 processes resumes with 1: converted once to
    DeepSpeed's universal format, same weights and optimizer state, training goes on."""
    from model import build_model, load_model_config
    from pretrain.checkpoint import CheckpointError, load_model
    from pretrain.deepspeed_engine import UNIVERSAL_TAG, load_deepspeed_weights, universal_command

    run_dir = tmp_path / "two_to_one"
    saved = run_dir / "checkpoints" / "step-000010"
    shutil.copytree(zero2_straight / "checkpoints" / "step-000010", saved)
    # the model export path: a clear error from load_model, the weights from our loader
    with pytest.raises(CheckpointError, match="model_optim: missing .*DeepSpeed"):
        load_model(saved)
    weights = load_deepspeed_weights(saved)
    state = json.loads((saved / "trainer_state.json").read_text())
    model = build_model(load_model_config(state["config"]["model"]))
    model.load_state_dict(weights, strict=True)
    expected = sum(p.double().pow(2).sum() for p in model.parameters()).item()

    out = run(command(1, ds_args(run_dir, corpus, 2, "fp32", procs=1)), **DS_ENV)
    assert "start at step 10" in out.stdout and "saved by 2 process(es)" in out.stdout
    got = float(re.search(r"parameter sum of squares (\S+)", out.stdout).group(1))
    assert got == pytest.approx(expected, rel=1e-12)
    assert (saved / "deepspeed" / UNIVERSAL_TAG / "zero").is_dir()
    after, before = losses(run_dir), losses(zero2_straight)
    assert sorted(after) == list(range(11, STEPS + 1))
    assert all(math.isfinite(after[s]) for s in after)
    assert after[11] < before[1] - 0.5  # continues from the trained weights, not from scratch
    final = json.loads((run_dir / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json")
                       .read_text())
    assert final["world_size"] == 1 and final["data"]["world_size"] == 1

    # in one process: the optimizer state DeepSpeed loaded is the saved one, and the
    # skip and non-finite paths leave weights and optimizer state bitwise unchanged
    check = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(Path(__file__)), "--check-engine", str(saved)],
        env=env(**DS_ENV), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and "ENGINE OK" in check.stdout, \
        check.stdout[-3000:] + check.stderr[-3000:]
    assert universal_command(saved).endswith(f"-m pretrain.deepspeed_engine to-universal {saved}")


# ---------------------------------------------------------------- in-process check


def check_engine(folder: Path) -> None:
    """Under torchrun with 1 process: load a 2-process ZeRO-2 checkpoint (universal
    path), compare fp32 weights and Adam moments with the converted files, then
    step(skip=True) and a non-finite gradient change nothing, and a real step does;
    a weights-only load gives the saved weights."""
    import torch

    from model import build_model, load_model_config
    from pretrain.config import load_train_config
    from pretrain.deepspeed_engine import UNIVERSAL_TAG, DeepSpeedEngine, load_deepspeed_weights
    from pretrain.distributed import init_distributed, lm_loss

    state = json.loads((folder / "trainer_state.json").read_text())
    cfg_dict = state["config"]
    cfg_dict["train"]["grad_accum"] = 2
    cfg = load_train_config(cfg_dict, world_size=1)
    info = init_distributed()
    torch.manual_seed(123)
    engine = DeepSpeedEngine(build_model(load_model_config(cfg.model)), cfg, info)
    engine.load(folder)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights = load_deepspeed_weights(folder)
    names = dict(engine.module.named_parameters())
    for name, p in names.items():
        moment = torch.load(folder / "deepspeed" / UNIVERSAL_TAG / "zero" / name / "exp_avg.pt",
                            weights_only=True)
        moment = moment["param"] if isinstance(moment, dict) else moment
        assert torch.equal(safe_get_full_fp32_param(p), weights[name]), name
        assert torch.equal(safe_get_full_optimizer_state(p, "exp_avg").flatten(),
                           moment.flatten()), name

    def snapshot():
        return {n: (safe_get_full_fp32_param(p).clone(),
                    safe_get_full_optimizer_state(p, "exp_avg").clone(), p.detach().clone())
                for n, p in names.items()}

    def same(a, b):
        return all(all(torch.equal(x, y) for x, y in zip(a[n], b[n])) for n in a)

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 32), generator=gen)

    def micro(scale: float = 1.0) -> None:
        loss = lm_loss(engine.forward(x[:, :-1], None), x[:, 1:])
        engine.backward(loss * scale / cfg.train.grad_accum)

    before = snapshot()
    micro()  # one finite micro batch, then the trainer's "non-finite loss" skip
    norm, stepped = engine.step(1e-3, skip=True)
    assert not stepped and same(before, snapshot()), "step(skip=True) changed the state"
    micro()
    micro(float("inf"))  # non-finite gradients reach DeepSpeed
    norm, stepped = engine.step(1e-3)
    assert not stepped and not math.isfinite(norm), (norm, stepped)
    assert same(before, snapshot()), "a non-finite gradient changed the state"
    micro()
    micro()
    norm, stepped = engine.step(1e-3)
    assert stepped and math.isfinite(norm) and not same(before, snapshot())
    # weights only (--fresh-optimizer), here across world sizes too: masters and compute copies
    torch.manual_seed(321)
    fresh = DeepSpeedEngine(build_model(load_model_config(cfg.model)), cfg, info)
    fresh.load(folder, with_optimizer=False)
    for name, p in fresh.module.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(p), weights[name]), name
        assert torch.equal(p.detach(), weights[name]), name
    print("ENGINE OK", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check-engine":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import torch.distributed

        check_engine(Path(sys.argv[2]))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    else:
        sys.exit("usage: torchrun --nproc_per_node=1 tests/test_deepspeed.py --check-engine CKPT")

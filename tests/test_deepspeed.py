"""The DeepSpeed backend end to end: real torchrun processes over gloo (DeepSpeed's
CPU accelerator), real SIGKILLs of the whole tree, losses compared bitwise.

DeepSpeed JIT-builds a shared-memory communication op on its first run (about
40 s); TORCH_EXTENSIONS_DIR points at the repository's gitignored .cache/ so
that happens once per machine, not once per run.

Run alone:  OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_deepspeed.py
The file is also a script that checks the engine in-process, full tensors:
`torchrun --nproc_per_node=N tests/test_deepspeed.py --check-engine CHECKPOINT`
(`check_engine`), `... --check-layouts CHECKPOINT STAGE/PRECISION...`
(`check_layouts`: another ZeRO stage or precision) and `... --check-import
CHECKPOINT STAGE/PRECISION...` (`check_import`: a weights-only imported checkpoint).
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


@pytest.fixture(scope="module")
def zero3_bf16_straight(tmp_path_factory, corpus) -> Path:
    """16 straight steps, ZeRO-3 bf16, 2 processes (checkpoints at 10 and 16)."""
    run_dir = tmp_path_factory.mktemp("ds") / "zero3_bf16_straight"
    run(command(2, ds_args(run_dir, corpus, 3, "bf16")), **DS_ENV)
    return run_dir


def test_zero3_bf16_sigkill_resume_is_bitwise_exact(tmp_path, corpus, zero3_bf16_straight):
    _sigkill_resume(tmp_path, corpus, 3, "bf16", zero3_bf16_straight)


def sumsq_of_saved(folder: Path) -> float:
    """Sum of squares of a DeepSpeed checkpoint's consolidated fp32 weights (each
    parameter once: tied weights are one parameter)."""
    from model import build_model, load_model_config
    from pretrain.checkpoint.deepspeed import load_weights as load_deepspeed_weights

    state = json.loads((folder / "trainer_state.json").read_text())
    model = build_model(load_model_config(state["config"]["model"]))
    model.load_state_dict(load_deepspeed_weights(folder), strict=True)
    return sum(p.double().pow(2).sum() for p in model.parameters()).item()


def loaded_sumsq(out: subprocess.CompletedProcess) -> float:
    return float(re.search(r"parameter sum of squares (\S+)", out.stdout).group(1))


def test_zero_stage_change_continues_the_run(tmp_path, corpus, zero2_straight):
    """A ZeRO-2 fp32 checkpoint resumed with ZeRO-3 (2 processes): through the
    universal format, the saved weights, and the losses of the straight ZeRO-2 run.
    In-process, ZeRO-1 (DeepSpeed's own loader: the same flat partitions) and
    ZeRO-3 bf16 hold the saved masters, moments and step, tensor by tensor."""
    run_dir = tmp_path / "zero3"
    saved = run_dir / "checkpoints" / "step-000010"
    shutil.copytree(zero2_straight / "checkpoints" / "step-000010", saved)
    probe = tmp_path / "probe" / "step-000010"
    shutil.copytree(saved, probe)
    out = run(command(2, ds_args(run_dir, corpus, 3, "fp32")), **DS_ENV)
    assert "start at step 10" in out.stdout
    assert loaded_sumsq(out) == pytest.approx(sumsq_of_saved(saved), rel=1e-12)
    after, before = losses(run_dir), losses(zero2_straight)
    assert sorted(after) == list(range(11, STEPS + 1))
    assert all(after[s] == pytest.approx(before[s], rel=1e-5) for s in after), (after, before)
    final = run_dir / "checkpoints" / f"step-{STEPS:06d}" / "deepspeed" / "meta.json"
    assert json.loads(final.read_text())["zero_stage"] == 3
    check_in_torchrun("--check-layouts", probe, "1/fp32", "3/bf16")


def test_zero3_bf16_checkpoint_into_zero1_zero2_fp32_and_one_process(tmp_path, corpus,
                                                                    zero3_bf16_straight):
    """A ZeRO-3 bf16 checkpoint of 2 processes: in-process into ZeRO-2 fp32 and
    ZeRO-1 bf16 with the saved state tensor by tensor; and the trainer resumes it
    with 1 process, ZeRO-1, fp32 (all three changed at once): the saved weights,
    training goes on from them."""
    probe = tmp_path / "probe" / "step-000010"
    shutil.copytree(zero3_bf16_straight / "checkpoints" / "step-000010", probe)
    check_in_torchrun("--check-layouts", probe, "2/fp32", "1/bf16")
    run_dir = tmp_path / "one"
    saved = run_dir / "checkpoints" / "step-000010"
    shutil.copytree(zero3_bf16_straight / "checkpoints" / "step-000010", saved)
    out = run(command(1, ds_args(run_dir, corpus, 1, "fp32", procs=1)), **DS_ENV)
    assert "start at step 10" in out.stdout and "saved by 2 process(es)" in out.stdout
    assert loaded_sumsq(out) == pytest.approx(sumsq_of_saved(saved), rel=1e-12)
    after, before = losses(run_dir), losses(zero3_bf16_straight)
    assert sorted(after) == list(range(11, STEPS + 1)) and all(math.isfinite(v) for v in after.values())
    assert after[11] < before[1] - 0.5  # continues from the trained weights, not from scratch


@pytest.fixture(scope="module")
def imported(tmp_path_factory, corpus) -> Path:
    """A weights-only checkpoint as `python -m pretrain.convert --from hf --to ours`
    writes it (its writer, `write_weights_only`), of the tiny preset's model, with
    weights of another seed than the trainer's initialization."""
    import torch
    import yaml

    from data.tokenizer import Tokenizer
    from model import build_model, load_model_config
    from pretrain.checkpoint import write_weights_only

    cfg = load_model_config(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"])
    torch.manual_seed(7)
    sd = build_model(cfg).state_dict()
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    return write_weights_only(out, cfg, lambda k: sd[k], Tokenizer.load(str(corpus[0])))


def test_imported_checkpoint_trains_and_its_checkpoints_resume_exactly(tmp_path, corpus, imported):
    """--resume IMPORTED --fresh-optimizer with ZeRO-3 bf16, 2 processes: the imported
    weights at step 0 with a fresh optimizer; the DeepSpeed checkpoints it then
    writes resume bitwise (--resume auto)."""
    from pretrain.checkpoint import load_model

    model, _ = load_model(imported)
    want = sum(p.double().pow(2).sum() for p in model.parameters()).item()
    first = tmp_path / "first"

    def args(run_dir: Path) -> list[str]:
        return overrides(run_dir, corpus, "distributed.backend=deepspeed", "distributed.zero_stage=3",
                         "distributed.precision=bf16", "train.steps=4", "checkpoint.every=2")

    out = run([*command(2, args(first), resume=str(imported)), "--fresh-optimizer"], **DS_ENV)
    assert f"start at step 0 (resumed from {imported})" in out.stdout
    # counted before ZeRO-3 partitions the parameters away
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,} parameters" in out.stdout, out.stdout
    assert loaded_sumsq(out) == pytest.approx(want, rel=1e-12)
    state = json.loads((first / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data"] is not None
    # the same run, its last checkpoint lost: --resume auto continues from step 2
    again = tmp_path / "again"
    shutil.copytree(first, again)
    shutil.rmtree(again / "checkpoints" / "step-000004")
    (again / "checkpoints" / "latest").unlink()
    out = run(command(2, args(again)), **DS_ENV)
    assert "start at step 2" in out.stdout
    a, b = losses(first), losses(again)
    assert sorted(a) == [1, 2, 3, 4] and a == b  # bitwise


def test_imported_checkpoint_loads_into_every_zero_stage(imported):
    """The weights-only load (--fresh-optimizer) of an imported checkpoint, in-process:
    ZeRO-1/2/3 x fp32/bf16 with 2 processes, ZeRO-1/2/3 fp32 with 1, the imported
    tensors exactly; a full load is refused naming --fresh-optimizer."""
    every = [f"{stage}/{precision}" for stage in (1, 2, 3) for precision in ("fp32", "bf16")]
    check_in_torchrun("--check-import", imported, *every, nproc=2)
    check_in_torchrun("--check-import", imported, "1/fp32", "2/fp32", "3/fp32", nproc=1)


def test_world_size_change_through_universal_checkpoint(tmp_path, corpus, zero2_straight):
    """A ZeRO-2 checkpoint of 2 processes resumes with 1: converted once to
    DeepSpeed's universal format, same weights and optimizer state, training goes on."""
    from model import build_model, load_model_config
    from pretrain.checkpoint import CheckpointError, load_model
    from pretrain.checkpoint.deepspeed import UNIVERSAL_TAG, universal_command
    from pretrain.checkpoint.deepspeed import load_weights as load_deepspeed_weights

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
    check_in_torchrun("--check-engine", saved, nproc=1)
    assert universal_command(saved).endswith(f"-m pretrain.checkpoint to-universal {saved}")


# ---------------------------------------------------------------- in-process check


def check_engine(folder: Path) -> None:
    """Under torchrun with 1 process: load a 2-process ZeRO-2 checkpoint (universal
    path), compare fp32 weights and Adam moments with the converted files, then
    step(skip=True) and a non-finite gradient change nothing, and a real step does;
    a weights-only load gives the saved weights."""
    import torch

    from model import build_model, load_model_config
    from pretrain.checkpoint.deepspeed import UNIVERSAL_TAG
    from pretrain.checkpoint.deepspeed import load_weights as load_deepspeed_weights
    from pretrain.config import load_train_config
    from pretrain.distributed import init_distributed
    from pretrain.engine import DeepSpeedEngine, lm_loss

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


def _engine_at(state: dict, stage: int, precision: str, seed: int):
    """A DeepSpeed engine of this process group for a checkpoint's model, with the
    given ZeRO stage and precision (micro batch 2, no accumulation)."""
    import copy

    import torch

    from model import build_model, load_model_config
    from pretrain.config import load_train_config
    from pretrain.distributed import init_distributed
    from pretrain.engine import DeepSpeedEngine

    info = init_distributed()
    cfg_dict = copy.deepcopy(state["config"])
    cfg_dict.setdefault("train", {}).update(
        micro_batch_size=2, grad_accum=1, global_batch_size=2 * info.world_size)
    cfg_dict.setdefault("data", {}).setdefault("train", ["unused"])  # an imported config has none
    cfg_dict["distributed"] = {**cfg_dict.get("distributed", {}), "backend": "deepspeed",
                               "zero_stage": stage, "precision": precision}
    cfg = load_train_config(cfg_dict, world_size=info.world_size)
    torch.manual_seed(seed)  # another initialization than the checkpoint's weights
    return DeepSpeedEngine(build_model(load_model_config(cfg.model)), cfg, info)


def _full_state(engine) -> tuple[dict, list[float], list[float]]:
    """({name: (fp32 master, exp_avg, exp_avg_sq, compute copy)} as full flat tensors,
    AdamW's steps over all flat partitions, the weight decay of each group)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine._init_optimizer_state()  # after DeepSpeed's own load the moments are not linked yet
    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            compute = p.detach().clone().flatten()  # ZeRO-3: gathered from the partitions
        moments = [safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")]
        out[name] = (safe_get_full_fp32_param(p).flatten(),
                     *[m.flatten() if m is not None else None for m in moments], compute)
    steps = sorted({float(engine._inner.state[hp].get("step", -1)) for hp in engine._master_flats()})
    return out, steps, [g["weight_decay"] for g in engine._inner.param_groups]


def check_layouts(folder: Path, targets: list[tuple[int, str]]) -> None:
    """Under torchrun with the checkpoint's world size: a DeepSpeed checkpoint is
    loaded in its own layout (DeepSpeed's loader: the reference), then with each
    target (ZeRO stage, precision); fp32 masters, AdamW moments and step, the
    groups' weight decay are equal tensor by tensor, the compute copies are the
    masters in the compute dtype."""
    import torch

    from pretrain.checkpoint.deepspeed import read_meta

    state = json.loads((folder / "trainer_state.json").read_text())
    meta = read_meta(folder)
    ref_engine = _engine_at(state, meta["zero_stage"], meta["precision"], seed=1)
    ref_engine.load(folder)
    ref, ref_steps, ref_decay = _full_state(ref_engine)
    assert ref_steps == [float(state["step"])], ref_steps
    del ref_engine
    for stage, precision in targets:
        engine = _engine_at(state, stage, precision, seed=2)
        engine.load(folder)
        got, steps, decay = _full_state(engine)
        where = f"{folder.name} ({meta['zero_stage']}, {meta['precision']}) -> ({stage}, {precision})"
        assert steps == ref_steps and decay == ref_decay, (where, steps, decay)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for name, (master, avg, avg_sq, _) in ref.items():
            g_master, g_avg, g_avg_sq, g_compute = got[name]
            assert torch.equal(g_master, master), (where, name, "fp32")
            assert torch.equal(g_avg, avg) and torch.equal(g_avg_sq, avg_sq), (where, name)
            assert torch.equal(g_compute, master.to(dtype)), (where, name, "compute copy")
        del engine
    print("LAYOUTS OK", flush=True)


def check_import(folder: Path, targets: list[tuple[int, str]]) -> None:
    """Under torchrun (any world size): a weights-only checkpoint imported with
    `pretrain.convert --to ours` loads (`with_optimizer=False`, what --fresh-optimizer
    does) with each target (ZeRO stage, precision): masters equal to its tensors,
    compute copies in the compute dtype, AdamW's state fresh. A full load is
    refused with a message that names the backend and --fresh-optimizer."""
    import torch

    from pretrain.checkpoint import DCPWeights

    state = json.loads((folder / "trainer_state.json").read_text())
    weights = DCPWeights(folder / "model_optim")
    for stage, precision in targets:
        engine = _engine_at(state, stage, precision, seed=3)
        engine.load(folder, with_optimizer=False)
        got, steps, _ = _full_state(engine)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for name, (master, _, _, compute) in got.items():
            want = weights[name].flatten()
            assert torch.equal(master, want), (stage, precision, name)
            assert torch.equal(compute, want.to(dtype)), (stage, precision, name)
        assert steps == [0.0], steps  # no AdamW step taken or loaded
        try:
            engine.load(folder)
        except RuntimeError as err:
            assert "written by distributed.backend none" in str(err) \
                and "--fresh-optimizer" in str(err), err
        else:
            raise AssertionError("a full load of an imported checkpoint was not refused")
        del engine
    print("IMPORT OK", flush=True)


def check_in_torchrun(what: str, *paths: str, nproc: int = 2) -> None:
    """Run one of this file's checks (--check-engine, --check-layouts,
    --check-import) under torchrun with `nproc` processes."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(Path(__file__)), what, *map(str, paths)],
        env=env(**DS_ENV), cwd=ROOT, capture_output=True, text=True, timeout=600)
    ok = {"--check-engine": "ENGINE OK", "--check-layouts": "LAYOUTS OK",
          "--check-import": "IMPORT OK"}[what]
    assert proc.returncode == 0 and ok in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    checks = {"--check-engine": lambda args: check_engine(Path(args[0])),
              "--check-layouts": lambda args: check_layouts(
                  Path(args[0]), [(int(a.split("/")[0]), a.split("/")[1]) for a in args[1:]]),
              "--check-import": lambda args: check_import(
                  Path(args[0]), [(int(a.split("/")[0]), a.split("/")[1]) for a in args[1:]])}
    if len(sys.argv) >= 3 and sys.argv[1] in checks:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        import torch.distributed

        checks[sys.argv[1]](sys.argv[2:])
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    else:
        sys.exit(f"usage: torchrun --nproc_per_node=N tests/test_deepspeed.py "
                 f"{'|'.join(checks)} CHECKPOINT...")

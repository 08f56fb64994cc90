"""Checks that run when a config loads, before any process starts: sequence length
against the model's context, the batch arithmetic (and grad_accum derived from the
world size), the epochs a token budget implies; and that every preset is a complete
recipe that loads at 8 and 32 GPUs."""

from __future__ import annotations

import json

import pytest
import yaml
from trainrun import ROOT

from pretrain.config import load_train_config

CONFIGS = ROOT / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
DATA = ["data.train=[unused]", "data.tokenizer=unused"]


def tiny(*overrides: str, world_size: int = 1):
    # the demo's recipe is for 2 ranks (8 = 4 x 1 x 2); one rank takes half the batch
    return load_train_config(CONFIGS / "tiny.yaml", [*DATA, "train.global_batch_size=4", *overrides],
                             world_size=world_size)


def test_seq_len_above_context_is_an_error():
    with pytest.raises(ValueError, match=r"data.seq_len: got 512, above model.context_length=256"):
        tiny("data.seq_len=512")


def test_seq_len_below_context_warns_in_one_line(capsys):
    tiny("data.seq_len=128")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.seq_len=128 is below model.context_length=256" in err[0]
    tiny()  # at the context: silent
    assert capsys.readouterr().err == ""


def test_batch_arithmetic_names_the_three_values():
    with pytest.raises(ValueError) as err:
        tiny("train.global_batch_size=8", "train.micro_batch_size=4", "train.grad_accum=2", world_size=2)
    assert "micro_batch_size x grad_accum x data-parallel size = 4 x 2 x 2 = 16" in str(err.value)


def test_grad_accum_null_is_derived_from_the_world_size():
    cfg = tiny("train.global_batch_size=32", "train.micro_batch_size=2", "train.grad_accum=null",
               "distributed.backend=fsdp", world_size=4)
    assert cfg.train.grad_accum == 4
    with pytest.raises(ValueError, match=r"train.grad_accum: null needs .* got 32 and 4 x 3 = 12"):
        tiny("train.global_batch_size=32", "train.micro_batch_size=4", "train.grad_accum=null",
             "distributed.backend=fsdp", world_size=3)


def _manifest(folder, tokens: int):
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"totals": {"tokens": tokens}}))
    return folder


def test_token_budget_beyond_the_data_reports_epochs(tmp_path, capsys):
    small = _manifest(tmp_path / "small", 40_000)
    big = _manifest(tmp_path / "big", 10_000_000)
    # budget: 100 steps x 4 x 256 = 102,400 tokens; half of it from each source
    tiny(f"data.train=[{small},{big}]", "data.tokenizer=unused")
    err = capsys.readouterr().err
    assert "102,400 tokens" in err and str(small) in err and "1.28 epochs" in err
    assert str(big) not in err
    tiny(f"data.train=[{big}]", "data.tokenizer=unused")
    assert "epochs" not in capsys.readouterr().err


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_complete_recipes(preset):
    doc = yaml.safe_load((CONFIGS / preset).read_text())
    for section in ("data", "train", "optimizer", "schedule", "distributed", "checkpoint"):
        assert section in doc, f"{preset}: no {section} section"
    assert doc["data"]["seq_len"] == doc["model"]["context_length"]
    for key in ("steps", "global_batch_size", "micro_batch_size", "grad_clip"):
        assert key in doc["train"], f"{preset}: train.{key} missing"
    for key in ("lr", "betas", "eps", "weight_decay", "no_decay"):
        assert key in doc["optimizer"], f"{preset}: optimizer.{key} missing"
    assert "Recipe:" in (CONFIGS / preset).read_text(), f"{preset}: no source comment"
    if preset == "tiny.yaml":
        return
    assert doc["distributed"]["precision"] == "bf16"
    for world in (8, 32):  # the README's 8 x H100 and 32 x H100
        cfg = load_train_config(CONFIGS / preset, DATA, world_size=world)
        t = cfg.train
        assert t.micro_batch_size * t.grad_accum * world == t.global_batch_size


def mlstm_head_dims(model_cfg) -> tuple[int, int]:
    """(DQK, DV) per head of a preset's mLSTM cell: the NeurIPS blocks split the
    up-projected inner dim over the heads; the large arch has its own qk and v dims."""
    if hasattr(model_cfg, "mlstm_inner_dim"):
        inner = model_cfg.mlstm_inner_dim // model_cfg.mlstm.num_heads
        return inner, inner
    return model_cfg.qk_dim // model_cfg.num_heads, model_cfg.v_dim // model_cfg.num_heads


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_on_the_triton_kernels(preset: str):
    """On a GPU backend auto picks Triton: a preset whose head dims the kernels refuse
    would stop at its first step (the NeurIPS presets' DQK is 384 to 1024)."""
    pytest.importorskip("triton")  # the CI installs it; XLSTM_STRICT makes this a failure
    from model.config import load_model_config
    from xlstm_kernels.triton_ops import MAX_DQK

    model_cfg = load_model_config({"model": yaml.safe_load((CONFIGS / preset).read_text())["model"]})
    dqk, dv = mlstm_head_dims(model_cfg)
    assert dqk <= MAX_DQK, f"{preset}: per-head DQK {dqk} (DV {dv}) above the kernels' {MAX_DQK}"

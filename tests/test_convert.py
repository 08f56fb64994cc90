"""Conversion (pretrain.convert, model.hf_adapter): real checkpoints from the real
trainer and engines, transformers' xLSTMForCausalLM loaded offline, tensors and
logits compared.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_convert.py
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from trainrun import ROOT, env, random_checkpoint, run

from data.tokenizer import Tokenizer
from model import LargeConfig, build_model, load_model_config
from model.hf_adapter import from_hf_config, load_folder, to_hf_config
from pretrain import convert as cv
from pretrain.checkpoint import load_model, read_weights, write_weights_only
from pretrain.checkpoint.weights import SafetensorsWeights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")

LARGE = {"arch": "large", "vocab_size": 512, "embedding_dim": 128, "num_blocks": 2,
         "num_heads": 2, "context_length": 256, "chunk_size": 16, "tie_weights": False}
DS_ENV = {"TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
          "DS_ACCELERATOR": "cpu"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def convert_cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pretrain.convert", *map(str, args)], env=env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_args(run_dir: Path, corpus, steps: int, *extra: str) -> list[str]:
    tok, shards = corpus
    return [f"run_dir={run_dir}", f"data.train=[{shards}]", f"data.val={shards / 'val'}",
            f"data.tokenizer={tok}", "data.seq_len=64", "train.micro_batch_size=2",
            "train.global_batch_size=2", f"train.steps={steps}", "train.log_every=1",
            f"checkpoint.every={steps}", "schedule.warmup_steps=1", "optimizer.lr=3e-3",
            "eval.batches=1", "hardware.peak_flops=1e11", *extra]


def write_config(path: Path, model: dict) -> Path:
    path.write_text(yaml.safe_dump({"model": model}))
    return path


@pytest.fixture(scope="module")
def large_ckpt(tmp_path_factory, corpus) -> Path:
    """A tiny large-architecture model trained 12 steps by the trainer (one process)."""
    tmp = tmp_path_factory.mktemp("large")
    conf = write_config(tmp / "large.yaml", LARGE)
    run([sys.executable, "-m", "pretrain.train", "--config", str(conf), "--resume", "none",
         *train_args(tmp / "run", corpus, 12)])
    return tmp / "run" / "checkpoints" / "step-000012"


@pytest.fixture(scope="module")
def hf_dir(large_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    proc = convert_cli(large_ckpt.parent, "--to", "hf", out)  # a checkpoint root: its latest
    assert "peak RSS" in proc.stdout
    return out


# ------------------------------------------------------------------ --to hf


@pytest.mark.slow
def test_hf_logits_and_greedy_generate_match(large_ckpt, hf_dir, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, _ = load_model(large_ckpt)
    conf = json.loads((hf_dir / "config.json").read_text())
    assert conf["model_type"] == "xlstm" and conf["architectures"] == ["xLSTMForCausalLM"]
    assert {"tokenizer.model", "tokenizer_config.json", "tokenizer.json",
            "model.safetensors"} <= {p.name for p in hf_dir.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert type(hf).__name__ == "xLSTMForCausalLM" and hf.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in ((1, 1), (3, 16), (2, 37), (4, 100)):  # lengths off the chunk size too
            x = torch.randint(0, 512, shape, generator=gen)
            assert rel_err(ours(x), hf(x).logits) < 1e-4, shape
        prompt = torch.randint(4, 512, (2, 9), generator=gen)
        want = ours.generate(prompt, 20, temperature=0)
        got = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(want, got)
    # the tokenizer loads offline and encodes as ours
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    tok = Tokenizer.load(str(corpus[0]))
    text = Path(json.__file__).read_text()[:4000]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eos_id, tok.pad_id)


@pytest.mark.slow
def test_sharded_hf_and_safetensors_outputs(large_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    ours, _ = load_model(large_ckpt)
    sharded = tmp_path / "hf_sharded"
    convert_cli(large_ckpt, "--to", "hf", sharded, "--max-shard-size", "300KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(sharded, local_files_only=True).eval()
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < 1e-4
    st = tmp_path / "st"
    convert_cli(large_ckpt, "--to", "safetensors", st, "--max-shard-size", "300KB")
    assert (st / "model.safetensors.index.json").is_file()
    same_tensors(load_folder(st).state_dict(), ours.state_dict())
    same_tensors(load_folder(sharded).state_dict(), ours.state_dict())
    # bfloat16 output keeps the names and halves the size
    bf = tmp_path / "bf16"
    convert_cli(large_ckpt, "--to", "hf", bf, "--dtype", "bfloat16")
    assert json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"
    half = SafetensorsWeights(bf)
    assert all(half.shape_dtype(k)[1] == torch.bfloat16 for k in half)


# ------------------------------------------------------------------ round trips and import


@pytest.mark.slow
def test_round_trip_ours_hf_ours_is_identical(large_ckpt, hf_dir, tmp_path):
    back = tmp_path / "back"
    convert_cli(hf_dir, "--from", "hf", "--to", "ours", back)
    ours, _ = load_model(large_ckpt)
    again, state = load_model(back)  # the trainer's own loader reads it
    same_tensors(again.state_dict(), ours.state_dict())
    assert state["step"] == 0 and (back / "COMPLETE").is_file()
    assert again.cfg == ours.cfg  # exact config back (xlstm_pretrain.json)
    meta = json.loads((back / "tokenizer" / "tokenizer.json").read_text())  # ours, not HF's
    assert "model" not in meta and meta["sha256"] == Tokenizer.load(str(back / "tokenizer")).sha256
    # our weights read one at a time equal the trainer's loader
    same_tensors(dict(read_weights(large_ckpt)), ours.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("weight_mode", ["single", "fused"])
def test_import_transformers_model_gives_same_logits_and_resumes(tmp_path, corpus, weight_mode):
    """A tiny random transformers xLSTM built here, imported with --from hf: same
    logits in our model, and the trainer continues from it (--fresh-optimizer)."""
    import transformers

    tok_dir, _ = corpus
    hf_conf = transformers.xLSTMConfig(
        vocab_size=512, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16,
        autocast_kernel_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    hf = transformers.xLSTMForCausalLM(hf_conf).eval()
    with torch.no_grad():  # away from the init so gates and norms matter
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_path = tmp_path / "hf"
    hf.save_pretrained(hf_path)
    if weight_mode == "fused":  # the official fused layout (transformers cannot init it itself)
        write_fused(hf_path, hf.state_dict())
    out = tmp_path / "imported"
    proc = convert_cli(hf_path, "--from", "hf", "--to", "ours", out, expect=1)
    assert "tokenizer missing" in proc.stderr  # the HF folder has no SentencePiece model
    convert_cli(hf_path, "--from", "hf", "--to", "ours", out, "--tokenizer", tok_dir)
    ours, state = load_model(out)
    x = torch.randint(0, 512, (3, 45))
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < 1e-4
    if weight_mode == "fused":
        return
    model_section = yaml.safe_load((out / "config.yaml").read_text())["model"]
    conf = write_config(tmp_path / "cont.yaml", model_section)
    want = sum(p.double().pow(2).sum() for p in ours.parameters()).item()
    proc = run([sys.executable, "-m", "pretrain.train", "--config", str(conf), "--resume",
                str(out), "--fresh-optimizer", *train_args(tmp_path / "cont", corpus, 3)])
    assert f"resumed from {out}" in proc.stdout and "start at step 0" in proc.stdout
    got = float(re.search(r"parameter sum of squares (\S+)", proc.stdout).group(1))
    assert got == pytest.approx(want, rel=1e-9)
    assert (tmp_path / "cont" / "checkpoints" / "step-000003" / "COMPLETE").is_file()


def write_fused(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    """Rewrite a transformers xLSTM folder in weight_mode "fused" (same function)."""
    from safetensors.torch import save_file

    fused: dict[str, torch.Tensor] = {}
    groups = {"mlstm_layer.qkv_opreact": ["mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v",
                                          "mlstm_layer.ogate_preact"],
              "mlstm_layer.ifgate_preact": ["mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"],
              "ffn.proj_up_gate_z": ["ffn.proj_up_gate", "ffn.proj_up"]}
    parts = {f"{p}.{w}" for ps in groups.values() for p in ps for w in ("weight", "bias")}
    for key, t in sd.items():
        inner = key.split(".", 3)[-1] if key.startswith("backbone.blocks.") else key
        if inner not in parts:
            fused[key] = t.clone()
    for j in range(2):
        pre = f"backbone.blocks.{j}."
        for name, members in groups.items():
            for w in ("weight", "bias"):
                if pre + f"{members[0]}.{w}" in sd:
                    fused[pre + f"{name}.{w}"] = torch.cat([sd[pre + f"{m}.{w}"] for m in members])
    (folder / "model.safetensors").unlink()
    save_file(fused, str(folder / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, "weight_mode": "fused"}))


# ------------------------------------------------------------------ multi-process checkpoints

LIVE_SCRIPT = r'''
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from pretrain.checkpoint import CheckpointManager
from pretrain.config import load_train_config
from pretrain.distributed import barrier, init_distributed
from pretrain.engine import build_engine, lm_loss
from model import build_model, load_model_config

out, backend, stage, tok, model_yaml = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
import yaml
model = yaml.safe_load(open(model_yaml))["model"]
cfg = load_train_config({"run_dir": str(out), "model": model,
                         "data": {"train": ["unused"], "tokenizer": tok},
                         "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 3},
                         "distributed": {"backend": backend, "zero_stage": stage}}, world_size=2)
info = init_distributed()
torch.manual_seed(0)
engine = build_engine(build_model(load_model_config(cfg.model)), cfg, info)
gen = torch.Generator().manual_seed(100 + info.rank)
for step in range(3):
    x = torch.randint(0, 512, (2, 33), generator=gen)
    engine.backward(lm_loss(engine.forward(x[:, :-1], None), x[:, 1:]))
    engine.step(1e-2)
manager = CheckpointManager(out / "checkpoints", rank=info.rank, barrier=barrier)
def parts(folder):
    engine.save(folder)
    if info.is_main:
        shutil.copytree(tok, folder / "tokenizer")
state = {"step": 3, "tokens_seen": 0, "run_id": None, "world_size": 2, "config": cfg.to_dict()}
manager.save(3, parts, state)
if backend == "fsdp":
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    live = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
else:
    from deepspeed.utils import safe_get_full_fp32_param
    live = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
if info.is_main:
    save_file({k: v.detach().clone().contiguous() for k, v in live.items()}, str(out / "live.safetensors"))
barrier()
torch.distributed.destroy_process_group()
'''


def two_process_checkpoint(tmp: Path, corpus, backend: str, stage: int, model: dict) -> Path:
    script = tmp / "live.py"
    script.write_text(LIVE_SCRIPT)
    conf = write_config(tmp / "model.yaml", model)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp), backend, str(stage), str(corpus[0]), str(conf)]
    run(cmd, **(DS_ENV if backend == "deepspeed" else {}))
    return tmp / "checkpoints" / "step-000003"


def live_tensors(tmp: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tmp / "live.safetensors"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_two_process_checkpoint_converts_to_live_tensors(tmp_path, corpus):
    """NeurIPS xLSTM with an sLSTM block (tied head), FSDP over 2 processes."""
    model = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    ckpt = two_process_checkpoint(tmp_path, corpus, "fsdp", 0, model)
    live = live_tensors(tmp_path)
    same_tensors({k: v for k, v in read_weights(ckpt).items()}, live)
    st = tmp_path / "st"
    convert_cli(ckpt, "--to", "safetensors", st)
    same_tensors(load_folder(st).state_dict(), live)
    # loadable by `model` alone: a fresh interpreter that never imports pretrain
    code = ("import sys, torch; from model.hf_adapter import load_folder; "
            f"m = load_folder({str(st)!r}); x = torch.randint(0, 512, (1, 8)); m(x); "
            "assert not any(k == 'pretrain' or k.startswith('pretrain.') for k in sys.modules); "
            "print('OK', sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
    proc = convert_cli(ckpt, "--to", "hf", tmp_path / "no", expect=1)
    assert "has no transformers model" in proc.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_zero3_two_process_checkpoint_converts_to_live_tensors(tmp_path, corpus):
    from transformers import AutoModelForCausalLM

    ckpt = two_process_checkpoint(tmp_path, corpus, "deepspeed", 3, LARGE)
    assert (ckpt / "deepspeed").is_dir() and not (ckpt / "model_optim").exists()
    live = live_tensors(tmp_path)
    same_tensors(dict(read_weights(ckpt)), live)
    out = tmp_path / "hf"
    convert_cli(ckpt, "--to", "hf", out)
    same_tensors(load_folder(out).state_dict(), live)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ours = load_folder(out)
    x = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < 1e-4


# ------------------------------------------------------------------ refusals


@pytest.fixture(scope="module")
def random_large(tmp_path_factory, corpus) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("rl") / "ckpt", LARGE, corpus[0])


def refused(capsys, *argv: str) -> str:
    assert cv.main([*map(str, argv)]) == 1
    return capsys.readouterr().err


def test_refuses_incomplete_checkpoint(random_large, tmp_path, capsys):
    broken = tmp_path / "step-000007"
    shutil.copytree(random_large, broken)
    (broken / "COMPLETE").unlink()
    err = refused(capsys, broken, tmp_path / "out", "--to", "safetensors")
    assert "no COMPLETE marker" in err and str(broken) in err
    assert "no COMPLETE marker" in refused(capsys, tmp_path, tmp_path / "o2", "--to", "hf")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_refuses_architecture_the_target_lacks(tmp_path, corpus, capsys):
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    ckpt = random_checkpoint(tmp_path / "neurips", tiny, corpus[0])
    err = refused(capsys, ckpt, tmp_path / "out", "--to", "hf")
    assert "arch" in err and "has no transformers model" in err and "--to safetensors" in err
    narrow = random_checkpoint(tmp_path / "narrow", {**LARGE, "embedding_dim": 64}, corpus[0])
    err = refused(capsys, narrow, tmp_path / "out", "--to", "hf")
    assert "qk_dim_factor" in err and "multiple of 64" in err
    # ... and safetensors takes both
    assert cv.main([str(ckpt), str(tmp_path / "st"), "--to", "safetensors"]) == 0


def test_refuses_config_that_does_not_match_tensors(random_large, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(random_large, bad)
    state = json.loads((bad / "trainer_state.json").read_text())
    state["config"]["model"]["num_heads"] = 4
    state["config"]["model"]["ffn_proj_factor"] = 2.0
    (bad / "trainer_state.json").write_text(json.dumps(state))
    err = refused(capsys, bad, tmp_path / "out", "--to", "safetensors")
    assert "does not match the tensors" in err and "blocks.0.ffn.gate.weight" in err
    state["config"]["model"]["num_blocks"] = 3
    state["config"]["model"]["ffn_proj_factor"] = 2.667
    (bad / "trainer_state.json").write_text(json.dumps(state))
    err = refused(capsys, bad, tmp_path / "out", "--to", "hf")
    assert "does not match the tensors" in err and "missing tensors" in err and "blocks.2" in err


def test_refuses_missing_tokenizer(random_large, tmp_path, capsys):
    notok = tmp_path / "notok"
    shutil.copytree(random_large, notok)
    shutil.rmtree(notok / "tokenizer")
    for target in ("hf", "safetensors", "ours"):
        err = refused(capsys, notok, tmp_path / f"out-{target}", "--to", target)
        assert "tokenizer missing" in err and "tokenizer.model" in err, err


def test_refuses_pickles_and_foreign_metadata(random_large, tmp_path, capsys):
    hf = tmp_path / "hf_bin"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(to_hf_config(LargeConfig(**{
        k: v for k, v in LARGE.items() if k != "arch"}))))
    torch.save({"x": torch.zeros(1)}, hf / "pytorch_model.bin")
    err = refused(capsys, hf, tmp_path / "out", "--from", "hf", "--to", "ours")
    assert "pytorch_model.bin are pickles, which are never loaded" in err
    # DCP metadata naming anything but DCP's own classes is refused before use
    evil = tmp_path / "evil"
    shutil.copytree(random_large, evil)

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (evil / "model_optim" / ".metadata").write_bytes(pickle.dumps(Boom()))
    err = refused(capsys, evil, tmp_path / "out2", "--to", "safetensors")
    assert "not a checkpoint metadata class" in err and not (tmp_path / "pwned").exists()


def test_adapter_config_round_trip_and_refusals():
    cfg = LargeConfig(**{k: v for k, v in LARGE.items() if k != "arch"})
    assert from_hf_config(to_hf_config(cfg), backend="auto") == cfg
    for bad, field in (({"gate_soft_cap": None}, "gate_soft_cap"),
                       ({"qk_dim_factor": 0.25}, "qk_dim_factor")):
        with pytest.raises(ValueError, match=field):
            to_hf_config(LargeConfig(**{**{k: v for k, v in LARGE.items() if k != "arch"}, **bad}))
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="add_out_norm"):
        from_hf_config({**to_hf_config(cfg), "add_out_norm": False})


def test_write_checkpoint_streams_one_tensor_at_a_time(tmp_path, corpus):
    """--to ours asks for each tensor only when DCP writes it, once."""
    cfg = load_model_config(LARGE)
    sd = build_model(cfg).state_dict()
    asked: list[str] = []

    def get(key: str) -> torch.Tensor:
        asked.append(key)
        return sd[key]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_weights_only(tmp_path / "ck", cfg, get, Tokenizer.load(str(corpus[0])))
    assert sorted(asked) == sorted(sd) and len(asked) == len(set(asked))
    same_tensors(load_model(out)[0].state_dict(), sd)

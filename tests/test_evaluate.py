"""Evaluation (pretrain.evaluate, pretrain.generate, pretrain/eval_tasks): the real
lm-evaluation-harness, offline, on our models; a model trained by the real
trainer scores above chance on tasks built from its training text, random
weights near chance; perplexity and the adapter's requests equal direct
computation; results reach the checkpoint's MLflow run.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_evaluate.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from trainrun import ROOT, env, random_checkpoint, run

from data.tokenizer import Tokenizer
from model import build_model, load_model_config
from pretrain import evaluate as ev
from pretrain.checkpoint import load_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")

TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]  # with an sLSTM block
LARGE = {"arch": "large", "vocab_size": 512, "embedding_dim": 128, "num_blocks": 2,
         "num_heads": 2, "context_length": 256, "chunk_size": 16}
FILES = ["bisect.py", "colorsys.py", "stat.py", "heapq.py"]  # the small training text


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, corpus) -> Path:
    """Shards of four standard-library files (the text the model is trained on)."""
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("small") / "shards"
    lib = Path(sysconfig.get_paths()["stdlib"])
    prepare([str(lib / f) for f in FILES], str(corpus[0]), str(out), text_mode="file",
            shard_tokens=4000, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, small_text) -> Path:
    """The tiny preset (mLSTM + sLSTM blocks) trained 200 steps on that text by the trainer,
    tracked in its local MLflow store."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run([sys.executable, "-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--resume", "none", f"run_dir={run_dir}", f"data.train=[{small_text}]",
         f"data.val={small_text}", f"data.tokenizer={corpus[0]}", "data.seq_len=128",
         "train.micro_batch_size=4", "train.global_batch_size=4", "train.steps=200",
         "train.log_every=50", "checkpoint.every=200", "schedule.warmup_steps=5",
         "optimizer.lr=5e-3", "eval.batches=1", "hardware.peak_flops=1e11"])
    return run_dir / "checkpoints" / "step-000200"


def direct_doc_nll(model: torch.nn.Module, ids: list[int], eos: int) -> float:
    """-log p of a document's tokens after the first and its EOS, one forward."""
    x = torch.tensor([ids + [eos]])
    with torch.no_grad():
        lp = torch.log_softmax(model(x[:, :-1]).double(), -1)
    return -lp[0].gather(-1, x[0, 1:, None]).sum().item()


@pytest.mark.slow
def test_trained_model_above_chance_random_near_chance(trained, small_text, tmp_path, corpus):
    out_json = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.evaluate", str(trained.parent),
         "--tasks", "xlstm_nextword,xlstm_cloze", "--task-shards", str(small_text),
         "--num-examples", "80", "--batch-size", "32", "--ppl-shards", str(small_text),
         "--output", str(out_json)],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    m = report["metrics"]
    assert m["xlstm_nextword/acc"] >= 0.45, m  # chance: 0.25
    assert m["xlstm_cloze/acc"] >= 0.03, m  # chance: ~0
    assert "xlstm_nextword/acc" in proc.stdout and "tokens" in proc.stdout  # the table
    # perplexity: token-weighted over every token of the shards, with the count
    manifest = json.loads((small_text / "manifest.json").read_text())
    ppl = report["perplexity"]
    assert ppl["tokens"] == manifest["totals"]["tokens"] and ppl["documents"] == len(FILES)
    assert ppl["ppl"] == pytest.approx(math.exp(ppl["loss"]))
    assert f"over {ppl['tokens']} tokens" in proc.stdout
    model, src = load_model(trained)
    docs = list(ev.iter_documents(str(small_text)))
    tok = Tokenizer.load(str(src.tokenizer))
    want = sum(direct_doc_nll(model, d, tok.eos_id) for d in docs) / sum(len(d) for d in docs)
    assert ppl["loss"] == pytest.approx(want, rel=1e-5)
    # the checkpoint's own MLflow run got the numbers at its step, and the JSON
    from mlflow.tracking import MlflowClient

    state = json.loads((trained / "trainer_state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{trained.parent.parent / 'mlflow.db'}")
    hist = client.get_metric_history(state["run_id"], "eval/xlstm_nextword/acc")
    assert [(h.step, h.value) for h in hist] == [(200, m["xlstm_nextword/acc"])]
    assert client.get_metric_history(state["run_id"], "eval/ppl/tokens")[0].value == ppl["tokens"]
    arts = [a.path for a in client.list_artifacts(state["run_id"], "eval/step-000200")]
    assert arts == ["eval/step-000200/results.json"]
    assert f"logged to MLflow run {state['run_id']}" in proc.stdout
    # random weights, same tasks: near chance
    rand = random_checkpoint(tmp_path / "random", TINY, corpus[0])
    report, _ = ev.evaluate(str(rand), tasks=["xlstm_nextword", "xlstm_cloze"],
                            task_shards=str(small_text), num_examples=80, batch_size=32)
    m = report["metrics"]
    assert 0.08 <= m["xlstm_nextword/acc"] <= 0.42, m
    assert m["xlstm_cloze/acc"] < 0.02, m


def make_lm(arch: str, corpus, max_length: int = 8, batch_size: int = 3):
    torch.manual_seed(1)
    model = build_model(load_model_config(TINY if arch == "xlstm" else LARGE)).eval()
    with torch.no_grad():  # away from the init so that every part matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = Tokenizer.load(str(corpus[0]))
    return ev.XLSTMEvalLM(model=model, tokenizer=tok, batch_size=batch_size,
                          max_length=max_length), model, tok


@pytest.mark.parametrize("arch", ["xlstm", "large"])
def test_adapter_requests_equal_direct_computation(arch, corpus):
    """loglikelihood (batched, windows of 8 tokens with the state carried), rolling
    loglikelihood and batched greedy generation (left-padded, state reset) against
    plain forwards and `model.generate` one prompt at a time."""
    from lm_eval.api.instance import Instance

    lm, model, tok = make_lm(arch, corpus)
    texts = ["def f(x):\n    return x + 1\n", "import os\nimport sys\n\nclass A:\n    pass",
             "for i in range(10):\n    print(i)", "x = 1", "    y", "x"]
    reqs = [Instance("loglikelihood", {}, (t, " = 0\n"), i) for i, t in enumerate(texts)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (lp, greedy) in zip([r.args for r in reqs], got):
        c_ids, cont_ids = lm._encode_pair(ctx, cont)
        x = torch.tensor([c_ids + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(x[:, :-1]).double(), -1)[0]
        tgt = x[0, len(c_ids):]
        rows = logp[len(c_ids) - 1:]
        assert lp == pytest.approx(rows.gather(-1, tgt[:, None]).sum().item(), rel=1e-5, abs=1e-5)
        assert greedy == bool((rows.argmax(-1) == tgt).all())
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                        for i, t in enumerate(texts)])
    for t, lp in zip(texts, rolling):
        ids = tok.encode(t)
        with torch.no_grad():
            first = torch.log_softmax(model(torch.tensor([[tok.eos_id]])).double(), -1)[0, 0, ids[0]]
        rest = -direct_doc_nll(model, ids[:-1], ids[-1]) if len(ids) > 1 else 0.0
        assert lp == pytest.approx(first.item() + rest, rel=1e-5, abs=1e-5)
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    outs = lm.generate_until([Instance("generate_until", {}, (t, gen_kwargs), i)
                              for i, t in enumerate(texts)])
    for t, text in zip(texts, outs):
        ids = tok.encode(t)
        alone = model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
        if tok.eos_id in alone:
            alone = alone[:alone.index(tok.eos_id)]
        assert text == tok.decode(alone).split("\n\n")[0], (t, text)


def test_registered_with_lm_eval_and_runs_by_name(tmp_path, corpus, small_text):
    import lm_eval
    from lm_eval.api.registry import get_model

    assert get_model("xlstm-pretrain") is ev.XLSTMEvalLM
    ckpt = random_checkpoint(tmp_path / "ckpt", LARGE, corpus[0])
    tm = ev.task_manager([], {"heldout_shards": str(small_text), "tokenizer": str(corpus[0]),
                              "num_examples": 6, "seed": 0}, ["xlstm_heldout"])
    out = lm_eval.simple_evaluate(model="xlstm-pretrain", model_args=f"pretrained={ckpt}",
                                  tasks=["xlstm_heldout"], batch_size=4, task_manager=tm,
                                  bootstrap_iters=0, log_samples=False)
    res = out["results"]
    assert set(res) >= {"xlstm_nextword", "xlstm_cloze", "xlstm_nextline", "xlstm_heldout_ppl"}
    assert 0 <= res["xlstm_nextword"]["acc,none"] <= 1
    assert res["xlstm_heldout_ppl"]["bits_per_byte,none"] > 0
    assert res["xlstm_nextline"]["exact_match,none"] >= 0
    assert out["n-samples"]["xlstm_nextword"]["effective"] == 6


def test_generate_cli_prints_tokens_per_second(tmp_path, corpus):
    ckpt = random_checkpoint(tmp_path / "ckpt", TINY, corpus[0])
    cmd = [sys.executable, "-m", "pretrain.generate", str(ckpt), "--prompt", "def main(",
           "--max-new-tokens", "10", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95",
           "--seed", "3", "--no-stop-at-eos"]
    first = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "tokens/s decode" in first.stderr and "10 new tokens" in first.stderr
    assert first.stdout.startswith("def main(")
    again = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.stdout == first.stdout  # seeded sampling
    # greedy equals model.generate
    from pretrain.generate import generate_text

    model, src = load_model(ckpt)
    tok = Tokenizer.load(str(src.tokenizer))
    text, timings = generate_text(model, tok, "class A:", 8, temperature=0, stop_at_eos=False)
    ids = tok.encode("class A:")
    want = model.generate(torch.tensor([ids]), 8, temperature=0)[0, len(ids):].tolist()
    assert text == tok.decode(want) and timings["new_tokens"] == 8
    bad = subprocess.run([sys.executable, "-m", "pretrain.generate", str(tmp_path), "--prompt",
                          "x"], env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "no COMPLETE marker" in bad.stderr

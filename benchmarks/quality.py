"""Language-model quality at equal parameters and equal tokens, and length extrapolation.

The xLSTM paper's claims: xLSTM models a language at least as well as a Transformer of
the same size trained on the same tokens, and its loss stays flat on sequences longer
than those it was trained on, where a RoPE Transformer's rises. Measured here on the
embedded corpus of `make demo` (the Python standard library's sources, its SentencePiece
tokenizer of vocab 512 and its shards: `data.make_demo_corpus`), every model trained at
context 256 with our trainer's pieces (`data.build_loader`, `pretrain.optim`: AdamW with
the trainer's parameter groups, linear warmup + cosine, gradient clipping at 1):

  xlstm[1:0]          NeurIPS xLSTM, mLSTM blocks only (8 blocks)
  xlstm[7:1]          NeurIPS xLSTM, one sLSTM block in eight (at index 3)
  large               our large (xLSTM-7B) architecture (4 blocks, SwiGLU width matched to
                      xlstm[1:0]'s parameter count), its 7B init
                      (`init: xlstm7b`: small/Wang normal, input-gate bias -10)
  large-torch-init    the same model with PyTorch's default init (`init: torch`)
  llama               Hugging Face `LlamaForCausalLM` (RoPE, SDPA), 4 layers, its FFN
                      width matched to the large arch's parameter count; standard init
                      N(0, 0.02) with the residual projections (o_proj, down_proj) scaled
                      by 1 / sqrt(2 layers); the best of three learning rates (`--llama-lrs`,
                      chosen on seed 0's final validation loss)

The xLSTM models train at `--lr`. Each run is a process of its own (`--jobs` at a time,
one thread each); `--seeds` seeds per model (init and data order; `--slow-seeds` for the two
NeurIPS models, whose torch path costs 3-4x the CPU time per token of the others), and the spread
(min-max over seeds) printed beside the mean: one seed cannot order models closer than
about 0.05 nats. Per run: the validation loss at context 256 every `--eval-every` steps
(the curve), and at the end the loss on the same `--extrap-seqs` x 2048 validation tokens
cut into sequences of 256, 1024 and 2048 (the extrapolation). Writes
`benchmarks/results/quality-<date>-cpu.{md,png,json}`. A measurement, never a test.

    .venv/bin/python benchmarks/quality.py [--quick] [--seeds 3] [--slow-seeds 3] [--steps 200]
        [--dim 64] [--jobs 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("xlstm[1:0]", "xlstm[7:1]", "large", "large-torch-init", "llama")
SLOW = ("xlstm[7:1]", "xlstm[1:0]")  # 3-4x the CPU time per token of the others (`--slow-seeds`)
TRAIN_CONTEXT = 256
EVAL_CONTEXTS = (256, 1024, 2048)


def build(name: str, dim: int, vocab: int):
    """The model `name` at width `dim`: the xLSTMs 8 blocks, the large arch's SwiGLU width and
    llama's FFN width chosen to match xlstm[1:0] in parameters (within a few %)."""
    import torch

    import model as M

    if name.startswith("xlstm["):
        cfg = M.load_model_config({
            "arch": "xlstm", "vocab_size": vocab, "embedding_dim": dim, "num_blocks": 8,
            "slstm_at": [3] if name == "xlstm[7:1]" else [], "context_length": max(EVAL_CONTEXTS),
            "mlstm": {"num_heads": 4}, "slstm": {"num_heads": 4}, "backend": "torch", "chunk_size": 64})
        return M.build_model(cfg)
    if name.startswith("large"):
        def large(ffn: int):  # SwiGLU width ffn (a multiple of 16)
            return M.build_model(M.load_model_config({
                "arch": "large", "vocab_size": vocab, "embedding_dim": dim, "num_blocks": 4,
                "num_heads": 4, "ffn_proj_factor": (ffn - 0.5) / dim, "ffn_round_up_to": 16,
                "context_length": max(EVAL_CONTEXTS), "backend": "torch", "chunk_size": 64,
                "init": "torch" if name == "large-torch-init" else "xlstm7b"}))

        state = torch.random.get_rng_state()
        target = M.count_parameters(build("xlstm[1:0]", dim, vocab))
        base = M.count_parameters(large(64))
        torch.random.set_rng_state(state)  # sizing draws no numbers from the run's seed
        # 3 dim parameters per unit of width in each of the 4 blocks
        return large(max(16, 64 + round((target - base) / (3 * dim * 4) / 16) * 16))
    if name != "llama":
        raise ValueError(f"model: got {name!r}, allowed values: {list(MODELS)}")
    from transformers import LlamaConfig, LlamaForCausalLM

    layers = 4
    state = torch.random.get_rng_state()
    target = M.count_parameters(build("large", dim, vocab))
    torch.random.set_rng_state(state)  # sizing draws no numbers from the run's seed

    def conf(ffn: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=max(EVAL_CONTEXTS), attn_implementation="sdpa",
                           tie_word_embeddings=False, initializer_range=0.02)

    base = sum(p.numel() for p in LlamaForCausalLM(conf(64)).parameters())
    ffn = max(16, 64 + round((target - base) / (3 * dim * layers) / 16) * 16)  # 3 dim params per unit
    torch.random.set_rng_state(state)
    net = LlamaForCausalLM(conf(ffn))
    with torch.no_grad():  # GPT-2's scaled residual init: the sum of 2L branches keeps its variance
        for layer in net.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.normal_(0.0, 0.02 / math.sqrt(2 * layers))
    return net


def loss_of(net, ids, labels):
    """Mean next-token cross-entropy (nats) of `net` on ids, labels (B, S); float32 scalar."""
    import torch.nn.functional as F

    if hasattr(net, "lm_head") and hasattr(net, "model"):  # HF: logits, our own loss
        logits = net(input_ids=ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return net(ids, labels=labels)


def val_tokens(shards: Path, tok, n_seqs: int, seq_len: int):
    """The first n_seqs x seq_len tokens of the validation stream (concatenated documents):
    ids, labels (n_seqs, seq_len) int64."""
    import torch

    import data

    loader = data.build_loader({"sources": [str(shards / "val")], "seq_len": seq_len,
                                "micro_batch_size": 1, "packing": "concat", "shuffle_buffer": 1,
                                "shuffle_shards": False, "epochs": 1, "eos_id": tok.eos_id,
                                "pad_id": tok.pad_id, "vocab_size": tok.vocab_size})
    ids, labels = [], []
    for batch in loader:
        t = batch.to("cpu")
        ids.append(t.input_ids)
        labels.append(t.labels)
        if len(ids) == n_seqs:
            break
    if len(ids) < n_seqs:
        raise ValueError(f"--extrap-seqs: the validation split holds fewer than {n_seqs} x {seq_len} tokens")
    return torch.cat(ids), torch.cat(labels)


def evaluate(net, ids, labels, seq_len: int, tokens_per_batch: int = 4096) -> float:
    """Mean loss over the flat tokens of ids, labels (N, S) re-cut into sequences of
    `seq_len` (every token counted once, whatever the cut)."""
    import torch

    ids, labels = ids.reshape(-1, seq_len), labels.reshape(-1, seq_len)
    b = max(1, tokens_per_batch // seq_len)
    total, count = 0.0, 0
    net.eval()
    with torch.no_grad():
        for j in range(0, len(ids), b):
            n = int((labels[j:j + b] != -100).sum())
            total += float(loss_of(net, ids[j:j + b], labels[j:j + b])) * n
            count += n
    net.train()
    return total / count


def run(name: str, seed: int, lr: float, args: argparse.Namespace) -> dict:
    """Train `name` (in this process) and evaluate it: the curve and the extrapolation."""
    import torch

    import data
    from pretrain.config import OptimizerConfig, ScheduleConfig
    from pretrain.optim import build_optimizer, lr_at, set_lr

    torch.manual_seed(seed)
    shards = Path(args.data) / "shards"
    tok = data.Tokenizer.load(str(Path(args.data) / "tokenizer"))
    net = build(name, args.dim, tok.vocab_size)
    params = sum(p.numel() for p in net.parameters())
    opt = build_optimizer(net, OptimizerConfig(lr=lr))
    sched = ScheduleConfig(kind="cosine", warmup_steps=max(1, args.steps // 10), min_lr_ratio=0.1)
    train = data.build_loader({"sources": [str(shards)], "seq_len": TRAIN_CONTEXT,
                               "micro_batch_size": args.batch, "packing": "concat", "seed": seed,
                               "eos_id": tok.eos_id, "pad_id": tok.pad_id, "vocab_size": tok.vocab_size})
    curve_ids, curve_labels = val_tokens(shards, tok, args.curve_seqs, TRAIN_CONTEXT)
    ext_ids, ext_labels = val_tokens(shards, tok, args.extrap_seqs, max(EVAL_CONTEXTS))
    curve, t0, batches = [], time.perf_counter(), iter(train)
    for step in range(args.steps):
        batch = next(batches).to("cpu")  # concat packing: no resets, every target counted
        set_lr(opt, lr_at(step, args.steps, lr, sched))
        loss = loss_of(net, batch.input_ids, batch.labels)
        if not torch.isfinite(loss):
            return {"model": name, "seed": seed, "lr": lr, "params": params, "diverged_at": step}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append([(step + 1) * args.batch * TRAIN_CONTEXT,
                          evaluate(net, curve_ids, curve_labels, TRAIN_CONTEXT)])
    train_s = time.perf_counter() - t0
    extrap = {str(c): evaluate(net, ext_ids, ext_labels, c) for c in EVAL_CONTEXTS}
    return {"model": name, "seed": seed, "lr": lr, "params": params, "curve": curve,
            "extrap": extrap, "train_s": train_s, "cpu_s": time.process_time()}


def spawn(name: str, seed: int, lr: float, args: argparse.Namespace) -> dict:
    """`run` in a process of its own, one thread; its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--run", name, str(seed), str(lr), "--data", args.data,
           "--steps", str(args.steps), "--batch", str(args.batch), "--dim", str(args.dim),
           "--eval-every", str(args.eval_every), "--curve-seqs", str(args.curve_seqs),
           "--extrap-seqs", str(args.extrap_seqs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} lr {lr}: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    status = (f"diverged at step {result['diverged_at']}" if "diverged_at" in result else
              f"val {result['curve'][-1][1]:.3f}, {result['train_s']:.0f} s")
    print(f"[quality] {name} seed {seed} lr {lr:g}: {status}", flush=True)
    return result


def unigram_entropy(corpus: Path, n_seqs: int) -> float:
    """Entropy (nats) of the token frequencies of the extrapolation tokens themselves: the
    loss of the best model that ignores all context, a yardstick for how far training got."""
    import torch

    import data

    tok = data.Tokenizer.load(str(corpus / "tokenizer"))
    _, labels = val_tokens(corpus / "shards", tok, n_seqs, max(EVAL_CONTEXTS))
    p = torch.bincount(labels[labels >= 0]).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def final(r: dict) -> float:
    return r["curve"][-1][1] if "curve" in r else math.inf


def run_all(args: argparse.Namespace) -> tuple[list[dict], dict[float, float]]:
    """Every run; the llama lr sweep (seed 0) first, its winner's other seeds after it.
    Returns the results of the reported runs and the sweep {lr: final val loss}."""
    seeds = list(range(args.seeds))
    with ThreadPoolExecutor(args.jobs) as pool:
        sweep = {lr: pool.submit(spawn, "llama", seeds[0], lr, args) for lr in args.llama_lrs}
        # slowest first, so that the workers end together
        others = [pool.submit(spawn, m, s, args.lr, args) for m in SLOW for s in range(args.slow_seeds)]
        others += [pool.submit(spawn, m, s, args.lr, args) for m in ("large", "large-torch-init") for s in seeds]
        swept = {lr: f.result() for lr, f in sweep.items()}
        best = min(swept, key=lambda lr: final(swept[lr]))
        rest = [pool.submit(spawn, "llama", s, best, args) for s in seeds[1:]]
        results = [f.result() for f in others] + [swept[best]] + [f.result() for f in rest]
    return results, {lr: final(r) for lr, r in swept.items()}


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per model: params, lr, the mean and min/max over seeds of the final val loss and of
    each extrapolation loss, and the mean curve."""
    out = {}
    for m in MODELS:
        rs = [r for r in results if r["model"] == m and "curve" in r]
        if not rs:
            continue
        row = {"params": rs[0]["params"], "lr": rs[0]["lr"], "seeds": len(rs),
               "diverged": sum(1 for r in results if r["model"] == m and "diverged_at" in r),
               "train_s": statistics.mean(r["train_s"] for r in rs)}
        top, low = str(max(EVAL_CONTEXTS)), str(TRAIN_CONTEXT)
        for key, vals in [("val", [final(r) for r in rs]),
                          ("rise", [r["extrap"][top] - r["extrap"][low] for r in rs])] + \
                [(f"ctx{c}", [r["extrap"][str(c)] for r in rs]) for c in EVAL_CONTEXTS]:
            row[key] = (statistics.mean(vals), min(vals), max(vals))
        row["curve"] = [[rs[0]["curve"][j][0], statistics.mean(r["curve"][j][1] for r in rs)]
                        for j in range(len(rs[0]["curve"]))]
        out[m] = row
    return out


def by_seed(results: list[dict]) -> str:
    """Markdown table: final val loss per model and seed, and the difference to llama paired
    by seed (seed s gives every model the same data order: at a tenth of an epoch the order
    moves the loss more than the model does, and the pairing cancels it)."""
    loss = {(r["model"], r["seed"]): final(r) for r in results if "curve" in r}
    models = [m for m in MODELS if any(k[0] == m for k in loss)]
    seeds = sorted({s for _, s in loss})
    lines = ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " | minus llama, paired by seed |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for m in models:
        diffs = [loss[m, s] - loss["llama", s] for s in seeds if (m, s) in loss and ("llama", s) in loss]
        cells = [f"{loss[m, s]:.3f}" if (m, s) in loss else "-" for s in seeds]
        d = ("" if not diffs or m == "llama" else f"{diffs[0]:+.3f} (one seed)" if len(diffs) == 1 else
             f"{statistics.mean(diffs):+.3f} [{min(diffs):+.3f}, {max(diffs):+.3f}] over {len(diffs)} seeds")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {d} |")
    return "\n".join(lines)


def paired(results: list[dict], a: str, b: str) -> list[float]:
    """final val loss of `a` minus `b`, per seed both ran."""
    loss = {(r["model"], r["seed"]): final(r) for r in results if "curve" in r}
    return [loss[a, s] - loss[b, s] for (m, s) in sorted(loss) if m == a and (b, s) in loss]


def edge_note(sweep: dict) -> str:
    """A warning when the sweep's winner is its smallest or largest lr (the optimum may lie
    beyond it, and the baseline would be under-tuned)."""
    finite = {lr: v for lr, v in sweep.items() if math.isfinite(v)}  # inf: diverged
    if len(finite) < 2:
        return ""
    best = min(finite, key=finite.get)
    if best in (min(sweep), max(sweep)):
        return f" (the best, {best:g}, is at the sweep's edge: widen `--llama-lrs`)"
    return ""


def report(summary: dict, sweep: dict, args: argparse.Namespace, load: str, wall_s: float,
           png: str, results: list[dict]) -> str:
    cmd = " ".join(["benchmarks/quality.py", *args.argv])
    tokens = args.steps * args.batch * TRAIN_CONTEXT
    lines = [f"# Quality at equal parameters and tokens, and length extrapolation, CPU, {dt.date.today():%Y-%m-%d}", "",
             f"`{cmd}`; {os.cpu_count()} cores, load average before the run {load}; {wall_s / 60:.1f} min "
             f"({args.cpu_s / 60:.1f} CPU-minutes in the reported runs: about {args.cpu_s / 120:.1f} min on 2 idle cores). "
             f"Corpus: the demo's (stdlib sources, vocab 512); {args.steps} steps x {args.batch} x "
             f"{TRAIN_CONTEXT} = {tokens:,} training tokens per model, context {TRAIN_CONTEXT}; "
             f"validation loss (nats per token) on {args.curve_seqs} x {TRAIN_CONTEXT} tokens (curve, final) "
             f"and on the same {args.extrap_seqs} x 2048 tokens cut at 256 / 1024 / 2048 (extrapolation). "
             f"Mean over the seeds (column `seeds`), [min, max] beside it. The unigram entropy of the "
             f"extrapolation tokens (the loss of a model that ignores context) is {args.unigram:.3f}.", "",
             "| model | params | lr | seeds | final val loss | ctx 256 | ctx 1024 | ctx 2048 | 2048 - 256 | wall s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(t: tuple, fmt: str = ".3f") -> str:
        return f"{t[0]:{fmt}} [{t[1]:{fmt}}, {t[2]:{fmt}}]" if t[1] < t[2] else f"{t[0]:{fmt}}"

    for m, r in summary.items():
        lines.append(f"| {m} | {r['params'] / 1e6:.3f}M | {r['lr']:g} | {r['seeds']} | {cell(r['val'])} | "
                     f"{cell(r['ctx256'])} | {cell(r['ctx1024'])} | {cell(r['ctx2048'])} | "
                     f"{cell(r['rise'], '+.3f')} | {r['train_s']:.0f} |"
                     + (f" ({r['diverged']} diverged)" if r["diverged"] else ""))
    lines += ["", "llama's learning-rate sweep (seed 0, final val loss): "
              + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sweep.items())
              + edge_note(sweep), "",
              "Final validation loss by seed:", "", by_seed(results), ""]
    d = paired(results, "large", "large-torch-init")
    if d:
        lines.append(f"- init of the large arch: the 7B init minus PyTorch's default, paired by seed: "
                     f"{statistics.mean(d):+.3f} nats [{min(d):+.3f}, {max(d):+.3f}] over {len(d)} seed(s)")
    for m, r in summary.items():
        rise = r["rise"]
        verdict = ("rises beyond the training context in every seed" if rise[1] > 0.002 else
                   "flat or lower with more context in every seed" if rise[2] <= 0.002 else "mixed over seeds")
        lines.append(f"- {m}: loss at 2048 minus at 256 {cell(rise, '+.3f')} nats: {verdict}")
    lines += ["", f"![plot]({png})"]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Left: validation loss against training tokens; right: the loss at each evaluation
    context minus at 256 (the extrapolation, free of each model's level). Both over the seeds
    that every model ran (the same data orders: with `--slow-seeds 1`, seed 0 alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "curve" in r]
    models = [m for m in MODELS if any(r["model"] == m for r in ok)]
    common = set.intersection(*({r["seed"] for r in ok if r["model"] == m} for m in models))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lo = float("inf")
    for m in models:
        rs = [r for r in ok if r["model"] == m and r["seed"] in common]
        xs = [x for x, _ in rs[0]["curve"]]
        ys = [statistics.mean(r["curve"][j][1] for r in rs) for j in range(len(xs))]
        lo = min(lo, *ys)
        a.plot(xs, ys, label=m)
        rise = [[r["extrap"][str(c)] - r["extrap"][str(TRAIN_CONTEXT)] for r in rs] for c in EVAL_CONTEXTS]
        mid = [statistics.mean(v) for v in rise]
        b.errorbar(EVAL_CONTEXTS, mid, yerr=[[y - min(v) for y, v in zip(mid, rise)],
                                             [max(v) - y for y, v in zip(mid, rise)]],
                   marker="o", capsize=3, label=m)
    seeds = ("seeds " if len(common) > 1 else "seed ") + ", ".join(str(s) for s in sorted(common))
    a.set_xlabel("training tokens")
    a.set_ylabel("validation loss (nats), context 256")
    a.set_title(f"validation loss ({seeds})")
    a.set_ylim(lo - 0.1, lo + 1.5)
    b.set_xscale("log", base=2)
    b.set_xticks(EVAL_CONTEXTS, [str(c) for c in EVAL_CONTEXTS])
    b.axhline(0.0, color="grey", ls=":", lw=1)
    b.set_xlabel("evaluation context (trained at 256)")
    b.set_ylabel("loss minus loss at 256 (nats)")
    b.set_title(f"length extrapolation ({seeds}; bars: min-max)")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


DEFAULT_OUT = str(ROOT / "benchmarks" / "results")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 seed, 6 steps, dim 32, 2 x 2048 extrapolation tokens")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--slow-seeds", type=int, default=None,
                    help=f"seeds for {' and '.join(SLOW)} (default: --seeds)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 256 per step")
    ap.add_argument("--dim", type=int, default=64, help="model width")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate of the xLSTM models")
    # 3e-2 included: the last sweep (1e-3, 3e-3, 1e-2) was won by its edge, 1e-2
    ap.add_argument("--llama-lrs", default="3e-3,1e-2,3e-2", help="llama's sweep, comma-separated")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--curve-seqs", type=int, default=16)
    ap.add_argument("--extrap-seqs", type=int, default=8, help="validation sequences of 2048")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--data", default=str(ROOT / "runs" / "bench-corpus"),
                    help="demo corpus directory (built on first use)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--run", nargs=3, metavar=("MODEL", "SEED", "LR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.seeds, args.slow_seeds, args.steps, args.dim, args.eval_every = 1, 1, 6, 32, 3
        args.curve_seqs, args.extrap_seqs, args.batch = 4, 2, 4
    args.llama_lrs = [float(x) for x in args.llama_lrs.split(",")]
    args.slow_seeds = args.seeds if args.slow_seeds is None else args.slow_seeds
    for name in ("seeds", "slow_seeds", "steps", "batch", "dim", "eval_every", "curve_seqs", "extrap_seqs", "jobs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected >= 1")
    if args.run:
        print(json.dumps(run(args.run[0], int(args.run[1]), float(args.run[2]), args)))
        return 0

    import data

    load = f"{os.getloadavg()[0]:.1f}"
    t0 = time.perf_counter()
    data.make_demo_corpus(args.data, workers=1, progress=False)
    results, sweep = run_all(args)
    wall = time.perf_counter() - t0
    args.unigram = unigram_entropy(Path(args.data), args.extrap_seqs)
    args.cpu_s = sum(r.get("cpu_s", 0.0) for r in results)
    summary = summarize(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{dt.date.today():%Y-%m-%d}-cpu"
    plot(results, out / f"{stem}.png")
    text = report(summary, sweep, args, load, wall, f"{stem}.png", results)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"results": results, "sweep": sweep}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

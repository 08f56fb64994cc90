"""Training step time and peak memory against context length: xLSTM against a Transformer.

The xLSTM paper's claim: compute linear in the sequence length (a recurrent state of
fixed size, chunkwise-parallel in training), where self-attention is quadratic. In one
run, at a constant number of tokens per step (`--tokens`, batch = tokens / context):

  xlstm-large   our large (xLSTM-7B) architecture, mLSTM blocks only
  xlstm[7:1]    our NeurIPS architecture, one sLSTM block in eight
  llama         Hugging Face `LlamaForCausalLM`, SDPA attention, RoPE, of about the same
                parameter count (intermediate size chosen to match)

each point (model, context) a process of its own (a fresh allocator: the peak resident
memory is that point's), one training step = forward, backward, AdamW step, timed after
one untimed step; the points run in `--rounds` interleaved rounds and each keeps its
best round, so a burst of load on a shared machine does not decide a ratio. Prints a
table (ms per 1k tokens, the step's memory: peak RSS above the RSS before it, each relative to its own value at the shortest
context) and the crossover context where each xLSTM becomes faster than Llama, and
writes `benchmarks/results/long_context-<date>-cpu.{md,png}`. A measurement, never a test.

    .venv/bin/python benchmarks/long_context.py [--contexts 512,1024,...] [--tokens 16384]
        [--rounds 2] [--dim 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("xlstm-large", "xlstm[7:1]", "llama")
VOCAB = 2048


def build(name: str, dim: int, context: int):
    """The model `name` at width `dim` (about 4 * 12 * dim^2 parameters in blocks)."""
    import torch

    import model as M

    torch.manual_seed(0)
    if name == "xlstm-large":
        cfg = M.load_model_config({"arch": "large", "vocab_size": VOCAB, "embedding_dim": dim,
                                   "num_blocks": 4, "num_heads": 4, "context_length": context,
                                   "backend": "torch", "chunk_size": 64})
        return M.build_model(cfg)
    if name == "xlstm[7:1]":
        cfg = M.load_model_config({"arch": "xlstm", "vocab_size": VOCAB, "embedding_dim": dim,
                                   "num_blocks": 8, "slstm_at": [3], "context_length": context,
                                   "mlstm": {"num_heads": 4}, "slstm": {"num_heads": 4},
                                   "backend": "torch", "chunk_size": 64})
        return M.build_model(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    target = M.count_parameters(build("xlstm-large", dim, context))
    layers, heads = 4, 4

    def llama(ffn: int):
        conf = LlamaConfig(vocab_size=VOCAB, hidden_size=dim, intermediate_size=ffn,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, max_position_embeddings=context,
                           attn_implementation="sdpa", tie_word_embeddings=False)
        return LlamaForCausalLM(conf)

    # parameters grow by 3 * dim * layers per unit of intermediate size
    base = sum(p.numel() for p in llama(64).parameters())
    ffn = max(64, 64 + round((target - base) / (3 * dim * layers) / 16) * 16)
    torch.manual_seed(0)
    return llama(ffn)


def point(name: str, context: int, tokens: int, dim: int) -> dict:
    """One training step of `name` at `context` (in this process): seconds and peak RSS."""
    import torch
    import torch.nn.functional as F

    net = build(name, dim, context)
    params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = max(1, tokens // context)
    ids = torch.randint(0, VOCAB, (batch, context + 1), generator=torch.Generator().manual_seed(1))
    base_mb = rss_now_mb()
    times = []
    for _ in range(2):  # the first step is untimed (allocator, lazy init)
        t0 = time.perf_counter()
        out = net(ids[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": name, "context": context, "batch": batch, "params": params,
            "step_s": times[-1], "ms_per_1k_tokens": 1e3 * times[-1] / (batch * context) * 1e3,
            "step_mb": peak_mb - base_mb}


def rss_now_mb() -> float:
    """Resident memory of this process now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_point(name: str, context: int, tokens: int, dim: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--point", name, str(context),
                          "--tokens", str(tokens), "--dim", str(dim)],
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{name} at {context}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def crossover(best: dict, ours: str, contexts: list[int]) -> int | None:
    """The shortest context from which `ours` is faster than llama at every longer one."""
    faster = [c for c in contexts if best[ours, c]["step_s"] < best["llama", c]["step_s"]]
    for i, c in enumerate(contexts):
        if all(x in faster for x in contexts[i:]):
            return c
    return None


def report(best: dict, contexts: list[int], args: argparse.Namespace, load: str) -> str:
    lines = [f"# Training step against context length, CPU, {dt.date.today():%Y-%m-%d}", "",
             f"`benchmarks/long_context.py --tokens {args.tokens} --rounds {args.rounds} "
             f"--dim {args.dim}`; {os.cpu_count()} cores, load average before the run {load}; "
             "each point its own process, best of the rounds. Time per 1k tokens and peak "
             "memory of the step (peak RSS minus the RSS before the first step: activations, "
             "gradients, optimizer state); `x` columns: relative to the same model at the shortest context.", "",
             "| model | params | context | batch | ms / 1k tok | x | step memory MB | x |",
             "|---|---|---|---|---|---|---|---|"]
    for m in MODELS:
        first = best[m, contexts[0]]
        for c in contexts:
            r = best[m, c]
            lines.append(f"| {m} | {r['params'] / 1e6:.2f}M | {c} | {r['batch']} | "
                         f"{r['ms_per_1k_tokens']:.0f} | {r['ms_per_1k_tokens'] / first['ms_per_1k_tokens']:.2f} "
                         f"| {r['step_mb']:.0f} | {r['step_mb'] / first['step_mb']:.2f} |")
    lines.append("")
    for m in MODELS[:2]:
        c = crossover(best, m, contexts)
        lo = [c for c in contexts if c >= 1024] or contexts
        tpt = [best[m, c]["ms_per_1k_tokens"] for c in lo]
        lines.append(f"- {m}: faster than llama from context {c if c else 'never (in range)'}; "
                     f"time per token from {lo[0]} to {lo[-1]}: max/min {max(tpt) / min(tpt):.2f}")
    return "\n".join(lines) + "\n"


def plot_log2(path: Path, xlabel: str, panels: list[tuple[str, dict[str, tuple[list, list]]]]) -> None:
    """One PNG of panels side by side on a log2 x axis; each panel (title, {label: (xs, ys)})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, series) in zip(axes, panels):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(best: dict, contexts: list[int], path: Path) -> None:
    def series(key: str) -> dict[str, tuple[list, list]]:
        return {m: (contexts, [best[m, c][key] for c in contexts]) for m in MODELS}

    plot_log2(path, "context (tokens; constant tokens per step)",
              [("training step, ms per 1k tokens", series("ms_per_1k_tokens")),
               ("step memory, MB (peak RSS above the model's)", series("step_mb"))])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per training step")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128, help="model width")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--point", nargs=2, metavar=("MODEL", "CONTEXT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]), args.tokens, args.dim)))
        return 0
    contexts = [int(c) for c in args.contexts.split(",")]
    load = f"{os.getloadavg()[0]:.1f}"
    best: dict[tuple[str, int], dict] = {}
    for r in range(args.rounds):
        for c in contexts:
            for m in MODELS:
                res = run_point(m, c, args.tokens, args.dim, args.threads)
                print(f"round {r + 1}: {m:12s} ctx {c:6d} {res['ms_per_1k_tokens']:8.0f} ms/1k tok "
                      f"{res['step_mb']:7.0f} MB", flush=True)
                if (m, c) not in best or res["step_s"] < best[m, c]["step_s"]:
                    best[m, c] = res
    text = report(best, contexts, args, load)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"long_context-{dt.date.today():%Y-%m-%d}-cpu"
    stem.with_suffix(".md").write_text(text + f"\n![plot]({stem.name}.png)\n")
    plot(best, contexts, stem.with_suffix(".png"))
    print(f"wrote {stem}.md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

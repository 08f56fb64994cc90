"""Generation: per-token latency and resident memory against position, xLSTM against a
Transformer with its KV cache.

The xLSTM paper's claim: constant memory and constant time per generated token (a
fixed-size recurrent state), where a Transformer's KV cache and attention grow with the
position. In one run, token by token up to `--positions` (one sequence, greedy):

  xlstm-large   our large architecture, `model.step` (the recurrent step ops)
  llama         Hugging Face `LlamaForCausalLM` (SDPA) of about the same parameter count
                (benchmarks/long_context.py's sizing), with its `DynamicCache`

each in a process of its own. Per model it records the mean latency of the `--window`
tokens before each power-of-two position and the resident memory there (RSS), prints
a table and the position from which ours is faster, and writes
`benchmarks/results/generation-<date>-cpu.{md,png}`. A measurement, never a test.

    .venv/bin/python benchmarks/generation.py [--positions 16384] [--dim 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from long_context import build, plot_log2, rss_now_mb

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("xlstm-large", "llama")


@__import__("torch").no_grad()
def trace(name: str, positions: int, dim: int, window: int) -> list[dict]:
    """Generate `positions` tokens with `name` (in this process); a row per power of two."""
    import torch

    net = build(name, dim, positions).eval()
    tok = torch.zeros(1, dtype=torch.long)
    marks = {2**k for k in range(6, 40) if 2**k <= positions}
    rows, times, state, cache = [], [], None, None
    if name == "llama":
        from transformers import DynamicCache

        cache = DynamicCache()
    for pos in range(1, positions + 1):
        t0 = time.perf_counter()
        if cache is None:
            logits, state = net.step(tok, state)
        else:
            logits = net(input_ids=tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1)
        times.append(time.perf_counter() - t0)
        if pos in marks:
            recent = times[-window:]
            rows.append({"model": name, "position": pos, "ms_per_token": 1e3 * sum(recent) / len(recent),
                         "rss_mb": rss_now_mb()})
    return rows


def faster_from(rows: dict[str, list[dict]]) -> int | None:
    """The first position from which xlstm-large is faster than llama at every later mark."""
    ours, theirs = rows["xlstm-large"], rows["llama"]
    for i in range(len(ours)):
        if all(a["ms_per_token"] < b["ms_per_token"] for a, b in zip(ours[i:], theirs[i:])):
            return ours[i]["position"]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--window", type=int, default=32, help="tokens averaged per row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--trace", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trace:
        print(json.dumps(trace(args.trace, args.positions, args.dim, args.window)))
        return 0
    load = f"{os.getloadavg()[0]:.1f}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    rows = {}
    for m in MODELS:
        out = subprocess.run([sys.executable, __file__, "--trace", m, "--positions",
                              str(args.positions), "--dim", str(args.dim), "--window",
                              str(args.window)], env=env, capture_output=True, text=True,
                             timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"{m}: {out.stderr[-2000:]}")
        rows[m] = json.loads(out.stdout.strip().splitlines()[-1])
    lines = [f"# Generation latency and memory against position, CPU, {dt.date.today():%Y-%m-%d}",
             "", f"`benchmarks/generation.py --positions {args.positions} --dim {args.dim} "
             f"--window {args.window} --threads {args.threads}`; {os.cpu_count()} cores, load "
             f"average before the run {load}; one sequence, greedy, one token per call.", "",
             "| position | xlstm-large ms/token | llama ms/token | llama / ours | xlstm-large RSS MB "
             "| llama RSS MB |", "|---|---|---|---|---|---|"]
    for a, b in zip(rows["xlstm-large"], rows["llama"]):
        lines.append(f"| {a['position']} | {a['ms_per_token']:.2f} | {b['ms_per_token']:.2f} | "
                     f"{b['ms_per_token'] / a['ms_per_token']:.2f} | {a['rss_mb']:.0f} | "
                     f"{b['rss_mb']:.0f} |")
    pos = faster_from(rows)
    lines += ["", f"Ours is faster from position {pos if pos else 'never (in range)'} on."]
    text = "\n".join(lines) + "\n"
    print(text)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"generation-{dt.date.today():%Y-%m-%d}-cpu"
    stem.with_suffix(".md").write_text(text + f"\n![plot]({stem.name}.png)\n")
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.md and .png")
    return 0


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    def series(key: str) -> dict[str, tuple[list, list]]:
        return {m: ([x["position"] for x in r], [x[key] for x in r]) for m, r in rows.items()}

    plot_log2(path, "position", [("ms per generated token", series("ms_per_token")),
                                 ("resident memory, MB", series("rss_mb"))])


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput and MFU on CPU, ours against the official xLSTM model.

In one run, for the 125M-class preset (default xlstm10-125m) at context 2048:
  ours, backend none   `python -m pretrain.train` in one process (all threads)
  ours, FSDP x 2       `torchrun --nproc_per_node=2`, one thread per process
  official             a plain training loop (AdamW, same batch) around the official
                       `xlstm` package's model of the same configuration
and the measured fp32 matmul peak of this machine (2 n^3 FLOPs, best of runs).
MFU = tokens/s x 3 x forward FLOPs per token (`model.flops_per_token`) / peak.
Step times exclude the first (warm-up) step. Never used as a test.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/xlstm10-125m.yaml] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ours(nproc: int, cfg_path: str, corpus: tuple[str, str], steps: int, seq: int, threads: int) -> float:
    tok, shards = corpus
    run_dir = Path(tempfile.mkdtemp(prefix="throughput-"))
    head = ([sys.executable, "-m", "pretrain.train"] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             "-m", "pretrain.train"])
    cmd = [*head, "--config", cfg_path, "--resume", "none", f"run_dir={run_dir}",
           f"data.train=[{shards}]", f"data.tokenizer={tok}", f"data.seq_len={seq}",
           f"train.steps={steps}", "train.micro_batch_size=1", f"train.global_batch_size={nproc}",
           "train.log_every=1", f"checkpoint.every={steps + 1}",
           f"distributed.backend={'none' if nproc == 1 else 'fsdp'}", "hardware.peak_flops=1e12"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    rates = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1)
    return rates[len(rates) // 2]


def official(cfg, steps: int, seq: int) -> float:
    import torch

    from model.official import build_official_model

    torch.manual_seed(0)
    model = build_official_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(ids[:, :-1])
        logits = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return seq / times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "xlstm10-125m.yaml"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    import torch

    import data
    from model import flops_per_token, load_model_config
    from pretrain.metrics import measure_matmul_flops

    torch.set_num_threads(args.threads)
    cfg = load_model_config(args.config)
    fpt = 3 * flops_per_token(cfg, args.seq_len)
    peak = measure_matmul_flops(torch.device("cpu"), n=2048, reps=5)
    corpus = data.make_demo_corpus(tempfile.mkdtemp(prefix="throughput-corpus-"), progress=False)
    results = {
        "ours, backend none": ours(1, args.config, corpus, args.steps, args.seq_len, args.threads),
        f"ours, FSDP x {args.threads}": ours(args.threads, args.config, corpus, args.steps,
                                            args.seq_len, 1),
        "official xlstm, plain loop": official(cfg, args.steps, args.seq_len),
    }
    base = results["official xlstm, plain loop"]
    print(f"train_throughput: {Path(args.config).name}, context {args.seq_len}, micro batch 1 per "
          f"process, {args.threads} cores; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"training FLOPs/token {fpt / 1e9:.2f} G")
    print(f"{'run':<28} {'tokens/s':>10} {'MFU (of matmul peak)':>21} {'vs official':>12}")
    for name, tps in results.items():
        mfu = tps * fpt / peak
        print(f"{name:<28} {tps:>10.1f} {100 * mfu:>20.1f}% {tps / base:>11.2f}x")


if __name__ == "__main__":
    main()

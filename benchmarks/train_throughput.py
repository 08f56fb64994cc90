"""Training throughput and MFU on CPU, ours against the official xLSTM model and a Llama.

In one run, for the 125M-class preset (default xlstm10-125m) at context 2048:
  ours, backend none   `python -m pretrain.train` in one process (all threads)
  ours, FSDP x 2       `torchrun --nproc_per_node=2`, one thread per process
  official             a plain training loop (clip at 1.0 and fused AdamW, as the trainer's;
                       same batch) around the official `xlstm` package's model of the same
                       configuration
  llama                the same plain loop around a Hugging Face `LlamaForCausalLM` (SDPA,
                       12 layers of the preset's width, intermediate size chosen so that
                       its parameter count equals ours)
  ... bf16             (`--bf16`) ours with `distributed.precision=bf16` (autocast) and the
                       Llama loop under the same CPU autocast
and the measured fp32 matmul peak of this machine (2 n^3 FLOPs, best of runs).
MFU = tokens/s x 3 x forward FLOPs per token / peak; ours: `model.flops_per_token`;
Llama: 2 x its matmul weights (head included, embedding not) + 4 x layers x context x
width (attention scores and values, PaLM's accounting). `--runs` picks rows; `--profile`
prints instead the op table (torch.profiler, self CPU time) of one step of ours and of
the Llama in this process (after one untimed step).
Step times exclude the first (warm-up) step (median of the rest). The three runs and
the peak are measured in `--rounds` alternating rounds (A B C A B C ...) and each keeps
its best round, so that a burst of load from other processes on a shared machine
does not decide the ratio; every round's numbers are printed too. Ours trains on
packed real documents (document resets inside each row); the official model gets
random ids without resets (it has no reset input). Never used as a test.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/xlstm10-125m.yaml] \
        [--steps 4] [--rounds 2] [--out FILE] [--runs ours,fsdp,official,llama] [--bf16] \
        [--profile [--top 15]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ours(nproc: int, cfg_path: str, corpus: tuple[str, str], steps: int, seq: int, threads: int,
         *extra: str) -> float:
    tok, shards = corpus
    run_dir = Path(tempfile.mkdtemp(prefix="throughput-"))
    head = ([sys.executable, "-m", "pretrain.train"] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             "-m", "pretrain.train"])
    cmd = [*head, "--config", cfg_path, "--resume", "none", f"run_dir={run_dir}",
           f"data.train=[{shards}]", f"data.tokenizer={tok}", f"data.seq_len={seq}",
           f"train.steps={steps}", "train.micro_batch_size=1", f"train.global_batch_size={nproc}",
           "train.log_every=1", f"checkpoint.every={steps + 1}",
           f"distributed.backend={'none' if nproc == 1 else 'fsdp'}", "hardware.peak_flops=1e12", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    shutil.rmtree(run_dir)  # its final checkpoint is ~2 GB at 125M
    rates = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1)
    return rates[len(rates) // 2]


def official(cfg_path: str, steps: int, seq: int, threads: int, which: str = "official",
             bf16: bool = False) -> float:
    """A plain-loop model in its own process (like ours: memory is given back between runs,
    two 125M-at-2048 processes alive at once would not fit in 24 GB)."""
    cmd = [sys.executable, __file__, "--official-worker", which, "--config", cfg_path,
           "--steps", str(steps), "--seq-len", str(seq), "--threads", str(threads)]
    out = subprocess.run(cmd + (["--bf16"] if bf16 else []),
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT)),
                         cwd=ROOT, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def build_llama(cfg, seq: int):
    """HF `LlamaForCausalLM` (SDPA, untied) of ours' width and parameter count (12 layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import model as M

    d = cfg.embedding_dim
    heads = max(1, d // 64)

    def llama(ffn: int):
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=ffn, num_hidden_layers=12,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
            attn_implementation="sdpa", tie_word_embeddings=cfg.tie_weights))

    with torch.device("meta"):
        target = M.count_parameters(M.build_model(cfg))
        base = sum(p.numel() for p in llama(64).parameters())
    # parameters grow by 3 * d * layers per unit of intermediate size
    ffn = max(64, 64 + round((target - base) / (3 * d * 12) / 16) * 16)
    torch.manual_seed(0)
    return llama(ffn)


def llama_flops_per_token(net, seq: int) -> int:
    """Forward FLOPs per token of `net` (a LlamaForCausalLM): see the module docstring."""
    c = net.config
    matmul = sum(p.numel() for n, p in net.named_parameters() if p.dim() == 2 and "embed" not in n)
    return 2 * matmul + 4 * c.num_hidden_layers * seq * c.hidden_size


def plain_model(which: str, cfg, seq: int):
    """The model of a plain-loop row and its step: step(ids (1, seq + 1)) -> loss."""
    import torch

    if which == "llama":
        net = build_llama(cfg, seq)
        return net, lambda ids: net(ids[:, :-1], labels=ids[:, :-1]).loss
    if which == "ours":  # profiling only (the rows run ours through the trainer)
        import dataclasses

        import model as M

        torch.manual_seed(0)
        net = M.build_model(dataclasses.replace(cfg, backend="torch"))
        # packed documents as the trainer sees them: a reset every ~700 tokens
        reset = torch.zeros(1, seq, dtype=torch.bool)
        reset[:, ::700] = True
        return net, lambda ids: net(ids[:, :-1], reset=reset, labels=ids[:, 1:])
    from model.official import build_official_model

    torch.manual_seed(0)
    net = build_official_model(cfg)

    def step(ids):
        out = net(ids[:, :-1])
        logits = out[0] if isinstance(out, tuple) else out
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    return net, step


def train_step(loss_of, ids, opt, bf16: bool) -> None:
    """Forward (under CPU bf16 autocast if asked), backward, gradient clipping at 1.0 and
    the AdamW step: the work of the trainer's step (the presets' train.grad_clip is 1.0)."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_of(ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0,
                                   foreach=True)  # as pretrain/engine/torch_engine.py
    opt.step()
    opt.zero_grad(set_to_none=True)


def official_worker(cfg, steps: int, seq: int, which: str = "official", bf16: bool = False) -> float:
    import torch

    net, loss_of = plain_model(which, cfg, seq)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)  # as the trainer's
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(loss_of, ids, opt, bf16)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return seq / times[len(times) // 2]


def profile_step(cfg, seq: int, top: int, bf16: bool) -> str:
    """Op tables (self CPU time, sorted) of one training step of ours and of the Llama."""
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile

    out = []
    for which in ("ours", "llama"):
        net, loss_of = plain_model(which, cfg, seq)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)  # as the trainer's
        ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(1))

        train_step(loss_of, ids, opt, bf16)  # untimed: allocator, lazy init
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(loss_of, ids, opt, bf16)
        wall = time.perf_counter() - t0
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                          max_name_column_width=44)
        out.append(f"## {which}: one step, {seq} tokens, {'bf16 autocast' if bf16 else 'fp32'}, "
                   f"{wall:.2f} s under the profiler\n{table}")
        del net, opt
        gc.collect()
    return "\n".join(out)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages of this machine (others share its cores)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "xlstm10-125m.yaml"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-fsdp-ac", dest="fsdp_ac", action="store_false",
                    help="FSDP run without activation checkpointing (needs ~2x the memory)")
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--runs", default="ours,fsdp,official,llama",
                    help="rows, comma-separated, of: ours, fsdp, official, llama")
    ap.add_argument("--bf16", action="store_true",
                    help="add bf16-autocast rows of ours and the Llama (CPU autocast)")
    ap.add_argument("--profile", action="store_true",
                    help="print the op tables of one step of ours and the Llama instead")
    ap.add_argument("--top", type=int, default=15, help="rows of each op table (--profile)")
    ap.add_argument("--official-worker", choices=["official", "llama"], default=None,
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    import data
    from model import flops_per_token, load_model_config
    from pretrain.metrics import measure_matmul_flops

    torch.set_num_threads(args.threads)
    cfg = load_model_config(args.config)
    if args.official_worker:
        print(official_worker(cfg, args.steps, args.seq_len, args.official_worker, args.bf16))
        return
    if args.profile:
        text = profile_step(cfg, args.seq_len, args.top, args.bf16)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    fpt = 3 * flops_per_token(cfg, args.seq_len)
    corpus = data.make_demo_corpus(tempfile.mkdtemp(prefix="throughput-corpus-"), progress=False)
    # one full set of activations per process: at context 2048 two of them do not fit in a
    # 24 GB machine, so the FSDP processes recompute each block in backward (MFU counts
    # model FLOPs only, so the recompute costs this row, it is not hidden)
    fsdp_extra = ["distributed.activation_checkpointing=true"] if args.fsdp_ac else []
    fsdp_name = f"ours, FSDP x {args.threads}" + (" (act. ckpt)" if args.fsdp_ac else "")
    llama_fpt = 3 * llama_flops_per_token(build_llama(cfg, args.seq_len), args.seq_len)
    wanted = args.runs.split(",")
    unknown = set(wanted) - {"ours", "fsdp", "official", "llama"}
    if unknown:
        raise SystemExit(f"--runs: unknown {sorted(unknown)}; allowed: ours, fsdp, official, llama")
    runs = {}
    if "ours" in wanted:
        runs["ours, backend none"] = lambda: ours(1, args.config, corpus, args.steps, args.seq_len,
                                                  args.threads)
    if "ours" in wanted and args.bf16:
        runs["ours, backend none, bf16"] = lambda: ours(
            1, args.config, corpus, args.steps, args.seq_len, args.threads, "distributed.precision=bf16")
    if "fsdp" in wanted:
        runs[fsdp_name] = lambda: ours(args.threads, args.config, corpus, args.steps, args.seq_len, 1,
                                       *fsdp_extra)
    if "official" in wanted:
        runs["official xlstm, plain loop"] = lambda: official(args.config, args.steps, args.seq_len,
                                                              args.threads)
    if "llama" in wanted:
        runs["hf llama, plain loop"] = lambda: official(args.config, args.steps, args.seq_len,
                                                        args.threads, "llama")
    if "llama" in wanted and args.bf16:
        runs["hf llama, plain loop, bf16"] = lambda: official(args.config, args.steps, args.seq_len,
                                                              args.threads, "llama", bf16=True)
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    peaks = []
    for r in range(args.rounds):
        peaks.append(measure_matmul_flops(torch.device("cpu"), n=2048, reps=5))
        for name, fn in runs.items():
            rounds[name].append(fn())
            print(f"round {r + 1}: {name}: {rounds[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    peak = max(peaks)
    best = {name: max(v) for name, v in rounds.items()}
    ref = next((n for n in ("hf llama, plain loop", "official xlstm, plain loop") if n in best),
               next(iter(best)))
    base = best[ref]
    lines = [f"train_throughput: {Path(args.config).name}, context {args.seq_len}, micro batch 1 per "
             f"process, {args.threads} cores, {args.steps} steps per run, best of {args.rounds} "
             f"alternating rounds; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (rounds: "
             f"{', '.join(f'{p / 1e9:.1f}' for p in peaks)}); training FLOPs/token {fpt / 1e9:.2f} G "
             f"(Llama {llama_fpt / 1e9:.2f} G); load average at the end {load_average()}",
             f"{'run':<34} {'tokens/s':>10} {'MFU (of fp32 peak)':>19} {'vs ' + ref.split(',')[0]:>16}  rounds"]
    for name, tps in best.items():
        mfu = tps * (llama_fpt if "llama" in name else fpt) / peak
        lines.append(f"{name:<34} {tps:>10.1f} {100 * mfu:>18.1f}% {tps / base:>15.2f}x  "
                     + ", ".join(f"{x:.1f}" for x in rounds[name]))
    if args.rounds > 1:  # a slow spell of the shared machine hits one run, not the pair
        lines += [f"{name} / {ref.split(',')[0]}, round by round: "
                  + ", ".join(f"{a / b:.2f}x" for a, b in zip(rounds[name], rounds[ref]))
                  for name in rounds if name != ref]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

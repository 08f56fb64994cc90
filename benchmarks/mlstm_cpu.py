"""CPU speed and memory of the torch mLSTM chunkwise op against its competitors.

Compares, in one run and at the same shapes (B=1, NH=4, DQK=64, DV=128, fp32):
  ours      kernels.mlstm_chunkwise(backend="torch")
  official  mlstm_kernels "chunkwise--native_autograd"
  parallel  kernels.mlstm_parallel (quadratic form)
for forward and forward+backward. Each case runs in a fresh subprocess so that
its peak resident memory (ru_maxrss minus the process's baseline) is its own.
Prints a table with the best time of the repetitions and ratios to ours. Never used as a test.

    .venv/bin/python benchmarks/mlstm_cpu.py [--seq 512 2048 8192] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLS = ("ours", "official", "parallel")


def run_case(impl: str, S: int, mode: str, reps: int, chunk: int) -> dict:
    import resource

    import torch

    torch.manual_seed(0)
    B, NH, DQK, DV = 1, 4, 64, 128
    q = torch.randn(B, NH, S, DQK)
    k = torch.randn(B, NH, S, DQK)
    v = torch.randn(B, NH, S, DV)
    i = torch.randn(B, NH, S)
    f = torch.randn(B, NH, S) + 3.0
    if impl == "ours":
        import kernels

        def fn(*xs):
            return kernels.mlstm_chunkwise(*xs, chunk_size=chunk, backend="torch")
    elif impl == "official":
        from mlstm_kernels.torch import get_mlstm_kernel

        official = get_mlstm_kernel("chunkwise--native_autograd")

        def fn(*xs):
            return official(*xs, chunk_size=chunk)
    else:
        import kernels

        fn = kernels.mlstm_parallel
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for r in range(reps + 1):
        xs = [t.clone().requires_grad_(mode == "fwd+bwd") for t in (q, k, v, i, f)]
        t0 = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                fn(*xs)
        else:
            fn(*xs).sum().backward()
        if r:  # the first repetition warms up
            times.append(time.perf_counter() - t0)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    # the best repetition: on a shared machine other load only ever adds time
    return {"best_s": min(times), "peak_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--parallel-max-seq", type=int, default=4096,
                    help="skip the quadratic form above this length (its S x S matrices)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        impl, S, mode = args.case.split(",")
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(impl, int(S), mode, args.reps, args.chunk)))
        return

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for S in args.seq:
        for mode in ("fwd", "fwd+bwd"):
            res = {}
            for impl in IMPLS:
                if impl == "parallel" and S > args.parallel_max_seq:
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--case", f"{impl},{S},{mode}", "--reps", str(args.reps),
                     "--chunk", str(args.chunk), "--threads", str(args.threads)],
                    env=env, capture_output=True, text=True, check=True,
                )
                res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((S, mode, res))

    head = (f"{'S':>6} {'pass':>8} | {'ours ms':>9} {'ours MB':>8} | {'official ms':>11} {'MB':>7} "
            f"{'off/ours':>8} | {'parallel ms':>11} {'MB':>7} {'par/ours':>8}")
    print(f"mLSTM torch CPU benchmark: B=1 NH=4 DQK=64 DV=128 fp32 chunk={args.chunk} "
          f"threads={args.threads} reps={args.reps} (best of reps)")
    print(head)
    print("-" * len(head))
    for S, mode, res in rows:
        o = res["ours"]
        line = f"{S:>6} {mode:>8} | {o['best_s'] * 1e3:>9.1f} {o['peak_mb']:>8.0f} | "
        off = res["official"]
        line += f"{off['best_s'] * 1e3:>11.1f} {off['peak_mb']:>7.0f} {off['best_s'] / o['best_s']:>8.2f} | "
        if "parallel" in res:
            p = res["parallel"]
            line += f"{p['best_s'] * 1e3:>11.1f} {p['peak_mb']:>7.0f} {p['best_s'] / o['best_s']:>8.2f}"
        else:
            line += f"{'skipped':>11} {'':>7} {'':>8}"
        print(line)
    print("ratios > 1: the competitor is slower than ours")


if __name__ == "__main__":
    main()

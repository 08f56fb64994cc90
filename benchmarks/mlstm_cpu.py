"""CPU speed and memory of the torch mLSTM chunkwise op against its competitors.

Compares, in one run and at the same shapes (default B=1, NH=4, DQK=64, DV=128, fp32;
`--preset 125m`: the 125M training shape NH=4, DQK=DV=384, S=2048, chunks 64 and 128):
  ours      xlstm_kernels.mlstm_chunkwise(backend="torch")
  official  mlstm_kernels "chunkwise--native_autograd"
  parallel  xlstm_kernels.mlstm_parallel (quadratic form)
for forward and forward+backward. Times: the best of --reps runs, the
implementations interleaved round-robin in one process (load from other jobs on
a shared machine then hits all alike). Memory: one run per case in a fresh
subprocess, its peak resident memory above the process's baseline. Never used as a test.

    .venv/bin/python benchmarks/mlstm_cpu.py [--seq 512 2048 8192] [--reps 5] [--threads N]
        [--no-memory] [--chunk 64 [128 ...]] [--heads 4 --dqk 64 --dv 128] [--preset 125m]

The `ours/off` column is ours' time over the official one (the issue's goal for
forward+backward: at most 0.5); the header gives the load average before and after
the run (other jobs on the machine slow every implementation, not alike).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLS = ("ours", "official", "parallel")


SHAPE = {"heads": 4, "dqk": 64, "dv": 128}  # set from the command line in main()
PRESETS = {"125m": {"heads": 4, "dqk": 384, "dv": 384, "seq": [2048], "chunk": [64, 128],
                    "parallel_max_seq": 0}}


def make_inputs(S: int):
    import torch

    torch.manual_seed(0)
    B, NH, DQK, DV = 1, SHAPE["heads"], SHAPE["dqk"], SHAPE["dv"]
    return (torch.randn(B, NH, S, DQK), torch.randn(B, NH, S, DQK), torch.randn(B, NH, S, DV),
            torch.randn(B, NH, S), torch.randn(B, NH, S) + 3.0)


def make_fn(impl: str, chunk: int):
    if impl == "official":
        from mlstm_kernels.torch import get_mlstm_kernel

        official = get_mlstm_kernel("chunkwise--native_autograd")
        return lambda *xs: official(*xs, chunk_size=chunk)
    import xlstm_kernels

    if impl == "ours":
        return lambda *xs: xlstm_kernels.mlstm_chunkwise(*xs, chunk_size=chunk, backend="torch")
    return xlstm_kernels.mlstm_parallel


def run_once(fn, inputs, mode: str) -> float:
    import torch

    xs = [t.clone().requires_grad_(mode == "fwd+bwd") for t in inputs]
    # a dense output gradient, as in training (.sum()'s is a broadcast, stride-0 tensor)
    dh = torch.randn_like(inputs[2]) if mode == "fwd+bwd" else None
    t0 = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            fn(*xs)
    else:
        fn(*xs).backward(dh)
    return time.perf_counter() - t0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_case(impl: str, S: int, mode: str, chunk: int) -> dict:
    """One run in this (fresh) process: the peak of its resident memory, sampled
    every 0.5 ms, above what it held before the run, in MB."""
    import threading

    inputs = make_inputs(S)
    fn = make_fn(impl, chunk)
    run_once(fn, make_inputs(min(S, max(64, chunk))), mode)  # lazy imports, allocator warm-up
    before, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_once(fn, inputs, mode)
    done.set()
    sampler.join()
    return {"peak_mb": max(0, peak[0] - before) / 2**20}


def best_times(impls: list[str], S: int, mode: str, reps: int, chunk: int) -> dict[str, float]:
    """Best time of `reps` runs per implementation, interleaved round-robin so that
    load from other jobs on a shared machine hits every implementation alike. The order
    rotates every round: a run right after the quadratic form (large buffers freed, caches
    cold) is ~1.3 ms slower at S=512, and a fixed order would always charge that to one
    implementation."""
    inputs = make_inputs(S)
    fns = {impl: make_fn(impl, chunk) for impl in impls}
    for fn in fns.values():  # warm-up
        run_once(fn, inputs, mode)
    best = {impl: float("inf") for impl in impls}
    for r in range(reps):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            best[impl] = min(best[impl], run_once(fns[impl], inputs, mode))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, nargs="+", default=[64], help="one row set per chunk size")
    ap.add_argument("--heads", type=int, default=SHAPE["heads"])
    ap.add_argument("--dqk", type=int, default=SHAPE["dqk"])
    ap.add_argument("--dv", type=int, default=SHAPE["dv"])
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="125m: the 125M training shape (heads, dims, S=2048, chunks 64 and 128, no parallel)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--parallel-max-seq", type=int, default=4096,
                    help="skip the quadratic form above this length (its S x S matrices)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory subprocesses (times only)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for key, val in PRESETS.get(args.preset, {}).items():
        setattr(args, key, val)
    SHAPE.update(heads=args.heads, dqk=args.dqk, dv=args.dv)
    shape_args = ["--heads", str(args.heads), "--dqk", str(args.dqk), "--dv", str(args.dv)]
    if args.case:
        impl, S, mode = args.case.split(",")
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(peak_memory_case(impl, int(S), mode, args.chunk[0])))
        return

    import torch

    torch.set_num_threads(args.threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=str(args.threads))
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for chunk in args.chunk:
        for S in args.seq:
            impls = [i for i in IMPLS if not (i == "parallel" and S > args.parallel_max_seq)]
            for mode in ("fwd", "fwd+bwd"):
                times = best_times(impls, S, mode, args.reps, chunk)
                res = {}
                for impl in impls:
                    if not args.memory:
                        res[impl] = {"best_s": times[impl], "peak_mb": float("nan")}
                        continue
                    out = subprocess.run(
                        [sys.executable, __file__, "--case", f"{impl},{S},{mode}", "--chunk",
                         str(chunk), "--threads", str(args.threads), *shape_args],
                        env=env, capture_output=True, text=True, check=True,
                    )
                    res[impl] = {"best_s": times[impl], **json.loads(out.stdout.strip().splitlines()[-1])}
                rows.append((chunk, S, mode, res))

    head = (f"{'L':>4} {'S':>6} {'pass':>8} | {'ours ms':>9} {'ours MB':>8} | {'official ms':>11} {'MB':>7} "
            f"{'off/ours':>8} {'ours/off':>8} | {'parallel ms':>11} {'MB':>7} {'par/ours':>8}")
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"mLSTM torch CPU benchmark: B=1 NH={args.heads} DQK={args.dqk} DV={args.dv} fp32 "
          f"chunk={' '.join(map(str, args.chunk))} threads={args.threads} reps={args.reps} (best of reps); "
          f"load average before {load_before}, after {load_after}")
    print(head)
    print("-" * len(head))
    for chunk, S, mode, res in rows:
        o = res["ours"]
        line = f"{chunk:>4} {S:>6} {mode:>8} | {o['best_s'] * 1e3:>9.1f} {o['peak_mb']:>8.0f} | "
        off = res["official"]
        line += (f"{off['best_s'] * 1e3:>11.1f} {off['peak_mb']:>7.0f} {off['best_s'] / o['best_s']:>8.2f} "
                 f"{o['best_s'] / off['best_s']:>8.2f} | ")
        if "parallel" in res:
            p = res["parallel"]
            line += f"{p['best_s'] * 1e3:>11.1f} {p['peak_mb']:>7.0f} {p['best_s'] / o['best_s']:>8.2f}"
        else:
            line += f"{'skipped':>11} {'':>7} {'':>8}"
        print(line)
    print("ratios > 1: the competitor is slower than ours")


if __name__ == "__main__":
    main()

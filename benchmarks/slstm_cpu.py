"""CPU time per time step of the torch sLSTM sequence op against the official one.

The sLSTM's time loop is sequential, so on a CPU its cost is the fixed cost of a step (ops,
not their size); at long context, where the batch is small, that decides a model's time
per token (benchmarks/long_context.py). In one process, the implementations interleaved
round-robin, best of `--reps`:
  ours      xlstm_kernels.slstm_sequence(backend="torch"): one autograd node, the loop in
            the normalized form (docs/design.md, "sLSTM on torch, the normalized form")
  official  the `xlstm` package's sLSTMCell with backend "vanilla" (its pure-PyTorch path;
            autograd through every step), float32, the same gate pre-activations
for forward (no grad) and forward + backward (a dense random output gradient), at 4 heads.
Ours also gets document resets every 700 steps (the packed batches of training); the
official cell has no reset input. Never used as a test.

    .venv/bin/python benchmarks/slstm_cpu.py [--reps 3] [--threads N] [--cases 1x32x4096,16x32x1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NH = 4


def make_fns(B: int, DH: int, S: int):
    """Both implementations on the same inputs: callables taking (x, R, grad or None)."""
    import torch
    from xlstm.blocks.slstm.cell import sLSTMCell_vanilla, sLSTMCellConfig

    import xlstm_kernels

    reset = torch.zeros(B, S, dtype=torch.bool)
    reset[:, ::700] = True

    def ours(x, R, dh, resets=True):
        h = xlstm_kernels.slstm_sequence(x, R, reset=reset if resets else None, backend="torch")
        if dh is None:
            return h
        h.backward(dh)

    cell = sLSTMCell_vanilla(sLSTMCellConfig(hidden_size=NH * DH, num_heads=NH, backend="vanilla",
                                             dtype="float32", input_shape="BSGNH"))
    with torch.no_grad():
        cell._bias.zero_()  # x holds the whole pre-activations, as ours gets them

    def official(x, R, dh):
        with torch.no_grad():  # ours (NH, 4, DH_in, DH_out) -> its (NH, 4 * DH_out, DH_in)
            cell._recurrent_kernel.copy_(R.transpose(-1, -2).reshape(NH, 4 * DH, DH))
        # (B, NH, S, 4, DH) -> (B, S, 4 * NH * DH), gates outermost; h: (B, NH, S, DH)
        h, _ = cell(x.permute(0, 2, 3, 1, 4).reshape(B, S, 4 * NH * DH))
        if dh is None:
            return h
        h.backward(dh)

    return {"ours": ours, "official": official}


def run(cases: list[tuple[int, int, int]], reps: int) -> list[str]:
    import torch

    rows = []
    for B, DH, S in cases:
        torch.manual_seed(0)
        x = torch.randn(B, NH, S, 4, DH)
        R = torch.randn(NH, 4, DH, DH) * 0.1
        dh = torch.randn(B, NH, S, DH)
        fns = make_fns(B, DH, S)
        with torch.no_grad():  # the same function (and a warm-up of both)
            diff = (fns["ours"](x, R, None, resets=False) - fns["official"](x, R, None)).abs().max()
        if diff > 1e-4:
            raise SystemExit(f"ours and the official sLSTM differ by {diff:.2e} at B={B} DH={DH} S={S}")
        best: dict[tuple[str, str], float] = {}
        for _ in range(reps):
            for mode in ("fwd", "fwd+bwd"):
                for name, fn in fns.items():
                    grad = mode == "fwd+bwd"
                    xs, Rs = x.clone().requires_grad_(grad), R.clone().requires_grad_(grad)
                    t0 = time.perf_counter()
                    if grad:
                        fn(xs, Rs, dh)
                    else:
                        with torch.no_grad():
                            fn(xs, Rs, None)
                    us = (time.perf_counter() - t0) / S * 1e6
                    best[name, mode] = min(best.get((name, mode), float("inf")), us)
        for mode in ("fwd", "fwd+bwd"):
            o, f = best["ours", mode], best["official", mode]
            rows.append(f"| {B} | {NH} x {DH} | {S} | {mode} | {o:.0f} | {f:.0f} | {o / f:.2f} |")
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cases", default="1x32x4096,16x32x1024,1x192x1024",
                    help="BxDHxS, comma separated (4 heads each)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    print(f"sLSTM sequence op on CPU, us per time step (best of {args.reps}), {args.threads} threads, "
          f"torch {torch.__version__}; load average before {os.getloadavg()[0]:.2f}")
    print("| batch | heads x head dim | steps | pass | ours us/step | official us/step | ours/official |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: |")
    run(cases, args.reps)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

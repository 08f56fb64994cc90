"""GPU benchmark of the Triton mLSTM kernels (and a correctness gate before any timing).

    python benchmarks/kernels_gpu.py                 # on a CUDA machine: checks, then timings
    python benchmarks/kernels_gpu.py --cpu-dry-run   # anywhere: the same script on tiny
                                                     # shapes under TRITON_INTERPRET=1

1. Checks every Triton kernel against the torch reference on the device: the chunkwise
   forward and all gradients vs the float64 parallel oracle (fp32 and bf16, resets and
   initial state), the fused step vs the recurrent form, the sLSTM kernel vs torch.
2. Times forward and forward+backward with CUDA events (median of --reps repetitions after
   --warmup untimed ones) in bf16 for NH=8, (DQK, DV) = (256, 512) and (128, 128), at
   S = 2048, 8192, 32768 with B * S = 65536 tokens, against
   torch.nn.functional.scaled_dot_product_attention (causal; flash where it takes the
   shape, else the backend named in the table) and, when the package imports,
   mlstm_kernels' chunkwise Triton kernels; ours also with recompute_states=True at the
   largest chunk.
3. Prints a table (ms, TFLOP/s by the FLOP counts below, ratios) and writes it under
   benchmarks/results/ as kernels_gpu-<date>-<device>.md (not for a dry run unless --out).

FLOP counts (multiply-adds count 2, per batch and head):
    chunkwise mLSTM forward, chunk L:  S * L * (DQK + DV)      (causal in-chunk QK^T and AV)
                                     + 4 * S * DQK * DV        (q C_prev and the state update)
    mLSTM backward = 2 x forward.
    causal attention forward: S^2 * (DQK + DV); backward = 2.5 x forward.
No timing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script runs)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions first")
    p.add_argument("--seqlens", type=str, default=None, help="comma list, e.g. 2048,8192")
    p.add_argument("--tokens", type=int, default=None, help="B * S per measurement")
    p.add_argument("--chunks", type=str, default="64,128", help="chunk sizes of our kernel")
    p.add_argument("--skip-checks", action="store_true", help="time without the checks")
    p.add_argument("--checks-only", action="store_true", help="the checks, no timings")
    p.add_argument("--out", type=str, default=None, help="results folder")
    return p.parse_args()


ARGS = _parse()
if ARGS.cpu_dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import xlstm_kernels  # noqa: E402

DRY = ARGS.cpu_dry_run


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------


def _check_chunkwise(rn, g, dev, B, NH, S, DQK, DV, L, dtype, recompute=False,
                     plain=False) -> float:
    """Worst relative error of h, the last state and every gradient vs the fp64 oracle;
    with an initial state and document resets unless `plain`."""
    q, k, v = rn(B, NH, S, DQK), rn(B, NH, S, DQK), rn(B, NH, S, DV)
    i, f = rn(B, NH, S, scale=2.0), rn(B, NH, S, scale=2.0, shift=2.0)
    st = [] if plain else [rn(B, NH, DQK, DV, scale=0.5), rn(B, NH, DQK, scale=0.5), rn(B, NH)]
    reset = None if plain else torch.rand(B, S, generator=g).to(dev) < 0.03
    ins = [q.to(dtype), k.to(dtype), v.to(dtype), i, f] + st
    w = [rn(B, NH, S, DV).double(), rn(B, NH, DQK, DV).double(),
         rn(B, NH, DQK).double(), rn(B, NH).double()]

    def loss(fn, xs, **kw):
        h, s = fn(*xs[:5], initial_state=tuple(xs[5:]) or None, reset=reset,
                  return_last_state=True, **kw)
        return sum((a.double() * b).sum() for a, b in zip((h, *s), w)), (h, *s)

    xt = [t.clone().requires_grad_() for t in ins]
    x64 = [t.detach().double().requires_grad_() for t in ins]
    lt, ot = loss(xlstm_kernels.mlstm_chunkwise, xt, chunk_size=L, backend="triton",
                  recompute_states=recompute)
    l64, o64 = loss(xlstm_kernels.mlstm_parallel, x64)
    lt.backward()
    l64.backward()
    return max([rel(a, b) for a, b in zip(ot, o64)]
               + [rel(a.grad, b.grad) for a, b in zip(xt, x64)])


def check_all(dev) -> list[tuple[str, float, float]]:
    """(name, worst relative error, tolerance) of every check."""
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)

    def rn(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(dev)

    # the head dims that are timed, and one that is not a power of two
    B, NH, S = (1, 2, 70) if DRY else (2, 4, 300)
    dims = [(16, 24)] if DRY else [(256, 512), (128, 128), (64, 96)]
    for DQK, DV in dims:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            for L in ((32,) if DRY else (64, 128)):
                for plain in (False, True):
                    err = _check_chunkwise(rn, g, dev, B, NH, S, DQK, DV, L, dtype, plain=plain)
                    what = "no state, no resets" if plain else "initial state, resets"
                    out.append((f"chunkwise fwd+bwd {DQK}/{DV} {str(dtype)[6:]} L={L} {what}",
                                err, tol))
            err = _check_chunkwise(rn, g, dev, B, NH, S, DQK, DV, L, dtype, recompute=True)
            out.append((f"chunkwise fwd+bwd {DQK}/{DV} {str(dtype)[6:]} L={L} recompute_states",
                        err, tol))
    DQK, DV = dims[-1]
    # step vs recurrent, token by token
    q, k, v = rn(B, NH, 6, DQK), rn(B, NH, 6, DQK), rn(B, NH, 6, DV)
    i, f = rn(B, NH, 6, scale=2.0), rn(B, NH, 6, shift=2.0)
    href = xlstm_kernels.mlstm_recurrent(q.double(), k.double(), v.double(), i.double(), f.double())
    state, hs = None, []
    for t in range(6):
        h, state = xlstm_kernels.mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t],
                                      f[:, :, t], state, backend="triton")
        hs.append(h)
    out.append(("step vs recurrent", rel(torch.stack(hs, 2), href), 1e-5))
    # sLSTM vs torch, forward and gradients
    DH, Ss = (8, 9) if DRY else (64, 64)
    x = rn(B, NH, Ss, 4, DH, scale=1.5)
    R = rn(NH, 4, DH, DH, scale=0.3)
    xt, Rt = x.clone().requires_grad_(), R.clone().requires_grad_()
    x64, R64 = x.double().requires_grad_(), R.double().requires_grad_()
    ht = xlstm_kernels.slstm_sequence(xt, Rt, backend="triton")
    h64 = xlstm_kernels.slstm_sequence(x64, R64, backend="torch")
    wt = rn(*h64.shape).double()
    (ht.double() * wt).sum().backward()
    (h64 * wt).sum().backward()
    err = max(rel(ht, h64), rel(xt.grad, x64.grad), rel(Rt.grad, R64.grad))
    out.append(("slstm fwd+bwd fp32", err, 1e-4))
    return out


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------


def timed(fn, reps: int, warmup: int) -> float:
    """Median milliseconds of fn() (CUDA events on GPU, perf_counter on the dry run)."""
    for _ in range(warmup):
        fn()
    times = []
    if DRY:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def mlstm_flops(B, NH, S, DQK, DV, L):
    fwd = B * NH * (S * L * (DQK + DV) + 4 * S * DQK * DV)
    return fwd, 3 * fwd


def attn_flops(B, NH, S, DQK, DV):
    fwd = B * NH * S * S * (DQK + DV)
    return fwd, 3.5 * fwd


def _fwd_bwd(fn, inputs, grad_out):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad_out)
    return run


def sdpa_runner(q, k, v):
    """Causal SDPA, flash if it takes the shape (it needs equal q/k/v head dims <= 256)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [("flash", [SDPBackend.FLASH_ATTENTION]),
             ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
             ("math", [SDPBackend.MATH])]
    for name, backends in order:
        try:
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
        except RuntimeError:
            continue

        def fn(backends=backends):
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return name, fn
    return None, None


def official_runners():
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
    except Exception as err:  # noqa: BLE001 - a competitor that does not import is skipped
        print(f"mlstm_kernels not available: {err}")
        return {}
    out = {}
    for name in ("chunkwise--triton_xl_chunk", "chunkwise--triton_limit_chunk"):
        try:
            out[name] = get_mlstm_kernel(name)
        except Exception as err:  # noqa: BLE001
            print(f"{name}: not available: {err}")
    return out


def _official_call(fn, name):
    """mlstm_kernels' entry with bf16 kernels; the first call finds the keyword arguments
    and gate dtype it takes (versions differ), later calls reuse them."""
    chunk = 128 if "xl" in name else 64
    found = []

    def variants(q, k, v, i, f):
        kw = {"chunk_size": chunk}
        yield (q, k, v, i, f), {**kw, "autocast_kernel_dtype": torch.bfloat16}
        yield (q, k, v, i, f), kw
        yield (q, k, v, i.to(q.dtype), f.to(q.dtype)), kw

    def call(q, k, v, i, f):
        if found:
            j = found[0]
            args, kw = list(variants(q, k, v, i, f))[j]
            return fn(*args, **kw)
        err = None
        for j, (args, kw) in enumerate(variants(q, k, v, i, f)):
            try:
                out = fn(*args, **kw)
            except (TypeError, RuntimeError, ValueError, AssertionError) as e:
                err = e
                continue
            found.append(j)
            return out
        raise err
    return call, chunk


def bench_shape(rows, dev, official, chunks, reps, warmup, tokens, NH, S, DQK, DV):
    dt = torch.bfloat16
    B = max(1, tokens // S)
    g = torch.Generator(device="cpu").manual_seed(1)

    def rn(*s, scale=1.0, shift=0.0, dtype=dt):
        return (torch.randn(*s, generator=g) * scale + shift).to(dev, dtype)

    q, k, v = rn(B, NH, S, DQK), rn(B, NH, S, DQK), rn(B, NH, S, DV)
    i = rn(B, NH, S, scale=2.0, dtype=torch.float32)
    f = rn(B, NH, S, scale=2.0, shift=3.0, dtype=torch.float32)
    ins = [t.requires_grad_() for t in (q, k, v, i, f)]
    dh = torch.randn(B, NH, S, DV, device=dev, dtype=dt)
    shape = dict(DQK=DQK, DV=DV, S=S, B=B, NH=NH)

    def add(name, fwd_fn, flops, note=""):
        try:
            with torch.no_grad():
                t_f = timed(fwd_fn, reps, warmup)
            t_fb = timed(_fwd_bwd(fwd_fn, ins, dh), reps, warmup)
        except Exception as err:  # noqa: BLE001 - report, keep measuring the rest
            print(f"  {name} S={S} DQK={DQK} DV={DV}: failed: {type(err).__name__}: "
                  f"{str(err)[:200]}")
            rows.append({**shape, "kernel": name, "fwd_ms": None, "fb_ms": None,
                         "note": "failed"})
            return
        rows.append({**shape, "kernel": name, "fwd_ms": t_f, "fb_ms": t_fb,
                     "fwd_tflops": flops[0] / t_f / 1e9, "fb_tflops": flops[1] / t_fb / 1e9,
                     "note": note})
        print(f"  {name:34s} S={S:6d} DQK={DQK} DV={DV}: fwd {t_f:9.3f} ms, "
              f"fwd+bwd {t_fb:9.3f} ms")

    for L in chunks:
        add(f"ours triton chunk={L}",
            lambda L=L: xlstm_kernels.mlstm_chunkwise(*ins, chunk_size=L, backend="triton"),
            mlstm_flops(B, NH, S, DQK, DV, L))
    L = chunks[-1]
    add(f"ours triton chunk={L} recompute",
        lambda: xlstm_kernels.mlstm_chunkwise(*ins, chunk_size=L, backend="triton",
                                              recompute_states=True),
        mlstm_flops(B, NH, S, DQK, DV, L))
    for name, fn in official.items():
        call, chunk = _official_call(fn, name)
        add(f"mlstm_kernels {name.split('--')[1]}", lambda call=call: call(*ins),
            mlstm_flops(B, NH, S, DQK, DV, chunk))
    backend, sdpa = sdpa_runner(q, k, v)
    if sdpa is not None:
        add("sdpa causal", sdpa, attn_flops(B, NH, S, DQK, DV), note=backend)


def bench(dev) -> list[dict]:
    reps = ARGS.reps if ARGS.reps is not None else (2 if DRY else 20)
    warmup = ARGS.warmup if ARGS.warmup is not None else (1 if DRY else 5)
    tokens = ARGS.tokens or (128 if DRY else 65536)
    if ARGS.seqlens:
        seqlens = [int(s) for s in ARGS.seqlens.split(",")]
    else:
        seqlens = [64, 128] if DRY else [2048, 8192, 32768]
    dims = [(32, 64), (16, 16)] if DRY else [(256, 512), (128, 128)]
    NH = 2 if DRY else 8
    chunks = [int(c) for c in ARGS.chunks.split(",")]
    official = official_runners()
    rows = []
    for DQK, DV in dims:
        for S in seqlens:
            bench_shape(rows, dev, official, chunks, reps, warmup, tokens, NH, S, DQK, DV)
    return rows


def table(rows: list[dict], checks, device: str) -> str:
    lines = [f"# Kernel benchmark on {device}, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", f"torch {torch.__version__}, triton {_triton_version()}, bf16, "
             f"{'CPU DRY RUN (interpreter; times mean nothing)' if DRY else 'CUDA events, median'}",
             "", "## Checks", "", "| check | worst rel. error | tolerance | ok |", "|---|---|---|---|"]
    for name, err, tol in checks:
        lines.append(f"| {name} | {err:.2e} | {tol:.0e} | {'yes' if err < tol else 'NO'} |")
    lines += ["", "## Timings", "",
              "| DQK | DV | S | B | kernel | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
              "| fwd vs ours | fwd+bwd vs ours | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = [x for x in rows if x["kernel"].startswith("ours") and x["S"] == r["S"]
                and x["DQK"] == r["DQK"] and x["fwd_ms"] is not None]
        best_f = min((x["fwd_ms"] for x in ours), default=None)
        best_fb = min((x["fb_ms"] for x in ours), default=None)
        if r["fwd_ms"] is None:
            lines.append(f"| {r['DQK']} | {r['DV']} | {r['S']} | {r['B']} | {r['kernel']} | - | - "
                         f"| - | - | - | - | {r['note']} |")
            continue
        rf = f"{r['fwd_ms'] / best_f:.2f}x" if best_f else "-"
        rfb = f"{r['fb_ms'] / best_fb:.2f}x" if best_fb else "-"
        lines.append(
            f"| {r['DQK']} | {r['DV']} | {r['S']} | {r['B']} | {r['kernel']} | {r['fwd_ms']:.3f} "
            f"| {r['fwd_tflops']:.1f} | {r['fb_ms']:.3f} | {r['fb_tflops']:.1f} | {rf} | {rfb} "
            f"| {r['note']} |")
    lines += ["", "Ratios are time / best time of ours at the same shape (>1: slower than ours)."]
    return "\n".join(lines) + "\n"


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "n/a"


def main() -> int:
    if DRY:
        dev = torch.device("cpu")
        device = "cpu-dry-run"
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
        device = torch.cuda.get_device_name(0)
    else:
        print("kernels_gpu: no CUDA device here; skipped (use --cpu-dry-run to check the script)")
        return 0
    print(f"device: {device}")
    checks = [] if ARGS.skip_checks else check_all(dev)
    for name, err, tol in checks:
        print(f"check {name:34s} rel err {err:.2e} (tol {tol:.0e}) {'ok' if err < tol else 'FAIL'}")
    failed = [c for c in checks if not c[1] < c[2]]
    if ARGS.checks_only:
        print(f"{len(checks) - len(failed)} of {len(checks)} checks passed")
        return 1 if failed else 0
    rows = bench(dev)
    text = table(rows, checks, device)
    print(text)
    out = ARGS.out or (None if DRY else str(ROOT / "benchmarks" / "results"))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        safe = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-")
        path = Path(out) / f"kernels_gpu-{_dt.date.today():%Y%m%d}-{safe}.md"
        path.write_text(text)
        print(f"wrote {path}")
    if failed:
        print(f"CHECKS FAILED: {[c[0] for c in failed]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A model of the work of the chunkwise mLSTM kernels: memory traffic, tensor-core FLOPs and
saved activations per token, ours against TFLA's `xl_chunk` (mlstm_kernels) and
FlashAttention, at the GPU benchmark's shapes. No GPU needed; no timing.

    python benchmarks/kernels_traffic.py                       # table to stdout
    python benchmarks/kernels_traffic.py --out benchmarks/results/kernels_traffic-<date>-cpu.md
    python benchmarks/kernels_traffic.py --compile quick        # + the compile check's table

How it counts. Every kernel is written down below as its grid and, per program, the tiles
its loops load and store (the loop structure of the kernel's source, tile by tile) and the
tl.dot shapes it runs; sizes come from the dispatcher's own tile choice
(`triton_ops.chunk_blocks`). Two traffic numbers per kernel:
- "requested": every tile every program loads or stores (what reaches L2);
- "HBM": each tensor's bytes once per kernel (reads of the regions a kernel touches, plus
  its writes): compulsory DRAM traffic when re-reads of a tile by sibling programs hit L2,
  which holds for the re-read tensors here (a chunk's q, k, v: at most a few hundred KB).
The O(S) per-position rows computed by torch (gate preparation, the autograd of it) are
counted as passes over (B*NH, S) float32 rows, the passes counted in the source.
TFLA `xl_chunk` is modelled the same way from its kernels (mlstm_kernels 2.0.6,
`triton/chunkwise/xl_chunk/*`, defaults: chunk 128, 64-row tiles, states and state
gradients float32, states recomputed in the backward, gate gradients by torch from the
row dots q.dq - k.dk). FlashAttention: Q/K/V/O/dO once per pass plus the log-sum-exp,
dq accumulated in float32 (FA2), FLOPs of causal attention.
Saved activations: what the op keeps for its backward beyond its inputs q, k, v, i, f.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

F32 = 4


@dataclass
class K:
    """One kernel launch: requested bytes (loads + stores of every program), HBM bytes
    (each tensor once), tensor-core FLOPs."""

    name: str
    req: float
    hbm: float
    flops: float


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------
# ours (xlstm_kernels/triton_mlstm.py), bf16 inputs, no resets, no initial state
# ----------------------------------------------------------------------------------------


def ours(B, NH, S, DQK, DV, L, E=2, recompute=False, blk=None):
    from xlstm_kernels.triton_ops import chunk_blocks, state_blocks

    b = dict(blk or chunk_blocks(L, DQK, DV))
    BH, NC = B * NH, cdiv(S, L)
    # the state passes' split on an H100 / H200 (132 SMs), as the dispatcher picks it
    b["BK"], b["BV_S"] = state_blocks(BH, DQK, DV, b, target=2 * 132)
    b["SK_B"], b["SV_B"] = state_blocks(BH, DQK, DV, b, target=2 * 132)
    tok = BH * S  # (position, head) pairs
    qk, vv = tok * DQK * E, tok * DV * E  # one pass over q (or k), over v (or h, dh)
    states = BH * NC * DQK * DV * E
    nstates = BH * (NC + 1) * DQK * F32

    def state_fwd():
        BK, BV = b["BK"], b["BV_S"]
        progs = BH * cdiv(DQK, BK) * cdiv(DV, BV)
        per_chunk = (2 * L * 2 * F32  # pass 1 and 2: b, i rows
                     + L * BK * E + L * BV * E  # pass 2: k and v tiles
                     + BK * BV * E + BK * F32)  # store the chunk-entry state (n: 1 program)
        req = progs * NC * per_chunk + progs * BK * BV * F32
        hbm = qk + vv + 2 * tok * F32 + states + nstates + BH * DQK * DV * F32
        return K("state pass (fwd)", req, hbm, 2 * BH * S * DQK * DV)

    def out_fwd():
        BT, BK, BV = b["BT"], b["BK"], b["BV"]
        NT, NVB, NKB = cdiv(L, BT), cdiv(DV, BV), cdiv(DQK, BK)
        req = fl = 0
        for jt in range(NT):
            r = (jt + 1) * 2 * BT * F32 + 2 * BT * F32  # pass 1 rows + own rows
            r += NKB * (BT * BK * E + BK * BV * E + BK * F32)  # q C_c, q n_c
            r += (jt + 1) * (2 * BT * F32 + NKB * 2 * BT * BK * E + BT * BV * E)  # q k^T, v
            r += BT * BV * E + 3 * BT * F32 / NVB  # h; m, den, winner rows (1 program)
            req += r * NVB
            fl += NVB * (2 * BT * DQK * BV + (jt + 1) * (2 * BT * BT * DQK + 2 * BT * BT * BV))
        hbm = 2 * qk + vv + 2 * tok * F32 + states + nstates + vv + 3 * tok * F32
        return K("output pass (fwd)", req * BH * NC, hbm, fl * BH * NC)

    def rows_bwd():
        req = 2 * vv + 2 * tok * F32 + 3 * tok * F32
        return K("per-position scalars (bwd)", req, req, 0)

    def state_bwd():
        BK, BV = b["SK_B"], b["SV_B"]
        progs = BH * cdiv(DQK, BK) * cdiv(DV, BV)
        per_chunk = (BK * BV * E + BK * F32  # store dC, dn
                     + BK * BV * E + BK * F32  # load C_c, n_c
                     + L * 4 * F32 + L * BK * E + L * BV * E)  # rows, q, dh
        req = progs * NC * per_chunk
        hbm = qk + vv + 4 * tok * F32 + states + nstates + states + nstates
        return K("state pass (bwd)", req, hbm, 2 * BH * S * DQK * DV)

    def dk_dq(name, own_rows, rows_per_tile):
        """dk (key tile j, the NT - j query tiles after it) or dq (query tile j, the j + 1
        key tiles up to it: over all tiles the same counts, so both loop as dk does), one
        program per DQK block: the chunk-boundary term (dC or C over DV blocks), then per
        other tile dA rebuilt from dh and v over DV blocks and one (BT, BT) x (BT, BK) dot.
        own_rows / rows_per_tile: float32 rows loaded (m, N, dden, b, i, ...)."""
        BT, BK, BV = b["BT_B"], b["BK_B"], b["BV_B"]
        NT, NKB, NVB = cdiv(L, BT), cdiv(DQK, BK), cdiv(DV, BV)
        req = fl = 0
        for j in range(NT):
            r = own_rows * BT * F32 + BK * F32 + NVB * (BT * BV * E + BK * BV * E) + BT * BK * E
            r += (NT - j) * (rows_per_tile * BT * F32 + NVB * 2 * BT * BV * E + BT * BK * E)
            r += BT * BK * E + BT * F32  # store the gradient tile and the gate-row part
            req += r * NKB
            fl += NKB * (2 * BT * DV * BK + (NT - j) * (2 * BT * BT * DV + 2 * BT * BT * BK))
        hbm = 2 * qk + 2 * vv + 5 * tok * F32 + states + nstates + qk + NKB * tok * F32
        return K(name, req * BH * NC, hbm, fl * BH * NC)

    def dv():
        BT, BK, BV = b["BT_B"], b["BK_DV"], b["BV_DV"]
        NT, NKB, NVB = cdiv(L, BT), cdiv(DQK, BK), cdiv(DV, BV)
        req = fl = 0
        for js in range(NT):
            r = 3 * BT * F32 + NKB * (BT * BK * E + BK * BV * E)
            r += (NT - js) * (4 * BT * F32 + NKB * 2 * BT * BK * E + 2 * BT * BV * E + BT * F32
                              + BT * F32)  # rows (+ dden), q k^T, dh and v; the ys row
            r += BT * BV * E + BT * F32
            req += r * NVB
            fl += NVB * (2 * BT * DQK * BV
                         + (NT - js) * (2 * BT * BT * DQK + 2 * 2 * BT * BT * BV))
        hbm = (2 * qk + 2 * vv + 5 * tok * F32 + states + vv
               + NVB * tok * F32 + NVB * (NT + 1) / 2 * tok * F32)  # xs; ys (key tiles <= t's)
        return K("dv (+ in-chunk gate rows)", req * BH * NC, hbm, fl * BH * NC)

    NT_B = cdiv(L, b["BT_B"])
    NKB_B, NVB_B = cdiv(DQK, b["BK_B"]), cdiv(DV, b["BV_DV"])
    # torch rows: forward _gate_rows (logsigmoid, float, cumsum, contiguous x2: 5 passes)
    fwd_rows = K("gate rows (torch)", 5 * 3 * tok * F32, 5 * 3 * tok * F32, 0)

    def gates_bwd():
        """mlstm_bwd_gates_kernel (one program per chunk): reads the partial rows gs, ws (NKB
        each), xs (NVB), ys (NVB x the key tiles <= t's), dm and the winner rows, writes di
        and db; its first pass re-reads gs, dm and the winners, the gather re-reads dm and
        the winners once per (BR, BR) block pair (L2). mlstm_bwd_gates_chain_kernel: three
        O(NC) rows and a read-modify-write of 2 positions per chunk. Then torch autograd
        maps di, db back to i, f through cumsum and logsigmoid (3 passes of 3 rows)."""
        from xlstm_kernels.triton_ops import GATE_ROWS_BLOCK

        BR = min(GATE_ROWS_BLOCK, 1 << (L - 1).bit_length())
        partial = (2 * NKB_B + NVB_B + NVB_B * (NT_B + 1) / 2) * tok * F32
        chain = BH * NC * (5 * F32 + 4 * F32)
        hbm = partial + 2 * tok * F32 + 2 * tok * F32 + chain + 3 * 3 * tok * F32
        req = hbm + (NKB_B + 2) * tok * F32 + cdiv(L, BR) * 2 * tok * F32
        return K("gate gradients (2 kernels) + autograd of the gate rows", req, hbm, 0)

    fwd = [fwd_rows, state_fwd(), out_fwd()]
    bwd = ([state_fwd()] if recompute else []) + [
        rows_bwd(), state_bwd(), dk_dq("dk", 3, 5), dv(), dk_dq("dq", 5, 2), gates_bwd()]
    saved = (DV * E + 5 * F32  # h; ig, bc, m_t, den_t, winner rows
             + (0 if recompute else DQK * DV * E / L) + DQK * F32 / L + 2 * F32 / L)
    return fwd, bwd, saved


def ours_before(DQK, DV, L):
    """Saved bytes per (token, head) of the kernels before issue 13 (commit 69c3dab):
    float32 chunk states (NC + 1) and float32 h, the same rows."""
    return DV * F32 + 5 * F32 + DQK * DV * F32 / L + DQK * F32 / L + 2 * F32 / L


# ----------------------------------------------------------------------------------------
# TFLA xl_chunk (mlstm_kernels 2.0.6), its defaults
# ----------------------------------------------------------------------------------------


def tfla(B, NH, S, DQK, DV, L=128, E=2, recompute=True):
    BH, NC = B * NH, cdiv(S, L)
    tok = BH * S
    qk, vv = tok * DQK * E, tok * DV * E
    BL = 64  # siz_b_L_parallel = siz_b_L_loop
    NT = cdiv(L, BL)
    states = BH * (NC + 1) * DQK * DV * F32
    nst = BH * (NC + 1) * DQK * F32

    def fw_recurrent():
        BK, BV = min(64, DQK), min(64, DV)
        progs = BH * cdiv(DQK, BK) * cdiv(DV, BV)
        per_chunk = L * BK * E + L * BV * E + 3 * L * F32 + BK * BV * F32 + BK * F32
        return K("recurrent fw C (states fp32)", progs * NC * per_chunk,
                 qk + vv + 3 * tok * F32 + states + nst, 2 * BH * S * DQK * DV)

    def fw_parallel():
        BKl, BVp = min(64, DQK), min(128, DV)
        NKB, NVB = cdiv(DQK, BKl), cdiv(DV, BVp)
        req = fl = 0
        for jt in range(NT):
            r = (jt + 1) * (NKB * 2 * BL * BKl * E + 2 * BL * F32 + BL * BVp * E) + BL * F32
            r += NKB * (BL * BKl * E + BKl * BVp * F32 + BKl * F32) + 2 * F32
            r += BL * BVp * E + 2 * BL * F32 / NVB
            req += r * NVB
            fl += NVB * ((jt + 1) * (2 * BL * BL * DQK + 2 * BL * BL * BVp) + 2 * BL * DQK * BVp)
        hbm = 2 * qk + vv + 3 * tok * F32 + states + nst + vv + 2 * tok * F32
        return K("parallel fw H", req * BH * NC, hbm, fl * BH * NC)

    def bw_recurrent():
        BK, BV = min(64, DQK), min(64, DV)
        progs = BH * cdiv(DQK, BK) * cdiv(DV, BV)
        per_chunk = L * BK * E + L * BV * E + 4 * L * F32 + BK * BV * F32
        return K("recurrent bw dC (fp32)", progs * NC * per_chunk,
                 qk + vv + 4 * tok * F32 + states, 2 * BH * S * DQK * DV)

    def dK():
        BKp, BVl = min(128, DQK), min(64, DV)
        NKB, NVB = cdiv(DQK, BKp), cdiv(DV, BVl)
        req = fl = 0
        for js in range(NT):
            r = 3 * BL * F32 + (NT - js) * (NVB * 2 * BL * BVl * E + BL * BKp * E + 4 * BL * F32)
            r += NVB * BKp * BVl * F32 + BL * BKp * E
            req += r * NKB
            fl += NKB * (2 * BL * DV * BKp + (NT - js) * (2 * BL * BL * DV + 2 * BL * BL * BKp))
        hbm = qk + vv + vv + 7 * tok * F32 + states + qk
        return K("parallel bw dK", req * BH * NC, hbm, fl * BH * NC)

    def dV():
        BKl, BVp = min(64, DQK), min(128, DV)
        NKB, NVB = cdiv(DQK, BKl), cdiv(DV, BVp)
        req = fl = 0
        for js in range(NT):
            r = 3 * BL * F32 + (NT - js) * (NKB * 2 * BL * BKl * E + BL * BVp * E + 4 * BL * F32)
            r += NKB * BKl * BVp * F32 + BL * BVp * E
            req += r * NVB
            fl += NVB * (2 * BL * DQK * BVp + (NT - js) * (2 * BL * BL * DQK + 2 * BL * BL * BVp))
        hbm = 2 * qk + vv + 7 * tok * F32 + states + vv
        return K("parallel bw dV", req * BH * NC, hbm, fl * BH * NC)

    def dQ():
        BKp, BVl = min(128, DQK), min(64, DV)
        NKB, NVB = cdiv(DQK, BKp), cdiv(DV, BVl)
        req = fl = 0
        for jt in range(NT):
            r = 4 * BL * F32 + (jt + 1) * (NVB * 2 * BL * BVl * E + BL * BKp * E + 2 * BL * F32)
            r += NVB * BKp * BVl * F32 + BL * BKp * E
            req += r * NKB
            fl += NKB * (2 * BL * DV * BKp + (jt + 1) * (2 * BL * BL * DV + 2 * BL * BL * BKp))
        hbm = qk + vv + vv + 7 * tok * F32 + states + qk
        return K("parallel bw dQ", req * BH * NC, hbm, fl * BH * NC)

    # torch: forward gates (logsigmoid, chunked cumsums: ~6 passes); backward gate grads:
    # (q*dq - k*dk).sum(-1) reads q, dq, k, dk (and makes two products) + ~6 row passes
    gates_f = K("gates (torch)", 6 * 3 * tok * F32, 6 * 3 * tok * F32, 0)
    gg = 4 * qk + 2 * 2 * tok * DQK * E + 6 * 3 * tok * F32
    gates_b = K("gate grads q.dq - k.dk (torch)", gg, gg, 0)
    fwd = [gates_f, fw_recurrent(), fw_parallel()]
    bwd = ([fw_recurrent()] if recompute else []) + [bw_recurrent(), dK(), dV(), dQ(), gates_b]
    saved = 2 * F32 + (0 if recompute else DQK * DV * F32 / L)
    return fwd, bwd, saved


def flash(B, NH, S, DQK, DV, E=2):
    tok = B * NH * S
    qk, vv = tok * DQK * E, tok * DV * E
    f_fl = B * NH * S * S * (DQK + DV)  # causal: half of 2 S^2 (DQK + DV)
    fwd = [K("flash fwd", 2 * qk + vv + vv + tok * F32, 2 * qk + vv + vv + tok * F32, f_fl)]
    b = 2 * qk + 3 * vv + tok * F32 * 2 + 2 * tok * DQK * F32 + 2 * qk + vv
    bwd = [K("flash bwd (dq fp32 accumulator)", b, b, 2.5 * f_fl)]
    return fwd, bwd, DV * E + F32


# ----------------------------------------------------------------------------------------


def per_token(ks, tokens):
    return (sum(k.req for k in ks) / tokens, sum(k.hbm for k in ks) / tokens,
            sum(k.flops for k in ks) / tokens)


def report(shapes, tokens, NH, with_kernels: bool) -> str:
    lines = [
        "Per token of one layer (all heads), bf16 inputs, B * S = "
        f"{tokens} tokens, NH = {NH}. HBM = each tensor once per kernel; requested = every "
        "tile every program loads or stores (L2 traffic). FLOPs: tensor-core (tl.dot), "
        "2 per multiply-add. Saved: bytes kept for the backward beyond q, k, v, i, f; "
        "'before' = our kernels before issue 13 at chunk 64, the default then (float32 "
        "chunk states and h). Ours keep h (the op's output; a following op that saves h "
        "shares its storage).", "",
        "| DQK | DV | S | kernel | fwd HBM KB | fwd+bwd HBM KB | fwd+bwd requested KB "
        "| fwd MFLOP | fwd+bwd MFLOP | saved B | HBM vs xl_chunk | saved vs before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    detail = []
    for DQK, DV, S in shapes:
        B = max(1, tokens // S)
        n = B * S
        runs = {}
        for L in (64, 128):
            for rec in (False, True):
                f, bw, sv = ours(B, NH, S, DQK, DV, L, recompute=rec)
                runs[f"ours chunk={L}{' recompute' if rec else ''}"] = (f, bw, sv, L)
        f, bw, sv = tfla(B, NH, S, DQK, DV)
        runs["TFLA xl_chunk chunk=128"] = (f, bw, sv, None)
        f, bw, sv = flash(B, NH, S, DQK, DV)
        runs["FlashAttention (causal)"] = (f, bw, sv, None)
        ref = per_token(runs["TFLA xl_chunk chunk=128"][0] + runs["TFLA xl_chunk chunk=128"][1],
                        n)[1]
        for name, (f, bw, sv, L) in runs.items():
            _, fh, ff = per_token(f, n)
            rq, th, tf = per_token(f + bw, n)
            before = f"{sv / ours_before(DQK, DV, 64):.2f}" if L else ""
            lines.append(
                f"| {DQK} | {DV} | {S} | {name} | {fh / 1e3:.1f} | {th / 1e3:.1f} | "
                f"{rq / 1e3:.1f} | {ff / 1e6:.2f} | {tf / 1e6:.2f} | {sv * NH:.0f} | "
                f"{th / ref:.2f} | {before} |")
            if with_kernels and name in ("ours chunk=128", "ours chunk=64",
                                         "TFLA xl_chunk chunk=128"):
                for k in f + bw:
                    detail.append(f"| {DQK} | {DV} | {S} | {name} | {k.name} | "
                                  f"{k.hbm / n / 1e3:.2f} | {k.req / n / 1e3:.2f} | "
                                  f"{k.flops / n / 1e6:.2f} |")
    if detail:
        lines += ["", "Per kernel (per token, all heads):", "",
                  "| DQK | DV | S | kernels | kernel | HBM KB | requested KB | MFLOP |",
                  "|---|---|---|---|---|---|---|---|"] + detail
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the markdown here")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--seqlens", default="2048,8192,32768")
    p.add_argument("--compile", choices=("none", "quick", "full"), default="none",
                   help="append the compile check's table (runs it: quick ~1 min, full ~10)")
    args = p.parse_args(argv)
    NH = 8
    seqlens = [int(s) for s in args.seqlens.split(",")]
    shapes = [(d, v, s) for d, v in ((256, 512), (128, 128)) for s in seqlens]
    text = (f"# mLSTM kernel work model, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d} "
            "(benchmarks/kernels_traffic.py)\n\n" + report(shapes, args.tokens, NH, True))
    # the NeurIPS presets' mLSTM heads (configs/xlstm10-*, xlstm71-*: 4 heads, proj factor 2,
    # context 2048): 125M DQK = DV = 384, 1.3B 1024 (FlashAttention stops at head dim 256:
    # its row is the FLOP-matched model only)
    text += ("\n## NeurIPS presets (125M, 1.3B): NH 4, S 2048\n\n"
             + report([(384, 384, 2048), (1024, 1024, 2048)], args.tokens, 4, False))
    if args.compile != "none":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-W", "ignore", "-m", "xlstm_kernels.triton_compile_check"]
        proc = subprocess.run(cmd + (["--quick"] if args.compile == "quick" else []),
                              capture_output=True, text=True, env=env, cwd=ROOT)
        text += "\n## Compile check (sm_90)\n\n" + proc.stdout
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

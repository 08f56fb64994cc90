"""Triton backend of the mLSTM and sLSTM ops: autograd wrappers around the raw kernels in
`triton_mlstm.py` and `triton_slstm.py`. The dispatch in `xlstm_kernels/__init__.py` imports
this module lazily; callers use `xlstm_kernels.mlstm_chunkwise(..., backend="triton")`.

Supported: q, k, v in float32, bfloat16 or float16 (one dtype for the three), gates in
any of those, DQK <= MAX_DQK (1024; every kernel loops over DQK in blocks, so the bound
is what is compiled and tested, not a tile size), any DV (split across programs), any S,
any chunk size >= 1.
Accumulators and stabilizers are float32; what is stored at full size (h, the chunk
states, dh is read as it comes, dq, dk, dv, the chunk-state gradients) is in the input
dtype, written by the kernels. float64 is refused (ValueError naming the argument):
the torch backend is the float64 path. Tensors must be on CUDA, or on CPU under
TRITON_INTERPRET=1 (the interpreter, used by the tests).

How the chunkwise backward is exact (the oracle is autograd of the float64 reference).
Every stabilizer m (per position and per chunk boundary) is a max over log weights, and
h_t = num_t / (max(|den_t|, exp(-m_t)) + eps) depends on m_t beyond the true (unstabilized)
numerator and denominator only through eps * exp(m_t). So the gradient splits in two:
1. the kernels differentiate everything with all stabilizers held fixed (the initial m0,
   an input, excepted), the path through max(|den|, exp(-m)) included;
2. the gates kernels (mlstm_bwd_gates_*) add the path through each max:
   dL/dm_t = -eps (dh_t . h_t) / N_t (and, for the last state, dm - <dC, C> - <dn, n>),
   routed to the candidate that won the max (a key, or the carried state and from there
   along the chain of chunk-boundary maxes). The kernels record the winners in the forward.
Gate gradients arrive at `bc` (the log-forget cumsum restarted at chunk starts and
resets) and `ig`; torch autograd maps them back to f through cumsum and logsigmoid, O(S).

Memory (per head): the forward keeps the S/L chunk-entry states C (input dtype; none with
recompute_states=True, where the backward reruns the state pass), n and m per boundary
(float32, O(S/L * DQK)) and O(S) rows (m_t, den_t, winners; h in the input dtype); the
backward adds the S/L gradients of the states (input dtype). Nothing of size S x S exists.
Kernels per chunkwise call: forward = state pass (sequential over chunks) + output pass
(parallel over chunks and tiles); backward = [state pass again] + per-position scalars +
reverse state pass + dk + dv + dq passes + the gate-gradient epilogue (two kernels:
partial rows summed and stabilizer paths per chunk; the reverse chain over chunks).
The step kernel and the sLSTM kernel have their own Triton backward kernels too.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton

from . import triton_mlstm as tm
from . import triton_slstm as ts

MAX_DQK = 1024  # the widest head checked (compile check, tests): the 1.3B NeurIPS presets
BLOCK_T_MAX = 64  # query/key tile inside a chunk (a chunk of 128 runs as 2 x 2 tiles)
BLOCK_T_BWD_MAX = 64  # the same for the backward's dk/dv and dq passes
BLOCK_V_MAX = 128  # DV block per program; larger DV is split across programs
BLOCK_V_BWD_MAX = 32  # the DV step of the backward's dk / dq loops (dA = dH V^T over DV):
# narrow steps keep the 128-wide DQK blocks below within 168 registers (sm_90, 8 warps)
BLOCK_V_DV_MAX = 128  # DV block of the dv programs: A = K Q^T is rebuilt once per DV
# block, so wider blocks halve those FLOPs; dv holds fewer tiles than dk / dq and fits
BLOCK_K_DV_MAX = 64  # the DQK step of dv's K Q^T loop (128 would need 171-184 registers)
BLOCK_K_MAX = 64  # DQK block of the state passes
BLOCK_T_STATE_MAX = 32  # positions per step of the state passes' loop over a chunk
BLOCK_V_STATE_MAX = 64  # DV block of the state passes (more programs, fewer registers)
BLOCK_K_BWD_MAX = 128  # DQK block of the backward's dk / dq programs and dv's K Q^T loop:
# each dk / dq program rebuilds dA for its block, so 128 (as TFLA) halves those FLOPs
ROWS_BLOCK = 64  # positions per program of the backward's per-position scalars
GATE_ROWS_BLOCK = 32  # positions per block of the gates kernel (its (32, 32) gathers)
GATE_WARPS = 8  # (4 warps: ptxas spilled 8 B at 32 registers for one variant)
GATE_CHAIN_BLOCK = 128  # chunks per step of the gates' reverse chain (a scan)
STEP_BLOCK_V = 32  # DV block of the step kernels (a (DQK, 32) slice of C per program)
STEP_BLOCK_K = 64  # DQK block of the step kernels' loop over that slice (the state is
# streamed: no (DQK, BV) tile, four warps at any DQK; at 128 the backward needs 238
# registers with a state and spills without one)
POISON = False  # tests: fill every output buffer with NaN / a bad index before a launch

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _empty(shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -(2**30), dtype=dtype, device=device)


def _state_opts(BK: int, BV: int) -> dict:
    """Launch options of the state passes (ignored by the interpreter). The (BK, BV) float32
    state lives in registers across the chunk loop, next to a (BT, BK) key tile and a (BT, BV)
    value tile: at 64 x 64 four warps need ~185 registers per thread, eight warps spread it
    (<= 168, no spill; checked by triton_compile_check). float32 inputs (32 x 32 blocks)
    stay at four: ptxas spills a few bytes there with either count, fewer at four with the
    GPU image's Triton 3.6."""
    return {"num_warps": 8 if BK * BV >= 64 * 64 else 4, "num_stages": 3}


# Launch options of the tile-parallel kernels (output pass, dk, dv, dq): a small space per
# DQK class, the first entry the default. Every entry is compiled by triton_compile_check
# (no spills, shared memory within the limit). With XLSTM_TRITON_AUTOTUNE=1 on CUDA the
# first call of each (kernel, shape, dtype, flags) times the candidates (triton's do_bench)
# and keeps the fastest for the process; otherwise, and always under the interpreter,
# the default: a deterministic choice.
REG_BUDGET = 168  # registers per thread of the hot kernels: two 8-warp blocks per SM
TUNE_SPACE = {
    # BD >= 128: eight warps only (with four, these kernels need 216-248 registers per
    # thread, over the budget of 168; triton_compile_check). The cap (ptxas
    # .maxnreg): at chunk 128 (two query tiles, a loop the compiler cannot unroll) ptxas
    # takes 165-180 registers for the output pass, dk and dq and 206-231 for dv when
    # free to; capped at 168 it fits all of them without a spill on Triton 3.6 and 3.9
    # (dv only with its v tile re-read per query tile and dh / N kept 16-bit; the compile
    # check fails a 16-bit launch that spills or exceeds the budget). Chunk 64 takes
    # 140-164 capped (160-166 free)
    "wide": ({"num_warps": 8, "num_stages": 2, "maxnreg": REG_BUDGET},
             {"num_warps": 8, "num_stages": 3, "maxnreg": REG_BUDGET}),
    "narrow": ({"num_warps": 4, "num_stages": 3}, {"num_warps": 4, "num_stages": 2},
               {"num_warps": 8, "num_stages": 3}),
    # float32 inputs at BD >= 128 (the exact path: IEEE dots on FMA, 32-wide tiles): ptxas
    # spills a few bytes at 2 and 4 stages (output pass, dv with resets), not at 3
    "wide_fp32": ({"num_warps": 8, "num_stages": 3},),
}
COMPILE_ALL = False  # triton_compile_check: launch (= compile) every candidate
_TUNED: dict = {}


def _launch(kernel, grid, key, args, kwargs, BD: int) -> None:
    """kernel[grid](*args, **kwargs, **launch options chosen as TUNE_SPACE says)."""
    space = TUNE_SPACE["narrow" if BD < 128 else
                       "wide_fp32" if args[0].element_size() >= 4 else "wide"]
    if COMPILE_ALL:
        for opt in space:
            kernel[grid](*args, **kwargs, **opt)
        return
    opt = space[0]
    if (len(space) > 1 and not _interpret() and args[0].is_cuda
            and os.environ.get("XLSTM_TRITON_AUTOTUNE", "") == "1"):
        full = (kernel.__name__, key, args[0].dtype, tuple(sorted(kwargs.items())))
        if full not in _TUNED:
            from triton.testing import do_bench

            times = [do_bench(lambda o=o: kernel[grid](*args, **kwargs, **o)) for o in space]
            _TUNED[full] = space[times.index(min(times))]
        opt = _TUNED[full]
    kernel[grid](*args, **kwargs, **opt)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(x), 1)))


def _check_dtypes(named: dict[str, torch.Tensor | None]) -> None:
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype not in _SUPPORTED:
            raise ValueError(
                f"{name}: got dtype {t.dtype}; backend='triton' supports float32, bfloat16 and "
                f"float16 (float64 runs on backend='torch')"
            )


def _check_device(t: torch.Tensor, name: str = "q") -> None:
    if not t.is_cuda and not _interpret():
        raise ValueError(
            f"{name}: got a tensor on {t.device}; backend='triton' needs CUDA tensors "
            f"(or TRITON_INTERPRET=1 for CPU tensors)"
        )


def _state_names(prefix: str, state, parts: str) -> dict:
    if state is None:
        return {}
    return {f"{prefix}.{p}": t for p, t in zip(parts, state)}


# ========================================================================================
# mLSTM chunkwise
# ========================================================================================


def _doc_start(reset: torch.Tensor) -> torch.Tensor:
    L = reset.shape[-1]
    idx = torch.arange(L, device=reset.device).expand_as(reset)
    return torch.where(reset, idx, torch.full_like(idx, -1)).cummax(dim=-1).values


def _gate_rows(i, f, reset, L: int, NC: int):
    """Differentiable O(S) gate preparation: ig (input gate rows) and bc (log forget cumsum
    restarted at every chunk start and every reset), both (B, NH, SP) float32; and the
    integer rows seg (segment id) and carry (1 where the carried state reaches), (B, SP)."""
    B, NH, S = i.shape
    SP = NC * L
    pad = SP - S
    logf = F.logsigmoid(f.float())
    ig = i.float()
    if pad:
        logf = F.pad(logf, (0, pad))
        ig = F.pad(ig, (0, pad))
    lf = logf.view(B, NH, NC, L)
    b = torch.cumsum(lf, dim=-1)
    if reset is None:
        return ig.contiguous(), b.reshape(B, NH, SP).contiguous(), None, None
    rp = F.pad(reset, (0, pad), value=False) if pad else reset
    start = _doc_start(rp.view(B, NC, L))[:, None]  # (B, 1, NC, L)
    base = torch.gather(b - lf, -1, start.clamp(min=0).expand(B, NH, NC, L))
    bc = b - torch.where(start >= 0, base, torch.zeros_like(base))
    seg = torch.cumsum(rp.to(torch.int32), dim=-1, dtype=torch.int32)  # (B, SP)
    segc = seg.view(B, NC, L)
    prev = torch.cat([torch.zeros_like(segc[:, :1, -1]), segc[:, :-1, -1]], dim=1)  # (B, NC)
    carry = (segc == prev[..., None]).to(torch.int32).view(B, SP)
    return ig.contiguous(), bc.reshape(B, NH, SP).contiguous(), seg.contiguous(), carry.contiguous()


def chunk_blocks(L: int, DQK: int, DV: int, esize: int = 2) -> dict[str, int]:
    """Tile sizes of the chunkwise kernels: BT (positions of a chunk per tile), BD (DQK
    padded), BV (DV block), BK (DQK block of the state pass); *_B for the backward (BK_B:
    the DQK block of the dk / dq programs, so no tile is DQK wide); *_S the state passes;
    BV_DV, BK_DV the DV block and the DQK step of the dv programs.
    esize: bytes per input element. float32 inputs (IEEE tl.dot: FMA, no tensor cores,
    operands in registers) at head dims >= 128 get 32-wide tiles, which spill far less."""
    BT = min(BLOCK_T_MAX, _pow2(L))
    BD = _pow2(DQK)
    BV = min(BLOCK_V_MAX, _pow2(DV))
    b = {"BT": BT, "BD": BD, "BV": BV, "BK": min(BLOCK_K_MAX, BD),
         "BT_B": min(BT, BLOCK_T_BWD_MAX), "BK_B": min(BD, BLOCK_K_BWD_MAX),
         "BV_B": min(BV, BLOCK_V_BWD_MAX), "BV_S": min(BV, BLOCK_V_STATE_MAX),
         "BV_DV": min(BV, BLOCK_V_DV_MAX), "BK_DV": min(BD, BLOCK_K_DV_MAX),
         "BT_S": min(BT, BLOCK_T_STATE_MAX)}
    if esize >= 4 and max(DQK, DV) >= 128:
        b = {k: v if k == "BD" else min(v, 32) for k, v in b.items()}
        b["BT_S"] = min(b["BT_S"], 16)
    return b


def _state_programs_target() -> int:
    """Programs the state passes aim for: two per SM on CUDA (they are sequential over
    chunks, so their parallelism is B * NH * DQK/BK * DV/BV); 0 under the interpreter
    (fewer, larger programs are faster there)."""
    if _interpret() or not torch.cuda.is_available():
        return 0
    return 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def state_blocks(BH: int, DQK: int, DV: int, blk: dict,
                 target: int | None = None) -> tuple[int, int]:
    """(BK, BV) of the state passes: the default blocks, halved (the larger first, not below
    32) while B * NH is too small to fill the GPU (`target` programs; default: two per SM
    of the current device)."""
    BK, BV = blk["BK"], blk["BV_S"]
    target = _state_programs_target() if target is None else target
    while BH * triton.cdiv(DQK, BK) * triton.cdiv(DV, BV) < target and max(BK, BV) > 32:
        if BV >= BK:
            BV //= 2
        else:
            BK //= 2
    return BK, BV


def _fwd_states(kc, vc, ig, bc, segc, carc, init, NH, NC, L, DQK, DV, blk, has_reset, up):
    """Launch the forward state pass: cs (BH, NC, DQK, DV) in the input dtype, ns, ms,
    the winners amax_c and the last state cl (BH, DQK, DV) float32."""
    BH, S = kc.shape[0], kc.shape[1]
    SP = ig.shape[-1]
    dev = kc.device
    f32 = torch.float32
    BK, BV = state_blocks(BH, DQK, DV, blk)
    BT = blk["BT_S"]
    cs = _empty((BH, NC, DQK, DV), kc.dtype, dev)
    ns = _empty((BH, NC + 1, DQK), f32, dev)
    ms = _empty((BH, NC + 1), f32, dev)
    amax_c = _empty((BH, NC), torch.int32, dev)
    cl = _empty((BH, DQK, DV), f32, dev)
    has_init = init is not None
    C0c, n0c, m0c = init if has_init else (ig, ig, ig)  # unused placeholders
    tm.mlstm_fwd_state_kernel[(BH, triton.cdiv(DQK, BK), triton.cdiv(DV, BV))](
        kc, vc, ig, bc, segc, carc, C0c, n0c, m0c, cs, ns, ms, amax_c, cl,
        S, SP, NH, NC, L, DQK, DV,
        BK=BK, BV=BV, BT=BT, HAS_INIT=has_init, HAS_RESET=has_reset, UPCAST=up,
        **_state_opts(BK, BV),
    )
    return cs, ns, ms, amax_c, cl


class _MLSTMChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ig, bc, seg, carry, C0, n0, m0, L, eps, recompute):
        B, NH, S, DQK = q.shape
        DV = v.shape[-1]
        BH = B * NH
        SP = ig.shape[-1]
        NC = SP // L
        dev = q.device
        blk = chunk_blocks(L, DQK, DV, q.element_size())
        BT, BD, BV = blk["BT"], blk["BD"], blk["BV"]
        NT = triton.cdiv(L, BT)
        NVB = triton.cdiv(DV, BV)
        qc, kc, vc = (t.reshape(BH, S, t.shape[-1]).contiguous() for t in (q, k, v))
        has_init = C0 is not None
        has_reset = seg is not None
        f32 = torch.float32
        init = None
        if has_init:
            init = (C0.reshape(BH, DQK, DV).to(f32).contiguous(),
                    n0.reshape(BH, DQK).to(f32).contiguous(), m0.reshape(BH).to(f32).contiguous())
        segc = seg if has_reset else ig
        carc = carry if has_reset else ig
        up = _interpret()
        cs, ns, ms, amax_c, cl = _fwd_states(kc, vc, ig, bc, segc, carc, init, NH, NC, L, DQK,
                                             DV, blk, has_reset, up)
        h = _empty((BH, S, DV), q.dtype, dev)
        mpos = _empty((BH, SP), f32, dev)
        den = _empty((BH, SP), f32, dev)
        amax_p = _empty((BH, SP), torch.int32, dev)
        scale = DQK**-0.5
        _launch(tm.mlstm_fwd_out_kernel, (NC * NT, NVB, BH), (L, DQK, DV), (
            qc, kc, vc, ig, bc, segc, carc, cs, ns, ms, h, mpos, den, amax_p,
            scale, eps, S, SP, NH, NC, L, DQK, DV, NT,
        ), dict(BT=BT, BK=blk["BK"], BV=BV, HAS_RESET=has_reset, UPCAST=up), BD)
        # recompute: the (NC, DQK, DV) states are dropped here and rebuilt by the backward
        # (one more state pass); ns, ms and the winners are O(NC * DQK) and kept
        saved_cs = None if recompute else cs
        ctx.save_for_backward(qc, kc, vc, ig, bc, seg, carry, saved_cs, ns, ms, amax_c, h, mpos,
                              den, amax_p, cl, *(init if has_init else ()))
        ctx.meta = (B, NH, S, DQK, DV, L, NC, SP, blk, eps, has_init, recompute,
                    None if C0 is None else (C0.dtype, n0.dtype, m0.dtype))
        C = cl.view(B, NH, DQK, DV)
        n = ns[:, NC].reshape(B, NH, DQK).clone()
        m = ms[:, NC].reshape(B, NH).clone()
        return h.view(B, NH, S, DV), C, n, m

    @staticmethod
    def backward(ctx, dh, dC_last, dn_last, dm_last):
        saved = ctx.saved_tensors
        (qc, kc, vc, ig, bc, seg, carry, cs, ns, ms, amax_c, h, mpos, den, amax_p,
         cl) = saved[:16]
        B, NH, S, DQK, DV, L, NC, SP, blk, eps, has_init, recompute, sdtypes = ctx.meta
        BT, BD, BV = blk["BT_B"], blk["BD"], blk["BV_B"]
        BVD = blk["BV_DV"]
        NT = triton.cdiv(L, BT)
        NVB = triton.cdiv(DV, BVD)  # dv programs (and parts of the in-chunk gate rows)
        BH = B * NH
        dev = qc.device
        f32 = torch.float32
        dt = qc.dtype
        has_reset = seg is not None
        up = _interpret()
        scale = DQK**-0.5
        igf = ig.view(BH, SP)
        bcf = bc.view(BH, SP)
        segc = seg if has_reset else igf
        carc = carry if has_reset else igf
        if recompute:
            init = tuple(saved[16:19]) if has_init else None
            cs = _fwd_states(kc, vc, igf, bcf, segc, carc, init, NH, NC, L, DQK, DV, blk,
                             has_reset, up)[0]
        # dh is read by the kernels in its own dtype (no float32 copy)
        if dh is None:
            dh = torch.zeros(BH, S, DV, dtype=dt, device=dev)
        dh = dh.reshape(BH, S, DV).contiguous()
        # --- per-position scalars (O(S)): normalizer, d(den), d(m_t)
        nrm = _empty((BH, SP), f32, dev)
        dden = _empty((BH, SP), f32, dev)
        dm_pos = _empty((BH, SP), f32, dev)
        BR = ROWS_BLOCK
        tm.mlstm_bwd_rows_kernel[(triton.cdiv(SP, BR), BH)](
            dh, h, den, mpos, nrm, dden, dm_pos, eps, S, SP, DV,
            BR=BR, BV=min(BLOCK_V_MAX, _pow2(DV)),
        )
        has_dlast = dC_last is not None or dn_last is not None
        dcl = (dC_last if dC_last is not None else torch.zeros(BH, DQK, DV, device=dev))
        dnl = (dn_last if dn_last is not None else torch.zeros(BH, DQK, device=dev))
        dcl = dcl.reshape(BH, DQK, DV).to(f32).contiguous()
        dnl = dnl.reshape(BH, DQK).to(f32).contiguous()
        # --- reverse state pass
        dcn = _empty((BH, NC, DQK, DV), dt, dev)
        dnn = _empty((BH, NC, DQK), f32, dev)
        dc0 = _empty((BH, DQK, DV), f32, dev)
        dn0 = _empty((BH, DQK), f32, dev)
        SK, SV = state_blocks(BH, DQK, DV, blk)
        NKS, NVS = triton.cdiv(DQK, SK), triton.cdiv(DV, SV)
        dlogw = _empty((BH, NC, NKS, NVS), f32, dev)
        tm.mlstm_bwd_state_kernel[(BH, NKS, NVS)](
            qc, dh, nrm, dden, bcf, carc, mpos, cs, ns, ms, dcl, dnl,
            dcn, dnn, dc0, dn0, dlogw,
            scale, S, SP, NH, NC, L, DQK, DV, NKS, NVS,
            BK=SK, BV=SV, BT=blk["BT_S"], HAS_DLAST=has_dlast, HAS_RESET=has_reset, UPCAST=up,
            **_state_opts(SK, SV),
        )
        # --- key side and query side of every chunk, in parallel; the gate-gradient rows
        # come in parts (per DQK or DV block), O((NKB + NVB * NT) * S), summed by the gates
        # kernel below
        BKB = blk["BK_B"]
        NKBB = triton.cdiv(DQK, BKB)
        dk = _empty((BH, S, DQK), dt, dev)
        gs = _empty((NKBB, BH, SP), f32, dev)
        _launch(tm.mlstm_bwd_dk_kernel, (NC * NT, NKBB, BH), (L, DQK, DV), (
            qc, kc, vc, igf, bcf, segc, carc, mpos, nrm, dden, dh, dcn, dnn, ms,
            dk, gs,
            scale, S, SP, NH, NC, L, DQK, DV, NT, BH,
        ), dict(BT=BT, BK=BKB, BV=BV, HAS_RESET=has_reset, UPCAST=up), BD)
        dv = _empty((BH, S, DV), dt, dev)
        xs = _empty((NVB, BH, SP), f32, dev)
        ys = _empty((NVB, NT, BH, SP), f32, dev)  # key tiles js > jt: never written or read
        _launch(tm.mlstm_bwd_dv_kernel, (NC * NT, NVB, BH), (L, DQK, DV), (
            qc, kc, vc, igf, bcf, segc, carc, mpos, nrm, dden, dh, dcn, ms, dv, xs, ys,
            scale, S, SP, NH, NC, L, DQK, DV, NT, BH,
        ), dict(BT=BT, BK=blk["BK_DV"], BV=BVD, HAS_RESET=has_reset, UPCAST=up), BD)
        dq = _empty((BH, S, DQK), dt, dev)
        ws = _empty((NKBB, BH, SP), f32, dev)
        _launch(tm.mlstm_bwd_dq_kernel, (NC * NT, NKBB, BH), (L, DQK, DV), (
            qc, kc, vc, igf, bcf, segc, carc, mpos, nrm, dden, dh, cs, ns, ms,
            dq, ws,
            scale, S, SP, NH, NC, L, DQK, DV, NT, BH,
        ), dict(BT=BT, BK=BKB, BV=BV, HAS_RESET=has_reset, UPCAST=up), BD)
        # --- gate gradients: one kernel per chunk sums the partial rows and adds the paths
        # through every stabilizer max (the module docstring); a second runs the reverse
        # chain of the chunk-end m gradients (a scan over chunks, O(NC) per row)
        x_last = torch.zeros(BH, device=dev, dtype=f32)
        if dm_last is not None:
            x_last = x_last + dm_last.reshape(BH).to(f32)
        if dC_last is not None:  # row dots without a (BH, DQK, DV) temporary
            x_last = x_last - torch.linalg.vecdot(dcl.view(BH, -1), cl.view(BH, -1))
        if dn_last is not None:
            x_last = x_last - torch.linalg.vecdot(dnl, ns[:, NC])
        di = _empty((BH, SP), f32, dev)
        dB = _empty((BH, SP), f32, dev)
        xc = _empty((BH, NC), f32, dev)
        lk = _empty((BH, NC), f32, dev)
        dm0 = _empty((BH,), f32, dev)
        NW = NKS * NVS
        tm.mlstm_bwd_gates_kernel[(NC, BH)](
            gs, ws, xs, ys, dm_pos, amax_p, amax_c, dlogw, carc, di, dB, xc, lk, dm0,
            SP, NH, NC, L, NKBB, NVB, NT, NW, BH, BT,
            BR=min(GATE_ROWS_BLOCK, _pow2(L)), BW=_pow2(NW, 1), HAS_RESET=has_reset,
            num_warps=GATE_WARPS,
        )
        tm.mlstm_bwd_gates_chain_kernel[(BH,)](
            xc, lk, amax_c, x_last, di, dB, dm0, SP, NC, L, BC=min(GATE_CHAIN_BLOCK, _pow2(NC)),
        )
        dq = dq.view(B, NH, S, DQK)
        dk = dk.view(B, NH, S, DQK)
        dv = dv.view(B, NH, S, DV)
        dC0 = dn0_ = dm0_ = None
        if has_init:
            dC0 = dc0.view(B, NH, DQK, DV).to(sdtypes[0])
            dn0_ = dn0.view(B, NH, DQK).to(sdtypes[1])
            dm0_ = dm0.view(B, NH).to(sdtypes[2])
        return (dq, dk, dv, di.view(B, NH, SP), dB.view(B, NH, SP), None, None, dC0, dn0_, dm0_,
                None, None, None)


def mlstm_chunkwise_triton(q, k, v, i, f, *, chunk_size, initial_state, reset, eps,
                           recompute_states=False):
    """Chunkwise mLSTM on Triton. Shapes as `xlstm_kernels.mlstm_chunkwise`; returns h
    ((B, NH, S, DV) in the input dtype) and the last state (C, n, m) in float32.
    recompute_states: the backward rebuilds the chunk-boundary states with one more state
    pass instead of keeping them from the forward (saves NC * DQK * DV per head)."""
    _check_dtypes({"q": q, "k": k, "v": v, "i": i, "f": f,
                   **_state_names("initial_state", initial_state, "Cnm")})
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v: got dtypes {q.dtype}, {k.dtype}, {v.dtype}; backend='triton' needs one "
            f"dtype for the three"
        )
    _check_device(q)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    if DQK > MAX_DQK:
        raise ValueError(f"q: got DQK={DQK}; backend='triton' supports DQK <= {MAX_DQK}")
    dev = q.device
    if S == 0:
        if initial_state is None:
            state = (torch.zeros(B, NH, DQK, DV, device=dev), torch.zeros(B, NH, DQK, device=dev),
                     torch.zeros(B, NH, device=dev))
        else:
            state = tuple(t.float() for t in initial_state)
        return v.new_zeros(B, NH, 0, DV), state
    L = max(1, min(int(chunk_size), S))
    NC = triton.cdiv(S, L)
    ig, bc, seg, carry = _gate_rows(i, f, reset, L, NC)
    C0 = n0 = m0 = None
    if initial_state is not None:
        C0, n0, m0 = initial_state
    h, C, n, m = _MLSTMChunkFn.apply(q, k, v, ig, bc, seg, carry, C0, n0, m0, L, float(eps),
                                     bool(recompute_states))
    return h, (C, n, m)


# ========================================================================================
# mLSTM step
# ========================================================================================


class _MLSTMStepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ig, lf, C, n, m, eps):
        B, NH, DQK = q.shape
        DV = v.shape[-1]
        BH = B * NH
        dev = q.device
        f32 = torch.float32
        BK = min(STEP_BLOCK_K, _pow2(DQK))
        BV = min(STEP_BLOCK_V, _pow2(DV))
        NVB = triton.cdiv(DV, BV)
        has_state = C is not None
        qc, kc = q.reshape(BH, DQK).contiguous(), k.reshape(BH, DQK).contiguous()
        vc = v.reshape(BH, DV).contiguous()
        igc, lfc = ig.reshape(BH).contiguous(), lf.reshape(BH).contiguous()
        if has_state:
            Cc = C.reshape(BH, DQK, DV).to(f32).contiguous()
            nc = n.reshape(BH, DQK).to(f32).contiguous()
            mc = m.reshape(BH).to(f32).contiguous()
        else:
            Cc = nc = mc = igc
        h = _empty((BH, DV), f32, dev)
        co = _empty((BH, DQK, DV), f32, dev)
        no = _empty((BH, DQK), f32, dev)
        mo = _empty((BH,), f32, dev)
        den = _empty((BH,), f32, dev)
        tm.mlstm_step_fwd_kernel[(BH, NVB)](
            qc, kc, vc, igc, lfc, Cc, nc, mc, h, co, no, mo, den,
            DQK**-0.5, eps, DQK, DV, BK=BK, BV=BV, HAS_STATE=has_state,
        )
        ctx.save_for_backward(qc, kc, vc, igc, lfc, Cc, nc, mc, h, co, no, mo, den)
        ctx.meta = (B, NH, DQK, DV, BK, BV, NVB, eps, has_state, q.dtype, k.dtype, v.dtype,
                    None if C is None else (C.dtype, n.dtype, m.dtype))
        return (h.view(B, NH, DV), co.view(B, NH, DQK, DV), no.view(B, NH, DQK),
                mo.view(B, NH))

    @staticmethod
    def backward(ctx, dh, dC1, dn1, dm1):
        qc, kc, vc, igc, lfc, Cc, nc, mc, h, co, no, mo, den = ctx.saved_tensors
        B, NH, DQK, DV, BK, BV, NVB, eps, has_state, qdt, kdt, vdt, sdt = ctx.meta
        BH = B * NH
        dev = qc.device
        f32 = torch.float32
        dh = torch.zeros(BH, DV, device=dev) if dh is None else dh.reshape(BH, DV).to(f32)
        dh = dh.contiguous()
        dco = torch.zeros(BH, DQK, DV, device=dev) if dC1 is None else dC1.reshape(BH, DQK, DV)
        dno = torch.zeros(BH, DQK, device=dev) if dn1 is None else dn1.reshape(BH, DQK)
        dco, dno = dco.to(f32).contiguous(), dno.to(f32).contiguous()
        rowdot = (dh * h).sum(-1)
        emin = torch.exp(-mo)
        nrm = torch.maximum(den.abs(), emin) + eps
        dden = (-rowdot / nrm) * torch.sign(den) * (den.abs() > emin).to(f32)
        dq_p = _empty((NVB, BH, DQK), f32, dev)
        dk_p = _empty((NVB, BH, DQK), f32, dev)
        dv = _empty((BH, DV), f32, dev)
        dC = _empty((BH, DQK, DV), f32, dev)
        dn = _empty((BH, DQK), f32, dev)
        sc = _empty((NVB, BH, 2), f32, dev)
        tm.mlstm_step_bwd_kernel[(BH, NVB)](
            qc, kc, vc, igc, lfc, Cc, nc, mc, mo, nrm.contiguous(), dden.contiguous(),
            dh, dco, dno, dq_p, dk_p, dv, dC, dn, sc,
            DQK**-0.5, DQK, DV, BH, BK=BK, BV=BV, HAS_STATE=has_state,
        )
        sc = sc.sum(0)
        dlf, di = sc[:, 0].clone(), sc[:, 1].clone()
        m_old = mc if has_state else torch.zeros_like(mo)
        dm = dlf.clone()  # f' = exp(log f + m - m_new): d m_old = d log f
        # the path through m_new = max(log f + m, i)
        x = -eps * rowdot / nrm
        if dm1 is not None:
            x = x + dm1.reshape(BH).to(f32)
        if dC1 is not None:
            x = x - (dco * co).sum((-1, -2))
        if dn1 is not None:
            x = x - (dno * no).sum(-1)
        carried = lfc + m_old >= igc
        dlf = dlf + torch.where(carried, x, torch.zeros_like(x))
        dm = dm + torch.where(carried, x, torch.zeros_like(x))
        di = di + torch.where(carried, torch.zeros_like(x), x)
        dq = dq_p.sum(0).view(B, NH, DQK).to(qdt)
        dk = dk_p.sum(0).view(B, NH, DQK).to(kdt)
        dv = dv.view(B, NH, DV).to(vdt)
        dCs = dns = dms = None
        if has_state:
            dCs = dC.view(B, NH, DQK, DV).to(sdt[0])
            dns = dn.view(B, NH, DQK).to(sdt[1])
            dms = dm.view(B, NH).to(sdt[2])
        return dq, dk, dv, di.view(B, NH), dlf.view(B, NH), dCs, dns, dms, None


def mlstm_step_triton(q, k, v, i, f, state, *, eps):
    """One fused mLSTM step on Triton. Shapes as `xlstm_kernels.mlstm_step`; returns h (float32,
    (B, NH, DV)) and the new state (C, n, m) in fresh float32 tensors."""
    _check_dtypes({"q": q, "k": k, "v": v, "i": i, "f": f, **_state_names("state", state, "Cnm")})
    _check_device(q)
    DQK = q.shape[-1]
    if DQK > MAX_DQK:
        raise ValueError(f"q: got DQK={DQK}; backend='triton' supports DQK <= {MAX_DQK}")
    C = n = m = None
    if state is not None:
        C, n, m = state
    lf = F.logsigmoid(f.float())
    h, C1, n1, m1 = _MLSTMStepFn.apply(q, k, v, i.float(), lf, C, n, m, float(eps))
    return h, (C1, n1, m1)


# ========================================================================================
# sLSTM sequence
# ========================================================================================

MAX_DH = 1024
SLSTM_TILE = 8192  # elements of R per streamed (BI, DH) block of the sLSTM matvecs
SLSTM_TILE_BWD = 4096  # the backward's (it holds more per step; 8192 spills at DH 192)


def _slstm_block(BD: int, bwd: bool = False) -> int:
    """Rows (forward) or columns (backward) of R per streamed block: BI * DH <= the tile."""
    tile = min(SLSTM_TILE, SLSTM_TILE_BWD) if bwd else SLSTM_TILE
    return max(16, min(BD, tile // BD))


def _slstm_warps(BD: int) -> int:
    return 8 if BD >= 256 else 4


class _SLSTMFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, reset_i, h0, c0, n0, m0):
        B, NH, S, _, DH = x.shape
        BH = B * NH
        dev = x.device
        f32 = torch.float32
        BD = _pow2(DH)
        xc = x.reshape(BH, S, 4, DH).contiguous()
        Rc = R.contiguous()
        has_init = h0 is not None
        has_reset = reset_i is not None
        if has_init:
            init = [t.reshape(BH, DH).to(f32).contiguous() for t in (h0, c0, n0, m0)]
        else:
            init = [torch.zeros(BH, DH, dtype=f32, device=dev)] * 4  # h_prev at t = 0
        rst = reset_i if has_reset else xc
        hs, cs, ns, ms = (_empty((BH, S, DH), f32, dev) for _ in range(4))
        raw = _empty((BH, S, 4, DH), f32, dev)
        last = [_empty((BH, DH), f32, dev) for _ in range(4)]
        ts.slstm_fwd_kernel[(BH,)](
            xc, Rc, *init, rst, hs, cs, ns, ms, raw, *last, S, NH, DH,
            BD=BD, BI=_slstm_block(BD), HAS_INIT=has_init, HAS_RESET=has_reset,
            num_warps=_slstm_warps(BD),
        )
        ctx.save_for_backward(Rc, rst if has_reset else None, *(init if has_init else []),
                              hs, cs, ns, ms, raw)
        ctx.meta = (B, NH, S, DH, BD, has_init, has_reset, x.dtype, R.dtype,
                    None if h0 is None else tuple(t.dtype for t in (h0, c0, n0, m0)))
        out = [t.view(B, NH, DH) for t in last]
        return (hs.view(B, NH, S, DH), *out)

    @staticmethod
    def backward(ctx, dhs, dhl, dcl, dnl, dml):
        B, NH, S, DH, BD, has_init, has_reset, xdt, rdt, sdt = ctx.meta
        saved = list(ctx.saved_tensors)
        Rc, rst = saved[0], saved[1]
        init = saved[2:6] if has_init else None
        hs, cs, ns, ms, raw = saved[-5:]
        BH = B * NH
        dev = Rc.device
        f32 = torch.float32

        def grad(t, shape):
            return torch.zeros(shape, device=dev) if t is None else t.reshape(shape).to(f32)

        dhs = grad(dhs, (BH, S, DH)).contiguous()
        dlast = [grad(t, (BH, DH)).contiguous() for t in (dhl, dcl, dnl, dml)]
        dx = _empty((BH, S, 4, DH), f32, dev)
        d0 = [_empty((BH, DH), f32, dev) for _ in range(4)]
        init_args = init[1:] if has_init else [hs] * 3
        ts.slstm_bwd_kernel[(BH,)](
            Rc, *init_args, rst if has_reset else hs, cs, ns, ms, raw,
            dhs, *dlast, dx, *d0, S, NH, DH,
            BD=BD, BI=_slstm_block(BD, bwd=True), HAS_INIT=has_init, HAS_RESET=has_reset,
            num_warps=_slstm_warps(BD),
        )
        # dR[head, g] = sum over batch and time of h_prev^T dx_g (one matmul)
        h_init = init[0] if has_init else torch.zeros(BH, DH, device=dev)
        hprev = torch.cat([h_init[:, None], hs[:, :-1]], 1)
        if has_reset:
            hprev = hprev * (rst == 0).repeat_interleave(NH, dim=0)[..., None].to(f32)
        dR = torch.einsum("bhtd,bhtge->hgde", hprev.view(B, NH, S, DH),
                          dx.view(B, NH, S, 4, DH)).to(rdt)
        dx = dx.view(B, NH, S, 4, DH).to(xdt)
        dinit = [None] * 4
        if has_init:
            dinit = [t.view(B, NH, DH).to(dt) for t, dt in zip(d0, sdt)]
        return (dx, dR, None, *dinit)


def slstm_sequence_triton(x, R, *, initial_state, reset):
    """sLSTM on Triton, the time loop inside the kernel. Shapes as `xlstm_kernels.slstm_sequence`;
    returns h (float32, (B, NH, S, DH)) and the last state (h, c, n, m) in float32."""
    _check_dtypes({"x": x, "R": R, **_state_names("initial_state", initial_state, "hcnm")})
    _check_device(x, "x")
    B, NH, S, _, DH = x.shape
    if DH > MAX_DH:
        raise ValueError(f"x: got DH={DH}; backend='triton' supports DH <= {MAX_DH}")
    if S == 0:
        if initial_state is None:
            state = tuple(torch.zeros(B, NH, DH, device=x.device) for _ in range(4))
        else:
            state = tuple(t.float() for t in initial_state)
        return x.new_zeros(B, NH, 0, DH, dtype=torch.float32), state
    h0 = c0 = n0 = m0 = None
    if initial_state is not None:
        h0, c0, n0, m0 = initial_state
    reset_i = None if reset is None else reset.to(torch.int32).contiguous()
    hs, h, c, n, m = _SLSTMFn.apply(x, R, reset_i, h0, c0, n0, m0)
    return hs, (h, c, n, m)

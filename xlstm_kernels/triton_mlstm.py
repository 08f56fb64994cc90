"""Raw Triton kernels for the chunkwise mLSTM (forward and backward) and the fused step.

No autograd here: `xlstm_kernels/triton_ops.py` wraps these in torch.autograd.Function.
Math and notation: docs/design.md, and the derivation in triton_ops.py.

Layout (all contiguous, one row per (batch, head) = "bh"):
    q, k: (BH, S, DQK); v: (BH, S, DV); h out: (BH, S, DV) in the input dtype
    per-position gate rows padded to SP = NC * L: ig (input gate pre-activation),
    bc (log forget cumsum restarted at every chunk start and at every reset);
    seg / carry: (B, SP) int32 (segment id; 1 where the carried state still reaches)
    chunk states: cs (BH, NC, DQK, DV) in the input dtype (the state entering each chunk;
    it is only ever a tl.dot operand, which is cast to that dtype anyway), ns (BH, NC + 1,
    DQK) and ms (BH, NC + 1) float32; the last state C in its own float32 buffer cl.
    The state pass carries C in float32 registers across chunks: only the stored copies
    are rounded, so rounding errors do not compound along the sequence.

Every matmul goes through `_mm`, which casts both operands to the input dtype (the
tensor-core path for bf16/fp16, IEEE fp32 otherwise) and, under the interpreter
(UPCAST), upcasts the rounded operands to fp32: the interpreter's bf16 `tl.dot` is
wrong, and upcasting after the rounding keeps the CPU result faithful to the GPU one.
Only plain pointer arithmetic with masks is used (no block pointers).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _max, _min, _mm, _sum

# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@triton.jit
def mlstm_fwd_state_kernel(
    k_ptr, v_ptr, ig_ptr, bc_ptr, seg_ptr, carry_ptr,
    c0_ptr, n0_ptr, m0_ptr,
    cs_ptr, ns_ptr, ms_ptr, amax_ptr, cl_ptr,
    S, SP, NH, NC, L, DQK, DV,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr, UPCAST: tl.constexpr,
):
    """Inter-chunk pass: the (C, n, m) state at every chunk boundary, sequential over chunks.
    cs gets the state entering each chunk (input dtype), cl the last state (float32).
    Grid (BH, cdiv(DQK, BK), cdiv(DV, BV)). Also stores, per chunk, which candidate won the
    max that defines m at the chunk end (-1: the carried state, else the local key index)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    DT = k_ptr.dtype.element_ty
    bidx = pid_bh // NH
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DQK
    mv = offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    kv_off = offs_k[:, None] * DV + offs_v[None, :]
    first = (pid_k == 0) & (pid_v == 0)
    if HAS_INIT:
        C = tl.load(c0_ptr + pid_bh * DQK * DV + kv_off, mask=mkv, other=0.0).to(tl.float32)
        n = tl.load(n0_ptr + pid_bh * DQK + offs_k, mask=mk, other=0.0).to(tl.float32)
        m = tl.load(m0_ptr + pid_bh).to(tl.float32)
    else:
        C = tl.full((BK, BV), 0.0, tl.float32)
        n = tl.full((BK,), 0.0, tl.float32)
        m = _sum(tl.full((1,), 0.0, tl.float32), 0)
    k_base = k_ptr + pid_bh * S * DQK
    v_base = v_ptr + pid_bh * S * DV
    g_base = pid_bh * SP
    for c in range(NC):
        cs_base = (pid_bh * NC + c) * DQK * DV
        tl.store(cs_ptr + cs_base + kv_off, C.to(cs_ptr.dtype.element_ty), mask=mkv)
        tl.store(ns_ptr + (pid_bh * (NC + 1) + c) * DQK + offs_k, n, mask=mk & (offs_k * 0 + pid_v == 0))
        if first:
            tl.store(ms_ptr + pid_bh * (NC + 1) + c, m)
        end = c * L + L - 1
        b_end = tl.load(bc_ptr + g_base + end)
        if HAS_RESET:
            seg_end = tl.load(seg_ptr + bidx * SP + end)
            carry_end = tl.load(carry_ptr + bidx * SP + end) != 0
        # pass 1: the largest key weight at the chunk end (one scalar per chunk)
        gmax = _max(tl.full((1,), float("-inf"), tl.float32), 0)
        gidx = _max(tl.full((1,), -1, tl.int32), 0)
        for j in range(0, L, BT):
            offs = j + tl.arange(0, BT)
            inl = offs < L
            valid = inl & (c * L + offs < S)
            bs = tl.load(bc_ptr + g_base + c * L + offs, mask=inl, other=0.0)
            gs = tl.load(ig_ptr + g_base + c * L + offs, mask=inl, other=0.0)
            if HAS_RESET:
                sg = tl.load(seg_ptr + bidx * SP + c * L + offs, mask=inl, other=-1)
                valid = valid & (sg == seg_end)
            g = tl.where(valid, b_end - bs + gs, float("-inf"))
            tmax = _max(g, 0)
            tidx = _min(tl.where(g == tmax, offs, 1 << 30), 0)
            upd = tmax > gmax
            gidx = tl.where(upd, tidx, gidx)
            gmax = tl.maximum(gmax, tmax)
        if HAS_RESET:
            a_end = b_end + tl.where(carry_end, m, 0.0)
        else:
            a_end = b_end + m
        m_new = tl.maximum(a_end, gmax)
        if first:
            tl.store(amax_ptr + pid_bh * NC + c, tl.where(a_end >= gmax, -1, gidx))
        w_old = tl.exp(a_end - m_new)
        if HAS_RESET:
            w_old = tl.where(carry_end, w_old, 0.0)
        C = C * w_old
        n = n * w_old
        # pass 2: add the chunk's keys and values under the new stabilizer
        for j in range(0, L, BT):
            offs = j + tl.arange(0, BT)
            inl = offs < L
            valid = inl & (c * L + offs < S)
            bs = tl.load(bc_ptr + g_base + c * L + offs, mask=inl, other=0.0)
            gs = tl.load(ig_ptr + g_base + c * L + offs, mask=inl, other=0.0)
            if HAS_RESET:
                sg = tl.load(seg_ptr + bidx * SP + c * L + offs, mask=inl, other=-1)
                valid = valid & (sg == seg_end)
            w = tl.where(valid, tl.exp(b_end - bs + gs - m_new), 0.0)
            pos = c * L + offs
            kt = tl.load(k_base + pos[:, None] * DQK + offs_k[None, :],
                         mask=valid[:, None] & mk[None, :], other=0.0).to(tl.float32)
            vt = tl.load(v_base + pos[:, None] * DV + offs_v[None, :],
                         mask=valid[:, None] & mv[None, :], other=0.0)
            kw = kt * w[:, None]
            C += _mm(tl.trans(kw), vt, DT, UPCAST)
            n += _sum(kw, 0)
        m = m_new
    tl.store(cl_ptr + pid_bh * DQK * DV + kv_off, C, mask=mkv)
    tl.store(ns_ptr + (pid_bh * (NC + 1) + NC) * DQK + offs_k, n, mask=mk & (offs_k * 0 + pid_v == 0))
    if first:
        tl.store(ms_ptr + pid_bh * (NC + 1) + NC, m)


@triton.jit
def _log_decay(bt, bs, gs, offs_t, offs_s, valid_s, seg_t, seg_s, HAS_RESET: tl.constexpr):
    """logD[t, s] = b_t - b_s + i_s for s <= t in the same document, -inf elsewhere."""
    ld = bt[:, None] - bs[None, :] + gs[None, :]
    mask = (offs_t[:, None] >= offs_s[None, :]) & valid_s[None, :]
    if HAS_RESET:
        mask = mask & (seg_t[:, None] == seg_s[None, :])
    return tl.where(mask, ld, float("-inf"))


@triton.jit
def _load_rows(ig_ptr, bc_ptr, seg_ptr, carry_ptr, g_base, s_base, c, L, S, offs,
               HAS_RESET: tl.constexpr):
    """Gate rows of one tile of chunk c: (in-chunk mask, valid, b, i, seg, carry)."""
    inl = offs < L
    valid = inl & (c * L + offs < S)
    b = tl.load(bc_ptr + g_base + c * L + offs, mask=inl, other=0.0)
    g = tl.load(ig_ptr + g_base + c * L + offs, mask=inl, other=0.0)
    if HAS_RESET:
        seg = tl.load(seg_ptr + s_base + c * L + offs, mask=inl, other=-1)
        carry = tl.load(carry_ptr + s_base + c * L + offs, mask=inl, other=0) != 0
    else:
        seg = offs * 0
        carry = inl
    return inl, valid, b, g, seg, carry


@triton.jit
def mlstm_fwd_out_kernel(
    q_ptr, k_ptr, v_ptr, ig_ptr, bc_ptr, seg_ptr, carry_ptr,
    cs_ptr, ns_ptr, ms_ptr,
    h_ptr, mpos_ptr, den_ptr, amax_ptr,
    scale, eps, S, SP, NH, NC, L, DQK, DV, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, UPCAST: tl.constexpr,
):
    """Intra-chunk pass: outputs of one query tile (BT positions of one chunk) for one DV
    block, the carried state and the causal in-chunk term under one stabilizer. Products
    over DQK loop over blocks of BK (no DQK-wide tile in registers).
    Grid (NC * NT, cdiv(DV, BV), BH)."""
    pid_ct = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    DT = q_ptr.dtype.element_ty
    c = pid_ct // NT
    jt = pid_ct % NT
    bidx = pid_bh // NH
    g_base = pid_bh * SP
    s_base = bidx * SP
    offs_t = jt * BT + tl.arange(0, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    inl_t, valid_t, bt, _gt, seg_t, carry_t = _load_rows(
        ig_ptr, bc_ptr, seg_ptr, carry_ptr, g_base, s_base, c, L, S, offs_t, HAS_RESET)
    m_c = tl.load(ms_ptr + pid_bh * (NC + 1) + c)
    a_t = bt + tl.where(carry_t, m_c, 0.0)
    # pass 1: the shared stabilizer m_t (scalar work only) and the winning candidate
    mx = tl.full((BT,), float("-inf"), tl.float32)
    ix = tl.full((BT,), -1, tl.int32)
    for js in range(0, jt + 1):
        offs_s = js * BT + tl.arange(0, BT)
        _inl_s, valid_s, bs, gs, seg_s, _cs = _load_rows(
            ig_ptr, bc_ptr, seg_ptr, carry_ptr, g_base, s_base, c, L, S, offs_s, HAS_RESET)
        ld = _log_decay(bt, bs, gs, offs_t, offs_s, valid_s, seg_t, seg_s, HAS_RESET)
        tmax = _max(ld, 1)
        tidx = _min(tl.where(ld == tmax[:, None], offs_s[None, :], 1 << 30), 1)
        upd = tmax > mx
        ix = tl.where(upd, tidx, ix)
        mx = tl.maximum(mx, tmax)
    mt = tl.maximum(a_t, mx)
    amax = tl.where(a_t >= mx, -1, ix)
    w = tl.where(carry_t, tl.exp(a_t - mt), 0.0)
    pos_t = c * L + offs_t
    q_base = q_ptr + pid_bh * S * DQK
    k_base = k_ptr + pid_bh * S * DQK
    v_base = v_ptr + pid_bh * S * DV
    # carried state
    cs_base = (pid_bh * NC + c) * DQK * DV
    num = tl.full((BT, BV), 0.0, tl.float32)
    den = tl.full((BT,), 0.0, tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DQK
        qb = tl.load(q_base + pos_t[:, None] * DQK + offs_k[None, :],
                     mask=valid_t[:, None] & mk[None, :], other=0.0)
        Cc = tl.load(cs_ptr + cs_base + offs_k[:, None] * DV + offs_v[None, :],
                     mask=mk[:, None] & mv[None, :], other=0.0)
        nc = tl.load(ns_ptr + (pid_bh * (NC + 1) + c) * DQK + offs_k, mask=mk, other=0.0)
        num += _mm(qb, Cc, DT, UPCAST)
        den += _sum(qb.to(tl.float32) * nc[None, :], 1)
    num = num * (w * scale)[:, None]
    den = den * w * scale
    # causal in-chunk term, tile by tile
    for js in range(0, jt + 1):
        offs_s = js * BT + tl.arange(0, BT)
        _inl_s, valid_s, bs, gs, seg_s, _cs = _load_rows(
            ig_ptr, bc_ptr, seg_ptr, carry_ptr, g_base, s_base, c, L, S, offs_s, HAS_RESET)
        ld = _log_decay(bt, bs, gs, offs_t, offs_s, valid_s, seg_t, seg_s, HAS_RESET)
        p = tl.exp(ld - mt[:, None])
        pos_s = c * L + offs_s
        qk = tl.full((BT, BT), 0.0, tl.float32)
        for k0 in range(0, DQK, BK):
            offs_k = k0 + tl.arange(0, BK)
            mk = offs_k < DQK
            qb = tl.load(q_base + pos_t[:, None] * DQK + offs_k[None, :],
                         mask=valid_t[:, None] & mk[None, :], other=0.0)
            kt = tl.load(k_base + pos_s[:, None] * DQK + offs_k[None, :],
                         mask=valid_s[:, None] & mk[None, :], other=0.0)
            qk += _mm(qb, tl.trans(kt), DT, UPCAST)
        vt = tl.load(v_base + pos_s[:, None] * DV + offs_v[None, :],
                     mask=valid_s[:, None] & mv[None, :], other=0.0)
        a = qk * scale * p
        num += _mm(a, vt, DT, UPCAST)
        den += _sum(a, 1)
    nrm = tl.maximum(tl.abs(den), tl.exp(-mt)) + eps
    h = num / nrm[:, None]
    tl.store(h_ptr + pid_bh * S * DV + pos_t[:, None] * DV + offs_v[None, :],
             h.to(h_ptr.dtype.element_ty),
             mask=valid_t[:, None] & mv[None, :])
    row = inl_t & (offs_t * 0 + pid_v == 0)
    tl.store(mpos_ptr + g_base + pos_t, mt, mask=row)
    tl.store(den_ptr + g_base + pos_t, den, mask=row)
    tl.store(amax_ptr + g_base + pos_t, amax, mask=row)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------


@triton.jit
def mlstm_bwd_rows_kernel(
    dh_ptr, h_ptr, den_ptr, mpos_ptr, nrm_ptr, dden_ptr, dm_ptr,
    eps, S, SP, DV,
    BR: tl.constexpr, BV: tl.constexpr,
):
    """Per-position scalars of the backward, with h and dh read in their own dtype (no
    full-size temporaries): N_t = max(|den_t|, exp(-m_t)) + eps, r_t = dh_t . h_t,
    dden_t = -r_t / N_t * sign(den_t) where |den_t| > exp(-m_t) (else 0), and
    dm_t = -eps r_t / N_t (the path through the stabilizer). Rows t >= S get r_t = 0.
    All outputs (BH, SP) float32. Grid (cdiv(SP, BR), BH)."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    offs = pid_r * BR + tl.arange(0, BR)
    inr = offs < SP
    valid = offs < S
    r = tl.full((BR,), 0.0, tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        msk = valid[:, None] & (offs_v < DV)[None, :]
        off = pid_bh * S * DV + offs[:, None] * DV + offs_v[None, :]
        dht = tl.load(dh_ptr + off, mask=msk, other=0.0).to(tl.float32)
        ht = tl.load(h_ptr + off, mask=msk, other=0.0).to(tl.float32)
        r += _sum(dht * ht, 1)
    den = tl.load(den_ptr + pid_bh * SP + offs, mask=inr, other=0.0)
    mt = tl.load(mpos_ptr + pid_bh * SP + offs, mask=inr, other=0.0)
    emin = tl.exp(-mt)
    nrm = tl.maximum(tl.abs(den), emin) + eps
    sgn = tl.where(den > 0, 1.0, tl.where(den < 0, -1.0, 0.0))
    dden = tl.where(tl.abs(den) > emin, -r / nrm * sgn, 0.0)
    tl.store(nrm_ptr + pid_bh * SP + offs, nrm, mask=inr)
    tl.store(dden_ptr + pid_bh * SP + offs, dden, mask=inr)
    tl.store(dm_ptr + pid_bh * SP + offs, -eps * r / nrm, mask=inr)


@triton.jit
def mlstm_bwd_state_kernel(
    q_ptr, dh_ptr, nrm_ptr, dden_ptr, bc_ptr, carry_ptr, mpos_ptr,
    cs_ptr, ns_ptr, ms_ptr, dcl_ptr, dnl_ptr,
    dcn_ptr, dnn_ptr, dc0_ptr, dn0_ptr, dlogw_ptr,
    scale, S, SP, NH, NC, L, DQK, DV, NKB, NVB,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_RESET: tl.constexpr, UPCAST: tl.constexpr,
):
    """Reverse inter-chunk pass: dC, dn with respect to every chunk-boundary state
    (stabilizers held fixed; their own path is routed by the wrapper).
    dcn[c] = gradient of C_{c+1} (the state after chunk c), dc0 = of the initial state.
    dlogw[c, kb, vb] = this block's part of W_c (<dC_{c+1}, C_c> + <dn_{c+1}, n_c>), the
    gradient of the log weight W_c = exp(b_end + m_c - m_{c+1}) of the carried state.
    Grid (BH, cdiv(DQK, BK), cdiv(DV, BV))."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    pid_v = tl.program_id(2)
    DT = q_ptr.dtype.element_ty
    bidx = pid_bh // NH
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DQK
    mv = offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    kv_off = offs_k[:, None] * DV + offs_v[None, :]
    nfirst = pid_v == 0
    if HAS_DLAST:
        dC = tl.load(dcl_ptr + pid_bh * DQK * DV + kv_off, mask=mkv, other=0.0)
        dn = tl.load(dnl_ptr + pid_bh * DQK + offs_k, mask=mk, other=0.0)
    else:
        dC = tl.full((BK, BV), 0.0, tl.float32)
        dn = tl.full((BK,), 0.0, tl.float32)
    g_base = pid_bh * SP
    for cc in range(NC):
        c = NC - 1 - cc
        tl.store(dcn_ptr + (pid_bh * NC + c) * DQK * DV + kv_off, dC.to(dcn_ptr.dtype.element_ty),
                 mask=mkv)
        tl.store(dnn_ptr + (pid_bh * NC + c) * DQK + offs_k, dn, mask=mk & (offs_k * 0 + pid_v == 0))
        m_c = tl.load(ms_ptr + pid_bh * (NC + 1) + c)
        m_next = tl.load(ms_ptr + pid_bh * (NC + 1) + c + 1)
        end = c * L + L - 1
        b_end = tl.load(bc_ptr + g_base + end)
        W = tl.exp(b_end + m_c - m_next)
        if HAS_RESET:
            W = tl.where(tl.load(carry_ptr + bidx * SP + end) != 0, W, 0.0)
        cs_base = (pid_bh * NC + c) * DQK * DV
        Cc = tl.load(cs_ptr + cs_base + kv_off, mask=mkv, other=0.0).to(tl.float32)
        nc = tl.load(ns_ptr + (pid_bh * (NC + 1) + c) * DQK + offs_k, mask=mk, other=0.0)
        part = _sum(_sum(dC * Cc, 1), 0) + tl.where(nfirst, _sum(dn * nc, 0), 0.0)
        tl.store(dlogw_ptr + (pid_bh * NC + c) * NKB * NVB + pid_k * NVB + pid_v, W * part)
        dC = dC * W
        dn = dn * W
        for j in range(0, L, BT):
            offs = j + tl.arange(0, BT)
            inl = offs < L
            pos = c * L + offs
            valid = inl & (pos < S)
            bt = tl.load(bc_ptr + g_base + pos, mask=inl, other=0.0)
            mt = tl.load(mpos_ptr + g_base + pos, mask=inl, other=0.0)
            nr = tl.load(nrm_ptr + g_base + pos, mask=inl, other=1.0)
            dd = tl.load(dden_ptr + g_base + pos, mask=inl, other=0.0)
            w = tl.exp(bt + m_c - mt)
            if HAS_RESET:
                w = tl.where(tl.load(carry_ptr + bidx * SP + pos, mask=inl, other=0) != 0, w, 0.0)
            w = tl.where(valid, w, 0.0) * scale
            qt = tl.load(q_ptr + pid_bh * S * DQK + pos[:, None] * DQK + offs_k[None, :],
                         mask=valid[:, None] & mk[None, :], other=0.0)
            dht = tl.load(dh_ptr + pid_bh * S * DV + pos[:, None] * DV + offs_v[None, :],
                          mask=valid[:, None] & mv[None, :], other=0.0)
            dnum = dht * (w / nr)[:, None]
            dC += _mm(tl.trans(qt), dnum, DT, UPCAST)
            dn += _sum(qt.to(tl.float32) * (w * dd)[:, None], 0)
    tl.store(dc0_ptr + pid_bh * DQK * DV + kv_off, dC, mask=mkv)
    tl.store(dn0_ptr + pid_bh * DQK + offs_k, dn, mask=mk & (offs_k * 0 + pid_v == 0))


@triton.jit
def _key_rows(ig_ptr, bc_ptr, seg_ptr, carry_ptr, ms_ptr, pid_bh, c, js, S, SP, NH, NC, L,
              BT: tl.constexpr, HAS_RESET: tl.constexpr):
    """Shared set-up of the key-side kernels: rows of key tile js of chunk c, and G, the
    weights of those keys in the chunk-end state C_{c+1}."""
    bidx = pid_bh // NH
    g_base = pid_bh * SP
    s_base = bidx * SP
    offs_s = js * BT + tl.arange(0, BT)
    inl_s, valid_s, bs, gs, seg_s, _cs = _load_rows(
        ig_ptr, bc_ptr, seg_ptr, carry_ptr, g_base, s_base, c, L, S, offs_s, HAS_RESET)
    pos_s = c * L + offs_s
    end = c * L + L - 1
    b_end = tl.load(bc_ptr + g_base + end)
    m_next = tl.load(ms_ptr + pid_bh * (NC + 1) + c + 1)
    gmask = valid_s
    if HAS_RESET:
        gmask = gmask & (seg_s == tl.load(seg_ptr + s_base + end))
    G = tl.where(gmask, tl.exp(b_end - bs + gs - m_next), 0.0)
    return offs_s, inl_s, valid_s, bs, gs, seg_s, pos_s, G


@triton.jit
def _query_rows_t(ig_ptr, bc_ptr, seg_ptr, carry_ptr, mpos_ptr, nrm_ptr,
                  pid_bh, c, jt, S, SP, NH, L, offs_s, valid_s, bs, gs, seg_s,
                  BT: tl.constexpr, HAS_RESET: tl.constexpr):
    """Query tile jt seen from a key tile: m_t, N_t and the transposed decay weights
    P^T[s, t] = exp(b_t - b_s + i_s - m_t) (0 outside the causal same-document mask)."""
    bidx = pid_bh // NH
    g_base = pid_bh * SP
    s_base = bidx * SP
    offs_t = jt * BT + tl.arange(0, BT)
    inl_t, valid_t, bt, _gt, seg_t, _ct = _load_rows(
        ig_ptr, bc_ptr, seg_ptr, carry_ptr, g_base, s_base, c, L, S, offs_t, HAS_RESET)
    pos_t = c * L + offs_t
    mt = tl.load(mpos_ptr + g_base + pos_t, mask=inl_t, other=0.0)
    nr = tl.load(nrm_ptr + g_base + pos_t, mask=inl_t, other=1.0)
    ld = bt[None, :] - bs[:, None] + gs[:, None]
    mask = (offs_t[None, :] >= offs_s[:, None]) & valid_s[:, None] & valid_t[None, :]
    if HAS_RESET:
        mask = mask & (seg_t[None, :] == seg_s[:, None])
    p = tl.where(mask, tl.exp(ld - mt[None, :]), 0.0)
    return inl_t, valid_t, pos_t, nr, p


@triton.jit
def mlstm_bwd_dk_kernel(
    q_ptr, k_ptr, v_ptr, ig_ptr, bc_ptr, seg_ptr, carry_ptr,
    mpos_ptr, nrm_ptr, dden_ptr, dh_ptr, dcn_ptr, dnn_ptr, ms_ptr,
    dk_ptr, gs_ptr,
    scale, S, SP, NH, NC, L, DQK, DV, NT, BH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, UPCAST: tl.constexpr,
):
    """dk of one key tile and one DQK block, and the block's part of gs_s = k_s . dk_s of the
    chunk-end state term (d/d i_s of key s's weight in C_{c+1}, which also feeds b at the
    chunk end), partial over DQK blocks: (NKB, BH, SP). Nothing here contracts over DQK:
    dA^T = V dH^T / N + dden is rebuilt per DQK block (a DV loop), as TFLA does.
    Grid (NC * NT, cdiv(DQK, BK), BH)."""
    pid_ct = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    DT = q_ptr.dtype.element_ty
    c = pid_ct // NT
    js = pid_ct % NT
    g_base = pid_bh * SP
    offs_s, inl_s, valid_s, bs, gs, seg_s, pos_s, G = _key_rows(
        ig_ptr, bc_ptr, seg_ptr, carry_ptr, ms_ptr, pid_bh, c, js, S, SP, NH, NC, L,
        BT, HAS_RESET)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mk = offs_k < DQK
    # chunk-end state: dk_s = G_s (dC_{c+1} v_s + dn_{c+1})
    dnn = tl.load(dnn_ptr + (pid_bh * NC + c) * DQK + offs_k, mask=mk, other=0.0)
    vdc = tl.full((BT, BK), 0.0, tl.float32) + dnn[None, :]
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        vt = tl.load(v_ptr + pid_bh * S * DV + pos_s[:, None] * DV + offs_v[None, :],
                     mask=valid_s[:, None] & mv[None, :], other=0.0)
        dCn = tl.load(dcn_ptr + (pid_bh * NC + c) * DQK * DV + offs_k[:, None] * DV
                      + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        vdc += _mm(vt, tl.trans(dCn), DT, UPCAST)
    dk = vdc * G[:, None]
    kt = tl.load(k_ptr + pid_bh * S * DQK + pos_s[:, None] * DQK + offs_k[None, :],
                 mask=valid_s[:, None] & mk[None, :], other=0.0).to(tl.float32)
    gsum = _sum(dk * kt, 1)
    for jt in range(js, NT):
        inl_t, valid_t, pos_t, nr, p = _query_rows_t(
            ig_ptr, bc_ptr, seg_ptr, carry_ptr, mpos_ptr, nrm_ptr,
            pid_bh, c, jt, S, SP, NH, L, offs_s, valid_s, bs, gs, seg_s, BT, HAS_RESET)
        dd = tl.load(dden_ptr + g_base + pos_t, mask=inl_t, other=0.0)
        da = tl.full((BT, BT), 0.0, tl.float32) + dd[None, :]
        for v0 in range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            mv = offs_v < DV
            vt = tl.load(v_ptr + pid_bh * S * DV + pos_s[:, None] * DV + offs_v[None, :],
                         mask=valid_s[:, None] & mv[None, :], other=0.0)
            dht = tl.load(dh_ptr + pid_bh * S * DV + pos_t[:, None] * DV + offs_v[None, :],
                          mask=valid_t[:, None] & mv[None, :], other=0.0)
            da += _mm(vt, tl.trans(dht / nr[:, None]), DT, UPCAST)
        qt = tl.load(q_ptr + pid_bh * S * DQK + pos_t[:, None] * DQK + offs_k[None, :],
                     mask=valid_t[:, None] & mk[None, :], other=0.0)
        dk += _mm(da * p, qt, DT, UPCAST) * scale
    tl.store(dk_ptr + pid_bh * S * DQK + pos_s[:, None] * DQK + offs_k[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=valid_s[:, None] & mk[None, :])
    tl.store(gs_ptr + (pid_k * BH + pid_bh) * SP + pos_s, gsum, mask=inl_s)


@triton.jit
def mlstm_bwd_dv_kernel(
    q_ptr, k_ptr, v_ptr, ig_ptr, bc_ptr, seg_ptr, carry_ptr,
    mpos_ptr, nrm_ptr, dden_ptr, dh_ptr, dcn_ptr, ms_ptr, dv_ptr, xs_ptr, ys_ptr,
    scale, S, SP, NH, NC, L, DQK, DV, NT, BH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, UPCAST: tl.constexpr,
):
    """dv of one key tile and one DV block: from the chunk-end state and from every later
    query tile of the chunk; K Q^T contracts over DQK in blocks of BK. Also this DV block's
    part of M = dA o A (dA[t, s] = dh_t . v_s / N_t + dden_t, A the weighted scores), the
    in-chunk gate gradients: column sums xs_s (d/d i_s), (NVB, BH, SP), and row sums
    ys_t (d/d b_t) per key tile, (NVB, NT, BH, SP), zero where js > jt (the caller
    zeroes). Both sums see each element of M once, so they cancel exactly where they
    should (a one-token document). Grid (NC * NT, cdiv(DV, BV), BH)."""
    pid_ct = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    DT = q_ptr.dtype.element_ty
    c = pid_ct // NT
    js = pid_ct % NT
    offs_s, inl_s, valid_s, bs, gs, seg_s, pos_s, G = _key_rows(
        ig_ptr, bc_ptr, seg_ptr, carry_ptr, ms_ptr, pid_bh, c, js, S, SP, NH, NC, L,
        BT, HAS_RESET)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    k_base = k_ptr + pid_bh * S * DQK
    dv = tl.full((BT, BV), 0.0, tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DQK
        kt = tl.load(k_base + pos_s[:, None] * DQK + offs_k[None, :],
                     mask=valid_s[:, None] & mk[None, :], other=0.0)
        dCn = tl.load(dcn_ptr + (pid_bh * NC + c) * DQK * DV + offs_k[:, None] * DV
                      + offs_v[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        dv += _mm(kt, dCn, DT, UPCAST)
    dv = dv * G[:, None]
    xs = tl.full((BT,), 0.0, tl.float32)
    g_base = pid_bh * SP
    for jt in range(js, NT):
        inl_t, valid_t, pos_t, nr, p = _query_rows_t(
            ig_ptr, bc_ptr, seg_ptr, carry_ptr, mpos_ptr, nrm_ptr,
            pid_bh, c, jt, S, SP, NH, L, offs_s, valid_s, bs, gs, seg_s, BT, HAS_RESET)
        a = tl.full((BT, BT), 0.0, tl.float32)
        for k0 in range(0, DQK, BK):
            offs_k = k0 + tl.arange(0, BK)
            mk = offs_k < DQK
            kt = tl.load(k_base + pos_s[:, None] * DQK + offs_k[None, :],
                         mask=valid_s[:, None] & mk[None, :], other=0.0)
            qt = tl.load(q_ptr + pid_bh * S * DQK + pos_t[:, None] * DQK + offs_k[None, :],
                         mask=valid_t[:, None] & mk[None, :], other=0.0)
            a += _mm(kt, tl.trans(qt), DT, UPCAST)
        dht = tl.load(dh_ptr + pid_bh * S * DV + pos_t[:, None] * DV + offs_v[None, :],
                      mask=valid_t[:, None] & mv[None, :], other=0.0)
        a = a * scale * p  # A^T[s, t]
        # dh / N rounded to the input dtype at once (both dots round it anyway): a 16-bit
        # (BT, BV) tile, half the registers of a float32 one
        dhn = (dht / nr[:, None]).to(DT)
        dv += _mm(a, dhn, DT, UPCAST)
        # v re-read per query tile (from L2) rather than held across the loop: a (BT, BV)
        # tile fewer live beside the dv accumulator (chunk 128: two query tiles)
        vt = tl.load(v_ptr + pid_bh * S * DV + pos_s[:, None] * DV + offs_v[None, :],
                     mask=valid_s[:, None] & mv[None, :], other=0.0)
        da = _mm(vt, tl.trans(dhn), DT, UPCAST)  # this DV block's dA^T[s, t]
        if pid_v == 0:
            da += tl.load(dden_ptr + g_base + pos_t, mask=inl_t, other=0.0)[None, :]
        mm = da * a
        xs += _sum(mm, 1)
        tl.store(ys_ptr + ((pid_v * NT + js) * BH + pid_bh) * SP + pos_t, _sum(mm, 0),
                 mask=inl_t)
    tl.store(xs_ptr + (pid_v * BH + pid_bh) * SP + pos_s, xs, mask=inl_s)
    tl.store(dv_ptr + pid_bh * S * DV + pos_s[:, None] * DV + offs_v[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=valid_s[:, None] & mv[None, :])


@triton.jit
def mlstm_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, ig_ptr, bc_ptr, seg_ptr, carry_ptr,
    mpos_ptr, nrm_ptr, dden_ptr, dh_ptr, cs_ptr, ns_ptr, ms_ptr,
    dq_ptr, ws_ptr,
    scale, S, SP, NH, NC, L, DQK, DV, NT, BH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_RESET: tl.constexpr, UPCAST: tl.constexpr,
):
    """dq of one query tile and one DQK block, and the block's part of ws_t = q_t . dq_t of
    the carried-state term (d/d log w_t, which also feeds m at the chunk start), partial
    over DQK blocks: (NKB, BH, SP). dA = dH V^T / N + dden is rebuilt per DQK block.
    Grid (NC * NT, cdiv(DQK, BK), BH)."""
    pid_ct = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    DT = q_ptr.dtype.element_ty
    c = pid_ct // NT
    jt = pid_ct % NT
    bidx = pid_bh // NH
    g_base = pid_bh * SP
    s_base = bidx * SP
    offs_t = jt * BT + tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mk = offs_k < DQK
    inl_t, valid_t, bt, _gt, seg_t, carry_t = _load_rows(
        ig_ptr, bc_ptr, seg_ptr, carry_ptr, g_base, s_base, c, L, S, offs_t, HAS_RESET)
    pos_t = c * L + offs_t
    mt = tl.load(mpos_ptr + g_base + pos_t, mask=inl_t, other=0.0)
    nr = tl.load(nrm_ptr + g_base + pos_t, mask=inl_t, other=1.0)
    dd = tl.load(dden_ptr + g_base + pos_t, mask=inl_t, other=0.0)
    m_c = tl.load(ms_ptr + pid_bh * (NC + 1) + c)
    w = tl.where(carry_t & valid_t, tl.exp(bt + m_c - mt), 0.0)
    cs_base = (pid_bh * NC + c) * DQK * DV
    nc = tl.load(ns_ptr + (pid_bh * (NC + 1) + c) * DQK + offs_k, mask=mk, other=0.0)
    dqi = dd[:, None] * nc[None, :]  # (BT, BK): d/d q_t of the carried-state term, / w
    dh_base = dh_ptr + pid_bh * S * DV
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        dht = tl.load(dh_base + pos_t[:, None] * DV + offs_v[None, :],
                      mask=valid_t[:, None] & mv[None, :], other=0.0)
        Cc = tl.load(cs_ptr + cs_base + offs_k[:, None] * DV + offs_v[None, :],
                     mask=mk[:, None] & mv[None, :], other=0.0)
        dqi += _mm(dht / nr[:, None], tl.trans(Cc), DT, UPCAST)
    dq = dqi * (w * scale)[:, None]
    qt = tl.load(q_ptr + pid_bh * S * DQK + pos_t[:, None] * DQK + offs_k[None, :],
                 mask=valid_t[:, None] & mk[None, :], other=0.0).to(tl.float32)
    wsum = _sum(dq * qt, 1)
    k_base = k_ptr + pid_bh * S * DQK
    v_base = v_ptr + pid_bh * S * DV
    for js in range(0, jt + 1):
        offs_s = js * BT + tl.arange(0, BT)
        _inl_s, valid_s, bs, gs, seg_s, _cs = _load_rows(
            ig_ptr, bc_ptr, seg_ptr, carry_ptr, g_base, s_base, c, L, S, offs_s, HAS_RESET)
        ld = _log_decay(bt, bs, gs, offs_t, offs_s, valid_s, seg_t, seg_s, HAS_RESET)
        p = tl.where(valid_t[:, None], tl.exp(ld - mt[:, None]), 0.0)
        pos_s = c * L + offs_s
        da = tl.full((BT, BT), 0.0, tl.float32) + dd[:, None]
        for v0 in range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            mv = offs_v < DV
            dht = tl.load(dh_base + pos_t[:, None] * DV + offs_v[None, :],
                          mask=valid_t[:, None] & mv[None, :], other=0.0)
            vt = tl.load(v_base + pos_s[:, None] * DV + offs_v[None, :],
                         mask=valid_s[:, None] & mv[None, :], other=0.0)
            da += _mm(dht / nr[:, None], tl.trans(vt), DT, UPCAST)
        kt = tl.load(k_base + pos_s[:, None] * DQK + offs_k[None, :],
                     mask=valid_s[:, None] & mk[None, :], other=0.0)
        dq += _mm(da * p, kt, DT, UPCAST) * scale
    tl.store(dq_ptr + pid_bh * S * DQK + pos_t[:, None] * DQK + offs_k[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=valid_t[:, None] & mk[None, :])
    tl.store(ws_ptr + (pid_k * BH + pid_bh) * SP + pos_t, wsum, mask=inl_t)


@triton.jit
def mlstm_bwd_gates_kernel(
    gs_ptr, ws_ptr, xs_ptr, ys_ptr, dm_ptr, amaxp_ptr, amaxc_ptr, dlogw_ptr, carry_ptr,
    di_ptr, db_ptr, xc_ptr, lk_ptr, dm0_ptr,
    SP, NH, NC, L, NKB, NVB, NT, NW, BH, BT,
    BR: tl.constexpr, BW: tl.constexpr, HAS_RESET: tl.constexpr,
):
    """The gate-gradient epilogue of the backward, one chunk per program, with no full-size
    temporaries. Reads the kernels' partial gate rows (gs, ws: (NKB, BH, SP) from dk / dq;
    xs: (NVB, BH, SP) and ys: (NVB, NT, BH, SP) from dv, ys[v, js, t] written only where
    key tile js <= query tile t // BT, the rest is never read), the per-position
    stabilizer gradients dm (BH, SP), the winners of every max (amaxp (BH, SP), amaxc
    (BH, NC): in-chunk index, -1 = the carried state) and the carried-state parts dlogw
    (BH, NC, NW). Writes, (BH, SP) float32:
        di_s = X_s,  db_s = Y_s - X_s + dm_s  with X = sum xs + sum gs, Y = sum ys + sum ws
        (summed in this order on both sides, so a one-token document cancels exactly);
        the chunk end's db also gets sum_chunk gs + sum dlogw; a position whose max a key
        s won moves its dm from b to (b, i) of s (a gather over (BR, BR) blocks of the
        chunk: no atomics, deterministic).
    and per chunk, for mlstm_bwd_gates_chain_kernel: xc (BH, NC), the sum of dm over the
    positions whose max the carried state won, and lk (BH, NC), 1.0 where chunk c's own
    end max was won by the carried state (the chain of m gradients goes on through it);
    dm0 (BH,) gets chunk 0's part of the gradient of the initial m.
    Grid (NC, BH)."""
    c = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    bidx = pid_bh // NH
    c_base = pid_bh * SP + c * L
    # pass 1: the chunk's sums (gs over the chunk; dm over carried-state winners)
    gsum = tl.full((BR,), 0.0, tl.float32)
    dmc = tl.full((BR,), 0.0, tl.float32)
    for j in range(0, L, BR):
        offs = j + tl.arange(0, BR)
        inl = offs < L
        for kb in range(NKB):
            gsum += tl.load(gs_ptr + kb * BH * SP + c_base + offs, mask=inl, other=0.0)
        carried = tl.load(amaxp_ptr + c_base + offs, mask=inl, other=0) < 0
        if HAS_RESET:
            carried = carried & (tl.load(carry_ptr + bidx * SP + c * L + offs, mask=inl,
                                         other=0) != 0)
        dmc += tl.where(carried & inl, tl.load(dm_ptr + c_base + offs, mask=inl, other=0.0), 0.0)
    offs_w = tl.arange(0, BW)
    dlw = _sum(tl.load(dlogw_ptr + (pid_bh * NC + c) * NW + offs_w, mask=offs_w < NW,
                       other=0.0), 0)
    end_extra = _sum(gsum, 0) + dlw
    link = tl.load(amaxc_ptr + pid_bh * NC + c) < 0
    if HAS_RESET:
        link = link & (tl.load(carry_ptr + bidx * SP + c * L + L - 1) != 0)
    tl.store(xc_ptr + pid_bh * NC + c, _sum(dmc, 0))
    tl.store(lk_ptr + pid_bh * NC + c, tl.where(link, 1.0, 0.0))
    # pass 2: every position's di, db, with the moves gathered from the whole chunk
    ws0 = tl.full((BR,), 0.0, tl.float32)
    for j in range(0, L, BR):
        offs = j + tl.arange(0, BR)
        inl = offs < L
        p = c_base + offs
        X = tl.full((BR,), 0.0, tl.float32)
        for vb in range(NVB):
            X += tl.load(xs_ptr + vb * BH * SP + p, mask=inl, other=0.0)
        Y = tl.full((BR,), 0.0, tl.float32)
        jt = offs // BT
        for vb in range(NVB):
            yv = tl.full((BR,), 0.0, tl.float32)
            for js in range(NT):
                yv += tl.load(ys_ptr + ((vb * NT + js) * BH) * SP + p,
                              mask=inl & (js <= jt), other=0.0)
            Y += yv
        gsv = tl.full((BR,), 0.0, tl.float32)
        wsv = tl.full((BR,), 0.0, tl.float32)
        for kb in range(NKB):
            gsv += tl.load(gs_ptr + kb * BH * SP + p, mask=inl, other=0.0)
            wsv += tl.load(ws_ptr + kb * BH * SP + p, mask=inl, other=0.0)
        X = X + gsv
        Y = Y + wsv
        db = Y - X
        db += tl.where(offs == L - 1, end_extra, 0.0)
        db += tl.load(dm_ptr + p, mask=inl, other=0.0)
        mv = tl.full((BR,), 0.0, tl.float32)
        for j2 in range(0, L, BR):
            offs2 = j2 + tl.arange(0, BR)
            in2 = offs2 < L
            src = tl.load(dm_ptr + c_base + offs2, mask=in2, other=0.0)
            win = tl.load(amaxp_ptr + c_base + offs2, mask=in2, other=-1)
            hit = (win[None, :] == offs[:, None]) & in2[None, :]
            mv += _sum(tl.where(hit, src[None, :], 0.0), 1)
        tl.store(db_ptr + p, db - mv, mask=inl)
        tl.store(di_ptr + p, X + mv, mask=inl)
        ws0 += tl.where(inl, wsv, 0.0)
    if c == 0:
        tl.store(dm0_ptr + pid_bh, _sum(ws0, 0) + dlw)


@triton.jit
def _affine_then(a1, b1, a2, b2):
    """x -> b1 + a1 x, then x -> b2 + a2 x."""
    return a1 * a2, b2 + a2 * b1


@triton.jit
def mlstm_bwd_gates_chain_kernel(
    xc_ptr, lk_ptr, amaxc_ptr, xlast_ptr, di_ptr, db_ptr, dm0_ptr,
    SP, NC, L,
    BC: tl.constexpr,
):
    """The gradient of m at every chunk end, a reverse chain over chunks: Xm_NC-1 = xlast
    (the last state's m), Xm_{c-1} = xc_c + lk_c Xm_c; a linear recurrence, run as a scan
    of affine maps over blocks of BC chunks (the chunks loaded last to first). Xm_c goes to
    db at the end of chunk c, and, where a key s won that chunk's end max (amaxc >= 0), from
    b to (b, i) of s; dm0 += Xm_{-1}. Grid (BH,)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    x_in = tl.load(xlast_ptr + pid_bh)  # Xm at the end of the block's first (latest) chunk
    x_first = x_in * 0.0
    for i0 in range(0, NC, BC):
        i = i0 + tl.arange(0, BC)
        c = NC - 1 - i
        ok = c >= 0
        # element i: chunk c + 1's map (chunk c's end is chunk c + 1's start); the first
        # element of a block is the identity (x_in is already Xm_c there)
        nxt = ok & (i > i0)
        a = tl.where(nxt, tl.load(lk_ptr + pid_bh * NC + c + 1, mask=nxt, other=0.0), 1.0)
        b = tl.where(nxt, tl.load(xc_ptr + pid_bh * NC + c + 1, mask=nxt, other=0.0), 0.0)
        ra, rb = tl.associative_scan((a, b), 0, _affine_then)
        xm = rb + ra * x_in  # Xm_c
        ac = tl.load(amaxc_ptr + pid_bh * NC + c, mask=ok, other=-1)
        end = pid_bh * SP + c * L + L - 1
        at_end = ok & (ac != L - 1)  # where the end itself won, the two moves cancel
        tl.store(db_ptr + end, tl.load(db_ptr + end, mask=at_end, other=0.0) + xm, mask=at_end)
        won = ok & (ac >= 0)
        pos = pid_bh * SP + c * L + ac
        tl.store(db_ptr + pos, tl.load(db_ptr + pos, mask=won & at_end, other=0.0) - xm,
                 mask=won & at_end)
        tl.store(di_ptr + pos, tl.load(di_ptr + pos, mask=won, other=0.0) + xm, mask=won)
        # Xm before chunk c (the next block's x_in; at c = 0 the initial m's)
        xprev = tl.load(xc_ptr + pid_bh * NC + c, mask=ok, other=0.0) + tl.load(
            lk_ptr + pid_bh * NC + c, mask=ok, other=0.0) * xm
        x_in = _sum(tl.where(i == i0 + BC - 1, xprev, 0.0), 0)
        x_first += _sum(tl.where(c == 0, xprev, 0.0), 0)
    tl.store(dm0_ptr + pid_bh, tl.load(dm0_ptr + pid_bh) + x_first)


# ----------------------------------------------------------------------------------------
# one generation step (fused: state update and output in one kernel)
# ----------------------------------------------------------------------------------------


@triton.jit
def mlstm_step_fwd_kernel(
    q_ptr, k_ptr, v_ptr, ig_ptr, lf_ptr, c_ptr, n_ptr, m_ptr,
    h_ptr, co_ptr, no_ptr, mo_ptr, den_ptr,
    scale, eps, DQK, DV,
    BK: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr,
):
    """One token for one (batch, head) and one DV block: C, n, m updated and h produced.
    The (DQK, BV) slice of C is streamed in (BK, BV) blocks (no DQK-wide tile: any DQK).
    Grid (BH, cdiv(DV, BV)). co/no/mo are fresh buffers (n is read by every DV block,
    written by block 0)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    v = tl.load(v_ptr + pid_bh * DV + offs_v, mask=mv, other=0.0).to(tl.float32)
    ig = tl.load(ig_ptr + pid_bh)
    lf = tl.load(lf_ptr + pid_bh)
    if HAS_STATE:
        m = tl.load(m_ptr + pid_bh)
    else:
        m = lf * 0.0
    m_new = tl.maximum(lf + m, ig)
    fg = tl.exp(lf + m - m_new)
    ip = tl.exp(ig - m_new)
    num = tl.full((BV,), 0.0, tl.float32)
    den = lf * 0.0
    for k0 in range(0, DQK, BK):
        offs_d = k0 + tl.arange(0, BK)
        md = offs_d < DQK
        mdv = md[:, None] & mv[None, :]
        dv_off = offs_d[:, None] * DV + offs_v[None, :]
        q = tl.load(q_ptr + pid_bh * DQK + offs_d, mask=md, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + pid_bh * DQK + offs_d, mask=md, other=0.0).to(tl.float32)
        C = ip * (k[:, None] * v[None, :])
        n = ip * k
        if HAS_STATE:
            C += fg * tl.load(c_ptr + pid_bh * DQK * DV + dv_off, mask=mdv, other=0.0)
            n += fg * tl.load(n_ptr + pid_bh * DQK + offs_d, mask=md, other=0.0)
        num += _sum(q[:, None] * C, 0)
        den += _sum(q * n, 0)
        tl.store(co_ptr + pid_bh * DQK * DV + dv_off, C, mask=mdv)
        tl.store(no_ptr + pid_bh * DQK + offs_d, n, mask=md & (offs_d * 0 + pid_v == 0))
    num = num * scale
    den = den * scale
    h = num / (tl.maximum(tl.abs(den), tl.exp(-m_new)) + eps)
    tl.store(h_ptr + pid_bh * DV + offs_v, h, mask=mv)
    if pid_v == 0:
        tl.store(mo_ptr + pid_bh, m_new)
        tl.store(den_ptr + pid_bh, den)


@triton.jit
def mlstm_step_bwd_kernel(
    q_ptr, k_ptr, v_ptr, ig_ptr, lf_ptr, c_ptr, n_ptr, m_ptr, mo_ptr, nrm_ptr, dden_ptr,
    dh_ptr, dco_ptr, dno_ptr,
    dq_ptr, dk_ptr, dv_ptr, dc_ptr, dn_ptr, sc_ptr,
    scale, DQK, DV, BH,
    BK: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr,
):
    """Backward of one step with the new stabilizer held fixed (the wrapper routes its
    own path). dq, dk and the two gate scalars (d log f', d log i') are partial over DV
    blocks: (NVB, BH, ...). C and its gradients are streamed in (BK, BV) blocks (any DQK);
    dv and the gate scalars accumulate over them. Grid (BH, cdiv(DV, BV))."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    v = tl.load(v_ptr + pid_bh * DV + offs_v, mask=mv, other=0.0).to(tl.float32)
    ig = tl.load(ig_ptr + pid_bh)
    lf = tl.load(lf_ptr + pid_bh)
    if HAS_STATE:
        m = tl.load(m_ptr + pid_bh)
    else:
        m = lf * 0.0
    m_new = tl.load(mo_ptr + pid_bh)
    fg = tl.exp(lf + m - m_new)
    ip = tl.exp(ig - m_new)
    nrm = tl.load(nrm_ptr + pid_bh)
    dd = tl.where(pid_v == 0, tl.load(dden_ptr + pid_bh), 0.0)  # only in DV block 0
    dnum = tl.load(dh_ptr + pid_bh * DV + offs_v, mask=mv, other=0.0) / nrm
    row = pid_v.to(tl.int64) * BH + pid_bh
    dv = tl.full((BV,), 0.0, tl.float32)
    dlf = lf * 0.0
    dli = lf * 0.0
    for k0 in range(0, DQK, BK):
        offs_d = k0 + tl.arange(0, BK)
        md = offs_d < DQK
        mdv = md[:, None] & mv[None, :]
        dv_off = offs_d[:, None] * DV + offs_v[None, :]
        first = offs_d * 0 + pid_v == 0
        q = tl.load(q_ptr + pid_bh * DQK + offs_d, mask=md, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + pid_bh * DQK + offs_d, mask=md, other=0.0).to(tl.float32)
        kv = k[:, None] * v[None, :]
        C1 = ip * kv
        n1 = ip * k
        if HAS_STATE:
            C = tl.load(c_ptr + pid_bh * DQK * DV + dv_off, mask=mdv, other=0.0)
            n = tl.load(n_ptr + pid_bh * DQK + offs_d, mask=md, other=0.0)
            C1 += fg * C
            n1 += fg * n
        dC1 = tl.load(dco_ptr + pid_bh * DQK * DV + dv_off, mask=mdv, other=0.0)
        dC1 += scale * q[:, None] * dnum[None, :]
        dn1 = tl.load(dno_ptr + pid_bh * DQK + offs_d, mask=md & first, other=0.0)
        dn1 += scale * dd * q
        dq = scale * (_sum(C1 * dnum[None, :], 1) + dd * n1)
        dk = ip * (_sum(dC1 * v[None, :], 1) + dn1)
        dv += ip * _sum(dC1 * k[:, None], 0)
        if HAS_STATE:
            dlf += fg * (_sum(_sum(dC1 * C, 1), 0) + _sum(dn1 * n, 0))
        dli += ip * (_sum(_sum(dC1 * kv, 1), 0) + _sum(dn1 * k, 0))
        tl.store(dq_ptr + row * DQK + offs_d, dq, mask=md)
        tl.store(dk_ptr + row * DQK + offs_d, dk, mask=md)
        tl.store(dc_ptr + pid_bh * DQK * DV + dv_off, fg * dC1, mask=mdv)
        tl.store(dn_ptr + pid_bh * DQK + offs_d, fg * dn1, mask=md & first)
    tl.store(dv_ptr + pid_bh * DV + offs_v, dv, mask=mv)
    tl.store(sc_ptr + row * 2, dlf)
    tl.store(sc_ptr + row * 2 + 1, dli)

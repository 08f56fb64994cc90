"""Raw Triton kernels for the sLSTM sequence (forward and backward), the time loop inside
the kernel. No autograd here: `xlstm_kernels/triton_ops.py` wraps them.

One program per (batch, head): the recurrent matvec h_{t-1} @ R[head, gate] runs on the
head's block-diagonal weights, exponential gating with the stabilizer m, resets zero the
state before a document's first token. Layout (contiguous):
    x: (BH, S, 4, DH) gate pre-activations from the input path, gates (i, f, z, o)
    R: (NH, 4, DH, DH); raw[g] = x[g] + h_prev @ R[head, g]
    rows kept for the backward: raw (BH, S, 4, DH), h, c, n, m (BH, S, DH)

The state vectors live in registers; the matvecs stream R in (BI, DH) row blocks (the
forward) or (DH, BI) column blocks (the backward), so DH up to 1024 fits. The vector that
is contracted (h_{t-1} forward, d raw_t backward) is read back in blocks from the rows the
program has just written, after a barrier (a CTA-wide sync: other threads wrote them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _sum


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _gate_rows_matvec(hp_ptr, r_ptr, keep_ptr, DH, offs_d, md,
                      BD: tl.constexpr, BI: tl.constexpr, HAS_RESET: tl.constexpr):
    """(h_prev @ R_g) for the 4 gates; h_prev read from memory in blocks of BI (zero where
    the reset flag at keep_ptr is set); R_g streamed in (BI, DH) row blocks."""
    a0 = tl.full((BD,), 0.0, tl.float32)
    a1 = tl.full((BD,), 0.0, tl.float32)
    a2 = tl.full((BD,), 0.0, tl.float32)
    a3 = tl.full((BD,), 0.0, tl.float32)
    for i0 in range(0, DH, BI):
        rows = i0 + tl.arange(0, BI)
        mr = rows < DH
        hb = tl.load(hp_ptr + rows, mask=mr, other=0.0).to(tl.float32)
        if HAS_RESET:
            hb = tl.where(tl.load(keep_ptr + rows * 0) == 0, hb, 0.0)
        rm = mr[:, None] & md[None, :]
        roff = rows[:, None] * DH + offs_d[None, :]
        a0 += _sum(hb[:, None] * tl.load(r_ptr + roff, mask=rm, other=0.0).to(tl.float32), 0)
        a1 += _sum(hb[:, None] * tl.load(r_ptr + DH * DH + roff, mask=rm, other=0.0).to(
            tl.float32), 0)
        a2 += _sum(hb[:, None] * tl.load(r_ptr + 2 * DH * DH + roff, mask=rm, other=0.0).to(
            tl.float32), 0)
        a3 += _sum(hb[:, None] * tl.load(r_ptr + 3 * DH * DH + roff, mask=rm, other=0.0).to(
            tl.float32), 0)
    return a0, a1, a2, a3


@triton.jit
def slstm_fwd_kernel(
    x_ptr, r_ptr, h0_ptr, c0_ptr, n0_ptr, m0_ptr, reset_ptr,
    hs_ptr, cs_ptr, ns_ptr, ms_ptr, raw_ptr, hl_ptr, cl_ptr, nl_ptr, ml_ptr,
    S, NH, DH,
    BD: tl.constexpr, BI: tl.constexpr, HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr,
):
    """Grid (BH,). h0_ptr is always a valid (BH, DH) row (zeros without an initial state)."""
    pid = tl.program_id(0).to(tl.int64)
    head = pid % NH
    bidx = pid // NH
    offs_d = tl.arange(0, BD)
    md = offs_d < DH
    if HAS_INIT:
        c = tl.load(c0_ptr + pid * DH + offs_d, mask=md, other=0.0).to(tl.float32)
        n = tl.load(n0_ptr + pid * DH + offs_d, mask=md, other=0.0).to(tl.float32)
        m = tl.load(m0_ptr + pid * DH + offs_d, mask=md, other=0.0).to(tl.float32)
    else:
        c = tl.full((BD,), 0.0, tl.float32)
        n = tl.full((BD,), 0.0, tl.float32)
        m = tl.full((BD,), 0.0, tl.float32)
    h = tl.full((BD,), 0.0, tl.float32)
    rh = r_ptr + head * 4 * DH * DH
    for t in range(S):
        keep_ptr = reset_ptr + bidx * S + t
        if HAS_RESET:
            keep = tl.load(keep_ptr + offs_d * 0) == 0
            c = tl.where(keep, c, 0.0)
            n = tl.where(keep, n, 0.0)
            m = tl.where(keep, m, 0.0)
        if t == 0:
            hp = h0_ptr + pid * DH
        else:
            hp = hs_ptr + (pid * S + t - 1) * DH
        a0, a1, a2, a3 = _gate_rows_matvec(hp, rh, keep_ptr, DH, offs_d, md, BD, BI,
                                           HAS_RESET)
        xb = x_ptr + (pid * S + t) * 4 * DH
        ir = tl.load(xb + offs_d, mask=md, other=0.0).to(tl.float32) + a0
        fr = tl.load(xb + DH + offs_d, mask=md, other=0.0).to(tl.float32) + a1
        zr = tl.load(xb + 2 * DH + offs_d, mask=md, other=0.0).to(tl.float32) + a2
        orr = tl.load(xb + 3 * DH + offs_d, mask=md, other=0.0).to(tl.float32) + a3
        logf = _logsigmoid(fr)
        m_new = tl.maximum(logf + m, ir)
        ig = tl.exp(ir - m_new)
        fg = tl.exp(logf + m - m_new)
        z = 2.0 * _sigmoid(2.0 * zr) - 1.0
        c = fg * c + ig * z
        n = fg * n + ig
        m = m_new
        h = tl.where(md, _sigmoid(orr) * c / n, 0.0)
        rb = raw_ptr + (pid * S + t) * 4 * DH
        tl.store(rb + offs_d, ir, mask=md)
        tl.store(rb + DH + offs_d, fr, mask=md)
        tl.store(rb + 2 * DH + offs_d, zr, mask=md)
        tl.store(rb + 3 * DH + offs_d, orr, mask=md)
        row = (pid * S + t) * DH
        tl.store(hs_ptr + row + offs_d, h, mask=md)
        tl.store(cs_ptr + row + offs_d, c, mask=md)
        tl.store(ns_ptr + row + offs_d, n, mask=md)
        tl.store(ms_ptr + row + offs_d, m, mask=md)
        tl.debug_barrier()  # h_t is read back in blocks by other threads at t + 1
    tl.store(hl_ptr + pid * DH + offs_d, h, mask=md)
    tl.store(cl_ptr + pid * DH + offs_d, c, mask=md)
    tl.store(nl_ptr + pid * DH + offs_d, n, mask=md)
    tl.store(ml_ptr + pid * DH + offs_d, m, mask=md)


@triton.jit
def slstm_bwd_kernel(
    r_ptr, c0_ptr, n0_ptr, m0_ptr, reset_ptr,
    cs_ptr, ns_ptr, ms_ptr, raw_ptr,
    dhs_ptr, dhl_ptr, dcl_ptr, dnl_ptr, dml_ptr,
    dx_ptr, dh0_ptr, dc0_ptr, dn0_ptr, dm0_ptr,
    S, NH, DH,
    BD: tl.constexpr, BI: tl.constexpr, HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr,
):
    """Reverse time loop: the exact reverse of the forward graph (the max of the stabilizer
    passes its gradient to the candidate that won). Writes dx (= d raw) and the gradient of
    the initial state; dR is one matmul of h_prev and dx, done by the wrapper. Grid (BH,)."""
    pid = tl.program_id(0).to(tl.int64)
    head = pid % NH
    bidx = pid // NH
    offs_d = tl.arange(0, BD)
    md = offs_d < DH
    dh = tl.load(dhl_ptr + pid * DH + offs_d, mask=md, other=0.0)
    dc = tl.load(dcl_ptr + pid * DH + offs_d, mask=md, other=0.0)
    dn = tl.load(dnl_ptr + pid * DH + offs_d, mask=md, other=0.0)
    dm = tl.load(dml_ptr + pid * DH + offs_d, mask=md, other=0.0)
    rh = r_ptr + head * 4 * DH * DH
    for tt in range(S):
        t = S - 1 - tt
        row = (pid * S + t) * DH
        if t > 0:
            cp = tl.load(cs_ptr + row - DH + offs_d, mask=md, other=0.0)
            np_ = tl.load(ns_ptr + row - DH + offs_d, mask=md, other=0.0)
            mp = tl.load(ms_ptr + row - DH + offs_d, mask=md, other=0.0)
        else:
            if HAS_INIT:
                cp = tl.load(c0_ptr + pid * DH + offs_d, mask=md, other=0.0).to(tl.float32)
                np_ = tl.load(n0_ptr + pid * DH + offs_d, mask=md, other=0.0).to(tl.float32)
                mp = tl.load(m0_ptr + pid * DH + offs_d, mask=md, other=0.0).to(tl.float32)
            else:
                cp = tl.full((BD,), 0.0, tl.float32)
                np_ = tl.full((BD,), 0.0, tl.float32)
                mp = tl.full((BD,), 0.0, tl.float32)
        if HAS_RESET:
            keep = tl.load(reset_ptr + bidx * S + t + offs_d * 0) == 0
            cp = tl.where(keep, cp, 0.0)
            np_ = tl.where(keep, np_, 0.0)
            mp = tl.where(keep, mp, 0.0)
        rb = raw_ptr + (pid * S + t) * 4 * DH
        ir = tl.load(rb + offs_d, mask=md, other=0.0)
        fr = tl.load(rb + DH + offs_d, mask=md, other=0.0)
        zr = tl.load(rb + 2 * DH + offs_d, mask=md, other=0.0)
        orr = tl.load(rb + 3 * DH + offs_d, mask=md, other=0.0)
        c = tl.load(cs_ptr + row + offs_d, mask=md, other=0.0)
        n = tl.load(ns_ptr + row + offs_d, mask=md, other=1.0)
        m = tl.load(ms_ptr + row + offs_d, mask=md, other=0.0)
        logf = _logsigmoid(fr)
        ig = tl.exp(ir - m)
        fg = tl.exp(logf + mp - m)
        z = 2.0 * _sigmoid(2.0 * zr) - 1.0
        o = _sigmoid(orr)
        dh = dh + tl.load(dhs_ptr + row + offs_d, mask=md, other=0.0)
        # h = o c / n
        do = dh * c / n
        dc = dc + dh * o / n
        dn = dn - dh * o * c / (n * n)
        # c = fg c_prev + ig z;  n = fg n_prev + ig
        dfg = dc * cp + dn * np_
        dig = dc * z + dn
        dz = dc * ig
        dc_prev = dc * fg
        dn_prev = dn * fg
        # fg = exp(logf + m_prev - m), ig = exp(ir - m), m = max(logf + m_prev, ir)
        dlogf = dfg * fg
        dm_prev = dfg * fg
        dir_ = dig * ig
        dm = dm - dfg * fg - dig * ig
        carried = logf + mp >= ir
        dlogf = dlogf + tl.where(carried, dm, 0.0)
        dm_prev = dm_prev + tl.where(carried, dm, 0.0)
        dir_ = dir_ + tl.where(carried, 0.0, dm)
        dfr = dlogf * _sigmoid(-fr)
        dzr = dz * (1.0 - z * z)
        dor = do * o * (1.0 - o)
        xb = dx_ptr + (pid * S + t) * 4 * DH
        tl.store(xb + offs_d, dir_, mask=md)
        tl.store(xb + DH + offs_d, dfr, mask=md)
        tl.store(xb + 2 * DH + offs_d, dzr, mask=md)
        tl.store(xb + 3 * DH + offs_d, dor, mask=md)
        tl.debug_barrier()  # d raw_t is read back in blocks by other threads just below
        # d h_prev = sum_g R_g @ d raw_g, R_g streamed in (DH, BI) column blocks
        dh = tl.full((BD,), 0.0, tl.float32)
        for j0 in range(0, DH, BI):
            cols = j0 + tl.arange(0, BI)
            mc = cols < DH
            rm = md[:, None] & mc[None, :]
            roff = offs_d[:, None] * DH + cols[None, :]
            for g in tl.static_range(4):
                dg = tl.load(xb + g * DH + cols, mask=mc, other=0.0)
                rg = tl.load(rh + g * DH * DH + roff, mask=rm, other=0.0).to(tl.float32)
                dh += _sum(rg * dg[None, :], 1)
        dc = dc_prev
        dn = dn_prev
        dm = dm_prev
        if HAS_RESET:
            dh = tl.where(keep, dh, 0.0)
            dc = tl.where(keep, dc, 0.0)
            dn = tl.where(keep, dn, 0.0)
            dm = tl.where(keep, dm, 0.0)
    tl.store(dh0_ptr + pid * DH + offs_d, dh, mask=md)
    tl.store(dc0_ptr + pid * DH + offs_d, dc, mask=md)
    tl.store(dn0_ptr + pid * DH + offs_d, dn, mask=md)
    tl.store(dm0_ptr + pid * DH + offs_d, dm, mask=md)

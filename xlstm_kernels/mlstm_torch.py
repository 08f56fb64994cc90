"""mLSTM sequence ops in plain PyTorch: the parallel oracle, the recurrent loop,
one step, and the chunkwise form. Math and conventions: docs/design.md.

All three sequence forms use the same stabilizer convention (zero initial state
has m0 = 0, and the initial state enters the running max as F_t + m0), so they
agree to rounding on any length, chunk size and reset pattern. Inputs in
bf16/fp16/fp32 compute in float32; float64 inputs compute in float64.
Gradients of the oracle, the loop and the step come from autograd; the chunkwise
form is one autograd node with a hand-written backward of the same exact math
(the denominator and stabilizer paths included; tests check it against autograd
of the oracle and torch's gradcheck).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import MLSTMState, compute_dtype

NEG_INF = float("-inf")
_FLUSH = -60.0  # log weights this far under a row's largest count as zero
_FLUSH_W = math.exp(_FLUSH) * (1 + 1e-6)  # at or above exp(_FLUSH) in any float rounding
_DOT_BATCH_BYTES = 4 << 20  # the backward keeps all chunks' state gradients up to this size


def _zero_state(B: int, NH: int, DQK: int, DV: int, dtype: torch.dtype, device: torch.device) -> MLSTMState:
    return (
        torch.zeros(B, NH, DQK, DV, dtype=dtype, device=device),
        torch.zeros(B, NH, DQK, dtype=dtype, device=device),
        torch.zeros(B, NH, dtype=dtype, device=device),
    )


def _cast_state(state: MLSTMState, dtype: torch.dtype) -> MLSTMState:
    return tuple(t.to(dtype) for t in state)  # type: ignore[return-value]


def _start_state(initial_state: MLSTMState | None, q: torch.Tensor, v: torch.Tensor,
                 dtype: torch.dtype) -> MLSTMState:
    """The given initial state in `dtype`, or zeros (m0 = 0) shaped for q (B, NH, S, DQK), v."""
    if initial_state is not None:
        return _cast_state(initial_state, dtype)
    B, NH, _, DQK = q.shape
    return _zero_state(B, NH, DQK, v.shape[-1], dtype, q.device)


def _normalize(num: torch.Tensor, den: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """h = num / (max(|den|, exp(-m)) + eps); num (..., DV), den and m (...). One reciprocal
    per position and a multiply: a division of the (..., DV) tensor costs two more
    passes in its backward."""
    return num * torch.reciprocal(torch.maximum(den.abs(), torch.exp(-m)) + eps).unsqueeze(-1)


def mlstm_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """One token. q, k: (B, NH, DQK); v: (B, NH, DV); i, f: (B, NH).

    Returns h (B, NH, DV) and the new state (C, n, m), all in the compute dtype
    (float32, or float64 for float64 inputs).
    """
    cd = compute_dtype(q, k, v, i, f)
    B, NH, DQK = q.shape
    DV = v.shape[-1]
    if state is None:
        state = _zero_state(B, NH, DQK, DV, cd, q.device)
    C, n, m = _cast_state(state, cd)
    q, k, v, i, f = (t.to(cd) for t in (q, k, v, i, f))
    logf = F.logsigmoid(f)
    m_new = torch.maximum(logf + m, i)
    fp = torch.exp(logf + m - m_new)
    ip = torch.exp(i - m_new)
    C = fp[..., None, None] * C + ip[..., None, None] * (k.unsqueeze(-1) * v.unsqueeze(-2))
    n = fp[..., None] * n + ip[..., None] * k
    qs = q * DQK**-0.5
    num = torch.einsum("bhd,bhde->bhe", qs, C)
    den = (qs * n).sum(-1)
    h = _normalize(num, den, m_new, eps)
    return h, (C, n, m_new)


def mlstm_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    reset: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """Step loop over the sequence (shapes as `mlstm_chunkwise`)."""
    cd = compute_dtype(q, k, v, i, f)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    state = _start_state(initial_state, q, v, cd)
    hs = []
    # unbind, not q[:, :, t]: indexing's backward zero-fills a full-size gradient per step
    qs, ks, vs, is_, fs = (t.unbind(2) for t in (q, k, v, i, f))
    keeps = (~reset).to(cd).unbind(1) if reset is not None else None
    for t in range(S):
        if keeps is not None:
            keep = keeps[t][:, None]
            state = (state[0] * keep[..., None, None], state[1] * keep[..., None], state[2] * keep)
        h, state = mlstm_step_torch(qs[t], ks[t], vs[t], is_[t], fs[t], state, eps)
        hs.append(h)
    h = torch.stack(hs, dim=2) if hs else v.new_zeros(B, NH, 0, DV, dtype=cd)
    return h, state


def _doc_start(reset: torch.Tensor) -> torch.Tensor:
    """Index of the last reset at or before each position along the last dim, -1 if none."""
    L = reset.shape[-1]
    idx = torch.arange(L, device=reset.device).expand_as(reset)
    return torch.where(reset, idx, torch.full_like(idx, -1)).cummax(dim=-1).values


def mlstm_parallel_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    reset: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """Quadratic form, the oracle: materializes the (S, S) decay matrix per head."""
    cd = compute_dtype(q, k, v, i, f)
    B, NH, S, DQK = q.shape
    q, k, v, i, f = (t.to(cd) for t in (q, k, v, i, f))
    C0, n0, m0 = _start_state(initial_state, q, v, cd)
    logf = F.logsigmoid(f)
    Fc = torch.cumsum(logf, dim=-1)  # (B, NH, S)
    Fexcl = Fc - logf
    tt = torch.arange(S, device=q.device)
    causal = tt[:, None] >= tt[None, :]  # (S, S)
    if reset is None:
        same_doc = causal.expand(B, 1, S, S)
        carry = torch.ones(B, 1, S, dtype=torch.bool, device=q.device)
        base = torch.zeros_like(Fc)
    else:
        start = _doc_start(reset)  # (B, S)
        same_doc = causal & (tt[None, None, :] >= start[:, :, None])  # s >= doc start of t
        same_doc = same_doc[:, None]
        carry = (start < 0)[:, None]  # (B, 1, S)
        base = torch.gather(Fexcl, -1, start.clamp(min=0)[:, None].expand(B, NH, S))
        base = torch.where(carry, torch.zeros_like(base), base)
    # initial-state (or zero-state at a document start, m0 = 0) candidate for the max
    a = Fc - base + torch.where(carry, m0[..., None], torch.zeros_like(Fc))
    logD = Fc[..., :, None] - Fc[..., None, :] + i[..., None, :]
    logD = torch.where(same_doc, logD, torch.full_like(logD, NEG_INF))
    m = torch.maximum(a, logD.max(dim=-1).values)  # (B, NH, S)
    w0 = torch.where(carry, torch.exp(a - m), torch.zeros_like(a))  # weight of initial state
    qs = q * DQK**-0.5
    P = (qs @ k.transpose(-1, -2)) * torch.exp(logD - m[..., None])
    num = P @ v + w0[..., None] * (qs @ C0)
    den = P.sum(-1) + w0 * (qs @ n0[..., None]).squeeze(-1)
    h = _normalize(num, den, m, eps)
    # last state: weights of every key at the final position
    wl = torch.exp(logD[:, :, -1, :] - m[:, :, -1:])  # (B, NH, S)
    C = w0[:, :, -1, None, None] * C0 + (k * wl[..., None]).transpose(-1, -2) @ v
    n = w0[:, :, -1, None] * n0 + (k * wl[..., None]).sum(-2)
    return h, (C, n, m[:, :, -1])


def _chunked(x: torch.Tensor, NC: int, L: int) -> torch.Tensor:
    """x (B, NH, S, D) as a (B, NH, NC, L, D) tensor whose (B, NH, NC) dims merge into one
    batch dim, zero past S: a view when x allows it, else one copy."""
    B, NH, S, D = x.shape
    if NC * L == S and x.is_contiguous():
        return x.view(B, NH, NC, L, D)
    out = x.new_zeros(B, NH, NC * L, D) if NC * L > S else x.new_empty(B, NH, S, D)
    out[:, :, :S].copy_(x)
    return out.view(B, NH, NC, L, D)


class _ChunkwiseMLSTM(torch.autograd.Function):
    """The whole chunkwise mLSTM as one autograd node (math: docs/design.md).

    Forward: a scalar scan for the chunk-boundary stabilizers, a scan for the
    chunk-boundary states (C | n as one (DQK, DV + 1) matrix per head), then every
    chunk's outputs at once. Backward (hand-written, exact): with every stabilizer m
    held fixed the op is the plain chunkwise algebra, whose gradient is a few batched
    matmuls and one reverse state scan; the stabilizers themselves matter only through
    eps (dL/dm_t = -eps (h_t . dh_t) / N_t at every position) and through the returned
    state (C, n scale as exp(-m)), and those gradients follow the winners of the max
    chain back to (i, log f, m0), as autograd of the reference would.
    """

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, reset, L, eps):  # noqa: D102
        with torch.autocast(q.device.type, enabled=False):
            return _forward(ctx, q, k, v, i, f, C0, n0, m0, reset, L, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh, dC, dn, dm):  # noqa: D102
        with torch.autocast(dh.device.type if dh is not None else "cpu", enabled=False):
            return _backward(ctx, dh, dC, dn, dm)


def _forward(ctx, q, k, v, i, f, C0, n0, m0, reset, L: int, eps: float):
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    E = DV + 1  # value columns plus the normalizer's column of ones
    NC = -(-S // L)
    pad = NC * L - S
    dev = q.device
    logf = F.logsigmoid(f)
    if pad:
        # padded tail tokens are no-ops: no input (i = -inf), no decay (log f = 0)
        i = F.pad(i, (0, pad), value=NEG_INF)
        logf = F.pad(logf, (0, pad), value=0.0)
        if reset is not None:
            reset = F.pad(reset, (0, pad), value=False)
    # q stays unscaled: DQK**-0.5 rides on the weights of both terms (w_inter, exp(logD - m))
    scale = DQK**-0.5
    qc = _chunked(q, NC, L)  # (B, NH, NC, L, DQK)
    kc = _chunked(k, NC, L)
    # RB[c] = [state entering chunk c ; va_c], (DQK + L, E): the outputs of a chunk are then
    # one matmul [qw | P] @ RB[c], and the backward's dout @ RB[c]^T gives both (X | dP)
    R = DQK + L
    RB = q.new_empty(B, NH, NC, R, E)
    prev, va = RB[..., :DQK, :], RB[..., DQK:, :]
    va[..., :DV] = (F.pad(v, (0, 0, 0, pad)) if pad else v).view(B, NH, NC, L, DV)
    va[..., DV] = 1.0  # n = k^T @ 1 rides along as one more value column
    ic = i.reshape(B, NH, NC, L)
    b = logf.view(B, NH, NC, L).cumsum(-1)  # decay from the chunk start, inclusive
    b_end = b[..., -1]  # (B, NH, NC)
    tt = torch.arange(L, device=dev)
    if reset is None:
        start = carry = keep = None  # the causal mask is a tril_ of the weights
    else:
        start = _doc_start(reset.view(B, NC, L))[:, None]  # (B, 1, NC, L): local doc start or -1
        carry = start < 0  # the carried state reaches position t
        keep = carry[..., -1]  # (B, 1, NC): no reset in the chunk
        base = torch.gather(b - logf.view(B, NH, NC, L), -1, start.clamp(min=0).expand(B, NH, NC, L))
        base.masked_fill_(carry, 0.0)  # b - base: decay since the doc start (or chunk start)
        mask = (tt[:, None] >= tt[None, :]) & (tt >= start[..., None])  # (B, 1, NC, L, L)

    # log weight of key s at its chunk's end: b_end - b_s + i_s (keys after the last doc start)
    g = (b_end[..., None] - b).add_(ic)
    if start is not None:
        g.masked_fill_(tt < start[..., -1:], NEG_INF)
    g_max, g_arg = g.max(dim=-1)  # (B, NH, NC)

    # stabilizer scan over chunks: m_{c+1} = max(a_end_c, g_max_c), two scalar ops per chunk
    if keep is None:
        bk, r = b_end, g_max
    else:
        # a reset in the chunk cuts the carried candidate (-inf) and offers the zero state
        # (m = 0) at the chunk's last doc start instead
        zst = b_end - base[..., -1]
        bk = b_end.masked_fill(~keep, NEG_INF)
        r = torch.maximum(g_max, zst.masked_fill(keep, NEG_INF))
    mT = b.new_empty(NC + 1, B, NH)
    mT[0] = m0
    mu, bku, ru = mT.unbind(0), bk.movedim(-1, 0).unbind(0), r.movedim(-1, 0).unbind(0)
    for c in range(NC):
        torch.maximum(bku[c] + mu[c], ru[c], out=mu[c + 1])
    m_all = mT.movedim(0, -1)  # (B, NH, NC + 1)
    m_prev, m_next = m_all[..., :-1], m_all[..., 1:]
    a_end = b_end + m_prev if keep is None else torch.where(keep, b_end + m_prev, zst)
    aend_win = a_end >= g_max
    w_old = torch.exp(a_end - m_next)
    if keep is not None:
        w_old.masked_fill_(~keep, 0.0)
    wk = torch.exp(g - m_next[..., None])  # (B, NH, NC, L) key weights under the new stabilizer
    kw = kc * wk[..., None]

    # chunk-boundary states S_{c+1} = w_old_c S_c + kw_c^T va_c, each written once into its
    # slot and updated there (no state-sized temporaries: at DQK = DV = 384 one state per
    # head and chunk is 0.6 MB, and a fresh tensor of all of them costs its page faults)
    n3, n_bh = B * NH * NC, B * NH
    prev[:, :, 0, :, :DV] = C0
    prev[:, :, 0, :, DV] = n0
    last = q.new_empty(B, NH, DQK, E)
    RB4 = RB.view(n_bh, NC, R, E)
    pu = RB4[:, :, :DQK].unbind(1) + (last.view(n_bh, DQK, E),)
    wu = w_old.reshape(n_bh, NC, 1, 1).unbind(1)
    kwT = kw.view(n_bh, NC, L, DQK).transpose(-1, -2).unbind(1)
    vau = RB4[:, :, DQK:].unbind(1)
    # the chunk's product into one reused buffer, then one fused multiply-add into the slot
    # (an in-place baddbmm_ on the strided slot falls back to a copy and one gemm per head)
    kv = last.new_empty(n_bh, DQK, E)
    for c in range(NC):
        torch.addcmul(torch.bmm(kwT[c], vau[c], out=kv), pu[c], wu[c], out=pu[c + 1])

    # outputs: one stabilizer per position over the carried state and the in-chunk keys
    mp = m_prev[..., None]
    a = b + mp if carry is None else (b - base).add_(torch.where(carry, mp, 0.0))
    # logD[t, s] = b_t - b_s + i_s on the mask. The weights DQK**-0.5 exp(logD - m_t), 0 off the
    # mask; weights under e^-60 of the row's largest are flushed to 0: exp of -inf or of an
    # underflowing (denormal) result runs 10-80x slower on CPU, so exp only sees [-60, 0]
    bi = b - ic
    if start is None:
        # the row max of a causal tile is a running max over the keys (and its argmax), so m_t
        # is known before the tile: one pass builds logD - m_t, and tril_ masks it after exp
        cmax, rarg = torch.neg(bi).cummax(dim=-1)
        rmax = b + cmax
        mt = torch.maximum(a, rmax)  # (B, NH, NC, L)
        Ew = torch.sub((b - mt).add_(math.log(scale))[..., :, None], bi[..., None, :])
        Ew.clamp_(_FLUSH, 0.0).exp_().tril_()
    else:
        # off the mask -inf (an added (L, L) tile: masked_fill and where are several times
        # slower than an add on CPU)
        logD = torch.sub(b[..., :, None], bi[..., None, :]).add_(
            torch.zeros(mask.shape, dtype=b.dtype, device=dev).masked_fill_(~mask, NEG_INF))
        rmax, rarg = logD.max(dim=-1)
        mt = torch.maximum(a, rmax)
        Ew = logD.sub_((mt - math.log(scale))[..., None]).clamp_min_(_FLUSH).exp_()
    a_win = a >= rmax
    F.threshold_(Ew, _FLUSH_W, 0.0)  # the flush (and the clamped -inf entries) to exact zeros
    w_inter = torch.exp(a - mt).mul_(scale)  # weight of the carried state for the unscaled q
    if carry is not None:
        w_inter.masked_fill_(~carry, 0.0)
    LB = q.new_empty(B, NH, NC, L, R)  # [qw | P] per chunk
    qw, P = LB[..., :DQK], LB[..., DQK:]
    torch.mul(torch.matmul(qc, kc.transpose(-1, -2)), Ew, out=P)
    torch.mul(qc, w_inter[..., None], out=qw)
    out = torch.bmm(LB.view(n3, L, R), RB.view(n3, R, E)).view(B, NH, NC, L, E)
    den = out[..., DV]
    emt = torch.exp(-mt)
    absden = den.abs()
    rZ = torch.reciprocal(torch.maximum(absden, emt).add_(eps))
    # d|den|/d den where |den| is the max (else the max is exp(-m), a stabilizer path)
    dsgn = torch.where(absden >= emt, torch.sign(den), 0.0)
    # h = num / N in place: h is returned as a view of out (rows of DV + 1; the callers'
    # transposes copy it anyway), which the backward keeps
    out[..., :DV].mul_(rZ[..., None])
    h = out.view(B, NH, NC * L, E)[:, :, :S, :DV]

    ctx.save_for_backward(qc, kc, RB, LB, last, Ew, out, rZ, dsgn, w_inter, kw, wk, w_old,
                          rarg, a_win, g_arg, aend_win, f, start)
    ctx.meta = (S, L, eps)
    return h, last[..., :DV].contiguous(), last[..., DV].contiguous(), mT[-1].clone()


def _backward(ctx, dh, dC, dn, dm):
    (qc, kc, RB, LB, last, Ew, out, rZ, dsgn, w_inter, kw, wk, w_old,
     rarg, a_win, g_arg, aend_win, f, start) = ctx.saved_tensors
    S, L, eps = ctx.meta
    need_state = any(ctx.needs_input_grad[5:8])
    B, NH, NC, _, DQK = qc.shape
    R, E = RB.shape[-2:]
    DV = E - 1
    SP = NC * L
    n3 = B * NH * NC

    # output rows: dnum = dh / N, dden = -(dh . h) / N * sign(den) (where |den| won)
    dout = qc.new_zeros(B, NH, NC, L, E) if (SP > S or dh is None) else qc.new_empty(B, NH, NC, L, E)
    if dh is not None:
        dh = dh.to(qc.dtype)
        dhp = dout.view(B, NH, SP, E)[:, :, :S, :DV]
        # dh . h through dout's storage (fresh multi-MB temporaries cost their page faults)
        hdh = torch.mul(dh, out.view(B, NH, SP, E)[:, :, :S, :DV], out=dhp).sum(-1)
        dZ = (F.pad(hdh, (0, SP - S)) if SP > S else hdh).view(B, NH, NC, L).mul_(rZ).neg_()  # dL/dN
        torch.mul(dh, rZ.view(B, NH, SP)[:, :, :S, None], out=dhp)
        torch.mul(dZ, dsgn, out=dout[..., DV])
        src = dZ.mul_(eps)  # dL/dm_t through the eps of the normalizer
    else:
        src = None

    dout3 = dout.view(n3, L, E)
    # out = [qw | P] @ [prev ; va]: (X | dP) = dout @ [prev ; va]^T in one matmul
    XdP = torch.bmm(dout3, RB.view(n3, R, E).transpose(-1, -2)).view(B, NH, NC, L, R)
    X, dP = XdP[..., :DQK], XdP[..., DQK:]
    P = LB[..., DQK:]
    # carried-state term: out += w_inter * (qc @ prev)
    rowtmp = torch.empty_like(qc)  # scratch of the two row dot products
    # d a_t = d b_t (a = b + m_prev); w_inter has the scale
    db = torch.mul(X, qc, out=rowtmp).sum(-1).mul_(w_inter)
    # in-chunk term: out += P @ va, P = (qc @ kc^T) * exp(logD - m)
    dQK = dP * Ew
    dlogD = dP.mul_(P)
    cs = dlogD.sum(-2)  # the key side: -b_s + i_s
    db.add_(dlogD.sum(-1)).sub_(cs)
    di = cs
    # a fresh product and one addcmul_ (an in-place baddbmm_ first copies its input)
    dqc = torch.bmm(dQK.view(n3, L, L), kc.view(n3, L, DQK)).view(B, NH, NC, L, DQK)
    dqc.addcmul_(X, w_inter[..., None])

    # reverse scan of the state gradients: carried[c] = dL/d(state after chunk c)
    # = w_old_{c+1} carried[c+1] + qw_{c+1}^T @ dout_{c+1}, chunk by chunk
    n_bh = B * NH
    # small states: every carried[c] kept, then its consumers as batched products after the
    # scan. Large ones (the 125M heads: 75 MB per call at S 2048): carried[c] lives in two
    # reused buffers and its consumers (the decay dot, dv's kw term, Y = va carried^T) run
    # while it is in cache: no (NC, DQK, E) tensor to page-fault in on every call
    streamed = B * NH * NC * DQK * E * RB.element_size() > _DOT_BATCH_BYTES
    carried = None if streamed else RB.new_empty(B, NH, NC, DQK, E)
    dlast = RB.new_empty(B, NH, DQK, E) if streamed else carried[:, :, NC - 1]
    if dC is not None:
        dlast[..., :DV] = dC
    else:
        dlast[..., :DV].zero_()
    if dn is not None:
        dlast[..., DV] = dn
    else:
        dlast[..., DV].zero_()
    wu = w_old.reshape(n_bh, NC, 1, 1).unbind(1)
    qwT = LB.view(n_bh, NC, L, R)[..., :DQK].transpose(-1, -2).unbind(1)
    doutu = dout.view(n_bh, NC, L, E).unbind(1)
    qd = RB.new_empty(n_bh, DQK, E)  # reused product buffer, as in the forward
    P3 = LB.view(n3, L, R)[..., DQK:]
    # dv only (the ones column needs no gradient): a contiguous (.., DV) result, which the
    # callers' reshapes and gradient accumulation then take without a copy; dkw = va @ carried^T
    if streamed:
        pu = RB.view(n_bh, NC, R, E)[:, :, :DQK].unbind(1)
        vau = RB.view(n_bh, NC, R, E)[:, :, DQK:].unbind(1)
        kwu = kw.view(n_bh, NC, L, DQK).unbind(1)
        dv = qc.new_empty(n_bh, NC, L, DV)
        Y = qc.new_empty(B, NH, NC, L, DQK)
        dvu, Yu = dv.unbind(1), Y.view(n_bh, NC, L, DQK).unbind(1)
        dw_old = w_old.new_empty(NC, n_bh)
        bufs = RB.new_empty(2, n_bh, DQK, E)
        tmp = torch.empty_like(qd)
        cur = dlast.view(n_bh, DQK, E)
        for c in range(NC - 1, -1, -1):
            if c < NC - 1:
                nxt = bufs[c % 2]
                torch.addcmul(torch.bmm(qwT[c + 1], doutu[c + 1], out=qd), cur, wu[c + 1], out=nxt)
                cur = nxt
            torch.sum(torch.mul(cur, pu[c], out=tmp), (-1, -2), out=dw_old[c])
            torch.bmm(kwu[c], cur[..., :DV], out=dvu[c])
            torch.bmm(vau[c], cur.transpose(-1, -2), out=Yu[c])
        dw_old = dw_old.t().reshape(B, NH, NC)
        dv = dv.view(n3, L, DV).baddbmm_(P3.transpose(-1, -2), dout3[..., :DV])
        c0 = cur
    else:
        cu = carried.view(n_bh, NC, DQK, E).unbind(1)
        for c in range(NC - 2, -1, -1):
            torch.addcmul(torch.bmm(qwT[c + 1], doutu[c + 1], out=qd), cu[c + 1], wu[c + 1], out=cu[c])
        dw_old = (carried * RB[..., :DQK, :]).sum((-1, -2))
        c3 = carried.view(n3, DQK, E)
        dv = torch.bmm(kw.view(n3, L, DQK), c3[..., :DV]).baddbmm_(P3.transpose(-1, -2), dout3[..., :DV])
        Y = torch.bmm(RB.view(n3, R, E)[:, DQK:], c3.transpose(-1, -2)).view(B, NH, NC, L, DQK)
        c0 = cu[0]
    dCa0 = None
    if need_state:
        dCa0 = torch.addcmul(torch.bmm(qwT[0], doutu[0], out=qd), c0, wu[0]).view(B, NH, DQK, E)
    dg = torch.mul(Y, kc, out=rowtmp).sum(-1).mul_(wk)  # g_s = b_end - b_s + i_s
    dkc = torch.bmm(dQK.view(n3, L, L).transpose(-1, -2), qc.view(n3, L, DQK)).view(B, NH, NC, L, DQK)
    dkc.addcmul_(Y, wk[..., None])
    db.sub_(dg)
    di.add_(dg)
    db_end = dg.sum(-1).add_(dw_old.mul_(w_old))  # a_end = b_end + m_prev (w_old = 0 on reset)
    dlogf_extra = None

    # stabilizer paths: dL/dm_t (eps) and dL/dm_last (the returned state), to the max winners
    m_last_src = (dm.to(last.dtype) if dm is not None else last.new_zeros(B, NH)) - (dlast * last).sum((-1, -2))
    D = last.new_zeros(NC + 1, B, NH)  # dL/dm_prev per chunk, then dL/dm_last
    D[NC] = m_last_src
    carryv = None if start is None else start < 0
    if src is not None:
        srcA = torch.where(a_win, src, 0.0)  # the carried state's candidate won
        db.add_(src)  # both candidates hold + b_t
        srcD = src - srcA  # key s* won: -b_s* + i_s*
        db.scatter_add_(-1, rarg, srcD.neg())
        di.scatter_add_(-1, rarg, srcD)
        if carryv is None:
            D[:NC] = srcA.sum(-1).movedim(-1, 0)
        else:
            D[:NC] = torch.where(carryv, srcA, 0.0).sum(-1).movedim(-1, 0)
            # zero state at a doc start: a_t = b_t - b_start + log f_start
            z = torch.where(carryv, 0.0, srcA)
            idx = start.clamp(min=0).expand(B, NH, NC, L)
            db.scatter_add_(-1, idx, z.neg())
            dlogf_extra = torch.zeros_like(db).scatter_add_(-1, idx, z)
    passes = aend_win if start is None else aend_win & (start[..., -1] < 0)
    passT = passes.movedim(-1, 0).to(D.dtype)
    for c in range(NC - 1, -1, -1):
        D[c].addcmul_(passT[c], D[c + 1])
    Dn = D[1:].movedim(0, -1)  # dL/dm_next per chunk: + b_end on every route
    db_end.add_(Dn)
    gD = torch.where(aend_win, 0.0, Dn)[..., None]  # the chunk's key g_arg won
    db.scatter_add_(-1, g_arg[..., None], gD.neg())
    di.scatter_add_(-1, g_arg[..., None], gD)
    if start is not None:
        zD = torch.where(aend_win & (start[..., -1] >= 0), Dn, 0.0)[..., None]  # zero state won
        sl = start[..., -1:].clamp(min=0).expand(B, NH, NC, 1)
        db.scatter_add_(-1, sl, zD.neg())
        if dlogf_extra is None:
            dlogf_extra = torch.zeros_like(db)
        dlogf_extra.scatter_add_(-1, sl, zD)
    db[..., -1] += db_end

    # b = cumsum(log f) within the chunk: dlogf_s = sum_{t >= s} db_t
    dlogf = db.flip(-1).cumsum(-1).flip(-1)
    if dlogf_extra is not None:
        dlogf.add_(dlogf_extra)
    dlogf = dlogf.view(B, NH, SP)[:, :, :S]
    df = dlogf * torch.sigmoid(-f)
    dq = dqc.view(B, NH, SP, DQK)[:, :, :S]
    dk = dkc.view(B, NH, SP, DQK)[:, :, :S]
    dv = dv.view(B, NH, SP, DV)[:, :, :S]
    di = di.reshape(B, NH, SP)[:, :, :S]
    dC0 = dn0 = dm0 = None
    if need_state:
        dC0, dn0 = dCa0[..., :DV], dCa0[..., DV]
        dm0 = D[0] + (dCa0 * RB[:, :, 0, :DQK]).sum((-1, -2))
    return dq, dk, dv, di, df, dC0, dn0, dm0, None, None, None


def mlstm_chunkwise_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    chunk_size: int = 64,
    initial_state: MLSTMState | None = None,
    reset: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise form: a sequential scan over chunk-boundary states, then every
    chunk's outputs in parallel (carried state + causal in-chunk term under one
    stabilizer per position), as one autograd node with a hand-written backward.

    q, k: (B, NH, S, DQK); v: (B, NH, S, DV); i, f: (B, NH, S); reset: bool (B, S).
    Returns h (B, NH, S, DV) and the last state (C (B, NH, DQK, DV), n (B, NH, DQK),
    m (B, NH)), all in the compute dtype. Memory O(S * L + S / L * DQK * DV) per head.
    """
    cd = compute_dtype(q, k, v, i, f)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    C, n, m = _start_state(initial_state, q, v, cd)
    if S == 0:
        return v.new_zeros(B, NH, 0, DV, dtype=cd), (C, n, m)
    L = max(1, min(chunk_size, S))
    q, k, v, i, f = (t.to(cd) for t in (q, k, v, i, f))
    h, C, n, m = _ChunkwiseMLSTM.apply(q, k, v, i, f, C, n, m, reset, L, eps)
    return h, (C, n, m)

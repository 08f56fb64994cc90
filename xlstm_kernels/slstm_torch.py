"""sLSTM recurrence in plain PyTorch (scalar memory, exponential gating with
the stabilizer, per-head block-diagonal recurrent weights). Math and the backward's
formulas: docs/design.md ("sLSTM on torch, the normalized form").

The time loop is sequential, so on a CPU its cost is the number of ops per time step,
not their size (a step of one sequence at width 128 is 512 gate values). Hence:
- the loop carries the normalized state r = c / n, l = m + log n: 11 elementwise ops
  a step instead of the (c, n, m) form's 15, and the same function. The returned
  state is (c, n, m) again, as the Triton kernel's;
- one autograd node for the whole sequence keeps autograd out of the loop. Forward:
  one matmul and the step's ops, written into preallocated (S, ...) buffers that the
  backward reads. Backward: the exact reverse. Given the forward's values, one step's
  backward is linear in the three gradients it receives (dh, dr, dl); its coefficients,
  a (3, 7) matrix per element, are computed for blocks of steps at once, and the loop
  is left with one multiply, one sum and one matmul per step.
Layout inside: time first, then head, then batch: (S, NH, B, ...), so that a step's
recurrent matmul is one bmm over heads on contiguous rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import SLSTMState, compute_dtype

_CHUNK_ELEMENTS = 1 << 15  # (step, head, batch, channel) elements of one block of backward
# coefficients: its elementwise passes stay in cache (128 KiB each)


def _zero_state(B: int, NH: int, DH: int, dtype: torch.dtype, device: torch.device) -> SLSTMState:
    return tuple(torch.zeros(B, NH, DH, dtype=dtype, device=device) for _ in range(4))  # type: ignore[return-value]


def slstm_step_torch(x: torch.Tensor, R: torch.Tensor, state: SLSTMState | None) -> tuple[torch.Tensor, SLSTMState]:
    """One token. x: (B, NH, 4, DH) gate pre-activations (i, f, z, o) from the input
    path; R: (NH, 4, DH, DH). Returns h (B, NH, DH) and state (h, c, n, m), all in
    the compute dtype (float32, or float64 for float64 inputs).
    """
    cd = compute_dtype(x, R)
    B, NH, _, DH = x.shape
    if state is None:
        state = _zero_state(B, NH, DH, cd, x.device)
    h, c, n, m = (t.to(cd).transpose(0, 1) for t in state)
    g = torch.baddbmm(x.to(cd).transpose(0, 1).reshape(NH, B, 4 * DH), h, _recurrent_matrix(R, cd))
    h, r, l, m = _first_step(*g.view(NH, B, 4, DH).unbind(2), c, n, m)
    n = torch.sub(l, m).exp_()
    state = tuple(t.transpose(0, 1).contiguous() for t in (h, r * n, n, m))
    return state[0], state


def _recurrent_matrix(R: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """R (NH, 4, DH, DH) as one (NH, DH, 4 DH) matrix per head: h @ it gives all four gates."""
    NH, _, DH, _ = R.shape
    return R.to(cd).permute(0, 2, 1, 3).reshape(NH, DH, 4 * DH)


def _first_step(i: torch.Tensor, f: torch.Tensor, z: torch.Tensor, o: torch.Tensor, c: torch.Tensor,
                n: torch.Tensor, m: torch.Tensor, out: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """A step from a state in the stabilized form (c, n, m), the zero state (n = 0)
    included. Gates i, f, z, o: pre-activations; all (NH, B, DH). Returns h and the
    state after in the normalized form (r, l) with the stabilizer m; `out` (h, r, l, m)
    receives them. With (c, n, m) = (r, 1, l) this is `_step`."""
    oh, or_, ol, om = out or (None,) * 4
    b = F.logsigmoid(f).add_(m)  # log f + m_prev
    l = torch.logaddexp(b + torch.log(n), i, out=ol)  # log(f n_prev e^m_prev + e^i)
    w = torch.sub(i, l).exp_()
    r = torch.sub(b, l, out=or_).exp_().mul_(c).addcmul_(w, torch.tanh(z))
    m = torch.maximum(b, i, out=om)
    return torch.mul(torch.sigmoid(o), r, out=oh), r, l, m


def _step(i: torch.Tensor, f: torch.Tensor, z: torch.Tensor, o: torch.Tensor, r: torch.Tensor,
          l: torch.Tensor, m: torch.Tensor, out: tuple) -> tuple[torch.Tensor, ...]:
    """A step in the normalized form: (h, r, l, m) from the gates' pre-activations and
    the state before (r, l, m), each (NH, B, DH), written into `out`."""
    oh, or_, ol, om = out
    lf = F.logsigmoid(f)
    m = torch.maximum(lf + m, i, out=om)  # only the returned state needs the stabilizer
    l = torch.logaddexp(lf.add_(l), i, out=ol)
    r = torch.lerp(r, torch.tanh(z), torch.sub(i, l).exp_(), out=or_)
    return torch.mul(torch.sigmoid(o), r, out=oh), r, l, m


def _steps_with_reset(reset: torch.Tensor) -> list[bool]:
    """Per step of reset (B, S): does some sequence start a document there. Tensors
    without data (the memory planner's fake tensors) answer True at every step."""
    try:
        return reset.any(0).tolist()
    except RuntimeError:  # DataDependentOutputException on fake tensors
        return [True] * reset.shape[1]


def slstm_sequence_torch(
    x: torch.Tensor,
    R: torch.Tensor,
    initial_state: SLSTMState | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SLSTMState]:
    """x: (B, NH, S, 4, DH); returns h (B, NH, S, DH) and the last state, in the
    compute dtype."""
    cd = compute_dtype(x, R)
    B, NH, S, _, DH = x.shape
    if initial_state is None:
        initial_state = _zero_state(B, NH, DH, cd, x.device)
    if S == 0:
        return x.new_zeros(B, NH, 0, DH, dtype=cd), tuple(t.to(cd) for t in initial_state)
    keep, any_reset = None, None
    if reset is not None:
        keep = (~reset).to(cd)
        any_reset = _steps_with_reset(reset)
    h, *last = _SLSTM.apply(x, R, keep, any_reset, *initial_state)
    return h, tuple(last)


class _SLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, keep, any_reset, h0, c0, n0, m0):  # noqa: D102
        cd = compute_dtype(x, R)
        B, NH, S, _, DH = x.shape
        # G: the gate pre-activations (i, f, z, o) of each step, x plus the recurrent term
        G = x.to(cd).permute(2, 1, 0, 3, 4).reshape(S, NH, B, 4 * DH).clone()
        Rm = _recurrent_matrix(R, cd)
        H, Rn, L, M = (G.new_empty(S, NH, B, DH) for _ in range(4))
        # the views the loop reads and writes, made up front: no indexing op per step
        Gs, Hs, Rs, Ls, Ms = (t.unbind(0) for t in (G, H, Rn, L, M))
        Is, Fs, Zs, Os = (G.view(S, NH, B, 4, DH)[:, :, :, j].unbind(0) for j in range(4))
        keeps, logkeeps = _keeps(keep)
        h, c, n, m = _initial(h0, c0, n0, m0, cd, keeps)
        Gs[0].baddbmm_(h, Rm)
        h, r, l, m = _first_step(Is[0], Fs[0], Zs[0], Os[0], c, n, m, (Hs[0], Rs[0], Ls[0], Ms[0]))
        for t in range(1, S):
            if keeps is not None and any_reset[t]:  # the empty memory: r = 0, l = -inf
                k = keeps[t]
                h, r, l, m = h * k, r * k, l + logkeeps[t], m * k
            Gs[t].baddbmm_(h, Rm)
            h, r, l, m = _step(Is[t], Fs[t], Zs[t], Os[t], r, l, m, (Hs[t], Rs[t], Ls[t], Ms[t]))
        ctx.save_for_backward(G, Rm, H, Rn, L, M, keep, h0, c0, n0, m0)
        ctx.any_reset = any_reset
        ctx.dtypes = (x.dtype, R.dtype)
        n = torch.sub(l, m).exp_()  # the returned state in the stabilized form (c, n, m)
        return (H.permute(2, 1, 0, 3).contiguous(),
                *(t.transpose(0, 1).contiguous() for t in (h, r * n, n, m)))

    @staticmethod
    def backward(ctx, dhs, dhl, dcl, dnl, dml):  # noqa: D102
        G, Rm, H, Rn, L, M, keep, h0, c0, n0, m0 = ctx.saved_tensors
        S, NH, B, _ = G.shape
        DH = H.shape[-1]
        cd = G.dtype
        dhs = dhs.to(cd).permute(2, 1, 0, 3).unbind(0)  # S of (NH, B, DH)
        dhl, dcl, dnl, dml = (t.to(cd).transpose(0, 1) for t in (dhl, dcl, dnl, dml))
        keeps, logkeeps = _keeps(keep)
        # the returned c = r n and n = exp(l - m) pass their gradients to r, l and m
        n_last = torch.sub(L[-1], M[-1]).exp_()
        dl = (dcl * Rn[-1] + dnl) * n_last
        # Y[t]: the step's gate gradients (di, df, dz, do), then (dh, dr, dl) carried to
        # the step before; v: those carried into the step being undone, (NH, B, 3, 1, DH)
        Y = G.new_empty(S, NH, B, 7, DH)
        Ys, Vs, DHs = Y.unbind(0), Y[:, :, :, 4:, None].unbind(0), Y[:, :, :, 4].unbind(0)
        Ds = Y[:, :, :, :4].reshape(S, NH, B, 4 * DH).unbind(0)  # views: the matmul's left side
        v = torch.stack([dhl + dhs[-1], dcl * n_last, dl], 2)[:, :, :, None]
        h, c, n, m = _initial(h0, c0, n0, m0, cd, keeps)  # the state step 0 started from
        to_gates, to_m0 = _stabilizer_gradient(dml - dl, G, M, m, keeps)
        RmT = Rm.transpose(1, 2)
        T = max(1, min(S - 1, _CHUNK_ELEMENTS // (NH * B * DH)))
        # reused buffers: no allocation in the loop (a large temporary per step would be
        # mapped and unmapped by malloc each time); coef's zero entries are never written
        coef = G.new_zeros(T, NH, B, 3, 7, DH)
        prod = G.new_empty(NH, B, 3, 7, DH)
        for t1 in range(S, 1, -T):  # steps S-1 .. 1; step 0 starts from the given state
            t0 = max(1, t1 - T)
            rp, lp = Rn[t0 - 1:t1 - 1], L[t0 - 1:t1 - 1]
            if keeps is not None:
                rp, lp = rp * keeps[t0:t1], lp + logkeeps[t0:t1]
            _step_coefficients(coef[:t1 - t0], G[t0:t1], Rn[t0:t1], L[t0:t1], rp, lp)
            coefs = coef.unbind(0)
            for t in range(t1 - 1, t0 - 1, -1):
                torch.sum(torch.mul(coefs[t - t0], v, out=prod), 2, out=Ys[t])
                if to_gates is not None:
                    Ys[t][:, :, :2].add_(to_gates[t])
                if keeps is not None and ctx.any_reset[t]:
                    dh = torch.bmm(Ds[t], RmT).mul_(keeps[t]).add_(dhs[t - 1])
                else:
                    dh = torch.baddbmm(dhs[t - 1], Ds[t], RmT)
                DHs[t].copy_(dh)
                v = Vs[t]
        dc, dn, dm = _first_step_backward(Ys[0], v[:, :, :, 0], G[0], Rn[0], L[0], c, n, m)
        if to_gates is not None:
            Ys[0][:, :, :2].add_(to_gates[0])
            dm = dm + to_m0
        dh = torch.bmm(Ds[0], RmT)
        dx = Y[:, :, :, :4].permute(2, 1, 0, 3, 4)  # (B, NH, S, 4, DH)
        # dRm = sum over steps and batch of h_prev^T d: one matmul
        hprev = torch.cat([h[None], H[:-1]])
        if keeps is not None:
            hprev = hprev * keeps
        dRm = torch.einsum("shbd,shbk->hdk", hprev, Y[:, :, :, :4].reshape(S, NH, B, 4 * DH))
        dR = dRm.view(NH, DH, 4, DH).permute(0, 2, 1, 3)
        d0 = []
        for d, s in zip((dh, dc, dn, dm), (h0, c0, n0, m0)):
            if keeps is not None:  # a reset at step 0 cuts the gradient of the initial state
                d = d * keeps[0]
            d0.append(d.transpose(0, 1).to(s.dtype))
        x_dtype, r_dtype = ctx.dtypes
        return (dx.to(x_dtype, memory_format=torch.contiguous_format), dR.to(r_dtype), None, None,
                *d0)


def _keeps(keep: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """keep (B, S) -> per step (S, 1, B, 1): 1, or 0 where a document starts; and its
    log (0, or -inf: l of the empty memory)."""
    if keep is None:
        return None, None
    keeps = keep.t()[:, None, :, None]
    return keeps, keeps.log()


def _initial(h0: torch.Tensor, c0: torch.Tensor, n0: torch.Tensor, m0: torch.Tensor, cd: torch.dtype,
             keeps: torch.Tensor | None) -> list[torch.Tensor]:
    """The given state (B, NH, DH) each as (NH, B, DH) in the compute dtype, zero in
    the sequences that start a document at step 0."""
    state = [t.to(cd).transpose(0, 1) for t in (h0, c0, n0, m0)]
    return state if keeps is None else [t * keeps[0] for t in state]


def _first_step_backward(y: torch.Tensor, v: torch.Tensor, g: torch.Tensor, r: torch.Tensor,
                         l: torch.Tensor, c: torch.Tensor, n: torch.Tensor,
                         m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The backward of `_first_step` (the stabilizer m's gradient apart): writes the
    gate gradients into y (NH, B, 7, DH) rows 0-3 from v (NH, B, 3, DH), the gradients
    of (h, r, l); returns those of the state before (c, n, m). g: the step's gate
    pre-activations (NH, B, 4 DH); r, l: after it; c, n, m: before it."""
    NH, B, _, DH = y.shape
    i, f, z, o = g.view(NH, B, 4, DH).unbind(2)
    gh, gr, gl = v.unbind(2)
    b = F.logsigmoid(f).add_(m)
    k = torch.sub(b, l).exp_()  # r = k c + w tanh z
    w = torch.sub(i, l).exp_()
    zt, og = torch.tanh(z), torch.sigmoid(o)
    dr = gr + og * gh
    dk = k * c * dr  # through k = exp(b - l)
    dw = w * zt * dr  # through w = exp(i - l)
    dl = gl - dk - dw
    # l = logaddexp(b + log n, i): its weights are 1 - w = k n and w
    db = dk + dl * k * n
    torch.add(dw, dl * w, out=y[:, :, 0])
    torch.mul(torch.sigmoid(-f), db, out=y[:, :, 1])
    torch.mul(w * dr, 1 - zt * zt, out=y[:, :, 2])
    torch.mul(og * (1 - og) * r, gh, out=y[:, :, 3])
    return k * dr, dl * k, db


def _stabilizer_gradient(dm: torch.Tensor, G: torch.Tensor, M: torch.Tensor, m0: torch.Tensor,
                         keeps: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Where the gradient dm (NH, B, DH) of the last stabilizer goes: m_t = max(log f_t +
    m_{t-1}, i~_t) passes it to the winner (log f + m on a tie), back to a step where i~
    won, a document starts, or to the initial m0 (NH, B, DH; reset applied). Returns its
    shares of (di~, df~) per step, (S, NH, B, 2, DH), and of m0; (None, None) when dm is
    zero (no loss on the last m, the usual case)."""
    try:
        if not bool(dm.any()):
            return None, None
    except RuntimeError:  # DataDependentOutputException on fake tensors: take the whole path
        pass
    S, NH, B, _ = G.shape
    DH = M.shape[-1]
    i, f = G.view(S, NH, B, 4, DH)[:, :, :, :2].unbind(3)
    mp = torch.cat([m0[None], M[:-1]])
    if keeps is not None:
        mp = mp * keeps
    won = (F.logsigmoid(f) + mp >= i).to(G.dtype)
    passes = won if keeps is None else won * keeps  # step t hands dm on to step t - 1
    reach = torch.ones_like(won)  # does dm reach step t's m
    reach[:-1] = passes[1:].flip(0).cumprod(0).flip(0)
    gm = reach * dm
    to_gates = torch.stack([gm * (1 - won), gm * won * torch.sigmoid(-f)], 3)
    return to_gates, gm[0] * won[0]


def _step_coefficients(coef: torch.Tensor, g: torch.Tensor, r: torch.Tensor, l: torch.Tensor,
                       rp: torch.Tensor, lp: torch.Tensor) -> None:
    """Writes into coef (T, NH, B, 3, 7, DH), for T steps of `_step`, the linear map from
    the gradients a step receives, v = (dh, dr, dl), to its gate gradients (di, df, dz,
    do) and the gradients it passes to the step before (_, dr, dl): coef[..., j, k, :] is
    the weight of v[j] in output k (the stabilizer's share apart). Entries that are
    always zero are left alone. g: the steps' gate pre-activations (T, NH, B, 4 * DH);
    r, l: the states after each step, rp, lp: before it (reset applied), each
    (T, NH, B, DH)."""
    T, NH, B, _ = g.shape
    DH = r.shape[-1]
    i, f, z, o = g.view(T, NH, B, 4, DH).unbind(3)
    w = torch.sub(i, l).exp_()
    lf = F.logsigmoid(f)
    wbar = (lf + lp).sub_(l).exp_()  # 1 - w, without the cancellation; 0 where a document starts
    zt, og = torch.tanh(z), torch.sigmoid(o)
    sf = torch.sigmoid(-f)  # d log sigmoid(f) / df
    # with dr = v_r + og v_h the whole gradient of r: di = e dr + w v_l, dl_prev = v_l - di,
    # df = sf dl_prev, dz = w (1 - tanh^2) dr, dr_prev = (1 - w) dr
    e = (zt - rp).mul_(w).mul_(wbar)
    gz = (1 - zt * zt).mul_(w)
    torch.mul(og * (1 - og), r, out=coef[:, :, :, 0, 3])
    for j, per_dr in ((0, og), (1, None)):  # dh reaches r through og, dr directly
        for k, val in ((0, e), (1, -sf * e), (2, gz), (5, wbar), (6, -e)):
            if per_dr is None:
                coef[:, :, :, j, k].copy_(val)
            else:
                torch.mul(val, per_dr, out=coef[:, :, :, j, k])
    coef[:, :, :, 2, 0].copy_(w)
    torch.mul(sf, wbar, out=coef[:, :, :, 2, 1])
    coef[:, :, :, 2, 6].copy_(wbar)

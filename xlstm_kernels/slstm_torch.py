"""sLSTM recurrence in plain PyTorch (scalar memory, exponential gating with
the stabilizer, per-head block-diagonal recurrent weights). Math, and the backward's
formulas: docs/design.md ("sLSTM backward").

The time loop is sequential, so on a CPU its cost is the number of ops per time step,
not their size (a step of one sequence at width 128 is 512 gate values). One autograd
node for the whole sequence keeps autograd out of the loop:
- forward: one matmul and 15 elementwise ops per step, written into preallocated
  (S, ...) buffers that the backward reads;
- backward: the exact reverse of the forward graph, as in the Triton kernel
  (`xlstm_kernels/triton_slstm.py`, the max of the stabilizer passes its gradient to the
  candidate that won). Given the forward's values, one step's backward is linear in the
  four gradients it receives (dh, dc, dn, dm): its coefficients, an (8, 4) matrix per
  element, are computed for blocks of steps at once, and the loop is left with one
  multiply, one sum and one matmul per step.
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
    state = tuple(t.transpose(0, 1).contiguous() for t in _cell(*g.view(NH, B, 4, DH).unbind(2), c, n, m))
    return state[0], state


def _recurrent_matrix(R: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """R (NH, 4, DH, DH) as one (NH, DH, 4 DH) matrix per head: h @ it gives all four gates."""
    NH, _, DH, _ = R.shape
    return R.to(cd).permute(0, 2, 1, 3).reshape(NH, DH, 4 * DH)


def _cell(i: torch.Tensor, f: torch.Tensor, z: torch.Tensor, o: torch.Tensor, c: torch.Tensor,
          n: torch.Tensor, m: torch.Tensor, out: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """One step after the gates' pre-activations: (h, c, n, m) from the gates i, f, z, o and
    the state before, each (NH, B, DH); `out` (h, c, n, m) receives them."""
    oh, oc, on, om = out or (None,) * 4
    a = F.logsigmoid(f).add_(m)  # log f + m_prev
    m = torch.maximum(a, i, out=om)
    ig = torch.sub(i, m).exp_()
    fg = a.sub_(m).exp_()
    c = torch.mul(c, fg, out=oc).addcmul_(ig, torch.tanh(z))
    n = torch.mul(n, fg, out=on).add_(ig)
    return torch.mul(torch.sigmoid(o), c, out=oh).div_(n), c, n, m


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
        H, C, N, M = (G.new_empty(S, NH, B, DH) for _ in range(4))
        # the views the loop reads and writes, made up front: no indexing op per step
        Gs, Hs, Cs, Ns, Ms = (t.unbind(0) for t in (G, H, C, N, M))
        Is, Fs, Zs, Os = (G.view(S, NH, B, 4, DH)[:, :, :, j].unbind(0) for j in range(4))
        h, c, n, m = (t.to(cd).transpose(0, 1) for t in (h0, c0, n0, m0))
        keeps = None if keep is None else keep.t()[:, None, :, None]  # (S, 1, B, 1)
        for t in range(S):
            if keeps is not None and any_reset[t]:
                k = keeps[t]
                h, c, n, m = h * k, c * k, n * k, m * k
            Gs[t].baddbmm_(h, Rm)
            h, c, n, m = _cell(Is[t], Fs[t], Zs[t], Os[t], c, n, m, (Hs[t], Cs[t], Ns[t], Ms[t]))
        ctx.save_for_backward(G, Rm, H, C, N, M, keep, h0, c0, n0, m0)
        ctx.any_reset = any_reset
        ctx.dtypes = (x.dtype, R.dtype)
        return (H.permute(2, 1, 0, 3).contiguous(),
                *(t[-1].transpose(0, 1).contiguous() for t in (H, C, N, M)))

    @staticmethod
    def backward(ctx, dhs, dhl, dcl, dnl, dml):  # noqa: D102
        G, Rm, H, C, N, M, keep, h0, c0, n0, m0 = ctx.saved_tensors
        S, NH, B, _ = G.shape
        DH = H.shape[-1]
        cd = G.dtype
        dhs = dhs.to(cd).permute(2, 1, 0, 3).unbind(0)  # S of (NH, B, DH)
        # Y[t]: the step's gate gradients (di, df, dz, do), then (dh, dc, dn, dm) carried to
        # the step before; v: those carried into the step being undone, (NH, B, 4, DH)
        Y = G.new_empty(S, NH, B, 8, DH)
        Ys, Vs, DHs = Y.unbind(0), Y[:, :, :, 4:, None].unbind(0), Y[:, :, :, 4].unbind(0)
        Ds = Y[:, :, :, :4].reshape(S, NH, B, 4 * DH).unbind(0)  # views: the matmul's left side
        v = torch.stack([t.to(cd).transpose(0, 1) for t in (dhl, dcl, dnl, dml)], 2)
        v[:, :, 0] += dhs[-1]
        v = v[:, :, :, None]  # (NH, B, 4, 1, DH): times coef's (NH, B, 4, 8, DH)
        RmT = Rm.transpose(1, 2)
        keeps = None if keep is None else keep.t()[:, None, :, None]
        init = tuple(t.to(cd).transpose(0, 1)[None] for t in (c0, n0, m0))
        T = min(S, max(1, _CHUNK_ELEMENTS // (NH * B * DH)))
        # reused buffers: no allocation in the loop (a large temporary per step would be
        # mapped and unmapped by malloc each time); coef's zero entries are never written
        coef = G.new_zeros(T, NH, B, 4, 8, DH)
        prod = G.new_empty(NH, B, 4, 8, DH)
        for t1 in range(S, 0, -T):
            t0 = max(0, t1 - T)
            # the state each step started from
            prev = [x[t0 - 1:t1 - 1] if t0 else torch.cat([s, x[:t1 - 1]])
                    for s, x in zip(init, (C, N, M))]
            if keeps is not None:
                prev = [x * keeps[t0:t1] for x in prev]
            _step_coefficients(coef[:t1 - t0], G[t0:t1], C[t0:t1], N[t0:t1], M[t0:t1], *prev,
                               None if keeps is None else keeps[t0:t1])
            coefs = coef.unbind(0)
            for t in range(t1 - 1, t0 - 1, -1):
                torch.sum(torch.mul(coefs[t - t0], v, out=prod), 2, out=Ys[t])
                if t == 0:
                    dh = torch.bmm(Ds[t], RmT)
                elif keeps is not None and ctx.any_reset[t]:
                    dh = torch.bmm(Ds[t], RmT).mul_(keeps[t]).add_(dhs[t - 1])
                else:
                    dh = torch.baddbmm(dhs[t - 1], Ds[t], RmT)
                DHs[t].copy_(dh)
                v = Vs[t]
        v = v[:, :, :, 0]
        if keeps is not None:  # a reset at step 0 cuts the gradient of the initial state
            v = v * keeps[0][..., None]
        dx = Y[:, :, :, :4].permute(2, 1, 0, 3, 4)  # (B, NH, S, 4, DH)
        # dRm = sum over steps and batch of h_prev^T d: one matmul
        hprev = torch.cat([h0.to(cd).transpose(0, 1)[None], H[:-1]])
        if keeps is not None:
            hprev = hprev * keeps
        dRm = torch.einsum("shbd,shbk->hdk", hprev, Y[:, :, :, :4].reshape(S, NH, B, 4 * DH))
        dR = dRm.view(NH, DH, 4, DH).permute(0, 2, 1, 3)
        d0 = [v[:, :, j].transpose(0, 1).to(s.dtype) for j, s in enumerate((h0, c0, n0, m0))]
        x_dtype, r_dtype = ctx.dtypes
        return (dx.to(x_dtype, memory_format=torch.contiguous_format), dR.to(r_dtype), None, None,
                *d0)


def _step_coefficients(coef: torch.Tensor, g: torch.Tensor, c: torch.Tensor, n: torch.Tensor,
                       m: torch.Tensor, cp: torch.Tensor, np_: torch.Tensor, mp: torch.Tensor,
                       keeps: torch.Tensor | None) -> None:
    """Writes into coef (T, NH, B, 4, 8, DH), for T steps, the linear map from the
    gradients a step receives, v = (dh, dc, dn, dm), to its gate gradients
    (di, df, dz, do) and the gradients it passes to the step before (_, dc, dn, dm):
    coef[..., j, r, :] is the weight of v[j] in output r. Entries that are always zero
    are left alone. g: the steps' gate pre-activations (T, NH, B, 4 * DH); c, n, m: the
    states after each step, cp, np_, mp: before it (reset applied), each (T, NH, B, DH);
    keeps: (T, 1, B, 1) or None."""
    T, NH, B, _ = g.shape
    DH = m.shape[-1]
    i, f, z, o = g.view(T, NH, B, 4, DH).unbind(3)
    a = F.logsigmoid(f).add_(mp)  # log f + m_prev
    won = (a >= i).to(g.dtype)  # m = max(log f + m_prev, i): which one passes m's gradient
    ig = torch.sub(i, m).exp_()
    fg = a.sub_(m).exp_()
    zt, og = torch.tanh(z), torch.sigmoid(o)
    # h = og c / n, so a step's dc = C + A1 dh and dn = N + A2 dh
    A1 = og / n
    A2 = (A1 * c).div_(n).neg_()
    # c = fg c_prev + ig zt and n = fg n_prev + ig: w = dig ig = Q1 dc + ig dn and
    # u = dfg fg = P1 dc + P2 dn; the m gradient left, dm = M - u - w, goes to the winner:
    # di = w + (1 - won) dm and dlogf = u + won dm (= dm_prev); on dh, C, N: dlogf = -di
    P1, P2, Q1 = cp * fg, np_ * fg, zt * ig
    u = (P1 * A1 + P2 * A2, P1, P2)
    w = (Q1 * A1 + ig * A2, Q1, ig)
    sf = torch.sigmoid(-f)  # d log sigmoid(f) / df
    for j in range(3):
        di = torch.mul(won, w[j] + u[j], out=coef[:, :, :, j, 0]).sub_(u[j])
        dlogf = torch.neg(di, out=coef[:, :, :, j, 7])
        torch.mul(dlogf, sf, out=coef[:, :, :, j, 1])
    torch.sub(1, won, out=coef[:, :, :, 3, 0])
    coef[:, :, :, 3, 7].copy_(won)
    torch.mul(won, sf, out=coef[:, :, :, 3, 1])
    gz = (1 - zt * zt).mul_(ig)  # d tanh
    torch.mul(gz, A1, out=coef[:, :, :, 0, 2])
    coef[:, :, :, 1, 2].copy_(gz)
    torch.mul(og * (1 - og), c / n, out=coef[:, :, :, 0, 3])
    fgk = fg if keeps is None else fg * keeps  # a reset at step t cuts the carries to t - 1
    torch.mul(fgk, A1, out=coef[:, :, :, 0, 5])
    coef[:, :, :, 1, 5].copy_(fgk)
    torch.mul(fgk, A2, out=coef[:, :, :, 0, 6])
    coef[:, :, :, 2, 6].copy_(fgk)
    if keeps is not None:
        coef[:, :, :, :, 7].mul_(keeps[..., None, :])

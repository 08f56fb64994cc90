"""mLSTM sequence ops in plain PyTorch: the parallel oracle, the recurrent loop,
one step, and the chunkwise form. Math and conventions: docs/design.md.

All three sequence forms use the same stabilizer convention (zero initial state
has m0 = 0, and the initial state enters the running max as F_t + m0), so they
agree to rounding on any length, chunk size and reset pattern. Inputs in
bf16/fp16/fp32 compute in float32; float64 inputs compute in float64.
Gradients come from autograd, which makes them exact (the denominator path
included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import MLSTMState, compute_dtype

NEG_INF = float("-inf")


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


class _ChunkStateScan(torch.autograd.Function):
    """States at every chunk boundary of S_{c+1} = a_c S_c + b_c (kw_c^T @ va_c), S_0 = S0.

    S0: (B, NH, DQK, E); kw: (B, NH, NC, L, DQK); va: (B, NH, NC, L, E); a, b: (B, NH, NC).
    Returns the state entering each chunk (B, NH, NC, DQK, E) and the last one
    (B, NH, DQK, E). Autograd through a Python loop would keep every
    intermediate state twice plus each chunk's kw^T @ va; this keeps only the output
    and recomputes the rest in a reverse scan (same math, exact gradients).
    Both scans write each state once into its slot (a state is DQK x E per head, 0.6 MB
    at DQK = 384): a fresh tensor per chunk and op costs a memory pass on CPU.
    """

    @staticmethod
    def forward(ctx, S0, kw, va, a, b):  # noqa: D102
        B, NH, NC, _, DQK = kw.shape
        E = va.shape[-1]
        n = B * NH
        # the states stay in the compute dtype under autocast too (the backward runs
        # without autocast and must see the same dtypes)
        with torch.autocast(kw.device.type, enabled=False):
            kwb = kw * b[..., None, None]  # b_c folded into the (small) keys
            prev = S0.new_empty(B, NH, NC, DQK, E)
            prev[:, :, 0] = S0
            last = S0.new_empty(B, NH, DQK, E)
            for c in range(NC):
                # S_{c+1} = a_c S_c + (b_c kw_c)^T va_c, written once into its slot
                dst = prev[:, :, c + 1] if c + 1 < NC else last
                torch.mul(prev[:, :, c], a[..., c, None, None], out=dst)
                dst.view(n, DQK, E).baddbmm_(kwb[:, :, c].reshape(n, -1, DQK).transpose(-1, -2),
                                             va[:, :, c].reshape(n, -1, E))
        ctx.save_for_backward(prev, kw, va, a, b)
        return prev, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gprev, glast):  # noqa: D102
        prev, kw, va, a, b = ctx.saved_tensors
        NC = kw.shape[2]
        # carried[:, :, c]: total gradient of the state after chunk c, written in place
        carried = torch.empty_like(prev)
        da = a.new_empty(a.shape)
        tmp = torch.empty_like(glast)
        for c in range(NC - 1, -1, -1):
            dst = carried[:, :, c]
            if c == NC - 1:
                dst.copy_(glast)
            else:
                torch.mul(carried[:, :, c + 1], a[..., c + 1, None, None], out=dst)
                dst.add_(gprev[:, :, c + 1])
            da[..., c] = torch.mul(dst, prev[:, :, c], out=tmp).sum((-1, -2))
        g0 = torch.addcmul(gprev[:, :, 0], carried[:, :, 0], a[..., 0, None, None])
        t = kw @ carried  # (B, NH, NC, L, E)
        db = (t * va).sum((-1, -2))
        dva = t.mul_(b[..., None, None])
        dkw = (va * b[..., None, None]) @ carried.transpose(-1, -2)
        return g0, dkw, dva, da, db


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
    stabilizer per position). Memory O(S * L + S / L * DQK * DV) per head.
    """
    cd = compute_dtype(q, k, v, i, f)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    dev = q.device
    C, n, m = _start_state(initial_state, q, v, cd)
    if S == 0:
        return v.new_zeros(B, NH, 0, DV, dtype=cd), (C, n, m)
    L = max(1, min(chunk_size, S))
    NC = -(-S // L)
    pad = NC * L - S
    q, k, v, i, f = (t.to(cd) for t in (q, k, v, i, f))
    logf = F.logsigmoid(f)
    if pad:
        # padded tail tokens are no-ops: no input (i = -inf), no decay (log f = 0)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i = F.pad(i, (0, pad), value=NEG_INF)
        logf = F.pad(logf, (0, pad), value=0.0)
        if reset is not None:
            reset = F.pad(reset, (0, pad), value=False)
    qc = q.view(B, NH, NC, L, DQK) * DQK**-0.5
    kc = k.view(B, NH, NC, L, DQK)
    vc = v.view(B, NH, NC, L, DV)
    ic = i.view(B, NH, NC, L)
    b = torch.cumsum(logf.view(B, NH, NC, L), dim=-1)  # decay from chunk start, inclusive

    tt = torch.arange(L, device=dev)
    causal = tt[:, None] >= tt[None, :]
    if reset is None:
        carry = None  # the carried state reaches every position
        base = None
        start = None
    else:
        start = _doc_start(reset.view(B, NC, L))[:, None]  # (B, 1, NC, L) local doc start or -1
        carry = start < 0
        bexcl = b - logf.view(B, NH, NC, L)
        base = torch.gather(bexcl, -1, start.clamp(min=0).expand(B, NH, NC, L))
        base = torch.where(carry, torch.zeros_like(base), base)

    # --- chunk-boundary states: each chunk's own contribution, stabilized locally
    g = b[..., -1:] - b + ic  # (B, NH, NC, L) log weight of key s at the chunk end
    if start is not None:
        g = torch.where(tt >= start[..., -1:], g, torch.full_like(g, NEG_INF))
    g_max = g.max(dim=-1).values  # (B, NH, NC)
    wg = torch.exp(g - g_max[..., None])
    kw = kc * wg[..., None]
    # the normalizer state n rides along as one more value column (n = sum of k weights
    # = k^T @ 1), so one scan and one matmul serve both C and n
    va = torch.cat([vc, vc.new_ones(B, NH, NC, L, 1)], dim=-1)  # (B, NH, NC, L, DV + 1)

    # stabilizers and the two weights of each chunk's state update: a scan over scalars
    b_ends, g_maxs = b[..., -1].unbind(-1), g_max.unbind(-1)
    if carry is not None:
        keeps = carry[..., -1].unbind(-1)  # (B, 1) each: no reset in that chunk
        base_ends = base[..., -1].unbind(-1)
    m_starts, w_olds, w_news = [], [], []
    for c in range(NC):
        m_starts.append(m)
        if carry is None:
            a_end = b_ends[c] + m
            m_new = torch.maximum(a_end, g_maxs[c])
            w_old = torch.exp(a_end - m_new)
        else:
            keep = keeps[c]
            a_end = b_ends[c] - base_ends[c] + torch.where(keep, m, torch.zeros_like(m))
            m_new = torch.maximum(a_end, g_maxs[c])
            w_old = torch.where(keep, torch.exp(a_end - m_new), torch.zeros_like(m_new))
        w_olds.append(w_old)
        w_news.append(torch.exp(g_maxs[c] - m_new))
        m = m_new
    m_prev = torch.stack(m_starts, dim=2)  # (B, NH, NC)
    Ca0 = torch.cat([C, n[..., None]], dim=-1)  # (B, NH, DQK, DV + 1)
    Ca_prev, last = _ChunkStateScan.apply(Ca0, kw, va, torch.stack(w_olds, -1),
                                          torch.stack(w_news, -1))

    # --- outputs of all chunks at once
    mask = causal if start is None else causal & (tt[None, None, None, None, :] >= start[..., None])
    # b_t - b_s + i_s on the mask, -inf off it, in two passes over the (L, L) tiles
    bi = torch.where(mask, b[..., :, None], NEG_INF)
    logD = bi - (b - ic)[..., None, :]  # (B, NH, NC, L, L)
    if carry is None:
        a = b + m_prev[..., None]
    else:
        a = b - base + torch.where(carry, m_prev[..., None], torch.zeros_like(b))
    mt = torch.maximum(a, logD.max(dim=-1).values)  # (B, NH, NC, L)
    w_inter = torch.exp(a - mt)
    if carry is not None:
        w_inter = torch.where(carry, w_inter, torch.zeros_like(w_inter))
    P = (qc @ kc.transpose(-1, -2)) * torch.exp(logD - mt[..., None])
    out = torch.baddbmm(
        (w_inter[..., None] * qc).flatten(0, 2) @ Ca_prev.flatten(0, 2),
        P.flatten(0, 2),
        va.flatten(0, 2),
    ).view(B, NH, NC, L, DV + 1)  # numerator | denominator
    h = _normalize(out[..., :DV], out[..., DV], mt, eps).reshape(B, NH, NC * L, DV)[:, :, :S]
    C, n = last[..., :DV].contiguous(), last[..., DV].contiguous()
    return h, (C, n, m)

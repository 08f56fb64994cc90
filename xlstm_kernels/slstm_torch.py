"""sLSTM recurrence in plain PyTorch (scalar memory, exponential gating with
the stabilizer, per-head block-diagonal recurrent weights). Math: docs/design.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import SLSTMState, compute_dtype


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
    h, c, n, m = (t.to(cd) for t in state)
    raw = x.to(cd) + torch.einsum("bhd,hgde->bhge", h, R.to(cd))
    ir, fr, zr, orr = raw.unbind(dim=2)
    logf = F.logsigmoid(fr)
    m_new = torch.maximum(logf + m, ir)
    ig = torch.exp(ir - m_new)
    fg = torch.exp(logf + m - m_new)
    c = fg * c + ig * torch.tanh(zr)
    n = fg * n + ig
    h = torch.sigmoid(orr) * c / n
    return h, (h, c, n, m_new)


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
    state = initial_state if initial_state is not None else _zero_state(B, NH, DH, cd, x.device)
    state = tuple(t.to(cd) for t in state)
    hs = []
    # unbind, not x[:, :, t]: each indexing op's backward zero-fills a gradient of x's full
    # size, O(S^2) work over the sequence; unbind's backward is one stack
    xs = x.unbind(2)
    keeps = (~reset).to(cd).unbind(1) if reset is not None else None
    for t in range(S):
        if keeps is not None:
            keep = keeps[t][:, None, None]
            state = tuple(s * keep for s in state)
        h, state = slstm_step_torch(xs[t], R, state)
        hs.append(h)
    h = torch.stack(hs, dim=2) if hs else x.new_zeros(B, NH, 0, DH, dtype=cd)
    return h, state

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
    return _cell(x.to(cd), _recurrent_matrix(R.to(cd)), (h, c, n, m))


def _recurrent_matrix(R: torch.Tensor) -> torch.Tensor:
    """R (NH, 4, DH, DH) as one (NH, DH, 4 DH) matrix per head: h @ it gives all four gates."""
    NH, _, DH, _ = R.shape
    return R.permute(0, 2, 1, 3).reshape(NH, DH, 4 * DH)


def _cell(x: torch.Tensor, Rm: torch.Tensor, state: SLSTMState) -> tuple[torch.Tensor, SLSTMState]:
    """One step in the compute dtype: x (B, NH, 4, DH), Rm from `_recurrent_matrix`,
    state (h, c, n, m) each (B, NH, DH). One batched matmul (no einsum parse per step)."""
    h, c, n, m = state
    B, NH, _, DH = x.shape
    rec = torch.bmm(h.transpose(0, 1), Rm).view(NH, B, 4, DH).transpose(0, 1)  # (B, NH, 4, DH)
    ir, fr, zr, orr = (x + rec).unbind(dim=2)
    logf_m = F.logsigmoid(fr) + m
    m_new = torch.maximum(logf_m, ir)
    ig = torch.exp(ir - m_new)
    fg = torch.exp(logf_m - m_new)
    c = fg * c + ig * torch.tanh(zr)
    n = fg * n + ig
    h = torch.sigmoid(orr) * c / n
    return h, (h, c, n, m_new)


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
    state = initial_state if initial_state is not None else _zero_state(B, NH, DH, cd, x.device)
    state = tuple(t.to(cd) for t in state)
    hs = []
    # unbind, not x[:, :, t]: each indexing op's backward zero-fills a gradient of x's full
    # size, O(S^2) work over the sequence; unbind's backward is one stack
    xs = x.to(cd).unbind(2)
    Rm = _recurrent_matrix(R.to(cd))  # once, not per step
    keeps, any_reset = None, None
    if reset is not None:
        keeps = (~reset).to(cd).unbind(1)
        any_reset = _steps_with_reset(reset)
    for t in range(S):
        if keeps is not None and any_reset[t]:
            keep = keeps[t][:, None, None]
            state = tuple(s * keep for s in state)
        h, state = _cell(xs[t], Rm, state)
        hs.append(h)
    h = torch.stack(hs, dim=2) if hs else x.new_zeros(B, NH, 0, DH, dtype=cd)
    return h, state

"""mLSTM and sLSTM sequence ops: one public entry per op, backends behind it.

Shapes (per the shared convention, docs/design.md):
    q, k: (B, NH, S, DQK)   v: (B, NH, S, DV)   i, f: (B, NH, S) gate pre-activations
    mLSTM state (C, n, m): (B, NH, DQK, DV), (B, NH, DQK), (B, NH), float32
    sLSTM input x: (B, NH, S, 4, DH) in gate order (i, f, z, o); R: (NH, 4, DH, DH)
    sLSTM state (h, c, n, m): each (B, NH, DH), float32

`backend`: "auto" (Triton for CUDA tensors, torch elsewhere; the environment
variable XLSTM_KERNEL_BACKEND=triton|torch overrides), "torch" or "triton".
The oracles `mlstm_parallel` and `mlstm_recurrent` are torch only.
"""

from __future__ import annotations

import os

import torch

from . import _checks
from ._checks import MLSTMState, SLSTMState
from .mlstm_torch import (
    mlstm_chunkwise_torch,
    mlstm_parallel_torch,
    mlstm_recurrent_torch,
    mlstm_step_torch,
)
from .slstm_torch import slstm_sequence_torch, slstm_step_torch

__all__ = [
    "MLSTMState",
    "SLSTMState",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
    "mlstm_step",
    "resolve_backend",
    "slstm_sequence",
    "slstm_step",
]

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Map a requested backend to the one that runs: "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {BACKENDS}")
    if backend == "auto":
        forced = os.environ.get("XLSTM_KERNEL_BACKEND", "").strip()
        if forced:
            if forced not in ("torch", "triton"):
                raise ValueError(
                    f"XLSTM_KERNEL_BACKEND: got {forced!r}, expected one of ('torch', 'triton')"
                )
            return forced
        # float64 (the oracle precision) stays on torch even on CUDA
        return "triton" if tensor.is_cuda and tensor.dtype != torch.float64 else "torch"
    return backend


def _triton():
    try:
        from . import triton_ops
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ValueError(f"backend='triton' is not available here: {err}") from err
    return triton_ops


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: got {chunk_size!r}, expected an integer >= 1")


def _out(h: torch.Tensor, dtype: torch.dtype, state, return_last_state: bool):
    h = h.to(dtype)
    return (h, state) if return_last_state else h


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    chunk_size: int = 64,
    initial_state: MLSTMState | None = None,
    return_last_state: bool = False,
    reset: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
    recompute_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, MLSTMState]:
    """Chunkwise-parallel mLSTM over a sequence.

    q, k: (B, NH, S, DQK) (q not pre-scaled: the op applies DQK**-0.5);
    v: (B, NH, S, DV); i, f: (B, NH, S) input/forget gate pre-activations;
    initial_state: (C, n, m) or None for zeros; reset: bool (B, S), True at the
    first token of a document (the state is zeroed before it).
    recompute_states: Triton backend: the backward recomputes the chunk-boundary states
    (one more sequential state pass) instead of keeping them from the forward, which
    saves B * NH * (S / chunk_size) * DQK * DV elements of activations per call. The torch
    backend keeps its states either way.
    Returns h: (B, NH, S, DV) in v's dtype, and the last state (float32) when
    `return_last_state`.
    """
    _checks.check_mlstm_sequence(q, k, v, i, f, initial_state, reset)
    _check_chunk_size(chunk_size)
    if resolve_backend(backend, q) == "triton":
        h, state = _triton().mlstm_chunkwise_triton(
            q, k, v, i, f, chunk_size=chunk_size, initial_state=initial_state, reset=reset, eps=eps,
            recompute_states=recompute_states,
        )
    else:
        h, state = mlstm_chunkwise_torch(q, k, v, i, f, chunk_size, initial_state, reset, eps)
    return _out(h, v.dtype, state, return_last_state)


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    initial_state: MLSTMState | None = None,
    return_last_state: bool = False,
    reset: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor | tuple[torch.Tensor, MLSTMState]:
    """Quadratic parallel mLSTM, the float64 oracle (materializes (S, S) per head).
    Arguments and returns as `mlstm_chunkwise`."""
    _checks.check_mlstm_sequence(q, k, v, i, f, initial_state, reset)
    h, state = mlstm_parallel_torch(q, k, v, i, f, initial_state, reset, eps)
    return _out(h, v.dtype, state, return_last_state)


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    initial_state: MLSTMState | None = None,
    return_last_state: bool = False,
    reset: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor | tuple[torch.Tensor, MLSTMState]:
    """Token-by-token mLSTM (a loop of `mlstm_step`). Arguments as `mlstm_chunkwise`."""
    _checks.check_mlstm_sequence(q, k, v, i, f, initial_state, reset)
    h, state = mlstm_recurrent_torch(q, k, v, i, f, initial_state, reset, eps)
    return _out(h, v.dtype, state, return_last_state)


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, MLSTMState]:
    """One generation step. q, k: (B, NH, DQK); v: (B, NH, DV); i, f: (B, NH);
    state (C, n, m) or None for zeros. Returns h (B, NH, DV) in v's dtype and the
    new state (float32)."""
    _checks.check_mlstm_step(q, k, v, i, f, state)
    if resolve_backend(backend, q) == "triton":
        h, state = _triton().mlstm_step_triton(q, k, v, i, f, state, eps=eps)
    else:
        h, state = mlstm_step_torch(q, k, v, i, f, state, eps)
    return h.to(v.dtype), state


def slstm_sequence(
    x: torch.Tensor,
    R: torch.Tensor,
    *,
    initial_state: SLSTMState | None = None,
    return_last_state: bool = False,
    reset: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, SLSTMState]:
    """sLSTM over a sequence.

    x: (B, NH, S, 4, DH) input-path gate pre-activations (W x + b), gates (i, f, z, o);
    R: (NH, 4, DH, DH), raw[:, h, t, g] = x[:, h, t, g] + h_prev[:, h] @ R[h, g];
    initial_state: (h, c, n, m) each (B, NH, DH), or None for zeros;
    reset: bool (B, S), zeroes the state before a document's first token.
    Returns h: (B, NH, S, DH) in x's dtype, and the last state when asked.
    """
    _checks.check_slstm(x, R, initial_state, reset, step=False)
    if resolve_backend(backend, x) == "triton":
        h, state = _triton().slstm_sequence_triton(x, R, initial_state=initial_state, reset=reset)
    else:
        h, state = slstm_sequence_torch(x, R, initial_state, reset)
    return _out(h, x.dtype, state, return_last_state)


def slstm_step(
    x: torch.Tensor, R: torch.Tensor, state: SLSTMState | None, *, backend: str = "auto"
) -> tuple[torch.Tensor, SLSTMState]:
    """One sLSTM token: x (B, NH, 4, DH), R (NH, 4, DH, DH), state or None.
    Returns h (B, NH, DH) in x's dtype and the new state (float32)."""
    _checks.check_slstm(x, R, state, None, step=True)
    if resolve_backend(backend, x) == "triton":
        h, state = _triton().slstm_sequence_triton(x[:, :, None], R, initial_state=state, reset=None)
        return h[:, :, 0].to(x.dtype), state
    h, state = slstm_step_torch(x, R, state)
    return h.to(x.dtype), state

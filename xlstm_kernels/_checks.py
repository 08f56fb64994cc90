"""Argument validation shared by every backend: one clear ValueError per mistake."""

from __future__ import annotations

import torch

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(name: str, got: torch.Tensor | tuple, expected: str) -> None:
    shape = tuple(got.shape) if isinstance(got, torch.Tensor) else got
    raise ValueError(f"{name}: got shape {shape}, expected {expected}")


def _check_tensor(name: str, t: object, ndim: int, expected: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if t.ndim != ndim:
        _fail(name, t, expected)
    if not t.is_floating_point() and name != "reset":
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {t.dtype}")
    return t


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the oracle path); every other float computes in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_mlstm_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None,
    reset: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Validate mLSTM sequence inputs; returns (B, NH, S, DQK, DV)."""
    _check_tensor("q", q, 4, "(B, NH, S, DQK)")
    B, NH, S, DQK = q.shape
    _check_tensor("k", k, 4, f"(B, NH, S, DQK) = {(B, NH, S, DQK)}")
    if tuple(k.shape) != (B, NH, S, DQK):
        _fail("k", k, f"(B, NH, S, DQK) = {(B, NH, S, DQK)} like q")
    _check_tensor("v", v, 4, f"(B, NH, S, DV) = {(B, NH, S, 'DV')}")
    if tuple(v.shape[:3]) != (B, NH, S):
        _fail("v", v, f"(B, NH, S, DV) with (B, NH, S) = {(B, NH, S)} like q")
    DV = v.shape[3]
    for name, g in (("i", i), ("f", f)):
        _check_tensor(name, g, 3, f"(B, NH, S) = {(B, NH, S)}")
        if tuple(g.shape) != (B, NH, S):
            _fail(name, g, f"(B, NH, S) = {(B, NH, S)}")
    if initial_state is not None:
        check_mlstm_state(initial_state, B, NH, DQK, DV, "initial_state")
    if reset is not None:
        check_reset(reset, B, S)
    return B, NH, S, DQK, DV


def check_mlstm_state(state: object, B: int, NH: int, DQK: int, DV: int, name: str = "state") -> None:
    if not (isinstance(state, (tuple, list)) and len(state) == 3):
        raise ValueError(f"{name}: expected a tuple (C, n, m), got {type(state).__name__}")
    C, n, m = state
    for part, t, shape in (
        ("C", C, (B, NH, DQK, DV)),
        ("n", n, (B, NH, DQK)),
        ("m", m, (B, NH)),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            dims = {"C": "(B, NH, DQK, DV)", "n": "(B, NH, DQK)", "m": "(B, NH)"}[part]
            raise ValueError(f"{name}.{part}: got shape {got}, expected {dims} = {shape}")


def check_reset(reset: object, B: int, S: int) -> None:
    if not isinstance(reset, torch.Tensor) or tuple(reset.shape) != (B, S):
        got = tuple(reset.shape) if isinstance(reset, torch.Tensor) else type(reset).__name__
        raise ValueError(f"reset: got shape {got}, expected (B, S) = {(B, S)}")
    if reset.dtype != torch.bool:
        raise ValueError(f"reset: got dtype {reset.dtype}, expected torch.bool")


def check_mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None,
) -> tuple[int, int, int, int]:
    """Validate one-token mLSTM inputs; returns (B, NH, DQK, DV)."""
    _check_tensor("q", q, 3, "(B, NH, DQK)")
    B, NH, DQK = q.shape
    if not isinstance(k, torch.Tensor) or tuple(k.shape) != (B, NH, DQK):
        _fail("k", k if isinstance(k, torch.Tensor) else (), f"(B, NH, DQK) = {(B, NH, DQK)}")
    _check_tensor("v", v, 3, f"(B, NH, DV) with (B, NH) = {(B, NH)}")
    if tuple(v.shape[:2]) != (B, NH):
        _fail("v", v, f"(B, NH, DV) with (B, NH) = {(B, NH)}")
    DV = v.shape[2]
    for name, g in (("i", i), ("f", f)):
        _check_tensor(name, g, 2, f"(B, NH) = {(B, NH)}")
        if tuple(g.shape) != (B, NH):
            _fail(name, g, f"(B, NH) = {(B, NH)}")
    if state is not None:
        check_mlstm_state(state, B, NH, DQK, DV)
    return B, NH, DQK, DV


def check_slstm(
    x: torch.Tensor, R: torch.Tensor, state: SLSTMState | None, reset: torch.Tensor | None, step: bool
) -> tuple[int, int, int, int]:
    """Validate sLSTM inputs; returns (B, NH, S, DH) (S = 1 for a step)."""
    if step:
        _check_tensor("x", x, 4, "(B, NH, 4, DH)")
        B, NH, four, DH = x.shape
        S = 1
        expected = "(B, NH, 4, DH)"
    else:
        _check_tensor("x", x, 5, "(B, NH, S, 4, DH)")
        B, NH, S, four, DH = x.shape
        expected = "(B, NH, S, 4, DH)"
    if four != 4:
        _fail("x", x, f"{expected} with 4 gates (i, f, z, o)")
    _check_tensor("R", R, 4, f"(NH, 4, DH, DH) = {(NH, 4, DH, DH)}")
    if tuple(R.shape) != (NH, 4, DH, DH):
        _fail("R", R, f"(NH, 4, DH, DH) = {(NH, 4, DH, DH)}")
    if state is not None:
        if not (isinstance(state, (tuple, list)) and len(state) == 4):
            raise ValueError(f"state: expected a tuple (h, c, n, m), got {type(state).__name__}")
        for part, t in zip("hcnm", state):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, NH, DH):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state.{part}: got shape {got}, expected (B, NH, DH) = {(B, NH, DH)}")
    if reset is not None:
        check_reset(reset, B, S)
    return B, NH, S, DH

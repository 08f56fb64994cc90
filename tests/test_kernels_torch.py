"""The torch mLSTM/sLSTM ops: agreement of the three forms, exact gradients,
state passing, resets, stability, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xlstm_kernels

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_inputs(B=2, NH=2, S=33, DQK=8, DV=12, dtype=F64, seed=0, gate_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NH, S, DQK, generator=g, dtype=F64)
    k = torch.randn(B, NH, S, DQK, generator=g, dtype=F64)
    v = torch.randn(B, NH, S, DV, generator=g, dtype=F64)
    i = torch.randn(B, NH, S, generator=g, dtype=F64) * gate_scale
    f = torch.randn(B, NH, S, generator=g, dtype=F64) * gate_scale + 2.0
    return [t.to(dtype) for t in (q, k, v, i, f)]


def make_state(B=2, NH=2, DQK=8, DV=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, NH, DQK, DV, generator=g, dtype=F64),
        torch.randn(B, NH, DQK, generator=g, dtype=F64),
        torch.randn(B, NH, generator=g, dtype=F64),
    )


def unstabilized_mlstm(q, k, v, i, f):
    """Independent oracle: the recurrence without any stabilizer, eps = 0, so
    the exp(-m) term of the normalizer becomes max(|q.n|, 1)."""
    B, NH, S, DQK = q.shape
    C = torch.zeros(B, NH, DQK, v.shape[-1], dtype=F64)
    n = torch.zeros(B, NH, DQK, dtype=F64)
    out = []
    for t in range(S):
        fg = torch.sigmoid(f[:, :, t])[..., None]
        ig = torch.exp(i[:, :, t])[..., None]
        C = fg[..., None] * C + ig[..., None] * k[:, :, t, :, None] * v[:, :, t, None, :]
        n = fg * n + ig * k[:, :, t]
        qs = q[:, :, t] * DQK**-0.5
        den = torch.maximum((qs * n).sum(-1).abs(), torch.ones(()))
        out.append(torch.einsum("bhd,bhde->bhe", qs, C) / den[..., None])
    return torch.stack(out, dim=2)


def test_stabilized_math_equals_unstabilized_recurrence():
    q, k, v, i, f = make_inputs(S=20, gate_scale=1.0)
    ref = unstabilized_mlstm(q, k, v, i, f)
    for fn in (xlstm_kernels.mlstm_parallel, xlstm_kernels.mlstm_recurrent):
        assert rel(fn(q, k, v, i, f, eps=0.0), ref) < 1e-12
    assert rel(xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=7, eps=0.0), ref) < 1e-12


@pytest.mark.parametrize("S", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("chunk", [1, 16, 48, 64])
def test_three_forms_agree_float64(S, chunk):
    q, k, v, i, f = make_inputs(S=S, seed=S)
    hp, sp = xlstm_kernels.mlstm_parallel(q, k, v, i, f, return_last_state=True)
    hr, sr = xlstm_kernels.mlstm_recurrent(q, k, v, i, f, return_last_state=True)
    hc, sc = xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=chunk, return_last_state=True)
    assert rel(hc, hp) < 1e-6 and rel(hr, hp) < 1e-6
    for a, b, c in zip(sc, sp, sr):
        assert rel(a, b) < 1e-6 and rel(c, b) < 1e-6
    assert hc.dtype == F64 and sc[0].dtype == F64


@pytest.mark.parametrize("S,chunk", [(1, 16), (37, 16), (64, 48), (100, 1)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_gradients_match_float64_oracle(S, chunk, with_state, with_reset):
    """Chunkwise gradients (q, k, v, i, f, initial state) equal the autograd of
    the parallel oracle, with a loss on h and on the last state."""
    B, NH, DQK, DV = 2, 2, 6, 5
    base = make_inputs(B, NH, S, DQK, DV, seed=S + chunk)
    state = make_state(B, NH, DQK, DV) if with_state else None
    reset = (torch.rand(B, S, generator=torch.Generator().manual_seed(3)) < 0.15) if with_reset else None
    g = torch.Generator().manual_seed(7)
    wh = torch.randn(B, NH, S, DV, generator=g, dtype=F64)
    ws = [torch.randn(t.shape, generator=g, dtype=F64) for t in make_state(B, NH, DQK, DV)]

    def grads(fn, **kw):
        xs = [t.clone().requires_grad_() for t in base]
        st = tuple(t.clone().requires_grad_() for t in state) if state is not None else None
        h, last = fn(*xs, initial_state=st, reset=reset, return_last_state=True, **kw)
        loss = (h * wh).sum() + sum((a * w).sum() for a, w in zip(last, ws))
        loss.backward()
        return [x.grad for x in xs] + ([t.grad for t in st] if st is not None else [])

    ref = grads(xlstm_kernels.mlstm_parallel)
    got = grads(xlstm_kernels.mlstm_chunkwise, chunk_size=chunk)
    rec = grads(xlstm_kernels.mlstm_recurrent)
    for name, a, b, c in zip(["q", "k", "v", "i", "f", "C0", "n0", "m0"], got, ref, rec):
        assert rel(a, b) < 1e-6, name
        assert rel(c, b) < 1e-6, name


@pytest.mark.parametrize("with_state,with_reset", [(False, False), (True, False), (False, True), (True, True)])
def test_chunkwise_gradcheck_float64(with_state, with_reset):
    """The hand-written backward of the chunkwise op passes torch's numerical gradcheck
    for h and every part of the last state, with padding (S % L != 0), a large eps (the
    stabilizer paths carry weight) and gates that move the max between its candidates."""
    B, NH, S, DQK, DV, L = 1, 2, 11, 3, 2, 4
    q, k, v, i, f = make_inputs(B, NH, S, DQK, DV, seed=4, gate_scale=2.0)
    state = [t.clone() for t in make_state(B, NH, DQK, DV, seed=5)] if with_state else []
    reset = torch.tensor([[0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool) if with_reset else None

    def op(q, k, v, i, f, *st):
        h, (C, n, m) = xlstm_kernels.mlstm_chunkwise(
            q, k, v, i, f, chunk_size=L, initial_state=tuple(st) if st else None, reset=reset,
            eps=0.3, return_last_state=True, backend="torch")
        return h, C, n, m

    inputs = [t.clone().requires_grad_() for t in (q, k, v, i, f, *state)]
    assert torch.autograd.gradcheck(op, inputs, fast_mode=True)
    # the same gradients as autograd of the parallel oracle at that eps
    g = torch.Generator().manual_seed(9)
    outs = op(*inputs)
    ws = [torch.randn(o.shape, generator=g, dtype=F64) for o in outs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, ws)), inputs)
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    h, (C, n, m) = xlstm_kernels.mlstm_parallel(*xs[:5], initial_state=tuple(xs[5:]) or None, reset=reset,
                                                eps=0.3, return_last_state=True)
    ref = torch.autograd.grad(sum((o * w).sum() for o, w in zip((h, C, n, m), ws)), xs)
    for name, a, b in zip(["q", "k", "v", "i", "f", "C0", "n0", "m0"], got, ref):
        assert rel(a, b) < 1e-10, name


def test_chunkwise_decay_gradient_paths_agree(monkeypatch):
    """Small states keep every chunk's state gradient and use them in batched products after
    the reverse scan; large ones stream them through two buffers inside the scan (decay dots,
    dv, dkw): both give the same gradients."""
    import xlstm_kernels.mlstm_torch as mt

    q, k, v, i, f = make_inputs(S=45, seed=8)
    st = make_state()
    reset = torch.zeros(2, 45, dtype=torch.bool)
    reset[1, 20] = True

    def grads():
        xs = [t.clone().requires_grad_() for t in (q, k, v, i, f, *st)]
        h, (C, n, m) = xlstm_kernels.mlstm_chunkwise(*xs[:5], chunk_size=8, initial_state=tuple(xs[5:]),
                                                     reset=reset, return_last_state=True, backend="torch")
        (h.sum() + C.sum() + n.sum() + m.sum()).backward()
        return [x.grad for x in xs]

    batched = grads()
    monkeypatch.setattr(mt, "_DOT_BATCH_BYTES", 0)
    for a, b in zip(grads(), batched):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("S", [32, 37])
def test_chunkwise_strided_inputs_equal_contiguous(S):
    """Inputs as the blocks pass them (views of (B, S, NH, D) tensors): same h and gradients."""
    g = torch.Generator().manual_seed(10)
    base = [torch.randn(2, S, 3, d, generator=g, dtype=F64) for d in (5, 5, 7)]
    base += [torch.randn(2, S, 3, generator=g, dtype=F64), torch.randn(2, S, 3, generator=g, dtype=F64) + 2]

    def run(contiguous):
        xs = [t.clone().requires_grad_() for t in base]
        ins = [x.transpose(1, 2) for x in xs]
        ins = [x.contiguous() for x in ins] if contiguous else ins
        h = xlstm_kernels.mlstm_chunkwise(*ins, chunk_size=8, backend="torch")
        h.square().sum().backward()
        return [h] + [x.grad for x in xs]

    for a, b in zip(run(False), run(True)):
        assert rel(a, b) < 1e-13


def test_chunkwise_is_one_autograd_node_and_runs_in_float32_under_autocast():
    """One graph node for the whole op; under CPU bf16 autocast it computes in float32 (the
    same h as without autocast) and its gradients match the float32 ones."""
    q, k, v, i, f = make_inputs(S=40, dtype=torch.float32, seed=6)
    xs = [t.clone().requires_grad_() for t in (q, k, v, i, f)]
    h = xlstm_kernels.mlstm_chunkwise(*xs, chunk_size=16, backend="torch")
    assert type(h.grad_fn).__name__ == "_ChunkwiseMLSTMBackward"
    h.square().sum().backward()
    ys = [t.clone().requires_grad_() for t in (q, k, v, i, f)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ha = xlstm_kernels.mlstm_chunkwise(*ys, chunk_size=16, backend="torch")
    assert ha.dtype == torch.float32 and rel(ha, h) < 1e-6
    ha.square().sum().backward()
    for a, b in zip(ys, xs):
        assert rel(a.grad, b.grad) < 1e-5


def test_gradient_through_normalizer_denominator_is_kept():
    """A backward that dropped the denominator path would differ here: loss on
    the raw h with no norm after it, gates chosen so that the max picks |q.n|."""
    q, k, v, i, f = make_inputs(S=24, gate_scale=0.5)
    xs = [t.clone().requires_grad_() for t in (q, k, v, i, f)]
    xlstm_kernels.mlstm_chunkwise(*xs, chunk_size=8).pow(2).sum().backward()
    numeric = torch.autograd.gradcheck(
        lambda q_: xlstm_kernels.mlstm_chunkwise(q_, k, v, i, f, chunk_size=8).pow(2).sum(),
        (q.clone().requires_grad_(),),
    )
    assert numeric
    assert xs[0].grad.abs().sum() > 0


@pytest.mark.parametrize("split", [1, 17, 32, 50])
def test_state_passing_equals_full_run(split):
    q, k, v, i, f = make_inputs(S=51, seed=11)
    full, full_state = xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, return_last_state=True)
    h1, s1 = xlstm_kernels.mlstm_chunkwise(
        *(t[:, :, :split] for t in (q, k, v, i, f)), chunk_size=16, return_last_state=True
    )
    h2, s2 = xlstm_kernels.mlstm_chunkwise(
        *(t[:, :, split:] for t in (q, k, v, i, f)), chunk_size=16, initial_state=s1,
        return_last_state=True,
    )
    assert rel(torch.cat([h1, h2], dim=2), full) < 1e-10
    for a, b in zip(s2, full_state):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("fn", ["chunkwise", "parallel", "recurrent"])
def test_reset_equals_documents_run_alone(fn):
    B, NH, S = 2, 2, 70
    q, k, v, i, f = make_inputs(B, NH, S, seed=5)
    starts = [[0, 9, 10, 40], [0, 33, 64, 65, 69]]  # includes 1-token documents
    reset = torch.zeros(B, S, dtype=torch.bool)
    for b, st in enumerate(starts):
        reset[b, st] = True
    op = {
        "chunkwise": lambda *a, **kw: xlstm_kernels.mlstm_chunkwise(*a, chunk_size=16, **kw),
        "parallel": xlstm_kernels.mlstm_parallel,
        "recurrent": xlstm_kernels.mlstm_recurrent,
    }[fn]
    # a non-zero initial state must be dropped by the reset at position 0
    packed = op(q, k, v, i, f, reset=reset, initial_state=make_state(B, NH, 8, 12))
    for b, st in enumerate(starts):
        bounds = st + [S]
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            alone = xlstm_kernels.mlstm_parallel(*(t[b : b + 1, :, s0:s1] for t in (q, k, v, i, f)))
            assert rel(packed[b : b + 1, :, s0:s1], alone) < 1e-10, (b, s0, s1)


def test_bf16_inputs_extreme_gates_long_sequence_are_finite():
    B, NH, S, D = 1, 2, 4096, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, NH, S, D, generator=g).bfloat16().requires_grad_() for _ in range(3))
    sign = torch.where(torch.rand(B, NH, S, generator=g) < 0.5, -1.0, 1.0)
    i = (50 * sign).bfloat16().requires_grad_()
    f = (-50 * sign.flip(-1)).bfloat16().requires_grad_()
    h, (C, n, m) = xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, return_last_state=True)
    assert h.dtype == torch.bfloat16 and C.dtype == torch.float32 and m.dtype == torch.float32
    assert torch.isfinite(h).all() and torch.isfinite(C).all()
    (h.float().sum() + C.sum() + n.sum()).backward()
    for t in (q, k, v, i, f):
        assert torch.isfinite(t.grad).all()


def test_low_precision_inputs_track_float64():
    """Low-precision inputs compute in float32: the result matches the float64
    oracle on the same (rounded) inputs to the output dtype's precision."""
    inputs = make_inputs(S=100, seed=2)
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        low = [t.to(dt) for t in inputs]
        ref = xlstm_kernels.mlstm_parallel(*(t.double() for t in low))
        h = xlstm_kernels.mlstm_chunkwise(*low, chunk_size=32)
        assert h.dtype == dt
        assert rel(h, ref) < tol, dt


def test_step_equals_sequence():
    q, k, v, i, f = make_inputs(S=9)
    seq, seq_state = xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=4, return_last_state=True)
    state = None
    for t in range(9):
        h, state = xlstm_kernels.mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state)
        assert rel(h, seq[:, :, t]) < 1e-10
    for a, b in zip(state, seq_state):
        assert rel(a, b) < 1e-10


# ---------------------------------------------------------------- sLSTM


def slstm_inputs(B=2, NH=3, S=25, DH=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, NH, S, 4, DH, generator=g, dtype=F64) * 2
    R = torch.randn(NH, 4, DH, DH, generator=g, dtype=F64) * 0.5
    return x, R


def unstabilized_slstm(x, R):
    """Independent oracle: exp gates with no stabilizer (small inputs only)."""
    B, NH, S, _, DH = x.shape
    h = c = n = torch.zeros(B, NH, DH, dtype=F64)
    out = []
    for t in range(S):
        raw = x[:, :, t] + torch.einsum("bhd,hgde->bhge", h, R)
        ir, fr, zr, orr = raw.unbind(2)
        c = torch.sigmoid(fr) * c + torch.exp(ir) * torch.tanh(zr)
        n = torch.sigmoid(fr) * n + torch.exp(ir)
        h = torch.sigmoid(orr) * c / n
        out.append(h)
    return torch.stack(out, dim=2)


def test_slstm_matches_unstabilized_recurrence():
    x, R = slstm_inputs()
    assert rel(xlstm_kernels.slstm_sequence(x, R), unstabilized_slstm(x, R)) < 1e-12


def test_slstm_state_passing_reset_and_step():
    x, R = slstm_inputs(S=30)
    full, last = xlstm_kernels.slstm_sequence(x, R, return_last_state=True)
    h1, s1 = xlstm_kernels.slstm_sequence(x[:, :, :11], R, return_last_state=True)
    h2, s2 = xlstm_kernels.slstm_sequence(x[:, :, 11:], R, initial_state=s1, return_last_state=True)
    assert rel(torch.cat([h1, h2], 2), full) < 1e-12
    state = None
    for t in range(30):
        h, state = xlstm_kernels.slstm_step(x[:, :, t], R, state)
        assert rel(h, full[:, :, t]) < 1e-12
    reset = torch.zeros(2, 30, dtype=torch.bool)
    reset[:, [0, 11]] = True
    packed = xlstm_kernels.slstm_sequence(x, R, reset=reset, initial_state=s1)
    assert rel(packed[:, :, 11:], xlstm_kernels.slstm_sequence(x[:, :, 11:], R)) < 1e-12
    assert rel(packed[:, :, :11], h1) < 1e-12


def test_slstm_gradcheck_and_extreme_gates():
    x, R = slstm_inputs(B=1, NH=2, S=6, DH=3)
    assert torch.autograd.gradcheck(
        lambda a, b: xlstm_kernels.slstm_sequence(a, b), (x.requires_grad_(), R.requires_grad_())
    )
    xb = (torch.sign(torch.randn(1, 2, 512, 4, 8)) * 50).bfloat16().requires_grad_()
    Rb = torch.randn(2, 4, 8, 8).requires_grad_()
    h = xlstm_kernels.slstm_sequence(xb, Rb)
    h.float().sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(xb.grad).all() and torch.isfinite(Rb.grad).all()


def autograd_slstm(x, R, state, reset):
    """Oracle for the hand-written backward: the stabilized recurrence step by step,
    differentiated by autograd (torch.maximum's backward, like ours, picks the winner
    away from ties)."""
    h, c, n, m = state
    out = []
    for t in range(x.shape[2]):
        keep = (~reset[:, t]).to(x.dtype)[:, None, None]
        h, c, n, m = h * keep, c * keep, n * keep, m * keep
        raw = x[:, :, t] + torch.einsum("bhd,hgde->bhge", h, R)
        ir, fr, zr, orr = raw.unbind(2)
        a = F.logsigmoid(fr) + m
        m = torch.maximum(a, ir)
        c = torch.exp(a - m) * c + torch.exp(ir - m) * torch.tanh(zr)
        n = torch.exp(a - m) * n + torch.exp(ir - m)
        h = torch.sigmoid(orr) * c / n
        out.append(h)
    return torch.stack(out, dim=2), (h, c, n, m)


@pytest.mark.parametrize("chunk_elements", [1 << 15, 60])  # one coefficient block; many
@pytest.mark.parametrize("empty_row", [False, True])
def test_slstm_backward_matches_autograd_with_resets_and_states(monkeypatch, chunk_elements, empty_row):
    from xlstm_kernels import slstm_torch

    monkeypatch.setattr(slstm_torch, "_CHUNK_ELEMENTS", chunk_elements)
    B, NH, S, DH = 3, 2, 40, 5
    x, R = slstm_inputs(B=B, NH=NH, S=S, DH=DH, seed=3)
    g = torch.Generator().manual_seed(4)
    state = [torch.randn(B, NH, DH, generator=g, dtype=F64) for _ in range(4)]
    state[2] = state[2].abs() + 0.5  # n > 0, as a real state
    if empty_row:  # n = 0 (the empty memory; the torch path's r = c / n has no value there)
        state[2][1] = 0.0
    reset = torch.zeros(B, S, dtype=torch.bool)
    reset[0, [0, 17]] = True
    reset[2, 31] = True
    weights = [torch.randn(B, NH, S, DH, generator=g, dtype=F64)] + [
        torch.randn(B, NH, DH, generator=g, dtype=F64) for _ in range(4)]

    def loss(fn, x, reset):
        xs, Rs = x.clone().requires_grad_(), R.clone().requires_grad_()
        ss = [s.clone().requires_grad_() for s in state]
        h, last = fn(xs, Rs, ss, reset)
        total = (h * weights[0][:, :, :x.shape[2]]).sum() + sum(
            (s * w).sum() for s, w in zip(last, weights[1:]))
        total.backward()
        return [h, *last], [xs.grad, Rs.grad, *(s.grad for s in ss)]

    def ours_and_reference(x, reset):
        ours = loss(lambda a, b, s, r: xlstm_kernels.slstm_sequence(
            a, b, initial_state=tuple(s), reset=r, return_last_state=True), x, reset)
        ref = loss(lambda a, b, s, r: autograd_slstm(a, b, s, r), x, reset)
        for got, want in zip(ours[0] + ours[1], ref[0] + ref[1]):
            assert rel(got, want) < 1e-12
        return ours[1]

    grads = ours_and_reference(x, reset)
    assert grads[0][0, :, 17].abs().sum() > 0  # a reset step's gates still get gradients
    # input gates far below the forget path: the last m's gradient reaches the initial m
    # (not in the empty row: from n = 0 that makes h ~ e^30 c, ill-conditioned either way)
    x_forget = x[:, :, :6].clone()
    x_forget[[0, 2], :, :, 0] -= 30
    grads = ours_and_reference(x_forget, reset[:, :6] & False)
    assert grads[-1][[0, 2]].abs().min() > 0
    rows = [0, 2]  # n > 0: finite differences would step the empty row's n below zero
    assert torch.autograd.gradcheck(
        lambda a, b, *s: xlstm_kernels.slstm_sequence(
            a, b, initial_state=s, reset=reset[rows, :7], return_last_state=True)[0],
        (x[rows, :, :7].clone().requires_grad_(), R.clone().requires_grad_(),
         *(s[rows].clone().requires_grad_() for s in state)))


# ---------------------------------------------------------------- errors


def test_bad_inputs_name_argument_and_shapes():
    q, k, v, i, f = make_inputs(B=2, NH=2, S=10, DQK=8, DV=12)
    with pytest.raises(ValueError, match=r"q: got shape \(2, 10, 8\), expected \(B, NH, S, DQK\)"):
        xlstm_kernels.mlstm_chunkwise(q[:, 0], k, v, i, f)
    with pytest.raises(ValueError, match=r"k: got shape \(2, 2, 9, 8\)"):
        xlstm_kernels.mlstm_chunkwise(q, k[:, :, :9], v, i, f)
    with pytest.raises(ValueError, match=r"v: got shape \(2, 3, 10, 12\).*\(2, 2, 10\)"):
        xlstm_kernels.mlstm_chunkwise(q, k, torch.cat([v, v[:, :1]], 1), i, f)
    with pytest.raises(ValueError, match=r"f: got shape \(2, 2, 11\), expected \(B, NH, S\) = \(2, 2, 10\)"):
        xlstm_kernels.mlstm_chunkwise(q, k, v, i, F.pad(f, (0, 1)))
    bad_state = make_state(2, 2, 8, 11)
    with pytest.raises(ValueError, match=r"initial_state.C: got shape \(2, 2, 8, 11\).*\(2, 2, 8, 12\)"):
        xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, initial_state=bad_state)
    with pytest.raises(ValueError, match=r"reset: got shape \(2, 9\), expected \(B, S\) = \(2, 10\)"):
        xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, reset=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="reset: got dtype torch.int64"):
        xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, reset=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size: got 0"):
        xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=0)
    with pytest.raises(ValueError, match="backend: got 'cuda'"):
        xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, backend="cuda")
    with pytest.raises(ValueError, match=r"state.m: got shape \(2,\)"):
        xlstm_kernels.mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0],
                           (torch.zeros(2, 2, 8, 12), torch.zeros(2, 2, 8), torch.zeros(2)))
    x, R = slstm_inputs(NH=3, DH=4)
    with pytest.raises(ValueError, match=r"R: got shape \(3, 4, 4, 5\), expected \(NH, 4, DH, DH\)"):
        xlstm_kernels.slstm_sequence(x, torch.zeros(3, 4, 4, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"x: got shape .* with 4 gates"):
        xlstm_kernels.slstm_sequence(x[:, :, :, :3], R)


def test_backend_env_override(monkeypatch):
    q = torch.zeros(1, 1, 1, 1)
    monkeypatch.setenv("XLSTM_KERNEL_BACKEND", "torch")
    assert xlstm_kernels.resolve_backend("auto", q) == "torch"
    monkeypatch.setenv("XLSTM_KERNEL_BACKEND", "triton")
    assert xlstm_kernels.resolve_backend("auto", q) == "triton"
    assert xlstm_kernels.resolve_backend("torch", q) == "torch"
    monkeypatch.setenv("XLSTM_KERNEL_BACKEND", "tpu")
    with pytest.raises(ValueError, match="XLSTM_KERNEL_BACKEND: got 'tpu'"):
        xlstm_kernels.resolve_backend("auto", q)
    monkeypatch.delenv("XLSTM_KERNEL_BACKEND")
    assert xlstm_kernels.resolve_backend("auto", q) == "torch"


@pytest.mark.parametrize("kind", ["xlstm", "large"])
def test_model_config_recompute_states_reaches_the_op(kind, monkeypatch):
    """model config key recompute_states is passed to every mlstm_chunkwise call."""
    from model import build_model
    from model.config import LargeConfig, MLSTMBlockConfig, SLSTMBlockConfig, XLSTMConfig

    seen = []
    real = xlstm_kernels.mlstm_chunkwise

    def spy(*a, **kw):
        seen.append(kw.get("recompute_states"))
        return real(*a, **kw)

    monkeypatch.setattr(xlstm_kernels, "mlstm_chunkwise", spy)
    if kind == "xlstm":
        cfg = XLSTMConfig(vocab_size=64, embedding_dim=32, num_blocks=2, slstm_at=[],
                          mlstm=MLSTMBlockConfig(num_heads=2), slstm=SLSTMBlockConfig(num_heads=2),
                          backend="torch", chunk_size=8, recompute_states=True)
    else:
        cfg = LargeConfig(vocab_size=64, embedding_dim=32, num_blocks=2, num_heads=2,
                          backend="torch", chunk_size=8, recompute_states=True)
    build_model(cfg)(torch.randint(0, 64, (1, 12)))
    assert seen == [True, True]

"""The Triton backend (run on CPU tensors by the Triton interpreter): forward and every
gradient against the float64 torch oracles, odd lengths and chunk sizes, DQK != DV, DV
split across programs, initial state in, last state out, resets, bf16/fp16, poisoned
output buffers, and clear errors for what the kernels do not take."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

import xlstm_kernels  # noqa: E402
from xlstm_kernels import triton_ops  # noqa: E402

pytestmark = pytest.mark.triton

F64 = torch.float64
F32 = torch.float32


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the kernels write starts as NaN (floats) or -2**30 (indices), so an
    element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(triton_ops, "POISON", True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (an unwritten output?)"
    if b.norm() == 0:
        return a.norm().item()
    return ((a - b).norm() / b.norm()).item()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def mlstm_inputs(B, NH, S, DQK, DV, seed=0, i_shift=0.0, i_scale=2.0):
    g = _gen(seed)
    q = torch.randn(B, NH, S, DQK, generator=g)
    k = torch.randn(B, NH, S, DQK, generator=g)
    v = torch.randn(B, NH, S, DV, generator=g)
    i = torch.randn(B, NH, S, generator=g) * i_scale + i_shift
    f = torch.randn(B, NH, S, generator=g) * 2.0 + 2.0
    return [q, k, v, i, f]


def mlstm_state(B, NH, DQK, DV, seed=1):
    g = _gen(seed)
    return [torch.randn(B, NH, DQK, DV, generator=g) * 0.5,
            torch.randn(B, NH, DQK, generator=g) * 0.5,
            torch.randn(B, NH, generator=g)]


def random_reset(B, S, seed=2, p=0.06):
    r = torch.rand(B, S, generator=_gen(seed)) < p
    if S > 5:
        r[0, S // 2] = True  # at least one document boundary
    return r


def _mlstm_loss(fn, xs, n_state, reset, weights, eps, **kw):
    st = tuple(xs[5:8]) if n_state else None
    h, (C, n, m) = fn(*xs[:5], initial_state=st, reset=reset, return_last_state=True, eps=eps,
                      **kw)
    loss = sum((o.double() * w).sum() for o, w in zip((h, C, n, m), weights))
    return loss, (h, C, n, m)


def check_chunkwise(B, NH, S, DQK, DV, L, init, reset, dtype=F32, tol=1e-4, eps=1e-6,
                    seed=0, **gates):
    """Forward (h and the last state) and the gradients of q, k, v, i, f and the initial
    state, of a loss that uses h and all of the last state, against autograd of the float64
    parallel oracle on the same (rounded) inputs."""
    ins = mlstm_inputs(B, NH, S, DQK, DV, seed=seed, **gates)
    ins = [t.to(dtype) if j < 3 else t for j, t in enumerate(ins)]
    if init:
        ins += mlstm_state(B, NH, DQK, DV)
    rst = random_reset(B, S) if reset else None
    g = _gen(seed + 7)
    weights = [torch.randn(B, NH, S, DV, generator=g, dtype=F64),
               torch.randn(B, NH, DQK, DV, generator=g, dtype=F64),
               torch.randn(B, NH, DQK, generator=g, dtype=F64),
               torch.randn(B, NH, generator=g, dtype=F64)]
    x_tr = [t.clone().requires_grad_() for t in ins]
    x_64 = [t.detach().double().requires_grad_() for t in ins]
    l_tr, out_tr = _mlstm_loss(xlstm_kernels.mlstm_chunkwise, x_tr, init, rst, weights, eps,
                               chunk_size=L, backend="triton")
    l_64, out_64 = _mlstm_loss(xlstm_kernels.mlstm_parallel, x_64, init, rst, weights, eps)
    l_tr.backward()
    l_64.backward()
    assert out_tr[0].dtype == dtype
    errs = {name: rel(a, b) for name, a, b in zip(("h", "C", "n", "m"), out_tr, out_64)}
    for name, a, b in zip(("q", "k", "v", "i", "f", "C0", "n0", "m0"), x_tr, x_64):
        assert a.grad is not None, name
        errs["d" + name] = rel(a.grad, b.grad)
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < tol}
    assert not bad, f"relative error above {tol}: {bad}"


# every length of 1, 17, 100, 130 (never a multiple of the chunk) with every chunk size of
# 16, 32, 64, 128 (128 runs as 2 x 2 tiles), the four (initial state, resets) combinations
# spread over them; and a chunk of 24 (not a power of two, a masked tile)
CASES = [
    (S, L, (j + n) % 2 == 1, (j + n // 2) % 2 == 1)
    for j, S in enumerate((1, 17, 100, 130))
    for n, L in enumerate((16, 32, 64, 128))
] + [(100, 24, True, True)]


@pytest.mark.parametrize("S,L,init,reset", CASES)
def test_chunkwise_fp32_matches_oracle(S, L, init, reset):
    check_chunkwise(2, 2, S, 16, 24, L, init, reset)


def test_chunkwise_dv_and_dqk_split_across_programs(monkeypatch):
    """Small blocks: DV in 2 programs forward (one masked) and 3 backward, DQK in 2
    state-pass blocks and 2 backward dk / dq programs (their gate rows summed), a chunk of
    48 in 2 tiles of 32 (the second masked) forward and 3 tiles of 16 backward."""
    monkeypatch.setattr(triton_ops, "BLOCK_K_BWD_MAX", 16)
    monkeypatch.setattr(triton_ops, "BLOCK_V_MAX", 32)
    monkeypatch.setattr(triton_ops, "BLOCK_V_BWD_MAX", 16)
    monkeypatch.setattr(triton_ops, "BLOCK_V_DV_MAX", 16)
    monkeypatch.setattr(triton_ops, "BLOCK_K_DV_MAX", 16)
    monkeypatch.setattr(triton_ops, "BLOCK_K_MAX", 16)
    monkeypatch.setattr(triton_ops, "BLOCK_T_MAX", 32)
    monkeypatch.setattr(triton_ops, "BLOCK_T_BWD_MAX", 16)
    check_chunkwise(1, 2, 70, 32, 48, 48, True, True)


def test_chunkwise_gate_chain_in_blocks(monkeypatch):
    """The reverse chain of the chunk-end stabilizer gradients (mlstm_bwd_gates_chain_kernel)
    in blocks of 2 chunks: 13 chunks = 7 blocks (the last one partial). Input gates near
    -60: the carried state wins every chunk-end max, so the gradient of the last m (the
    loss uses it) runs along the whole chain, from block to block, to the initial m."""
    monkeypatch.setattr(triton_ops, "GATE_CHAIN_BLOCK", 2)
    check_chunkwise(1, 2, 100, 16, 24, 8, True, False, i_shift=-60.0, i_scale=0.5)


def test_state_pass_splits_finer_when_batch_times_heads_is_small(monkeypatch):
    """Few (batch, head) rows: the state passes halve their DV / DQK blocks (not below 32)
    until the GPU has enough programs; the result is unchanged."""
    monkeypatch.setattr(triton_ops, "_state_programs_target", lambda: 264)
    blk = triton_ops.chunk_blocks(64, 128, 128)
    assert triton_ops.state_blocks(64, 128, 128, blk) == (64, 32)  # 256 -> 512 programs
    assert triton_ops.state_blocks(1, 128, 128, blk) == (32, 32)
    assert triton_ops.state_blocks(64, 256, 512, blk) == (64, 64)  # already 2048
    monkeypatch.setattr(triton_ops, "_state_programs_target", lambda: 64)
    check_chunkwise(1, 2, 70, 64, 96, 32, True, True)  # state blocks (32, 32)


def test_launch_options_deterministic_under_the_interpreter(monkeypatch):
    """The launch-option space: the default (first) entry under the interpreter even with
    XLSTM_TRITON_AUTOTUNE=1; the compile check's mode launches every entry."""
    calls = []

    class Fake:
        __name__ = "fake"

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((kw["num_warps"], kw["num_stages"]))

    monkeypatch.setenv("XLSTM_TRITON_AUTOTUNE", "1")
    x = torch.zeros(1, dtype=torch.bfloat16)
    triton_ops._launch(Fake(), (1,), "k", (x,), {}, 256)
    triton_ops._launch(Fake(), (1,), "k", (x,), {}, 64)
    wide, narrow = triton_ops.TUNE_SPACE["wide"][0], triton_ops.TUNE_SPACE["narrow"][0]
    assert calls == [(wide["num_warps"], wide["num_stages"]),
                     (narrow["num_warps"], narrow["num_stages"])]
    monkeypatch.setattr(triton_ops, "COMPILE_ALL", True)
    calls.clear()
    triton_ops._launch(Fake(), (1,), "k", (x,), {}, 256)
    assert len(calls) == len(triton_ops.TUNE_SPACE["wide"]) > 1


@pytest.mark.parametrize("DQK,DV", [(256, 20), (384, 20), (40, 136)])
def test_chunkwise_head_dims(DQK, DV):
    """DQK 256 (the large presets), 384 (the 125M NeurIPS presets: 3 dk / dq blocks of 128,
    6 state-pass and output-pass blocks of 64, not a power of two), a DQK below one block
    (masked), and a DV above one block at the default block sizes (2 programs forward, 3
    backward); with resets and an initial state."""
    check_chunkwise(1, 1, 19, DQK, DV, 16, True, True)


@pytest.mark.parametrize("i_shift,eps", [(4.0, 0.05), (-10.0, 1e-6)])
def test_chunkwise_stabilizer_paths(i_shift, eps):
    """Large input gates with a large eps make the path through every max (eps * exp(m))
    weigh in the gradient; i~ = -10 (the 7B init) makes exp(-m) win the normalizer."""
    check_chunkwise(1, 2, 70, 16, 24, 32, True, True, eps=eps, i_shift=i_shift, i_scale=3.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunkwise_half_precision(dtype):
    """bf16/fp16 operands, fp32 accumulation. Under the interpreter the kernels round the
    operands to the input dtype and then upcast them (its bf16 tl.dot is wrong), which is
    the precision of the GPU tensor-core path."""
    check_chunkwise(1, 2, 100, 32, 48, 32, True, True, dtype=dtype, tol=2e-2)


def test_chunkwise_half_precision_is_not_fp32():
    """The bf16 path really rounds its operands (the test above is not fp32 in disguise)."""
    q, k, v, i, f = mlstm_inputs(1, 1, 40, 16, 16)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    h16 = xlstm_kernels.mlstm_chunkwise(qb, kb, vb, i, f, chunk_size=16, backend="triton")
    h32 = xlstm_kernels.mlstm_chunkwise(qb.float(), kb.float(), vb.float(), i, f, chunk_size=16,
                                  backend="triton")
    assert 1e-4 < rel(h16, h32) < 2e-2


BF16_U = 2.0**-8  # bf16 spacing at 1 (8 significant bits): twice the unit roundoff


def test_chunkwise_bf16_error_is_bf16_rounding_only():
    """bf16 inputs, fp32 math, chunk states and gradients stored in bf16. Against autograd of
    the float64 oracle on the same (bf16) inputs, every output must be within one bf16 step
    (BF16_U) per rounding on its path: the stored operands of a tensor-core product (chunk
    state C or dC, the weighted A = (QK^T * D) or dA, dh / N), the bf16 output itself and
    the bf16 dh autograd hands in. One step per rounding (not half) leaves room for the
    cancellation in the sums. A state pass that carried C in bf16 across chunks (rounding
    compounding along the sequence) or any fp32 -> fp8-like loss breaks these bounds."""
    B, NH, S, DQK, DV, L = 1, 2, 130, 32, 48, 16
    ins = mlstm_inputs(B, NH, S, DQK, DV, seed=3)
    ins = [t.to(torch.bfloat16) if j < 3 else t for j, t in enumerate(ins)]
    ins += mlstm_state(B, NH, DQK, DV)
    rst = random_reset(B, S, p=0.01)
    g = _gen(8)
    w = torch.randn(B, NH, S, DV, generator=g, dtype=F64)
    wc = torch.randn(B, NH, DQK, DV, generator=g, dtype=F64)
    grads, outs = [], []
    for fn, xs, kw in (
            (xlstm_kernels.mlstm_chunkwise, [t.clone().requires_grad_() for t in ins],
             {"chunk_size": L, "backend": "triton"}),
            (xlstm_kernels.mlstm_parallel, [t.detach().double().requires_grad_() for t in ins], {})):
        h, (C, n, m) = fn(*xs[:5], initial_state=tuple(xs[5:]), reset=rst,
                          return_last_state=True, **kw)
        ((h.double() * w).sum() + (C.double() * wc).sum() + n.double().sum()
         + m.double().sum()).backward()
        outs.append((h, C, n))
        grads.append([x.grad for x in xs])
    assert outs[0][0].dtype == torch.bfloat16 and grads[0][0].dtype == torch.bfloat16
    # roundings on each path (see the docstring)
    sites = {"h": 2, "C": 1, "n": 1, "dq": 4, "dk": 4, "dv": 4, "di": 3, "df": 3,
             "dC0": 2, "dn0": 2, "dm0": 3}
    errs = {"h": rel(outs[0][0], outs[1][0]), "C": rel(outs[0][1], outs[1][1]),
            "n": rel(outs[0][2], outs[1][2])}
    for name, a, b in zip(("dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"), *grads):
        errs[name] = rel(a, b)
    bad = {k: f"{e / BF16_U:.2f} steps > {sites[k]}" for k, e in errs.items()
           if not e < sites[k] * BF16_U}
    assert not bad, bad
    # and it is bf16, not fp32 in disguise
    assert errs["h"] > BF16_U / 16


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_chunkwise_recompute_states_is_bitwise_the_saved_path(dtype):
    """recompute_states=True rebuilds the chunk states in the backward with the same state
    pass: every gradient equals the saved-states path bit for bit."""
    ins = mlstm_inputs(1, 2, 70, 16, 24, seed=6)
    ins = [t.to(dtype) if j < 3 else t for j, t in enumerate(ins)] + mlstm_state(1, 2, 16, 24)
    rst = random_reset(1, 70)
    res = []
    for rec in (False, True):
        xs = [t.clone().requires_grad_() for t in ins]
        h, (C, n, m) = xlstm_kernels.mlstm_chunkwise(
            *xs[:5], initial_state=tuple(xs[5:]), reset=rst, return_last_state=True,
            chunk_size=16, backend="triton", recompute_states=rec)
        (h.float().square().sum() + C.sum() + n.sum() + m.sum()).backward()
        res.append([h, C] + [x.grad for x in xs])
    for a, b in zip(*res):
        assert torch.equal(a, b)


def _saved(fn) -> tuple[int, dict]:
    """(total bytes, {shape: dtype}) of the tensors autograd keeps from fn()."""
    seen = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    uniq = {(t.data_ptr(), t.dtype, tuple(t.shape)): t for t in seen}
    return (sum(t.numel() * t.element_size() for t in uniq.values()),
            {tuple(t.shape): t.dtype for t in uniq.values()})


def test_chunkwise_saved_states_are_input_dtype_or_recomputed():
    """bf16 inputs: the chunk states kept for the backward are bf16 (half the bytes of
    fp32), and recompute_states=True keeps none of them."""
    B, NH, S, DQK, DV, L = 1, 2, 64, 32, 32, 16
    q, k, v, i, f = mlstm_inputs(B, NH, S, DQK, DV)
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    NC = S // L
    runs = {rec: _saved(lambda rec=rec: xlstm_kernels.mlstm_chunkwise(
        q, k, v, i, f, chunk_size=L, backend="triton", recompute_states=rec))
        for rec in (False, True)}
    state_shape = (B * NH, NC, DQK, DV)
    assert runs[False][1][state_shape] == torch.bfloat16
    assert state_shape not in runs[True][1]
    state_bytes = B * NH * NC * DQK * DV * 2
    assert runs[False][0] - runs[True][0] == state_bytes


def test_chunkwise_gradient_of_the_last_state_alone():
    """Only the last state is used (h gets no gradient): the backward starts from dC, dn, dm
    of the last state alone."""
    ins = mlstm_inputs(1, 2, 45, 16, 24, seed=4) + mlstm_state(1, 2, 16, 24)
    rst = random_reset(1, 45)
    x_tr = [t.clone().requires_grad_() for t in ins]
    x_64 = [t.detach().double().requires_grad_() for t in ins]
    for fn, xs, kw in ((xlstm_kernels.mlstm_chunkwise, x_tr, {"chunk_size": 16, "backend": "triton"}),
                       (xlstm_kernels.mlstm_parallel, x_64, {})):
        _, (C, n, m) = fn(*xs[:5], initial_state=tuple(xs[5:]), reset=rst,
                          return_last_state=True, **kw)
        (C.double().square().sum() + n.double().sum() + 3 * m.double().sum()).backward()
    assert x_64[0].grad is None and torch.equal(x_tr[0].grad, torch.zeros_like(x_tr[0]))
    for name, a, b in zip(("k", "v", "i", "f", "C0", "n0", "m0"), x_tr[1:], x_64[1:]):
        assert rel(a.grad, b.grad) < 1e-4, name


def test_chunkwise_resets_equal_documents_one_by_one():
    B, NH, DQK, DV = 1, 2, 16, 24
    lens = [13, 40, 1, 29]
    S = sum(lens)
    q, k, v, i, f = mlstm_inputs(B, NH, S, DQK, DV, seed=3)
    reset = torch.zeros(B, S, dtype=torch.bool)
    starts = [sum(lens[:j]) for j in range(len(lens))]
    reset[0, starts] = True
    xs = [t.clone().requires_grad_() for t in (q, k, v, i, f)]
    h = xlstm_kernels.mlstm_chunkwise(*xs, chunk_size=16, reset=reset, backend="triton")
    h.square().sum().backward()
    grads = [x.grad for x in xs]
    for s0, n in zip(starts, lens):
        part = [t[:, :, s0:s0 + n].clone().requires_grad_() for t in (q, k, v, i, f)]
        hd = xlstm_kernels.mlstm_chunkwise(*part, chunk_size=16, backend="triton")
        hd.square().sum().backward()
        assert rel(h[:, :, s0:s0 + n], hd) < 1e-5
        for gfull, p in zip(grads, part):
            assert rel(gfull[:, :, s0:s0 + n], p.grad) < 1e-4


def test_chunkwise_dispatch_env_and_auto(monkeypatch):
    q, k, v, i, f = mlstm_inputs(1, 1, 20, 16, 16)
    ref = xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="torch")
    calls = []
    real = triton_ops.mlstm_chunkwise_triton
    monkeypatch.setattr(triton_ops, "mlstm_chunkwise_triton",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("XLSTM_KERNEL_BACKEND", "triton")
    out = xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    assert calls and rel(out, ref) < 1e-5


def test_chunkwise_empty_sequence():
    q, k, v, i, f = mlstm_inputs(1, 2, 0, 16, 8)
    st = mlstm_state(1, 2, 16, 8)
    h, (C, n, m) = xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, initial_state=tuple(st),
                                           return_last_state=True, backend="triton")
    assert h.shape == (1, 2, 0, 8) and torch.equal(C, st[0]) and torch.equal(m, st[2])


def test_triton_errors_name_the_argument():
    q, k, v, i, f = mlstm_inputs(1, 1, 8, 16, 8)
    with pytest.raises(ValueError, match=r"^q: .*float64"):
        xlstm_kernels.mlstm_chunkwise(q.double(), k, v, i, f, backend="triton")
    with pytest.raises(ValueError, match=r"^f: .*float64"):
        xlstm_kernels.mlstm_chunkwise(q, k, v, i, f.double(), backend="triton")
    st = mlstm_state(1, 1, 16, 8)
    st[0] = st[0].double()
    with pytest.raises(ValueError, match=r"^initial_state\.C: .*float64"):
        xlstm_kernels.mlstm_chunkwise(q, k, v, i, f, initial_state=tuple(st), backend="triton")
    with pytest.raises(ValueError, match=r"one dtype"):
        xlstm_kernels.mlstm_chunkwise(q, k.half(), v, i, f, backend="triton")
    big = torch.randn(1, 1, 8, triton_ops.MAX_DQK + 16)
    with pytest.raises(ValueError, match=rf"^q: got DQK={triton_ops.MAX_DQK + 16}; .*DQK <= 1024"):
        xlstm_kernels.mlstm_chunkwise(big, big, v, i, f, backend="triton")
    with pytest.raises(ValueError, match=r"^q: got DQK=1040; .*DQK <= 1024"):
        xlstm_kernels.mlstm_step(big[:, :, 0], big[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0],
                                 None, backend="triton")
    with pytest.raises(ValueError, match=r"^q: .*float64"):
        xlstm_kernels.mlstm_step(q[:, :, 0].double(), k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0],
                           None, backend="triton")


# ----------------------------------------------------------------------------------------
# mLSTM step
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,S,DQK,block_k", [(2, 9, 16, None), (1, 3, 384, None),
                                             (1, 2, 384, 256)])
def test_step_equals_recurrent_token_by_token(B, S, DQK, block_k, monkeypatch):
    """Generation: a chain of fused steps (with resets done by zeroing the state, as the
    recurrent form does) equals xlstm_kernels.mlstm_recurrent, forward and gradients.
    DQK 384 (the 125M NeurIPS heads) streams C in 6 blocks of 64, or in 2 of 256 (the
    second half masked); DV 40 is 2 programs (one masked)."""
    if block_k is not None:
        monkeypatch.setattr(triton_ops, "STEP_BLOCK_K", block_k)
    NH, DV = 2, 40
    ins = mlstm_inputs(B, NH, S, DQK, DV, seed=5, i_scale=3.0) + mlstm_state(B, NH, DQK, DV)
    x_tr = [t.clone().requires_grad_() for t in ins]
    x_64 = [t.detach().double().requires_grad_() for t in ins]
    q, k, v, i, f, C, n, m = x_tr
    state = (C, n, m)
    hs = []
    for t in range(S):
        h, state = xlstm_kernels.mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t],
                                      f[:, :, t], state, backend="triton")
        hs.append(h)
    h_tr = torch.stack(hs, 2)
    h_64, st_64 = xlstm_kernels.mlstm_recurrent(*x_64[:5], initial_state=tuple(x_64[5:]),
                                          return_last_state=True)
    g = _gen(9)
    w = [torch.randn(B, NH, S, DV, generator=g, dtype=F64)] + [
        torch.randn(t.shape, generator=g, dtype=F64) for t in st_64]
    l_tr = (h_tr * w[0]).sum() + sum((a * b).sum() for a, b in zip(state, w[1:]))
    l_64 = (h_64 * w[0]).sum() + sum((a * b).sum() for a, b in zip(st_64, w[1:]))
    l_tr.backward()
    l_64.backward()
    assert rel(h_tr, h_64) < 1e-5
    for a, b in zip(state, st_64):
        assert rel(a, b) < 1e-5
    for name, a, b in zip(("q", "k", "v", "i", "f", "C", "n", "m"), x_tr, x_64):
        assert rel(a.grad, b.grad) < 1e-4, name


@pytest.mark.parametrize("i_shift", [4.0, -10.0])
def test_step_from_zero_state_and_bf16(i_shift):
    B, NH, DQK, DV = 2, 3, 32, 24
    q, k, v, i, f = (t[:, :, 0] for t in mlstm_inputs(B, NH, 1, DQK, DV, i_shift=i_shift))
    for dtype, tol in ((F32, 1e-5), (torch.bfloat16, 2e-2)):
        xs = [t.to(dtype) if j < 3 else t for j, t in enumerate((q, k, v, i, f))]
        xs = [t.clone().requires_grad_() for t in xs]
        x64 = [t.detach().double().requires_grad_() for t in xs]
        h, st = xlstm_kernels.mlstm_step(*xs, None, eps=0.05, backend="triton")
        h64, st64 = xlstm_kernels.mlstm_step(*x64, None, eps=0.05, backend="torch")
        assert h.dtype == dtype
        (h.double().sum() + st[2].double().sum() + st[0].double().sum()).backward()
        (h64.sum() + st64[2].sum() + st64[0].sum()).backward()
        assert rel(h, h64) < tol
        for a, b in zip(xs, x64):
            assert rel(a.grad, b.grad) < tol


# ----------------------------------------------------------------------------------------
# sLSTM sequence
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("S,DH,init,reset,dtype,tile", [
    (1, 12, False, False, F32, None),
    (17, 12, True, True, F32, None),
    (17, 12, False, True, torch.bfloat16, None),
    (9, 40, True, True, F32, 256),  # R streamed in 3 blocks of 16 (the last one masked)
])
def test_slstm_sequence_matches_torch(S, DH, init, reset, dtype, tile, monkeypatch):
    """Forward (h and the last state) and the gradients of x, R and the initial state
    against autograd of the float64 torch sLSTM."""
    if tile is not None:
        monkeypatch.setattr(triton_ops, "SLSTM_TILE", tile)
    B, NH = 2, 2
    g = _gen(11)
    x = (torch.randn(B, NH, S, 4, DH, generator=g) * 1.5).to(dtype)
    R = (torch.randn(NH, 4, DH, DH, generator=g) * 0.3).to(dtype)
    ins = [x, R]
    if init:
        st = [torch.randn(B, NH, DH, generator=g) * 0.5 for _ in range(4)]
        st[2] = st[2].abs() + 0.5  # a normalizer state is positive
        ins += st
    rst = random_reset(B, S, p=0.15) if reset else None
    w = [torch.randn(B, NH, S, DH, generator=g, dtype=F64)] + [
        torch.randn(B, NH, DH, generator=g, dtype=F64) for _ in range(4)]

    def loss(xs, **kw):
        h, state = xlstm_kernels.slstm_sequence(xs[0], xs[1], initial_state=tuple(xs[2:]) or None,
                                          reset=rst, return_last_state=True, **kw)
        return sum((a.double() * b).sum() for a, b in zip((h, *state), w)), (h, *state)

    x_tr = [t.clone().requires_grad_() for t in ins]
    x_64 = [t.detach().double().requires_grad_() for t in ins]
    l_tr, out_tr = loss(x_tr, backend="triton")
    l_64, out_64 = loss(x_64, backend="torch")
    l_tr.backward()
    l_64.backward()
    tol = 1e-4 if dtype == F32 else 2e-2
    assert out_tr[0].dtype == dtype
    for name, a, b in zip(("h", "h_last", "c", "n", "m"), out_tr, out_64):
        assert rel(a, b) < tol, name
    for name, a, b in zip(("x", "R", "h0", "c0", "n0", "m0"), x_tr, x_64):
        assert rel(a.grad, b.grad) < tol, name


def test_slstm_step_via_triton_equals_torch_step():
    B, NH, DH = 1, 2, 8
    g = _gen(12)
    x = torch.randn(B, NH, 4, DH, generator=g)
    R = torch.randn(NH, 4, DH, DH, generator=g) * 0.3
    st = tuple(torch.rand(B, NH, DH, generator=g) + 0.5 for _ in range(4))
    h, s = xlstm_kernels.slstm_step(x, R, st, backend="triton")
    h64, s64 = xlstm_kernels.slstm_step(x.double(), R.double(), tuple(t.double() for t in st),
                                  backend="torch")
    assert rel(h, h64) < 1e-5
    for a, b in zip(s, s64):
        assert rel(a, b) < 1e-5
    with pytest.raises(ValueError, match=r"^x: .*float64"):
        xlstm_kernels.slstm_sequence(x[:, :, None].double(), R, backend="triton")


# ----------------------------------------------------------------------------------------
# the GPU benchmark script, dry run (the GPU box starts bare: the script must not break)
# ----------------------------------------------------------------------------------------


def test_gpu_benchmark_cpu_dry_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "kernels_gpu.py"), "--cpu-dry-run",
         "--seqlens", "64", "--chunks", "64", "--reps", "1", "--warmup", "0",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = next(tmp_path.glob("kernels_gpu-*.md")).read_text()
    assert "| ours triton chunk=64 |" in text and "| sdpa causal |" in text
    assert "| NO |" not in text


def test_traffic_model_runs_and_counts_the_dispatchers_tiles(tmp_path):
    """benchmarks/kernels_traffic.py: runs on CPU, writes its table; its FLOP count of the
    forward output pass matches the closed form for one tile per chunk."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("kernels_traffic",
                                                  root / "benchmarks" / "kernels_traffic.py")
    kt = importlib.util.module_from_spec(spec)
    sys.modules["kernels_traffic"] = kt  # dataclasses look their module up
    spec.loader.exec_module(kt)
    out = tmp_path / "t.md"
    assert kt.main(["--seqlens", "2048", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 256 | 512 | 2048 | TFLA xl_chunk chunk=128 |" in text
    assert "| 1024 | 1024 | 2048 | ours chunk=64 |" in text  # the NeurIPS 1.3B heads
    B, NH, S, D, L = 1, 2, 256, 64, 64  # one 64-row tile per chunk: q C + causal QK^T, AV
    fwd, _bwd, _ = kt.ours(B, NH, S, D, D, L)
    out_pass = next(k for k in fwd if k.name.startswith("output pass"))
    assert out_pass.flops == B * NH * (S // L) * (2 * L * D * D + 2 * L * L * D * 2)


def _compile_check(tmp_path, *args):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "xlstm_kernels.triton_compile_check", "--quick",
         *args], capture_output=True, text=True, env=env, timeout=600, cwd=root)


def test_kernels_compile_on_the_oldest_triton_allowed(tmp_path):
    """The same compile check on the oldest Triton the project allows (pyproject: triton>=3.6;
    the GPU image has 3.6), installed beside the venv's by `make test` and named by
    XLSTM_TRITON_OLDEST: a kernel that only compiles on the newest Triton fails here."""
    import subprocess
    import sys
    from pathlib import Path

    oldest = os.environ.get("XLSTM_TRITON_OLDEST")
    if not oldest:
        pytest.skip("XLSTM_TRITON_OLDEST is not set (`make test` installs Triton 3.6 and sets it)")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([oldest, str(root)]))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "xlstm_kernels.triton_compile_check", "--quick"],
        capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton 3.6." in proc.stdout and "0 failure(s)" in proc.stdout, proc.stdout[-2000:]


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter never lowers a kernel: compile what the dispatcher launches (the
    JIT's own specialisation, bf16, the widest shape) for sm_90 ahead of time; no spills,
    shared memory within the device's limit, registers reported by ptxas."""
    out = tmp_path / "table.md"
    proc = _compile_check(tmp_path, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 failure(s)" in proc.stdout
    text = out.read_text()
    for name in ("mlstm_fwd_state_kernel", "mlstm_fwd_out_kernel", "mlstm_bwd_rows_kernel",
                 "mlstm_bwd_state_kernel", "mlstm_bwd_dk_kernel", "mlstm_bwd_dv_kernel",
                 "mlstm_bwd_dq_kernel", "slstm_fwd_kernel", "slstm_bwd_kernel"):
        assert f"| {name} | bfloat16 |" in text, name
    assert "| -1 |" not in text  # every kernel has a register count from ptxas
    # chunk 128 (two query tiles per chunk) is compiled too, and the hot tile kernels
    # launch under the register cap
    assert "@ L=128 DQK=256 DV=512" in text
    row = next(r for r in text.splitlines() if r.startswith("| mlstm_bwd_dv_kernel |"))
    assert "(cap 168)" in row, row
    # the launch's specialisation (16-byte aligned pointers, strides divisible by 16)
    # gives 16-byte loads; without the hints the compiler emits scalar ones
    row = next(r for r in text.splitlines() if r.startswith("| mlstm_fwd_out_kernel |"))
    assert int(row.split("|")[-3]) > 0, row


def test_compile_check_fails_on_shared_memory_and_spills(tmp_path):
    from xlstm_kernels import triton_compile_check as cc

    proc = _compile_check(tmp_path, "--smem-limit", "4096")
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout[-2000:]
    log = ("ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 384 bytes cmem[0]\n")
    assert cc._parse_ptxas(log) == (255, 16, 12)
    row = cc.Row("k", "bfloat16", "-", "", 8, 2, shared=1024, regs=255, spill_st=16, spill_ld=12)
    assert not cc._ok(row, 4096)
    row.spill_st = row.spill_ld = 0
    assert not cc._ok(row, 4096)  # 255 registers: over the 16-bit launches' budget
    row.dtype = "float32"  # the exact path: reported, not failed
    assert cc._ok(row, 4096)
    row.dtype, row.regs = "bfloat16", cc.REG_BUDGET
    assert cc._ok(row, 4096) and not cc._ok(row, 1000)
    row.regs = cc.REG_BUDGET + 1
    assert not cc._ok(row, 4096)
    # the hot kernels' register budget (two 8-warp blocks per SM), as the launches cap it
    from xlstm_kernels import triton_ops

    assert cc.REG_BUDGET == triton_ops.REG_BUDGET == 168


def test_interpreter_works_when_triton_was_imported_first():
    """Another module (torch._dynamo, transformers, ...) may import triton before
    TRITON_INTERPRET=1 is set; the kernels must still run under the interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import os, triton, triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, xlstm_kernels\n"
        "q = torch.randn(1, 1, 5, 16, requires_grad=True)\n"
        "i = torch.randn(1, 1, 5)\n"
        "h = xlstm_kernels.mlstm_chunkwise(q, q, q, i, i, backend='triton')\n"
        "h.sum().backward()\n"
        "x = torch.randn(1, 1, 3, 4, 8)\n"
        "xlstm_kernels.slstm_sequence(x, torch.randn(1, 4, 8, 8), backend='triton')\n"
        "print('fine', bool(torch.isfinite(q.grad).all()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=root)
    assert proc.returncode == 0 and "fine True" in proc.stdout, proc.stderr[-3000:]

"""Building blocks against plain PyTorch equivalents."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.layers import (
    CausalConv1d,
    HeadwiseLinear,
    MultiHeadNorm,
    RMSNorm,
    gate_linear,
    norm_skip_gate,
)


def conv(dim: int = 6, k: int = 4) -> CausalConv1d:
    torch.manual_seed(0)
    c = CausalConv1d(dim, k)
    c.reset_parameters()
    return c


def test_conv_matches_padded_conv1d_and_buffer_continues_it():
    c, x = conv(), torch.randn(2, 11, 6)
    want = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), c.weight[:, None], c.bias, groups=6).transpose(1, 2)
    y, _ = c(x)
    torch.testing.assert_close(y, want)
    y1, buf = c(x[:, :5])
    y2, _ = c(x[:, 5:], buf)
    torch.testing.assert_close(torch.cat([y1, y2], 1), want)
    assert buf.shape == (2, 3, 6)


def test_conv_reset_path_equals_separate_documents():
    c, x = conv(), torch.randn(2, 12, 6)
    none = torch.zeros(2, 12, dtype=torch.bool)
    torch.testing.assert_close(c(x, reset=none)[0], c(x)[0])  # the tap-sum form alone
    reset = none.clone()
    reset[0, [0, 2, 9]] = True
    reset[1, 5] = True
    y, _ = c(x, reset=reset)
    for b, starts in ((0, [0, 2, 9, 12]), (1, [0, 5, 12])):
        for lo, hi in zip(starts[:-1], starts[1:]):
            torch.testing.assert_close(y[b, lo:hi], c(x[b : b + 1, lo:hi])[0][0])
    # a reset at token 0 also cuts the carried buffer
    _, buf = c(torch.randn(2, 4, 6))
    first = none.clone()
    first[:, 0] = True
    torch.testing.assert_close(c(x, buf, reset=first)[0], c(x)[0])


def test_headwise_linear_is_block_diagonal():
    torch.manual_seed(0)
    lin = HeadwiseLinear(12, 3, bias=True)
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(2, 5, 12)
    dense = torch.block_diag(*lin.weight)  # (out, in)
    torch.testing.assert_close(lin(x), x @ dense.T + lin.bias)


def test_multihead_norm_is_group_norm_and_rmsnorm():
    torch.manual_seed(0)
    norm = MultiHeadNorm(4, 8, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 4, 8)
    want = F.group_norm(x.reshape(21, 32), 4, norm.weight, eps=1e-5).reshape(3, 7, 32)
    torch.testing.assert_close(norm(x), want)
    rms = RMSNorm(8, eps=1e-6)
    y = torch.randn(5, 8)
    torch.testing.assert_close(rms(y), y / y.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    assert rms(y.bfloat16()).dtype == torch.bfloat16


def test_conv_gradients_match_autograd_of_the_padded_conv1d():
    """The conv's hand-written backward (input, buffer, weight, bias) against autograd of
    F.conv1d on the buffer-padded input, in float64; with resets against each document
    run alone is covered above, here its gradients against gradcheck."""
    torch.manual_seed(0)
    c = CausalConv1d(5, 4).double()
    c.reset_parameters()
    for S in (2, 9):  # shorter than the buffer too
        x = torch.randn(2, S, 5, dtype=torch.float64, requires_grad=True)
        buf = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, S, 5, dtype=torch.float64)
        got = torch.autograd.grad((c(x, buf)[0] * g).sum(), (x, buf, c.weight, c.bias))
        xs = torch.cat([buf, x], 1).transpose(1, 2)
        ref = F.conv1d(xs, c.weight[:, None], c.bias, groups=5).transpose(1, 2)
        want = torch.autograd.grad((ref * g).sum(), (x, buf, c.weight, c.bias))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, [0, 3]] = True
    reset[1, 7] = True
    x = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    buf = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, w, bias: c(x, b, reset)[0], (x, buf, c.weight, c.bias))


def test_conv_reset_masks_equal_crossing_indices():
    """The GPU form of the document resets (keep masks: no host wait for indices) gives
    the CPU form's outputs and gradients (crossing indices), in float64, with a reset
    inside the buffer's reach and one later."""
    from model.layers import _CausalDepthwiseConv

    torch.manual_seed(0)
    K, S = 4, 10
    reset = torch.zeros(2, S, dtype=torch.bool)
    reset[0, [1, 6]] = True
    reset[1, 9] = True
    pos = torch.arange(S)
    dist = pos - torch.where(reset, pos, torch.full_like(pos, -K)).cummax(dim=1).values
    cross = tuple(torch.nonzero(dist < j, as_tuple=True) for j in range(1, K))
    keeps = torch.stack([(dist >= j) for j in range(1, K)]).double()[..., None]
    args = [torch.randn(2, S, 5), torch.randn(2, K - 1, 5), torch.randn(5, K), torch.randn(5)]
    args = [a.double().requires_grad_() for a in args]
    g = torch.randn(2, S, 5, dtype=torch.float64)
    outs = []
    for form in (cross, keeps):
        y = _CausalDepthwiseConv.apply(*args, form)
        outs.append((y, *torch.autograd.grad((y * g).sum(), args)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    assert not torch.equal(outs[0][0], _CausalDepthwiseConv.apply(*args, None))  # resets matter here


def test_headwise_linear_small_blocks_gradients_match_dense():
    """Blocks of 4 (the mLSTM's q/k/v) take the grouped path: its hand-written
    backward against autograd of the dense block-diagonal matrix, in float64."""
    torch.manual_seed(0)
    lin = HeadwiseLinear(12, 3).double()
    torch.nn.init.normal_(lin.weight)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 12, dtype=torch.float64)
    got = torch.autograd.grad((lin(x) * g).sum(), (x, lin.weight))
    w = lin.weight.detach().requires_grad_()
    want = torch.autograd.grad(((x @ torch.block_diag(*w).T) * g).sum(), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gate_linear_equals_linear_of_the_concatenation():
    """The mLSTM's i/f gates without the q|k|v concatenation: values and every gradient
    against autograd of `F.linear(cat)` in float64; under CPU autocast a bf16 output like
    F.linear's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(4, 18, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 4, dtype=torch.float64)
    got = gate_linear(q, k, v, w, b)
    want = F.linear(torch.cat([q, k, v], -1), w, b)
    torch.testing.assert_close(got, want)
    for a, c in zip(torch.autograd.grad((got * g).sum(), (q, k, v, w, b)),
                    torch.autograd.grad((want * g).sum(), (q, k, v, w, b))):
        torch.testing.assert_close(a, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gate_linear(q.float(), k.float(), v.float(), w.float(), b.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want.detach(), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("bias", [False, True])
def test_norm_skip_gate_equals_its_autograd_composition(bias: bool):
    """The mLSTM block's output node `(norm(h) + skip * c) * silu(z)`: values and every
    gradient (inputs, norm weight and bias, skip) against autograd of the same chain, in
    float64 on a non-contiguous h (the cell's heads-first output, transposed)."""
    torch.manual_seed(0)
    norm = MultiHeadNorm(3, 4, eps=1e-5, bias=bias).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn_like(p))
    skip = torch.randn(12, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)  # (B, NH, S, DH)
    c, z = (torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    g = torch.randn(2, 5, 12, dtype=torch.float64)
    wrt = (h, c, z, skip, *norm.parameters())
    got = norm_skip_gate(h.transpose(1, 2), c, z, norm, skip)
    # MultiHeadNorm reduces in float32 even for float64 inputs: its float64 equivalent
    normed = F.layer_norm(h.transpose(1, 2), (4,), eps=1e-5).flatten(-2) * norm.weight
    want = (normed + (norm.bias if bias else 0) + skip * c) * F.silu(z)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad((got * g).sum(), wrt), torch.autograd.grad((want * g).sum(), wrt)):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm_skip_gate(h.float().transpose(1, 2), c.float(), z.bfloat16(), norm.float(), skip.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want.detach(), rtol=0.02, atol=0.05)

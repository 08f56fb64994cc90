"""The LM head fused with the loss (model/head.py) equals cross-entropy over full logits:
value and gradients, with ignored positions, soft caps, chunks that do not divide the
tokens, tied weights, bf16; and through both models' `labels=` path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import build_model, load_model_config
from model.head import fused_head_loss
from model.layers import soft_cap


def reference(hidden, weight, labels, cap):
    logits = soft_cap(hidden @ weight.t(), cap)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def inputs(dtype=torch.float64, B=3, S=37, d=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g, dtype=dtype) * 2).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < 0.2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 16, 1000])
def test_value_and_gradients_equal_full_logits(cap, chunk):
    h, w, y = inputs()
    got = fused_head_loss(h, w, y, soft_cap=cap, chunk_tokens=chunk)
    dh, dw = torch.autograd.grad(got * 1.7, (h, w))
    ref = reference(h, w, y, cap)
    rh, rw = torch.autograd.grad(ref * 1.7, (h, w))
    assert got.dtype == torch.float64  # float32 for float32 / bf16 inputs (below)
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, rw, rtol=1e-10, atol=1e-12)


def test_bf16_within_rounding_of_fp32():
    h, w, y = inputs(torch.float32)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    got = fused_head_loss(hb, wb, y, chunk_tokens=8)
    got.backward()
    ref = reference(hb.detach().float().requires_grad_(), wb.detach().float(), y, None)
    assert got.dtype == torch.float32
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert abs(got.item() - ref.item()) < 1e-2 * ref.item()


def test_all_ignored_is_zero_and_no_nan():
    h, w, y = inputs()
    y[:] = -100
    loss = fused_head_loss(h, w, y)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(h.grad).all() and (h.grad == 0).all()


def test_no_grad_path_and_shape_check():
    h, w, y = inputs()
    with torch.no_grad():
        loss = fused_head_loss(h, w, y)
    torch.testing.assert_close(loss.double(), reference(h, w, y, None).detach().double(),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"labels: got shape \(3, 36\), expected \(3, 37\)"):
        fused_head_loss(h, w, y[:, 1:])


@pytest.mark.parametrize("arch", ["xlstm", "large"])
def test_model_labels_path_equals_loss_of_logits(arch):
    spec = {"arch": arch, "vocab_size": 64, "embedding_dim": 32, "num_blocks": 2,
            "context_length": 16, "backend": "torch", "chunk_size": 8}
    if arch == "xlstm":
        spec.update(slstm_at=[1], tie_weights=True, mlstm={"num_heads": 2}, slstm={"num_heads": 2})
    else:
        spec.update(num_heads=2)
    torch.manual_seed(0)
    net = build_model(load_model_config(spec)).double()
    idx = torch.randint(0, 64, (2, 16))
    labels = torch.roll(idx, -1, 1)
    labels[:, -1] = -100
    ref = F.cross_entropy(net(idx).flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    got = net(idx, labels=labels)
    grads = torch.autograd.grad(got, list(net.parameters()))
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)

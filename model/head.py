"""The LM head, and the language-model loss fused with it: no (B, S, V) logits in memory.

At vocabulary 50k and context 2048, one sequence's float32 logits are 0.4 GB, and the
unfused loss keeps them (and their softmax) from the forward to the backward. Here the
head runs over chunks of tokens; each chunk's logits live only inside the forward, which
also computes the gradients while it has them: for cross-entropy, d loss / d logits =
(softmax - one_hot(target)) / n. So the backward is two saved products scaled by the
incoming gradient, and the FLOPs are those of the unfused head (forward, d hidden,
d weight), with no recompute.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import soft_cap

IGNORE = -100


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                cap: float | None, chunk: int) -> torch.Tensor:
        n = (labels != IGNORE).sum().clamp_min(1)  # a tensor: int() would make the host wait for the device
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax and sums: >= fp32
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        dev = hidden.device.type
        # the gradient matmuls' dtype: under autocast cast d logits once, not once per matmul
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        for a in range(0, hidden.shape[0], chunk):
            h, y = hidden[a:a + chunk], labels[a:a + chunk]
            z = (h @ weight.t()).to(acc)  # (T, V)
            if cap is not None:
                t = torch.tanh(z / cap)
                z = cap * t
            valid = y != IGNORE
            target = y.clamp_min(0)[:, None]
            lse = torch.logsumexp(z, dim=-1)
            total += ((lse - z.gather(1, target)[:, 0]) * valid).sum(dtype=torch.float64)
            if not (want_h or want_w):
                continue
            # d loss / d logits = (softmax - one_hot) * valid / n, written over z: exp(z - lse)
            g = z.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, target, -torch.ones_like(target, dtype=g.dtype))
            g.mul_((valid.to(g.dtype) / n)[:, None])
            if cap is not None:
                g *= 1 - t * t  # through cap * tanh(z / cap)
            g = g.to(mm_dtype)
            if want_h:
                grad_h[a:a + chunk] = g @ weight
            if want_w:
                grad_w += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.weight_dtype = weight.dtype
        return (total / n).to(acc)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    soft_cap: float | None = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy of the LM head `weight` (V, d) on `hidden` (B, S, d)
    against `labels` (B, S) (IGNORE = -100 positions excluded), with the logits optionally
    soft-capped: `soft_cap * tanh(logits / soft_cap)`. Equals
    `cross_entropy(soft_cap(hidden @ weight.T), labels, ignore_index=-100)` and its
    gradients; a float32 scalar (float64 for float64 inputs); `chunk_tokens` rows of logits exist at a time (1024 rows
    at vocabulary 50k: 0.2 GB of float32)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels: got shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:-1])}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: got {chunk_tokens}, expected >= 1")
    return _FusedHeadLoss.apply(hidden.flatten(0, -2), weight, labels.flatten(), soft_cap,
                                chunk_tokens)


class LMHead(nn.Linear):
    """The output projection (d -> V, no bias). Called with `labels`, it returns the mean
    cross-entropy from `fused_head_loss` instead of the logits; a module of its own, so that
    sharding wrappers that gather parameters around a module's forward (ZeRO-3) see it."""

    def __init__(self, dim: int, vocab_size: int, soft_cap: float | None = None) -> None:
        super().__init__(dim, vocab_size, bias=False)
        self.soft_cap = soft_cap

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, d) -> logits (B, S, V) (soft-capped if set), or with `labels` (B, S)
        the mean cross-entropy (float32 scalar)."""
        if labels is not None:
            return fused_head_loss(x, self.weight, labels, soft_cap=self.soft_cap)
        return soft_cap(super().forward(x), self.soft_cap)

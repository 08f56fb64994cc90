"""Small building blocks shared by both architectures.

Shapes: B batch, S sequence, D features, NH heads, DH head dim, K conv width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- init


def small_init_(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Normal(0, sqrt(2 / (5 dim))), "Transformers without Tears" (Nguyen & Salazar 2019)."""
    return nn.init.normal_(weight, mean=0.0, std=math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(weight: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    """Normal(0, 2 / (num_blocks sqrt(dim))), for projections that write into the residual."""
    return nn.init.normal_(weight, mean=0.0, std=2.0 / (num_blocks * math.sqrt(dim)))


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap); identity when cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


# ----------------------------------------------------------------------------- norms


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with a weight and an optional bias, reduced in float32."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D), x's dtype
        return self._affine(F.layer_norm(x.float(), x.shape[-1:], eps=self.eps), x.dtype)

    def _affine(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class RMSNorm(LayerNorm):
    """x / sqrt(mean(x^2) + eps) * weight, reduced in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D), x's dtype
        xf = x.float()
        return self._affine(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps), x.dtype)


class MultiHeadNorm(nn.Module):
    """Per-head LayerNorm (the paper's group norm): each head normalized alone,
    then one weight over all NH * DH features. (B, S, NH, DH) -> (B, S, NH * DH)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if bias else None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.weight.shape[0] // self.num_heads}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).flatten(-2) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _NormSkipGate(torch.autograd.Function):
    """out = (LN_heads(h) * w [+ b] + skip * c) * silu(z), computed in `cd` and written in
    `out_dtype`; a hand-written backward over the saved normalized heads (one pass per
    product instead of autograd's chain of separate multiplies, adds and casts).
    h: (B, S, NH, DH); c, z: (B, S, NH * DH); w, b, skip: (NH * DH,)."""

    @staticmethod
    def forward(ctx, h, c, z, w, b, skip, eps, cd, out_dtype):  # noqa: D102
        hn, mean, rstd = torch.native_layer_norm(h.to(cd), h.shape[-1:], None, None, eps)
        y = hn.flatten(-2) * w.to(cd)
        if b is not None:
            y += b.to(cd)
        y.addcmul_(c, skip.to(cd))
        out = torch.empty(y.shape, dtype=out_dtype, device=y.device)
        torch.mul(y, F.silu(z.to(cd)), out=out)
        ctx.save_for_backward(hn, rstd, y, c, z, w, skip)
        ctx.has_bias, ctx.cd, ctx.h_dtype = b is not None, cd, h.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        hn, rstd, y, c, z, w, skip = ctx.saved_tensors
        cd, dims = ctx.cd, tuple(range(g.dim() - 1))
        zf = z.to(cd)
        gy = g * F.silu(zf)  # (B, S, e) in cd
        gz = torch.ops.aten.silu_backward(g * y, zf).to(z.dtype)
        gskip = (gy * c).sum(dims).to(skip.dtype)
        gc = (gy * skip.to(cd)).to(c.dtype)
        gw = (gy * hn.flatten(-2)).sum(dims).to(w.dtype)
        gb = gy.sum(dims).to(w.dtype) if ctx.has_bias else None
        # LayerNorm backward from the normalized values: rstd (g - mean(g) - hn mean(g hn))
        ghn = (gy * w.to(cd)).view(hn.shape)
        gh = ghn - ghn.mean(-1, keepdim=True) - hn * (ghn * hn).mean(-1, keepdim=True)
        gh = (gh * rstd).to(ctx.h_dtype)
        return gh, gc, gz, gw, gb, gskip, None, None, None


def norm_skip_gate(h: torch.Tensor, c: torch.Tensor, z: torch.Tensor, norm: MultiHeadNorm,
                   skip: torch.Tensor) -> torch.Tensor:
    """The mLSTM block's output: `(norm(h) + skip * c) * silu(z)` in one autograd node.
    h: (B, S, NH, DH) cell output; c (conv output), z (output-gate pre-activation):
    (B, S, NH * DH); skip: (NH * DH,). Computed in float32 (float64 if any input is);
    returned in the autocast dtype when autocast is on (the next op is a linear that would
    cast it), else in the inputs' promoted dtype."""
    dev = h.device.type
    cd = torch.float64 if torch.float64 in (h.dtype, c.dtype, z.dtype, skip.dtype) else torch.float32
    out_dtype = h.dtype
    for t in (c, z, skip, norm.weight):
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    if torch.is_autocast_enabled(dev):
        out_dtype = torch.get_autocast_dtype(dev)
    with torch.autocast(dev, enabled=False):
        return _NormSkipGate.apply(h, c, z, norm.weight, norm.bias, skip, norm.eps, cd, out_dtype)


# ----------------------------------------------------------------------------- projections


class _GroupedBlockLinear(torch.autograd.Function):
    """y[..., h, o] = sum_i x[..., h, i] W[h, o, i] for small blocks (the mLSTM's 4 x 4 q/k/v
    blocks) on CPU: `per` neighbouring blocks form one dense (per DH)^2 block-diagonal
    matrix (width 32), and the map is one batched matmul over those groups (the zeros cost `per` x the
    FLOPs, but a batched matmul over 384 separate 4 x 4 blocks runs at well under
    1 GFLOP/s, plus two transposing copies per call). The weight gradient is the diagonal
    blocks of each group's dense gradient. x2: (N, NH * DH); weight: (NH, DH, DH).
    Under CPU autocast the matmuls run in bf16 as the einsum did."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x2, weight, per):  # noqa: D102
        NH, DH, _ = weight.shape
        G, N, width = NH // per, x2.shape[0], per * DH
        eye = torch.eye(per, dtype=weight.dtype, device=weight.device)
        # dense[g, p DH + o, q DH + i] = W[g per + p, o, i] if p == q else 0
        dense = torch.einsum("gpoi,pq->gpoqi", weight.view(G, per, DH, DH), eye).reshape(G, width, width)
        xg = x2.view(N, G, width).transpose(0, 1)  # (G, N, width)
        y = torch.bmm(xg, dense.transpose(1, 2))
        ctx.save_for_backward(x2, dense)
        ctx.per = per
        return y.transpose(0, 1).reshape(N, NH * DH)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, g2):  # noqa: D102
        x2, dense = ctx.saved_tensors
        G, width, _ = dense.shape
        per, N = ctx.per, x2.shape[0]
        DH = width // per
        gg = g2.reshape(N, G, width).transpose(0, 1)  # (G, N, width)
        gx = torch.bmm(gg, dense.to(gg.dtype)).transpose(0, 1).reshape(N, G * width)
        gdense = torch.bmm(gg.transpose(1, 2), x2.view(N, G, width).transpose(0, 1).to(gg.dtype))
        gw = gdense.view(G, per, DH, per, DH).diagonal(dim1=1, dim2=3)  # (G, DH, DH, per)
        return gx, gw.permute(0, 3, 1, 2).reshape(G * per, DH, DH).to(dense.dtype), None


class _GateLinear(torch.autograd.Function):
    """y = [q | k | v] W^T + b without the (N, 3 e) concatenation: three skinny matmuls
    accumulated into one (N, O) output, and a backward that reads each input once.
    q2, k2, v2: (N, e); weight: (O, 3 e); bias: (O,); one dtype."""

    @staticmethod
    def forward(ctx, q2, k2, v2, weight, bias):  # noqa: D102
        e = q2.shape[1]
        y = torch.addmm(bias, q2, weight[:, :e].t())
        y.addmm_(k2, weight[:, e:2 * e].t()).addmm_(v2, weight[:, 2 * e:].t())
        ctx.save_for_backward(q2, k2, v2, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        q2, k2, v2, weight = ctx.saved_tensors
        e = q2.shape[1]
        gw = torch.cat([g.t() @ t for t in (q2, k2, v2)], dim=1)
        gq, gk, gv = (g @ weight[:, j * e:(j + 1) * e] for j in range(3))
        return gq, gk, gv, gw, g.sum(0)


def gate_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
    """`F.linear(torch.cat([q, k, v], -1), weight, bias)` without the concatenation (the
    mLSTM's gate pre-activations read all of q, k, v: a 3 e wide copy and its backward split
    cost more than the skinny matmuls). q, k, v: (..., e); weight: (O, 3 e); bias: (O,)
    -> (..., O), in the autocast dtype when autocast is on (as `F.linear`), else the
    promoted dtype."""
    dev = q.device.type
    dt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
          else torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.promote_types(v.dtype, weight.dtype)))
    lead, e = q.shape[:-1], q.shape[-1]
    with torch.autocast(dev, enabled=False):
        y = _GateLinear.apply(*(t.reshape(-1, e).to(dt) for t in (q, k, v)), weight.to(dt), bias.to(dt))
    return y.view(*lead, -1)


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: the D features split into NH blocks, each
    block mapped by its own (DH x DH) matrix. weight: (NH, DH_out, DH_in)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        hd = dim // num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, hd, hd))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def extra_repr(self) -> str:
        nh, hd, _ = self.weight.shape
        return f"{nh * hd}, blocks={nh} of {hd}x{hd}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        xh = x.unflatten(-1, (self.num_heads, -1))
        nh, hd, _ = self.weight.shape
        if hd <= 16 and x.device.type == "cpu":
            per = max(p for p in range(1, nh + 1) if nh % p == 0 and p * hd <= 32)  # group width <= 32 (the fastest on CPU)
            y = _GroupedBlockLinear.apply(x.reshape(-1, nh * hd), self.weight, per).view(x.shape)
        else:
            y = torch.einsum("...hi,hoi->...ho", xh, self.weight).flatten(-2)
        return y if self.bias is None else y + self.bias


def _taps(x: torch.Tensor, state: torch.Tensor, cross: tuple, j: int) -> torch.Tensor:
    """The inputs that lookback j reads at the positions `cross[j - 1]` (their x[t - j],
    from the buffer where t < j): (M, D)."""
    b, t = cross[j - 1]
    src = t - j
    K1 = state.shape[1]
    out = x[b, src.clamp_min(0)]
    before = src < 0
    if bool(before.any()):
        out = torch.where(before[:, None], state[b, (src + K1).clamp(0, K1 - 1)], out)
    return out


class _CausalDepthwiseConv(torch.autograd.Function):
    """y[t] = bias + sum_j w[:, K-1-j] * x[t-j] over lookbacks j = 0..K-1 that stay inside
    token t's document, where x[t-j] for t < j comes from the buffer `state`. x: (B, S, D);
    state: (B, K-1, D), x's dtype; weight: (D, K); bias: (D,); cross: None, or for each
    lookback j = 1..K-1 the (batch, time) indices of the tokens fewer than j tokens after
    their document's start (a few per document; CPU), or those as (K-1, B, S, 1) keep
    masks in x's dtype (GPU: finding the indices would wait for the device). With indices
    the taps run over whole shifted views and the crossing terms are then taken back at
    those few positions (no mask pass over (B, S, D) per tap); a hand-written backward: no padded copy of x, and none of the
    depthwise convolution's slow CPU backward (~1.4 s per call at B=1, S=2048, D=1536 on
    2 loaded cores, against ~0.1 s for its forward). y: promote(x, weight)."""

    @staticmethod
    def forward(ctx, x, state, weight, bias, cross):  # noqa: D102
        S, K = x.shape[1], weight.shape[1]
        keeps = cross if isinstance(cross, torch.Tensor) else None
        y = torch.addcmul(bias, x, weight[:, K - 1])  # lookback 0 always counts
        for j in range(1, K):
            w, n = weight[:, K - 1 - j], min(j, S)  # outputs t < n read the buffer
            kj = None if keeps is None else keeps[j - 1]
            head = state[:, K - 1 - j:K - 1 - j + n]
            y[:, :n].addcmul_(head if kj is None else head * kj[:, :n], w)
            if n < S:
                y[:, n:].addcmul_(x[:, :S - n] if kj is None else x[:, :S - n] * kj[:, n:], w)
        if keeps is None and cross is not None:
            for j in range(1, K):
                b, t = cross[j - 1]
                if b.numel():
                    y.index_put_((b, t), -_taps(x, state, cross, j) * weight[:, K - 1 - j], accumulate=True)
        ctx.save_for_backward(x, state, weight, keeps)
        ctx.cross = None if keeps is not None else cross
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        x, state, weight, keeps = ctx.saved_tensors
        cross = ctx.cross
        S, K = x.shape[1], weight.shape[1]
        gx = torch.mul(g, weight[:, K - 1]).to(x.dtype)
        gstate = torch.zeros_like(state)
        gw = torch.empty_like(weight)
        gw[:, K - 1] = (g * x).sum((0, 1))
        for j in range(1, K):
            w, n = weight[:, K - 1 - j], min(j, S)
            gj = g if keeps is None else g * keeps[j - 1]
            head = slice(K - 1 - j, K - 1 - j + n)
            gstate[:, head].addcmul_(gj[:, :n], w)
            acc = (gj[:, :n] * state[:, head]).sum((0, 1))
            if n < S:
                gx[:, :S - n].addcmul_(gj[:, n:], w)
                acc = acc + (gj[:, n:] * x[:, :S - n]).sum((0, 1))
            gw[:, K - 1 - j] = acc
        if cross is not None:  # take back the crossing terms' gradients
            K1 = state.shape[1]
            for j in range(1, K):
                b, t = cross[j - 1]
                if not b.numel():
                    continue
                w = weight[:, K - 1 - j]
                gt = g[b, t]  # (M, D)
                gw[:, K - 1 - j] -= (gt * _taps(x, state, cross, j)).sum(0).to(gw.dtype)
                src = t - j
                inside = src >= 0
                back = (-gt * w).to(x.dtype)
                gx.index_put_((b[inside], src[inside]), back[inside], accumulate=True)
                gstate.index_put_((b[~inside], src[~inside] + K1), back[~inside].to(state.dtype), accumulate=True)
        return gx, gstate, gw, g.sum((0, 1)), None


class CausalConv1d(nn.Module):
    """Causal depthwise conv over time with a rolling buffer for generation.

    weight: (D, K); weight[:, K - 1] multiplies the current token, weight[:, 0]
    the one K - 1 steps back. State: the last K - 1 inputs, (B, K - 1, D).
    """

    index_resets_on: tuple[str, ...] = ("cpu",)
    """Device types where document resets become crossing indices (nonzero: the host
    waits for the device, and fake tensors cannot say how many); elsewhere keep masks."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size={self.kernel_size}, depthwise, causal"

    def reset_parameters(self) -> None:
        """PyTorch's Conv1d default: U(-1/sqrt(K), 1/sqrt(K)) for weight and bias."""
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, S, D); state: (B, K-1, D) or None (zeros); reset: bool (B, S),
        True at a document's first token (no tap reaches back across it).
        Returns y: (B, S, D) and the new state (B, K-1, D)."""
        B, S, D = x.shape
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(B, K - 1, D)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # as nn.Conv1d under autocast
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
        state = state.to(x.dtype)
        cross = None
        if reset is not None:
            # lookback j counts at token t only when t is at least j from its document's start
            pos = torch.arange(S, device=x.device)
            start = torch.where(reset, pos, torch.full_like(pos, -K)).cummax(dim=1).values
            dist = pos - start  # (B, S), >= K when no document starts in this call
            if x.device.type in self.index_resets_on:  # a few indices: cheaper than a mask pass per tap
                cross = tuple(torch.nonzero(dist < j, as_tuple=True) for j in range(1, K))
            else:  # masks: nonzero would make the host wait for the device in every block
                cross = torch.stack([(dist >= j) for j in range(1, K)]).to(x.dtype)[..., None]
        if cross is None and x.device.type != "cpu":  # cuDNN's depthwise conv is fast on GPUs
            xs = torch.cat([state, x], dim=1).transpose(1, 2)
            y = F.conv1d(xs, weight[:, None, :], bias, groups=D).transpose(1, 2)
        else:
            y = _CausalDepthwiseConv.apply(x, state, weight, bias, cross)
        # the last K - 1 inputs (from the buffer too when S < K - 1)
        new_state = x[:, S - (K - 1):] if S >= K - 1 else torch.cat([state, x], dim=1)[:, S:]
        if reset is not None:  # inputs before the last document start are not its history
            t = torch.arange(S - (K - 1), S, device=x.device)  # time of each state row
            new_state = new_state * (t >= start[:, -1:]).to(x.dtype)[..., None]
        return y, new_state

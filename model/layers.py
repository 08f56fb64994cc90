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


# ----------------------------------------------------------------------------- projections


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
        y = torch.einsum("...hi,hoi->...ho", xh, self.weight).flatten(-2)
        return y if self.bias is None else y + self.bias


class CausalConv1d(nn.Module):
    """Causal depthwise conv over time with a rolling buffer for generation.

    weight: (D, K); weight[:, K - 1] multiplies the current token, weight[:, 0]
    the one K - 1 steps back. State: the last K - 1 inputs, (B, K - 1, D).
    """

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
        xs = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+S, D)
        if reset is None:
            y = F.conv1d(xs.transpose(1, 2), self.weight[:, None, :], self.bias, groups=D)
            y = y.transpose(1, 2)
        else:
            # tap k looks back K-1-k tokens; it only counts when token t is at
            # least that far from the start of its document. (Written as a sum
            # of taps so that autograd keeps only views of xs and the masks.)
            pos = torch.arange(S, device=x.device)
            start = torch.where(reset, pos, torch.full_like(pos, -K)).cummax(dim=1).values
            dist = pos - start  # (B, S), >= K when no document starts in this call
            y = self.bias.expand(B, S, D)
            for k in range(K):
                keep = (dist >= K - 1 - k).to(x.dtype)[..., None]  # (B, S, 1)
                y = y + (xs[:, k : k + S] * self.weight[:, k]) * keep
        new_state = xs[:, S:]
        if reset is not None:  # inputs before the last document start are not its history
            t = torch.arange(S - (K - 1), S, device=x.device)  # time of each state row
            new_state = new_state * (t >= start[:, -1:]).to(x.dtype)[..., None]
        return y, new_state

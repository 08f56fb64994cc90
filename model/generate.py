"""Generation with recurrent state: one chunkwise prefill, then one step per token.

Both language models provide ``forward(idx, state, return_state=True)`` (the
chunkwise/sequence ops) and ``step(idx, state)`` (the one-token ops); the
state per block has a fixed size (mLSTM (C, n, m), sLSTM (h, c, n, m), conv
rolling buffers), so memory does not grow with the generated length.
"""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B,) long.

    temperature 0 is greedy (argmax). Otherwise logits / temperature, then
    keep the top_k largest (if given) and the smallest set whose probability
    reaches top_p (if given), renormalize and sample with `generator`.
    """
    if temperature < 0:
        raise ValueError(f"temperature: got {temperature}, expected >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k: got {top_k}, expected >= 1 or None")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: got {top_p}, expected 0 < top_p <= 1 or None")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class GenerationMixin:
    """`generate` for a model with `forward(..., return_state=True)` and `step`."""

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Continue `prompt` (B, S) by `max_new_tokens` tokens -> (B, S + max_new_tokens).

        Prefill runs the whole prompt through the chunkwise ops and keeps the
        last state; each new token is one recurrent step. Sampling as
        `sample_next` (temperature 0 = greedy); `seed` (or a `generator`)
        makes sampling reproducible. After `eos_token_id` a sequence keeps
        emitting eos.
        """
        if prompt.ndim != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt: got shape {tuple(prompt.shape)}, expected (B, S) with S >= 1")
        if generator is None and seed is not None:
            generator = torch.Generator(device=prompt.device).manual_seed(seed)
        B, S = prompt.shape
        out = torch.empty(B, S + max_new_tokens, dtype=torch.long, device=prompt.device)
        out[:, :S] = prompt
        if max_new_tokens == 0:
            return out
        logits, state = self(prompt, return_state=True)
        logits = logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for t in range(max_new_tokens):
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out[:, S + t] = token
            if t + 1 < max_new_tokens:
                logits, state = self.step(token, state)
        return out

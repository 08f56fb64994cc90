"""Text generation from a checkpoint with the recurrent state.

    python -m pretrain.generate CKPT_OR_DIR --prompt TEXT [--max-new-tokens 64]
        [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--device cpu]

CKPT_OR_DIR: a checkpoint folder or root (any backend), a ``--to safetensors``
folder or a transformers xLSTM folder. The prompt is prefilled with the
chunkwise kernels, then each token is one recurrent step on the fixed-size
state (`model.generate`); temperature 0 is greedy. Prints the prompt and its
continuation, then the prefill and decode speeds in tokens/s (stderr).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from model import sample_next

from .checkpoint import CheckpointError, load_model, load_tokenizer


@torch.no_grad()
def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, *,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, device: str | torch.device = "cpu",
                  stop_at_eos: bool = True) -> tuple[str, dict[str, float]]:
    """(continuation text, timings) for `prompt`; timings: prompt_tokens,
    new_tokens, prefill_s, decode_s, prefill_tokens_per_s, decode_tokens_per_s."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    x = torch.tensor([ids], device=device)
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    logits, state = model(x, return_state=True)
    logits = logits[:, -1]
    t1 = time.perf_counter()
    out: list[int] = []
    for t in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=gen)
        if stop_at_eos and int(token[0]) == tokenizer.eos_id:
            break
        out.append(int(token[0]))
        if t + 1 < max_new_tokens:
            logits, state = model.step(token, state)
    t2 = time.perf_counter()
    timings = {"prompt_tokens": len(ids), "new_tokens": len(out), "prefill_s": t1 - t0,
               "decode_s": t2 - t1, "prefill_tokens_per_s": len(ids) / max(t1 - t0, 1e-9),
               "decode_tokens_per_s": len(out) / max(t2 - t1, 1e-9)}
    return tokenizer.decode(out), timings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="checkpoint folder or root, --to safetensors or transformers folder")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-stop-at-eos", action="store_true", help="keep going after EOS")
    args = ap.parse_args(argv)
    try:
        model, src = load_model(args.path, device=args.device, deepspeed=True)
        if src.tokenizer is None:
            raise CheckpointError(f"{args.path}: no tokenizer (tokenizer/tokenizer.model)")
        tok = load_tokenizer(src.tokenizer)
        model = model.to(getattr(torch, args.dtype))
        text, t = generate_text(model, tok, args.prompt, args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed, device=args.device,
                                stop_at_eos=not args.no_stop_at_eos)
    except (CheckpointError, ValueError) as err:
        print(f"[generate] error: {err}", file=sys.stderr)
        return 1
    print(args.prompt + text, flush=True)
    print(f"[generate] {t['prompt_tokens']} prompt tokens in {t['prefill_s']:.3f}s "
          f"({t['prefill_tokens_per_s']:.1f} tokens/s prefill); {t['new_tokens']} new tokens in "
          f"{t['decode_s']:.3f}s ({t['decode_tokens_per_s']:.1f} tokens/s decode, recurrent state)",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure one training configuration's peak memory on CPU, for tests/test_plan.py.

    python tests/plan_measure.py CONFIG [--cuda] [key=value ...]   -> prints {"peak": BYTES, ...} as JSON

Runs the trainer's own engine (pretrain.engine.build_engine) and its loop's shape:
grad_accum micro batches of forward with the fused loss, backward, then the optimizer step, for
two steps (the optimizer state exists from the first). The peak is the resident set's
high-water mark during those steps (reset before them) minus the resident size after a
warm-up (the interpreter, torch's libraries), so it counts what the plan predicts: tensors. Run it with
MALLOC_MMAP_THRESHOLD_ fixed low (the test uses 16 KiB) so that freed tensors go back to
the system instead of leaving holes in the heap. --cuda: on the GPU, the peak is
torch.cuda.max_memory_allocated (tensors only, like the plan).
"""

from __future__ import annotations

import json
import os
import sys

import torch


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str]) -> None:
    from model import build_model
    from pretrain.config import load_train_config
    from pretrain.distributed import DistInfo
    from pretrain.engine import build_engine

    cuda = "--cuda" in argv
    argv = [a for a in argv if a != "--cuda"]
    base_overrides = ["data.train=[x]", "data.tokenizer=x", *argv[1:]]
    cfg = load_train_config(argv[0], base_overrides, world_size=1)
    device = torch.device("cuda" if cuda else "cpu")
    info = DistInfo(0, 1, 0, device)

    def run(cfg, steps: int) -> None:
        torch.manual_seed(0)
        model = build_model(cfg.model_config, device=device)
        engine = build_engine(model, cfg, info)
        t = cfg.train
        ids = torch.randint(cfg.model_config.vocab_size, (t.micro_batch_size, cfg.data.seq_len), device=device)
        reset = torch.zeros_like(ids, dtype=torch.bool)
        reset[:, 0] = True
        for _ in range(steps):  # the trainer's loop, with its fused head and loss
            for _ in range(t.grad_accum):
                loss = engine.forward(ids, reset, ids)
                engine.backward(loss / t.grad_accum)
            engine.step(1e-4)

    # warm-up on a narrow copy of the model with the same block kinds: the code pages of
    # torch's libraries that a step touches count into the resident size, not into the plan
    m = cfg.model_config
    small = ["model.embedding_dim=64", "model.vocab_size=256", "train.micro_batch_size=1",
             "train.global_batch_size=1", "train.grad_accum=1", f"data.seq_len={min(cfg.data.seq_len, 64)}"]
    if m.arch == "xlstm":
        kinds = sorted(set(m.block_types))
        small += [f"model.num_blocks={len(kinds)}", f"model.slstm_at={[kinds.index('s')] if 's' in kinds else []}"]
    if cuda:
        run(cfg, 2)
        print(json.dumps({"peak": torch.cuda.max_memory_allocated(), "base": 0}))
        return
    run(load_train_config(argv[0], base_overrides + small, world_size=1), 1)
    base = rss()
    # the peak of the measured run alone: an earlier, higher peak (an import, the warm-up)
    # would otherwise stand in for it; Linux resets the high-water mark through clear_refs
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    run(cfg, 2)
    print(json.dumps({"peak": high_water() - base, "base": base}))


def high_water() -> int:
    """Peak resident bytes since the last reset (VmHWM)."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    main(sys.argv[1:])

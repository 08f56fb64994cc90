"""Data pipeline throughput: prepare, raw tar reads, the streaming loader, a tiny train step.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--files 400] [--out table.md]

All on the same shards (stdlib sources, one document per file, the demo's
tokenizer settings), in one run:
- `data.prepare` tokens/s with 1 and 2 workers;
- the raw read rate of the shard files (`cat shards/*.tar > /dev/null`, the fastest of 40
  runs, half before and half after the loader's), as bytes/s and as the tokens/s it
  would deliver;
- the loader (pack, seq 2048 x batch 8, shuffle window 1024, sha256 checked) with 0, 1
  and 2 workers over several epochs: steady rate after the first batch, the time to the
  first batch, and the rate with start-up included. Each run starts with the loader's
  per-process caches cleared, so it indexes and verifies every shard again (in its
  first epoch, in each process that reads it); the run with the best steady rate of
  `--runs` (5; a busy machine slows some runs a lot, as it does some cat runs);
- the tiny preset's training step (forward + backward + AdamW, batch 4 x seq 128, one
  thread, like one rank of `make demo`), when the `model` package is importable.
Goals from the issue: loader >= 0.5 x raw read rate; loader >= 100 x the tiny step's
consumption. Ratios are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.demo import stdlib_sources  # noqa: E402
from data.loader import build_loader  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.tarshard import clear_cache  # noqa: E402
from data.tokenizer import train_tokenizer  # noqa: E402


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _tiny_step_tokens_per_s(batch: int = 4, seq: int = 128, steps: int = 6) -> float | None:
    try:
        import torch

        from model import build_model, load_model_config
    except Exception as e:  # the model package is someone else's; report, do not fail
        print(f"(tiny step skipped: {e})", file=sys.stderr)
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg_path = os.path.join(root, "configs", "tiny.yaml")
    import yaml

    with open(cfg_path) as f:
        raw = yaml.safe_load(f)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(load_model_config(raw.get("model", raw)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (batch, seq))
    y = torch.randint(0, 512, (batch, seq))

    def step():
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t = _best(step, steps)
    return batch * seq / t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5, help="loader runs per worker count")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="data-bench-")
    files = stdlib_sources(a.files)
    in_bytes = sum(os.path.getsize(f) for f in files)
    tok_dir = os.path.join(work, "tok")
    t0 = time.perf_counter()
    train_tokenizer(files, tok_dir, vocab_size=512, max_sentences=20_000, progress=False)
    t_tok = time.perf_counter() - t0

    rows = []
    shards = None
    for w in (1, 2):
        out = os.path.join(work, f"shards-w{w}")
        t0 = time.perf_counter()
        m = prepare(files, tok_dir, out, shard_tokens=1 << 18, workers=w, progress=False)
        dt = time.perf_counter() - t0
        tokens = m["totals"]["tokens"]
        rows.append((f"data.prepare, {w} worker{'s' if w > 1 else ''}", tokens / dt,
                     in_bytes / dt / 1e6, f"{len(files)} files, {in_bytes / 1e6:.1f} MB text"))
        shards = out
    tars = sorted(glob.glob(os.path.join(shards, "*.tar")))
    shard_bytes = sum(os.path.getsize(p) for p in tars)

    def cat():
        subprocess.run(["cat", *tars], stdout=subprocess.DEVNULL, check=True)

    cat()  # page cache warm, like the loader's reads below
    t_cat = _best(cat, 20)  # best of 20 now and 20 after the loader runs: a busy machine
    cat_row = len(rows)  # slows a few-ms command a lot, so take its fastest
    rows.append(None)

    def py_read():
        import hashlib

        for p in tars:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)

    t_py = _best(py_read, 5)
    rows.append(("python read + sha256 of the same files (1 MiB reads)", tokens / t_py,
                 shard_bytes / t_py / 1e6, "bound for a Python reader that checks every byte"))

    loader_tps, loader_total = {}, {}
    load_before = os.getloadavg()[0]
    for nw in (0, 1, 2):
        cfg = {"sources": shards, "seq_len": a.seq_len, "micro_batch_size": a.batch,
               "num_workers": nw, "epochs": a.epochs, "shuffle_buffer": 1024, "seed": 0}
        best = None
        for _ in range(a.runs):
            clear_cache()  # each run verifies and indexes every shard anew (cold, per process)
            t0 = time.perf_counter()
            it = iter(build_loader(cfg))
            n = next(it)["input_ids"].numel()
            t1 = time.perf_counter()
            for b in it:
                n += b["input_ids"].numel()
            t2 = time.perf_counter()
            run = (n / (t2 - t0), (n - a.batch * a.seq_len) / (t2 - t1), t1 - t0)
            best = run if best is None or run[1] > best[1] else best
        total, steady, first = best
        loader_tps[nw], loader_total[nw] = steady, total
        rows.append((f"loader, {nw} workers (pack, {a.batch}x{a.seq_len})", steady,
                     steady / tokens * shard_bytes / 1e6,
                     f"after the first batch ({first * 1e3:.0f} ms); "
                     f"{total / 1e6:.1f}M tok/s over {a.epochs} epochs with start-up"))

    t_cat = min(t_cat, _best(cat, 20))
    raw_tps = tokens / t_cat
    rows[cat_row] = ("raw read: cat shards > /dev/null (best of 40)", raw_tps,
                     shard_bytes / t_cat / 1e6, f"{len(tars)} shards, {shard_bytes / 1e6:.1f} MB")

    tiny = _tiny_step_tokens_per_s()
    if tiny is not None:
        rows.append(("tiny preset train step (fwd+bwd+AdamW, 4x128, 1 thread)", tiny, None,
                     "what one demo rank consumes"))

    lines = ["| what | tokens/s | MB/s | note |", "| --- | ---: | ---: | --- |"]
    for name, tps, mbs, note in rows:
        lines.append(f"| {name} | {tps:,.0f} | {'' if mbs is None else f'{mbs:,.1f}'} | {note} |")
    best = max(loader_tps.values())
    lines.append("")
    lines.append(f"tokenizer training (vocab 512, 20k sentences cap): {t_tok:.1f} s")
    lines.append("loader / raw read rate: " + ", ".join(
        f"{nw} workers {loader_tps[nw] / raw_tps:.2f}x" for nw in loader_tps)
        + " (goal >= 0.5x); with start-up: " + ", ".join(
        f"{nw} workers {loader_total[nw] / raw_tps:.2f}x" for nw in loader_total))
    lines.append(
        f"machine: {os.cpu_count()} CPU cores, load average {load_before:.1f} when the loader "
        "runs began. 0 workers: in-process, one thread. 1 and 2 workers: DataLoader processes "
        "that pack uint16 ids into a shared-memory ring (the pipe carries only document "
        "starts and states); the main process widens them to int64. Workers exist to take "
        "reading off a main process that is busy training; here the main process only "
        "consumes, so they add hand-offs between processes, and each hand-off waits for a "
        "free core when the machine has fewer idle cores than workers + 1.")
    if tiny is not None:
        lines.append(f"best loader / tiny train step: {best / tiny:,.0f}x (goal >= 100x)")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

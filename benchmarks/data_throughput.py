"""Data pipeline throughput: prepare, raw tar reads, the streaming loader, a tiny train step.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--files 400] [--out table.md]

All on the same shards (stdlib sources, one document per file, the demo's
tokenizer settings), in one run:
- `data.prepare` tokens/s with 1 and 2 workers;
- the raw read rate of the shard files (`cat shards/*.tar > /dev/null`, the fastest of 40
  runs, half before and half after the loader's), as bytes/s and as the tokens/s it
  would deliver;
- python reads with each digest (sha256, the manifest's; xxh3-128, the per-run check),
  and the bound of the batch contract itself: handing out a packed batch of uint16 ids
  (`_batch` alone: the document starts as a tensor, no reading, no packing), and, for
  scale, `Batch.to("cpu")`: the widening to int64 and the labels and reset mask that the
  trainer builds on its device (on a GPU: after the copy, on the GPU);
- the loader (pack, seq 2048 x batch 8, shuffle window 1024, digest checked) with each
  of `--workers` (0,1,2,4) over several epochs: steady rate after the first batch, the
  time to the first batch, and the rate with start-up included. Each run starts with the
  loader's per-process caches cleared, so it maps, walks and verifies every shard again (in
  its first epoch, in each process that reads it); the run with the best steady rate of
  `--runs` (5; a busy machine slows some runs a lot, as it does some cat runs). With
  workers, the loader's shared-memory ring against a plain DataLoader over the same
  slots that sends each group of batches as one tensor (torch moves it through shared
  memory, one hand-off per group; pinned when CUDA is there), runs interleaved;
- the loader's time per step of the 125M model (micro batch 1 x 2048) against that
  step's time (`--step-tokens-per-s`, default: benchmarks/results/
  train_throughput-2026-12-02-cpu.md, ours without FSDP on this CPU);
- the tiny preset's training step (forward + backward + AdamW, batch 4 x seq 128, one
  thread, like one rank of `make demo`), when the `model` package is importable;
- the tar header walk alone (`data.tarshard._walk`, CPU us per header, fastest of 7): the
  sequential Python walk against the bulk numpy one, on shards of 30, 300 and 3000
  documents of about `--doc-tokens` tokens (700 when not given), written by `ShardWriter`.
With `--doc-tokens N`: the corpus is the same text cut into documents of about N tokens
(one JSONL file; at the tokenizer's mean characters per token), as web pages are, instead
of one document per file (~10k tokens).
With `--baseline DIR` (a folder holding another `data` package, e.g. `git archive
dcaf238 data | tar -x -C DIR`): the CPU time per batch at 0 workers of that loader and of
this one, each in fresh processes, interleaved: before/after in one run, over all epochs
after the first batch, and per epoch (the first, cold; a later one, warm).
Goals from the issues: loader at 0 workers >= 0.8 x the raw read rate; the ring kept only
if >= 1.3 x the plain DataLoader at 4+ workers; the loader never the bottleneck of a
step. Ratios are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data import loader as L  # noqa: E402
from data.demo import stdlib_sources  # noqa: E402
from data.loader import build_loader  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.tarshard import clear_cache, hasher  # noqa: E402
from data.tokenizer import train_tokenizer  # noqa: E402


def _short_documents(files: list[str], tok_dir: str, doc_tokens: int, out: str) -> str:
    """One JSONL file of the text of `files` cut into documents of about `doc_tokens`
    tokens (at the tokenizer's mean characters per token on the first 200k characters)."""
    from data.tokenizer import Tokenizer

    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
    sample = text[:200_000]
    per = max(1, round(doc_tokens * len(sample) / len(Tokenizer.load(tok_dir).encode(sample))))
    path = os.path.join(out, "docs.jsonl")
    with open(path, "w") as f:
        for i in range(0, len(text), per):
            f.write(json.dumps({"text": text[i:i + per]}) + "\n")
    return path


def _walk_per_header(doc_tokens: int, out: str, baseline: str | None
                     ) -> list[tuple]:
    """(documents, headers, then CPU us per header of: the sequential walk, the bulk one,
    and the baseline's `_walk` when given) of the tar walk alone, on shards of 30/300/3000
    documents of random ids, 0.5-1.5x `doc_tokens` long (the fastest of 7 rounds of
    enough walks for ~20 ms)."""
    import importlib.util

    from data import tarshard

    walks = [lambda b, n: tarshard._walk(b, n, "s", bulk=False),
             lambda b, n: tarshard._walk(b, n, "s")]
    if baseline:  # its tarshard alone (it imports only numpy and the standard library)
        spec = importlib.util.spec_from_file_location(
            "baseline_tarshard", os.path.join(baseline, "data", "tarshard.py"))
        old = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        walks.append(lambda b, n: old._walk(b, n, "s"))
    rng = np.random.default_rng(0)
    rows = []
    for docs in (30, 300, 3000):
        path = os.path.join(out, f"walk-{docs}.tar")
        w = tarshard.ShardWriter(path)
        for i in range(docs):
            n = int(rng.integers(doc_tokens // 2, doc_tokens * 3 // 2 + 1))
            w.add(f"{i:09d}", rng.integers(0, 512, n), f"docs.jsonl:{i}")
        w.close()
        with open(path, "rb") as f:
            buf = f.read()
        headers = 2 * docs
        reps = max(1, 20_000 // (2 * headers))
        us = []
        for walk in walks:
            assert walk(buf, len(buf)).n == docs
            best = float("inf")
            for _ in range(7):
                c0 = time.process_time()
                for _ in range(reps):
                    walk(buf, len(buf))
                best = min(best, (time.process_time() - c0) / reps)
            us.append(best / headers * 1e6)
        rows.append((docs, headers, *us))
    return rows


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _plain_loader(cfg: dict):
    """The loader's slots behind a plain DataLoader: each worker sends a group of
    `batches_per_transfer` batches as one tensor of compact ids (torch moves it through
    shared memory), the main process hands them out with the loader's `_batch` (a copy out
    of the group, as the ring's). No state is tracked (a small advantage for this side)."""
    import torch

    ld = build_loader(cfg)
    c = ld.cfg
    dtype = L._compact_dtype(c, ld.shards)
    store = np.int16 if dtype.itemsize == 2 else np.int32

    class Groups(torch.utils.data.IterableDataset):
        def __iter__(self):
            w = torch.utils.data.get_worker_info().id
            slot = L._Slot(c, ld.shards, ld.weights, L._state_of(ld._slots[w]))
            group = []
            need = c.micro_batch_size * c.seq_len + 1
            for bt, _st, count in slot.batches(lambda: np.empty(need, dtype)):
                if bt is not None:
                    group.append(bt)
                if group and (bt is None or count % c.batches_per_transfer == 0):
                    ids = np.stack([g[0] for g in group]).view(store)
                    yield torch.from_numpy(ids), [g[1:] for g in group]
                    group = []

    pin = torch.cuda.is_available()
    for ids, rest in torch.utils.data.DataLoader(
            Groups(), batch_size=None, num_workers=c.num_workers, prefetch_factor=4,
            pin_memory=pin):
        v = ids.numpy().view(dtype)
        for i, r in enumerate(rest):
            yield L._batch((v[i], *r), c.micro_batch_size, c.seq_len, True, pin)


def _breakdown(cfg: dict, runs: int) -> dict[str, float]:
    """CPU microseconds per batch of the loader at 0 workers, by part (median of `runs`):
    drawing documents alone (reading, shuffling), then packing them too (into a plain
    array), then the whole loader (handing out `Batch`es), all with the per-process
    caches warm; and the whole loader with them cleared (the first epoch maps, parses and
    hashes every shard)."""
    def slot():
        ld = build_loader(cfg)
        return L._Slot(ld.cfg, ld.shards, ld.weights, L._state_of(ld._slots[0]))

    need = cfg["micro_batch_size"] * cfg["seq_len"] + 1

    def docs():  # as the packer draws them (one source: no mixing draw)
        s = slot()
        draw = s._draw if len(s.readers) > 1 else s.readers[0].next_doc
        while draw() is not None:
            pass

    def packed():
        for _ in slot().batches(lambda: np.empty(need, np.uint16), snapshot=False,
                                make=lambda *packed: None):
            pass

    def whole():
        return sum(1 for _ in build_loader(cfg))

    n = whole()
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        for name, fn in (("docs", docs), ("packed", packed), ("whole", whole), ("cold", whole)):
            if name == "cold":
                clear_cache()  # outside the timing: unmapping the last run's shards
            c0 = time.process_time()
            fn()
            out.setdefault(name, []).append((time.process_time() - c0) / n * 1e6)
    med = {k: sorted(v)[len(v) // 2] for k, v in out.items()}
    return {"reading and shuffling the documents": med["docs"],
            "packing them": med["packed"] - med["docs"],
            "handing out batches (Batch: ids and starts as tensors)": med["whole"] - med["packed"],
            "the first epoch's mapping, parsing and hashing (over all epochs)":
                med["cold"] - med["whole"],
            "total (cold)": med["cold"]}


# CPU seconds per batch of the loader at 0 workers in a fresh process (cold caches), with
# the `data` package found in argv[1]: argv[3] "amortized": over all epochs after the
# first batch; "epochs": after one epoch that warms the process (imports, first calls),
# the fastest of 5 rounds of `clear_cache()`, one epoch cold (its first batch included:
# the shards are mapped, walked and hashed anew), one epoch warm (a second loader)
_PROBE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from data.loader import build_loader
cfg = json.loads(sys.argv[2])
def cpu(cfg, skip_first):
    it = iter(build_loader(cfg))
    if skip_first:
        next(it)
    n, c = 0, time.process_time()
    for _b in it:
        n += 1
    return (time.process_time() - c) / n
if sys.argv[3] == "amortized":
    print(cpu(cfg, True))
else:
    from data.tarshard import clear_cache
    one = {**cfg, "epochs": 1}
    cpu(one, False)
    runs = [(clear_cache(), cpu(one, False), cpu(one, False))[1:] for _ in range(5)]
    print(min(r[0] for r in runs), min(r[1] for r in runs))
"""


def _cpu_per_batch(root: str, cfg: dict, what: str = "amortized") -> list[float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, root, json.dumps(cfg), what],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [float(x) for x in out.stdout.split()[-(1 if what == "amortized" else 2):]]


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
    ap.add_argument("--shard-tokens", type=int, default=1 << 18,
                    help="tokens per shard (13 shards of the default corpus; data.prepare's "
                    "default is 1 << 24)")
    ap.add_argument("--runs", type=int, default=5, help="loader runs per worker count")
    ap.add_argument("--workers", default="0,1,2,4", help="worker counts, comma-separated")
    ap.add_argument("--step-tokens-per-s", type=float, default=91.8,
                    help="the 125M model's training tokens/s (default: this CPU, 2026-12-02)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--doc-tokens", type=int, default=None,
                    help="cut the corpus into documents of about this many tokens (web pages "
                    "are ~500-1000); default: one document per file")
    ap.add_argument("--baseline", default=None, help="a folder holding another `data` "
                    "package: its CPU time per batch at 0 workers against this one's")
    a = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="data-bench-")
    files = stdlib_sources(a.files)
    in_bytes = sum(os.path.getsize(f) for f in files)
    tok_dir = os.path.join(work, "tok")
    t0 = time.perf_counter()
    train_tokenizer(files, tok_dir, vocab_size=512, max_sentences=20_000, progress=False)
    t_tok = time.perf_counter() - t0
    docs_note = f"{len(files)} files, {in_bytes / 1e6:.1f} MB text"
    if a.doc_tokens:
        files = [_short_documents(files, tok_dir, a.doc_tokens, work)]
        docs_note += f", cut into documents of ~{a.doc_tokens} tokens"

    rows = []
    shards = None
    for w in (1, 2):
        out = os.path.join(work, f"shards-w{w}")
        t0 = time.perf_counter()
        m = prepare(files, tok_dir, out, shard_tokens=a.shard_tokens, workers=w, progress=False)
        dt = time.perf_counter() - t0
        tokens = m["totals"]["tokens"]
        rows.append((f"data.prepare, {w} worker{'s' if w > 1 else ''}", tokens / dt,
                     in_bytes / dt / 1e6, docs_note))
        shards = out
    tars = sorted(glob.glob(os.path.join(shards, "*.tar")))
    shard_bytes = sum(os.path.getsize(p) for p in tars)
    n_docs = m["totals"]["samples"]

    cat_cpu = []  # CPU seconds (user + system) of each cat process: steadier than wall time

    def cat():
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(["cat", *tars], stdout=subprocess.DEVNULL, check=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cat_cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)

    cat()  # page cache warm, like the loader's reads below
    t_cat = _best(cat, 20)  # best of 20 now and 20 after the loader runs: a busy machine
    cat_row = len(rows)  # slows a few-ms command a lot, so take its fastest
    rows.append(None)

    for algo in ("sha256", "xxh3_128"):
        def py_read(algo=algo):
            for p in tars:
                h = hasher(algo)
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)

        t_py = _best(py_read, 5)
        rows.append((f"python read + {algo} of the same files (1 MiB reads)", tokens / t_py,
                     shard_bytes / t_py / 1e6, "bound for a reader that checks every byte"))
    ld = build_loader({"sources": shards, "seq_len": a.seq_len, "micro_batch_size": a.batch})
    slot = L._Slot(ld.cfg, ld.shards, ld.weights, L._state_of(ld._slots[0]))
    need = a.batch * a.seq_len + 1
    packed, _st, _n = next(slot.batches(lambda: np.empty(need, np.uint16)))
    n_fin = 200
    t_fin = _best(lambda: [L._batch(packed, a.batch, a.seq_len, True, False)
                           for _ in range(n_fin)], 5)
    rows.append(("bound: the batch contract alone (uint16 ids handed out, `_batch`)",
                 n_fin * a.batch * a.seq_len / t_fin, None, "no reading, no packing"))
    one = L._batch(packed, a.batch, a.seq_len, True, False)
    t_to = _best(lambda: [one.to("cpu") for _ in range(n_fin)], 5)
    rows.append(("for scale: `Batch.to` on the CPU (int64 ids, labels, reset mask)",
                 n_fin * a.batch * a.seq_len / t_to, None,
                 "the trainer's expansion, done on the GPU there"))

    loader_tps, loader_total, plain_tps = {}, {}, {}
    load_before = os.getloadavg()[0]
    workers = [int(x) for x in a.workers.split(",")]
    best: dict = {}
    cpu0: list[float] = []  # 0 workers: the loader's CPU seconds per batch after the first
    for _ in range(a.runs):  # rounds over every variant: a busy machine slows all alike
        for nw in workers:
            cfg = {"sources": shards, "seq_len": a.seq_len, "micro_batch_size": a.batch,
                   "num_workers": nw, "epochs": a.epochs, "shuffle_buffer": 1024, "seed": 0}
            for kind in ("ring", "plain") if nw else ("ring",):
                clear_cache()  # each run walks and verifies every shard anew (cold)
                t0 = time.perf_counter()
                it = iter(build_loader(cfg) if kind == "ring" else _plain_loader(cfg))
                n = a.batch * a.seq_len
                next(it)
                t1, c1 = time.perf_counter(), time.process_time()
                for _b in it:
                    n += a.batch * a.seq_len
                t2 = time.perf_counter()
                if nw == 0:
                    cpu0.append((time.process_time() - c1) / (n / (a.batch * a.seq_len) - 1))
                run = (n / (t2 - t0), (n - a.batch * a.seq_len) / (t2 - t1), t1 - t0)
                if (kind, nw) not in best or run[1] > best[kind, nw][1]:
                    best[kind, nw] = run
    for (kind, nw), (total, steady, first) in sorted(best.items(), key=lambda x: (x[0][1], x[0][0] != "ring")):
        if kind == "plain":
            plain_tps[nw] = steady
            rows.append((f"plain DataLoader, {nw} workers, one tensor per group of batches",
                         steady, steady / tokens * shard_bytes / 1e6,
                         f"ring / plain: {loader_tps[nw] / steady:.2f}x"))
            continue
        loader_tps[nw], loader_total[nw] = steady, total
        rows.append((f"loader, {nw} workers (pack, {a.batch}x{a.seq_len})", steady,
                     steady / tokens * shard_bytes / 1e6,
                     f"after the first batch ({first * 1e3:.0f} ms); "
                     f"{total / 1e6:.1f}M tok/s over {a.epochs} epochs with start-up"))

    t_cat = min(t_cat, _best(cat, 20))
    raw_tps = tokens / t_cat
    rows[cat_row] = ("raw read: cat shards > /dev/null (best of 40)", raw_tps,
                     shard_bytes / t_cat / 1e6, f"{len(tars)} shards, {shard_bytes / 1e6:.1f} MB")

    # CPU time per batch-worth of tokens (8x2048): cat's (the fastest run) against the
    # loader's at 0 workers (the fastest run), and where the loader's goes
    per_batch = a.batch * a.seq_len / tokens
    cat_us, loader_us = min(cat_cpu) * per_batch * 1e6, min(cpu0) * 1e6
    cfg0 = {"sources": shards, "seq_len": a.seq_len, "micro_batch_size": a.batch,
            "epochs": a.epochs, "shuffle_buffer": 1024, "seed": 0}
    parts = _breakdown(cfg0, 7)
    versus = None
    if a.baseline:  # fresh processes, interleaved: before/after under the same load
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        runs = [[_cpu_per_batch(root, cfg0, what) for root in (a.baseline, here)
                 for what in ("amortized", "epochs")] for _ in range(a.runs)]
        # per loader (baseline, this): amortized, first epoch, a later epoch (fastest, us)
        versus = [[min(r[2 * i][0] for r in runs) * 1e6,
                   *(min(r[2 * i + 1][j] for r in runs) * 1e6 for j in (0, 1))] for i in (0, 1)]

    walks = _walk_per_header(a.doc_tokens or 700, work, a.baseline)
    tiny = _tiny_step_tokens_per_s()
    if tiny is not None:
        rows.append(("tiny preset train step (fwd+bwd+AdamW, 4x128, 1 thread)", tiny, None,
                     "what one demo rank consumes"))

    lines = ["| what | tokens/s | MB/s | note |", "| --- | ---: | ---: | --- |"]
    for name, tps, mbs, note in rows:
        lines.append(f"| {name} | {tps:,.0f} | {'' if mbs is None else f'{mbs:,.1f}'} | {note} |")
    top = max(loader_tps.values())
    lines.append("")
    lines.append(f"tokenizer training (vocab 512, 20k sentences cap): {t_tok:.1f} s")
    lines.append("loader / raw read rate: " + ", ".join(
        f"{nw} workers {loader_tps[nw] / raw_tps:.2f}x" for nw in loader_tps)
        + " (goal at 0 workers >= 0.8x); with start-up: " + ", ".join(
        f"{nw} workers {loader_total[nw] / raw_tps:.2f}x" for nw in loader_total))
    lines.append("ring / plain DataLoader: " + ", ".join(
        f"{nw} workers {loader_tps[nw] / plain_tps[nw]:.2f}x" for nw in plain_tps)
        + " (kept if >= 1.3x at 4+ workers)")
    per_step = 2048 / loader_tps[0]
    lines.append(f"loader time per 125M step (micro batch 1 x 2048, 0 workers): "
                 f"{per_step * 1e6:.1f} us against a step of {2048 / a.step_tokens_per_s:.1f} s "
                 f"({a.step_tokens_per_s:g} tokens/s): {per_step * a.step_tokens_per_s / 2048:.1e}"
                 " of the step")
    lines.append(
        f"machine: {os.cpu_count()} CPU cores, load average {load_before:.1f} when the loader "
        f"runs began, {os.getloadavg()[0]:.1f} after. 0 workers: in-process, one thread. "
        "With workers: DataLoader processes that pack uint16 ids into a shared-memory ring "
        "(the pipe carries only document starts and states); the main process copies them "
        "out. Workers exist to take "
        "reading off a main process that is busy training; here the main process only "
        "consumes, so they add hand-offs between processes, and each hand-off waits for a "
        "free core when the machine has fewer idle cores than workers + 1.")
    lines.append(f"CPU time per batch (8x2048 tokens): cat {cat_us:.1f} us (fastest of 40), "
                 f"loader at 0 workers {loader_us:.1f} us (fastest of {a.runs}, after the first "
                 f"batch): {cat_us / loader_us:.2f}x of cat (goal >= 0.8x)")
    lines.append("where the loader's CPU time per batch goes (0 workers, median of 7 runs of "
                 f"{a.epochs} epochs): " + ", ".join(f"{k} {v:.1f} us" for k, v in parts.items()))
    if versus is not None:
        (b_all, b_first, b_later), (t_all, t_first, t_later) = versus
        lines.append(f"before/after (CPU time per batch at 0 workers, fastest of {a.runs} fresh "
                     f"processes each, interleaved): {a.baseline} {b_all:.1f} us, this "
                     f"{t_all:.1f} us ({b_all / t_all:.2f}x less) over {a.epochs} epochs after "
                     f"the first batch; the first epoch (first batch included, caches cleared) "
                     f"{b_first:.1f} / {t_first:.1f} us ({b_first / t_first:.2f}x less), a "
                     f"later epoch (warm) {b_later:.1f} / {t_later:.1f} us; of cat "
                     f"({cat_us:.1f} us): this {cat_us / t_all:.2f}x amortized, "
                     f"{cat_us / t_first:.2f}x in the first epoch, {cat_us / t_later:.2f}x "
                     f"later (baseline {cat_us / b_all:.2f}x, {cat_us / b_first:.2f}x, "
                     f"{cat_us / b_later:.2f}x)")
    lines.append(f"corpus: {n_docs} documents in {len(tars)} shards ({docs_note})")
    lines.append("tar header walk alone (CPU per header, fastest of 7; documents of "
                 f"~{a.doc_tokens or 700} tokens): " + "; ".join(
                     f"{d} documents ({h} headers): sequential {s:.2f} us, bulk {b:.2f} us"
                     + ("" if not old else f", {a.baseline} {old[0]:.2f} us ({old[0] / b:.1f}x"
                        " the bulk)") for d, h, s, b, *old in walks))
    if tiny is not None:
        lines.append(f"best loader / tiny train step: {top / tiny:,.0f}x (goal >= 100x)")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

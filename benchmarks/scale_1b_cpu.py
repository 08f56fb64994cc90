"""Billion-parameter scale on this CPU machine: the 1.3B large preset built on the
meta device, sharded with FSDP2 over 2 CPU processes (gloo), two optimizer steps
at sequence length 128. Prints the losses, seconds per step and the peak resident
memory of every process (sampled), and the whole machine's.

    .venv/bin/python benchmarks/scale_1b_cpu.py [--precision bf16_pure] [--steps 2]

fp32 AdamW needs 16 bytes per parameter (22.7 GB for 1.42B), more than two
processes can hold on a 24 GiB machine beside the OS, so the default here is
`bf16_pure` (8 bytes per parameter); `--precision fp32` tries anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def sample_rss(proc: subprocess.Popen, peaks: dict[int, float], total: list[float], stop: threading.Event):
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            kids = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        now = 0.0
        for k in kids:
            try:
                rss = k.memory_info().rss / 2**30
                is_rank = "pretrain.train" in " ".join(k.cmdline())
            except psutil.Error:  # gone, or a zombie at the end
                continue
            if is_rank:
                peaks[k.pid] = max(peaks.get(k.pid, 0.0), rss)
                now += rss
        total[0] = max(total[0], now)
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="bf16_pure", choices=["bf16_pure", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--config", default=str(ROOT / "configs" / "large-1.3b.yaml"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import data

    work = Path(tempfile.mkdtemp(prefix="scale1b-"))
    tok, shards = data.make_demo_corpus(str(work / "corpus"), progress=False)
    run_dir = work / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "pretrain.train", "--config", args.config, "--resume", "none",
        f"run_dir={run_dir}", f"data.train=[{shards}]", f"data.tokenizer={tok}",
        f"data.seq_len={args.seq_len}", f"train.steps={args.steps}", "train.micro_batch_size=1",
        "train.global_batch_size=2", "train.log_every=1", f"checkpoint.every={args.steps + 1}",
        "distributed.backend=fsdp", "distributed.meta_init=true",
        f"distributed.precision={args.precision}", "schedule.warmup_steps=1", "hardware.peak_flops=1e11",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    peaks: dict[int, float] = {}
    total = [0.0]
    stop = threading.Event()
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    sampler = threading.Thread(target=sample_rss, args=(proc, peaks, total, stop), daemon=True)
    sampler.start()
    log = proc.stdout.read()
    proc.wait()
    stop.set()
    wall = time.time() - t0
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    params = next((line for line in log.splitlines() if "parameters," in line), "")
    print(f"scale_1b_cpu: {Path(args.config).name}, FSDP2 over 2 CPU processes, meta init, "
          f"precision {args.precision}, seq {args.seq_len}, exit code {proc.returncode}")
    print(params)
    print(f"{'step':>5} {'loss':>9} {'grad_norm':>10} {'s/step':>8}")
    for r in rows:
        if "loss" in r:
            print(f"{r['step']:>5} {r['loss']:>9.4f} {r['grad_norm']:>10.3f} {r['step_time_s']:>8.1f}")
    for j, (pid, gb) in enumerate(sorted(peaks.items())):
        print(f"process {j} (pid {pid}): peak RSS {gb:.2f} GiB")
    print(f"both processes together: peak {total[0]:.2f} GiB of {psutil.virtual_memory().total / 2**30:.1f} GiB; "
          f"wall {wall:.0f} s (incl. start, init and the final checkpoint)")
    if proc.returncode != 0:
        print(log[-4000:])
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

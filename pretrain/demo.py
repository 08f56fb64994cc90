"""`make demo`: the main job end to end on an embedded default.

1. corpus: the Python standard library's own source files (every machine has them);
2. a SentencePiece tokenizer and tokenized WebDataset shards (train + validation);
3. `python -m pretrain.launch --nproc_per_node=2` (torchrun with the trainer's exit codes)
   training the tiny preset with FSDP on CPU (gloo), tracked in a local MLflow store,
   checkpointed;
4. interrupted mid-run by SIGTERM to every rank (as a scheduler's preemption does), which
   checkpoints and ends with exit 75 (resumable); resumed with `--resume auto` to the end;
5. the validation perplexity and a short generated sample from the final checkpoint.

    python -m pretrain.demo [--run-dir runs/demo] [--steps 60] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

import data

from .checkpoint import CheckpointManager, load_model
from .train import EXIT_RESUMABLE

ROOT = Path(__file__).resolve().parent.parent


def prepare_data(run_dir: Path) -> tuple[Path, Path]:
    """Tokenizer and shards (with a val/ split) of the demo corpus under `run_dir`."""
    tok_dir, shard_dir = data.make_demo_corpus(str(run_dir), workers=2, progress=False)
    manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
    print(f"[demo] corpus: Python standard library sources -> {json.dumps(manifest['totals'])}",
          flush=True)
    return Path(tok_dir), Path(shard_dir)


def train_command(run_dir: Path, tok_dir: Path, shard_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "pretrain.launch", "--nproc_per_node=2", "--",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--resume", "auto",
        f"run_dir={run_dir}", f"data.train=[{shard_dir}]", f"data.val={shard_dir / 'val'}",
        f"data.tokenizer={tok_dir}", "data.seq_len=128", "distributed.backend=fsdp",
        f"train.steps={steps}", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.log_every=5", "checkpoint.every=20", "eval.batches=4", "schedule.warmup_steps=5",
        "optimizer.lr=3e-3",
    ]


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if any(r.get("step", 0) >= step for r in lines):
                return
        time.sleep(0.2)
    raise RuntimeError(f"training did not reach step {step} (exit code {proc.poll()})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pretrain.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--interrupt-at", type=int, default=25)
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)  # the demo tracks into a local store in the run dir

    tok_dir, shard_dir = prepare_data(run_dir)
    cmd = train_command(run_dir, tok_dir, shard_dir, args.steps)
    print(f"[demo] $ {' '.join(cmd[2:])}", flush=True)

    first = subprocess.Popen(cmd, env=env, cwd=ROOT)
    wait_for_step(run_dir / "metrics.jsonl", args.interrupt_at, first)
    print("[demo] sending SIGTERM to every rank (a preemption, as a scheduler sends it)", flush=True)
    for rank in psutil.Process(first.pid).children():  # the launcher's ranks (pretrain.rank wrappers)
        if "pretrain.rank" in rank.cmdline():
            rank.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    if latest is None or first.returncode != EXIT_RESUMABLE:
        raise RuntimeError(f"the interrupted run did not stop resumably (exit {first.returncode}, "
                           f"latest checkpoint {latest and latest.path})")
    print(f"[demo] interrupted: exit {first.returncode} (resumable); latest checkpoint: step {latest.step}",
          flush=True)

    print("[demo] resuming with --resume auto", flush=True)
    second = subprocess.run(cmd, env=env, cwd=ROOT)
    if second.returncode != 0:
        raise RuntimeError(f"resumed training failed with exit code {second.returncode}")

    summary = json.loads((run_dir / "summary.json").read_text())
    final = CheckpointManager(run_dir / "checkpoints").latest()
    model, _ = load_model(final.path)
    tok = data.Tokenizer.load(str(final.path / "tokenizer"))
    prompt = "def main(argv):\n    "
    ids = torch.tensor([tok.encode(prompt, add_bos=True)])
    out = model.generate(ids, 40, temperature=0.8, top_k=40, seed=0)
    sample = tok.decode(out[0, ids.shape[1]:].tolist())
    print("\n[demo] ================= result =================")
    print(f"[demo] steps trained: {summary['step']} (interrupted at {latest.step}, resumed), "
          f"tokens seen: {summary['tokens_seen']}")
    print(f"[demo] validation loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f} "
          f"over {int(summary['val_tokens'])} tokens")
    print(f"[demo] MLflow store: {run_dir} (metrics also in {run_dir / 'metrics.jsonl'})")
    print(f"[demo] sample for {prompt!r}:\n{prompt}{sample}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

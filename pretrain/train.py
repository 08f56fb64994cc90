"""The training entry point and the step loop.

    python -m pretrain.launch --nproc_per_node=N -- --config configs/X.yaml [--resume auto] [key.sub=value ...]
    python -m pretrain.train --config configs/X.yaml ...          (one process)

`fit` below is the whole loop: micro batches, one engine step, log, evaluate,
checkpoint, stop on a signal. The parts it drives are built by
`pretrain.trainer.Trainer` (engine, data, schedule, tracker, checkpoints, stop
signal). Exit codes: 0 done, EXIT_RESUMABLE (75) stopped by a signal after a
checkpoint (resume with `--resume auto`; docs/design.md, "Preemption protocol"),
EXIT_DISK_FULL (74) the disk filled while checkpointing (the previous checkpoint is
intact: free space, then `--resume auto`), 1 error, 2 config or input error (a
missing path, an unusable checkpoint: one line from rank 0, no traceback).
`pretrain.launch` (torchrun, each rank through pretrain.rank) exits with these codes;
plain torchrun would report each non-zero one as a crash of its own (exit 1).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
import traceback
import warnings

import torch

from .checkpoint import CheckpointError, DiskFullError
from .config import ConfigError, InputError, load_checked_config
from .distributed import all_reduce_sum, any_rank, init_distributed
from .plan import plan_summary_line
from .trainer import Hooks, NonFiniteError, Trainer

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped cleanly, a checkpoint holds the state
EXIT_DISK_FULL = 74  # EX_IOERR: no space for a checkpoint; resumable once space is freed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pretrain.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML preset (configs/*.yaml)")
    ap.add_argument("--resume", default="auto",
                    help="auto (latest complete checkpoint or fresh), none, or a checkpoint folder")
    ap.add_argument("--fallback-on-corrupt", action="store_true",
                    help="with --resume auto: if the latest checkpoint cannot be loaded, try the previous")
    ap.add_argument("--fresh-optimizer", action="store_true",
                    help="load model weights only (continued pretraining from an imported checkpoint)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-4")
    return ap.parse_args(argv)


def fit(tr: Trainer) -> int:
    """Train from tr.progress.step to train.steps; returns the exit code."""
    cfg, info, engine, t = tr.cfg, tr.info, tr.engine, tr.cfg.train
    it = iter(tr.loader)
    while tr.progress.step < t.steps:
        lr = tr.schedule.lr(tr.progress.step)
        # Per-step values stay on the device: no host sync inside the micro batches; the
        # host waits once per step, for the skip decision (and the grad norm).
        sums = torch.zeros(2, dtype=torch.float64, device=info.device)  # loss x tokens, tokens
        finite = torch.ones((), dtype=torch.bool, device=info.device)
        for _ in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = next(it)
            tr.meter.data_wait += time.perf_counter() - t0
            ids, reset, labels = batch.to(info.device)  # narrow ids widened, labels and mask built there
            loss = tr.hooks.loss(tr.progress.step + 1, engine.forward(ids, reset, labels))
            finite &= torch.isfinite(loss)
            engine.backward(loss / t.grad_accum)  # a non-finite loss only spoils gradients the step drops
            n = (labels != -100).sum()
            sums += torch.stack([loss.detach().double() * n, n.double()])
        grad_norm, stepped = engine.step(lr, skip=any_rank(not bool(finite)))
        tr.count_update(stepped)
        step = tr.progress.step
        if step % t.log_every == 0 or step == t.steps:
            tr.log_step(all_reduce_sum(sums), lr, grad_norm)
        if cfg.eval.every and step % cfg.eval.every == 0 and cfg.data.val and step < t.steps:
            tr.evaluate()
        stopping = any_rank(tr.stop.requested)  # the signal handler only set a flag
        if step % cfg.checkpoint.every == 0 or step == t.steps or stopping:
            tr.save()
        if stopping:
            if info.is_main:
                print(f"[train] stop requested (signal {tr.stop.signum}); checkpoint at step {step} "
                      f"written, exit {EXIT_RESUMABLE} (resume with --resume auto)", flush=True)
            return EXIT_RESUMABLE
    if cfg.data.val:
        tr.evaluate(final=True)
    return 0


def keep_freed_memory() -> bool:
    """glibc only: keep freed memory in the process for the next step instead of handing it back
    to the kernel (no mmap'd blocks, no heap trimming). The mLSTM cell's per-call buffers are
    tens of MB (88 MB of chunk states per block at the 125M preset, S 2048), which glibc maps
    fresh and unmaps on free: every step then page-faults them in again (~1M minor faults per
    step, 0.62x the HF Llama's tokens/s on 2 CPU cores against 0.99x with the memory kept,
    benchmarks/results/train_throughput-2026-12-07c-cpu.md). Returns whether it took effect."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, ...): its allocator as it is
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20)))


def main(argv: list[str] | None = None, hooks: Hooks | None = None, keep_memory: bool = False) -> int:
    """The CLI; `hooks`: fault injection for tests (pretrain.trainer.Hooks); `keep_memory`:
    `keep_freed_memory()` when training on CPU (set by `python -m pretrain.train`, which every
    launch runs; off for in-process callers, whose allocator it would change for good)."""
    args = parse_args(argv)
    # FSDP2 warns that blocks return views: those are recurrent states the trainer
    # never modifies in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    try:
        # missing local paths fail here, not after retries in every rank
        cfg = load_checked_config(args.config, args.overrides)
    except ConfigError as err:  # one line, before any process group exists
        if os.environ.get("RANK", "0") == "0":
            print(err, file=sys.stderr)
        return 2
    info = init_distributed(cfg.distributed.timeout_s)
    if keep_memory and info.device.type == "cpu":  # the host allocator serves the step's tensors
        keep_freed_memory()
    try:
        trainer = Trainer(cfg, args, info, hooks)  # checks its inputs first, on every rank alike
        if info.is_main:  # the plan of this run (pretrain/plan.py); its memory part simulates a step
            try:
                line = plan_summary_line(cfg, info.world_size, memory=info.device.type == "cuda",
                                         cpu_peak_flops=trainer.peak)
            except Exception as err:  # noqa: BLE001 - a report, never a reason to stop the run
                line = f"plan: not available ({type(err).__name__}: {err})"
            print(line, flush=True)
        status = "FAILED"
        try:
            code = fit(trainer)
            status = "KILLED" if code == EXIT_RESUMABLE else "FINISHED"
            return code
        finally:
            trainer.tracker.close(status=status)
    except (InputError, CheckpointError) as err:  # raised on purpose: the message says it all
        if info.is_main:
            print(f"[train] error: {err}", file=sys.stderr, flush=True)
        return EXIT_DISK_FULL if isinstance(err, DiskFullError) else 2
    except (NonFiniteError, ValueError) as err:
        if isinstance(err, ValueError):  # may come from deep inside a library: keep the trace
            traceback.print_exc()
        print(f"[train] rank {info.rank} error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def ignore_stop_signals() -> None:
    """The run is over: a stop signal now (Slurm's time-limit warning, a resend) has nothing
    to stop. Ignored, it cannot kill the process while Python shuts down, which resets the
    handlers it installed to the default action (termination: a finished job would end
    FAILED); and pretrain.rank, which forwards only to a process that catches it, holds it."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    code = main(keep_memory=True)
    ignore_stop_signals()
    sys.exit(code)

"""The training entry point.

    torchrun --nproc_per_node=N -m pretrain.train --config configs/X.yaml [--resume auto] [key.sub=value ...]
    python -m pretrain.train --config configs/X.yaml ...          (one process)

Composes the parts, each its own module: config (`pretrain.config`), the
distributed engine (`pretrain.distributed`), checkpoints (`pretrain.checkpoint`),
tracking (`pretrain.tracking`), the schedule (`pretrain.optim`), the data
loader (`data`). Exit codes: 0 done, EXIT_RESUMABLE (75) stopped by a signal
after a checkpoint (resume with `--resume auto`), 1 error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

import data
from model import build_model, count_parameters, flops_per_token, load_model_config

from . import checkpoint as ckpt
from .config import TrainConfig, load_train_config, save_resolved
from .distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    init_distributed,
    lm_loss,
    make_engine,
)
from .metrics import Meter, measure_matmul_flops, peak_memory_mb
from .optim import lr_at
from .tracking import Tracker

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped cleanly, a checkpoint holds the state


class NonFiniteError(RuntimeError):
    pass


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGUSR2; the handler does nothing else.
    Ranks agree on it at the next step boundary."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)) -> None:
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


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


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_data(cfg: TrainConfig, info: DistInfo, tok: data.Tokenizer, split: str) -> data.TokenLoader:
    d = cfg.data
    if split == "train":
        weights = d.train_weights or [1.0] * len(d.train)
        sources = [{"url": url, "weight": w} for url, w in zip(d.train, weights)]
        extra: dict[str, Any] = {"shuffle_buffer": d.shuffle_buffer, "num_workers": d.num_workers}
    else:
        sources, extra = [d.val], {"shuffle_buffer": 1, "shuffle_shards": False, "epochs": 1}
    return data.build_loader({
        "sources": sources, "seq_len": d.seq_len, "micro_batch_size": cfg.train.micro_batch_size,
        "rank": info.rank, "world_size": info.world_size, "seed": cfg.train.seed,
        "packing": d.packing, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        "vocab_size": tok.vocab_size, "on_error": d.on_error, **extra,
    })


def evaluate(engine, cfg: TrainConfig, info: DistInfo, tok: data.Tokenizer) -> dict[str, float]:
    """Token-weighted validation loss and perplexity over cfg.eval.batches micro
    batches per rank (fewer if the validation set ends first)."""
    loader = build_data(cfg, info, tok, "val")
    total = torch.zeros(2, dtype=torch.float64)
    module = engine.module
    module.eval()
    it = iter(loader)
    with torch.no_grad():
        for _ in range(cfg.eval.batches):
            batch = next(it, None)
            done = any_rank(batch is None)  # every rank runs the same number of forwards
            if done:
                break
            logits = engine.forward(batch["input_ids"].to(info.device), batch["reset"].to(info.device))
            labels = batch["labels"].to(info.device)
            n = (labels != -100).sum()
            loss = lm_loss(logits, labels)
            total += torch.stack([loss.double().cpu() * n.cpu(), n.double().cpu()])
    module.train()
    total = all_reduce_sum(total)
    loss = (total[0] / total[1].clamp_min(1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": total[1].item()}


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.detach().to_local() if hasattr(p, "to_local") else p.detach()


def _shards(engine) -> list[torch.Tensor]:
    """This rank's disjoint share of the weights: the engine's `local_shards()`
    where it has one (DeepSpeed: fp32 master partitions), else local parameters."""
    if hasattr(engine, "local_shards"):
        return engine.local_shards()
    return [_local(p) for p in engine.module.parameters()]


def parameter_sumsq(engine) -> float:
    """Sum of squares of all parameters over all shards (a world-size independent
    fingerprint of the weights, up to summation order)."""
    local = sum(t.double().pow(2).sum() for t in _shards(engine))
    return all_reduce_sum(torch.as_tensor(local, dtype=torch.float64).reshape(1)).item()


def params_finite(engine) -> bool:
    local = all(bool(torch.isfinite(t).all()) for t in _shards(engine))
    return not any_rank(not local)


def run(cfg: TrainConfig, args: argparse.Namespace, info: DistInfo) -> int:
    run_dir = Path(cfg.run_dir)
    mcfg = load_model_config(cfg.model)
    tok = data.Tokenizer.load(cfg.data.tokenizer)
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(
            f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
            f"({cfg.data.tokenizer}); allowed values: >= {tok.padded_vocab_size}"
        )
    manager = ckpt.CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep, info.rank, barrier)
    found = manager.resolve(args.resume)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
        old_metrics = run_dir / "metrics.jsonl"
        if found is None and old_metrics.exists():  # a fresh start keeps the old log aside
            os.replace(old_metrics, run_dir / f"metrics.{int(time.time())}.old.jsonl")

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(mcfg, device="meta" if cfg.distributed.meta_init else info.device)
    n_params = count_parameters(model)  # before the engine: ZeRO-3 partitions them away
    engine = make_engine(model, cfg, info)
    loader = build_data(cfg, info, tok, "train")

    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "run_id": None}
    saved_world = None
    candidates = [found] if found else []
    if found and args.fallback_on_corrupt and args.resume == "auto":
        candidates = [c for c in reversed(manager.complete()) if c.step <= found.step]
    for cand in candidates:
        try:
            state = ckpt.read_trainer_state(cand.path)
            if state.get("data") is None and not args.fresh_optimizer:
                raise ckpt.CheckpointError(
                    f"{cand.path} holds weights only (an imported model, no optimizer or data "
                    "state): start from it with --resume PATH --fresh-optimizer")
            engine.load(cand.path, with_optimizer=not args.fresh_optimizer)
            if not args.fresh_optimizer:
                loader.load_state_dict(state["data"])
            saved_world = state.get("world_size")
            same_world = saved_world == info.world_size
            if not (same_world and ckpt.load_rng(cand.path, info.rank)):
                torch.manual_seed(cfg.train.seed + 1000003 * info.rank + state["step"])
            if args.fresh_optimizer:
                state = {"step": 0, "tokens_seen": 0, "run_id": None}
            found = cand
            break
        except Exception as err:  # noqa: BLE001 - reported with the folder, maybe fallen back from
            msg = f"checkpoint {cand.path} cannot be loaded: {err}"
            if cand is candidates[-1] or not args.fallback_on_corrupt:
                raise ckpt.CheckpointError(msg) from err
            print(f"[train] warning: {msg}; trying the previous checkpoint", file=sys.stderr)
    step = int(state["step"])
    tokens_seen = int(state["tokens_seen"])
    if found is not None:
        checksum = parameter_sumsq(engine)
        if info.is_main:
            by = f"saved by {saved_world} process(es)" if saved_world else "weights only"
            print(f"[train] loaded {found.path} ({by}): "
                  f"parameter sum of squares {checksum:.12e}", flush=True)

    fpt = 3 * flops_per_token(mcfg, cfg.data.seq_len)  # forward + backward
    peak = cfg.hardware.peak_flops or measure_matmul_flops(info.device)
    tracker = Tracker.create(
        rank=info.rank, run_dir=run_dir, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name, run_id=state.get("run_id"),
        resume_step=step if found else None,
        tags={"git_commit": git_commit(), "world_size": str(info.world_size),
              "backend": cfg.distributed.backend, "parameters": str(n_params)},
    )
    if info.is_main:
        tracker.log_params(cfg.to_dict())
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(Path(cfg.data.tokenizer), "tokenizer")
        print(f"[train] {mcfg.arch} model, {n_params:,} parameters, {info.world_size} process(es), "
              f"backend {cfg.distributed.backend}, start at step {step}"
              + (f" (resumed from {found.path})" if found else ""), flush=True)

    stop = StopFlag()
    t = cfg.train
    meter = Meter()
    nonfinite_run = 0
    skipped_total = int(state.get("skipped_steps", 0))
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    it = iter(loader)
    nan_steps = os.environ.get("XLSTM_TEST_NAN_STEPS", "").split(",")  # fault injection (tests)

    def save(at_step: int) -> None:
        if not params_finite(engine):
            raise NonFiniteError(f"step {at_step}: the model has non-finite parameters; not checkpointed")
        trainer_state = {
            "step": at_step, "tokens_seen": tokens_seen, "run_id": tracker.run_id,
            "world_size": info.world_size, "data": loader.state_dict(),
            "skipped_steps": skipped_total, "backend": cfg.distributed.backend,
            "schedule": {"kind": cfg.schedule.kind, "step": at_step}, "config": cfg.to_dict(),
        }

        def write(folder: Path) -> None:
            engine.save(folder)
            ckpt.save_rng(folder, info.rank)
            delay = os.environ.get("XLSTM_TEST_SAVE_DELAY", "")  # fault injection: "STEP:SECONDS"
            if delay and int(delay.split(":")[0]) == at_step:
                time.sleep(float(delay.split(":")[1]))
            if info.is_main:
                save_resolved(cfg, folder / "config.yaml")
                shutil.copytree(cfg.data.tokenizer, folder / "tokenizer")

        path = manager.save(at_step, write, trainer_state)
        if info.is_main:
            print(f"[train] checkpoint {path}", flush=True)

    exit_code = 0
    status = "FINISHED"
    try:
        while step < t.steps:
            lr = lr_at(step, t.steps, cfg.optimizer.lr, cfg.schedule)
            sums = torch.zeros(2, dtype=torch.float64)
            bad = False
            for _ in range(t.grad_accum):
                t0 = time.perf_counter()
                batch = next(it)
                meter.data_wait += time.perf_counter() - t0
                labels = batch["labels"].to(info.device)
                logits = engine.forward(batch["input_ids"].to(info.device), batch["reset"].to(info.device))
                loss = lm_loss(logits, labels)
                if str(step + 1) in nan_steps:
                    loss = loss * float("nan")  # fault injection for the tests
                bad = any_rank(not bool(torch.isfinite(loss))) or bad
                if not bad:
                    engine.backward(loss / t.grad_accum)
                n = (labels != -100).sum().cpu()
                sums += torch.stack([loss.detach().double().cpu() * n, n.double()])
            grad_norm, stepped = engine.step(lr, skip=bad)
            step += 1
            tokens_seen += tokens_per_step
            meter.tokens += tokens_per_step
            meter.steps += 1
            if not stepped:
                nonfinite_run += 1
                skipped_total += 1
                if info.is_main:
                    print(f"[train] step {step}: non-finite loss or gradients, update skipped "
                          f"({nonfinite_run} in a row)", flush=True)
                if nonfinite_run >= t.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{nonfinite_run} non-finite steps in a row (train.max_nonfinite_steps="
                        f"{t.max_nonfinite_steps}); stopping at step {step}")
            else:
                nonfinite_run = 0
            sums = all_reduce_sum(sums)
            if step % t.log_every == 0 or step == t.steps:
                loss_value = (sums[0] / sums[1].clamp_min(1)).item()
                metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                           **meter.rates(info.world_size, fpt, peak),
                           "peak_memory_mb": peak_memory_mb(info.device), "tokens_seen": tokens_seen,
                           "skipped_steps": skipped_total}
                tracker.log_metrics(step, metrics)
                if info.is_main:
                    print(f"[train] step {step:>6}/{t.steps} loss {loss_value:.4f} lr {lr:.2e} "
                          f"gnorm {grad_norm:.3f} tok/s {metrics['tokens_per_s']:.0f} "
                          f"mfu {100 * metrics['mfu']:.1f}% mem {metrics['peak_memory_mb']:.0f}MB "
                          f"data {metrics['data_wait_s'] * 1e3:.0f}ms", flush=True)
                meter.reset()
            if cfg.eval.every and step % cfg.eval.every == 0 and cfg.data.val and step < t.steps:
                tracker.log_metrics(step, evaluate(engine, cfg, info, tok))
            stopping = any_rank(stop.requested)
            if step % cfg.checkpoint.every == 0 or step == t.steps or stopping:
                save(step)
            if stopping:
                if info.is_main:
                    print(f"[train] stop requested (signal {stop.signum}); checkpoint at step {step} "
                          f"written, exit {EXIT_RESUMABLE} (resume with --resume auto)", flush=True)
                exit_code, status = EXIT_RESUMABLE, "KILLED"
                return exit_code
        if cfg.data.val:
            result = evaluate(engine, cfg, info, tok)
            tracker.log_metrics(step, result)
            if info.is_main:
                print(f"[train] validation: loss {result['val_loss']:.4f} ppl {result['val_ppl']:.2f} "
                      f"over {int(result['val_tokens'])} tokens", flush=True)
                summary = {"step": step, "tokens_seen": tokens_seen, **result, "parameters": n_params}
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
                tracker.log_artifact(run_dir / "summary.json")
        return exit_code
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.close(status=status)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # FSDP2 warns that blocks return views: those are recurrent states the trainer
    # never modifies in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ValueError as err:  # one line, before any process group exists
        print(f"config error: {err}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.distributed.timeout_s)
    try:
        return run(cfg, args, info)
    except (NonFiniteError, ckpt.CheckpointError, ValueError) as err:
        if isinstance(err, ValueError):  # may come from deep inside a library: keep the trace
            traceback.print_exc()
        print(f"[train] rank {info.rank} error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

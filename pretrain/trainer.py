"""The trainer's stateful parts and the `Trainer` that composes them.

Parts, each with one job and a `state_dict()` / `load_state_dict()` that go into
`trainer_state.json` (docs/design.md, "Checkpoint layout"):

    progress    `Progress`: step, tokens seen, skipped (non-finite) steps
    schedule    `Schedule`: the learning rate of a step (pretrain.optim.lr_at)
    engine      `pretrain.engine`: model + optimizer; its state is files (engine.save / load)
    data        `data.TokenLoader`: the global data position (docs/design.md, "Data state")
    tracker     `pretrain.tracking.Tracker`: the MLflow run id
    stop        `StopSignal`: SIGTERM / SIGUSR1 / SIGUSR2 (docs/design.md, "Preemption protocol")
    checkpoints `pretrain.checkpoint.CheckpointManager`: the folders all of the above go into

The step loop itself is in pretrain/train.py. `Hooks` are the fault-injection
points tests pass in (`Trainer(..., hooks=...)`); the default does nothing.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import data
from model import build_model, count_parameters, flops_per_token, load_model_config

from . import checkpoint as ckpt
from .config import InputError, TrainConfig, save_resolved
from .distributed import DistInfo, all_reduce_sum, any_rank, barrier
from .engine import build_engine
from .metrics import Meter, device_peak_flops, peak_memory_mb
from .optim import lr_at
from .tracking import Tracker


class NonFiniteError(RuntimeError):
    pass


class ModelMismatchError(ckpt.CheckpointError):
    """A sound checkpoint of another model config (not corrupt: no fallback suggested)."""


class Hooks:
    """Fault injection for tests; every method is a no-op here."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro batch of optimizer step `step` (1-based), as used."""
        return loss

    def checkpoint_parts_written(self, step: int, folder: Path) -> None:
        """Called on every rank after its parts of checkpoint `step` are in `folder` (.tmp)."""


class Faults(Hooks):
    """The faults tests inject: a NaN loss at `nan_steps`, a pause of `save_delay` =
    (step, seconds) after a checkpoint's parts are written. Tests pass one to
    `pretrain.train.main(hooks=...)`; a job started by a scheduler, where no object
    can be passed, gets one from XLSTM_TEST_NAN_STEPS="3,4" / XLSTM_TEST_SAVE_DELAY=
    "STEP:SECONDS", read once at start (`from_env`), never in the loop."""

    def __init__(self, nan_steps: tuple[int, ...] = (), save_delay: tuple[int, float] | None = None) -> None:
        self.nan_steps, self.save_delay = set(nan_steps), save_delay

    @classmethod
    def from_env(cls) -> Hooks:
        nan = os.environ.get("XLSTM_TEST_NAN_STEPS", "")
        delay = os.environ.get("XLSTM_TEST_SAVE_DELAY", "")
        if not (nan or delay):
            return Hooks()
        return cls(tuple(int(s) for s in nan.split(",") if s),
                   (int(delay.split(":")[0]), float(delay.split(":")[1])) if delay else None)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.nan_steps else loss

    def checkpoint_parts_written(self, step: int, folder: Path) -> None:
        if self.save_delay and self.save_delay[0] == step:
            time.sleep(self.save_delay[1])


class StopSignal:
    """Set by SIGTERM / SIGUSR1 / SIGUSR2; the handler does nothing else. Ranks
    agree on it at the next step boundary (`any_rank`). No state to carry over."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)) -> None:
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Progress:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


class Schedule:
    """Learning rate per optimizer step; a pure function of the step it is at."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.step = cfg, 0

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg.train.steps, self.cfg.optimizer.lr, self.cfg.schedule)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.cfg.schedule.kind, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))


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


class Trainer:
    """Builds the parts, resumes them from a checkpoint, saves, evaluates and logs.
    Collective where the engine is: every rank makes the same calls."""

    def __init__(self, cfg: TrainConfig, args: argparse.Namespace, info: DistInfo,
                 hooks: Hooks | None = None) -> None:
        self.cfg, self.info, self.hooks = cfg, info, hooks or Faults.from_env()
        self.run_dir = Path(cfg.run_dir)
        self.mcfg = load_model_config(cfg.model)
        self.tok = data.Tokenizer.load(cfg.data.tokenizer)
        if self.tok.vocab_size > self.mcfg.vocab_size:
            raise InputError(
                f"model.vocab_size: {self.mcfg.vocab_size} is smaller than the tokenizer's "
                f"{self.tok.vocab_size} ({cfg.data.tokenizer}); allowed values: >= {self.tok.padded_vocab_size}")
        self.checkpoints = ckpt.CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep, info.rank, barrier,
                                                  any_rank)
        found = self.checkpoints.resolve(args.resume)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir / "config.yaml")
            old_metrics = self.run_dir / "metrics.jsonl"
            if found is None and old_metrics.exists():  # a fresh start keeps the old log aside
                os.replace(old_metrics, self.run_dir / f"metrics.{int(time.time())}.old.jsonl")
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        model = build_model(self.mcfg, device="meta" if cfg.distributed.meta_init else info.device)
        self.n_params = count_parameters(model)  # before the engine: ZeRO-3 partitions them away
        self.engine = build_engine(model, cfg, info)
        self.loader = build_data(cfg, info, self.tok, "train")
        self.progress, self.schedule = Progress(), Schedule(cfg)
        run_id = self._resume(found, args) if found else None  # sets self.resumed_from
        self.fpt = 3 * flops_per_token(self.mcfg, cfg.data.seq_len)  # forward + backward
        if cfg.hardware.peak_flops:
            self.peak, peak_source = cfg.hardware.peak_flops, "hardware.peak_flops"
        else:  # a published peak for known GPUs, else measured
            dtype = torch.float32 if cfg.distributed.precision == "fp32" else torch.bfloat16
            self.peak, peak_source = device_peak_flops(info.device, dtype)
        self.tracker = Tracker.create(
            rank=info.rank, run_dir=self.run_dir, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name, run_id=run_id, resume_step=self.progress.step if found else None,
            tags={"git_commit": git_commit(), "world_size": str(info.world_size),
                  "backend": cfg.distributed.backend, "parameters": str(self.n_params)})
        if info.is_main:
            self.tracker.log_params(cfg.to_dict())
            self.tracker.log_artifact(self.run_dir / "config.yaml")
            self.tracker.log_artifact(Path(cfg.data.tokenizer), "tokenizer")
            print(f"[train] {self.mcfg.arch} model, {self.n_params:,} parameters, {info.world_size} "
                  f"process(es), backend {cfg.distributed.backend}, start at step {self.progress.step}"
                  + (f" (resumed from {self.resumed_from.path})" if found else ""), flush=True)
            print(f"[train] MFU against {self.peak / 1e12:.3g} TFLOP/s per device ({peak_source})",
                  flush=True)
        self.stop = StopSignal()
        self.meter = Meter()
        self.nonfinite_run = 0

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """trainer_state.json: the JSON state of every part (the engine's is files)."""
        return {**self.progress.state_dict(), **self.tracker.state_dict(), "data": self.loader.state_dict(),
                "schedule": self.schedule.state_dict(), "world_size": self.info.world_size,
                "backend": self.cfg.distributed.backend, "config": self.cfg.to_dict()}

    def _resume(self, found: ckpt.CheckpointInfo, args: argparse.Namespace) -> str | None:
        """Load `found` (or, with --fallback-on-corrupt, the newest loadable one before it);
        returns the tracking run id to continue."""
        candidates = [found]
        if args.fallback_on_corrupt and args.resume == "auto":
            candidates = [c for c in reversed(self.checkpoints.complete()) if c.step <= found.step]
        for cand in candidates:
            try:
                ckpt.verify_files(cand.path)  # a truncated part is named before torch reads it
                state = ckpt.read_trainer_state(cand.path)
                if not args.fresh_optimizer:  # continued pretraining may change the model around it
                    self._check_same_model(state)
                if state.get("data") is None and not args.fresh_optimizer:
                    raise ckpt.CheckpointError(
                        f"{cand.path} holds weights only (an imported model, no optimizer or data "
                        "state): start from it with --resume PATH --fresh-optimizer")
                self.engine.load(cand.path, with_optimizer=not args.fresh_optimizer)
                if not args.fresh_optimizer:
                    self.loader.load_state_dict(state["data"])
                saved_world = state.get("world_size")
                if not (saved_world == self.info.world_size and ckpt.load_rng(cand.path, self.info.rank)):
                    torch.manual_seed(self.cfg.train.seed + 1000003 * self.info.rank + state["step"])
                self.resumed_from = cand
                break
            except Exception as err:  # noqa: BLE001 - reported with the folder, maybe fallen back from
                why = " ".join(str(err).split())  # one line, whatever the library wrote
                if not isinstance(err, ckpt.CheckpointError):
                    why = f"corrupt or unreadable ({type(err).__name__}: {why[:300]})"
                msg = f"checkpoint {cand.path} cannot be loaded: {why}"
                if cand is candidates[-1] or not args.fallback_on_corrupt:
                    if (args.resume == "auto" and not args.fallback_on_corrupt
                            and not isinstance(err, ModelMismatchError) and len(self.checkpoints.complete()) > 1):
                        msg += "; to resume from the previous complete checkpoint, add --fallback-on-corrupt"
                    raise ckpt.CheckpointError(msg) from err
                if self.info.is_main:
                    print(f"[train] warning: {msg}; trying the previous checkpoint", file=sys.stderr)
        if cand is not candidates[0]:  # set the unloadable ones aside: never picked, pruned or loaded again
            barrier()
            if self.info.is_main:
                for bad in candidates[:candidates.index(cand)]:
                    os.replace(bad.path, bad.path.with_name(bad.path.name + ".corrupt"))
                    print(f"[train] moved {bad.path} aside to {bad.path.name}.corrupt", file=sys.stderr)
        if not args.fresh_optimizer:
            self.progress.load_state_dict(state)
            self.schedule.load_state_dict(state.get("schedule", {}))
        checksum = self.parameter_sumsq()
        if self.info.is_main:
            by = f"saved by {saved_world} process(es)" if saved_world else "weights only"
            print(f"[train] loaded {cand.path} ({by}): parameter sum of squares {checksum:.12e}", flush=True)
        return None if args.fresh_optimizer else state.get("run_id")

    RUNTIME_MODEL_KEYS = frozenset({"backend", "chunk_size", "recompute_states"})  # same weights either way

    def _check_same_model(self, state: dict[str, Any]) -> None:
        """The checkpoint's model section is this run's, up to kernel settings (else a
        one-line error naming the first differing key, before any tensor is read)."""
        saved = (state.get("config") or {}).get("model")
        if saved is None:
            return
        mine = self.cfg.to_dict()["model"]
        diff = sorted(k for k in (set(saved) | set(mine)) - self.RUNTIME_MODEL_KEYS
                      if saved.get(k) != mine.get(k))
        if diff:
            k = diff[0]
            raise ModelMismatchError(
                f"written by another model config (model.{k}: {saved.get(k)!r} there, {mine.get(k)!r} here"
                f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); use another run_dir or --resume none")

    def save(self) -> None:
        """Collective: checkpoint the current step (refused if any weight is non-finite)."""
        step = self.progress.step
        if not self.params_finite():
            raise NonFiniteError(f"step {step}: the model has non-finite parameters; not checkpointed")

        def write(folder: Path) -> None:
            self.engine.save(folder)
            ckpt.save_rng(folder, self.info.rank)
            self.hooks.checkpoint_parts_written(step, folder)
            if self.info.is_main:
                save_resolved(self.cfg, folder / "config.yaml")
                shutil.copytree(self.cfg.data.tokenizer, folder / "tokenizer")

        path = self.checkpoints.save(step, write, self.state_dict())
        if self.info.is_main:
            print(f"[train] checkpoint {path}", flush=True)

    # ------------------------------------------------------------ checks and metrics
    def parameter_sumsq(self) -> float:
        """Sum of squares of all parameters over all shards (a world-size independent
        fingerprint of the weights, up to summation order)."""
        local = sum(t.double().pow(2).sum() for t in self.engine.local_shards())
        return all_reduce_sum(torch.as_tensor(local, dtype=torch.float64).reshape(1)).item()

    def params_finite(self) -> bool:
        local = all(bool(torch.isfinite(t).all()) for t in self.engine.local_shards())
        return not any_rank(not local)

    def count_update(self, stepped: bool) -> None:
        """After an optimizer step: count it, and stop after too many non-finite ones in a row."""
        p, t = self.progress, self.cfg.train
        tokens = t.global_batch_size * self.cfg.data.seq_len
        p.step += 1
        self.schedule.step = p.step
        p.tokens_seen += tokens
        self.meter.tokens += tokens
        self.meter.steps += 1
        if stepped:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        p.skipped_steps += 1
        if self.info.is_main:
            print(f"[train] step {p.step}: non-finite loss or gradients, update skipped "
                  f"({self.nonfinite_run} in a row)", flush=True)
        if self.nonfinite_run >= t.max_nonfinite_steps:
            raise NonFiniteError(f"{self.nonfinite_run} non-finite steps in a row (train.max_nonfinite_steps="
                                 f"{t.max_nonfinite_steps}); stopping at step {p.step}")

    def log_step(self, sums: torch.Tensor, lr: float, grad_norm: float) -> None:
        """Metrics of the steps since the last log line; `sums`: (loss x tokens, tokens) over ranks."""
        step, steps = self.progress.step, self.cfg.train.steps
        loss = (sums[0] / sums[1].clamp_min(1)).item()
        m = {"loss": loss, "lr": lr, "grad_norm": grad_norm,
             **self.meter.rates(self.info.world_size, self.fpt, self.peak),
             "peak_memory_mb": peak_memory_mb(self.info.device), "tokens_seen": self.progress.tokens_seen,
             "skipped_steps": self.progress.skipped_steps}
        self.tracker.log_metrics(step, m)
        if self.info.is_main:
            print(f"[train] step {step:>6}/{steps} loss {loss:.4f} lr {lr:.2e} gnorm {grad_norm:.3f} "
                  f"tok/s {m['tokens_per_s']:.0f} mfu {100 * m['mfu']:.1f}% mem {m['peak_memory_mb']:.0f}MB "
                  f"data {m['data_wait_s'] * 1e3:.0f}ms", flush=True)
        self.meter.reset()

    def evaluate(self, final: bool = False) -> None:
        """Token-weighted validation loss and perplexity over cfg.eval.batches micro
        batches per rank (fewer if the validation set ends first), logged; the final
        one also goes to summary.json."""
        loader = build_data(self.cfg, self.info, self.tok, "val")
        total = torch.zeros(2, dtype=torch.float64)
        module = self.engine.module
        module.eval()
        it = iter(loader)
        with torch.no_grad():
            for _ in range(self.cfg.eval.batches):
                batch = next(it, None)
                if any_rank(batch is None):  # every rank runs the same number of forwards
                    break
                ids, reset, labels = batch.to(self.info.device)  # data.Batch: widened on the device
                n = (labels != -100).sum()
                loss = self.engine.forward(ids, reset, labels)
                total += torch.stack([loss.double() * n, n.double()]).cpu()
        module.train()
        total = all_reduce_sum(total)
        loss = (total[0] / total[1].clamp_min(1)).item()
        result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": total[1].item()}
        self.tracker.log_metrics(self.progress.step, result)
        if final and self.info.is_main:
            print(f"[train] validation: loss {loss:.4f} ppl {result['val_ppl']:.2f} "
                  f"over {int(result['val_tokens'])} tokens", flush=True)
            summary = {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen, **result,
                       "parameters": self.n_params}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            self.tracker.log_artifact(self.run_dir / "summary.json")

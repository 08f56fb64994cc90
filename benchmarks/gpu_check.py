"""`make gpu-check`: what no CPU can show, verified in one short run on one CUDA GPU.

    python benchmarks/gpu_check.py [--out DIR] [--only STEP,...] [--work DIR]
    python benchmarks/gpu_check.py --cpu-dry-run   # the same steps, tiny, on the CPU

Steps, cheapest and most informative first (a device lent for a few minutes may be
taken back at any time; every step's result is written as soon as it is known):

1. kernels   every Triton kernel against the torch / float64 reference on the device,
             forward and all gradients (`benchmarks/kernels_gpu.py --checks-only`);
2. tiny      the tiny preset, 20 steps on one GPU: FSDP2, bf16, inductor
             `torch.compile`, activation checkpointing; SIGTERM after step 10 (the
             trainer checkpoints and exits resumable), `--resume auto` to step 20, and
             the 20 losses equal, bitwise, to those of an uninterrupted run (run beside
             it on the same device to save time; tokens/s and MFU are read after the
             resume, when the run is alone);
3. 125m      the same with the `xlstm10-125m` preset (context 2048);
4. zero2     the tiny preset with DeepSpeed ZeRO-2, bf16, the same resume check;
5. generate  recurrent generation of 64 tokens from the tiny checkpoint equals the
             greedy path of full forwards (the step kernels against the chunkwise ones);
6. bench     `benchmarks/kernels_gpu.py` with a short default (S = 8192 and 2048).

The table (step, result, what was measured, seconds) goes to stdout and to
`benchmarks/results/gpu-check-<date>-<device>.md`; the exit code is 1 when any step
failed, 2 when there is no CUDA device. Data: the demo corpus (the Python standard
library's sources, tokenized on the spot), so the device needs no files of ours but
the checkout (and the wheels of `make gpu-wheels` where packages are missing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("kernels", "tiny", "125m", "zero2", "generate", "bench")
EXIT_RESUMABLE = 75  # pretrain.train's exit code after a signal-triggered checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(STEPS),
                    help=f"comma list of steps to run (default: all of {','.join(STEPS)})")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="folder of the result file")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each training check")
    ap.add_argument("--step-timeout", type=float, default=240,
                    help="seconds one subprocess may take before the step fails")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the steps on the CPU (interpreter kernels, gloo, fp32, no compile, "
                         "tiny shapes) to check the script itself")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        ap.error(f"--only: unknown step(s) {unknown}; allowed: {', '.join(STEPS)}")
    args.only = only
    if args.steps < 4:
        ap.error(f"--steps: got {args.steps}; the resume check needs at least 4")
    return args


class Check:
    """Runs the steps and keeps their rows: (step, ok, detail, seconds)."""

    def __init__(self, args: argparse.Namespace, work: Path, device: str) -> None:
        self.args, self.work, self.device = args, work, device
        self.dry = args.cpu_dry_run
        self.rows: list[tuple[str, bool, str, float]] = []
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1",
                        TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"))
        self.env.pop("MLFLOW_TRACKING_URI", None)  # a local store in each run dir
        if self.dry:
            self.env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        self._corpus: tuple[Path, Path] | None = None

    # ------------------------------------------------------------------ plumbing
    def step(self, name: str, fn: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as err:  # noqa: BLE001 - a failed step is a row, not the end
            detail, ok = f"{type(err).__name__}: {err}", False
        row = (name, ok, " ".join(detail.split()), time.perf_counter() - t0)
        self.rows.append(row)
        print(f"[gpu-check] {name}: {'ok' if ok else 'FAIL'} ({row[3]:.0f}s) {row[2]}", flush=True)

    def run(self, cmd: list[str], log: Path) -> subprocess.CompletedProcess:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=self.args.step_timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {tail(log)}")
        return proc

    def corpus(self) -> tuple[Path, Path]:
        """(tokenizer dir, shard dir) of the demo corpus, made once."""
        if self._corpus is None:
            code = ("import sys, data; t, s = data.make_demo_corpus(sys.argv[1], workers=4, "
                    "progress=False); print(t); print(s)")
            log = self.work / "corpus.log"
            self.run([sys.executable, "-c", code, str(self.work / "corpus")], log)
            tok, shards = log.read_text().split()[-2:]
            self._corpus = (Path(tok), Path(shards))
        return self._corpus

    # ------------------------------------------------------------------ steps
    def kernels(self) -> str:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--checks-only"]
        if self.dry:
            cmd.append("--cpu-dry-run")
        log = self.work / "kernels.log"
        self.run(cmd, log)
        lines = [x for x in log.read_text().splitlines() if x.startswith("check ")]
        worst = max(lines, key=lambda x: float(x.split("rel err")[1].split()[0]), default="none")
        return f"{len(lines)} checks passed; worst: {' '.join(worst.split()[1:])}"

    def train_cmd(self, run_dir: Path, preset: str, extra: list[str]) -> list[str]:
        tok, shards = self.corpus()
        device = ([] if self.dry else ["distributed.precision=bf16", "distributed.compile=true"])
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "pretrain.train", "--config", str(ROOT / "configs" / preset), "--resume", "auto",
            f"run_dir={run_dir}", f"data.train=[{shards}]", f"data.val={shards / 'val'}",
            f"data.tokenizer={tok}", f"train.steps={self.args.steps}", "train.log_every=1",
            "checkpoint.every=1000", "eval.batches=1", "schedule.warmup_steps=2",
            "distributed.activation_checkpointing=true", *device, *extra,
        ]

    def resume_check(self, name: str, preset: str, extra: list[str]) -> str:
        """An uninterrupted run and, beside it on the same device, a run stopped by SIGTERM
        mid-way and resumed: the same loss at every step, bitwise."""
        steps = self.args.steps
        straight, broken = self.work / f"{name}-straight", self.work / f"{name}-broken"
        cmd = self.train_cmd(broken, preset, extra)
        with self.start(self.train_cmd(straight, preset, extra), f"{name}-straight") as ref, \
                self.start(cmd, f"{name}-broken") as proc:
            wait_for_step(broken / "metrics.jsonl", steps // 2, proc, self.args.step_timeout)
            os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler's preemption does
            proc.wait(timeout=self.args.step_timeout)
            if ref.wait(timeout=self.args.step_timeout) != 0:
                raise RuntimeError(f"exit {ref.returncode}: {tail(self.work / f'{name}-straight.log')}")
        stopped = max(losses(broken), default=0)
        if not 0 < stopped < steps:
            raise RuntimeError(f"the SIGTERM did not stop the run mid-way (last step {stopped}, "
                               f"exit {proc.returncode}): {tail(self.work / f'{name}-broken.log')}")
        self.run(cmd, self.work / f"{name}-resumed.log")  # alone on the device: its speed counts
        a, b = losses(straight), losses(broken)
        if sorted(a) != list(range(1, steps + 1)) or sorted(b) != sorted(a):
            raise RuntimeError(f"logged steps differ: straight {sorted(a)}, resumed {sorted(b)}")
        diff = [s for s in a if a[s] != b[s]]
        if diff:
            worst = max(abs(a[s] - b[s]) for s in diff)
            raise RuntimeError(f"stopped at {stopped}, resumed: {len(diff)} of {steps} losses "
                               f"differ (first at step {diff[0]}, max |diff| {worst:.3e})")
        rows = [json.loads(x) for x in (broken / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "tokens_per_s" in r][-1]
        speed = f"tokens/s {last['tokens_per_s']:.4g}, MFU {100 * last.get('mfu', 0):.1f}%"
        return (f"stopped at step {stopped} by SIGTERM, resumed: {steps} losses bitwise equal "
                f"(final {a[steps]:.4f}); after resume {speed}")

    @contextlib.contextmanager
    def start(self, cmd: list[str], name: str) -> Iterator[subprocess.Popen]:
        """A process in a session of its own (so a signal reaches torchrun and its workers),
        killed with everything it started if the block ends early."""
        with open(self.work / f"{name}.log", "w") as fh:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                yield proc
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def generate(self) -> str:
        ckpt = self.work / "tiny-straight"
        if not ckpt.is_dir():
            raise RuntimeError("needs the checkpoint of the tiny step (run it first)")
        code = f"""
import torch
from pretrain.checkpoint import CheckpointManager, load_model
dev = "cpu" if {self.dry} else "cuda"
model, _ = load_model(CheckpointManager({str(ckpt / "checkpoints")!r}).latest().path)
model = model.to(dev).eval()
idx = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
idx = idx.to(dev)
with torch.no_grad():
    out = model.generate(idx, 64, temperature=0.0)
    path = idx
    for _ in range(64):
        path = torch.cat([path, model(path)[:, -1].argmax(-1, keepdim=True)], 1)
same = (out == path).all(1)
print("rows equal:", same.tolist(), "first difference at", (out != path).int().argmax(1).tolist())
assert bool(same.all())
"""
        log = self.work / "generate.log"
        self.run([sys.executable, "-c", code], log)
        return "64 greedy tokens by recurrent steps = argmax of full forwards (2 rows)"

    def bench(self) -> str:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--skip-checks",
               "--out", str(self.args.out)]
        cmd += ["--cpu-dry-run"] if self.dry else ["--seqlens", "8192,2048", "--reps", "5",
                                                  "--warmup", "2"]
        log = self.work / "bench.log"
        self.run(cmd, log)
        wrote = [x for x in log.read_text().splitlines() if x.startswith("wrote ")]
        return wrote[-1] if wrote else "table printed (see the log)"

    def all(self) -> None:
        plan: dict[str, Callable[[], str]] = {
            "kernels": self.kernels,
            "tiny": lambda: self.resume_check("tiny", "tiny.yaml", [
                "distributed.backend=fsdp", "data.seq_len=256", "train.micro_batch_size=8",
                "train.global_batch_size=8", "train.grad_accum=1"]),
            "125m": lambda: self.resume_check("125m", "xlstm10-125m.yaml", [
                "distributed.backend=fsdp", f"data.seq_len={256 if self.dry else 2048}",
                "train.micro_batch_size=2", "train.global_batch_size=4", "train.grad_accum=2",
                *(["model.num_blocks=2", "model.embedding_dim=64"] if self.dry else [])]),
            "zero2": lambda: self.resume_check("zero2", "tiny.yaml", [
                "distributed.backend=deepspeed", "distributed.zero_stage=2",
                "distributed.compile=false", "data.seq_len=256", "train.micro_batch_size=8",
                "train.global_batch_size=8", "train.grad_accum=1"]),
            "generate": self.generate,
            "bench": self.bench,
        }
        for name in self.args.only:
            self.step(name, plan[name])
            self.write()

    def write(self) -> Path:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() else "-" for c in self.device).strip("-")
        path = out / f"gpu-check-{dt.date.today():%Y-%m-%d}-{safe}.md"
        path.write_text(table(self.rows, self.device))
        return path


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float) -> None:
    """Return once `metrics` (metrics.jsonl) has a row of `step`; raise if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if step in losses(metrics.parent):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"training ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {metrics} after {timeout:.0f}s")


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of a run dir's metrics.jsonl (the last row of a step wins)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in row and "step" in row:
            out[int(row["step"])] = float(row["loss"])
    return out


def tail(log: Path, lines: int = 3) -> str:
    """The first error line of a log (a worker's, not the launcher's report), else its end."""
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    errors = [x for x in text if re.match(r"[\w.]*(Error|Exception)\b|.*\berror:", x)]
    return (errors[0] if errors else " | ".join(text[-lines:])) + f" (log: {log})"


def table(rows: list[tuple[str, bool, str, float]], device: str) -> str:
    import torch

    head = [f"# gpu-check on {device}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, `make gpu-check` "
            "(benchmarks/gpu_check.py)", "", "| step | result | measured | s |", "|---|---|---|---|"]
    body = [f"| {n} | {'ok' if ok else '**FAIL**'} | {d.replace('|', '/')} | {s:.0f} |"
            for n, ok, d, s in rows]
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.cpu_dry_run:
        device = "cpu-dry-run"
        if args.out == str(ROOT / "benchmarks" / "results"):
            args.out = tempfile.mkdtemp(prefix="gpu-check-dry-")
    elif not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a "
              "GPU machine, or pass --cpu-dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    else:
        device = torch.cuda.get_device_name(0)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args, work, device)
    print(f"[gpu-check] {device}; steps {','.join(args.only)}; scratch {work}", flush=True)
    check.all()
    path = check.write()
    print(table(check.rows, device))
    print(f"[gpu-check] wrote {path}")
    return 0 if all(ok for _, ok, _, _ in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())

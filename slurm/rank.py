"""One training rank under torchrun inside a Slurm job: runs the trainer, records how it ended.

    torchrun ... -m slurm.rank --config CONFIG --resume auto key=value ...

torchrun cannot pass a worker's exit code on: a rank that exits with the trainer's
EXIT_RESUMABLE (75, "stopped by a signal after a checkpoint") is a failure to it, it
SIGTERMs the other local ranks and exits 1, and srun --kill-on-bad-exit then kills the
other nodes (rank 0 may still be closing its MLflow run). So this wrapper

* runs `python -m pretrain.train ARGS` as its child (killed with it: PR_SET_PDEATHSIG);
* forwards SIGTERM/SIGINT at once, and a stop signal (USR1/USR2) once the trainer catches
  it: the child starts with USR1/USR2 ignored, so a signal that arrives while it is still
  starting (before its stop-flag handler exists) cannot kill it; it is held here and sent
  as soon as /proc shows the handler (SigCgt). It is sent once: a second one during the
  trainer's interpreter shutdown (handlers back to default) would kill it after its
  checkpoint;
* writes `$XLSTM_STATUS_DIR/rank-<RANK>.stopping` once the trainer has the stop signal
  (the batch script and slurm/task.py send it again until some rank has it: a signal sent
  while the ranks were still being started reaches nobody);
* writes the trainer's exit code to `$XLSTM_STATUS_DIR/rank-<RANK>.exit` (the batch script
  reads rank 0's to decide: 0 finished, 75 requeue, else failed);
* exits 0 for 0 and 75 (torchrun and srun see a clean end), the trainer's code otherwise.

Only the standard library: this process stays small next to the trainer.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_RESUMABLE = 75  # pretrain.train.EXIT_RESUMABLE (not imported: slurm imports pretrain config only)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
FORWARDED = (signal.SIGTERM, signal.SIGINT, *STOP_SIGNALS)


def status_file(status_dir: str | Path, rank: int) -> Path:
    return Path(status_dir) / f"rank-{rank}.exit"


def stopping_file(status_dir: str | Path, rank: int) -> Path:
    """Written when this rank's trainer has been handed a stop signal."""
    return Path(status_dir) / f"rank-{rank}.stopping"


def _child_setup() -> None:
    for sig in STOP_SIGNALS:  # until the trainer installs its own handler
        signal.signal(sig, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive this wrapper
    except (OSError, AttributeError):
        pass


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (the SigCgt mask in /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        return True  # no /proc: send it and hope
    return False


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    child = subprocess.Popen([sys.executable, "-m", "pretrain.train", *args],
                             preexec_fn=_child_setup)
    pending: list[int] = []

    def forward(signum, frame) -> None:  # noqa: ARG001
        pending.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    rank = int(os.environ.get("RANK", "0"))
    status_dir = os.environ.get("XLSTM_STATUS_DIR")
    held: int | None = None  # a stop signal the trainer does not catch yet
    while True:
        while pending:
            sig = pending.pop(0)
            if sig in STOP_SIGNALS:
                held = sig
                continue
            try:
                child.send_signal(sig)
            except ProcessLookupError:
                pass
        if child.poll() is not None:
            break
        if held is not None and _catches(child.pid, held):
            try:
                child.send_signal(held)
                if status_dir:
                    Path(status_dir).mkdir(parents=True, exist_ok=True)
                    stopping_file(status_dir, rank).write_text(f"{signal.Signals(held).name}\n")
                print(f"[slurm.rank] rank {os.environ.get('RANK', '0')}: "
                      f"{signal.Signals(held).name} passed to the trainer", file=sys.stderr,
                      flush=True)
            except ProcessLookupError:
                pass
            held = None
        time.sleep(0.05)
    code = child.returncode
    if status_dir:
        path = status_file(status_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{code}\n")
        os.replace(tmp, path)
    if code in (0, EXIT_RESUMABLE):
        return 0
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())

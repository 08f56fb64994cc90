"""One training rank under torchrun inside a Slurm job: runs the trainer, records how it ended.

    torchrun ... -m slurm.rank --config CONFIG --resume auto key=value ...

torchrun cannot pass a worker's exit code on: a rank that exits with the trainer's
EXIT_RESUMABLE (75, "stopped by a signal after a checkpoint") is a failure to it, it
SIGTERMs the other local ranks and exits 1, and srun --kill-on-bad-exit then kills the
other nodes (rank 0 may still be closing its MLflow run). So this wrapper

* runs `python -m pretrain.train ARGS` as its child (killed with it: PR_SET_PDEATHSIG);
* forwards SIGTERM/SIGINT/SIGUSR1/SIGUSR2 to it. A stop signal (USR1/USR2) is sent again
  every few seconds until the trainer ends, so a signal that arrives while the trainer is
  still starting (before its handler exists; the child starts with USR1/USR2 ignored, so
  the early signal cannot kill it) still stops it at the next step boundary;
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
RESEND_S = 5.0


def status_file(status_dir: str | Path, rank: int) -> Path:
    return Path(status_dir) / f"rank-{rank}.exit"


def _child_setup() -> None:
    for sig in STOP_SIGNALS:  # until the trainer installs its own handler
        signal.signal(sig, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive this wrapper
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    child = subprocess.Popen([sys.executable, "-m", "pretrain.train", *args],
                             preexec_fn=_child_setup)
    pending: list[int] = []

    def forward(signum, frame) -> None:  # noqa: ARG001
        pending.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    stop_sig: int | None = None
    last_sent = 0.0
    while True:
        while pending:
            sig = pending.pop(0)
            if sig in STOP_SIGNALS:
                stop_sig = sig
            try:
                child.send_signal(sig)
                last_sent = time.monotonic()
            except ProcessLookupError:
                pass
        if child.poll() is not None:
            break
        if stop_sig is not None and time.monotonic() - last_sent > RESEND_S:
            pending.append(stop_sig)
        time.sleep(0.1)
    code = child.returncode
    rank = int(os.environ.get("RANK", "0"))
    status_dir = os.environ.get("XLSTM_STATUS_DIR")
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

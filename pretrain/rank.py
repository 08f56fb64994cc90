"""One training rank under torchrun: runs the trainer, records how it ended.

    torchrun ... -m pretrain.rank --config CONFIG --resume auto key=value ...

Used by `python -m pretrain.launch` (the documented launch), the Slurm batch script and
slurm/task.py. torchrun cannot pass a worker's exit code on: a rank that exits with the
trainer's EXIT_RESUMABLE (75, "stopped by a signal after a checkpoint"), or with a
config/input error (2) or a full disk (74), is a crash to it: it SIGTERMs the other
local ranks (rank 0 may still be printing its one line or closing its MLflow run),
prints its own traceback and exits 1, and srun --kill-on-bad-exit then kills the other
nodes. So this wrapper

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
* exits 0 for 0 and 75 (torchrun and srun see a clean end); for 2 and 74 (the trainer's
  deliberate stops, alike on every rank) it first waits (up to ON_PURPOSE_WAIT_S) until
  every rank of this node has recorded its code, and exits 0 when all ended on purpose:
  no rank is killed before it has printed. A mix (one rank on purpose, another crashed
  or still running) exits with the trainer's code, and torchrun stops the node as for any
  crash;
* exits with the trainer's code otherwise (128 + N for a signal N).

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

EXIT_RESUMABLE = 75  # pretrain.train.EXIT_RESUMABLE (not imported: this wrapper stays free of torch)
EXIT_CLEAN = (0, EXIT_RESUMABLE)  # torchrun may see these at once: every rank stops at the same step
EXIT_ON_PURPOSE = (2, 74)  # config/input error, disk full (pretrain.train.EXIT_DISK_FULL)
ON_PURPOSE_WAIT_S = 30.0  # how long a rank that stopped on purpose waits for its node's others
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
FORWARDED = (signal.SIGTERM, signal.SIGINT, *STOP_SIGNALS)


def status_file(status_dir: str | Path, rank: int) -> Path:
    return Path(status_dir) / f"rank-{rank}.exit"


def stopping_file(status_dir: str | Path, rank: int) -> Path:
    """Written when this rank's trainer has been handed a stop signal."""
    return Path(status_dir) / f"rank-{rank}.stopping"


def node_ended_on_purpose(status_dir: str | Path, timeout: float = ON_PURPOSE_WAIT_S) -> bool:
    """Whether every rank of this node (torchrun numbers them RANK - LOCAL_RANK + i) has
    recorded an exit code in EXIT_CLEAN or EXIT_ON_PURPOSE, waiting up to `timeout` s."""
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    files = [status_file(status_dir, rank - local + i)
             for i in range(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))]
    deadline = time.monotonic() + timeout
    while not all(f.is_file() for f in files):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    try:
        codes = [int(f.read_text().strip()) for f in files]
    except (OSError, ValueError):
        return False
    return all(c in EXIT_CLEAN + EXIT_ON_PURPOSE for c in codes)


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
                print(f"[pretrain.rank] rank {os.environ.get('RANK', '0')}: "
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
    if code in EXIT_CLEAN:
        return 0
    if code in EXIT_ON_PURPOSE and status_dir and node_ended_on_purpose(status_dir):
        return 0  # the status files carry the code; torchrun sees a clean end
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())

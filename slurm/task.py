"""What a submitit job runs: one call per node, each starting torchrun for that node's ranks.

`TrainTask` is pickled by `python -m slurm.submit` (it lives here, not in submit.py, so the
job can unpickle it by module name). On each task (one per node) `__call__` starts

    torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HEAD:PORT \
        -m pretrain.rank --config CONFIG --resume auto key=value ...

and waits. Preemption goes through submitit's own path: Slurm sends the signal (USR2 by
default, `--signal=USR2@delay` to every process of the step); submitit's handler on the
global-rank-0 task calls `checkpoint()`, which makes sure the local ranks have the signal,
waits until rank 0 has recorded how the trainer ended (after its checkpoint), and returns
the same task for submitit to pickle and requeue (`scontrol requeue`). The requeued job runs
`__call__` again; `--resume auto` continues from the checkpoint and the same MLflow run.
The requeue budget (`max_requeues`) is counted here and by SLURM_RESTART_COUNT.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pretrain.rank import EXIT_RESUMABLE, STOP_SIGNALS, status_file

ROOT = Path(__file__).resolve().parent.parent


class RequeueBudgetExceeded(RuntimeError):
    pass


class TrainingFailed(RuntimeError):
    pass


def node_address(host: str) -> str:
    """The address of a node: Slurm's NodeAddr for it, resolved to IPv4 when possible."""
    addr = host
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True,
                             timeout=30).stdout
        for field in out.split():
            if field.startswith("NodeAddr="):
                addr = field.split("=", 1)[1] or host
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return socket.gethostbyname(addr)
    except OSError:
        return addr


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


class TrainTask:
    """A checkpointable submitit callable (see the module docstring)."""

    def __init__(self, config: str, overrides: list[str], run_dir: str, nodes: int,
                 nproc_per_node: int, max_requeues: int, python: str | None = None,
                 stop_timeout_s: float = 1800.0) -> None:
        self.config = config
        self.overrides = list(overrides)
        self.run_dir = run_dir
        self.nodes = nodes
        self.nproc_per_node = nproc_per_node
        self.max_requeues = max_requeues
        self.python = python or sys.executable
        self.stop_timeout_s = stop_timeout_s
        self.requeues = 0
        self._proc: subprocess.Popen | None = None
        self._status_dir: Path | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = None
        state["_status_dir"] = None
        return state

    # ------------------------------------------------------------------ the job
    def _job(self) -> tuple[str, int, int, str]:
        """(job id, restart count, node index, rendezvous host:port) of this task."""
        import submitit

        env = submitit.JobEnvironment()
        job_id = os.environ.get("SLURM_JOB_ID") or str(env.job_id)
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        node = env.node
        if os.environ.get("XLSTM_MASTER_ADDR"):
            addr = os.environ["XLSTM_MASTER_ADDR"]
        elif env.cluster == "slurm":
            addr = node_address(env.hostnames[0])
        else:
            addr = "127.0.0.1"
        digits = "".join(c for c in job_id if c.isdigit()) or "0"
        port = int(os.environ.get("XLSTM_MASTER_PORT", 20000 + int(digits) % 20000))
        return job_id, max(restart, self.requeues), node, f"{addr}:{port}"

    def command(self, rdzv_id: str, node: int, endpoint: str) -> list[str]:
        """The torchrun command line of one node's task."""
        return [self.python, "-m", "torch.distributed.run", f"--nnodes={self.nodes}",
                f"--nproc-per-node={self.nproc_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
                f"--rdzv-conf=is_host={1 if node == 0 else 0}", "--max-restarts=0",
                "-m", "pretrain.rank", "--config", self.config, "--resume", "auto", *self.overrides]

    def __call__(self) -> dict:
        job_id, restart, node, endpoint = self._job()
        self._status_dir = Path(self.run_dir) / "slurm" / f"{job_id}.{restart}"
        self._status_dir.mkdir(parents=True, exist_ok=True)
        if node == 0:
            for old in [*self._status_dir.glob("rank-*.exit"), *self._status_dir.glob("rank-*.stopping")]:
                old.unlink()
        cmd = self.command(f"{job_id}.{restart}", node, endpoint)
        env = dict(os.environ, XLSTM_STATUS_DIR=str(self._status_dir),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.setdefault("OMP_NUM_THREADS", "1")
        print(f"[slurm.task] job {job_id} run {restart} node {node}: {' '.join(cmd)}", flush=True)

        def ignore_stop_signals() -> None:  # torchrun: the stop signals are for the ranks
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

        self._proc = subprocess.Popen(cmd, cwd=ROOT, env=env, preexec_fn=ignore_stop_signals)
        while self._proc.poll() is None:
            time.sleep(0.5)
        rc = self._proc.returncode
        code = self._rank0_code(timeout=60.0)
        if rc == 0 and code == 0:
            print(f"[slurm.task] training finished ({self.run_dir})", flush=True)
            return {"run_dir": self.run_dir, "status": "finished"}
        if code == EXIT_RESUMABLE:
            import submitit

            job_env = submitit.JobEnvironment()
            if job_env.global_rank == 0:
                # the stop reached the trainer without passing through submitit's handler:
                # run that handler now (checkpoint() below, then submitit requeues)
                os.kill(os.getpid(), job_env._usr_sig())
                time.sleep(5)
            return {"run_dir": self.run_dir, "status": "stopped"}
        raise TrainingFailed(f"training failed: torchrun exit {rc}, rank 0 trainer exit {code}; "
                             f"not requeued (logs above; checkpoints in {self.run_dir})")

    def _signal_ranks(self) -> None:
        """The stop signal to this node's pretrain.rank wrappers (Slurm may deliver it only to
        the task itself; any one rank with it stops them all at the next step boundary)."""
        if self._proc is not None and self._proc.poll() is None:
            for pid in _children(self._proc.pid):
                try:
                    os.kill(pid, STOP_SIGNALS[-1])
                except ProcessLookupError:
                    pass

    def _rank0_code(self, timeout: float, signal_ranks: bool = False) -> int | None:
        """Rank 0's recorded trainer exit code; with `signal_ranks`, the stop signal is sent
        (again every 5 s) until some rank's trainer has it."""
        assert self._status_dir is not None
        path = status_file(self._status_dir, 0)
        deadline = time.monotonic() + timeout
        sent = -1e9
        while not path.exists() and time.monotonic() < deadline:
            if signal_ranks and time.monotonic() - sent > 5:
                if any(self._status_dir.glob("rank-*.stopping")):
                    signal_ranks = False
                else:
                    self._signal_ranks()
                    sent = time.monotonic()
            time.sleep(0.2)
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ preemption
    def checkpoint(self, *args, **kwargs):
        """submitit's preemption / timeout hook (global rank 0 only): wait for the ranks'
        checkpoint, then hand submitit the same task to requeue."""
        import submitit

        print("[slurm.task] stop signal: waiting for the ranks to checkpoint", flush=True)
        started = self._proc is not None
        code = self._rank0_code(self.stop_timeout_s, signal_ranks=True) if started else EXIT_RESUMABLE
        if code == 0:
            print("[slurm.task] training had already finished; not requeued", flush=True)
            return None
        if code != EXIT_RESUMABLE:
            raise TrainingFailed(f"stop signal, but rank 0's trainer ended with {code} instead of "
                                 f"a checkpoint ({EXIT_RESUMABLE}); not requeued")
        used = max(self.requeues, int(os.environ.get("SLURM_RESTART_COUNT", "0")))
        if used >= self.max_requeues:
            raise RequeueBudgetExceeded(
                f"requeue budget exceeded: stopped with a checkpoint after {used} requeue(s) "
                f"(--max-requeues {self.max_requeues}); not requeued. Submit the same command "
                f"again to continue from the checkpoint in {self.run_dir}.")
        if self._proc is not None:
            deadline = time.monotonic() + 60
            while self._proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        nxt = TrainTask(self.config, self.overrides, self.run_dir, self.nodes,
                        self.nproc_per_node, self.max_requeues, self.python, self.stop_timeout_s)
        nxt.requeues = used + 1
        print(f"[slurm.task] checkpoint written; requeue {used + 1} of {self.max_requeues}",
              flush=True)
        return submitit.helpers.DelayedSubmission(nxt)

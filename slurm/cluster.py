"""A real Slurm cluster on this one machine, for tests and for trying the launcher by hand.

    python -m slurm.cluster up   /tmp/xlstm-slurm [--nodes 2] [--cpus 1]   # prints the env to export
    python -m slurm.cluster down /tmp/xlstm-slurm

munged, slurmctld and N `slurmd -N nX` daemons (Debian's Slurm has multiple-slurmd) on
127.0.0.1, each node with its own port; key, config, state, spool, pids and logs all under
one folder. Settings that work without systemd or cgroups: proctrack/linuxproc, task/none,
select/cons_tres, no accounting, munge credentials that expire after 5 s (so a requeued job
starts again by itself, ~8 s later). `down` cancels every job and then ends every process whose
environment names this cluster's `SLURM_CONF` (daemons, slurmstepd, job processes), by pid,
so nothing is left running.

Used by tests/test_slurm.py as a fixture (`LocalCluster(root).start()` ... `.stop()`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["LocalCluster", "SlurmMissing", "missing_binaries"]

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


class SlurmMissing(RuntimeError):
    pass


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """munge + slurmctld + `nodes` slurmd daemons under `root` (see the module docstring)."""

    def __init__(self, root: str | Path, nodes: int = 2, cpus: int = 1,
                 partition: str = "debug") -> None:
        self.root = Path(root).resolve()
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}

    # ----------------------------------------------------------------- environment
    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, srun, scontrol, submitit) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self, **extra: str) -> dict[str, str]:
        out = dict(os.environ, **self.env, **extra)
        for key in [k for k in out if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_"))]:
            out.pop(key)  # a cluster started from inside a job must not inherit that job
        return out

    # ----------------------------------------------------------------- bring-up
    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        lines = [
            "ClusterName=xlstmlocal",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            f"TmpFS={r / 'tmp'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "EnforcePartLimits=ALL",
            "MinJobAge=3600",
            "KillWait=30",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MessageTimeout=20",
            "MailProg=/bin/true",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 - kept by the child
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(self.client_env(), SLURM_CONF=str(self.conf)), start_new_session=True)
        log.close()
        (self.root / "run" / "pids.json").write_text(
            json.dumps({k: p.pid for k, p in self.procs.items()}))

    def start(self, timeout: float = 60.0) -> LocalCluster:
        missing = missing_binaries()
        if missing:
            raise SlurmMissing(f"not installed: {', '.join(missing)} "
                               "(apt-get install -y slurm-wlm munge)")
        for sub in ("munge", "state", "spool", "run", "log", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for name in self.nodes:
            (self.root / "spool" / name).mkdir(exist_ok=True)
        os.chmod(self.root / "munge", 0o755)  # munged wants its socket folder open to all
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self._write_config()
        try:
            m = self.root / "munge"
            self._spawn("munged", [_which("munged"), "-F", "--force",
                                   f"--socket={self.munge_socket}", f"--key-file={key}",
                                   f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                                   f"--seed-file={m / 'munged.seed'}"])
            self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(self._ctld_up, timeout, "slurmctld")
            for name in self.nodes:
                self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._nodes_idle, timeout, "slurmd nodes idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while waiting for {what}:\n{self.logs()}")
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def scontrol(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([_which("scontrol"), *args], capture_output=True, text=True,
                              env=self.client_env(), timeout=30, check=check)

    def _ctld_up(self) -> bool:
        return self.scontrol("ping").stdout.count("UP") > 0

    def _nodes_idle(self) -> bool:
        out = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%N %t"], capture_output=True,
                             text=True, env=self.client_env(), timeout=30).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n, "").rstrip("*") in ("idle", "mix", "alloc") for n in self.nodes)

    def logs(self, tail: int = 2000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.is_file():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # ----------------------------------------------------------------- tear-down
    def _ours(self) -> list[int]:
        """Pids of live processes whose environment names this cluster's config."""
        needle = f"SLURM_CONF={self.conf}".encode()
        me, pids = os.getpid(), []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in env:
                pids.append(int(d.name))
        for proc in self.procs.values():  # the daemons, even if they changed their env
            if proc.poll() is None and proc.pid not in pids:
                pids.append(proc.pid)
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job, stop the daemons, end every process left; leaves nothing."""
        if self.conf.exists() and "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run([_which("scancel"), "--full", "-u", "root"], capture_output=True,
                           env=self.client_env(), timeout=30)
            time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.procs.values()):
                break
            time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self._ours():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + 10
            while self._ours() and time.monotonic() < end:
                time.sleep(0.1)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = self._ours()
        if left:
            raise RuntimeError(f"processes of the cluster at {self.root} still alive: {left}")
        self.procs.clear()


def _down(root: Path) -> None:
    """Stop a cluster started by another process (`up`): by the recorded pids, then the sweep."""
    cluster = LocalCluster(root)
    pids = json.loads((root / "run" / "pids.json").read_text()) if (root / "run" / "pids.json").exists() else {}
    if cluster.conf.exists():
        subprocess.run([_which("scancel"), "--full", "-u", "root"], capture_output=True,
                       env=cluster.client_env(), timeout=30)
        time.sleep(0.5)
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(1.0)
    cluster.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurm.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("root", help="folder for key, config, state and logs")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=1, help="CPUs per node")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if args.action == "down":
        _down(root)
        print(f"cluster at {root} stopped")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root, nodes=args.nodes, cpus=args.cpus)
    try:
        cluster.start()
    except (SlurmMissing, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for proc in cluster.procs.values():  # keep running after this process ends
        proc.returncode = 0
    print(f"export SLURM_CONF={cluster.conf}\n# nodes: {' '.join(cluster.nodes)}; logs: {root / 'log'}"
          f"\n# stop: python -m slurm.cluster down {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

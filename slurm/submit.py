"""Submit a pretraining job through submitit.

    python -m slurm.submit --config configs/xlstm71-1.3b.yaml --nodes 4 --gpus-per-node 8 \
        [--cpus-per-task C] [--partition P] [--time 24:00:00] [--account A] [--qos Q] \
        [--max-requeues R] [--signal USR2] [--signal-delay-s 300] [--folder DIR] \
        [--dry-run | --local] [key=value ...]

One Slurm task per node; each runs torchrun for that node's ranks (`--nproc-per-node`,
else the GPUs per node, else on a CPU partition one rank per CPU of the task), c10d rendezvous on the first node. The
config is loaded and checked here first (with the job's world size), so a bad config fails
before anything is queued. Prints the job id, the log paths and where the MLflow run is.

--dry-run   print the batch script that would be submitted and exit (needs no Slurm).
--local     run the same job on this machine with submitit's local executor (one node),
            wait for it and print how it ended.

Preemption and time limits: Slurm sends the signal `--signal-delay-s` before the limit
(`--signal=USR2@N`, to every process of the job); submitit's handler on the first task
calls the task's checkpoint hook (slurm/task.py), which waits for the ranks' checkpoint and
lets submitit requeue the job, at most `--max-requeues` times. The requeued job resumes
with `--resume auto` and continues the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HINTS = [
    ("Requested node configuration is not available",
     "the partition has fewer nodes, CPUs or GPUs per node than asked for: compare --nodes, "
     "--gpus-per-node and --cpus-per-task with `sinfo -p PARTITION -o '%D %c %G'`"),
    ("More processors requested than permitted",
     "more nodes (or CPUs) than the partition has: compare --nodes and --cpus-per-task with "
     "`sinfo -p PARTITION -o '%D %c'` (nodes, CPUs per node)"),
    ("Node count specification invalid",
     "more nodes than the partition allows: see `scontrol show partition PARTITION` (MaxNodes)"),
    ("Invalid partition", "no such partition: `sinfo -s` lists them; pass --partition"),
    ("Invalid account", "pass an account you may use with --account (`sacctmgr show assoc user=$USER`)"),
    ("Invalid qos", "pass a QOS your account has with --qos"),
    ("time limit", "--time is above the partition's MaxTime: see `sinfo -o '%P %l'`"),
    ("Invalid generic resource", "the partition has no GPUs of that kind: see `sinfo -o '%P %G'`"),
]


def hint_for(message: str) -> str:
    for needle, hint in HINTS:
        if needle.lower() in message.lower():
            return hint
    return "see the message above; `sbatch --test-only` with the same options shows what Slurm thinks"


def job_error(text: str) -> str:
    """The exception line of a submitit failure report (which ends with log paths)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    found = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Exceeded|Failed)\b.*: ", x)]
    return found[-1] if found else (lines[-1] if lines else text)


def parse_time(text: str) -> int:
    """Slurm time (MM, HH:MM:SS, D-HH:MM[:SS]) -> minutes (at least 1)."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        h, m, s = (0, parts[0], 0) if not days else (parts[0], 0, 0)
    elif len(parts) == 2:
        h, m, s = (0, parts[0], parts[1]) if not days else (parts[0], parts[1], 0)
    else:
        h, m, s = parts[:3]
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML preset (configs/*.yaml)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU partition")
    ap.add_argument("--nproc-per-node", type=int, default=None,
                    help="ranks per node (default: --gpus-per-node; on a CPU partition "
                         "--cpus-per-task, one rank per CPU; else 1)")
    ap.add_argument("--cpus-per-task", type=int, default=None, help="CPUs of each node's task")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--time", default="24:00:00", help="time limit (HH:MM:SS, D-HH:MM, minutes)")
    ap.add_argument("--account", default=None)
    ap.add_argument("--qos", default=None)
    ap.add_argument("--job-name", default="xlstm-pretrain")
    ap.add_argument("--max-requeues", type=int, default=10,
                    help="requeue budget for preemptions and time limits")
    ap.add_argument("--signal", default="USR2", choices=["USR1", "USR2"],
                    help="the stop signal (USR2: NCCL may claim USR1)")
    ap.add_argument("--signal-delay-s", type=int, default=300,
                    help="seconds before the time limit that the signal is sent")
    ap.add_argument("--folder", default=None,
                    help="submitit folder for pickles and logs (default: RUN_DIR/submitit/%%j)")
    ap.add_argument("--dry-run", action="store_true", help="print the batch script and exit")
    ap.add_argument("--local", action="store_true", help="run here with submitit's local executor")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-4")
    args = ap.parse_args(argv)
    if args.dry_run and args.local:
        ap.error("--dry-run and --local exclude each other")
    if args.local and args.nodes != 1:
        ap.error("--local runs one node: use --nodes 1")
    return args


def mlflow_line(cfg, run_dir: Path) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
    record = run_dir / "mlflow_run.json"
    run_id = None
    if record.exists():
        try:
            run_id = json.loads(record.read_text()).get("run_id")
        except (OSError, ValueError):
            pass
    which = f"continues run {run_id}" if run_id else f"run id written to {record} at start"
    return f"MLflow: {uri}, experiment {cfg.tracking.experiment!r}, {which}"


def sbatch_parameters(args: argparse.Namespace, setup: list[str]) -> dict:
    params: dict = {
        "job_name": args.job_name, "time": parse_time(args.time), "nodes": args.nodes,
        "ntasks_per_node": 1, "signal_delay_s": args.signal_delay_s, "setup": setup,
        "stderr_to_stdout": True, "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {"requeue": True},
    }
    for key, value in (("partition", args.partition), ("account", args.account),
                       ("qos", args.qos), ("cpus_per_task", args.cpus_per_task)):
        if value is not None:
            params[key] = value
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    return params


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = args.signal  # read by submitit at import, and by the job
    nproc = args.nproc_per_node or args.gpus_per_node or args.cpus_per_task or 1
    world = args.nodes * nproc
    config = Path(args.config)
    if not config.is_file() and (ROOT / config).is_file():
        config = ROOT / config
    if not config.is_file():
        print(f"error: config {args.config} does not exist (looked in {Path.cwd()} and {ROOT})",
              file=sys.stderr)
        return 2
    config = config.resolve()
    from pretrain.config import ConfigError, load_checked_config
    from pretrain.plan import plan_summary_line

    try:
        # a wrong data or tokenizer path fails here, not after the queue
        cfg = load_checked_config(config, args.overrides, world_size=world)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    # the plan on the nodes' GPUs (taken as H100s) with its memory simulation; CPU jobs:
    # instant. On stderr: a dry run's stdout is the sbatch script.
    gpu = "h100" if args.gpus_per_node else "cpu"
    print(plan_summary_line(cfg, world, gpu=gpu, memory=gpu != "cpu"), file=sys.stderr, flush=True)
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_absolute():
        run_dir = (ROOT / run_dir).resolve()  # the job runs in the repository root
        args.overrides = [*args.overrides, f"run_dir={run_dir}"]
    folder = Path(args.folder).resolve() if args.folder else run_dir / "submitit" / "%j"

    import submitit
    from submitit.slurm import slurm as submitit_slurm

    from .task import TrainTask

    setup = [f"cd {ROOT}", f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}",
             f"export SUBMITIT_PREEMPT_SIGNAL={args.signal}",
             "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"]
    params = sbatch_parameters(args, setup)
    task = TrainTask(str(config), args.overrides, str(run_dir), args.nodes, nproc, args.max_requeues)

    if args.dry_run:
        command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
        print(submitit_slurm._make_sbatch_string(command=command, folder=folder, **params))
        node_cmd = " ".join(task.command("$SLURM_JOB_ID.$SLURM_RESTART_COUNT", 0, "HEAD:PORT"))
        print(f"# each task (one per node) runs, from slurm/task.py:\n# {node_cmd}")
        return 0

    if args.local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=parse_time(args.time), tasks_per_node=1, nodes=1,
                                   signal_delay_s=args.signal_delay_s)
    else:
        if shutil.which("sbatch") is None:
            print("error: sbatch is not on PATH (not a Slurm login node?); try --dry-run or --local",
                  file=sys.stderr)
            return 2
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(**params)
    try:
        job = executor.submit(task)
    except submitit.core.utils.FailedJobError as err:
        message = re.sub(r"\s+", " ", str(err)).strip()
        print(f"error: sbatch rejected the job: {message}\nhint: {hint_for(message)}",
              file=sys.stderr)
        return 1
    print(f"job {job.job_id} submitted ({args.nodes} node(s) x {nproc} rank(s))")
    print(f"log: {job.paths.stdout}")
    print(f"run dir: {run_dir} (checkpoints in {cfg.checkpoint.dir or run_dir / 'checkpoints'})")
    print(mlflow_line(cfg, run_dir), flush=True)
    if args.local:
        try:
            result = job.result()
        except Exception as err:  # noqa: BLE001 - the job's own error, shown as one message
            print(f"error: the local job failed: {job_error(str(err))}\nlog: {job.paths.stdout}",
                  file=sys.stderr)
            return 1
        print(f"done: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The launch command for one or many processes per node: torchrun, with the trainer's exit code.

    python -m pretrain.launch --nproc_per_node=N [torchrun options] -- --config configs/X.yaml \\
        [--resume auto] [--fallback-on-corrupt] [key.sub=value ...]

Everything before `--` is torchrun's (`torch.distributed.run`: `--nnodes`, `--rdzv-*`, ...;
one node needs nothing else), everything after it is `pretrain.train`'s. The ranks run
through `pretrain.rank`, the wrapper the Slurm path uses: it records each trainer's exit code
in a status folder (`$XLSTM_STATUS_DIR`, else a temporary one) and ends cleanly in
torchrun's eyes when every rank of the node stopped on purpose. So:

* a config error or a missing path is found here, before any rank starts (the trainer's
  own checks, `pretrain.config`): one line, exit 2;
* an input error found in the ranks prints the trainer's one line (rank 0) and exits 2; a full
  disk exits 74; a stop by SIGTERM / SIGUSR1 / SIGUSR2 (to the ranks, or SIGTERM to this
  launcher, which torchrun passes to them) exits 75 after the checkpoint: the codes of
  README's "Reliability" table, with no torchrun traceback;
* a real crash (a rank exits 1, dies by a signal, or ranks disagree) is torchrun's own
  report, unchanged: the ranks' output, its ChildFailedError traceback and failure table,
  exit 1.

Plain `torchrun -m pretrain.train` runs the same training, but reports every non-zero exit
as a crash (exit 1) and may kill rank 0 before it prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import parse_args, run

from .config import ConfigError, load_checked_config
from .rank import EXIT_ON_PURPOSE, EXIT_RESUMABLE, ON_PURPOSE_WAIT_S
from .train import parse_args as parse_train_args

ROOT = Path(__file__).resolve().parent.parent
USAGE = "usage: python -m pretrain.launch [torchrun options] -- --config CONFIG [pretrain.train options]"


def recorded_code(status_dir: Path) -> int | None:
    """The trainer exit code the ranks recorded (`pretrain.rank`'s rank-N.exit): rank 0's when
    it is in `status_dir`, else the lowest rank's non-zero one; None if none recorded one."""
    codes = {}
    for f in status_dir.glob("rank-*.exit"):
        try:
            codes[int(f.name[len("rank-"):-len(".exit")])] = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
    if not codes:
        return None
    if 0 in codes:
        return codes[0]
    return next((c for _, c in sorted(codes.items()) if c), 0)


def config_error(train_argv: list[str], nnodes: str, nproc_per_node: str) -> str | None:
    """The trainer's own config and input checks (pretrain.config), once, before any rank
    starts: a bad key or a missing path is one line in a second, not N ranks starting to
    say it. None if they pass, or if the world size is not fixed yet (an elastic
    `--nnodes` range, `--nproc_per_node auto`): then the ranks check as always."""
    lo, _, hi = nnodes.partition(":")
    if (hi and hi != lo) or not lo.isdigit() or not nproc_per_node.isdigit():
        return None
    targs = parse_train_args(train_argv)  # a usage error exits 2 here, as in a rank
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # warnings: rank 0 prints them
            load_checked_config(targs.config, targs.overrides, world_size=int(lo) * int(nproc_per_node))
    except ConfigError as err:
        return str(err)  # the line pretrain.train prints
    return None


@record  # as torchrun's own main: a crash's root cause goes to the launcher's error file too
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv[:argv.index("--")] if "--" in argv else argv):
        print(__doc__)
        print("torchrun's options (before `--`):", flush=True)
        parse_args(["--help"])  # exits 0
    if "--" not in argv:
        print(f"launch error: no `--` before the trainer's arguments; {USAGE}", file=sys.stderr)
        return 2
    cut = argv.index("--")
    args = parse_args([*argv[:cut], "-m", "pretrain.rank", *argv[cut + 1:]])
    if not (args.module and args.training_script == "pretrain.rank"):
        print(f"launch error: a script or -m before `--` ({args.training_script}); {USAGE}", file=sys.stderr)
        return 2
    error = config_error(argv[cut + 1:], args.nnodes, args.nproc_per_node)
    if error:
        print(error, file=sys.stderr, flush=True)
        return 2
    own = "XLSTM_STATUS_DIR" not in os.environ
    status_dir = Path(tempfile.mkdtemp(prefix="xlstm-launch-") if own else os.environ["XLSTM_STATUS_DIR"])
    os.environ["XLSTM_STATUS_DIR"] = str(status_dir)  # the ranks inherit the launcher's environment
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    try:
        try:
            run(args)
        except ChildFailedError as err:
            # a rank that stopped on purpose but whose node's others did not all record a
            # code in time (pretrain.rank.ON_PURPOSE_WAIT_S): still the trainer's code
            rank, first = err.get_first_failure()
            if all(f.exitcode in EXIT_ON_PURPOSE for f in err.failures.values()):
                print(f"[launch] rank {rank} stopped with exit {first.exitcode} (rank 0's line names why; "
                      f"only rank 0 prints), and not every rank of this node within "
                      f"{ON_PURPOSE_WAIT_S:.0f} s", file=sys.stderr, flush=True)
                return first.exitcode
            raise
        except SignalException:
            # this launcher was signalled: torchrun passed the signal to the ranks and waited
            # for them; a checkpoint-and-stop on every rank is a resumable end, not a crash
            if recorded_code(status_dir) == EXIT_RESUMABLE:
                return EXIT_RESUMABLE
            raise
        code = recorded_code(status_dir)
        return 0 if code is None else code
    finally:
        if own:
            shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

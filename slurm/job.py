"""Batch-side helpers of slurm/pretrain.sbatch (and of slurm.submit).

    python -m slurm.job run-dir --world-size W CONFIG [key=value ...]

prints the run folder of the resolved config (checked with the job's world size, so a bad
config fails here with the trainer's own one-line message, before any srun step starts);
exit 2 with `config error: ...` otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.config import ConfigError, load_checked_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurm.job")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rd = sub.add_parser("run-dir", help="print the run folder of CONFIG + overrides")
    rd.add_argument("--world-size", type=int, required=True)
    rd.add_argument("config")
    rd.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        # inputs are the ranks' to check: the batch host may not see the nodes' paths
        cfg = load_checked_config(args.config, args.overrides, args.world_size, inputs=False)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print(Path(cfg.run_dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

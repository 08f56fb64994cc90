"""`make gpu-check` (benchmarks/gpu_check.py) stays runnable although CI has no GPU: its
arguments, its answer on a machine without CUDA, and its steps on the CPU (dry run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def gpu_check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--only", "kernels,warp"], "--only: unknown step(s) ['warp']"),
    (["--steps", "2"], "--steps: got 2"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_arguments_are_named(args: list[str], message: str):
    out = gpu_check(*args)
    assert out.returncode == 2
    assert message in out.stderr, out.stderr


def test_without_cuda_it_says_so_and_fails(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = gpu_check("--out", str(tmp_path))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
        "machine, or pass --cpu-dry-run to check the script on the CPU"]
    assert not list(tmp_path.iterdir())  # no result file claims a check that did not run


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cpu_dry_run_of_the_kernel_resume_and_generation_steps(tmp_path: Path):
    out = gpu_check("--cpu-dry-run", "--only", "kernels,tiny,generate", "--steps", "8",
                    "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (result,) = (tmp_path / "out").glob("gpu-check-*-cpu-dry-run.md")
    rows = [x for x in result.read_text().splitlines()
            if x.startswith(("| kernels", "| tiny", "| generate"))]
    assert len(rows) == 3 and all("| ok |" in x for x in rows), rows
    assert re.search(r"\| kernels \| ok \| 8 checks passed", rows[0]), rows[0]
    assert "8 losses bitwise equal" in rows[1]
    stopped = int(re.search(r"stopped at step (\d+) by SIGTERM", rows[1]).group(1))
    assert 4 <= stopped < 8, rows[1]  # signalled once step 4 was logged

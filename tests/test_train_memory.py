"""`pretrain.train.keep_freed_memory`: on glibc the memory of freed large tensors stays in the
process, so the next step's tensors of the same sizes are not page-faulted in again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a 128 MB tensor made and freed a few times (a step's steady state: the first frees leave a
# block that fits the aligned request), then the minor page faults of making it once more
PROBE = """
import resource, sys, torch
from pretrain.train import keep_freed_memory
if sys.argv[1] == "1":
    assert keep_freed_memory(), "mallopt refused a setting"
for _ in range(3):
    torch.ones(32 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(32 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if keep else "0"], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks():
    pages = (128 << 20) // 4096
    assert _faults(keep=False) > pages // 2  # glibc's default: a fresh mapping, faulted in again
    assert _faults(keep=True) < pages // 20  # kept: the freed block is reused in place

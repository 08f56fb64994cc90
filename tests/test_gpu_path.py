"""What a GPU run does differently, checked on the CPU as far as the CPU can show it:
the two-backend process group (`cpu:gloo,cuda:nccl`) that the reductions need, and
inductor `torch.compile` (the default backend, as on a GPU) in training, against eager
and through a resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from trainrun import ROOT, command, kill_after_checkpoint, losses, overrides, run

from pretrain.distributed import group_backend

# Two ranks join a group with the given backend and run the trainer's reductions: a
# float64 loss-sum on the "device" and `any_rank` flags on the CPU. gloo stands in for
# NCCL (no GPU here): "cuda:gloo" alone is a group without a CPU backend, as NCCL alone is.
_REDUCE = r"""
import os, sys, torch
from pretrain.distributed import all_reduce_sum, any_rank, init_distributed
info = init_distributed(60, backend=sys.argv[1])
sums = torch.tensor([1.5 * (info.rank + 1), 2.0 ** -40], dtype=torch.float64)
total = all_reduce_sum(sums)
assert total.dtype == torch.float64 and total.tolist() == [4.5, 2.0 * 2.0 ** -40], total
assert any_rank(info.rank == 1) and not any_rank(False)
# one write per rank: two ranks share the pipe, and print's pieces can interleave
sys.stdout.write(f"rank {info.rank} reduced {total.tolist()}\n")
sys.stdout.flush()
torch.distributed.destroy_process_group()  # as train.py does: gloo's threads abort an exit without it
"""


def reduce_on(backend: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--no-python", sys.executable, "-c", _REDUCE, backend]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_gpu_jobs_get_a_group_with_a_cpu_backend():
    assert group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert group_backend("cpu") == "gloo"


@pytest.mark.multiprocess
def test_reductions_run_on_the_two_backend_group():
    out = reduce_on("cpu:gloo,cuda:gloo")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} reduced [4.5, {2.0 * 2.0 ** -40}]" in out.stdout, out.stdout
    # the defect this guards against: a group without a CPU backend (NCCL alone) cannot
    # reduce the CPU tensors of any_rank
    out = reduce_on("cuda:gloo")
    assert out.returncode != 0
    assert "No backend type associated with device type cpu" in out.stderr, out.stderr[-3000:]


@pytest.mark.slow
def test_inductor_training_matches_eager_and_resumes_exactly(tmp_path, corpus):
    # Inductor compiles each block type once (minutes on 2 cores; the chunk and time-step
    # loops unroll): two blocks, one of each kind, short rows; later runs hit the cache.
    small = ("model.num_blocks=2", "model.slstm_at=[1]", "model.chunk_size=16", "data.seq_len=32",
             "train.steps=6")
    compiled = ("distributed.compile=true",)  # compile_backend: inductor (the default)
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    eager = tmp_path / "eager"
    run(command(0, overrides(eager, corpus, *small, procs=1)))
    straight = tmp_path / "straight"
    run(command(0, overrides(straight, corpus, *small, *compiled, procs=1)), **cache)
    broken = tmp_path / "broken"
    cmd = command(0, overrides(broken, corpus, *small, "checkpoint.every=3", *compiled, procs=1))
    kill_after_checkpoint(cmd, broken, 3, **cache)
    out = run(cmd, **cache)
    assert "start at step 3" in out.stdout
    a, b, e = losses(straight), losses(broken), losses(eager)
    assert sorted(a) == list(range(1, 7)) and a == b  # resumed: bitwise the same losses
    for step, value in e.items():  # inductor's fused kernels: fp32 rounding, not another model
        assert abs(a[step] - value) <= 1e-4 * abs(value), (step, a[step], value)

"""pretrain.plan: its output and exit status, the per-layout arithmetic, and its
predicted peak memory against the peak measured on this machine (resident set size of
a real training step, `tests/plan_measure.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from trainrun import ROOT

from pretrain.config import load_train_config
from pretrain.plan import GPUS, LAYOUTS, cpu_device, make_plan, plan_summary_line, states_per_rank

DATA = ["data.train=[unused]", "data.tokenizer=unused"]
TOLERANCE = 0.15


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # simulations on fake tensors: tens of seconds on 2 cores
def test_cli_prints_the_plan():
    out = plan_cli("configs/tiny.yaml", "--gpus-per-node", "1", "--gpu", "h100", "train.global_batch_size=4")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("parameters: 502,040 total", "activation checkpointing off:", "activation checkpointing on :",
                   "saved activations", "largest micro batch that fits", "FLOPs per token: 1.29M forward",
                   "tokens/s at MFU 40%", "GPU-hours", "fits: yes"):
        assert needle in text, f"{needle!r} not in:\n{text}"
    assert text.strip().splitlines()[-1].startswith("plan: ")


@pytest.mark.slow  # simulations on fake tensors: tens of seconds on 2 cores
def test_cli_suggests_a_setting_that_fits_and_exits_1():
    # 2^16 sequences of 256 tokens per GPU: far beyond 80 GB
    out = plan_cli("configs/tiny.yaml", "--gpus-per-node", "1", "--gpu", "a100",
                   "train.micro_batch_size=65536", "train.global_batch_size=65536")
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("suggestion:"))
    mb = int(line.split("train.micro_batch_size=")[1].split()[0])
    assert 1 <= mb < 65536 and 65536 % mb == 0
    fixed = plan_cli("configs/tiny.yaml", "--gpus-per-node", "1", "--gpu", "a100", "train.global_batch_size=65536",
                     *line.removeprefix("suggestion: ").split())
    assert fixed.returncode == 0, fixed.stdout


@pytest.mark.slow  # simulations on fake tensors: tens of seconds on 2 cores
def test_cli_exits_2_when_nothing_fits():
    # 6.4B parameters (a 50M-token vocabulary) on one 80 GB GPU: 16 bytes each do not fit
    out = plan_cli("configs/tiny.yaml", "--gpus-per-node", "1", "--gpu", "a100", "train.global_batch_size=4",
                   "model.vocab_size=50000000")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "suggestion: none fits" in out.stdout


def test_layouts_shard_what_they_promise():
    P, block, n = 1_000_000_000, 20_000_000, 32
    got = {lay.name: states_per_rank(P, block, lay, "bf16", n) for lay in LAYOUTS}
    assert got["none"]["optimizer"] == 8 * P and got["zero1"]["optimizer"] == 8 * P / n
    assert got["zero1"]["grads"] == 2 * P and got["zero2"]["grads"] < got["zero1"]["grads"] / 10
    assert got["zero3"]["weights"] < got["zero2"]["weights"] / 2
    assert got["fsdp"]["weights"] == 4 * P / n + 2 * 2 * block


@pytest.mark.slow  # simulations on fake tensors: tens of seconds on 2 cores
def test_summary_line_is_one_line():
    cfg = load_train_config(ROOT / "configs" / "tiny.yaml", [*DATA, "train.global_batch_size=4"], world_size=1)
    line = plan_summary_line(cfg, 1, gpu="h100")
    assert "\n" not in line and "(fits)" in line and "tok/s" in line


def test_summary_line_without_memory_is_instant():
    cfg = load_train_config(ROOT / "configs" / "large-7b.yaml", DATA, world_size=256)
    line = plan_summary_line(cfg, 256, gpu="h100", memory=False)
    # 2.10T tokens at 4,194,304 per step; 3 x 13.48G FLOPs per token x 4/3 (checkpointing)
    assert "\n" not in line and "peak" not in line and "2.10T tokens" in line and "micro batch" in line


def measure(preset: str, overrides: list[str], cuda: bool = False) -> int:
    # glibc maps allocations of 16 KiB and up on their own and unmaps them when freed: the
    # torch sLSTM loop makes thousands of small tensors per step, whose holes in the heap
    # would otherwise stay resident and count as if they were tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "plan_measure.py"), preset,
                          *(["--cuda"] if cuda else []), *overrides],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


# (preset, seq_len, micro batches): the tiny preset (an sLSTM block) and a 125M one, on
# CPU in float32 with the torch kernels, as `--gpu cpu` plans them
CASES = [("tiny.yaml", 64, (64, 128)), ("xlstm10-125m.yaml", 128, (1, 2))]


@pytest.mark.slow
@pytest.mark.parametrize("preset, seq_len, batches", CASES)
def test_predicted_peak_matches_the_measured_peak(preset, seq_len, batches):
    errors = []
    for mb in batches:
        for ac in (False, True):
            overrides = [f"data.seq_len={seq_len}", f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}",
                         "train.grad_accum=1", "distributed.backend=none", "distributed.precision=fp32",
                         f"distributed.activation_checkpointing={str(ac).lower()}"]
            cfg = load_train_config(ROOT / "configs" / preset, [*DATA, *overrides], world_size=1)
            predicted = make_plan(cfg, 1, cpu_device(), full=False).memory[ac].peak
            measured = measure(str(ROOT / "configs" / preset), overrides)
            errors.append((mb, ac, predicted, measured, predicted / measured - 1))
    report = "\n".join(f"  micro batch {mb:>3} checkpointing {ac!s:>5}: predicted {p / 2**20:8.1f} MiB, "
                       f"measured {m / 2**20:8.1f} MiB, {e:+.1%}" for mb, ac, p, m, e in errors)
    print(f"{preset}:\n{report}")
    assert all(abs(e) <= TOLERANCE for *_, e in errors), f"{preset}: beyond {TOLERANCE:.0%}:\n{report}"


@pytest.mark.gpu
@pytest.mark.slow
def test_predicted_peak_matches_max_memory_allocated_on_a_gpu():
    """The 125M preset as `make gpu-check` trains it (one GPU, bf16 autocast, Triton
    cells), at two micro batches and both checkpointing settings."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    name = torch.cuda.get_device_name(0).lower()
    device = next((GPUS[k] for k in GPUS if k in name), GPUS["h100"])
    errors = []
    for mb in (1, 2):
        for ac in (False, True):
            overrides = [f"train.micro_batch_size={mb}", f"train.global_batch_size={mb}", "train.grad_accum=1",
                         "distributed.backend=none", f"distributed.activation_checkpointing={str(ac).lower()}"]
            cfg = load_train_config(ROOT / "configs" / "xlstm10-125m.yaml", [*DATA, *overrides], world_size=1)
            predicted = make_plan(cfg, 1, device, full=False).memory[ac].peak
            measured = measure(str(ROOT / "configs" / "xlstm10-125m.yaml"), overrides, cuda=True)
            errors.append((mb, ac, predicted / measured - 1))
    print(errors)
    assert all(abs(e) <= TOLERANCE for *_, e in errors), errors


def test_gpu_table_is_the_published_hardware():
    assert GPUS["h100"].memory == 80e9 and GPUS["h200"].memory == 141e9
    assert GPUS["a100"].peak_flops < GPUS["h100"].peak_flops < GPUS["b200"].peak_flops

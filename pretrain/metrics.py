"""Throughput, MFU and memory numbers for the training log."""

from __future__ import annotations

import resource
import time

import torch

# Dense (no 2:4 sparsity) peaks per device from the vendors' data sheets, FLOP/s:
# (a substring of the device name, bf16 tensor cores, fp32). fp32 is plain FP32, not
# TF32: torch keeps float32 matmuls in full precision unless told otherwise. The more
# specific names come first (an "H100 PCIe" is also an "H100").
PUBLISHED_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("H200 NVL", 835e12, 60e12),
    ("H100", 989e12, 67e12),  # SXM5
    ("H200", 989e12, 67e12),  # SXM; GH200 too
    ("A100", 312e12, 19.5e12),
    ("B200", 2250e12, 80e12),  # HGX B200 at 1000 W
    ("MI300X", 1307e12, 163.4e12),
)


def published_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """The data-sheet peak FLOP/s of `device_name` (as torch.cuda.get_device_name gives it)
    for matmuls in `dtype` (bf16/fp16 use the tensor-core figure), or None if unknown."""
    for key, half, single in PUBLISHED_PEAKS:
        if key in device_name:
            return single if dtype == torch.float32 else half
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of one device, the MFU denominator, and where the figure comes from:
    the published peak of a known GPU, else a measured matmul (CPUs, unknown GPUs; a
    measurement underestimates a GPU's peak and so inflates MFU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = published_peak(name, dtype)
    if peak is not None:
        return peak, f"published dense {str(dtype).replace('torch.', '')} peak of {name}"
    flops = measure_matmul_flops(device, dtype=dtype)
    return flops, (f"measured {str(dtype).replace('torch.', '')} 1024^3 matmul on {name} "
                   "(no published peak known)")


def measure_matmul_flops(device: torch.device, n: int = 1024, reps: int = 5,
                         dtype: torch.dtype | None = None) -> float:
    """FLOP/s of a square matmul on `device` (the MFU denominator when the
    config gives no peak): the best of `reps` runs of 2 n^3 FLOPs."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory of this process: CUDA allocator peak on GPUs, peak
    resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    """Accumulates step time, data wait and tokens between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.data_wait = 0.0
        self.steps = 0

    def rates(self, world_size: int, flops_per_token: float, peak_flops: float) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        return {
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / world_size,
            "mfu": tps * flops_per_token / (peak_flops * world_size),
            "data_wait_s": self.data_wait / max(1, self.steps),
            "step_time_s": dt / max(1, self.steps),
        }

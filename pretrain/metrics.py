"""Throughput, MFU and memory numbers for the training log."""

from __future__ import annotations

import resource
import time

import torch


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

"""The MFU denominator: published dense peaks by device name, a measurement otherwise."""

from __future__ import annotations

import pytest
import torch

from pretrain.metrics import device_peak_flops, published_peak


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),  # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H100 NVL", torch.bfloat16, 835e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, 67e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA H200 NVL", torch.bfloat16, 835e12),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float32, 19.5e12),
    ("NVIDIA B200", torch.bfloat16, 2250e12),
    ("AMD Instinct MI300X", torch.bfloat16, 1307e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),
])
def test_published_peaks_by_device_name(name: str, dtype: torch.dtype, peak: float | None):
    assert published_peak(name, dtype) == peak


def test_cpu_peak_is_measured_and_says_so():
    flops, source = device_peak_flops(torch.device("cpu"), torch.float32)
    assert flops > 1e8  # any CPU multiplies faster than 0.1 GFLOP/s
    assert source.startswith("measured float32 1024^3 matmul on cpu")

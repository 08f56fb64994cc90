"""Training-path sanity: every parameter gets a finite gradient, bf16 and
autocast run, the tiny preset trains a step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import LargeConfig, XLSTMConfig, build_model, load_model_config, weight_decay_groups
from model.config import MLSTMBlockConfig, SLSTMBlockConfig

CONFIGS = {
    "xlstm": XLSTMConfig(vocab_size=64, embedding_dim=32, num_blocks=3, slstm_at=[0],
                         mlstm=MLSTMBlockConfig(num_heads=2), slstm=SLSTMBlockConfig(num_heads=2),
                         backend="torch", chunk_size=8),
    "large": LargeConfig(vocab_size=64, embedding_dim=32, num_blocks=2, num_heads=2,
                         backend="torch", chunk_size=8),
}


@pytest.mark.parametrize("arch", ["xlstm", "large"])
def test_every_parameter_gets_a_finite_gradient(arch: str):
    torch.manual_seed(0)
    model = build_model(CONFIGS[arch])
    idx = torch.randint(0, 64, (2, 19))
    reset = torch.zeros(2, 19, dtype=torch.bool)
    reset[:, [0, 7]] = True
    logits = model(idx[:, :-1], reset=reset[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["xlstm", "large"])
def test_bf16_model_and_autocast(arch: str):
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 24))
    model = build_model(CONFIGS[arch], dtype=torch.bfloat16)
    logits = model(idx)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    ref = build_model(CONFIGS[arch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ref(idx)
    assert torch.isfinite(logits.float()).all()
    logits.float().sum().backward()


def test_tiny_preset_trains_a_step():
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    cfg.backend = "torch"
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, cfg.vocab_size, (2, 65))
    losses = []
    for _ in range(3):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 0.5  # ~uniform at init
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["xlstm", "large"])
def test_cuda_auto_backend_matches_torch_backend(arch: str):
    """On CUDA, backend="auto" (Triton kernels) gives the torch backend's logits,
    and generation runs on the device."""
    cfg = dataclasses.replace(CONFIGS[arch])  # a copy: the test switches its backend
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda").eval()
    idx = torch.randint(0, 64, (2, 40), device="cuda")
    with torch.no_grad():
        want = model(idx)
        model.cfg.backend = "auto"
        got = model(idx)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    out = model.generate(idx[:, :5], 8, temperature=1.0, top_k=10, seed=0)
    assert out.shape == (2, 13) and out.device.type == "cuda"


@pytest.mark.parametrize("arch, tie", [("xlstm", False), ("xlstm", True), ("large", False)])
def test_weight_decay_groups_cover_every_parameter_once(arch: str, tie: bool):
    cfg = dataclasses.replace(CONFIGS[arch], tie_weights=tie)
    model = build_model(cfg, device="meta")
    decay, rest = weight_decay_groups(model, 0.1)
    ids = [id(p) for p in decay["params"]] + [id(p) for p in rest["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "embedding.weight" not in decayed and ("lm_head.weight" in decayed) == (not tie)
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert "blocks.0.mlstm.proj_down.weight" in decayed or "blocks.1.mlstm.proj_down.weight" in decayed

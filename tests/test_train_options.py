"""Engine options in one process: activation checkpointing, torch.compile, bf16
autocast, parameter groups and the schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from trainrun import ROOT

from model import build_model, load_model_config
from pretrain.config import ScheduleConfig, load_train_config
from pretrain.distributed import DistInfo
from pretrain.engine import TorchEngine, lm_loss
from pretrain.optim import build_optimizer, lr_at, param_groups

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def config(preset: str, *overrides: str):
    doc = {
        "model": yaml.safe_load((ROOT / "configs" / preset).read_text())["model"],
        "data": {"train": ["unused"], "tokenizer": "unused"},
        "train": {"global_batch_size": 2, "micro_batch_size": 2},
    }
    return load_train_config(doc, list(overrides), world_size=1)


def loss_and_grads(cfg, ids, reset):
    torch.manual_seed(0)
    model = build_model(load_model_config(cfg.model))
    engine = TorchEngine(model, cfg, CPU)
    loss = lm_loss(engine.forward(ids, reset), ids)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 48), generator=g)
    reset = torch.zeros(2, 48, dtype=torch.bool)
    reset[:, 0] = True
    reset[1, 20] = True
    return ids, reset


def test_activation_checkpointing_is_exact(batch):
    ref = loss_and_grads(config("tiny.yaml"), *batch)
    got = loss_and_grads(config("tiny.yaml", "distributed.activation_checkpointing=true"), *batch)
    assert torch.equal(ref[0], got[0])
    assert all(torch.equal(a, b) for a, b in zip(ref[1], got[1]))


def test_compiled_blocks_match_eager(batch):
    small = ["model.vocab_size=512", "model.embedding_dim=128", "model.num_heads=2",
             "model.num_blocks=2"]
    ref = loss_and_grads(config("large-1.3b.yaml", *small), *batch)
    got = loss_and_grads(config("large-1.3b.yaml", *small, "distributed.compile=true",
                                "distributed.compile_backend=aot_eager"), *batch)
    assert torch.allclose(ref[0], got[0], rtol=1e-5)
    for a, b in zip(ref[1], got[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_close_to_fp32(batch):
    ref = loss_and_grads(config("tiny.yaml"), *batch)
    got = loss_and_grads(config("tiny.yaml", "distributed.precision=bf16"), *batch)
    assert abs(ref[0].item() - got[0].item()) < 0.05
    assert all(torch.isfinite(g).all() for g in got[1])


def test_parameter_groups_leave_norms_biases_embeddings_undecayed():
    cfg = config("tiny.yaml")
    model = build_model(load_model_config(cfg.model))
    decay, no_decay = param_groups(model, cfg.optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "embedding.weight" in undecayed and "blocks.0.mlstm.fgate.bias" in undecayed
    assert "blocks.0.norm.weight" in undecayed and "blocks.1.slstm.bias" in undecayed
    assert "blocks.0.mlstm.proj_up.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == cfg.optimizer.weight_decay and no_decay["weight_decay"] == 0
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_optimizer_is_fused_on_cpu_and_stays_fused_after_loading_a_foreach_state():
    """The fused AdamW update matches the foreach one (what older checkpoints were written
    with) to rounding, and loading such a state keeps the fused kernel."""
    cfg = config("tiny.yaml")
    torch.manual_seed(0)
    model = build_model(load_model_config(cfg.model))
    twin = build_model(load_model_config(cfg.model))
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, cfg.optimizer)
    ref = torch.optim.AdamW(param_groups(twin, cfg.optimizer), lr=cfg.optimizer.lr,
                            betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, foreach=True)
    assert all(g["fused"] for g in opt.param_groups)
    for step in range(3):
        for net, o in ((model, opt), (twin, ref)):
            torch.manual_seed(step)
            for p in net.parameters():
                p.grad = torch.randn_like(p)
            o.step()
        if step == 1:
            opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # as read from disk
            assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_schedules():
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, cos) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, cos) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, 100, 1.0, cos) == pytest.approx(0.1)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(79, 100, 1.0, wsd) == 1.0
    assert lr_at(90, 100, 1.0, wsd) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, wsd) == 0.0

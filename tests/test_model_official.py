"""Fidelity: with weights copied from the official NX-AI `xlstm` package (a test
dependency only), our models produce the same logits (1e-5 relative, float32)."""

from __future__ import annotations

import pytest
import torch

from model import LargeConfig, XLSTMConfig, build_model
from model.config import MLSTMBlockConfig, SLSTMBlockConfig
from model.official import build_official_model, from_official_state_dict, to_official_state_dict

xlstm = pytest.importorskip("xlstm")
# the official package warns about torch.jit.script_method on import
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Move every parameter off its init (zero recurrent kernels, unit norms and
    constant gate biases would hide mapping mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


NEURIPS = XLSTMConfig(
    vocab_size=96,
    embedding_dim=64,
    num_blocks=4,
    slstm_at=[1, 3],
    context_length=32,
    mlstm=MLSTMBlockConfig(num_heads=4),
    slstm=SLSTMBlockConfig(num_heads=4, ffn_proj_factor=1.3),
    backend="torch",
    chunk_size=8,
)


@pytest.mark.parametrize("tie, bias", [(False, False), (True, False), (False, True)])
def test_neurips_logits_match_official(tie: bool, bias: bool):
    torch.manual_seed(0)
    cfg = XLSTMConfig(**{**NEURIPS.__dict__, "tie_weights": tie, "bias": bias})
    ref = build_official_model(cfg).eval()
    randomize_(ref, torch.Generator().manual_seed(1))
    ours = build_model(cfg).eval()
    ours.load_state_dict(from_official_state_dict(cfg, ref.state_dict()), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 27), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(idx)
        got = ours(idx)
    assert got.shape == want.shape == (2, 27, cfg.vocab_size)
    assert rel_err(got, want) < 1e-5
    assert_round_trip(cfg, ours, build_official_model(cfg).eval(), idx, want)


def assert_round_trip(cfg, ours, fresh_official, idx, want):
    """to_official_state_dict is the inverse: our weights load (strict) into a
    fresh official model, which then gives the same logits."""
    fresh_official.load_state_dict(to_official_state_dict(cfg, ours.state_dict()), strict=True)
    with torch.no_grad():
        again = fresh_official(idx)
    again = again[0] if isinstance(again, tuple) else again
    assert rel_err(again, want) < 1e-6


def test_neurips_official_step_matches_our_step():
    """The official recurrent step path (mLSTM step, conv buffer, sLSTM step)
    agrees with ours token by token."""
    cfg = NEURIPS
    ref = build_official_model(cfg).eval()
    randomize_(ref, torch.Generator().manual_seed(3))
    ours = build_model(cfg).eval()
    ours.load_state_dict(from_official_state_dict(cfg, ref.state_dict()), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    ref_state, our_state = None, None
    with torch.no_grad():
        for t in range(idx.shape[1]):
            want, ref_state = ref.step(idx[:, t : t + 1], ref_state)
            got, our_state = ours.step(idx[:, t], our_state)
            assert rel_err(got, want[:, 0]) < 1e-5, t


LARGE = LargeConfig(
    vocab_size=96,
    embedding_dim=64,
    num_blocks=2,
    num_heads=2,
    context_length=64,
    backend="torch",
    chunk_size=16,
)


@pytest.mark.parametrize("use_bias", [False, True])
def test_large_logits_match_official(use_bias: bool):
    torch.manual_seed(0)
    cfg = LargeConfig(**{**LARGE.__dict__, "use_bias": use_bias})
    ref = build_official_model(cfg).eval()
    randomize_(ref, torch.Generator().manual_seed(5))
    ours = build_model(cfg).eval()
    ours.load_state_dict(from_official_state_dict(cfg, ref.state_dict()), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want, _ = ref(idx)
        got = ours(idx)
    assert got.shape == want.shape == (2, 48, cfg.vocab_size)
    assert rel_err(got, want) < 1e-5
    assert_round_trip(cfg, ours, build_official_model(cfg).eval(), idx, want)

"""pretrain.checkpoint.deepspeed without a training run: DeepSpeed's loads are weights-only
through torch's own switches (torch.load itself is never replaced), and a DeepSpeed
outside the supported range is refused by name."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from pretrain.checkpoint import deepspeed as ds


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_only_loads_refuse_pickles_even_when_the_caller_asks(tmp_path):
    evil, plain = tmp_path / "evil.pt", tmp_path / "plain.pt"
    torch.save({"x": Evil()}, evil)
    torch.save({"w": torch.ones(2)}, plain)
    load = torch.load
    with ds.weights_only_loads():
        assert torch.load is load  # no swap of the global function
        with pytest.raises(pickle.UnpicklingError):
            torch.load(evil, weights_only=False)  # what DeepSpeed's own loads pass
        assert torch.equal(torch.load(plain, weights_only=False)["w"], torch.ones(2))
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored on the way out


def test_deepspeed_outside_the_supported_range_is_refused(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    assert ds.import_deepspeed() is deepspeed  # the installed one is in range
    low, high = ds.SUPPORTED
    monkeypatch.setattr(deepspeed, "__version__", f"{high[0]}.{high[1]}.0")
    with pytest.raises(RuntimeError, match=rf">= {low[0]}\.{low[1]}, < {high[0]}\.{high[1]}"):
        ds.import_deepspeed()

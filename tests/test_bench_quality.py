"""The quality benchmark's measuring parts (benchmarks/quality.py), the README generator of
`make bench` (benchmarks/report.py) and the large arch's `init` key that the benchmark
measures. Seconds: no training, no corpus."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import model as M

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_models_match_in_parameters():
    """Equal parameters within 5 % of xlstm[1:0]'s, at two widths."""
    q = load("quality")
    for dim in (32, 64):
        counts = {m: M.count_parameters(q.build(m, dim, 512)) for m in q.MODELS}
        target = counts["xlstm[1:0]"]
        assert all(abs(n - target) / target < 0.05 for n in counts.values()), (dim, counts)


class ContextFree(nn.Module):
    """A model whose every prediction is the same distribution: its loss cannot depend
    on how the tokens are cut into sequences."""

    def __init__(self, vocab: int):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.logits.expand(*ids.shape, -1)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_evaluate_counts_every_token_once_at_every_cut():
    q = load("quality")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 2048), generator=g)
    labels = torch.randint(0, 64, (2, 2048), generator=g)
    labels[0, :300] = -100  # ignored targets weigh nothing, whatever batch they land in
    net = ContextFree(64)
    want = float(net(ids, labels).detach())
    got = [q.evaluate(net, ids, labels, c, tokens_per_batch=1024) for c in q.EVAL_CONTEXTS]
    assert got == pytest.approx([want] * 3, rel=1e-5)


def test_large_init_key():
    """`init: torch` gives PyTorch's defaults (also built on meta and materialized);
    `xlstm7b` the 7B recipe; anything else is named as an error."""
    base = {"arch": "large", "vocab_size": 128, "embedding_dim": 32, "num_blocks": 2, "num_heads": 4,
            "backend": "torch"}
    torch.manual_seed(0)
    seven = M.build_model(M.load_model_config(base))
    assert torch.all(seven.blocks[0].mlstm.igate.bias == -10.0)
    assert torch.all(seven.blocks[0].mlstm.igate.weight == 0)
    for device in ("cpu", "meta"):
        net = M.build_model(M.load_model_config({**base, "init": "torch"}), device=device)
        if device == "meta":
            net.to_empty(device="cpu")
            net.reset_parameters()
        gate = net.blocks[0].mlstm.igate
        bound = 1 / 32**0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert gate.bias.abs().max() <= bound and gate.bias.abs().max() > 0
        assert gate.weight.abs().max() <= bound and gate.weight.std() > 0.5 * bound / 3**0.5
        assert net.embedding.weight.std().item() == pytest.approx(1.0, abs=0.1)  # N(0, 1)
        assert torch.all(net.blocks[0].mlstm_norm.weight == 1)
    with pytest.raises(ValueError, match=r"model\.init: got 'small', allowed values: \['xlstm7b', 'torch'\]"):
        M.load_model_config({**base, "init": "small"})


def test_readme_inlines_the_newest_results_with_their_command(tmp_path: Path):
    r = load("report")
    res = tmp_path / "results"
    res.mkdir()
    (res / "quality-2026-01-01-cpu.md").write_text("# old table\n")
    (res / "quality-2026-02-01-cpu.md").write_text("# new table\n\n| a |\n|---|\n\n![plot](quality-2026-02-01-cpu.png)\n")
    (res / "quality-2026-02-01-cpu.png").write_bytes(b"png")
    (res / "mlstm_cpu-2026-02-01-cpu.txt").write_text("S  ours\n512  2.5\n")
    (res / "scale_1b_cpu-2026-01-01-cpu.txt").write_text("x\n")
    (res / "bench-log.json").write_text(json.dumps({"quality": {
        "command": "python benchmarks/quality.py --seeds 3", "date": "2026-02-01 00:00 UTC",
        "load_before": 1.0, "load_after": 2.0, "wall_s": 600, "exit": 0}}))
    text = r.readme(res)
    section = text[text.index("## quality"):text.index("## mlstm_cpu")]
    assert "### new table" in section and "old table" not in section
    assert "`python benchmarks/quality.py --seeds 3`" in section and "10.0 min" in section
    assert section.count("results/quality-2026-02-01-cpu.png") == 1  # embedded once, relative to benchmarks/
    assert "```\nS  ours\n512  2.5\n```" in text
    other = text[text.index("## Other result files"):]
    assert "results/quality-2026-01-01-cpu.md" in other and "scale_1b_cpu-2026-01-01-cpu.txt" in other
    assert "## long_context\n\nt" in text and "No result yet." in text[text.index("## long_context"):]
    out = tmp_path / "README.md"
    assert r.main(["readme", "--results", str(res), "--out", str(out), "--strict"]) == 0
    log = json.loads((res / "bench-log.json").read_text())
    log["quality"]["exit"] = 1
    (res / "bench-log.json").write_text(json.dumps(log))
    assert r.main(["readme", "--results", str(res), "--out", str(out), "--strict"]) == 1
    assert "exit status 1: the run failed" in out.read_text()


def test_run_records_the_command_with_its_own_flags(tmp_path: Path):
    """`report.py run NAME --stdout FILE -- COMMAND --flags`: the flags after -- are the
    command's; its stdout saved, its exit status logged and returned."""
    r = load("report")
    out = tmp_path / "out.txt"
    code = r.main(["run", "mlstm_cpu", "--stdout", str(out), "--results", str(tmp_path), "--",
                   sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)", "--reps", "3"])
    assert code == 3
    assert out.read_text() == "['--reps', '3']\n"
    entry = json.loads((tmp_path / "bench-log.json").read_text())["mlstm_cpu"]
    assert entry["exit"] == 3 and entry["command"].endswith("--reps 3")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import data

    out = tmp_path_factory.mktemp("corpus")
    data.make_demo_corpus(str(out), max_files=120, progress=False)
    return out


@pytest.mark.parametrize("name", ["large", "llama"])
def test_run_trains_and_evaluates_on_the_demo_corpus(corpus: Path, name: str):
    """`run` end to end on a small demo corpus, in this process: our loader, optimizer and
    schedule, the curve and the three extrapolation cuts (both loss paths: ours, HF's)."""
    import argparse

    q = load("quality")
    args = argparse.Namespace(data=str(corpus), dim=32, steps=4, batch=2, eval_every=2,
                              curve_seqs=2, extrap_seqs=2)
    r = q.run(name, 0, 3e-3, args)
    assert [x for x, _ in r["curve"]] == [2 * 2 * 256, 4 * 2 * 256]
    assert sorted(r["extrap"], key=int) == ["256", "1024", "2048"]
    losses = [y for _, y in r["curve"]] + list(r["extrap"].values())
    assert all(0 < v < 7.0 for v in losses), r  # finite, near log(512) = 6.24 this early

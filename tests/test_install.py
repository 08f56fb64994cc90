"""The project as users install it: its top-level import names belong to it alone, the model
and `transformers` work in one process from any directory, and the optional extras fail in
one line that names the extra to install.

Why: today's `transformers` depends on Hugging Face's `kernels` distribution; our kernels
package was once called `kernels` too, and one of the two always shadowed the other.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DIST = "xlstm-pretrain"


def _shipped_names() -> list[str]:
    """Top-level import names of this project's installed distribution."""
    text = md.distribution(DIST).read_text("top_level.txt")
    assert text, f"{DIST}: no top_level.txt (is the project installed? make setup)"
    return sorted(n for n in text.split() if n)


def test_every_top_level_name_belongs_to_this_project_alone():
    names = _shipped_names()
    owners = md.packages_distributions()
    clashes = {n: sorted(set(owners.get(n, [])) - {DIST}) for n in names}
    clashes = {n: d for n, d in clashes.items() if d}
    assert not clashes, (
        f"top-level import names shared with other installed distributions: {clashes} "
        "(one shadows the other depending on the working directory)")
    assert {"pretrain", "model", "xlstm_kernels", "data", "slurm"} <= set(names), names


# A forward of the model (torch backend), then transformers' AutoModel
# import, in one process. Prints where each package came from.
_PROBE = r"""
import sys, torch
import model
cfg = model.load_model_config({"arch": "xlstm", "vocab_size": 64, "embedding_dim": 32,
    "num_blocks": 2, "slstm_at": [1], "context_length": 16,
    "mlstm": {"num_heads": 2}, "slstm": {"num_heads": 2}, "chunk_size": 8})
net = model.build_model(cfg)
logits = net(torch.randint(0, 64, (2, 16)))
assert logits.shape == (2, 16, 64), logits.shape
from transformers import AutoModelForCausalLM
import kernels  # Hugging Face's kernel hub, a dependency of transformers
assert hasattr(kernels, "CUDAProperties"), kernels.__file__
print("ok", model.__file__, kernels.__file__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["outside", "repo_root"])
def test_model_and_transformers_in_one_process(where: str, tmp_path: Path):
    cwd = tmp_path if where == "outside" else REPO
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XLSTM_KERNEL_BACKEND"] = "torch"
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1].split()
    assert line[0] == "ok"
    assert Path(line[1]).resolve().is_relative_to(REPO), f"model from {line[1]}"
    assert "site-packages" in Path(line[2]).parts, f"Hugging Face's kernels from {line[2]}"


# Runs a module with some top-level packages made unimportable, as on an install without
# the `eval` extra.
_HIDE = r"""
import importlib.abc, runpy, sys
hidden = set(sys.argv[1].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
module = sys.argv[2]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("hidden, argv, needle", [
    ("lm_eval", ["pretrain.evaluate", "somewhere", "--tasks", "x"], "lm_eval"),
    ("transformers", ["pretrain.convert", "{ckpt}", "{out}", "--to", "hf"],
     "transformers"),
])
def test_missing_extra_is_one_line_naming_it(hidden, argv, needle, tmp_path: Path, corpus):
    from trainrun import random_checkpoint

    large = {"arch": "large", "vocab_size": 512, "embedding_dim": 64, "num_blocks": 1,
             "num_heads": 1, "context_length": 64, "chunk_size": 16}
    ckpt = random_checkpoint(tmp_path / "ckpt", large, corpus[0])
    argv = [a.format(ckpt=ckpt, out=tmp_path / "hf") for a in argv]
    out = subprocess.run([sys.executable, "-c", _HIDE, hidden, *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr[-3000:]
    assert "xlstm-pretrain[eval]" in lines[0] and needle in lines[0], lines[0]
    assert "Traceback" not in out.stderr

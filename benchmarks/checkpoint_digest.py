"""What the xxh3 digests in a checkpoint's files.json cost, against the save itself.

For a preset's model (default: the 125M xLSTM[7:1]) with its AdamW state, in one process
(the none backend's layout, `model_optim/` by DCP), rounds of, interleaved:
  save     pretrain.checkpoint.dcp.save_model_optim into a fresh folder (DCP, fsynced)
  digest   layout.list_files over that folder (what finish_folder adds: a read of every
           part just written, from the page cache, and its xxh3-64)
  verify   layout.verify_files (what a resume adds before loading: sizes and digests)
Prints bytes, the median seconds of each and digest/save. Never used as a test.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_digest.py [--config configs/xlstm71-125m.yaml]
        [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "xlstm71-125m.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoints are written (default: the temp dir)")
    args = ap.parse_args()

    import torch
    import yaml

    from model import build_model, load_model_config
    from pretrain.checkpoint.dcp import quiet_dcp, save_model_optim
    from pretrain.checkpoint.layout import (
        FILES,
        folder_bytes,
        list_files,
        verify_files,
        write_json_atomic,
    )

    torch.manual_seed(0)
    model = build_model(load_model_config(yaml.safe_load(Path(args.config).read_text())["model"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step: the AdamW moments exist, as in a real checkpoint
        p.grad = torch.zeros_like(p)
    opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {"save": [], "digest": [], "verify": []}
    root = Path(tempfile.mkdtemp(prefix="ckpt-digest-", dir=args.dir))
    try:
        for r in range(args.rounds):
            folder = root / f"step-{r}"
            folder.mkdir()
            t0 = time.perf_counter()
            with quiet_dcp():
                save_model_optim(folder, model, opt)
            t1 = time.perf_counter()
            listing = list_files(folder)
            t2 = time.perf_counter()
            write_json_atomic(folder / FILES, listing)
            t3 = time.perf_counter()
            verify_files(folder)
            t4 = time.perf_counter()
            times["save"].append(t1 - t0)
            times["digest"].append(t2 - t1)
            times["verify"].append(t4 - t3)
            size = folder_bytes(folder)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{Path(args.config).name}: {n_params:,} parameters, checkpoint {size / 2**20:,.0f} MiB "
          f"in {len(listing)} files, {args.rounds} rounds (median)")
    print(f"{'step':<8} {'seconds':>8} {'GB/s':>6} {'vs save':>8}")
    for k in ("save", "digest", "verify"):
        print(f"{k:<8} {med[k]:>8.3f} {size / med[k] / 1e9:>6.2f} {med[k] / med['save']:>7.1%}")


if __name__ == "__main__":
    main()

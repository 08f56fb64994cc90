"""DeepSpeed's checkpoint format under `step-<N>/deepspeed/` (docs/design.md, "Checkpoint layout").

    folder/deepspeed/state/              DeepSpeed's own files (fixed tag `state`)
    folder/deepspeed/meta.json           world size, ZeRO stage, precision of the writer
    folder/deepspeed/state_universal/    DeepSpeed's universal format, made once when
                                         a resume changes world size, 3 <-> 1/2 or precision

    python -m pretrain.checkpoint to-universal CHECKPOINT_FOLDER

The one place that imports `deepspeed` (`import_deepspeed`, with the version
check against the range pyproject.toml pins). Every `torch.load` of a DeepSpeed
file, DeepSpeed's own included, runs weights-only through torch's switches
(`TORCH_FORCE_WEIGHTS_ONLY_LOAD` + `torch.serialization.safe_globals` with
DeepSpeed's few plain checkpoint classes): `weights_only_loads()`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

SUBDIR = "deepspeed"
TAG = "state"
UNIVERSAL_TAG = TAG + "_universal"
META = "meta.json"
SUPPORTED = ((0, 16), (0, 20))  # [low, high) as in pyproject.toml's deepspeed>=0.16,<0.20


def import_deepspeed() -> ModuleType:
    """`deepspeed`, with the CPU accelerator where there is no GPU; a version outside
    the tested range is refused (the adapter relies on a few private attributes)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    version = tuple(int(x) for x in deepspeed.__version__.split(".")[:2])
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        raise RuntimeError(f"deepspeed {deepspeed.__version__}: this trainer supports "
                           f">= {'.'.join(map(str, SUPPORTED[0]))}, < {'.'.join(map(str, SUPPORTED[1]))}")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _allowed_globals() -> list[Any]:
    """The plain classes DeepSpeed pickles into its checkpoints (loss scaler,
    enums, fragment address records)."""
    out: list[Any] = [collections.OrderedDict, set, frozenset, slice]
    candidates = [
        ("deepspeed.runtime.fp16.loss_scaler", ["LossScaler", "DynamicLossScaler", "LossScalerBase"]),
        ("deepspeed.runtime.zero.config", ["ZeroStageEnum"]),
        ("deepspeed.utils.tensor_fragment", ["fragment_address"]),
        ("deepspeed.runtime.zero.offload_config", ["OffloadDeviceEnum"]),
    ]
    for module_name, names in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        out += [getattr(module, n) for n in names if hasattr(module, n)]
    return out


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside runs weights_only, DeepSpeed's own calls that pass
    weights_only=False included (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, read
    per call); only DeepSpeed's plain checkpoint classes are admitted."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def save(ds_engine: Any, folder: Path, meta: dict[str, Any], is_main: bool) -> None:
    """Collective: DeepSpeed's checkpoint of `ds_engine` into folder/deepspeed/state,
    and (rank 0) meta.json describing the writer's layout."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    target = Path(folder) / SUBDIR
    # the marker DeepSpeed's universal converter requires (Megatron-DeepSpeed writes it)
    client = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    ds_engine.save_checkpoint(str(target), tag=TAG, client_state=client, save_latest=False)
    if is_main:
        (target / META).write_text(json.dumps({**meta, "tag": TAG}, indent=1) + "\n")


def read_meta(folder: str | Path) -> dict[str, Any]:
    file = Path(folder) / SUBDIR / META
    return json.loads(file.read_text()) if file.is_file() else {}


def layout_changes(meta: dict[str, Any], world_size: int, zero_stage: int, precision: str) -> list[str]:
    """How a saved DeepSpeed checkpoint (its meta.json) differs from this run in
    what DeepSpeed's own loader cannot bridge; [] when it loads directly. ZeRO-1
    and ZeRO-2 keep the same flat fp32 partitions, so 1 <-> 2 is no change."""
    out = []
    saved_world, saved_stage = meta.get("world_size"), meta.get("zero_stage")
    saved_precision = meta.get("precision")
    if saved_world is not None and saved_world != world_size:
        out.append(f"saved by {saved_world} process(es), this run has {world_size}")
    if saved_stage is not None and (saved_stage == 3) != (zero_stage == 3):
        out.append(f"saved with distributed.zero_stage={saved_stage}, this run has {zero_stage}")
    if saved_precision is not None and saved_precision != precision:
        out.append(f"saved with distributed.precision={saved_precision}, this run has {precision}")
    return out


def universal_command(folder: str | Path) -> str:
    """The shell command that converts folder/deepspeed/state to the universal format."""
    return f"{sys.executable} -m pretrain.checkpoint to-universal {Path(folder)}"


def to_universal(folder: str | Path) -> Path:
    """Convert a checkpoint folder's DeepSpeed state in place (idempotent), with
    DeepSpeed's `ds_to_universal` in this process (one worker: no process pool),
    written to a temporary name and renamed when complete."""
    target = Path(folder) / SUBDIR
    final, tmp = target / UNIVERSAL_TAG, target / (UNIVERSAL_TAG + ".tmp")
    if (final / "zero").is_dir():
        return final
    if not (target / TAG).is_dir():
        raise FileNotFoundError(f"{target / TAG}: not a DeepSpeed checkpoint folder")
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(  # what its parse_arguments() gives for these flags
        input_folder=str(target / TAG), output_folder=str(tmp), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with weights_only_loads():
        ds_to_universal.main(args)
    os.replace(tmp, final)
    (target / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we use tags
    return final


def convert_to_universal(folder: str | Path) -> bool:
    """`universal_command` as a subprocess (DeepSpeed's converter is a script with
    globals of its own). True on success; a failure is reported on stderr."""
    target = Path(folder) / SUBDIR
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
    cmd = [sys.executable, "-m", "pretrain.checkpoint", "to-universal", str(folder)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not (target / UNIVERSAL_TAG / "zero").is_dir():
        print(f"[deepspeed] ds_to_universal failed (exit {proc.returncode}):\n"
              f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
        return False
    return True


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 model weights of a checkpoint folder written by the
    DeepSpeed backend (any ZeRO stage, any world size): one process, no process
    group, the whole model at once. Keys: the model's parameter names."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    target = Path(folder) / SUBDIR
    if not (target / TAG).is_dir():
        raise FileNotFoundError(f"{target / TAG}: not a DeepSpeed checkpoint folder")
    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(str(target), tag=TAG)
    return {k: v.contiguous() for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    """python -m pretrain.checkpoint to-universal CHECKPOINT_FOLDER"""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "to-universal":
        print(main.__doc__, file=sys.stderr)
        return 2
    print(f"[deepspeed] universal checkpoint: {to_universal(args[1])}", flush=True)
    return 0

"""Atomic, resumable checkpoint folders.

Layout under the checkpoint root:

    step-000120/            a complete checkpoint (renamed from step-000120.tmp/)
        COMPLETE            marker, written last, before the rename
        trainer_state.json  step, tokens seen, schedule, data state, run id, world size
        config.yaml         the resolved config
        model_optim/        torch.distributed.checkpoint (FSDP / single process), or
        deepspeed/          DeepSpeed's own checkpoint
        rng/rank-00000.pt   RNG states of each rank (tensors only: weights_only loads)
        tokenizer/          copy of the tokenizer folder
    latest                  text file naming the newest complete folder, replaced atomically

Protocol (every rank calls `save`): rank 0 creates the temporary folder, all
ranks write their parts, a barrier, rank 0 writes the marker, renames the folder,
replaces `latest` and prunes to the last K. A folder without its marker (a kill
mid-write) is never loaded and is removed by the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class CheckpointInfo:
    step: int
    path: Path


class CheckpointManager:
    """Folders `step-<N>/` under `root`, the `latest` pointer, retention of `keep`.

    `barrier` synchronizes all ranks (a no-op for one process).
    """

    def __init__(self, root: str | Path, keep: int = 2, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None) -> None:
        if keep < 2:
            raise ValueError(f"keep: got {keep}, allowed values: >= 2")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.barrier = barrier

    # ---------------------------------------------------------------- listing
    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        out = []
        if not self.root.is_dir():
            return out
        for child in self.root.iterdir():
            m = _STEP_RE.match(child.name)
            if m and child.is_dir() and (child / MARKER).is_file():
                out.append(CheckpointInfo(int(m.group(1)), child))
        return sorted(out, key=lambda c: c.step)

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint: the `latest` pointer when it names a
        complete folder, else the highest complete step folder."""
        pointer = self.root / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            m = _STEP_RE.match(name)
            if m and (self.root / name / MARKER).is_file():
                return CheckpointInfo(int(m.group(1)), self.root / name)
        done = self.complete()
        return done[-1] if done else None

    # ---------------------------------------------------------------- saving
    def save(self, step: int, write_parts: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. `write_parts(tmp_dir)` writes this
        rank's share (collective writers such as DCP included); `state` is the
        JSON trainer state (rank 0's is written). Returns the final folder."""
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        write_parts(tmp)
        self.barrier()
        if self.rank == 0:
            write_json_atomic(tmp / STATE_FILE, state)
            with open(tmp / MARKER, "w") as fh:
                fh.write(f"{step}\n")
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():  # a re-save of the same step (e.g. stop right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            pointer_tmp = self.root / "latest.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.root / "latest")
            _fsync_dir(self.root)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old.path, ignore_errors=True)
        for child in self.root.iterdir():  # leftovers of writes that were killed
            if child.name.endswith(".tmp") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

    # ---------------------------------------------------------------- loading
    def resolve(self, resume: str | None) -> CheckpointInfo | None:
        """`resume`: None or "none" (fresh start), "auto" (latest complete or
        fresh), or a path to a checkpoint folder (or to a root holding some)."""
        if resume in (None, "", "none"):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        if (path / MARKER).is_file():
            m = _STEP_RE.match(path.name)
            state = read_trainer_state(path)
            return CheckpointInfo(int(m.group(1)) if m else int(state["step"]), path)
        found = CheckpointManager(path, self.keep).latest()
        if found is None:
            raise CheckpointError(
                f"--resume {resume}: not a complete checkpoint (no {MARKER} marker) and holds none"
            )
        return found


def read_trainer_state(path: Path) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    try:
        with open(file) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable trainer state ({err})") from err


# -------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (loadable with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(py[1]), dtype=torch.int64),  # 624 words + position
        "python_gauss": torch.tensor([float("nan") if py[2] is None else py[2]], dtype=torch.float64),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    gauss = float(state["python_gauss"].item())
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None if gauss != gauss else gauss))
    pos = state["numpy_pos"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos[0]), int(pos[1]),
         float(state["numpy_gauss"].item()))
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(folder: Path, rank: int) -> None:
    (folder / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), folder / "rng" / f"rank-{rank:05d}.pt")


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG state if the checkpoint has one (same world size)."""
    file = folder / "rng" / f"rank-{rank:05d}.pt"
    if not file.is_file():
        return False
    try:
        state = torch.load(file, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure names the file
        raise CheckpointError(f"{file}: unreadable RNG state ({err})") from err
    set_rng_state(state)
    return True


# -------------------------------------------------------------------- safe DCP reads


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: only DCP's metadata
    classes, torch.Size, dtypes, layouts and paths are admitted."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _OTHER = {("torch", "Size"), ("torch.serialization", "_get_layout"),
              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
              ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        if (module, name) in self._OTHER:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"DCP metadata refers to {module}.{name}, which is not a checkpoint metadata class"
        )


def safe_dcp_reader(path: str | Path):
    """A DCP FileSystemReader whose metadata is read by `_MetadataUnpickler`
    (tensor data is read by DCP itself with ``torch.load(weights_only=True)``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            file = Path(self.path) / ".metadata"
            try:
                with open(file, "rb") as fh:
                    metadata = _MetadataUnpickler(fh).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
                raise CheckpointError(f"{file}: unreadable checkpoint metadata ({err})") from err
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """DCP's warnings about reads without a process group (what we ask for) silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is (disabled|unavailable).*")
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")
        yield


class DCPWeights(Mapping[str, torch.Tensor]):
    """The tensors under `prefix` of a ``model_optim/`` DCP folder (saved by any
    number of ranks), read lazily: ``weights[key]`` loads that one tensor, full
    size, on CPU, in this process alone (no collective: any rank may read)."""

    def __init__(self, path: str | Path, prefix: str = "model.") -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        meta = safe_dcp_reader(self.path).read_metadata()
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for fqn, md in meta.state_dict_metadata.items():
            if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata):
                self._meta[fqn[len(prefix):]] = (tuple(md.size), md.properties.dtype)
        if not self._meta:
            raise CheckpointError(f"{self.path}: no tensors (keys '{prefix}*') in this checkpoint")
        self.prefix = prefix

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._meta[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        shape, dtype = self._meta[key]
        out = torch.empty(shape, dtype=dtype)
        with quiet_dcp():
            dcp.load({self.prefix[:-1]: {key: out}}, storage_reader=safe_dcp_reader(self.path),
                     no_dist=True)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)


# -------------------------------------------------------------------- model export


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a complete checkpoint folder (written by any world size),
    in one process with no process group. Returns (model in eval mode, trainer state)."""
    import torch.distributed.checkpoint as dcp

    from model import build_model, load_model_config

    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise CheckpointError(f"{folder}: no {MARKER} marker; an incomplete checkpoint is never loaded")
    state = read_trainer_state(folder)
    model = build_model(load_model_config(state["config"]["model"]), device=device)
    if not (folder / "model_optim").is_dir():
        raise CheckpointError(f"{folder}/model_optim: missing (a DeepSpeed checkpoint? use pretrain.convert)")
    weights = {"model": model.state_dict()}
    with quiet_dcp():
        dcp.load(weights, storage_reader=safe_dcp_reader(folder / "model_optim"), no_dist=True)
    model.load_state_dict(weights["model"])
    return model.eval(), state

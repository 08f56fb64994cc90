"""The checkpoint folder protocol: atomic `step-<N>/` folders, `latest`, keep-K, RNG.

Layout and protocol: docs/design.md, "Checkpoint layout". Every rank calls
`CheckpointManager.save`: rank 0 creates `step-<N>.tmp/`, all ranks write their
parts, a barrier, rank 0 writes trainer_state.json and the COMPLETE marker
(`finish_folder`), renames the folder, replaces `latest` and prunes to the last
K. A folder without its marker (a kill mid-write) is never loaded and is
removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
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


def finish_folder(folder: Path, step: int, state: dict[str, Any]) -> None:
    """trainer_state.json, then the COMPLETE marker, both fsynced: the last writes
    into a folder before its rename (also for imported weights-only folders)."""
    write_json_atomic(folder / STATE_FILE, state)
    with open(folder / MARKER, "w") as fh:
        fh.write(f"{step}\n")
        fh.flush()
        os.fsync(fh.fileno())


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
            finish_folder(tmp, step, state)
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
        return find_checkpoint(resume, what=f"--resume {resume}")


def find_checkpoint(path: str | Path, what: str | None = None) -> CheckpointInfo:
    """A complete checkpoint: `path` itself (it holds the COMPLETE marker) or, for a
    checkpoint root, its latest complete one. `what` names the path in errors."""
    path = Path(path)
    what = what or str(path)
    if not path.is_dir():
        raise CheckpointError(f"{what}: no such checkpoint folder")
    if (path / MARKER).is_file():
        m = _STEP_RE.match(path.name)
        return CheckpointInfo(int(m.group(1)) if m else int(read_trainer_state(path)["step"]), path)
    looks_like_one = any((path / n).exists() for n in (STATE_FILE, "model_optim", "deepspeed"))
    found = None if looks_like_one else CheckpointManager(path).latest()
    if found is None:
        raise CheckpointError(
            f"{what}: no {MARKER} marker (an incomplete checkpoint, e.g. killed while writing, is "
            "never loaded)" + ("" if looks_like_one else " and no complete step-*/ folder in it"))
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

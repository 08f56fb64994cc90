"""The checkpoint folder protocol: atomic `step-<N>/` folders, `latest`, keep-K, RNG.

Layout and protocol: docs/design.md, "Checkpoint layout". Every rank calls
`CheckpointManager.save`: rank 0 creates `step-<N>.tmp/`, all ranks write their
parts, a barrier, rank 0 writes trainer_state.json and the COMPLETE marker
(`finish_folder`), renames the folder, replaces `latest` and prunes to the last
K. A folder without its marker (a kill mid-write) is never loaded and is
removed by the next save. `files.json` lists every part's size and xxh3-64 digest,
so a truncated part, or one with a bit flipped, is named before anything is loaded
(`verify_files`); a full disk while writing removes the `.tmp` folder and raises
`DiskFullError`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
FILES = "files.json"  # {relative path: {"size": bytes, "xxh3": hex}} of the parts, written before the marker
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file."""


class DiskFullError(CheckpointError):
    """The disk filled while a checkpoint was written: the partial folder is removed,
    the previous checkpoints are intact; free space and resume."""


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC anywhere in the exception chain, or (torch's zip writer reports a short
    write without errno: "unexpected pos") less than 1 MiB left where it wrote."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder if folder.exists() else folder.parent).free < 1 << 20
    except OSError:
        return False


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def file_digest(path: Path) -> str:
    """The xxh3-64 digest of a file's bytes, hex. Hashed through a read-only mmap: no copy
    out of the page cache (a part just written, or about to be loaded, is there)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                h.update(view)
    return h.hexdigest()


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "xxh3"}} of every file under `folder` (files.json's content)."""
    return {str(f.relative_to(folder)): {"size": f.stat().st_size, "xxh3": file_digest(f)}
            for f in sorted(folder.rglob("*")) if f.is_file()}


def verify_files(folder: Path) -> None:
    """Every part listed in files.json is there with its size and digest, else
    CheckpointError naming the file as corrupt (a folder from before files.json is not
    checked; one from before the digests, by size only)."""
    listing = folder / FILES
    if not listing.is_file():
        return
    try:
        listed = json.loads(listing.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{listing} is corrupt ({err})") from err
    for rel, entry in sorted(listed.items()):
        size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry.get("xxh3"))
        file = folder / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {FILES})")
        got = file.stat().st_size
        if got != size:
            raise CheckpointError(f"{file} is corrupt: {got} bytes, {size} written")
        if digest is not None and (got_digest := file_digest(file)) != digest:
            raise CheckpointError(f"{file} is corrupt: xxh3 {got_digest}, {digest} written (same size: "
                                  "changed after it was written)")


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
    write_json_atomic(folder / FILES, list_files(folder))
    write_json_atomic(folder / STATE_FILE, state)
    with open(folder / MARKER, "w") as fh:
        fh.write(f"{step}\n")
        fh.flush()
        os.fsync(fh.fileno())


class CheckpointManager:
    """Folders `step-<N>/` under `root`, the `latest` pointer, retention of `keep`.

    `barrier` synchronizes all ranks (a no-op for one process); `any_rank(flag)` is
    True on every rank when it is True on one (a collective; a barrier by itself).
    """

    def __init__(self, root: str | Path, keep: int = 2, rank: int = 0,
                 barrier: Callable[[], None] = lambda: None,
                 any_rank: Callable[[bool], bool] = lambda flag: flag) -> None:
        if keep < 2:
            raise ValueError(f"keep: got {keep}, allowed values: >= 2")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.barrier = barrier
        self.any_rank = any_rank

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
        done = self.complete()
        if pointer.is_file():
            name = pointer.read_bytes().decode(errors="replace").strip()
            m = _STEP_RE.match(name)
            if m and (self.root / name / MARKER).is_file():
                return CheckpointInfo(int(m.group(1)), self.root / name)
            if self.rank == 0:  # a torn or edited pointer: the markers are the truth
                print(f"[checkpoint] warning: {pointer} names {name[:60]!r}, not a complete checkpoint; "
                      f"using {done[-1].path if done else 'none (fresh start)'}", file=sys.stderr, flush=True)
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
        err: BaseException | None = None
        try:
            write_parts(tmp)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            err = e
        self._agree_or_raise(step, tmp, err)
        if self.rank == 0:
            try:
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
            except Exception as e:  # noqa: BLE001
                err = e
        self._agree_or_raise(step, tmp, err)
        return final

    def _agree_or_raise(self, step: int, tmp: Path, err: BaseException | None) -> None:
        """Collective: if any rank failed, all raise; a full disk on any rank is a
        DiskFullError, and the partial `tmp` folder is removed first."""
        if not self.any_rank(err is not None):
            return
        full = self.any_rank(err is not None and _is_disk_full(err, tmp))
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (self.root / "latest.tmp").unlink(missing_ok=True)
        self.barrier()
        if full:
            done = self.complete()
            need = f"about {folder_bytes(done[-1].path):,} bytes needed (the size of the last checkpoint), " \
                if done else ""
            free = shutil.disk_usage(self.root).free
            raise DiskFullError(
                f"no space left on device (ENOSPC) writing checkpoint step {step} to {self.root}: {need}"
                f"{free:,} free; the partial {tmp.name} was removed"
                + (f", {done[-1].path} is intact" if done else "")
                + "; free space, then resume with --resume auto") from err
        if err is not None:
            raise err
        raise CheckpointError(f"checkpoint step {step}: another rank failed writing its part to {tmp}")

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

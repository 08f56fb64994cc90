"""torch.distributed.checkpoint (DCP) folders: `model_optim/` of the none and fsdp
backends and of imported weights-only checkpoints (docs/design.md, "Checkpoint layout").

    save_model_optim(folder, module, optimizer)          # collective, every rank
    load_model_optim(folder, module, optimizer, with_optimizer=True)
    DCPWeights(folder / "model_optim")["blocks.0.norm.weight"]   # one tensor, one process

Only `weights_only` tensor reads: DCP's `.metadata` pickle is read by an
unpickler that admits DCP's own metadata classes and nothing else.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .layout import CheckpointError

SUBDIR = "model_optim"


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


class SafeReader(FileSystemReader):
    """A DCP FileSystemReader whose metadata is read by `_MetadataUnpickler`
    (tensor data is read by DCP itself with ``torch.load(weights_only=True)``)."""

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


def safe_dcp_reader(path: str | Path) -> SafeReader:
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


def save_model_optim(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of the model and AdamW state."""
    msd, osd = get_state_dict(module, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(folder) / SUBDIR))


def load_model_optim(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     with_optimizer: bool = True) -> None:
    """Collective: the model (and optimizer) state of `folder/model_optim`, resharded
    to this run's world size by DCP."""
    path = Path(folder) / SUBDIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no model/optimizer state in this checkpoint")
    msd, osd = get_state_dict(module, optimizer)
    state = {"model": msd, "optim": osd} if with_optimizer else {"model": msd}
    dcp.load(state, storage_reader=safe_dcp_reader(path))
    if not with_optimizer:  # set_state_dict refuses an empty optimizer state
        set_model_state_dict(module, state["model"])
        return
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def write_model(folder: Path, shapes: Mapping[str, tuple[int, ...]],
                get: Callable[[str], torch.Tensor]) -> None:
    """A DCP checkpoint {"model": state dict} written one tensor per file, each
    produced by `get(key)` only when DCP writes it (float32), in one process."""

    class LazyPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            key = write_item.index.fqn[len("model."):]
            return get(key).detach().to("cpu", torch.float32).contiguous()

    plan = {"model": {k: torch.empty(s, dtype=torch.float32, device="meta") for k, s in shapes.items()}}
    writer = FileSystemWriter(str(folder), single_file_per_rank=False, thread_count=1,
                              per_thread_copy_ahead=0)
    with quiet_dcp():
        dcp.save(plan, storage_writer=writer, planner=LazyPlanner(), no_dist=True)

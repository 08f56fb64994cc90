"""Checkpoints: the folder layout and every format in it, and the one model loader.

    manager = CheckpointManager(root, keep, rank, barrier)   # step-<N>/, latest, keep-K (layout)
    model, source = load_model(path)                         # any model folder (weights)
    python -m pretrain.checkpoint to-universal FOLDER         # DeepSpeed universal format

Modules: `layout` (tmp + rename, COMPLETE, `latest`, keep-K, trainer state, RNG
states), `dcp` (model_optim/ of the none and fsdp backends), `deepspeed`
(deepspeed/ of ZeRO 1/2/3), `weights` (reading any of them, safetensors and
transformers folders, and writing the imported weights-only kind). The layout
and its protocol: docs/design.md, "Checkpoint layout".
"""

from .dcp import DCPWeights
from .layout import (
    MARKER,
    STATE_FILE,
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    DiskFullError,
    find_checkpoint,
    load_rng,
    read_trainer_state,
    save_rng,
    verify_files,
    write_json_atomic,
)
from .weights import (
    Source,
    load_model,
    load_tokenizer,
    open_source,
    read_weights,
    write_weights_only,
)

__all__ = [
    "MARKER", "STATE_FILE", "CheckpointError", "CheckpointInfo", "CheckpointManager", "DCPWeights", "DiskFullError",
    "Source", "find_checkpoint", "load_model", "load_rng", "load_tokenizer", "open_source",
    "read_trainer_state", "read_weights", "save_rng", "verify_files", "write_json_atomic", "write_weights_only",
]

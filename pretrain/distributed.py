"""Process group setup and the training engines behind one small interface.

    engine = make_engine(model, cfg, dist)
    loss = lm_loss(engine.module(x, reset=r), y); engine.backward(loss * scale)
    grad_norm, stepped = engine.step(lr)      # skips (and zeroes grads) when non-finite
    engine.save(folder); engine.load(folder)

Backends: "none" (one process), "fsdp" (FSDP2 `fully_shard` per block and at
the root, sharded `torch.distributed.checkpoint` files), "deepspeed" (ZeRO 1/2/3,
DeepSpeed's own checkpoint). gloo on CPU, NCCL on GPUs, chosen automatically.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import safe_dcp_reader
from .config import TrainConfig
from .optim import build_optimizer, set_lr


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return DistInfo(rank, world, local, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; identity for one process). float64 on CPU for exactness."""
    out = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank (every rank gets the same answer)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, S, V), labels (B, S), -100 ignored."""
    return nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100
    )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (parameter names stay unchanged)."""
    for block in model.blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def _global_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(
        params, max_norm if max_norm is not None else float("inf"), foreach=True
    )
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


@torch.no_grad()
def init_sharded(model: nn.Module, device: torch.device, seed: int) -> None:
    """Materialize a meta-device model wrapped by FSDP2 without ever holding all of
    it: a meta template is initialized one block at a time (the root's own
    modules first) on every rank with the same seed, and each rank keeps its
    shard of every tensor (no communication; the same weights at any world size)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from model import build_model

    if any(True for _ in model.buffers()):
        raise ValueError("distributed.meta_init: the model has buffers, which this initializer does not fill")
    model.to_empty(device=device)
    template = build_model(model.cfg, device="meta")
    tied = getattr(model.cfg, "tie_weights", False)

    def fill(target: nn.Module, source: nn.Module) -> None:
        for (_, dst), (_, src) in zip(target.named_parameters(), source.named_parameters()):
            if isinstance(dst, DTensor):
                src = distribute_tensor(src.to(device), dst.device_mesh, dst.placements,
                                        src_data_rank=None)
            dst.copy_(src)

    blocks = template.blocks
    template.blocks = nn.ModuleList()
    template.to_empty(device="cpu")
    if tied:
        template.lm_head.weight = template.embedding.weight
    torch.manual_seed(seed)
    template.reset_parameters()  # the root's own modules (no blocks attached)
    for name, child in template.named_children():
        if name != "blocks":
            fill(getattr(model, name), child)
    for j, block in enumerate(blocks):
        block.to_empty(device="cpu")
        torch.manual_seed(seed + 1 + j)
        block.reset_parameters()
        fill(model.blocks[j], block)
        blocks[j] = block.to_empty(device="meta")


class TorchEngine:
    """backend "none" and "fsdp": plain torch AdamW on local or sharded parameters."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        d = cfg.distributed
        if d.activation_checkpointing:
            enable_activation_checkpointing(model)
        if d.compile:
            for block in model.blocks:
                block.compile(backend=d.compile_backend)
        self.autocast = d.backend == "none" and d.precision == "bf16"
        if d.precision == "bf16_pure":
            model.to(torch.bfloat16)
        if d.backend == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if d.precision == "bf16"
                else MixedPrecisionPolicy()
            )
            for block in model.blocks:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            if d.meta_init:
                init_sharded(model, info.device, cfg.train.seed)
        self.module = model
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(input_ids, reset=reset)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, skip: bool = False) -> tuple[float, bool]:
        """Clip, check and step. Returns (global grad norm, stepped). A non-finite
        norm, or `skip` (a non-finite loss on some rank), skips the update."""
        norm = _global_grad_norm(self.params, self.cfg.train.grad_clip)
        value = float(norm)
        stepped = not skip and bool(torch.isfinite(norm))
        if stepped:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value, stepped

    # ------------------------------------------------------------ checkpoints
    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / "model_optim"))

    def load(self, folder: Path, with_optimizer: bool = True) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        path = folder / "model_optim"
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no model/optimizer state in this checkpoint")
        msd, osd = get_state_dict(self.module, self.optimizer)
        state = {"model": msd, "optim": osd} if with_optimizer else {"model": msd}
        dcp.load(state, storage_reader=safe_dcp_reader(path))  # no arbitrary unpickling
        if not with_optimizer:  # set_state_dict refuses an empty optimizer state
            set_model_state_dict(self.module, state["model"])
            return
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


def make_engine(model: nn.Module, cfg: TrainConfig, info: DistInfo):
    if cfg.distributed.backend == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, info)
    return TorchEngine(model, cfg, info)

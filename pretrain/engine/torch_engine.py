"""Engine of the backends "none" (one process) and "fsdp" (FSDP2 `fully_shard` per
block and at the root): plain torch AdamW on local or sharded parameters, and
sharded `torch.distributed.checkpoint` files (`pretrain.checkpoint.dcp`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from model import build_model

from ..checkpoint import dcp
from ..config import TrainConfig
from ..distributed import DistInfo
from ..optim import build_optimizer, set_lr
from .common import prepare_model


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
        prepare_model(model, d)
        self.autocast = d.backend == "none" and d.precision == "bf16"
        if d.precision == "bf16_pure":
            model.to(torch.bfloat16)
        if d.backend == "fsdp":
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

    def forward(self, input_ids: torch.Tensor, reset: torch.Tensor | None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(input_ids, reset=reset, labels=labels)

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

    def local_shards(self) -> list[torch.Tensor]:
        """This rank's disjoint share of the weights (world-size independent fingerprints)."""
        return [p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                for p in self.module.parameters()]

    def save(self, folder: Path) -> None:
        dcp.save_model_optim(folder, self.module, self.optimizer)

    def load(self, folder: Path, with_optimizer: bool = True) -> None:
        dcp.load_model_optim(folder, self.module, self.optimizer, with_optimizer)

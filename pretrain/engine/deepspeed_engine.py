"""DeepSpeed ZeRO 1/2/3 behind the trainer's engine interface (`pretrain.engine.Engine`).

    engine = DeepSpeedEngine(model, cfg, info)       # distributed.backend: deepspeed
    logits = engine.forward(input_ids, reset)        # engine.module for eval
    engine.backward(loss / grad_accum)               # once per micro batch
    grad_norm, stepped = engine.step(lr, skip)       # once per optimizer step
    engine.save(folder); engine.load(folder)         # folder/deepspeed/<TAG>/...

Decisions:

- Optimizer: the project's `torch.optim.AdamW` with its parameter groups
  (pretrain.optim), handed to DeepSpeed as a client optimizer; DeepSpeed wraps
  it (ZeRO partitions, fp32 master weights). The learning rate is set on the
  wrapped optimizer's groups before every step. No DeepSpeed CPU Adam build.
- Gradient accumulation: DeepSpeed's unmanaged mode
  (`managed_gradient_accumulation: false`): `backward` only accumulates (the
  trainer already divides the loss by grad_accum, so `scale_wrt_gas=False`),
  and our `step` is the accumulation boundary (reduction, clipping, update).
  `gradient_accumulation_steps` is still set to train.grad_accum so that
  DeepSpeed's batch arithmetic matches the config.
- Non-finite handling: a non-finite global gradient norm makes DeepSpeed skip
  the update itself (bf16 `check_grad_overflow`, ZeRO's invalid-norm check) and
  drop the gradients; we report `stepped=False`. `step(skip=True)` (a non-finite
  loss on some rank: the trainer then stops calling `backward` for the rest of
  that step's micro batches) runs DeepSpeed's whole boundary with the inner
  AdamW's `step` replaced by a no-op: the already accumulated gradients of the
  earlier micro batches are reduced and then dropped exactly as after a real
  step, AdamW's moments and step count are untouched, and the weights are
  re-copied from unchanged fp32 masters (bit-identical). If nothing was
  accumulated (the first micro batch was the bad one) DeepSpeed is not called
  at all. So the skip is exact for any grad_accum: nothing of that optimizer
  step is applied, no partial batch ever is. DeepSpeed's own step counter still
  advances on a skip (it is not used: the trainer's step and schedule rule).
- Precision: bf16 = bf16 parameters and activations, fp32 master weights,
  fp32 gradient accumulation and fp32 gradient reduction; fp32 = fp32 throughout.
- Checkpoints: the format (files, meta.json, weights-only loads, the universal
  conversion) is `pretrain.checkpoint.deepspeed`'s; this adapter drives it.
- Another world size, ZeRO-3 <-> ZeRO-1/2, or another precision (fp32 <->
  bf16), in any combination (`layout_changes`; ZeRO-1 <-> ZeRO-2 alone is no
  change: DeepSpeed loads those partitions directly): the optimizer state is
  carried through DeepSpeed's universal checkpoint format. `load` converts
  `deepspeed/state` once (rank 0 runs `python -m pretrain.checkpoint
  to-universal CHECKPOINT`, i.e. DeepSpeed's `ds_to_universal` with
  weights_only loads, into `deepspeed/state_universal`, written to a `.tmp`
  name and renamed); every rank then sets fp32 masters, both AdamW moments and
  the step parameter by parameter with DeepSpeed's full-tensor setters
  (`_load_universal`; DeepSpeed's own universal loader cannot change the stage
  and, at ZeRO-3, gives every group the first group's weight decay). Group
  hyperparameters but lr come from the checkpoint, as in a direct load. If the
  conversion fails the error names that command and what changed.
- Weights only (`with_optimizer=False`, i.e. `--fresh-optimizer`): from any
  checkpoint at any world size, stage and precision: `deepspeed/` through the
  consolidated fp32 weights, `model_optim/` (an FSDP or single-process run, or a
  model imported with `python -m pretrain.convert --from hf --to ours`) one
  tensor at a time; both through `pretrain.checkpoint.read_weights`. A full load
  of a `model_optim/` checkpoint is refused naming --fresh-optimizer.
- One process without torchrun: a one-rank gloo group (in-process store) is
  made for DeepSpeed, which always wants one.
- Private DeepSpeed attributes used (version range checked at import, see
  `pretrain.checkpoint.deepspeed.SUPPORTED`): the optimizer's fp32 partitions
  (`single_partition_of_fp32_groups`, `fp32_partitioned_groups_flat`) for
  fingerprints and AdamW state; `_lazy_init_hp_params_optimizer_state` and
  `_partition_all_parameters` / `_reassign_or_swap_out_partitioned_parameters`
  to relink and refresh after the full-tensor setters. DeepSpeed has no public
  call for these (its universal loader cannot change the ZeRO stage).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import deepspeed as ds
from ..checkpoint import read_trainer_state, read_weights
from ..config import TrainConfig
from ..distributed import DistInfo, barrier
from ..optim import build_optimizer
from .common import prepare_model


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    t, d = cfg.train, cfg.distributed
    bf16 = d.precision == "bf16"
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(t.grad_clip) if t.grad_clip else 0.0,
        "zero_optimization": {
            "stage": d.zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if bf16:
        out["bf16"] = {"enabled": True, "check_grad_overflow": True}
        out["data_types"] = {"grad_accum_dtype": "fp32"}
        out["communication_data_type"] = "fp32"
    return out


class DeepSpeedEngine:
    """backend "deepspeed": ZeRO stage 1, 2 or 3 (distributed.zero_stage)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, info: DistInfo) -> None:
        self._ds = deepspeed = ds.import_deepspeed()
        self.cfg, self.info = cfg, info
        prepare_model(model, cfg.distributed)
        if not dist.is_initialized():  # one process without torchrun: DeepSpeed needs a group
            dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # DeepSpeed reads them; torchrun sets them
        self.ds_config = deepspeed_config(cfg, info.world_size)
        self._inner = build_optimizer(model, cfg.optimizer)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self._inner, config=self.ds_config,
            dist_init_required=None,
        )
        self.module = self.engine.module
        self._micro = 0  # backward calls since the last step

    # ------------------------------------------------------------ training
    def forward(self, input_ids: torch.Tensor, reset: torch.Tensor | None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.engine(input_ids, reset=reset, labels=labels)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer divided by grad_accum
        self._micro += 1

    def step(self, lr: float, skip: bool = False) -> tuple[float, bool]:
        """The accumulation boundary: reduce, clip (train.grad_clip), update.
        Returns (global grad norm before clipping, stepped)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        micro, self._micro = self._micro, 0
        if skip and micro == 0:  # nothing accumulated (the first micro batch was non-finite)
            return float("nan"), False
        if skip:
            # DeepSpeed's full boundary, inner update disabled: gradients are
            # reduced and dropped as after a step; AdamW state and weights unchanged.
            self._inner.step = lambda *args, **kwargs: None
            try:
                self.engine.step()
            finally:
                del self._inner.step
        else:
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        value = float(norm) if norm is not None else float("nan")
        stepped = not skip and self.engine.was_step_applied() and value == value \
            and abs(value) != float("inf")
        return value, stepped

    def local_shards(self) -> list[torch.Tensor]:
        """This rank's disjoint share of the fp32 master weights (zero padding
        only), for world-size independent fingerprints and finiteness checks."""
        opt = self.engine.optimizer
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                     "fp32_groups_flat_partition"):
            groups = getattr(opt, attr, None)
            if groups:
                return [g.detach() for g in groups]
        raise RuntimeError(f"{type(opt).__name__}: no fp32 partitions found")

    # ------------------------------------------------------------ checkpoints
    def save(self, folder: Path) -> None:
        d = self.cfg.distributed
        meta = {"world_size": self.info.world_size, "zero_stage": d.zero_stage, "precision": d.precision}
        ds.save(self.engine, folder, meta, self.info.is_main)

    def load(self, folder: Path, with_optimizer: bool = True) -> None:
        folder = Path(folder)
        target = folder / ds.SUBDIR
        if not with_optimizer:  # weights of any backend's checkpoint (an imported one included)
            self._load_weights(read_weights(folder))
            return
        if not (target / ds.TAG).is_dir():
            if (folder / "model_optim").is_dir():
                backend = read_trainer_state(folder).get("backend", "fsdp or none")
                raise RuntimeError(
                    f"{folder} was written by distributed.backend {backend} (model_optim/), this "
                    "run uses deepspeed: its optimizer state cannot be carried over; start from "
                    "its weights with --resume PATH --fresh-optimizer, or resume with "
                    f"distributed.backend={backend}")
            raise FileNotFoundError(f"{target / ds.TAG}: no DeepSpeed state in this checkpoint")
        meta = ds.read_meta(folder)
        changes = ds.layout_changes(meta, self.info.world_size, self.cfg.distributed.zero_stage,
                                 self.cfg.distributed.precision)
        if not changes:
            with ds.weights_only_loads():
                path, _ = self.engine.load_checkpoint(
                    str(target), tag=ds.TAG, load_optimizer_states=True,
                    load_lr_scheduler_states=False, load_module_only=False)
            if path is None:
                raise RuntimeError(f"{target / ds.TAG}: DeepSpeed could not load this checkpoint")
            return
        # another world size, ZeRO-3 <-> 1/2 or another precision: the partitioned files
        # do not fit this run; DeepSpeed's universal format (one file per parameter) does
        universal = target / ds.UNIVERSAL_TAG
        what = "; ".join(changes)
        if self.info.is_main and not (universal / "zero").is_dir():
            ds.convert_to_universal(folder)
        barrier()
        if not (universal / "zero").is_dir():
            raise RuntimeError(
                f"{target / ds.TAG} does not fit this run ({what}): its optimizer state needs "
                "DeepSpeed's universal format, and the automatic conversion failed (see above); "
                f"convert with: {ds.universal_command(folder)} (DeepSpeed's ds_to_universal), then "
                "resume again")
        self._load_universal(universal / "zero")

    def _load_universal(self, zero: Path) -> None:
        """fp32 master weights, AdamW moments and step, parameter by parameter, from
        a universal checkpoint's `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`,
        through DeepSpeed's stage-independent full-tensor setters; group
        hyperparameters (but lr, which the trainer sets) from `zero/optimizer_state.pt`.
        Ours rather than DeepSpeed's `load_universal` loader: that one needs the
        saved stage's model-states file name (ZeRO-3 <-> 1/2 fails) and, at ZeRO-3,
        gives every parameter group the first group's weight decay."""
        def read(name: str, key: str) -> torch.Tensor:
            file = zero / name / f"{key}.pt"
            try:
                value = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any failure names the file
                raise RuntimeError(f"{file}: unreadable universal checkpoint file ({err})") from err
            return value["param"] if isinstance(value, dict) else value

        with ds.weights_only_loads():  # mmap: a ZeRO-3 source also holds rank 0's flat weights
            saved = torch.load(zero / "optimizer_state.pt", map_location="cpu", mmap=True)
        inner_sd = saved.get("optimizer_state_dict") or {}  # ZeRO-3 sources keep AdamW's here
        self._init_optimizer_state()
        steps = {float(s["step"]) for s in inner_sd.get("state", {}).values() if "step" in s}
        for name, param in self.module.named_parameters():
            shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3: the full shape
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                value = read(name, key)
                if value.numel() != math.prod(shape):
                    raise ValueError(f"{zero / name / key}.pt: {value.numel()} values, this "
                                     f"model's {name} has shape {shape} (another model config?)")
                value = value.to(torch.float32).reshape(shape)
                if key == "fp32":
                    self._ds.utils.safe_set_full_fp32_param(param, value)
                else:
                    self._ds.utils.safe_set_full_optimizer_state(param, value, key)
            if (zero / name / "step.pt").is_file():  # ZeRO-1/2 sources: a step per parameter
                steps.add(float(read(name, "step")))
        if len(steps) != 1:
            raise RuntimeError(f"{zero}: optimizer steps {sorted(steps)} (expected one value)")
        step = steps.pop()
        for hp in self._master_flats():
            self._inner.state[hp]["step"] = torch.tensor(step)
        groups = saved.get("param_groups") or inner_sd.get("param_groups")
        if groups and len(groups) == len(self._inner.param_groups):
            for group, old in zip(self._inner.param_groups, groups):
                group.update({k: v for k, v in old.items() if k not in ("params", "lr")})
        self._refresh_compute_copies()

    def _init_optimizer_state(self) -> None:
        """AdamW's state as its first step would create it (zeros, step 0), where it
        does not exist yet, and linked to DeepSpeed's per-parameter views, so that
        the full-tensor setters have something to write into."""
        for hp in self._master_flats():
            state = self._inner.state[hp]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(hp, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(hp, memory_format=torch.preserve_format)
        opt = self.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2; ZeRO-3 reads
            opt._hp_optimizer_states_linked = False  # the state dict itself. A load relinks
            opt._lazy_init_hp_params_optimizer_state()  # the views without the states.

    def _master_flats(self) -> list[torch.Tensor]:
        """The flat fp32 partitions AdamW keeps its state for. ZeRO-3 hands them to
        the inner optimizer only for the duration of its step (its groups are
        empty in between); ZeRO-1/2 leave them in the groups."""
        flats = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None)
        if flats is not None:
            return list(flats)
        return [hp for group in self._inner.param_groups for hp in group["params"]]

    def _load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set fp32 master weights (and the compute copies) from full tensors, read
        one at a time from `state` (a lazy mapping keeps the peak at one tensor)."""
        names = dict(self.module.named_parameters())
        missing = sorted(set(names) - set(state))
        if missing:
            raise KeyError(f"weights missing from the checkpoint: {missing[:5]}")
        for name, param in names.items():
            tensor = state[name]
            shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3: the full shape
            if tuple(tensor.shape) != shape:
                raise ValueError(f"checkpoint tensor {name}: shape {tuple(tensor.shape)}, "
                                 f"this model's is {shape} (another model config?)")
            self._ds.utils.safe_set_full_fp32_param(param, tensor.to(torch.float32))
        self._refresh_compute_copies()

    def _refresh_compute_copies(self) -> None:
        """Copy the fp32 masters to the parameters the model computes with."""
        opt = self.engine.optimizer
        if hasattr(opt, "update_lp_params"):
            opt.update_lp_params()
        elif hasattr(opt, "_reassign_or_swap_out_partitioned_parameters"):  # ZeRO-3
            opt._partition_all_parameters()  # copy fp32 partitions to the compute partitions
            for sub_group_id in range(len(opt.fp16_partitioned_groups_flat)):
                opt._reassign_or_swap_out_partitioned_parameters(sub_group_id)

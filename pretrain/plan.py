"""Will this run fit, how fast, how long: a plan of a resolved training config on a cluster.

    python -m pretrain.plan CONFIG [--nodes N] [--gpus-per-node G] [--gpu h100|h200|a100|b200|cpu]
                               [--mfu 0.4] [key=value ...]

Prints the parameters (total, per rank under FSDP and each ZeRO stage), the memory
per GPU split into weights, gradients, optimizer state and saved activations per
micro batch (with and without activation checkpointing), the largest micro batch
that fits, FLOPs per token, the step time and tokens/s at the stated MFU, and the
wall time and GPU-hours to the token budget. When the config does not fit it
suggests one that does; exit status 0: fits, 1: it does not (a suggestion is
printed), 2: nothing fits (or a config error).

Activations come from the model itself: one training step (forward, loss, backward) of
the whole model runs on fake tensors (no memory, no compute) under a dispatch mode that
follows every storage from its creation to its release, with the dtypes of the run's
precision (bf16: CPU autocast's policy standing in for the GPU's). On a GPU the mLSTM and
sLSTM cells are the Triton kernels, simulated by stand-ins that allocate what
`xlstm_kernels/triton_ops.py` allocates as of commit 534b72c (chunk states in the input
dtype, kept for the backward unless `model.recompute_states`; per-position rows in
float32); on `--gpu cpu` the torch kernels run as they are.

The trainer's fused LM head and loss (model/head.py) is simulated by a stand-in of its
allocations (its token count is data-dependent, which fake tensors cannot give). The peak
of a step is modelled as
    weights + optimizer state + max(the simulated forward and backward (activations,
    their gradients, the parameter gradients: this layout's share of them, all of them
    when accumulating), gradients + the optimizer step's temporaries)
`tests/test_plan.py` checks it against the measured peak.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import model.head as head
from model import ModelConfig, build_model, flops_per_token
from model.layers import CausalConv1d

from .config import TrainConfig, load_train_config
from .engine.common import enable_activation_checkpointing
from .metrics import measure_matmul_flops, published_peak

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory: float
    """Bytes of device memory."""
    peak_flops: float
    """Dense bf16 FLOP/s (fp32 runs: the same figure; MFU is quoted against it)."""


# The SXM parts; their dense bf16 peaks are the trainer's MFU table (pretrain/metrics.py).
GPUS: dict[str, GPU] = {
    key: GPU(name, memory, published_peak(name, torch.bfloat16))
    for key, name, memory in (("h100", "H100 80GB", 80e9), ("h200", "H200 141GB", 141e9),
                              ("a100", "A100 80GB", 80e9), ("b200", "B200 180GB", 180e9))
}
MFU = 0.40
"""Default model FLOPs utilization, a stated assumption until `make gpu-check` measures one:
the trainer reached 43-48% of a measured fp32 matmul peak on CPU
(benchmarks/results/train_throughput-2026-12-02-cpu.md); 40% leaves room for multi-node
communication."""
HEADROOM = 0.90
"""Fraction of device memory the plan fills: the rest is the CUDA context, NCCL
buffers and allocator fragmentation."""


def cpu_device(peak_flops: float | None = None) -> GPU:
    """This machine as a device: its physical memory, and `peak_flops` (FLOP/s) or else its
    fp32 matmul peak measured now (the trainer's MFU denominator on CPU; a nominal figure
    put the CPU plan's speed about 100x off)."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if peak_flops is None:
        peak_flops = measure_matmul_flops(torch.device("cpu"), dtype=torch.float32)
    return GPU("cpu", float(mem), peak_flops)


# ------------------------------------------------------------------ saved activations


class _Timeline(TorchDispatchMode):
    """Records every new tensor storage an op creates (+bytes) and its release (-bytes),
    in order: the live bytes of a step at every point. Runs on fake tensors."""

    def __init__(self, params: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (serial, +bytes or -bytes)
        self.alive: dict[int, int] = {}  # id(storage) -> serial, while it lives
        self.serial = 0
        self.params = {id(p) for p in params}
        # views of the weights (F.linear's transpose, kept for the backward) are no new memory
        self.before = {id(p.untyped_storage()) for p in params}
        self.weight_casts: set[int] = set()
        """Serials of casts of parameters (autocast's bf16 weights)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.prim.device.default:  # most calls: no tensor comes out
            return out
        cast = func is torch.ops.aten._to_copy.default and id(args[0]) in self.params
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self.alive and id(storage) not in self.before:  # views share one
                    self.serial += 1
                    n = storage.nbytes()
                    self.alive[id(storage)] = self.serial
                    self.events.append((self.serial, n))
                    if cast:
                        self.weight_casts.add(self.serial)
                    weakref.finalize(storage, self._free, id(storage), self.serial, n)
        return out

    def _free(self, key: int, serial: int, n: int) -> None:
        if self.alive.get(key) == serial:
            del self.alive[key]
        self.events.append((serial, -n))

    def serial_of(self, t: torch.Tensor) -> int | None:
        return self.alive.get(id(t.untyped_storage()))


class _TritonMLSTM(torch.autograd.Function):
    """Stand-in for `_MLSTMChunkFn` on fake tensors, allocating what the Triton op does
    (xlstm_kernels/triton_ops.py at 534b72c). Forward, per (B * NH) row: q, k, v made
    contiguous (S x D, input dtype); chunk states (NC x DQK x DV, input dtype; with
    recompute_states dropped after the forward); ns (NC+1 x DQK), ms (NC+1), the last
    state (DQK x DV) float32; h (S x DV, input dtype); mpos, den (SP) float32, winners
    (int32). Backward: the states again when recomputed, their gradients (NC x DQK x
    DV, input dtype), dq, dk, dv (input dtype) and the gate gradients (SP, float32)."""

    @staticmethod
    def forward(ctx, q, k, v, ig, bc, L: int, recompute: bool):  # noqa: ANN001, D102
        B, NH, S, DQK = q.shape
        DV, BH = v.shape[-1], B * NH
        NC = ig.shape[-1] // L
        SP, f32, new = NC * L, torch.float32, q.new_empty
        cs = new((BH, NC, DQK, DV), dtype=q.dtype)
        rows = [new((BH, NC + 1, DQK), dtype=f32), new((BH, NC + 1), dtype=f32), new((BH, NC), dtype=torch.int32),
                new((BH, SP), dtype=f32), new((BH, SP), dtype=f32), new((BH, SP), dtype=torch.int32),
                new((BH, DQK, DV), dtype=f32)]
        h = new((B, NH, S, DV), dtype=q.dtype)
        qc, kc, vc = (t.contiguous().clone() for t in (q, k, v))
        ctx.save_for_backward(qc, kc, vc, ig, bc, *rows, h, *([] if recompute else [cs]))
        ctx.shape = (BH, NC, DQK, DV, recompute)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, dh):  # noqa: ANN001, D102
        qc, kc, vc, ig, bc, *_ = ctx.saved_tensors
        BH, NC, DQK, DV, recompute = ctx.shape
        work = [qc.new_empty((BH, NC, DQK, DV))]  # the states' gradients
        if recompute:
            work.append(qc.new_empty((BH, NC, DQK, DV)))
        out = (torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc), torch.empty_like(ig),
               torch.empty_like(bc))
        del work
        return (*out, None, None)


class _TritonSLSTM(torch.autograd.Function):
    """Stand-in for `_SLSTMFn` (triton_ops.py at 534b72c): forward keeps hs, cs, ns, ms
    (S x DH) and the raw gates (S x 4 x DH) per (B * NH) row in float32; backward
    returns dx and dR."""

    @staticmethod
    def forward(ctx, x, R):  # noqa: ANN001, D102
        B, NH, S, _, DH = x.shape
        f32 = torch.float32
        hs = x.new_empty((B, NH, S, DH), dtype=f32)
        rest = [x.new_empty((B * NH, S, DH), dtype=f32) for _ in range(3)]
        ctx.save_for_backward(hs, *rest, x.new_empty((B * NH, S, 4, DH), dtype=f32))
        ctx.dtypes = (x.dtype, x.shape, R.dtype)
        return hs.to(x.dtype)

    @staticmethod
    def backward(ctx, dh):  # noqa: ANN001, D102
        xdt, shape, rdt = ctx.dtypes
        return dh.new_empty(shape, dtype=xdt), dh.new_empty(ctx.saved_tensors[0].shape[1:2] + (4, shape[-1], shape[-1]),
                                                            dtype=rdt)


class _FusedHeadLossSaves(torch.autograd.Function):
    """Stand-in for `model.head._FusedHeadLoss` on fake tensors (its token count is a
    data-dependent int): allocates what it does. Forward: the gradients of the hidden
    states (input dtype) and of the weight (float32), kept for the backward, and one
    chunk of logits, softmax and products at a time; backward: the two scaled."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, cap, chunk):  # noqa: ANN001, D102
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        h = hidden[:min(chunk, hidden.shape[0])]
        z = (h @ weight.t()).to(acc)
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        g = torch.softmax(z, dim=-1).to(hidden.dtype)
        grad_h[:h.shape[0]] = g @ weight
        grad_w += (g.t() @ h).to(acc)
        del z, g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return hidden.new_zeros((), dtype=acc)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, D102
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype), None, None, None


@contextlib.contextmanager
def _swapped(obj: Any, **attrs: Any):
    """`obj`'s attributes set to `attrs` while the block runs, then restored."""
    orig = {name: getattr(obj, name) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in orig.items():
            setattr(obj, name, value)


@contextlib.contextmanager
def _triton_cells(recompute: bool):
    """Swap the cell ops the model calls for the Triton stand-ins above."""
    import xlstm_kernels

    def mlstm(q, k, v, i, f, *, chunk_size, return_last_state=False, **_: Any):  # noqa: ANN001
        S = q.shape[2]
        L = max(1, min(int(chunk_size), S))
        pad = -S % L
        ig = torch.nn.functional.pad(i.float(), (0, pad))  # the O(S) gate rows, float32
        bc = torch.cumsum(torch.nn.functional.pad(torch.nn.functional.logsigmoid(f.float()), (0, pad)), -1)
        dt = v.dtype
        h = _TritonMLSTM.apply(q.to(dt), k.to(dt), v, ig, bc, L, recompute)
        B, NH, _, DQK = q.shape
        f32 = torch.float32
        state = (q.new_zeros(B, NH, DQK, v.shape[-1], dtype=f32), q.new_zeros(B, NH, DQK, dtype=f32),
                 q.new_zeros(B, NH, dtype=f32))
        return (h, state) if return_last_state else h

    def slstm(x, R, *, return_last_state=False, **_: Any):  # noqa: ANN001
        h = _TritonSLSTM.apply(x, R)
        B, NH, _, _, DH = x.shape
        state = tuple(x.new_zeros(B, NH, DH, dtype=torch.float32) for _ in range(4))
        return (h, state) if return_last_state else h

    with _swapped(xlstm_kernels, mlstm_chunkwise=mlstm, slstm_sequence=slstm):
        yield


@dataclass(frozen=True)
class StepMemory:
    """Simulated bytes of one micro batch's forward and backward (weights and
    optimizer state excluded: they are per layout, see `states_per_rank`)."""

    saved: float
    """Live after the forward and the loss: the saved activations (the fused head keeps
    the gradients of the hidden states and head weight, no logits)."""
    peak: float
    """Peak of activations + transients + whole gradients, in the steady state."""
    grads_at_peak: float
    """Of `peak`, the bytes of parameter gradients (whole, unsharded)."""
    sharded_peak: float
    """`peak` without autocast's bf16 copies of the weights: FSDP's bf16 parameters and
    DeepSpeed's bf16 weights are not copies (the layout counts their working set)."""
    sharded_grads_at_peak: float
    sharded_saved: float
    """`saved` without autocast's bf16 weight copies."""


def simulate_step(mcfg: ModelConfig, batch: int, seq_len: int, precision: str, triton: bool,
                  checkpointing: bool, accumulate: bool) -> StepMemory:
    """Run two micro batches of forward, the fused loss and backward of the model on fake
    tensors (no memory, no compute) and follow every storage's life.

    precision: fp32, bf16 (autocast; the CPU autocast policy stands in for the GPU's),
    bf16_pure (bf16 weights). triton: the cells allocate as the Triton kernels do, else
    the torch kernels run as they are. accumulate: gradients are kept between the micro
    batches (grad_accum > 1), else set to None as the optimizer step does.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    # the trainer's fused head and loss as a stand-in of its allocations; the conv's document
    # resets as keep masks, as on a GPU (the CPU's crossing indices come from nonzero, whose
    # size fake tensors cannot know)
    with FakeTensorMode(), (_triton_cells(mcfg.recompute_states) if triton else contextlib.nullcontext()), \
            _swapped(head, _FusedHeadLoss=_FusedHeadLossSaves), _swapped(CausalConv1d, index_resets_on=()):
        model = build_model(mcfg, device="cpu")
        if precision == "bf16_pure":
            model.to(torch.bfloat16)
        if checkpointing:
            enable_activation_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        idx = torch.zeros(batch, seq_len, dtype=torch.long)
        reset = torch.zeros(batch, seq_len, dtype=torch.bool)
        tl = _Timeline(params)
        with tl:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(idx, reset=reset, labels=idx)  # the trainer's fused head and loss
            saved = sum(n for _, n in tl.events)
            saved_casts = sum(n for serial, n in tl.events if serial in tl.weight_casts)
            loss.backward()
            del loss
            grads = {tl.serial_of(p.grad) for p in params if p.grad is not None}
        # the steady state of the trainer's loop: with accumulation all gradients exist
        whole = sum(p.numel() * p.element_size() for p in params)
        other = live_grads = casts = 0
        best = peak_grads = best_sharded = sharded_grads = 0.0
        for serial, n in tl.events:
            if serial in grads:
                live_grads += n
            else:
                other += n
                if serial in tl.weight_casts:
                    casts += n
            g = whole if accumulate else live_grads
            if other + g > best:
                best, peak_grads = other + g, g
            if other - casts + g > best_sharded:
                best_sharded, sharded_grads = other - casts + g, g
    return StepMemory(float(saved), float(best), float(peak_grads), float(best_sharded), float(sharded_grads),
                      float(saved - saved_casts))


@lru_cache(maxsize=256)
def _simulate_cached(mcfg_yaml: str, batch: int, seq_len: int, precision: str, triton: bool,
                     checkpointing: bool, accumulate: bool) -> StepMemory:
    import yaml

    from model import load_model_config

    mcfg = load_model_config(yaml.safe_load(mcfg_yaml))
    return simulate_step(mcfg, batch, seq_len, precision, triton, checkpointing, accumulate)


def step_memory(mcfg: ModelConfig, micro_batch: int, seq_len: int, precision: str, triton: bool,
                checkpointing: bool, accumulate: bool) -> StepMemory:
    """`simulate_step` at this micro batch (not extrapolated: with activation checkpointing
    the peak is the larger of two terms that grow at different rates). Where the torch
    sLSTM's per-step loop would make a long simulation slow, from lengths of one and two
    chunks instead (every tensor is O(S) or O(B S), the chunk padding aside)."""
    import dataclasses

    import yaml

    key = yaml.safe_dump(dataclasses.asdict(mcfg), sort_keys=True)
    slow = not triton and "s" in getattr(mcfg, "block_types", []) and seq_len > 2 * mcfg.chunk_size
    lengths = (mcfg.chunk_size, 2 * mcfg.chunk_size) if slow else (seq_len, seq_len)
    lo, hi = (_simulate_cached(key, micro_batch, t, precision, triton, checkpointing, accumulate)
              for t in lengths)

    def line(f: str) -> float:
        a, b = getattr(lo, f), getattr(hi, f)
        return a if lengths[0] == lengths[1] else a + (b - a) * (seq_len - lengths[0]) / (lengths[1] - lengths[0])

    return StepMemory(line("saved"), line("peak"), line("grads_at_peak"), line("sharded_peak"),
                      line("sharded_grads_at_peak"), line("sharded_saved"))


# ------------------------------------------------------------------ states per rank


@dataclass(frozen=True)
class Layout:
    """How weights, gradients and optimizer state are spread over the ranks."""

    name: str
    backend: str
    zero_stage: int = 0


LAYOUTS = [Layout("none", "none"), Layout("fsdp", "fsdp"), Layout("zero1", "deepspeed", 1),
           Layout("zero2", "deepspeed", 2), Layout("zero3", "deepspeed", 3)]


def _block_params(model: torch.nn.Module) -> int:
    return max(sum(p.numel() for p in b.parameters()) for b in model.blocks)


def states_per_rank(params: int, block_params: int, layout: Layout, precision: str, world: int) -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer state (AdamW: two moments).

    none: everything whole (autocast's bf16 weight copies are counted with the
    activations: autograd keeps them for the backward). fsdp: float32 (bf16_pure: bf16) shards of everything, plus the
    unsharded block being computed and the one prefetched (bf16 under bf16). ZeRO
    (DeepSpeed bf16: bf16 weights and gradients, float32 master weights with the
    moments): stage 1 shards the optimizer state, 2 also the gradients, 3 also the weights.
    """
    P, n = float(params), float(world)
    w = 2.0 if precision == "bf16_pure" else 4.0
    if layout.backend == "none":  # autocast's bf16 copies: in the simulated activations
        return {"weights": w * P, "grads": w * P, "optimizer": 2 * w * P}
    if layout.backend == "fsdp":
        work = (2.0 if precision != "fp32" else 4.0) * block_params
        return {"weights": w * P / n + 2 * work, "grads": w * P / n + work, "optimizer": 2 * w * P / n}
    if precision == "bf16_pure":
        raise ValueError("bf16_pure is for fsdp and none")
    s = layout.zero_stage
    lo = 2.0 if precision == "bf16" else 4.0  # DeepSpeed's model weights and gradients
    master = 4.0 * P / n if precision == "bf16" else 0.0
    weights = (lo * P / n + 2 * lo * block_params if s == 3 else lo * P) + master
    grads = lo * P / n + lo * block_params if s >= 2 else lo * P
    return {"weights": weights, "grads": grads, "optimizer": 8.0 * P / n}


# ------------------------------------------------------------------ the plan


@dataclass
class MemoryPlan:
    states: dict[str, float]
    activations: float
    """Saved for the backward after the forward and the loss."""
    transient: float
    """Above that at the backward's peak: gradients of activations, a checkpointed
    block's recompute."""
    peak: float


@dataclass
class Plan:
    cfg: TrainConfig
    world: int
    device: GPU
    mfu: float
    params: int
    block_params: int
    layout: Layout
    memory: dict[bool, MemoryPlan]
    """Keyed by activation checkpointing off / on, at the config's micro batch."""
    max_micro_batch: dict[bool, int]
    fpt: int
    step_s: float
    tokens_per_s: float
    tokens_total: int
    wall_s: float
    fits: bool
    suggestion: str | None = None
    per_layout: dict[str, float] = field(default_factory=dict)


def config_layout(cfg: TrainConfig) -> Layout:
    d = cfg.distributed
    if d.backend == "deepspeed":
        return Layout(f"zero{d.zero_stage}", "deepspeed", d.zero_stage)
    return Layout(d.backend, d.backend)


def peak_memory(cfg: TrainConfig, mcfg: ModelConfig, params: int, block_params: int, layout: Layout,
                world: int, micro_batch: int, checkpointing: bool, triton: bool) -> MemoryPlan:
    """Predicted peak bytes on one rank: weights + optimizer state + the larger of the
    backward's peak (simulated, with this layout's share of the gradients) and the
    optimizer step (gradients, plus one moment-sized temporary where AdamW runs foreach:
    FSDP2's DTensor shards; plain tensors take the fused update, which makes none, see
    pretrain/optim.py)."""
    precision = cfg.distributed.precision
    states = states_per_rank(params, block_params, layout, precision, world)
    sim = step_memory(mcfg, micro_batch, cfg.data.seq_len, precision, triton, checkpointing,
                      (cfg.train.grad_accum or 1) > 1)
    whole_grads = params * (2.0 if precision == "bf16_pure" else 4.0)
    share = min(1.0, states["grads"] / whole_grads)
    if layout.backend == "none":  # autocast's bf16 weight copies are activations here
        backward = sim.peak - sim.grads_at_peak + share * sim.grads_at_peak
        saved, above = sim.saved, sim.peak - sim.grads_at_peak - sim.saved
    else:
        backward = sim.sharded_peak - sim.sharded_grads_at_peak + share * sim.sharded_grads_at_peak
        saved, above = sim.sharded_saved, sim.sharded_peak - sim.sharded_grads_at_peak - sim.sharded_saved
    step = states["grads"] + (states["optimizer"] / 2 if layout.backend == "fsdp" else 0.0)
    peak = states["weights"] + states["optimizer"] + max(backward, step)
    return MemoryPlan(states, saved, above, float(peak))


def _counts(mcfg: ModelConfig) -> tuple[int, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = build_model(mcfg, device="cpu")
        seen: set[int] = set()
        total = 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total, _block_params(model)


def make_plan(cfg: TrainConfig, world: int, device: GPU, mfu: float = MFU, full: bool = True,
              memory: bool = True) -> Plan:
    """The plan of `cfg` on `world` ranks of `device`. full=False: the memory of the
    config's own setting only (no other checkpointing setting, largest micro batch or
    suggestion); memory=False: no memory at all (no simulation: instant)."""
    mcfg = cfg.model_config
    triton = device.name != "cpu"
    params, block_params = _counts(mcfg)
    layout = config_layout(cfg)
    t, d = cfg.train, cfg.distributed
    budget = device.memory * (HEADROOM if triton else 1.0)
    settings = (False, True) if full else (d.activation_checkpointing,)
    mem = {ac: peak_memory(cfg, mcfg, params, block_params, layout, world, t.micro_batch_size, ac, triton)
           for ac in (settings if memory else ())}
    biggest = {ac: _largest(cfg, mcfg, params, block_params, layout, world, ac, triton, budget)
               for ac in (settings if memory and full else ())}
    fpt = flops_per_token(mcfg, cfg.data.seq_len)
    tokens_step = t.global_batch_size * cfg.data.seq_len
    recompute = 4 / 3 if d.activation_checkpointing else 1.0  # the forward runs twice
    peak_flops = cfg.hardware.peak_flops or device.peak_flops
    step_s = 3 * fpt * tokens_step * recompute / (world * peak_flops * mfu)
    fits = mem[d.activation_checkpointing].peak <= budget if memory else True
    per_layout = {}
    for lay in LAYOUTS:
        if (lay.backend == "none" and world > 1) or (lay.backend == "deepspeed" and d.precision == "bf16_pure"):
            continue
        per_layout[lay.name] = states_per_rank(params, block_params, lay, d.precision, world)["weights"]
    plan = Plan(cfg, world, device, mfu, params, block_params, layout, mem, biggest, fpt, step_s,
                tokens_step / step_s, t.steps * tokens_step, t.steps * step_s, fits, per_layout=per_layout)
    if not fits and full:
        plan.suggestion = suggest(cfg, mcfg, params, block_params, world, budget, triton)
    return plan


def _largest(cfg: TrainConfig, mcfg: ModelConfig, params: int, block_params: int, layout: Layout, world: int,
             checkpointing: bool, triton: bool, budget: float, sizes: list[int] | None = None) -> int:
    """The largest micro batch (of `sizes`, else any) whose simulated peak fits `budget`:
    a first guess from the line through the config's micro batch and its double (the
    peak is convex in the micro batch), then exact simulations downwards."""
    mb = cfg.train.micro_batch_size

    def peak(b: int) -> float:
        return peak_memory(cfg, mcfg, params, block_params, layout, world, b, checkpointing, triton).peak

    p1, p2 = peak(mb), peak(2 * mb)
    slope = max((p2 - p1) / mb, 1.0)
    guess = int((budget - (p1 - slope * mb)) // slope)
    if not triton:
        # the torch cells hit fake-tensor fallbacks that run on real memory of the full
        # size: no simulations far from the config's micro batch, the line's guess stands
        fitting = [b for b in (sizes or [max(guess, 0)]) if b <= guess]
        return max(fitting, default=0)
    # the peak grows with the micro batch: bisect the candidates up to twice the guess
    cands = sorted(b for b in (sizes or range(1, 2 * max(guess, 1) + 1)) if b <= 2 * max(guess, 1))
    lo, hi, best = 0, len(cands) - 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if peak(cands[mid]) <= budget:
            best, lo = cands[mid], mid + 1
        else:
            hi = mid - 1
    return best


def suggest(cfg: TrainConfig, mcfg: ModelConfig, params: int, block_params: int, world: int,
            budget: float, triton: bool) -> str | None:
    """The first setting that fits, trying in order: a smaller micro batch, activation
    checkpointing, FSDP, ZeRO-3 (each keeping the global batch via grad_accum)."""
    t, d = cfg.train, cfg.distributed
    options: list[tuple[Layout, bool]] = [(config_layout(cfg), d.activation_checkpointing),
                                          (config_layout(cfg), True)]
    if world > 1 or d.backend != "none":
        options += [(Layout("fsdp", "fsdp"), False), (Layout("fsdp", "fsdp"), True)]
        if d.precision != "bf16_pure":
            options.append((Layout("zero3", "deepspeed", 3), True))
    per_rank = t.global_batch_size // world if t.global_batch_size % world == 0 else 0
    sizes = [mb for mb in range(min(t.micro_batch_size, per_rank), 0, -1) if per_rank % mb == 0]
    for layout, ac in options:
        mb = _largest(cfg, mcfg, params, block_params, layout, world, ac, triton, budget, sizes) if sizes else 0
        if mb:
            parts = [f"train.micro_batch_size={mb}", "train.grad_accum=null"]
            if ac != d.activation_checkpointing:
                parts.append(f"distributed.activation_checkpointing={str(ac).lower()}")
            if layout != config_layout(cfg):
                parts.append(f"distributed.backend={layout.backend}")
                if layout.backend == "deepspeed":
                    parts.append(f"distributed.zero_stage={layout.zero_stage}")
            return " ".join(parts)
    return None


# ------------------------------------------------------------------ output


def _b(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.2f} s"


def summary_line(plan: Plan) -> str:
    cfg = plan.cfg
    ac = cfg.distributed.activation_checkpointing
    mem = plan.memory.get(ac)
    fit = "fits" if plan.fits else "DOES NOT FIT"
    peak = f"peak {_b(mem.peak)} of {_b(plan.device.memory)} ({fit}), " if mem else ""
    return (f"plan: {_count(plan.params)} params, {plan.world} x {plan.device.name}, {plan.layout.name} "
            f"{cfg.distributed.precision}, micro batch {cfg.train.micro_batch_size} x {cfg.train.grad_accum} "
            f"x {plan.world} = {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, {peak}"
            f"{plan.tokens_per_s:,.0f} tok/s at MFU {plan.mfu:.0%}, {_count(plan.tokens_total)} tokens in "
            f"{_duration(plan.wall_s)} ({plan.wall_s * plan.world / 3600:,.0f} GPU-h)")


def plan_summary_line(cfg: TrainConfig, world_size: int, gpu: str | None = None, mfu: float = MFU,
                      memory: bool = True, cpu_peak_flops: float | None = None) -> str:
    """One line for the start of a run: peak memory per GPU and whether it fits, tokens/s,
    time and GPU-hours to the budget. Simulates the config's own setting only (seconds;
    memory=False skips it: instant, no peak in the line).
    gpu: a key of GPUS or 'cpu'; None: 'cpu' without CUDA, else the first GPU's name
    if it is one of GPUS, else h100. cpu_peak_flops: the CPU's FLOP/s if already measured
    (the trainer's), else measured here."""
    if gpu is None:
        gpu = "cpu"
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).lower()
            gpu = next((k for k in GPUS if k in name), "h100")
    device = cpu_device(cpu_peak_flops) if gpu == "cpu" else GPUS[gpu]
    return summary_line(make_plan(cfg, world_size, device, mfu, full=False, memory=memory))


def _peak(device: GPU) -> str:
    if device.name == "cpu":
        return f"{device.peak_flops / 1e9:.0f} GFLOP/s fp32 matmul, measured"
    return f"{device.peak_flops / 1e12:.0f} TFLOP/s bf16 dense"


def report(plan: Plan) -> str:
    cfg, mcfg = plan.cfg, plan.cfg.model_config
    t, d = cfg.train, cfg.distributed
    tokens_step = t.global_batch_size * cfg.data.seq_len
    out = [
        f"config: {mcfg.arch} d={mcfg.embedding_dim} blocks={mcfg.num_blocks} context={mcfg.context_length} "
        f"seq_len={cfg.data.seq_len}",
        f"cluster: {plan.world} x {plan.device.name} ({_b(plan.device.memory)}, "
        f"{_peak(plan.device)}), layout {plan.layout.name}, {d.precision}",
        f"parameters: {plan.params:,} total; weights per rank ({d.precision}) by layout: "
        + ", ".join(f"{k} {_b(v)}" for k, v in plan.per_layout.items()),
        f"batch: {t.global_batch_size} sequences = {tokens_step:,} tokens per step = micro batch "
        f"{t.micro_batch_size} x grad_accum {t.grad_accum} x {plan.world} ranks",
        f"memory per rank at micro batch {t.micro_batch_size} "
        f"(cells: {'Triton' if plan.device.name != 'cpu' else 'torch'}):",
    ]
    for ac in (False, True):
        m = plan.memory[ac]
        mark = " <- config" if ac == d.activation_checkpointing else ""
        out.append(
            f"  activation checkpointing {'on ' if ac else 'off'}: weights {_b(m.states['weights'])}, grads "
            f"{_b(m.states['grads'])}, optimizer {_b(m.states['optimizer'])}, saved activations "
            f"{_b(m.activations)} ({_b(m.activations / t.micro_batch_size)} per sequence), more in the "
            f"backward {_b(max(m.transient, 0.0))}; peak {_b(m.peak)}; largest micro batch that fits: "
            f"{plan.max_micro_batch[ac]}{mark}")
    budget = plan.device.memory * (HEADROOM if plan.device.name != "cpu" else 1.0)
    out += [
        f"fits: {'yes' if plan.fits else 'NO'} (budget {_b(budget)} = "
        f"{HEADROOM if plan.device.name != 'cpu' else 1.0:.0%} of the device)",
        f"FLOPs per token: {_count(plan.fpt)} forward, {_count(3 * plan.fpt)} training"
        + (" (+1/3 recompute with activation checkpointing)" if d.activation_checkpointing else ""),
        f"step: {plan.step_s:.3f} s, {plan.tokens_per_s:,.0f} tokens/s at MFU {plan.mfu:.0%}",
        f"budget: {t.steps:,} steps = {_count(plan.tokens_total)} tokens: wall time {_duration(plan.wall_s)}, "
        f"{plan.wall_s * plan.world / 3600:,.0f} GPU-hours",
    ]
    if not plan.fits:
        out.append(f"suggestion: {plan.suggestion}" if plan.suggestion else
                   "suggestion: none fits (micro batch 1, activation checkpointing, FSDP, ZeRO-3); "
                   "use more GPUs or a bigger GPU")
    out.append(summary_line(plan))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pretrain.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML preset (configs/*.yaml)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", choices=[*GPUS, "cpu"], default="h100")
    ap.add_argument("--mfu", type=float, default=MFU, help=f"model FLOPs utilization (default {MFU})")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    args = ap.parse_intermixed_args(argv)  # options and key=value overrides in any order
    world = args.nodes * args.gpus_per_node
    overrides = list(args.overrides)
    # a preset without data paths can still be planned
    if not any(o.startswith("data.train=") for o in overrides):
        overrides.append("data.train=[plan]")
    if not any(o.startswith("data.tokenizer=") for o in overrides):
        overrides.append("data.tokenizer=plan")
    if world > 1 and not any(o.startswith("distributed.backend=") for o in overrides):
        doc_backend = _preset_backend(args.config)
        if doc_backend in (None, "none"):
            overrides.append("distributed.backend=fsdp")
    try:
        cfg = load_train_config(args.config, overrides, world_size=world)
    except ValueError as err:
        print(f"pretrain.plan: {err}", file=sys.stderr)
        return 2
    device = cpu_device() if args.gpu == "cpu" else GPUS[args.gpu]
    plan = make_plan(cfg, world, device, args.mfu)
    print(report(plan))
    if plan.fits:
        return 0
    return 1 if plan.suggestion else 2


def _preset_backend(path: str) -> str | None:
    import yaml

    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    return (doc.get("distributed") or {}).get("backend")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["GPUS", "MFU", "Plan", "make_plan", "peak_memory", "plan_summary_line", "simulate_step",
           "states_per_rank", "step_memory"]

"""Compile every Triton kernel the dispatcher launches, ahead of time for a CUDA target,
without a GPU, and report what ptxas makes of it.

    python -m xlstm_kernels.triton_compile_check                 # sm_90, benchmark shapes
    python -m xlstm_kernels.triton_compile_check --quick         # bf16, widest shape only
    python -m xlstm_kernels.triton_compile_check --out benchmarks/results/x.md

How it compiles what a launch compiles: it runs the public ops themselves
(`mlstm_chunkwise` forward and backward, `mlstm_step`, `slstm_sequence`) on `meta`
tensors of the benchmark shapes, with a stand-in Triton driver that reports the target
GPU. Every `kernel[grid](...)` then goes through the JIT's own binder: the same
specialisation (16-byte pointer alignment, integer divisibility by 16 and == 1, dtypes),
the same constexprs and the same num_warps / num_stages as on the GPU, and is compiled
(warmup) instead of launched. Every flag combination the dispatcher can pick is driven:
dtype (bf16, fp32), initial state, resets, a gradient of the last state, recompute_states.

Per distinct compiled kernel it reports shared memory (Triton's dynamic allocation, the
number that must fit the device), registers per thread, and spill stores/loads from the
`ptxas -v` log of the compile (Triton's wheel ships ptxas). It fails (exit 1) on a compile
error, shared memory over the device limit, any spill in a 16-bit launch, or a 16-bit launch
over the register budget (triton_ops.REG_BUDGET, 168: two 8-warp blocks per SM; the hot
tile kernels reach it under a ptxas cap, shown as "8 (cap 168)" in the warps column).
float32 launches, the exact path with FMA dots, are reported; --strict-fp32 fails their
spills too.
Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 100: 227 * 1024}  # opt-in smem per block
SM_COUNT = {90: 132, 80: 108, 100: 148}  # H100/H200 SXM, A100, B200: the state-pass split
# L, DQK, DV: the benchmark shapes, then the NeurIPS presets' heads (xlstm10/71-125m: 384,
# -1.3b: 1024, chunk 64); the kernels loop over DQK at run time, so a wider head compiles to
# the same kernel where the launch's specialisation is the same (the per-shape table says)
MLSTM_SHAPES = [(64, 256, 512), (128, 256, 512), (64, 128, 128), (128, 128, 128),
                (64, 384, 384), (64, 1024, 1024)]
BENCH_S, BENCH_NH, BENCH_TOKENS = 8192, 8, 65536
SLSTM_DH = (192, 512)  # head dims of the 125M and 1.3B sLSTM presets (4 heads)


@dataclass
class Row:
    kernel: str
    dtype: str
    flags: str
    shape: str
    warps: int
    stages: int
    maxnreg: int = 0  # the launch's register cap (ptxas .maxnreg); 0: none
    shared: int = -1
    regs: int = -1
    spill_st: int = -1
    spill_ld: int = -1
    vec16: int = -1  # 16-byte global loads in the PTX (what the alignment hints buy)
    error: str = ""
    seconds: float = 0.0
    notes: list = field(default_factory=list)


class _FakeDriver:
    """Just enough of a Triton driver for the JIT to bind arguments and compile."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def is_active(self):
        return True


_PTXAS_LOGS: list[str] = []


@contextlib.contextmanager
def _capture_ptxas():
    """Keep the log of every ptxas run Triton makes (it passes -v and writes the log to a
    temporary file it only reads on failure)."""
    from triton.backends.nvidia import compiler as nvc

    real = nvc.subprocess.run

    def run(cmd, *a, **kw):
        out = real(cmd, *a, **kw)
        err = kw.get("stderr")
        if "ptxas" in os.path.basename(str(cmd[0])) and hasattr(err, "name"):
            with open(err.name) as fh:
                _PTXAS_LOGS.append(fh.read())
        return out

    nvc.subprocess.run = run
    try:
        yield
    finally:
        nvc.subprocess.run = real


def _parse_ptxas(log: str) -> tuple[int, int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1,
            int(sp.group(1)) if sp else -1, int(sp.group(2)) if sp else -1)


def _vec16(ptx: str) -> int:
    return len(re.findall(r"ld\.global[.\w]*\.v4\.[bfu]32|cp\.async\.c[ag]\.shared\.global[^;]*, 16;",
                          ptx))


def _ptxas_fallback(ptx: str, arch: int) -> str:
    """ptxas -v on the kernel's PTX, for a Triton that ran ptxas differently."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name=sm_{arch}a", src, "-o",
                               os.path.join(d, "k.o")], capture_output=True, text=True)
    return proc.stderr + proc.stdout


def _drive(arch: int, quick: bool, rows: dict, context: dict, only: str | None = None):
    """Run the public ops on meta tensors; every launch compiles instead."""
    import torch
    from triton.runtime.jit import JITFunction

    import xlstm_kernels
    from xlstm_kernels import triton_ops as ops

    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        t0 = time.time()
        n_logs = len(_PTXAS_LOGS)
        # label: kernel, the pointer dtypes of q/x, the constexprs and launch options
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        dt = next((str(bound[n].dtype).replace("torch.", "")
                   for n in ("q_ptr", "k_ptr", "x_ptr", "r_ptr", "dh_ptr", "gs_ptr", "xc_ptr")
                   if n in bound and hasattr(bound[n], "dtype")), "?")
        flags = ",".join(f"{k}" for k in sorted(kwargs) if kwargs[k] is True)
        blocks = ",".join(f"{k}={kwargs[k]}" for k in sorted(kwargs)
                          if k in names and not isinstance(kwargs[k], bool) and k != "UPCAST")
        # integer arguments are specialised on == 1 and divisibility by 16 (as the JIT does):
        # a head width that changes either is a different kernel, one that does not is not
        spec = tuple(n for n, a in bound.items() if isinstance(a, int)
                     and not isinstance(a, bool) and n not in kwargs and (a == 1 or a % 16 == 0))
        key = (self.__name__, dt, flags, blocks, kwargs.get("num_warps", 4),
               kwargs.get("num_stages", 3), kwargs.get("maxnreg"), spec)
        if key in rows:
            rows[key].notes.append(context["now"])
            return None
        row = Row(self.__name__, dt, flags or "-", f"{blocks} @ {context['now']}",
                  kwargs.get("num_warps", 4), kwargs.get("num_stages", 3),
                  kwargs.get("maxnreg") or 0)
        rows[key] = row
        try:
            kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
            row.shared = int(kernel.metadata.shared)
            logs = _PTXAS_LOGS[n_logs:]
            log = logs[-1] if logs else _ptxas_fallback(kernel.asm["ptx"], arch)
            row.regs, row.spill_st, row.spill_ld = _parse_ptxas(log)
            row.vec16 = _vec16(kernel.asm["ptx"])
        except Exception as err:  # noqa: BLE001 - report every kernel, then fail
            row.error = f"{type(err).__name__}: {str(err)[:300]}"
        row.seconds = time.time() - t0
        return None

    JITFunction.run = run
    real_check, real_target = ops._check_device, ops._state_programs_target
    ops._check_device = lambda *a, **k: None
    ops.COMPILE_ALL = True  # every launch-option candidate of TUNE_SPACE
    ops._state_programs_target = lambda: 2 * SM_COUNT.get(arch, 132)
    try:
        meta = torch.device("meta")
        dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
        if only:
            dtypes = (getattr(torch, only),)
        # quick: the widest benchmark head at chunk 64 and 128 (two query tiles per chunk)
        shapes = MLSTM_SHAPES[:2] if quick else MLSTM_SHAPES
        S, NH = BENCH_S, BENCH_NH
        B = max(1, BENCH_TOKENS // S)
        for dt in dtypes:
            for L, DQK, DV in shapes:
                for init in (False, True):
                    for reset in (False, True):
                        for rec in (False, True):
                            for last in (False, True):
                                if quick and (rec or last or not init):
                                    continue
                                context["now"] = f"L={L} DQK={DQK} DV={DV}"
                                q, k = (torch.empty(B, NH, S, DQK, device=meta, dtype=dt,
                                                    requires_grad=True) for _ in range(2))
                                v = torch.empty(B, NH, S, DV, device=meta, dtype=dt,
                                                requires_grad=True)
                                i, f = (torch.empty(B, NH, S, device=meta) for _ in range(2))
                                st = None
                                if init:
                                    st = (torch.empty(B, NH, DQK, DV, device=meta),
                                          torch.empty(B, NH, DQK, device=meta),
                                          torch.empty(B, NH, device=meta))
                                rst = torch.empty(B, S, device=meta, dtype=torch.bool) \
                                    if reset else None
                                h, (C, n, m) = xlstm_kernels.mlstm_chunkwise(
                                    q, k, v, i, f, chunk_size=L, initial_state=st, reset=rst,
                                    return_last_state=True, backend="triton",
                                    recompute_states=rec)
                                loss = h.float().sum() + (C.sum() if last else 0)
                                loss.backward()
            if not quick:
                for DQK, DV in {(d, v) for _, d, v in shapes}:
                    context["now"] = f"step DQK={DQK} DV={DV}"
                    for has in (False, True):
                        q, k = (torch.empty(B, NH, DQK, device=meta, dtype=dt,
                                            requires_grad=True) for _ in range(2))
                        v = torch.empty(B, NH, DV, device=meta, dtype=dt, requires_grad=True)
                        i, f = (torch.empty(B, NH, device=meta) for _ in range(2))
                        st = (torch.empty(B, NH, DQK, DV, device=meta, requires_grad=True),
                              torch.empty(B, NH, DQK, device=meta),
                              torch.empty(B, NH, device=meta)) if has else None
                        h, _ = xlstm_kernels.mlstm_step(q, k, v, i, f, st, backend="triton")
                        h.float().sum().backward()
            for DH in (SLSTM_DH[-1:] if quick else SLSTM_DH):
                context["now"] = f"sLSTM DH={DH} NH=4"
                for init in ((True,) if quick else (False, True)):
                    for reset in ((True,) if quick else (False, True)):
                        x = torch.empty(B, 4, S, 4, DH, device=meta, dtype=dt, requires_grad=True)
                        R = torch.empty(4, 4, DH, DH, device=meta, dtype=dt, requires_grad=True)
                        st = tuple(torch.empty(B, 4, DH, device=meta) for _ in range(4)) \
                            if init else None
                        rst = torch.empty(B, S, device=meta, dtype=torch.bool) if reset else None
                        h = xlstm_kernels.slstm_sequence(x, R, initial_state=st, reset=rst,
                                                         backend="triton")
                        h.float().sum().backward()
    finally:
        JITFunction.run = real_run
        ops._check_device, ops._state_programs_target = real_check, real_target
        ops.COMPILE_ALL = False


def table(rows: list[Row], arch: int, limit: int, version: str) -> str:
    out = [f"Triton {version}, sm_{arch}, shared memory limit {limit} B per block; "
           f"mLSTM at S={BENCH_S}, NH={BENCH_NH}, B={max(1, BENCH_TOKENS // BENCH_S)}. "
           "Registers and spills from ptxas -v of the launch's own compile.", "",
           "| kernel | dtype | flags | blocks @ first shape | warps | stages | regs/thread "
           "| spill st/ld B | shared B | 16-B loads | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = _ok(r, limit)
        if r.error:
            out.append(f"| {r.kernel} | {r.dtype} | {r.flags} | {r.shape} | {_warps(r)} | "
                       f"{r.stages} | - | - | - | - | FAIL: {r.error[:120]} |")
            continue
        mark = "ok" if ok else "FAIL"
        if ok and (r.spill_st or r.spill_ld):
            mark = "ok (fp32 spill)"
        out.append(f"| {r.kernel} | {r.dtype} | {r.flags} | {r.shape} | {_warps(r)} | {r.stages} "
                   f"| {r.regs} | {r.spill_st}/{r.spill_ld} | {r.shared} | {r.vec16} | "
                   f"{mark} |")
    return "\n".join(out) + "\n"


def _warps(r: Row) -> str:
    return f"{r.warps} (cap {r.maxnreg})" if r.maxnreg else str(r.warps)


def shape_table(rows: list[Row], limit: int) -> str:
    """Per shape, per kernel and dtype: what that shape's launches compiled to (every flag
    combination and launch candidate), the same kernels shared with other shapes included."""
    groups: dict = {}
    for r in rows:
        first = r.shape.split(" @ ", 1)[-1]
        for ctx in dict.fromkeys([first, *r.notes]):
            groups.setdefault((ctx, r.kernel, r.dtype), []).append(r)
    out = ["| shape | kernel | dtype | variants | warps | regs/thread (min-max) "
           "| spill st/ld B (max) | shared B (max) | ok |", "|---|---|---|---|---|---|---|---|---|"]
    for (ctx, kernel, dtype), rs in groups.items():
        good = [r for r in rs if not r.error]
        if not good:
            out.append(f"| {ctx} | {kernel} | {dtype} | {len(rs)} | - | - | - | - | FAIL |")
            continue
        warps = ",".join(sorted({_warps(r) for r in good}))
        regs = f"{min(r.regs for r in good)}-{max(r.regs for r in good)}"
        sp = f"{max(r.spill_st for r in good)}/{max(r.spill_ld for r in good)}"
        ok = "ok" if all(_ok(r, limit) for r in rs) else "FAIL"
        out.append(f"| {ctx} | {kernel} | {dtype} | {len(rs)} | {warps} | {regs} | {sp} "
                   f"| {max(r.shared for r in good)} | {ok} |")
    return "\n".join(out) + "\n"


STRICT_FP32 = False  # --strict-fp32
REG_BUDGET = 168  # = triton_ops.REG_BUDGET (not imported here: torch loads only in _drive)


def _ok(r: Row, limit: int) -> bool:
    """No compile error, shared memory within the limit, no spill, and a 16-bit launch
    within the register budget. float32 launches (IEEE tl.dot: FMA with register operands,
    the exact path, not the training one) may spill a few bytes and exceed the budget:
    reported, and their spills only failed with --strict-fp32."""
    spills = r.spill_st != 0 or r.spill_ld != 0
    if spills and r.dtype == "float32" and not STRICT_FP32:
        spills = False
    over = r.dtype != "float32" and r.regs > REG_BUDGET
    return not r.error and 0 <= r.shared <= limit and not spills and not over


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    p.add_argument("--quick", action="store_true",
                   help="bf16, the widest mLSTM shape with init+reset, the widest sLSTM")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="only this input dtype")
    p.add_argument("--strict-fp32", action="store_true",
                   help="fail on spills of float32 launches too")
    p.add_argument("--smem-limit", type=int, default=None,
                   help="shared memory limit in bytes (default: the device's opt-in limit)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("triton_compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton
    from triton.runtime import driver

    global STRICT_FP32
    STRICT_FP32 = args.strict_fp32
    limit = args.smem_limit or SMEM_LIMIT.get(args.arch, 99 * 1024)
    rows: dict = {}
    driver.set_active(_FakeDriver(args.arch))
    t0 = time.time()
    try:
        with _capture_ptxas(), tempfile.TemporaryDirectory() as cache:
            # a fresh cache: a cached kernel would skip ptxas and its log
            os.environ["TRITON_CACHE_DIR"] = cache
            with contextlib.suppress(Exception):
                triton.knobs.cache.dir = cache
            _drive(args.arch, args.quick, rows, {"now": ""}, args.dtype)
    finally:
        with contextlib.suppress(Exception):
            driver.reset_active()
    text = table(list(rows.values()), args.arch, limit, triton.__version__)
    text += "\nPer shape (the kernels each shape's launches compiled to):\n\n"
    text += shape_table(list(rows.values()), limit)
    failures = sum(not _ok(r, limit) for r in rows.values())
    print(text)
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(rows)} kernels, "
          f"{failures} failure(s), {time.time() - t0:.0f}s")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every Triton kernel ahead of time for a CUDA target, without a GPU.

    python -m xlstm_kernels.triton_compile_check            # sm_90 (H100/H200), the benchmark shapes
    python -m xlstm_kernels.triton_compile_check --quick    # the widest variant of each kernel

The interpreter (TRITON_INTERPRET=1, how the tests run the kernels on CPU) never lowers a
kernel to PTX, so it cannot see what only the compiler sees: typing of loop-carried values,
control flow, tile shapes tl.dot refuses, shared memory beyond the device. This script
lowers each kernel with the tile sizes and launch options that `triton_ops` picks for the
benchmark shapes and checks its shared memory against the device's limit. Triton ships the
CUDA backend and ptxas in its wheel, so this runs on a CPU-only machine. Must run without
TRITON_INTERPRET (under it, @triton.jit gives interpreted functions that cannot compile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # opt-in dynamic shared memory per block


def _signature(fn, ptr_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*fp32")
        elif name in ("scale", "eps"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _variants(quick: bool):
    from . import triton_mlstm as tm
    from . import triton_ops as ops
    from . import triton_slstm as ts

    ints = {"seg_ptr": "*i32", "carry_ptr": "*i32", "amax_ptr": "*i32", "reset_ptr": "*i32"}
    dtypes = ("bf16",) if quick else ("bf16", "fp32")
    shapes = [(64, 256, 512)] if quick else [(64, 256, 512), (128, 256, 512), (64, 128, 128)]
    resets = (True,) if quick else (False, True)
    for dt in dtypes:
        io = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", **ints}
        for L, DQK, DV in shapes:
            b = ops.chunk_blocks(L, DQK, DV)
            for rs in resets:
                common = {"HAS_RESET": rs, "UPCAST": False}
                yield (tm.mlstm_fwd_state_kernel, io,
                       {"BK": b["BK"], "BV": b["BV"], "BT": b["BT"], "HAS_INIT": True, **common},
                       ops._opts(b["BK"]))
                yield (tm.mlstm_fwd_out_kernel, io,
                       {"BT": b["BT"], "BD": b["BD"], "BV": b["BV"], **common}, ops._opts(b["BD"]))
                yield (tm.mlstm_bwd_state_kernel, io,
                       {"BK": b["BK"], "BV": b["BV_B"], "BT": b["BT_B"], "HAS_DLAST": True,
                        **common}, ops._opts(b["BK"]))
                for fn in (tm.mlstm_bwd_dk_kernel, tm.mlstm_bwd_dv_kernel, tm.mlstm_bwd_dq_kernel):
                    yield (fn, io, {"BT": b["BT_B"], "BD": b["BD"], "BV": b["BV_B"], **common},
                           ops._opts(b["BD"]))
        if not quick:
            for fn in (tm.mlstm_step_fwd_kernel, tm.mlstm_step_bwd_kernel):
                yield fn, io, {"BD": 256, "BV": ops.STEP_BLOCK_V, "HAS_STATE": True}, {}
        sl = {"x_ptr": f"*{dt}", "r_ptr": f"*{dt}", **ints}
        for BD in ((512,) if quick else (128, 512)):
            for fn in (ts.slstm_fwd_kernel, ts.slstm_bwd_kernel):
                yield (fn, sl, {"BD": BD, "BI": ops._slstm_block(BD), "HAS_INIT": True,
                                "HAS_RESET": True}, {"num_warps": ops._slstm_warps(BD)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    p.add_argument("--quick", action="store_true", help="the widest variant of each kernel")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("triton_compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    limit = SMEM_LIMIT.get(args.arch, 99 * 1024)
    failures = 0
    for fn, ptrs, constexprs, opts in _variants(args.quick):
        t0 = time.time()
        label = f"{fn.__name__} {ptrs.get('q_ptr', ptrs.get('x_ptr', ''))} {constexprs} {opts}"
        try:
            src = ASTSource(fn=fn, signature=_signature(fn, ptrs, constexprs),
                            constexprs=constexprs)
            kernel = triton.compile(src, target=target, options=dict(opts))
            shared = kernel.metadata.shared
        except Exception as err:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"FAIL {label}: {type(err).__name__}: {str(err)[:500]}", flush=True)
            continue
        ok = shared <= limit
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}: shared {shared} B (limit {limit}), "
              f"{time.time() - t0:.1f}s", flush=True)
    print(f"triton {triton.__version__}, sm_{args.arch}: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

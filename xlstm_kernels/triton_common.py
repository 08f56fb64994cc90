"""Small Triton helpers shared by the raw kernels.

Reductions go through `_sum` / `_max` / `_min`: normally triton's own tl.sum / tl.max /
tl.min. Those are @jit functions of triton.language.standard, and when triton was imported
before TRITON_INTERPRET=1 was set (by another test module, torch._dynamo, transformers...)
they are compiled-mode functions that the interpreter refuses to call. In that one case the
helpers are `tl.reduce` with combine functions of our own, decorated here and so in the
mode our kernels run in (slower under the interpreter, the same lowering when compiled).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _sum_own(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add_combine)


@triton.jit
def _max_own(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max_combine)


@triton.jit
def _min_own(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _min_combine)


def _std_lib_matches_mode() -> bool:
    if os.environ.get("TRITON_INTERPRET", "") != "1":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


if _std_lib_matches_mode():
    _sum, _max, _min = tl.sum, tl.max, tl.min
else:  # pragma: no cover - depends on the import order of the process
    _sum, _max, _min = _sum_own, _max_own, _min_own


@triton.jit
def _mm(a, b, DT: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with both operands cast to the input dtype DT (tensor cores for bf16/fp16,
    IEEE fp32 otherwise), fp32 accumulation. UPCAST (the interpreter): the rounded operands
    are upcast to fp32 before the dot, since the interpreter's bf16 tl.dot is wrong."""
    a = a.to(DT)
    b = b.to(DT)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")

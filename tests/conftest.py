"""Test-wide settings: one intra-op thread per worker (the suite runs on 2 workers of a 2-core machine),
and, without CUDA, Triton's interpreter for every test module.

``TRITON_INTERPRET`` must be set before the first mixlab module defines its ``@triton.jit`` kernels: a
kernel defined without it cannot be run by the interpreter later ("Cannot call @triton.jit'd outside of
the scope of a kernel"), so a module-level ``setdefault`` in one test file is not enough once any file
collected earlier imports the kernels. On a CUDA machine the kernels compile for the GPU as usual.

bf16 under the interpreter (tensor-core-like dots, RNE casts): Triton's interpreter keeps bf16 as raw
``uint16`` bits and multiplies (and adds) those bits in ``tl.dot`` and elementwise ops, which gives garbage,
and casts float32 → bf16 by truncation.
:func:`patched_bf16` fixes all three for the duration of a ``with`` block: dot operands in bf16/fp16 are
widened to float32 exactly and accumulated in float32 (exact products, as on tensor cores), bf16
arithmetic runs in float32 and rounds back, and float32 → bf16 rounds to nearest even as the GPU does.
The ``bf16_interpreter`` fixture applies it to one test. Test and diagnostic code only.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + r) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


@contextlib.contextmanager
def patched_bf16():
    """Patch the interpreter's ``create_dot`` and bf16 casts (see the module docstring)."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    B = interp.InterpreterBuilder
    old_dot, old_cast, old_bin, old_un = B.create_dot, B.cast_impl, B.binary_op, B.unary_op

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return _bf16_to_f32(h.data)
        return h.data.astype(np.float32) if h.dtype.scalar == tl.float16 else h.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar in (tl.bfloat16, tl.float16) or b.dtype.scalar in (tl.bfloat16, tl.float16):
            acc = np.matmul(widen(a), widen(b), dtype=np.float32)
            return interp.TensorHandle((acc + d.data).astype(d.data.dtype), d.dtype.scalar)
        return old_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        s, t = src.dtype.scalar, dst_type.scalar
        if s == tl.bfloat16 and t == tl.float32:
            return interp.TensorHandle(_bf16_to_f32(src.data), tl.float32)
        if s == tl.float32 and t == tl.bfloat16:
            return interp.TensorHandle(_f32_to_bf16(src.data), tl.bfloat16)
        return old_cast(self, src, dst_type)

    def binary_op(self, lhs, rhs, op):  # bf16 arithmetic: in float32, rounded back
        if lhs.dtype.scalar != tl.bfloat16:
            return old_bin(self, lhs, rhs, op)
        out = op(_bf16_to_f32(lhs.data), _bf16_to_f32(rhs.data))
        if out.dtype == np.bool_:
            return interp.TensorHandle(out, tl.int1)
        return interp.TensorHandle(_f32_to_bf16(out), tl.bfloat16)

    def unary_op(self, arg, op):
        if arg.dtype.scalar != tl.bfloat16:
            return old_un(self, arg, op)
        return interp.TensorHandle(_f32_to_bf16(op(_bf16_to_f32(arg.data))), tl.bfloat16)

    B.create_dot, B.cast_impl, B.binary_op, B.unary_op = create_dot, cast_impl, binary_op, unary_op
    try:
        yield
    finally:
        B.create_dot, B.cast_impl, B.binary_op, B.unary_op = old_dot, old_cast, old_bin, old_un


@pytest.fixture
def bf16_interpreter():
    """Run the test with :func:`patched_bf16` (meaningful only under ``TRITON_INTERPRET=1``)."""
    with patched_bf16():
        yield

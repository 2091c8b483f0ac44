"""Test-wide settings: one intra-op thread per worker (the suite runs on 2 workers of a 2-core machine),
and, without CUDA, Triton's interpreter for every test module.

``TRITON_INTERPRET`` must be set before the first mixlab module defines its ``@triton.jit`` kernels: a
kernel defined without it cannot be run by the interpreter later ("Cannot call @triton.jit'd outside of
the scope of a kernel"), so a module-level ``setdefault`` in one test file is not enough once any file
collected earlier imports the kernels. On a CUDA machine the kernels compile for the GPU as usual.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)

"""Test-wide settings: one intra-op thread per worker (the suite runs on 2 workers of a 2-core machine)."""

import torch

torch.set_num_threads(1)

"""One forward + backward of the selective scan at B32 T2048 D4096 N16 (bf16) with a given launch config, for ncu.

    python3 benchmarks/ncu_selective_scan.py 3,16,8,32,1,8,64,2            # compile and warm up
    ncu --kernel-name regex:"seq_bwd|seq_fwd" --launch-skip 2 --launch-count 2 --set full -o scan \\
        python3 benchmarks/ncu_selective_scan.py 3,16,8,32,1,8,64,2

Figures from such runs: benchmarks/results/ncu-selective-scan-*.json, NOTES-mamba-kernels.md §9.
"""

import sys

import torch

from mixlab.bench.cases_mamba import _scan_inputs
from mixlab.ops.selective_scan.triton.op import selective_scan_bwd, selective_scan_fwd

cfg = [int(x) for x in sys.argv[1].split(",")]
ins = _scan_inputs(32, 4096, 2048, 16, "cuda", torch.bfloat16)
B, C = ins["B"].unsqueeze(1), ins["C"].unsqueeze(1)
args = (ins["u"], ins["delta"], ins["A"], B, C, ins["D"], ins["z"], ins["delta_bias"])
for _ in range(2):
    out, last, states = selective_scan_fwd(*args, None, True, cfg)
    selective_scan_bwd(*args, states, torch.randn_like(out), None, True, cfg)
torch.cuda.synchronize()

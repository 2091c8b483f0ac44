"""Registers, spill bytes and shared memory of the chunk kernels compiled for sm_90, without a GPU.

Cross-compiles ``mixlab.ops._triton.chunk`` kernels with this machine's Triton and its bundled ptxas
(``ptxas -v``) at the constexprs given in ``CASES``, and writes JSON (Triton version, ptxas version, each case's
registers / spill-store bytes / shared memory) to ``--out``. The GPU machine's Triton may allocate differently:
the figures are leads, the device run decides. Pointer arguments are taken 16-byte aligned, as launched.

    python benchmarks/sm90_registers.py --out benchmarks/results/sm90-registers-....json
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from mixlab.ops._triton import chunk

F32 = {"dPs", "g", "xd", "Dp", "ht", "h0", "dht", "dh0", "dG", "dg", "Tm", "beta", "dbeta", "hs"}
I32 = {"cu_seqlens", "chunk_indices", "chunk_offsets"}
INTS = {"T", "NT", "NTOK", "SVT", "SLOT", "SEG"}

SSD = {"H": 64, "HK": 1, "K": 128, "V": 64, "USE_G": True, "IS_VARLEN": False}
GDN = {"H": 16, "HK": 16, "K": 128, "V": 128, "USE_G": True, "IS_VARLEN": False}
_DQ = {"USE_DELTA": False, "LEAN": False, "BK": 64}
_DH = {"USE_DELTA": False, "USE_FINAL_STATE_GRADIENT": False, "STORE_INITIAL_STATE_GRADIENT": False, "BK": 128}
_HO = {"USE_DELTA": False, "USE_INITIAL_STATE": False, "STORE_FINAL_STATE": False, "XD": True, "HAS_D": True,
       "D_PER_V": False, "BK": 128}  # fmt: skip

_GHO = {"USE_DELTA": True, "USE_INITIAL_STATE": False, "STORE_FINAL_STATE": False, "XD": False, "HAS_D": False,
        "D_PER_V": False, "BT": 64, "BK": 128, "BV": 32}  # fmt: skip
_H = {"USE_DELTA": True, "USE_INITIAL_STATE": False, "STORE_FINAL_STATE": False, "SAVE_VNEW": True, "XD": False,
      "BT": 64, "BK": 128}  # fmt: skip

_SPLIT = {"H": 64, "HK": 1, "K": 128, "V": 64, "IS_VARLEN": False, "BT": 64, "BK": 64, "BV": 64, "HB": 16}

#: (label, kernel name, constexprs, num_warps, num_stages[, maxnreg])
CASES = [
    ("ssd dqkwg BT64 BV32 4w (session 9 default)", "_bwd_dqkwg_kernel", {**SSD, **_DQ, "BT": 64, "BV": 32}, 4, 3),
    ("ssd dqkwg BT64 BV64 4w (session 10 default)", "_bwd_dqkwg_kernel", {**SSD, **_DQ, "BT": 64, "BV": 64}, 4, 3),
    ("ssd dqkwg BT64 BV64 8w", "_bwd_dqkwg_kernel", {**SSD, **_DQ, "BT": 64, "BV": 64}, 8, 3),
    ("ssd dqkwg BT128 BK32 BV32 8w", "_bwd_dqkwg_kernel", {**SSD, **_DQ, "BT": 128, "BK": 32, "BV": 32}, 8, 3),
    ("ssd dqkwg BT128 BK64 BV32 8w", "_bwd_dqkwg_kernel", {**SSD, **_DQ, "BT": 128, "BV": 32}, 8, 3),
    ("ssd fwd_ho BT64 BV64 4w (default)", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 64, "BV": 64}, 4, 2),
    ("ssd fwd_ho BT128 BV64 8w", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 128, "BV": 64}, 8, 2),
    ("ssd fwd_ho BT128 BV32 8w", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 128, "BV": 32}, 8, 2),
    ("ssd dv_local BT64 HB16 4w (default)", "_bwd_dv_local_kernel", {**SSD, "BT": 64, "BK": 128, "BV": 64, "HB": 16}, 4, 3),
    ("ssd dv_local BT128 HB16 4w", "_bwd_dv_local_kernel", {**SSD, "BT": 128, "BK": 128, "BV": 64, "HB": 16}, 4, 3),
    ("ssd bwd_dh BV64 4w", "_bwd_dh_kernel", {**SSD, **_DH, "BT": 64, "BV": 64, "LOCAL_DV": False}, 4, 2),
    ("ssd bwd_dh BV64 4w LOCAL_DV (default)", "_bwd_dh_kernel", {**SSD, **_DH, "BT": 64, "BV": 64, "LOCAL_DV": True}, 4, 2),
    ("gdn bwd_dh BV32 4w", "_bwd_dh_kernel", {**GDN, **_DH, "USE_DELTA": True, "BT": 64, "BV": 32, "LOCAL_DV": False}, 4, 2),
    ("gdn bwd_dh BV32 4w LOCAL_DV", "_bwd_dh_kernel", {**GDN, **_DH, "USE_DELTA": True, "BT": 64, "BV": 32, "LOCAL_DV": True}, 4, 2),
    ("ssd fwd_ho BT64 BV64 4w PREFETCH_V", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 64, "BV": 64, "PREFETCH_V": True}, 4, 2),
    ("ssd dp_sum HB16 4w 3st", "_bwd_dp_sum_kernel", _SPLIT, 4, 3),
    ("ssd dp_sum HB16 4w 3st maxnreg 168 (session 13 default)", "_bwd_dp_sum_kernel", _SPLIT, 4, 3, 168),
    ("ssd dp_sum HB16 8w 2st maxnreg 128", "_bwd_dp_sum_kernel", _SPLIT, 8, 2, 128),
    ("ssd dqkg_inter BK64 4w 3st (session 13 default)", "_bwd_dqkg_inter_kernel", _SPLIT, 4, 3),
    ("ssd dqkg_inter BK64 8w 3st", "_bwd_dqkg_inter_kernel", _SPLIT, 8, 3),
    # session 14: the segment states (SAVE_SEG in the forward's state kernels, FROM_SEG in the backward's recompute)
    ("ssd fwd_ho BT64 BV32 4w", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 64, "BV": 32}, 4, 2),
    ("ssd fwd_ho BT64 BV32 4w SAVE_SEG", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 64, "BV": 32, "SAVE_SEG": True}, 4, 2),
    ("ssd fwd_ho BT64 BV64 4w SAVE_SEG", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 64, "BV": 64, "SAVE_SEG": True}, 4, 2),
    ("gdn fwd_ho BV32 4w PREFETCH_V", "_fwd_ho_kernel", {**GDN, **_GHO, "PREFETCH_V": True}, 4, 2),
    ("gdn fwd_ho BV32 4w PREFETCH_V SAVE_SEG", "_fwd_ho_kernel", {**GDN, **_GHO, "PREFETCH_V": True, "SAVE_SEG": True}, 4, 2),
    ("gdn fwd_h BV64 4w", "_fwd_h_kernel", {**GDN, **_H, "BV": 64}, 4, 2),
    ("gdn fwd_h BV64 4w FROM_SEG", "_fwd_h_kernel", {**GDN, **_H, "BV": 64, "FROM_SEG": True}, 4, 2),
    ("gdn fwd_h BV32 4w FROM_SEG", "_fwd_h_kernel", {**GDN, **_H, "BV": 32, "FROM_SEG": True}, 4, 2),
    ("ssd fwd_h BV64 4w XD", "_fwd_h_kernel", {**SSD, **_H, "USE_DELTA": False, "XD": True, "BV": 64}, 4, 2),
    ("ssd fwd_h BV64 4w XD FROM_SEG", "_fwd_h_kernel",
     {**SSD, **_H, "USE_DELTA": False, "XD": True, "BV": 64, "FROM_SEG": True}, 4, 2),
    ("gdn k256 fwd_h BV64 8w SAVE_SEG", "_fwd_h_kernel",
     {**GDN, **_H, "H": 6, "HK": 6, "K": 256, "V": 512, "BK": 256, "BV": 64, "SAVE_SEG": True}, 8, 2),
    ("gdn k256 fwd_h BV64 8w", "_fwd_h_kernel", {**GDN, **_H, "H": 6, "HK": 6, "K": 256, "V": 512, "BK": 256, "BV": 64}, 8, 2),
    # session 14: the gate row loaded a chunk ahead (PREFETCH_G)
    ("gdn fwd_ho BV32 4w PREFETCH_V PREFETCH_G", "_fwd_ho_kernel", {**GDN, **_GHO, "PREFETCH_V": True, "PREFETCH_G": True}, 4, 2),
    ("gdn fwd_ho BV32 3st PREFETCH_V PREFETCH_G", "_fwd_ho_kernel", {**GDN, **_GHO, "PREFETCH_V": True, "PREFETCH_G": True}, 4, 3),
    ("gdn bwd_dh BV32 4w PREFETCH_G", "_bwd_dh_kernel",
     {**GDN, **_DH, "USE_DELTA": True, "BT": 64, "BV": 32, "LOCAL_DV": False, "PREFETCH_G": True}, 4, 2),
    ("ssd fwd_ho BT64 BV64 4w PREFETCH_G", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 64, "BV": 64, "PREFETCH_G": True}, 4, 2),
    ("ssd fwd_ho BT64 BV32 4w PREFETCH_G", "_fwd_ho_kernel", {**SSD, **_HO, "BT": 64, "BV": 32, "PREFETCH_G": True}, 4, 2),
    ("ssd bwd_dh BV64 4w LOCAL_DV PREFETCH_G", "_bwd_dh_kernel",
     {**SSD, **_DH, "BT": 64, "BV": 64, "LOCAL_DV": True, "PREFETCH_G": True}, 4, 2),
    ("gdn fwd_ho BV32 3st PREFETCH_V PREFETCH_G G_CUM", "_fwd_ho_kernel",
     {**GDN, **_GHO, "PREFETCH_V": True, "PREFETCH_G": True, "G_CUM": True}, 4, 3),
    ("ssd fwd_ho BT64 BV64 4w PREFETCH_G G_CUM", "_fwd_ho_kernel",
     {**SSD, **_HO, "BT": 64, "BV": 64, "PREFETCH_G": True, "G_CUM": True}, 4, 2),
    ("gdn dqkwg lean BK64 BV64 8w 2st maxnreg 128", "_bwd_dqkwg_kernel",
     {**GDN, "USE_DELTA": True, "LEAN": True, "BT": 64, "BK": 64, "BV": 64}, 8, 2, 128),
    ("gdn dqkwg lean BK64 BV64 8w 2st maxnreg 128 G_CUM", "_bwd_dqkwg_kernel",
     {**GDN, "USE_DELTA": True, "LEAN": True, "BT": 64, "BK": 64, "BV": 64, "G_CUM": True}, 8, 2, 128),
    ("gdn wy_bwd BK64 BV64 8w", "_wy_bwd_kernel", {**GDN, "BT": 64, "BK": 64, "BV": 64}, 8, 3),
    ("gdn wy_bwd BK64 BV64 8w G_CUM", "_wy_bwd_kernel", {**GDN, "BT": 64, "BK": 64, "BV": 64, "G_CUM": True}, 8, 3),
    ("gdn k256 dqkwg lean BK64 BV64 8w 2st maxnreg 128", "_bwd_dqkwg_kernel",
     {**GDN, "H": 6, "HK": 6, "K": 256, "V": 512, "USE_DELTA": True, "LEAN": True, "BT": 64, "BK": 64, "BV": 64},
     8, 2, 128),
    ("gdn k256 dqkwg lean BK64 BV64 8w 2st maxnreg 128 G_CUM", "_bwd_dqkwg_kernel",
     {**GDN, "H": 6, "HK": 6, "K": 256, "V": 512, "USE_DELTA": True, "LEAN": True, "BT": 64, "BK": 64, "BV": 64,
      "G_CUM": True}, 8, 2, 128),
    ("gdn k256 wy_bwd BK32 BV64 8w", "_wy_bwd_kernel", {**GDN, "H": 6, "HK": 6, "K": 256, "V": 512, "BT": 64, "BK": 32,
                                                         "BV": 64}, 8, 3),
    ("gdn k256 wy_bwd BK32 BV64 8w G_CUM", "_wy_bwd_kernel", {**GDN, "H": 6, "HK": 6, "K": 256, "V": 512, "BT": 64,
                                                               "BK": 32, "BV": 64, "G_CUM": True}, 8, 3),
    ("gdn k256 bwd_dh BV64 8w", "_bwd_dh_kernel",
     {**GDN, **_DH, "H": 6, "HK": 6, "K": 256, "V": 512, "BK": 256, "USE_DELTA": True, "BT": 64, "BV": 64,
      "LOCAL_DV": False}, 8, 2),
    ("gdn k256 bwd_dh BV64 8w PREFETCH_G", "_bwd_dh_kernel",
     {**GDN, **_DH, "H": 6, "HK": 6, "K": 256, "V": 512, "BK": 256, "USE_DELTA": True, "BT": 64, "BV": 64,
      "LOCAL_DV": False, "PREFETCH_G": True}, 8, 2),
]  # fmt: skip


def _ptxas() -> str:
    p = get_ptxas(90)
    return p.path if hasattr(p, "path") else p[0]


def compile_case(name: str, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None) -> dict:
    fn = getattr(chunk, name)
    params = inspect.signature(fn.fn).parameters
    sig, attrs, cst = {}, {}, {}
    for i, (p, prm) in enumerate(params.items()):
        if p in constexprs or "constexpr" in str(prm.annotation):
            sig[p] = "constexpr"
            cst[(i,)] = constexprs.get(p, prm.default)
            continue
        sig[p] = ("i32" if p in INTS else "fp32" if p == "scale" else "*i32" if p in I32
                  else "*fp32" if p in F32 else "*bf16")  # fmt: skip
        if sig[p].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=cst, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages,
                                **({"maxnreg": maxnreg} if maxnreg else {})})  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    out = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"registers": int(regs.group(1)) if regs else None, "spill_store_bytes": int(spill.group(1)) if spill else None,
            "shared_bytes": k.metadata.shared}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--match", default="", help="only the cases whose label contains this")
    args = ap.parse_args()
    ver = subprocess.run([_ptxas(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows = []
    for label, name, cx, nw, ns, *mr in CASES:
        if args.match not in label:
            continue
        r = {"case": label, "kernel": name, "num_warps": nw, "num_stages": ns, "maxnreg": mr[0] if mr else None,
             **compile_case(name, cx, nw, ns, mr[0] if mr else None)}  # fmt: skip
        rows.append(r)
        print(f"{label:<48} regs {r['registers']:>3}  spill {r['spill_store_bytes']:>5}  smem {r['shared_bytes']}")
    payload = {"suite": "sm90-registers", "date": datetime.date.today().isoformat(), "triton": triton.__version__,
               "ptxas": ver, "target": "sm_90a (cross-compiled, no GPU)", "dtype": "bf16 pointers, float32 gates",
               "command": " ".join(["python benchmarks/sm90_registers.py", *sys.argv[1:]]), "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

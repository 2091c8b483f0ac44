"""`mixlab bench kernels` option handling on CPU: the --shape presets (the timing itself needs a GPU)."""

from __future__ import annotations

import argparse

from mixlab.bench import kernels


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    kernels.add_arguments(p)
    p.add_argument("--out-dir")
    return p.parse_args(list(argv))


def test_default_shape_is_the_bench_suite():
    args = _args()
    before = {k: dict(v) for k, v in kernels.SHAPES.items()}
    saved = kernels.apply_shape(args)
    assert args.tokens == 65536 and args.variant_seqlens == "2048,32768" and args.check_seqlen == 4096
    assert kernels.SHAPES == before == saved
    assert kernels.SHAPES["gdn"] == {"H": 16, "K": 128, "V": 128}


def test_gdn_13b_shape_and_restore():
    args = _args("--shape", "gdn-1.3b", "--ops", "gdn", "--seqlens", "4096", "--variant-seqlens", "4096")
    saved = kernels.apply_shape(args)
    try:
        assert args.tokens == 32768 and args.tokens // 4096 == 8
        for op in ("gdn", "dn"):
            assert kernels.SHAPES[op] == {"H": 6, "K": 256, "V": 512}
        assert kernels.SHAPES["ssd"] == saved["ssd"]
        # FLOPs and bytes follow the shape: h per 64 tokens is H·K·V, the chunk products grow with K and V
        f = kernels.op_flops("gdn", 32768, 4096, "fwd")
        assert f == kernels.delta_flops(32768, 6, 256, 512)
        assert (
            kernels.op_bytes("gdn", 32768, 2, "fwd")
            == 32768 * 6 * (2 * 256 + 512) * 2 + 32768 * 6 * 8 + 32768 * 6 * 512 * 2
        )
    finally:
        kernels.SHAPES.clear()
        kernels.SHAPES.update(saved)
    assert kernels.SHAPES["gdn"] == {"H": 16, "K": 128, "V": 128}


def test_explicit_tokens_win_over_the_preset():
    args = _args("--shape", "gdn-1.3b", "--tokens", "16384")
    saved = kernels.apply_shape(args)
    kernels.SHAPES.clear()
    kernels.SHAPES.update(saved)
    assert args.tokens == 16384

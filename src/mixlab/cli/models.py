"""``mixlab models``: every preset with its exact parameter count (counted on the meta device)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="presets to show (default: all); see the table for names")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def preset_rows(names: list[str] | None = None) -> list[dict]:
    """One dict per preset: name, params, non-embedding params, layers, d_model, pattern, vocab, tied."""
    import torch

    from ..models import LanguageModel, get_preset, list_presets

    rows = []
    for name in names or list_presets():
        cfg = get_preset(name)
        with torch.device("meta"):
            model = LanguageModel(cfg)
        rows.append(
            {
                "name": name,
                "params": model.num_parameters(),
                "non_embedding_params": model.num_parameters(exclude_embeddings=True),
                "n_layers": cfg.n_layers,
                "d_model": cfg.d_model,
                "pattern": cfg.pattern,
                "layers": "".join(cfg.layer_types),
                "mlp_hidden": cfg.mlp_hidden,
                "vocab_size": cfg.vocab_size,
                "tie_embeddings": cfg.tie_embeddings,
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    from ..models import list_presets

    unknown = [n for n in args.names if n not in list_presets()]
    if unknown:
        print(f"mixlab models: unknown preset(s) {', '.join(unknown)}; available: {', '.join(list_presets())}")
        return 2
    rows = preset_rows(args.names or None)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = ("preset", "params", "non-emb", "layers", "d_model", "pattern", "mlp", "vocab", "tied")
    table = [
        (
            r["name"],
            f"{r['params']:,}",
            f"{r['non_embedding_params']:,}",
            str(r["n_layers"]),
            str(r["d_model"]),
            r["pattern"],
            str(r["mlp_hidden"]),
            str(r["vocab_size"]),
            "yes" if r["tie_embeddings"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    right = {1, 2, 3, 4, 6, 7}  # numbers right-aligned

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths]), *(fmt(row) for row in table)]
    sys.stdout.write("\n".join(out) + "\n")
    print(
        "\npattern letters (tiled over the layers): A attention, S sliding-window attention, m Mamba, "
        "M Mamba2, D DeltaNet, G Gated DeltaNet"
    )
    return 0

"""`mixlab data prepare` and `mixlab data tokenizer`."""

from __future__ import annotations

import json

import pytest

from mixlab.cli import main
from mixlab.data.tokenizer import load_tokenizer


def test_prepare_then_train_tokenizer_then_prepare_with_it(tmp_path, capsys) -> None:
    src = tmp_path / "docs.jsonl"
    docs = [{"body": f"def f{i}(x):\n    return x * {i}\n" * 5} for i in range(30)]
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = [f"data.source={src}", "data.text_field=body", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["data", "prepare", *common, "data.val_min_tokens=0"]) == 0
    out = capsys.readouterr().out
    assert "dtype:     uint16" in out and "'kind': 'byte'" in out
    pytest.importorskip("tokenizers")
    assert main(["data", "tokenizer", "-o", str(tmp_path / "tok"), "--vocab-size", "300", *common]) == 0
    assert "data.tokenizer=" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 300
    assert main(["data", "prepare", *common, f"data.tokenizer={tmp_path / 'tok'}", "data.val_min_tokens=0"]) == 0
    assert "'kind': 'hf'" in capsys.readouterr().out
    assert main(["data", "prepare", "data.source=/nonexistent/x.txt"]) == 2
    assert "no such file or directory" in capsys.readouterr().err

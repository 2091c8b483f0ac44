"""Corpora, token shards and the resumable loader."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mixlab.config import DataConfig
from mixlab.data.corpus import iter_documents, resolve_sources, stdlib_files
from mixlab.data.loader import TokenWindows, TrainLoader, eval_batches
from mixlab.data.shards import prepare_shards
from mixlab.data.tokenizer import ByteTokenizer


def _docs(n: int = 40) -> list[str]:
    return [f"document {i}: " + "abcdefgh"[i % 8] * (20 + 7 * i) + "\n" for i in range(n)]


def _write_text_dir(d: Path, docs: list[str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (d / f"{i:03d}.txt").write_text(doc)
    return d


def _quiet(_msg: str) -> None:
    pass


# ------------------------------------------------------------------ corpora


def test_stdlib_corpus_is_sorted_and_has_no_tests() -> None:
    files = stdlib_files()
    names = [f.name for f in files]
    assert len(files) > 300 and names == sorted(names)
    assert all(n.endswith(".py") for n in names)
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for n in names for part in n.split("/"))
    root = Path(sysconfig.get_paths()["stdlib"])
    assert "stdlib/os.py" in names and (root / "os.py").is_file()


def test_sources_text_glob_jsonl_parquet_mixed(tmp_path) -> None:
    docs = _docs(6)
    _write_text_dir(tmp_path / "txt", docs[:2])
    with open(tmp_path / "d.jsonl", "w") as fh:
        for d in docs[2:4]:
            fh.write(json.dumps({"content": d, "id": 1}) + "\n")
    files = resolve_sources([str(tmp_path / "txt"), str(tmp_path / "*.jsonl")])
    assert [f.kind for f in files] == ["text", "text", "jsonl"]
    assert list(iter_documents(files, text_field="content")) == docs[:4]
    with pytest.raises(ValueError, match=r"no field 'text'.*set data.text_field"):
        list(iter_documents(files, text_field="text"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_sources([str(tmp_path / "*.nothing")])
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        resolve_sources([str(tmp_path / "missing")])
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[4:]}), tmp_path / "p.parquet")
    files = resolve_sources([str(tmp_path / "p.parquet")])
    assert files[0].kind == "parquet"
    assert list(iter_documents(files)) == docs[4:]


def test_hf_dataset_on_disk(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    docs = _docs(5)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    files = resolve_sources([str(tmp_path / "ds")])
    assert [f.kind for f in files] == ["hf"]
    assert list(iter_documents(files)) == docs


# ------------------------------------------------------------------ shards


def test_shards_hold_every_document_once_separated_by_eos(tmp_path) -> None:
    docs = _docs(60)
    src = _write_text_dir(tmp_path / "c", docs)
    cfg = DataConfig(source=str(src), val_fraction=0.1, val_min_tokens=0, shard_tokens=500)
    shards = prepare_shards(cfg, cache_dir=tmp_path / "cache", log=_quiet)
    tok = ByteTokenizer()
    assert shards.manifest["dtype"] == "uint16" and shards.manifest["split"]["method"] == "documents"
    assert len(shards.train) > 1 and all(len(a) <= 500 for a in shards.train)  # several shard files
    # decode each split back into its documents; together they are the corpus, each once
    got = []
    for split in (shards.train, shards.val):
        stream = np.concatenate(split) if split else np.zeros(0, dtype=np.uint16)
        cuts = np.flatnonzero(stream == tok.eos_id)
        assert len(stream) == 0 or cuts[-1] == len(stream) - 1  # every document ends with EOS
        starts = np.concatenate([[0], cuts[:-1] + 1])
        got += [tok.decode(stream[s:e].tolist()) for s, e in zip(starts, cuts)]
    assert sorted(got) == sorted(docs)
    assert 0.1 * shards.manifest["train"]["tokens"] < shards.val_tokens + shards.train_tokens
    assert shards.manifest["val"]["documents"] >= 1 and shards.manifest["train"]["documents"] >= 50


def test_shards_are_reused_and_rebuilt_when_the_source_changes(tmp_path) -> None:
    src = _write_text_dir(tmp_path / "c", _docs(10))
    cfg = DataConfig(source=str(src), val_min_tokens=0)
    a = prepare_shards(cfg, cache_dir=tmp_path / "cache", log=_quiet)
    mtime = (a.dir / "manifest.json").stat().st_mtime_ns
    b = prepare_shards(cfg, cache_dir=tmp_path / "cache", log=_quiet)
    assert b.dir == a.dir and (b.dir / "manifest.json").stat().st_mtime_ns == mtime
    (src / "new.txt").write_text("a new document\n")
    c = prepare_shards(cfg, cache_dir=tmp_path / "cache", log=_quiet)
    assert c.dir != a.dir and c.train_tokens + c.val_tokens == a.train_tokens + a.val_tokens + 16
    # a damaged cache entry is rebuilt, not trusted
    (c.dir / c.manifest["train"]["files"][0]["name"]).write_bytes(b"\x00\x01")
    d = prepare_shards(cfg, cache_dir=tmp_path / "cache", log=_quiet)
    assert d.train_tokens == c.train_tokens and len(d.train[0]) == d.manifest["train"]["files"][0]["tokens"]


def test_single_document_corpus_holds_out_its_tail(tmp_path) -> None:
    (tmp_path / "one.txt").write_text("x" * 999)
    cfg = DataConfig(source=str(tmp_path / "one.txt"), val_fraction=0.1, val_min_tokens=0)
    shards = prepare_shards(cfg, cache_dir=tmp_path / "cache", log=_quiet)
    assert shards.manifest["split"]["method"] == "tail"
    assert (shards.train_tokens, shards.val_tokens) == (900, 100)


class _BigVocab(ByteTokenizer):
    vocab_size = 70000
    eos_id = 69999

    def identity(self):
        return {"kind": "big", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def test_large_vocabularies_use_uint32(tmp_path) -> None:
    src = _write_text_dir(tmp_path / "c", _docs(3))
    shards = prepare_shards(DataConfig(source=str(src), val_fraction=0), tokenizer=_BigVocab(), cache_dir=tmp_path)
    assert shards.manifest["dtype"] == "uint32" and shards.train[0].dtype == np.uint32
    assert int(shards.train[0][-1]) == 69999


# ------------------------------------------------------------------ loader


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 250, size=n).astype(np.uint16) for n in (161, 97, 330)]


def test_windows_are_the_right_tokens() -> None:
    arrays = _arrays()
    w = TokenWindows(arrays, seq_len=16)
    assert len(w) == 10 + 6 + 20  # (n - 1) // 16 per shard
    got = w.get(np.array([0, 9, 10, 35]))
    assert got.dtype == torch.int64 and got.shape == (4, 17)
    np.testing.assert_array_equal(got[0].numpy(), arrays[0][0:17])
    np.testing.assert_array_equal(got[1].numpy(), arrays[0][144:161])
    np.testing.assert_array_equal(got[2].numpy(), arrays[1][0:17])
    np.testing.assert_array_equal(got[3].numpy(), arrays[2][19 * 16 : 20 * 16 + 1])


def test_loader_is_a_pure_function_of_seed_and_step() -> None:
    a = TrainLoader(_arrays(), seq_len=16, batch_size=8, seed=3)
    b = TrainLoader(_arrays(), seq_len=16, batch_size=8, seed=3)
    c = TrainLoader(_arrays(), seq_len=16, batch_size=8, seed=4)
    seq = [a.next() for _ in range(12)]  # crosses two epochs of 36 windows
    assert all(torch.equal(seq[s], b.batch(s)) for s in reversed(range(12)))  # any order, same batches
    assert not all(torch.equal(seq[s], c.batch(s)) for s in range(12))
    # every epoch visits every window exactly once
    first_epoch = np.concatenate([a.global_indices(s) for s in range(36 // 8)] + [a.global_indices(4)[:4]])
    assert sorted(first_epoch.tolist()) == list(range(36))
    # resuming from the state continues with the same batches
    r = TrainLoader(_arrays(), seq_len=16, batch_size=8, seed=3)
    r.load_state_dict(a.state_dict())
    assert r.step == 12 and torch.equal(r.next(), b.batch(12))
    with pytest.raises(ValueError, match="seq_len: saved 16 != now 8"):
        TrainLoader(_arrays(), seq_len=8, batch_size=8, seed=3).load_state_dict(a.state_dict())


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_get_disjoint_shards_of_the_same_global_batch(world: int) -> None:
    single = TrainLoader(_arrays(), seq_len=16, batch_size=8, seed=1)
    for step in (0, 5, 9):
        parts = [TrainLoader(_arrays(), 16, 8, seed=1, rank=r, world_size=world).batch(step) for r in range(world)]
        assert all(p.shape == (8 // world, 17) for p in parts)
        idx = [single.global_indices(step)[r::world] for r in range(world)]
        assert len(set(np.concatenate(idx).tolist())) == 8  # disjoint windows
        merged = torch.empty(8, 17, dtype=torch.int64)
        for r in range(world):
            merged[r::world] = parts[r]
        assert torch.equal(merged, single.batch(step))  # same global batch at any world size
    with pytest.raises(ValueError, match="multiple of the world size"):
        TrainLoader(_arrays(), 16, 6, seed=1, rank=0, world_size=4)


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"shorter than one window of data.seq_len"):
        TrainLoader([np.zeros(10, dtype=np.uint16)], seq_len=16, batch_size=2, seed=0)


def test_eval_batches_are_fixed_and_spread() -> None:
    batches = eval_batches(_arrays(), seq_len=16, batch_size=4, n_batches=3)
    again = eval_batches(_arrays(), seq_len=16, batch_size=4, n_batches=3)
    assert len(batches) == 3 and all(torch.equal(x, y) for x, y in zip(batches, again))
    w = TokenWindows(_arrays(), 16)
    assert torch.equal(batches[0][0], w.get(np.array([0]))[0]) and torch.equal(
        batches[-1][-1], w.get(np.array([35]))[0]
    )
    assert eval_batches([np.zeros(5, dtype=np.uint16)], 16, 4, 3) == []

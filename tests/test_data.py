"""The training data pipeline: embedded assets, tokenizer, document loading, packing, resumable positions."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from twell.data import EOS_TOKEN, corpus_path, tokenizer_path
from twell.train.config import TrainConfig
from twell.train.data import (
    PackedBlocks,
    StreamedBlocks,
    build_data,
    load_documents,
    load_tokenizer,
    pack_tokens,
)


def test_embedded_assets_are_small_and_complete():
    data_dir = corpus_path().parent
    total = sum(p.stat().st_size for p in data_dir.iterdir() if p.is_file())
    assert total < 6 * 2**20, f"src/twell/data holds {total} bytes, over the 6 MB budget"
    assert (data_dir / "SOURCES.md").is_file()
    with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    sources = {d["source"] for d in docs}
    assert sources == {"kjv-bible", "jargon-file-4.4.7", "devils-dictionary"}
    assert sum(len(d["text"]) for d in docs) > 5_000_000
    assert all(d["text"].strip() for d in docs), "empty document in the corpus"


def test_embedded_tokenizer_round_trip_and_eos():
    tok = load_tokenizer("embedded")
    assert len(tok) == 8192
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == 0
    text = "In the beginning, the hacker wrote a benchmark: lies, damn lies. Ünïcode ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert EOS_TOKEN not in tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == text  # byte-level BPE: lossless on any text
    assert len(ids) < len(text) / 2, "the tokenizer should compress English text"
    # the same file through the tokenizer.json path
    tok2 = load_tokenizer(str(tokenizer_path()))
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids


def test_pack_tokens_joins_with_eos_and_drops_tail():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    blocks = list(pack_tokens(iter(docs), eos=0, seq_len=4))
    # stream: 1 2 3 0 4 0 5 6 7 8 9 0 -> three full blocks, nothing left over
    assert blocks == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]]
    assert list(pack_tokens(iter([[1, 2]]), eos=0, seq_len=4)) == []


def test_packed_blocks_epochs_cover_everything_and_resume():
    tokens = torch.arange(10 * 8, dtype=torch.int32)
    src = PackedBlocks(tokens, seq_len=8, seed=3)
    first_epoch = src.next(10)
    assert sorted(first_epoch[:, 0].tolist()) == [8 * i for i in range(10)], (
        "an epoch must visit every block once"
    )
    assert not torch.equal(first_epoch[:, 0], torch.arange(0, 80, 8)), "blocks should be shuffled"
    src.next(3)  # into epoch 1
    state = src.state_dict()
    assert state["epoch"] == 1 and state["cursor"] == 3
    expected = src.next(12)  # crosses into epoch 2
    again = PackedBlocks(tokens, seq_len=8, seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next(12), expected)
    assert expected.dtype == torch.long


def test_packed_blocks_rejects_other_data_and_tiny_data():
    src = PackedBlocks(torch.arange(64), seq_len=8)
    with pytest.raises(ValueError, match="data state"):
        PackedBlocks(torch.arange(72), seq_len=8).load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match="seq_len"):
        PackedBlocks(torch.arange(5), seq_len=8)


def _write_jsonl(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps({"text": f"document number {i} says " + "word " * (i % 7 + 3), "id": i}) + "\n"
            )
    return path


def test_streamed_blocks_resume_replays_exactly(tmp_path):
    tok = load_tokenizer("embedded")
    docs = load_documents(str(_write_jsonl(tmp_path / "d.jsonl", 40)), streaming=True)

    def tokenize(texts):
        return tok(texts, add_special_tokens=False)["input_ids"]

    src = StreamedBlocks(docs, tokenize, "text", tok.eos_token_id, seq_len=16)
    src.next(5)
    state = src.state_dict()
    expected = src.next(40)  # wraps around the stream (a second epoch)
    again = StreamedBlocks(docs, tokenize, "text", tok.eos_token_id, seq_len=16)
    again.load_state_dict(state)
    assert torch.equal(again.next(40), expected)
    with pytest.raises(ValueError, match="streams"):
        again.load_state_dict({"kind": "packed", "epoch": 0, "cursor": 0})


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_load_documents_local_formats(tmp_path, kind):
    texts = ["first paragraph\nstill first", "second paragraph", "third one"]
    if kind == "txt":
        path = tmp_path / "a.txt"
        path.write_text("\n\n".join(texts) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "a.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "a.parquet"
        pq.write_table(pa.table({"text": texts}), path)
    ds = load_documents(str(path))
    got = [t.strip() for t in ds["text"]]
    assert got == texts, f"{kind}: one document per paragraph/row expected, got {got}"


def test_load_documents_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        load_documents(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "a.xyz"
    bad.write_text("x")
    with pytest.raises(ValueError, match="cannot read"):
        load_documents(str(bad))
    path = _write_jsonl(tmp_path / "d.jsonl", 5)
    with pytest.raises(ValueError, match="text_field"):
        load_documents(str(path), text_field="body")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_jsonl(mixed / "a.jsonl", 2)
    (mixed / "b.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="one kind"):
        load_documents(str(mixed))


@pytest.mark.parametrize("streaming", [False, True])
def test_build_data_local_split_and_blocks(tmp_path, streaming):
    path = _write_jsonl(tmp_path / "d.jsonl", 200)
    cfg = TrainConfig(
        dataset=str(path), seq_len=32, val_fraction=0.1, val_docs=20, val_blocks=4, streaming=streaming
    )
    data = build_data(cfg)
    assert data.info["streaming"] is streaming
    assert data.val is not None and data.val.shape == (4, 32)
    batch = data.train.next(6)
    assert batch.shape == (6, 32) and batch.dtype == torch.long
    assert int(batch.max()) < len(data.tokenizer)
    eos = data.tokenizer.eos_token_id
    assert (batch == eos).any(), "documents must be separated by EOS"
    # held-out blocks are not training blocks
    train_rows = {tuple(r) for r in data.train.next(200).tolist()}
    assert not any(tuple(r) in train_rows for r in data.val.tolist())

"""The data pipeline: documents (Hugging Face ``datasets``) -> tokens (any HF tokenizer) -> EOS-joined,
packed ``[seq_len]`` blocks, with a held-out validation set and a resumable position.

Documents are tokenized without special tokens, an EOS is appended after each, the stream is
concatenated and cut into ``seq_len``-token blocks (labels = input ids; attention crosses document
boundaries, as in the paper's recipe). Local datasets are tokenized once (``datasets`` caches the
result) and held in memory as one int32 tensor (4 bytes per token: 50 M tokens take 200 MB); stream
anything bigger (``streaming=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BlockSource",
    "DataBundle",
    "PackedBlocks",
    "StreamedBlocks",
    "build_data",
    "load_documents",
    "load_tokenizer",
    "pack_tokens",
]

# file suffix -> datasets builder
_BUILDERS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
}  # fmt: skip
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def load_tokenizer(spec: str = "embedded"):
    """A ``transformers`` fast tokenizer with an EOS token.

    ``spec``: ``"embedded"`` (twell's BPE), a ``tokenizer.json`` file, or anything
    ``AutoTokenizer.from_pretrained`` accepts (a local dir; a hub name where the network allows).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ..data import EOS_TOKEN, tokenizer_path

    if spec == "embedded" or (spec.endswith(".json") and os.path.isfile(spec)):
        path = tokenizer_path() if spec == "embedded" else spec
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        if tok.convert_tokens_to_ids(EOS_TOKEN) is None or EOS_TOKEN not in tok.get_vocab():
            raise ValueError(
                f"tokenizer: {spec} has no {EOS_TOKEN} token; pass a tokenizer dir that names its EOS"
            )
        tok.eos_token = tok.bos_token = tok.pad_token = EOS_TOKEN
    else:
        tok = AutoTokenizer.from_pretrained(spec)
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer: {spec!r} defines no EOS token, which the packing needs between documents"
        )
    return tok


def _builder_of(path: Path) -> str:
    name = path.name.lower()
    for c in _COMPRESSION:
        if name.endswith(c):
            name = name[: -len(c)]
    suffix = os.path.splitext(name)[1]
    if suffix not in _BUILDERS:
        raise ValueError(
            f"dataset: cannot read {path} (supported: {sorted(set(_BUILDERS))}, optionally compressed)"
        )
    return _BUILDERS[suffix]


def _local_files(spec: str) -> tuple[str, list[str]] | None:
    """(builder, files) when ``spec`` is a local file or a folder of them, else None."""
    from ..data import corpus_path

    path = corpus_path() if spec == "embedded" else Path(spec)
    if path.is_file():
        return _builder_of(path), [str(path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        typed = {}
        for p in files:
            with contextlib.suppress(ValueError):
                typed.setdefault(_builder_of(p), []).append(str(p))
        if len(typed) != 1:
            found = {k: len(v) for k, v in typed.items()}
            raise ValueError(f"dataset: folder {path} must hold files of one kind, found {found or 'none'}")
        ((builder, paths),) = typed.items()
        return builder, paths
    return None


def load_documents(
    dataset: str = "embedded",
    *,
    config: str | None = None,
    split: str = "train",
    streaming: bool | None = None,
    text_field: str = "text",
):
    """The documents of ``dataset`` as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    ``dataset``: ``"embedded"``, a local file or folder (txt: one document per paragraph; jsonl,
    json, parquet, csv: one per row), or a hub dataset name (streamed by default).
    """
    from datasets import load_dataset

    local = _local_files(dataset)
    if local is not None:
        builder, files = local
        kw = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = load_dataset(builder, data_files=files, split="train", streaming=bool(streaming), **kw)
    else:
        if dataset.startswith((".", "/", "~")):
            raise ValueError(f"dataset: no such file or folder: {dataset}")
        ds = load_dataset(dataset, config, split=split, streaming=True if streaming is None else streaming)
    cols = ds.column_names
    if cols is not None and text_field not in cols:
        raise ValueError(f"text_field: {text_field!r} is not a column of {dataset} (columns: {cols})")
    return ds


def pack_tokens(ids: Iterator[list[int]], eos: int, seq_len: int) -> Iterator[list[int]]:
    """Join token lists with ``eos`` after each and cut the stream into ``seq_len`` blocks (the
    incomplete tail is dropped)."""
    buf: list[int] = []
    for doc in ids:
        buf.extend(doc)
        buf.append(eos)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            del buf[:seq_len]


class BlockSource:
    """A resumable stream of ``[count, seq_len]`` int64 blocks, identical on every process."""

    seq_len: int

    def next(self, count: int) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class PackedBlocks(BlockSource):
    """In-memory blocks, visited in a fresh seeded permutation each epoch.

    The position is ``(epoch, cursor)``; the permutation of an epoch is a function of
    ``(seed, epoch)`` alone, so a restored position gives the same future batches.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int = 0):
        n = tokens.numel() // seq_len
        if n < 1:
            raise ValueError(
                f"seq_len: the data holds {tokens.numel()} tokens, fewer than one block of {seq_len}"
            )
        self.blocks = tokens[: n * seq_len].view(n, seq_len)
        self.seq_len = seq_len
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._perm: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self), generator=g)
        return self._perm

    def next(self, count: int) -> torch.Tensor:
        out = []
        while count > 0:
            take = min(count, len(self) - self.cursor)
            out.append(self.blocks[self._permutation()[self.cursor : self.cursor + take]])
            self.cursor += take
            count -= take
            if self.cursor == len(self):
                self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        return torch.cat(out).long()

    def state_dict(self) -> dict:
        return {"kind": "packed", "epoch": self.epoch, "cursor": self.cursor, "num_blocks": len(self)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "packed" or state.get("num_blocks") != len(self):
            raise ValueError(
                f"data state: saved for {state.get('kind')} data of {state.get('num_blocks')} blocks, this run has "
                f"packed data of {len(self)} blocks (dataset, tokenizer or seq_len changed?)"
            )
        self.epoch, self.cursor, self._perm = int(state["epoch"]), int(state["cursor"]), None


class StreamedBlocks(BlockSource):
    """Blocks packed on the fly from a (possibly streamed) dataset; epochs restart the stream.

    The position is the number of blocks handed out; restoring it replays the stream up to there
    (tokenization cost only, no training), which is exact because the stream (and its seeded
    shuffle buffer) is deterministic per epoch.
    """

    def __init__(
        self, docs, tokenize: Callable[[list[str]], list[list[int]]], text_field: str, eos: int, seq_len: int
    ):
        self.docs = docs
        self.tokenize = tokenize
        self.text_field = text_field
        self.eos = eos
        self.seq_len = seq_len
        self.consumed = 0
        self._it: Iterator[list[int]] | None = None

    def _stream(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            if hasattr(self.docs, "set_epoch"):
                self.docs.set_epoch(epoch)
            n = 0
            for block in pack_tokens(self._doc_ids(), self.eos, self.seq_len):
                n += 1
                yield block
            if n == 0:
                raise ValueError(f"seq_len: the dataset holds less than one block of {self.seq_len} tokens")
            epoch += 1

    def _doc_ids(self) -> Iterator[list[int]]:
        for batch in self.docs.iter(batch_size=256):
            yield from self.tokenize(batch[self.text_field])

    def next(self, count: int) -> torch.Tensor:
        if self._it is None:
            self._it = self._stream()
            for _ in range(self.consumed):
                next(self._it)
        rows = [next(self._it) for _ in range(count)]
        self.consumed += count
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"kind": "streamed", "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "streamed":
            raise ValueError(f"data state: saved for {state.get('kind')} data, this run streams its data")
        self.consumed, self._it = int(state["consumed"]), None


@dataclass
class DataBundle:
    """What the loop needs: the tokenizer, the training blocks and the validation blocks ``[V, L]``."""

    tokenizer: object
    train: BlockSource
    val: torch.Tensor | None
    info: dict


def _tokenize_fn(tok):
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    return tokenize


def _concat(ds, column: str, eos: int) -> torch.Tensor:
    parts = []
    for batch in ds.iter(batch_size=1024):
        for ids in batch[column]:
            parts.append(np.asarray(ids, dtype=np.int32))
            parts.append(np.asarray([eos], dtype=np.int32))
    if not parts:
        return torch.zeros(0, dtype=torch.int32)
    return torch.from_numpy(np.concatenate(parts))


def build_data(
    cfg, main_process_first: Callable[[], contextlib.AbstractContextManager] | None = None
) -> DataBundle:
    """Tokenizer, training :class:`BlockSource` and validation blocks for a :class:`TrainConfig`.

    ``main_process_first``: a context manager factory (``accelerator.main_process_first``) so that
    only one process fills the ``datasets`` cache.
    """
    first = main_process_first or contextlib.nullcontext
    tok = load_tokenizer(cfg.tokenizer)
    eos = int(tok.eos_token_id)
    tokenize = _tokenize_fn(tok)
    streaming = cfg.streaming if cfg.streaming is not None else _local_files(cfg.dataset) is None
    with first():
        docs = load_documents(
            cfg.dataset, config=cfg.dataset_config, split=cfg.dataset_split, streaming=streaming,
            text_field=cfg.text_field,
        )  # fmt: skip
        if streaming:
            val_docs = docs.take(cfg.val_docs) if cfg.val_docs else None
            train_docs = docs.skip(cfg.val_docs) if cfg.val_docs else docs
            if cfg.shuffle_buffer:
                train_docs = train_docs.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
            train = StreamedBlocks(train_docs, tokenize, cfg.text_field, eos, cfg.seq_len)
            val = None
            if val_docs is not None:
                vs = StreamedBlocks(val_docs, tokenize, cfg.text_field, eos, cfg.seq_len)
                rows = []
                it = pack_tokens(vs._doc_ids(), eos, cfg.seq_len)
                for block in it:
                    rows.append(block)
                    if len(rows) == cfg.val_blocks:
                        break
                val = torch.tensor(rows, dtype=torch.long) if rows else None
            info = {"streaming": True, "val_blocks": 0 if val is None else len(val)}
        else:
            if cfg.val_fraction > 0:
                parts = docs.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
                train_docs, val_docs = parts["train"], parts["test"]
            else:
                train_docs, val_docs = docs, None

            def encode(batch):
                return {"ids": tokenize(batch[cfg.text_field])}

            def tokenized(ds):
                # an explicit fingerprint (data x tokenizer x field) so that `datasets` reuses its cache:
                # hashing the closure is not stable across processes (7 s re-tokenizing per run)
                key = f"{ds._fingerprint}|{tok_key}|{cfg.text_field}"
                fp = hashlib.sha256(key.encode()).hexdigest()[:16]
                cols = ds.column_names
                return ds.map(
                    encode, batched=True, remove_columns=cols, desc="tokenizing", new_fingerprint=fp
                )

            ident = (
                tok.backend_tokenizer.to_str()
                if getattr(tok, "is_fast", False)
                else f"{tok.name_or_path}|{len(tok)}"
            )
            tok_key = hashlib.sha256(ident.encode()).hexdigest()
            train_tokens = _concat(tokenized(train_docs), "ids", eos)
            train = PackedBlocks(train_tokens, cfg.seq_len, seed=cfg.seed)
            val = None
            if val_docs is not None:
                vt = _concat(tokenized(val_docs), "ids", eos)
                nv = min(vt.numel() // cfg.seq_len, cfg.val_blocks)
                val = vt[: nv * cfg.seq_len].view(nv, cfg.seq_len).long() if nv else None
            info = {
                "streaming": False,
                "train_tokens": int(train_tokens.numel()),
                "train_blocks": len(train),
                "val_blocks": 0 if val is None else len(val),
            }
    info.update({"dataset": cfg.dataset, "tokenizer": cfg.tokenizer, "vocab": len(tok), "eos": eos})
    return DataBundle(tokenizer=tok, train=train, val=val, info=info)

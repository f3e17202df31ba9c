#!/usr/bin/env python3
"""Rebuild ``src/twell/data/tokenizer.json``: a byte-level BPE trained on the embedded corpus.

Vocabulary 8,192 (a multiple of 64, so the embedding matmul tiles evenly), id 0 is
``<|endoftext|>`` (BOS = EOS = 0, as in the paper's checkpoints). Byte-level, so any text encodes
without unknown tokens. Trained on every document of ``corpus.jsonl.gz`` (the held-out validation
documents included: only the vocabulary is learnt from them, never model weights).

Usage::

    python scripts/train_tokenizer.py [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DATA = Path(__file__).resolve().parents[1] / "src" / "twell" / "data"
EOS = "<|endoftext|>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=DATA / "corpus.jsonl.gz")
    ap.add_argument("--out", type=Path, default=DATA / "tokenizer.json")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()

    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(EOS) == 0
    tok.save(str(args.out))
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
    n_chars = sum(len(t) for t in texts)
    print(
        f"wrote {args.out}: vocab {tok.get_vocab_size()}, corpus {n_tokens / 1e6:.2f} M tokens "
        f"({n_chars / n_tokens:.2f} characters per token)"
    )


if __name__ == "__main__":
    main()

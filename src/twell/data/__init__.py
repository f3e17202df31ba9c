"""Assets shipped with twell: a public-domain English corpus and a BPE tokenizer trained on it.

``corpus.jsonl.gz``: one JSON object per line, ``{"text", "source"}``; 4,500 documents, 5.8 M
characters (King James Bible by chapter, Jargon File 4.4.7 and The Devil's Dictionary by entry;
see ``SOURCES.md``). ``tokenizer.json``: byte-level BPE, 8,192 tokens, id 0 = ``<|endoftext|>``
(1.49 M tokens on the corpus). Rebuilt by ``scripts/build_corpus.py`` and ``scripts/train_tokenizer.py``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["EOS_TOKEN", "corpus_path", "tokenizer_path"]

#: the end-of-document token of the embedded tokenizer (id 0)
EOS_TOKEN = "<|endoftext|>"


def _asset(name: str) -> Path:
    path = Path(str(resources.files(__name__) / name))
    if not path.is_file():
        raise FileNotFoundError(f"twell's embedded {name} is missing from {path.parent} (broken install?)")
    return path


def corpus_path() -> Path:
    """Path of the embedded corpus, ``corpus.jsonl.gz``."""
    return _asset("corpus.jsonl.gz")


def tokenizer_path() -> Path:
    """Path of the embedded tokenizer, ``tokenizer.json`` (``tokenizers`` format)."""
    return _asset("tokenizer.json")

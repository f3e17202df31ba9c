"""twell: activation-sparse feed-forward blocks for transformer language models.

The TwELL packed format, Triton kernels for inference and training, a torch reference path
for every op (CPU included), and Hugging Face integration.
"""

from __future__ import annotations

from .ffn import sparse_ffn
from .format import TwELL
from .nn import SparseGatedMLP
from .stats import FFNStats, l1_penalty, sparsity_stats

__version__ = "0.1.0"

# Hugging Face integration pulls in transformers: imported on first use, not at `import twell`.
_LAZY = {
    "sparsify_": "twell.convert",
    "unsparsify_": "twell.convert",
    "SparsityConfig": "twell.convert",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'twell' has no attribute {name!r}")


__all__ = [
    "FFNStats",
    "SparsityConfig",
    "SparseGatedMLP",
    "TwELL",
    "__version__",
    "l1_penalty",
    "sparse_ffn",
    "sparsity_stats",
    "sparsify_",
    "unsparsify_",
]

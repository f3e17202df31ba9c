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

__all__ = [
    "FFNStats",
    "SparseGatedMLP",
    "TwELL",
    "__version__",
    "l1_penalty",
    "sparse_ffn",
    "sparsity_stats",
]

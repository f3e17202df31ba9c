"""``SparseGatedMLP``: a drop-in for a Hugging Face gated MLP (same parameter names) computing the
gated-ReLU FFN through :func:`twell.sparse_ffn` and keeping the statistics of its last forward."""

from __future__ import annotations

import torch
from torch import nn

from .ffn import BACKENDS, sparse_ffn
from .stats import FFNStats

__all__ = ["SparseGatedMLP"]


class SparseGatedMLP(nn.Module):
    """``down_proj(relu(gate_proj(x)) * up_proj(x))`` with sparse kernels and statistics.

    Args:
        hidden_size: K, the model dim.
        intermediate_size: N, the FFN hidden size.
        l1_coeff: coefficient of this layer's L1 term in :func:`twell.l1_penalty`.
        tile, slots: TwELL geometry.
        track_unit_counts: accumulate per-unit activation counts in ``unit_counts`` (dead units).
        collect_stats: keep the last forward's :class:`twell.FFNStats` in ``last_stats``.
        backend: passed to :func:`twell.sparse_ffn`.

    Parameters are ``gate_proj.weight [N, K]``, ``up_proj.weight [N, K]``, ``down_proj.weight [K, N]``
    (no bias), so Hugging Face state dicts load unchanged.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        l1_coeff: float = 0.0,
        tile: int = 256,
        slots: int = 32,
        track_unit_counts: bool = False,
        collect_stats: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.l1_coeff = float(l1_coeff)
        self.tile = tile
        self.slots = slots
        self.track_unit_counts = track_unit_counts
        self.collect_stats = collect_stats
        self.backend = backend
        self.last_stats: FFNStats | None = None
        self.register_buffer(
            "unit_counts", torch.zeros(intermediate_size, dtype=torch.int64, device=device), persistent=False
        )
        self.tokens_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = sparse_ffn(
            x,
            self.gate_proj.weight,
            self.up_proj.weight,
            self.down_proj.weight,
            return_stats=self.collect_stats or self.track_unit_counts,
            tile=self.tile,
            slots=self.slots,
            unit_counts=self.track_unit_counts,
            backend=self.backend,
        )
        if not isinstance(out, tuple):
            return out
        y, st = out
        if self.collect_stats:
            self.last_stats = st
        if self.track_unit_counts and st.unit_counts is not None:
            self.unit_counts += st.unit_counts.to(self.unit_counts.device)
            self.tokens_seen += st.tokens
        return y

    def reset_unit_counts(self) -> None:
        self.unit_counts.zero_()
        self.tokens_seen = 0

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"l1_coeff={self.l1_coeff}, tile={self.tile}, slots={self.slots}"
        )

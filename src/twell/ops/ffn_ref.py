"""The gated-ReLU FFN in plain torch: the correctness oracle for every kernel, and the CPU path.

Legend: M = tokens, K = model dim, N = FFN units, T = tile, S = slots.
    g = x @ W_gate^T      [M, N]
    u = x @ W_up^T        [M, N]
    h = relu(g) * u       [M, N]   (zero off the active set {n : g[n] > 0})
    y = h @ W_down^T      [M, K]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..stats import FFNStats

__all__ = ["sparse_ffn_ref", "tile_overflow_rows"]


def tile_overflow_rows(active: torch.Tensor, tile: int, slots: int) -> torch.Tensor:
    """Number of rows of ``active [M, N]`` (bool) with a tile of ``tile`` columns holding > ``slots``."""
    M, N = active.shape
    NT = (N + tile - 1) // tile
    pad = torch.zeros(M, NT * tile, dtype=torch.int32, device=active.device)
    pad[:, :N] = active.to(torch.int32)
    return (pad.view(M, NT, tile).sum(-1) > slots).any(dim=1).sum()


def sparse_ffn_ref(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    tile: int = 256,
    slots: int = 32,
    unit_counts: bool = False,
) -> tuple[torch.Tensor, FFNStats]:
    """``x [M, K]`` -> ``(y [M, K], stats)``; autograd flows through y and stats.l1."""
    g = F.linear(x, w_gate)
    u = F.linear(x, w_up)
    h = torch.relu(g) * u
    y = F.linear(h, w_down)
    with torch.no_grad():
        active = g > 0
        M = x.shape[0]
        l0 = active.sum(dtype=torch.float32) / max(M, 1)
        over = tile_overflow_rows(active, tile, slots)
        counts = active.sum(0, dtype=torch.int64) if unit_counts else None
    l1 = h.float().abs().sum() / max(M, 1)
    return y, FFNStats(l0=l0, l1=l1, overflow_rows=over, unit_counts=counts, tokens=M)

"""The TwELL format: tile-wise ELLPACK packing of a ReLU activation tensor.

Legend: M = rows (tokens, all leading dims flattened), N = columns (FFN units), T = tile width
(``tile``), NT = ceil(N / T), S = slots per (row, tile) (``slots``), R = overflowing rows.

Fields of :class:`TwELL`:

================  ==============  ============  ==================================================
field             shape           dtype         meaning
================  ==============  ============  ==================================================
``counts``        [M, NT]         int32         true number of active entries of each (row, tile),
                                                also when it exceeds S
``values``        [M, NT, S]      h's dtype     the first min(count, S) active values, by column;
                                                0 in unused slots
``columns``       [M, NT, S]      int16         their global column as a 16-bit pattern (read it as
                                                unsigned: ``c & 0xFFFF``); 0 in unused slots
``overflow_ids``  [R]             int64         rows with at least one tile whose count > S
``overflow_rows`` [R, N]          h's dtype     those rows' dense values (so nothing is ever lost)
================  ==============  ============  ==================================================

An entry is *active* when it is > 0 (ReLU semantics) or NaN (so NaN survives a round trip, as
it does through ``relu``). Entries inside a tile are ordered by column, so the packing is
deterministic. A 16-bit column index limits N to 65,536.

No silent loss: a (row, tile) with more than S active entries keeps its true count and its row is
stored densely in the overflow side buffer, so :meth:`TwELL.to_dense` is exact for every input.
Consumers that can recompute a tile (the fused FFN kernels recompute its gate values from x) read
``counts`` only and never need the side buffer; kernels therefore never synchronise with the host
to size it. Building the side buffer in :meth:`TwELL.from_dense` costs one host synchronisation
(pass ``keep_overflow=False`` to skip it when the consumer recomputes overflowing tiles).

Example::

    >>> import torch, twell
    >>> h = torch.randn(4, 1000)
    >>> P = twell.TwELL.from_dense(h)
    >>> torch.equal(P.to_dense(), torch.relu(h))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import MAX_COLUMNS, check_tensor, check_tile_slots
from .ops.pack import active_mask, pack_twell

__all__ = ["TwELL"]


@dataclass
class TwELL:
    """A TwELL-packed activation tensor; see the module docstring for the field table."""

    counts: torch.Tensor
    values: torch.Tensor
    columns: torch.Tensor
    shape: tuple[int, ...]
    tile: int = 256
    slots: int = 32
    overflow_ids: torch.Tensor | None = None
    overflow_rows: torch.Tensor | None = None

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        h: torch.Tensor,
        tile: int = 256,
        slots: int = 32,
        *,
        keep_overflow: bool = True,
        backend: str = "auto",
    ) -> TwELL:
        """Packs the active (> 0) entries of ``h [..., N]``.

        Args:
            h: activations, any leading dims; float32, bfloat16 or float16.
            tile: T, columns per tile (a power of two in [16, 4096]).
            slots: S, stored entries per (row, tile), in [1, T].
            keep_overflow: keep overflowing rows densely so that :meth:`to_dense` is exact (one
                host synchronisation). With False, rows whose tiles overflow are marked in
                ``counts`` but their entries past S are not kept; :meth:`to_dense` then raises.
            backend: ``"auto"`` (Triton on CUDA or under TRITON_INTERPRET=1), ``"triton"`` or ``"torch"``.
        """
        check_tensor(h, "h", min_dim=1)
        check_tile_slots(tile, slots)
        N = h.shape[-1]
        if N > MAX_COLUMNS:
            raise ValueError(
                f"h: last dimension N={N} exceeds the TwELL limit of {MAX_COLUMNS} columns (16-bit indices)"
            )
        if N == 0:
            raise ValueError("h: last dimension N must be at least 1, got 0")
        h2 = h.reshape(-1, N)
        counts, values, columns = pack_twell(h2, tile, slots, backend=backend)
        ids = rows = None
        if keep_overflow:
            ids = (counts > slots).any(dim=1).nonzero().flatten()
            rows = h2.index_select(0, ids)
        return cls(counts, values, columns, tuple(h.shape), tile, slots, ids, rows)

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self.counts.shape[0]

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def n_tiles(self) -> int:
        return self.counts.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        """Number of active entries (true counts, overflow included)."""
        return int(self.counts.sum(dtype=torch.int64))

    @property
    def density(self) -> float:
        """Fraction of active entries, nnz / (M * N)."""
        total = self.n_rows * self.n_cols
        return self.nnz / total if total else 0.0

    @property
    def overflow(self) -> int:
        """Number of rows with at least one tile holding more than S active entries."""
        return int((self.counts > self.slots).any(dim=1).sum())

    def nbytes(self) -> int:
        """Bytes held by the packed arrays and the overflow side buffer."""
        n = sum(t.numel() * t.element_size() for t in (self.counts, self.values, self.columns))
        for t in (self.overflow_ids, self.overflow_rows):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    # ---- decoding --------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The dense tensor ``relu(h)`` of the original shape (NaN kept; -0.0 comes back as 0)."""
        M, NT, S = self.values.shape
        N = self.n_cols
        if self.overflow_ids is None and self.overflow > 0:
            raise ValueError(
                "to_dense: this TwELL was built with keep_overflow=False and "
                f"{self.overflow} row(s) overflow their {S} slots; their entries past S are not stored"
            )
        out = torch.zeros(M, NT * self.tile, dtype=self.dtype, device=self.device)
        stored = torch.arange(S, device=self.device).view(1, 1, S) < self.counts.clamp(max=S).unsqueeze(-1)
        cols = self.columns.to(torch.int64) & 0xFFFF
        m_idx = torch.arange(M, device=self.device).view(M, 1, 1).expand(M, NT, S)
        out.index_put_((m_idx[stored], cols[stored]), self.values[stored])
        out = out[:, :N]
        if self.overflow_ids is not None and self.overflow_ids.numel():
            out.index_copy_(
                0, self.overflow_ids, torch.where(active_mask(self.overflow_rows), self.overflow_rows, 0)
            )
        return out.reshape(self.shape)

    # ---- checking --------------------------------------------------------------------------
    def validate(self) -> TwELL:
        """Checks every invariant of the format; raises ValueError naming the offending entries."""
        M, NT, S = self.values.shape
        N, T = self.n_cols, self.tile
        if self.counts.dtype != torch.int32 or tuple(self.counts.shape) != (M, NT):
            raise ValueError(
                f"counts: expected int32 [{M}, {NT}], got {self.counts.dtype} {tuple(self.counts.shape)}"
            )
        if self.columns.dtype != torch.int16 or self.columns.shape != self.values.shape:
            raise ValueError(
                f"columns: expected int16 {tuple(self.values.shape)}, got {self.columns.dtype} "
                f"{tuple(self.columns.shape)}"
            )
        if NT != (N + T - 1) // T or S != self.slots:
            raise ValueError(
                f"values: shape {tuple(self.values.shape)} does not match N={N}, tile={T}, slots={self.slots}"
            )
        # the number of columns each tile really has (the last one may be partial)
        width = (N - torch.arange(NT, device=self.device) * T).clamp(max=T)
        bad = (self.counts < 0) | (self.counts > width)
        if bad.any():
            r, t = bad.nonzero()[0].tolist()
            raise ValueError(
                f"counts: count {int(self.counts[r, t])} at (row {r}, tile {t}) is outside [0, {int(width[t])}]"
            )
        n_stored = self.counts.clamp(max=S)
        used = torch.arange(S, device=self.device).view(1, 1, S) < n_stored.unsqueeze(-1)
        cols = self.columns.to(torch.int64) & 0xFFFF
        tile_start = (torch.arange(NT, device=self.device) * T).view(1, NT, 1)
        bad = used & ((cols < tile_start) | (cols >= (tile_start + width.view(1, NT, 1))))
        if bad.any():
            r, t, s = bad.nonzero()[0].tolist()
            raise ValueError(
                f"columns: column {int(cols[r, t, s])} at (row {r}, tile {t}, slot {s}) lies outside its tile"
            )
        bad = used[:, :, 1:] & (cols[:, :, 1:] <= cols[:, :, :-1])
        if bad.any():
            r, t, s = bad.nonzero()[0].tolist()
            raise ValueError(f"columns: not strictly increasing at (row {r}, tile {t}, slot {s + 1})")
        bad = used & ~active_mask(self.values)
        if bad.any():
            r, t, s = bad.nonzero()[0].tolist()
            raise ValueError(
                f"values: stored value {float(self.values[r, t, s])} at (row {r}, tile {t}, slot {s}) "
                "is not active (> 0)"
            )
        over = (self.counts > S).any(dim=1)
        if self.overflow_ids is not None:
            ids = self.overflow_ids
            expect = over.nonzero().flatten()
            if ids.numel() != expect.numel() or not torch.equal(ids.to(expect.dtype), expect):
                raise ValueError(
                    f"overflow_ids: {ids.tolist()[:8]} does not list the overflowing rows "
                    f"{expect.tolist()[:8]}"
                )
            if self.overflow_rows is None or tuple(self.overflow_rows.shape) != (ids.numel(), N):
                raise ValueError(f"overflow_rows: expected [{ids.numel()}, {N}] dense rows")
            if ids.numel():
                act = active_mask(self.overflow_rows)
                pad = torch.zeros(ids.numel(), NT * T, dtype=torch.int32, device=self.device)
                pad[:, :N] = act.to(torch.int32)
                dense_counts = pad.view(-1, NT, T).sum(-1, dtype=torch.int32)
                if not torch.equal(dense_counts, self.counts[ids]):
                    raise ValueError(
                        f"counts: overflowing rows {ids.tolist()[:8]} have counts "
                        f"{self.counts[ids].tolist()[:2]} but their dense rows hold {dense_counts.tolist()[:2]}"
                    )
        return self

    def __repr__(self) -> str:
        return (
            f"TwELL(shape={self.shape}, tile={self.tile}, slots={self.slots}, dtype={self.dtype}, "
            f"device={self.device})"
        )

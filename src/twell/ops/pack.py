"""Dense -> TwELL packing of an activation tensor (ReLU semantics: keeps the entries > 0).

Legend: M = rows (tokens), N = columns (FFN units), T = tile width, NT = ceil(N / T) tiles,
S = slots per (row, tile).

Outputs (see :class:`twell.TwELL` for the field table):
  counts  int32 [M, NT]     true number of active entries per (row, tile), even above S
  values  dtype [M, NT, S]  the first min(count, S) active values of the tile, by column
  columns int16 [M, NT, S]  their global column (16-bit pattern, read as unsigned)
Unused slots hold 0 in both ``values`` and ``columns``.

"Active" means > 0, or NaN (so that NaN round-trips and propagates like relu does). The kernel
decides it on the bit pattern, which is exact for every dtype and avoids float compares that the
CPU interpreter gets wrong on 16-bit floats.
"""

from __future__ import annotations

import functools

import torch

from .. import _alloc
from .._checks import MAX_COLUMNS, check_tensor, check_tile_slots
from ._triton import can_run_triton, interpreter_enabled

__all__ = ["pack_twell", "pack_twell_ref", "active_mask"]


def active_mask(h: torch.Tensor) -> torch.Tensor:
    """The TwELL notion of "active": > 0 or NaN."""
    return (h > 0) | torch.isnan(h)


# ---------------------------------------------------------------------------------------------
# reference (plain torch)
# ---------------------------------------------------------------------------------------------
def pack_twell_ref(h: torch.Tensor, tile: int, slots: int):
    """Plain-torch packing of ``h [M, N]``; returns (counts, values, columns)."""
    M, N = h.shape
    NT = (N + tile - 1) // tile
    hp = torch.zeros(M, NT * tile, dtype=h.dtype, device=h.device)
    hp[:, :N] = h
    hp = hp.view(M, NT, tile)
    act = active_mask(hp)
    counts = act.sum(-1, dtype=torch.int32)
    rank = act.to(torch.int32).cumsum(-1) - 1
    keep = act & (rank < slots)
    values = torch.zeros(M, NT, slots, dtype=h.dtype, device=h.device)
    columns = torch.zeros(M, NT, slots, dtype=torch.int16, device=h.device)
    m, t, c = keep.nonzero(as_tuple=True)
    s = rank[m, t, c].long()
    values[m, t, s] = hp[m, t, c]
    columns[m, t, s] = (t * tile + c).to(torch.int32).to(torch.int16)
    return counts, values, columns


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _pack_kernel(
        h_ptr,
        counts_ptr,
        values_ptr,
        columns_ptr,
        M,
        N,
        NT,
        stride_hm,
        INF_BITS: tl.constexpr,
        MAG_MASK: tl.constexpr,
        T: tl.constexpr,
        S: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        i_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        i_t = tl.program_id(1)
        o_c = i_t * T + tl.arange(0, T)
        m_m = i_m < M
        m_c = o_c < N
        m_h = m_m[:, None] & m_c[None, :]
        # [BLOCK_M, T] raw bits of h (int16 for 16-bit floats, int32 for fp32)
        b_bits = tl.load(h_ptr + i_m[:, None].to(tl.int64) * stride_hm + o_c[None, :], mask=m_h, other=0)
        b_act = (b_bits > 0) | ((b_bits & MAG_MASK) > INF_BITS)
        b_act = b_act & m_h
        b_one = b_act.to(tl.int32)
        b_cnt = tl.sum(b_one, axis=1)
        b_rank = tl.cumsum(b_one, axis=1) - 1
        tl.store(counts_ptr + i_m.to(tl.int64) * NT + i_t, b_cnt, mask=m_m)
        m_keep = b_act & (b_rank < S)
        p_slot = (i_m[:, None].to(tl.int64) * NT + i_t) * S + b_rank
        tl.store(values_ptr + p_slot, b_bits, mask=m_keep)
        tl.store(columns_ptr + p_slot, tl.broadcast_to(o_c[None, :], (BLOCK_M, T)).to(tl.int16), mask=m_keep)

    return _pack_kernel


def _bits_view(t: torch.Tensor):
    """Integer view of a float tensor's bits, and the constants for the NaN test on them."""
    if t.dtype == torch.float32:
        return t.view(torch.int32), 0x7F800000, 0x7FFFFFFF
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), 0x7F80, 0x7FFF
    return t.view(torch.int16), 0x7C00, 0x7FFF  # float16


def _pack_triton(h: torch.Tensor, tile: int, slots: int):
    """Launcher: checks are done by the caller; allocation, config and grid here."""
    M, N = h.shape
    NT = (N + tile - 1) // tile
    if h.stride(-1) != 1:
        h = h.contiguous()
    counts = _alloc.empty((M, NT), dtype=torch.int32, device=h.device)
    values = torch.zeros((M, NT, slots), dtype=h.dtype, device=h.device)
    columns = torch.zeros((M, NT, slots), dtype=torch.int16, device=h.device)
    if M == 0:
        return counts, values, columns
    bits, inf_bits, mag_mask = _bits_view(h)
    # 4 rows x 256 columns per program keeps the cumsum in registers (no spills at T = 256); the
    # interpreter runs programs one by one in numpy, so it gets few large programs instead.
    block_m = 64 if interpreter_enabled() and not h.is_cuda else max(1, min(16, 1024 // tile))
    grid = ((M + block_m - 1) // block_m, NT)
    _kernels()[grid](
        bits,
        counts,
        _bits_view(values)[0],
        columns,
        M,
        N,
        NT,
        bits.stride(0),
        INF_BITS=inf_bits,
        MAG_MASK=mag_mask,
        T=tile,
        S=slots,
        BLOCK_M=block_m,
        num_warps=4,
    )
    return counts, values, columns


# ---------------------------------------------------------------------------------------------
# custom op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("twell::pack", mutates_args=())
def _pack_op(
    h: torch.Tensor, tile: int, slots: int, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton:
        return _pack_triton(h, tile, slots)
    return pack_twell_ref(h, tile, slots)


@_pack_op.register_fake
def _(h, tile, slots, use_triton):
    M, N = h.shape
    NT = (N + tile - 1) // tile
    return (
        h.new_empty((M, NT), dtype=torch.int32),
        h.new_empty((M, NT, slots)),
        h.new_empty((M, NT, slots), dtype=torch.int16),
    )


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def pack_twell(h: torch.Tensor, tile: int = 256, slots: int = 32, *, backend: str = "auto"):
    """Packs ``h [M, N]`` into TwELL arrays ``(counts [M, NT], values [M, NT, S], columns [M, NT, S])``.

    backend: ``"auto"`` (Triton on CUDA or under TRITON_INTERPRET=1, torch otherwise), ``"triton"``
    or ``"torch"``.
    """
    check_tensor(h, "h", dim=2)
    check_tile_slots(tile, slots)
    if h.shape[1] > MAX_COLUMNS:
        raise ValueError(
            f"h: N={h.shape[1]} columns exceeds the TwELL limit of {MAX_COLUMNS} (16-bit column indices)"
        )
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not can_run_triton(h):
        raise ValueError("backend: 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    use_triton = backend == "triton" or (backend == "auto" and can_run_triton(h))
    return _pack_op(h, tile, slots, use_triton)

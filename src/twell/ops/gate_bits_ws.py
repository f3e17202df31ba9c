"""gate_bits on Hopper with specialised warps (Gluon): g and its active bitmask beside the next MMAs.

Legend: M = tokens, K = model dim, N = FFN units, NW = ceil(N / 32) bitmask words per row,
BM x BN x BK = 128 x 256 x 64, CH = 32 columns per epilogue step (one bitmask word per row).

The Triton kernel ``gate_bits._gate_bits_kernel`` stores g and computes the words in the warps
that hold the accumulator, after each tile's MMA loop. Here the MMA warps of ``_gate_ws`` hand
each rounded tile to 4 epilogue warps, which store it to g by TMA (8 boxes of [BM, CH], straight
from the hand-over buffer) and, per [BM, CH] block, one int32 word per row: bit j set where
column 32 w + j is > 0 or NaN after rounding (the Triton kernel decides the same on the fp32
sum). Both outputs are bitwise those of the Triton kernel (``tests/test_ffn_train.py``).
"""

from __future__ import annotations

import torch
import triton

from ._gate_ws import _GLUON, EPI_REGS, STAGES, descriptors, handover_layout, ws_ok
from ._triton import tma_aligned

__all__ = ["ws_bits_ok", "launch_gate_bits_ws"]

if _GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ._gate_ws import active_words, blocks, mma_part, smem, tile_mn


def ws_bits_ok(x: torch.Tensor, w_gate: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether :func:`launch_gate_bits_ws` can run: :func:`_gate_ws.ws_ok` and a TMA-aligned g."""
    return ws_ok(x, w_gate) and tma_aligned(g)


if _GLUON:

    @gluon.jit
    def _bits_part(
        g_smem, g_ready, g_empty, n_m, n_n, n_tiles, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr,
        g_desc, bits_ptr, M, N, NW, BITS_DTYPE: gl.constexpr, INF_BITS: gl.constexpr, MAG_MASK: gl.constexpr,
    ):  # fmt: skip
        TBM: gl.constexpr = g_smem.shape[0]
        TBN: gl.constexpr = g_smem.shape[1]
        CH: gl.constexpr = 32
        g_blocks = blocks(g_smem)
        # the same bytes as TMA boxes of [TBM, CH] (64-byte swizzle)
        g_boxes = g_smem._reinterpret(g_smem.dtype, [TBN // CH, TBM, CH], g_desc.layout)
        # 4 warps over a [TBM, CH] block: a thread holds 8 consecutive columns of 4 rows
        lay: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        o_l = gl.arange(0, CH, layout=gl.SliceLayout(0, lay))
        t = 0
        for tile_id in range(gl.program_id(0), n_tiles, NUM_SMS):
            pid_m, pid_n = tile_mn(tile_id, n_m, n_n, GROUP_M)
            i_m = pid_m * TBM + gl.arange(0, TBM, layout=gl.SliceLayout(1, lay))
            mbarrier.wait(g_ready, t & 1)
            # the blocks that hold columns < N (TMA clips rows >= M and columns >= N)
            for j in range(gl.minimum(gl.cdiv(N - pid_n * TBN, CH), TBN // CH)):
                tma.async_copy_shared_to_global(g_desc, [pid_m * TBM, pid_n * TBN + j * CH], g_boxes.index(j))
                bits = g_blocks.index(j).load(lay).to(BITS_DTYPE, bitcast=True)
                _, word = active_words(bits, i_m, pid_n * TBN + j * CH + o_l, M, N, INF_BITS, MAG_MASK)
                gl.store(bits_ptr + i_m.to(gl.int64) * NW + (pid_n * (TBN // CH) + j), word, mask=i_m < M)
            # the TMA stores have read the tile: the MMA warps may overwrite it
            tma.store_wait(0)
            mbarrier.arrive(g_empty)
            t += 1

    @gluon.jit
    def _gate_bits_ws_kernel(
        x_desc, w_desc, g_desc, bits_ptr, M, N, NW,
        OUT_DTYPE: gl.constexpr, BITS_DTYPE: gl.constexpr, INF_BITS: gl.constexpr, MAG_MASK: gl.constexpr,
        NS: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr, EPI_R: gl.constexpr,
        G_LAYOUT: gl.constexpr,
    ):  # fmt: skip
        n_m = gl.cdiv(M, x_desc.block_type.shape[0])
        n_n = gl.cdiv(N, w_desc.block_type.shape[0])
        n_k = gl.cdiv(x_desc.shape[1], x_desc.block_type.shape[1])
        n_tiles = n_m * n_n
        x_bufs, w_bufs, g_smem, ready, g_ready, g_empty = smem(x_desc, w_desc, OUT_DTYPE, G_LAYOUT, NS)
        gl.warp_specialize(
            [
                (
                    mma_part,
                    (x_desc, w_desc, x_bufs, w_bufs, ready, g_smem, g_ready, g_empty, n_m, n_n, n_k, n_tiles,
                     GROUP_M, NUM_SMS, OUT_DTYPE),
                ),
                (
                    _bits_part,
                    (g_smem, g_ready, g_empty, n_m, n_n, n_tiles, GROUP_M, NUM_SMS, g_desc, bits_ptr, M, N, NW,
                     BITS_DTYPE, INF_BITS, MAG_MASK),
                ),
            ],
            [4],
            [EPI_R],
        )  # fmt: skip


def launch_gate_bits_ws(x, w_gate, g, bits, consts, group_m, n_sms) -> None:
    """The specialised-warps gate_bits: ``g [M, N] = x @ w_gate^T`` and ``bits int32 [M, NW]``
    (the caller checked :func:`ws_bits_ok`); ``consts`` = (out dtype, bits dtype, +inf bits,
    magnitude mask) of ``gate_pack._dtype_consts``."""
    M, N = g.shape
    x_desc, w_desc = descriptors(x, w_gate)
    bm, bn = x_desc.block_shape[0], w_desc.block_shape[0]
    g_lay = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=2)
    g_desc = TensorDescriptor(g, [M, N], list(g.stride()), [bm, 32], g_lay)
    grid = (min(n_sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    out_dt, bits_dt, inf_bits, mag = consts
    _gate_bits_ws_kernel[grid](
        x_desc, w_desc, g_desc, bits, M, N, bits.shape[1],
        OUT_DTYPE=out_dt, BITS_DTYPE=bits_dt, INF_BITS=inf_bits, MAG_MASK=mag, NS=STAGES,
        GROUP_M=group_m, NUM_SMS=grid[0], EPI_R=EPI_REGS, G_LAYOUT=handover_layout(bm, bn),
        num_warps=8, maxnreg=168,
    )  # fmt: skip

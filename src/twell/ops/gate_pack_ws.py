"""gate_pack on Hopper with specialised warps (Gluon): the packing epilogue beside the next MMAs.

Legend: M = tokens, K = model dim, N = FFN units, T = BN = 256 (the TwELL tile), NT = ceil(N / T),
S = slots, BM x BN x BK = 128 x 256 x 64, CH = 32 columns per packing step.

The Triton kernel ``gate_pack._gate_pack_tma_kernel`` runs each tile's packing epilogue in the
warps that hold its accumulator, so the tensor cores idle meanwhile (1.15-1.19x the cuBLAS gate
GEMM at M = 16384 on the H100). Here the MMA warps of ``_gate_ws`` hand each rounded tile to 4
packing warps, which take it in [BM, CH] blocks: activity (> 0, or NaN) on the rounded bits,
rank inside the (row, tile) by a popcount prefix over the block's 32-bit words, the first S
active entries per (row, tile) stored at their rank (sorted by column, as ``gate_pack``'s other
kernels write them), and the true counts.

The output is bitwise that of the Triton kernels (the same fp32 MMA order over K, the same
rounding and ranking; checked on the GPU at bf16 / fp16, odd K and N, NaN and dense rows,
overflowing tiles: ``tests/test_infer_gpu.py``).

Measured (H100 80GB HBM3, bf16, K = 2048, N = 5632, ~30 active units per token iid, 4 weight
sets rotated, device time; ``benchmarks/results/gate-pack-ws-h100-2026-11-27/``): against the
cuBLAS gate GEMM this kernel (as committed) takes 1.08x at M = 16384 (0.537-0.539 against 0.498
ms), 1.07x at 131072 (4.20 against 3.94-4.26 ms) and 1.17x at 4096, against 1.16-1.25x for the
Triton kernel in the same runs; its first version (ccaf3c8, before the MMA warps moved to
``_gate_ws``) measured 1.05x / 1.05x / 1.14x in an earlier run, a difference not traced.
The main loop alone (handing tiles over, not packing them) ran at 0.455 ms, faster than cuBLAS:
the packing warps cost the rest. A first version computed each load's tile coordinates with
integer divisions in every K step: tensor pipes 65 % busy (Nsight Compute) and 1.27x cuBLAS;
carried from step to step, 86 %.
"""

from __future__ import annotations

import torch
import triton

from ._gate_ws import _GLUON, BN, EPI_REGS, STAGES, descriptors, handover_layout, ws_ok

__all__ = ["ws_pack_ok", "launch_gate_pack_ws"]

if _GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    from ._gate_ws import active_words, blocks, mma_part, popc, smem, tile_mn


def ws_pack_ok(x: torch.Tensor, w_gate: torch.Tensor, tile: int) -> bool:
    """Whether :func:`launch_gate_pack_ws` can run: :func:`_gate_ws.ws_ok` and T = 256."""
    return tile == BN and ws_ok(x, w_gate)


if _GLUON:

    @gluon.jit
    def _pack_part(
        g_smem, g_ready, g_empty, n_m, n_n, n_tiles, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr,
        counts_ptr, values_ptr, columns_ptr, ucounts_ptr, M, N,
        BITS_DTYPE: gl.constexpr, INF_BITS: gl.constexpr, MAG_MASK: gl.constexpr, S: gl.constexpr,
        UNIT_COUNTS: gl.constexpr,
    ):  # fmt: skip
        TBM: gl.constexpr = g_smem.shape[0]
        TBN: gl.constexpr = g_smem.shape[1]
        CH: gl.constexpr = 32
        g_blocks = blocks(g_smem)
        # 4 warps over a [TBM, CH] step: a thread holds 8 consecutive columns of 4 rows
        lay: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        o_l = gl.arange(0, CH, layout=gl.SliceLayout(0, lay))
        below = (1 << o_l) - 1  # the columns left of each
        t = 0
        for tile_id in range(gl.program_id(0), n_tiles, NUM_SMS):
            pid_m, pid_n = tile_mn(tile_id, n_m, n_n, GROUP_M)
            i_m = pid_m * TBM + gl.arange(0, TBM, layout=gl.SliceLayout(1, lay))
            # first slot of each row's (row, tile) entries, as byte addresses for the stores
            slot0 = (i_m.to(gl.int64) * n_n + pid_n) * S
            p_v = gl.expand_dims((values_ptr + slot0).to(gl.int64), 1)
            p_c = gl.expand_dims((columns_ptr + slot0).to(gl.int64), 1)
            base = gl.zeros([TBM], gl.int32, gl.SliceLayout(1, lay))
            mbarrier.wait(g_ready, t & 1)
            # the steps that hold columns < N (a runtime count: ptxas keeps the loop rolled)
            for j in range(gl.minimum(gl.cdiv(N - pid_n * TBN, CH), TBN // CH)):
                bits = g_blocks.index(j).load(lay).to(BITS_DTYPE, bitcast=True)
                o_n = pid_n * TBN + j * CH + o_l
                act, word = active_words(bits, i_m, o_n, M, N, INF_BITS, MAG_MASK)
                rank = gl.expand_dims(base, 1) + popc(gl.expand_dims(word, 1) & below[None, :])
                keep = (act & (rank < S)).to(gl.int32)
                # predicated stores of the value and its column at slot0 + rank (2-byte elements)
                gl.inline_asm_elementwise(
                    "{ .reg .pred %p<1>; .reg .b64 %a<2>; setp.ne.b32 %p0, $3, 0; "
                    "mad.wide.s32 %a0, $4, 2, $1; mad.wide.s32 %a1, $4, 2, $2; "
                    "@%p0 st.global.b16 [%a0], $5; @%p0 st.global.b16 [%a1], $6; mov.b32 $0, 0; }",
                    "=r,l,l,r,r,h,h",
                    [p_v, p_c, keep, rank, bits, o_n.to(gl.int16)[None, :]],
                    dtype=gl.int32,
                    is_pure=False,
                    pack=1,
                )
                if UNIT_COUNTS:
                    gl.atomic_add(
                        ucounts_ptr + o_n[None, :] + gl.zeros_like(rank), act.to(gl.int32), mask=act
                    )
                base += popc(word)
            # the tile is read: the MMA warps may overwrite it
            mbarrier.arrive(g_empty)
            gl.store(counts_ptr + i_m.to(gl.int64) * n_n + pid_n, base, mask=i_m < M)
            t += 1

    @gluon.jit
    def _gate_pack_ws_kernel(
        x_desc, w_desc, counts_ptr, values_ptr, columns_ptr, ucounts_ptr, M, N, NT,
        OUT_DTYPE: gl.constexpr, BITS_DTYPE: gl.constexpr, INF_BITS: gl.constexpr, MAG_MASK: gl.constexpr,
        S: gl.constexpr, NS: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr,
        UNIT_COUNTS: gl.constexpr, EPI_R: gl.constexpr, G_LAYOUT: gl.constexpr,
    ):  # fmt: skip
        n_m = gl.cdiv(M, x_desc.block_type.shape[0])
        n_k = gl.cdiv(x_desc.shape[1], x_desc.block_type.shape[1])
        n_tiles = n_m * NT
        x_bufs, w_bufs, g_smem, ready, g_ready, g_empty = smem(x_desc, w_desc, OUT_DTYPE, G_LAYOUT, NS)
        gl.warp_specialize(
            [
                (
                    mma_part,
                    (x_desc, w_desc, x_bufs, w_bufs, ready, g_smem, g_ready, g_empty, n_m, NT, n_k, n_tiles,
                     GROUP_M, NUM_SMS, OUT_DTYPE),
                ),
                (
                    _pack_part,
                    (g_smem, g_ready, g_empty, n_m, NT, n_tiles, GROUP_M, NUM_SMS, counts_ptr, values_ptr,
                     columns_ptr, ucounts_ptr, M, N, BITS_DTYPE, INF_BITS, MAG_MASK, S, UNIT_COUNTS),
                ),
            ],
            [4],
            [EPI_R],
        )  # fmt: skip


def launch_gate_pack_ws(x, w_gate, slots, counts, values, columns, ucounts, consts, group_m, n_sms) -> None:
    """The specialised-warps gate_pack into preallocated outputs (the caller checked
    :func:`ws_pack_ok`); ``values`` viewed as 16-bit integers, ``consts`` = (out dtype, bits
    dtype, +inf bits, magnitude mask) of ``gate_pack._dtype_consts``."""
    M = x.shape[0]
    x_desc, w_desc = descriptors(x, w_gate)
    grid = (min(n_sms, triton.cdiv(M, x_desc.block_shape[0]) * counts.shape[1]),)
    out_dt, bits_dt, inf_bits, mag = consts
    _gate_pack_ws_kernel[grid](
        x_desc, w_desc, counts, values, columns, ucounts if ucounts is not None else counts,
        M, w_gate.shape[0], counts.shape[1],
        OUT_DTYPE=out_dt, BITS_DTYPE=bits_dt, INF_BITS=inf_bits, MAG_MASK=mag, S=slots, NS=STAGES,
        GROUP_M=group_m, NUM_SMS=grid[0], UNIT_COUNTS=ucounts is not None,
        EPI_R=EPI_REGS, G_LAYOUT=handover_layout(x_desc.block_shape[0], w_desc.block_shape[0]),
        num_warps=8, maxnreg=168,
    )  # fmt: skip

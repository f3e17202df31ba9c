"""Shared pieces of the Hopper gate GEMMs with specialised warps (Gluon): ``gate_pack_ws`` and
``gate_bits_ws``.

Legend: M = tokens, K = model dim, N = FFN units, BM x BN x BK = 128 x 256 x 64, CH = 32 columns
per epilogue step, NS = stages.

Each persistent program (one per SM) runs two groups of warps at once:

* the default 8 warps (two warpgroups, 64 rows each, :func:`_mma_part`) issue the TMA loads of x
  and W_gate into a ring of NS shared-memory stages, NS - 1 K steps ahead and across tile
  boundaries, run the wgmma main loop, round each finished fp32 tile to the activation dtype
  and hand it over in shared memory (64 KiB), then go on to the next tile;
* 4 epilogue warps (the op's own partition) take the handed-over tile in [BM, CH] blocks while
  the MMA warps run the next tile, so the tensor cores do not wait for the epilogue.

A separate 1-warp load partition would make 13 warps, rounded to 16 on Hopper: 128 registers
per thread at launch, and ptxas needs ~154 for the m64n256 wgmma accumulator; with 12 warps the
launch allows 168 and setmaxnreg gives the MMA warps 184. Gluon kernels do not run in the CPU
interpreter: the CPU tests run the Triton kernels, these are tested on the GPU
(``tests/test_infer_gpu.py``, ``tests/test_ffn_train.py``).
"""

from __future__ import annotations

import torch

from ._triton import tma_aligned

__all__ = ["BM", "BN", "BK", "STAGES", "EPI_REGS", "ws_available", "ws_ok", "descriptors", "handover_layout"]

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _GLUON = hasattr(gl, "warp_specialize")
except ImportError:  # a Triton without Gluon: the Triton kernels run
    _GLUON = False

#: GEMM tile, K step and stages: 3 stages of x and W_gate blocks (144 KiB) plus the handed-over
#: bf16 tile (64 KiB) fill the H100's 227 KiB of shared memory
BM, BN, BK, STAGES = 128, 256, 64, 3
#: registers of the epilogue warps (the 8 MMA warps get the rest of the SM's 64K)
EPI_REGS = 128


def ws_available() -> bool:
    """Whether this Triton has Gluon with warp specialization."""
    return _GLUON


def ws_ok(x: torch.Tensor, w_gate: torch.Tensor) -> bool:
    """Whether the specialised-warps kernels can run: Gluon, a Hopper GPU (wgmma), a 16-bit
    dtype, TMA-aligned rows of x and W_gate."""
    if not (_GLUON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if torch.version.hip is not None or torch.cuda.get_device_capability(x.device) != (9, 0):
        return False
    return tma_aligned(x) and tma_aligned(w_gate)


def handover_layout(rows, cols):
    # The handed-over [rows, cols] 16-bit tile, stored as cols / 32 blocks of [rows, 32], each
    # row of a block 4 vectors of 16 bytes, vector v of row r at v ^ ((r // 2) % 4): the
    # epilogue warps read block j as a [rows, 32] SwizzledSharedLayout(8, 2, 4) buffer (also
    # the TMA 64-byte swizzle of a [rows, 32] box), and the MMA layout's 4-byte stores (8 rows x
    # 16 bytes per warp) hit 8 distinct bank groups.
    # Bases: element offset bit -> (row, column) it adds.
    bases = [[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]]  # within a block row
    for b in range(rows.bit_length() - 1):  # row bits; row bits 1 and 2 flip the vector
        bases.append([1 << b, {1: 8, 2: 16}.get(b, 0)])
    for b in range(5, cols.bit_length() - 1):  # block bits
        bases.append([0, 1 << b])
    return gl.SharedLinearLayout(bases)


def descriptors(x: torch.Tensor, w_gate: torch.Tensor):
    """TMA descriptors of x's [BM, BK] and W_gate's [BN, BK] blocks."""
    el = gl.float16 if x.dtype == torch.float16 else gl.bfloat16
    return (
        TensorDescriptor.from_tensor(x, [BM, BK], gl.NVMMASharedLayout.get_default_for([BM, BK], el)),
        TensorDescriptor.from_tensor(w_gate, [BN, BK], gl.NVMMASharedLayout.get_default_for([BN, BK], el)),
    )


if _GLUON:

    @gluon.jit
    def tile_mn(tile_id, n_m, n_n, GROUP_M: gl.constexpr):
        # (row block, column block) of tile tile_id, GROUP_M row blocks per band of columns
        in_group = GROUP_M * n_n
        first_m = (tile_id // in_group) * GROUP_M
        size_m = gl.minimum(n_m - first_m, GROUP_M)
        return first_m + (tile_id % in_group) % size_m, (tile_id % in_group) // size_m

    @gluon.jit
    def _issue(x_desc, w_desc, x_bufs, w_bufs, ready, p, off_m, off_n, kk):
        # TMA loads of load number p (rows off_m.., columns off_n.., K step kk) into stage p mod NS
        NS: gl.constexpr = x_bufs.shape[0]
        TBK: gl.constexpr = x_desc.block_type.shape[1]
        bar = ready.index(p % NS)
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [off_m, kk * TBK], bar, x_bufs.index(p % NS))
        tma.async_copy_global_to_shared(w_desc, [off_n, kk * TBK], bar, w_bufs.index(p % NS))

    @gluon.jit
    def mma_part(
        x_desc, w_desc, x_bufs, w_bufs, ready, g_smem, g_ready, g_empty,
        n_m, n_n, n_k, n_tiles, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr, OUT_DTYPE: gl.constexpr,
    ):  # fmt: skip
        # The loads run NS - 1 K steps ahead of the MMAs, across tile boundaries, into the stage
        # whose MMA the wait below has retired. Their position (load number p, tile, K step) is
        # carried from step to step: a wgmma K step is ~1,000 cycles, and index arithmetic with
        # divisions per step left the tensor cores idle (65 % busy).
        NS: gl.constexpr = x_bufs.shape[0]
        TBM: gl.constexpr = x_bufs.shape[1]
        TBN: gl.constexpr = w_bufs.shape[1]
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, TBN, 16]
        )
        pid = gl.program_id(0)
        total = gl.cdiv(n_tiles - pid, NUM_SMS) * n_k
        p_tile = pid
        p_m, p_n = tile_mn(pid, n_m, n_n, GROUP_M)
        p_kk = 0
        p = 0
        for _ in gl.static_range(NS - 1):
            if p < total:
                _issue(x_desc, w_desc, x_bufs, w_bufs, ready, p, p_m * TBM, p_n * TBN, p_kk)
                p += 1
                p_kk += 1
                if p_kk == n_k:
                    p_kk = 0
                    p_tile += NUM_SMS
                    p_m, p_n = tile_mn(p_tile, n_m, n_n, GROUP_M)
        acc = gl.zeros([TBM, TBN], gl.float32, acc_l)
        c = 0
        t = 0
        for _tile in range(pid, n_tiles, NUM_SMS):
            for kk in range(n_k):
                s = c % NS
                mbarrier.wait(ready.index(s), (c // NS) & 1)
                acc = warpgroup_mma(
                    x_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, use_acc=kk > 0, is_async=True
                )
                # at most this step's MMA in flight: the previous step's stage takes load p (the
                # prologue's lines again: one shared helper, measured, was no faster and maybe
                # slower at M = 131072; benchmarks/results/gate-pack-ws-h100-2026-11-27)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                if p < total:
                    _issue(x_desc, w_desc, x_bufs, w_bufs, ready, p, p_m * TBM, p_n * TBN, p_kk)
                    p += 1
                    p_kk += 1
                    if p_kk == n_k:
                        p_kk = 0
                        p_tile += NUM_SMS
                        p_m, p_n = tile_mn(p_tile, n_m, n_n, GROUP_M)
                c += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            # hand the rounded tile to the packing warps once they are done with the last one
            mbarrier.wait(g_empty, (t & 1) ^ 1)
            g_smem.store(acc.to(OUT_DTYPE))
            # the epilogue may read it by TMA (the async proxy)
            fence_async_shared()
            mbarrier.arrive(g_ready)
            t += 1

    @gluon.jit
    def smem(x_desc, w_desc, OUT_DTYPE: gl.constexpr, G_LAYOUT: gl.constexpr, NS: gl.constexpr):
        # the stages, the hand-over tile and their barriers, initialised
        TBM: gl.constexpr = x_desc.block_type.shape[0]
        TBK: gl.constexpr = x_desc.block_type.shape[1]
        TBN: gl.constexpr = w_desc.block_type.shape[0]
        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [NS, TBM, TBK], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NS, TBN, TBK], w_desc.layout)
        g_smem = gl.allocate_shared_memory(OUT_DTYPE, [TBM, TBN], G_LAYOUT)
        ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        g_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        g_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NS):
            mbarrier.init(ready.index(s), count=1)
        mbarrier.init(g_ready, count=1)
        mbarrier.init(g_empty, count=1)
        return x_bufs, w_bufs, g_smem, ready, g_ready, g_empty

    @gluon.jit
    def blocks(g_smem):
        # the hand-over tile as TBN / 32 blocks of [TBM, 32] (see handover_layout)
        return g_smem._reinterpret(
            g_smem.dtype,
            [g_smem.shape[1] // 32, g_smem.shape[0], 32],
            gl.SwizzledSharedLayout(8, 2, 4, order=[1, 0]),
        )

    @gluon.jit
    def active_words(bits, i_m, o_n, M, N, INF_BITS: gl.constexpr, MAG_MASK: gl.constexpr):
        # a [TBM, 32] block of 16-bit patterns -> (active [TBM, 32]: > 0 or NaN, inside M x N;
        # int32 [TBM] words, bit j = column j active)
        o_l = o_n % 32
        act = ((bits > 0) | ((bits & MAG_MASK) > INF_BITS)) & (i_m < M)[:, None] & (o_n < N)[None, :]
        return act, gl.sum(act.to(gl.int32) << o_l[None, :], axis=1)

    @gluon.jit
    def popc(v):
        return gl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [v], dtype=gl.int32, is_pure=True, pack=1
        )

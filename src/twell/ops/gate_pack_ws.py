"""gate_pack on Hopper with specialised warps (Gluon): the packing epilogue beside the next MMAs.

Legend: M = tokens, K = model dim, N = FFN units, T = BN = 256 (the TwELL tile), NT = ceil(N / T),
S = slots, BM x BN x BK = 128 x 256 x 64, CH = 32 columns per packing step.

The Triton kernel ``gate_pack._gate_pack_tma_kernel`` runs each tile's packing epilogue in the
warps that hold its accumulator, so the tensor cores idle meanwhile (1.15-1.19x the cuBLAS gate
GEMM at M = 16384 on the H100). Here each persistent program (one per SM) runs two groups of
warps at once:

* the default 8 warps (two warpgroups, 64 rows each) issue the TMA loads of x and W_gate into a
  ring of STAGES shared-memory stages, NS - 1 K steps ahead and across tile boundaries, run the
  wgmma main loop, round each finished fp32 tile to the activation dtype and hand it over in
  shared memory (64 KiB), then go on to the next tile;
* 4 packing warps take the handed-over tile in [BM, CH] steps: activity (> 0, or NaN) on the
  rounded bits, rank inside the (row, tile) by a popcount prefix over the step's 32-bit words,
  the first S active entries per (row, tile) stored at their rank (sorted by column, as
  ``gate_pack``'s other kernels write them), and the true counts.

A separate 1-warp load partition would make 13 warps, rounded to 16 on Hopper: 128 registers
per thread at launch, and ptxas needs ~154 for the m64n256 wgmma accumulator; with 12 warps the
launch allows 168 and setmaxnreg gives the MMA warps 184.

The output is bitwise that of the Triton kernels (the same fp32 MMA order over K, the same
rounding and ranking; checked on the GPU at bf16 / fp16, odd K and N, NaN and dense rows,
overflowing tiles). Gluon kernels do not run in the CPU interpreter: the CPU tests run the
Triton kernels, and this one is tested on the GPU (``tests/test_infer_gpu.py``).

Measured (H100 80GB HBM3, bf16, K = 2048, N = 5632, ~30 active units per token iid, 4 weight
sets rotated, device time; ``benchmarks/results/gate-pack-ws-h100-2026-11-27/``): against the
cuBLAS gate GEMM this kernel takes 1.05x at M = 16384 (0.522 against 0.498 ms) and 131072
(4.09 against 3.88 ms), 1.14x at 4096, 1.23x at 2048, against 1.19-1.31x for the Triton kernel.
The main loop alone (handing tiles over, not packing them) ran at 0.455 ms, faster than cuBLAS:
the packing warps cost the rest. A first version computed each load's tile coordinates with
integer divisions in every K step: tensor pipes 65 % busy (Nsight Compute) and 1.27x cuBLAS;
carried from step to step, 86 %.
"""

from __future__ import annotations

import torch
import triton

__all__ = ["ws_available", "ws_ok", "launch_gate_pack_ws"]

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
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
#: registers of the packing warps (the 8 MMA warps get the rest of the SM's 64K)
PACK_REGS = 128


def ws_available() -> bool:
    """Whether this Triton has Gluon with warp specialization."""
    return _GLUON


def ws_ok(x: torch.Tensor, w_gate: torch.Tensor, tile: int) -> bool:
    """Whether :func:`launch_gate_pack_ws` can run: a Hopper GPU (wgmma), a 16-bit dtype,
    T = 256, TMA-aligned rows of x and W_gate."""
    if not (_GLUON and x.is_cuda and tile == BN and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if torch.version.hip is not None or torch.cuda.get_device_capability(x.device) != (9, 0):
        return False
    for t in (x, w_gate):
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def _handover_layout(rows, cols):
    # The handed-over [rows, cols] 16-bit tile, stored as cols / 32 blocks of [rows, 32], each
    # row of a block 4 vectors of 16 bytes, vector v of row r at v ^ ((r // 2) % 4): the
    # packing warps read block j as a [rows, 32] SwizzledSharedLayout(8, 2, 4) buffer, and the
    # MMA layout's 4-byte stores (8 rows x 16 bytes per warp) hit 8 distinct bank groups.
    # Bases: element offset bit -> (row, column) it adds.
    bases = [[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]]  # within a block row
    for b in range(rows.bit_length() - 1):  # row bits; row bits 1 and 2 flip the vector
        bases.append([1 << b, {1: 8, 2: 16}.get(b, 0)])
    for b in range(5, cols.bit_length() - 1):  # block bits
        bases.append([0, 1 << b])
    return gl.SharedLinearLayout(bases)


if _GLUON:

    @gluon.jit
    def _tile_mn(tile_id, n_m, n_n, GROUP_M: gl.constexpr):
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
    def _mma_part(
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
        p_m, p_n = _tile_mn(pid, n_m, n_n, GROUP_M)
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
                    p_m, p_n = _tile_mn(p_tile, n_m, n_n, GROUP_M)
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
                # at most this step's MMA in flight: the previous step's stage takes load p
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                if p < total:
                    _issue(x_desc, w_desc, x_bufs, w_bufs, ready, p, p_m * TBM, p_n * TBN, p_kk)
                    p += 1
                    p_kk += 1
                    if p_kk == n_k:
                        p_kk = 0
                        p_tile += NUM_SMS
                        p_m, p_n = _tile_mn(p_tile, n_m, n_n, GROUP_M)
                c += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            # hand the rounded tile to the packing warps once they are done with the last one
            mbarrier.wait(g_empty, (t & 1) ^ 1)
            g_smem.store(acc.to(OUT_DTYPE))
            mbarrier.arrive(g_ready)
            t += 1

    @gluon.jit
    def _popc(v):
        return gl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [v], dtype=gl.int32, is_pure=True, pack=1
        )

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
        # the same bytes as TBN / CH blocks of [TBM, CH] (see _handover_layout)
        g_blocks = g_smem._reinterpret(
            g_smem.dtype, [TBN // CH, TBM, CH], gl.SwizzledSharedLayout(8, 2, 4, order=[1, 0])
        )
        # 4 warps over a [TBM, CH] step: a thread holds 8 consecutive columns of 4 rows
        lay: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        o_l = gl.arange(0, CH, layout=gl.SliceLayout(0, lay))
        below = (1 << o_l) - 1
        t = 0
        for tile_id in range(gl.program_id(0), n_tiles, NUM_SMS):
            pid_m, pid_n = _tile_mn(tile_id, n_m, n_n, GROUP_M)
            i_m = pid_m * TBM + gl.arange(0, TBM, layout=gl.SliceLayout(1, lay))
            m_m = i_m < M
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
                act = ((bits > 0) | ((bits & MAG_MASK) > INF_BITS)) & m_m[:, None] & (o_n < N)[None, :]
                word = gl.sum(act.to(gl.int32) << o_l[None, :], axis=1)
                rank = gl.expand_dims(base, 1) + _popc(gl.expand_dims(word, 1) & below[None, :])
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
                base += _popc(word)
            # the tile is read: the MMA warps may overwrite it
            mbarrier.arrive(g_empty)
            gl.store(counts_ptr + i_m.to(gl.int64) * n_n + pid_n, base, mask=m_m)
            t += 1

    @gluon.jit
    def _gate_pack_ws_kernel(
        x_desc, w_desc, counts_ptr, values_ptr, columns_ptr, ucounts_ptr, M, N, NT,
        OUT_DTYPE: gl.constexpr, BITS_DTYPE: gl.constexpr, INF_BITS: gl.constexpr, MAG_MASK: gl.constexpr,
        S: gl.constexpr, NS: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr,
        UNIT_COUNTS: gl.constexpr, PACK_R: gl.constexpr, G_LAYOUT: gl.constexpr,
    ):  # fmt: skip
        TBM: gl.constexpr = x_desc.block_type.shape[0]
        TBK: gl.constexpr = x_desc.block_type.shape[1]
        TBN: gl.constexpr = w_desc.block_type.shape[0]
        K = x_desc.shape[1]
        n_m = gl.cdiv(M, TBM)
        n_k = gl.cdiv(K, TBK)
        n_tiles = n_m * NT
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
        gl.warp_specialize(
            [
                (
                    _mma_part,
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
            [PACK_R],
        )  # fmt: skip


def launch_gate_pack_ws(x, w_gate, slots, counts, values, columns, ucounts, consts, group_m, n_sms) -> None:
    """The specialised-warps gate_pack into preallocated outputs (the caller checked
    :func:`ws_ok`); ``values`` viewed as 16-bit integers, ``consts`` = (out dtype, bits dtype,
    +inf bits, magnitude mask) of ``gate_pack._dtype_consts``."""
    M, K = x.shape
    N = w_gate.shape[0]
    el = gl.float16 if x.dtype == torch.float16 else gl.bfloat16
    x_desc = TensorDescriptor.from_tensor(x, [BM, BK], gl.NVMMASharedLayout.get_default_for([BM, BK], el))
    w_desc = TensorDescriptor.from_tensor(
        w_gate, [BN, BK], gl.NVMMASharedLayout.get_default_for([BN, BK], el)
    )
    n_tiles = triton.cdiv(M, BM) * counts.shape[1]
    grid = (min(n_sms, n_tiles),)
    out_dt, bits_dt, inf_bits, mag = consts
    _gate_pack_ws_kernel[grid](
        x_desc, w_desc, counts, values, columns, ucounts if ucounts is not None else counts,
        M, N, counts.shape[1],
        OUT_DTYPE=out_dt, BITS_DTYPE=bits_dt, INF_BITS=inf_bits, MAG_MASK=mag, S=slots, NS=STAGES,
        GROUP_M=group_m, NUM_SMS=grid[0], UNIT_COUNTS=ucounts is not None,
        PACK_R=PACK_REGS, G_LAYOUT=_handover_layout(BM, BN), num_warps=8, maxnreg=168,
    )  # fmt: skip

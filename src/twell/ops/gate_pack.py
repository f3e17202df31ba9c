"""The gate GEMM with a ReLU + TwELL packing epilogue: ``x @ W_gate^T -> relu -> TwELL``.

Legend: M = tokens, K = model dim, N = FFN units, T = TwELL tile, NT = ceil(N / T), S = slots,
BM x BN x BK = the GEMM tile (BN = T for T <= 256; a T > 256 tile is walked in BN = 256 steps).

The dense gate ``g [M, N]`` never reaches memory: each finished [BM, BN] accumulator tile is
rounded to x's dtype, tested for activity (> 0, or NaN), ranked inside its (row, tile) by a
popcount prefix over 32-column words, and its first S active entries per (row, tile) are stored
at their rank, so entries come out sorted by column and the packing is deterministic.

Output: a :class:`twell.TwELL` with
  counts  int32 [M, NT]     the true active count of each (row, tile), also when it exceeds S
  values  dtype [M, NT, S]  the first min(count, S) active values g[m, n], by column
  columns int16 [M, NT, S]  their global column (16-bit pattern)
Differences from :meth:`TwELL.from_dense`, both by design:
  * slots past ``min(count, S)`` are left unwritten (consumers never read them; writing zeros
    would add 25% of a dense bf16 gate's bytes at S = 32, T = 256);
  * ``overflow_ids`` / ``overflow_rows`` are None: a consumer that sees ``count > S`` recomputes
    that tile's gate values from x and W_gate (``ffn_infer`` does), so nothing is lost, but
    :meth:`TwELL.to_dense` raises for such a packing.

On Hopper in 16-bit dtypes with T = 256, from ``GateConfig.ws_min_m`` rows, the Gluon kernel of
``gate_pack_ws`` runs instead (the same output, bitwise; its packing warps run beside the next
tile's MMAs: 1.08x the cuBLAS gate GEMM at M = 16384 on the H100). Otherwise two Triton kernels, one epilogue:
  * ``_gate_pack_tma_kernel``: persistent, TMA tensor descriptors, 128x256x64, 3 stages (the
    form that matched cuBLAS on the H100: 1.01-1.02x at M = 16384); Hopper and newer, 16-byte
    aligned rows of x and W_gate, T <= 256.
  * ``_gate_pack_kernel``: one program per (row block, tile), plain pointers; any strides, any
    backend (the CPU interpreter included), any T.
On NVIDIA GPUs the entries are written by a predicated inline-PTX store: with ``tl.store``
Triton inserts a shared-memory layout conversion before each scattered store.

Measured here (H100, bf16, K=2048, N=5632, M = 16384, cuBLAS gate GEMM 0.495 ms): this kernel
0.569-0.579 ms (1.15x); with ``tl.store`` 0.820; not flattened 0.705; pointer kernel 0.774; a
first whole-tile (unchunked) epilogue 0.718 (register spills). See docs/kernels.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _alloc
from .._checks import MAX_COLUMNS, check_tensor, check_tile_slots
from ..format import TwELL
from ._triton import can_run_triton, interpreter_enabled, num_sms, tma_aligned
from .configs import get_config
from .gate_pack_ws import launch_gate_pack_ws, ws_pack_ok
from .pack import pack_twell_ref

__all__ = ["gate_pack", "gate_pack_ref", "gate_pack_arrays", "grouped_tile", "tma_tile_dot"]


# ---------------------------------------------------------------------------------------------
# reference (plain torch)
# ---------------------------------------------------------------------------------------------
def gate_pack_ref(x: torch.Tensor, w_gate: torch.Tensor, tile: int = 256, slots: int = 32):
    """``(counts, values, columns)`` of ``relu(x [M, K] @ w_gate[N, K]^T)`` in plain torch."""
    return pack_twell_ref(F.linear(x, w_gate), tile, slots)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def grouped_tile(tile_id, n_m, n_n, GROUP_M: tl.constexpr):
    # (row block, column block) of output tile tile_id when GROUP_M row blocks run per band of
    # columns (consecutive tiles share W_gate blocks in L2)
    in_group = GROUP_M * n_n
    first_m = (tile_id // in_group) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    return first_m + (tile_id % in_group) % size_m, (tile_id % in_group) // size_m


@triton.jit
def tma_tile_dot(
    x_desc,
    w_desc,
    off_m,
    off_n,
    n_k,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # fp32 [BM, BN] tile of x @ w^T at (off_m, off_n) from tensor descriptors, n_k steps of BK
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(n_k):
        b_x = x_desc.load([off_m, kk * BK])
        b_w = w_desc.load([off_n, kk * BK])
        # [BM, BK] @ [BK, BN] -> [BM, BN]
        acc = tl.dot(b_x, b_w.T, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _popc(v, HW_POPC: tl.constexpr):
    # v: int32 bit words -> int32 number of set bits
    if HW_POPC:
        return tl.extra.cuda.libdevice.popc(v)
    else:
        u = v.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = (u * 0x01010101) >> 24
        return u.to(tl.int32, bitcast=True)


@triton.jit
def _pack_chunk(
    c,
    i_m,
    col0,
    base,
    t,
    M,
    N,
    NT,
    values_ptr,
    columns_ptr,
    ucounts_ptr,
    OUT_DTYPE: tl.constexpr,
    BITS_DTYPE: tl.constexpr,
    INF_BITS: tl.constexpr,
    MAG_MASK: tl.constexpr,
    BM: tl.constexpr,
    CH: tl.constexpr,
    S: tl.constexpr,
    HW_POPC: tl.constexpr,
    ASM_STORE: tl.constexpr,
    UNIT_COUNTS: tl.constexpr,
):
    # c [BM, CH <= 32] fp32 accumulators of columns col0.. -> stores the active entries at slot
    # base + rank (rank = popcount of the active bits left of the column); returns the new base
    o_l = tl.arange(0, CH)
    o_n = col0 + o_l
    b_bits = c.to(OUT_DTYPE).to(BITS_DTYPE, bitcast=True)
    m_in = (i_m < M)[:, None] & (o_n < N)[None, :]
    b_act = ((b_bits > 0) | ((b_bits & MAG_MASK) > INF_BITS)) & m_in
    b_word = tl.sum(b_act.to(tl.int32) << o_l[None, :], axis=1)
    b_rank = base[:, None] + _popc(b_word[:, None] & ((1 << o_l) - 1)[None, :], HW_POPC)
    m_keep = b_act & (b_rank < S)
    p_slot = (i_m.to(tl.int64) * NT + t)[:, None] * S + b_rank
    b_col = tl.broadcast_to(o_n[None, :], (BM, CH)).to(tl.int16)
    if ASM_STORE:
        p_v = (values_ptr + p_slot).to(tl.int64)
        p_c = (columns_ptr + p_slot).to(tl.int64)
        if BITS_DTYPE == tl.int16:
            tl.inline_asm_elementwise(
                "{ .reg .pred %p<1>; setp.ne.b32 %p0, $5, 0; @%p0 st.global.b16 [$1], $3; "
                "@%p0 st.global.b16 [$2], $4; mov.b32 $0, 0; }",
                "=r,l,l,h,h,r",
                [p_v, p_c, b_bits, b_col, m_keep.to(tl.int32)],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred %p<1>; setp.ne.b32 %p0, $5, 0; @%p0 st.global.b32 [$1], $3; "
                "@%p0 st.global.b16 [$2], $4; mov.b32 $0, 0; }",
                "=r,l,l,r,h,r",
                [p_v, p_c, b_bits, b_col, m_keep.to(tl.int32)],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
    else:
        tl.store(values_ptr + p_slot, b_bits, mask=m_keep)
        tl.store(columns_ptr + p_slot, b_col, mask=m_keep)
    if UNIT_COUNTS:
        tl.atomic_add(ucounts_ptr + o_n, tl.sum(b_act.to(tl.int32), axis=0), mask=o_n < N)
    return base + _popc(b_word, HW_POPC)


@triton.jit
def _halves(c, BM: tl.constexpr, W: tl.constexpr):
    # [BM, W] -> columns [0, W/2) and [W/2, W) (register-level split of the MMA tile)
    return tl.split(tl.permute(tl.reshape(c, (BM, 2, W // 2)), (0, 2, 1)))


@triton.jit
def _pack_tile(
    acc,
    i_m,
    off_n,
    base,
    t,
    M,
    N,
    NT,
    values_ptr,
    columns_ptr,
    ucounts_ptr,
    OUT_DTYPE: tl.constexpr,
    BITS_DTYPE: tl.constexpr,
    INF_BITS: tl.constexpr,
    MAG_MASK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    CH: tl.constexpr,
    S: tl.constexpr,
    HW_POPC: tl.constexpr,
    ASM_STORE: tl.constexpr,
    UNIT_COUNTS: tl.constexpr,
):
    # acc [BM, BN] fp32, packed in 32-column chunks from left to right (a whole-tile rank
    # computation keeps ~6 [BM, BN] temporaries live and spills); returns the active count per row
    b = base
    if BN <= 32:
        b = _pack_chunk(
            acc,
            i_m,
            off_n,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
    elif BN == 64:
        c0, c1 = _halves(acc, BM, 64)
        b = _pack_chunk(
            c0,
            i_m,
            off_n,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c1,
            i_m,
            off_n + 32,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
    elif BN == 128:
        h0, h1 = _halves(acc, BM, 128)
        c0, c1 = _halves(h0, BM, 64)
        c2, c3 = _halves(h1, BM, 64)
        b = _pack_chunk(
            c0,
            i_m,
            off_n,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c1,
            i_m,
            off_n + 32,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c2,
            i_m,
            off_n + 64,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c3,
            i_m,
            off_n + 96,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
    else:
        q0, q1 = _halves(acc, BM, 256)
        h0, h1 = _halves(q0, BM, 128)
        h2, h3 = _halves(q1, BM, 128)
        c0, c1 = _halves(h0, BM, 64)
        c2, c3 = _halves(h1, BM, 64)
        c4, c5 = _halves(h2, BM, 64)
        c6, c7 = _halves(h3, BM, 64)
        b = _pack_chunk(
            c0,
            i_m,
            off_n,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c1,
            i_m,
            off_n + 32,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c2,
            i_m,
            off_n + 64,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c3,
            i_m,
            off_n + 96,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c4,
            i_m,
            off_n + 128,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c5,
            i_m,
            off_n + 160,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c6,
            i_m,
            off_n + 192,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        b = _pack_chunk(
            c7,
            i_m,
            off_n + 224,
            b,
            t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
    return b - base


@triton.jit
def _gate_pack_kernel(
    x_ptr,
    w_ptr,
    counts_ptr,
    values_ptr,
    columns_ptr,
    ucounts_ptr,
    M,
    N,
    K,
    NT,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    OUT_DTYPE: tl.constexpr,
    BITS_DTYPE: tl.constexpr,
    INF_BITS: tl.constexpr,
    MAG_MASK: tl.constexpr,
    T: tl.constexpr,
    S: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    CH: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HW_POPC: tl.constexpr,
    ASM_STORE: tl.constexpr,
    UNIT_COUNTS: tl.constexpr,
):
    pid_m, i_t = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), NT, GROUP_M)
    i_m = pid_m * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    b_base = tl.zeros((BM,), dtype=tl.int32)
    for j in range(T // BN):
        off_n = i_t * T + j * BN
        o_n = off_n + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            m_k = (k + o_k) < K
            b_x = tl.load(
                x_ptr + i_m[:, None].to(tl.int64) * stride_xm + (k + o_k)[None, :] * stride_xk,
                mask=(i_m < M)[:, None] & m_k[None, :],
                other=0.0,
            )
            b_w = tl.load(
                w_ptr + o_n[None, :].to(tl.int64) * stride_wn + (k + o_k)[:, None] * stride_wk,
                mask=(o_n < N)[None, :] & m_k[:, None],
                other=0.0,
            )
            # [BM, BK] @ [BK, BN] -> [BM, BN]
            acc = tl.dot(b_x, b_w, acc, input_precision=DOT_PREC)
        b_base += _pack_tile(
            acc,
            i_m,
            off_n,
            b_base,
            i_t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            BN,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
    tl.store(counts_ptr + i_m.to(tl.int64) * NT + i_t, b_base, mask=i_m < M)


@triton.jit
def _gate_pack_tma_kernel(
    x_desc,
    w_desc,
    counts_ptr,
    values_ptr,
    columns_ptr,
    ucounts_ptr,
    M,
    N,
    K,
    NT,
    OUT_DTYPE: tl.constexpr,
    BITS_DTYPE: tl.constexpr,
    INF_BITS: tl.constexpr,
    MAG_MASK: tl.constexpr,
    S: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    CH: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HW_POPC: tl.constexpr,
    ASM_STORE: tl.constexpr,
    UNIT_COUNTS: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    # T == BN here: one GEMM tile column band per TwELL tile
    start = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_tiles = n_m * NT
    n_k = tl.cdiv(K, BK)
    for tile_id in tl.range(start, n_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, i_t = grouped_tile(tile_id, n_m, NT, GROUP_M)
        off_m = pid_m * BM
        off_n = i_t * BN
        acc = tma_tile_dot(x_desc, w_desc, off_m, off_n, n_k, BM, BN, BK, DOT_PREC)
        i_m = off_m + tl.arange(0, BM)
        b_cnt = _pack_tile(
            acc,
            i_m,
            off_n,
            tl.zeros((BM,), dtype=tl.int32),
            i_t,
            M,
            N,
            NT,
            values_ptr,
            columns_ptr,
            ucounts_ptr,
            OUT_DTYPE,
            BITS_DTYPE,
            INF_BITS,
            MAG_MASK,
            BM,
            BN,
            CH,
            S,
            HW_POPC,
            ASM_STORE,
            UNIT_COUNTS,
        )
        tl.store(counts_ptr + i_m.to(tl.int64) * NT + i_t, b_cnt, mask=i_m < M)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------
def _dtype_consts(dtype: torch.dtype):
    """(triton out dtype, triton bits dtype, +inf bits, magnitude mask, torch bits dtype)."""
    if dtype == torch.float32:
        return tl.float32, tl.int32, 0x7F800000, 0x7FFFFFFF, torch.int32
    if dtype == torch.bfloat16:
        return tl.bfloat16, tl.int16, 0x7F80, 0x7FFF, torch.int16
    return tl.float16, tl.int16, 0x7C00, 0x7FFF, torch.int16


#: kernel variants that failed to compile on this install (e.g. inline asm on a non-NVIDIA
#: backend, or flatten on an older Triton), with the error; they are not tried again
_BROKEN: dict[str, str] = {}


def _tma_ok(x: torch.Tensor, w: torch.Tensor, tile: int, cfg) -> bool:
    if cfg.use_tma == "never" or tile > 256:
        return False
    if cfg.use_tma == "auto" and not (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9):
        return False
    return tma_aligned(x) and tma_aligned(w)


def launch_gate_pack(x, w_gate, tile, slots, counts, values, columns, ucounts):
    """Launches the gate GEMM + packing into preallocated outputs (checks done by the caller)."""
    cfg = get_config("gate")
    M, K = x.shape
    N = w_gate.shape[0]
    NT = counts.shape[1]
    out_dt, bits_dt, inf_bits, mag, bits_torch = _dtype_consts(x.dtype)
    values = values.view(bits_torch)
    on_gpu = x.is_cuda and not interpreter_enabled()
    bn = min(tile, 256)
    ch = min(32, bn)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    # smaller row blocks for fp32 (twice the bytes per element) and for tiny M
    bm = cfg.block_m if x.dtype != torch.float32 else 64
    bm = max(16, min(bm, 1 << max(M - 1, 1).bit_length()))
    bk = cfg.block_k if x.dtype != torch.float32 else 32
    bk = max(16, min(bk, 1 << max(K - 1, 1).bit_length()))
    ucount_arg = ucounts if ucounts is not None else counts
    common = dict(
        OUT_DTYPE=out_dt,
        BITS_DTYPE=bits_dt,
        INF_BITS=inf_bits,
        MAG_MASK=mag,
        S=slots,
        BM=bm,
        BN=bn,
        BK=bk,
        CH=ch,
        GROUP_M=cfg.group_m,
        DOT_PREC=prec,
        HW_POPC=on_gpu and torch.version.hip is None,
        UNIT_COUNTS=ucounts is not None,
    )
    plain, tma = _gate_pack_kernel, _gate_pack_tma_kernel
    if (
        on_gpu
        and cfg.use_ws != "never"
        and M >= cfg.ws_min_m
        and "ws" not in _BROKEN
        and ws_pack_ok(x, w_gate, tile)
    ):
        try:
            launch_gate_pack_ws(
                x, w_gate, slots, counts, values, columns, ucounts, (out_dt, bits_dt, inf_bits, mag),
                cfg.group_m, num_sms(x.device),
            )  # fmt: skip
            return
        except Exception as e:  # compile failure: the Triton kernels run
            _BROKEN["ws"] = repr(e)[:500]
    asm_choices = [True, False] if (on_gpu and cfg.use_asm_store and torch.version.hip is None) else [False]
    if (on_gpu or cfg.use_tma == "always") and bn == tile and _tma_ok(x, w_gate, tile, cfg):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
        w_desc = TensorDescriptor.from_tensor(w_gate, [bn, bk])
        n_tiles = triton_cdiv(M, bm) * NT
        grid = (min(num_sms(x.device), n_tiles),)
        for asm in asm_choices:
            for flatten in (cfg.flatten, not cfg.flatten):
                key = f"tma-asm{asm}-flat{flatten}"
                if key in _BROKEN:
                    continue
                try:
                    tma[grid](
                        x_desc,
                        w_desc,
                        counts,
                        values,
                        columns,
                        ucount_arg,
                        M,
                        N,
                        K,
                        NT,
                        NUM_SMS=grid[0],
                        ASM_STORE=asm,
                        FLATTEN=flatten,
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        **common,
                    )
                    return
                except Exception as e:  # compile failure of this variant: try the next one
                    _BROKEN[key] = repr(e)[:500]
    grid = (triton_cdiv(M, bm) * NT,)
    for asm in asm_choices:
        key = f"plain-asm{asm}"
        if key in _BROKEN and asm:
            continue
        try:
            plain[grid](
                x,
                w_gate,
                counts,
                values,
                columns,
                ucount_arg,
                M,
                N,
                K,
                NT,
                x.stride(0),
                x.stride(1),
                w_gate.stride(0),
                w_gate.stride(1),
                T=tile,
                ASM_STORE=asm,
                num_warps=cfg.num_warps if on_gpu else 4,
                num_stages=cfg.num_stages if on_gpu else 1,
                **common,
            )
            return
        except Exception as e:
            if not asm:
                raise
            _BROKEN[key] = repr(e)[:500]


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _gate_pack_triton(x, w_gate, tile, slots, unit_counts):
    M, _ = x.shape
    N = w_gate.shape[0]
    NT = triton_cdiv(N, tile)
    counts = _alloc.empty((M, NT), dtype=torch.int32, device=x.device)
    values = _alloc.empty((M, NT, slots), dtype=x.dtype, device=x.device)
    columns = _alloc.empty((M, NT, slots), dtype=torch.int16, device=x.device)
    ucounts = torch.zeros(N, dtype=torch.int32, device=x.device) if unit_counts else None
    if M > 0:
        launch_gate_pack(x, w_gate, tile, slots, counts, values, columns, ucounts)
    return counts, values, columns, ucounts


# ---------------------------------------------------------------------------------------------
# custom op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("twell::gate_pack", mutates_args=())
def _gate_pack_op(
    x: torch.Tensor, w_gate: torch.Tensor, tile: int, slots: int, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton:
        counts, values, columns, _ = _gate_pack_triton(x, w_gate, tile, slots, False)
        return counts, values, columns
    return gate_pack_ref(x, w_gate, tile, slots)


@_gate_pack_op.register_fake
def _(x, w_gate, tile, slots, use_triton):
    M = x.shape[0]
    NT = (w_gate.shape[0] + tile - 1) // tile
    return (
        x.new_empty((M, NT), dtype=torch.int32),
        x.new_empty((M, NT, slots)),
        x.new_empty((M, NT, slots), dtype=torch.int16),
    )


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def _check(x, w_gate, tile, slots, backend):
    check_tensor(x, "x", dim=2)
    check_tensor(w_gate, "w_gate", dim=2)
    check_tile_slots(tile, slots)
    if w_gate.shape[1] != x.shape[1]:
        raise ValueError(
            f"w_gate: expected shape [N, K={x.shape[1]}] (x's last dim), got {tuple(w_gate.shape)}"
        )
    if w_gate.device != x.device:
        raise ValueError(f"w_gate: on device {w_gate.device} but x is on {x.device}")
    if w_gate.dtype != x.dtype:
        raise TypeError(f"w_gate: dtype {w_gate.dtype} differs from x's {x.dtype}")
    if w_gate.shape[0] > MAX_COLUMNS:
        raise ValueError(f"w_gate: N={w_gate.shape[0]} exceeds the TwELL limit of {MAX_COLUMNS} columns")
    if w_gate.shape[0] == 0:
        raise ValueError("w_gate: N must be at least 1, got 0")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not can_run_triton(x):
        raise ValueError("backend: 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend == "triton" or (backend == "auto" and can_run_triton(x))


def gate_pack_arrays(x, w_gate, *, tile: int = 256, slots: int = 32, backend: str = "auto"):
    """``(counts [M, NT], values [M, NT, S], columns [M, NT, S])`` of ``relu(x @ w_gate^T)``,
    through the ``twell::gate_pack`` custom op (torch.compile and CUDA graphs see one op)."""
    use_triton = _check(x, w_gate, tile, slots, backend)
    return _gate_pack_op(x, w_gate, tile, slots, use_triton)


def gate_pack(
    x: torch.Tensor, w_gate: torch.Tensor, *, tile: int = 256, slots: int = 32, backend: str = "auto"
) -> TwELL:
    """``relu(x [M, K] @ w_gate[N, K]^T)`` packed as a :class:`twell.TwELL`, in one fused GEMM.

    The dense gate is never written. Counts are true counts; a (row, tile) with more than
    ``slots`` active entries keeps its first ``slots`` entries by column and ``overflow_ids`` is
    None (the FFN kernels recompute such tiles from x; see the module docstring). Slots past
    ``min(count, slots)`` are unspecified.

    Args:
        x: ``[M, K]`` float32, bfloat16 or float16 (any strides).
        w_gate: ``[N, K]``, x's dtype and device, N <= 65,536.
        tile, slots: T (power of two in [16, 4096]) and S (in [1, T]).
        backend: ``"auto"`` (Triton on CUDA or under TRITON_INTERPRET=1), ``"triton"`` or ``"torch"``.
    """
    counts, values, columns = gate_pack_arrays(x, w_gate, tile=tile, slots=slots, backend=backend)
    return TwELL(counts, values, columns, (x.shape[0], w_gate.shape[0]), tile, slots, None, None)

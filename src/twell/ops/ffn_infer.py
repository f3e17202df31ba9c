"""Inference forward of the gated-ReLU FFN from the TwELL packing: prefill, decode and dense paths.

Legend: M = tokens, K = model dim, N = FFN units, T = TwELL tile, NT = ceil(N / T), S = slots.
    g = x @ W_gate^T  [M, N],  u = x @ W_up^T  [M, N],  h = relu(g) * u,  y = h @ W_down^T  [M, K]

Paths (one entry point, :func:`ffn_infer`, picks one per call):
  * prefill (M >= ``prefill_min_m``), rows form (default, ``prefill_rows``): the training
    forward's kernels without autograd state (:func:`twell.ops.ffn_train.rows_forward`): cuBLAS
    gate GEMM, a row pack of the active units, two row passes (u of the slots with W_up in L2,
    then y with W_down^T in L2), in chunks of ``prefill_rows_chunk`` tokens, with the cached
    W_down^T of :func:`down_t`. Tiles form: ``gate_pack`` (gate GEMM with the TwELL epilogue),
    then ``_updown_kernel``, one program per token: x's row stays in registers; for every packed
    entry (n, g) it reads W_up[n, :] and W_down^T[n, :] (8 KB at K = 2048 in bf16), computes
    u = x . W_up[n], h = g u, y += h W_down^T[n]. A (token, tile) whose count exceeds S is
    recomputed exactly from x and W_gate (all T columns of the tile) and counted in
    ``overflow_rows``. W_down^T is a cached transposed copy of W_down (see :func:`down_t`).
  * decode (M <= ``decode_max_m``, to ``decode_union_max_m`` at K >= ``decode_union_reach_k`` where
    the union form may run, while the batch's union of active units is small):
    unit-parallel, so M = 1 still fills the GPU.
    ``_decode_gate_up_kernel``: one program per block of units computes the gate for all tokens
    (on CUDA cores at M <= ``decode_gemv_max_m``; above it tl.dot with the units on the MMA's M
    side and the tokens, padded to 16, on its N side), then W_up rows only for units active in
    some token (masked loads move no bytes), and the number of tokens activating each unit.
    Atomic form (M <= ``decode_atomic_max_m`` on CUDA cores, M >= ``decode_atomic_dot_min_m``
    with tl.dot, compacting the active units up to 16 tokens; not in deterministic mode or under
    CUDA-graph capture): the same program loads its active units' W_down^T rows and adds
    h W_down^T into an fp32 [M, K] accumulator with atomics; ``_decode_finish_kernel`` rounds it
    into y and zeroes it. Unit form (3 <= M <= ``decode_units_max_m``, same conditions): the gate
    kernel only stores g unit-major, and ``_decode_units_kernel`` runs the up/down of the active
    units over all the SMs into the same accumulator. Chunk form (``decode_chunk_min_m`` <= M <=
    ``decode_chunk_max_m``, to ``decode_chunk_long_max_m`` at K >= ``decode_chunk_long_k`` and to
    ``decode_chunk_wide_max_m`` there at a low measured density; same conditions): the gate
    kernel stores g and lists each block's active units, and ``_decode_chunk_kernel`` compacts
    the batch's active units into chunks of 16 run as tl.dot tiles into the same accumulator.
    Union form (``decode_union_min_m`` <= M <= ``decode_union_max_m`` at K >=
    ``decode_union_min_k`` where the chunk form is not chosen; same conditions): the chunk kernel
    runs only the up of each chunk and stores h by rank, then ``_decode_union_down_kernel`` runs
    y = h W_down^T over the batch's active units as a GEMM split over (output columns, ranges of
    units), one atomic add per program instead of one per chunk and column step; with
    ``decode_union_finish`` the last range of each column block (a ticket) rounds it into y and
    more programs of that kernel reduce the statistics, so no finishing kernel runs.
    Barrier form (``decode_barrier_min_m`` <= M <= ``decode_barrier_max_m``, 8..16, and to
    ``decode_barrier_union_max_m`` = 20 in place of the union form, where no unit or chunk form is
    chosen and the programs fit on the SMs at once; not in deterministic mode or under capture):
    one launch of ``decode_barrier._decode_barrier_kernel``: gate, the up of the active units
    compacted 16 at a time, a grid-wide barrier, then the down projection by output column blocks
    straight into y (no atomic add on y, no finishing kernel).
    Pair form (``decode_pairs_min_m`` <= M <= ``decode_pairs_max_m``, 8..32, at K >= 4096; from
    ``decode_pairs_short_min_m`` = 21 at ``decode_pairs_min_k`` = 2048 <= K < 4096; in place of
    every other form there; not in deterministic mode or under capture): ``decode_pairs`` lists
    the batch's active (token, unit) pairs in the gate kernel, computes each pair's h from whole x
    and W_up rows, and sums the pairs into y by output columns (split over ranges of the list
    per ``decode_pairs_down``). Its units variant (``decode_pairs_units_min_m`` = 33 <= M <=
    ``decode_pairs_units_max_m`` = 64 at 2048 <= K < 4096): the gate kernel also lists the
    batch's active units, the up kernel stores each pair's h by its unit's rank, and the union
    form's down kernel sums the listed units into y.
    Split form (the M between the forms, deterministic mode, capture): h is written (unit-major
    [N, M], tiny), then ``_decode_down_kernel`` (the second kernels are launched with
    programmatic dependent launch on sm_90+, so they are scheduled while the first grid drains):
    programs over (K block, range of units) compact the units some
    token activates (512 per step) and gather their W_down^T row segments 16 per load (tl.dot for
    M > 1), write fp32 partials; the last program of a K block (atomic ticket) sums the partials
    in a fixed order and writes y; one extra program reduces the statistics.
  * dense: 2 cuBLAS GEMMs, ``_relu_mul_stats_kernel`` (h = relu(g) u and the statistics in one
    pass), 1 cuBLAS GEMM; chosen when the measured density makes the sparse paths slower.

Measured (H100, bf16, K=2048, N=5632, ~30 active units per token, device time, dense = 3 cuBLAS
GEMMs), twell bench at 9167e36 (24 units iid): M = 1 2.55x, M = 8 1.83x, M = 64 1.19x (1.15x
at 30 skewed), M = 2048 1.47x, M = 16384 1.71x, M = 131072 1.71x; Llama-3-8B shape (30 units)
2.84x at M = 1, 1.73x at M = 64 and 1.81x at M = 16384.
Numbers and what bounds them: docs/kernels.md.

Exactness: every path equals the dense reference up to floating-point rounding for every input
(NaN in a token's x gives NaN in its row; all its tiles overflow and are recomputed). The atomic
decode form sums in arrival order (the last bit of y may differ between calls); deterministic
mode runs the split form instead. No host
synchronisation on any path: the dispatcher reads the density of earlier calls from pinned host
memory (a slot the decode kernels store l0 into; after prefill or dense calls a copy, read only
once its event has completed), so the work queue never drains and CUDA-graph capture works (under
capture the decision is frozen).
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from .. import _alloc
from .._checks import MAX_COLUMNS, check_ffn_args, check_tile_slots
from ..stats import FFNStats
from ._triton import can_run_triton, interpreter_enabled, num_sms, pdl_ok
from .configs import get_config
from .ffn_ref import sparse_ffn_ref
from .ffn_train import rows_forward
from .gate_pack import _dtype_consts, launch_gate_pack

__all__ = ["ffn_infer", "ffn_infer_checked", "ffn_infer_ref", "down_t", "PATHS", "choose_path"]

#: accepted values of ``path``
PATHS = ("auto", "prefill", "decode", "dense", "reference")


# ---------------------------------------------------------------------------------------------
# reference (plain torch)
# ---------------------------------------------------------------------------------------------
def ffn_infer_ref(x, w_gate, w_up, w_down, *, tile: int = 256, slots: int = 32, unit_counts: bool = False):
    """The torch oracle, statistics detached: ``(y [M, K], FFNStats)``."""
    with torch.no_grad():
        y, st = sparse_ffn_ref(x, w_gate, w_up, w_down, tile=tile, slots=slots, unit_counts=unit_counts)
    return y, st


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _is_active(
    v, OUT_DTYPE: tl.constexpr, BITS_DTYPE: tl.constexpr, INF_BITS: tl.constexpr, MAG_MASK: tl.constexpr
):
    # fp32 values -> rounded to the activation dtype; active = > 0 or NaN (decided on the bits)
    b = v.to(OUT_DTYPE).to(BITS_DTYPE, bitcast=True)
    return (b > 0) | ((b & MAG_MASK) > INF_BITS)


@triton.jit
def _updown_kernel(
    x_ptr,
    counts_ptr,
    values_ptr,
    columns_ptr,
    wg_ptr,
    wu_ptr,
    wdt_ptr,
    y_ptr,
    tok_ptr,
    N,
    K,
    NT,
    stride_xm,
    stride_xk,
    stride_ym,
    OUT_DTYPE: tl.constexpr,
    BITS_DTYPE: tl.constexpr,
    INF_BITS: tl.constexpr,
    MAG_MASK: tl.constexpr,
    T: tl.constexpr,
    S: tl.constexpr,
    BK: tl.constexpr,
    PART: tl.constexpr,
):
    # one program per token over its packed entries. PART 0: y and the statistics in one pass.
    # PART 1: h = g u of the entries of tiles within S, written over their g in `values` (the
    # activation dtype, as dense rounds h; W_up alone in L2); PART 2: y from those h (W_down^T
    # alone in L2), the overflowing tiles whole, and the statistics.
    i_m = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_x = tl.load(x_ptr + i_m * stride_xm + o_k * stride_xk, mask=m_k, other=0.0).to(tl.float32)
    b_y = tl.zeros((BK,), dtype=tl.float32)
    s_l1 = tl.zeros((), dtype=tl.float32)
    s_cnt = tl.zeros((), dtype=tl.int32)
    s_over = tl.zeros((), dtype=tl.int32)
    for t in range(NT):
        c = tl.load(counts_ptr + i_m * NT + t)
        s_cnt += c
        if c <= S:
            p_e = (i_m * NT + t) * S
            for i in range(c):
                n = (tl.load(columns_ptr + p_e + i).to(tl.int32) & 0xFFFF).to(tl.int64)
                if PART != 1:
                    # W_down^T row issued with the W_up row, before the dot product that needs
                    # the latter: both in flight at once. H100, paper shape, 30 units/token iid:
                    # 0.1758 ms against 0.1818 at M = 2048, 1.214 against 1.244 at M = 16384
                    # (whole call, twell bench)
                    b_d = tl.load(wdt_ptr + n * K + o_k, mask=m_k, other=0.0)
                if PART == 2:
                    h = tl.load(values_ptr + p_e + i).to(tl.float32)
                else:
                    g = tl.load(values_ptr + p_e + i).to(tl.float32)
                    b_u = tl.load(wu_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                    h = g * tl.sum(b_x * b_u)
                if PART == 1:
                    tl.store(values_ptr + p_e + i, h.to(OUT_DTYPE))
                else:
                    s_l1 += tl.abs(h)
                    b_y += h * b_d.to(tl.float32)
        elif PART != 1:
            # more than S active units in this (token, tile): recompute the tile's gate exactly
            s_over = tl.maximum(s_over, 1)
            for j in range(T):
                n = t * T + j + tl.zeros((), dtype=tl.int64)
                if n < N:
                    b_g = tl.load(wg_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                    g = tl.sum(b_x * b_g).to(OUT_DTYPE).to(tl.float32)
                    if _is_active(g, OUT_DTYPE, BITS_DTYPE, INF_BITS, MAG_MASK):
                        b_u = tl.load(wu_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                        b_d = tl.load(wdt_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                        h = g * tl.sum(b_x * b_u)
                        s_l1 += tl.abs(h)
                        b_y += h * b_d
    if PART != 1:
        tl.store(y_ptr + i_m * stride_ym + o_k, b_y.to(OUT_DTYPE), mask=m_k)
        tl.store(tok_ptr + i_m * 4 + 0, s_cnt.to(tl.float32))
        tl.store(tok_ptr + i_m * 4 + 1, s_l1)
        tl.store(tok_ptr + i_m * 4 + 2, s_over.to(tl.float32))


@triton.jit
def _finalize_stats_kernel(tok_ptr, M, l0_ptr, l1_ptr, over_ptr, BLOCK: tl.constexpr):
    # tok [M, 4] = (active count, sum |h|, overflow flag, unused) -> l0, l1 (means), overflow rows
    o = tl.arange(0, BLOCK)
    a_cnt = tl.zeros((BLOCK,), dtype=tl.int64)
    a_l1 = tl.zeros((BLOCK,), dtype=tl.float32)
    a_over = tl.zeros((BLOCK,), dtype=tl.int64)
    for m0 in range(0, M, BLOCK):
        i_m = (m0 + o).to(tl.int64)
        m_m = i_m < M
        a_cnt += tl.load(tok_ptr + i_m * 4 + 0, mask=m_m, other=0.0).to(tl.int64)
        a_l1 += tl.load(tok_ptr + i_m * 4 + 1, mask=m_m, other=0.0)
        a_over += tl.load(tok_ptr + i_m * 4 + 2, mask=m_m, other=0.0).to(tl.int64)
    denom = tl.maximum(M, 1).to(tl.float32)
    tl.store(l0_ptr, tl.sum(a_cnt).to(tl.float32) / denom)
    tl.store(l1_ptr, tl.sum(a_l1) / denom)
    tl.store(over_ptr, tl.sum(a_over))


@triton.jit
def _relu_mul_stats_kernel(
    g_ptr,
    u_ptr,
    h_ptr,
    tst_ptr,
    M,
    N,
    NT,
    OUT_DTYPE: tl.constexpr,
    BITS_DTYPE: tl.constexpr,
    INF_BITS: tl.constexpr,
    MAG_MASK: tl.constexpr,
    T: tl.constexpr,
    BM: tl.constexpr,
):
    # dense path: h = relu(g) * u for one (row block, tile), with its per-(row, tile) statistics
    # (one program per tile: a loop over tiles was a chain of ~1 us loads, 22 us at M = 8)
    i_m = tl.program_id(0) * BM + tl.arange(0, BM)
    t = tl.program_id(1)
    m_m = i_m < M
    o_n = t * T + tl.arange(0, T)
    m_x = m_m[:, None] & (o_n < N)[None, :]
    p = i_m[:, None].to(tl.int64) * N + o_n[None, :]
    b_g = tl.load(g_ptr + p, mask=m_x, other=0.0).to(tl.float32)
    b_u = tl.load(u_ptr + p, mask=m_x, other=0.0).to(tl.float32)
    b_act = _is_active(b_g, OUT_DTYPE, BITS_DTYPE, INF_BITS, MAG_MASK) & m_x
    b_h = tl.where(b_act, b_g * b_u, 0.0).to(OUT_DTYPE)
    tl.store(h_ptr + p, b_h, mask=m_x)
    p_s = (i_m.to(tl.int64) * NT + t) * 2
    tl.store(tst_ptr + p_s, tl.sum(b_act.to(tl.int32), axis=1).to(tl.float32), mask=m_m)
    tl.store(tst_ptr + p_s + 1, tl.sum(tl.abs(b_h.to(tl.float32)), axis=1), mask=m_m)


@triton.jit
def _finalize_tiles_kernel(
    tst_ptr, M, NT, l0_ptr, l1_ptr, over_ptr, S: tl.constexpr, R: tl.constexpr, NTP: tl.constexpr
):
    # tst [M, NT, 2] = (active count, sum |h|) per (row, tile) -> l0, l1 (means), overflow rows
    o_r = tl.arange(0, R)
    o_t = tl.arange(0, NTP)
    a_cnt = tl.zeros((R,), dtype=tl.int64)
    a_l1 = tl.zeros((R,), dtype=tl.float32)
    a_over = tl.zeros((R,), dtype=tl.int64)
    for r0 in range(0, M, R):
        i_r = (r0 + o_r).to(tl.int64)
        m = (i_r < M)[:, None] & (o_t < NT)[None, :]
        p = (i_r[:, None] * NT + o_t[None, :]) * 2
        b_c = tl.load(tst_ptr + p, mask=m, other=0.0).to(tl.int32)
        a_cnt += tl.sum(b_c, axis=1).to(tl.int64)
        a_over += tl.max((b_c > S).to(tl.int32), axis=1).to(tl.int64)
        a_l1 += tl.sum(tl.load(tst_ptr + p + 1, mask=m, other=0.0), axis=1)
    denom = tl.maximum(M, 1).to(tl.float32)
    tl.store(l0_ptr, tl.sum(a_cnt).to(tl.float32) / denom)
    tl.store(l1_ptr, tl.sum(a_l1) / denom)
    tl.store(over_ptr, tl.sum(a_over))


@triton.jit
def _middle_of_chain(PDL: tl.constexpr):
    # start of a decode kernel between the gate kernel and the finishing kernel, all launched with
    # programmatic dependent launch: the finishing kernel may be scheduled from now on, then wait
    # until the gate kernel's grid has completed and its writes are visible
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _leave_grid(cnt_ptr, GONE: tl.constexpr = 1):
    # counts this program out of the grid at cnt_ptr[GONE]; the last one out zeroes cnt_ptr[0]
    # to cnt_ptr[GONE] for the next launch (every program's reads of them are behind it)
    tl.debug_barrier()
    gone = tl.atomic_add(cnt_ptr + GONE, 1, sem="relaxed", scope="gpu")
    if gone == tl.num_programs(0) - 1:
        for i in tl.static_range(GONE + 1):
            tl.atomic_xchg(cnt_ptr + i, 0, sem="relaxed", scope="gpu")


@triton.jit
def _ranks(f):
    # for flags f [R]: the rank of each set flag among the set ones, in order, and their number
    c = f.to(tl.int32)
    return tl.cumsum(c, axis=0) - 1, tl.sum(c, axis=0)


@triton.jit
def _prefetch_rows(w_ptr, rows, valid, K, LINE: tl.constexpr, LINES: tl.constexpr):
    # a hint to the L2 cache: fetch rows `rows` [R] (where `valid`) of the row-major [*, K]
    # matrix at w_ptr, LINES lines of LINE elements from each row's start (those past K masked);
    # nothing waits for it and no value comes back, so a later load of the rows finds them in L2
    # instead of memory. GPU only (inline PTX; the callers pass LINES = 0 under the interpreter)
    o_l = tl.arange(0, LINES) * LINE
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + o_l[None, :]
    ok = (valid[:, None] & (o_l[None, :] < K)).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r",
        [ptrs, ok],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def _prefetch_lines(K: int, w: torch.Tensor, on: bool) -> tuple[int, int]:
    """(LINE, LINES) for ``_prefetch_rows`` over rows of K elements of ``w``: 128-byte lines, as many
    as a row spans (a power of two); LINES = 0 (no prefetch) when ``on`` is false, under the CPU
    interpreter and off CUDA."""
    line = max(1, 128 // w.element_size())
    if not on or interpreter_enabled() or not w.is_cuda:
        return line, 0
    return line, _p2(_cdiv(K, line))


@triton.jit
def _tokens_dot_rows(
    x_ptr,
    w_ptr,
    i_m,
    m_m,
    o_n,
    m_rows,
    M,
    K,
    stride_xm,
    stride_xk,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SWAP: tl.constexpr,
):
    # [BM, BN] fp32: x[i_m, :] . w[o_n, :] over K in BK steps; rows of w with m_rows False are
    # not read (masked loads move no bytes). SWAP (with USE_DOT) puts the units on the MMA's M
    # side and the tokens on its N side. Without USE_DOT and BM > 1 (small batches on CUDA
    # cores), the w tile of each K step is dotted with each token's row in turn.
    o_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_t = tl.zeros((BN, BM) if SWAP else (1, 1), dtype=tl.float32)
    for k in range(0, K, BK):
        m_k = (k + o_k) < K
        b_w = tl.load(
            w_ptr + o_n[:, None].to(tl.int64) * K + (k + o_k)[None, :],
            mask=m_rows[:, None] & m_k[None, :],
            other=0.0,
        )
        if USE_DOT or BM == 1:
            b_x = tl.load(
                x_ptr + i_m[:, None] * stride_xm + (k + o_k)[None, :] * stride_xk,
                mask=m_m[:, None] & m_k[None, :],
                other=0.0,
            )
            if USE_DOT and SWAP:
                # units on the MMA's M side: [BN, BK] @ [BK, BM] -> [BN, BM]
                acc_t = tl.dot(b_w, tl.trans(b_x), acc_t, input_precision=DOT_PREC)
            elif USE_DOT:
                # [BM, BK] @ [BK, BN] -> [BM, BN]
                acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision=DOT_PREC)
            else:
                acc += tl.sum(b_x.to(tl.float32)[:, None, :] * b_w.to(tl.float32)[None, :, :], axis=2)
        else:
            b_wf = b_w.to(tl.float32)
            for r in range(M):
                x_r = tl.load(x_ptr + r * stride_xm + (k + o_k) * stride_xk, mask=m_k, other=0.0)
                d_r = tl.sum(b_wf * x_r.to(tl.float32)[None, :], axis=1)
                acc += tl.where((i_m == r)[:, None], d_r[None, :], 0.0)
    if SWAP:
        acc = tl.trans(acc_t)
    return acc


@triton.jit
def _atomic_down(
    acc_ptr,
    wdt_ptr,
    rows,
    m_rows,
    b_h,
    i_m,
    m_x,
    K,
    k_lo,
    k_hi,
    BKD: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # acc[M, K] (fp32) += b_h [BM, R] @ W_down^T[rows] over columns [k_lo, k_hi) (rows with m_rows
    # False are not read), in BKD-column steps, by relaxed atomic adds into the token rows m_x
    # [BM, 1]
    o_kd = tl.arange(0, BKD)
    for k in range(k_lo, k_hi, BKD):
        m_k = (k + o_kd) < k_hi
        b_d = tl.load(
            wdt_ptr + rows[:, None] * K + (k + o_kd)[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0
        )
        if USE_DOT:
            c = tl.dot(b_h, b_d, input_precision=DOT_PREC)
        else:
            c = tl.sum(b_h.to(tl.float32)[:, :, None] * b_d.to(tl.float32)[None, :, :], axis=1)
        tl.atomic_add(
            acc_ptr + i_m[:, None] * K + (k + o_kd)[None, :], c, mask=m_x & m_k[None, :], sem="relaxed"
        )


@triton.jit
def _up_down_atomic(
    x_ptr,
    wu_ptr,
    wdt_ptr,
    acc_ptr,
    b_g,
    b_act,
    i_m,
    m_m,
    m_x,
    o_n,
    m_rows,
    M,
    K,
    stride_xm,
    stride_xk,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BKD: tl.constexpr,
    ONE_STEP: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SWAP: tl.constexpr,
):
    # u of the rows m_rows (units some token activates), h = g u rounded to the activation dtype,
    # then acc[M, K] (fp32) += h @ W_down^T[o_n] by atomic adds, only into the rows m_x [BM, 1] of
    # tokens that activate one of these units; returns h [BM, BN]. CUDA-core form (BM <= 2) with ONE_STEP
    # (K <= BK): the W_up and W_down^T rows are loaded together, so the down projection costs this
    # program no extra memory round trip. tl.dot form: [BM, BN] @ [BN, BKD] per K step of W_down^T.
    o_k = tl.arange(0, BK)
    if ONE_STEP:
        m_k = o_k < K
        p_w = o_n[:, None].to(tl.int64) * K + o_k[None, :]
        m_w = m_rows[:, None] & m_k[None, :]
        b_u = tl.load(wu_ptr + p_w, mask=m_w, other=0.0).to(tl.float32)
        b_d = tl.load(wdt_ptr + p_w, mask=m_w, other=0.0).to(tl.float32)
        b_x = tl.load(
            x_ptr + i_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
            mask=m_m[:, None] & m_k[None, :],
            other=0.0,
        ).to(tl.float32)
        acc_u = tl.sum(b_x[:, None, :] * b_u[None, :, :], axis=2)
        b_h = tl.where(b_act, b_g * acc_u, 0.0).to(OUT_DTYPE)
        c = tl.sum(b_h.to(tl.float32)[:, :, None] * b_d[None, :, :], axis=1)
        tl.atomic_add(acc_ptr + i_m[:, None] * K + o_k[None, :], c, mask=m_x & m_k[None, :], sem="relaxed")
    else:
        acc_u = _tokens_dot_rows(
            x_ptr, wu_ptr, i_m, m_m, o_n, m_rows, M, K, stride_xm, stride_xk,
            BM, BN, BK, USE_DOT, DOT_PREC, SWAP,
        )  # fmt: skip
        b_h = tl.where(b_act, b_g * acc_u, 0.0).to(OUT_DTYPE)
        _atomic_down(
            acc_ptr, wdt_ptr, o_n.to(tl.int64), m_rows, b_h, i_m, m_x, K, 0, K, BKD, USE_DOT, DOT_PREC
        )
    return b_h


@triton.jit
def _chunk_up(
    x_ptr,
    wu_ptr,
    g_ptr,
    idx,
    v_c,
    i_m,
    m_m,
    M,
    K,
    stride_xm,
    stride_xk,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    CHU: tl.constexpr,
    BKC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    STAGES: tl.constexpr = None,
    NACC: tl.constexpr = 1,
):
    # up of CHU units idx (valid where v_c) for the BM token rows as dense tl.dot tiles: g [BM, CHU]
    # from g_ptr (unit-major [N, M], 0 where inactive), u = x @ W_up[idx]^T over K in BKC steps;
    # returns h = g u rounded to the activation dtype (0 where inactive, whatever u is) and the
    # tokens that activate one of the units [BM, 1]
    g_c = tl.load(
        g_ptr + idx[None, :] * M + i_m[:, None],
        mask=m_m[:, None] & v_c[None, :],
        other=0.0,
        cache_modifier=".cg",
    ).to(tl.float32)
    a_c = (g_c != 0.0) | (g_c != g_c)
    m_x = (tl.max(a_c.to(tl.int32), axis=1) > 0)[:, None]
    if NACC == 1:
        o_kc = tl.arange(0, BKC)
        acc_u = tl.zeros((BM, CHU), dtype=tl.float32)
        # STAGES (None: the kernel's num_stages) - 1 K steps are loaded ahead
        for k in tl.range(0, K, BKC, num_stages=STAGES):
            m_k = (k + o_kc) < K
            b_x = tl.load(
                x_ptr + i_m[:, None] * stride_xm + (k + o_kc)[None, :] * stride_xk,
                mask=m_m[:, None] & m_k[None, :],
                other=0.0,
            )
            b_w = tl.load(
                wu_ptr + idx[:, None] * K + (k + o_kc)[None, :], mask=v_c[:, None] & m_k[None, :], other=0.0
            )
            acc_u = tl.dot(b_x, tl.trans(b_w), acc_u, input_precision=DOT_PREC)
    else:
        # each K step as NACC column slices with their own accumulators (one batched tl.dot):
        # NACC independent chains of MMAs instead of one chain of K / 16 dependent ones
        o_j = tl.arange(0, NACC) * (BKC // NACC)
        o_s = tl.arange(0, BKC // NACC)
        acc3 = tl.zeros((NACC, BM, CHU), dtype=tl.float32)
        for k in tl.range(0, K, BKC, num_stages=STAGES):
            c_x = k + o_j[:, None, None] + o_s[None, None, :]  # [NACC, 1, sub]
            b_x = tl.load(
                x_ptr + i_m[None, :, None] * stride_xm + c_x * stride_xk,
                mask=m_m[None, :, None] & (c_x < K),
                other=0.0,
            )
            c_w = k + o_j[:, None, None] + o_s[None, :, None]  # [NACC, sub, 1]
            b_w = tl.load(
                wu_ptr + idx[None, None, :] * K + c_w, mask=v_c[None, None, :] & (c_w < K), other=0.0
            )
            acc3 = tl.dot(b_x, b_w, acc3, input_precision=DOT_PREC)
        acc_u = tl.sum(acc3, axis=0)
    return tl.where(a_c, g_c * acc_u, 0.0).to(OUT_DTYPE), m_x


@triton.jit
def _chunk_up_down(
    x_ptr,
    wu_ptr,
    wdt_ptr,
    acc_ptr,
    g_ptr,
    idx,
    v_c,
    i_m,
    m_m,
    M,
    K,
    k_lo,
    k_hi,
    stride_xm,
    stride_xk,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    CHU: tl.constexpr,
    BKC: tl.constexpr,
    BKD: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ONE_DOWN: tl.constexpr = False,
    UP_NACC: tl.constexpr = 1,
):
    # _chunk_up, then acc[:, k_lo:k_hi] += h @ W_down^T[idx, k_lo:k_hi] by atomic adds into the
    # rows of the tokens that activate one of the units. Returns h [BM, CHU]. ONE_DOWN: when the
    # range is one BKD step (decided at run time), its W_down^T tile is loaded before the up loop,
    # so its round trip overlaps the loop's.
    if ONE_DOWN:
        one = (k_hi - k_lo) <= BKD
        o_kd = k_lo + tl.arange(0, BKD)
        m_kd = o_kd < tl.where(one, k_hi, k_lo)  # nothing loaded for a longer range
        b_d = tl.load(
            wdt_ptr + idx[:, None] * K + o_kd[None, :], mask=v_c[:, None] & m_kd[None, :], other=0.0
        )
    h_c, m_x = _chunk_up(
        x_ptr, wu_ptr, g_ptr, idx, v_c, i_m, m_m, M, K, stride_xm, stride_xk, OUT_DTYPE, BM, CHU, BKC, DOT_PREC,
        None, UP_NACC,
    )  # fmt: skip
    if ONE_DOWN:
        if one:
            c = tl.dot(h_c, b_d, input_precision=DOT_PREC)
            tl.atomic_add(
                acc_ptr + i_m[:, None] * K + o_kd[None, :], c, mask=m_x & m_kd[None, :], sem="relaxed"
            )
        else:
            _atomic_down(acc_ptr, wdt_ptr, idx, v_c, h_c, i_m, m_x, K, k_lo, k_hi, BKD, True, DOT_PREC)
    else:
        _atomic_down(acc_ptr, wdt_ptr, idx, v_c, h_c, i_m, m_x, K, k_lo, k_hi, BKD, True, DOT_PREC)
    return h_c


@triton.jit
def _up_down_atomic_compact(
    x_ptr,
    wu_ptr,
    wdt_ptr,
    acc_ptr,
    g_ptr,
    n_act,
    i_m,
    m_m,
    o_n,
    m_n,
    M,
    K,
    stride_xm,
    stride_xk,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    CHU: tl.constexpr,
    BKC: tl.constexpr,
    BKD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # tl.dot form with the program's active units compacted, CHU at a time, into dense [CHU, step]
    # tiles of W_up and W_down^T instead of [BN, step] tiles with most rows masked (the gate
    # values come back from g_ptr, the unit-major [N, M] scratch the caller wrote). Returns sum
    # |h| per token [BM].
    tl.debug_barrier()  # the program's own gate values are visible to all its threads
    f_u = (n_act > 0) & m_n
    pos, n_units = _ranks(f_u)
    o_c = tl.arange(0, CHU)
    s_l1 = tl.zeros((BM,), dtype=tl.float32)
    for c in range(0, n_units, CHU):
        sel = f_u[None, :] & (pos[None, :] == (c + o_c)[:, None])
        idx = tl.sum(tl.where(sel, o_n[None, :], 0), axis=1).to(tl.int64)
        h_c = _chunk_up_down(
            x_ptr, wu_ptr, wdt_ptr, acc_ptr, g_ptr, idx, (c + o_c) < n_units, i_m, m_m, M, K, 0, K,
            stride_xm, stride_xk, OUT_DTYPE, BM, CHU, BKC, BKD, DOT_PREC,
        )  # fmt: skip
        s_l1 += tl.sum(tl.abs(h_c.to(tl.float32)), axis=1)
    return s_l1


@triton.jit
def _decode_gate_up_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    h_ptr,
    bcnt_ptr,
    bl1_ptr,
    nact_ptr,
    sem_ptr,
    wdt_ptr,
    acc_ptr,
    lst_ptr,
    M,
    N,
    K,
    NB,
    KC,
    stride_xm,
    stride_xk,
    OUT_DTYPE: tl.constexpr,
    BITS_DTYPE: tl.constexpr,
    INF_BITS: tl.constexpr,
    MAG_MASK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BK_UP: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    KC_P2: tl.constexpr,
    SWAP: tl.constexpr,
    H_T: tl.constexpr,
    PDL: tl.constexpr,
    ATOMIC: tl.constexpr,
    ONE_STEP: tl.constexpr,
    BKD_ATOMIC: tl.constexpr,
    COMPACT: tl.constexpr,
    CHU: tl.constexpr,
    BKC: tl.constexpr,
    GATE_ONLY: tl.constexpr = False,
    UNIT_LIST: tl.constexpr = False,
):
    if PDL:
        # the down kernel, launched with programmatic dependent launch, may be scheduled from now
        # on; it waits in-kernel for this grid's completion and memory (gdc_wait)
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if pid == 0:
        # tickets of the down kernel's split reduction start at 0 on every call
        o_s = tl.arange(0, KC_P2)
        tl.store(sem_ptr + o_s, tl.zeros((KC_P2,), dtype=tl.int32), mask=o_s < KC)
    # decode stage 1 for units [pid * BN, (pid + 1) * BN): gate of every token, then W_up rows
    # only of units some token activates; writes h, per-(token, block) statistics and the number
    # of tokens activating each unit (the down stage's list of units to read, and unit_counts)
    i_m = tl.arange(0, BM)
    m_m = i_m < M
    o_n = pid * BN + tl.arange(0, BN)
    m_n = o_n < N
    acc_g = _tokens_dot_rows(
        x_ptr, wg_ptr, i_m, m_m, o_n, m_n, M, K, stride_xm, stride_xk,
        BM, BN, BK, USE_DOT, DOT_PREC, SWAP,
    )  # fmt: skip
    b_g = acc_g.to(OUT_DTYPE).to(tl.float32)
    b_act = _is_active(acc_g, OUT_DTYPE, BITS_DTYPE, INF_BITS, MAG_MASK) & m_m[:, None] & m_n[None, :]
    n_act = tl.sum(b_act.to(tl.int32), axis=0)
    # active units of each token in this block; tokens with none get no atomic adds
    c_tok = tl.sum(b_act.to(tl.int32), axis=1)
    m_x = (m_m & (c_tok > 0))[:, None]
    if GATE_ONLY or (ATOMIC and COMPACT):
        # g unit-major [N, M] in the h scratch, 0 where inactive: read back by _decode_units_kernel
        # (unit form) or by this program's compaction below
        p_g = o_n[None, :] * M + i_m[:, None]
        tl.store(h_ptr + p_g, tl.where(b_act, b_g, 0.0).to(OUT_DTYPE), mask=m_m[:, None] & m_n[None, :])
    if UNIT_LIST:
        # chunk form: this block's active units in order at lst[pid BN ...] and their number at
        # lst[NB BN + pid], from which _decode_chunk_kernel compacts the whole batch's units
        f_u = (n_act > 0) & m_n
        pos, n_units = _ranks(f_u)
        tl.store(lst_ptr + pid * BN + pos, o_n, mask=f_u)
        tl.store(lst_ptr + NB * BN + pid, n_units)
    if GATE_ONLY:
        # unit and chunk forms: a second kernel runs the up/down of the active units over all SMs
        # and adds their l1 sums, which start at 0 here
        l1_tok = tl.zeros((BM,), dtype=tl.float32)
    elif ATOMIC and COMPACT:
        l1_tok = tl.zeros((BM,), dtype=tl.float32)
        if tl.sum(n_act) > 0:
            l1_tok = _up_down_atomic_compact(
                x_ptr, wu_ptr, wdt_ptr, acc_ptr, h_ptr, n_act, i_m, m_m, o_n, m_n, M, K,
                stride_xm, stride_xk, OUT_DTYPE, BM, BN, CHU, BKC, BKD_ATOMIC, DOT_PREC,
            )  # fmt: skip
    elif ATOMIC:
        # this program also runs the down projection of its active units (fp32 atomic adds into
        # acc; the finishing kernel rounds acc into y and zeroes it), so h never reaches memory
        b_h = tl.zeros((BM, BN), dtype=OUT_DTYPE)
        if tl.sum(n_act) > 0:
            b_h = _up_down_atomic(
                x_ptr, wu_ptr, wdt_ptr, acc_ptr, b_g, b_act, i_m, m_m, m_x, o_n, m_n & (n_act > 0), M, K,
                stride_xm, stride_xk, OUT_DTYPE, BM, BN, BK_UP, BKD_ATOMIC, ONE_STEP, USE_DOT, DOT_PREC, SWAP,
            )  # fmt: skip
        l1_tok = tl.sum(tl.abs(b_h.to(tl.float32)), axis=1)
    else:
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        if tl.sum(n_act) > 0:
            # rows of W_up of units no token activates are not read
            acc_u = _tokens_dot_rows(
                x_ptr, wu_ptr, i_m, m_m, o_n, m_n & (n_act > 0), M, K, stride_xm, stride_xk,
                BM, BN, BK_UP, USE_DOT, DOT_PREC, SWAP,
            )  # fmt: skip
        b_h = tl.where(b_act, b_g * acc_u, 0.0).to(OUT_DTYPE)
        # h is [M, N], or [N, M] with H_T (the down stage then gathers each unit's M values from
        # one contiguous row instead of M scattered elements)
        p_h = o_n[None, :] * M + i_m[:, None] if H_T else i_m[:, None] * N + o_n[None, :]
        tl.store(h_ptr + p_h, b_h, mask=m_m[:, None] & m_n[None, :])
        l1_tok = tl.sum(tl.abs(b_h.to(tl.float32)), axis=1)
    tl.store(bcnt_ptr + i_m * NB + pid, c_tok, mask=m_m)
    tl.store(bl1_ptr + i_m * NB + pid, l1_tok, mask=m_m)
    tl.store(nact_ptr + o_n, n_act, mask=m_n)


@triton.jit
def _decode_units_kernel(
    x_ptr,
    wu_ptr,
    wdt_ptr,
    g_ptr,
    acc_ptr,
    bl1_ptr,
    M,
    N,
    K,
    NB,
    stride_xm,
    stride_xk,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    R: tl.constexpr,
    BK: tl.constexpr,
    BN_G: tl.constexpr,
    ONE_STEP: tl.constexpr,
    PDL: tl.constexpr,
):
    # decode stage 2 of the unit form: program p takes units [p R, (p + 1) R) and, for each one
    # some token activates (g unit-major [N, M] from the gate kernel, 0 where inactive): u = x
    # W_up[n]^T over the rows of the tokens that activate it, h = g u rounded to the activation
    # dtype, acc[M, K] += h W_down^T[n] and bl1[m, n // BN_G] += |h| by relaxed atomics. The
    # active units are spread over all the SMs instead of waiting behind each gate program's
    # stream of W_gate; with ONE_STEP (K <= BK) the W_up row, the W_down^T row and the x rows of
    # a unit are loaded together
    _middle_of_chain(PDL)  # the gate kernel has completed and g is visible
    pid = tl.program_id(0)
    o_u = pid * R + tl.arange(0, R)
    m_u = o_u < N
    i_m = tl.arange(0, BM)
    m_m = i_m < M
    # g of the program's R units for every token in one load (R x M contiguous values)
    b_gt = tl.load(
        g_ptr + o_u[:, None] * M + i_m[None, :],
        mask=m_u[:, None] & m_m[None, :],
        other=0.0,
        cache_modifier=".cg",
    ).to(tl.float32)
    a_t = ((b_gt != 0.0) | (b_gt != b_gt)) & m_u[:, None] & m_m[None, :]
    f_u = tl.max(a_t.to(tl.int32), axis=1) > 0
    pos, n_units = _ranks(f_u)
    o_k = tl.arange(0, BK)
    for c in range(0, n_units):
        sel = f_u & (pos == c)
        n = tl.sum(tl.where(sel, o_u, 0), axis=0).to(tl.int64)
        b_g = tl.sum(tl.where(sel[:, None], b_gt, 0.0), axis=0)
        act = tl.max((a_t & sel[:, None]).to(tl.int32), axis=0) > 0
        if ONE_STEP:
            m_k = o_k < K
            m_t = act[:, None] & m_k[None, :]
            b_u = tl.load(wu_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_d = tl.load(wdt_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_x = tl.load(
                x_ptr + i_m[:, None] * stride_xm + o_k[None, :] * stride_xk, mask=m_t, other=0.0
            ).to(tl.float32)
            h = tl.where(act, b_g * tl.sum(b_x * b_u[None, :], axis=1), 0.0).to(OUT_DTYPE).to(tl.float32)
            p_a = acc_ptr + i_m[:, None] * K + o_k[None, :]
            tl.atomic_add(p_a, h[:, None] * b_d[None, :], mask=m_t, sem="relaxed")
        else:
            u = tl.zeros((BM,), dtype=tl.float32)
            for k in range(0, K, BK):
                m_k = (k + o_k) < K
                b_u = tl.load(wu_ptr + n * K + k + o_k, mask=m_k, other=0.0).to(tl.float32)
                b_x = tl.load(
                    x_ptr + i_m[:, None] * stride_xm + (k + o_k)[None, :] * stride_xk,
                    mask=act[:, None] & m_k[None, :],
                    other=0.0,
                ).to(tl.float32)
                u += tl.sum(b_x * b_u[None, :], axis=1)
            h = tl.where(act, b_g * u, 0.0).to(OUT_DTYPE).to(tl.float32)
            for k in range(0, K, BK):
                m_k = (k + o_k) < K
                b_d = tl.load(wdt_ptr + n * K + k + o_k, mask=m_k, other=0.0).to(tl.float32)
                p_a = acc_ptr + i_m[:, None] * K + (k + o_k)[None, :]
                tl.atomic_add(p_a, h[:, None] * b_d[None, :], mask=act[:, None] & m_k[None, :], sem="relaxed")
        tl.atomic_add(bl1_ptr + i_m * NB + n // BN_G, tl.abs(h), mask=act, sem="relaxed")


@triton.jit
def _decode_chunk_kernel(
    x_ptr,
    wu_ptr,
    wdt_ptr,
    g_ptr,
    lst_ptr,
    acc_ptr,
    bl1_ptr,
    hc_ptr,
    ids_ptr,
    M,
    K,
    NB,
    stride_xm,
    stride_xk,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    CHU: tl.constexpr,
    SPLIT: tl.constexpr,
    BN_G: tl.constexpr,
    NB_P2: tl.constexpr,
    BKC: tl.constexpr,
    BKD: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
    STORE_H: tl.constexpr = False,
    UP_NACC: tl.constexpr = 1,
    HS=1,
):
    # decode stage 2 of the chunk form: the batch's active units, compacted in unit order from
    # the gate kernel's per-block lists, are cut into chunks of CHU; each chunk's down projection
    # is split in column ranges (the up projection recomputed per range), at most SPLIT of them
    # and at most as many as keep the (chunk, range) items within the grid's programs, so more
    # active units mean fewer, longer ranges instead of items queueing behind each other. Each
    # item is dense tl.dot tiles (_chunk_up_down): the active units of the whole batch fill them,
    # not only those of one gate program; the items are spread over the programs by a loop (their
    # number is known only here). STORE_H (union form, launched with SPLIT = 1): no down
    # projection here; each chunk's h
    # goes to hc [rank, HS] (unit-major, in the order of the compacted units, HS >= M values a
    # row, 0 past M) and its units to ids [rank], for _decode_union_down_kernel
    _middle_of_chain(PDL)  # the gate kernel has completed: g and the lists are visible
    pid = tl.program_id(0)
    o_b = tl.arange(0, NB_P2)
    c_b = tl.load(lst_ptr + NB * BN_G + o_b, mask=o_b < NB, other=0, cache_modifier=".cg")
    ends = tl.cumsum(c_b, axis=0)
    total = tl.sum(c_b, axis=0)
    i_m = tl.arange(0, BM)
    m_m = i_m < M
    o_c = tl.arange(0, CHU)
    n_ch = tl.cdiv(total, CHU)
    split = tl.minimum(tl.maximum(tl.num_programs(0) // tl.maximum(n_ch, 1), 1), SPLIT)
    k_step = tl.cdiv(tl.cdiv(K, split), BKD) * BKD
    n_rng = tl.cdiv(K, k_step)
    for w in tl.range(pid, n_ch * n_rng, tl.num_programs(0), num_stages=1):
        r = (w // n_rng) * CHU + o_c
        v_c = r < total
        # block of each rank r, and the rank of that block's first unit
        blk = tl.sum((ends[None, :] <= r[:, None]).to(tl.int32), axis=1)
        start = tl.sum(tl.where(o_b[None, :] < blk[:, None], c_b[None, :], 0), axis=1)
        idx = tl.load(lst_ptr + blk * BN_G + r - start, mask=v_c, other=0, cache_modifier=".cg").to(tl.int64)
        s = w % n_rng
        if STORE_H:
            h_c, _ = _chunk_up(
                x_ptr, wu_ptr, g_ptr, idx, v_c, i_m, m_m, M, K, stride_xm, stride_xk, OUT_DTYPE, BM, CHU, BKC,
                DOT_PREC, None, UP_NACC,
            )  # fmt: skip
            tl.store(hc_ptr + r[None, :] * HS + i_m[:, None], h_c, mask=(i_m < HS)[:, None] & v_c[None, :])
            tl.store(ids_ptr + r, idx.to(tl.int32), mask=v_c)
        else:
            h_c = _chunk_up_down(
                x_ptr, wu_ptr, wdt_ptr, acc_ptr, g_ptr, idx, v_c, i_m, m_m, M, K, s * k_step,
                tl.minimum(s * k_step + k_step, K), stride_xm, stride_xk, OUT_DTYPE, BM, CHU, BKC, BKD, DOT_PREC,
                True, UP_NACC,
            )  # fmt: skip
        if s == 0:
            a_h = tl.abs(h_c.to(tl.float32))
            tl.atomic_add(
                bl1_ptr + i_m[:, None] * NB + (idx // BN_G)[None, :], a_h,
                mask=m_m[:, None] & v_c[None, :] & (a_h != 0.0), sem="relaxed",
            )  # fmt: skip


@triton.jit
def _listed_down(
    ids_ptr,
    h_ptr,
    wdt_ptr,
    lo,
    hi,
    i_m,
    m_m,
    o_k,
    m_k,
    M,
    K,
    BY_RANK: tl.constexpr,
    BM: tl.constexpr,
    BKD: tl.constexpr,
    CHD: tl.constexpr,
    STAGES: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # [BM, BKD] fp32: sum over the listed units ids[lo:hi] of h[unit, i_m] W_down^T[unit, o_k],
    # CHD units per tl.dot; h unit-major with M values per row, its row found by the unit's rank
    # in the list (BY_RANK) or by its id
    o_c = tl.arange(0, CHD)
    acc = tl.zeros((BM, BKD), dtype=tl.float32)
    for r0 in tl.range(lo, hi, CHD, num_stages=STAGES):
        r = r0 + o_c
        v = r < hi
        idx = tl.load(ids_ptr + r, mask=v, other=0, cache_modifier=".cg").to(tl.int64)
        row = r if BY_RANK else idx
        b_h = tl.load(
            h_ptr + row[None, :] * M + i_m[:, None],
            mask=m_m[:, None] & v[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        b_d = tl.load(wdt_ptr + idx[:, None] * K + o_k[None, :], mask=v[:, None] & m_k[None, :], other=0.0)
        # [BM, CHD] @ [CHD, BKD] -> [BM, BKD]
        acc = tl.dot(b_h, b_d, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _pairs_down_range(
    ids_ptr, val_ptr, wdt_ptr, lo, hi, i_m, o_k, m_k, K, TOK_BITS: tl.constexpr,
    BM: tl.constexpr, BKD: tl.constexpr, PD: tl.constexpr, STAGES: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # [BM, BKD] fp32: sum over the pairs [lo, hi) of a pair list (ids unit << TOK_BITS | token, and
    # h) of h times the unit's W_down^T row segment o_k, PD pairs per tl.dot: [BM, PD] one-hot rows
    # (each pair's h in its token's row, 0 elsewhere) times [PD, BKD] gathered row segments
    o_p = tl.arange(0, PD)
    acc = tl.zeros((BM, BKD), dtype=tl.float32)
    for c in tl.range(lo, hi, PD, num_stages=STAGES):
        i_p = c + o_p
        v_p = i_p < hi
        ids = tl.load(ids_ptr + i_p, mask=v_p, other=0)
        tok = ids & ((1 << TOK_BITS) - 1)
        unit = (ids >> TOK_BITS).to(tl.int64)
        h = tl.load(val_ptr + i_p, mask=v_p, other=0.0)
        b_h = tl.where(tok[None, :] == i_m[:, None], h[None, :], tl.zeros_like(h)[None, :])
        b_w = tl.load(wdt_ptr + unit[:, None] * K + o_k[None, :], mask=v_p[:, None] & m_k[None, :], other=0.0)
        acc = tl.dot(b_h, b_w, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _decode_union_down_kernel(
    hc_ptr, ids_ptr, lst_ptr, wdt_ptr, acc_ptr, y_ptr, tk_ptr, bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr, sp_ptr,
    M, K, NB, NT, stride_ym,
    BM: tl.constexpr, BN_G: tl.constexpr, NB_P2: tl.constexpr, CHD: tl.constexpr, BKD: tl.constexpr,
    SPLIT: tl.constexpr, STAGES: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr,
    COUNTED: tl.constexpr = False, FIN: tl.constexpr = False, OUT_DTYPE: tl.constexpr = None,
    PAIRS: tl.constexpr = False, TOK_BITS: tl.constexpr = 8,
    S: tl.constexpr = 0, BPT: tl.constexpr = 1, TCH: tl.constexpr = 1, SBM: tl.constexpr = 1, NS: tl.constexpr = 1,
    HS=1, l0h_ptr=None,
):  # fmt: skip
    # decode stage 3 of the union form: y = h W_down^T over the batch's active units (h and the
    # unit of each rank from _decode_chunk_kernel with STORE_H) as a GEMM split over (BKD output
    # columns, one of SPLIT ranges of ranks): each program accumulates its [BM, BKD] tile in
    # registers, CHD ranks per tl.dot, and adds it into acc once (relaxed atomics), instead of one
    # atomic add per chunk and column step in the chunk form. COUNTED (the pair form's units
    # variant): the number of ranks is the one counter at lst_ptr, not the sum of per-block counts.
    # FIN: this kernel also finishes the call, in place of _decode_finish_kernel: the last range
    # of each column block to take its ticket (tk[block], zeroed by the gate kernel) rounds the
    # block of acc into y and zeroes it, and NS more programs reduce the statistics (their
    # ticket tk[column blocks]). PAIRS (with COUNTED): the ranges split the pair form's pair list
    # (ids_ptr: unit << TOK_BITS | token, hc_ptr: h; its length at lst_ptr - 1) instead of the ranks,
    # CHD pairs per one-hot tl.dot. HS (not PAIRS): the row length of h by rank, >= M; its rows
    # are loaded whole (the values past M are 0), so at HS = M rounded up to 16 the loads are
    # vectorized where a mask of i_m < M (M not a multiple of 16) makes them 2-byte loads
    _middle_of_chain(PDL)  # the up kernel has completed: hc and ids are visible
    pid = tl.program_id(0)
    n_kb = tl.cdiv(K, BKD)
    if FIN and pid >= n_kb * SPLIT:
        _stats_program(
            pid - n_kb * SPLIT, bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr, sp_ptr, tk_ptr + n_kb, M, NB, NT,
            S, BPT, TCH, SBM, NS, l0h_ptr,
        )  # fmt: skip
    else:
        kb = pid % n_kb
        sp = pid // n_kb
        if PAIRS:
            total = tl.load(lst_ptr - 1, cache_modifier=".cg")
        elif COUNTED:
            total = tl.load(lst_ptr, cache_modifier=".cg")
        else:
            o_b = tl.arange(0, NB_P2)
            c_b = tl.load(lst_ptr + NB * BN_G + o_b, mask=o_b < NB, other=0, cache_modifier=".cg")
            total = tl.sum(c_b, axis=0)
        per = tl.cdiv(tl.cdiv(total, SPLIT), CHD) * CHD
        lo = sp * per
        hi = tl.minimum(lo + per, total)
        i_m = tl.arange(0, BM)
        m_m = i_m < M
        o_k = kb * BKD + tl.arange(0, BKD)
        m_k = o_k < K
        m_out = m_m[:, None] & m_k[None, :]
        p_acc = acc_ptr + i_m[:, None] * K + o_k[None, :]
        if lo < hi:
            if PAIRS:
                acc = _pairs_down_range(
                    ids_ptr, hc_ptr, wdt_ptr, lo, hi, i_m, o_k, m_k, K, TOK_BITS, BM, BKD, CHD, STAGES, DOT_PREC
                )  # fmt: skip
            else:
                acc = _listed_down(
                    ids_ptr, hc_ptr, wdt_ptr, lo, hi, i_m, i_m < HS, o_k, m_k, HS, K, True, BM, BKD, CHD, STAGES,
                    DOT_PREC,
                )  # fmt: skip
            tl.atomic_add(p_acc, acc, mask=m_out, sem="relaxed")
        if FIN:
            # every thread's adds are done before the ticket (its release orders them for the
            # program that takes the last one)
            tl.debug_barrier()
            ticket = tl.atomic_add(tk_ptr + kb, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT - 1:
                v = tl.load(p_acc, mask=m_out, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + i_m[:, None] * stride_ym + o_k[None, :], v.to(OUT_DTYPE), mask=m_out)
                tl.debug_barrier()  # (see _decode_finish_kernel: every thread's load before any zeroing)
                tl.store(p_acc, tl.zeros((BM, BKD), dtype=tl.float32), mask=m_out)
    if COUNTED:
        # the units variant's counters (pairs and units at cnt[0] / cnt[1], the count of this
        # kernel's rank list at lst_ptr = cnt + 1): the last program out zeroes them and cnt[2]
        _leave_grid(lst_ptr - 1, 2)


@triton.jit
def _stats_rows(
    bcnt_ptr,
    bl1_ptr,
    r0,
    M,
    NB,
    NT,
    S: tl.constexpr,
    BPT: tl.constexpr,
    TCH: tl.constexpr,
    SBM: tl.constexpr,
):
    # sums over the tokens [r0, r0 + SBM) of the per-(token, unit block) statistics: active units
    # (int64), sum |h|, tokens with a tile of more than S active units; TCH tiles per step (a loop
    # over tokens was a chain of dependent loads: ~0.6 us per token on the H100)
    o_t = tl.arange(0, TCH)
    o_b = tl.arange(0, BPT)
    a_cnt = tl.zeros((SBM,), dtype=tl.int32)
    a_l1 = tl.zeros((SBM,), dtype=tl.float32)
    a_over = tl.zeros((SBM,), dtype=tl.int32)
    i_r = r0 + tl.arange(0, SBM)
    m_r = i_r < M
    for t0 in range(0, NT, TCH):
        i_b = (t0 + o_t)[:, None] * BPT + o_b[None, :]
        p_b = i_r[:, None, None] * NB + i_b[None, :, :]
        m_b = m_r[:, None, None] & (i_b < NB)[None, :, :]
        # [SBM, TCH, BPT] per-block counts -> per-tile counts [SBM, TCH]
        c_t = tl.sum(tl.load(bcnt_ptr + p_b, mask=m_b, other=0, cache_modifier=".cg"), axis=2)
        a_over = tl.maximum(a_over, tl.max((c_t > S).to(tl.int32), axis=1))
        a_cnt += tl.sum(c_t, axis=1)
        a_l1 += tl.sum(
            tl.sum(tl.load(bl1_ptr + p_b, mask=m_b, other=0.0, cache_modifier=".cg"), axis=2), axis=1
        )
    return tl.sum(a_cnt.to(tl.int64)), tl.sum(a_l1), tl.sum(a_over)


@triton.jit
def _store_stats(l0_ptr, l1_ptr, over_ptr, cnt, l1, over, M, l0h_ptr=None):
    # l0 and l1 as means over the M tokens, overflowing rows as a count; l0 also into the
    # dispatcher's pinned host slot l0h (a plain store over the bus: no copy queued on the stream)
    denom = tl.maximum(M, 1).to(tl.float32)
    l0 = cnt.to(tl.float32) / denom
    tl.store(l0_ptr, l0)
    if l0h_ptr is not None:
        tl.store(l0h_ptr, l0)
    tl.store(l1_ptr, l1 / denom)
    tl.store(over_ptr, over.to(tl.int64))


@triton.jit
def _decode_stats(
    bcnt_ptr,
    bl1_ptr,
    l0_ptr,
    l1_ptr,
    over_ptr,
    M,
    NB,
    NT,
    S: tl.constexpr,
    BPT: tl.constexpr,
    TCH: tl.constexpr,
    SBM: tl.constexpr,
    l0h_ptr=None,
):
    # l0, l1 and overflowing rows of all M tokens (SBM >= M) in one program
    cnt, l1, over = _stats_rows(bcnt_ptr, bl1_ptr, 0, M, NB, NT, S, BPT, TCH, SBM)
    _store_stats(l0_ptr, l1_ptr, over_ptr, cnt, l1, over, M, l0h_ptr)


@triton.jit
def _stats_program(
    j, bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr, sp_ptr, sem_ptr, M, NB, NT,
    S: tl.constexpr, BPT: tl.constexpr, TCH: tl.constexpr, SBM: tl.constexpr, NS: tl.constexpr,
    l0h_ptr=None,
):  # fmt: skip
    # statistics program j of NS (SBM tokens each): with NS > 1 each stores its sums into
    # sp [3, NS] and the last one to take the ticket at sem (zero before) adds them in order
    if NS == 1:
        _decode_stats(bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr, M, NB, NT, S, BPT, TCH, SBM, l0h_ptr)
    else:
        cnt, l1, over = _stats_rows(bcnt_ptr, bl1_ptr, j * SBM, M, NB, NT, S, BPT, TCH, SBM)
        # a chunk's count fits int32: SBM x N < 2^31 (N <= MAX_COLUMNS)
        tl.store(sp_ptr + j, cnt.to(tl.int32))
        tl.store(sp_ptr + NS + j, l1.to(tl.int32, bitcast=True))
        tl.store(sp_ptr + 2 * NS + j, over)
        tl.debug_barrier()
        ticket = tl.atomic_add(sem_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == NS - 1:
            o_s = tl.arange(0, NS)
            c_s = tl.load(sp_ptr + o_s, cache_modifier=".cg")
            l_s = tl.load(sp_ptr + NS + o_s, cache_modifier=".cg").to(tl.float32, bitcast=True)
            v_s = tl.load(sp_ptr + 2 * NS + o_s, cache_modifier=".cg")
            _store_stats(
                l0_ptr, l1_ptr, over_ptr, tl.sum(c_s.to(tl.int64)), tl.sum(l_s), tl.sum(v_s), M, l0h_ptr
            )  # fmt: skip


@triton.jit
def _down_range(
    h_ptr,
    wdt_ptr,
    nact_ptr,
    n_lo,
    n_hi,
    o_k,
    m_k,
    i_m,
    m_m,
    M,
    N,
    K,
    BM: tl.constexpr,
    BKD: tl.constexpr,
    CH: tl.constexpr,
    SUB: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    H_T: tl.constexpr,
):
    # sum over the units n in [n_lo, n_hi) that some token activates of h[:, n] W_down^T[n, o_k]
    # -> [BM, BKD] fp32
    o_r = tl.arange(0, SUB)
    o_c = tl.arange(0, CH)
    acc = tl.zeros((BM, BKD), dtype=tl.float32)
    for r0 in range(n_lo, n_hi, SUB):
        # the units of this sub-range that some token activates, compacted in column order
        o_u = r0 + o_r
        m_u = o_u < n_hi
        f_u = (tl.load(nact_ptr + o_u, mask=m_u, other=0, cache_modifier=".cg") > 0) & m_u
        pos, n_act = _ranks(f_u)
        for c in range(0, n_act, CH):
            # CH units per step: their W_down^T row segments [CH, BKD] are gathered in one
            # load (the earlier walk read one W_down column per active unit, a chain of
            # dependent loads, each touching a 32-byte sector per K row for 2 useful bytes)
            sel = f_u[None, :] & (pos[None, :] == (c + o_c)[:, None])
            idx = tl.sum(tl.where(sel, o_u[None, :], 0), axis=1)
            v_c = (c + o_c) < n_act
            b_w = tl.load(
                wdt_ptr + idx[:, None].to(tl.int64) * K + o_k[None, :],
                mask=v_c[:, None] & m_k[None, :],
                other=0.0,
            )
            b_h = tl.load(
                h_ptr + (idx[None, :] * M + i_m[:, None] if H_T else i_m[:, None] * N + idx[None, :]),
                mask=m_m[:, None] & v_c[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            if USE_DOT:
                # [BM, CH] @ [CH, BKD] -> [BM, BKD]
                acc = tl.dot(b_h, b_w, acc, input_precision=DOT_PREC)
            else:
                acc += tl.sum(b_h.to(tl.float32)[:, :, None] * b_w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _sum_partials(
    part_ptr,
    y_ptr,
    i_m,
    o_k,
    m_out,
    M,
    K,
    stride_ym,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    BKD: tl.constexpr,
    NSPLIT: tl.constexpr,
):
    # y[:, o_k] = the NSPLIT fp32 partial slabs [M, K] summed in a fixed order (deterministic),
    # unrolled so the loads are in flight together (a rolled loop was a chain of round trips)
    tot = tl.zeros((BM, BKD), dtype=tl.float32)
    p = part_ptr + i_m[:, None] * K + o_k[None, :]
    for s in tl.static_range(NSPLIT):
        tot += tl.load(p + s * M * K, mask=m_out, other=0.0, cache_modifier=".cg")
    tl.store(y_ptr + i_m[:, None] * stride_ym + o_k[None, :], tot.to(OUT_DTYPE), mask=m_out)


@triton.jit
def _decode_down_kernel(
    h_ptr,
    wdt_ptr,
    nact_ptr,
    y_ptr,
    part_ptr,
    sem_ptr,
    bcnt_ptr,
    bl1_ptr,
    l0_ptr,
    l1_ptr,
    over_ptr,
    M,
    N,
    K,
    NB,
    NT,
    KC,
    NPS,
    stride_ym,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    BKD: tl.constexpr,
    CH: tl.constexpr,
    NSPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    S: tl.constexpr,
    BPT: tl.constexpr,
    TCH: tl.constexpr,
    SBM: tl.constexpr,
    SUB: tl.constexpr,
    H_T: tl.constexpr,
    PDL: tl.constexpr,
    l0h_ptr=None,
):
    if PDL:
        tl.extra.cuda.gdc_wait()  # the gate + up grid has completed and its writes are visible
    pid = tl.program_id(0)
    if pid == KC * NSPLIT:
        _decode_stats(bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr, M, NB, NT, S, BPT, TCH, SBM, l0h_ptr)
    else:
        i_m = tl.arange(0, BM)
        m_m = i_m < M
        i_kc = pid // NSPLIT
        i_s = pid % NSPLIT
        o_k = i_kc * BKD + tl.arange(0, BKD)
        m_k = o_k < K
        n_hi = tl.minimum(N, (i_s + 1) * NPS)
        acc = _down_range(
            h_ptr, wdt_ptr, nact_ptr, i_s * NPS, n_hi, o_k, m_k, i_m, m_m, M, N, K, BM, BKD, CH, SUB, USE_DOT, DOT_PREC,
            H_T,
        )  # fmt: skip
        m_out = m_m[:, None] & m_k[None, :]
        if NSPLIT == 1:
            tl.store(y_ptr + i_m[:, None] * stride_ym + o_k[None, :], acc.to(OUT_DTYPE), mask=m_out)
        else:
            tl.store(part_ptr + (i_s * M + i_m[:, None]) * K + o_k[None, :], acc, mask=m_out)
            tl.debug_barrier()
            ticket = tl.atomic_add(sem_ptr + i_kc, 1, sem="acq_rel", scope="gpu")
            if ticket == NSPLIT - 1:
                # last split of this K block: sum the partials
                _sum_partials(part_ptr, y_ptr, i_m, o_k, m_out, M, K, stride_ym, OUT_DTYPE, BM, BKD, NSPLIT)


@triton.jit
def _decode_finish_kernel(
    acc_ptr,
    y_ptr,
    bcnt_ptr,
    bl1_ptr,
    l0_ptr,
    l1_ptr,
    over_ptr,
    sp_ptr,
    sem_ptr,
    M,
    K,
    NB,
    NT,
    stride_ym,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    BKF: tl.constexpr,
    S: tl.constexpr,
    BPT: tl.constexpr,
    TCH: tl.constexpr,
    SBM: tl.constexpr,
    NS: tl.constexpr,
    PDL: tl.constexpr,
    l0h_ptr=None,
):
    # decode stage 2 of the atomic form: y = acc rounded to the activation dtype, acc zeroed for
    # the next call (one program per BKF columns), and NS programs for the statistics, SBM tokens
    # each; with NS > 1 each stores its sums into sp [3, NS] and the last one to take a ticket
    # (sem[0], zeroed by the gate + up kernel) adds them in order. One program for 64 tokens took
    # 9.1 us on the H100 (paper shape), 2.2 us for 8 tokens
    if PDL:
        tl.extra.cuda.gdc_wait()  # the gate + up grid has completed and its atomics are visible
    pid = tl.program_id(0)
    n_kb = tl.cdiv(K, BKF)
    if pid >= n_kb:
        _stats_program(
            pid - n_kb, bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr, sp_ptr, sem_ptr, M, NB, NT, S, BPT, TCH, SBM, NS,
            l0h_ptr,
        )  # fmt: skip
    else:
        i_m = tl.arange(0, BM)
        o_k = pid * BKF + tl.arange(0, BKF)
        m = (i_m < M)[:, None] & (o_k < K)[None, :]
        p = i_m[:, None] * K + o_k[None, :]
        v = tl.load(acc_ptr + p, mask=m, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + i_m[:, None] * stride_ym + o_k[None, :], v.to(OUT_DTYPE), mask=m)
        # Triton gives the load and the zeroing store their own register layouts (8 fp32 per
        # thread for the load, which feeds a bf16 store, 4 for the fp32 store), so an element
        # is zeroed by another thread, often of another warp, than the one loading it. Without
        # this barrier a warp could zero a block before another warp read it: on the H100
        # (Llama-3-8B shape, M = 8, tl.dot atomic form) whole 128-column blocks of a token row
        # came out 0 in 1-8 calls of 250, with the accumulator right before this kernel
        tl.debug_barrier()
        tl.store(acc_ptr + p, tl.zeros((BM, BKF), dtype=tl.float32), mask=m)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _p2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _h_rows(M: int, rows: int, pad: bool) -> int:
    """Values per unit-major h row of a decode form: M, or with ``pad`` M rounded up to 16 (zero past
    M; rows loaded whole are then 16-byte copies, where a mask of i_m < M with M not a multiple of
    16 makes 2-byte loads), at most ``rows``, the token rows of the kernel that writes them whole."""
    return min(_cdiv(M, 16) * 16, rows) if pad else M


@dataclass
class _CachedT:
    ref: weakref.ref
    version: int
    value: torch.Tensor


_DOWN_T: dict[int, _CachedT] = {}


def down_t(w_down: torch.Tensor) -> torch.Tensor:
    """``W_down^T [N, K]`` contiguous, for the prefill kernel's row reads.

    If ``w_down`` is already a transposed view of a contiguous ``[N, K]`` tensor it is used as is;
    otherwise a transposed copy is made once and cached per weight tensor (dropped with it, and
    remade when the weight changes in place). Cost: one extra copy of W_down in memory.
    """
    wt = w_down.t()
    if wt.is_contiguous():
        return wt
    key = id(w_down)
    hit = _DOWN_T.get(key)
    if hit is not None and hit.ref() is w_down and hit.version == w_down._version:
        return hit.value
    value = wt.contiguous()
    _DOWN_T[key] = _CachedT(
        weakref.ref(w_down, lambda _r, k=key: _DOWN_T.pop(k, None)), w_down._version, value
    )
    return value


def _stats_bufs(device):
    # three allocations, not views of one: outputs of the custom op may not alias each other
    l0 = _alloc.empty((), dtype=torch.float32, device=device)
    l1 = _alloc.empty((), dtype=torch.float32, device=device)
    over = _alloc.empty((), dtype=torch.int64, device=device)
    return l0, l1, over


def _finalize(tok, M, device):
    l0, l1, over = _stats_bufs(device)
    # 4096 rows per step: 32 dependent steps at M = 131072 (1024 per step cost 35 us at M = 16384)
    _finalize_stats_kernel[(1,)](tok, M, l0, l1, over, BLOCK=4096, num_warps=8)
    return l0, l1, over


def _launch_updown(x, counts, values, columns, w_gate, w_up, wdt, y, tok, tile, slots):
    """Prefill stage 2 over the rows of ``x`` (and the same rows of the packed arrays, y and tok)."""
    M, K = x.shape
    out_dt, bits_dt, inf_bits, mag, _ = _dtype_consts(x.dtype)
    bk = _p2(K)
    # 16 x-elements per thread: K = 2048 -> 4 warps (the shape measured at 1.14-1.19 ns per pair)
    for part in (1, 2) if get_config("infer").prefill_two_passes else (0,):
        _updown_kernel[(M,)](
            x, counts, values, columns, w_gate, w_up, wdt, y, tok,
            w_gate.shape[0], K, counts.shape[1], x.stride(0), x.stride(1), y.stride(0),
            OUT_DTYPE=out_dt, BITS_DTYPE=bits_dt, INF_BITS=inf_bits, MAG_MASK=mag,
            T=tile, S=slots, BK=bk, PART=part, num_warps=max(1, min(16, bk // 512)),
        )  # fmt: skip


def _prefill_rows(x, w_gate, w_up, w_down, tile, slots, unit_counts):
    """Prefill on the training forward's kernels, in chunks of ``prefill_rows_chunk`` tokens;
    the chunks' statistics are combined on the device."""
    M, K = x.shape
    x = x.contiguous()
    wdt = down_t(w_down)
    step = max(1, get_config("infer").prefill_rows_chunk)
    if M <= step:
        return rows_forward(x, w_gate, w_up, wdt, tile=tile, slots=slots, unit_counts=unit_counts)
    y = _alloc.empty((M, K), dtype=x.dtype, device=x.device)
    parts = []
    for m0 in range(0, M, step):
        m1 = min(M, m0 + step)
        _, l0, l1, over, uc = rows_forward(
            x[m0:m1], w_gate, w_up, wdt, tile=tile, slots=slots, unit_counts=unit_counts, out=y[m0:m1]
        )
        parts.append((m1 - m0, l0, l1, over, uc))
    l0 = sum(n * v for n, v, *_ in parts) / M
    l1 = sum(n * v for n, _, v, *_ in parts) / M
    over = sum(p[3] for p in parts)
    uc = sum(p[4] for p in parts) if unit_counts else None
    return y, l0, l1, over, uc


def _prefill(x, w_gate, w_up, w_down, tile, slots, unit_counts):
    if get_config("infer").prefill_rows:
        return _prefill_rows(x, w_gate, w_up, w_down, tile, slots, unit_counts)
    M, K = x.shape
    N = w_gate.shape[0]
    NT = _cdiv(N, tile)
    dev = x.device
    counts = _alloc.empty((M, NT), dtype=torch.int32, device=dev)
    values = _alloc.empty((M, NT, slots), dtype=x.dtype, device=dev)
    columns = _alloc.empty((M, NT, slots), dtype=torch.int16, device=dev)
    ucounts = torch.zeros(N, dtype=torch.int32, device=dev) if unit_counts else None
    launch_gate_pack(x, w_gate, tile, slots, counts, values, columns, ucounts)
    y = _alloc.empty((M, K), dtype=x.dtype, device=dev)
    tok = _alloc.empty((M, 4), dtype=torch.float32, device=dev)
    _launch_updown(x, counts, values, columns, w_gate, w_up, down_t(w_down), y, tok, tile, slots)
    l0, l1, over = _finalize(tok, M, dev)
    return y, l0, l1, over, ucounts


def atomics_allowed(capturing: bool) -> bool:
    """Whether the atomic decode forms may run: not in deterministic mode, where the split down
    kernel sums its partials in a fixed order, and not while a CUDA graph is captured (their fresh
    accumulator would need a zero fill in the graph on every replay)."""
    return not capturing and not torch.are_deterministic_algorithms_enabled()


def _nacc(n: int, bk: int) -> int:
    # accumulators of an up loop: a power of 2 (at most n), each K slice at least 16 columns
    return max(1, min(1 << (max(1, n).bit_length() - 1), bk // 16))


def _decode_plan(
    M: int,
    K: int,
    N: int,
    cfg,
    capturing: bool = False,
    elsize: int = 2,
    active: float | None = None,
    programs: int = 132,
) -> dict:
    """Block sizes of the two decode kernels for M tokens (see :class:`InferConfig`); ``elsize``:
    bytes per element of x and the weights; ``active``: the measured active units per token (None
    before any measurement); ``programs``: the chunk kernel's grid (one program per SM by default)."""
    # gate + up: tensor cores (tl.dot, M padded to 16) above decode_gemv_max_m, CUDA cores at or
    # below it; down: CUDA cores at M = 1 only
    use_dot = M > cfg.decode_gemv_max_m
    down_dot = M > 1
    bm = max(16, _p2(M)) if use_dot else _p2(M)
    bn_gemv = cfg.decode_bn_gemv or (2 if M == 1 and K > 2048 else 4)
    bn = min(cfg.decode_bn_dot if use_dot else bn_gemv, 256)
    if use_dot:
        bk = max(16, min(cfg.decode_bk, _p2(K), cfg.decode_tile_elems // bm))
        bk_up = max(16, min(cfg.decode_bk_up or cfg.decode_bk, _p2(K), 16384 // bm))
    else:
        # the whole K row in one load (a K loop without tl.dot is not pipelined, and each step
        # costs a memory round trip)
        bk = bk_up = min(_p2(K), 4096)
    sub = max(16, min(cfg.decode_down_sub, _p2(N)))
    bkd = cfg.decode_down_bk if down_dot else _p2(_cdiv(K, max(1, cfg.decode_down_kc_gemv)))
    bkd = max(16, min(bkd, _p2(K)))
    # units per down program: a whole number of sub-ranges, enough of them that the fp32
    # partials (one [M, K] slab per split) stay under cfg.decode_partial_mib
    max_split = max(1, (cfg.decode_partial_mib << 20) // max(1, 4 * M * K))
    nps = _cdiv(_cdiv(N, max_split), sub) * sub
    # the gate + up programs also run the down projection (fp32 atomics; see atomics_allowed)
    # unit form (tl.dot gate, small M): the up/down of the active units in a second kernel
    units_range = use_dot and M <= cfg.decode_units_max_m
    in_range = M >= cfg.decode_atomic_dot_min_m > 0 if use_dot else M <= cfg.decode_atomic_max_m
    free = atomics_allowed(capturing)
    # chunk form: the batch's active units compacted into dense tl.dot tiles in a second kernel
    chunk_top = cfg.decode_chunk_long_max_m if K >= cfg.decode_chunk_long_k else cfg.decode_chunk_max_m
    chu, bm_chunk = _p2(max(16, cfg.decode_chunk_units)), max(16, _p2(M))
    if K >= cfg.decode_chunk_long_k and active is not None and chunk_top < M <= cfg.decode_chunk_wide_max_m:
        # wider batches while the expected union of active units fills at most one chunk per program
        expected = N * (1.0 - (1.0 - min(1.0, active / max(N, 1))) ** M)
        if expected <= chu * programs:
            chunk_top = M
    chunk_range = use_dot and cfg.decode_chunk_min_m <= M <= chunk_top
    # union form: the chunk form's up, then the down projection as one split GEMM over the batch's
    # active units (no atomic add per chunk)
    union_range = (
        use_dot
        and free
        and not chunk_range
        and K >= cfg.decode_union_min_k
        and cfg.decode_union_min_m <= M <= cfg.decode_union_max_m
    )
    # barrier form (twell.ops.decode_barrier, one launch) in place of the compact tl.dot atomic
    # and split forms, and of the union form to decode_barrier_union_max_m; not of the unit or
    # chunk forms
    b_top = cfg.decode_barrier_max_m
    if b_top > 0 and union_range:
        b_top = max(b_top, cfg.decode_barrier_union_max_m)
    barrier = (
        free
        and use_dot
        and not (units_range and free)
        and not (chunk_range and free)
        and cfg.decode_barrier_min_m <= M <= b_top
        and _cdiv(N, bn) <= programs  # every program resident at once
    )
    # pair form (twell.ops.decode_pairs): _decode runs it in place of every other form in its
    # range (the other flags still say what would run without it)
    pairs = (
        free
        and use_dot
        and K >= cfg.decode_pairs_min_k
        and max(cfg.decode_pairs_min_m, 0 if K >= cfg.decode_chunk_long_k else cfg.decode_pairs_short_min_m)
        <= M
        <= min(256, cfg.decode_pairs_max_m)
    )
    # the pair form's units variant (twell.ops.decode_pairs): pair gate and up, the union form's
    # down GEMM and finishing kernel; in place of every other form in its range
    pairs_units = (
        free
        and use_dot
        and cfg.decode_pairs_min_k <= K < cfg.decode_chunk_long_k
        and 0 < cfg.decode_pairs_units_min_m <= M <= min(256, cfg.decode_pairs_units_max_m)
    )
    pairs = pairs or pairs_units
    union = union_range and not barrier
    chunk = (chunk_range and free) or union
    # the union form below decode_chunk_long_k: its own down tiles, and its gate-only kernel's K
    # step and stages (no up loop there whose tiles would share the shared memory)
    short_union = union and K < cfg.decode_chunk_long_k
    if short_union:
        bk = max(16, min(cfg.decode_union_short_gate_bk, _p2(K), cfg.decode_tile_elems // bm))
    k_tile, stages = (
        (bk, cfg.decode_union_short_gate_stages) if short_union else (max(bk, bk_up), cfg.decode_stages)
    )
    if barrier and not pairs:
        # the barrier form's gate loop: its own K step and stages (its up loop has its own tiles)
        bk = max(16, min(cfg.decode_barrier_gate_bk or bk, _p2(K), cfg.decode_tile_elems // bm))
        k_tile, stages = bk, cfg.decode_barrier_gate_stages or stages
    units = units_range and free and not chunk
    atomic = (in_range or units_range or chunk_range or union) and free and not barrier
    bk_chunk = max(16, min(_p2(K), (cfg.decode_union_up_bk if union else cfg.decode_chunk_bk) or _p2(K) // 8))
    if atomic and not use_dot:
        # W_up and W_down^T rows of a program's active units in one load each (the whole K row,
        # up to 4096 columns or decode_bk_up)
        bk_up = max(16, min(_p2(K), cfg.decode_bk_up or 4096))
    return {
        "pairs": pairs,
        "pairs_units": pairs_units,
        "barrier": barrier,
        "use_dot": use_dot,
        "warps": (cfg.decode_warps_m64 if bm >= 64 else cfg.decode_warps)
        if use_dot
        else cfg.decode_gemv_warps or (2 if K <= 1024 else 4),
        # pipeline stages of the tl.dot loops: as many as decode_stages (or the short-K union
        # form's) that keep the [BN + BM, K step] tiles within 192 KiB of shared memory (4 at
        # M <= 32 in bf16, fewer for larger M or fp32)
        "stages": max(1, min(stages, (192 << 10) // ((bn + bm) * k_tile * elsize))),
        "atomic": atomic,
        "one_step": atomic and not use_dot and bk_up >= K,
        "bkd_atomic": max(16, min(_p2(K), cfg.decode_atomic_bk if use_dot else bk_up)),
        "compact": atomic
        and use_dot
        and not units
        and not chunk
        and cfg.decode_atomic_compact
        and M <= cfg.decode_atomic_compact_max_m,
        "units": units,
        "chunk": chunk,
        "union": union,
        # the union down GEMM's (columns per program, column blocks, ranges of units, units per
        # tl.dot), as _launch_union_down runs it (the union form and the pair form's units variant)
        "union_down": _union_blocks(M, K, cfg, programs),
        "bm_chunk": bm_chunk,
        "chu_chunk": chu,
        "programs_chunk": programs,
        "bk_chunk": bk_chunk,
        # the union form's chunk kernel runs each chunk's up once (no down column ranges)
        "split_chunk": 1 if union else cfg.decode_chunk_split or max(1, 64 // _p2(M)),
        "bkd_chunk": max(16, min(_p2(K), cfg.decode_atomic_bk)),
        # as many stages as keep the [BM + chunk, K step] tiles within 192 KiB of shared memory
        "stages_chunk": max(
            1,
            min(
                cfg.decode_chunk_long_stages if K >= cfg.decode_chunk_long_k else cfg.decode_chunk_stages,
                (192 << 10) // ((bm_chunk + chu) * bk_chunk * elsize),
            ),
        ),
        # Triton 3.6 fails to compile the chunk kernel for 64 token rows with 4 warps (sm_90:
        # "operand does not dominate this use" in TritonGPURemoveLayoutConversions); 8 compile
        "warps_chunk": cfg.decode_chunk_warps if M <= 32 else max(8, cfg.decode_chunk_warps),
        # independent accumulators of the chunk kernel's up loop (decode_chunk_up_nacc_max_m)
        "nacc_chunk": _nacc(
            cfg.decode_chunk_up_nacc if bm_chunk <= cfg.decode_chunk_up_nacc_max_m else 1, bk_chunk
        ),
        # unit form: x rows [BM, BK] and a W_down^T segment per step; the whole K row at K <= BK
        "bk_units": max(16, min(_p2(K), cfg.decode_units_bk or 16384 // _p2(M))),
        "bkc": max(16, min(_p2(K), cfg.decode_atomic_bkc)),
        "swap": use_dot and cfg.decode_dot_swap,
        # h unit-major between the stages (both kernels must agree); the same layout at M = 1
        "h_t": M > 1 and cfg.decode_h_t,
        "down_dot": down_dot,
        "bm": bm,
        "bm_down": max(16, _p2(M)) if down_dot else _p2(M),
        "bn": bn,
        "bk": bk,
        "bk_up": bk_up,
        "bkd": bkd,
        "kc": _cdiv(K, bkd),
        "sub": sub,
        "nps": nps,
        "nsplit": _cdiv(N, nps),
    }


#: bits of a pair id (the pair form's lists: unit << _PAIR_TOK_BITS | token) that hold the token
#: (M <= 256)
_PAIR_TOK_BITS = 8

#: decode scratch kept between eager calls, per (device, stream, shape): see _decode_scratch
_SCRATCH: dict[tuple, tuple] = {}


def _stream_key(dev: torch.device, per_thread: bool = False) -> tuple:
    """(device, current stream of ``dev``), with the calling thread first if ``per_thread``: the
    key of scratch that calls may reuse while their launches run in stream order (scratch used by
    several kernels of one call is keyed by thread too: two threads' launches on one stream
    interleave)."""
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    return (threading.get_ident(), dev, stream) if per_thread else (dev, stream)


def _decode_scratch(
    M: int,
    N: int,
    NB: int,
    BN: int,
    KC: int,
    nsplit: int,
    K: int,
    dtype,
    dev,
    reuse: bool,
    atomic: bool,
    union: bool = False,
    h_rows: int = 0,
):
    """Scratch of the two decode kernels: h (max(M, h_rows) x N values, in the layout the plan picks),
    per-(token, unit block) counts and l1, per-unit counts, the K-block tickets and the fp32
    partials of the split down projection (or None); with ``atomic``, the partials' place holds
    the fp32 [M, K] accumulator of the atomic form, zero between calls (the finishing kernel
    zeroes it after reading); the statistics sums of the finishing kernel's programs; the lists of
    active units per block of BN units and their lengths (chunk form); with ``union``, h of the
    batch's active units by rank [N, max(M, h_rows)] and the unit of each rank [N] (union form), else
    None twice.

    Every element is written by the kernels before it is read, so eager calls reuse one set per
    (thread, device, stream, shape): one thread's calls on one stream run in order, and reuse saves
    six allocations (host time) per call. Two threads on one stream get separate sets (their
    launches interleave). Fresh buffers with ``reuse=False`` (the caller passes it while a CUDA
    graph is captured: the graph keeps them) and while tests poison allocations (so a missed
    write still shows).
    """
    key = None
    if reuse and not _alloc.poisoning():
        key = _stream_key(dev, per_thread=True) + (dtype, M, N, NB, BN, KC, nsplit, K, atomic, union, h_rows)
        hit = _SCRATCH.get(key)
        if hit is not None:
            return hit
    bufs = (
        _alloc.empty((max(M, h_rows), N), dtype=dtype, device=dev),
        _alloc.empty((M, NB), dtype=torch.int32, device=dev),
        _alloc.empty((M, NB), dtype=torch.float32, device=dev),
        _alloc.empty((N,), dtype=torch.int32, device=dev),
        _alloc.empty((KC,), dtype=torch.int32, device=dev),
        torch.zeros((M, K), dtype=torch.float32, device=dev)
        if atomic
        else _alloc.empty((nsplit, M, K), dtype=torch.float32, device=dev)
        if nsplit > 1
        else None,
        # per-program statistics sums of the atomic form's second kernel (at most 3 x M)
        _alloc.empty((3 * max(1, M),), dtype=torch.int32, device=dev) if atomic else None,
        _alloc.empty((NB * (BN + 1),), dtype=torch.int32, device=dev),
        _alloc.empty((N, max(M, h_rows)), dtype=dtype, device=dev) if union else None,
        _alloc.empty((N,), dtype=torch.int32, device=dev) if union else None,
    )
    if key is not None:
        if len(_SCRATCH) >= 16:  # at most 16 sets (a few MiB each at most): the oldest goes
            _SCRATCH.pop(next(iter(_SCRATCH)), None)
        _SCRATCH[key] = bufs
    return bufs


def _stats_tch(NT: int, bpt: int, M: int) -> int:
    # tiles per step of the statistics reduction: [M, TCH, bpt] block counts loaded at once
    return max(1, min(_p2(NT), 8192 // (bpt * _p2(M))))


def _decode(x, w_gate, w_up, w_down, tile, slots, unit_counts, capturing=False, active=None, l0h=None):
    cfg = get_config("infer")
    M, K = x.shape
    N = w_gate.shape[0]
    NT = _cdiv(N, tile)
    dev = x.device
    out_dt, bits_dt, inf_bits, mag, _ = _dtype_consts(x.dtype)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    progs = cfg.decode_chunk_programs or num_sms(dev)
    p = _decode_plan(
        M, K, N, cfg, capturing=capturing, elsize=x.element_size(), active=active, programs=progs
    )
    bn = min(p["bn"], tile)
    NB = _cdiv(N, bn)
    KC, nsplit = p["kc"], p["nsplit"]
    if p["union"]:
        # the union down's tickets (one per column block, one for the statistics) start at zero
        KC = max(KC, p["union_down"][1] + 1)
    if p["pairs"]:
        from .decode_pairs import down_blocks, launch_decode_pairs, pair_ids

        units = None
        if p["pairs_units"]:
            # h by unit rank [N, M], the units by rank, their ranks (in the list scratch), the
            # zeroed fp32 accumulator and the finishing kernel's statistics sums and ticket; at
            # M <= decode_pairs_units_pair_down_max_m h stays in the pair list: no h by rank, no
            # units by rank (None), the ranks unused
            by_rank = M > cfg.decode_pairs_units_pair_down_max_m
            vals, bcnt, bl1, nact, tickets, part, spart, rank, hu, uid = _decode_scratch(
                M, N, NB, bn, p["union_down"][1] + 1, 1, K, x.dtype, dev, not capturing, True, by_rank,
                _h_rows(M, p["bm"], cfg.decode_pairs_units_h_pad) if by_rank else 0,  # (whole rows zeroed)
            )  # fmt: skip
            units = (hu, uid, rank, part, spart)
        else:
            _, kb, split = down_blocks(M, K, cfg)
            vals, bcnt, bl1, nact, tickets, part, *_ = _decode_scratch(
                M, N, NB, bn, kb, split, K, x.dtype, dev, not capturing, False
            )
        y = _alloc.empty((M, K), dtype=x.dtype, device=dev)
        l0, l1, over = _stats_bufs(dev)
        try:
            launch_decode_pairs(
                x, w_gate, w_up, down_t(w_down), pair_ids(dev, M * N), vals, y, part, tickets, bcnt, bl1,
                nact, l0, l1, over, p, cfg, (out_dt, bits_dt, inf_bits, mag), tile, slots,
                cfg.decode_pdl and x.is_cuda and pdl_ok(dev), progs, units=units, l0h=l0h,
            )  # fmt: skip
        except BaseException:
            if units is not None:
                _SCRATCH.clear()  # the accumulator may hold this call's sums: never reuse it
            raise
        return y, l0, l1, over, nact.to(torch.int64) if unit_counts else None
    if p["barrier"]:
        from .decode_barrier import launch_decode_barrier

        hs = _h_rows(M, p["bm"], 0 < cfg.decode_barrier_h_pad_min_m <= M)  # (the gate writes whole rows)
        h, bcnt, bl1, nact, _, _, _, lst, _, _ = _decode_scratch(
            M, N, NB, bn, KC, 1, K, x.dtype, dev, not capturing, False, False, hs
        )
        y = _alloc.empty((M, K), dtype=x.dtype, device=dev)
        l0, l1, over = _stats_bufs(dev)
        launch_decode_barrier(
            x, w_gate, w_up, down_t(w_down), h, lst, y, bcnt, bl1, nact, l0, l1, over, p, cfg,
            (out_dt, bits_dt, inf_bits, mag), tile, slots, l0h,
        )  # fmt: skip
        return y, l0, l1, over, nact.to(torch.int64) if unit_counts else None
    atomic = p["atomic"]
    # the union form's h rows by rank (written whole by the chunk kernel, loaded by its down kernel)
    hs = _h_rows(M, p["bm_chunk"], p["union"] and cfg.decode_union_h_pad)
    h, bcnt, bl1, nact, sem, part, spart, lst, hc, ids = _decode_scratch(
        M, N, NB, bn, KC, nsplit, K, x.dtype, dev, not capturing, atomic, p["union"], hs
    )
    pdl = cfg.decode_pdl and x.is_cuda and pdl_ok(dev)
    wdt = down_t(w_down)
    _decode_gate_up_kernel[(NB,)](
        x,
        w_gate,
        w_up,
        h,
        bcnt,
        bl1,
        nact,
        sem,
        wdt,
        part if atomic else h,
        lst,
        M,
        N,
        K,
        NB,
        KC,
        x.stride(0),
        x.stride(1),
        OUT_DTYPE=out_dt,
        BITS_DTYPE=bits_dt,
        INF_BITS=inf_bits,
        MAG_MASK=mag,
        BM=p["bm"],
        BN=bn,
        BK=p["bk"],
        BK_UP=p["bk_up"],
        USE_DOT=p["use_dot"],
        DOT_PREC=prec,
        KC_P2=_p2(KC),
        SWAP=p["swap"],
        H_T=p["h_t"],
        PDL=pdl,
        ATOMIC=atomic,
        ONE_STEP=p["one_step"],
        BKD_ATOMIC=p["bkd_atomic"],
        COMPACT=p["compact"],
        CHU=cfg.decode_atomic_chunk,
        BKC=p["bkc"],
        GATE_ONLY=p["units"] or p["chunk"],
        UNIT_LIST=p["chunk"],
        num_warps=p["warps"],
        num_stages=p["stages"],
    )
    if p["units"]:
        r = _p2(max(1, cfg.decode_units_per_program))
        _decode_units_kernel[(_cdiv(N, r),)](
            x, w_up, wdt, h, part, bl1, M, N, K, NB, x.stride(0), x.stride(1),
            OUT_DTYPE=out_dt, BM=_p2(M), R=r, BK=p["bk_units"], BN_G=bn, ONE_STEP=p["bk_units"] >= K,
            PDL=pdl, num_warps=cfg.decode_units_warps, **({"launch_pdl": True} if pdl else {}),
        )  # fmt: skip
    if p["chunk"]:
        chu, split = p["chu_chunk"], p["split_chunk"]
        _decode_chunk_kernel[(min(_cdiv(N, chu) * split, p["programs_chunk"]),)](
            x, w_up, wdt, h, lst, part, bl1, hc, ids, M, K, NB, x.stride(0), x.stride(1),
            OUT_DTYPE=out_dt, BM=p["bm_chunk"], CHU=chu, SPLIT=split, BN_G=bn, NB_P2=_p2(NB),
            BKC=p["bk_chunk"], BKD=p["bkd_chunk"], DOT_PREC=prec, PDL=pdl, num_warps=p["warps_chunk"],
            num_stages=p["stages_chunk"], STORE_H=p["union"], UP_NACC=p["nacc_chunk"], HS=hs,
            **({"launch_pdl": True} if pdl else {}),
        )  # fmt: skip
    y = _alloc.empty((M, K), dtype=x.dtype, device=dev)
    l0, l1, over = _stats_bufs(dev)
    bpt = tile // bn
    if p["union"]:
        try:
            _launch_union_down(
                hc, ids, lst, wdt, part, y, sem, bcnt, bl1, l0, l1, over, spart, NB, bn, NT, bpt, slots, out_dt,
                prec, pdl, cfg, p["union_down"], hs=hs, l0h=l0h,
            )  # fmt: skip
        except BaseException:
            _SCRATCH.clear()  # the accumulator may hold this call's sums: never reuse it
            raise
        return y, l0, l1, over, nact.to(torch.int64) if unit_counts else None
    if atomic:
        try:
            _launch_finish(
                part, y, bcnt, bl1, l0, l1, over, spart, sem, NB, NT, bpt, slots, out_dt, pdl, cfg, l0h
            )
        except BaseException:
            # the accumulator may now hold this call's sums: never reuse it
            _SCRATCH.clear()
            raise
        ucounts = nact.to(torch.int64) if unit_counts else None
        return y, l0, l1, over, ucounts
    part = y if part is None else part
    _decode_down_kernel[(KC * nsplit + 1,)](
        h,
        wdt,
        nact,
        y,
        part,
        sem,
        bcnt,
        bl1,
        l0,
        l1,
        over,
        M,
        N,
        K,
        NB,
        NT,
        KC,
        p["nps"],
        y.stride(0),
        OUT_DTYPE=out_dt,
        BM=p["bm_down"],
        BKD=p["bkd"],
        CH=cfg.decode_down_chunk,
        NSPLIT=nsplit,
        USE_DOT=p["down_dot"],
        DOT_PREC=prec,
        S=slots,
        BPT=bpt,
        TCH=_stats_tch(NT, bpt, M),
        SBM=_p2(M),
        SUB=p["sub"],
        H_T=p["h_t"],
        PDL=pdl,
        l0h_ptr=l0h,
        num_warps=cfg.decode_down_warps,
        **({"launch_pdl": True} if pdl else {}),
    )
    ucounts = nact.to(torch.int64) if unit_counts else None
    return y, l0, l1, over, ucounts


def _union_blocks(M: int, K: int, cfg, programs: int) -> tuple[int, int, int, int]:
    """The union form's down GEMM at M tokens: (output columns per program, column blocks, ranges of
    ranks per block, ranks per tl.dot)."""
    if K < cfg.decode_chunk_long_k:
        cols, ranges = 128, 16
        for min_m, c, r in cfg.decode_union_short_down:
            if M >= min_m:
                cols, ranges = c, r
        bkd = max(16, min(_p2(K), _p2(cfg.decode_union_short_bk or cols)))
        n_kb = _cdiv(K, bkd)
        su = max(1, cfg.decode_union_short_split or ranges)
        chd = cfg.decode_union_short_chunk
    else:
        bkd = max(16, min(_p2(K), cfg.decode_union_bk))
        n_kb = _cdiv(K, bkd)
        su = cfg.decode_union_split or max(1, programs // n_kb)
        chd = cfg.decode_union_chunk
    return bkd, n_kb, su, max(16, _p2(chd))


def _launch_union_down(
    hc, ids, lst, wdt, acc, y, tk, bcnt, bl1, l0, l1, over, spart, NB, bn, NT, bpt, slots, out_dt, prec, pdl, cfg,
    blocks, cnt=None, pairs=False, hs=None, l0h=None,
):  # fmt: skip
    """The union form's down GEMM into the zeroed fp32 ``acc`` and the call's finishing (y, acc
    zeroed, statistics): in the same kernel with ``decode_union_finish`` (``tk`` then holds
    column blocks + 1 zeroed tickets), else by _decode_finish_kernel (``tk[0]`` zero). ``blocks``:
    the plan's ``union_down`` (``_union_blocks``). ``cnt``: the pair form's units variant's
    counters (the rank count at cnt[1]), zeroed by the down kernel's last program out. ``pairs``
    (with ``cnt``): ``hc`` and ``ids`` are the pair form's h values and pair ids (their count at
    cnt[0]), summed CHD pairs per one-hot tl.dot. ``hs``: the row length of ``hc`` by rank (>= M,
    the values past M zero; default M). ``l0h``: a pinned host float32 slot that also receives l0 (or
    None)."""
    M, K = y.shape
    bkd, n_kb, su, chd = blocks
    fin = cfg.decode_union_finish
    sbm = min(_p2(M), cfg.decode_stats_rows)
    ns = _cdiv(_p2(M), sbm)
    _decode_union_down_kernel[(n_kb * su + (ns if fin else 0),)](
        hc, ids, lst if cnt is None else cnt[1:], wdt, acc, y, tk, bcnt, bl1, l0, l1, over, spart,
        M, K, NB, NT, y.stride(0),
        BM=max(16, _p2(M)), BN_G=bn, NB_P2=_p2(NB), CHD=chd, BKD=bkd, SPLIT=su,
        STAGES=cfg.decode_union_stages, DOT_PREC=prec, PDL=pdl, COUNTED=cnt is not None, FIN=fin,
        OUT_DTYPE=out_dt, S=slots, BPT=bpt, TCH=_stats_tch(NT, bpt, sbm), SBM=sbm, NS=ns, PAIRS=pairs,
        TOK_BITS=_PAIR_TOK_BITS, HS=hs or M, l0h_ptr=l0h,
        num_warps=cfg.decode_union_warps, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    if not fin:
        _launch_finish(acc, y, bcnt, bl1, l0, l1, over, spart, tk, NB, NT, bpt, slots, out_dt, pdl, cfg, l0h)


def _launch_finish(
    acc, y, bcnt, bl1, l0, l1, over, spart, sem, NB, NT, bpt, slots, out_dt, pdl, cfg, l0h=None
):
    """_decode_finish_kernel for y [M, K]: y = acc rounded, acc zeroed, the statistics (``sem[0]``
    zero before it)."""
    M, K = y.shape
    bkf = max(16, min(_p2(K), 4096 // _p2(M), cfg.decode_finish_bk))
    # statistics programs: a power of two of them, SBM tokens each
    sbm = min(_p2(M), cfg.decode_stats_rows)
    ns = _cdiv(_p2(M), sbm)
    _decode_finish_kernel[(_cdiv(K, bkf) + ns,)](
        acc, y, bcnt, bl1, l0, l1, over, spart, sem, M, K, NB, NT, y.stride(0),
        OUT_DTYPE=out_dt, BM=_p2(M), BKF=bkf, S=slots, BPT=bpt, TCH=_stats_tch(NT, bpt, sbm),
        SBM=sbm, NS=ns, PDL=pdl, l0h_ptr=l0h, num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip


def _dense(x, w_gate, w_up, w_down, tile, slots, unit_counts):
    M, K = x.shape
    N = w_gate.shape[0]
    g = F.linear(x, w_gate)
    u = F.linear(x, w_up)
    NT = _cdiv(N, tile)
    h = _alloc.empty((M, N), dtype=x.dtype, device=x.device)
    tst = _alloc.empty((M, NT, 2), dtype=torch.float32, device=x.device)
    out_dt, bits_dt, inf_bits, mag, _ = _dtype_consts(x.dtype)
    bm = max(1, min(16, 4096 // tile))
    _relu_mul_stats_kernel[(_cdiv(M, bm), NT)](
        g,
        u,
        h,
        tst,
        M,
        N,
        NT,
        OUT_DTYPE=out_dt,
        BITS_DTYPE=bits_dt,
        INF_BITS=inf_bits,
        MAG_MASK=mag,
        T=tile,
        BM=bm,
        num_warps=4,
    )
    y = F.linear(h, w_down)
    l0, l1, over = _stats_bufs(x.device)
    ntp = _p2(NT)
    _finalize_tiles_kernel[(1,)](
        tst, M, NT, l0, l1, over, S=slots, R=max(1, min(_p2(M), 16384 // ntp)), NTP=ntp, num_warps=8
    )
    ucounts = ((g > 0) | torch.isnan(g)).sum(0) if unit_counts else None
    return y, l0, l1, over, ucounts


# ---------------------------------------------------------------------------------------------
# dispatch: a per-weight density estimate that never synchronises with the host
# ---------------------------------------------------------------------------------------------
@dataclass
class _Density:
    ref: weakref.ref
    est: float | None = None
    pinned: torch.Tensor | None = None
    event: object = None
    calls: int = 0
    #: pinned host slot the decode kernels store l0 into (-1 until a value lands; see _host_slot)
    slot: torch.Tensor | None = None


_DENSITY: dict[int, _Density] = {}

#: pinned host slots of the decode kernels' l0 stores: chunks of 1024 slots of 16 bytes (16-byte
#: aligned, so every slot compiles the same kernel), never freed: a kernel still queued may store
#: into its slot after the weight it measured is gone, and the memory must still be a slot then
_SLOT_CHUNKS: list[torch.Tensor] = []
_SLOT_NEXT = itertools.count()
_SLOT_LOCK = threading.Lock()


def _host_slot() -> torch.Tensor:
    """A pinned float32 host slot (one element, -1: no value yet) for a decode kernel's l0 store."""
    with _SLOT_LOCK:
        c, j = divmod(next(_SLOT_NEXT), 1024)
        if len(_SLOT_CHUNKS) <= c:
            _SLOT_CHUNKS.append(torch.full((1024 * 4,), -1.0, dtype=torch.float32).pin_memory())
        return _SLOT_CHUNKS[c][4 * j : 4 * j + 1]


def _density_entry(w_gate: torch.Tensor) -> _Density:
    key = id(w_gate)
    d = _DENSITY.get(key)
    if d is None or d.ref() is not w_gate:
        d = _Density(weakref.ref(w_gate, lambda _r, k=key: _DENSITY.pop(k, None)))
        _DENSITY[key] = d
    return d


def _fold(d: _Density, v: float) -> None:
    a = get_config("infer").ema
    d.est = v if d.est is None else a * v + (1 - a) * d.est


def _poll(d: _Density) -> None:
    """Folds a finished earlier measurement into the estimate (no host sync: reads pinned memory
    only after its event has completed, or the slot a decode kernel stored l0 into: -1 until a
    kernel has; read on the first calls and then once in density_every calls)."""
    if d.event is not None and d.event.query():
        _fold(d, float(d.pinned.item()))
        d.event = None
    if d.slot is not None and (d.est is None or d.calls % get_config("infer").density_every == 0):
        v = float(d.slot.item())
        if v >= 0.0:
            _fold(d, v)
            d.slot.fill_(-1.0)


def _record(d: _Density, l0: torch.Tensor, stored: bool = False) -> None:
    # stored: the call's kernels stored l0 into d.slot as well (decode): no copy to queue
    if not l0.is_cuda:
        d.est = float(l0)  # CPU (interpreter): values are ready
        return
    d.calls += 1
    if stored:
        return
    # once there is an estimate, one call in density_every measures (the copy and the event cost
    # host time on every call otherwise); none while the last measurement is in flight
    if d.event is not None or (d.est is not None and d.calls % get_config("infer").density_every):
        return
    if d.pinned is None:
        d.pinned = torch.empty((), dtype=torch.float32, pin_memory=True)
    d.pinned.copy_(l0, non_blocking=True)
    d.event = torch.cuda.Event()
    d.event.record()


def choose_path(M: int, N: int, active_per_token: float | None, K: int = 0, union_ok: bool = False) -> str:
    """``"prefill"``, ``"decode"`` or ``"dense"`` for M tokens, given the estimated active units
    per token (None before any measurement: sparse). ``union_ok``: the union decode form may run
    (not in deterministic mode or under capture); decode then reaches ``decode_union_max_m``
    tokens at K >= ``decode_union_reach_k``."""
    cfg = get_config("infer")
    top = cfg.decode_max_m
    if union_ok and K >= max(cfg.decode_union_min_k, cfg.decode_union_reach_k):
        top = max(top, cfg.decode_union_max_m)
    if top < M < cfg.prefill_min_m:
        return "dense"
    sparse = "decode" if M <= top else "prefill"
    if active_per_token is None:
        return sparse
    if sparse == "prefill":
        return "dense" if active_per_token > cfg.dense_above_prefill else sparse
    # decode reads all of W_gate plus the rows of W_up / columns of W_down of the union of the
    # batch's active units: sparse bytes / dense bytes = (1 + 2 union/N) / 3
    frac = min(1.0, active_per_token / max(N, 1))
    union = 1.0 - (1.0 - frac) ** M
    return "dense" if union > cfg.decode_dense_union else sparse


# ---------------------------------------------------------------------------------------------
# custom op
# ---------------------------------------------------------------------------------------------
#: kernel paths that failed to compile on this install, with the error; they are not tried again
_BROKEN: dict[str, str] = {}


def _run(x, w_gate, w_up, w_down, tile, slots, unit_counts, path, stats=True):
    if path == "reference" or not can_run_triton(x):
        y, st = ffn_infer_ref(x, w_gate, w_up, w_down, tile=tile, slots=slots, unit_counts=unit_counts)
        uc = st.unit_counts if unit_counts else None
        return y, st.l0, st.l1.detach(), st.overflow_rows.to(torch.int64), uc
    M = x.shape[0]
    N = w_gate.shape[0]
    d = _density_entry(w_gate)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        _poll(d)
    if path == "auto":
        path = choose_path(M, N, d.est, x.shape[1], atomics_allowed(capturing))
    if M == 0:
        z = torch.zeros((), dtype=torch.float32, device=x.device)
        uc = torch.zeros(N, dtype=torch.int64, device=x.device) if unit_counts else None
        return (
            x.new_empty((0, x.shape[1])),
            z,
            z.clone(),
            torch.zeros((), dtype=torch.int64, device=x.device),
            uc,
        )
    if path == "dense" and not stats and not unit_counts:
        # nothing to report: exactly the 3-GEMM forward (the statistics cost 2-17 us, 3-7%)
        y = F.linear(torch.relu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
        f32 = torch.float32
        return (
            y,
            x.new_empty((), dtype=f32),
            x.new_empty((), dtype=f32),
            x.new_empty((), dtype=torch.int64),
            None,
        )
    # the kernels read rows of x and weights with unit inner stride
    if x.stride(-1) != 1 or (x.is_cuda and (x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16)):
        x = x.contiguous()
    w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    if path == "decode" and M > 128:
        raise ValueError(f"path: 'decode' handles at most 128 tokens per call, got M={M} (use 'auto')")
    if path == "decode" and "decode" in _BROKEN:
        path = "dense"
    stored = False
    if path == "prefill":
        out = _prefill(x, w_gate, w_up, w_down, tile, slots, unit_counts)
    elif path == "decode":
        # the kernels store l0 into the weight's pinned host slot too (not into a graph being
        # captured: its replays would keep storing there)
        l0h = None
        if x.is_cuda and not capturing and get_config("infer").density_host_store:
            if d.slot is None:
                d.slot = _host_slot()
            l0h = d.slot
        try:
            # scratch reused between calls, except into a graph being captured
            out = _decode(
                x, w_gate, w_up, w_down, tile, slots, unit_counts, capturing=capturing, active=d.est, l0h=l0h
            )
            stored = l0h is not None
        except CompilationError as e:
            # the decode kernels do not compile on this install: say so once, run dense from now on
            _BROKEN["decode"] = repr(e)[:500]
            warnings.warn(
                f"twell: the decode kernels failed to compile ({_BROKEN['decode'][:200]}); "
                "the dense path runs instead",
                RuntimeWarning,
                stacklevel=2,
            )
            out = _dense(x, w_gate, w_up, w_down, tile, slots, unit_counts)
    else:
        out = _dense(x, w_gate, w_up, w_down, tile, slots, unit_counts)
    if not capturing and M > 0:
        _record(d, out[1], stored)
    return out


@torch.library.custom_op("twell::ffn_infer", mutates_args=())
def _ffn_infer_op(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    tile: int,
    slots: int,
    unit_counts: bool,
    path: str,
    stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, l0, l1, over, uc = _run(x, w_gate, w_up, w_down, tile, slots, unit_counts, path, stats)
    if uc is None:
        uc = x.new_zeros((0,), dtype=torch.int64)
    return y, l0, l1, over, uc.to(torch.int64)


@_ffn_infer_op.register_fake
def _(x, w_gate, w_up, w_down, tile, slots, unit_counts, path, stats=True):
    M, K = x.shape
    N = w_gate.shape[0]
    return (
        x.new_empty((M, K)),
        x.new_empty((), dtype=torch.float32),
        x.new_empty((), dtype=torch.float32),
        x.new_empty((), dtype=torch.int64),
        x.new_empty((N if unit_counts else 0,), dtype=torch.int64),
    )


def _plain_eager(*tensors: torch.Tensor) -> bool:
    """True outside tracing, for plain tensors (no fake/meta/subclass): the kernels can run as is."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type != "meta" for t in tensors)


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def ffn_infer(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    tile: int = 256,
    slots: int = 32,
    return_stats: bool = True,
    unit_counts: bool = False,
    path: str = "auto",
) -> tuple[torch.Tensor, FFNStats | None]:
    """Inference forward of the gated-ReLU FFN: ``x [M, K] -> (y [M, K], FFNStats | None)``.

    Args:
        x: ``[M, K]`` float32, bfloat16 or float16 (any strides).
        w_gate, w_up: ``[N, K]``; w_down: ``[K, N]`` (``nn.Linear`` layouts), x's dtype.
        tile, slots: TwELL geometry (T, S) of the packing and of ``overflow_rows``.
        return_stats: return :class:`twell.FFNStats` (``l0``, ``l1`` detached, ``overflow_rows``).
            With False, the dense path skips its statistics (plain 3-GEMM forward); the sparse
            paths still measure the density the dispatcher needs.
        unit_counts: also count, per unit, the tokens that activate it (``stats.unit_counts``).
        path: ``"auto"`` (by M and the measured density of earlier calls with these weights),
            ``"prefill"``, ``"decode"``, ``"dense"`` or ``"reference"`` (plain torch).

    No autograd (use ``twell.sparse_ffn`` for training). Exact for every input up to rounding:
    overflowing tiles are recomputed and counted in ``stats.overflow_rows``.
    """
    K, N = check_ffn_args(x, w_gate, w_up, w_down)
    check_tile_slots(tile, slots)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [M, K], got shape {tuple(x.shape)}")
    if N > MAX_COLUMNS:
        raise ValueError(f"w_gate: N={N} exceeds the TwELL limit of {MAX_COLUMNS} units")
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    return ffn_infer_checked(x, w_gate, w_up, w_down, tile, slots, return_stats, unit_counts, path)


def ffn_infer_checked(x, w_gate, w_up, w_down, tile, slots, return_stats, unit_counts, path="auto"):
    """:func:`ffn_infer` without its argument checks, for callers that made them already
    (``twell.sparse_ffn``): on a host-bound eager forward every check costs time."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w_gate, w_up, w_down = (t.to(dt) for t in (x, w_gate, w_up, w_down))
    args = (x, w_gate, w_up, w_down, tile, slots, unit_counts, path, return_stats or unit_counts)
    with torch.no_grad():
        if _plain_eager(x, w_gate, w_up, w_down):
            # eager calls skip the custom-op wrapper: it cost ~0.4 ms of host time per call on the
            # H100 machine (torch 2.11), 3-4x the whole dense FFN's launch cost, which made
            # host-bound model forwards slower than dense; the op stays for torch.compile/fake
            y, l0, l1, over, uc = _run(*args)
        else:
            y, l0, l1, over, uc = _ffn_infer_op(*args)
    if not return_stats:
        return y, None
    return y, FFNStats(
        l0=l0, l1=l1, overflow_rows=over, unit_counts=uc if unit_counts else None, tokens=x.shape[0]
    )

"""Decode in one launch: gate + up, a grid-wide barrier, then the down projection by output columns.

Legend: M = tokens (small), K = model dim, N = FFN units, BN = units per program, NB = ceil(N /
BN) programs, BKD = output columns per down block, CHD = active units per down step.

The other decode forms end the gate + up kernel either with fp32 atomic adds of each active
unit's h W_down^T into an [M, K] accumulator (and a second kernel rounding it into y) or with a
second kernel that gathers the active units' W_down^T rows per column block. Here the NB
programs (all resident at once: NB is at most the number of SMs) compute the gate of their BN
units for every token, the up of the units some token activates, store h unit-major [N, M] and
append their active units to the batch's list (one atomic add per program for its place), then
wait at a grid-wide barrier (an arrival counter); after it, program p computes y[:, block] =
h[list] W_down^T[list, block] for the column blocks p, p + NB, ... straight into y (no atomic
adds on y, no second kernel), and the last program reduces the statistics. The last program to
leave resets the counters, so they are 0 at every launch.

The list's order is the programs' arrival order, so the down sums run in an order that may
change between calls (the last bit of y may differ), as in the atomic forms: not in
deterministic mode, and not under CUDA-graph capture. Under Triton's CPU interpreter (programs
run one after another, so a barrier would never open) and where NB exceeds the SMs, the two
phases run as two launches of the same kernel (PHASE 1, then PHASE 2).

The barrier waits for every program of the grid, so all NB must become resident: one per SM is
enough (NB is at most the number of SMs). A program takes 4 warps and up to 192 KiB of shared
memory (160 KiB for the gate tiles at M <= 16 in bf16, 4 stages), so one fits per H100 SM: two
launches of this form on separate streams at once both fit only if the hardware places one
grid whole before the other's programs take SMs; concurrent launches on several streams could
each hold SMs the others wait for. The deterministic mode turns the form off, as does
``decode_barrier_max_m = 0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreter_enabled, num_sms
from .ffn_infer import (
    _chunk_up,
    _decode_stats,
    _is_active,
    _leave_grid,
    _listed_down,
    _nacc,
    _p2,
    _ranks,
    _stats_tch,
    _stream_key,
    _tokens_dot_rows,
)

__all__ = [
    "launch_decode_barrier",
    "barrier_counters",
    "gate_block",
    "stream_counters",
]


@triton.jit
def gate_block(
    x_ptr, wg_ptr, pid, M, N, K, stride_xm, stride_xk,
    OUT_DTYPE: tl.constexpr, BITS_DTYPE: tl.constexpr, INF_BITS: tl.constexpr, MAG_MASK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr, SWAP: tl.constexpr,
):  # fmt: skip
    # the gate of units [pid BN, (pid + 1) BN) for the BM token rows (tl.dot): token indices and
    # mask, unit indices and mask, the fp32 gate [BM, BN] and which entries are active
    i_m = tl.arange(0, BM)
    m_m = i_m < M
    o_n = pid * BN + tl.arange(0, BN)
    m_n = o_n < N
    acc_g = _tokens_dot_rows(
        x_ptr, wg_ptr, i_m, m_m, o_n, m_n, M, K, stride_xm, stride_xk, BM, BN, BK, True, DOT_PREC, SWAP
    )
    b_act = _is_active(acc_g, OUT_DTYPE, BITS_DTYPE, INF_BITS, MAG_MASK) & m_m[:, None] & m_n[None, :]
    return i_m, m_m, o_n, m_n, acc_g, b_act


@triton.jit
def _decode_barrier_kernel(
    x_ptr, wg_ptr, wu_ptr, wdt_ptr, h_ptr, lst_ptr, bar_ptr, y_ptr,
    bcnt_ptr, bl1_ptr, nact_ptr, l0_ptr, l1_ptr, over_ptr,
    M, N, K, NB, NT, stride_xm, stride_xk, stride_ym, HS,
    OUT_DTYPE: tl.constexpr, BITS_DTYPE: tl.constexpr, INF_BITS: tl.constexpr, MAG_MASK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CHU: tl.constexpr, BKC: tl.constexpr,
    DOT_PREC: tl.constexpr, SWAP: tl.constexpr, BMD: tl.constexpr, BKD: tl.constexpr, CHD: tl.constexpr,
    STAGES_D: tl.constexpr, S: tl.constexpr, BPT: tl.constexpr, TCH: tl.constexpr, SBM: tl.constexpr,
    UP_STAGES: tl.constexpr, UP_NACC: tl.constexpr, EARLY_LIST: tl.constexpr, TPB: tl.constexpr,
    PHASE: tl.constexpr, l0h_ptr=None,
):  # fmt: skip
    # bar (int64): [arrivals << 32 | length of the list of active units, departures]: one word,
    # so the read that opens the barrier also returns the list's final length. h: unit-major rows
    # of HS >= M values (0 past M), stored and loaded whole: at HS = M rounded up to 16 the down's
    # h loads are vectorized where a mask of i_m < M (M not a multiple of 16) makes 2-byte loads
    pid = tl.program_id(0)
    if PHASE != 2:
        # gate of units [pid BN, (pid + 1) BN) for every token (stored unit-major into the h
        # scratch, 0 where inactive), then the up of the units some token activates, compacted
        # CHU at a time into dense [CHU, BKC] W_up tiles (whole K rows in a few steps instead of
        # BN-row tiles with most rows masked), h written over their g
        i_m, m_m, o_n, m_n, acc_g, b_act = gate_block(
            x_ptr, wg_ptr, pid, M, N, K, stride_xm, stride_xk,
            OUT_DTYPE, BITS_DTYPE, INF_BITS, MAG_MASK, BM, BN, BK, DOT_PREC, SWAP,
        )  # fmt: skip
        n_act = tl.sum(b_act.to(tl.int32), axis=0)
        p_g = h_ptr + o_n[None, :] * HS + i_m[:, None]
        tl.store(p_g, tl.where(b_act, acc_g, 0.0).to(OUT_DTYPE), mask=(i_m < HS)[:, None] & m_n[None, :])
        tl.debug_barrier()  # the program's own gate values are visible to all its threads
        f_u = (n_act > 0) & m_n
        pos, n_units = _ranks(f_u)
        if EARLY_LIST:
            # the list's atomic add as a one-thread-per-element tensor op before the up (distinct
            # addresses, all but the first masked off, so Triton does not combine it within the
            # warp): its result stays in the issuing thread until the list store, so nothing
            # waits for it before the up
            o_t = tl.arange(0, TPB)
            old = tl.atomic_add(
                bar_ptr + o_t,
                tl.where(o_t == 0, n_units, 0).to(tl.int64),
                mask=o_t == 0,
                sem="relaxed",
                scope="gpu",
            )
        o_u = tl.arange(0, CHU)
        l1_tok = tl.zeros((BM,), dtype=tl.float32)
        for c in range(0, n_units, CHU):
            idx = tl.sum(
                tl.where(f_u[None, :] & (pos[None, :] == (c + o_u)[:, None]), o_n[None, :], 0), axis=1
            )
            v_c = (c + o_u) < n_units
            h_c, _ = _chunk_up(
                x_ptr, wu_ptr, h_ptr, idx.to(tl.int64), v_c, i_m, m_m, HS, K, stride_xm, stride_xk,
                OUT_DTYPE, BM, CHU, BKC, DOT_PREC, UP_STAGES, UP_NACC,
            )  # fmt: skip
            tl.store(h_ptr + idx[None, :] * HS + i_m[:, None], h_c, mask=(i_m < HS)[:, None] & v_c[None, :])
            l1_tok += tl.sum(tl.abs(h_c.to(tl.float32)), axis=1)
        tl.store(bcnt_ptr + i_m * NB + pid, tl.sum(b_act.to(tl.int32), axis=1), mask=m_m)
        tl.store(bl1_ptr + i_m * NB + pid, l1_tok, mask=m_m)
        tl.store(nact_ptr + o_n, n_act, mask=m_n)
        # this block's active units join the batch's list at a place taken by one atomic add
        if EARLY_LIST:
            old = tl.sum(tl.where(o_t == 0, old, 0), axis=0)
        else:
            old = tl.atomic_add(bar_ptr, n_units.to(tl.int64), sem="relaxed", scope="gpu")
        base = (old & 0xFFFFFFFF).to(tl.int32)
        tl.store(lst_ptr + base + pos, o_n, mask=f_u)
    if PHASE == 0:
        # grid-wide barrier: every program's h, list entries and statistics are visible after it.
        # Each program's list add precedes its arrival on the same word, so the value that shows
        # NB arrivals holds the list's final length: one read fewer after the barrier (H100,
        # paper shape, 30 units iid, three alternating rounds in separate processes against a
        # separate length word: M = 8 21.76-21.89 us against 21.92-22.11, 12 23.34-23.90
        # against 23.94-24.32, 17 27.22-27.54 against 28.22-28.29, 20 29.89-30.02 against
        # 30.99-31.31, 16 within the noise)
        tl.debug_barrier()
        tl.atomic_add(bar_ptr, tl.full((), 1, tl.int64) << 32, sem="release", scope="gpu")
        word = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        while (word >> 32) < NB:
            word = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    elif PHASE == 2:
        word = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    if PHASE != 1:
        total = (word & 0xFFFFFFFF).to(tl.int32)
        i_d = tl.arange(0, BMD)
        m_d = i_d < M
        for kb in range(pid, tl.cdiv(K, BKD), tl.num_programs(0)):
            o_k = kb * BKD + tl.arange(0, BKD)
            m_k = o_k < K
            acc = _listed_down(
                lst_ptr,
                h_ptr,
                wdt_ptr,
                0,
                total,
                i_d,
                i_d < HS,
                o_k,
                m_k,
                HS,
                K,
                False,
                BMD,
                BKD,
                CHD,
                STAGES_D,
                DOT_PREC,
            )
            tl.store(
                y_ptr + i_d[:, None] * stride_ym + o_k[None, :],
                acc.to(OUT_DTYPE),
                mask=m_d[:, None] & m_k[None, :],
            )
        if pid == tl.num_programs(0) - 1:
            _decode_stats(bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr, M, NB, NT, S, BPT, TCH, SBM, l0h_ptr)
        # the last program out resets the counters for the next launch. Relaxed: a program
        # counts itself out only after its spin loop ended and its down loop, bounded by the
        # list's length, ran, so no counter it read can still be reset under it; y and the
        # statistics need no fence here (the launch's end makes them visible). With acq_rel the
        # fence waited for the program's y stores: H100, paper shape, 30 units iid, one process,
        # three alternating rounds: M = 8 22.14-22.18 us against 22.37-22.48, M = 16 24.05-24.32
        # against 24.34-24.42
        _leave_grid(bar_ptr)


def stream_counters(
    cache: dict, dev: torch.device, dtype: torch.dtype, per_thread: bool = False, n: int = 2
) -> torch.Tensor:
    """``n`` zeroed counters of ``dtype`` kept in ``cache`` under ``_stream_key`` (the kernels that
    use them leave them at zero, see ``ffn_infer._leave_grid``)."""
    key = _stream_key(dev, per_thread)
    if key not in cache:
        cache[key] = torch.zeros(n, dtype=dtype, device=dev)
    return cache[key]


#: the barrier form's counters per (device, stream): zero between launches (the kernel resets them)
_COUNTERS: dict[tuple, torch.Tensor] = {}


def barrier_counters(dev: torch.device) -> torch.Tensor:
    """int64 [2] counters of the barrier form for the current stream of ``dev`` (zero)."""
    return stream_counters(_COUNTERS, dev, torch.int64)


def launch_decode_barrier(
    x, w_gate, w_up, wdt, h, lst, y, bcnt, bl1, nact, l0, l1, over, p, cfg, consts, tile, slots, l0h=None
):
    """The barrier form for x [M, K] (the caller checked that it applies): y, the statistics and
    the per-unit counts. ``h``: the [HS, N] scratch (its HS >= M values per unit-major row, the
    row length the kernel uses); ``p``: the decode plan (its gate / up block sizes); ``consts`` =
    (out dtype, bits dtype, +inf bits, magnitude mask); ``l0h``: a pinned host float32 slot that also
    receives l0 (or None)."""
    M, K = x.shape
    N = w_gate.shape[0]
    bn = min(p["bn"], tile)
    NB = triton.cdiv(N, bn)
    out_dt, bits_dt, inf_bits, mag = consts
    one_launch = not interpreter_enabled() and x.is_cuda and NB <= num_sms(x.device)
    bar = barrier_counters(x.device)
    bpt = tile // bn
    bkc = max(16, min(_p2(K), cfg.decode_barrier_up_bk))
    args = (
        x, w_gate, w_up, wdt, h, lst, bar, y, bcnt, bl1, nact, l0, l1, over,
        M, N, K, NB, triton.cdiv(N, tile), x.stride(0), x.stride(1), y.stride(0), h.shape[0],
    )  # fmt: skip
    kw = dict(
        OUT_DTYPE=out_dt, BITS_DTYPE=bits_dt, INF_BITS=inf_bits, MAG_MASK=mag,
        BM=p["bm"], BN=bn, BK=p["bk"], CHU=16, BKC=bkc,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", SWAP=p["swap"],
        BMD=max(16, _p2(M)), BKD=max(16, min(_p2(K), cfg.decode_barrier_bkd)),
        CHD=max(16, _p2(cfg.decode_barrier_chunk)), STAGES_D=cfg.decode_barrier_stages,
        UP_STAGES=cfg.decode_barrier_up_stages or None, UP_NACC=_nacc(cfg.decode_barrier_up_nacc, bkc),
        EARLY_LIST=cfg.decode_barrier_early_list, TPB=32 * p["warps"],
        S=slots, BPT=bpt, TCH=_stats_tch(triton.cdiv(N, tile), bpt, M), SBM=_p2(M), l0h_ptr=l0h,
        num_warps=p["warps"], num_stages=p["stages"],
    )  # fmt: skip
    for phase in (0,) if one_launch else (1, 2):
        _decode_barrier_kernel[(NB,)](*args, PHASE=phase, **kw)

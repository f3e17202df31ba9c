"""Decode by (token, unit) pairs: a gate kernel lists the batch's active pairs, an up kernel computes
h of each pair, a down kernel sums the pairs into y by output columns.

Legend: M = tokens (small), K = model dim, N = FFN units, BN = units per gate program, NB =
ceil(N / BN) gate programs, P = pairs per up step, PD = pairs per down step, BKD = output columns
per down program.

The union form computes the up of each active unit for all M tokens as a dense [M, units] tile and
its down reads h of every token for every listed unit: at M = 64 and ~30 active units per token,
about 1.2 tokens activate each listed unit, so those tiles are ~98 % zeros and each program reads
all of x (256 KiB) or all of h. Here the work is the list of active pairs itself:

1. ``_pairs_gate_kernel`` (NB programs): the gate of BN units for every token; each program appends
   its active pairs, unit-major, to the batch's list (one atomic add for its place): the pair's id
   (unit * 256 + token) and its gate value. It also writes the per-(token, block) active counts,
   zeroes their l1 sums and writes the per-unit counts; in the units variant it also starts the
   W_down^T rows of its active units on their way into L2 (``decode_prefetch_down``), which the
   down kernel reads later.
2. ``_pairs_up_kernel``: P pairs per step, each pair's x row and W_up row loaded whole (one memory
   round trip per step, CUDA cores: no dense tile, no MMA chain), h = g u rounded to the activation
   dtype written over g, |h| added to its token's l1 sum.
3. ``_pairs_down_kernel``: one program per BKD output columns: y[:, cols] = sum over pairs of h times
   the pair's W_down^T row segment, PD pairs per tl.dot ([tokens, PD] one-hot rows holding h, times
   [PD, BKD] gathered rows), stored straight into y; one more program reduces the statistics. Each
   program reads the pair list (6 bytes a pair) instead of h of every token.

Units variant (``units``, at M = 33..64 below K = 4096 by default): the gate kernel also lists
the batch's active units (one 64-bit atomic add takes the places of a block's pairs and units) and
zeroes their rows of hu [ranks, M]; the up kernel stores each pair's h at hu[rank of its unit,
token]; the union form's down GEMM (``ffn_infer._launch_union_down``) then reads each listed unit's
W_down^T row once for all tokens (its [M, CHD] h tiles, mostly zeros, are dense for tl.dot) where
the pair down reads one row per pair and builds each step's one-hot h tile. At M <=
``decode_pairs_units_pair_down_max_m`` (47) the variant keeps the pair form's gate and up (h in the
pair list, no unit list) and runs the union down kernel over the pair list instead, one-hot h tiles
of PD pairs times their gathered W_down^T rows (``ffn_infer._pairs_down_range``): at 33..47 tokens
that reads fewer bytes than the dense h tiles of every listed unit in every column block.

The list's order is the gate programs' arrival order, so the sums may change in the last bit
between calls: not in deterministic mode, not under CUDA-graph capture. The pair count lives in a
counter per (thread, device, stream) that the down kernel's last program out resets, so it is 0
at every launch (per thread too: two threads' three launches on one stream interleave).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_barrier import gate_block, stream_counters
from .ffn_infer import (
    _PAIR_TOK_BITS,
    _decode_stats,
    _launch_union_down,
    _leave_grid,
    _p2,
    _pairs_down_range,
    _prefetch_lines,
    _prefetch_rows,
    _ranks,
    _stats_tch,
    _stream_key,
    _sum_partials,
)

__all__ = ["down_blocks", "launch_decode_pairs", "pair_counters", "pair_ids"]


@triton.jit
def _pairs_gate_kernel(
    x_ptr, wg_ptr, ids_ptr, val_ptr, cnt_ptr, bcnt_ptr, bl1_ptr, nact_ptr, tk_ptr, hu_ptr, uid_ptr, rank_ptr,
    M, N, K, NB, KB, stride_xm, stride_xk, HS,
    OUT_DTYPE: tl.constexpr, BITS_DTYPE: tl.constexpr, INF_BITS: tl.constexpr, MAG_MASK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr, SWAP: tl.constexpr,
    TOK_BITS: tl.constexpr, KB_P2: tl.constexpr, PDL: tl.constexpr, UNITS: tl.constexpr,
    wdt_ptr, PF_LINE: tl.constexpr, PF_DOWN: tl.constexpr,
):  # fmt: skip
    if PDL:
        # the up kernel may be scheduled from now on; it waits in-kernel for this grid (gdc_wait)
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if KB_P2 > 0:
        if pid == 0:
            # tickets of the down kernel's split sums start at 0 on every call
            o_t = tl.arange(0, KB_P2)
            tl.store(tk_ptr + o_t, tl.zeros((KB_P2,), dtype=tl.int32), mask=o_t < KB)
    i_m, m_m, o_n, m_n, acc_g, b_act = gate_block(
        x_ptr, wg_ptr, pid, M, N, K, stride_xm, stride_xk,
        OUT_DTYPE, BITS_DTYPE, INF_BITS, MAG_MASK, BM, BN, BK, DOT_PREC, SWAP,
    )  # fmt: skip
    a = b_act.to(tl.int32)
    n_act = tl.sum(a, axis=0)
    # the W_down^T rows of the block's active units start on their way into L2 now, so the down
    # kernel reads them from there (PF_DOWN: lines a row, 0: no prefetch)
    if PF_DOWN > 0:
        _prefetch_rows(wdt_ptr, o_n, (n_act > 0) & m_n, K, PF_LINE, PF_DOWN)
    # place of each active pair among the block's, unit-major: the units before it, then the
    # tokens of its unit before it
    pos = (tl.cumsum(n_act, axis=0) - n_act)[None, :] + tl.cumsum(a, axis=0) - 1
    if UNITS:
        # units variant: the block's active units also join the batch's unit list, at ranks r;
        # one 64-bit add takes both places (pairs at cnt[0], units at cnt[1]: little-endian)
        f_u = (n_act > 0) & m_n
        upos, n_units = _ranks(f_u)
        w = tl.atomic_add(
            cnt_ptr.to(tl.pointer_type(tl.int64), bitcast=True),
            (n_units.to(tl.int64) << 32) | tl.sum(n_act, axis=0).to(tl.int64),
            sem="relaxed",
            scope="gpu",
        )
        base = (w & 0xFFFFFFFF).to(tl.int32)
        r = (w >> 32).to(tl.int32) + upos
    else:
        base = tl.atomic_add(cnt_ptr, tl.sum(n_act, axis=0), sem="relaxed", scope="gpu")
    ids = (o_n[None, :] << TOK_BITS) | i_m[:, None]
    tl.store(ids_ptr + base + pos, ids, mask=b_act)
    tl.store(val_ptr + base + pos, acc_g.to(OUT_DTYPE), mask=b_act)
    tl.store(bcnt_ptr + i_m * NB + pid, tl.sum(a, axis=1), mask=m_m)
    tl.store(bl1_ptr + i_m * NB + pid, tl.zeros((BM,), dtype=tl.float32), mask=m_m)
    tl.store(nact_ptr + o_n, n_act, mask=m_n)
    if UNITS:
        # hu[r, :] (h of a listed unit for every token, unit-major, HS >= M values a row) starts
        # at 0; the up kernel fills in the active pairs, finding r by rank[unit]
        tl.store(uid_ptr + r, o_n, mask=f_u)
        tl.store(rank_ptr + o_n, r, mask=f_u)
        z = tl.zeros((BM, BN), dtype=OUT_DTYPE)
        tl.store(
            hu_ptr + r[None, :].to(tl.int64) * HS + i_m[:, None], z, mask=(i_m < HS)[:, None] & f_u[None, :]
        )


@triton.jit
def _pairs_up_kernel(
    x_ptr, wu_ptr, ids_ptr, val_ptr, cnt_ptr, bl1_ptr, hu_ptr, rank_ptr,
    M, K, NB, stride_xm, stride_xk, HS,
    OUT_DTYPE: tl.constexpr, P: tl.constexpr, BKU: tl.constexpr, BN_G: tl.constexpr,
    TOK_BITS: tl.constexpr, PDL: tl.constexpr, UNITS: tl.constexpr,
):  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # the gate grid has completed: the list and its length are visible
    total = tl.load(cnt_ptr)
    o_p = tl.arange(0, P)
    o_k = tl.arange(0, BKU)
    for c in range(tl.program_id(0) * P, total, tl.num_programs(0) * P):
        i_p = c + o_p
        v_p = i_p < total
        ids = tl.load(ids_ptr + i_p, mask=v_p, other=0)
        tok = ids & ((1 << TOK_BITS) - 1)
        unit = (ids >> TOK_BITS).to(tl.int64)
        g = tl.load(val_ptr + i_p, mask=v_p, other=0.0).to(tl.float32)
        if UNITS:
            r = tl.load(rank_ptr + unit, mask=v_p, other=0).to(tl.int64)
        # whole rows per step (a K loop without tl.dot is not pipelined: one round trip a step)
        acc = tl.zeros((P, BKU), dtype=tl.float32)
        for k in range(0, K, BKU):
            m_k = (k + o_k) < K
            m_w = v_p[:, None] & m_k[None, :]
            b_x = tl.load(
                x_ptr + tok[:, None] * stride_xm + (k + o_k)[None, :] * stride_xk, mask=m_w, other=0.0
            )
            b_w = tl.load(wu_ptr + unit[:, None] * K + (k + o_k)[None, :], mask=m_w, other=0.0)
            acc += b_x.to(tl.float32) * b_w.to(tl.float32)
        h = (g * tl.sum(acc, axis=1)).to(OUT_DTYPE)
        if UNITS:
            tl.store(hu_ptr + r * HS + tok, h, mask=v_p)
        else:
            tl.store(val_ptr + i_p, h, mask=v_p)
        tl.atomic_add(
            bl1_ptr + tok * NB + (unit // BN_G).to(tl.int32),
            tl.abs(h.to(tl.float32)),
            mask=v_p,
            sem="relaxed",
        )


@triton.jit
def _pairs_down_kernel(
    wdt_ptr, ids_ptr, val_ptr, cnt_ptr, y_ptr, part_ptr, tk_ptr, bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr,
    M, K, NB, NT, stride_ym,
    OUT_DTYPE: tl.constexpr, BMD: tl.constexpr, PD: tl.constexpr, BKD: tl.constexpr,
    STAGES: tl.constexpr, DOT_PREC: tl.constexpr, TOK_BITS: tl.constexpr, SPLIT: tl.constexpr,
    S: tl.constexpr, BPT: tl.constexpr, TCH: tl.constexpr, SBM: tl.constexpr, PDL: tl.constexpr,
    l0h_ptr=None,
):  # fmt: skip
    if PDL:
        tl.extra.cuda.gdc_wait()  # the up grid has completed: h of every pair is visible
    pid = tl.program_id(0)
    total = tl.load(cnt_ptr)
    if pid == tl.num_programs(0) - 1:
        _decode_stats(bcnt_ptr, bl1_ptr, l0_ptr, l1_ptr, over_ptr, M, NB, NT, S, BPT, TCH, SBM, l0h_ptr)
    else:
        i_d = tl.arange(0, BMD)
        # column block pid // SPLIT, range pid % SPLIT of the list (whole steps of PD pairs)
        kb = pid // SPLIT
        per = tl.cdiv(tl.cdiv(total, SPLIT), PD) * PD
        lo = (pid % SPLIT) * per
        hi = tl.minimum(total, lo + per)
        o_k = kb * BKD + tl.arange(0, BKD)
        m_k = o_k < K
        acc = _pairs_down_range(
            ids_ptr, val_ptr, wdt_ptr, lo, hi, i_d, o_k, m_k, K, TOK_BITS, BMD, BKD, PD, STAGES, DOT_PREC
        )  # fmt: skip
        m_out = (i_d < M)[:, None] & m_k[None, :]
        if SPLIT == 1:
            tl.store(y_ptr + i_d[:, None] * stride_ym + o_k[None, :], acc.to(OUT_DTYPE), mask=m_out)
        else:
            # fp32 partials; the last range of this column block to take a ticket sums them
            tl.store(part_ptr + ((pid % SPLIT) * M + i_d[:, None]) * K + o_k[None, :], acc, mask=m_out)
            tl.debug_barrier()
            ticket = tl.atomic_add(tk_ptr + kb, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT - 1:
                _sum_partials(part_ptr, y_ptr, i_d, o_k, m_out, M, K, stride_ym, OUT_DTYPE, BMD, BKD, SPLIT)
    # the last program out resets the counters for the next launch (every program read the
    # length above, and the next call's gate kernel starts after this grid)
    _leave_grid(cnt_ptr)


#: the pair form's counters (pair count, departures) per (thread, device, stream): zero between
#: launches
_COUNTERS: dict[tuple, torch.Tensor] = {}


def pair_counters(dev: torch.device) -> torch.Tensor:
    """int32 [4] counters of the pair form for this thread and the current stream of ``dev`` (zero):
    [0] pairs listed; [1] the pair down's programs gone, or the units variant's units listed (the
    high half of one 64-bit word with [0]); [2] the units variant's union down programs gone."""
    return stream_counters(_COUNTERS, dev, torch.int32, per_thread=True, n=4)


#: the pair form's id lists per (thread, device, stream), grown as needed (every entry read is
#: written first)
_IDS: dict[tuple, torch.Tensor] = {}


def pair_ids(dev: torch.device, n: int) -> torch.Tensor:
    """int32 scratch of at least ``n`` pair ids for this thread and the current stream of ``dev``."""
    key = _stream_key(dev, per_thread=True)
    buf = _IDS.get(key)
    if buf is None or buf.numel() < n:
        buf = _IDS[key] = torch.empty(max(n, 1), dtype=torch.int32, device=dev)
    return buf


def down_blocks(M: int, K: int, cfg) -> tuple[int, int, int]:
    """The down kernel's output columns per program, its column blocks and the ranges of the pair
    list each block is split into at M tokens (``decode_pairs_down``; ``decode_pairs_bkd`` and
    ``decode_pairs_split`` > 0 replace its choices)."""
    bkd, split = 16, 1
    for min_k, min_m, cols, ranges in cfg.decode_pairs_down:
        if K >= min_k and M >= min_m:
            bkd, split = cols, ranges
    bkd = max(16, min(_p2(K), _p2(cfg.decode_pairs_bkd or bkd)))
    return bkd, triton.cdiv(K, bkd), max(1, cfg.decode_pairs_split or split)


def launch_decode_pairs(
    x, w_gate, w_up, wdt, ids, vals, y, part, tickets, bcnt, bl1, nact, l0, l1, over, p, cfg, consts, tile,
    slots, pdl, programs, units=None, l0h=None,
):  # fmt: skip
    """The pair form for x [M, K] (M <= 256): fills y, the statistics and the per-unit counts.
    ``ids`` (int32) and ``vals`` (activation dtype) hold at least M * N pairs; ``tickets`` (int32)
    one per down column block; with a split down (``down_blocks``), ``part`` holds the fp32
    [split, M, K] partials (else it may be None); ``p``: the decode plan (gate block sizes);
    ``consts`` = (out dtype, bits dtype, +inf bits, magnitude mask); ``pdl``: launch the up and
    down kernels with programmatic dependent launch; ``programs``: SMs.

    ``units`` (the units variant) = (hu [N, >= M] activation dtype, uid [N] int32 (both None at
    M <= ``decode_pairs_units_pair_down_max_m``, where h stays in the pair list), rank [N] int32,
    acc [M, K] fp32 zero, spart [3 M] int32): the up kernel stores h by the rank of its unit in the
    batch's unit list, and the union form's down GEMM (fp32 atomics into acc) and finishing
    kernel replace the pair down kernel (``_launch_union_down``); ``tickets`` then holds the union
    down's column blocks + 1 elements. ``l0h``: a pinned host float32 slot that also receives l0 (or
    None)."""
    M, K = x.shape
    N = w_gate.shape[0]
    if M > 1 << _PAIR_TOK_BITS:
        raise ValueError(f"x: the pair form takes at most {1 << _PAIR_TOK_BITS} tokens, got {M}")
    bn = min(p["bn"], tile)
    NB = triton.cdiv(N, bn)
    NT = triton.cdiv(N, tile)
    out_dt, bits_dt, inf_bits, mag = consts
    cnt = pair_counters(x.device)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = {"launch_pdl": True} if pdl else {}
    pu = _p2(max(1, cfg.decode_pairs_up if K >= cfg.decode_chunk_long_k else cfg.decode_pairs_up_short))
    bkd, kb, split = down_blocks(M, K, cfg)
    if units is not None:
        hu, uid, rank, acc, spart = units
        if hu is None:  # (h in the pair list: the gate and up kernels do not touch hu and uid)
            hu, uid, hs = vals, vals, M
        else:
            hs = hu.shape[1]  # (M rounded up to 16 by default: vectorized loads of whole rows)
        # the gate kernel zeroes the union down's tickets (column blocks + the statistics')
        kb, split = p["union_down"][1] + 1, 2
    else:
        hu = uid = rank = vals  # (not used)
        hs = M
        if split > 1 and part is None:
            raise ValueError("part: a split down needs its fp32 partials")
    part = y if part is None else part  # (not read with one range per block)
    bpt = tile // bn
    # the up step's x and W_up tiles stay in registers: at most 64 KiB of each per program (an
    # [8, 4096] tile in bf16, [8, 2048] in fp32)
    cap = max(1, (64 << 10) // (pu * x.element_size()))
    bku = max(16, min(_p2(K), _p2(cfg.decode_pairs_up_bk), 1 << (cap.bit_length() - 1)))
    on = units is not None
    # the units variant with the union down over the pair list (h in the pair list, no unit list)
    pd = on and M <= cfg.decode_pairs_units_pair_down_max_m
    # (the units variant only: slower at the pair form's M = 8..32 on the Llama-3-8B shape)
    pf_line, pf_down = _prefetch_lines(K, wdt, cfg.decode_prefetch_down and on)
    try:
        _pairs_gate_kernel[(NB,)](
            x, w_gate, ids, vals, cnt, bcnt, bl1, nact, tickets, hu, uid, rank,
            M, N, K, NB, kb, x.stride(0), x.stride(1), hs,
            OUT_DTYPE=out_dt, BITS_DTYPE=bits_dt, INF_BITS=inf_bits, MAG_MASK=mag,
            BM=p["bm"], BN=bn, BK=p["bk"], DOT_PREC=prec, SWAP=p["swap"], TOK_BITS=_PAIR_TOK_BITS,
            KB_P2=_p2(kb) if split > 1 else 0, PDL=pdl, UNITS=on and not pd,
            wdt_ptr=wdt, PF_LINE=pf_line, PF_DOWN=pf_down,
            num_warps=p["warps"], num_stages=p["stages"],
        )  # fmt: skip
        per_sm, warps = (
            (cfg.decode_pairs_units_up_per_sm, cfg.decode_pairs_units_up_warps)
            if on
            else (cfg.decode_pairs_up_per_sm, cfg.decode_pairs_up_warps)
        )
        _pairs_up_kernel[(max(1, min(triton.cdiv(M * N, pu), programs * per_sm)),)](
            x, w_up, ids, vals, cnt, bl1, hu, rank, M, K, NB, x.stride(0), x.stride(1), hs,
            OUT_DTYPE=out_dt, P=pu, BKU=bku, BN_G=bn,
            TOK_BITS=_PAIR_TOK_BITS, PDL=pdl, UNITS=on and not pd, num_warps=warps, **launch,
        )  # fmt: skip
        if on:
            _launch_union_down(
                vals if pd else hu, ids if pd else uid, None, wdt, acc, y, tickets, bcnt, bl1, l0, l1, over, spart,
                NB, bn, NT, bpt, slots, out_dt, prec, pdl, cfg, p["union_down"], cnt, pd, hs, l0h,
            )  # fmt: skip
        else:
            _pairs_down_kernel[(kb * split + 1,)](
                wdt, ids, vals, cnt, y, part, tickets, bcnt, bl1, l0, l1, over, M, K, NB, NT, y.stride(0),
                OUT_DTYPE=out_dt, BMD=max(16, _p2(M)), PD=max(16, _p2(cfg.decode_pairs_chunk)), BKD=bkd,
                STAGES=cfg.decode_pairs_stages, DOT_PREC=prec, TOK_BITS=_PAIR_TOK_BITS, SPLIT=split,
                S=slots, BPT=bpt, TCH=_stats_tch(NT, bpt, M), SBM=_p2(M), PDL=pdl, l0h_ptr=l0h,
                num_warps=cfg.decode_pairs_warps, **launch,
            )  # fmt: skip
    except BaseException:
        # a later kernel failed to launch (e.g. to compile) after the gate kernel's count was
        # queued: zero the counters behind it, or every later call would read a stale length
        cnt.zero_()
        raise

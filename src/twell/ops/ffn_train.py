"""Training forward and backward of the gated-ReLU FFN on the gate's sparsity pattern.

Legend: M = tokens, K = model dim, N = FFN units, W = row capacity of the packed pattern,
NW = ceil(N / 32) pattern words per row, MW = ceil(M / 32), E = M * W capacity of the by-unit index.

    g = x @ W_gate^T (gate_bits / cuBLAS)   h = relu(g) * u,  u = x @ W_up^T only where g > 0
    y = h @ W_down^T                  l1 = sum |h| / M, l0 = active entries / M

Kept for the backward (no dense [M, N] tensor):
  ``cols``    int32 [M, W]       the first min(count, W) active units of each row, by unit
  ``counts``  int32 [M + N]      active units per row, then active rows per unit
  ``pat``     int32 [2, M, NW]   the pattern as a bitmask (bit n % 32 of word n // 32), and the
                                 number of active units of the row before each word
  ``gu``      x.dtype [2, M, W]  g and u at the packed slots (what dense autograd keeps as [M, N])
Rows with more than W active units walk their bitmask, so every row is exact whatever its density.

Backward, exact on the stored pattern (per active (m, n)):
    dh = dy[m] . W_down[:, n] + (dl1 / M) * sign(h)      du = dh * relu(g)      dg = dh * u
    dx[m] = sum_n dg W_gate[n] + du W_up[n]
    dW_gate[n] = sum_m dg x[m], dW_up[n] = sum_m du x[m], dW_down[:, n] = sum_m h dy[m]
One row kernel stores dh per packed slot (W_down^T rows, dot products); the next streams the
W_gate / W_up rows into dx (no dot product: g and u come from the forward). The weight gradients
walk a by-unit index of the slots (built on the device: atomic cursors, or a bit transpose +
counting sort in row order when deterministic) in K slices. Units whose list does not fit E walk
their column of the bitmask, and entries of rows above W are recomputed (dot products) wherever
they are needed. No step reads a size back to the host.

Determinism: with ``deterministic=True`` (default: ``torch.are_deterministic_algorithms_enabled()``)
every sum runs in a fixed order (one program per unit and K slice); otherwise each unit's list is
split in chunks for load balance and the chunks are added with fp32 atomics.

Dense dispatch: when the density measured by a previous call on the same weights is above
``TrainConfig.dense_density``, or on CUDA when the call has fewer than
``TrainConfig.dense_below_m`` tokens, the call runs the dense torch path (cuBLAS, same
statistics). The measured density reaches the host through a pinned copy and a CUDA event that is
only queried, never waited on, so no call synchronises.

Design notes and H100 measurements: ``docs/training-kernels.md``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _alloc
from .._checks import MAX_COLUMNS, check_ffn_args, check_tile_slots
from ..stats import FFNStats
from ._pairs import pairs_f32, row_pairs, store_pairs
from ._triton import can_run_triton, num_sms, pdl_ok
from .ffn_ref import tile_overflow_rows
from .gate_bits import gate_bits_ok, launch_gate_bits

__all__ = [
    "TrainConfig",
    "CONFIG",
    "ffn_train",
    "ffn_train_ref",
    "rows_forward",
]


@dataclass
class TrainConfig:
    """Knobs of the training kernels (tests and benchmarks may change the module's ``CONFIG``).

    row_capacity: W, active units per row kept in the packed row index; rows above it are walked
        through the bitmask (exact, slower per entry).
    chunk: entries of the by-unit index per weight-gradient program in the non-deterministic mode.
    dense_density: a call whose weights last measured a density above this runs the dense path
        (a guess between the measured points: sparse is 1.40x dense at 0.53 % on the H100, dense
        wins at 16 %; the crossover itself was not measured).
    """

    row_capacity: int = 256
    chunk: int = 128
    #: the backward's weight gradients walk the tokens in blocks of this many rows above it, each
    #: block with its own by-unit index, so that the x / dy rows of a block stay in L2 (0: one walk).
    #: H100, paper shape, M = 131072, iid: weight gradients 5.65 ms against 10.82 in one walk
    #: (blocks of 8192: 5.91, 32768: 5.63); at M = 16384 blocks of 8192 / 4096 were slower (iid
    #: 0.748 / 0.918 ms against 0.642, skewed 0.872 / 1.113 against 0.740)
    wgrad_block_rows: int = 16384
    dense_density: float = 0.05
    #: on CUDA, calls with fewer tokens run the dense path (launch and fixed costs dominate there):
    #: H100, paper shape, ~30 active units/token (twell bench at 2288833): sparse fwd+bwd ran at
    #: 0.27-0.33x dense for M = 1..256, 0.92x at M = 2048 and 1.66x at M = 16384. Between them,
    #: whole training steps of the 0.5b preset (twell train, 4 H200s, b1260e8, BENCHMARKS.md
    #: section 6; 6-110 active units per token): at 4096 tokens per call the steps on the kernels
    #: ran 0.86x those of a run on the dense torch reference over the same steps (140k against
    #: 163k tokens/s); at 8192 the sparse run's steps on the kernels ran 8 % slower than its
    #: earlier steps on the dense path (245k against 267k; the dense model's changed by 1 %); at
    #: 16384, 12 % faster (325k against 290k; the dense model 311k). Was 4096. The interpreter
    #: (CPU) ignores it: it runs for tests.
    dense_below_m: int = 16384
    #: launch shapes (see docs/training-kernels.md for the measurements behind them)
    #: columns per step of the pack kernel (32 x warps lanes x 8, 16 or 32 columns) and its warps.
    #: H100, paper shape, torch.profiler, _pack_lanes_kernel: M = 16384 256 columns 0.090 ms, 512
    #: 0.097, 1024 0.089 (0.0888 / 0.0888 in the prefill probe); M = 2048 17.0 / 16.9 / 14.6 us,
    #: M = 512 8.8 / 9.9 / 8.0 us (fewer, longer steps: more bytes in flight per warp where the
    #: grid is too small to fill the SMs). More warps per row were slower (the scan and the
    #: set-bit loop then cross warps): M = 2048 / 16384, 1024 columns, 2 warps 21.5 / 140 us,
    #: 4 warps 18.1-18.8 / 117 us, 4 warps x 4096 columns 24.2 / 164 us, against 15.1-15.6 / 88-91
    #: at 1 warp (benchmarks/results/prefill-rows-sweep-h100-2026-11-26i.log)
    pack_block: int = 1024
    pack_warps: int = 1
    #: the gate GEMM of the forward: "auto" runs ``gate_bits`` (a Triton GEMM that also writes the
    #: bitmask of g's active entries, so the pack reads it instead of all of g) on Hopper and newer
    #: in 16-bit dtypes from gate_bits_min_m rows, cuBLAS otherwise; "never": cuBLAS; "always":
    #: gate_bits wherever its TMA alignment holds (the CPU interpreter too, for tests)
    gate_bits: str = "auto"
    #: (H100, paper shape, 30 units iid, same process: M = 2048 167.5-168.0 us against 162.5-164.6,
    #: the GEMM 74.8 against cuBLAS's 61.1 (the tail of its 128 x 256 tiles; 64-row tiles slower)
    #: and the pack 5.6 against 13.8; 4096 303.3-305.7 against 305.8-306.0 and 307.7 against
    #: 307.4-308.0; 8192 556.0-556.2 against 569.3-569.6; 16384 and 131072 2-3 % faster)
    gate_bits_min_m: int = 4096
    #: warps per row of the pack from the bitmask (H100, paper shape, prefill at 30 units iid:
    #: M = 16384 1.085 ms with 2 against 1.091-1.095 with 1; 131072 8.95 against 9.02-9.03)
    pack_bits_warps: int = 2
    #: blocks of g the pack kernel loads ahead of the one it scans: 1 0.090 ms, 2 0.091, 0 0.099
    pack_prefetch: int = 1
    #: the pack walks the rows last to first, so that its first programs read the rows of g that
    #: the gate GEMM wrote last, while they are still in L2
    pack_reverse: bool = True
    row_group: int = 2
    row_warps: int = 4
    #: K columns per warp of the forward's first row pass in its int32-pair form (u of the slots;
    #: at least 2 warps, at most row_warps): 2 warps up to K = 4096. H100, 30 units iid, whole
    #: prefill, same process: paper shape, 2 warps against 4, two rounds: M = 1024 86.8-86.9 us
    #: against 87.4-87.9, 2048 156.5-156.6 against 157.1-158.3, 4096 298.3-298.5 against
    #: 298.9-300.2, 16384 1076.9-1077.0 against 1078.8-1079.2 (2 warps in both passes: slower at
    #: 1024 / 2048); Llama-3-8B shape (K = 4096), two rounds: M = 2048 570.0-573.4 against
    #: 576.4-577.8, 16384 4496-4500 against 4492-4505
    up_block_k: int = 2048
    #: the forward's rows in two passes (g and u of the slots, then y), one weight matrix in L2
    #: per pass, as the dx rows: 0.557-0.560 ms against 0.701 in one pass (H100, paper shape,
    #: M = 16384; Nsight Compute: one pass 58 % L2 hit rate, 1.18 GB read from DRAM)
    fwd_two_passes: bool = True
    #: the two passes read 16-bit rows (x, W_up, W_down^T) as int32 pairs of elements
    fwd_pairs: bool = True
    #: programmatic dependent launch of the forward's pack, row and statistics kernels (sm_90+)
    pdl: bool = True
    #: warps of the dx row kernel (8: 0.568-0.569 ms against 0.573 at M = 16384, H100)
    dx_warps: int = 4
    #: entries per step of the dx row kernel (4: 0.530 ms against 0.546-0.547 for 2, H100, paper
    #: shape, M = 16384, both passes)
    dx_group: int = 4
    #: dx in two passes (W_gate term, then W_up term), one weight matrix in L2 per pass
    #: (0.544-0.551 ms against 0.573-0.576 in one, H100, paper shape, M = 16384)
    dx_two_passes: bool = True
    fill_words: int = 32
    #: weight gradients (main launch): entries per step, K columns per program, warps, and
    #: persistent programs per SM and K slice. H100, paper shape, M = 16384 (torch.profiler, after
    #: the int32 slot division): 4 / 512 / 1 warp / 32 0.643-0.645 ms (152 registers); 2 entries
    #: at 1 warp 0.709, at 2 warps 0.753 (4 entries 0.724), at 4 warps 0.884; 8 entries 1.043;
    #: 256 columns 0.643 (8 entries 0.805); 1024 columns 0.779; 64 / 16 programs 0.653 / 0.686.
    #: Fewer warps per slice: the per-entry scalar work (slot, g, u, dh loads, the l1 term) is
    #: issued once per warp, and Nsight Compute had the 4-warp kernel issue-bound (SM 85 %).
    #: 256 columns x 64 programs (70 registers): iid 0.645 against 0.643, skewed 0.747 against
    #: 0.900 (its walk missed L2 more often: 58 % hits against 73 % iid at 512 columns)
    unit_group: int = 4
    unit_block_k: int = 256
    unit_warps: int = 1
    unit_programs: int = 64


CONFIG = TrainConfig()


# ---------------------------------------------------------------------------------------------
# reference (plain torch)
# ---------------------------------------------------------------------------------------------
def ffn_train_ref(x, w_gate, w_up, w_down, *, tile: int = 256, slots: int = 32, unit_counts: bool = False):
    """The dense torch path: ``x [M, K]`` -> ``(y [M, K], FFNStats)`` through autograd.

    Also the dense dispatch target, so it computes its statistics in one pass over the gate's
    activity (the oracle ``sparse_ffn_ref`` pads to int32 tiles and costs ~0.4 ms more at the paper
    shape)."""
    M = x.shape[0]
    N = w_gate.shape[0]
    g = F.linear(x, w_gate)
    h = torch.relu(g) * F.linear(x, w_up)
    y = F.linear(h, w_down)
    l1 = torch.linalg.vector_norm(h, 1, dtype=torch.float32) / max(M, 1)
    with torch.no_grad():
        if g.is_cuda and not unit_counts and M > 0 and not torch.compiler.is_compiling():
            # l0 and overflowing rows in one kernel (the torch form below is 7 small kernels:
            # ~20 us per call at small M on the H100)
            l0, over = _gate_stats(g.detach(), tile, slots)
            return y, FFNStats(l0=l0, l1=l1, overflow_rows=over, unit_counts=None, tokens=M)
        act = g > 0
        if N % tile == 0:
            per_tile = act.view(M, N // tile, tile).sum(-1, dtype=torch.int32)  # one pass gives l0 too
            l0 = per_tile.sum(dtype=torch.float32) / max(M, 1)
            over = (per_tile > slots).any(dim=1).sum()
        else:
            l0 = act.sum(dtype=torch.float32) / max(M, 1)
            over = tile_overflow_rows(act, tile, slots)
        counts = act.sum(0, dtype=torch.int64) if unit_counts else None
    return y, FFNStats(l0=l0, l1=l1, overflow_rows=over, unit_counts=counts, tokens=M)


def _gate_stats(g: torch.Tensor, tile: int, slots: int):
    """``(l0, overflow_rows)`` of ``g [M, N]`` (active: g > 0) on CUDA: one kernel + one division."""
    M, N = g.shape
    cnt = torch.zeros(2, dtype=torch.int64, device=g.device)
    tps = max(1, min(triton.next_power_of_2(triton.cdiv(N, tile)), 8192 // tile))
    bm = max(1, min(triton.next_power_of_2(M), 8192 // (tps * tile)))
    _gate_stats_kernel[(triton.cdiv(M, bm),)](
        g, cnt, M, N, g.stride(0), S=slots, T=tile, TPS=tps, BM=bm, num_warps=4
    )
    return cnt[0] / M, cnt[1]


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gate_stats_kernel(
    g_ptr, cnt_ptr, M, N, stride_gm, S: tl.constexpr, T: tl.constexpr, TPS: tl.constexpr, BM: tl.constexpr
):
    # BM rows, TPS tiles of T columns per step: active count (g > 0) and rows with a tile holding
    # more than S, added into cnt [2] (int64, exact and order-independent)
    i_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_m = i_m < M
    o_c = tl.arange(0, TPS)[:, None] * T + tl.arange(0, T)[None, :]
    tot = tl.zeros((BM,), dtype=tl.int32)
    over = tl.zeros((BM,), dtype=tl.int32)
    for n0 in range(0, N, TPS * T):
        o_n = n0 + o_c
        m = m_m[:, None, None] & (o_n < N)[None, :, :]
        b_g = tl.load(
            g_ptr + i_m[:, None, None].to(tl.int64) * stride_gm + o_n[None, :, :], mask=m, other=0.0
        )
        c = tl.sum((b_g > 0).to(tl.int32), axis=2)
        tot += tl.sum(c, axis=1)
        over = tl.maximum(over, tl.max((c > S).to(tl.int32), axis=1))
    tl.atomic_add(cnt_ptr, tl.sum(tot.to(tl.int64), axis=0))
    tl.atomic_add(cnt_ptr + 1, tl.sum(over.to(tl.int64), axis=0))


@triton.jit
def _ctz(lsb):
    # index of the single set bit of lsb (an int64 power of two below 2^32)
    r = ((lsb & 0xFFFF0000) != 0).to(tl.int64) * 16
    r += ((lsb & 0xFF00FF00) != 0).to(tl.int64) * 8
    r += ((lsb & 0xF0F0F0F0) != 0).to(tl.int64) * 4
    r += ((lsb & 0xCCCCCCCC) != 0).to(tl.int64) * 2
    r += ((lsb & 0xAAAAAAAA) != 0).to(tl.int64)
    return r


@triton.jit
def _popc(v):
    # set bits of v (int64 holding 32 bits)
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


@triton.jit
def _ctz_pow2(lsb):
    # index of the single set bit of the int32 lsb (bit 31 included): the exponent of its float
    # value, exact for every power of two (4 instructions against 10-15 for a bisection)
    return ((lsb.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _pack_lanes_kernel(
    g_ptr,
    gs_ptr,
    cols_ptr,
    cnt_ptr,
    bits_ptr,
    wpre_ptr,
    ovf_ptr,
    ucnt_ptr,
    N,
    NW,
    W,
    S,
    T: tl.constexpr,
    E: tl.constexpr,
    L: tl.constexpr,
    PREFETCH: tl.constexpr,
    REVERSE: tl.constexpr,
    PDL: tl.constexpr,
    UCNT: tl.constexpr = True,
):
    # one program per row of g, L = 32 x its warps lanes. H100, paper shape, M = 16384 (Nsight Compute): 46.1 M
    # instructions against 63.6 M for the earlier form, which held a 32-column word over 4 lanes,
    # and the same time (0.090 ms): what bounds it is memory, the read of g (a plain read of g took
    # 0.072 ms with a cold L2) and the bitmask / word-count stores (0.010 ms)
    i_m = _packed_row(REVERSE, PDL)
    n_act, ovf = _pack_row(
        g_ptr, gs_ptr, cols_ptr, bits_ptr, wpre_ptr, ucnt_ptr, i_m, N, NW, W, S, T, E, L, PREFETCH, UCNT
    )
    tl.store(cnt_ptr + i_m, n_act)
    tl.store(ovf_ptr + i_m, ovf)


@triton.jit
def _any_set(rem):
    # whether any element of rem ([L] or [L, WPL] bit chunks) still has a bit set
    a = (rem != 0).to(tl.int32)
    if len(a.shape) == 2:
        a = tl.max(a, axis=1)
    return tl.max(a, axis=0) > 0


@triton.jit
def _write_set_bits(rem, slot, col0, p_g, gs_ptr, cols_ptr, ucnt_ptr, i_m, W, UCNT: tl.constexpr):
    # the slots of a step's active units, one set bit of every chunk per turn (almost always one
    # turn): chunk bit j is column col0 + j of row i_m (p_g: that row of g), its rank slot (+ the
    # set bits below it); the column and g go to the row's slot if it is within W, and with UCNT
    # the unit's row count is added to
    while _any_set(rem):
        act = rem != 0
        lsb = rem & (-rem)
        col = col0 + _ctz_pow2(lsb)
        keep = act & (slot < W)
        tl.store(cols_ptr + i_m * W + slot, col, mask=keep)
        tl.store(gs_ptr + i_m * W + slot, tl.load(p_g + col, mask=keep, other=0.0), mask=keep)
        if UCNT:
            tl.atomic_add(ucnt_ptr + col, act.to(tl.int32), mask=act, sem="relaxed")
        slot += act.to(tl.int32)
        rem = rem ^ lsb


@triton.jit
def _pack_row(
    g_ptr,
    gs_ptr,
    cols_ptr,
    bits_ptr,
    wpre_ptr,
    ucnt_ptr,
    i_m,
    N,
    NW,
    W,
    S,
    T: tl.constexpr,
    E: tl.constexpr,
    L: tl.constexpr,
    PREFETCH: tl.constexpr,
    UCNT: tl.constexpr = True,
):
    # the packed pattern of row i_m of g; returns (active units, TwELL overflow flag). UCNT: also
    # add the row's active units into the per-unit counts (the backward's index, unit_counts). A step is
    # L lanes (the program's threads) x E consecutive columns (one vector load per lane), so every
    # per-step quantity stays inside a lane: the lane's E active flags as an E-bit chunk of the
    # bitmask (stored as is: E = 8 / 16 / 32 bits are a byte / half word / word of the
    # little-endian int32 words), its count, and one scan of the counts for the ranks. Lanes then
    # write their active units' slots (cols, g at the slot, the per-unit count) one set bit per
    # turn, almost always one turn. No layout conversion or cross-lane reduction per word.
    C: tl.constexpr = L * E
    p_g = g_ptr + i_m * N
    o_t = tl.arange(0, L)
    o_e = tl.arange(0, E)
    o_b = o_t[:, None] * E + o_e[None, :]  # [L, E] columns of a step
    if E == 8:
        p_bits = bits_ptr.to(tl.pointer_type(tl.uint8), bitcast=True) + i_m * NW * 4
    elif E == 16:
        p_bits = bits_ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + i_m * NW * 2
    else:
        p_bits = bits_ptr + i_m * NW
    n_act = tl.sum(tl.zeros([L], dtype=tl.int32), axis=0)
    ovf = n_act
    run = n_act
    if PREFETCH >= 1:
        b_nxt = tl.load(p_g + o_b, mask=o_b < N, other=0.0)
    if PREFETCH >= 2:
        b_nxt2 = tl.load(p_g + C + o_b, mask=C + o_b < N, other=0.0)
    for n0 in range(0, N, C):
        o_n = n0 + o_b
        m_n = o_n < N
        if PREFETCH >= 2:
            b_g = b_nxt
            b_nxt = b_nxt2
            b_nxt2 = tl.load(p_g + 2 * C + o_n, mask=2 * C + o_n < N, other=0.0)
        elif PREFETCH == 1:
            # the next step's block is loaded before this one is scanned (two loads in flight)
            b_g = b_nxt
            b_nxt = tl.load(p_g + C + o_n, mask=C + o_n < N, other=0.0)
        else:
            b_g = tl.load(p_g + o_n, mask=m_n, other=0.0)
        a_i = (((b_g > 0) | (b_g != b_g)) & m_n).to(tl.int32)
        # distinct bits: the sum is the bitwise or (bit 31 lands on the int32 sign, no carries)
        chunk = tl.sum(a_i << o_e[None, :], axis=1)  # [L]
        c_t = tl.sum(a_i, axis=1)
        below = n_act + tl.cumsum(c_t, axis=0) - c_t  # active units of the row before each lane
        s = tl.sum(c_t, axis=0)
        o_c = n0 // E + o_t  # chunk index of each lane in the row
        tl.store(p_bits + o_c, chunk.to(p_bits.dtype.element_ty), mask=o_c < NW * (32 // E))
        # a word starts every 32 // E lanes
        m_w = ((o_t % (32 // E)) == 0) & (o_c < NW * (32 // E))
        tl.store(wpre_ptr + i_m * NW + o_c // (32 // E), below, mask=m_w)
        if s > 0:
            _write_set_bits(chunk, below, n0 + o_t * E, p_g, gs_ptr, cols_ptr, ucnt_ptr, i_m, W, UCNT)
        # TwELL overflow statistic: a tile of T columns with more than S active units
        if T < E:
            t_c = tl.sum(tl.reshape(a_i, (L, E // T, T)), axis=2)
            ovf = ovf | (tl.max(tl.max(t_c, axis=1), axis=0) > S).to(tl.int32)
        elif T < C:
            t_c = tl.sum(tl.reshape(c_t, (C // T, T // E)), axis=1)
            ovf = ovf | (tl.max(t_c, axis=0) > S).to(tl.int32)
        else:
            run += s
            if ((n0 + C) % T == 0) | (n0 + C >= N):
                ovf = ovf | (run > S).to(tl.int32)
                run = run * 0
        n_act += s
    return n_act, ovf


@triton.jit
def _packed_row(REVERSE: tl.constexpr, PDL: tl.constexpr):
    # the row a pack program takes (rows walked last to first with REVERSE, so that the first
    # programs read the rows the gate GEMM wrote last), once the previous kernel is done
    _after_previous(PDL)
    i_m = tl.program_id(0).to(tl.int64)
    if REVERSE:
        i_m = tl.num_programs(0) - 1 - i_m
    return i_m


@triton.jit
def _pack_bits_kernel(
    g_ptr,
    gs_ptr,
    cols_ptr,
    cnt_ptr,
    bits_ptr,
    wpre_ptr,
    ovf_ptr,
    ucnt_ptr,
    N,
    NW,
    W,
    S,
    T: tl.constexpr,
    L: tl.constexpr,
    WPL: tl.constexpr,
    REVERSE: tl.constexpr,
    PDL: tl.constexpr,
    UCNT: tl.constexpr = True,
):
    # _pack_lanes_kernel's outputs for one row of g whose bitmask words gate_bits already wrote:
    # a step loads WPL consecutive words per lane (L x WPL >= 128 words, so no tile of T <= 4096
    # columns straddles two steps), and g is read only at the active entries. Two dependent round
    # trips per step (the words, then g at the first set bit of every word; a word with more set
    # bits takes one more turn) instead of one per 32 x L columns of g.
    i_m = _packed_row(REVERSE, PDL)
    o = tl.arange(0, L)[:, None] * WPL + tl.arange(0, WPL)[None, :]  # [L, WPL] words of a step
    n_act = tl.sum(tl.zeros([L], dtype=tl.int32), axis=0)
    ovf = n_act
    for w0 in range(0, NW, L * WPL):
        o_w = w0 + o
        m_w = o_w < NW
        wd = tl.load(bits_ptr + i_m * NW + o_w, mask=m_w, other=0)
        w64 = wd.to(tl.int64) & 0xFFFFFFFF
        c = _popc(w64).to(tl.int32)
        c_f = tl.reshape(c, (L * WPL,))
        below = n_act + tl.reshape(tl.cumsum(c_f, axis=0) - c_f, (L, WPL))  # active before each word
        tl.store(wpre_ptr + i_m * NW + o_w, below, mask=m_w)
        s = tl.sum(c_f, axis=0)
        if s > 0:
            _write_set_bits(wd, below, o_w * 32, g_ptr + i_m * N, gs_ptr, cols_ptr, ucnt_ptr, i_m, W, UCNT)
        # TwELL overflow statistic: a tile of T columns with more than S active units
        if T < 32:
            for j in tl.static_range(32 // T):
                t_c = _popc((w64 >> (j * T)) & ((1 << T) - 1))
                ovf = ovf | (tl.max(tl.max(t_c, axis=1), axis=0) > S).to(tl.int32)
        else:
            t_c = tl.sum(tl.reshape(c_f, (L * WPL // (T // 32), T // 32)), axis=1)
            ovf = ovf | (tl.max(t_c, axis=0) > S).to(tl.int32)
        n_act += s
    tl.store(cnt_ptr + i_m, n_act)
    tl.store(ovf_ptr + i_m, ovf)


@triton.jit
def _after_previous(PDL: tl.constexpr):
    # kernels launched with programmatic dependent launch start while the previous kernel's
    # grid drains: wait here until it has completed and its writes are visible
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _fwd_stats_kernel(
    l1_ptr, cnt_ptr, ovf_ptr, out_l1_ptr, out_l0_ptr, out_over_ptr, M, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    # one program, fixed order: per-row sum |h|, active counts and overflow flags -> l1 and l0
    # (means over the rows), overflowing rows. Replaces 8 small torch kernels (reductions, dtype
    # conversions, divisions: about 25 us of device time at M = 16384 on the H100)
    _after_previous(PDL)
    o = tl.arange(0, BLOCK)
    a_l1 = tl.zeros([BLOCK], dtype=tl.float32)
    a_cnt = tl.zeros([BLOCK], dtype=tl.int64)
    a_ovf = tl.zeros([BLOCK], dtype=tl.int64)
    for m0 in range(0, M, BLOCK):
        i = m0 + o
        m = i < M
        a_l1 += tl.load(l1_ptr + i, mask=m, other=0.0)
        a_cnt += tl.load(cnt_ptr + i, mask=m, other=0).to(tl.int64)
        a_ovf += tl.load(ovf_ptr + i, mask=m, other=0).to(tl.int64)
    denom = tl.maximum(M, 1).to(tl.float32)
    tl.store(out_l1_ptr, tl.sum(a_l1, axis=0) / denom)
    tl.store(out_l0_ptr, tl.sum(a_cnt, axis=0).to(tl.float32) / denom)
    tl.store(out_over_ptr, tl.sum(a_ovf, axis=0))


@triton.jit
def _l1_term(c1, u):
    # gradient of the l1 term with respect to h at active entries: c1 sign(h) = c1 sign(u), g > 0
    return c1 * ((u > 0).to(tl.float32) - (u < 0).to(tl.float32))


@triton.jit
def _ids(ptr, j, n, G: tl.constexpr):
    # entries [j, j + G) of a list of n int32 ids at ptr (0 past its end)
    o = j + tl.arange(0, G)
    return tl.load(ptr + o, mask=o < n, other=0)


@triton.jit
def _wu_rows(wu32, i_n, ok, K, o_p, m_p):
    # raw int32 pairs [G, K // 2] of the W_up rows i_n [G] (nothing loaded where ok is false),
    # widened only where they are used
    return tl.load(wu32 + i_n[:, None] * (K // 2) + o_p[None, :], mask=ok[:, None] & m_p[None, :], other=0)


@triton.jit
def _slot_pair(cols_ptr, gs_ptr, us_ptr, p, ok0, ok1):
    # unit ids and h = g u of the slots p and p + 1 (0 where not ok)
    n0 = tl.load(cols_ptr + p, mask=ok0, other=0).to(tl.int64)
    n1 = tl.load(cols_ptr + p + 1, mask=ok1, other=0).to(tl.int64)
    h0 = tl.load(gs_ptr + p, mask=ok0, other=0.0).to(tl.float32) * tl.load(
        us_ptr + p, mask=ok0, other=0.0
    ).to(tl.float32)
    h1 = tl.load(gs_ptr + p + 1, mask=ok1, other=0.0).to(tl.float32) * tl.load(
        us_ptr + p + 1, mask=ok1, other=0.0
    ).to(tl.float32)
    return n0, n1, h0, h1


@triton.jit
def _fwd_slots_pairs(
    x_ptr,
    wu_ptr,
    wdt_ptr,
    cols_ptr,
    y_ptr,
    l1_ptr,
    gs_ptr,
    us_ptr,
    i_m,
    n_act,
    K,
    W,
    G: tl.constexpr,
    BK: tl.constexpr,
    PART: tl.constexpr,
    EVEN_K: tl.constexpr,
    BF16: tl.constexpr,
):
    # the rows within W of the two-pass forward for 16-bit x and weights and an even K: every row
    # is read as int32 pairs (even / odd elements). H100, paper shape, M = 16384: the [G, BK] bf16
    # tiles issued ~100 instructions per (entry, thread) in the second pass (bf16 unpack in two
    # instructions per element, products summed over G before the accumulation), against ~65 here
    HK: tl.constexpr = BK // 2
    o_p = tl.arange(0, HK)
    m_p = o_p < K // 2
    if PART == 1:
        # u of the slots: G entries per step; past the row's count the row index is 0 (a valid
        # row) and the dot product is not stored
        x_e, x_o = row_pairs(
            x_ptr.to(tl.pointer_type(tl.int32), bitcast=True), i_m, K, o_p, m_p, EVEN_K, BF16
        )
        wu32 = wu_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        o_g = tl.arange(0, G)
        row_cols = cols_ptr + i_m * W
        # pipelined by hand (Triton 3.6 does not pipeline this loop): the ids of the step after
        # next and the raw W_up rows of the next step are loaded before this step's dot products,
        # so that neither round trip waits behind the cross-warp reduction. H100, paper shape,
        # 30 units iid, whole prefill: M = 2048 158.2-159.2 us against 159.6-160.8, M = 16384
        # 1075-1076 against 1083 (trials-h100-2026-11-27e)
        i_nn = _ids(row_cols, G, n_act, G).to(tl.int64)
        v = _wu_rows(wu32, _ids(row_cols, 0, n_act, G).to(tl.int64), o_g < n_act, K, o_p, m_p)
        for j0 in range(0, n_act, G):
            i_n3 = _ids(row_cols, j0 + 2 * G, n_act, G).to(tl.int64)
            v_n = _wu_rows(wu32, i_nn, j0 + G + o_g < n_act, K, o_p, m_p)
            lo, hi = pairs_f32(v, BF16)
            b_u = tl.sum(lo * x_e[None, :] + hi * x_o[None, :], axis=1)
            tl.store(us_ptr + i_m * W + j0 + o_g, b_u, mask=j0 + o_g < n_act)
            v = v_n
            i_nn = i_n3
    else:
        # y = sum of h W_down^T rows, two entries per step, one FMA per element and entry (the
        # second entry's row is masked past the count: h = 0 must not meet a non-finite weight)
        wdt32 = wdt_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        b_ye = tl.zeros([HK], dtype=tl.float32)
        b_yo = tl.zeros([HK], dtype=tl.float32)
        l1 = tl.sum(b_ye, axis=0)
        # the ids and h of the next two entries are loaded a step ahead (as in the first pass),
        # so that each step's W_down^T rows are requested at its start
        p_s = i_m * W
        n0, n1, h0, h1 = _slot_pair(cols_ptr, gs_ptr, us_ptr, p_s, 0 < n_act, 1 < n_act)
        for j0 in range(0, n_act, 2):
            ok1 = j0 + 1 < n_act
            n_n0, n_n1, n_h0, n_h1 = _slot_pair(
                cols_ptr, gs_ptr, us_ptr, p_s + j0 + 2, j0 + 2 < n_act, j0 + 3 < n_act
            )
            lo0, hi0 = row_pairs(wdt32, n0, K, o_p, m_p, EVEN_K, BF16)
            m_1 = o_p < tl.where(ok1, K // 2, 0)  # (m_p & ok1 as one comparison)
            lo1, hi1 = pairs_f32(tl.load(wdt32 + n1 * (K // 2) + o_p, mask=m_1, other=0), BF16)
            b_ye += h0 * lo0
            b_yo += h0 * hi0
            b_ye += h1 * lo1
            b_yo += h1 * hi1
            l1 += tl.abs(h0) + tl.abs(h1)
            n0, n1, h0, h1 = n_n0, n_n1, n_h0, n_h1
        # y rounded to x's dtype and stored as int32 pairs
        store_pairs(y_ptr, i_m * (K // 2) + o_p, b_ye, b_yo, m_p)
        tl.store(l1_ptr + i_m, l1)


@triton.jit
def _fwd_entry(n, g_row, b_x, b_y, l1, wu_ptr, wdt_ptr, o_k, m_k, K):
    b_g = tl.load(g_row + n).to(tl.float32)
    b_wu = tl.load(wu_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_u = tl.sum(b_x * b_wu, axis=0)
    b_h = b_g * b_u
    b_wd = tl.load(wdt_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    return b_y + b_h * b_wd, l1 + tl.abs(b_h)


@triton.jit
def _fwd_rows_kernel(
    x_ptr,
    g_ptr,
    wu_ptr,
    wdt_ptr,
    cols_ptr,
    cnt_ptr,
    bits_ptr,
    y_ptr,
    l1_ptr,
    gs_ptr,
    us_ptr,
    N,
    K,
    NW,
    W,
    G: tl.constexpr,
    BK: tl.constexpr,
    PART: tl.constexpr,
    PAIRS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BF16: tl.constexpr,
    PDL: tl.constexpr,
):
    # rows within W also store u per packed slot (x's dtype, as dense autograd keeps it; the pack
    # stored g there): the backward then needs no dot product for them. g from the pack instead
    # of a gather from the dense g: rows 0.530 ms against 0.575 (H100, paper shape, M = 16384,
    # iid; skewed 0.469 against 0.523), for 0.031 ms more in the per-column form of the pack
    # (0.130 against 0.099; the per-set-bit form was not timed without the g store)
    # PART 0: one pass. 1: g and u of the slots only (rows within W; W_up in L2); 2: y and l1 from
    # the stored g and u (W_down^T in L2), and the rows above W, which walk their bitmask.
    _after_previous(PDL)
    i_m = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_y = tl.zeros([BK], dtype=tl.float32)
    l1 = tl.sum(b_y, axis=0)
    g_row = g_ptr + i_m * N
    n_act = tl.load(cnt_ptr + i_m)
    if PAIRS and (PART != 0) and (n_act <= W):
        _fwd_slots_pairs(
            x_ptr, wu_ptr, wdt_ptr, cols_ptr, y_ptr, l1_ptr, gs_ptr, us_ptr, i_m, n_act, K, W,
            G, BK, PART, EVEN_K, BF16,
        )  # fmt: skip
    elif n_act <= W:
        if PART != 2:
            b_x = tl.load(x_ptr + i_m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        o_g = tl.arange(0, G)
        row_cols = cols_ptr + i_m * W
        for j0 in range(0, n_act, G):
            m_g = j0 + o_g < n_act
            i_n = _ids(row_cols, j0, n_act, G).to(tl.int64)
            m_t = m_g[:, None] & m_k[None, :]
            p_s = i_m * W + j0 + o_g
            if PART == 2:
                b_gv = tl.load(gs_ptr + p_s, mask=m_g, other=0.0).to(tl.float32)
                b_u = tl.load(us_ptr + p_s, mask=m_g, other=0.0).to(tl.float32)
            else:
                b_gv = tl.load(gs_ptr + p_s, mask=m_g, other=0.0).to(tl.float32)
                # [G, BK] rows of W_up
                b_wu = tl.load(wu_ptr + i_n[:, None] * K + o_k[None, :], mask=m_t, other=0.0).to(tl.float32)
                b_u = tl.sum(b_wu * b_x[None, :], axis=1)
                tl.store(us_ptr + p_s, b_u, mask=m_g)
            if PART != 1:
                b_h = b_gv * b_u
                # [G, BK] rows of W_down^T
                b_wd = tl.load(wdt_ptr + i_n[:, None] * K + o_k[None, :], mask=m_t, other=0.0).to(tl.float32)
                b_y += tl.sum(b_h[:, None] * b_wd, axis=0)
                l1 += tl.sum(tl.abs(b_h), axis=0)
        if PART != 1:
            tl.store(y_ptr + i_m * K + o_k, b_y, mask=m_k)
            tl.store(l1_ptr + i_m, l1)
    elif PART != 1:
        b_x = tl.load(x_ptr + i_m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        for i_w in range(0, NW):
            word = tl.load(bits_ptr + i_m * NW + i_w).to(tl.int64) & 0xFFFFFFFF
            while word != 0:
                lsb = word & (-word)
                n = i_w * 32 + _ctz(lsb)
                b_y, l1 = _fwd_entry(n, g_row, b_x, b_y, l1, wu_ptr, wdt_ptr, o_k, m_k, K)
                word = word ^ lsb
        tl.store(y_ptr + i_m * K + o_k, b_y, mask=m_k)
        tl.store(l1_ptr + i_m, l1)


@triton.jit
def _bwd_entry(n, b_x, b_dy, b_dx, c1, wg_ptr, wu_ptr, wdt_ptr, o_k, m_k, K):
    b_wg = tl.load(wg_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_wu = tl.load(wu_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_wd = tl.load(wdt_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_g = tl.sum(b_x * b_wg, axis=0)
    b_u = tl.sum(b_x * b_wu, axis=0)
    b_dh = tl.sum(b_dy * b_wd, axis=0)
    b_dh += _l1_term(c1, b_u)
    return b_dx + (b_dh * b_u) * b_wg + (b_dh * b_g) * b_wu


@triton.jit
def _bwd_rows_kernel(
    x_ptr,
    dy_ptr,
    wg_ptr,
    wu_ptr,
    wdt_ptr,
    cols_ptr,
    cnt_ptr,
    bits_ptr,
    c1_ptr,
    dx_ptr,
    gs_ptr,
    us_ptr,
    dh_ptr,
    K,
    NW,
    W,
    G: tl.constexpr,
    BK: tl.constexpr,
    PART: tl.constexpr,
):
    # dx of one row. Rows within W: dg = dh u and du = dh g from the per-slot g, u (stored by the
    # forward) and dh (stored by _dh_rows_kernel), so dx = sum_n dg W_gate[n] +
    # du W_up[n] streams weight rows with no reduction over K. PART 0: both terms in one pass;
    # 1: the W_gate term, stored; 2: the W_up term, added to the stored dx (one weight matrix in L2
    # per pass). Rows above W walk their bitmask and recompute g, u, dh by dot products (PART 0
    # and 1; PART 2 leaves them). dh of the slots excludes the l1 term, added here: dh += c1 sign(u).
    i_m = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    n_act = tl.load(cnt_ptr + i_m)
    c1 = tl.load(c1_ptr)
    if n_act <= W:
        if PART == 2:
            b_dx = tl.load(dx_ptr + i_m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        else:
            b_dx = tl.zeros([BK], dtype=tl.float32)
        o_g = tl.arange(0, G)
        row_cols = cols_ptr + i_m * W
        for j0 in range(0, n_act, G):
            m_g = j0 + o_g < n_act
            i_n = _ids(row_cols, j0, n_act, G).to(tl.int64)
            m_t = m_g[:, None] & m_k[None, :]
            p_w = i_n[:, None] * K + o_k[None, :]
            p_s = i_m * W + j0 + o_g
            b_u = tl.load(us_ptr + p_s, mask=m_g, other=0.0).to(tl.float32)
            b_dh = tl.load(dh_ptr + p_s, mask=m_g, other=0.0).to(tl.float32)
            b_dh += _l1_term(c1, b_u)
            if PART != 2:
                b_dg = b_dh * b_u
                b_wg = tl.load(wg_ptr + p_w, mask=m_t, other=0.0).to(tl.float32)
                b_dx += tl.sum(b_dg[:, None] * b_wg, axis=0)
            if PART != 1:
                b_du = b_dh * tl.load(gs_ptr + p_s, mask=m_g, other=0.0).to(tl.float32)
                b_wu = tl.load(wu_ptr + p_w, mask=m_t, other=0.0).to(tl.float32)
                b_dx += tl.sum(b_du[:, None] * b_wu, axis=0)
        tl.store(dx_ptr + i_m * K + o_k, b_dx, mask=m_k)
    elif PART != 2:
        b_x = tl.load(x_ptr + i_m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_dy = tl.load(dy_ptr + i_m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_dx = tl.zeros([BK], dtype=tl.float32)
        for i_w in range(0, NW):
            word = tl.load(bits_ptr + i_m * NW + i_w).to(tl.int64) & 0xFFFFFFFF
            while word != 0:
                lsb = word & (-word)
                n = i_w * 32 + _ctz(lsb)
                b_dx = _bwd_entry(n, b_x, b_dy, b_dx, c1, wg_ptr, wu_ptr, wdt_ptr, o_k, m_k, K)
                word = word ^ lsb
        tl.store(dx_ptr + i_m * K + o_k, b_dx, mask=m_k)


@triton.jit
def _dh_rows_kernel(dy_ptr, wdt_ptr, cols_ptr, cnt_ptr, dh_ptr, K, W, G: tl.constexpr, BK: tl.constexpr):
    # dh = dy . W_down[:, n] at the packed slots of rows within W (without the l1 term, which its
    # readers add from u; rows above W: _bwd_rows_kernel and the weight gradients recompute).
    i_m = tl.program_id(0).to(tl.int64)
    n_act = tl.load(cnt_ptr + i_m)
    if n_act <= W:
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        b_dy = tl.load(dy_ptr + i_m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        o_g = tl.arange(0, G)
        row_cols = cols_ptr + i_m * W
        for j0 in range(0, n_act, G):
            m_g = j0 + o_g < n_act
            i_n = _ids(row_cols, j0, n_act, G).to(tl.int64)
            # [G, BK] rows of W_down^T
            b_wd = tl.load(
                wdt_ptr + i_n[:, None] * K + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0
            )
            b_dh = tl.sum(b_wd.to(tl.float32) * b_dy[None, :], axis=1)
            tl.store(dh_ptr + i_m * W + j0 + o_g, b_dh, mask=m_g)


@triton.jit
def _transpose_kernel(
    src_ptr, dst_ptr, R, C, zero_ptr, n_zero, BR: tl.constexpr, BC: tl.constexpr, ZB: tl.constexpr
):
    # dst [C, R] = src [R, C]^T, cast to dst's dtype on the store. ZB > 0: each program also
    # zeroes its ZB int32 of zero_ptr[:n_zero] (the forward's counts: one launch fewer)
    if ZB > 0:
        o_z = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * ZB + tl.arange(0, ZB)
        tl.store(zero_ptr + o_z, tl.zeros([ZB], dtype=tl.int32), mask=o_z < n_zero)
    i_r = tl.program_id(0) * BR + tl.arange(0, BR)
    i_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_r = i_r < R
    m_c = i_c < C
    b_v = tl.load(src_ptr + i_r[:, None].to(tl.int64) * C + i_c[None, :], mask=m_r[:, None] & m_c[None, :])
    tl.store(
        dst_ptr + i_c[:, None].to(tl.int64) * R + i_r[None, :],
        tl.trans(b_v),
        mask=m_c[:, None] & m_r[None, :],
    )


@triton.jit
def _transpose_bits_kernel(bits_ptr, tbits_ptr, M, NW, MW):
    # one 32 x 32 bit block: rows 32*i_mw.., units 32*i_w..
    i_mw = tl.program_id(0).to(tl.int64)
    i_w = tl.program_id(1).to(tl.int64)
    o_r = tl.arange(0, 32)
    m_r = i_mw * 32 + o_r < M
    b_row = tl.load(bits_ptr + (i_mw * 32 + o_r) * NW + i_w, mask=m_r, other=0).to(tl.int64) & 0xFFFFFFFF
    o_b = tl.arange(0, 32).to(tl.int64)
    b_bit = (b_row[:, None] >> o_b[None, :]) & 1  # [32 rows, 32 units]
    b_t = tl.sum(b_bit << o_r[:, None].to(tl.int64), axis=0)  # [32 units]
    tl.store(tbits_ptr + (i_w * 32 + o_b) * MW + i_mw, b_t.to(tl.int32))


@triton.jit
def _fill_units_kernel(
    tbits_ptr, bits_ptr, wpre_ptr, cnt_ptr, uoff_ptr, slots_ptr, heavy_ptr, NW, MW, W, E, BW: tl.constexpr
):
    # counting sort: unit n's entries, rows in increasing order, at [uoff[n], uoff[n + 1]); an
    # entry is m * W + j (j = rank of n in row m's packed index) or -1 - m for a row above W (and
    # heavy[n] = 1); positions past the capacity E are dropped (those units walk their column of
    # the bitmask)
    i_n = tl.program_id(0).to(tl.int64)
    base = tl.load(uoff_ptr + i_n)
    if base < E:
        o_i = tl.arange(0, BW * 32)
        i_wn = i_n // 32
        below = (tl.full([BW * 32], 1, tl.int64) << (i_n % 32)) - 1
        for w0 in range(0, MW, BW):
            o_w = w0 + o_i // 32
            word = tl.load(tbits_ptr + i_n * MW + o_w, mask=o_w < MW, other=0).to(tl.int64) & 0xFFFFFFFF
            b_a = ((word >> (o_i % 32).to(tl.int64)) & 1).to(tl.int32)
            b_rank = base + tl.cumsum(b_a, axis=0) - 1
            m_s = (b_a != 0) & (b_rank < E)
            i_m = (w0 * 32 + o_i).to(tl.int64)
            b_rw = tl.load(bits_ptr + i_m * NW + i_wn, mask=m_s, other=0).to(tl.int64) & 0xFFFFFFFF
            b_j = tl.load(wpre_ptr + i_m * NW + i_wn, mask=m_s, other=0).to(tl.int64) + _popc(b_rw & below)
            b_c = tl.load(cnt_ptr + i_m, mask=m_s, other=0)
            b_slot = tl.where(b_c <= W, i_m * W + b_j, -1 - i_m)
            tl.store(slots_ptr + b_rank, b_slot.to(tl.int32), mask=m_s)
            if tl.sum((m_s & (b_c > W)).to(tl.int32), axis=0) > 0:
                tl.store(heavy_ptr + i_n, 1)
            base += tl.sum(b_a, axis=0)


@triton.jit
def _scatter_units_kernel(
    cols_ptr, cnt_ptr, bits_ptr, uoff_ptr, cur_ptr, slots_ptr, heavy_ptr, NW, W, E, BS: tl.constexpr
):
    # by-unit index through atomic cursors (order inside a unit is arbitrary): entry (m, n) goes to
    # uoff[n] + cursor[n]++ as m * W + j (j its slot in row m's packed index), or as -1 - m for a
    # row above W (walked through its bitmask; heavy[n] = 1); positions past the capacity E are
    # dropped
    i_m = tl.program_id(0).to(tl.int64)
    n_act = tl.load(cnt_ptr + i_m)
    o_s = tl.arange(0, BS)
    if n_act <= W:
        for j0 in range(0, n_act, BS):
            m_s = j0 + o_s < n_act
            i_n = tl.load(cols_ptr + i_m * W + j0 + o_s, mask=m_s, other=0).to(tl.int64)
            old = tl.atomic_add(cur_ptr + i_n, 1, mask=m_s, sem="relaxed").to(tl.int64)
            pos = tl.load(uoff_ptr + i_n, mask=m_s, other=0) + old
            tl.store(slots_ptr + pos, (i_m * W + j0 + o_s).to(tl.int32), mask=m_s & (pos < E))
    else:
        o_b = tl.arange(0, 32)
        for i_w in range(0, NW):
            word = tl.load(bits_ptr + i_m * NW + i_w).to(tl.int64) & 0xFFFFFFFF
            if word != 0:
                m_s = ((word >> o_b.to(tl.int64)) & 1) != 0
                i_n = i_w * 32 + o_b.to(tl.int64)
                old = tl.atomic_add(cur_ptr + i_n, 1, mask=m_s, sem="relaxed").to(tl.int64)
                pos = tl.load(uoff_ptr + i_n, mask=m_s, other=0) + old
                tl.store(heavy_ptr + i_n, tl.full([32], 1, tl.int32), mask=m_s)
                tl.store(
                    slots_ptr + pos,
                    tl.zeros([32], dtype=tl.int32) + (-1 - i_m).to(tl.int32),
                    mask=m_s & (pos < E),
                )


@triton.jit
def _items_kernel(
    ucnt_ptr, uoff_ptr, item_first_ptr, item_end_ptr, multi_ptr, flags_ptr, N, E, CH, BN: tl.constexpr
):
    # one program: the by-unit offsets uoff [N + 1] (a running sum of the per-unit counts), the
    # weight-gradient work items of each unit (a unit whose list does not fit E is one item, the
    # others ceil(count / CH), at least 1): item_first / item_end [N] (running sum of items),
    # multi[n] (the unit's rows are summed with atomics: more than CH entries, or past E), and
    # flags [2, N] zeroed for the index kernels. In place of about fifteen small torch kernels.
    tl.store(uoff_ptr, tl.zeros([1], dtype=tl.int64).sum(axis=0))
    c_run = tl.zeros([1], dtype=tl.int64).sum(axis=0)
    i_run = tl.zeros([1], dtype=tl.int32).sum(axis=0)
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < N
        # counts and items in int32 (items <= E / CH + N); the running entry count in int64
        b_c = tl.load(ucnt_ptr + o_n, mask=m_n, other=0)
        b_end = c_run + tl.cumsum(b_c.to(tl.int64), axis=0)
        spilled = b_end > E
        b_i = tl.where(spilled, 1, tl.maximum((b_c + CH - 1) // CH, 1))
        b_i = tl.where(m_n, b_i, 0)
        b_iend = i_run + tl.cumsum(b_i, axis=0)
        tl.store(uoff_ptr + 1 + o_n, b_end, mask=m_n)
        tl.store(item_end_ptr + o_n, b_iend.to(tl.int64), mask=m_n)
        tl.store(item_first_ptr + o_n, (b_iend - b_i).to(tl.int64), mask=m_n)
        tl.store(multi_ptr + o_n, (spilled | (b_c > CH)).to(tl.int32), mask=m_n)
        zero = tl.zeros([BN], dtype=tl.int32)
        tl.store(flags_ptr + o_n, zero, mask=m_n)
        tl.store(flags_ptr + N + o_n, zero, mask=m_n)
        c_run += tl.sum(b_c.to(tl.int64), axis=0)
        i_run += tl.sum(b_i, axis=0)


@triton.jit
def _item_units_kernel(item_end_ptr, item_unit_ptr, N, n_items, STEPS, BI: tl.constexpr):
    # unit of each work item i < n_items: the first n with item_end[n] > i (N past the last item),
    # by a binary search of STEPS = bit length of N halvings
    o_i = tl.program_id(0) * BI + tl.arange(0, BI)
    lo = tl.zeros([BI], dtype=tl.int32)
    hi = lo + N
    for _ in range(STEPS):
        go = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(item_end_ptr + mid, mask=go, other=0)
        right = v <= o_i
        lo = tl.where(go & right, mid + 1, lo)
        hi = tl.where(go & ~right, mid, hi)
    tl.store(item_unit_ptr + o_i, lo, mask=o_i < n_items)


@triton.jit
def _dots_full(m, n, x_ptr, dy_ptr, wg_ptr, wu_ptr, wdt_ptr, c1, K, BKC: tl.constexpr):
    # g, u, dh (with the l1 term) of one entry (m, n), over the whole of K in BKC steps
    o_c = tl.arange(0, BKC)
    a_g = tl.zeros([BKC], dtype=tl.float32)
    a_u = tl.zeros([BKC], dtype=tl.float32)
    a_h = tl.zeros([BKC], dtype=tl.float32)
    for k0 in range(0, K, BKC):
        o_k = k0 + o_c
        m_k = o_k < K
        b_x = tl.load(x_ptr + m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_dy = tl.load(dy_ptr + m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        a_g += b_x * tl.load(wg_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        a_u += b_x * tl.load(wu_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        a_h += b_dy * tl.load(wdt_ptr + n * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_g = tl.sum(a_g, axis=0)
    b_u = tl.sum(a_u, axis=0)
    b_dh = tl.sum(a_h, axis=0) + _l1_term(c1, b_u)
    return b_g, b_u, b_dh


@triton.jit
def _wgrad_list_rows(
    a_g, a_u, a_d, start, stop, slots_ptr, gs_ptr, us_ptr, dh_ptr, x_ptr, dy_ptr, c1, W, K, o_k, m_k,
    G: tl.constexpr,
):  # fmt: skip
    # entries [start, stop) of one unit's list, every one a packed slot (no row above W): G per
    # step as G independent chains of scalar loads (slot -> g, u, dh and the x / dy row slices),
    # one-dimensional [BKC] rows, so no layout conversion (shared memory, barrier) per step
    for p0 in range(start, stop, G):
        for i in tl.static_range(G):
            ok = p0 + i < stop
            # int32 slot and row (E < 2**31): a 64-bit division costs twice the instructions
            b_s = tl.load(slots_ptr + p0 + i, mask=ok, other=0)
            b_g = tl.load(gs_ptr + b_s, mask=ok, other=0.0).to(tl.float32)
            b_u = tl.load(us_ptr + b_s, mask=ok, other=0.0).to(tl.float32)
            b_dh = tl.load(dh_ptr + b_s, mask=ok, other=0.0).to(tl.float32)
            b_dh += _l1_term(c1, b_u)
            m = (b_s // W).to(tl.int64)
            m_x = m_k & (o_k * 0 + p0 + i < stop)
            b_x = tl.load(x_ptr + m * K + o_k, mask=m_x, other=0.0).to(tl.float32)
            b_dy = tl.load(dy_ptr + m * K + o_k, mask=m_x, other=0.0).to(tl.float32)
            a_g += (b_dh * b_u) * b_x
            a_u += (b_dh * b_g) * b_x
            a_d += (b_g * b_u) * b_dy
    return a_g, a_u, a_d


@triton.jit
def _wgrad_list_tiles(
    a_g, a_u, a_d, start, stop, i_n, slots_ptr, gs_ptr, us_ptr, dh_ptr, x_ptr, dy_ptr, wg_ptr, wu_ptr,
    wdt_ptr, c1, W, K, o_k, m_k, G: tl.constexpr, BKC: tl.constexpr,
):  # fmt: skip
    # entries [start, stop) of unit i_n's list, G per step as [G, BKC] tiles; an entry -1 - m is a
    # row above W, whose g, u, dh are recomputed (full-K dot products)
    o_g = tl.arange(0, G)
    for p0 in range(start, stop, G):
        m_g = p0 + o_g < stop
        b_s = tl.load(slots_ptr + p0 + o_g, mask=m_g, other=0).to(tl.int64)
        b_ok = b_s >= 0
        b_m = tl.where(b_ok, b_s // W, -1 - b_s)
        m_v = m_g & b_ok
        b_g = tl.load(gs_ptr + b_s, mask=m_v, other=0.0).to(tl.float32)
        b_u = tl.load(us_ptr + b_s, mask=m_v, other=0.0).to(tl.float32)
        b_dh = tl.load(dh_ptr + b_s, mask=m_v, other=0.0).to(tl.float32)
        b_dh += _l1_term(c1, b_u)
        b_dg = b_dh * b_u
        b_du = b_dh * b_g
        b_h = b_g * b_u
        if tl.sum((m_g & ~b_ok).to(tl.int32), axis=0) > 0:
            for i_g in range(0, G):
                sel = o_g == i_g
                m_one = tl.sum(tl.where(sel, b_m, 0), axis=0)
                need = tl.sum((sel & m_g & ~b_ok).to(tl.int32), axis=0) > 0
                if need:
                    r_g, r_u, r_dh = _dots_full(
                        m_one, i_n, x_ptr, dy_ptr, wg_ptr, wu_ptr, wdt_ptr, c1, K, BKC
                    )
                    b_dg = tl.where(sel, r_dh * r_u, b_dg)
                    b_du = tl.where(sel, r_dh * r_g, b_du)
                    b_h = tl.where(sel, r_g * r_u, b_h)
        m_t = m_g[:, None] & m_k[None, :]
        b_x = tl.load(x_ptr + b_m[:, None] * K + o_k[None, :], mask=m_t, other=0.0).to(tl.float32)
        b_dy = tl.load(dy_ptr + b_m[:, None] * K + o_k[None, :], mask=m_t, other=0.0).to(tl.float32)
        a_g += tl.sum(b_dg[:, None] * b_x, axis=0)
        a_u += tl.sum(b_du[:, None] * b_x, axis=0)
        a_d += tl.sum(b_h[:, None] * b_dy, axis=0)
    return a_g, a_u, a_d


@triton.jit
def _wgrad_item(
    start, stop, chunk, u_stop, i_n, x_ptr, dy_ptr, wg_ptr, wu_ptr, wdt_ptr, slots_ptr, gs_ptr, us_ptr,
    dh_ptr, bits_ptr, c1, M, NW, MW, E, W, K, o_k, m_k, G: tl.constexpr, BKC: tl.constexpr,
    FALLBACK: tl.constexpr,
):  # fmt: skip
    # the [BKC] slices of one item's three gradient rows
    a_g = tl.zeros([BKC], dtype=tl.float32)
    a_u = tl.zeros([BKC], dtype=tl.float32)
    a_d = tl.zeros([BKC], dtype=tl.float32)
    if not FALLBACK:
        a_g, a_u, a_d = _wgrad_list_rows(
            a_g, a_u, a_d, start, stop, slots_ptr, gs_ptr, us_ptr, dh_ptr, x_ptr, dy_ptr, c1, W, K, o_k,
            m_k, G,
        )  # fmt: skip
    else:
        if u_stop <= E:
            a_g, a_u, a_d = _wgrad_list_tiles(
                a_g, a_u, a_d, start, stop, i_n, slots_ptr, gs_ptr, us_ptr, dh_ptr, x_ptr, dy_ptr, wg_ptr,
                wu_ptr, wdt_ptr, c1, W, K, o_k, m_k, G, BKC,
            )  # fmt: skip
        elif chunk == 0:
            # the unit's list did not fit E: walk its column of the row bitmask
            o_r = tl.arange(0, 32)
            for i_w in range(0, MW):
                # bit r of word: unit n active in row 32 * i_w + r (a column of the row bitmask)
                m_r = i_w * 32 + o_r < M
                b_c = tl.load(bits_ptr + (i_w * 32 + o_r).to(tl.int64) * NW + i_n // 32, mask=m_r, other=0)
                b_c = (b_c.to(tl.int64) >> (i_n % 32)) & 1
                word = tl.sum(b_c << o_r.to(tl.int64), axis=0)
                while word != 0:
                    lsb = word & (-word)
                    m = i_w * 32 + _ctz(lsb)
                    r_g, r_u, r_dh = _dots_full(m, i_n, x_ptr, dy_ptr, wg_ptr, wu_ptr, wdt_ptr, c1, K, BKC)
                    b_x = tl.load(x_ptr + m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                    b_dy = tl.load(dy_ptr + m * K + o_k, mask=m_k, other=0.0).to(tl.float32)
                    a_g += (r_dh * r_u) * b_x
                    a_u += (r_dh * r_g) * b_x
                    a_d += (r_g * r_u) * b_dy
                    word = word ^ lsb
    return a_g, a_u, a_d


@triton.jit
def _wgrad_kernel(
    x_ptr, dy_ptr, wg_ptr, wu_ptr, wdt_ptr, slots_ptr, gs_ptr, us_ptr, dh_ptr, uoff_ptr, bits_ptr,
    item_unit_ptr, item_first_ptr, n_items_ptr, heavy_ptr, c1_ptr, dwg_ptr, dwu_ptr, dwdt_ptr, acc_ptr,
    M, N, K, NW, MW, E, W, CH,
    G: tl.constexpr, BKC: tl.constexpr, ATOMIC: tl.constexpr, FALLBACK: tl.constexpr,
    ACCUM: tl.constexpr,
):  # fmt: skip
    # program (item, k-chunk): item = up to CH consecutive entries of one unit's by-unit list;
    # columns [kc * BKC, (kc + 1) * BKC) of the unit's three gradient rows. The k-chunk is the slow
    # grid axis, so the programs running together share one BKC-wide slice of x and dy
    # (2 * M * BKC * 2 bytes).
    # Two launches of this kernel share the items. FALLBACK = 0 takes the units whose entries are
    # all packed slots (_wgrad_list_rows: no layout conversion; 70 registers at the default one
    # warp, 4 entries per step and 256 columns); 1 takes
    # the units with a row above W (heavy[n] set by the index kernels: _wgrad_list_tiles recomputes
    # those entries) and the units whose list did not fit E (a walk of their bitmask column). The
    # rare paths live in their own compile, so they do not raise the main one's register count.
    # An item holding its unit's whole list (always without ATOMIC) stores its rows into the
    # gradients (their dtype); with ATOMIC, the items of a unit split in several (or whose list
    # did not fit E) add into the fp32 rows of acc [3, N, K] instead (_multi_rows_kernel zeroes
    # them before and rounds them into the gradients after).
    # ACCUM (a block of the rows, the backward walking the tokens in blocks): whole-list items add
    # their rows into acc too (a plain read-add-write: one program owns the row in the launch).
    # Persistent: program p of a k-chunk takes items p, p + P, ... up to the number of items
    # counted on the device (the grid is sized from an upper bound without reading it back).
    i_kc = tl.program_id(1)
    n_items = tl.load(n_items_ptr)
    c1 = tl.load(c1_ptr)
    o_k = i_kc * BKC + tl.arange(0, BKC)
    m_k = o_k < K
    for i_p in range(tl.program_id(0), n_items, tl.num_programs(0)):
        i_n = tl.load(item_unit_ptr + i_p).to(tl.int64)
        if i_n < N:
            u_start = tl.load(uoff_ptr + i_n)
            u_stop = tl.load(uoff_ptr + i_n + 1)
            chunk = i_p - tl.load(item_first_ptr + i_n)
            start = u_start + chunk * CH
            stop = tl.minimum(u_stop, start + CH)
            slow = (u_stop > E) | (tl.load(heavy_ptr + i_n) != 0)
            if slow.to(tl.int32) == FALLBACK:
                a_g, a_u, a_d = _wgrad_item(
                    start, stop, chunk, u_stop, i_n, x_ptr, dy_ptr, wg_ptr, wu_ptr, wdt_ptr, slots_ptr, gs_ptr,
                    us_ptr, dh_ptr, bits_ptr, c1, M, NW, MW, E, W, K, o_k, m_k, G, BKC, FALLBACK,
                )  # fmt: skip
                whole = not ATOMIC
                if ATOMIC:
                    # as _bwd_impl's `multi`: not (list within CH entries and E)
                    whole = (chunk == 0) & (stop == u_stop) & (u_stop <= E)
                if not whole:
                    tl.atomic_add(acc_ptr + i_n * K + o_k, a_g, mask=m_k, sem="relaxed")
                    tl.atomic_add(acc_ptr + (N + i_n) * K + o_k, a_u, mask=m_k, sem="relaxed")
                    tl.atomic_add(acc_ptr + (2 * N + i_n) * K + o_k, a_d, mask=m_k, sem="relaxed")
                elif ACCUM:
                    p_g = acc_ptr + i_n * K + o_k
                    p_u = acc_ptr + (N + i_n) * K + o_k
                    p_d = acc_ptr + (2 * N + i_n) * K + o_k
                    tl.store(p_g, tl.load(p_g, mask=m_k, other=0.0) + a_g, mask=m_k)
                    tl.store(p_u, tl.load(p_u, mask=m_k, other=0.0) + a_u, mask=m_k)
                    tl.store(p_d, tl.load(p_d, mask=m_k, other=0.0) + a_d, mask=m_k)
                else:
                    tl.store(dwg_ptr + i_n * K + o_k, a_g, mask=m_k)
                    tl.store(dwu_ptr + i_n * K + o_k, a_u, mask=m_k)
                    tl.store(dwdt_ptr + i_n * K + o_k, a_d, mask=m_k)


@triton.jit
def _multi_rows_kernel(
    acc_ptr, dwg_ptr, dwu_ptr, dwdt_ptr, multi_ptr, N, K, COPY: tl.constexpr, BK: tl.constexpr
):
    # the rows of the units summed with atomics (multi[n] != 0): zero their fp32 accumulators in
    # acc [3, N, K] (COPY = 0), or round them into the three gradients (COPY = 1)
    i_n = tl.program_id(0).to(tl.int64)
    if tl.load(multi_ptr + i_n) != 0:
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            p_g = acc_ptr + i_n * K + o_k
            p_u = acc_ptr + (N + i_n) * K + o_k
            p_d = acc_ptr + (2 * N + i_n) * K + o_k
            if COPY:
                tl.store(dwg_ptr + i_n * K + o_k, tl.load(p_g, mask=m_k), mask=m_k)
                tl.store(dwu_ptr + i_n * K + o_k, tl.load(p_u, mask=m_k), mask=m_k)
                tl.store(dwdt_ptr + i_n * K + o_k, tl.load(p_d, mask=m_k), mask=m_k)
            else:
                zero = tl.zeros([BK], dtype=tl.float32)
                tl.store(p_g, zero, mask=m_k)
                tl.store(p_u, zero, mask=m_k)
                tl.store(p_d, zero, mask=m_k)


_KERNELS = {
    "multi": _multi_rows_kernel,
    "pack": _pack_lanes_kernel,
    "pack_bits": _pack_bits_kernel,
    "fwd_stats": _fwd_stats_kernel,
    "fwd": _fwd_rows_kernel,
    "bwd": _bwd_rows_kernel,
    "dh": _dh_rows_kernel,
    "transpose": _transpose_bits_kernel,
    "t": _transpose_kernel,
    "fill": _fill_units_kernel,
    "scatter": _scatter_units_kernel,
    "wgrad": _wgrad_kernel,
    "items": _items_kernel,
    "item_units": _item_units_kernel,
}


def _k(name: str):
    return _KERNELS[name]


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _transposed(src: torch.Tensor, dtype: torch.dtype, zero: torch.Tensor | None = None) -> torch.Tensor:
    """``src [R, C]`` -> ``[C, R]`` in ``dtype`` by a tiled Triton transpose: torch's strided copies
    for the three transposes of a step took 0.26 ms on the H100 (K = 2048, N = 5632). ``zero``
    (int32, contiguous; R and C > 0) is zeroed by the same launch."""
    R, C = src.shape
    dst = _alloc.empty((C, R), dtype=dtype, device=src.device)
    if R and C:
        grid = (triton.cdiv(R, 64), triton.cdiv(C, 64))
        zb = 0 if zero is None else triton.next_power_of_2(triton.cdiv(zero.numel(), grid[0] * grid[1]))
        z = dst if zero is None else zero
        n_z = 0 if zero is None else zero.numel()
        _k("t")[grid](src, dst, R, C, z, n_z, BR=64, BC=64, ZB=zb, num_warps=4)
    return dst


def _pdl_args(dev: torch.device) -> dict:
    """Launch arguments of the forward's kernels after the gate GEMM: programmatic dependent
    launch where available (``TrainConfig.pdl``), which hides the launch gap between them."""
    on = CONFIG.pdl and pdl_ok(dev)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


def _row_capacity(N: int) -> int:
    return max(1, min(N, CONFIG.row_capacity))


def _launch_pack(g, gs, cols, cnt, bits, wpre, ovf, ucnt, W, tile, slots, from_bits=False):
    """The packed pattern of ``g [M, N]`` into ``cols [M, W]`` and ``gs [M, W]`` (g at the
    slots), ``cnt [M]``, ``bits`` / ``wpre`` ``[M, NW]``, ``ovf [M]`` and ``ucnt [N]`` (added to:
    zero it first; None: not counted). ``from_bits``: ``bits`` already holds g's bitmask
    (``gate_bits`` wrote it), which is read instead of g."""
    u_arg = {"UCNT": ucnt is not None}
    ucnt = cnt if ucnt is None else ucnt
    M, N = g.shape
    NW = bits.shape[1]
    if from_bits:
        lanes = 32 * CONFIG.pack_bits_warps
        _k("pack_bits")[(M,)](
            g, gs, cols, cnt, bits, wpre, ovf, ucnt, N, NW, W, slots,
            T=tile, L=lanes, WPL=max(1, 256 // lanes), REVERSE=CONFIG.pack_reverse, **_pdl_args(g.device),
            num_warps=CONFIG.pack_bits_warps, **u_arg,
        )  # fmt: skip
        return
    lanes = 32 * CONFIG.pack_warps
    e = max(8, min(32, triton.next_power_of_2(CONFIG.pack_block // lanes)))
    _k("pack")[(M,)](
        g, gs, cols, cnt, bits, wpre, ovf, ucnt, N, NW, W, slots,
        T=tile, E=e, L=lanes, PREFETCH=CONFIG.pack_prefetch, REVERSE=CONFIG.pack_reverse, **_pdl_args(g.device),
        num_warps=CONFIG.pack_warps, **u_arg,
    )  # fmt: skip


def _fwd_impl(x, w_gate, w_up, w_down, tile, slots, unit_counts, wdt=None, y=None, unit_rows=True):
    """The forward kernels. ``wdt``: W_down^T [N, K] contiguous when the caller has it (the
    inference prefill's cached copy; ``w_down`` is then unused), else made here; ``y``: a
    contiguous [M, K] output to write into; ``unit_rows=False``: the rows per unit (the
    backward's index, ``counts[M:]``) are not counted (left unset)."""
    M, K = x.shape
    N = w_gate.shape[0]
    W = _row_capacity(N)
    NW = (N + 31) // 32
    dev = x.device
    # launched before the gate GEMM, so that the kernels after it form one chain (see _pdl_args)
    # counts: [M] active units per row, then [N] rows per unit (kept for the backward's index),
    # zeroed by the W_down^T transpose's launch (H100, paper shape, M = 16384: the gate GEMM
    # starts 1.5 us earlier than after a separate fill, training forward 1.3-1.9 us shorter)
    if M > 0 and wdt is None:
        counts = _alloc.empty((M + N,), dtype=torch.int32, device=dev)
        wdt = _transposed(w_down, w_down.dtype, counts)  # [N, K]: W_down^T rows contiguous
    elif unit_rows:
        counts = torch.zeros((M + N,), dtype=torch.int32, device=dev)
    else:
        # the pack writes every row's count and leaves the rows per unit alone: no zero fill (the
        # inference prefill; H100, paper shape, M = 2048, 30 units iid: 161.8-162.4 us against
        # 164.5-164.6 with the fill, back-to-back processes on one GPU)
        counts = _alloc.empty((M + N,), dtype=torch.int32, device=dev)
    cnt, ucnt = counts[:M], counts[M:]
    cols = _alloc.empty((M, W), dtype=torch.int32, device=dev)
    pat = _alloc.empty(
        (2, M, NW), dtype=torch.int32, device=dev
    )  # bitmask words, active units before each word
    bits, wpre = pat[0], pat[1]
    # g [M, N], freed on return; gate_bits also writes the bitmask, so that the pack reads it and
    # g at the active entries instead of all of g
    from_bits = M >= CONFIG.gate_bits_min_m and gate_bits_ok(x, w_gate, CONFIG.gate_bits)
    if from_bits:
        g = _alloc.empty((M, N), dtype=x.dtype, device=dev)
        launch_gate_bits(x, w_gate, g, bits)
    else:
        g = torch.matmul(x, w_gate.t())
    ovf = _alloc.empty((M,), dtype=torch.int32, device=dev)
    if y is None:
        y = _alloc.empty((M, K), dtype=x.dtype, device=dev)
    l1_rows = _alloc.empty((M,), dtype=torch.float32, device=dev)
    gu = _alloc.empty((2, M, W), dtype=x.dtype, device=dev)  # per-slot g, u (rows within W)
    if M > 0:
        _launch_pack(
            g, gu[0], cols, cnt, bits, wpre, ovf, ucnt if unit_rows else None, W, tile, slots, from_bits
        )
        bk = triton.next_power_of_2(K)
        # 16-bit rows as int32 pairs (TrainConfig.fwd_pairs): even K, rows on 4-byte boundaries
        pairs = (
            CONFIG.fwd_pairs
            and K % 2 == 0
            and x.element_size() == 2
            and x.data_ptr() % 4 == 0
            and w_up.data_ptr() % 4 == 0
            and wdt.data_ptr() % 4 == 0
        )
        # (the int32-pair form only: the 16-bit / 32-bit tiles were measured at row_warps)
        up_warps = (
            min(CONFIG.row_warps, max(2, bk // max(1, CONFIG.up_block_k))) if pairs else CONFIG.row_warps
        )
        for part in (1, 2) if CONFIG.fwd_two_passes else (0,):
            _k("fwd")[(M,)](
                x, g, w_up, wdt, cols, cnt, bits, y, l1_rows, gu[0], gu[1], N, K, NW, W,
                G=CONFIG.row_group, BK=bk, PART=part, PAIRS=pairs, EVEN_K=K == bk, BF16=x.dtype == torch.bfloat16,
                num_warps=up_warps if part == 1 else CONFIG.row_warps, **_pdl_args(dev),
            )  # fmt: skip
    l1 = _alloc.empty((), dtype=torch.float32, device=dev)
    l0 = _alloc.empty((), dtype=torch.float32, device=dev)
    over = _alloc.empty((), dtype=torch.int64, device=dev)
    _k("fwd_stats")[(1,)](l1_rows, cnt, ovf, l1, l0, over, M, BLOCK=8192, num_warps=16, **_pdl_args(dev))
    uc = ucnt.to(torch.int64) if unit_counts else ucnt.new_zeros((0,), dtype=torch.int64)
    return y, l1, l0, over, uc, cols, counts, pat, gu


def rows_forward(x, w_gate, w_up, w_down_t, *, tile: int, slots: int, unit_counts: bool, out=None):
    """Forward only (no autograd, nothing kept) on the training forward's kernels: cuBLAS gate,
    the row pack, the two row passes, the statistics kernel. ``x [M, K]`` contiguous,
    ``w_down_t`` = W_down^T [N, K] contiguous, ``out``: optional contiguous [M, K] for y. Returns
    ``(y, l0, l1, overflow_rows, unit_counts int32 [N] or None)``; the inference prefill's kernels.
    Holds the dense gate [M, N] while it runs (the caller bounds M)."""
    y, l1, l0, over, _, _, counts, _, _ = _fwd_impl(
        x, w_gate, w_up, None, tile, slots, False, wdt=w_down_t, y=out, unit_rows=unit_counts
    )
    return y, l0, l1, over, (counts[x.shape[0] :] if unit_counts else None)


def _wgrad_rows(rows, w_gate, w_up, wdt, c1, ucnt, outs, acc, deterministic):
    """Weight gradients from the rows ``rows = (x, dy, cols, cnt, bits, wpre, g, u, dh)`` (all
    of them, or one block) whose per-unit counts are ``ucnt [N]``: by-unit index, work items,
    then the two weight-gradient launches into ``outs`` (the gradients; dW_down^T). With ``acc``
    (fp32 [3, N, K], the blocked backward) every unit's rows are added there instead; without it,
    the units summed by atomics get one here."""
    x, dy, cols, cnt, bits, wpre, g_s, u_s, dh = rows
    M, K = x.shape
    N = w_gate.shape[0]
    W = cols.shape[1]
    NW = bits.shape[1]
    MW = (M + 31) // 32
    dev = x.device
    E = M * W
    # work items: chunks of CH entries of each unit's list (one item per unit when deterministic,
    # and for units whose list did not fit E); item -> unit by a binary search on the device
    ch = M if deterministic else CONFIG.chunk
    uoff = _alloc.empty((N + 1,), dtype=torch.int64, device=dev)
    item_se = _alloc.empty((2, N), dtype=torch.int64, device=dev)  # first, end
    item_first, item_end = item_se[0], item_se[1]
    # [0]: heavy[n], unit n has a row above W; [1]: the atomic cursors of the scatter
    flags = _alloc.empty((2, N), dtype=torch.int32, device=dev)
    multi = _alloc.empty((N,), dtype=torch.int32, device=dev)
    # device time at N = 5632 (H100): 14.0 + 3.1 us against 37.5 us for the torch ops they
    # replace (zeros, cumsum, where, clamp, searchsorted, casts); 1024 x 4 warps 17.8, 8192 x 16 17.6
    _k("items")[(1,)](ucnt, uoff, item_first, item_end, multi, flags, N, E, ch, BN=2048, num_warps=8)
    n_items = (E + ch - 1) // ch + N  # upper bound: sum of ceil(cnt / ch) over units that fit E
    item_unit = _alloc.empty((n_items,), dtype=torch.int32, device=dev)
    _k("item_units")[(triton.cdiv(n_items, 256),)](
        item_end, item_unit, N, n_items, N.bit_length(), BI=256, num_warps=4
    )
    slots = _alloc.empty((E,), dtype=torch.int32, device=dev)
    if deterministic:
        # by-unit index in row order: bit transpose, then a counting sort by unit
        tbits = _alloc.empty((NW * 32, MW), dtype=torch.int32, device=dev)
        _k("transpose")[(MW, NW)](bits, tbits, M, NW, MW, num_warps=1)
        _k("fill")[(N,)](
            tbits, bits, wpre, cnt, uoff, slots, flags[0], NW, MW, W, E, BW=CONFIG.fill_words, num_warps=4
        )
    else:
        # order inside a unit is free (its sum is split over fp32 atomics anyway): atomic cursors
        _k("scatter")[(M,)](cols, cnt, bits, uoff, flags[1], slots, flags[0], NW, W, E, BS=64, num_warps=2)
    accum = acc is not None
    if not accum and not deterministic:
        # units summed by fp32 atomics (multi: lists longer than one item, or past E)
        acc = _alloc.empty((3, N, K), dtype=torch.float32, device=dev)
        _k("multi")[(N,)](acc, *outs, multi, N, K, COPY=False, BK=1024, num_warps=4)
    bk = triton.next_power_of_2(K)
    bkc = min(CONFIG.unit_block_k, bk)
    # the main launch (units whose entries are all packed slots), then the rare paths with one
    # program per SM (its tiles keep the G rows in each thread at 2 warps)
    for fallback, progs, warps in ((0, CONFIG.unit_programs, CONFIG.unit_warps), (1, 1, 2)):
        _k("wgrad")[(min(n_items, progs * num_sms(dev)), triton.cdiv(K, bkc))](
            x, dy, w_gate, w_up, wdt, slots, g_s, u_s, dh, uoff, bits, item_unit, item_first, item_end[-1:],
            flags[0], c1, *outs, outs[0] if acc is None else acc, M, N, K, NW, MW, E, W, ch,
            G=CONFIG.unit_group, BKC=bkc, ATOMIC=not deterministic, FALLBACK=fallback, ACCUM=accum,
            num_warps=warps,
        )  # fmt: skip
    if acc is not None and not accum:
        _k("multi")[(N,)](acc, *outs, multi, N, K, COPY=True, BK=1024, num_warps=4)


def _bwd_impl(dy, gl1, x, w_gate, w_up, w_down, cols, counts, pat, gu, deterministic):
    M, K = x.shape
    N = w_gate.shape[0]
    W = cols.shape[1]
    NW = pat.shape[2]
    bits, wpre = pat[0], pat[1]
    dev = x.device
    cnt = counts[:M]
    dx = _alloc.empty((M, K), dtype=x.dtype, device=dev)
    if M == 0:
        z = torch.zeros_like(w_gate)
        return dx, z, torch.zeros_like(w_up), torch.zeros_like(w_down)
    dy = dy.contiguous()
    c1 = (gl1.float() / M).reshape(1).contiguous()  # dL/dh of the l1 term is c1 * sign(h)
    wdt = _transposed(w_down, w_down.dtype)
    bk = triton.next_power_of_2(K)
    # per-slot dh of rows within W, l1 term excluded (x's dtype, like dense autograd's dh)
    dh = _alloc.empty((M, W), dtype=x.dtype, device=dev)
    _k("dh")[(M,)](dy, wdt, cols, cnt, dh, K, W, G=CONFIG.row_group, BK=bk, num_warps=CONFIG.row_warps)
    for part in (1, 2) if CONFIG.dx_two_passes else (0,):
        _k("bwd")[(M,)](
            x, dy, w_gate, w_up, wdt, cols, cnt, bits, c1, dx, gu[0], gu[1], dh, K, NW, W,
            G=CONFIG.dx_group, BK=bk, PART=part, num_warps=CONFIG.dx_warps,
        )  # fmt: skip
    outs = (
        torch.empty_like(w_gate),
        torch.empty_like(w_up),
        _alloc.empty((N, K), dtype=w_down.dtype, device=dev),  # dW_down^T
    )
    blk = CONFIG.wgrad_block_rows
    rows = (x, dy, cols, cnt, bits, wpre, gu[0], gu[1], dh)
    if not blk or M <= blk:
        _wgrad_rows(rows, w_gate, w_up, wdt, c1, counts[M:], outs, None, deterministic)
    else:
        # the weight gradients over blocks of blk tokens, each with its own by-unit index, so
        # that the x / dy rows a block reads stay in L2; every unit's rows add up in acc
        acc = _alloc.empty((3, N, K), dtype=torch.float32, device=dev)
        every = torch.ones((N,), dtype=torch.int32, device=dev)
        _k("multi")[(N,)](acc, *outs, every, N, K, COPY=False, BK=1024, num_warps=4)
        ucnt = torch.empty((N,), dtype=torch.int32, device=dev)
        none = torch.zeros((N + 1,), dtype=torch.int64, device=dev)
        heavy = torch.empty((N,), dtype=torch.int32, device=dev)
        for r0 in range(0, M, blk):
            part = tuple(t[r0 : r0 + blk] for t in rows)
            # the block's per-unit counts: the scatter with no room (E = 0) only moves its cursors
            ucnt.zero_()
            _k("scatter")[(part[0].shape[0],)](
                part[2], part[3], part[4], none, ucnt, ucnt, heavy, NW, W, 0, BS=64, num_warps=2
            )
            _wgrad_rows(part, w_gate, w_up, wdt, c1, ucnt, outs, acc, deterministic)
        _k("multi")[(N,)](acc, *outs, every, N, K, COPY=True, BK=1024, num_warps=4)
        del acc
    # free the backward's buffers before the last transpose allocates dW_down (peak memory)
    del dh, rows
    dwg, dwu, dwdt = outs
    return dx, dwg, dwu, _transposed(dwdt, w_down.dtype)


# ---------------------------------------------------------------------------------------------
# custom ops + autograd
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("twell::ffn_train_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    tile: int,
    slots: int,
    unit_counts: bool,
    deterministic: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    x, w_gate, w_up, w_down = (t.contiguous() for t in (x, w_gate, w_up, w_down))
    return _fwd_impl(x, w_gate, w_up, w_down, tile, slots, unit_counts)


@_fwd_op.register_fake
def _(x, w_gate, w_up, w_down, tile, slots, unit_counts, deterministic):
    M, K = x.shape
    N = w_gate.shape[0]
    W = _row_capacity(N)
    i32 = torch.int32
    return (
        x.new_empty((M, K)),
        x.new_empty((), dtype=torch.float32),
        x.new_empty((), dtype=torch.float32),
        x.new_empty((), dtype=torch.int64),
        x.new_empty((N if unit_counts else 0,), dtype=torch.int64),
        x.new_empty((M, W), dtype=i32),
        x.new_empty((M + N,), dtype=i32),
        x.new_empty((2, M, (N + 31) // 32), dtype=i32),
        x.new_empty((2, M, W)),
    )


@torch.library.custom_op("twell::ffn_train_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor,
    gl1: torch.Tensor,
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    cols: torch.Tensor,
    cnt: torch.Tensor,
    pat: torch.Tensor,
    gu: torch.Tensor,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w_gate, w_up, w_down = (t.contiguous() for t in (x, w_gate, w_up, w_down))
    return _bwd_impl(dy, gl1, x, w_gate, w_up, w_down, cols, cnt, pat, gu, deterministic)


@_bwd_op.register_fake
def _(dy, gl1, x, w_gate, w_up, w_down, cols, cnt, pat, gu, deterministic):
    return torch.empty_like(x), torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down)


def _setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, tile, slots, unit_counts, deterministic = inputs
    _, _, _, _, _, cols, cnt, pat, gu = output
    ctx.save_for_backward(x, w_gate, w_up, w_down, cols, cnt, pat, gu)
    ctx.deterministic = deterministic


def _backward(ctx, dy, gl1, *_unused):
    x, w_gate, w_up, w_down, cols, cnt, pat, gu = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if gl1 is None:
        gl1 = torch.zeros((), dtype=torch.float32, device=x.device)
    dx, dwg, dwu, dwd = _bwd_op(dy, gl1, x, w_gate, w_up, w_down, cols, cnt, pat, gu, ctx.deterministic)
    return dx, dwg, dwu, dwd, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# dense dispatch (lagged, never waits on the device)
# ---------------------------------------------------------------------------------------------
class _Density:
    """Last measured density of one weight set: on CUDA a pinned host copy behind an event that is
    only queried; on CPU the value itself (reading it costs no synchronisation there)."""

    def __init__(self):
        self.host = None
        self.event = None
        self.scale = 1.0
        self.known: float | None = None
        self.last_dense = False  # the last decision, replayed by a checkpoint's recomputation

    def read(self) -> float | None:
        if self.event is not None and self.event.query():
            self.known = float(self.host) * self.scale
            self.event = None
        return self.known

    def record(self, value: torch.Tensor, scale: float):
        """Records ``value * scale`` (the scale applied on the host: no device kernel for it)."""
        if not value.is_cuda:
            self.known = float(value) * scale
            return
        if self.event is not None:  # previous copy still in flight: keep it
            return
        if self.host is None:
            self.host = torch.zeros((), dtype=torch.float32, pin_memory=True)
        self.scale = scale
        self.host.copy_(value.detach(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()


# id(weight) -> (weak reference, state); tensors compare elementwise, so no WeakKeyDictionary
_DENSITY: dict[int, tuple[weakref.ref, _Density]] = {}


def _density_state(w: torch.Tensor, create: bool) -> _Density | None:
    key = id(w)
    entry = _DENSITY.get(key)
    if entry is not None and entry[0]() is w:
        return entry[1]
    if not create:
        return None
    state = _Density()
    _DENSITY[key] = (weakref.ref(w, lambda _, k=key: _DENSITY.pop(k, None)), state)
    return state


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. recomputing a checkpointed forward)."""
    return torch._C._current_graph_task_id() != -1


def _dispatch_dense(w_gate: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    state = _density_state(w_gate, create=False)
    if state is None:
        return False
    if _in_backward():
        # a checkpoint recomputes the forward inside the backward: it must take the same path
        # (same saved tensors) as the original forward, whatever was measured in between
        return state.last_dense
    d = state.read()
    state.last_dense = d is not None and d > CONFIG.dense_density
    return state.last_dense


def _record_density(w_gate: torch.Tensor, l0: torch.Tensor, N: int):
    """Records the density l0 / N measured on ``w_gate``'s layer for the dispatcher."""
    if torch.compiler.is_compiling() or _in_backward():
        return
    _density_state(w_gate, create=True).record(l0, 1.0 / max(N, 1))


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def ffn_train(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    tile: int = 256,
    slots: int = 32,
    unit_counts: bool = False,
    deterministic: bool | None = None,
    dispatch: bool = True,
) -> tuple[torch.Tensor, FFNStats]:
    """Autograd-aware sparse FFN for training: ``x [M, K]`` -> ``(y [M, K], FFNStats)``.

    Args:
        x: ``[M, K]`` tokens; w_gate, w_up: ``[N, K]``; w_down: ``[K, N]`` (``nn.Linear`` layout).
            CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. Under autocast all four are
            cast to the autocast dtype.
        tile, slots: TwELL geometry used for ``stats.overflow_rows`` (rows with a tile of ``tile``
            units holding more than ``slots`` active ones); results never depend on it.
        unit_counts: also return per-unit activation counts ``stats.unit_counts [N]`` (int64).
        deterministic: fixed summation order everywhere (default: follows
            ``torch.are_deterministic_algorithms_enabled()``).
        dispatch: allow the dense path when this weight set last measured a density above
            ``CONFIG.dense_density``, or on CUDA when M < ``CONFIG.dense_below_m``.

    Returns:
        ``y [M, K]`` in x's dtype and :class:`FFNStats` whose ``l1`` is differentiable (its
        gradient ``dl1 * sign(h) / M`` joins dh in the backward), ``l0`` the mean active units per
        token, ``overflow_rows`` (int64), ``unit_counts`` or None. No host synchronisation.
    """
    K, N = check_ffn_args(x, w_gate, w_up, w_down)
    check_tile_slots(tile, slots)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [M, K], got shape {tuple(x.shape)}")
    if N > MAX_COLUMNS:
        raise ValueError(f"w_gate: N={N} units exceeds the limit of {MAX_COLUMNS}")
    if x.shape[0] * _row_capacity(N) >= 2**31:
        raise ValueError(
            f"x: M={x.shape[0]} tokens is too many for one call (slot ids are int32: M * "
            f"{_row_capacity(N)} must stay below 2^31); split the batch"
        )
    if not can_run_triton(x):
        raise ValueError(
            f"x: the training kernels need a CUDA tensor (or TRITON_INTERPRET=1), got device {x.device}"
        )
    key = w_gate  # the dispatch state follows the parameter, not an autocast copy of it
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w_gate, w_up, w_down = (t.to(dt) for t in (x, w_gate, w_up, w_down))
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    M = x.shape[0]
    small = x.is_cuda and M < CONFIG.dense_below_m
    if dispatch and (small or _dispatch_dense(key)):
        y, st = ffn_train_ref(x, w_gate, w_up, w_down, tile=tile, slots=slots, unit_counts=unit_counts)
        if not small or _density_state(key, create=False) is None:
            # small calls run dense whatever the density: they measure it (a copy and an event
            # per call) only for a weight with no measurement yet
            _record_density(key, st.l0, N)
        return y, st
    y, l1, l0, over, uc, *_ = _fwd_op(x, w_gate, w_up, w_down, tile, slots, unit_counts, bool(deterministic))
    if dispatch:
        _record_density(key, l0, N)
    stats = FFNStats(l0=l0, l1=l1, overflow_rows=over, unit_counts=uc if unit_counts else None, tokens=M)
    return y, stats

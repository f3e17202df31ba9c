"""Block sizes and dispatch thresholds of the inference kernels, apart from the kernels.

Legend: M = tokens, K = model dim, N = FFN units, T = TwELL tile, S = slots.

Everything here is a frozen dataclass; tests and benchmarks override a choice with
:func:`override` (a context manager) instead of editing kernels. Numbers in comments are device
times measured on the development H100 (bf16, K=2048, N=5632, ~30 active units per token iid);
see ``docs/kernels.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["GateConfig", "InferConfig", "get_config", "override"]


@dataclass(frozen=True)
class GateConfig:
    """The gate GEMM with the TwELL epilogue (``gate_pack``)."""

    #: rows of x per output tile; the N-side of the tile is the TwELL tile T (<= 256) or 256.
    block_m: int = 128
    #: K step of the main loop. 128x256x64 with 3 stages is the shape that matched cuBLAS in the
    #: persistent TMA form (1.01-1.02x at M = 16384); 4 stages run out of shared memory with the epilogue.
    block_k: int = 64
    num_stages: int = 3
    num_warps: int = 8
    #: tiles of x rows grouped per band of columns, for L2 reuse of W_gate
    group_m: int = 8
    #: the persistent TMA kernel: "auto" (Hopper and newer, when strides allow), "never", or
    #: "always" (also under the CPU interpreter, for tests)
    use_tma: str = "auto"
    #: store the packed entries with a predicated inline-PTX store (NVIDIA only); the plain
    #: ``tl.store`` costs 1.29-1.31x the GEMM instead of 1.08-1.10x (layout conversions)
    use_asm_store: bool = True
    #: flatten the persistent tile loop with the K loop (lets the pipeliner overlap tiles)
    flatten: bool = True
    #: the specialised-warps kernel (``gate_pack_ws``, Gluon, Hopper, 16-bit dtypes, T = 256):
    #: "auto" (where it applies, from ws_min_m rows) or "never". H100, paper shape, against the
    #: Triton TMA kernel: M = 1024 54.0 against 56.1 us, 2048 77.3 against 82.4 (ccaf3c8), 16384
    #: 0.537-0.539 against 0.597-0.611 ms (1.08x cuBLAS, the committed code); not measured below
    #: 1024 rows
    use_ws: str = "auto"
    ws_min_m: int = 1024


@dataclass(frozen=True)
class InferConfig:
    """``ffn_infer``: the path choice and the kernels after the gate."""

    #: M at or below which the decode kernels run (unit-parallel: gate GEMV + up on active units,
    #: then a split-N down projection), above which the prefill kernels run (gate GEMM with the
    #: TwELL epilogue, then one program per token over its packed entries)
    #: (H100, paper shape, ~30 active units per token, device time vs dense: twell bench at
    #: 1e1ab8a M = 1 2.54x, M = 8 1.70x (split form), at e8829c8 M = 8 1.78x (compact tl.dot
    #: atomic form); split form at 3c01553 M = 4 24.2 us, 8 26.2, 16 29.8, 32 37.1 against
    #: 42.7-45.8 dense; the tl.dot atomic form with 8 warps at M > 32 reached M = 48 1.23x and 64
    #: 1.13-1.22x at e41cef6 / f39b736; the dense path runs M = 65..1023)
    decode_max_m: int = 64
    #: below this M (and above decode_max_m) the dense path runs. Rows-form prefill against dense
    #: (H100, paper shape, 30 units/token iid, device time, one process, c7b37d4): M = 256 0.78x,
    #: 512 1.07x, 768 1.29x, 1024 1.25x, where the dense path (with its statistics) runs
    #: 0.93-0.95x. With the tiles form: M = 256 0.66x (gate_pack 28.0 us + up/down 42.4 us),
    #: 1024 1.06x, 2048 1.22x
    prefill_min_m: int = 512
    #: prefill up/down in two launches (h = g u of the packed entries, written over g; then y), one
    #: weight matrix in L2 per launch, as the training forward rows
    prefill_two_passes: bool = False
    #: prefill on the training forward's kernels (``ffn_train.rows_forward``: cuBLAS gate, the row
    #: pack, two row passes) instead of gate_pack + the per-token up/down over TwELL. H100, paper
    #: shape, one process (scratch probe at b3feda7; the rows form with the cached W_down^T):
    #: M = 1024 1.28x against 1.08x, 2048 1.45x / 1.35x at 24 units iid, 1.33x / 1.26x at 30 iid,
    #: 1.42x / 1.30x at 30 skewed, 4096 1.45x / 1.34x, 16384 1.70x / 1.54x at 24, 1.55x / 1.43x
    #: at 30. The dense gate [rows, N] lives while a chunk runs.
    prefill_rows: bool = True
    #: tokens per rows_forward call (bounds the dense gate's memory: 184 MiB at N = 5632, bf16)
    prefill_rows_chunk: int = 16384
    #: decode stage 1 (gate + up), GEMV form (M <= decode_gemv_max_m): units and warps per program,
    #: 0 = by K: 2 units at M = 1 when K > 2048, else 4; 2 warps when K <= 1024, else 4. From the
    #: bf7277f sweep (H100, 30 active/token, device time, atomic down form; units x warps in
    #: {2, 4, 8}^2): paper shape (K = 2048) M = 1 16.6 us with 4 x 4 (best; 17.4 with the earlier
    #: 4 x 8), M = 2 20.8 (best 20.0 with 2 x 4; 21.7 with 4 x 8); Llama-3-8B (K = 4096) M = 1 48.7
    #: with 2 x 4 (best 48.1 with 2 x 8; 50.1 with 4 x 8), M = 2 54.6 with 4 x 4 (best; 74.9 with
    #: 4 x 8); Qwen2-0.5B (K = 896) M = 1 10.4 with 4 x 2 (best; 12.6 with 4 x 8), M = 2 13.2
    #: (best; 14.5). 8 units with 2 warps spill at K = 4096 (510 us).
    decode_bn_gemv: int = 0
    decode_gemv_warps: int = 0
    #: largest M whose gate + up stage runs on CUDA cores (the W tile loaded once per K step, each
    #: token's row dotted with it in turn) instead of tl.dot with M padded to 16. Measured at
    #: 97647af (H100, same case, 4 units per program): M = 2 24.3 us vs 27.6 with tl.dot; M = 4
    #: 30.4 vs 30.0; M = 8 46.2 vs 31.7 (a cross-warp reduction per token). The same form for the
    #: down stage lost everywhere above M = 1 (M = 2 27.6 vs 27.6 us, M = 8 89 vs 32)
    decode_gemv_max_m: int = 2
    #: largest M whose gate + up programs also run the down projection of their active units,
    #: adding h W_down^T into an fp32 [M, K] accumulator with atomics (only the rows of tokens that
    #: activate one of the program's units); a small second kernel rounds it into y and zeroes it.
    #: This replaces the split down kernel's chain of dependent round trips (compaction, gather,
    #: partials, ticket, sum). Skipped in deterministic mode (torch.use_deterministic_algorithms),
    #: where the split down kernel runs. CUDA-core form (M <= decode_atomic_max_m) measured at
    #: a892d34 / 3c01553 (H100, paper shape, 30 active/token, device time, dev sweep): M = 1
    #: 17.2-17.3 us against 18.2-18.3 with the split kernel (2.55-2.58x dense instead of
    #: 2.41-2.44x), M = 2 21.2-21.3 against 23.3-23.4 (1.98-2.02x instead of 1.81-1.83x);
    #: Llama-3-8B shape M = 1 50.1 against 49.9-50.0.
    decode_atomic_max_m: int = 2
    #: the same in the tl.dot form at M >= this (0: never), K step decode_atomic_bk of its W_down^T
    #: loop. 3c01553 with 256-column steps against the split kernel (with its best column block):
    #: M = 4 26.8 against 24.2 us, M = 8 26.9 against 26.2, M = 16 28.3 against 29.8, M = 32 32.4
    #: against 37.1, M = 64 49.7 against 58.4 (dense 46.1); 128- and 64-column steps slower. From
    #: M = 8 with the compact form below. It was off from 1e1ab8a to the finishing kernel's barrier
    #: fix: whole 128-column blocks of a token row came out 0 in 1-13 of 120-250 calls (H100,
    #: Llama-3-8B shape, M = 8), a race inside _decode_finish_kernel (BENCHMARKS.md section 1h)
    decode_atomic_dot_min_m: int = 8
    #: unit form at 3 <= M <= decode_units_max_m (0: off; atomic, so not in deterministic mode or
    #: under capture): the gate kernel computes the gate only (g unit-major), and
    #: _decode_units_kernel runs the up/down of the batch's active units, decode_units_per_program
    #: units per program over all the SMs, instead of each gate program loading its own active
    #: units' W_up and W_down^T rows after its W_gate stream. H100, paper shape, 30 active/token
    #: (dev sweep, BENCHMARKS.md 1k): M = 3 21.0 us against 23.6 (split form), M = 4 21.3 against
    #: 24.3; M = 6 26.8 against 25.6 and M = 8 28.6 against 24.6 (compact tl.dot form), where the
    #: programs holding 2-3 active units, each a chain of dependent loads, set the time
    decode_units_max_m: int = 4
    decode_units_per_program: int = 8
    decode_units_warps: int = 8
    #: K columns per step of that kernel (0: 16384 / M rounded to a power of two, the whole row
    #: at the paper shape)
    decode_units_bk: int = 0
    #: chunk form at decode_chunk_min_m <= M <= decode_chunk_max_m, and up to
    #: decode_chunk_long_max_m at K >= decode_chunk_long_k (atomic, so not in deterministic mode
    #: or under capture): the gate kernel computes the gate only (g unit-major) and lists each
    #: block's active units; _decode_chunk_kernel compacts the batch's active units into chunks of
    #: decode_chunk_units and runs each chunk's up and down as dense tl.dot tiles, the W_up loop in
    #: K steps of decode_chunk_bk (0: K / 8), the down columns split in at most decode_chunk_split
    #: ranges (0: 64 / M) and at most programs / chunks (the up is recomputed per range; a
    #: one-step range's W_down^T tile is loaded before the up loop), over decode_chunk_programs
    #: programs (0: one per SM). H100, device time, dense in the same run (BENCHMARKS.md 1l), at
    #: a134ed8: paper shape M = 6 24.3 / 24.1 / 26.3 us at 24 / 36 / 100 active units per token
    #: against 25.4 / 25.7 / 29.9 (split form); Llama-3-8B M = 8 66.2 / 69.0 at 30 / 100 against
    #: 69.6 / 77.9, M = 16 70.2 / 78.7 against 79.2 / 83.8 (compact). Not taken: the paper shape
    #: at M = 8 (24.4 / 25.5 / 27.0 against 24.1 / 24.2 / 24.8 compact) and M = 12..16 (26.5 /
    #: 27.4 against 25.4 / 26.0 at 1a41f46), M = 3..4 (the unit form: paper 23.6-23.9 against
    #: 20.9-21.3, Llama-3-8B 62.7-66.3 against 56.7). At 03a5044, 30 units: paper M = 5 / 7 24.3 /
    #: 24.4 us against 25.2 / 25.9 (split form)
    decode_chunk_min_m: int = 5
    decode_chunk_max_m: int = 7
    decode_chunk_long_k: int = 4096
    decode_chunk_long_max_m: int = 16
    #: at K >= decode_chunk_long_k also up to this M, while the density measured on earlier calls
    #: puts the batch's expected union of active units within one chunk per program (H100, Llama-3-8B
    #: shape, a7a060c: M = 24 / 32 80.5 / 77.8 us against 106.9 / 106.7 at 30 active units per
    #: token, ~930 units in the union at M = 32; 121.0 / 114.2 against 110.2 / 109.5 at 100, ~2,900)
    decode_chunk_wide_max_m: int = 32
    decode_chunk_units: int = 16
    decode_chunk_split: int = 0
    decode_chunk_bk: int = 0
    decode_chunk_programs: int = 0
    decode_chunk_warps: int = 4
    #: the chunk kernel's up loop (chunk and union forms) with this many accumulators (each over
    #: its own K slice of every step: one batched tl.dot) where its token rows (M padded to 16)
    #: are at most decode_chunk_up_nacc_max_m. With one, each warp runs one chain of K / 16
    #: dependent MMAs, which Nsight Compute's stall sampling showed the loop waiting on. H100, 30
    #: units iid, device time (BENCHMARKS.md section 1za): paper M = 6 23.65-23.79 us against
    #: 24.40-24.66 with one, Llama-3-8B M = 8 / 16 63.3 / 67.5-67.7 against 65.9-66.1 / 70.2-70.4
    #: (two rounds each, c14f0c6 against c0d6da4); in a sweep Llama-3-8B M = 32 76.8 against 78.0,
    #: and slower from 48 token rows (paper M = 48 / 64 40.1 / 42.5 against 35.7 / 37.7, Llama-3-8B
    #: M = 64 91.1 against 83.6) and with 8 accumulators
    decode_chunk_up_nacc: int = 4
    decode_chunk_up_nacc_max_m: int = 16
    #: 4 stages at K < decode_chunk_long_k (H100, paper shape: M = 8 23.9 us against 26.2 with 5
    #: stages; likely because 4 stages of 256 columns, 64 KiB, fit beside the gate kernel's 160 KiB
    #: of shared memory on one SM, so the chunk kernel's programs can be resident before the gate
    #: kernel ends, and 80 KiB do not: not profiled); 5 at K >= decode_chunk_long_k with
    #: 512-column steps (Llama-3-8B M = 8 64.2 against 67.6 with 4 stages of 256 columns)
    decode_chunk_stages: int = 4
    decode_chunk_long_stages: int = 5
    decode_atomic_bk: int = 256
    #: union form at decode_union_min_m <= M <= decode_union_max_m and K >= decode_union_min_k,
    #: where the chunk form is not chosen (atomic, so not in deterministic mode or capture): the
    #: chunk kernel stores h of the batch's compacted active units, and _decode_union_down_kernel
    #: runs y = h W_down^T over them as a GEMM split over (decode_union_bk output columns,
    #: decode_union_split ranges of units; 0: programs / column blocks), decode_union_chunk units
    #: per tl.dot, one atomic add of each program's tile. H100, bf16, 24 / 30 active units per
    #: token iid, against the tl.dot atomic form (BENCHMARKS.md section 1r): Llama-3-8B M = 48
    #: 87.3 / 88.6 us against 131.5 / 131.4, M = 64 91.2 / 93.4 against 131.5 / 133.2; paper
    #: shape M = 64 40.1 / 41.4 against 39.1 / 39.5 and slower at M = 16..48 (so not below
    #: K = 4096); split 16 against the auto split (4 at K = 4096): Llama-3-8B M = 64 91.2 / 93.4
    #: against 94.3-95.3 / 94.6-94.8
    #: At K >= decode_union_reach_k the decode path runs to decode_union_max_m tokens where the
    #: form may run (the dense path ran M = 65..128 before): Llama-3-8B, 30 units per token iid,
    #: M = 96 / 128 112.6 / 119.0 us (1.33x / 1.30x) against 149.0 / 155.1 dense, split 8
    #: (decode-union-m128-h100-6285ced.jsonl); at ~100 units the density rule keeps them dense.
    #: Split 8 against 16 in the same call: M = 64 / 96 / 128 80.8 / 112.6 / 119.0 us against
    #: 84.3 / 118.7 / 124.2. Below it decode stops at decode_max_m (M = 65..128 not measured there).
    #: On the paper shape (K = 2048, below decode_chunk_long_k) the form runs with the short_*
    #: choices below since 2026-11-27 (H100, 30 active units per token iid, two runs, against the
    #: tl.dot atomic form; decode-union-paper-h100-2026-11-27/sweep5.jsonl): M = 17 31.2 us against
    #: 32.5, 24 31.8-32.0 / 32.6-32.9, 32 32.5-32.8 / 32.7-32.8, 48 35.4-35.7 / 39.5 (1.32x / 1.19x),
    #: 64 38.0 / 40.8-40.9 (1.23x / 1.15x); skewed M = 48 33.7 / 41.1, 64 35.3 / 42.8. At K = 896
    #: (Qwen2-0.5B shape) the form lost (M = 32 23.3 against 21.5, M = 64 26.8 against 26.0)
    decode_union_min_m: int = 17
    decode_union_max_m: int = 128
    decode_union_min_k: int = 2048
    decode_union_reach_k: int = 4096
    decode_union_bk: int = 128
    #: K step of the union form's up loop (the chunk kernel's decode_chunk_bk there): Llama-3-8B,
    #: 30 active units per token iid, M = 48 / 64: 81.1 / 85.5 us at 128, 82.0 / 87.2 at 256,
    #: 88.0 / 92.2 at K / 8 = 512 (fewer pipeline stages fit: 2 of [80, 512] bf16 tiles)
    decode_union_up_bk: int = 128
    decode_union_chunk: int = 32
    decode_union_split: int = 8
    #: the union form at K < decode_chunk_long_k: units per tl.dot and unit ranges of the down
    #: GEMM, and the gate kernel's K step and stages (it computes the gate only there, so the
    #: up loop's K step does not bound its stages). Paper shape, M = 64, same call: 38.0 us with
    #: all four, 39.6-39.8 with the down choices only, 40.8-40.9 for the tl.dot atomic form; on
    #: the Llama-3-8B shape they were no faster (M = 48 / 64 83.1-83.6 / 86.1 us against 78.9-79.0
    #: / 83.1-83.2 with the long-K choices). The pair form's gate kernel takes the same K step and
    #: stages at these K: 5 stages against 4 (H100, 30 units iid, one process, two rounds,
    #: benchmarks/results/decode-units-2026-11-27/short-gate.jsonl): paper M = 24 / 32 / 48 / 64
    #: 26.69-26.75 / 28.19-28.37 / 34.46 / 36.42-36.51 us against 26.93-27.02 / 28.69-28.72 /
    #: 34.67-34.77 / 36.59-36.62 (6 stages slower at 48 / 64)
    decode_union_short_chunk: int = 128
    #: output columns per program and ranges of units of the down GEMM below decode_chunk_long_k
    #: (where the pair form's units variant runs it by default): the last rule (min M, columns,
    #: ranges) with M >= min M; decode_union_short_bk / _split > 0 replace them. H100, paper shape,
    #: 30 units iid, one process, two rounds (benchmarks/results/decode-units-2026-11-27/
    #: verify-down.jsonl, 32 x 8 against 128 x 16): M = 33 33.2-33.3 us against 31.5, 40 34.0-34.2
    #: against 34.3-34.4, 48 34.2-34.3 against 34.0-34.2, 56 37.2 against 36.9-37.0, 64 34.8-34.9
    #: against 36.7-36.8; skewed 48 / 64 31.6 / 32.3 against 33.3 / 34.8; K = 2048, N = 8192 M = 48
    #: / 64 37.6 / 38.3 against 38.1 / 40.5; in a second process (verify-rule.jsonl) M = 33 / 36 /
    #: 40 / 44 / 64 31.1-31.2 / 33.3-33.4 / 34.5 / 34.8 / 34.9-35.0 against 31.2 / 33.4 / 34.3-34.4 /
    #: 34.7 / 36.6-36.8, hence 32 x 8 from M = 48. 64 x 4, 64 x 16, 32 x 4 and 256 x 16 were slower
    #: than 32 x 8 or 64 x 8 at M = 40 / 48 / 64 (down-split*.jsonl). With the W_down^T rows
    #: prefetched into L2 by the units variant's gate (decode_prefetch_down), 64 x 8 at M = 48..63:
    #: one process, two rounds (benchmarks/results/decode-s13-2026-11-27/xchg.jsonl, the rows
    #: without the exchange) M = 48 / 56 / 60 29.82 / 32.96-32.99 / 33.26-33.42 us against 30.56 /
    #: 34.50-34.56 / 35.30-35.68, skewed 48 / 56 28.42 / 29.47 against 27.89-27.95 / 31.84-31.97;
    #: M = 64 31.81-31.92 either way (32.05-32.66 with 64 x 8 there, gate-union.jsonl). With the
    #: units variant's h rows padded to 16 values (decode_pairs_units_h_pad) 32 x 8 again from
    #: M = 49: one process, two rounds (benchmarks/results/decode-s14-2026-11-27/cols.jsonl) M = 52 /
    #: 56 / 60 30.26-30.35 / 30.74-30.83 / 31.15-31.38 us against 30.94 / 31.70-31.87 / 32.29-32.42
    #: with 64 x 8, skewed 56 28.50-28.54 against 29.55-29.57; M = 48 30.18-30.35 against 30.08-30.13
    decode_union_short_down: tuple = ((0, 128, 16), (48, 64, 8), (49, 32, 8))
    decode_union_short_bk: int = 0
    decode_union_short_split: int = 0
    decode_union_short_gate_bk: int = 128
    decode_union_short_gate_stages: int = 5
    decode_union_stages: int = 3
    #: the union form's down kernel also finishes the call (the last range of each column block
    #: to take a ticket rounds it into y and zeroes the accumulator, more programs reduce the
    #: statistics) instead of a finishing kernel after it. H100, 30 units iid, one process, two
    #: rounds (benchmarks/results/decode-units-2026-11-27/ab-*.jsonl): paper shape M = 40 / 48 / 64
    #: 35.7-35.8 / 35.6-35.8 / 38.4-38.5 us against 36.3-36.6 / 36.7-36.8 / 39.1-39.2, Llama-3-8B
    #: M = 48 / 64 77.8-78.2 / 81.6-82.1 against 79.6-80.0 / 82.8-83.2; the units variant of the pair
    #: form at M = 40 / 48 / 64 34.7-34.8 / 34.2-34.3 / 37.2 against 35.1-35.2 / 35.0 / 37.2-37.5
    decode_union_finish: bool = True
    #: the union form's h rows by rank hold M rounded up to 16 values (as
    #: decode_pairs_units_h_pad). Off: slower on the Llama-3-8B shape (H100, 30 units iid, one
    #: process, two rounds, benchmarks/results/decode-s14-2026-11-27/pad2.jsonl): M = 40 / 56 / 60
    #: 75.5-76.2 / 80.1-80.3 / 81.0-81.3 us padded against 74.7-75.3 / 79.2-79.3 / 79.9-80.1
    #: (M = 64 equal)
    decode_union_h_pad: bool = False
    decode_union_warps: int = 4
    #: tl.dot atomic form at M <= decode_atomic_compact_max_m: compact each program's active units,
    #: decode_atomic_chunk at a time, into dense [chunk, K step] tiles of W_up (K steps of
    #: decode_atomic_bkc) and W_down^T (decode_atomic_bk) instead of [64, K step] tiles with most
    #: rows masked. 3411176 sweep (paper shape unless named), against the best earlier form: M = 8
    #: 25.2 us against 26.0 (split), Llama-3-8B M = 8 73.0 against 80.6, M = 16 26.1-26.3 against
    #: 28.4; M = 4 24.9 against 24.1 (split), M = 32 42.2 against 32.4 and out of shared memory at
    #: M = 64; 512-column W_up steps 25.5 / 26.1 us at M = 8 / 16, 1024 slower, 32-unit chunks
    #: slower. M = 9..15 take the same form (not measured individually).
    decode_atomic_compact: bool = True
    decode_atomic_compact_max_m: int = 16
    decode_atomic_chunk: int = 16
    decode_atomic_bkc: int = 256
    #: columns per program of the atomic form's second kernel
    decode_finish_bk: int = 512
    #: tokens per statistics program of that kernel (a power of two; the programs' sums are added
    #: by the last one to finish). 71ba347 sweep (H100, paper shape, against one program for all
    #: tokens): M = 48 39.4 us against 44.5, M = 64 39.7 against 44.9 (the kernel 3.1 against
    #: 8.8 us), Llama-3-8B M = 64 132.3 against 139.3; M = 32 32.8 against 32.1; 4 and 16 rows
    #: within 1 us of 8
    decode_stats_rows: int = 8
    #: barrier form (twell.ops.decode_barrier) at decode_barrier_min_m <= M <= decode_barrier_max_m
    #: (0: off; sums in arrival order, so not in deterministic mode or under CUDA-graph capture;
    #: tl.dot form only, M > decode_gemv_max_m, and only where its programs fit on the SMs at
    #: once): one launch, gate + up, a grid-wide barrier, then the down projection by blocks of
    #: decode_barrier_bkd output columns, decode_barrier_chunk active units per tl.dot; the up of
    #: the active units compacted 16 at a time in decode_barrier_up_bk-column steps. H100, paper
    #: shape, 30 units iid, one process against the compact tl.dot atomic form: M = 8 22.98 against
    #: 24.48 us (1.92x against 1.80x dense), 16 25.7-25.8 against 26.3; slower at M = 4 (22.5
    #: against 21.9) and 32 (32.9 against 32.4); up K steps of 128 / 512 / 1024, 8 warps, 16- or
    #: 64-column down blocks, 128-unit down steps were slower at M = 8 and 16
    decode_barrier_min_m: int = 8
    decode_barrier_max_m: int = 16
    #: where the union form would run (K >= decode_union_min_k), the barrier form instead up to
    #: this M (while decode_barrier_max_m > 0). H100, 30 units per token, against the union form
    #: (benchmarks/results/decode-barrier-word-h100-2026-11-27/ab3.jsonl, sweep-shapes.jsonl):
    #: paper shape iid M = 17 28.7 against 31.0 us, 20 31.6 against 31.4-31.6, 24 31.9 against
    #: 31.4-31.8, 28 38.2 against 32.0 (a program with more than 16 active units runs two up
    #: chunks and the barrier waits for it), 32 33.4 against 32.4; skewed (30 % dead units, a few
    #: hot ones) 17 / 20 / 24 / 28 / 32 28.6-29.3 against 30.1-32.0 us; K = 2048, N = 8192 M = 17 /
    #: 20 33.7 / 34.6-34.7 against 34.9-35.0 / 35.0-35.1. Not below decode_union_min_k: on the
    #: Qwen2-0.5B shape (K = 896, against the tl.dot atomic form) M = 17 20.4-20.8 against 21.1,
    #: but 20 23.2-23.3 against 21.2-21.3
    decode_barrier_union_max_m: int = 20
    #: K step and pipeline stages of the barrier form's gate loop (0: decode_bk / decode_stages,
    #: stages capped by shared memory). H100, paper shape, 30 units iid, one process, two rounds
    #: (benchmarks/results/decode-units-2026-11-27/barrier-gate.jsonl): 128 x 5 M = 8 / 12 / 16
    #: 21.65-21.7 / 23.68-23.78 / 23.81-23.82 us against 22.0-22.08 / 24.02-24.06 / 24.1-24.16
    #: with 256 x 4 (128 x 6 21.65-21.76 / 23.78-23.79 / 23.94-24.03, 128 x 8 slower); in a second
    #: process (barrier-gate2.jsonl) M = 8 21.44-21.54 against 21.78-21.79, skewed 8 / 16 21.6 /
    #: 23.78-23.81 against 21.76-21.79 / 23.9-24.03, K = 2048, N = 8192 M = 8 / 16 25.4 / 26.8-26.9
    #: against 25.7 / 27.25-27.36, Qwen2-0.5B (K = 896) M = 8 / 16 14.4-14.6 / 17.55 against 14.9 /
    #: 18.1-18.2; paper M = 20 29.98-30.02 against 29.86
    decode_barrier_gate_bk: int = 128
    decode_barrier_gate_stages: int = 5
    decode_barrier_bkd: int = 32
    decode_barrier_chunk: int = 256
    decode_barrier_stages: int = 2
    decode_barrier_up_bk: int = 256
    #: the barrier form's up loop: pipeline stages (0: the kernel's) and accumulators (as
    #: decode_chunk_up_nacc). Paper shape, 30 units iid (BENCHMARKS.md section 1za): M = 8 22.38-22.48
    #: us with 4 accumulators and 5 stages against 22.66-22.85 with one and the kernel's 4 stages
    #: (c14f0c6 against c0d6da4, two rounds); per program the up loop of ~3 active units takes 2.8
    #: instead of 3.6 us (globaltimer). In a sweep (every column with the list's atomic add moved
    #: before the up, 0.3 us slower and not kept): 4 accumulators 22.53-22.61, with 5 stages
    #: 22.35-22.43, 2 accumulators 22.94-23.07; in another, 9 or 5 stages with one accumulator
    #: 23.10-23.46 against 23.26-23.30 (no gain: the loop waited on its MMA chain, not its loads).
    #: M = 16 24.56 / 25.50 against 25.09 / 25.60 (within the noise)
    decode_barrier_up_stages: int = 5
    decode_barrier_up_nacc: int = 4
    #: the barrier form's list append (one atomic add per program) issued before the up as a
    #: one-element tensor op, so no barrier in the program waits for its result until the list
    #: store; as a scalar op (Triton broadcasts the result at once) it costs the program a round
    #: trip wherever it stands. Paper shape, 30 units iid, one process, three alternating rounds
    #: (BENCHMARKS.md section 1za): M = 8 22.22 us (x3) against 22.27-22.32, M = 16 24.48-24.61
    #: against 24.83-24.99
    decode_barrier_early_list: bool = True
    #: from M = decode_barrier_h_pad_min_m (0: never) the barrier form's unit-major h rows hold M
    #: rounded up to 16 values (zero past M), stored and loaded whole: a mask of i_m < M with M
    #: not a multiple of 16 makes the down's h loads 2-byte loads (32 per thread and step at M = 8
    #: in the sm_90 PTX of Triton 3.6). H100, paper shape, 30 units iid, one process, three rounds
    #: (benchmarks/results/decode-s14-2026-11-27/pad.jsonl): M = 20 27.71-27.87 us padded against
    #: 29.92-30.06, but M = 8 / 12 22.22-22.24 / 24.14-24.22 against 21.52-21.70 / 23.07-23.33
    #: (skewed 8 22.05 against 21.44)
    decode_barrier_h_pad_min_m: int = 17
    #: pair form (twell.ops.decode_pairs) at decode_pairs_min_m <= M <= decode_pairs_max_m (0: off)
    #: and K >= decode_pairs_min_k, in place of every other form there (sums in list order, so not
    #: in deterministic mode or under CUDA-graph capture; tl.dot gate): the gate kernel lists the
    #: active (token, unit) pairs, the up kernel computes decode_pairs_up pairs per step (whole rows
    #: of up to decode_pairs_up_bk columns per load, decode_pairs_up_warps warps,
    #: decode_pairs_up_per_sm programs per SM), the down kernel sums decode_pairs_chunk pairs per
    #: tl.dot (decode_pairs_stages stages) into the output columns of its program (decode_pairs_down).
    #: H200, 30 units per token iid, against the forms that ran before (one process;
    #: benchmarks/results/decode-pairs-2026-11-27/): Llama-3-8B shape (K = 4096, N = 14336) M = 8
    #: 48.4 against 52.2 us, 12 49.4 against 54.8, 16 50.5-50.8 against 56.7-56.8, 24 58.1
    #: against 70.0, 32 62.8-63.7 against 66.9-67.1 (skewed 16 / 32 50.5 / 62.8 against 56.7 /
    #: 67.1); slower at M = 4 (46.7 against 45.5), 40 (66.9 against 65.1), 48 and 64 (72.3 / 79.9
    #: against 66.5 / 69.6: every down program walks the whole list, PD pairs a step, each step's
    #: rows gathered 32 bytes at a time); on the paper shape (K = 2048) with one range of 16 down
    #: columns slower at every M (16 25.4 against 23.1, 32 30.9 against 30.2, 64 37.9 against
    #: 34.8), faster from M = 21 with the split down of decode_pairs_down (below); on Qwen2-0.5B
    #: (K = 896) mixed
    decode_pairs_min_m: int = 8
    decode_pairs_max_m: int = 32
    decode_pairs_min_k: int = 2048
    #: below decode_chunk_long_k (4096) the form starts at this M: the barrier form is faster
    #: below (paper shape, H100: it runs M = 8..20 there in 21.8-29.7 us), the pair form with its
    #: split down from 21 (benchmarks/results/decode-pairs-split-2026-11-27/verify.jsonl, eecc261
    #: against 0edca90's choices in one process: M = 21 / 24 / 28 / 32 28.9 / 29.3 / 30.2-30.3 /
    #: 30.7-30.8 us against 31.8-32.0 / 31.7-32.6 / 32.2-32.3 / 32.6-32.7 for the union form). At
    #: M = 17..20 (m17-20.jsonl) mixed: the pair form faster at paper M = 19 / 20 iid (28.5-28.6
    #: against 29.7-29.8) and on K = 2048, N = 8192, slower at paper M = 17 / 18, skewed and 24 units
    decode_pairs_short_min_m: int = 21
    decode_pairs_up: int = 8
    #: pairs per up step below decode_chunk_long_k (4096). H100, 30 units iid, one process, two
    #: rounds (benchmarks/results/decode-pairs-split-2026-11-27/up-short.jsonl, 0dfac1e): paper
    #: shape M = 21 / 28 / 32 27.0-27.1 / 28.7-28.8 / 29.1-29.2 us with 4 against 28.9-29.1 /
    #: 30.5 / 30.9 with 8, skewed 24 / 32 26.5-26.6 / 28.0-28.2 against 28.5 / 29.9, K = 2048,
    #: N = 8192 M = 21 / 32 30.3-30.4 / 32.4-32.7 against 32.2-32.4 / 34.4-34.6. At K = 4096
    #: (Llama-3-8B, ab-early-ids-old.jsonl) 4 was slower at M = 8 / 16 (59.7-59.8 / 63.3-63.6
    #: against 58.2-58.3 / 61.4), 71.6-72.0 against 72.2-73.4 at M = 32
    decode_pairs_up_short: int = 4
    decode_pairs_up_bk: int = 4096
    decode_pairs_up_per_sm: int = 2
    decode_pairs_up_warps: int = 8
    decode_pairs_chunk: int = 128
    decode_pairs_stages: int = 5
    decode_pairs_warps: int = 4
    #: the down kernel's output columns per program and ranges of the pair list per column block
    #: (1: one program per block stores y; more: fp32 partials summed by the last range of each
    #: block to take a ticket): the last rule (min K, min M, columns, ranges) with K >= min K and
    #: M >= min M, else (16, 1); decode_pairs_bkd / decode_pairs_split > 0 replace them. H100, 30
    #: units iid, one process (benchmarks/results/decode-pairs-split-2026-11-27/split.jsonl):
    #: paper shape M = 21 / 24 / 32 29.2 / 29.2 / 30.9 us with 64 columns in 2 ranges, 29.8-30.1 /
    #: 30.2 / 31.6 in 4, 30.1 / 29.9 / 30.9 with 32 columns in 4, 30.1 / 30.5 / 31.9 in 8;
    #: Llama-3-8B M = 32 72.0-72.7 with 32 columns in 2 ranges against 75.0 for (16, 1), M = 24
    #: 70.7 against 68.8-68.9, M = 16 61.8 against 62.1
    decode_pairs_down: tuple = ((2048, 0, 64, 2), (4096, 0, 16, 1), (4096, 32, 32, 2))
    decode_pairs_bkd: int = 0
    decode_pairs_split: int = 0
    #: the pair form's units variant at decode_pairs_units_min_m <= M <= decode_pairs_units_max_m
    #: (0: off) and decode_pairs_min_k <= K < decode_chunk_long_k, in place of every other form
    #: there: the pair gate and up kernels, the up storing h by the rank of its unit in the batch's
    #: list of active units, then the union form's down GEMM (decode_union_* choices). H100, 30
    #: units iid, one process, two rounds (benchmarks/results/decode-units-2026-11-27/ab-*.jsonl):
    #: paper shape M = 40 / 48 / 64 34.7-34.8 / 34.2-34.3 / 37.2 us against 35.7-35.8 / 35.6-35.8 /
    #: 38.4-38.5 for the union form (both finishing in the down kernel), skewed M = 64 34.6 against
    #: 36.2; at M = 24 / 32 slower than the pair form (29.1 / 29.5-29.7 against 27.0-27.2 /
    #: 28.6-28.8, first-paper.jsonl), on Llama-3-8B (K = 4096) slower than the union form (M = 48 /
    #: 64 82.7 / 87.6 against 78.8 / 82.9, first-llama.jsonl)
    decode_pairs_units_min_m: int = 33
    decode_pairs_units_max_m: int = 64
    #: the units variant's up kernel: programs per SM and warps (in place of decode_pairs_up_per_sm
    #: / decode_pairs_up_warps), so that at ~30 units per token each program computes one step of
    #: pairs. H100, paper shape, 30 units iid, one process (benchmarks/results/decode-s12-2026-11-27/
    #: up2.jsonl, down.jsonl): M = 33 / 40 / 48 / 56 / 64 30.4 / 31.3 / 31.1 / 34.5 / 32.1 us with
    #: 5 x 4 warps against 31.3 / 34.1 / 34.1 / 37.1 / 34.5 with 2 x 8 (per kernel at M = 64, the
    #: up from its wait to its last program 4.8 against 7.1 us, globaltimer); 6 or 8 per SM within
    #: 0.3 us of 5; at the pair form's M = 21..32 4 per SM was slower (27.6-31.0 against 26.3-28.1)
    decode_pairs_units_up_per_sm: int = 5
    decode_pairs_units_up_warps: int = 4
    #: the units variant's down over its pair list at M <= this (0: never): the gate and up kernels
    #: of the pair form (no unit list, h in the pair list) and the union down kernel summing PD
    #: pairs per tl.dot ([tokens, pairs] one-hot h times each pair's gathered W_down^T row segment)
    #: in place of dense h tiles of every listed unit. H100, paper shape, 30 units iid, one process
    #: (benchmarks/results/decode-s12-2026-11-27/pair-down*.jsonl): M = 33 / 40 29.5 / 30.5 us
    #: against 30.3-30.4 / 31.2-31.4; M = 48 / 64 equal or slower in every geometry tried (30.5-35.3
    #: / 32.9-39.8 against 30.8 / 32.2-32.3): the dense h tiles of 48-64 tokens carry more pairs
    #: per unit
    decode_pairs_units_pair_down_max_m: int = 47
    #: the units variant's h rows by rank hold M rounded up to 16 values (zero past M), loaded
    #: whole by the union down: with M not a multiple of 16 a mask of i_m < M breaks its loads
    #: into 2-byte loads (sm_90 PTX of Triton 3.6: 64 loads and 64 shared stores per thread and
    #: step at M = 56, where whole rows are 16-byte asynchronous copies). H100, paper shape, 30
    #: units iid, one process, three rounds (benchmarks/results/decode-s14-2026-11-27/pad.jsonl):
    #: M = 52 / 56 / 60 30.88-31.17 / 31.63-31.79 / 31.94-32.22 us against 32.32-32.66 /
    #: 32.85-33.02 / 33.15-33.41 (skewed 56 29.42-29.47 against 29.71-29.73; M = 64 unchanged)
    decode_pairs_units_h_pad: bool = True
    #: the units variant's gate programs (pair form, M = 33..64 below K = 4096) start the W_down^T
    #: rows of their block's active units on their way into L2 (prefetch.global.L2) as soon as
    #: their gate values are known, so the down kernel reads them from there. H100, paper shape,
    #: 30 units iid, one process, two rounds (benchmarks/results/decode-s13-2026-11-27/
    #: prefetch2.jsonl): M = 40 / 48 / 64 30.05-30.08 / 30.5-30.74 / 32.0-32.02 us against
    #: 30.54-30.64 / 31.2-31.25 / 32.38-32.42 without. Not at the pair form's M <= 32: paper M = 24
    #: within 0.1 us, Llama-3-8B M = 8 / 32 58.99-59.14 / 74.51-74.72 against 58.37-58.59 /
    #: 73.46-73.68 (llama.jsonl). Not kept: the W_up rows too (paper M = 24 29.1-29.2 us against
    #: 26.8-26.9, the prefetches' traffic behind the slower gate programs' W_gate reads), the same
    #: in the barrier form (M = 8 / 12 0.1-0.2 us slower, prefetch1.jsonl)
    decode_prefetch_down: bool = True
    #: launch the decode down kernel with programmatic dependent launch (sm_90+): it is scheduled
    #: while the gate + up grid drains and waits for it in-kernel, which hides the launch gap.
    #: Measured at 9355b88 (H100, paper shape, 30 active/token, device time): M = 1 19.4 -> 18.3 us,
    #: M = 2 24.9 -> 23.7, and 1-2 us at M = 4..32 with the swapped dot and unit-major h
    decode_pdl: bool = True
    #: tl.dot form: units per program, and the orientation with the units on the MMA's M side and
    #: the tokens on its N side (as cuBLAS's small-batch kernels do). Measured at 9355b88 against
    #: 16 units per program unswapped: M = 4 26.6 vs 29.7 us, M = 8 28.1 vs 31.7, M = 16 31.7 vs
    #: 36.0, M = 32 43.4 vs 46.2; 128 units per program was slower (M = 8 34.2 us) and 32 units
    #: (ec5a81d) between the two. A CUDA-core form summing products into a [BM, BN, BK]
    #: accumulator lost at every M (M = 2 27.5 vs 24.6 us, M = 8 54.0 vs 31.7, ec5a81d)
    decode_bn_dot: int = 64
    decode_dot_swap: bool = True
    decode_bk: int = 256
    #: the gate loop's K step is also kept to this many x elements per tile (BK <= this / BM,
    #: 128 columns at 64 token rows). 16384 with decode_union_short_gate_bk 256 (256-column steps,
    #: 3 stages at 64 rows) was slower on the H100, paper shape, 30 units iid: M = 24 / 48 / 64
    #: 32.85 / 36.37 / 38.91 us against 31.30 / 35.65 / 37.90
    #: (decode-trials-h100-2026-11-27c/m64-gate-steps.jsonl)
    decode_tile_elems: int = 8192
    #: K step of the W_up loop of the tl.dot form (0: decode_bk). That loop reads only the rows of
    #: units some token activates (a few of 64 at M = 8), so it is latency-bound: fewer, longer
    #: steps may hide more of it (not measured on a GPU yet: 0)
    decode_bk_up: int = 0
    #: h between the decode stages stored [N, M] (unit-major): the down stage's gather of a
    #: unit's M values reads one contiguous row instead of M scattered elements. Down kernel at
    #: ec5a81d: M = 32 18.4 vs 22.4 us, M = 64 38.7 vs 51.2; the same within 1 us at M <= 16
    decode_h_t: bool = True
    decode_warps: int = 4
    #: warps of the tl.dot form when the tokens take 64 rows or more (M > 32): e41cef6 sweep
    #: (H100, paper shape) M = 48 44.3 us against 48.6 with 4 warps, M = 64 44.8 against 49.6,
    #: Llama-3-8B M = 64 139.6 against 154.7; 3 stages the same, 128-column down steps slower
    decode_warps_m64: int = 8
    #: pipeline stages of the tl.dot loops (fewer where the tiles would not fit in shared memory).
    #: 4 against 3 at 5d47190 (paper shape): M = 8 24.8 / 25.5 us, M = 16 25.6 / 26.4, Llama-3-8B
    #: M = 8 70.3 / 73.6; M = 2, 4 and 32 within 0.1 us; 5 out of shared memory at M = 32
    decode_stages: int = 4
    #: decode stage 2 (down, W_down^T rows of the batch's active units): at M = 1 the K columns
    #: are split into this many blocks (a power of two >= K / kc columns each), above M = 1 into
    #: blocks of decode_down_bk columns; units compacted per step of the walk, rows gathered per
    #: load, warps. M = 1, 840fade sweep (H100, 30 units/token): 8 blocks at K = 2048 (256 columns)
    #: 18.4 us against 19.6 with 128 columns and 19.4 with 512; at K = 4096 (Llama-3-8B shape)
    #: 512-column blocks 50.2 us (2.77x dense) against 56.0 with 256 and 52.8 with 128. Above M = 1
    #: (3c01553, paper shape): 256 columns against 128 at M = 4 24.2 / 24.9 us, M = 8 26.2 / 26.6
    #: (Llama-3-8B 80.5 / 84.2); worse at M = 32 (40.4 / 37.1), where the atomic form runs instead
    decode_down_kc_gemv: int = 8
    decode_down_bk: int = 256
    decode_down_sub: int = 512
    decode_down_chunk: int = 16
    decode_down_warps: int = 8
    #: fp32 partial sums of the split down projection are kept under this many MiB
    decode_partial_mib: int = 16
    #: prefill: active units per token above which the dense path (3 cuBLAS GEMMs) is faster.
    #: Measured: up/down costs 1.20-1.24 ns per (token x active unit) and gate_pack 1.15-1.3x the
    #: cuBLAS gate GEMM, so sparse breaks even at ~55 (M = 2048 and 16384); at 99 active it ran
    #: 0.68-0.72x dense
    dense_above_prefill: float = 52.0
    #: decode: fraction of units active in at least one token of the batch above which dense is
    #: faster. Sparse reads (1 + 2 union) / 3 of dense's bytes, but its down walk slows with the
    #: union: measured at 9355b88 1.52x dense at a union of 8 % (M = 16), 1.21x at 16 % (M = 32)
    #: and 0.71x at 29 % (M = 64); with the tl.dot atomic form 1.41x at 16 %, 1.23x at 23 %
    #: (M = 48) and 1.13-1.22x at 29 % (M = 64), so M = 64 runs sparse up to ~30 active units
    #: per token at the paper shape
    decode_dense_union: float = 0.30
    #: smoothing of the per-weight density estimate used by the dispatcher
    ema: float = 0.5
    #: once a weight has an estimate, one call in this many measures its density for the dispatcher
    #: (a pinned device-to-host copy and an event per measurement: host time)
    density_every: int = 8
    #: the decode kernels store each call's l0 into a pinned host slot of the weight as well, so the
    #: dispatcher reads it there (once in density_every calls) and no device-to-host copy is queued
    #: on the stream (1.4-1.6 us of device time each on the H100, BENCHMARKS.md section 1zi); the
    #: prefill and dense paths still measure by a copy behind an event
    density_host_store: bool = True


_STATE = {"gate": GateConfig(), "infer": InferConfig()}


def get_config(kind: str):
    """The current :class:`GateConfig` (``"gate"``) or :class:`InferConfig` (``"infer"``)."""
    if kind not in _STATE:
        raise ValueError(f"kind: expected one of {tuple(_STATE)}, got {kind!r}")
    return _STATE[kind]


@contextlib.contextmanager
def override(kind: str, **changes) -> Iterator[object]:
    """Temporarily replaces fields of a config, e.g. ``with override("infer", decode_max_m=0): ...``."""
    old = get_config(kind)
    _STATE[kind] = dataclasses.replace(old, **changes)
    try:
        yield _STATE[kind]
    finally:
        _STATE[kind] = old

"""The gate GEMM of the row kernels: ``g = x @ W_gate^T`` and the bitmask of g's active entries.

Legend: M = tokens, K = model dim, N = FFN units, NW = ceil(N / 32) bitmask words per row,
BM x BN x BK = the GEMM tile.

The forward of the row kernels (``ffn_train``'s forward and the inference prefill) keeps the
dense gate g [M, N] (the row passes read it at rows with more active units than slots) and
needs, per row, the bitmask of its active units: entries > 0 or NaN after rounding to x's
dtype. With cuBLAS for the GEMM, the pack kernel reads all of g back to find them (184 MiB at
M = 16384 on the paper shape, ~0.07 of its 0.088 ms on the H100). Here a persistent TMA GEMM
(the main loop of ``gate_pack``) stores g and, in the same epilogue, one int32 word per (row,
32 columns), bit j set where column 32 w + j is active; the pack kernel then reads the words
and the g values at active entries only (``ffn_train._pack_bits_kernel``).

Measured (H100 80GB HBM3, bf16, K = 2048, N = 5632, M = 16384, ~30 active units per token iid,
torch.profiler, 4 weight sets rotated; benchmarks/results/prefill-gate-bits-h100-2026-11-27/):
this kernel 515.6-515.8 us against 491.6 for the cuBLAS GEMM, the pack from the words 30.2 us
with 2 warps per row (40.4 with 1) against 81.0-81.4 from g, the whole prefill call 1.085 ms
against 1.114-1.115 (8.95 against 9.20-9.21 ms at M = 131072).
The same loop storing g alone ran as fast as cuBLAS (0.504 against 0.503 ms): the words cost the
rest, as the epilogue runs after each tile's MMA loop instead of beside the next one.

Outputs: ``g`` [M, N] in x's dtype (the GEMM rounded, like ``torch.matmul``), ``bits`` int32
[M, NW] (bits past N are 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import can_run_triton, interpreter_enabled, num_sms, tma_aligned
from .configs import get_config
from .gate_bits_ws import launch_gate_bits_ws, ws_bits_ok
from .gate_pack import _BROKEN, _dtype_consts, grouped_tile, tma_tile_dot

__all__ = ["active_bits", "gate_bits_ref", "gate_bits_ok", "launch_gate_bits"]


def gate_bits_ref(x: torch.Tensor, w_gate: torch.Tensor):
    """``(g [M, N], bits int32 [M, NW])`` in plain torch: g = x @ w_gate^T in x's dtype and
    :func:`active_bits` of it."""
    g = torch.matmul(x, w_gate.t())
    return g, active_bits(g)


def active_bits(g: torch.Tensor) -> torch.Tensor:
    """int32 [M, NW] bitmask of ``g [M, N]``: bit j of word w of row m set where g[m, 32 w + j]
    is > 0 or NaN."""
    M, N = g.shape
    NW = (N + 31) // 32
    a = torch.zeros((M, NW * 32), dtype=torch.int64, device=g.device)
    a[:, :N] = ((g > 0) | torch.isnan(g)).long()
    words = (a.view(M, NW, 32) << torch.arange(32, device=g.device)).sum(2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@triton.jit
def _gate_bits_kernel(
    x_desc,
    w_desc,
    g_desc,
    bits_ptr,
    M,
    N,
    K,
    NW,
    OUT_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FLATTEN: tl.constexpr,
    HALF_TINY: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    # persistent: program p takes tiles p, p + NUM_SMS, ...; GROUP_M row blocks per band of
    # columns (W_gate reuse in L2), as gate_pack
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    n_k = tl.cdiv(K, BK)
    o_w = tl.arange(0, BN // 32)
    for tile_id in tl.range(tl.program_id(0), n_m * n_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile_id, n_m, n_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tma_tile_dot(x_desc, w_desc, off_m, off_n, n_k, BM, BN, BK, DOT_PREC)
        g_desc.store([off_m, off_n], acc.to(OUT_DTYPE))
        # active: g > 0 after rounding to OUT_DTYPE, or NaN; an fp32 value rounds (to nearest
        # even) to a positive one exactly when it exceeds half the smallest positive subnormal
        # of OUT_DTYPE, so one comparison of the fp32 sum decides (NaN fails <=)
        a = ~(acc <= tl.full((), HALF_TINY, tl.float32))  # fp32 (a float constexpr is fp64)
        if not EVEN_N:
            # columns past N are inactive (zero-filled W_gate rows still give NaN on a NaN token)
            a = a & ((off_n + tl.arange(0, BN)) < N)[None, :]
        a_i = a.to(tl.int32)
        # distinct bits: the sum is the bitwise or (bit 31 lands on the int32 sign, no carries)
        words = tl.sum(tl.reshape(a_i, (BM, BN // 32, 32)) << tl.arange(0, 32)[None, None, :], axis=2)
        i_m = off_m + tl.arange(0, BM)
        i_w = off_n // 32 + o_w
        tl.store(
            bits_ptr + i_m[:, None].to(tl.int64) * NW + i_w[None, :],
            words,
            mask=(i_m < M)[:, None] & (i_w < NW)[None, :],
        )


#: half the smallest positive subnormal of each output dtype (fp32: the smallest, 2^-149, rounds
#: to itself; half of it is not representable, so 0 there: any positive fp32 value stays positive)
_HALF_TINY = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 0.0}


def gate_bits_ok(x: torch.Tensor, w_gate: torch.Tensor, mode: str) -> bool:
    """Whether :func:`launch_gate_bits` runs for these operands. ``mode``: "auto" (CUDA Hopper
    or newer, 16-bit dtypes), "never", or "always" (any dtype Triton's dot takes, and the CPU
    interpreter, for tests). Either way rows of x, W_gate and g must be 16-byte aligned (TMA)."""
    if mode not in ("auto", "never", "always"):
        raise ValueError(f"gate_bits mode: expected 'auto', 'never' or 'always', got {mode!r}")
    if mode == "never" or x.dim() != 2 or not can_run_triton(x) or min(x.shape[0], w_gate.shape[0]) == 0:
        return False
    if mode == "auto" and not (
        x.is_cuda
        and not interpreter_enabled()
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    ):
        return False
    return tma_aligned(x) and tma_aligned(w_gate) and (w_gate.shape[0] * x.element_size()) % 16 == 0


def launch_gate_bits(x: torch.Tensor, w_gate: torch.Tensor, g: torch.Tensor, bits: torch.Tensor) -> None:
    """``g [M, N] = x @ w_gate^T`` (contiguous, x's dtype) and ``bits int32 [M, NW]`` (contiguous)
    in one kernel; the caller checked :func:`gate_bits_ok`. Tiles: ``GateConfig``'s block_m x 256
    x block_k (64 x 256 x 32 in fp32), its stages, warps, grouping and flattening."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    cfg = get_config("gate")
    M, K = x.shape
    N = w_gate.shape[0]
    if (
        not interpreter_enabled()
        and cfg.use_ws != "never"
        and M >= cfg.ws_min_m
        and "ws-bits" not in _BROKEN
        and ws_bits_ok(x, w_gate, g)
    ):
        try:  # the specialised-warps kernel (Gluon, Hopper): the same outputs, bitwise
            launch_gate_bits_ws(
                x, w_gate, g, bits, _dtype_consts(x.dtype)[:4], cfg.group_m, num_sms(x.device)
            )
            return
        except Exception as e:  # compile failure: the Triton kernel runs
            _BROKEN["ws-bits"] = repr(e)[:500]
    fp32 = x.dtype == torch.float32
    bm = max(16, min(64 if fp32 else cfg.block_m, triton.next_power_of_2(M)))
    bk = max(16, min(32 if fp32 else cfg.block_k, triton.next_power_of_2(K)))
    bn = 256
    n_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    grid = min(num_sms(x.device), n_tiles)
    out_dt = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype]
    _gate_bits_kernel[(grid,)](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w_gate, [bn, bk]),
        TensorDescriptor.from_tensor(g, [bm, bn]),
        bits,
        M,
        N,
        K,
        bits.shape[1],
        OUT_DTYPE=out_dt,
        BM=bm,
        BN=bn,
        BK=bk,
        GROUP_M=cfg.group_m,
        NUM_SMS=grid,
        DOT_PREC="ieee" if fp32 else "tf32",
        FLATTEN=cfg.flatten and x.is_cuda,
        HALF_TINY=_HALF_TINY[x.dtype],
        EVEN_N=N % bn == 0,
        num_warps=cfg.num_warps if not fp32 else 4,
        num_stages=cfg.num_stages,
    )

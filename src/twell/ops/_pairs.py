"""Triton helpers that read 16-bit rows as int32 pairs of elements (even element in the low half).

A [.., K] bf16 tile loaded as bf16 costs two instructions per element to widen (unpack, then
shift) in the SASS Triton 3.6 emits for sm_90; read as int32, a bf16 pair widens by one shift and
one mask. Used by the row kernels of the training forward and the inference prefill when the
activations are 16-bit and K is even (rows then start on 4-byte boundaries).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["pairs_f32", "row_pairs", "store_pairs"]


@triton.jit
def pairs_f32(v, BF16: tl.constexpr):
    """int32 ``v`` holding two 16-bit floats -> (even, odd) elements in fp32."""
    if BF16:
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def row_pairs(p32, n, K, o_p, m_p, EVEN_K: tl.constexpr, BF16: tl.constexpr):
    """Row ``n`` of a [*, K] 16-bit matrix at ``p32`` (seen as int32) -> (even, odd) in fp32;
    ``o_p`` = arange(BK // 2), ``m_p`` = o_p < K // 2 (unused when EVEN_K: K is the block). With
    ``n`` a [G, 1] column of row ids and ``o_p`` / ``m_p`` as [1, BK // 2], a [G, BK // 2] tile."""
    if EVEN_K:
        v = tl.load(p32 + n * (K // 2) + o_p)
    else:
        v = tl.load(p32 + n * (K // 2) + o_p, mask=m_p, other=0)
    return pairs_f32(v, BF16)


@triton.jit
def store_pairs(ptr, off, b_e, b_o, m_p):
    """Rounds fp32 (even, odd) halves to the 16-bit element type of ``ptr`` and stores them as
    int32 pairs at pair offsets ``off`` of ``ptr`` seen as int32."""
    dt: tl.constexpr = ptr.dtype.element_ty
    lo = b_e.to(dt).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = b_o.to(dt).to(tl.int16, bitcast=True).to(tl.int32) << 16
    tl.store(ptr.to(tl.pointer_type(tl.int32), bitcast=True) + off, lo | hi, mask=m_p)

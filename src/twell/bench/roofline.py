"""Measured roofs and the speedup bounds of DESIGN section 5.

Legend: M = tokens, K = model dim, N = FFN units, a = active units per token (rho = a / N),
u = union density: the fraction of units active in at least one of the M tokens of a call.

Every run measures its own roofs first (:func:`measure_roofs`: a large matmul in the bench
dtype and a device-to-device copy, on the same device), and every row's bound is a roofline
ratio built from them: ``bound = t_dense / t_sparse`` with ``t = max(flops / P, bytes / B)``
for the ideal dense FFN and the ideal sparse FFN (:func:`ffn_costs`). At small M the bytes
term wins and the bound is DESIGN 5's decode bound ``3 / (1 + 2u)``; at large M the FLOP term
wins and it is ``6 / (2 + 4 rho)`` (forward) or ``18 / (2 + 16 rho)`` (forward + backward).
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import asdict, dataclass

import torch

from .timing import synced_ms

__all__ = [
    "Roofs",
    "device_name",
    "measure_roofs",
    "ffn_costs",
    "speedup_bound",
    "sparse_floor_ms",
    "union_density",
    "iid_union_density",
    "amdahl",
    "model_ffn_share",
]


@dataclass(frozen=True)
class Roofs:
    """Measured ceilings of one device.

    Attributes:
        device: what was measured (GPU name, or ``"CPU (<processor>)"``).
        dtype: dtype of the matmul roof.
        matmul_tflops: a ``[n, n] x [n, n]`` matmul's rate, 2 n^3 FLOPs over its median time.
        copy_gbps: device-to-device copy bandwidth, read + write bytes counted, GB/s (1e9).
        matmul_n, copy_mib: the sizes used.
    """

    device: str
    dtype: str
    matmul_tflops: float
    copy_gbps: float
    matmul_n: int
    copy_mib: float

    def as_dict(self) -> dict:
        return asdict(self)


def _median_ms(fn, reps: int, device: torch.device) -> float:
    return statistics.median(synced_ms(fn, device, reps))


def device_name(device: torch.device) -> str:
    """GPU name, or ``"CPU (<processor>, <n> threads)"``: the ``gpu`` field of every row."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine() or "unknown"
    return f"CPU ({proc}, {torch.get_num_threads()} threads)"


def measure_roofs(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, *, quick: bool = False
) -> Roofs:
    """Measures the matmul rate and copy bandwidth of ``device``.

    CUDA: an 8192^3 matmul in ``dtype`` (the rate the dense FFN GEMMs can reach; 798 TFLOP/s in
    bf16 on the development H100) and a 1 GiB copy. CPU: 1024^3 (512^3 with ``quick``) and 64 MiB
    (16 MiB), so that CPU rows are bounded by the CPU's own rates.
    """
    device = torch.device(device)
    if device.type == "cuda":
        n, copy_bytes, reps = (4096, 256 << 20, 5) if quick else (8192, 1 << 30, 10)
    else:
        n, copy_bytes, reps = (512, 16 << 20, 3) if quick else (1024, 64 << 20, 5)
    from .timing import on_device

    with on_device(device):
        return _measure(device, dtype, n, copy_bytes, reps)


def _measure(device: torch.device, dtype: torch.dtype, n: int, copy_bytes: int, reps: int) -> Roofs:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        torch.matmul(a, b)
    mm_ms = _median_ms(lambda: torch.matmul(a, b), reps, device)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    cp_ms = _median_ms(lambda: dst.copy_(src), reps, device)
    return Roofs(
        device=device_name(device),
        dtype=str(dtype).replace("torch.", ""),
        matmul_tflops=2.0 * n**3 / (mm_ms * 1e-3) / 1e12,
        copy_gbps=2.0 * copy_bytes / (cp_ms * 1e-3) / 1e9,
        matmul_n=n,
        copy_mib=copy_bytes / (1 << 20),
    )


def ffn_costs(op: str, M: int, K: int, N: int, a: float, u: float, elem_bytes: int) -> dict[str, float]:
    """FLOPs and HBM bytes of the ideal dense and ideal sparse gated FFN for ``op``.

    ``ffn_fwd`` (and ``prefill``/``decode``): dense 6MKN FLOPs, reads 3KN weights; sparse
    2MKN + 4MKa FLOPs (the gate stays dense), reads the gate KN plus the union of active rows of
    up/down, 2uKN. ``ffn_fwdbwd`` (and ``train_step``): dense 18MKN, sparse 2MKN + 16MKa (every
    product but the gate's forward can skip inactive units); bytes: dense reads the weights twice
    and writes 3 dense gradients (9KN), sparse reads the gate twice and the active rows of the
    three matrices once per pass (2 + 5u) KN and writes the 3 gradients (3KN), i.e. (5 + 5u) KN.
    Both add the M x K input and output (and their gradients for the backward).
    """
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"u: union density must be in [0, 1], got {u}")
    if not 0.0 <= a <= N:
        raise ValueError(f"a: active units per token must be in [0, N={N}], got {a}")
    act = 2.0 * M * K * elem_bytes  # x read + y written
    if op in ("ffn_fwd", "prefill", "decode"):
        return {
            "dense_flops": 6.0 * M * K * N,
            "dense_bytes": 3.0 * K * N * elem_bytes + act,
            "sparse_flops": 2.0 * M * K * N + 4.0 * M * K * a,
            "sparse_bytes": (1.0 + 2.0 * u) * K * N * elem_bytes + act,
        }
    if op in ("ffn_fwdbwd", "train_step"):
        return {
            "dense_flops": 18.0 * M * K * N,
            "dense_bytes": 9.0 * K * N * elem_bytes + 2 * act,
            "sparse_flops": 2.0 * M * K * N + 16.0 * M * K * a,
            "sparse_bytes": (5.0 + 5.0 * u) * K * N * elem_bytes + 2 * act,
        }
    raise ValueError(f"op: unknown op {op!r}")


def _t(flops: float, nbytes: float, roofs: Roofs) -> float:
    return max(flops / (roofs.matmul_tflops * 1e12), nbytes / (roofs.copy_gbps * 1e9))


def speedup_bound(
    op: str, M: int, K: int, N: int, a: float, u: float, roofs: Roofs, elem_bytes: int
) -> float:
    """The largest speedup over dense a sparse FFN can reach for this shape, density and M:
    ``t_dense / t_sparse`` at the measured roofs (see :func:`ffn_costs`)."""
    c = ffn_costs(op, M, K, N, a, u, elem_bytes)
    return _t(c["dense_flops"], c["dense_bytes"], roofs) / _t(c["sparse_flops"], c["sparse_bytes"], roofs)


def sparse_floor_ms(
    op: str, M: int, K: int, N: int, a: float, u: float, roofs: Roofs, elem_bytes: int
) -> float:
    """The ideal sparse FFN's time in ms at the measured roofs (the denominator of ``roof_fraction``)."""
    c = ffn_costs(op, M, K, N, a, u, elem_bytes)
    return 1e3 * _t(c["sparse_flops"], c["sparse_bytes"], roofs)


def union_density(active: torch.Tensor) -> float:
    """Fraction of units active in at least one row of ``active [M, N]`` (bool)."""
    if active.dim() != 2:
        raise ValueError(f"active: expected a 2-D [M, N] tensor, got shape {tuple(active.shape)}")
    if active.shape[1] == 0:
        return 0.0
    return float(active.any(dim=0).float().mean())


def iid_union_density(rho: float, M: int) -> float:
    """``1 - (1 - rho)^M``: the union density of M independent tokens with density rho."""
    return 1.0 - (1.0 - rho) ** M


def amdahl(share: float, speedup: float) -> float:
    """Whole-model speedup when a part taking ``share`` of the time gets ``speedup``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share: must be in [0, 1], got {share}")
    return 1.0 / ((1.0 - share) + share / speedup)


def model_ffn_share(
    K: int, N: int, layers: int, heads: int, kv_heads: int | None, vocab: int, ctx: int
) -> float:
    """FFN share of a Llama-like decoder's forward FLOPs per token at context ``ctx``.

    Per layer: FFN 6KN; attention projections 2K(2K + 2 K_kv) with K_kv = K kv_heads / heads;
    scores and weighted sum 4 ctx K. Plus the LM head 2 K vocab once. A FLOP share: it
    underestimates the FFN's share of time where attention runs below the matmul rate.
    """
    kv = K * (kv_heads or heads) // heads
    ffn = 6.0 * K * N * layers
    attn = (2.0 * K * (2 * K + 2 * kv) + 4.0 * ctx * K) * layers
    return ffn / (ffn + attn + 2.0 * K * vocab)

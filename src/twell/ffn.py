"""``twell.sparse_ffn``: the public gated-ReLU FFN, dispatching to the kernels or the reference.

Legend: M = tokens (all leading dims of x), K = model dim, N = FFN units.
"""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, MAX_COLUMNS, check_ffn_args, check_tile_slots
from .ops.ffn_ref import sparse_ffn_ref
from .stats import FFNStats

try:  # the kernels need Triton; without it (e.g. macOS) every call takes the torch reference
    from .ops import ffn_infer as _ffn_infer
    from .ops import ffn_train as _ffn_train
except ImportError as _e:  # pragma: no cover
    if _e.name not in ("triton", "triton.language"):
        raise
    _ffn_infer = _ffn_train = None

__all__ = ["sparse_ffn", "BACKENDS"]

#: accepted values of ``backend``
BACKENDS = ("auto", "reference", "triton")


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _kernel_path(x2, w_gate, w_up, w_down, tile, slots, unit_counts, return_stats):
    """The Triton path, or None when this install has no kernels (no Triton)."""
    if _needs_grad(x2, w_gate, w_up, w_down):
        if _ffn_train is None:
            return None
        return _ffn_train.ffn_train(x2, w_gate, w_up, w_down, tile=tile, slots=slots, unit_counts=unit_counts)
    if _ffn_infer is None:
        return None
    # sparse_ffn has checked the arguments (x2 is 2-D, N within the column limit)
    return _ffn_infer.ffn_infer_checked(x2, w_gate, w_up, w_down, tile, slots, return_stats, unit_counts)


def sparse_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    return_stats: bool = False,
    tile: int = 256,
    slots: int = 32,
    unit_counts: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, FFNStats]:
    """The gated-ReLU FFN ``y = (relu(x W_gate^T) * (x W_up^T)) W_down^T``, autograd-aware.

    Args:
        x: ``[..., K]`` activations (any leading dims); float32, bfloat16 or float16 (float64 runs
            the reference path).
        w_gate, w_up: ``[N, K]`` (``nn.Linear`` layout); w_down: ``[K, N]``.
        return_stats: also return :class:`twell.FFNStats` (``l0``, differentiable ``l1``,
            ``overflow_rows``, optional ``unit_counts``).
        tile, slots: TwELL geometry used by the kernels (and for the overflow count).
        unit_counts: fill ``stats.unit_counts`` (per-unit activation counts, for dead units).
        backend: ``"auto"`` (kernels on CUDA when installed, the torch reference otherwise),
            ``"reference"`` or ``"triton"``.

    Returns:
        ``y [..., K]``, or ``(y, stats)`` with ``return_stats=True``.

    Determinism: some kernels add fp32 partial sums with atomics (the decode path at small batch,
    the training backward's weight gradients), so repeated calls may differ in the last bit. Under
    ``torch.use_deterministic_algorithms(True)`` they switch to fixed-order forms and results
    repeat bit for bit.

    Example::

        >>> import torch, twell
        >>> x = torch.randn(2, 5, 64)
        >>> wg, wu, wd = torch.randn(256, 64), torch.randn(256, 64), torch.randn(64, 256)
        >>> y, st = twell.sparse_ffn(x, wg, wu, wd, return_stats=True)
        >>> y.shape, st.l0.item() <= 256
        (torch.Size([2, 5, 64]), True)
    """
    K, N = check_ffn_args(x, w_gate, w_up, w_down)
    check_tile_slots(tile, slots)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    out = None
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        if N > MAX_COLUMNS or x.dtype not in FLOAT_DTYPES:
            if backend == "triton" and N > MAX_COLUMNS:
                raise ValueError(f"w_gate: N={N} exceeds the kernels' limit of {MAX_COLUMNS} units")
            if backend == "triton":
                raise TypeError(
                    f"x: dtype {x.dtype} has no kernel (float32, bfloat16, float16); use the reference"
                )
        else:
            # without statistics the inference dense fallback is the plain 3-GEMM forward
            out = _kernel_path(
                x2, w_gate, w_up, w_down, tile, slots, unit_counts, return_stats or unit_counts
            )
        if out is None and backend == "triton":
            raise ValueError("backend: 'triton' requested but this install has no kernel for this case")
    if out is None:
        out = sparse_ffn_ref(x2, w_gate, w_up, w_down, tile=tile, slots=slots, unit_counts=unit_counts)
    y, stats = out
    y = y.reshape(*lead, K)
    return (y, stats) if return_stats else y

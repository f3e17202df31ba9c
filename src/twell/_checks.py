"""Argument checks shared by every public op: bad input raises a ValueError/TypeError that names
the argument, its value and what is allowed."""

from __future__ import annotations

import torch

__all__ = [
    "FFN_DTYPES",
    "FLOAT_DTYPES",
    "MAX_COLUMNS",
    "check_tensor",
    "check_ffn_args",
    "check_tile_slots",
]

#: dtypes every op accepts
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the FFN also accepts float64 (reference path only), for high-precision references
FFN_DTYPES = FLOAT_DTYPES + (torch.float64,)
#: largest N (number of FFN units / columns) a TwELL column index can hold: 16-bit indices
MAX_COLUMNS = 1 << 16


def check_tensor(t, name: str, *, dtypes=FLOAT_DTYPES, min_dim: int = 1, dim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported (allowed: {allowed})"
        )
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_tile_slots(tile: int, slots: int):
    """``tile`` (T, columns per tile) is a power of two in [16, 4096]; ``slots`` (S) in [1, T]."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 16 or tile > 4096 or tile & (tile - 1):
        raise ValueError(f"tile: must be a power of two in [16, 4096], got {tile!r}")
    if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= tile:
        raise ValueError(f"slots: must be an int in [1, tile={tile}], got {slots!r}")


def check_ffn_args(x, w_gate, w_up, w_down, *, max_columns: int | None = None):
    """Checks ``x [..., K]``, ``w_gate [N, K]``, ``w_up [N, K]``, ``w_down [K, N]``; returns (K, N).

    Dtypes must match unless autocast is active on x's device (then torch's casting rules apply).
    """
    check_tensor(x, "x", min_dim=1, dtypes=FFN_DTYPES)
    check_tensor(w_gate, "w_gate", dim=2, dtypes=FFN_DTYPES)
    check_tensor(w_up, "w_up", dim=2, dtypes=FFN_DTYPES)
    check_tensor(w_down, "w_down", dim=2, dtypes=FFN_DTYPES)
    K = x.shape[-1]
    N = w_gate.shape[0]
    if w_gate.shape[1] != K:
        raise ValueError(f"w_gate: expected shape [N, K={K}] (x's last dim), got {tuple(w_gate.shape)}")
    if tuple(w_up.shape) != (N, K):
        raise ValueError(f"w_up: expected shape [N={N}, K={K}] like w_gate, got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (K, N):
        raise ValueError(
            f"w_down: expected shape [K={K}, N={N}] (nn.Linear layout), got {tuple(w_down.shape)}"
        )
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.device != x.device:
            raise ValueError(
                f"{name}: on device {w.device} but x is on {x.device}; put all operands on one device"
            )
    if not torch.is_autocast_enabled(x.device.type):
        for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            if w.dtype != x.dtype:
                raise TypeError(
                    f"{name}: dtype {w.dtype} differs from x's {x.dtype}; cast the weights or use autocast"
                )
    if max_columns is not None and N > max_columns:
        raise ValueError(f"w_gate: N={N} units exceeds the limit of {max_columns} for this path")
    return K, N

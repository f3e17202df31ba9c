"""Output allocation for every op of the package.

Ops allocate their outputs through :func:`empty` so that tests can poison them (NaN for floats,
a sentinel for integers): an output element that a kernel forgot to write then fails loudly
instead of passing on whatever the allocator returned. Poisoning is off unless a test turns it
on with :func:`twell.testing.poison_allocations`.
"""

from __future__ import annotations

import torch

__all__ = ["empty", "poisoning", "INT_POISON"]

#: value written into integer outputs while poisoning is on
INT_POISON = -0x5A5A5A5

_state = {"poison": False}


def poisoning() -> bool:
    """True while tests poison allocations (then ops should not reuse buffers between calls)."""
    return _state["poison"]


def empty(shape, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` that fills the tensor with NaN / :data:`INT_POISON` while poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _state["poison"]:
        if out.is_floating_point():
            out.fill_(float("nan"))
        elif dtype == torch.bool:
            out.fill_(True)
        else:
            info = torch.iinfo(dtype)
            out.fill_(max(min(INT_POISON, info.max), info.min))
    return out

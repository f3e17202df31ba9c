"""Sparsity statistics of an FFN forward, and the L1 penalty built from them.

L1 convention (the one the released SparseLM checkpoints were trained with): per layer,
``l1 = mean over tokens of (sum over units of |h|)``; the penalty is
``coeff * mean over layers of l1``. The paper writes the same penalty with a 1/N factor
(mean over units instead of sum), so ``coeff_paper = coeff * N``; e.g. the paper's 2e-5 at
N = 5632 is not this convention's 2e-5.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FFNStats", "l1_penalty", "sparsity_stats"]


@dataclass
class FFNStats:
    """Statistics of one sparse FFN forward (0-dim tensors, so reading them needs no host sync).

    Attributes:
        l0: mean number of active units per token (float32).
        l1: mean over tokens of the sum over units of |h| (float32, differentiable).
        overflow_rows: number of tokens with a (token, tile) holding more than ``slots`` active
            units (int64); such tokens are still computed exactly.
        unit_counts: optional per-unit number of tokens in which the unit was active, int64 [N].
        tokens: number of tokens of the forward.
    """

    l0: torch.Tensor
    l1: torch.Tensor
    overflow_rows: torch.Tensor
    unit_counts: torch.Tensor | None = None
    tokens: int = 0


def _collect(source) -> list[tuple[FFNStats, float | None]]:
    if isinstance(source, FFNStats):
        return [(source, None)]
    if isinstance(source, nn.Module):
        found = []
        for mod in source.modules():
            if hasattr(mod, "last_stats") and hasattr(mod, "l1_coeff"):
                if mod.last_stats is None:
                    raise RuntimeError(
                        f"l1_penalty: {type(mod).__name__} has no statistics yet; run a forward pass first "
                        "(statistics are collected while collect_stats=True)"
                    )
                st = mod.last_stats
                if (
                    torch.is_grad_enabled()
                    and mod.training
                    and not st.l1.requires_grad
                    and any(p.requires_grad for p in mod.parameters())
                ):
                    raise RuntimeError(
                        f"l1_penalty: the last forward of {type(mod).__name__} ran without autograd "
                        "(torch.no_grad / inference_mode, or reentrant gradient checkpointing), so the L1 "
                        "term would carry no gradient; use gradient checkpointing with use_reentrant=False"
                    )
                found.append((st, float(mod.l1_coeff)))
        if not found:
            raise ValueError(
                "source: the module holds no sparse MLP (use twell.sparsify_ or twell.SparseGatedMLP)"
            )
        return found
    if isinstance(source, Iterable):
        items = list(source)
        if not items or not all(isinstance(s, FFNStats) for s in items):
            raise TypeError("source: expected an nn.Module, an FFNStats or a non-empty sequence of FFNStats")
        return [(s, None) for s in items]
    raise TypeError(
        f"source: expected an nn.Module, an FFNStats or a sequence of FFNStats, got {type(source).__name__}"
    )


def l1_penalty(source, coeff: float | None = None) -> torch.Tensor:
    """``coeff * mean over layers of l1`` for the last forward of ``source``.

    ``source`` is a model holding :class:`twell.SparseGatedMLP` modules (each contributes its own
    ``l1_coeff`` unless ``coeff`` is given), one :class:`FFNStats`, or a sequence of them (then
    ``coeff`` is required).
    """
    items = _collect(source)
    terms = []
    for st, own in items:
        c = coeff if coeff is not None else own
        if c is None:
            raise ValueError("coeff: required when source is FFNStats (modules carry their own l1_coeff)")
        terms.append(st.l1 * c)
    return torch.stack(terms).mean()


def sparsity_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per sparse MLP of ``model`` (by module name): l0, l1, overflow_rows and tokens of the last
    forward, as Python numbers (this synchronises with the device)."""
    out = {}
    for name, mod in model.named_modules():
        st = getattr(mod, "last_stats", None)
        if hasattr(mod, "l1_coeff") and st is not None:
            out[name] = {
                "l0": float(st.l0),
                "l1": float(st.l1.detach()),
                "overflow_rows": int(st.overflow_rows),
                "tokens": int(st.tokens),
            }
    return out

"""Schedules of a run: the L1 coefficient per step, and the learning rate (warm-up + cosine)."""

from __future__ import annotations

import torch

__all__ = ["l1_coeff_at", "make_lr_scheduler"]


def l1_coeff_at(
    step: int, coeff: float, schedule: str = "constant", warmup_steps: int = 0, delay_steps: int = 0
) -> float:
    """The L1 coefficient used at optimizer step ``step`` (0-based).

    ``constant``: ``coeff`` from ``delay_steps`` on. ``linear``: 0 until ``delay_steps``, then a
    linear ramp reaching ``coeff`` after ``warmup_steps`` more steps (the paper's "sparsity warm-up"
    is ``delay_steps=5000, warmup_steps=5000``). Before ``delay_steps`` the coefficient is 0.
    """
    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule: expected 'constant' or 'linear', got {schedule!r}")
    if step < delay_steps:
        return 0.0
    if schedule == "constant" or warmup_steps == 0:
        return float(coeff)
    return float(coeff) * min(1.0, (step - delay_steps + 1) / warmup_steps)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int):
    """Linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``max_steps`` (the HF Trainer's
    ``cosine`` schedule the paper used); stepped once per optimizer step."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps
    )

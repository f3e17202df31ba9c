"""``twell.train``: the L1 sparse-LM training recipe (configs and presets, L1 schedule, data
pipeline, accelerate loop, logging and plots) behind ``twell train``.

Example::

    from twell.train import get_preset, train
    result = train(get_preset("tiny", max_steps=200, output_dir="runs/tiny"))
    print(result.final_eval)  # {"val_ce": ..., "val_ppl": ..., ...}
"""

from __future__ import annotations

from .config import PRESETS, TrainConfig, get_preset
from .loop import TrainResult, evaluate, latest_checkpoint, train
from .schedule import l1_coeff_at, make_lr_scheduler

__all__ = [
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "get_preset",
    "l1_coeff_at",
    "latest_checkpoint",
    "make_lr_scheduler",
    "train",
]

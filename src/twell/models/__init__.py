"""Hugging Face model classes for ReLU-gated sparse LMs, checkpoint loading, benchmark fixtures.

Importing ``twell.models`` registers the model types ``"twell_sparse_llama"`` and
``"llama_sparse_relu"`` (the released SparseLM checkpoints) with ``AutoConfig`` and
``AutoModelForCausalLM`` (:func:`register`, idempotent). ``import twell`` alone does not import
transformers.
"""

from __future__ import annotations

from .sparse_llama import (
    SparseLMConfig,
    SparseLMForCausalLM,
    TwellSparseLlamaConfig,
    TwellSparseLlamaForCausalLM,
    fix_transposed_down_proj,
    load_checkpoint_state_dict,
)

__all__ = [
    "SparseLMConfig",
    "SparseLMForCausalLM",
    "TwellSparseLlamaConfig",
    "TwellSparseLlamaForCausalLM",
    "bench_model",
    "fix_transposed_down_proj",
    "load_checkpoint_state_dict",
    "make_sparse_llama_",
    "register",
]


def register() -> None:
    """Registers the twell model types with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for cfg, model in (
        (TwellSparseLlamaConfig, TwellSparseLlamaForCausalLM),
        (SparseLMConfig, SparseLMForCausalLM),
    ):
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, model, exist_ok=True)


def __getattr__(name: str):
    # the benchmark helpers are imported on first use
    if name in ("bench_model", "make_sparse_llama_"):
        from . import fixtures

        return getattr(fixtures, name)
    raise AttributeError(f"module 'twell.models' has no attribute {name!r}")


# Registration is the documented effect of importing this subpackage (it does not run on `import twell`).
register()

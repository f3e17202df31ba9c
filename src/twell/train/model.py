"""The model a run trains: a Llama-style decoder whose ReLU-gated FFNs are :class:`twell.SparseGatedMLP`
(``twell.models``), or a local HF checkpoint ReLUfied by :func:`twell.sparsify_`."""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["build_model", "sparse_mlps", "count_parameters"]


def _model_kwargs(cfg, vocab_size: int, eos: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        hidden_act="relu",
        max_position_embeddings=cfg.seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )


def build_model(cfg, vocab_size: int, eos: int) -> nn.Module:
    """A sparsified causal LM for ``cfg`` (a :class:`TrainConfig`), fp32 weights on the CPU.

    Fresh: a :class:`twell.models.TwellSparseLlamaForCausalLM` (a ``LlamaForCausalLM`` with
    ``hidden_act="relu"`` whose ``save_pretrained`` output loads in twell and, as a ReLU Llama, in
    plain transformers), initialised from ``cfg.seed``.
    ``cfg.init_from``: that local HF checkpoint (any gated-MLP decoder ``AutoModelForCausalLM``
    loads); a SiLU/GELU gate is switched to ReLU by ``sparsify_`` (ReLUfication), so its outputs
    change until fine-tuning recovers them. Either way every MLP becomes a ``SparseGatedMLP`` that
    tracks per-unit activation counts (dead units). With ``cfg.sparse_mlp=False`` the MLPs stay
    Hugging Face's dense ReLU MLPs (a plain ``LlamaForCausalLM``): the throughput baseline.
    """
    import twell

    if cfg.init_from:
        from transformers import AutoModelForCausalLM

        from .. import models  # noqa: F401  (registers twell's model types, so twell checkpoints load too)

        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
        act = getattr(model.config, "hidden_act", None)
        if act != "relu":
            warnings.warn(
                f"init_from: {cfg.init_from} uses hidden_act={act!r}; it is switched to ReLU (ReLUfication), "
                "fine-tune with L1 to recover its quality",
                UserWarning,
                stacklevel=2,
            )
        model_vocab = model.get_input_embeddings().weight.shape[0]
        if model_vocab < vocab_size:
            raise ValueError(
                f"init_from: the model's vocabulary ({model_vocab}) is smaller than the tokenizer's ({vocab_size}); "
                "pass the model's own tokenizer with --tokenizer"
            )
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ..models import TwellSparseLlamaConfig, TwellSparseLlamaForCausalLM

        if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
            raise ValueError(
                f"vocab_size: {cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            kw = _model_kwargs(cfg, cfg.vocab_size or vocab_size, eos)
            if cfg.sparse_mlp:
                sparse = {"sparsity_l1_coeff": cfg.l1_coeff, "twell_tile": cfg.tile, "twell_slots": cfg.slots}
                model = TwellSparseLlamaForCausalLM(
                    TwellSparseLlamaConfig(**kw, **sparse, twell_backend=cfg.backend)
                )
            else:
                # the same architecture and initialisation with Hugging Face's own (dense) MLP
                model = LlamaForCausalLM(LlamaConfig(**kw))
    model.config.use_cache = False
    if not cfg.sparse_mlp:
        if cfg.init_from:  # switch the activation to ReLU, keep the dense MLP modules
            twell.unsparsify_(twell.sparsify_(model, twell.SparsityConfig(force_relu=True)))
        _checkpointing(model, cfg)
        return model
    twell.sparsify_(
        model,
        twell.SparsityConfig(
            l1_coeff=cfg.l1_coeff,
            tile=cfg.tile,
            slots=cfg.slots,
            force_relu=True,  # init_from warned above; fresh models are ReLU already
            track_unit_counts=True,
            backend=cfg.backend,
        ),
    )
    _checkpointing(model, cfg)
    return model


def _checkpointing(model: nn.Module, cfg) -> None:
    if cfg.activation_checkpointing:
        kw = {
            "use_reentrant": False
        }  # the paper's recipe; reentrant checkpointing drops the L1 statistics' graph
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def sparse_mlps(model: nn.Module) -> list[nn.Module]:
    """The :class:`twell.SparseGatedMLP` modules of ``model`` in layer order."""
    from twell import SparseGatedMLP

    return [m for m in model.modules() if isinstance(m, SparseGatedMLP)]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

"""Hugging Face config and model classes for ReLU-gated sparse Llama LMs.

- ``TwellSparseLlamaConfig`` / ``TwellSparseLlamaForCausalLM`` (``model_type="twell_sparse_llama"``):
  a ``LlamaForCausalLM`` whose MLPs are :class:`twell.SparseGatedMLP` (``hidden_act="relu"``).
  ``save_pretrained`` writes the Llama state-dict layout, so ``transformers.LlamaForCausalLM``
  loads the same directory as the dense ReLU model (with a model-type warning).
- ``SparseLMConfig`` / ``SparseLMForCausalLM`` (``model_type="llama_sparse_relu"``): the layout of
  the released SparseLM checkpoints (HF Llama, gated ReLU MLP hard-coded although their configs say
  ``hidden_act: silu``). Checkpoints saved from hybrid-kernel training store ``down_proj.weight``
  transposed, ``[N, K]`` instead of ``[K, N]``: :meth:`from_pretrained` detects that by shape and
  transposes it back with a warning (a square ``N == K`` layout cannot be detected).

Legend: K = hidden_size, N = intermediate_size.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from ..convert import SparsityConfig, _sparsify

__all__ = [
    "TwellSparseLlamaConfig",
    "TwellSparseLlamaForCausalLM",
    "SparseLMConfig",
    "SparseLMForCausalLM",
    "load_checkpoint_state_dict",
    "fix_transposed_down_proj",
]

_DOWN_KEY = re.compile(r"(^|\.)mlp\.down_proj\.weight$")
_GATE_KEY = re.compile(r"(^|\.)mlp\.gate_proj\.weight$")
_UP_KEY = re.compile(r"(^|\.)mlp\.up_proj\.weight$")


class TwellSparseLlamaConfig(LlamaConfig):
    """``LlamaConfig`` for a ReLU-gated sparse LM.

    Extra fields (saved in ``config.json``): ``sparsity_l1_coeff`` (L1 coefficient, see
    :class:`twell.SparsityConfig`), ``twell_tile``, ``twell_slots`` (TwELL geometry) and
    ``twell_backend`` (``"auto"``, ``"reference"`` or ``"triton"``). ``hidden_act`` must be ``"relu"``.
    """

    model_type = "twell_sparse_llama"

    def __init__(
        self,
        hidden_act: str = "relu",
        sparsity_l1_coeff: float = 0.0,
        twell_tile: int = 256,
        twell_slots: int = 32,
        twell_backend: str = "auto",
        **kwargs,
    ):
        if hidden_act != "relu":
            raise ValueError(
                f"hidden_act: a {type(self).__name__} is ReLU-gated, got {hidden_act!r} (a released SparseLM "
                "checkpoint, model_type 'llama_sparse_relu', loads with SparseLMForCausalLM or "
                "AutoModelForCausalLM after `import twell.models`)"
            )
        super().__init__(hidden_act=hidden_act, **kwargs)
        self.sparsity_l1_coeff = sparsity_l1_coeff
        self.twell_tile = twell_tile
        self.twell_slots = twell_slots
        self.twell_backend = twell_backend

    def sparsity_config(self) -> SparsityConfig:
        """The :class:`twell.SparsityConfig` this config describes."""
        return SparsityConfig(
            l1_coeff=float(self.sparsity_l1_coeff),
            tile=int(self.twell_tile),
            slots=int(self.twell_slots),
            backend=self.twell_backend,
            force_relu=True,
        )


class SparseLMConfig(TwellSparseLlamaConfig):
    """Config of the released SparseLM checkpoints (``model_type="llama_sparse_relu"``).

    Their architecture hard-codes ReLU while their ``config.json`` says ``hidden_act: silu``; the
    stated activation is ignored (kept as ``checkpoint_hidden_act``) and ``hidden_act`` is ``"relu"``.
    Their ``sparsity_l1_coeff`` (3e-4, 2e-5 at 1.5B) is read as the L1 coefficient.
    """

    model_type = "llama_sparse_relu"

    def __init__(self, hidden_act: str = "relu", sparsity_l1_coeff: float = 3e-4, **kwargs):
        checkpoint_act = kwargs.pop("checkpoint_hidden_act", hidden_act)
        super().__init__(hidden_act="relu", sparsity_l1_coeff=sparsity_l1_coeff, **kwargs)
        self.checkpoint_hidden_act = checkpoint_act


# -- checkpoint reading -----------------------------------------------------------------------------


def _weight_files(path: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        f = os.path.join(path, index)
        if os.path.isfile(f):
            with open(f) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return [f]
    return []


def _read_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    shapes[k] = tuple(fh.get_slice(k).get_shape())
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in sd.items()})
    return shapes


def load_checkpoint_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in directory ``path`` (safetensors or ``.bin``, sharded or not)."""
    files = _weight_files(path)
    if not files:
        raise ValueError(f"path: no model.safetensors / pytorch_model.bin (or index) in {path!r}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd.update(load_file(f))
        else:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def _transposed_down_keys(shapes: dict[str, tuple[int, ...]], K: int, N: int) -> list[str]:
    """Keys of ``down_proj.weight`` stored ``[N, K]``; raises on any other wrong shape."""
    bad = []
    for k, s in shapes.items():
        if not _DOWN_KEY.search(k):
            continue
        if s == (K, N):
            continue
        if s == (N, K):
            bad.append(k)
        else:
            raise ValueError(
                f"checkpoint: {k} has shape {list(s)}; expected [{K}, {N}] (or [{N}, {K}] transposed)"
            )
    return bad


def fix_transposed_down_proj(
    state_dict: dict[str, torch.Tensor], hidden_size: int, intermediate_size: int
) -> list[str]:
    """Transposes, in ``state_dict``, every ``mlp.down_proj.weight`` stored ``[N, K]`` (hybrid-training
    layout) to the Hugging Face ``[K, N]``; returns the fixed keys. ``N == K`` cannot be detected."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    keys = _transposed_down_keys(shapes, hidden_size, intermediate_size)
    for k in keys:
        state_dict[k] = state_dict[k].t().contiguous()
    return keys


def _check_gated(shapes: dict[str, tuple[int, ...]], path: str) -> None:
    has_up = any(_UP_KEY.search(k) for k in shapes)
    has_gate = any(_GATE_KEY.search(k) for k in shapes)
    if has_up and not has_gate:
        raise ValueError(
            f"pretrained_model_name_or_path: {path!r} holds a non-gated ReLU MLP (no gate_proj); "
            "twell supports the gated variant only"
        )


# -- models -----------------------------------------------------------------------------------------


class TwellSparseLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with :class:`twell.SparseGatedMLP` MLPs (same parameter names).

    On CUDA the MLPs run the Triton kernels, elsewhere the torch reference (see
    :func:`twell.sparse_ffn`). ``twell.l1_penalty(model)`` and ``twell.sparsity_stats(model)``
    read the statistics of the last forward. ``from_pretrained`` accepts a local directory in the
    Llama layout, fixing a transposed ``down_proj.weight`` (hybrid-training checkpoints) with a warning.
    """

    config_class = TwellSparseLlamaConfig

    def __init__(self, config: TwellSparseLlamaConfig):
        super().__init__(config)
        # Under from_pretrained the weights may still be on the meta device: allowed here, the
        # loader materialises the adopted nn.Linear modules in place.
        _sparsify(self, config.sparsity_config(), None, allow_meta=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``, plus: for a local directory whose checkpoint stores
        ``mlp.down_proj.weight`` as ``[N, K]``, the weights are read, fixed and passed as
        ``state_dict`` (one extra copy in host memory), with a ``UserWarning``."""
        path = os.fspath(pretrained_model_name_or_path) if pretrained_model_name_or_path is not None else None
        fixed = None
        if path is not None and kwargs.get("state_dict") is None:
            folder = os.path.join(path, kwargs.get("subfolder", "") or "")
            if os.path.isdir(folder):
                fixed = _maybe_fixed_state_dict(folder, kwargs.get("config"))
        if fixed is None:
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        else:
            # transformers takes either a path or a state dict: load the config (and the generation
            # config) from the folder ourselves and hand over the fixed tensors.
            config = kwargs.pop("config", None)
            kwargs.pop("subfolder", None)
            if not isinstance(config, PretrainedConfig):
                config = cls.config_class.from_pretrained(folder if config is None else config)
            model = super().from_pretrained(None, *model_args, config=config, state_dict=fixed, **kwargs)
            if os.path.isfile(os.path.join(folder, "generation_config.json")):
                model.generation_config = GenerationConfig.from_pretrained(folder)
        _materialise_buffers(model)
        return model


class SparseLMForCausalLM(TwellSparseLlamaForCausalLM):
    """The released SparseLM checkpoints (``model_type="llama_sparse_relu"``) as a twell model."""

    config_class = SparseLMConfig


def _maybe_fixed_state_dict(folder: str, config) -> dict[str, torch.Tensor] | None:
    files = _weight_files(folder)
    if not files:
        return None
    if config is None or isinstance(config, (str, os.PathLike)):
        cfg_file = os.path.join(folder if config is None else os.fspath(config), "config.json")
        if os.path.isdir(cfg_file) or not os.path.isfile(cfg_file):
            return None
        with open(cfg_file) as fh:
            raw = json.load(fh)
        K, N = raw.get("hidden_size"), raw.get("intermediate_size")
    else:
        K, N = config.hidden_size, config.intermediate_size
    if K is None or N is None:
        return None
    shapes = _read_shapes(files)
    _check_gated(shapes, folder)
    if not _transposed_down_keys(shapes, K, N):
        return None
    sd = load_checkpoint_state_dict(folder)
    keys = fix_transposed_down_proj(sd, K, N)
    warnings.warn(
        f"from_pretrained: {len(keys)} mlp.down_proj.weight tensor(s) in {folder!r} are stored transposed "
        f"[{N}, {K}] (hybrid-training layout); transposed to the Hugging Face layout [{K}, {N}]",
        UserWarning,
        stacklevel=3,
    )
    return sd


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers left on the meta device by a meta-device load get real zeros."""
    for mod in model.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta and name == "unit_counts":
                w = next((p for p in mod.parameters() if not p.is_meta), None)
                dev = w.device if w is not None else torch.device("cpu")
                setattr(mod, name, torch.zeros(buf.shape, dtype=buf.dtype, device=dev))

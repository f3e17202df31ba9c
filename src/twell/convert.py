"""Swap the gated MLPs of a Hugging Face decoder model for :class:`twell.SparseGatedMLP`, in place.

``sparsify_(model, config, filter_fn)`` works on one model instance (no class-level patching of
transformers): every module holding ``gate_proj``/``up_proj``/``down_proj`` linears (Llama, Mistral,
Qwen2, Qwen3 and other Llama-like MLPs) is replaced by a ``SparseGatedMLP`` that takes over the very
same ``nn.Linear`` modules, so no weight is copied and state dicts keep the Hugging Face names.
``unsparsify_(model)`` puts plain (ReLU) Hugging Face MLP modules back, for export.

Legend: K = model dim (hidden_size), N = FFN units (intermediate_size).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_tile_slots
from .ffn import BACKENDS
from .nn import SparseGatedMLP

__all__ = ["SparsityConfig", "sparsify_", "unsparsify_", "find_gated_mlps"]

# The replaced Hugging Face module (without its linears) is kept on the sparse module under this
# attribute, outside the module tree (no state-dict entries), so that unsparsify_ can restore it.
_SHELL_ATTR = "_twell_hf_shell"
_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SparsityConfig:
    """How :func:`sparsify_` configures each :class:`twell.SparseGatedMLP`.

    Attributes:
        l1_coeff: coefficient of the L1 penalty (:func:`twell.l1_penalty`), in the convention
            ``coeff * mean over layers of mean over tokens of sum over units |h|``. The default 0
            suits inference; the released SparseLM checkpoints were trained with 3e-4 (2e-5 at 1.5B).
        tile, slots: TwELL geometry of the kernels (tile columns, stored entries per row and tile).
        force_relu: replace a non-ReLU activation (SiLU, GELU, ...) without a warning. The swap
            always computes ``relu(gate) * up``: on a model trained with another activation the
            outputs change (the ReLUfication path, which needs fine-tuning).
        track_unit_counts: accumulate per-unit activation counts (dead-unit tracking).
        collect_stats: keep each forward's statistics (needed by ``l1_penalty``/``sparsity_stats``).
        backend: ``"auto"`` (Triton kernels on CUDA, torch reference on CPU), ``"reference"`` or
            ``"triton"``; see :func:`twell.sparse_ffn`.
    """

    l1_coeff: float = 0.0
    tile: int = 256
    slots: int = 32
    force_relu: bool = False
    track_unit_counts: bool = False
    collect_stats: bool = True
    backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.l1_coeff, bool) or not isinstance(self.l1_coeff, (int, float)):
            raise TypeError(f"l1_coeff: expected a float, got {type(self.l1_coeff).__name__}")
        if not self.l1_coeff >= 0:
            raise ValueError(f"l1_coeff: must be >= 0, got {self.l1_coeff}")
        check_tile_slots(self.tile, self.slots)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        for name in ("force_relu", "track_unit_counts", "collect_stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")


def _is_gated_mlp(mod: nn.Module) -> bool:
    return all(isinstance(getattr(mod, p, None), nn.Linear) for p in _PROJ)


def find_gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every gated MLP of ``model``: modules with ``gate_proj``, ``up_proj``
    and ``down_proj`` linears, :class:`twell.SparseGatedMLP` included (outermost match only)."""
    found = []
    # remove_duplicate=False: a module reachable under two names (shared layers) is listed under
    # each, so that every reference to it gets replaced
    for name, mod in model.named_modules(remove_duplicate=False):
        if any(name.startswith(f + ".") for f, _ in found if f):
            continue
        if _is_gated_mlp(mod):
            found.append((name, mod))
    return found


def _is_relu(act) -> bool:
    return isinstance(act, nn.ReLU) or act is torch.relu or act is torch.nn.functional.relu


def _act_name(act) -> str:
    if act is None:
        return "none"
    return type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))


def _check_linears(name: str, mod: nn.Module, allow_meta: bool) -> tuple[int, int]:
    g, u, d = (getattr(mod, p) for p in _PROJ)
    for p, lin in zip(_PROJ, (g, u, d)):
        if lin.bias is not None:
            raise ValueError(
                f"model: {name}.{p} has a bias; twell's gated MLP has none (mlp_bias=False needed)"
            )
        if lin.weight.is_meta and not allow_meta:
            raise ValueError(
                f"model: {name}.{p}.weight is on the meta device (offloaded or not materialised); "
                "load the weights onto a real device before sparsify_"
            )
    N, K = g.weight.shape
    if tuple(u.weight.shape) != (N, K) or tuple(d.weight.shape) != (K, N):
        raise ValueError(
            f"model: {name} has gate_proj {tuple(g.weight.shape)}, up_proj {tuple(u.weight.shape)}, "
            f"down_proj {tuple(d.weight.shape)}; expected [N, K], [N, K], [K, N]"
        )
    return K, N


def _apply_config(mlp: SparseGatedMLP, config: SparsityConfig) -> None:
    mlp.l1_coeff = float(config.l1_coeff)
    mlp.tile = config.tile
    mlp.slots = config.slots
    mlp.track_unit_counts = config.track_unit_counts
    mlp.collect_stats = config.collect_stats
    mlp.backend = config.backend


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _set_relu_config(model: nn.Module, mods: list[nn.Module]) -> None:
    """Sets ``hidden_act = "relu"`` on the model's config (and the MLPs') when every gated MLP of
    the model now computes ReLU; warns when some still use another activation (a partial swap of
    a SiLU model cannot be described by one ``hidden_act``)."""
    others = [
        n
        for n, m in find_gated_mlps(model)
        if not isinstance(m, SparseGatedMLP) and not _is_relu(getattr(m, "act_fn", None))
    ]
    if others:
        warnings.warn(
            f"sparsify_: {len(others)} gated MLP(s) (e.g. {others[0]!r}) keep a non-ReLU activation; the "
            "model config's hidden_act is left unchanged, so save_pretrained would not describe this model",
            UserWarning,
            stacklevel=4,
        )
        return
    configs = [getattr(model, "config", None)] + [getattr(m, "config", None) for m in mods]
    seen = set()
    for cfg in configs:
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "hidden_act"):
            seen.add(id(cfg))
            cfg.hidden_act = "relu"


def sparsify_(
    model: nn.Module,
    config: SparsityConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replaces, in place, each gated MLP of ``model`` by a :class:`twell.SparseGatedMLP`.

    A gated MLP is a module with ``gate_proj``, ``up_proj`` (``[N, K]``) and ``down_proj``
    (``[K, N]``) ``nn.Linear`` children without bias and an ``act_fn`` (Llama, Mistral, Qwen2,
    Qwen3, ...). The new module adopts the same ``nn.Linear`` objects, so parameters (and any
    optimizer state keyed on them) are shared, not copied, and state-dict keys are unchanged.
    MLPs that already are ``SparseGatedMLP`` get the new ``config`` applied.

    The sparse MLP computes ``down(relu(gate(x)) * up(x))``. If a replaced module's activation is
    not ReLU, a ``UserWarning`` says the outputs will change, unless ``config.force_relu``. The
    model's config (and each MLP's) gets ``hidden_act = "relu"``, so ``save_pretrained`` writes a
    checkpoint that plain transformers loads as the same ReLU model.

    Args:
        model: any ``nn.Module`` (typically a Hugging Face ``*ForCausalLM``), weights materialised.
        config: :class:`SparsityConfig` (defaults: no L1, tile 256, 32 slots, automatic backend).
        filter_fn: ``filter_fn(module, name) -> bool``; only modules for which it returns True are
            replaced (e.g. ``lambda m, n: int(n.split(".")[2]) < 10`` for the first ten layers).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model``, ``config`` or ``filter_fn`` of the wrong type.
        ValueError: no gated MLP found, or an MLP with a bias, meta weights or inconsistent shapes.
    """
    return _sparsify(model, config, filter_fn, allow_meta=False)


def _sparsify(model, config, filter_fn, *, allow_meta: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    config = SparsityConfig() if config is None else config
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config: expected a twell.SparsityConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(
            f"filter_fn: expected a callable (module, name) -> bool, got {type(filter_fn).__name__}"
        )
    candidates = find_gated_mlps(model)
    if not candidates:
        raise ValueError(
            f"model: no gated MLP (gate_proj/up_proj/down_proj linears) found in {type(model).__name__}"
        )
    chosen = [(n, m) for n, m in candidates if filter_fn is None or filter_fn(m, n)]
    if not chosen:
        warnings.warn(
            f"sparsify_: filter_fn selected none of the {len(candidates)} gated MLPs; nothing was changed",
            UserWarning,
            stacklevel=3,
        )
        return model
    non_relu: dict[str, list[str]] = {}
    plans = []
    for name, mod in chosen:
        K, N = _check_linears(name, mod, allow_meta)
        if isinstance(mod, SparseGatedMLP):
            plans.append((name, mod, None))
            continue
        act = getattr(mod, "act_fn", None)
        if not _is_relu(act):
            non_relu.setdefault(_act_name(act), []).append(name)
        plans.append((name, mod, (K, N)))
    if non_relu and not config.force_relu:
        desc = "; ".join(f"{a} in {len(ns)} MLP(s), e.g. {ns[0]!r}" for a, ns in non_relu.items())
        warnings.warn(
            f"sparsify_: replacing a non-ReLU activation ({desc}) by ReLU changes the model's outputs "
            "(ReLUfication: fine-tune with an L1 penalty to recover quality). Pass "
            "SparsityConfig(force_relu=True) to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
    replaced = []
    done: dict[int, SparseGatedMLP] = {}
    for name, mod, shape in plans:
        if shape is None:
            _apply_config(mod, config)
            continue
        if id(mod) in done:  # the same module under another name
            _set_module(model, name, done[id(mod)])
            continue
        K, N = shape
        # Built on the meta device so that no weight is allocated; the HF linears are adopted below.
        new = SparseGatedMLP(K, N, device="meta")
        for p in _PROJ:
            lin = getattr(mod, p)
            setattr(new, p, lin)
            # the shell keeps no reference to the linears (they live in the sparse module)
            delattr(mod, p)
        w = new.gate_proj.weight
        new.unit_counts = torch.zeros(N, dtype=torch.int64, device=w.device)
        _apply_config(new, config)
        object.__setattr__(new, _SHELL_ATTR, mod)
        _set_module(model, name, new)
        done[id(mod)] = new
        replaced.append(mod)
    _set_relu_config(model, replaced or [m for _, m in chosen])
    return model


def _plain_mlp(mlp: SparseGatedMLP) -> nn.Module:
    """The Hugging Face module a ``SparseGatedMLP`` replaced, or a new ReLU ``LlamaMLP`` shell."""
    shell = getattr(mlp, _SHELL_ATTR, None)
    if shell is None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        cfg = LlamaConfig(
            hidden_size=mlp.hidden_size,
            intermediate_size=mlp.intermediate_size,
            hidden_act="relu",
            num_attention_heads=1,
            num_key_value_heads=1,
        )
        with torch.device("meta"):
            shell = LlamaMLP(cfg)
    return shell


def unsparsify_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replaces, in place, each :class:`twell.SparseGatedMLP` of ``model`` by a plain ReLU
    Hugging Face MLP holding the same ``nn.Linear`` modules (no copy).

    MLPs created by :func:`sparsify_` get their original module back (with ``act_fn = ReLU``); the
    others become a ``LlamaMLP`` with ``hidden_act="relu"``. Outputs are unchanged (the sparse MLP
    computes the same function). ``filter_fn(module, name) -> bool`` restricts which are restored.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, SparseGatedMLP):
        raise ValueError("model: is itself a SparseGatedMLP; call unsparsify_ on the module holding it")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(
            f"filter_fn: expected a callable (module, name) -> bool, got {type(filter_fn).__name__}"
        )
    targets = [
        (n, m)
        for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, SparseGatedMLP) and (filter_fn is None or filter_fn(m, n))
    ]
    done: dict[int, nn.Module] = {}
    for name, mlp in targets:
        if id(mlp) in done:  # the same module under another name
            _set_module(model, name, done[id(mlp)])
            continue
        shell = done[id(mlp)] = _plain_mlp(mlp)
        for p in _PROJ:
            setattr(shell, p, getattr(mlp, p))
        shell.act_fn = nn.ReLU()
        if hasattr(mlp, _SHELL_ATTR):
            object.__delattr__(mlp, _SHELL_ATTR)
        _set_module(model, name, shell)
    return model

"""Running a Hugging Face model over local text and capturing what enters its gated MLPs.

Used by ``twell stats`` and by ``twell bench kernels --from-model``. A
:class:`twell.SparseGatedMLP` calls :func:`twell.sparse_ffn` with its weights directly (the
``gate_proj`` forward hooks never fire), so the capture is a forward *pre*-hook on the MLP
module itself: its input ``x`` and ``gate_proj.weight`` give the active set ``x W_gate^T > 0``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_model", "load_tokenizer", "read_texts", "token_blocks", "gated_mlps", "capture_mlp_inputs"]

_TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json")


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM`` from a local directory (no download), in eval mode on ``device``.

    twell's own model classes are registered first when :mod:`twell.models` is installed, so
    SparseLM checkpoints load too.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model: {str(path)!r} is not a local model directory")
    try:
        import twell.models as tm

        reg = getattr(tm, "register", None) or getattr(tm, "register_auto_classes", None)
        if callable(reg):
            reg()
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM

    # the dtype is applied after loading: the keyword's name changed across transformers versions
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(path: str | Path):
    """``AutoTokenizer`` from a local directory."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer: {str(path)!r} is not a local directory")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def read_texts(path: str | Path) -> list[str]:
    """Documents from a ``.txt``/``.md`` file (one document), a ``.jsonl`` file (field ``text`` of
    each line), a ``.json`` list of strings or objects with ``text``, or a directory of those."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"data: no {_TEXT_SUFFIXES} files under {str(path)!r}")
        return [t for f in files for t in read_texts(f)]
    if not path.is_file():
        raise ValueError(f"data: {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"data: {path}:{i} is not JSON ({e.msg})") from None
                docs.append(obj["text"] if isinstance(obj, dict) else str(obj))
        return docs
    if path.suffix == ".json":
        obj = json.loads(text)
        if not isinstance(obj, list):
            raise ValueError(f"data: {path} must hold a JSON list of strings or {{'text': ...}} objects")
        return [o["text"] if isinstance(o, dict) else str(o) for o in obj]
    return [text]


def token_blocks(tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Documents joined with EOS, tokenized and cut into ``[B, seq_len]`` blocks (the tail shorter
    than a block is dropped unless it is all there is). ``max_tokens`` caps B * seq_len."""
    if seq_len < 1:
        raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens + seq_len:
            break
    if not ids:
        raise ValueError("data: the text produced no tokens")
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.long)
    B = len(ids) // seq_len
    if max_tokens is not None:
        B = max(1, min(B, max_tokens // seq_len))
    return torch.tensor(ids[: B * seq_len], dtype=torch.long).view(B, seq_len)


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every gated MLP (``gate_proj``/``up_proj``/``down_proj`` linears or a
    :class:`twell.SparseGatedMLP`), outermost matches, in model order."""
    found = []
    for name, mod in model.named_modules():
        if any(name.startswith(f + ".") for f, _ in found):
            continue
        if all(isinstance(getattr(mod, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            found.append((name, mod))
    if not found:
        raise ValueError("model: no gated MLP (gate_proj/up_proj/down_proj) found")
    return found


class capture_mlp_inputs:
    """Context manager: while active, ``callback(layer, name, x2d, module)`` runs on the input of
    every gated MLP of ``model`` (``x2d`` is ``[tokens, K]``, detached)."""

    def __init__(self, model: nn.Module, callback: Callable[[int, str, torch.Tensor, nn.Module], None]):
        self.mlps = gated_mlps(model)
        self.callback = callback
        self._handles = []

    def __enter__(self):
        for i, (name, mod) in enumerate(self.mlps):

            def hook(module, args, i=i, name=name):
                x = args[0]
                self.callback(i, name, x.detach().reshape(-1, x.shape[-1]), module)

            self._handles.append(mod.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False
